//! `#[task]` options and `apply_async` options at run time, on a SQLite file with a real
//! worker: the task's `queue` (used when the call names none), `priority` (lower numbers are
//! served first), `ignore_result` (nothing stored on success, FAILURE still stored), and the
//! `eta`, `queue`, `priority`, `task_id` and `headers` a Rust client sends, as the worker sees
//! them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::protocol::Message;
use celeriac::{App, Request, State, TaskError, TaskResult, Worker, WorkerOptions, task};
use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Mutex;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// What a bound task saw of its own call.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Seen {
    id: String,
    queue: String,
    priority: u8,
    eta: Option<DateTime<Utc>>,
    ran_at: DateTime<Utc>,
}

fn seen(req: &Request) -> Seen {
    Seen {
        id: req.id.clone(),
        queue: req.delivery_info.routing_key.clone(),
        priority: req.priority,
        eta: req.eta,
        ran_at: Utc::now(),
    }
}

/// A task with its own queue.
#[task(name = "opt.report", bind = true, queue = "reports")]
async fn report(req: Request) -> TaskResult<Seen> {
    Ok(seen(&req))
}

/// A task with no routing options.
#[task(name = "opt.plain", bind = true)]
async fn plain(req: Request) -> TaskResult<Seen> {
    Ok(seen(&req))
}

/// Runs a worker on `queues` until it has finished `runs` runs.
async fn run_until_processed(app: &App, queues: &[&str], concurrency: usize, prefetch: usize, runs: u64) {
    let mut o: WorkerOptions = common::fast_options(app, concurrency);
    o.queues = queues.iter().map(|q| (*q).to_owned()).collect();
    o.prefetch_multiplier = prefetch;
    let worker = Worker::new(app).options(o);
    let stats = worker.stats();
    let (shutdown, handle) = worker.spawn();
    let done = common::eventually(WAIT, || async { stats.snapshot().processed >= runs }).await;
    shutdown.graceful();
    let summary = handle.await.unwrap();
    assert!(done, "{runs} runs expected, got {summary:?}");
}

#[tokio::test]
async fn the_task_queue_is_used_when_the_call_names_none() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .set("task_default_queue", "fallback")
        .task(report)
        .task(plain)
        .build()
        .await
        .unwrap();
    let own_queue = report::delay(&app).await.unwrap();
    let explicit = report::s().queue("adhoc").delay(&app).await.unwrap();
    let default_queue = plain::delay(&app).await.unwrap();
    let plain_explicit = plain::s().queue("adhoc").delay(&app).await.unwrap();
    let counts = |q: &'static str| {
        let app = app.clone();
        async move { common::queue_stats(&app, q).await.ready }
    };
    assert_eq!((counts("reports").await, counts("adhoc").await, counts("fallback").await), (1, 2, 1));

    run_until_processed(&app, &["reports", "adhoc", "fallback"], 2, 4, 4).await;
    let queue_of = |r: celeriac::AsyncResult| async move { r.get::<Seen>(WAIT).await.unwrap().queue };
    assert_eq!(queue_of(own_queue).await, "reports", "the task's own queue, not task_default_queue");
    assert_eq!(queue_of(explicit).await, "adhoc", "an explicit queue wins over the task's");
    assert_eq!(queue_of(default_queue).await, "fallback", "no queue anywhere: task_default_queue");
    assert_eq!(queue_of(plain_explicit).await, "adhoc");
}

static ORDER: Mutex<Vec<(String, u8)>> = Mutex::new(Vec::new());

/// Records the order calls ran in, with the priority the worker saw.
#[task(name = "opt.ranked", bind = true, priority = 7)]
async fn ranked(req: Request, label: String) -> TaskResult<()> {
    ORDER.lock().unwrap().push((label, req.priority));
    Ok(())
}

/// The same without a priority of its own.
#[task(name = "opt.unranked", bind = true)]
async fn unranked(req: Request, label: String) -> TaskResult<()> {
    ORDER.lock().unwrap().push((label, req.priority));
    Ok(())
}

#[tokio::test]
async fn lower_priority_numbers_are_served_first_on_sqlite() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .set("task_default_priority", 1)
        .task(ranked)
        .task(unranked)
        .build()
        .await
        .unwrap();
    for (label, priority) in [("p5", 5), ("p0-first", 0), ("p9", 9), ("p3", 3), ("p0-second", 0)] {
        ranked::s(label.into()).priority(priority).delay(&app).await.unwrap();
    }
    ranked::delay(&app, "task-priority".into()).await.unwrap();
    unranked::delay(&app, "config-priority".into()).await.unwrap();
    // One slot, one message prefetched at a time: every fetch picks the best of what waits.
    run_until_processed(&app, &["celery"], 1, 1, 7).await;
    let order = ORDER.lock().unwrap().clone();
    let expected = [
        ("p0-first", 0),
        ("p0-second", 0),
        ("config-priority", 1),
        ("p3", 3),
        ("p5", 5),
        ("task-priority", 7),
        ("p9", 9),
    ]
    .map(|(l, p)| (l.to_owned(), p));
    assert_eq!(order, expected, "0 first, ties in sending order");
}

