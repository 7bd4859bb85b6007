//! Celery's canvas semantics on Celeriac's own brokers (memory and SQLite), without Redis or
//! Python: replacing a task, adding to a chord, new- and old-style errbacks, chord errors that
//! fail what comes after, retries with new arguments, and rejects that record a failure. The
//! same behaviour is checked against Celery's own suite on Redis in `tests/conformance/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::canvas::{chain, chord, group};
use celeriac::{App, Request, Signature, State, TaskError, TaskResult, task};
use common::*;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

#[task(name = "m.add")]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

#[task(name = "m.tsum")]
async fn tsum(nums: Vec<i64>) -> TaskResult<i64> {
    Ok(nums.iter().sum())
}

#[task(name = "m.fail", max_retries = 0)]
async fn fail(_x: Option<Value>) -> TaskResult<()> {
    Err(TaskError::value_error("deliberate"))
}

/// Replaces itself with `chain(add(x, y), add(100))`.
#[task(name = "m.replace_me", bind = true)]
async fn replace_me(req: Request, x: i64, y: i64) -> TaskResult<i64> {
    Err(req.replace(chain([add::s(x, y), Signature::new("m.add", vec![json!(100)])])).await)
}

/// A chord member that adds two more members to its chord and returns 0.
#[task(name = "m.grow", bind = true)]
async fn grow(req: Request) -> TaskResult<i64> {
    req.add_to_chord(add::s(1, 2)).await.map_err(|e| TaskError::new("ChordError", e.to_string()))?;
    req.add_to_chord(add::s(3, 4)).await.map_err(|e| TaskError::new("ChordError", e.to_string()))?;
    Ok(0)
}

static ERRBACKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn errbacks(tag: &str) -> Vec<String> {
    ERRBACKS.lock().unwrap().iter().filter(|e| e.starts_with(tag)).cloned().collect()
}

/// New style: Celery calls a task taking `request, exc, traceback` inline on the worker.
#[task(name = "m.on_error_new")]
async fn on_error_new(request: Value, exc: Value, _traceback: Option<String>, tag: String) -> TaskResult<()> {
    ERRBACKS.lock().unwrap().push(format!("{tag} new {} {}", request["id"].as_str().unwrap_or("?"), exc["exc_type"]));
    Ok(())
}

/// Old style: sent as a task with the failed task's id.
#[task(name = "m.on_error_old")]
async fn on_error_old(task_id: String, tag: String) -> TaskResult<()> {
    ERRBACKS.lock().unwrap().push(format!("{tag} old {task_id}"));
    Ok(())
}

/// Retries once with new arguments.
#[task(name = "m.retry_with", bind = true, max_retries = 1)]
async fn retry_with(req: Request, x: i64) -> TaskResult<i64> {
    if req.retries == 0 {
        return Err(req.retry().args(vec![json!(x * 10)]).countdown(0.0).into());
    }
    Ok(x)
}

#[task(name = "m.reject")]
async fn reject() -> TaskResult<()> {
    Err(TaskError::reject(false, "bad input"))
}

async fn app(url: &str) -> App {
    App::builder()
        .broker_url(url)
        .task(add)
        .task(tsum)
        .task(fail)
        .task(replace_me)
        .task(grow)
        .task(on_error_new)
        .task(on_error_old)
        .task(retry_with)
        .task(reject)
        .build()
        .await
        .unwrap()
}

async fn on_every_broker<F, Fut>(f: F)
where
    F: Fn(App) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    f(app("memory://").await).await;
    let (_dir, url) = sqlite_url();
    f(app(&url).await).await;
}

