//! Redis broker reliability, against a real Redis server (skipped with a message when none is
//! reachable, a failure under `CELERIAC_REQUIRE_SERVICES=1`):
//! - an ETA far longer than the visibility timeout runs exactly once (the delayed set);
//! - a worker killed with SIGKILL while holding `acks_late` tasks: every task still reaches
//!   SUCCESS exactly once, recovered through heartbeats in seconds;
//! - the Redis server restarts under load: nothing is lost and the worker carries on by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::{App, Request, State, TaskResult, task};
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const CHILD_URL: &str = "CELERIAC_TEST_REDIS_CHILD";

fn transport(visibility: f64) -> toml::Value {
    toml::Value::Table(toml::toml! { visibility_timeout = visibility })
}

static ETA_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "r.eta", acks_late = true)]
async fn eta_task() -> TaskResult<()> {
    ETA_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test]
async fn an_eta_longer_than_the_visibility_timeout_runs_once() {
    let Some(url) = common::redis_url(3).await else { return };
    let app = App::builder()
        .broker_url(&url)
        .set("broker_transport_options", transport(1.0))
        .task(eta_task)
        .build()
        .await
        .unwrap();
    let r = eta_task::s().countdown(6.0).delay(&app).await.unwrap();
    // Two workers, a 1 s visibility timeout, a 6 s ETA: kombu would redeliver it five times.
    let (s1, w1) = common::start_worker(&app, 2);
    let (s2, w2) = common::start_worker(&app, 2);
    r.get::<()>(Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s1.graceful();
    s2.graceful();
    w1.await.unwrap();
    w2.await.unwrap();
    assert_eq!(ETA_RUNS.load(Ordering::SeqCst), 1);
}

fn marker(req: &Request, line: &str) {
    let path = std::env::temp_dir().join(format!(
        "celeriac-redis-kill-{}.log",
        req.root_id.as_deref().unwrap_or("x").split('-').next().unwrap_or("x")
    ));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(f, "{line}").unwrap();
}

#[task(name = "r.work", bind = true, acks_late = true)]
async fn work(req: Request, n: u32) -> TaskResult<u32> {
    marker(&req, &format!("start {n} {}", std::process::id()));
    if !req.redelivered && std::env::var(CHILD_URL).is_ok() {
        tokio::time::sleep(Duration::from_secs(120)).await; // the killed worker never finishes
    }
    marker(&req, &format!("done {n} {}", std::process::id()));
    Ok(n)
}

async fn kill_app(url: &str) -> App {
    App::builder().broker_url(url).task(work).build().await.unwrap()
}

/// Runs only as the child process of the SIGKILL test.
#[tokio::test]
async fn redis_child_worker() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    let app = kill_app(&url).await;
    common::start_worker(&app, 4).1.await.unwrap();
}

#[tokio::test]
async fn sigkill_with_acks_late_tasks_loses_nothing() {
    let Some(url) = common::redis_url(4).await else { return };
    let app = kill_app(&url).await;
    let root = uuid::Uuid::new_v4().to_string();
    let log = std::env::temp_dir().join(format!("celeriac-redis-kill-{}.log", root.split('-').next().unwrap()));
    let _ = std::fs::remove_file(&log);
    let mut results = Vec::new();
    for n in 0..4 {
        results.push(work::s(n).set("root_id", root.as_str()).delay(&app).await.unwrap());
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "redis_child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_URL, &url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let all_started = common::eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().filter(|x| x.starts_with("start")).count() == 4)
    })
    .await;
    assert!(all_started, "the child took all four tasks");
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let (shutdown, worker) = common::start_worker(&app, 4);
    for r in &results {
        r.get::<u32>(Duration::from_secs(40)).await.unwrap();
    }
    let recovered_in = killed.elapsed();
    shutdown.graceful();
    worker.await.unwrap();
    let lines = std::fs::read_to_string(&log).unwrap();
    for n in 0..4 {
        let done = lines.lines().filter(|l| l.starts_with(&format!("done {n} "))).count();
        assert_eq!(done, 1, "task {n} finished exactly once:\n{lines}");
        assert_eq!(results[n as usize].state().await.unwrap(), State::Success);
    }
    assert!(
        recovered_in < Duration::from_secs(25),
        "recovered in {recovered_in:?} (heartbeat expiry, not the visibility timeout)"
    );
    let _ = std::fs::remove_file(&log);
}

static RESTART_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "r.steady", acks_late = true)]
async fn steady(n: u32) -> TaskResult<u32> {
    RESTART_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(n)
}

struct RedisServer {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A private redis-server with an append-only file, so a restart keeps the data.
    fn start(port: u16, dir: Option<tempfile::TempDir>) -> Option<RedisServer> {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(RedisServer { child, port, dir })
    }

    fn stop(mut self) -> tempfile::TempDir {
        let _ = std::process::Command::new("redis-cli").args(["-p", &self.port.to_string(), "shutdown"]).status();
        let _ = self.child.wait();
        self.dir
    }
}

#[tokio::test]
async fn a_redis_restart_under_load_loses_nothing() {
    // Needs the redis-server binary (a private server on another port), not the shared one.
    if common::redis_url(5).await.is_none() {
        return;
    }
    let port = 6391;
    let Some(server) = RedisServer::start(port, None) else {
        eprintln!("SKIPPED: no redis-server binary to run a private server");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}/0");
    let app = App::builder().broker_url(&url).task(steady).build().await.unwrap();
    let mut results = Vec::new();
    for n in 0..300 {
        results.push(steady::delay(&app, n).await.unwrap());
    }
    let (shutdown, worker) = common::start_worker(&app, 4);
    assert!(common::eventually(Duration::from_secs(20), || async { RESTART_RUNS.load(Ordering::SeqCst) >= 30 }).await);
    let dir = server.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server = RedisServer::start(port, Some(dir)).expect("restart redis-server");
    let mut done = 0;
    for r in &results {
        if r.get::<u32>(Duration::from_secs(60)).await.is_ok() {
            done += 1;
        }
    }
    shutdown.graceful();
    worker.await.unwrap();
    let _ = server.stop();
    assert_eq!(done, 300, "every task reached SUCCESS after the restart");
}

