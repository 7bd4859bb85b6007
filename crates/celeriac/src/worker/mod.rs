//! The worker: consumes queues, runs tasks with bounded concurrency, records results, retries
//! with back-off, dead-letters what cannot run, and shuts down without losing work.
//!
//! `consumer` (fetch, prefetch, leases, settle), `executor` (one run, panics, time limits,
//! retry decision), `outcome` (records and hooks), `rate_limit`, `shared_limit` (limits shared by
//! all workers), `revoke` (revokes persisted in the broker), `shutdown`, `eager`.

mod consumer;
mod control;
pub(crate) mod eager;
mod events;
mod executor;
mod outcome;
pub(crate) mod pool;
mod rate_limit;
pub(crate) mod revoke;
pub(crate) mod shared_limit;
mod shutdown;
mod state;

pub(crate) use outcome::Call;

/// Revokes `ids` on every worker (a broadcast `revoke`) and stores REVOKED for those that
/// have not run, as Celery's `GroupResult.revoke()` leads to.
pub(crate) async fn revoke_everywhere(app: &App, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let persisted = match revoke::persist(app, ids, false, None).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not persist the revoke in the broker");
            false
        }
    };
    let args = serde_json::json!({"task_id": ids, "terminate": false, revoke::PERSISTED: persisted});
    if let Err(e) = control::broadcast(app, "revoke", args).await {
        tracing::warn!(error = %e, "could not broadcast revoke");
    }
}
pub use pool::{POOL_CHILD_ENV, Pool};
pub use rate_limit::RateLimit;
pub use shared_limit::{KeyFn, RateKey};
pub use shutdown::Shutdown;

use crate::app::App;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a worker consumes.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOptions {
    /// Tasks run at once (`worker_concurrency`, default: CPUs).
    pub concurrency: usize,
    /// Queues to consume, earlier ones first (`-Q a,b`; default `task_default_queue`).
    pub queues: Vec<String>,
    /// `worker_prefetch_multiplier` (4; 1 = one per slot; 0 = unlimited).
    pub prefetch_multiplier: usize,
    /// `worker_disable_prefetch`: fetch only when a slot is free.
    pub disable_prefetch: bool,
    /// Node name, `celeriac@<host>` by default.
    pub hostname: String,
    /// Seconds running tasks get after a shutdown signal (`worker_soft_shutdown_timeout`).
    pub shutdown_timeout: f64,
    /// Longest a single fetch waits for messages before looping.
    pub poll_wait: Duration,
    /// Send `task-*` events (`worker_send_task_events`, `-E`); worker events are always sent.
    pub send_task_events: bool,
    /// Where tasks run (`worker_pool`, `--pool`): the async runtime or child processes.
    pub pool: Pool,
    /// Process pool: tasks a child runs before it is replaced (`worker_max_tasks_per_child`).
    pub max_tasks_per_child: Option<u64>,
    /// Process pool: resident KiB above which a child is replaced after its task
    /// (`worker_max_memory_per_child`).
    pub max_memory_per_child: Option<u64>,
}

impl WorkerOptions {
    /// Options from the app's settings.
    pub fn from_app(app: &App) -> Self {
        let c = app.config();
        WorkerOptions {
            concurrency: c.concurrency(),
            queues: vec![c.task_default_queue.clone()],
            prefetch_multiplier: c.worker_prefetch_multiplier,
            disable_prefetch: c.worker_disable_prefetch,
            hostname: format!("celeriac@{}", crate::app::hostname()),
            shutdown_timeout: c.worker_soft_shutdown_timeout,
            poll_wait: Duration::from_secs(1),
            send_task_events: c.worker_send_task_events,
            pool: Pool::parse(&c.worker_pool).unwrap_or_default(),
            max_tasks_per_child: c.worker_max_tasks_per_child,
            max_memory_per_child: c.worker_max_memory_per_child,
        }
    }

    /// How many more messages may be fetched while holding `held` of which `unacked` are
    /// not yet acknowledged.
    pub fn fetch_room(&self, held: usize, unacked: usize) -> usize {
        const UNLIMITED_BATCH: usize = 256;
        if self.disable_prefetch {
            return self.concurrency.saturating_sub(held);
        }
        match self.prefetch_multiplier {
            0 => UNLIMITED_BATCH,
            m => {
                let window = self.concurrency * m;
                let room = window.saturating_sub(unacked);
                // Refill in batches: while work is on hand, wait until a quarter of the window
                // is free, so each claim takes many messages in one round trip instead of one
                // or two as tasks finish one by one.
                if held > 0 && room < (window / 4).max(1) { 0 } else { room }
            }
        }
    }
}

