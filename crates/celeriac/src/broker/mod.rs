//! Brokers: where task messages wait until a worker takes them.
//!
//! [`Broker`] is the one seam every transport implements; the worker and the client only ever
//! see `Arc<dyn Broker>`. Messages travel as kombu envelopes ([`crate::protocol::Message`]
//! `to_wire` bytes), so every transport stores the same bytes Celery's virtual transports do.
//! A delivery is leased, not removed: until [`Broker::ack`], a worker that dies gives its
//! messages back when the lease runs out. Dead letters (messages that cannot or must not run)
//! are kept by the broker with the reason and the original bytes.
//!
//! One module per transport: `memory` (in process), `sqlite` (embedded default), `redis`
//! (kombu's layout, shared with Python Celery).

pub mod memory;
pub mod ops;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use crate::protocol::Message;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
pub use ops::{DeadLetterFilter, DeadLetterInfo, Revoked};
use std::sync::Arc;
use std::time::Duration;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL's scheme is not a broker this build has.
    #[error("unsupported broker URL {url:?}: {hint}")]
    UnsupportedUrl {
        /// The URL (password removed).
        url: String,
        /// What would work instead.
        hint: String,
    },
    /// A `rediss://` (TLS) connection could not be set up: not a TLS port, a certificate the
    /// trusted CAs do not vouch for, a bad client certificate.
    #[error(
        "TLS connection to {url} failed: {problem} (is it the server's TLS port? is its CA in the system's roots or in ssl_ca_certs=<file>? ssl_cert_reqs=none skips verification)"
    )]
    Tls {
        /// The URL (password removed).
        url: String,
        /// What the TLS layer reported.
        problem: String,
    },
    /// The storage behind the broker failed.
    #[error("broker {operation} failed: {source}")]
    Storage {
        /// What was being done.
        operation: &'static str,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A message to publish could not be encoded.
    #[error("cannot publish message {task_id}: {problem}")]
    Publish {
        /// Task id.
        task_id: String,
        /// What is wrong.
        problem: String,
    },
}

impl BrokerError {
    /// Wraps a storage error.
    pub fn storage(operation: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        BrokerError::Storage { operation, source: Box::new(source) }
    }
}

/// A message handed to a worker, leased until acked, requeued or dead-lettered.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Identifies this delivery to the broker (includes the lease token).
    pub tag: String,
    /// The queue it came from.
    pub queue: String,
    /// The envelope bytes exactly as stored.
    pub payload: Vec<u8>,
    /// How many times it has been delivered, this time included.
    pub delivery_count: u32,
}

impl Delivery {
    /// Whether an earlier delivery of this message was not acknowledged.
    pub fn redelivered(&self) -> bool {
        self.delivery_count > 1
    }
}

/// A message that could not or must not run, kept with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Dead-letter id (for `show`, `replay`).
    pub id: String,
    /// The queue it came from.
    pub queue: String,
    /// Task id, if the envelope could be read.
    pub task_id: Option<String>,
    /// Task name, if the envelope could be read.
    pub task_name: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The exception type, when known (`KeyError`, `Reject`, `NotRegistered`, ...).
    pub error_type: Option<String>,
    /// The traceback text, when the task produced one.
    pub traceback: Option<String>,
    /// How many times the task had been retried.
    pub retries: Option<u32>,
    /// The task id a replay ran it under (`celeriac dlq replay`); `None` until replayed.
    pub replayed_as: Option<String>,
    /// The original bytes.
    pub payload: Vec<u8>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// Counts for one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Waiting and due now.
    pub ready: u64,
    /// Waiting for a future ETA.
    pub scheduled: u64,
    /// Held by workers (prefetched or running).
    pub leased: u64,
}

/// An ETA message a consumer of this process received early and parked in the broker until it
/// is due (what Celery's `inspect scheduled` lists).
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// When it goes back to its queue.
    pub due: DateTime<Utc>,
    /// Its queue.
    pub queue: String,
    /// The envelope bytes.
    pub payload: Vec<u8>,
}

