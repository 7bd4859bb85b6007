//! Helpers shared by the integration tests.
#![allow(dead_code, missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use celeriac::broker::QueueStats;
use celeriac::{App, AppBuilder, Request, Shutdown, Worker, WorkerOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A fresh SQLite file in a temp dir (kept alive by the returned guard).
pub fn sqlite_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("celeriac.db").display());
    (dir, url)
}

/// A file beside the SQLite database of `req`'s app: a test and the worker processes it starts
/// share that directory.
pub fn beside_db(req: &Request, name: &str) -> PathBuf {
    let url = req.app().broker().url();
    PathBuf::from(url.trim_start_matches("sqlite://")).with_file_name(name)
}

/// Appends `line` to `marker.log` beside the database (see [`marks`]).
pub fn mark(req: &Request, line: &str) {
    let path = beside_db(req, "marker.log");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("marker file");
    writeln!(f, "{line}").expect("write marker");
}

/// The lines [`mark`] wrote into `dir` so far.
pub fn marks(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("marker.log")).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// The broker's counts for `queue` (all zero when it holds nothing there).
pub async fn queue_stats(app: &App, queue: &str) -> QueueStats {
    app.broker().stats().await.unwrap().into_iter().find(|s| s.queue == queue).unwrap_or_default()
}

/// Worker options for tests: short polls and grace.
pub fn fast_options(app: &App, concurrency: usize) -> WorkerOptions {
    let mut o = WorkerOptions::from_app(app);
    o.concurrency = concurrency;
    o.poll_wait = Duration::from_millis(50);
    o.shutdown_timeout = 5.0;
    o.hostname = "test@localhost".into();
    o
}

/// Starts a worker in the background.
pub fn start_worker(app: &App, concurrency: usize) -> (Shutdown, tokio::task::JoinHandle<celeriac::WorkerSummary>) {
    Worker::new(app).options(fast_options(app, concurrency)).spawn()
}

/// An app on a memory broker and backend with `builder`'s tasks.
pub async fn memory_app(builder: AppBuilder) -> App {
    builder.broker_url("memory://").build().await.expect("app")
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A Redis URL on database `db`, flushed, or `None` (with a visible message) when no Redis
/// server is reachable. With `CELERIAC_REQUIRE_SERVICES=1` (CI) a missing server panics.
pub async fn redis_url(db: u8) -> Option<String> {
    let url = format!("redis://127.0.0.1:6379/{db}");
    let attempt = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHDB").query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(())) => Some(url),
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if std::env::var("CELERIAC_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("Redis is required (CELERIAC_REQUIRE_SERVICES=1) but {url} is not reachable: {why}");
            }
            eprintln!(
                "SKIPPED: Redis not reachable at {url} ({why}); set CELERIAC_REQUIRE_SERVICES=1 to make this a failure"
            );
            None
        }
    }
}
