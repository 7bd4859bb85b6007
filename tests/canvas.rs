//! Workflows: chain, group, chord, link/link_error, nested canvases, failure paths, chord
//! counting under concurrency, saga rollback and workflow trees. On SQLite with real workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::canvas::{chain, chord, group};
use celeriac::{App, FailureReport, Request, State, TaskError, TaskResult, task};
use common::*;
use serde_json::Value;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[task(name = "c.add")]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

#[task(name = "c.mul")]
async fn mul(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x * y)
}

#[task(name = "c.tsum")]
async fn tsum(nums: Vec<i64>) -> TaskResult<i64> {
    Ok(nums.iter().sum())
}

#[task(name = "c.fail", max_retries = 0)]
async fn fail(_x: Option<Value>) -> TaskResult<i64> {
    Err(TaskError::python("builtins", "ValueError", "deliberate"))
}

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn events_for(prefix: &str) -> Vec<String> {
    EVENTS.lock().unwrap().iter().filter(|e| e.starts_with(prefix)).cloned().collect()
}

#[task(name = "c.record")]
async fn record(value: Value, tag: String) -> TaskResult<()> {
    EVENTS.lock().unwrap().push(format!("{tag}:{value}"));
    Ok(())
}

/// Old-style errback: gets the failed task's id first.
#[task(name = "c.on_error")]
async fn on_error(failed_id: String, tag: String) -> TaskResult<()> {
    EVENTS.lock().unwrap().push(format!("{tag}:{failed_id}"));
    Ok(())
}

async fn app_with_worker(
    concurrency: usize,
) -> (tempfile::TempDir, App, celeriac::Shutdown, tokio::task::JoinHandle<celeriac::WorkerSummary>) {
    let (dir, url) = sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .task(add)
        .task(mul)
        .task(tsum)
        .task(fail)
        .task(record)
        .task(on_error)
        .build()
        .await
        .unwrap();
    let (shutdown, worker) = start_worker(&app, concurrency);
    (dir, app, shutdown, worker)
}

