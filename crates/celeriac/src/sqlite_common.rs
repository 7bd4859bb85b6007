//! Opening a SQLite file for the broker and the result backend: `sqlite://relative.db`,
//! `sqlite:///absolute/path.db`, WAL journal, a busy timeout so several processes can share
//! the file.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::time::Duration;

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
    SqlitePoolOptions::new().max_connections(4).min_connections(1).connect_with(options).await
}

/// Milliseconds since the Unix epoch.
pub(crate) fn millis(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    millis(chrono::Utc::now())
}
