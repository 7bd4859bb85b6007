//! Opening a SQLite file for the broker and the result backend: `sqlite://relative.db`,
//! `sqlite:///absolute/path.db`, WAL journal, a busy timeout so several processes can share
//! the file.
//!
//! Within one process the broker and the backend of a file share one [`Db`]: one connection
//! for every write (SQLite lets one writer in at a time anyway; two writer connections in one
//! process would only wait for each other in SQLite's busy handler, which sleeps a millisecond
//! or more per try, and each would throw its page cache away whenever the other committed) and
//! a few connections for reads, which WAL runs beside the writer. The write connection is
//! held behind a mutex rather than in a pool: a pool spawns a task to take each connection
//! back, one more hop per statement.

use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The file path in a `sqlite://` URL.
pub(crate) fn path_of(url: &str) -> &str {
    url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url)
}

/// One SQLite file's connections in this process.
#[derive(Debug)]
pub(crate) struct Db {
    /// Every statement that writes goes through this connection, one at a time.
    write: tokio::sync::Mutex<SqliteConnection>,
    /// Connections for statements that only read.
    pub(crate) read: SqlitePool,
}

impl Db {
    /// The write connection, once the statements queued before are done.
    pub(crate) async fn writer(&self) -> tokio::sync::MutexGuard<'_, SqliteConnection> {
        self.write.lock().await
    }
}

/// The files open in this process, by path (entries die with their last user).
static OPEN: Mutex<Option<HashMap<String, Weak<Db>>>> = Mutex::new(None);

fn registered(key: &str) -> Option<Arc<Db>> {
    let open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    open.as_ref().and_then(|m| m.get(key)).and_then(Weak::upgrade)
}

fn options(path: &str) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        // A claim returns up to a few hundred rows: room for all of them, so the connection's
        // thread never waits for the caller to take rows before it can go on.
        .row_buffer_size(512)
        // Checkpoint every 4,000 pages (16 MiB) of log rather than 1,000: fewer checkpoints,
        // and a page written many times in between is copied back once.
        .pragma("wal_autocheckpoint", "4000")
}

/// Opens `path` with at most `max` connections. A local file needs no liveness check before
/// each use (sqlx's default pings the connection's thread first: one more round trip per
/// statement).
async fn pool(path: &str, max: u32, min: u32) -> Result<SqlitePool, sqlx::Error> {
    let options = options(path);
    retry_locked(|| {
        SqlitePoolOptions::new()
            .max_connections(max)
            .min_connections(min)
            .test_before_acquire(false)
            .connect_with(options.clone())
    })
    .await
}

/// The connections of the file of `url` (creating it if missing), shared with every other
/// user of the same file in this process.
pub(crate) async fn open_shared(url: &str) -> Result<Arc<Db>, sqlx::Error> {
    let path = path_of(url);
    let key = |path: &str| std::fs::canonicalize(path).map(|p| p.display().to_string()).ok();
    if let Some(db) = key(path).and_then(|k| registered(&k)) {
        return Ok(db);
    }
    let options = options(path);
    let write = retry_locked(|| options.connect()).await?;
    let read = pool(path, 3, 0).await?;
    let fresh = Arc::new(Db { write: tokio::sync::Mutex::new(write), read });
    // Opened now, so the file exists and has a canonical name.
    let Some(key) = key(path) else { return Ok(fresh) };
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let map = open.get_or_insert_with(HashMap::new);
    map.retain(|_, db| db.strong_count() > 0);
    // Another task may have opened the same file meanwhile: the first one registered wins.
    if let Some(db) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(db);
    }
    map.insert(key, Arc::downgrade(&fresh));
    Ok(fresh)
}

/// Opens (creating if missing) the database file of `url`: a pool of its own.
pub(crate) async fn open(url: &str) -> Result<SqlitePool, sqlx::Error> {
    pool(path_of(url), 4, 1).await
}

/// Adds `column` (its definition, e.g. `ready INTEGER NOT NULL DEFAULT 1`) to `table` of a
/// file made before it existed; `true` when this call added it. Another process opening the
/// same old file may add it first ("duplicate column"): `false` then, as when it was there.
pub(crate) async fn add_column(conn: &mut SqliteConnection, table: &str, column: &str) -> Result<bool, sqlx::Error> {
    let name = column.split_whitespace().next().unwrap_or_default();
    let present = sqlx::query("SELECT 1 FROM pragma_table_info(?) WHERE name = ?")
        .bind(table)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .is_some();
    if present {
        return Ok(false);
    }
    // Only the crate's own table and column names are interpolated.
    let sql = format!("ALTER TABLE {table} ADD COLUMN {column}");
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("duplicate column") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Statement shapes for batches: a batch goes out in chunks of at most the largest, each
/// padded up to the smallest shape that holds it, so a handful of statements serve every
/// batch size from sqlx's per-connection statement cache (a statement per size would be
/// parsed and planned again for nearly every batch).
pub(crate) const SHAPES: [usize; 4] = [1, 8, 64, 256];

/// Splits `n` items into `(start, len, shape)` chunks: `len` items padded to `shape`.
pub(crate) fn shaped_chunks(n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let largest = SHAPES[SHAPES.len() - 1];
    (0..n).step_by(largest).map(move |start| {
        let len = (n - start).min(largest);
        let shape = SHAPES.iter().copied().find(|s| *s >= len).unwrap_or(largest);
        (start, len, shape)
    })
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