#[tokio::test]
async fn chain_passes_results_and_sets_ids() {
    let (_d, app, shutdown, worker) = app_with_worker(2).await;
    let first_id = uuid::Uuid::new_v4().to_string();
    // Each later step gets the previous result prepended to its own arguments.
    let m = celeriac::Signature::new("c.mul", vec![10.into()]).set("priority", 3);
    let c = chain([add::s(1, 2).with_task_id(&first_id), m, celeriac::Signature::new("c.add", vec![5.into()])]);
    let r = c.delay(&app).await.unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 35);
    let last = r.meta().await.unwrap();
    let second_id = last.parent_id.clone().expect("parent id");
    let second = app.async_result(&second_id).meta().await.unwrap();
    assert_eq!(second.parent_id.as_deref(), Some(first_id.as_str()));
    let first = app.async_result(&first_id).meta().await.unwrap();
    assert_eq!(first.children_ids(), vec![second_id.clone()], "children list the next step");
    let tree = app.workflow(&first_id).await.unwrap().expect("recorded workflow");
    assert_eq!(tree.root.children.len(), 3);
    assert!(tree.root.children.iter().all(|n| n.state == Some(State::Success)));
    let text = tree.to_string();
    assert!(text.contains("c.add") && text.contains("→ 35"), "{text}");
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn groups_and_chords() {
    let (_d, app, shutdown, worker) = app_with_worker(4).await;
    let g = group((0..3).map(|i| add::s(i, i))).delay(&app).await.unwrap();
    let members = app.group_result(g.id()).await.unwrap().expect("group saved");
    assert_eq!(members.join::<i64>(WAIT).await.unwrap(), vec![0, 2, 4]);
    let m0 = members.results[0].meta().await.unwrap();
    assert_eq!(m0.group_id.as_deref(), Some(g.id()));

    let c = chord((0..3).map(|i| add::s(i, i)), celeriac::Signature::new("c.tsum", vec![])).delay(&app).await.unwrap();
    assert_eq!(c.get::<i64>(WAIT).await.unwrap(), 6);
    let body = c.meta().await.unwrap();
    assert!(body.group_id.is_some() && body.parent_id.is_some(), "the body knows its group and parent: {body:?}");

    let empty = chord(Vec::new(), celeriac::Signature::new("c.tsum", vec![])).delay(&app).await.unwrap();
    assert_eq!(empty.get::<i64>(WAIT).await.unwrap(), 0, "an empty header runs the body with []");
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn nested_canvases() {
    let (_d, app, shutdown, worker) = app_with_worker(4).await;
    let one = |t: &str, x: i64| celeriac::Signature::new(t, vec![x.into()]);
    let tsum_sig = celeriac::Signature::new("c.tsum", vec![]);

    // A group inside a chain becomes a chord with the next step as its body: 2 → [3, 4] → 7.
    let r =
        chain([add::s(1, 1), group([one("c.add", 1), one("c.add", 2)]), tsum_sig.clone()]).delay(&app).await.unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 7);

    // A chord inside a chain, followed by another step: (2 → [3, 4] → 7) × 10.
    let r = chain([add::s(1, 1), chord([one("c.add", 1), one("c.add", 2)], tsum_sig.clone()), one("c.mul", 10)])
        .delay(&app)
        .await
        .unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 70);

    // A chain in a chord header: [(1 + 1) × 10, 5 + 5] → 30.
    let r = chord([chain([add::s(1, 1), one("c.mul", 10)]), add::s(5, 5)], tsum_sig.clone()).delay(&app).await.unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 30);

    // A group in a group is flattened.
    let g = group([group([add::s(1, 1), add::s(2, 2)]), add::s(3, 3)]).delay(&app).await.unwrap();
    let members = app.group_result(g.id()).await.unwrap().unwrap();
    assert_eq!(members.join::<i64>(WAIT).await.unwrap(), vec![2, 4, 6]);

    // A chain ending in a group: the group's members get the result.
    let g = chain([add::s(1, 1), group([one("c.mul", 2), one("c.mul", 3)])]).delay(&app).await.unwrap();
    let members = app.group_result(g.id()).await.unwrap().unwrap();
    assert_eq!(members.join::<i64>(WAIT).await.unwrap(), vec![4, 6]);
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn failures_stop_chains_fire_errbacks_and_fail_chords() {
    let (_d, app, shutdown, worker) = app_with_worker(2).await;
    let errback = celeriac::Signature::new("c.on_error", vec!["chain-eb".into()]);
    let failing = celeriac::Signature::new("c.fail", vec![]).link_error(errback);
    let r =
        chain([add::s(1, 1), failing, celeriac::Signature::new("c.mul", vec![10.into()])]).delay(&app).await.unwrap();
    let err = r.get::<i64>(WAIT).await.unwrap_err().to_string();
    assert!(err.contains("ValueError") && err.contains("deliberate"), "the chain's result fails too: {err}");
    let failed_id = app.async_result(r.id()).meta().await.unwrap();
    assert_eq!(failed_id.status, State::Failure);
    assert!(eventually(WAIT, || async { !events_for("chain-eb").is_empty() }).await);
    let eb = events_for("chain-eb");
    assert_eq!(eb.len(), 1, "the errback ran once: {eb:?}");

    let body = celeriac::Signature::new("c.tsum", vec![])
        .link_error(celeriac::Signature::new("c.on_error", vec!["chord-eb".into()]));
    let c = chord([add::s(1, 1), celeriac::Signature::new("c.fail", vec![]), add::s(2, 2)], body)
        .delay(&app)
        .await
        .unwrap();
    let err = c.get::<i64>(WAIT).await.unwrap_err();
    let celeriac::Error::TaskFailed { exc, .. } = err else { panic!("{err}") };
    assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("ChordError", "celery.exceptions"));
    assert!(
        exc.message().starts_with("Dependency ") && exc.message().contains("ValueError('deliberate')"),
        "{}",
        exc.message()
    );
    assert!(
        eventually(WAIT, || async { events_for("chord-eb").len() == 1 }).await,
        "the body's errback ran with the body id"
    );
    assert_eq!(events_for("chord-eb")[0], format!("chord-eb:\"{}\"", c.id()).replace('"', ""));
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn callbacks_run_in_order_with_the_result() {
    let (_d, app, shutdown, worker) = app_with_worker(1).await;
    // record(value, tag): the result is prepended as `value`.
    let cb = |t: &str| celeriac::Signature::new("c.record", vec![format!("link-{t}").into()]);
    let r = add::s(2, 3).link(cb("a")).link(cb("b")).delay(&app).await.unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 5);
    assert!(eventually(WAIT, || async { events_for("link-").len() == 2 }).await);
    assert_eq!(events_for("link-"), vec!["link-a:5", "link-b:5"], "callbacks get the result, in order");
    // As Celery sends several callbacks: as one group, the result's only child.
    let children = r.meta().await.unwrap().children.unwrap();
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0][1].as_array().map(Vec::len), Some(2), "a group of the two callbacks: {children:?}");
    shutdown.graceful();
    worker.await.unwrap();
}

