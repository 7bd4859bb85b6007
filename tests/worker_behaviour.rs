//! Worker behaviour: retries and back-off, retry durability across restarts, max retries into
//! the dead-letter queue, ETA and expiry, prefetch limits, graceful and immediate shutdown,
//! bad input, eager mode, hooks, routing and rate limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::broker::QueueStats;
use celeriac::{App, ExceptionInfo, FailureReport, Request, State, TaskError, TaskResult, task};
use chrono::Utc;
use common::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

// ---- retries -------------------------------------------------------------------------------

static FLAKY_CALLS: AtomicU32 = AtomicU32::new(0);

#[task(bind = true, autoretry_for = ["Flaky"], retry_backoff = true, retry_backoff_max = 1, max_retries = 5)]
async fn flaky_twice(req: Request) -> TaskResult<u32> {
    FLAKY_CALLS.fetch_add(1, Ordering::SeqCst);
    if req.retries < 2 { Err(TaskError::new("Flaky", "503 from upstream")) } else { Ok(req.retries) }
}

#[tokio::test]
async fn autoretry_with_backoff_then_success() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(flaky_twice).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    let r = flaky_twice::delay(&app).await.unwrap();
    assert_eq!(r.get::<u32>(WAIT).await.unwrap(), 2, "succeeded on the third run, seeing retries = 2");
    assert_eq!(FLAKY_CALLS.load(Ordering::SeqCst), 3);
    shutdown.graceful();
    let s = worker.await.unwrap();
    assert_eq!((s.retried, s.succeeded, s.failed), (2, 1, 0));
}

static DURABLE_CALLS: AtomicU32 = AtomicU32::new(0);

#[task(bind = true, max_retries = 3)]
async fn retry_later(req: Request) -> TaskResult<u32> {
    DURABLE_CALLS.fetch_add(1, Ordering::SeqCst);
    if req.retries == 0 {
        Err(req.retry().countdown(1.5).exc(TaskError::new("NotYet", "try later")).into())
    } else {
        Ok(req.retries)
    }
}

#[tokio::test]
async fn a_retry_survives_a_worker_restart() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(retry_later).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 1);
    let r = retry_later::delay(&app).await.unwrap();
    assert!(eventually(WAIT, || async { r.state().await.unwrap() == State::Retry }).await);
    let meta = r.meta().await.unwrap();
    assert_eq!(meta.exception_info().unwrap().exc_type, "NotYet", "RETRY stores the cause");
    shutdown.graceful();
    worker.await.unwrap();
    // The retry waits in the broker, durably, not in the stopped worker's memory.
    assert_eq!(queue_stats(&app, "celery").await.scheduled, 1);
    drop(app);

    let app = App::builder().broker_url(&url).task(retry_later).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 1);
    assert_eq!(app.async_result(r.id()).get::<u32>(WAIT).await.unwrap(), 1);
    assert_eq!(DURABLE_CALLS.load(Ordering::SeqCst), 2);
    shutdown.graceful();
    worker.await.unwrap();
}

static HOOK_FAILURES: AtomicU32 = AtomicU32::new(0);
static REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn count_failure(_req: &Request, exc: &ExceptionInfo) {
    assert_eq!(exc.exc_type, "MaxRetriesExceededError");
    HOOK_FAILURES.fetch_add(1, Ordering::SeqCst);
}

#[task(autoretry_for = ["Flaky"], retry_backoff = true, retry_backoff_max = 0, max_retries = 2, on_failure = count_failure)]
async fn always_flaky() -> TaskResult<()> {
    Err(TaskError::new("Flaky", "still down"))
}

