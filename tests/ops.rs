//! Operations: revokes that survive worker restarts, rate limits shared by all workers
//! (global and per key), and dead letters with their error details and traceable replays.
//! SQLite files and Redis (database 10; skipped with a message when no server runs).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::broker::{ReplayError, replay_dead_letter};
use celeriac::protocol::Message;
use celeriac::worker::RateKey;
use celeriac::{App, AppBuilder, ExceptionInfo, Request, Signature, State, TaskError, TaskResult, task};
use common::{eventually, redis_url, sqlite_url, start_worker};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// Tests sharing Redis database 10 take turns (each flushes it).
static REDIS_DB: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- revoke ------------------------------------------------------------------------------

/// Task ids that ran, per broker URL (tests run in parallel in one process).
static RAN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn ran(url: &str) -> Vec<String> {
    RAN.lock().unwrap().iter().filter(|(u, _)| u == url).map(|(_, id)| id.clone()).collect()
}

#[task(bind = true)]
async fn record(req: Request) -> TaskResult<String> {
    RAN.lock().unwrap().push((req.app().broker().url(), req.id.clone()));
    Ok(req.id.clone())
}

async fn app_on(url: &str, builder: AppBuilder) -> App {
    builder.broker_url(url).build().await.unwrap()
}

/// A revoke sent while no worker runs, and one sent to a worker that then restarts, still
/// stop their tasks: the new worker (a new app, as a new process would be) does not run them
/// and they end REVOKED.
async fn revokes_survive_restarts(url: &str) {
    let app = app_on(url, App::builder().task(record)).await;
    let url = app.broker().url();
    // 1. Revoked while a worker runs (it learns it by broadcast or from the broker); the
    //    worker stops, and only then the task arrives.
    let late_id = uuid::Uuid::new_v4().to_string();
    let (stop, first) = start_worker(&app, 2);
    app.revoke(std::slice::from_ref(&late_id), false, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.graceful();
    first.await.unwrap();
    let late = app.send_signature(record::s().with_task_id(&late_id)).await.unwrap();
    assert_eq!(late.id(), late_id);
    // 2. Enqueued, then revoked while no worker runs.
    let early = record::delay(&app).await.unwrap();
    app.revoke(&[early.id().to_owned()], false, None).await.unwrap();

    // A new worker on a new app, as a new process would be: nothing shared in memory.
    let fresh = app_on(&url, App::builder().task(record)).await;
    let (stop, second) = start_worker(&fresh, 2);
    let control = record::delay(&fresh).await.unwrap();
    assert_eq!(control.get::<String>(WAIT).await.unwrap(), control.id(), "the new worker runs other tasks");
    for id in [early.id(), late.id()] {
        let r = fresh.async_result(id);
        assert!(
            eventually(WAIT, || async { r.state().await.unwrap() == State::Revoked }).await,
            "{id} is REVOKED, not {:?}",
            r.state().await
        );
    }
    stop.graceful();
    let summary = second.await.unwrap();
    let ran = ran(&url);
    assert!(!ran.contains(&early.id().to_owned()) && !ran.contains(&late_id), "revoked tasks never ran: {ran:?}");
    assert_eq!(summary.revoked, 2, "the restarted worker discarded both");
    // The persisted set is shared and readable by anyone on the broker.
    let persisted: Vec<String> = fresh.broker().persisted_revoked().await.unwrap().into_iter().map(|r| r.id).collect();
    assert!(persisted.contains(&early.id().to_owned()) && persisted.contains(&late_id), "{persisted:?}");
}

#[tokio::test]
async fn sqlite_revokes_survive_restarts() {
    let (_dir, url) = sqlite_url();
    revokes_survive_restarts(&url).await;
}

#[tokio::test]
async fn redis_revokes_survive_restarts() {
    let _turn = REDIS_DB.lock().await;
    let Some(url) = redis_url(10).await else { return };
    revokes_survive_restarts(&url).await;
}

/// A revoked message for a task this worker does not know is revoked, not dead-lettered.
#[tokio::test]
async fn sqlite_revoked_unknown_task_is_revoked_not_dead_lettered() {
    let (_dir, url) = sqlite_url();
    let app = app_on(&url, App::builder()).await;
    let r = app.send_task("nowhere.known", vec![], Default::default()).await.unwrap();
    app.revoke(&[r.id().to_owned()], false, None).await.unwrap();
    let (stop, worker) = start_worker(&app, 1);
    assert!(eventually(WAIT, || async { common::queue_stats(&app, "celery").await.ready == 0 }).await);
    stop.graceful();
    let summary = worker.await.unwrap();
    assert_eq!((summary.revoked, summary.dead_lettered), (1, 0));
    assert_eq!(r.state().await.unwrap(), State::Revoked);
    assert!(app.broker().dead_letters(10).await.unwrap().is_empty());
}

/// Persisted revokes expire, and the version moves with every revoke.
async fn revokes_expire(url: &str) {
    let app = app_on(url, App::builder()).await;
    let b = app.broker();
    let v0 = b.revoked_version().await.unwrap();
    app.revoke(&["short".to_owned()], false, Some(Duration::from_millis(300))).await.unwrap();
    app.revoke(&["long".to_owned()], true, None).await.unwrap();
    assert_ne!(b.revoked_version().await.unwrap(), v0);
    let now: HashMap<String, bool> =
        b.persisted_revoked().await.unwrap().into_iter().map(|r| (r.id, r.terminate)).collect();
    assert_eq!(now, HashMap::from([("short".to_owned(), false), ("long".to_owned(), true)]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later: Vec<String> = b.persisted_revoked().await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(later, ["long"], "the short revoke expired and was pruned");
}

#[tokio::test]
async fn sqlite_revokes_expire() {
    let (_dir, url) = sqlite_url();
    revokes_expire(&url).await;
}

#[tokio::test]
async fn redis_revokes_expire() {
    let _turn = REDIS_DB.lock().await;
    let Some(url) = redis_url(10).await else { return };
    revokes_expire(&url).await;
}

#[tokio::test]
async fn memory_revokes_expire() {
    revokes_expire("memory://").await;
}

/// A revoke with `terminate` reaches a running task through the broker record alone (SQLite
/// has no broadcast), within the refresh interval.
#[task(track_started = true)]
async fn sleepy() -> TaskResult<()> {
    tokio::time::sleep(Duration::from_secs(30)).await;
    Ok(())
}

#[tokio::test]
async fn sqlite_terminate_reaches_a_running_task_through_the_broker() {
    let (_dir, url) = sqlite_url();
    let app = app_on(&url, App::builder().task(sleepy)).await;
    let (stop, worker) = start_worker(&app, 1);
    let r = sleepy::delay(&app).await.unwrap();
    assert!(eventually(WAIT, || async { r.state().await.unwrap() == State::Started }).await);
    let t0 = Instant::now();
    // A started task keeps its state until the worker running it stops it.
    app.revoke(&[r.id().to_owned()], true, None).await.unwrap();
    assert_eq!(r.state().await.unwrap(), State::Started);
    assert!(eventually(WAIT, || async { r.state().await.unwrap() == State::Revoked }).await);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "stopped in {took:?} (refresh every 1 s)");
    stop.graceful();
    assert_eq!(worker.await.unwrap().revoked, 1);
}

// ---- shared rate limits -------------------------------------------------------------------

/// Start times of `charge` per (broker URL, customer).
static STARTS: Mutex<Vec<(String, String, Instant)>> = Mutex::new(Vec::new());

#[task(bind = true)]
async fn charge(req: Request, customer_id: String) -> TaskResult<()> {
    STARTS.lock().unwrap().push((req.app().broker().url(), customer_id, Instant::now()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

fn starts(url: &str, customer: &str) -> Vec<Instant> {
    let mut v: Vec<Instant> =
        STARTS.lock().unwrap().iter().filter(|(u, c, _)| u == url && c == customer).map(|(_, _, t)| *t).collect();
    v.sort();
    v
}

/// The most starts in any window of `window` (each window opening at a start).
fn busiest_window(starts: &[Instant], window: Duration) -> usize {
    (0..starts.len()).map(|i| starts[i..].iter().take_while(|t| **t - starts[i] < window).count()).max().unwrap_or(0)
}

/// With 4 workers and a per-key limit of 5/s (burst 1) for `customer_id`, a burst of
/// `BURST_A` (200) A tasks (~40 s at 5/s) starts at most 5 in every 1 s window, while 5 B tasks, queued behind all of them, are not held up by A: they run at
/// their own key's pace (5 starts at 5/s take 0.8 s) and are done long before A.
const BURST_A: usize = 200;

async fn per_key_limit_holds_across_workers(url: &str) {
    let builder = || App::builder().task(charge).key_rate_limit(charge::name(), "5/s", RateKey::param("customer_id"));
    let apps: Vec<App> = four_apps(url, builder).await;
    let url = apps[0].broker().url();
    let workers: Vec<_> = apps.iter().map(|a| start_worker(a, 4)).collect();
    let t0 = Instant::now();
    let mut batch: Vec<Signature> = (0..BURST_A).map(|_| charge::s("A".to_owned())).collect();
    batch.extend((0..5).map(|_| charge::s("B".to_owned())));
    apps[0].send_batch(batch).await.unwrap();
    let sent = t0.elapsed();
    assert!(eventually(Duration::from_secs(90), || async { starts(&url, "A").len() == BURST_A }).await, "all A ran");
    let a = starts(&url, "A");
    let b = starts(&url, "B");
    for (stop, _) in &workers {
        stop.graceful();
    }
    for (_, w) in workers {
        w.await.unwrap();
    }
    assert_eq!(b.len(), 5, "all B ran");
    let busiest = busiest_window(&a, Duration::from_secs(1));
    let span = a[a.len() - 1] - a[0];
    let rate = (a.len() - 1) as f64 / span.as_secs_f64();
    // From the end of sending: on a loaded machine the batch alone can take seconds to write.
    let b_last = b[b.len() - 1].saturating_duration_since(t0 + sent);
    let closest = a.windows(2).map(|w| w[1] - w[0]).min().unwrap_or_default();
    eprintln!(
        "{url}: {BURST_A} A in {span:?} ({rate:.2}/s), busiest 1 s window {busiest}, closest starts {closest:?} apart; 5 B all started {b_last:?} after the \
         batch was sent (sending took {sent:?})"
    );
    assert!(busiest <= 5, "at most 5 A starts in any 1 s window, saw {busiest}");
    // 199 gaps of at least 200 ms (the buckets space grants 4 % + 5 ms wider), less 2 % for
    // the jitter between grant and start.
    let least = Duration::from_secs_f64((BURST_A - 1) as f64 * 0.2 * 0.98);
    assert!(span >= least, "{BURST_A} starts at 5/s take at least {least:?}, took {span:?}");
    assert!(rate > 4.0, "the limit is used, not starved: {rate:.2}/s");
    assert!(busiest_window(&b, Duration::from_secs(1)) <= 5, "B has its own 5/s");
    assert!(b_last < Duration::from_secs(3), "B tasks are not held up by A's limit: last started after {b_last:?}");
}

async fn four_apps(url: &str, builder: impl Fn() -> AppBuilder) -> Vec<App> {
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(builder().broker_url(url).build().await.unwrap());
    }
    apps
}

#[tokio::test]
async fn redis_per_key_limit_holds_across_four_workers() {
    let _turn = REDIS_DB.lock().await;
    let Some(url) = redis_url(10).await else { return };
    per_key_limit_holds_across_workers(&url).await;
}

#[tokio::test]
async fn sqlite_per_key_limit_holds_across_four_workers() {
    let (_dir, url) = sqlite_url();
    per_key_limit_holds_across_workers(&url).await;
}

#[task]
async fn ping_api(n: u32) -> TaskResult<u32> {
    Ok(n)
}

/// A global limit from the TOML-shaped `task_rate_limits` setting: 10 tasks at 4/s on two
/// workers take at least 2.25 s.
#[tokio::test]
async fn sqlite_global_limit_from_config_spans_workers() {
    let (_dir, url) = sqlite_url();
    let limits: toml::Table = toml::from_str(&format!("\"{}\" = {{ global = \"4/s\" }}", ping_api::name())).unwrap();
    let build =
        || App::builder().task(ping_api).set("task_rate_limits", toml::Value::Table(limits.clone())).broker_url(&url);
    let (a, b) = (build().build().await.unwrap(), build().build().await.unwrap());
    let (wa, wb) = (start_worker(&a, 4), start_worker(&b, 4));
    let t0 = Instant::now();
    let results = a.send_batch((0..10).map(ping_api::s).collect()).await.unwrap();
    for r in &results {
        r.get::<u32>(WAIT).await.unwrap();
    }
    let took = t0.elapsed();
    eprintln!("10 tasks under a global 4/s limit on 2 workers took {took:?}");
    assert!(took >= Duration::from_millis(2_250), "{took:?}");
    for (stop, w) in [wa, wb] {
        stop.graceful();
        w.await.unwrap();
    }
}

#[tokio::test]
async fn bad_shared_limits_fail_the_build() {
    let e = App::builder()
        .broker_url("memory://")
        .task(charge)
        .key_rate_limit(charge::name(), "fast", RateKey::param("customer_id"))
        .build()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("key_rate_limit"), "{e}");
}

/// The buckets themselves: one start per interval; those that find no room get turns one
/// interval apart and keep them when they come back early.
async fn buckets_space_starts(url: &str) {
    let app = app_on(url, App::builder()).await;
    let b = app.broker();
    let interval = Duration::from_millis(200);
    let ms = Duration::from_millis;
    assert_eq!(b.rate_limit_acquire("k", "w1", interval, 1).await.unwrap(), Duration::ZERO);
    let w2 = b.rate_limit_acquire("k", "w2", interval, 1).await.unwrap();
    let w3 = b.rate_limit_acquire("k", "w3", interval, 1).await.unwrap();
    assert!(w2 > ms(100) && w2 <= interval, "w2 is next: {w2:?}");
    assert!(w3 > ms(300) && w3 <= ms(400), "w3 is one interval behind w2: {w3:?}");
    assert_eq!(b.rate_limit_acquire("other", "w1", interval, 1).await.unwrap(), Duration::ZERO, "keys are apart");
    tokio::time::sleep(w2).await;
    assert_eq!(b.rate_limit_acquire("k", "w2", interval, 1).await.unwrap(), Duration::ZERO, "w2's turn");
    let again = b.rate_limit_acquire("k", "w3", interval, 1).await.unwrap();
    assert!(again > Duration::ZERO && again <= interval, "w3, early, keeps its place: {again:?}");
    // Burst 3 lets three through at once.
    for w in ["b1", "b2", "b3"] {
        assert_eq!(b.rate_limit_acquire("burst", w, interval, 3).await.unwrap(), Duration::ZERO);
    }
    assert!(b.rate_limit_acquire("burst", "b4", interval, 3).await.unwrap() > Duration::ZERO);
}

#[tokio::test]
async fn sqlite_buckets_space_starts() {
    let (_dir, url) = sqlite_url();
    buckets_space_starts(&url).await;
}

#[tokio::test]
async fn redis_buckets_space_starts() {
    let _turn = REDIS_DB.lock().await;
    let Some(url) = redis_url(10).await else { return };
    buckets_space_starts(&url).await;
}

#[tokio::test]
async fn memory_buckets_space_starts() {
    buckets_space_starts("memory://").await;
}

// ---- dead letters -------------------------------------------------------------------------

/// Fails with a traceback the first time (the flag file does not exist yet), succeeds after.
#[task]
async fn fails_first(flag: String) -> TaskResult<&'static str> {
    if std::fs::metadata(&flag).is_ok() {
        return Ok("second time lucky");
    }
    std::fs::write(&flag, b"x").unwrap();
    Err(TaskError::Failure {
        exc: ExceptionInfo::new("KeyError", "'first'", "builtins"),
        traceback: Some("Traceback (most recent call last):\n  fails_first\nKeyError: 'first'".to_owned()),
    })
}

#[task]
async fn refuses() -> TaskResult<()> {
    Err(TaskError::Reject { requeue: false, reason: "not for us".into() })
}

async fn replay_runs_again_under_a_new_id(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag").display().to_string();
    let app = app_on(url, App::builder().task(fails_first).task(refuses)).await;
    let (stop, worker) = start_worker(&app, 2);
    let failed = fails_first::delay(&app, flag).await.unwrap();
    assert!(failed.get::<String>(WAIT).await.is_err());
    let rejected = refuses::delay(&app).await.unwrap();
    assert!(eventually(WAIT, || async { app.broker().dead_letters(10).await.unwrap().len() == 2 }).await);
    stop.graceful();
    worker.await.unwrap();

    // What a dead letter records.
    let dead = app.broker().dead_letters(10).await.unwrap();
    let by_task = |id: &str| dead.iter().find(|d| d.task_id.as_deref() == Some(id)).unwrap().clone();
    let d = by_task(failed.id());
    assert_eq!(d.error_type.as_deref(), Some("KeyError"));
    assert_eq!(d.retries, Some(0));
    assert_eq!(d.traceback, failed.meta().await.unwrap().traceback, "the traceback stored with the result");
    assert!(d.traceback.as_deref().unwrap().contains("KeyError: 'first'"));
    assert_eq!(Message::from_wire(&d.payload).unwrap().headers.id, failed.id(), "the original message");
    let r = by_task(rejected.id());
    assert_eq!((r.error_type.as_deref(), r.retries), (Some("Reject"), Some(0)));
    assert!(r.reason.contains("not for us"), "{}", r.reason);

    // Replay: a new task id, linked both ways, with a fresh budget.
    let new_id = replay_dead_letter(app.broker().as_ref(), &d.id).await.unwrap();
    assert_ne!(new_id, failed.id());
    let marked = app.broker().dead_letter_by_id(&d.id).await.unwrap().unwrap();
    assert_eq!(marked.replayed_as.as_deref(), Some(new_id.as_str()), "the dead letter records the new id");
    let again = replay_dead_letter(app.broker().as_ref(), &d.id).await.unwrap_err();
    assert!(matches!(&again, ReplayError::AlreadyReplayed { task_id, .. } if *task_id == new_id), "{again}");
    let queued = app.broker().fetch(&["celery".to_owned()], 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(queued.len(), 1);
    let message = Message::from_wire(&queued[0].payload).unwrap();
    assert_eq!(message.headers.id, new_id);
    assert_eq!(message.headers.extra.get("replayed_from").and_then(|v| v.as_str()), Some(failed.id()));
    app.broker().requeue(&queued[0], None).await.unwrap();

    let (stop, worker) = start_worker(&app, 2);
    let result = app.async_result(&new_id).get::<String>(WAIT).await.unwrap();
    assert_eq!(result, "second time lucky", "the replay ran and its result is under the new id");
    assert_eq!(failed.state().await.unwrap(), State::Failure, "the old id keeps the failed run");
    stop.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn sqlite_replay_runs_again_under_a_new_id() {
    let (_dir, url) = sqlite_url();
    replay_runs_again_under_a_new_id(&url).await;
}

#[tokio::test]
async fn redis_replay_runs_again_under_a_new_id() {
    let _turn = REDIS_DB.lock().await;
    let Some(url) = redis_url(10).await else { return };
    replay_runs_again_under_a_new_id(&url).await;
}

#[tokio::test]
async fn memory_replay_runs_again_under_a_new_id() {
    replay_runs_again_under_a_new_id("memory://").await;
}
