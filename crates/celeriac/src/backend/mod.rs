//! Result backends: where task states and return values are stored, in Celery's result record
//! format ([`crate::protocol::ResultMeta`]).
//!
//! [`ResultBackend`] is the one seam; a SUCCESS record is never overwritten by a later write
//! (Celery's rule, which makes a late duplicate delivery harmless). One module per store:
//! `memory`, `sqlite`.

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use crate::protocol::{ResultMeta, State};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// A result backend failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The URL's scheme is not a backend this build has.
    #[error("unsupported result backend URL {url:?}: {hint}")]
    UnsupportedUrl {
        /// The URL (password removed).
        url: String,
        /// What would work instead.
        hint: String,
    },
    /// The store failed.
    #[error("result backend {operation} failed: {source}")]
    Storage {
        /// What was being done.
        operation: &'static str,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored record is not a Celery result record.
    #[error("stored result for {task_id} is corrupt: {source}")]
    Corrupt {
        /// Task id.
        task_id: String,
        /// The decode error.
        source: serde_json::Error,
    },
}

impl BackendError {
    /// Wraps a storage error.
    pub fn storage(operation: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackendError::Storage { operation, source: Box::new(source) }
    }
}

/// What a store call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The record was written.
    Stored,
    /// A SUCCESS record was already there; nothing was written.
    KeptSuccess,
}

/// One finished member of a chord header, as counted by [`ResultBackend::chord_part_return`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    /// Position in the header (`group_index`); `None` sorts last.
    pub index: Option<u64>,
    /// The member's task id.
    pub task_id: String,
    /// Its final state (SUCCESS, FAILURE or REVOKED).
    pub state: State,
    /// Its return value, or the exception dict.
    pub result: serde_json::Value,
}

/// A result store.
#[async_trait]
pub trait ResultBackend: Send + Sync + 'static {
    /// The URL with any password removed, for logs.
    fn url(&self) -> String;

    /// Writes `meta` under `meta.task_id`, expiring after `expires` (never when `None`),
    /// unless a SUCCESS record is already stored.
    async fn store(&self, meta: &ResultMeta, expires: Option<Duration>) -> Result<StoreOutcome, BackendError>;

    /// The record of `task_id`; `None` when unknown (PENDING).
    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError>;

    /// The records of many tasks, in order (`None` where unknown). The default asks one by
    /// one; Redis asks in batches (`MGET`).
    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<ResultMeta>>, BackendError> {
        let mut out = Vec::with_capacity(task_ids.len());
        for id in task_ids {
            out.push(self.get(id).await?);
        }
        Ok(out)
    }

    /// Deletes the record of `task_id`.
    async fn forget(&self, task_id: &str) -> Result<(), BackendError>;

    /// Deletes expired records; returns how many.
    async fn cleanup(&self) -> Result<u64, BackendError>;

    /// Records that the chord `group_id` expects `size` header members (Celery's
    /// `set_chord_size`, sent before the last member is published). A chord applied again
    /// under the same id counts again.
    async fn set_chord_size(&self, group_id: &str, size: usize, expires: Option<Duration>) -> Result<(), BackendError>;

    /// One more member expected (`add_to_chord`, from a running header task).
    async fn add_to_chord(&self, group_id: &str) -> Result<(), BackendError>;

    /// Counts one finished header member, once per task id and index (a redelivered member
    /// is not counted twice). When the count reaches the size (plus members added), returns
    /// every member, ordered by index, to exactly one caller (it holds the chord's claim);
    /// later copies are ignored.
    async fn chord_part_return(&self, group_id: &str, part: ChordPart) -> Result<Option<Vec<ChordPart>>, BackendError>;

    /// Called by the claim holder once the body is dealt with: `body_sent` clears the counting
    /// and marks the chord done; otherwise (the chord failed) only the size is dropped, and the
    /// members stay readable until they expire, as with Celery's Redis backend.
    async fn chord_finished(&self, group_id: &str, body_sent: bool) -> Result<(), BackendError>;

    /// Saves a group result's structure (Celery's `GroupResult.save`: `{"result": tuple}`).
    async fn save_group(
        &self,
        group_id: &str,
        result: &serde_json::Value,
        expires: Option<Duration>,
    ) -> Result<(), BackendError>;

    /// A saved group result's tuple (`GroupResult.restore`).
    async fn restore_group(&self, group_id: &str) -> Result<Option<serde_json::Value>, BackendError>;

    /// Stores a JSON record (`json`, already encoded) under `key` (workflow trees, rollback
    /// records, saved groups).
    async fn put_record(&self, key: &str, json: &[u8], expires: Option<Duration>) -> Result<(), BackendError>;

    /// The JSON record under `key`.
    async fn get_record(&self, key: &str) -> Result<Option<serde_json::Value>, BackendError>;

    /// Waits until `task_id` is ready or `timeout` passes; returns the last record seen.
    /// The default polls with a growing interval (5 ms to 200 ms).
    async fn wait_ready(&self, task_id: &str, timeout: Duration) -> Result<Option<ResultMeta>, BackendError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(5);
        loop {
            let meta = self.get(task_id).await?;
            if meta.as_ref().is_some_and(|m| m.status.is_ready()) || tokio::time::Instant::now() >= deadline {
                return Ok(meta);
            }
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + interval)).await;
            interval = (interval * 2).min(Duration::from_millis(200));
        }
    }
}

/// Whether a write of `new` may replace `old`: everything but a stored SUCCESS.
pub(crate) fn may_overwrite(old: Option<&State>) -> bool {
    old != Some(&State::Success)
}

/// Opens the backend a URL names (`memory://`, `sqlite://path`, `redis://host:port/db`) with
/// the app's `result_backend_transport_options`.
pub async fn open(url: &str, config: &crate::Config) -> Result<Arc<dyn ResultBackend>, BackendError> {
    #[cfg(feature = "redis")]
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") {
        let prefix = match config.result_backend_transport_options.get("global_keyprefix") {
            Some(toml::Value::String(p)) => Some(p.as_str()),
            _ => None,
        };
        let backend = redis::RedisBackend::connect(url, prefix).await?.with_expiry(config.result_expires_duration());
        return Ok(Arc::new(backend));
    }
    let _ = config;
    from_url(url).await
}

/// Opens the backend a URL names: `memory://`, `sqlite://path`, `redis://host:port/db`.
pub async fn from_url(url: &str) -> Result<Arc<dyn ResultBackend>, BackendError> {
    if url.starts_with("memory://") {
        return Ok(Arc::new(memory::MemoryBackend::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(sqlite::SqliteBackend::connect(url).await?));
    }
    #[cfg(feature = "redis")]
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") {
        return Ok(Arc::new(redis::RedisBackend::connect(url, None).await?));
    }
    Err(BackendError::UnsupportedUrl {
        url: crate::broker::redact(url),
        hint: "use sqlite://path.db (the default), redis://host:port/db or memory://".to_owned(),
    })
}
