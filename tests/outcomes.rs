//! Typed outcomes and hooks at run time, on a SQLite file with a real worker:
//! `TaskError::Reject { requeue: true }` runs again and is not lost, `TaskError::Ignore` stores
//! nothing and is acknowledged, and `on_retry` / `on_success` / `on_failure` / `after_return`
//! get the request and the outcome.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::{App, ExceptionInfo, Request, State, TaskError, TaskResult, Worker, task};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Runs a worker on `app` until it has finished `runs` runs; returns its summary.
async fn run_until_processed(app: &App, runs: u64) -> celeriac::WorkerSummary {
    let worker = Worker::new(app).options(common::fast_options(app, 2));
    let stats = worker.stats();
    let (shutdown, handle) = worker.spawn();
    let done = common::eventually(WAIT, || async { stats.snapshot().processed >= runs }).await;
    shutdown.graceful();
    let summary = handle.await.unwrap();
    assert!(done, "{runs} runs expected, got {summary:?}");
    summary
}

/// Nothing left in any queue, leased or scheduled, and no dead letters.
async fn broker_is_empty(app: &App) {
    for q in app.broker().stats().await.unwrap() {
        assert_eq!((q.ready, q.leased, q.scheduled), (0, 0, 0), "queue {} still holds messages", q.queue);
    }
    assert!(app.broker().dead_letters(10).await.unwrap().is_empty(), "nothing was dead-lettered");
}

// ---- Reject { requeue: true } -----------------------------------------------------------------

static REJECTED_EARLY: AtomicU32 = AtomicU32::new(0);
static REJECTED_LATE: AtomicU32 = AtomicU32::new(0);

/// Refuses its first delivery and asks for it to be queued again; returns the run number and
/// whether the broker saw it delivered before.
async fn refuse_first(counter: &AtomicU32, req: &Request) -> TaskResult<(u32, bool)> {
    let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
    if run == 1 {
        return Err(TaskError::reject(true, "not ready for it yet"));
    }
    Ok((run, req.redelivered))
}

#[task(name = "o.reject_early", bind = true)]
async fn reject_early(req: Request) -> TaskResult<(u32, bool)> {
    refuse_first(&REJECTED_EARLY, &req).await
}

#[task(name = "o.reject_late", bind = true, acks_late = true)]
async fn reject_late(req: Request) -> TaskResult<(u32, bool)> {
    refuse_first(&REJECTED_LATE, &req).await
}

#[tokio::test]
async fn rejected_with_requeue_runs_again_and_is_not_lost() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder().broker_url(&url).task(reject_early).task(reject_late).build().await.unwrap();
    let early = reject_early::delay(&app).await.unwrap();
    let late = reject_late::delay(&app).await.unwrap();
    let summary = run_until_processed(&app, 4).await;

    // Acked before it ran: the worker publishes the message again.
    assert_eq!(early.get::<(u32, bool)>(WAIT).await.unwrap().0, 2, "ran a second time");
    // acks_late: the same delivery goes back, so the broker counts a redelivery.
    assert_eq!(late.get::<(u32, bool)>(WAIT).await.unwrap(), (2, true), "the same message came back");
    assert_eq!((summary.processed, summary.succeeded, summary.failed), (4, 2, 0));
    assert_eq!(REJECTED_EARLY.load(Ordering::SeqCst), 2, "exactly one more run");
    assert_eq!(REJECTED_LATE.load(Ordering::SeqCst), 2, "exactly one more run");
    broker_is_empty(&app).await;
}

// ---- Ignore --------------------------------------------------------------------------------

static IGNORED_RUNS: AtomicU32 = AtomicU32::new(0);
static IGNORED_HOOKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn ignored_hook(req: &Request, state: &State, _result: &Value) {
    IGNORED_HOOKS.lock().unwrap().push(format!("{} {state}", req.task));
}

#[task(name = "o.ignore_early", after_return = ignored_hook)]
async fn ignore_early() -> TaskResult<()> {
    IGNORED_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::Ignore)
}

#[task(name = "o.ignore_late", acks_late = true, after_return = ignored_hook)]
async fn ignore_late() -> TaskResult<()> {
    IGNORED_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::Ignore)
}

#[tokio::test]
async fn ignore_stores_no_state_and_is_acknowledged() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        // A short lease: an acks_late message left unacknowledged would come back quickly.
        .set("broker_transport_options", toml::Value::Table(toml::toml! { visibility_timeout = 0.5 }))
        .task(ignore_early)
        .task(ignore_late)
        .build()
        .await
        .unwrap();
    let early = ignore_early::delay(&app).await.unwrap();
    let late = ignore_late::delay(&app).await.unwrap();
    let summary = run_until_processed(&app, 2).await;

    for r in [&early, &late] {
        assert_eq!(app.backend().get(r.id()).await.unwrap(), None, "no record at all for {}", r.id());
        assert_eq!(r.state().await.unwrap(), State::Pending);
    }
    assert_eq!((summary.succeeded, summary.failed, summary.retried, summary.dead_lettered), (0, 0, 0, 0));
    // Both messages are gone from the broker: acknowledged, not left to be redelivered.
    broker_is_empty(&app).await;
    assert_eq!(IGNORED_RUNS.load(Ordering::SeqCst), 2);
    // As Celery: `after_return` is not called for an ignored run (IGNORED is in IGNORE_STATES).
    assert_eq!(IGNORED_HOOKS.lock().unwrap().clone(), Vec::<String>::new());
}

