//! Where beat instances agree on a leader and remember what was sent: a lease with a fencing
//! token, and per entry the last tick sent with the token that sent it.
//!
//! [`BeatStore`] is the seam; `memory` (one process, for tests), `redis` (a key with `PX`
//! expiry, the token from `INCR`, Lua scripts for renew and compare-and-set) and `sqlite`
//! (a lease row and a sent-ticks table in the broker's own database file) implement it.
//!
//! The guarantee every implementation keeps: [`BeatStore::claim`] records a tick only while the
//! caller's token is the current lease's and only if the tick is later than the one stored, in
//! one atomic step. A deposed leader (its lease expired and another took it, so the token moved
//! on) cannot claim, and a new leader cannot claim a tick the old one already claimed.

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A beat store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage behind the store failed.
    #[error("beat store {operation} failed: {source}")]
    Storage {
        /// What was being done.
        operation: &'static str,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker URL has no beat store.
    #[error("beat has no lease store for {url:?}: use redis://, sqlite:// or memory://")]
    Unsupported {
        /// The URL (password removed).
        url: String,
    },
}

impl StoreError {
    /// Wraps a storage error.
    pub fn storage(operation: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Storage { operation, source: Box::new(source) }
    }
}

/// Who holds the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The holder's id (`host:pid:uuid` for a beat process).
    pub holder: String,
    /// Its fencing token.
    pub token: u64,
}

/// The last tick sent for an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSent {
    /// The scheduled time of the tick.
    pub tick: DateTime<Utc>,
    /// The fencing token of the leader that sent it.
    pub token: u64,
}

/// The outcome of [`BeatStore::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Recorded: the caller sends the tick.
    Claimed,
    /// This tick (or a later one) was already recorded: do not send.
    AlreadySent,
    /// The caller's token is no longer the lease's: it is not the leader, send nothing.
    NotLeader,
}

/// Lease and last-sent ticks for one beat group.
#[async_trait]
pub trait BeatStore: Send + Sync + 'static {
    /// What it is, for logs (`redis://host/9`, `sqlite://beat.db`).
    fn describe(&self) -> String;

    /// Takes the lease for `lease` when nobody holds it (or it expired), with a new fencing
    /// token, or renews it when `holder` holds it. Returns the token while `holder` is the
    /// leader, `None` otherwise.
    async fn acquire(&self, holder: &str, lease: Duration) -> Result<Option<u64>, StoreError>;

    /// Gives the lease up if `holder` still holds it with `token` (a clean shutdown, so the
    /// next instance takes over at once).
    async fn release(&self, holder: &str, token: u64) -> Result<(), StoreError>;

    /// The current leader, if the lease is held.
    async fn leader(&self) -> Result<Option<Leader>, StoreError>;

    /// The last tick sent per entry name.
    async fn last_sent(&self) -> Result<HashMap<String, LastSent>, StoreError>;

    /// Records `tick` as sent for `entry`, atomically: only while `holder` holds the lease with
    /// `token`, and only if `tick` is later than the recorded one.
    async fn claim(&self, holder: &str, token: u64, entry: &str, tick: DateTime<Utc>) -> Result<Claim, StoreError>;
}

/// The store that lives beside the broker `url` names: the same Redis database (keys under
/// `global_keyprefix`), the same SQLite file, or (for `memory://`) a store of this process.
pub async fn open(url: &str, config: &crate::Config) -> Result<Arc<dyn BeatStore>, StoreError> {
    if url.starts_with("memory://") {
        return Ok(Arc::new(memory::MemoryStore::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(sqlite::SqliteStore::connect(url).await?));
    }
    #[cfg(feature = "redis")]
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") {
        let prefix = match config.broker_transport_options.get("global_keyprefix") {
            Some(toml::Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        return Ok(Arc::new(redis::RedisStore::connect(url, &prefix).await?));
    }
    let _ = config;
    Err(StoreError::Unsupported { url: crate::broker::redact(url) })
}
