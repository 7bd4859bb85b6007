//! SQLite broker (`sqlite://path.db`), the zero-server default.
//!
//! One table of messages. A message is *visible* when `visible_at <= now`: an ETA sets it in the
//! future, and a fetch leases the message by moving `visible_at` to the lease's end and giving
//! it a fresh `lease_token`. The worker renews the lease while it holds the message; ack
//! deletes it (only with the current token). A worker killed with `kill -9` stops renewing,
//! so its messages become visible to other workers within one lease (`visibility_timeout`,
//! default 10 s here). Dead letters live in a second table with the reason and the bytes.

use super::ops::{Attempt, Bucket, STALE_TURNS, attempt};
use super::{Broker, BrokerError, DeadLetter, DeadLetterInfo, Delivery, QueueStats, Revoked, peek_ids, visible_at};
use crate::config::Config;
use crate::protocol::Message;
use crate::sqlite_common::{millis, now_millis, open, path_of};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::{Row, SqlitePool};
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
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_messages_ready ON celeriac_messages (queue, priority, id);
CREATE INDEX IF NOT EXISTS celeriac_messages_visible ON celeriac_messages (visible_at);
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

/// Columns added to `celeriac_dead_letters` after its first release (added to older files
/// when they are opened).
const DEAD_LETTER_COLUMNS: &[&str] = &["error_type TEXT", "traceback TEXT", "retries INTEGER", "replayed_as TEXT"];

/// Creates the tables (a no-op when they are there) and adds the columns older files lack.
async fn create_schema(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(SCHEMA).execute(pool).await?;
    for column in DEAD_LETTER_COLUMNS {
        let name = column.split_whitespace().next().unwrap_or_default();
        let present = sqlx::query("SELECT 1 FROM pragma_table_info('celeriac_dead_letters') WHERE name = ?")
            .bind(name)
            .fetch_optional(pool)
            .await?
            .is_some();
        if present {
            continue;
        }
        let sql = format!("ALTER TABLE celeriac_dead_letters ADD COLUMN {column}");
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(pool).await
            && !e.to_string().contains("duplicate column")
        {
            return Err(e);
        }
    }
    Ok(())
}

/// Acks a batch with one statement per chunk (each statement is a round trip to sqlx's
/// connection thread): each message is deleted only while its lease is still the one delivered
/// (`true`); a lease lost to another delivery leaves it alone (`false`).
async fn ack_many(pool: &SqlitePool, tags: &[(i64, String)]) -> Result<Vec<bool>, sqlx::Error> {
    let mut deleted = std::collections::HashSet::new();
    for chunk in tags.chunks(400) {
        let pairs = vec!["(?, ?)"; chunk.len()].join(", ");
        // Only placeholders are interpolated; ids and tokens are bound.
        let sql = format!("DELETE FROM celeriac_messages WHERE (id, lease_token) IN (VALUES {pairs}) RETURNING id");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, token) in chunk {
            q = q.bind(id).bind(token);
        }
        for row in q.fetch_all(pool).await? {
            deleted.insert(row.get::<i64, _>("id"));
        }
    }
    Ok(tags.iter().map(|(id, _)| deleted.contains(id)).collect())
}