/// A message transport.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// The URL with any password removed, for logs.
    fn url(&self) -> String;

    /// How long a delivery stays leased without renewal; the worker renews at a third of it.
    fn lease(&self) -> Duration;

    /// Queues envelope bytes on `queue` with `priority`, visible at `visible_at`. The bytes
    /// are stored as given: this is how foreign or replayed messages enter.
    async fn publish_raw(
        &self,
        queue: &str,
        payload: &[u8],
        priority: u8,
        visible_at: DateTime<Utc>,
    ) -> Result<(), BrokerError>;

    /// Queues `message` on `queue`, visible at its ETA (now when none).
    async fn publish(&self, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish_raw(queue, &message.to_wire(), message.properties.priority, visible_at(message)).await
    }

    /// Queues each `(queue, message)` in order, in one round trip (and all or nothing) where
    /// the transport can: a group or a chord header goes out as one batch.
    async fn publish_many(&self, messages: &[(&str, &Message)]) -> Result<(), BrokerError> {
        for (queue, message) in messages {
            self.publish(queue, message).await?;
        }
        Ok(())
    }

    /// Makes `queue` receive what is published to `exchange` with `routing_key` (kombu's
    /// binding), so that messages restored by any worker find it. Called when a worker starts
    /// consuming a queue; publishing declares the default binding (exchange and routing key
    /// named after the queue) too. A no-op where queues need no declaring.
    async fn declare_queue(&self, _queue: &str, _exchange: &str, _routing_key: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Takes up to `max` due messages from `queues` (earlier queues first), waiting up to
    /// `wait` for the first one. Returns an empty list when nothing came.
    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError>;

    /// A consumer of this process stopped (its worker shut down, every delivery settled): a
    /// transport that holds messages on the consumer's behalf (Redis: what blocking pops moved,
    /// ETA messages parked until due) puts them back on their queues, so nothing waits for the
    /// process to come back.
    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Removes a delivered message for good. Acking a delivery whose lease was lost to
    /// another worker is a no-op that returns `false`.
    async fn ack(&self, delivery: &Delivery) -> Result<bool, BrokerError>;

    /// Returns a delivered message to its queue, due at `at` (now when `None`).
    async fn requeue(&self, delivery: &Delivery, at: Option<DateTime<Utc>>) -> Result<(), BrokerError>;

    /// Extends the lease of held deliveries. The worker passes them without their payload
    /// (tag, queue and delivery count only): a lease is known by its tag.
    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError>;

    /// Publishes `message` to `queue` and acks `delivery`, atomically where the transport can
    /// (a retry must never both vanish and never run twice).
    async fn republish(&self, delivery: &Delivery, queue: &str, message: &Message) -> Result<(), BrokerError> {
        self.publish(queue, message).await?;
        self.ack(delivery).await?;
        Ok(())
    }

    /// Moves a delivery to the dead-letter queue with `reason` (acking it).
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError>;

    /// Dead letters, newest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError>;

    /// One dead letter by id.
    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BrokerError>;

    /// Removes one dead letter (after a replay); returns whether it existed.
    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError>;

    /// Removes every dead letter; returns how many.
    async fn purge_dead_letters(&self) -> Result<u64, BrokerError>;

    /// Removes every waiting (not leased) message from `queue`; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, BrokerError>;

    /// Counts per queue.
    async fn stats(&self) -> Result<Vec<QueueStats>, BrokerError>;

    /// ETA messages that consumers of this process parked in the broker until due, soonest
    /// first. Empty where ETA messages simply wait in their queue.
    async fn parked(&self) -> Result<Vec<Parked>, BrokerError> {
        Ok(Vec::new())
    }

    /// Broadcasts on a fanout exchange (events, remote control), fire-and-forget. Returns
    /// `false` when the transport has no fanout (nothing was sent).
    async fn publish_fanout(&self, _exchange: &str, _routing_key: &str, _payload: &[u8]) -> Result<bool, BrokerError> {
        Ok(false)
    }

    /// Messages broadcast on `exchange` from now on; `None` when the transport has no fanout.
    async fn subscribe_fanout(
        &self,
        _exchange: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>, BrokerError> {
        Ok(None)
    }

    /// Delivers `payload` to the queues bound to the direct `exchange` with `routing_key`
    /// (remote-control replies).
    async fn publish_direct(&self, _exchange: &str, _routing_key: &str, _payload: &[u8]) -> Result<(), BrokerError> {
        Ok(())
    }

    // ---- revoke, shared rate limits, dead-letter details (`ops.rs`) ----

    /// Records `ids` as revoked until `expires_at`, for every worker of this broker, present
    /// or future (Celery keeps revokes in each worker's memory only). Returns `false` where the
    /// transport keeps no such record.
    async fn persist_revoked(
        &self,
        _ids: &[String],
        _terminate: bool,
        _expires_at: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        Ok(false)
    }

    /// A number that changes whenever the persisted revoked set changes, cheap to read: a
    /// worker polls it and reloads [`Broker::persisted_revoked`] only when it moved.
    async fn revoked_version(&self) -> Result<u64, BrokerError> {
        Ok(0)
    }

    /// The persisted revoked ids still in force (expired ones are pruned).
    async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        Ok(Vec::new())
    }

    /// Takes one start from the shared rate bucket `key` (one start per `interval`, up to
    /// `burst` at once), for every worker of this broker together. `Duration::ZERO`: taken,
    /// start now; otherwise nothing was taken and `waiter` (the task id) has a place in the
    /// bucket's line: come back after the wait ([`ops::attempt`]).
    async fn rate_limit_acquire(
        &self,
        _key: &str,
        _waiter: &str,
        _interval: Duration,
        _burst: u32,
    ) -> Result<Duration, BrokerError> {
        Ok(Duration::ZERO)
    }

    /// [`Broker::dead_letter`] with the error type, traceback and retries recorded too.
    async fn dead_letter_with(&self, delivery: &Delivery, info: &DeadLetterInfo) -> Result<(), BrokerError> {
        self.dead_letter(delivery, &info.reason).await
    }

    /// Records that dead letter `id` was replayed as task `task_id`; returns whether it exists.
    async fn mark_dead_letter_replayed(&self, _id: &str, _task_id: &str) -> Result<bool, BrokerError> {
        Ok(false)
    }
}

