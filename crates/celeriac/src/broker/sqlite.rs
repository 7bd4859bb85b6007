//! SQLite broker (`sqlite://path.db`), the zero-server default.
//!
//! One table of messages. A message is *visible* when `visible_at <= now`: an ETA sets it in the
//! future, and a fetch leases the message by moving `visible_at` to the lease's end and giving
//! it a fresh `lease_token`. The worker renews the lease while it holds the message; ack
//! deletes it (only with the current token). A worker killed with `kill -9` stops renewing,
//! so its messages become visible to other workers within one lease (`visibility_timeout`,
//! default 10 s here). Dead letters live in a second table with the reason and the bytes.
//!
//! The `ready` flag keeps the claim's index small: only rows with `ready = 1` are in the
//! `(queue, priority, id)` index a claim walks, so leased messages and messages with a future
//! ETA (`ready = 0`, indexed by `visible_at`) are never scanned. Every claim first promotes
//! the rows whose `visible_at` has passed (ETAs come due, leases of dead workers run out) to
//! `ready = 1`: one seek in the `visible_at` index when nothing is due.

use super::ops::{Attempt, Bucket, STALE_TURNS, attempt};
use super::{Broker, BrokerError, DeadLetter, DeadLetterInfo, Delivery, QueueStats, Revoked, peek_ids, visible_at};
use crate::config::Config;
use crate::protocol::Message;
use crate::sqlite_common::{add_column, millis, now_millis, open_shared, path_of, shaped_chunks};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Row};
use std::time::Duration;
use tokio::sync::Notify;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS celeriac_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    visible_at INTEGER NOT NULL,
    lease_token TEXT,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    ready INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS celeriac_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    task_id TEXT,
    task_name TEXT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    error_type TEXT,
    traceback TEXT,
    retries INTEGER,
    replayed_as TEXT
);
CREATE TABLE IF NOT EXISTS celeriac_revoked (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL UNIQUE,
    terminate INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_rate_limits (
    key TEXT PRIMARY KEY,
    tat REAL NOT NULL,
    ticket REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_rate_waiters (
    key TEXT NOT NULL,
    waiter TEXT NOT NULL,
    turn REAL NOT NULL,
    PRIMARY KEY (key, waiter)
);
";

/// The claim's indexes, made once the `ready` column exists. The indexes of files made before
/// `ready` (every row in both) go: the claim no longer reads them, and each costs writes.
const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS celeriac_messages_take ON celeriac_messages (queue, priority, id) WHERE ready = 1;
CREATE INDEX IF NOT EXISTS celeriac_messages_due ON celeriac_messages (visible_at) WHERE ready = 0;
DROP INDEX IF EXISTS celeriac_messages_ready;
DROP INDEX IF EXISTS celeriac_messages_visible;
";

/// Columns added to `celeriac_dead_letters` after its first release (added to older files
/// when they are opened).
const DEAD_LETTER_COLUMNS: &[&str] = &["error_type TEXT", "traceback TEXT", "retries INTEGER", "replayed_as TEXT"];

/// Creates the tables (a no-op when they are there) and adds the columns older files lack.
async fn create_schema(pool: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(&mut *pool).await?;
    for column in DEAD_LETTER_COLUMNS {
        add_column(pool, "celeriac_dead_letters", column).await?;
    }
    add_ready_column(pool).await?;
    sqlx::raw_sql(INDEXES).execute(&mut *pool).await?;
    Ok(())
}

/// Files made before the `ready` flag get it: the column (1 for every row), then 0 for the
/// rows not visible yet (leased, or an ETA ahead). Another process opening the same old file
/// may add the column first; a row left at 1 with `visible_at` ahead is still only claimed
/// once due (the claim checks `visible_at` too), it is merely in the claim's index early.
async fn add_ready_column(pool: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    if !add_column(pool, "celeriac_messages", "ready INTEGER NOT NULL DEFAULT 1").await? {
        return Ok(());
    }
    sqlx::query("UPDATE celeriac_messages SET ready = 0 WHERE visible_at > ?")
        .bind(now_millis())
        .execute(&mut *pool)
        .await?;
    Ok(())
}

/// Acks a batch with one statement per chunk (each statement is a round trip to sqlx's
/// connection thread): each message is deleted only while its lease is still the one delivered
/// (`true`); a lease lost to another delivery leaves it alone (`false`).
async fn ack_many(pool: &mut SqliteConnection, tags: &[(i64, String)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut deleted = std::collections::HashSet::new();
    for (start, len, shape) in shaped_chunks(tags.len()) {
        let pairs = vec!["(?, ?)"; shape].join(", ");
        // Only placeholders are interpolated; ids and tokens are bound (the padding as NULL,
        // which matches nothing). Each pair is looked up by id (a row-value IN over the
        // VALUES list would scan the table).
        let sql = format!(
            "DELETE FROM celeriac_messages WHERE id IN (
                 SELECT m.id FROM (VALUES {pairs}) AS v JOIN celeriac_messages AS m
                 ON m.id = v.column1 AND m.lease_token = v.column2)
             RETURNING id"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, token) in &tags[start..start + len] {
            q = q.bind(id).bind(token);
        }
        for _ in len..shape {
            q = q.bind(None::<i64>).bind(None::<&str>);
        }
        for row in q.fetch_all(&mut *pool).await? {
            deleted.insert(row.get::<i64, _>(0));
        }
    }
    Ok(tags.iter().map(|(id, _)| deleted.contains(id)).collect())
}

/// The SQLite broker.
#[derive(Debug)]
pub struct SqliteBroker {
    /// The file's connections (shared with a backend on the same file): writes go through
    /// its one write connection.
    db: std::sync::Arc<crate::sqlite_common::Db>,
    url: String,
    lease: Duration,
    polling_interval: Duration,
    published: Notify,
    /// Acks go out in batches: one transaction (one commit) for all those waiting.
    acker: crate::batch::Coalescer<(i64, String), bool>,
}

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> BrokerError {
    move |e| BrokerError::storage(operation, e)
}

fn split_tag(tag: &str) -> (i64, &str) {
    let (id, token) = tag.split_once(':').unwrap_or((tag, ""));
    (id.parse().unwrap_or(-1), token)
}

impl SqliteBroker {
    /// Opens (creating if needed) the database in `url`. Transport options:
    /// `visibility_timeout` (lease seconds, default 10), `polling_interval` (seconds, 0.1).
    pub async fn connect(url: &str, config: &Config) -> Result<Self, BrokerError> {
        let db = open_shared(url).await.map_err(|e| BrokerError::storage("open", e))?;
        crate::sqlite_common::retry_locked(|| async { create_schema(&mut *db.writer().await).await })
            .await
            .map_err(err("create schema"))?;
        let secs = |name: &str, default: f64| {
            Duration::from_secs_f64(config.transport_seconds(name).unwrap_or(default).max(0.001))
        };
        let acker = {
            let db = db.clone();
            crate::batch::Coalescer::new(512, move |tags: Vec<(i64, String)>| {
                let db = db.clone();
                Box::pin(async move { ack_many(&mut *db.writer().await, &tags).await.map_err(|e| e.to_string()) })
            })
        };
        Ok(SqliteBroker {
            db,
            url: format!("sqlite://{}", path_of(url)),
            lease: secs("visibility_timeout", 10.0),
            polling_interval: secs("polling_interval", 0.1),
            published: Notify::new(),
            acker,
        })
    }

    async fn take(&self, queues: &[String], max: usize) -> Result<Vec<Delivery>, BrokerError> {
        if queues.is_empty() || max == 0 {
            return Ok(Vec::new());
        }
        let token = uuid::Uuid::new_v4().to_string();
        let placeholders = vec!["?"; queues.len()].join(", ");
        // First the promotion of what came due (ETAs reached, leases run out; with nothing
        // due it is one seek in the `visible_at` index), then the claim, which walks only rows
        // with `ready = 1`. Two statements, each its own transaction, on the write connection
        // held for both.
        let mut w = self.db.writer().await;
        // The clock is read once the writer is ours: a wait for it (every write of the process
        // takes turns on it) must not shorten the lease this claim writes.
        let now = now_millis();
        sqlx::query("UPDATE celeriac_messages SET ready = 1 WHERE ready = 0 AND visible_at <= ?")
            .bind(now)
            .execute(&mut *w)
            .await
            .map_err(err("fetch"))?;
        let sql = format!(
            "UPDATE celeriac_messages SET visible_at = ?, lease_token = ?, delivery_count = delivery_count + 1, ready = 0
             WHERE id IN (SELECT id FROM celeriac_messages WHERE ready = 1 AND queue IN ({placeholders}) AND visible_at <= ?
                          ORDER BY priority, id LIMIT ?)
             RETURNING id, queue, payload, delivery_count"
        );
        // Only "?" placeholders are interpolated; queue names are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now + self.lease.as_millis() as i64).bind(&token);
        for queue in queues {
            q = q.bind(queue);
        }
        let rows = q.bind(now).bind(max as i64).fetch_all(&mut *w).await.map_err(err("fetch"))?;
        drop(w);
        let mut out: Vec<(i64, Delivery)> = rows
            .into_iter()
            .map(|r| {
                let id: i64 = r.get("id");
                (
                    id,
                    Delivery {
                        tag: format!("{id}:{token}"),
                        queue: r.get("queue"),
                        payload: r.get("payload"),
                        delivery_count: r.get::<i64, _>("delivery_count") as u32,
                    },
                )
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        Ok(out.into_iter().map(|(_, d)| d).collect())
    }

    fn dead_letter_from_row(r: &sqlx::sqlite::SqliteRow) -> DeadLetter {
        DeadLetter {
            id: r.get::<i64, _>("id").to_string(),
            queue: r.get("queue"),
            task_id: r.get("task_id"),
            task_name: r.get("task_name"),
            reason: r.get("reason"),
            error_type: r.get("error_type"),
            traceback: r.get("traceback"),
            retries: r.get::<Option<i64>, _>("retries").map(|n| n.max(0) as u32),
            replayed_as: r.get("replayed_as"),
            payload: r.get("payload"),
            created_at: Utc.timestamp_millis_opt(r.get("created_at")).single().unwrap_or_default(),
        }
    }
}

#[async_trait]
impl Broker for SqliteBroker {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn lease(&self) -> Duration {
        self.lease
    }

    async fn publish_raw(
        &self,
        queue: &str,
        payload: &[u8],
        priority: u8,
        visible_at: DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        let (visible_at, now) = (millis(visible_at), now_millis());
        sqlx::query(
            "INSERT INTO celeriac_messages (queue, priority, payload, visible_at, created_at, ready) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(queue)
        .bind(i64::from(priority))
        .bind(payload)
        .bind(visible_at)
        .bind(now)
        .bind(visible_at <= now)
        .execute(&mut *self.db.writer().await)
        .await
        .map_err(err("publish"))?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn publish_many(&self, messages: &[(&str, &Message)]) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let now = now_millis();
        let rows: Vec<(&str, i64, Vec<u8>, i64)> = messages
            .iter()
            .map(|(queue, m)| (*queue, i64::from(m.properties.priority), m.to_wire(), millis(visible_at(m))))
            .collect();
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("publish batch"))?;
        for (start, len, shape) in shaped_chunks(rows.len()) {
            let values = vec!["(?, ?, ?, ?, ?, ?)"; shape].join(", ");
            // Only placeholders are interpolated; the padding rows are NULL and dropped by the
            // WHERE. Rows go in in the order given (ids follow it).
            let sql = format!(
                "INSERT INTO celeriac_messages (queue, priority, payload, visible_at, created_at, ready)
                 SELECT column1, column2, column3, column4, column5, column6 FROM (VALUES {values})
                 WHERE column1 IS NOT NULL"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (queue, priority, payload, at) in &rows[start..start + len] {
                q = q.bind(*queue).bind(*priority).bind(payload.as_slice()).bind(*at).bind(now).bind(*at <= now);
            }
            for _ in len..shape {
                q = q
                    .bind(None::<&str>)
                    .bind(None::<i64>)
                    .bind(None::<&[u8]>)
                    .bind(None::<i64>)
                    .bind(None::<i64>)
                    .bind(None::<bool>);
            }
            q.execute(&mut *tx).await.map_err(err("publish batch"))?;
        }
        tx.commit().await.map_err(err("publish batch"))?;
        drop(w);
        self.published.notify_waiters();
        Ok(())
    }

    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.published.notified();
            let got = self.take(queues, max).await?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            let step = deadline.min(tokio::time::Instant::now() + self.polling_interval);
            let _ = tokio::time::timeout_at(step, notified).await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<bool, BrokerError> {
        let (id, token) = split_tag(&delivery.tag);
        self.acker.call((id, token.to_owned())).await.map_err(|e| BrokerError::Storage {
            operation: "ack",
            source: Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()),
        })
    }

    async fn requeue(&self, delivery: &Delivery, at: Option<DateTime<Utc>>) -> Result<(), BrokerError> {
        let (id, token) = split_tag(&delivery.tag);
        let (at, now) = (at.map(millis), now_millis());
        let at = at.unwrap_or(now);
        sqlx::query(
            "UPDATE celeriac_messages SET visible_at = ?, lease_token = NULL, ready = ? WHERE id = ? AND lease_token = ?",
        )
        .bind(at)
        .bind(at <= now)
        .bind(id)
        .bind(token)
        .execute(&mut *self.db.writer().await)
        .await
        .map_err(err("requeue"))?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let mut w = self.db.writer().await;
        let until = now_millis() + self.lease.as_millis() as i64;
        let mut tx = w.begin().await.map_err(err("renew"))?;
        for d in deliveries {
            let (id, token) = split_tag(&d.tag);
            sqlx::query("UPDATE celeriac_messages SET visible_at = ?, ready = 0 WHERE id = ? AND lease_token = ?")
                .bind(until)
                .bind(id)
                .bind(token)
                .execute(&mut *tx)
                .await
                .map_err(err("renew"))?;
        }
        tx.commit().await.map_err(err("renew"))
    }

    async fn republish(&self, delivery: &Delivery, queue: &str, message: &Message) -> Result<(), BrokerError> {
        let (id, token) = split_tag(&delivery.tag);
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("republish"))?;
        let (at, now) = (millis(visible_at(message)), now_millis());
        sqlx::query(
            "INSERT INTO celeriac_messages (queue, priority, payload, visible_at, created_at, ready) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(queue)
        .bind(i64::from(message.properties.priority))
        .bind(message.to_wire())
        .bind(at)
        .bind(now)
        .bind(at <= now)
        .execute(&mut *tx)
        .await
        .map_err(err("republish"))?;
        sqlx::query("DELETE FROM celeriac_messages WHERE id = ? AND lease_token = ?")
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await
            .map_err(err("republish"))?;
        tx.commit().await.map_err(err("republish"))?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.dead_letter_with(delivery, &DeadLetterInfo { reason: reason.to_owned(), ..Default::default() }).await
    }

    async fn dead_letter_with(&self, delivery: &Delivery, info: &DeadLetterInfo) -> Result<(), BrokerError> {
        let (id, token) = split_tag(&delivery.tag);
        let (task_id, task_name) = peek_ids(&delivery.payload);
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("dead-letter"))?;
        sqlx::query(
            "INSERT INTO celeriac_dead_letters (queue, task_id, task_name, reason, error_type, traceback, retries, payload, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&delivery.queue)
        .bind(task_id)
        .bind(task_name)
        .bind(&info.reason)
        .bind(&info.error_type)
        .bind(&info.traceback)
        .bind(info.retries.map(i64::from))
        .bind(&delivery.payload)
        .bind(now_millis())
        .execute(&mut *tx)
        .await
        .map_err(err("dead-letter"))?;
        sqlx::query("DELETE FROM celeriac_messages WHERE id = ? AND lease_token = ?")
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await
            .map_err(err("dead-letter"))?;
        tx.commit().await.map_err(err("dead-letter"))
    }

    async fn mark_dead_letter_replayed(&self, id: &str, task_id: &str) -> Result<bool, BrokerError> {
        let Ok(id) = id.parse::<i64>() else { return Ok(false) };
        let done = sqlx::query("UPDATE celeriac_dead_letters SET replayed_as = ? WHERE id = ?")
            .bind(task_id)
            .bind(id)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("mark dead letter replayed"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn persist_revoked(
        &self,
        ids: &[String],
        terminate: bool,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("revoke"))?;
        for id in ids {
            // REPLACE gives the row a new `seq`, so `revoked_version` moves.
            sqlx::query("INSERT OR REPLACE INTO celeriac_revoked (task_id, terminate, expires_at) VALUES (?, ?, ?)")
                .bind(id)
                .bind(terminate)
                .bind(millis(expires_at))
                .execute(&mut *tx)
                .await
                .map_err(err("revoke"))?;
        }
        tx.commit().await.map_err(err("revoke"))?;
        Ok(true)
    }

    async fn revoked_version(&self) -> Result<u64, BrokerError> {
        // Every revoke writes a row with a new `seq` (AUTOINCREMENT never hands one out twice);
        // pruning can lower the maximum, which reads as a change too.
        let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM celeriac_revoked")
            .fetch_one(&self.db.read)
            .await
            .map_err(err("read revoked"))?;
        Ok(max.unwrap_or(0) as u64)
    }

    async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        let now = now_millis();
        sqlx::query("DELETE FROM celeriac_revoked WHERE expires_at <= ?")
            .bind(now)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("prune revoked"))?;
        let rows = sqlx::query("SELECT task_id, terminate, expires_at FROM celeriac_revoked ORDER BY seq")
            .fetch_all(&self.db.read)
            .await
            .map_err(err("read revoked"))?;
        Ok(rows
            .iter()
            .map(|r| Revoked {
                id: r.get("task_id"),
                terminate: r.get::<i64, _>("terminate") != 0,
                expires_at: Utc.timestamp_millis_opt(r.get("expires_at")).single().unwrap_or_default(),
            })
            .collect())
    }

    async fn rate_limit_acquire(
        &self,
        key: &str,
        waiter: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Duration, BrokerError> {
        let interval = interval.as_secs_f64() * 1000.0;
        let mut w = self.db.writer().await;
        let mut tx = w.begin().await.map_err(err("rate limit"))?;
        // A write first, so the transaction holds the write lock before it reads; the clock is
        // read only then (a `now` from before a wait for the lock would let starts bunch).
        sqlx::query(
            "INSERT INTO celeriac_rate_limits (key, tat, ticket) VALUES (?, 0, 0) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .execute(&mut *tx)
        .await
        .map_err(err("rate limit"))?;
        let now = now_millis() as f64;
        sqlx::query("DELETE FROM celeriac_rate_waiters WHERE key = ? AND turn < ?")
            .bind(key)
            .bind(now - STALE_TURNS * interval)
            .execute(&mut *tx)
            .await
            .map_err(err("rate limit"))?;
        let (tat, ticket): (f64, f64) = sqlx::query_as("SELECT tat, ticket FROM celeriac_rate_limits WHERE key = ?")
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(err("rate limit"))?;
        let holder: Option<(f64,)> =
            sqlx::query_as("SELECT turn FROM celeriac_rate_waiters WHERE key = ? AND waiter = ?")
                .bind(key)
                .bind(waiter)
                .fetch_optional(&mut *tx)
                .await
                .map_err(err("rate limit"))?;
        let (others_due,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM celeriac_rate_waiters WHERE key = ? AND waiter != ? AND turn <= ?)",
        )
        .bind(key)
        .bind(waiter)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(err("rate limit"))?;
        let mut bucket = Bucket { tat, ticket };
        let outcome = attempt(&mut bucket, now, interval, burst, holder.map(|h| h.0), others_due);
        sqlx::query("UPDATE celeriac_rate_limits SET tat = ?, ticket = ? WHERE key = ?")
            .bind(bucket.tat)
            .bind(bucket.ticket)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(err("rate limit"))?;
        let wait = match outcome {
            Attempt::Granted => {
                sqlx::query("DELETE FROM celeriac_rate_waiters WHERE key = ? AND waiter = ?")
                    .bind(key)
                    .bind(waiter)
                    .execute(&mut *tx)
                    .await
                    .map_err(err("rate limit"))?;
                Duration::ZERO
            }
            Attempt::Wait { wait, joined } => {
                if let Some(turn) = joined {
                    sqlx::query("INSERT OR REPLACE INTO celeriac_rate_waiters (key, waiter, turn) VALUES (?, ?, ?)")
                        .bind(key)
                        .bind(waiter)
                        .bind(turn)
                        .execute(&mut *tx)
                        .await
                        .map_err(err("rate limit"))?;
                }
                wait
            }
        };
        tx.commit().await.map_err(err("rate limit"))?;
        Ok(wait)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let rows = sqlx::query("SELECT * FROM celeriac_dead_letters ORDER BY id DESC LIMIT ?")
            .bind(limit as i64)
            .fetch_all(&self.db.read)
            .await
            .map_err(err("list dead letters"))?;
        Ok(rows.iter().map(Self::dead_letter_from_row).collect())
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BrokerError> {
        let Ok(id) = id.parse::<i64>() else { return Ok(None) };
        let row = sqlx::query("SELECT * FROM celeriac_dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.db.read)
            .await
            .map_err(err("read dead letter"))?;
        Ok(row.as_ref().map(Self::dead_letter_from_row))
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let Ok(id) = id.parse::<i64>() else { return Ok(false) };
        let done = sqlx::query("DELETE FROM celeriac_dead_letters WHERE id = ?")
            .bind(id)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("remove dead letter"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn purge_dead_letters(&self) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM celeriac_dead_letters")
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("purge dead letters"))?;
        Ok(done.rows_affected())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM celeriac_messages WHERE queue = ? AND lease_token IS NULL")
            .bind(queue)
            .execute(&mut *self.db.writer().await)
            .await
            .map_err(err("purge"))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        let rows = sqlx::query(
            "SELECT queue,
                    SUM(CASE WHEN visible_at <= ?1 THEN 1 ELSE 0 END) AS ready,
                    SUM(CASE WHEN visible_at > ?1 AND lease_token IS NULL THEN 1 ELSE 0 END) AS scheduled,
                    SUM(CASE WHEN visible_at > ?1 AND lease_token IS NOT NULL THEN 1 ELSE 0 END) AS leased
             FROM celeriac_messages GROUP BY queue ORDER BY queue",
        )
        .bind(now_millis())
        .fetch_all(&self.db.read)
        .await
        .map_err(err("stats"))?;
        Ok(rows
            .iter()
            .map(|r| QueueStats {
                queue: r.get("queue"),
                ready: r.get::<i64, _>("ready") as u64,
                scheduled: r.get::<i64, _>("scheduled") as u64,
                leased: r.get::<i64, _>("leased") as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const Q: &str = "celery";

    async fn broker(dir: &tempfile::TempDir, lease_secs: f64) -> SqliteBroker {
        let mut config = Config::default();
        config.broker_transport_options.insert("visibility_timeout".into(), toml::Value::Float(lease_secs));
        let url = format!("sqlite://{}", dir.path().join("broker.db").display());
        SqliteBroker::connect(&url, &config).await.unwrap()
    }

    fn in_ms(ms: i64) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(ms)
    }

    async fn take(b: &SqliteBroker, max: usize) -> Vec<Delivery> {
        b.fetch(&[Q.to_owned()], max, Duration::ZERO).await.unwrap()
    }

    /// Polls until a claim returns something (or 5 s pass).
    async fn take_when_due(b: &SqliteBroker, max: usize) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = take(b, max).await;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ready_flags(b: &SqliteBroker) -> Vec<(Vec<u8>, bool)> {
        sqlx::query_as("SELECT payload, ready FROM celeriac_messages ORDER BY id").fetch_all(&b.db.read).await.unwrap()
    }

    #[tokio::test]
    async fn a_claim_behind_many_scheduled_and_leased_rows_returns_the_ready_ones() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(&dir, 60.0).await;
        // Far-future ETAs, then leased rows, all with lower ids (and a better priority) than
        // the ready ones.
        let later = in_ms(3_600_000);
        let scheduled: Vec<Vec<u8>> = (0..3000).map(|i| format!("later-{i}").into_bytes()).collect();
        let batch: Vec<(&str, &[u8], u8, DateTime<Utc>)> =
            scheduled.iter().map(|p| (Q, p.as_slice(), 0, later)).collect();
        for (queue, payload, priority, at) in batch {
            b.publish_raw(queue, payload, priority, at).await.unwrap();
        }
        for i in 0..100 {
            b.publish_raw(Q, format!("held-{i}").as_bytes(), 0, Utc::now()).await.unwrap();
        }
        let held = take(&b, 100).await;
        assert_eq!(held.len(), 100);
        for i in 0..10 {
            b.publish_raw(Q, format!("now-{i}").as_bytes(), 5, Utc::now()).await.unwrap();
        }
        let got = take(&b, 64).await;
        let payloads: Vec<String> = got.iter().map(|d| String::from_utf8(d.payload.clone()).unwrap()).collect();
        assert_eq!(payloads, (0..10).map(|i| format!("now-{i}")).collect::<Vec<_>>());
        assert!(take(&b, 64).await.is_empty(), "nothing else is due");
        let stats = b.stats().await.unwrap();
        assert_eq!((stats[0].ready, stats[0].scheduled, stats[0].leased), (0, 3000, 110));
        // Only the rows a claim may take are flagged ready.
        assert!(ready_flags(&b).await.iter().all(|(_, ready)| !ready));
    }

    #[tokio::test]
    async fn an_eta_row_is_claimed_once_due_in_priority_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(&dir, 60.0).await;
        b.publish_raw(Q, b"soon-low", 9, in_ms(300)).await.unwrap();
        b.publish_raw(Q, b"soon-high", 1, in_ms(300)).await.unwrap();
        b.publish_raw(Q, b"later", 0, in_ms(3_600_000)).await.unwrap();
        assert!(take(&b, 10).await.is_empty(), "not due yet");
        assert_eq!(b.stats().await.unwrap()[0].scheduled, 3);
        // One at a time: the better priority first.
        let got = take_when_due(&b, 1).await;
        assert_eq!(got.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>(), [b"soon-high".as_slice()]);
        let got = take(&b, 10).await;
        assert_eq!(got.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>(), [b"soon-low".as_slice()]);
        assert!(take(&b, 10).await.is_empty());
    }

    #[tokio::test]
    async fn an_expired_lease_comes_back_and_the_old_token_no_longer_acks() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(&dir, 0.3).await;
        b.publish_raw(Q, b"job", 0, Utc::now()).await.unwrap();
        let first = take(&b, 10).await;
        assert_eq!(first.len(), 1);
        assert!(take(&b, 10).await.is_empty(), "leased");
        assert_eq!(b.stats().await.unwrap()[0].leased, 1);
        // The holder stops renewing (killed): the message is claimed again once the lease ends.
        let second = take_when_due(&b, 10).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].delivery_count, 2);
        assert!(!b.ack(&first[0]).await.unwrap(), "a stale token does not ack");
        assert!(b.ack(&second[0]).await.unwrap());
        assert!(b.stats().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn renew_keeps_a_lease_and_requeue_follows_its_due_time() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(&dir, 0.4).await;
        b.publish_raw(Q, b"a", 0, Utc::now()).await.unwrap();
        b.publish_raw(Q, b"b", 0, Utc::now()).await.unwrap();
        let got = take(&b, 10).await;
        assert_eq!(got.len(), 2);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            b.renew(&got).await.unwrap();
            assert!(take(&b, 10).await.is_empty(), "renewed leases stay held");
        }
        b.requeue(&got[0], None).await.unwrap();
        b.requeue(&got[1], Some(in_ms(300))).await.unwrap();
        let again = take(&b, 10).await;
        assert_eq!(again.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>(), [b"a".as_slice()]);
        let later = take_when_due(&b, 10).await;
        assert_eq!(later.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>(), [b"b".as_slice()]);
        assert_eq!(b.purge(Q).await.unwrap(), 0, "purge leaves leased messages");
    }

    /// The schema before the `ready` flag, as older versions made it.
    const OLD_SCHEMA: &str = "
        CREATE TABLE celeriac_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
            payload BLOB NOT NULL, visible_at INTEGER NOT NULL, lease_token TEXT,
            delivery_count INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
        CREATE INDEX celeriac_messages_ready ON celeriac_messages (queue, priority, id);
        CREATE INDEX celeriac_messages_visible ON celeriac_messages (visible_at);";

    #[tokio::test]
    async fn a_file_from_before_the_ready_flag_keeps_working_when_opened_twice_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let old = crate::sqlite_common::open(&format!("sqlite://{}", path.display())).await.unwrap();
            sqlx::raw_sql(OLD_SCHEMA).execute(&old).await.unwrap();
            let now = now_millis();
            for (payload, visible_at, token) in [
                ("ready", now - 1000, None),
                ("scheduled", now + 3_600_000, None),
                ("leased", now + 3_600_000, Some("t")),
                ("lease-expired", now - 500, Some("t")),
            ] {
                sqlx::query(
                    "INSERT INTO celeriac_messages (queue, payload, visible_at, lease_token, created_at) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(Q)
                .bind(payload.as_bytes())
                .bind(visible_at)
                .bind(token)
                .bind(now)
                .execute(&old)
                .await
                .unwrap();
            }
            old.close().await;
        }
        // Two processes' brokers opening the old file together (separate connections: not the
        // ones shared within a process).
        let url = format!("sqlite://{}", path.display());
        let config = Config::default();
        let other = tokio::spawn({
            let url = url.clone();
            async move {
                let pool = crate::sqlite_common::open(&url).await.unwrap();
                crate::sqlite_common::retry_locked(|| async { create_schema(&mut *pool.acquire().await?).await })
                    .await
                    .unwrap();
            }
        });
        let b = SqliteBroker::connect(&url, &config).await.unwrap();
        other.await.unwrap();
        let flags = ready_flags(&b).await;
        let flags: Vec<(&[u8], bool)> = flags.iter().map(|(p, r)| (p.as_slice(), *r)).collect();
        assert_eq!(
            flags,
            [(b"ready".as_slice(), true), (b"scheduled", false), (b"leased", false), (b"lease-expired", true)]
        );
        let stats = b.stats().await.unwrap();
        assert_eq!((stats[0].ready, stats[0].scheduled, stats[0].leased), (2, 1, 1));
        let got = take(&b, 10).await;
        assert_eq!(
            got.iter().map(|d| d.payload.as_slice()).collect::<Vec<_>>(),
            [b"ready".as_slice(), b"lease-expired"]
        );
        let indexes: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'celeriac_messages' ORDER BY name",
        )
        .fetch_all(&b.db.read)
        .await
        .unwrap();
        let names: Vec<&str> = indexes.iter().map(|(n,)| n.as_str()).collect();
        assert_eq!(names, ["celeriac_messages_due", "celeriac_messages_take"]);
    }

    #[tokio::test]
    async fn acks_and_batches_of_every_size_use_the_few_statement_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(&dir, 60.0).await;
        for n in [1usize, 2, 9, 64, 65, 300] {
            for i in 0..n {
                b.publish_raw(Q, format!("{i}").as_bytes(), 0, Utc::now()).await.unwrap();
            }
            let got = take(&b, n).await;
            assert_eq!(got.len(), n);
            let tags: Vec<(i64, String)> = got
                .iter()
                .map(|d| {
                    let (id, token) = split_tag(&d.tag);
                    (id, token.to_owned())
                })
                .chain([(-1, "missing".to_owned())])
                .collect();
            let acked = ack_many(&mut *b.db.writer().await, &tags).await.unwrap();
            assert_eq!(acked.iter().filter(|a| **a).count(), n, "batch of {n}");
            assert!(!acked[n], "an unknown tag acks nothing");
            assert!(b.stats().await.unwrap().is_empty());
        }
        assert_eq!(shaped_chunks(300).collect::<Vec<_>>(), [(0, 256, 256), (256, 44, 64)]);
        assert_eq!(shaped_chunks(1).collect::<Vec<_>>(), [(0, 1, 1)]);
    }
}
