//! The worker's consumer: fetches within the prefetch limit, renews leases of held messages,
//! and takes each delivery through decode → checks → slot → run → settle.
//!
//! Prefetch follows Celery: at most `concurrency × worker_prefetch_multiplier` *unacknowledged*
//! messages (0 = unlimited); with `worker_disable_prefetch` a message is fetched only when a
//! slot is free. Bad input (undecodable, unknown task, arguments that do not fit) is
//! dead-lettered with the reason, never dropped.

use super::control;
use super::events::Events;
use super::executor::{self, Decision, Effective};
use super::outcome::Call;
use super::rate_limit::{RateLimit, RateLimiter};
use super::state::WorkerState;
use super::{Shutdown, WorkerOptions, WorkerStats};
use crate::app::App;
use crate::broker::{DeadLetterInfo, Delivery};
use crate::protocol::{ExceptionInfo, Message, ResultMeta, State};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::task::TaskTracker;

/// Deliveries this worker holds (received and not settled), and which are acked; kept
/// without their payload (renewing a lease needs only the tag).
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
        let kept = Delivery {
            queue: d.queue.clone(),
            tag: d.tag.clone(),
            payload: Vec::new(),
            delivery_count: d.delivery_count,
        };
        self.lock().insert(d.tag.clone(), (kept, false));
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
    state: Arc<WorkerState>,
    events: Events,
    /// The process pool, when `worker_pool = "process"`.
    pool: Option<Arc<super::pool::ProcessPool>>,
}

/// Runs the consumer until shutdown; returns when every held delivery is settled.
pub(crate) async fn run(app: App, options: WorkerOptions, stats: Arc<WorkerStats>, shutdown: Shutdown) {
    let pool = match super::pool::for_options(&options).await {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the process pool: the worker does not start");
            return;
        }
    };
    let state = Arc::new(WorkerState::new(options.hostname.clone(), options.queues.clone(), options.send_task_events));
    let events = Events::new(app.clone(), state.clone());
    let ctx = Arc::new(Ctx {
        slots: Semaphore::new(options.concurrency),
        app,
        stats,
        held: Held::default(),
        limiter: RateLimiter::default(),
        shutdown: shutdown.clone(),
        state,
        events,
        options,
        pool,
    });
    let processed: Arc<dyn Fn() -> u64 + Send + Sync> = {
        let stats = ctx.stats.clone();
        Arc::new(move || stats.processed.load(Ordering::Relaxed))
    };
    let heartbeats = {
        let processed = processed.clone();
        tokio::spawn(ctx.events.clone().run_heartbeats(move || processed()))
    };
    let control = tokio::spawn(control::run(control::Control {
        app: ctx.app.clone(),
        state: ctx.state.clone(),
        events: ctx.events.clone(),
        shutdown: shutdown.clone(),
        concurrency: ctx.options.concurrency,
        prefetch: ctx.options.fetch_room(0, 0),
        processed: processed.clone(),
    }));
    declare_queues(&ctx).await;
    // Revokes persisted in the broker (sent while no worker ran, or before a restart) are
    // known before the first message is taken.
    let revoked_version = super::revoke::load(&ctx.app, &ctx.state).await;
    let revokes = tokio::spawn(super::revoke::watch(ctx.app.clone(), ctx.state.clone(), revoked_version));
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
    // Everything settled: what the broker holds for this consumer (blocking pops, parked ETA
    // tasks) goes back to the queues.
    if let Err(e) = ctx.app.broker().stop_consuming().await {
        tracing::warn!(error = %e, "could not give back what the broker held for this worker");
    }
    if let Some(pool) = &ctx.pool {
        pool.close().await;
    }
    renewer.abort();
    cleaner.abort();
    revokes.abort();
    heartbeats.abort();
    control.abort();
    ctx.events.offline(processed()).await;
}