// ---- hooks ---------------------------------------------------------------------------------

static HOOKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn request_line(req: &Request) -> String {
    format!("{} {} retries={} args={} kwargs={}", req.task, req.id, req.retries, json!(req.args), json!(req.kwargs))
}

fn on_success(req: &Request, result: &Value) {
    HOOKS.lock().unwrap().push(format!("on_success {} -> {result}", request_line(req)));
}

fn on_retry(req: &Request, exc: &ExceptionInfo) {
    HOOKS.lock().unwrap().push(format!(
        "on_retry {} exc={}.{}({})",
        request_line(req),
        exc.exc_module,
        exc.exc_type,
        exc.message()
    ));
}

fn on_failure(req: &Request, exc: &ExceptionInfo) {
    HOOKS.lock().unwrap().push(format!(
        "on_failure {} exc={}.{}({})",
        request_line(req),
        exc.exc_module,
        exc.exc_type,
        exc.message()
    ));
}

fn after_return(req: &Request, state: &State, result: &Value) {
    HOOKS.lock().unwrap().push(format!("after_return {} state={state} -> {result}", request_line(req)));
}

/// Fails once with an error `autoretry_for` names, then succeeds.
#[task(
    name = "o.flaky",
    bind = true,
    autoretry_for = ["Flaky"],
    default_retry_delay = 0,
    on_success = on_success,
    on_retry = on_retry,
    on_failure = on_failure,
    after_return = after_return
)]
async fn flaky(req: Request, x: i64, label: String) -> TaskResult<i64> {
    if req.retries == 0 {
        return Err(TaskError::new("Flaky", format!("503 for {label}")));
    }
    Ok(x * 2)
}

/// Asks for a retry without an error, then fails for good.
#[task(
    name = "o.doomed",
    bind = true,
    on_success = on_success,
    on_retry = on_retry,
    on_failure = on_failure,
    after_return = after_return
)]
async fn doomed(req: Request, x: i64) -> TaskResult<i64> {
    if req.retries == 0 {
        return Err(req.retry().countdown(0.0).into());
    }
    Err(TaskError::value_error(format!("{x} is not acceptable")))
}

#[tokio::test]
async fn hooks_get_the_request_and_the_outcome() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder().broker_url(&url).task(flaky).task(doomed).build().await.unwrap();
    // `label` as a keyword argument: hooks see the arguments as the message carries them.
    let kwargs = json!({"label": "eu-west"}).as_object().cloned().unwrap();
    let ok = app.send_task(flaky::name(), vec![json!(21)], kwargs).await.unwrap();
    let bad = doomed::delay(&app, 7).await.unwrap();
    let summary = run_until_processed(&app, 4).await;
    assert_eq!((summary.retried, summary.succeeded, summary.failed), (2, 1, 1));
    assert_eq!(ok.get::<i64>(WAIT).await.unwrap(), 42);
    assert!(bad.get::<i64>(WAIT).await.is_err());

    // `after_return` runs for RETRY too, as `Task::after_return` documents (Celery skips it
    // for RETRY, IGNORED and REJECTED).
    let hooks = HOOKS.lock().unwrap().clone();
    let of = |id: &str| hooks.iter().filter(|l| l.contains(id)).cloned().collect::<Vec<_>>();
    let (ok_id, bad_id) = (ok.id(), bad.id());
    assert_eq!(
        of(ok_id),
        vec![
            format!(
                "on_retry o.flaky {ok_id} retries=0 args=[21] kwargs={{\"label\":\"eu-west\"}} exc=rust.Flaky(503 for eu-west)"
            ),
            format!(
                "after_return o.flaky {ok_id} retries=0 args=[21] kwargs={{\"label\":\"eu-west\"}} state=RETRY -> null"
            ),
            format!("on_success o.flaky {ok_id} retries=1 args=[21] kwargs={{\"label\":\"eu-west\"}} -> 42"),
            format!(
                "after_return o.flaky {ok_id} retries=1 args=[21] kwargs={{\"label\":\"eu-west\"}} state=SUCCESS -> 42"
            ),
        ]
    );
    let failure = json!({"exc_type": "ValueError", "exc_message": ["7 is not acceptable"], "exc_module": "builtins"});
    assert_eq!(
        of(bad_id),
        vec![
            format!(
                "on_retry o.doomed {bad_id} retries=0 args=[7] kwargs={{}} exc=celery.exceptions.Retry(retry requested)"
            ),
            format!("after_return o.doomed {bad_id} retries=0 args=[7] kwargs={{}} state=RETRY -> null"),
            format!(
                "on_failure o.doomed {bad_id} retries=1 args=[7] kwargs={{}} exc=builtins.ValueError(7 is not acceptable)"
            ),
            format!("after_return o.doomed {bad_id} retries=1 args=[7] kwargs={{}} state=FAILURE -> {failure}"),
        ]
    );
}