/// Chord groups whose body ran, once per run.
static CHORD_BODY_RUNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn body_runs(group: &str) -> usize {
    CHORD_BODY_RUNS.lock().unwrap().iter().filter(|g| *g == group).count()
}

#[task(name = "c.count_body", bind = true)]
async fn count_body(req: Request, results: Vec<i64>) -> TaskResult<usize> {
    CHORD_BODY_RUNS.lock().unwrap().push(req.group.clone().unwrap_or_default());
    Ok(results.len())
}

#[tokio::test]
async fn a_chord_of_fifty_fires_exactly_once_under_concurrency() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(add).task(count_body).build().await.unwrap();
    let (s1, w1) = start_worker(&app, 8);
    let (s2, w2) = start_worker(&app, 8);
    let body = celeriac::Signature::new("c.count_body", vec![]);
    let r = chord((0..50).map(|i| add::s(i, 1)), body).delay(&app).await.unwrap();
    assert_eq!(r.get::<usize>(WAIT).await.unwrap(), 50);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s1.graceful();
    s2.graceful();
    w1.await.unwrap();
    w2.await.unwrap();
    let group = r.meta().await.unwrap().group_id.unwrap();
    assert_eq!(body_runs(&group), 1, "the body ran once");
}

// ---- saga ----------------------------------------------------------------------------------

static SAGA: Mutex<Vec<String>> = Mutex::new(Vec::new());
static REPORTS: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());

fn saga_log() -> Vec<String> {
    SAGA.lock().unwrap().clone()
}

#[task(name = "s.reserve")]
async fn reserve(order: u64) -> TaskResult<String> {
    SAGA.lock().unwrap().push(format!("reserve {order}"));
    Ok(format!("res-{order}"))
}

#[task(name = "s.release")]
async fn release(reservation: String) -> TaskResult<()> {
    SAGA.lock().unwrap().push(format!("release {reservation}"));
    Ok(())
}

#[task(name = "s.charge")]
async fn charge(reservation: String) -> TaskResult<String> {
    SAGA.lock().unwrap().push(format!("charge {reservation}"));
    Ok(format!("pay-{reservation}"))
}

static REFUND_ATTEMPTS: AtomicU32 = AtomicU32::new(0);

#[task(name = "s.refund", bind = true, autoretry_for = ["Flaky"], retry_backoff = true, retry_backoff_max = 0, max_retries = 3)]
async fn refund(req: Request, payment: String) -> TaskResult<()> {
    REFUND_ATTEMPTS.fetch_add(1, Ordering::SeqCst);
    if req.retries == 0 {
        return Err(TaskError::new("Flaky", "payment provider 503"));
    }
    SAGA.lock().unwrap().push(format!("refund {payment}"));
    Ok(())
}

#[task(name = "s.ship", max_retries = 0)]
async fn ship(payment: String) -> TaskResult<()> {
    SAGA.lock().unwrap().push(format!("ship {payment} failed"));
    Err(TaskError::new("CarrierDown", "no carrier"))
}

#[tokio::test]
async fn saga_rolls_back_in_reverse_order_with_retries() {
    let (_dir, url) = sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .task(reserve)
        .task(release)
        .task(charge)
        .task(refund)
        .task(ship)
        .error_reporter(|f: &FailureReport| {
            REPORTS.lock().unwrap().push((f.task_name.clone(), f.compensations.clone()))
        })
        .build()
        .await
        .unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    let first = uuid::Uuid::new_v4().to_string();
    let flow = chain([
        reserve::s(7).with_task_id(&first).compensate_with(celeriac::Signature::new("s.release", vec![])),
        celeriac::Signature::new("s.charge", vec![]).compensate_with(celeriac::Signature::new("s.refund", vec![])),
        celeriac::Signature::new("s.ship", vec![]),
    ]);
    let r = flow.delay(&app).await.unwrap();
    assert!(r.get::<()>(WAIT).await.is_err());
    let done = eventually(WAIT, || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.state == "done")
    })
    .await;
    assert!(done, "rollback finished: {:?}", celeriac::canvas::saga::rollback(&app, &first).await);
    assert_eq!(
        saga_log(),
        vec!["reserve 7", "charge res-7", "ship pay-res-7 failed", "refund pay-res-7", "release res-7"],
        "compensations ran in reverse order with the steps' results"
    );
    let rb = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().unwrap();
    assert_eq!(rb.failed_task, "s.ship");
    assert_eq!(rb.error.exc_type, "CarrierDown");
    let steps: Vec<(&str, &str, &str, u32)> =
        rb.steps.iter().map(|s| (s.task.as_str(), s.for_step.as_str(), s.state.as_str(), s.retries)).collect();
    assert_eq!(steps, vec![("s.refund", "s.charge", "done", 1), ("s.release", "s.reserve", "done", 0)]);
    assert_eq!(REFUND_ATTEMPTS.load(Ordering::SeqCst), 2, "the compensation retried on its own");
    let chain_meta = r.meta().await.unwrap();
    assert_eq!(chain_meta.status, State::Failure);
    assert_eq!(
        chain_meta.extra.get("rollback").and_then(|v| v.get("state")).and_then(Value::as_str),
        Some("done"),
        "the chain's result says it was rolled back"
    );
    let reports = REPORTS.lock().unwrap().clone();
    assert_eq!(reports, vec![("s.ship".to_owned(), vec!["s.refund".to_owned(), "s.release".to_owned()])]);
    let tree = app.workflow(&first).await.unwrap().unwrap().to_string();
    assert!(tree.contains("rollback [done]") && tree.contains("(undo: s.release)"), "{tree}");
    shutdown.graceful();
    worker.await.unwrap();
}