/// Opens the broker a URL names: `memory://`, `sqlite://path`, `redis://`, `rediss://`.
pub async fn from_url(url: &str, config: &crate::Config) -> Result<Arc<dyn Broker>, BrokerError> {
    if url.starts_with("memory://") {
        return Ok(Arc::new(memory::MemoryBroker::new()));
    }
    #[cfg(feature = "sqlite")]
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(sqlite::SqliteBroker::connect(url, config).await?));
    }
    #[cfg(feature = "redis")]
    if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") {
        return Ok(Arc::new(redis::RedisBroker::connect(url, config).await?));
    }
    let _ = config;
    Err(BrokerError::UnsupportedUrl {
        url: redact(url),
        hint: "use sqlite://path.db (the default), redis://host:port/db or memory://".to_owned(),
    })
}

/// `scheme://user:password@host` → `scheme://user:***@host`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// When a message should become visible: its ETA, or now.
pub(crate) fn visible_at(message: &Message) -> DateTime<Utc> {
    message.headers.eta_time().unwrap_or_else(Utc::now)
}

/// Task id and name of raw envelope bytes, if they can be read.
pub(crate) fn peek_ids(payload: &[u8]) -> (Option<String>, Option<String>) {
    match Message::from_wire(payload) {
        Ok(m) => (Some(m.headers.id), Some(m.headers.task)),
        Err(_) => (None, None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
        assert_eq!(super::redact("sqlite://x.db"), "sqlite://x.db");
    }
}

/// Why a dead letter cannot be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// No dead letter has that id.
    #[error("no dead letter with id {0:?} (see `celeriac dlq list`)")]
    NotFound(String),
    /// Its bytes are not a task message, so there is nothing to run; inspect and purge it.
    #[error("dead letter {id} cannot be replayed: {problem}")]
    Undecodable {
        /// Dead-letter id.
        id: String,
        /// Why it does not decode.
        problem: String,
    },
    /// It was replayed before (replaying again would run the task twice).
    #[error("dead letter {id} was already replayed as task {task_id} (see `celeriac result {task_id}`)")]
    AlreadyReplayed {
        /// Dead-letter id.
        id: String,
        /// The task id of that replay.
        task_id: String,
    },
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The header a replayed message carries: the task id it was dead-lettered under.
pub const REPLAYED_FROM: &str = "replayed_from";

/// Puts a dead letter back on its queue as a new task: a fresh task id (so its result is kept
/// apart from the failed run's), a fresh retry budget (retries 0, no ETA), and the header
/// `replayed_from` = the old id. The dead letter stays, marked `replayed_as` = the new id, so
/// the chain old → new can be followed both ways. Returns the new task id.
pub async fn replay_dead_letter(broker: &dyn Broker, id: &str) -> Result<String, ReplayError> {
    let dead = broker.dead_letter_by_id(id).await?.ok_or_else(|| ReplayError::NotFound(id.to_owned()))?;
    if let Some(task_id) = dead.replayed_as {
        return Err(ReplayError::AlreadyReplayed { id: id.to_owned(), task_id });
    }
    let mut message = Message::from_wire(&dead.payload)
        .map_err(|e| ReplayError::Undecodable { id: id.to_owned(), problem: e.to_string() })?;
    let old = std::mem::replace(&mut message.headers.id, uuid::Uuid::new_v4().to_string());
    if message.headers.root_id.as_deref().is_none_or(|r| r == old) {
        message.headers.root_id = Some(message.headers.id.clone());
    }
    message.properties.correlation_id = Some(message.headers.id.clone());
    message.headers.extra.insert(REPLAYED_FROM.into(), old.into());
    message.headers.retries = 0;
    message.headers.eta = None;
    message.properties.delivery_tag = Some(uuid::Uuid::new_v4().to_string());
    broker.publish(&dead.queue, &message).await?;
    broker.mark_dead_letter_replayed(id, &message.headers.id).await?;
    Ok(message.headers.id)
}
