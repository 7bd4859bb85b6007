//! The worker's consumer: fetches within the prefetch limit, renews leases of held messages,
//! and takes each delivery through decode → checks → slot → run → settle.
//!
//! Prefetch follows Celery: at most `concurrency × worker_prefetch_multiplier` *unacknowledged*
//! messages (0 = unlimited); with `worker_disable_prefetch` a message is fetched only when a
//! slot is free. Bad input (undecodable, unknown task, arguments that do not fit) is
//! dead-lettered with the reason, never dropped.

use super::executor::{self, Decision, Effective};
use super::outcome::Call;
use super::rate_limit::{RateLimit, RateLimiter};
use super::{Shutdown, WorkerOptions, WorkerStats};
use crate::app::App;
use crate::broker::Delivery;
use crate::protocol::{ExceptionInfo, Message, ResultMeta, State};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::task::TaskTracker;

/// Deliveries this worker holds (received and not settled), and which are acked.
#[derive(Default)]
struct Held {
    map: Mutex<HashMap<String, (Delivery, bool)>>,
    changed: Notify,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Delivery, bool)>> {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn insert(&self, d: &Delivery) {
        self.lock().insert(d.tag.clone(), (d.clone(), false));
    }
    fn mark_acked(&self, tag: &str) {
        if let Some(e) = self.lock().get_mut(tag) {
            e.1 = true;
        }
        self.changed.notify_waiters();
    }
    fn remove(&self, tag: &str) {
        self.lock().remove(tag);
        self.changed.notify_waiters();
    }
    fn counts(&self) -> (usize, usize) {
        let map = self.lock();
        (map.len(), map.values().filter(|(_, acked)| !acked).count())
    }
    fn unacked(&self) -> Vec<Delivery> {
        self.lock().values().filter(|(_, acked)| !acked).map(|(d, _)| d.clone()).collect()
    }
}

struct Ctx {
    app: App,
    options: WorkerOptions,
    stats: Arc<WorkerStats>,
    held: Held,
    slots: Semaphore,
    limiter: RateLimiter,
    shutdown: Shutdown,
}

/// Runs the consumer until shutdown; returns when every held delivery is settled.
pub(crate) async fn run(app: App, options: WorkerOptions, stats: Arc<WorkerStats>, shutdown: Shutdown) {
    let ctx = Arc::new(Ctx {
        slots: Semaphore::new(options.concurrency),
        app,
        options,
        stats,
        held: Held::default(),
        limiter: RateLimiter::default(),
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    let renewer = tokio::spawn(renew_leases(ctx.clone()));
    let cleaner = tokio::spawn(clean_expired_results(ctx.app.clone()));
    fetch_loop(&ctx, &tracker).await;
    tracker.close();
    let grace = Duration::from_secs_f64(ctx.options.shutdown_timeout.max(0.0));
    tokio::select! {
        _ = tracker.wait() => {}
        _ = shutdown.immediate_requested() => tracker.wait().await,
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "tasks still running after the shutdown grace period: stopping them");
            shutdown.immediate();
            tracker.wait().await;
        }
    }
    renewer.abort();
    cleaner.abort();
}

/// Deletes expired results now and then (Celery leaves this to a `celery.backend_cleanup`
/// beat task; a worker doing it needs no beat).
async fn clean_expired_results(app: App) {
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
        match app.backend().cleanup().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired results deleted"),
            Err(e) => tracing::warn!(error = %e, "could not delete expired results"),
        }
    }
}