// A compensation that a stopped worker was running is finished by the next worker.
static SLOW_UNDO_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "k.step")]
async fn step(x: i64) -> TaskResult<i64> {
    Ok(x)
}

#[task(name = "k.slow_undo", bind = true)]
async fn slow_undo(req: Request, _x: i64) -> TaskResult<()> {
    SLOW_UNDO_RUNS.fetch_add(1, Ordering::SeqCst);
    if !req.redelivered {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    Ok(())
}

#[task(name = "k.boom", max_retries = 0)]
async fn boom(_x: i64) -> TaskResult<()> {
    Err(TaskError::new("Boom", "x"))
}

#[tokio::test]
async fn a_rollback_interrupted_by_a_stopped_worker_resumes() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(step).task(slow_undo).task(boom).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    let first = uuid::Uuid::new_v4().to_string();
    chain([
        step::s(1).with_task_id(&first).compensate_with(celeriac::Signature::new("k.slow_undo", vec![])),
        celeriac::Signature::new("k.boom", vec![]),
    ])
    .delay(&app)
    .await
    .unwrap();
    let running = eventually(WAIT, || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.steps[0].state == "running")
    })
    .await;
    assert!(running, "the compensation started");
    shutdown.immediate();
    worker.await.unwrap();
    let rb = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().unwrap();
    assert_eq!(rb.state, "running", "interrupted mid-rollback");

    let (shutdown, worker) = start_worker(&app, 2);
    let done = eventually(WAIT, || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.state == "done")
    })
    .await;
    assert!(done, "the next worker finished the rollback");
    assert_eq!(SLOW_UNDO_RUNS.load(Ordering::SeqCst), 2);
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn workflows_on_redis() {
    let Some(url) = redis_url(6).await else { return };
    let app = App::builder().broker_url(&url).task(add).task(mul).task(tsum).task(count_body).build().await.unwrap();
    let (s1, w1) = start_worker(&app, 8);
    let (s2, w2) = start_worker(&app, 8);
    let one = |t: &str, x: i64| celeriac::Signature::new(t, vec![x.into()]);
    let tsum_sig = celeriac::Signature::new("c.tsum", vec![]);
    let r = chain([add::s(1, 2), one("c.mul", 10), one("c.add", 5)]).delay(&app).await.unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 35);
    let r = chain([add::s(1, 1), chord([one("c.add", 1), one("c.add", 2)], tsum_sig.clone()), one("c.mul", 10)])
        .delay(&app)
        .await
        .unwrap();
    assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 70);
    let g = group((0..3).map(|i| add::s(i, i))).delay(&app).await.unwrap();
    assert_eq!(app.group_result(g.id()).await.unwrap().unwrap().join::<i64>(WAIT).await.unwrap(), vec![0, 2, 4]);
    let r = chord((0..50).map(|i| add::s(i, 1)), celeriac::Signature::new("c.count_body", vec![]))
        .delay(&app)
        .await
        .unwrap();
    assert_eq!(r.get::<usize>(WAIT).await.unwrap(), 50);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let group = r.meta().await.unwrap().group_id.unwrap();
    assert_eq!(body_runs(&group), 1, "the body ran once");
    s1.graceful();
    s2.graceful();
    w1.await.unwrap();
    w2.await.unwrap();
}

// A compensation delivered again after its rollback finished changes nothing: the record keeps
// its final states and the compensations after it are not sent again. Two chains under one
// root roll back separately.
static DUP_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[task(name = "d.step")]
async fn d_step(x: i64) -> TaskResult<i64> {
    Ok(x)
}