#[tokio::test]
async fn a_replaced_task_resolves_to_its_replacement_and_its_chain_goes_on() {
    on_every_broker(|app| async move {
        let (shutdown, worker) = start_worker(&app, 4);
        let r = replace_me::delay(&app, 1, 2).await.unwrap();
        assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 103, "the original id holds the replacement's result");
        let c = chain([replace_me::s(1, 2), Signature::new("m.add", vec![json!(1000)])]).delay(&app).await.unwrap();
        assert_eq!(c.get::<i64>(WAIT).await.unwrap(), 1103, "the rest of the chain runs after the replacement");
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn add_to_chord_makes_the_body_wait_for_the_new_members() {
    on_every_broker(|app| async move {
        let (shutdown, worker) = start_worker(&app, 4);
        let r = chord([grow::s(), add::s(10, 10)], Signature::new("m.tsum", vec![])).delay(&app).await.unwrap();
        assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 20 + 3 + 7);
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn errbacks_are_called_new_style_inline_and_old_style_as_tasks() {
    on_every_broker(|app| async move {
        let tag = uuid::Uuid::new_v4().to_string();
        let (shutdown, worker) = start_worker(&app, 2);
        let new_style = Signature::new("m.on_error_new", vec![]).kwarg("tag", tag.clone());
        let old_style = Signature::new("m.on_error_old", vec![]).kwarg("tag", tag.clone());
        let r = fail::s(None).link_error(new_style).link_error(old_style).delay(&app).await.unwrap();
        assert!(r.get::<Value>(WAIT).await.is_err());
        assert!(eventually(WAIT, || async { errbacks(&tag).len() == 2 }).await, "{:?}", errbacks(&tag));
        let mut got = errbacks(&tag);
        got.sort();
        assert_eq!(got, [format!("{tag} new {} \"ValueError\"", r.id()), format!("{tag} old {}", r.id())]);
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_failed_chord_member_fails_the_body_and_the_steps_after_it() {
    on_every_broker(|app| async move {
        let tag = uuid::Uuid::new_v4().to_string();
        let (shutdown, worker) = start_worker(&app, 2);
        let body = Signature::new("m.tsum", vec![])
            .link_error(Signature::new("m.on_error_old", vec![]).kwarg("tag", tag.clone()));
        let flow = chain([chord([add::s(1, 1), fail::s(None)], body), Signature::new("m.add", vec![json!(1)])]);
        let r = flow.delay(&app).await.unwrap();
        let meta = r.wait_meta(WAIT).await.unwrap();
        assert_eq!(meta.status, State::Failure, "the step after the chord fails too, nothing waits forever");
        let exc = meta.exception_info().unwrap();
        assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("ChordError", "celery.exceptions"));
        assert!(exc.message().starts_with("Dependency ") && exc.message().contains("ValueError('deliberate')"));
        assert!(eventually(WAIT, || async { errbacks(&tag).len() == 1 }).await, "the body's errback ran");
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn groups_in_groups_and_chains_in_groups_give_results_in_order() {
    on_every_broker(|app| async move {
        let (shutdown, worker) = start_worker(&app, 4);
        let g = group([
            add::s(1, 1),
            group([add::s(2, 2), add::s(3, 3)]),
            chain([add::s(4, 4), Signature::new("m.add", vec![json!(1)])]),
        ])
        .delay(&app)
        .await
        .unwrap();
        let members = app.group_result(g.id()).await.unwrap().unwrap();
        assert_eq!(members.join::<i64>(WAIT).await.unwrap(), [2, 4, 6, 9]);
        let c = chord([add::s(1, 1), group([add::s(2, 2), add::s(3, 3)])], Signature::new("m.tsum", vec![]))
            .delay(&app)
            .await
            .unwrap();
        assert_eq!(c.get::<i64>(WAIT).await.unwrap(), 12);
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_retry_can_change_the_arguments_and_a_reject_records_a_failure() {
    on_every_broker(|app| async move {
        let (shutdown, worker) = start_worker(&app, 2);
        let r = retry_with::delay(&app, 4).await.unwrap();
        assert_eq!(r.get::<i64>(WAIT).await.unwrap(), 40, "the retry ran with the new argument");
        let r = reject::delay(&app).await.unwrap();
        let meta = r.wait_meta(WAIT).await.unwrap();
        assert_eq!(meta.status, State::Failure, "Celery 5.7 records a rejected task as failed");
        let exc = meta.exception_info().unwrap();
        assert_eq!(
            (exc.exc_type.as_str(), exc.exc_message.clone()),
            ("Reject", vec![json!("bad input"), json!(false)])
        );
        shutdown.graceful();
        worker.await.unwrap();
    })
    .await;
}
