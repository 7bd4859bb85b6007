//! Graceful shutdown driven by real signals. The worker is this test binary re-run as a child
//! process (`child_worker`, as in `sigkill.rs`), on a SQLite file it shares with the test, and
//! the test sends it SIGTERM with `kill`:
//!
//! - one SIGTERM: the running task finishes, the prefetched one goes back to the queue at once
//!   and later runs exactly once on another worker;
//! - a second SIGTERM: an `acks_late` task stops and its message goes back to the queue (it runs
//!   once later); an early-acked task is stored FAILURE with `WorkerLostError`;
//! - the grace period (`worker_soft_shutdown_timeout`) running out does the same with no second
//!   signal.
//!
//! Tasks mark `start`/`done` lines with their process id in `marker.log`, and wait for a
//! `release` file, so the test decides when a task may finish.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::cli::LogFormat;
use celeriac::{App, Request, State, TaskResult, Worker, WorkerOptions, task};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// The child's SQLite URL; its presence makes `child_worker` run.
const CHILD_DB: &str = "CELERIAC_TEST_SHUTDOWN_DB";
/// The child's `concurrency,prefetch_multiplier,worker_soft_shutdown_timeout`.
const CHILD_OPTIONS: &str = "CELERIAC_TEST_SHUTDOWN_OPTIONS";

/// Marks its start, waits for the test's `release` file, marks its end; returns its pid.
async fn held(req: &Request, label: &str) -> u32 {
    let pid = std::process::id();
    common::mark(req, &format!("start {label} {pid}"));
    while !common::beside_db(req, "release").exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    common::mark(req, &format!("done {label} {pid}"));
    pid
}

/// Acknowledged before it runs (the default).
#[task(name = "s.hold", bind = true)]
async fn hold(req: Request, label: String) -> TaskResult<u32> {
    Ok(held(&req, &label).await)
}

/// Acknowledged after it ran.
#[task(name = "s.hold_late", bind = true, acks_late = true)]
async fn hold_late(req: Request, label: String) -> TaskResult<u32> {
    Ok(held(&req, &label).await)
}

/// Runs at once.
#[task(name = "s.quick", bind = true)]
async fn quick(req: Request, label: String) -> TaskResult<u32> {
    let pid = std::process::id();
    common::mark(&req, &format!("start {label} {pid}"));
    Ok(pid)
}

fn builder(url: &str) -> celeriac::AppBuilder {
    App::builder().broker_url(url).task(hold).task(hold_late).task(quick)
}

async fn app(url: &str) -> App {
    builder(url).build().await.expect("app")
}

/// The worker process: runs until signalled, as `celeriac worker` does.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "the worker process the other tests start (with --ignored); does nothing on its own"]
async fn child_worker() {
    let Ok(url) = std::env::var(CHILD_DB) else { return };
    let options = std::env::var(CHILD_OPTIONS).expect("child options");
    let [concurrency, prefetch, grace]: [&str; 3] =
        options.split(',').collect::<Vec<_>>().try_into().expect("concurrency,prefetch,grace");
    celeriac::cli::init_logging("celeriac=info", LogFormat::Human);
    let app = builder(&url).set("worker_soft_shutdown_timeout", grace.parse::<f64>().unwrap()).build().await.unwrap();
    let mut o = WorkerOptions::from_app(&app);
    o.concurrency = concurrency.parse().unwrap();
    o.prefetch_multiplier = prefetch.parse().unwrap();
    o.poll_wait = Duration::from_millis(50);
    o.hostname = "child@localhost".into();
    let summary = Worker::new(&app).options(o).run_until_signal().await;
    eprintln!("child summary: {summary:?}");
}

/// A worker process, killed (if still running) when dropped.
struct ChildWorker {
    child: Child,
    log: PathBuf,
}

