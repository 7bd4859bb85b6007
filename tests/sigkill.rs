//! A worker killed with SIGKILL while it holds an `acks_late` task on SQLite: a second worker
//! gets the task once the lease runs out and runs it to SUCCESS, exactly once after the kill.
//! Likewise a worker killed in the middle of a saga compensation: the next worker resumes the
//! rollback.
//!
//! The killed worker is this test binary re-run as a child process (`child_worker`), so the
//! kill is a real `kill -9` of a separate process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::{App, Request, State, TaskResult, task};
use std::time::{Duration, Instant};

const CHILD_DB: &str = "CELERIAC_TEST_CHILD_DB";

#[task(name = "k.work", bind = true, acks_late = true)]
async fn work(req: Request) -> TaskResult<u32> {
    common::mark(
        &req,
        &format!("start {} delivery={}", std::process::id(), if req.redelivered { "again" } else { "first" }),
    );
    if !req.redelivered {
        // The first worker is killed in here.
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    common::mark(&req, &format!("done {}", std::process::id()));
    Ok(std::process::id())
}

#[task(name = "k.step")]
async fn step(x: i64) -> TaskResult<i64> {
    Ok(x)
}

#[task(name = "k.fail", max_retries = 0)]
async fn fail(_x: i64) -> TaskResult<()> {
    Err(celeriac::TaskError::new("Boom", "step failed for good"))
}

/// A compensation the first worker is killed in the middle of.
#[task(name = "k.undo", bind = true)]
async fn undo(req: Request, x: i64) -> TaskResult<i64> {
    common::mark(
        &req,
        &format!("undo {} {x} delivery={}", std::process::id(), if req.redelivered { "again" } else { "first" }),
    );
    if !req.redelivered {
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    Ok(x)
}

async fn app(url: &str) -> App {
    App::builder()
        .broker_url(url)
        .set("broker_transport_options", toml::Value::Table(toml::toml! { visibility_timeout = 1.0 }))
        .task(work)
        .task(step)
        .task(fail)
        .task(undo)
        .build()
        .await
        .expect("app")
}

fn spawn_child(url: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, url)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child worker")
}

/// Runs only as the child process of `sigkill_hands_the_task_to_another_worker`.
#[tokio::test]
async fn child_worker() {
    let Ok(url) = std::env::var(CHILD_DB) else { return };
    let app = app(&url).await;
    common::start_worker(&app, 1).1.await.expect("worker");
}

#[tokio::test]
async fn sigkill_hands_the_task_to_another_worker() {
    let (dir, url) = common::sqlite_url();
    let marker = dir.path().join("marker.log");
    let app = app(&url).await;
    let result = work::delay(&app).await.unwrap();

    let mut child = spawn_child(&url);
    let started = common::eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&marker).is_ok_and(|m| m.contains("start"))
    })
    .await;
    assert!(started, "child worker never started the task");
    child.kill().expect("SIGKILL the child"); // SIGKILL on Unix
    child.wait().expect("reap child");
    let killed_at = Instant::now();

    let (shutdown, worker) = common::start_worker(&app, 1);
    let pid: u32 = result.get(Duration::from_secs(30)).await.expect("finished after the kill");
    let handoff = killed_at.elapsed();
    shutdown.graceful();
    let summary = worker.await.unwrap();

    assert_eq!(pid, std::process::id(), "the second worker ran it");
    assert_eq!(result.state().await.unwrap(), State::Success);
    assert_eq!(summary.succeeded, 1);
    let log = std::fs::read_to_string(&marker).unwrap();
    let starts: Vec<&str> = log.lines().filter(|l| l.starts_with("start")).collect();
    let dones: Vec<&str> = log.lines().filter(|l| l.starts_with("done")).collect();
    assert_eq!(starts.len(), 2, "started by the killed worker and once after: {log}");
    assert!(starts[1].ends_with("delivery=again"), "{log}");
    assert_eq!(dones, vec![format!("done {}", std::process::id())], "finished exactly once");
    assert!(handoff < Duration::from_secs(10), "handed over in {handoff:?}, expected within seconds");
    assert!(
        app.broker().stats().await.unwrap().iter().all(|s| s.ready + s.leased + s.scheduled == 0),
        "nothing left in the queue"
    );
}

#[tokio::test]
async fn sigkill_mid_rollback_the_next_worker_resumes_it() {
    let (dir, url) = common::sqlite_url();
    let marker = dir.path().join("marker.log");
    let app = app(&url).await;
    let first = uuid::Uuid::new_v4().to_string();
    celeriac::canvas::chain([
        step::s(5).with_task_id(&first).compensate_with(celeriac::Signature::new("k.undo", vec![])),
        celeriac::Signature::new("k.fail", vec![]),
    ])
    .delay(&app)
    .await
    .unwrap();
    let mut child = spawn_child(&url);
    let started = common::eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&marker).is_ok_and(|m| m.contains("undo"))
    })
    .await;
    assert!(started, "the child worker never started the compensation");
    let rb = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().expect("rollback recorded");
    assert_eq!((rb.state.as_str(), rb.steps[0].state.as_str()), ("running", "running"));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap child");

    let (shutdown, worker) = common::start_worker(&app, 1);
    let done = common::eventually(Duration::from_secs(30), || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.state == "done")
    })
    .await;
    shutdown.graceful();
    worker.await.unwrap();
    assert!(done, "the rollback was resumed and finished");
    let log = std::fs::read_to_string(&marker).unwrap();
    let undos: Vec<&str> = log.lines().filter(|l| l.starts_with("undo")).collect();
    assert_eq!(undos.len(), 2, "{log}");
    assert!(
        undos[1].ends_with(&format!("{} 5 delivery=again", std::process::id())),
        "resumed by this worker with the step's result: {log}"
    );
}