#[tokio::test]
async fn max_retries_exceeded_fails_reports_and_dead_letters() {
    let (_dir, url) = sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .task(always_flaky)
        .error_reporter(|f: &FailureReport| {
            REPORTED.lock().unwrap().push(format!("{}:{}:{}", f.task_name, f.retries, f.exc.exc_type))
        })
        .build()
        .await
        .unwrap();
    let (shutdown, worker) = start_worker(&app, 1);
    let r = always_flaky::delay(&app).await.unwrap();
    let err = r.get::<()>(WAIT).await.unwrap_err();
    let celeriac::Error::TaskFailed { exc, .. } = err else { panic!("{err}") };
    assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("MaxRetriesExceededError", "celery.exceptions"));
    assert!(exc.message().contains("Flaky: still down"), "carries the last error: {}", exc.message());
    assert!(eventually(WAIT, || async { app.broker().dead_letters(10).await.unwrap().len() == 1 }).await);
    shutdown.graceful();
    let s = worker.await.unwrap();
    assert_eq!((s.retried, s.failed, s.dead_lettered), (2, 1, 1));
    assert_eq!(HOOK_FAILURES.load(Ordering::SeqCst), 1);
    let reported = REPORTED.lock().unwrap().clone();
    assert_eq!(reported, vec![format!("{}:2:MaxRetriesExceededError", always_flaky::name())]);
    let dead = &app.broker().dead_letters(10).await.unwrap()[0];
    assert_eq!(dead.task_id.as_deref(), Some(r.id()));
    assert!(dead.reason.contains("failed after 2 retries"), "{}", dead.reason);
    // Replay puts it back as a new task with a fresh budget; the dead letter records it.
    let replayed = celeriac::broker::replay_dead_letter(app.broker().as_ref(), &dead.id).await.unwrap();
    assert_ne!(replayed, r.id());
    let marked = &app.broker().dead_letters(10).await.unwrap()[0];
    assert_eq!(marked.replayed_as.as_deref(), Some(replayed.as_str()));
    assert_eq!(queue_stats(&app, "celery").await.ready, 1);
}

// ---- ETA and expiry ------------------------------------------------------------------------

static ETA_RUNS: AtomicU32 = AtomicU32::new(0);

#[task]
async fn stamp() -> TaskResult<i64> {
    ETA_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(Utc::now().timestamp_millis())
}

#[tokio::test]
async fn countdown_waits_in_the_broker_and_expired_tasks_are_revoked() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(stamp).build().await.unwrap();
    let expired = stamp::s().expires_in(0.05).delay(&app).await.unwrap();
    let sent = Utc::now().timestamp_millis();
    let delayed = stamp::s().countdown(1.0).delay(&app).await.unwrap();
    assert_eq!(queue_stats(&app, "celery").await.scheduled, 1, "the ETA task waits in the broker");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (shutdown, worker) = start_worker(&app, 2);
    let ran_at = delayed.get::<i64>(WAIT).await.unwrap();
    assert!(ran_at - sent >= 950, "ran {} ms after sending, before its countdown", ran_at - sent);
    let meta = expired.wait_meta(WAIT).await.unwrap();
    assert_eq!(meta.status, State::Revoked);
    assert_eq!(meta.exception_info().unwrap().exc_type, "TaskRevokedError");
    assert_eq!(ETA_RUNS.load(Ordering::SeqCst), 1, "the expired task never ran");
    shutdown.graceful();
    assert_eq!(worker.await.unwrap().revoked, 1);
}

// ---- prefetch ------------------------------------------------------------------------------

#[task(name = "t.slow")]
async fn slow(ms: u64) -> TaskResult<()> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(())
}

#[task(name = "t.slow_late", acks_late = true)]
async fn slow_late(ms: u64) -> TaskResult<()> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(())
}

/// Enqueues 10 slow tasks, runs one slot, and returns the most messages the broker ever showed
/// leased (held by the worker but not acknowledged) while the first task ran.
async fn max_leased(multiplier: usize, disable: bool, late: bool) -> u64 {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(slow).task(slow_late).build().await.unwrap();
    for _ in 0..10 {
        if late {
            slow_late::delay(&app, 400).await.unwrap()
        } else {
            slow::delay(&app, 400).await.unwrap()
        };
    }
    let mut o = fast_options(&app, 1);
    o.prefetch_multiplier = multiplier;
    o.disable_prefetch = disable;
    let (shutdown, worker) = celeriac::Worker::new(&app).options(o).spawn();
    let mut most = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(700) {
        most = most.max(queue_stats(&app, "celery").await.leased);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.immediate();
    worker.await.unwrap();
    most
}

#[tokio::test]
async fn prefetch_limits_follow_celery() {
    // Acks early: the running task is acked; the multiplier bounds what waits reserved.
    assert_eq!(max_leased(2, false, false).await, 2);
    assert_eq!(max_leased(1, false, false).await, 1);
    // No prefetch: nothing is reserved beyond what runs (a message is seen leased only in the
    // instant between its fetch and its start), where multiplier 4 would reserve 4.
    assert!(max_leased(4, true, false).await <= 1);
    // Unlimited: everything is taken.
    assert_eq!(max_leased(0, false, false).await, 9);
    // Acks late: the running task counts against the limit.
    assert_eq!(max_leased(1, false, true).await, 1);
}

// ---- shutdown ------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_finishes_running_and_returns_the_rest() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(slow).build().await.unwrap();
    let first = slow::delay(&app, 500).await.unwrap();
    for _ in 0..3 {
        slow::delay(&app, 500).await.unwrap();
    }
    let (shutdown, worker) = start_worker(&app, 1);
    assert!(eventually(WAIT, || async { queue_stats(&app, "celery").await.leased == 3 }).await, "3 prefetched");
    shutdown.graceful();
    let s = worker.await.unwrap();
    assert_eq!(s.succeeded, 1, "the running task finished");
    assert_eq!(first.state().await.unwrap(), State::Success);
    let q = queue_stats(&app, "celery").await;
    assert_eq!((q.ready, q.leased), (3, 0), "prefetched tasks went back to the queue at once");
}