/// The SQLite broker.
#[derive(Debug)]
pub struct SqliteBroker {
    pool: SqlitePool,
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
        let pool = open(url).await.map_err(|e| BrokerError::storage("open", e))?;
        crate::sqlite_common::retry_locked(|| create_schema(&pool)).await.map_err(err("create schema"))?;
        let secs = |name: &str, default: f64| {
            Duration::from_secs_f64(config.transport_seconds(name).unwrap_or(default).max(0.001))
        };
        let acker = {
            let pool = pool.clone();
            crate::batch::Coalescer::new(512, move |tags: Vec<(i64, String)>| {
                let pool = pool.clone();
                Box::pin(async move { ack_many(&pool, &tags).await.map_err(|e| e.to_string()) })
            })
        };
        Ok(SqliteBroker {
            pool,
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
        let now = now_millis();
        let token = uuid::Uuid::new_v4().to_string();
        let placeholders = vec!["?"; queues.len()].join(", ");
        let sql = format!(
            "UPDATE celeriac_messages SET visible_at = ?, lease_token = ?, delivery_count = delivery_count + 1
             WHERE id IN (SELECT id FROM celeriac_messages WHERE queue IN ({placeholders}) AND visible_at <= ?
                          ORDER BY priority, id LIMIT ?)
             RETURNING id, queue, payload, delivery_count"
        );
        // Only "?" placeholders are interpolated; queue names are bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now + self.lease.as_millis() as i64).bind(&token);
        for queue in queues {
            q = q.bind(queue);
        }
        let rows = q.bind(now).bind(max as i64).fetch_all(&self.pool).await.map_err(err("fetch"))?;
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
        sqlx::query(
            "INSERT INTO celeriac_messages (queue, priority, payload, visible_at, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(queue)
        .bind(i64::from(priority))
        .bind(payload)
        .bind(millis(visible_at))
        .bind(now_millis())
        .execute(&self.pool)
        .await
        .map_err(err("publish"))?;
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
        sqlx::query("UPDATE celeriac_messages SET visible_at = ?, lease_token = NULL WHERE id = ? AND lease_token = ?")
            .bind(millis(at.unwrap_or_else(Utc::now)))
            .bind(id)
            .bind(token)
            .execute(&self.pool)
            .await
            .map_err(err("requeue"))?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let until = now_millis() + self.lease.as_millis() as i64;
        let mut tx = self.pool.begin().await.map_err(err("renew"))?;
        for d in deliveries {
            let (id, token) = split_tag(&d.tag);
            sqlx::query("UPDATE celeriac_messages SET visible_at = ? WHERE id = ? AND lease_token = ?")
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
        let mut tx = self.pool.begin().await.map_err(err("republish"))?;
        sqlx::query(
            "INSERT INTO celeriac_messages (queue, priority, payload, visible_at, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(queue)
        .bind(i64::from(message.properties.priority))
        .bind(message.to_wire())
        .bind(millis(visible_at(message)))
        .bind(now_millis())
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
        let mut tx = self.pool.begin().await.map_err(err("dead-letter"))?;
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
            .execute(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(err("revoke"))?;
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
            .fetch_one(&self.pool)
            .await
            .map_err(err("read revoked"))?;
        Ok(max.unwrap_or(0) as u64)
    }

    async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        let now = now_millis();
        sqlx::query("DELETE FROM celeriac_revoked WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(err("prune revoked"))?;
        let rows = sqlx::query("SELECT task_id, terminate, expires_at FROM celeriac_revoked ORDER BY seq")
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(err("rate limit"))?;
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
            .fetch_all(&self.pool)
            .await
            .map_err(err("list dead letters"))?;
        Ok(rows.iter().map(Self::dead_letter_from_row).collect())
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BrokerError> {
        let Ok(id) = id.parse::<i64>() else { return Ok(None) };
        let row = sqlx::query("SELECT * FROM celeriac_dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(err("read dead letter"))?;
        Ok(row.as_ref().map(Self::dead_letter_from_row))
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let Ok(id) = id.parse::<i64>() else { return Ok(false) };
        let done = sqlx::query("DELETE FROM celeriac_dead_letters WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(err("remove dead letter"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn purge_dead_letters(&self) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM celeriac_dead_letters")
            .execute(&self.pool)
            .await
            .map_err(err("purge dead letters"))?;
        Ok(done.rows_affected())
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let done = sqlx::query("DELETE FROM celeriac_messages WHERE queue = ? AND lease_token IS NULL")
            .bind(queue)
            .execute(&self.pool)
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
        .fetch_all(&self.pool)
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