impl ChildWorker {
    /// Starts `child_worker` on `url`; its output goes to `worker.log` in `dir`.
    fn spawn(url: &str, dir: &Path, concurrency: usize, prefetch: usize, grace: f64) -> Self {
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_worker", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, url)
            .env(CHILD_OPTIONS, format!("{concurrency},{prefetch},{grace}"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn the worker process");
        ChildWorker { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM, as `kill` and process managers do.
    fn sigterm(&self) {
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -TERM {}", self.pid());
    }

    /// Waits for the process to exit by itself.
    async fn exited(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "the worker did not exit: {}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `queue` shows `(ready, leased)`.
async fn queue_shows(app: &App, ready: u64, leased: u64) -> bool {
    common::eventually(WAIT, || async {
        let q = common::queue_stats(app, "celery").await;
        (q.ready, q.leased, q.scheduled) == (ready, leased, 0)
    })
    .await
}

/// Waits until `line` was marked.
async fn marked(dir: &Path, line: &str) -> bool {
    common::eventually(WAIT, || async { common::marks(dir).iter().any(|l| l == line) }).await
}

/// Lets every held task finish.
fn release(dir: &Path) {
    std::fs::write(dir.join("release"), "").unwrap();
}

/// The marks that start with `prefix` (e.g. `"start b "`).
fn marks_of(dir: &Path, prefix: &str) -> Vec<String> {
    common::marks(dir).into_iter().filter(|l| l.starts_with(prefix)).collect()
}

fn assert_worker_lost(meta: &celeriac::protocol::ResultMeta) {
    assert_eq!(meta.status, State::Failure, "{meta:?}");
    let exc = meta.exception_info().expect("an exception is stored");
    assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("WorkerLostError", "billiard.exceptions"));
}

#[tokio::test]
async fn sigterm_lets_the_running_task_finish_and_returns_the_prefetched_one() {
    let (dir, url) = common::sqlite_url();
    let app = app(&url).await;
    let running = hold::delay(&app, "a".into()).await.unwrap();
    // One slot, prefetch 1: `a` runs (acked), `b` is fetched and waits for the slot.
    let mut worker = ChildWorker::spawn(&url, dir.path(), 1, 1, 60.0);
    let child = worker.pid();
    assert!(marked(dir.path(), &format!("start a {child}")).await, "a never started: {}", worker.output());
    let prefetched = quick::delay(&app, "b".into()).await.unwrap();
    assert!(queue_shows(&app, 0, 1).await, "b was never prefetched: {}", worker.output());

    worker.sigterm();
    assert!(queue_shows(&app, 1, 0).await, "b went back to the queue at once: {}", worker.output());
    assert_eq!(running.state().await.unwrap(), State::Pending, "a is still running");
    release(dir.path());
    assert!(worker.exited().await.success(), "clean exit: {}", worker.output());
    assert_eq!(running.get::<u32>(WAIT).await.unwrap(), child, "the signalled worker finished a");
    assert_eq!(marks_of(dir.path(), "start b "), Vec::<String>::new(), "b never started there");

    let (shutdown, next) = common::start_worker(&app, 1);
    assert_eq!(prefetched.get::<u32>(WAIT).await.unwrap(), std::process::id(), "another worker ran b");
    shutdown.graceful();
    assert_eq!(next.await.unwrap().succeeded, 1, "and only b");
    assert_eq!(marks_of(dir.path(), "start b "), vec![format!("start b {}", std::process::id())], "b ran once");
    assert_eq!(marks_of(dir.path(), "start a "), vec![format!("start a {child}")], "a ran once");
    assert!(queue_shows(&app, 0, 0).await);
}

#[tokio::test]
async fn a_second_sigterm_stops_an_acks_late_task_and_returns_it_to_the_queue() {
    let (dir, url) = common::sqlite_url();
    let app = app(&url).await;
    let late = hold_late::delay(&app, "l".into()).await.unwrap();
    // `l` is unacknowledged while it runs; prefetch 2 leaves room for one more.
    let mut worker = ChildWorker::spawn(&url, dir.path(), 1, 2, 60.0);
    let child = worker.pid();
    assert!(marked(dir.path(), &format!("start l {child}")).await, "l never started: {}", worker.output());
    let prefetched = quick::delay(&app, "b".into()).await.unwrap();
    assert!(queue_shows(&app, 0, 2).await, "l running and b prefetched: {}", worker.output());

    worker.sigterm();
    // The first signal has been handled once b is back; signals sent closer together can merge.
    assert!(queue_shows(&app, 1, 1).await, "b went back, l still runs: {}", worker.output());
    worker.sigterm();
    assert!(worker.exited().await.success(), "clean exit: {}", worker.output());
    assert!(queue_shows(&app, 2, 0).await, "l went back to the queue too");
    assert_eq!(late.state().await.unwrap(), State::Pending, "nothing stored for l");
    assert_eq!(marks_of(dir.path(), "done l "), Vec::<String>::new(), "l did not finish there");

    release(dir.path());
    let (shutdown, next) = common::start_worker(&app, 1);
    let me = std::process::id();
    assert_eq!(late.get::<u32>(WAIT).await.unwrap(), me, "another worker ran l");
    assert_eq!(prefetched.get::<u32>(WAIT).await.unwrap(), me, "and b");
    shutdown.graceful();
    assert_eq!(next.await.unwrap().succeeded, 2);
    assert_eq!(marks_of(dir.path(), "start l "), vec![format!("start l {child}"), format!("start l {me}")]);
    assert_eq!(marks_of(dir.path(), "done l "), vec![format!("done l {me}")], "l finished exactly once");
    assert_eq!(marks_of(dir.path(), "start b "), vec![format!("start b {me}")], "b ran once");
    assert!(queue_shows(&app, 0, 0).await);
}

#[tokio::test]
async fn a_second_sigterm_stores_an_early_acked_task_as_worker_lost() {
    let (dir, url) = common::sqlite_url();
    let app = app(&url).await;
    let early = hold::delay(&app, "e".into()).await.unwrap();
    let mut worker = ChildWorker::spawn(&url, dir.path(), 1, 1, 60.0);
    let child = worker.pid();
    assert!(marked(dir.path(), &format!("start e {child}")).await, "e never started: {}", worker.output());
    let prefetched = quick::delay(&app, "b".into()).await.unwrap();
    assert!(queue_shows(&app, 0, 1).await, "b was never prefetched: {}", worker.output());

    worker.sigterm();
    assert!(queue_shows(&app, 1, 0).await, "the first signal was handled: {}", worker.output());
    worker.sigterm();
    assert!(worker.exited().await.success(), "clean exit: {}", worker.output());
    // Acked before it ran, so the broker no longer has it: the result says it was lost.
    assert_worker_lost(&early.meta().await.unwrap());
    assert!(queue_shows(&app, 1, 0).await, "only b is left in the queue");

    let (shutdown, next) = common::start_worker(&app, 1);
    assert_eq!(prefetched.get::<u32>(WAIT).await.unwrap(), std::process::id());
    shutdown.graceful();
    assert_eq!(next.await.unwrap().processed, 1, "e is not run again");
    assert_eq!(marks_of(dir.path(), "start e "), vec![format!("start e {child}")]);
    assert_worker_lost(&early.meta().await.unwrap());
}

#[tokio::test]
async fn when_the_grace_period_runs_out_running_tasks_are_stopped() {
    let (dir, url) = common::sqlite_url();
    let app = app(&url).await;
    let early = hold::delay(&app, "e".into()).await.unwrap();
    let late = hold_late::delay(&app, "l".into()).await.unwrap();
    let mut worker = ChildWorker::spawn(&url, dir.path(), 2, 1, 1.0);
    let child = worker.pid();
    assert!(marked(dir.path(), &format!("start e {child}")).await, "e never started: {}", worker.output());
    assert!(marked(dir.path(), &format!("start l {child}")).await, "l never started: {}", worker.output());

    worker.sigterm();
    // No second signal: the worker stops the tasks itself once its 1 s grace is over.
    assert!(worker.exited().await.success(), "clean exit: {}", worker.output());
    let output = worker.output();
    assert!(output.contains("tasks still running after the shutdown grace period"), "{output}");
    assert_worker_lost(&early.meta().await.unwrap());
    assert_eq!(late.state().await.unwrap(), State::Pending, "nothing stored for the acks_late task");
    assert!(queue_shows(&app, 1, 0).await, "the acks_late task is back in the queue");

    release(dir.path());
    let (shutdown, next) = common::start_worker(&app, 1);
    let me = std::process::id();
    assert_eq!(late.get::<u32>(WAIT).await.unwrap(), me, "another worker ran l");
    shutdown.graceful();
    assert_eq!(next.await.unwrap().processed, 1, "and nothing else");
    assert_eq!(marks_of(dir.path(), "done l "), vec![format!("done l {me}")], "l finished exactly once");
    assert_eq!(marks_of(dir.path(), "start e "), vec![format!("start e {child}")], "e is not run again");
}
