//! The beat lease as a row in the broker's SQLite file (no separate lock file: every beat
//! instance that can open the broker's database can take part, and the lease outlives a
//! crashed process only until it expires).
//!
//! - `celeriac_beat_lease(name, holder, token, expires_ms)`: one row per beat group. Taking
//!   the lease is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE` (free, expired, or ours);
//!   a new holder gets `token + 1`.
//! - `celeriac_beat_sent(name, entry, tick_ms, token)`: the last tick sent per entry. A claim
//!   is one `INSERT ... SELECT ... WHERE EXISTS (the caller's live lease) ON CONFLICT DO UPDATE
//!   ... WHERE tick_ms < new`, so the fencing check and the write are one statement.
//!
//! Expiry compares the beat hosts' clocks (the file is local, so it is one host's clock).

use super::{BeatStore, Claim, LastSent, Leader, StoreError};
use crate::sqlite_common::{self, now_millis};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use std::collections::HashMap;
use std::time::Duration;

/// The beat group's name (one lease per database).
const GROUP: &str = "default";

/// Lease and last-sent ticks in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    url: String,
}

fn err(operation: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::storage(operation, e)
}

impl SqliteStore {
    /// Opens (creating if missing) the file of `url` and the beat tables.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = sqlite_common::open(url).await.map_err(err("open"))?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS celeriac_beat_lease (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires_ms INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS celeriac_beat_sent (
                name TEXT NOT NULL, entry TEXT NOT NULL, tick_ms INTEGER NOT NULL, token INTEGER NOT NULL,
                PRIMARY KEY (name, entry))",
        ] {
            sqlite_common::retry_locked(|| sqlx::query(ddl).execute(&pool)).await.map_err(err("create tables"))?;
        }
        Ok(SqliteStore { pool, url: url.to_owned() })
    }
}

#[async_trait]
impl BeatStore for SqliteStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn acquire(&self, holder: &str, lease: Duration) -> Result<Option<u64>, StoreError> {
        let now = now_millis();
        let until = now.saturating_add(lease.as_millis().min(i64::MAX as u128) as i64);
        let row = sqlx::query(
            "INSERT INTO celeriac_beat_lease (name, holder, token, expires_ms) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (name) DO UPDATE SET
                 token = CASE WHEN holder = ?2 AND expires_ms > ?4 THEN token ELSE token + 1 END,
                 holder = ?2, expires_ms = ?3
             WHERE holder = ?2 OR expires_ms <= ?4
             RETURNING token",
        )
        .bind(GROUP)
        .bind(holder)
        .bind(until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(err("acquire"))?;
        Ok(row.map(|r| r.get::<i64, _>(0) as u64))
    }

    async fn release(&self, holder: &str, token: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE celeriac_beat_lease SET expires_ms = 0 WHERE name = ?1 AND holder = ?2 AND token = ?3")
            .bind(GROUP)
            .bind(holder)
            .bind(token as i64)
            .execute(&self.pool)
            .await
            .map_err(err("release"))?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let row = sqlx::query("SELECT holder, token FROM celeriac_beat_lease WHERE name = ?1 AND expires_ms > ?2")
            .bind(GROUP)
            .bind(now_millis())
            .fetch_optional(&self.pool)
            .await
            .map_err(err("leader"))?;
        Ok(row.map(|r| Leader { holder: r.get(0), token: r.get::<i64, _>(1) as u64 }))
    }

    async fn last_sent(&self) -> Result<HashMap<String, LastSent>, StoreError> {
        let rows = sqlx::query("SELECT entry, tick_ms, token FROM celeriac_beat_sent WHERE name = ?1")
            .bind(GROUP)
            .fetch_all(&self.pool)
            .await
            .map_err(err("last_sent"))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let tick = Utc.timestamp_millis_opt(r.get(1)).single()?;
                Some((r.get(0), LastSent { tick, token: r.get::<i64, _>(2) as u64 }))
            })
            .collect())
    }

    async fn claim(&self, holder: &str, token: u64, entry: &str, tick: DateTime<Utc>) -> Result<Claim, StoreError> {
        let done = sqlx::query(
            "INSERT INTO celeriac_beat_sent (name, entry, tick_ms, token)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (
                 SELECT 1 FROM celeriac_beat_lease
                 WHERE name = ?1 AND holder = ?5 AND token = ?4 AND expires_ms > ?6)
             ON CONFLICT (name, entry) DO UPDATE SET tick_ms = excluded.tick_ms, token = excluded.token
             WHERE tick_ms < excluded.tick_ms",
        )
        .bind(GROUP)
        .bind(entry)
        .bind(tick.timestamp_millis())
        .bind(token as i64)
        .bind(holder)
        .bind(now_millis())
        .execute(&self.pool)
        .await
        .map_err(err("claim"))?;
        if done.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        // Nothing written: either the lease is not ours (any more) or the tick was recorded.
        let ours = self.leader().await?.is_some_and(|l| l.holder == holder && l.token == token);
        Ok(if ours { Claim::AlreadySent } else { Claim::NotLeader })
    }
}