static STARTS: std::sync::Mutex<Vec<(u32, Instant)>> = std::sync::Mutex::new(Vec::new());

#[task(name = "r.stamp", ignore_result = true)]
async fn stamp(n: u32) -> TaskResult<()> {
    STARTS.lock().unwrap().push((n, Instant::now()));
    Ok(())
}

fn started_at(n: u32) -> Option<Instant> {
    STARTS.lock().unwrap().iter().find(|(m, _)| *m == n).map(|(_, t)| *t)
}

/// Publish-to-start latency of a task reaching a worker that has been idle (nothing to do for
/// 300 ms), with the worker's default 1 s fetch wait: the worker must be woken by the server
/// (a blocking pop), not find the message at its next poll.
#[tokio::test]
async fn an_idle_worker_starts_a_new_task_within_milliseconds() {
    let Some(url) = common::redis_url(8).await else { return };
    let app = App::builder().broker_url(&url).task(stamp).build().await.unwrap();
    let mut options = common::fast_options(&app, 1);
    options.poll_wait = Duration::from_secs(1);
    let (shutdown, worker) = celeriac::Worker::new(&app).options(options).spawn();
    // A first task: the worker is up and consuming.
    stamp::delay(&app, 0).await.unwrap();
    assert!(common::eventually(Duration::from_secs(10), || async { started_at(0).is_some() }).await);
    let mut ms = Vec::new();
    for n in 1..=20 {
        tokio::time::sleep(Duration::from_millis(300)).await; // idle: the condition measured
        let sent = Instant::now();
        stamp::delay(&app, n).await.unwrap();
        assert!(common::eventually(Duration::from_secs(10), || async { started_at(n).is_some() }).await);
        ms.push(started_at(n).unwrap().duration_since(sent).as_secs_f64() * 1000.0);
    }
    shutdown.graceful();
    worker.await.unwrap();
    ms.sort_by(f64::total_cmp);
    let (p50, p90, max) = (ms[ms.len() / 2], ms[ms.len() * 9 / 10], ms[ms.len() - 1]);
    eprintln!("idle-to-start latency over {} tasks: p50 {p50:.2} ms, p90 {p90:.2} ms, max {max:.2} ms", ms.len());
    assert!(p50 < 15.0, "p50 {p50:.2} ms: an idle worker should be woken by the server, not by a poll");
}

static LONG_RUNS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Longer than a node's liveness key lives (10 s) plus a recovery scan (5 s).
const LONG_TASK: Duration = Duration::from_secs(17);

#[task(name = "r.long", acks_late = true)]
async fn long_task(n: u32) -> TaskResult<u32> {
    LONG_RUNS.lock().unwrap().push(n);
    tokio::time::sleep(LONG_TASK).await;
    Ok(n)
}

fn saturated_worker(app: &App, queue: &str) -> (celeriac::Shutdown, tokio::task::JoinHandle<celeriac::WorkerSummary>) {
    let mut options = common::fast_options(app, 1);
    options.prefetch_multiplier = 1; // one unacknowledged message: busy means no fetching
    options.queues = vec![queue.into()];
    celeriac::Worker::new(app).options(options).spawn()
}

/// Two workers, each busy with one `acks_late` task that runs longer than the liveness key
/// lives, and so not fetching; a third, idle, worker scans for dead nodes all along. The busy
/// workers stay alive (their liveness is refreshed by a timer, not by fetching), so nothing is
/// given back and each task runs exactly once.
#[tokio::test]
async fn saturated_workers_with_long_tasks_stay_alive() {
    let Some(url) = common::redis_url(11).await else { return };
    let app = |_: u8| async { App::builder().broker_url(&url).task(long_task).build().await.unwrap() };
    let (a, b, observer) = (app(0).await, app(1).await, app(2).await);
    let results = [long_task::delay(&a, 0).await.unwrap(), long_task::delay(&a, 1).await.unwrap()];
    let workers = [saturated_worker(&a, "celery"), saturated_worker(&b, "celery"), saturated_worker(&observer, "idle")];
    assert!(common::eventually(Duration::from_secs(10), || async { LONG_RUNS.lock().unwrap().len() == 2 }).await);
    let started = Instant::now();
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    // Past the liveness key's lifetime: the busy nodes are still alive.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let alive: Vec<String> = redis::cmd("KEYS").arg("celeriac.alive.*").query_async(&mut conn).await.unwrap();
    assert_eq!(alive.len(), 3, "three nodes alive 12 s into their tasks: {alive:?}");
    for r in &results {
        r.get::<u32>(Duration::from_secs(30)).await.unwrap();
    }
    assert!(started.elapsed() >= LONG_TASK - Duration::from_secs(1));
    // Nothing was given back: no second copy waits or runs.
    let waiting: u64 = redis::cmd("LLEN").arg("celery").query_async(&mut conn).await.unwrap();
    let unacked: u64 = redis::cmd("HLEN").arg("unacked").query_async(&mut conn).await.unwrap();
    for (shutdown, _) in &workers {
        shutdown.graceful();
    }
    for (_, handle) in workers {
        handle.await.unwrap();
    }
    let mut runs = LONG_RUNS.lock().unwrap().clone();
    runs.sort();
    assert_eq!((waiting, unacked, runs), (0, 0, vec![0, 1]), "each long task ran exactly once");
}