/// Declares the queues consumed (kombu's bindings), so that messages restored by any worker,
/// Python or Rust, find them before anything was published to them.
async fn declare_queues(ctx: &Ctx) {
    for q in ctx.state.queues() {
        if let Err(e) = ctx.app.broker().declare_queue(&q, &q, &q).await {
            tracing::warn!(queue = %q, error = %e, "could not declare the queue");
        }
    }
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
        // Armed before the queues are read, so a change right after is not missed.
        let queues_changed = ctx.state.queues_changed.notified();
        tokio::pin!(queues_changed);
        queues_changed.as_mut().enable();
        let queues = ctx.state.queues();
        let fetched = tokio::select! {
            r = ctx.app.broker().fetch(&queues, room, ctx.options.poll_wait) => r,
            // The fetch is dropped: what it moved or claimed and did not return is given back
            // by the broker (holding lists, lost claims).
            _ = &mut queues_changed => continue,
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

/// Acknowledges a finished delivery, retrying with back-off (about 30 s in all) so a broker
/// restart does not leave it to be redelivered later.
async fn settle_ack(app: &App, d: &Delivery) {
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=10 {
        match app.broker().ack(d).await {
            Ok(_) => return,
            Err(e) if attempt == 10 => {
                tracing::error!(error = %e, "could not acknowledge; the message will be redelivered")
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "could not acknowledge; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Dead-letters a delivery, counting and logging it.
async fn dead_letter(ctx: &Ctx, d: &Delivery, info: DeadLetterInfo) {
    let reason = &info.reason;
    tracing::warn!(queue = %d.queue, %reason, "message dead-lettered");
    ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = ctx.app.broker().dead_letter_with(d, &info).await {
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
        Err(e) => return dead_letter(ctx, d, DeadLetterInfo::new(e.to_string(), "DecodeError")).await,
    };
    let body = match message.task_body() {
        Ok(b) => b,
        Err(e) => return dead_letter(ctx, d, DeadLetterInfo::new(e.to_string(), "DecodeError")).await,
    };
    let id = message.headers.id.clone();
    // Revoked wins over unknown: the task was not meant to run here or anywhere.
    if ctx.state.is_revoked(&id) {
        return Box::pin(revoked(ctx, d, (&message, &body), "revoked", false)).await;
    }
    let Some(task) = app.task(&message.headers.task).cloned() else {
        let name = &message.headers.task;
        let hint = app.suggest_task(name).map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
        let meta = ResultMeta::exception(&id, State::Failure, &ExceptionInfo::not_registered(name), None);
        let _ = app.backend().store(&meta, app.config().result_expires_duration()).await;
        let reason = format!("unknown task {name:?}: not registered with this worker{hint}");
        return dead_letter(ctx, d, DeadLetterInfo::new(reason, "NotRegistered").retries(message.headers.retries))
            .await;
    };
    let info = request_info(&message, &body, d.redelivered());
    if let Some(stamp) = revoked_by_stamp(ctx, &message) {
        tracing::info!(task_id = %id, %stamp, "discarding task revoked by stamped header");
        return Box::pin(revoked(ctx, d, (&message, &body), "revoked", false)).await;
    }
    if message.headers.expires_time().is_some_and(|t| t <= Utc::now()) {
        tracing::info!(task_id = %id, "task expired before it ran: revoked");
        return Box::pin(revoked(ctx, d, (&message, &body), "expired", false)).await;
    }
    if let Some(eta) = message.headers.eta_time().filter(|t| *t > Utc::now() + chrono::Duration::milliseconds(5)) {
        // A transport that delivered early (or a clock ahead of ours): back to the broker.
        let _ = app.broker().requeue(d, Some(eta)).await;
        return;
    }
    if ctx.events.task_events_on() {
        ctx.events
            .task("task-received", &id, {
                let mut f = serde_json::Map::new();
                f.insert("name".into(), message.headers.task.clone().into());
                f.insert(
                    "args".into(),
                    message.headers.argsrepr.clone().unwrap_or_else(|| crate::protocol::args_repr(&body.args)).into(),
                );
                f.insert("kwargs".into(), message.headers.kwargsrepr.clone().unwrap_or_default().into());
                f.insert("root_id".into(), message.headers.root_id.clone().into());
                f.insert("parent_id".into(), message.headers.parent_id.clone().into());
                f.insert("retries".into(), message.headers.retries.into());
                f.insert("eta".into(), message.headers.eta.clone().into());
                f.insert("expires".into(), message.headers.expires.clone().into());
                f
            })
            .await;
    }
    ctx.state.reserve(info.clone());
    // Boxed: the running task's state is large, and a spawned future is moved by value.
    let outcome = Box::pin(run_reserved(ctx, d, message, body, task, info)).await;
    ctx.state.unreserve(&id);
    outcome
}

/// What remote control shows of a request (Celery's `Request.info()`).
pub(crate) fn request_info(
    message: &Message,
    body: &crate::protocol::TaskBody,
    redelivered: bool,
) -> crate::worker::state::RequestSnapshot {
    crate::worker::state::RequestSnapshot {
        id: message.headers.id.clone(),
        name: message.headers.task.clone(),
        args: body.args.clone(),
        kwargs: body.kwargs.clone(),
        exchange: message.properties.delivery_info.exchange.clone(),
        routing_key: message.properties.delivery_info.routing_key.clone(),
        priority: message.properties.priority,
        redelivered,
        time_start: None,
        acknowledged: false,
    }
}

fn revoked_by_stamp(ctx: &Ctx, message: &Message) -> Option<String> {
    let names: Vec<String> = match &message.headers.stamped_headers {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => return None,
    };
    ctx.state.revoking_stamp(&names, &message.headers.stamps)
}

/// Stores REVOKED (unless the revoke command already did), counts a chord member as revoked,
/// acks, and sends `task-revoked`.
async fn revoked(
    ctx: &Ctx,
    d: &Delivery,
    (message, body): (&Message, &crate::protocol::TaskBody),
    why: &str,
    terminated: bool,
) {
    let app = &ctx.app;
    let id = message.headers.id.as_str();
    if app.backend().get(id).await.ok().flatten().is_none_or(|m| m.status != State::Revoked) {
        let mut meta = ResultMeta::exception(id, State::Revoked, &ExceptionInfo::revoked(why), None);
        meta.children = None;
        let _ = app.backend().store(&meta, app.config().result_expires_duration()).await;
    }
    crate::canvas::dispatch::on_revoked(app, message, body, why).await;
    ctx.stats.revoked.fetch_add(1, Ordering::Relaxed);
    settle_ack(app, d).await;
    let mut f = serde_json::Map::new();
    f.insert("terminated".into(), terminated.into());
    f.insert("signum".into(), serde_json::Value::Null);
    f.insert("expired".into(), (why == "expired").into());
    ctx.events.task("task-revoked", id, f).await;
}

async fn run_reserved(
    ctx: &Arc<Ctx>,
    d: &Delivery,
    message: Message,
    body: crate::protocol::TaskBody,
    task: Arc<dyn crate::task::Task>,
    mut info: crate::worker::state::RequestSnapshot,
) {
    let app = &ctx.app;
    let id = message.headers.id.clone();
    let mut effective = Effective::new(app, task.as_ref(), &message);
    if let Some((hard, soft)) = ctx.state.time_limits(task.name()) {
        effective.time_limit = hard.or(effective.time_limit);
        effective.soft_time_limit = soft.or(effective.soft_time_limit);
    }
    let rate = match ctx.state.rate_limit(task.name()) {
        Some(over) => over,
        None => effective.options.rate_limit.clone(),
    };
    if let Some(rate) = rate.as_deref().filter(|_| !app.config().worker_disable_rate_limits)
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
    let shared = !app.shared_limits().is_empty() && !app.config().worker_disable_rate_limits;
    let mut acked = false;
    let _permit = loop {
        let permit = tokio::select! {
            p = ctx.slots.acquire() => match p { Ok(p) => p, Err(_) => return },
            _ = ctx.shutdown.graceful_requested() => {
                // Prefetched but never started: give it back.
                return give_back(app, d, &message, acked, None).await;
            }
        };
        if !effective.acks_late && !acked {
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
            acked = true;
        }
        // Shared (global / per-key) limits: taken with the slot in hand and after the ack,
        // right before the start, so a start follows its grant closely. Without room the slot
        // is given back; a short wait (its turn is near) is slept here, a longer one in the
        // broker, so the message holds no prefetch place.
        let Some(wait) = (if shared {
            app.shared_limits().acquire(app, task.as_ref(), &id, &body.args, &body.kwargs).await
        } else {
            None
        }) else {
            break permit;
        };
        drop(permit);
        if wait <= super::shared_limit::WAIT_HERE {
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = ctx.shutdown.graceful_requested() => return give_back(app, d, &message, acked, None).await,
            }
        }
        tracing::debug!(task_id = %id, ?wait, "shared rate limit reached: back to the broker until its turn");
        return give_back(app, d, &message, acked, Some(super::shared_limit::retry_at(wait))).await;
    };
    if ctx.state.is_revoked(&id) || revoked_by_stamp(ctx, &message).is_some() {
        return Box::pin(revoked(ctx, d, (&message, &body), "revoked", false)).await;
    }
    // It may have expired while it waited for a slot (Celery checks when the task starts).
    if message.headers.expires_time().is_some_and(|t| t <= Utc::now()) {
        tracing::info!(task_id = %id, "task expired before it ran: revoked");
        return Box::pin(revoked(ctx, d, (&message, &body), "expired", false)).await;
    }
    info.time_start = Some(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
    info.acknowledged = !effective.acks_late;
    ctx.state.unreserve(&id);
    let terminate = ctx.state.start(info);
    let message = Arc::new(message);
    let request = executor::request(app, &message, &body, &ctx.options.hostname, d.redelivered(), false);
    // Boxed, so the state this future keeps across the task's run stays small.
    let call = Box::new(Call {
        app: app.clone(),
        task: task.clone(),
        message,
        body,
        request: request.clone(),
        effective,
        started_at: Utc::now(),
    });
    if call.effective.track_started {
        Box::pin(call.started()).await;
    }
    Box::pin(crate::canvas::saga::on_start(&call)).await;
    ctx.stats.active.fetch_add(1, Ordering::Relaxed);
    ctx.events.task("task-started", &id, serde_json::Map::new()).await;
    let started = std::time::Instant::now();
    let decision = tokio::select! {
        dec = Box::pin(run_call(ctx, task, request, &call, d.redelivered())) => Some(dec),
        _ = ctx.shutdown.immediate_requested() => None,
        _ = terminate.cancelled() => {
            ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
            ctx.state.finish(&id, &call.request.task);
            tracing::warn!(task_id = %id, "terminated by remote control");
            return Box::pin(revoked(ctx, d, (&*call.message, &call.body), "terminated", true)).await;
        }
    };
    ctx.stats.active.fetch_sub(1, Ordering::Relaxed);
    ctx.state.finish(&id, &call.request.task);
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
    let decision = executor::name_failure(decision, &call.request.task, &id);
    task_event(ctx, &id, &decision, started.elapsed().as_secs_f64()).await;
    Box::pin(apply(ctx, d, &call, decision)).await;
}

/// Returns a message that did not start to its queue, due at `at`: the delivery itself, or (once
/// acked, when a shared rate limit sent it back) a copy of its bytes.
async fn give_back(app: &App, d: &Delivery, message: &Message, acked: bool, at: Option<chrono::DateTime<Utc>>) {
    let done = if acked {
        app.broker().publish_raw(&d.queue, &d.payload, message.properties.priority, at.unwrap_or_else(Utc::now)).await
    } else {
        app.broker().requeue(d, at).await
    };
    if let Err(e) = done {
        tracing::warn!(task_id = %message.headers.id, error = %e, "could not give a message that did not start back to its queue");
    }
}

/// Runs the call in the process pool, or on this runtime.
async fn run_call(
    ctx: &Ctx,
    task: Arc<dyn crate::task::Task>,
    request: crate::task::Request,
    call: &Call,
    redelivered: bool,
) -> Decision {
    match &ctx.pool {
        Some(pool) => pool.run(&call.message, redelivered, &call.effective, &request).await,
        None => executor::run(task, request, &call.effective).await,
    }
}

async fn task_event(ctx: &Ctx, id: &str, decision: &Decision, runtime: f64) {
    if !ctx.events.task_events_on() {
        return;
    }
    let mut f = serde_json::Map::new();
    let kind = match decision {
        Decision::Success(v) => {
            f.insert("result".into(), crate::protocol::py_repr(v).into());
            f.insert("runtime".into(), runtime.into());
            "task-succeeded"
        }
        Decision::Retry { exc, .. } => {
            f.insert("exception".into(), exc.as_ref().map(|e| e.repr()).unwrap_or_else(|| "Retry()".into()).into());
            f.insert("traceback".into(), "".into());
            "task-retried"
        }
        Decision::Failure { exc, traceback, .. } => {
            f.insert("exception".into(), exc.repr().into());
            f.insert("traceback".into(), traceback.clone().unwrap_or_default().into());
            "task-failed"
        }
        Decision::BadArguments(e) => {
            f.insert("exception".into(), ExceptionInfo::type_error(e.to_string()).repr().into());
            f.insert("traceback".into(), "".into());
            "task-failed"
        }
        Decision::Reject { requeue, .. } => {
            f.insert("requeue".into(), (*requeue).into());
            "task-rejected"
        }
        Decision::Ignore => return,
    };
    ctx.events.task(kind, id, f).await;
}

async fn apply(ctx: &Ctx, d: &Delivery, call: &Call, decision: Decision) {
    let broker = ctx.app.broker();
    let late = call.effective.acks_late;
    match decision {
        Decision::Success(value) => {
            // Callbacks and the next chain step go out first, so they are the result's children.
            crate::canvas::dispatch::on_success(call, &value).await;
            call.succeeded(&value).await;
            crate::canvas::dispatch::after_success(call, &value).await;
            ctx.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            if late {
                settle_ack(&ctx.app, d).await;
            }
        }
        Decision::Retry { eta, exc, changes } => {
            call.retrying(exc.as_ref()).await;
            ctx.stats.retried.fetch_add(1, Ordering::Relaxed);
            match call.retry_message(eta, &changes) {
                Ok((queue, next)) => {
                    if let Err(e) = broker.republish(d, &queue, &next).await {
                        tracing::error!(task_id = %call.request.id, error = %e, "could not publish the retry");
                    }
                }
                Err(e) => {
                    tracing::error!(task_id = %call.request.id, error = %e, "could not build the retry; failing the task");
                    let exc = ExceptionInfo::new("Reject", e.to_string(), crate::protocol::CELERY_EXCEPTIONS);
                    call.failed(&exc, None).await;
                    crate::canvas::dispatch::on_failure(call, &exc, None).await;
                    let info = DeadLetterInfo::new(format!("retry could not be sent: {e}"), "Reject");
                    dead_letter(ctx, d, info.retries(call.request.retries)).await;
                }
            }
        }
        Decision::Failure { exc, traceback, timed_out } => {
            tracing::warn!(task_id = %call.request.id, task = %call.request.task, error = %exc, "task failed");
            call.failed(&exc, traceback.clone()).await;
            crate::canvas::dispatch::on_failure(call, &exc, traceback.as_deref()).await;
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            if late && timed_out && !ctx.app.config().task_acks_on_failure_or_timeout {
                let _ = broker.requeue(d, None).await;
            } else if ctx.app.config().worker_dead_letter_failures {
                let reason = format!("failed after {} retries: {exc}", call.request.retries);
                let info = DeadLetterInfo::new(reason, exc.exc_type.clone());
                dead_letter(ctx, d, info.traceback(traceback).retries(call.request.retries)).await;
            } else if late {
                settle_ack(&ctx.app, d).await;
            }
        }
        Decision::Reject { requeue: true, reason } => {
            tracing::info!(task_id = %call.request.id, %reason, "task rejected: requeued");
            if late {
                let _ = broker.requeue(d, None).await;
            } else {
                let mut copy = (*call.message).clone();
                copy.headers.extra.insert("redelivered".into(), true.into());
                copy.properties.delivery_info.extra.insert("redelivered".into(), true.into());
                let _ = broker.publish(call.message.queue(), &copy).await;
            }
        }
        Decision::Reject { requeue: false, reason } => {
            // Celery 5.7 records a terminal FAILURE (`Reject(reason, False)`), then drops the
            // message; we keep it in the dead-letter queue.
            let exc = ExceptionInfo {
                exc_type: "Reject".into(),
                exc_message: vec![reason.clone().into(), false.into()],
                exc_module: crate::protocol::CELERY_EXCEPTIONS.into(),
            };
            call.failed(&exc, None).await;
            crate::canvas::dispatch::on_failure(call, &exc, None).await;
            let info = DeadLetterInfo::new(format!("rejected by the task: {reason}"), "Reject");
            dead_letter(ctx, d, info.retries(call.request.retries)).await
        }
        Decision::Ignore => {
            if late {
                settle_ack(&ctx.app, d).await;
            }
        }
        Decision::BadArguments(e) => {
            let exc = ExceptionInfo::type_error(e.to_string());
            call.failed(&exc, None).await;
            crate::canvas::dispatch::on_failure(call, &exc, None).await;
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            let info = DeadLetterInfo::new(format!("arguments do not fit: {e}"), "TypeError");
            dead_letter(ctx, d, info.retries(call.request.retries)).await;
        }
    }
}