async fn fetch_loop(ctx: &Arc<Ctx>, tracker: &TaskTracker) {
    let mut failures = 0u32;
    loop {
        if ctx.shutdown.is_graceful() {
            return;
        }
        let changed = ctx.held.changed.notified();
        let (held, unacked) = ctx.held.counts();
        let room = ctx.options.fetch_room(held, unacked);
        if room == 0 {
            tokio::select! {
                _ = changed => {}
                _ = ctx.shutdown.graceful_requested() => return,
            }
            continue;
        }
        let fetched = tokio::select! {
            r = ctx.app.broker().fetch(&ctx.options.queues, room, ctx.options.poll_wait) => r,
            _ = ctx.shutdown.graceful_requested() => return,
        };
        match fetched {
            Ok(batch) => {
                failures = 0;
                for d in batch {
                    ctx.held.insert(&d);
                    tracker.spawn(handle(ctx.clone(), d));
                }
            }
            Err(e) => {
                failures += 1;
                let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::error!(error = %e, ?pause, "fetch from broker failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.shutdown.graceful_requested() => return,
                }
            }
        }
    }
}

async fn renew_leases(ctx: Arc<Ctx>) {
    let every = ctx.app.broker().lease() / 3;
    loop {
        tokio::time::sleep(every).await;
        let held = ctx.held.unacked();
        if !held.is_empty()
            && let Err(e) = ctx.app.broker().renew(&held).await
        {
            tracing::warn!(error = %e, "could not renew leases");
        }
    }
}

/// Dead-letters a delivery, counting and logging it.
async fn dead_letter(ctx: &Ctx, d: &Delivery, reason: &str) {
    tracing::warn!(queue = %d.queue, %reason, "message dead-lettered");
    ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = ctx.app.broker().dead_letter(d, reason).await {
        tracing::error!(error = %e, %reason, "could not dead-letter message; it stays leased and will be redelivered");
    }
}

async fn handle(ctx: Arc<Ctx>, d: Delivery) {
    settle_delivery(&ctx, &d).await;
    ctx.held.remove(&d.tag);
}

async fn settle_delivery(ctx: &Arc<Ctx>, d: &Delivery) {
    let app = &ctx.app;
    let message = match Message::from_wire(&d.payload) {
        Ok(m) => m,
        Err(e) => return dead_letter(ctx, d, &e.to_string()).await,
    };
    let body = match message.task_body() {
        Ok(b) => b,
        Err(e) => return dead_letter(ctx, d, &e.to_string()).await,
    };
    let id = message.headers.id.clone();
    let Some(task) = app.task(&message.headers.task).cloned() else {
        let name = &message.headers.task;
        let hint = app.suggest_task(name).map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
        let meta = ResultMeta::exception(&id, State::Failure, &ExceptionInfo::not_registered(name), None);
        let _ = app.backend().store(&meta, app.config().result_expires_duration()).await;
        return dead_letter(ctx, d, &format!("unknown task {name:?}: not registered with this worker{hint}")).await;
    };
    if message.headers.expires_time().is_some_and(|t| t <= Utc::now()) {
        tracing::info!(task_id = %id, "task expired before it ran: revoked");
        let mut meta = ResultMeta::exception(&id, State::Revoked, &ExceptionInfo::revoked("expired"), None);
        meta.children = None; // as Celery writes REVOKED
        let _ = app.backend().store(&meta, app.config().result_expires_duration()).await;
        ctx.stats.revoked.fetch_add(1, Ordering::Relaxed);
        let _ = app.broker().ack(d).await;
        return;
    }
    if let Some(eta) = message.headers.eta_time().filter(|t| *t > Utc::now() + chrono::Duration::milliseconds(5)) {
        // A transport that delivered early (or a clock ahead of ours): back to the broker.
        let _ = app.broker().requeue(d, Some(eta)).await;
        return;
    }
    let effective = Effective::new(app, task.as_ref(), &message);
    if let Some(rate) = effective.options.rate_limit.as_deref().filter(|_| !app.config().worker_disable_rate_limits)
        && let Ok(rate) = RateLimit::parse(rate)
    {
        let start = ctx.limiter.reserve(task.name(), rate);
        tokio::select! {
            _ = tokio::time::sleep_until(start) => {}
            _ = ctx.shutdown.graceful_requested() => {
                let _ = app.broker().requeue(d, None).await;
                return;
            }
        }
    }
    let _permit = tokio::select! {
        p = ctx.slots.acquire() => match p { Ok(p) => p, Err(_) => return },
        _ = ctx.shutdown.graceful_requested() => {
            // Prefetched but never started: give it back.
            let _ = app.broker().requeue(d, None).await;
            return;
        }
    };
    if !effective.acks_late {
        match app.broker().ack(d).await {
            Ok(true) => ctx.held.mark_acked(&d.tag),
            Ok(false) => {
                tracing::warn!(task_id = %id, "lease lost before start (another worker has it): skipping");
                return;
            }
            Err(e) => {
                tracing::error!(task_id = %id, error = %e, "ack failed; not running (the message will be redelivered)");
                return;
            }
        }
    }
    let request = executor::request(app, &message, &body, &ctx.options.hostname, d.redelivered(), false);
    let call = Call {
        app: app.clone(),
        task: task.clone(),
        message,
        body,
        request: request.clone(),
        effective,
        started_at: Utc::now(),
    };
    if call.effective.track_started {
        call.started().await;
    }
    crate::canvas::saga::on_start(&call).await;
    ctx.stats.active.fetch_add(1, Ordering::Relaxed);
    let decision = tokio::select! {
        dec = executor::run(task, request, &call.effective) => Some(dec),
        _ = ctx.shutdown.immediate_requested() => None,
    };
    ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
    let Some(decision) = decision else {
        if call.effective.acks_late {
            tracing::warn!(task_id = %id, "stopped at shutdown: returned to the queue (acks_late)");
            let _ = app.broker().requeue(d, None).await;
        } else {
            call.failed(&ExceptionInfo::worker_lost("worker stopped before the task finished"), None).await;
        }
        return;
    };
    ctx.stats.processed.fetch_add(1, Ordering::Relaxed);
    apply(ctx, d, &call, executor::name_failure(decision, &call.request.task, &id)).await;
}