#[task(name = "d.undo")]
async fn d_undo(x: i64, tag: String) -> TaskResult<()> {
    DUP_LOG.lock().unwrap().push(format!("{tag} {x}"));
    Ok(())
}

#[task(name = "d.boom", max_retries = 0)]
async fn d_boom(_x: i64) -> TaskResult<()> {
    Err(TaskError::new("Boom", "x"))
}

fn dup_count(entry: &str) -> usize {
    DUP_LOG.lock().unwrap().iter().filter(|e| *e == entry).count()
}

#[tokio::test]
async fn a_redelivered_compensation_does_not_run_the_rollback_again() {
    let (_dir, url) = sqlite_url();
    let app = App::builder().broker_url(&url).task(d_step).task(d_undo).task(d_boom).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    let first = uuid::Uuid::new_v4().to_string();
    let undo = |tag: &str| celeriac::Signature::new("d.undo", vec![]).kwarg("tag", tag);
    chain([
        d_step::s(1).with_task_id(&first).compensate_with(undo("a")),
        d_step::si(2).compensate_with(undo("b")),
        celeriac::Signature::new("d.boom", vec![]),
    ])
    .delay(&app)
    .await
    .unwrap();
    let done = eventually(WAIT, || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.state == "done")
    })
    .await;
    assert!(done, "rollback finished");
    assert_eq!((dup_count("b 2"), dup_count("a 1")), (1, 1), "{:?}", DUP_LOG.lock().unwrap());
    let rb = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().unwrap();

    // Deliver the first compensation (b) again, as a redelivery would.
    let first_undo = &rb.steps[0];
    let mut headers = serde_json::Map::new();
    headers.insert(
        "celeriac_rollback".into(),
        serde_json::json!({"root_id": rb.root_id, "key": rb.chain_result_id, "index": 0}),
    );
    app.send_signature(first_undo.compensation.clone().with_task_id(&first_undo.task_id).headers(headers))
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || async { dup_count("b 2") == 2 }).await,
        "the duplicate ran (compensations are idempotent)"
    );
    shutdown.graceful();
    worker.await.unwrap();
    assert_eq!(queue_stats(&app, "celery").await.ready, 0, "nothing else was sent");
    assert_eq!(dup_count("a 1"), 1, "the compensation after it was not sent again");
    let again = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().unwrap();
    assert_eq!(again.state, "done");
    assert_eq!(again.steps.iter().map(|s| s.state.as_str()).collect::<Vec<_>>(), ["done", "done"]);
}

#[task(name = "d.undo_fail", max_retries = 0)]
async fn d_undo_fail(_x: i64) -> TaskResult<()> {
    DUP_LOG.lock().unwrap().push("undo_fail".into());
    Err(TaskError::new("RefundRejected", "the bank said no"))
}

#[tokio::test]
async fn a_failed_compensation_is_recorded_and_the_rollback_goes_on() {
    let (_dir, url) = sqlite_url();
    let app =
        App::builder().broker_url(&url).task(d_step).task(d_undo).task(d_undo_fail).task(d_boom).build().await.unwrap();
    let (shutdown, worker) = start_worker(&app, 2);
    let first = uuid::Uuid::new_v4().to_string();
    chain([
        d_step::s(10)
            .with_task_id(&first)
            .compensate_with(celeriac::Signature::new("d.undo", vec![]).kwarg("tag", "c")),
        d_step::si(20).compensate_with(celeriac::Signature::new("d.undo_fail", vec![])),
        celeriac::Signature::new("d.boom", vec![]),
    ])
    .delay(&app)
    .await
    .unwrap();
    let finished = eventually(WAIT, || async {
        matches!(celeriac::canvas::saga::rollback(&app, &first).await, Ok(Some(rb)) if rb.finished_at.is_some())
    })
    .await;
    assert!(finished, "rollback finished");
    let rb = celeriac::canvas::saga::rollback(&app, &first).await.unwrap().unwrap();
    assert_eq!(rb.state, "failed", "one compensation failed for good");
    let steps: Vec<(&str, &str)> = rb.steps.iter().map(|s| (s.task.as_str(), s.state.as_str())).collect();
    assert_eq!(steps, [("d.undo_fail", "failed"), ("d.undo", "done")], "the next compensation still ran");
    assert_eq!(rb.steps[0].error.as_ref().map(|e| e.exc_type.as_str()), Some("RefundRejected"));
    assert_eq!(dup_count("c 10"), 1);
    shutdown.graceful();
    worker.await.unwrap();
}
