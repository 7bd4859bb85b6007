//! Opening a SQLite file for the broker and the result backend: `sqlite://relative.db`,
//! `sqlite:///absolute/path.db`, WAL journal, a busy timeout so several processes can share
//! the file.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::future::Future;
use std::time::{Duration, Instant};

/// The file path in a `sqlite://` URL.
pub(crate) fn path_of(url: &str) -> &str {
    url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url)
}

/// Opens (creating if missing) the database file of `url`.
pub(crate) async fn open(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let path = path_of(url);
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    retry_locked(|| SqlitePoolOptions::new().max_connections(4).min_connections(1).connect_with(options.clone())).await
}

/// Runs `step` again while SQLite answers "database is locked" at once (it does so, without
/// waiting out the busy timeout, when processes open a new file together and switch it to WAL
/// or create its tables at the same moment), for up to 10 s.
pub(crate) async fn retry_locked<T, F, Fut>(mut step: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_millis(5);
    loop {
        match step().await {
            Err(e) if is_locked(&e) && Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            done => return done,
        }
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED.
fn is_locked(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("5" | "6" | "261" | "517")) || d.message().contains("database is locked")
        }
        _ => false,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn millis(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    millis(chrono::Utc::now())
}