#[tokio::test]
async fn immediate_shutdown_returns_acks_late_work() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(slow_late).build().await.unwrap();
    let r = slow_late::delay(&app, 60_000).await.unwrap();
    let (shutdown, worker) = start_worker(&app, 1);
    assert!(eventually(WAIT, || async { queue_stats(&app, "celery").await.leased == 1 }).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.immediate();
    worker.await.unwrap();
    assert_eq!(queue_stats(&app, "celery").await.ready, 1, "the acks_late task is back in the queue");
    assert_eq!(r.state().await.unwrap(), State::Pending);
}

static ABANDONED_DROPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets [`ABANDONED_DROPPED`] when the task's future is dropped.
struct DroppedFlag;

impl Drop for DroppedFlag {
    fn drop(&mut self) {
        ABANDONED_DROPPED.store(true, Ordering::SeqCst);
    }
}

#[task(name = "t.endless", acks_late = true)]
async fn endless() -> TaskResult<()> {
    let _flag = DroppedFlag;
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::test]
async fn immediate_shutdown_stops_the_running_task_itself() {
    let app = memory_app(App::builder().task(endless)).await;
    endless::delay(&app).await.unwrap();
    let worker = celeriac::Worker::new(&app).options(fast_options(&app, 1));
    let stats = worker.stats();
    let (shutdown, handle) = worker.spawn();
    assert!(eventually(WAIT, || async { stats.active.load(Ordering::SeqCst) == 1 }).await, "the task started");
    shutdown.immediate();
    handle.await.unwrap();
    // Its message went back to the queue, so the task must not go on running here as well
    // (another worker may already be running it again).
    assert_eq!(queue_stats(&app, "celery").await.ready, 1);
    assert!(
        eventually(WAIT, || async { ABANDONED_DROPPED.load(Ordering::SeqCst) }).await,
        "the stopped task's future is dropped, not left running in the background"
    );
}

// ---- bad input -----------------------------------------------------------------------------

#[task(name = "t.typed")]
async fn typed(count: u32) -> TaskResult<u32> {
    Ok(count)
}

#[task(name = "t.refuse")]
async fn refuse() -> TaskResult<()> {
    Err(TaskError::reject(false, "poison pill"))
}

