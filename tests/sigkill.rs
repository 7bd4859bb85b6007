//! A worker killed with SIGKILL while it holds an `acks_late` task on SQLite: a second worker
//! gets the task once the lease runs out and runs it to SUCCESS, exactly once after the kill.
//!
//! The killed worker is this test binary re-run as a child process (`child_worker`), so the
//! kill is a real `kill -9` of a separate process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::{App, Request, State, TaskResult, task};
use std::io::Write;
use std::time::{Duration, Instant};

const CHILD_DB: &str = "CELERIAC_TEST_CHILD_DB";
const MARKER: &str = "CELERIAC_TEST_MARKER";

fn log_line(line: &str) {
    let path = std::env::var_os(MARKER)
        .map(std::path::PathBuf::from)
        .or_else(|| MARKER_PATH.get().cloned())
        .expect("marker path");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("marker file");
    writeln!(f, "{line}").expect("write marker");
}

#[task(name = "k.work", bind = true, acks_late = true)]
async fn work(req: Request) -> TaskResult<u32> {
    log_line(&format!("start {} delivery={}", std::process::id(), if req.redelivered { "again" } else { "first" }));
    if !req.redelivered {
        // The first worker is killed in here.
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
    log_line(&format!("done {}", std::process::id()));
    Ok(std::process::id())
}

async fn app(url: &str) -> App {
    App::builder()
        .broker_url(url)
        .set("broker_transport_options", toml::Value::Table(toml::toml! { visibility_timeout = 1.0 }))
        .task(work)
        .build()
        .await
        .expect("app")
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

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &url)
        .env(MARKER, &marker)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child worker");
    let started = common::eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(&marker).is_ok_and(|m| m.contains("start"))
    })
    .await;
    assert!(started, "child worker never started the task");
    child.kill().expect("SIGKILL the child"); // SIGKILL on Unix
    child.wait().expect("reap child");
    let killed_at = Instant::now();

    MARKER_PATH.set(marker.clone()).expect("marker set once");
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

/// The marker file in the parent process (environment variables cannot be set safely in a
/// multi-threaded test; the child gets the path through its environment).
static MARKER_PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
