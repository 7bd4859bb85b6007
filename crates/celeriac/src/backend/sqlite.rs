//! SQLite result backend (`sqlite://path.db`). One row per task holding Celery's result record
//! as JSON; the upsert refuses to replace a SUCCESS row, so a late duplicate cannot undo a
//! result.

use super::{BackendError, ChordPart, ResultBackend, StoreOutcome};
use crate::protocol::ResultMeta;
use crate::protocol::State;
use crate::sqlite_common::{SHAPES, now_millis, open_shared, path_of, shaped_chunks};
use async_trait::async_trait;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use std::time::Duration;
use tokio::sync::Notify;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS celeriac_results (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    meta BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS celeriac_results_expires ON celeriac_results (expires_at);
CREATE TABLE IF NOT EXISTS celeriac_chords (
    group_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    fired INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    added INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS celeriac_chord_members (
    group_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (group_id, task_id, idx)
);
CREATE TABLE IF NOT EXISTS celeriac_groups (
    group_id TEXT PRIMARY KEY,
    result BLOB NOT NULL,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS celeriac_records (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires_at INTEGER
);
";

/// The SQLite backend.
#[derive(Debug)]
pub struct SqliteBackend {
    /// The file's connections (shared with a broker on the same file): writes go through
    /// its one write connection.
    db: std::sync::Arc<crate::sqlite_common::Db>,
    url: String,
    written: Notify,
    /// Result writes go out in batches: one transaction (one commit) for all those waiting.
    writer: crate::batch::Coalescer<ResultRow, StoreOutcome>,
}

/// One result write: task id, status, the record, its expiry (Unix ms).
type ResultRow = (String, String, Vec<u8>, Option<i64>);

/// Writes a batch with one statement per chunk (each statement is a round trip to sqlx's
/// connection thread). The upsert refuses to replace a SUCCESS row, so a late duplicate cannot
/// undo a result; a chunk never holds one task twice, so the rows it returns (those written)
/// tell each write's outcome, and a later write of a task comes after its earlier one.
async fn store_many(pool: &mut SqliteConnection, rows: &[ResultRow]) -> Result<Vec<StoreOutcome>, sqlx::Error> {
    let now = now_millis();
    let largest = SHAPES[SHAPES.len() - 1];
    let mut out = Vec::with_capacity(rows.len());
    let mut start = 0;
    while start < rows.len() {
        let mut ids = std::collections::HashSet::new();
        let end = rows[start..]
            .iter()
            .take(largest)
            .position(|r| !ids.insert(r.0.as_str()))
            .map_or((start + largest).min(rows.len()), |i| start + i);
        let chunk = &rows[start..end];
        for (from, len, shape) in shaped_chunks(chunk.len()) {
            let part = &chunk[from..from + len];
            out.extend(store_chunk(&mut *pool, part, shape, now).await?);
        }
        start = end;
    }
    Ok(out)
}

/// One upsert statement for `rows` (distinct tasks), padded to `shape` rows of NULLs, which
/// the `WHERE` drops (so few statement texts serve every batch size).
async fn store_chunk(
    pool: &mut SqliteConnection,
    rows: &[ResultRow],
    shape: usize,
    now: i64,
) -> Result<Vec<StoreOutcome>, sqlx::Error> {
    let values = vec!["(?, ?, ?, ?, ?)"; shape].join(", ");
    // Only placeholders are interpolated; the values are bound. (An upsert from a SELECT
    // needs the SELECT's WHERE, which SQLite's parser wants before ON CONFLICT anyway.)
    let sql = format!(
        "INSERT INTO celeriac_results (task_id, status, meta, updated_at, expires_at)
         SELECT column1, column2, column3, column4, column5 FROM (VALUES {values}) WHERE column1 IS NOT NULL
         ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, meta = excluded.meta,
             updated_at = excluded.updated_at, expires_at = excluded.expires_at
         WHERE celeriac_results.status <> 'SUCCESS'
         RETURNING task_id"
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (task_id, status, meta, expires_at) in rows {
        q = q.bind(task_id).bind(status).bind(meta).bind(now).bind(*expires_at);
    }
    for _ in rows.len()..shape {
        q = q.bind(None::<&str>).bind(None::<&str>).bind(None::<&[u8]>).bind(None::<i64>).bind(None::<i64>);
    }
    let written = q.fetch_all(&mut *pool).await?;
    if written.len() == rows.len() {
        return Ok(vec![StoreOutcome::Stored; rows.len()]);
    }
    let written: std::collections::HashSet<String> = written.iter().map(|r| r.get::<String, _>(0)).collect();
    Ok(rows
        .iter()
        .map(|r| if written.contains(&r.0) { StoreOutcome::Stored } else { StoreOutcome::KeptSuccess })
        .collect())
}

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> BackendError {
    move |e| BackendError::storage(operation, e)
}

/// Creates the tables (a no-op when they are there) and adds columns older files lack.
async fn create_schema(pool: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(&mut *pool).await?;
    // Files made before `add_to_chord` lack the column.
    crate::sqlite_common::add_column(pool, "celeriac_chords", "added INTEGER NOT NULL DEFAULT 0").await?;
    Ok(())
}

impl SqliteBackend {
    /// Opens (creating if needed) the database in `url`.
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        let db = open_shared(url).await.map_err(err("open"))?;
        crate::sqlite_common::retry_locked(|| async { create_schema(&mut *db.writer().await).await })
            .await
            .map_err(err("create schema"))?;
        let writer = {
            let db = db.clone();
            crate::batch::Coalescer::new(256, move |rows: Vec<ResultRow>| {
                let db = db.clone();
                Box::pin(async move { store_many(&mut *db.writer().await, &rows).await.map_err(|e| e.to_string()) })
            })
        };
        Ok(SqliteBackend { db, url: format!("sqlite://{}", path_of(url)), written: Notify::new(), writer })
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn store(&self, meta: &ResultMeta, expires: Option<Duration>) -> Result<StoreOutcome, BackendError> {
        let expires_at = expires.map(|e| now_millis() + e.as_millis() as i64);
        let row = (meta.task_id.clone(), meta.status.as_str().to_owned(), meta.to_wire(), expires_at);
        let outcome = self.writer.call(row).await.map_err(|e| BackendError::Storage {
            operation: "store",
            source: Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()),
        })?;
        self.written.notify_waiters();
        Ok(outcome)
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let row = sqlx::query(
            "SELECT meta FROM celeriac_results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(task_id)
        .bind(now_millis())
        .fetch_optional(&self.db.read)
        .await
        .map_err(err("get"))?;
        row.map(|r| {
            let bytes: Vec<u8> = r.get("meta");
            ResultMeta::from_wire(&bytes)
                .map_err(|source| BackendError::Corrupt { task_id: task_id.to_owned(), source })
        })
        .transpose()
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        sqlx::query("DELETE FROM celeriac_results WHERE task_id = ?")
            .bind(task_id)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("forget"))?;
        Ok(())
    }

    async fn cleanup(&self) -> Result<u64, BackendError> {
        let now = now_millis();
        let done = sqlx::query("DELETE FROM celeriac_results WHERE expires_at IS NOT NULL AND expires_at <= ?")
            .bind(now)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("cleanup"))?;
        for sql in [
            "DELETE FROM celeriac_records WHERE expires_at IS NOT NULL AND expires_at <= ?",
            "DELETE FROM celeriac_chord_members WHERE group_id IN (SELECT group_id FROM celeriac_chords WHERE expires_at IS NOT NULL AND expires_at <= ?)",
            "DELETE FROM celeriac_groups WHERE expires_at IS NOT NULL AND expires_at <= ?",
            "DELETE FROM celeriac_chords WHERE expires_at IS NOT NULL AND expires_at <= ?",
        ] {
            sqlx::query(sql).bind(now).execute(&mut *self.db.writer().await).await.map_err(err("cleanup"))?;
        }
        Ok(done.rows_affected())
    }

    async fn set_chord_size(&self, group_id: &str, size: usize, expires: Option<Duration>) -> Result<(), BackendError> {
        sqlx::query(
            "INSERT INTO celeriac_chords (group_id, size, expires_at) VALUES (?, ?, ?)
             ON CONFLICT (group_id) DO UPDATE SET size = excluded.size, fired = 0, expires_at = excluded.expires_at",
        )
        .bind(group_id)
        .bind(size as i64)
        .bind(expires.map(|e| now_millis() + e.as_millis() as i64))
        .execute(&mut *self.db.writer().await)
        .await
        .map_err(err("set chord size"))?;
        Ok(())
    }

    async fn add_to_chord(&self, group_id: &str) -> Result<(), BackendError> {
        sqlx::query(
            "INSERT INTO celeriac_chords (group_id, size, added) VALUES (?, -1, 1)
             ON CONFLICT (group_id) DO UPDATE SET added = added + 1",
        )
        .bind(group_id)
        .execute(&mut *self.db.writer().await)
        .await
        .map_err(err("add to chord"))?;
        Ok(())
    }

    async fn chord_part_return(&self, group_id: &str, part: ChordPart) -> Result<Option<Vec<ChordPart>>, BackendError> {
        // The INSERT takes the write lock first, so concurrent members serialize here and
        // exactly one of them sees the count reach the size and flips `fired`.
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("chord part"))?;
        // A write first (so the transaction holds the write lock from the start), and nothing
        // recorded for a chord that already fired.
        sqlx::query(
            "INSERT INTO celeriac_chord_members (group_id, task_id, idx, state, result)
             SELECT ?1, ?2, ?3, ?4, ?5
             WHERE NOT EXISTS (SELECT 1 FROM celeriac_chords WHERE group_id = ?1 AND fired = 1)
             ON CONFLICT DO NOTHING",
        )
        .bind(group_id)
        .bind(&part.task_id)
        .bind(part.index.map(|i| i as i64).unwrap_or(-1))
        .bind(part.state.as_str())
        .bind(serde_json::to_vec(&part.result).unwrap_or_default())
        .execute(&mut *tx)
        .await
        .map_err(err("chord part"))?;
        let fired = sqlx::query(
            "UPDATE celeriac_chords SET fired = 1 WHERE group_id = ?1 AND fired = 0 AND size >= 0
             AND size + added = (SELECT COUNT(*) FROM celeriac_chord_members WHERE group_id = ?1)",
        )
        .bind(group_id)
        .execute(&mut *tx)
        .await
        .map_err(err("chord part"))?;
        let parts = if fired.rows_affected() == 1 {
            let rows = sqlx::query(
                "SELECT task_id, idx, state, result FROM celeriac_chord_members WHERE group_id = ?
                 ORDER BY CASE WHEN idx < 0 THEN 1 ELSE 0 END, idx, rowid",
            )
            .bind(group_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(err("chord part"))?;
            Some(
                rows.iter()
                    .map(|r| ChordPart {
                        index: u64::try_from(r.get::<i64, _>("idx")).ok(),
                        task_id: r.get("task_id"),
                        state: State::parse(r.get("state")),
                        result: serde_json::from_slice(&r.get::<Vec<u8>, _>("result")).unwrap_or_default(),
                    })
                    .collect(),
            )
        } else {
            None
        };
        tx.commit().await.map_err(err("chord part"))?;
        Ok(parts)
    }

    async fn chord_finished(&self, group_id: &str, body_sent: bool) -> Result<(), BackendError> {
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("chord finished"))?;
        if body_sent {
            sqlx::query("UPDATE celeriac_chords SET added = 0 WHERE group_id = ?")
                .bind(group_id)
                .execute(&mut *tx)
                .await
                .map_err(err("chord finished"))?;
            sqlx::query("DELETE FROM celeriac_chord_members WHERE group_id = ?")
                .bind(group_id)
                .execute(&mut *tx)
                .await
                .map_err(err("chord finished"))?;
        } else {
            sqlx::query("UPDATE celeriac_chords SET size = -1 WHERE group_id = ?")
                .bind(group_id)
                .execute(&mut *tx)
                .await
                .map_err(err("chord finished"))?;
        }
        tx.commit().await.map_err(err("chord finished"))?;
        Ok(())
    }

    async fn save_group(
        &self,
        group_id: &str,
        result: &serde_json::Value,
        expires: Option<Duration>,
    ) -> Result<(), BackendError> {
        sqlx::query("INSERT INTO celeriac_groups (group_id, result, expires_at) VALUES (?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET result = excluded.result, expires_at = excluded.expires_at")
            .bind(group_id)
            .bind(serde_json::to_vec(result).unwrap_or_default())
            .bind(expires.map(|e| now_millis() + e.as_millis() as i64))
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("save group"))?;
        Ok(())
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<serde_json::Value>, BackendError> {
        let row = sqlx::query(
            "SELECT result FROM celeriac_groups WHERE group_id = ? AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(group_id)
        .bind(now_millis())
        .fetch_optional(&self.db.read)
        .await
        .map_err(err("restore group"))?;
        Ok(row.and_then(|r| serde_json::from_slice(&r.get::<Vec<u8>, _>("result")).ok()))
    }

    async fn put_record(&self, key: &str, json: &[u8], expires: Option<Duration>) -> Result<(), BackendError> {
        sqlx::query("INSERT INTO celeriac_records (key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at")
            .bind(key)
            .bind(json)
            .bind(expires.map(|e| now_millis() + e.as_millis() as i64))
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("put record"))?;
        Ok(())
    }

    async fn get_record(&self, key: &str) -> Result<Option<serde_json::Value>, BackendError> {
        let row =
            sqlx::query("SELECT value FROM celeriac_records WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)")
                .bind(key)
                .bind(now_millis())
                .fetch_optional(&self.db.read)
                .await
                .map_err(err("get record"))?;
        Ok(row.and_then(|r| serde_json::from_slice(&r.get::<Vec<u8>, _>("value")).ok()))
    }

    async fn wait_ready(&self, task_id: &str, timeout: Duration) -> Result<Option<ResultMeta>, BackendError> {
        // Woken at once by writes from this process; other processes' writes are polled.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(5);
        loop {
            let notified = self.written.notified();
            let meta = self.get(task_id).await?;
            if meta.as_ref().is_some_and(|m| m.status.is_ready()) || tokio::time::Instant::now() >= deadline {
                return Ok(meta);
            }
            let step = deadline.min(tokio::time::Instant::now() + interval);
            let _ = tokio::time::timeout_at(step, notified).await;
            interval = (interval * 2).min(Duration::from_millis(100));
        }
    }
}