#[tokio::test]
async fn every_kind_of_bad_message_is_dead_lettered_with_its_reason() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(typed).task(refuse).build().await.unwrap();
    let b = app.broker();
    let now = Utc::now();
    let raw = |s: &str| s.as_bytes().to_vec();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw("this is not json"), "undecodable envelope"),
        (
            raw(
                r#"{"body": "@@notbase64", "content-type": "application/json", "headers": {"task": "t.typed", "id": "b1"}, "properties": {"body_encoding": "base64"}}"#,
            ),
            "base64",
        ),
        (
            raw(
                r#"{"body": "gAN9cQAu", "content-type": "application/x-python-serialize", "headers": {"task": "t.typed", "id": "b2"}, "properties": {"body_encoding": "base64"}}"#,
            ),
            "content type",
        ),
        (
            raw(
                r#"{"body": "e30=", "content-type": "application/json", "headers": {}, "properties": {"body_encoding": "base64"}}"#,
            ),
            "not a task message",
        ),
        (
            raw(
                r#"{"body": "eyJhIjogMX0=", "content-type": "application/json", "headers": {"task": "t.typed", "id": "b3"}, "properties": {"body_encoding": "base64"}}"#,
            ),
            "undecodable body",
        ),
    ];
    for (payload, _) in &cases {
        b.publish_raw("celery", payload, 0, now).await.unwrap();
    }
    let unknown = app.send_task("t.tyepd", vec![1.into()], Default::default()).await.unwrap();
    let wrong_type = app.send_task("t.typed", vec!["many".into()], Default::default()).await.unwrap();
    let too_many = app.send_task("t.typed", vec![1.into(), 2.into()], Default::default()).await.unwrap();
    refuse::delay(&app).await.unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    assert!(eventually(WAIT, || async { b.dead_letters(100).await.unwrap().len() == cases.len() + 4 }).await);
    shutdown.graceful();
    worker.await.unwrap();
    let dead = b.dead_letters(100).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    for (payload, reason) in &cases {
        let d = dead.iter().find(|d| d.payload == *payload).expect("original bytes kept");
        assert!(d.reason.contains(reason), "{:?} should mention {reason:?}", d.reason);
    }
    assert!(
        reasons.iter().any(|r| r.contains("unknown task \"t.tyepd\"") && r.contains("did you mean \"t.typed\"")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("t.typed: argument `count`")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("takes 1 positional argument(s) but 2 were given")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("poison pill")), "{reasons:?}");
    // Clients waiting on these ids get an answer instead of hanging.
    let err = unknown.get::<u32>(WAIT).await.unwrap_err().to_string();
    assert!(err.contains("NotRegistered"), "{err}");
    let err = wrong_type.get::<u32>(WAIT).await.unwrap_err().to_string();
    assert!(err.contains("TypeError"), "{err}");
    assert!(too_many.get::<u32>(WAIT).await.is_err());
    assert_eq!(
        queue_stats(&app, "celery").await,
        QueueStats { queue: String::new(), ..Default::default() },
        "nothing left behind"
    );
}

// ---- eager mode ----------------------------------------------------------------------------

static EAGER_CALLS: AtomicU32 = AtomicU32::new(0);

#[task(bind = true, autoretry_for = ["Flaky"], max_retries = 3)]
async fn eager_flaky(req: Request, x: i64) -> TaskResult<i64> {
    EAGER_CALLS.fetch_add(1, Ordering::SeqCst);
    if req.retries < 2 { Err(TaskError::new("Flaky", "again")) } else { Ok(x * 2) }
}

#[task]
async fn eager_fail() -> TaskResult<()> {
    Err(TaskError::value_error("nope"))
}

#[tokio::test]
async fn eager_mode_runs_inline_with_retries() {
    let app = App::builder()
        .broker_url("memory://")
        .set("task_always_eager", true)
        .task(eager_flaky)
        .task(eager_fail)
        .build()
        .await
        .unwrap();
    let r = eager_flaky::delay(&app, 21).await.unwrap();
    assert_eq!(r.state().await.unwrap(), State::Success, "done before delay() returned");
    assert_eq!(r.get::<i64>(Duration::from_millis(10)).await.unwrap(), 42);
    assert_eq!(EAGER_CALLS.load(Ordering::SeqCst), 3);
    assert!(app.broker().stats().await.unwrap().is_empty(), "nothing was queued");
    let failed = eager_fail::delay(&app).await.unwrap();
    assert_eq!(failed.state().await.unwrap(), State::Failure);

    let strict = App::builder()
        .broker_url("memory://")
        .set("task_always_eager", true)
        .set("task_eager_propagates", true)
        .task(eager_fail)
        .build()
        .await
        .unwrap();
    assert!(matches!(eager_fail::delay(&strict).await, Err(celeriac::Error::TaskFailed { .. })));
}

// ---- hooks, routing, rate limits -----------------------------------------------------------

static SUCCESSES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn on_ok(req: &Request, result: &serde_json::Value) {
    SUCCESSES.lock().unwrap().push(format!("{}={result}", req.task));
}

fn after(req: &Request, state: &State, _result: &serde_json::Value) {
    SUCCESSES.lock().unwrap().push(format!("after:{}:{state}", req.task));
}

#[task(name = "billing.charge", on_success = on_ok, after_return = after)]
async fn charge(cents: u64) -> TaskResult<u64> {
    Ok(cents)
}

