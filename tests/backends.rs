//! Result backends: SUCCESS is never overwritten, expiry, forget, waiting; the same contract on
//! memory and SQLite. Plus `AsyncResult` navigation and `GroupResult`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::backend::{ChordPart, ResultBackend, StoreOutcome};
use celeriac::protocol::{ExceptionInfo, ResultMeta};
use celeriac::{App, GroupResult, Request, State, TaskResult, task};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The contract every backend keeps; `self_expiring` backends (Redis) delete expired records
/// themselves, so `cleanup` finds nothing to do.
async fn contract(backend: Arc<dyn ResultBackend>, self_expiring: bool) {
    let id = "t-1";
    assert!(backend.get(id).await.unwrap().is_none(), "unknown id reads as missing (PENDING)");
    let started = ResultMeta::new(id, State::Started, json!({"pid": 1}));
    assert_eq!(backend.store(&started, None).await.unwrap(), StoreOutcome::Stored);
    let ok = ResultMeta::new(id, State::Success, json!(42));
    assert_eq!(backend.store(&ok, None).await.unwrap(), StoreOutcome::Stored);
    let late = ResultMeta::exception(id, State::Failure, &ExceptionInfo::new("E", "late duplicate", "rust"), None);
    assert_eq!(backend.store(&late, None).await.unwrap(), StoreOutcome::KeptSuccess);
    let got = backend.get(id).await.unwrap().unwrap();
    assert_eq!((got.status, got.result), (State::Success, json!(42)), "SUCCESS survives a later write");

    // Writes of one task sent together (one batch, where the backend batches) apply in order.
    let same = [
        ResultMeta::new("t-4", State::Started, json!(null)),
        ResultMeta::new("t-4", State::Success, json!(4)),
        ResultMeta::exception("t-4", State::Failure, &ExceptionInfo::new("E", "late", "rust"), None),
    ];
    let (a, b, c) =
        tokio::join!(backend.store(&same[0], None), backend.store(&same[1], None), backend.store(&same[2], None));
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap()),
        (StoreOutcome::Stored, StoreOutcome::Stored, StoreOutcome::KeptSuccess)
    );
    assert_eq!(backend.get("t-4").await.unwrap().unwrap().result, json!(4));
    // Many at once (more than one statement's worth): every one written and readable.
    let many: Vec<ResultMeta> = (0..450).map(|i| ResultMeta::new(format!("m-{i}"), State::Success, json!(i))).collect();
    let outcomes = futures::future::join_all(many.iter().map(|m| backend.store(m, None))).await;
    assert!(outcomes.into_iter().all(|o| o.unwrap() == StoreOutcome::Stored));
    for (i, m) in many.iter().enumerate().step_by(37) {
        assert_eq!(backend.get(&m.task_id).await.unwrap().unwrap().result, json!(i));
    }

    let short = ResultMeta::new("t-2", State::Success, json!("x"));
    backend.store(&short, Some(Duration::from_millis(50))).await.unwrap();
    assert!(backend.get("t-2").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(backend.get("t-2").await.unwrap().is_none(), "expired results read as missing");
    assert_eq!(backend.cleanup().await.unwrap(), if self_expiring { 0 } else { 1 });

    backend.forget(id).await.unwrap();
    assert!(backend.get(id).await.unwrap().is_none());

    let waiter = {
        let b = backend.clone();
        tokio::spawn(async move { b.wait_ready("t-3", Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    backend.store(&ResultMeta::new("t-3", State::Retry, json!(null)), None).await.unwrap();
    backend.store(&ResultMeta::new("t-3", State::Success, json!(3)), None).await.unwrap();
    let seen = waiter.await.unwrap().unwrap().unwrap();
    assert_eq!(seen.status, State::Success);
    let none = backend.wait_ready("never", Duration::from_millis(50)).await.unwrap();
    assert!(none.is_none());

    chord_counting(&*backend).await;
}

/// Members of two chords finishing at once (one batch, where the backend batches), one of them
/// twice: each chord completes exactly once, for one caller, with every member in index order.
async fn chord_counting(backend: &dyn ResultBackend) {
    let sizes = [("g-a", 40usize), ("g-b", 25)];
    for (gid, size) in sizes {
        backend.set_chord_size(gid, size, None).await.unwrap();
    }
    let part = |gid: &str, i: usize| ChordPart {
        index: Some(i as u64),
        task_id: format!("{gid}-{i}"),
        state: State::Success,
        result: json!(i),
    };
    let mut parts: Vec<(String, ChordPart)> = Vec::new();
    for i in (0..40).rev() {
        parts.push(("g-a".into(), part("g-a", i)));
        if i < 25 {
            parts.push(("g-b".into(), part("g-b", i)));
        }
    }
    // A redelivered member counts once.
    parts.insert(3, ("g-a".into(), part("g-a", 39)));
    let outcomes = futures::future::join_all(parts.into_iter().map(|(gid, p)| async move {
        let done = backend.chord_part_return(&gid, p).await.unwrap();
        (gid, done)
    }))
    .await;
    for (gid, size) in sizes {
        let completions: Vec<&Vec<ChordPart>> =
            outcomes.iter().filter(|(g, _)| g == gid).filter_map(|(_, done)| done.as_ref()).collect();
        assert_eq!(completions.len(), 1, "{gid} completes exactly once");
        let got: Vec<_> = completions[0].iter().map(|p| (p.task_id.clone(), p.result.clone())).collect();
        let want: Vec<_> = (0..size).map(|i| (format!("{gid}-{i}"), json!(i))).collect();
        assert_eq!(got, want, "{gid}: every member once, in index order");
        backend.chord_finished(gid, true).await.unwrap();
    }
    let late = backend.chord_part_return("g-a", part("g-a", 0)).await.unwrap();
    assert!(late.is_none(), "a late copy after the chord is done completes nothing");
}

#[tokio::test]
async fn memory_backend_contract() {
    contract(celeriac::backend::from_url("memory://").await.unwrap(), false).await;
}

#[tokio::test]
async fn sqlite_backend_contract() {
    let (_dir, url) = common::sqlite_url();
    contract(celeriac::backend::from_url(&url).await.unwrap(), false).await;
}

/// Processes that open a new SQLite file at the same moment (a worker and a `call --wait`
/// started together) all get a working broker and backend: none fails on the schema or on
/// SQLite's immediate "database is locked" while the file turns to WAL.
#[tokio::test]
async fn sqlite_backends_opening_a_new_file_together_all_work() {
    for round in 0..10 {
        let (_dir, url) = common::sqlite_url();
        let config = celeriac::Config::default();
        let brokers = (0..3).map(|_| celeriac::broker::from_url(&url, &config));
        let backends = (0..4).map(|_| celeriac::backend::from_url(&url));
        let (brokers, opened) =
            futures::future::join(futures::future::join_all(brokers), futures::future::join_all(backends)).await;
        for (i, broker) in brokers.into_iter().enumerate() {
            broker.unwrap_or_else(|e| panic!("round {round}, broker {i}: {e}"));
        }
        for (i, backend) in opened.into_iter().enumerate() {
            let backend = backend.unwrap_or_else(|e| panic!("round {round}, opener {i}: {e}"));
            let id = format!("t-{round}-{i}");
            backend.store(&ResultMeta::new(&id, State::Success, json!(i)), None).await.unwrap();
            assert_eq!(backend.get(&id).await.unwrap().unwrap().result, json!(i));
        }
    }
}

#[tokio::test]
async fn redis_backend_contract() {
    let Some(url) = common::redis_url(2).await else { return };
    contract(celeriac::backend::from_url(&url).await.unwrap(), true).await;

    // Waiters share one subscriber connection: many at once, five on each key, each gets its
    // key's record, and no subscription is left once they are done.
    let backend = celeriac::backend::from_url(&url).await.unwrap();
    let waits: Vec<_> = (0..50)
        .map(|i| {
            let b = backend.clone();
            tokio::spawn(async move { b.wait_ready(&format!("w-{}", i % 10), Duration::from_secs(5)).await })
        })
        .collect();
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let channels = |conn: &redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let names: Vec<String> =
                redis::cmd("PUBSUB").arg("CHANNELS").arg("celery-task-meta-w-*").query_async(&mut conn).await.unwrap();
            names.len()
        }
    };
    // Every key subscribed before anything is stored, so the records arrive as messages.
    assert!(common::eventually(Duration::from_secs(5), || async { channels(&conn).await == 10 }).await);
    for k in 0..10 {
        backend.store(&ResultMeta::new(format!("w-{k}"), State::Success, json!(k)), None).await.unwrap();
    }
    for (i, w) in waits.into_iter().enumerate() {
        let meta = w.await.unwrap().unwrap().expect("a record");
        assert_eq!((meta.status, meta.result), (State::Success, json!(i % 10)));
    }
    let left = common::eventually(Duration::from_secs(5), || async { channels(&conn).await == 0 }).await;
    assert!(left, "every waiter's subscription is gone once it is done");

    // Members counted in one batch keep their errors to themselves: a chord whose counting key
    // has the wrong type fails its member, the other chord in the batch still completes.
    let mut conn = conn;
    redis::cmd("SET")
        .arg("celery-taskset-meta-g-bad.j")
        .arg("not a sorted set")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    backend.set_chord_size("g-bad", 1, None).await.unwrap();
    backend.set_chord_size("g-ok", 2, None).await.unwrap();
    let part = |gid: &str, i: u64| ChordPart {
        index: Some(i),
        task_id: format!("{gid}-{i}"),
        state: State::Success,
        result: json!(i),
    };
    let (ok0, bad, ok1) = tokio::join!(
        backend.chord_part_return("g-ok", part("g-ok", 0)),
        backend.chord_part_return("g-bad", part("g-bad", 0)),
        backend.chord_part_return("g-ok", part("g-ok", 1)),
    );
    let bad = bad.expect_err("the member of the broken chord gets its error");
    assert!(bad.to_string().contains("WRONGTYPE"), "{bad}");
    assert!(ok0.unwrap().is_none());
    assert_eq!(ok1.unwrap().map(|p| p.len()), Some(2), "the other chord in the batch completes");
}

#[tokio::test]
async fn unsupported_urls_say_what_works() {
    let err = celeriac::backend::from_url("mongodb://x").await.err().unwrap().to_string();
    assert!(err.contains("sqlite://") && err.contains("mongodb://x"), "{err}");
    let err = App::builder().broker_url("amqp://u:secret@h//").build().await.unwrap_err().to_string();
    assert!(err.contains("amqp://u:***@h//") && !err.contains("secret"), "{err}");
}

#[task(bind = true)]
async fn parent_task(req: Request, x: i64) -> TaskResult<String> {
    let child =
        req.send(child_task::s(x + 1)).await.map_err(|e| celeriac::TaskError::new("SendFailed", e.to_string()))?;
    Ok(child.id().to_owned())
}

#[task(track_started = true)]
async fn child_task(x: i64) -> TaskResult<i64> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(x)
}

#[tokio::test]
async fn results_know_their_parent_and_group_results_join() {
    let (_dir, url) = common::sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .set("result_extended", true)
        .task(parent_task)
        .task(child_task)
        .build()
        .await
        .unwrap();
    let (shutdown, worker) = common::start_worker(&app, 4);
    let parent = parent_task::delay(&app, 1).await.unwrap();
    let child_id: String = parent.get(Duration::from_secs(10)).await.unwrap();
    let child = app.async_result(&child_id);
    let children: Vec<String> = parent.children().await.unwrap().iter().map(|c| c.id().to_owned()).collect();
    assert_eq!(children, vec![child_id.clone()], "the parent's result lists the task it sent");
    assert!(
        common::eventually(Duration::from_secs(5), || async { child.state().await.unwrap() == State::Started }).await,
        "track_started stores STARTED"
    );
    assert_eq!(child.get::<i64>(Duration::from_secs(10)).await.unwrap(), 2);
    assert_eq!(child.parent().await.unwrap().map(|p| p.id().to_owned()), Some(parent.id().to_owned()));
    let meta = child.meta().await.unwrap();
    assert_eq!(meta.name.as_deref(), Some(child_task::name()), "result_extended adds the name");
    assert_eq!(meta.args, Some(vec![json!(2)]));
    assert_eq!(meta.worker.as_deref(), Some("test@localhost"));

    let members = vec![child_task::delay(&app, 10).await.unwrap(), child_task::delay(&app, 20).await.unwrap()];
    let group = GroupResult::new("g1", members);
    assert_eq!(group.join::<i64>(Duration::from_secs(10)).await.unwrap(), vec![10, 20]);
    assert!(group.ready().await.unwrap());
    shutdown.graceful();
    worker.await.unwrap();
    parent.forget().await.unwrap();
    assert_eq!(parent.state().await.unwrap(), State::Pending);
}