/// Stores nothing on success.
#[task(name = "opt.quiet", ignore_result = true)]
async fn quiet() -> TaskResult<u32> {
    Ok(5)
}

/// Ignores its result, and fails.
#[task(name = "opt.quiet_fail", ignore_result = true)]
async fn quiet_fail() -> TaskResult<u32> {
    Err(TaskError::value_error("no such order"))
}

/// Stores its result unless the call says otherwise.
#[task(name = "opt.loud")]
async fn loud() -> TaskResult<u32> {
    Ok(1)
}

#[tokio::test]
async fn ignore_result_stores_nothing_on_success_but_still_stores_failure() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder().broker_url(&url).task(quiet).task(quiet_fail).task(loud).build().await.unwrap();
    let ok = quiet::delay(&app).await.unwrap();
    let failed = quiet_fail::delay(&app).await.unwrap();
    let per_call = loud::s().set("ignore_result", true).delay(&app).await.unwrap();
    let stored = loud::delay(&app).await.unwrap();
    run_until_processed(&app, &["celery"], 2, 4, 4).await;

    assert_eq!(stored.get::<u32>(WAIT).await.unwrap(), 1, "results are stored otherwise");
    for r in [&ok, &per_call] {
        assert_eq!(app.backend().get(r.id()).await.unwrap(), None, "nothing stored for {}", r.id());
        assert_eq!(r.state().await.unwrap(), State::Pending);
    }
    // A client waiting on a failed task still learns why (Celery would need
    // store_errors_even_if_ignored for this).
    let meta = failed.meta().await.unwrap();
    assert_eq!(meta.status, State::Failure);
    assert_eq!(meta.exception_info().unwrap().exc_type, "ValueError");
}

#[tokio::test]
async fn eta_queue_priority_and_task_id_reach_the_worker() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder().broker_url(&url).task(plain).build().await.unwrap();
    let eta = Utc::now() + chrono::Duration::milliseconds(1200);
    // Messages carry microseconds.
    let eta = eta.with_nanosecond(eta.nanosecond() / 1000 * 1000).unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let r = plain::s().eta(eta).queue("side").priority(4).with_task_id(&id).delay(&app).await.unwrap();
    assert_eq!(r.id(), id);
    assert_eq!(common::queue_stats(&app, "side").await.scheduled, 1, "waits in the broker until its ETA");

    run_until_processed(&app, &["side"], 1, 4, 1).await;
    let got = r.get::<Seen>(WAIT).await.unwrap();
    assert_eq!((got.id.as_str(), got.queue.as_str(), got.priority, got.eta), (id.as_str(), "side", 4, Some(eta)));
    // The worker runs a message whose ETA is less than 5 ms away rather than requeue it.
    let earliest = eta - chrono::Duration::milliseconds(5);
    assert!(got.ran_at >= earliest, "ran at {} before its ETA {eta}", got.ran_at);
}

/// Refuses every call, so the message the worker received is kept as a dead letter.
#[task(name = "opt.refuse")]
async fn refuse() -> TaskResult<()> {
    Err(TaskError::reject(false, "kept for inspection"))
}

#[tokio::test]
async fn headers_reach_the_message_the_worker_receives() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder().broker_url(&url).task(refuse).build().await.unwrap();
    let headers = json!({"x-tenant": "acme", "x-attempt": 3}).as_object().cloned().unwrap();
    let r = refuse::s().headers(headers).delay(&app).await.unwrap();
    run_until_processed(&app, &["celery"], 1, 4, 1).await;

    // `Request` has no headers, so look at the bytes the worker was delivered and dead-lettered.
    let dead = app.broker().dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].task_id.as_deref(), Some(r.id()));
    assert!(dead[0].reason.contains("kept for inspection"), "{}", dead[0].reason);
    let delivered = Message::from_wire(&dead[0].payload).unwrap();
    assert_eq!(delivered.headers.extra.get("x-tenant"), Some(&json!("acme")));
    assert_eq!(delivered.headers.extra.get("x-attempt"), Some(&json!(3)));
    assert_eq!(delivered.headers.id, r.id(), "custom headers sit beside the protocol's own");
}