/// Live counters of one worker.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Runs finished (any outcome).
    pub processed: AtomicU64,
    /// Runs that stored SUCCESS.
    pub succeeded: AtomicU64,
    /// Runs that will be retried.
    pub retried: AtomicU64,
    /// Runs that failed for good.
    pub failed: AtomicU64,
    /// Messages sent to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Tasks revoked or expired before running.
    pub revoked: AtomicU64,
    /// Runs in progress now.
    pub active: AtomicU64,
}

impl WorkerStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> WorkerSummary {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerSummary {
            processed: g(&self.processed),
            succeeded: g(&self.succeeded),
            retried: g(&self.retried),
            failed: g(&self.failed),
            dead_lettered: g(&self.dead_lettered),
            revoked: g(&self.revoked),
        }
    }
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Runs finished.
    pub processed: u64,
    /// SUCCESS.
    pub succeeded: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Final failures.
    pub failed: u64,
    /// Dead-lettered messages.
    pub dead_lettered: u64,
    /// Revoked or expired.
    pub revoked: u64,
}

/// A worker bound to an app.
#[derive(Debug)]
pub struct Worker {
    app: App,
    options: WorkerOptions,
    stats: Arc<WorkerStats>,
}

impl Worker {
    /// A worker with options from the app's settings.
    pub fn new(app: &App) -> Self {
        Worker { options: WorkerOptions::from_app(app), app: app.clone(), stats: Arc::default() }
    }

    /// Replaces the options.
    pub fn options(mut self, options: WorkerOptions) -> Self {
        self.options = options;
        self
    }

    /// Changes the options in place.
    pub fn options_mut(&mut self) -> &mut WorkerOptions {
        &mut self.options
    }

    /// Live counters (keep a clone to watch a running worker).
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` is triggered and every held message is settled.
    pub async fn run(self, shutdown: Shutdown) -> WorkerSummary {
        tracing::info!(
            node = %self.options.hostname,
            queues = ?self.options.queues,
            concurrency = self.options.concurrency,
            pool = ?self.options.pool,
            broker = %self.app.broker().url(),
            backend = %self.app.backend().url(),
            tasks = self.app.task_names().len(),
            "worker ready"
        );
        consumer::run(self.app.clone(), self.options.clone(), self.stats.clone(), shutdown).await;
        let summary = self.stats.snapshot();
        tracing::info!(?summary, "worker stopped");
        summary
    }

    /// Runs until SIGINT/SIGTERM (twice for an immediate stop).
    pub async fn run_until_signal(self) -> WorkerSummary {
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals();
        self.run(shutdown).await
    }

    /// Runs in the background; stop it with the returned [`Shutdown`], then await the handle.
    pub fn spawn(self) -> (Shutdown, tokio::task::JoinHandle<WorkerSummary>) {
        let shutdown = Shutdown::new();
        let handle = tokio::spawn(self.run(shutdown.clone()));
        (shutdown, handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(concurrency: usize, multiplier: usize, disable: bool) -> WorkerOptions {
        WorkerOptions {
            concurrency,
            queues: vec!["celery".into()],
            prefetch_multiplier: multiplier,
            disable_prefetch: disable,
            hostname: "w".into(),
            shutdown_timeout: 1.0,
            poll_wait: Duration::from_millis(10),
            send_task_events: false,
            pool: Pool::Async,
            max_tasks_per_child: None,
            max_memory_per_child: None,
        }
    }

    #[test]
    fn prefetch_room_follows_celery() {
        // 2 slots × 4: eight unacknowledged messages at most; acked (running) ones do not count.
        assert_eq!(opts(2, 4, false).fetch_room(0, 0), 8);
        assert_eq!(opts(2, 4, false).fetch_room(10, 8), 0);
        assert_eq!(opts(2, 4, false).fetch_room(4, 2), 6);
        // With work on hand, refills wait for a quarter of the window (2 of 8) ...
        assert_eq!(opts(2, 4, false).fetch_room(7, 7), 0);
        assert_eq!(opts(2, 4, false).fetch_room(7, 6), 2);
        // ... but an idle worker takes whatever fits.
        assert_eq!(opts(2, 4, false).fetch_room(0, 7), 1);
        assert_eq!(opts(2, 1, false).fetch_room(2, 0), 2);
        assert_eq!(opts(2, 0, false).fetch_room(1000, 1000), 256);
        // No prefetch: only what free slots can start now.
        assert_eq!(opts(2, 4, true).fetch_room(1, 0), 1);
        assert_eq!(opts(2, 4, true).fetch_room(2, 0), 0);
    }
}