#[tokio::test]
async fn routes_send_to_the_configured_queue_and_hooks_run() {
    let (_dir, url) = sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .set("task_routes", toml::Value::Table(toml::toml! { "billing.*" = "billing" }))
        .task(charge)
        .build()
        .await
        .unwrap();
    let r = charge::delay(&app, 250).await.unwrap();
    assert_eq!(queue_stats(&app, "billing").await.ready, 1);
    let mut o = fast_options(&app, 1);
    o.queues = vec!["billing".into()];
    let (shutdown, worker) = celeriac::Worker::new(&app).options(o).spawn();
    assert_eq!(r.get::<u64>(WAIT).await.unwrap(), 250);
    shutdown.graceful();
    worker.await.unwrap();
    assert_eq!(
        SUCCESSES.lock().unwrap().clone(),
        vec!["billing.charge=250".to_owned(), "after:billing.charge:SUCCESS".to_owned()]
    );
}

static STARTS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[task(rate_limit = "4/s")]
async fn limited() -> TaskResult<()> {
    STARTS.lock().unwrap().push(Instant::now());
    Ok(())
}

#[tokio::test]
async fn rate_limit_spaces_starts() {
    let app = memory_app(App::builder().task(limited)).await;
    let mut results = Vec::new();
    for _ in 0..4 {
        results.push(limited::delay(&app).await.unwrap());
    }
    let (shutdown, worker) = start_worker(&app, 4);
    for r in &results {
        r.get::<()>(WAIT).await.unwrap();
    }
    shutdown.graceful();
    worker.await.unwrap();
    let starts = STARTS.lock().unwrap().clone();
    let span = *starts.iter().max().unwrap() - *starts.iter().min().unwrap();
    assert!(span >= Duration::from_millis(700), "4 starts at 4/s span at least 0.75 s, got {span:?}");
}

#[test]
fn bad_rate_limit_is_a_build_error() {
    #[task(rate_limit = "fast")]
    async fn too_fast() -> TaskResult<()> {
        Ok(())
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(App::builder().broker_url("memory://").task(too_fast).build()).unwrap_err().to_string();
    assert!(err.contains("rate_limit") && err.contains("\"fast\""), "{err}");
}

// ---- time limits and leases ----------------------------------------------------------------

#[task(time_limit = 0.2)]
async fn stuck() -> TaskResult<()> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

#[task(bind = true, soft_time_limit = 0.1, time_limit = 5)]
async fn polite(req: Request) -> TaskResult<&'static str> {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(30)) => Ok("finished"),
        _ = req.soft_time_limit_reached() => Err(TaskError::soft_time_limit_exceeded(0.1)),
    }
}

#[tokio::test]
async fn time_limits_stop_tasks() {
    let app = memory_app(App::builder().task(stuck).task(polite)).await;
    let (shutdown, worker) = start_worker(&app, 2);
    let t = Instant::now();
    let hard = stuck::delay(&app).await.unwrap().get::<()>(WAIT).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "stopped at the hard limit");
    let celeriac::Error::TaskFailed { exc, .. } = hard else { panic!("{hard}") };
    assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("TimeLimitExceeded", "billiard.exceptions"));
    let soft = polite::delay(&app).await.unwrap().get::<String>(WAIT).await.unwrap_err();
    let celeriac::Error::TaskFailed { exc, .. } = soft else { panic!("{soft}") };
    assert_eq!(exc.exc_type, "SoftTimeLimitExceeded");
    shutdown.graceful();
    worker.await.unwrap();
}

static LONG_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(acks_late = true)]
async fn longer_than_the_lease() -> TaskResult<()> {
    LONG_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    Ok(())
}

#[tokio::test]
async fn leases_are_renewed_while_a_task_runs() {
    let (_dir, url) = sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .set("broker_transport_options", toml::Value::Table(toml::toml! { visibility_timeout = 0.5 }))
        .task(longer_than_the_lease)
        .build()
        .await
        .unwrap();
    let r = longer_than_the_lease::delay(&app).await.unwrap();
    // Two workers compete; the task runs five times longer than the lease.
    let (s1, w1) = start_worker(&app, 1);
    let (s2, w2) = start_worker(&app, 1);
    r.get::<()>(WAIT).await.unwrap();
    s1.graceful();
    s2.graceful();
    w1.await.unwrap();
    w2.await.unwrap();
    assert_eq!(LONG_RUNS.load(Ordering::SeqCst), 1, "renewed leases kept the other worker off it");
}