async fn apply(ctx: &Ctx, d: &Delivery, call: &Call, decision: Decision) {
    let broker = ctx.app.broker();
    let late = call.effective.acks_late;
    match decision {
        Decision::Success(value) => {
            let children = crate::canvas::dispatch::on_success(call, &value).await;
            call.succeeded(&value, &children).await;
            ctx.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            if late {
                let _ = broker.ack(d).await;
            }
        }
        Decision::Retry { eta, exc } => {
            call.retrying(exc.as_ref()).await;
            ctx.stats.retried.fetch_add(1, Ordering::Relaxed);
            let next = call.retry_message(eta);
            if let Err(e) = broker.republish(d, next.queue(), &next).await {
                tracing::error!(task_id = %call.request.id, error = %e, "could not publish the retry");
            }
        }
        Decision::Failure { exc, traceback, timed_out } => {
            tracing::warn!(task_id = %call.request.id, task = %call.request.task, error = %exc, "task failed");
            call.failed(&exc, traceback).await;
            crate::canvas::dispatch::on_failure(call, &exc).await;
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            if late && timed_out && !ctx.app.config().task_acks_on_failure_or_timeout {
                let _ = broker.requeue(d, None).await;
            } else if ctx.app.config().worker_dead_letter_failures {
                let reason = format!("failed after {} retries: {exc}", call.request.retries);
                dead_letter(ctx, d, &reason).await;
            } else if late {
                let _ = broker.ack(d).await;
            }
        }
        Decision::Reject { requeue: true, reason } => {
            tracing::info!(task_id = %call.request.id, %reason, "task rejected: requeued");
            if late {
                let _ = broker.requeue(d, None).await;
            } else {
                let _ = broker.publish(call.message.queue(), &call.message).await;
            }
        }
        Decision::Reject { requeue: false, reason } => {
            dead_letter(ctx, d, &format!("rejected by the task: {reason}")).await
        }
        Decision::Ignore => {
            if late {
                let _ = broker.ack(d).await;
            }
        }
        Decision::BadArguments(e) => {
            let exc = ExceptionInfo::type_error(e.to_string());
            call.failed(&exc, None).await;
            crate::canvas::dispatch::on_failure(call, &exc).await;
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            dead_letter(ctx, d, &format!("arguments do not fit: {e}")).await;
        }
    }
}
