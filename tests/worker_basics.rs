//! End-to-end: tasks sent, run by a worker, results read back; on memory and SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::{App, Request, State, TaskError, TaskResult, task};
use common::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[task]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    id: u64,
    items: Vec<String>,
}

#[task(name = "shop.describe")]
async fn describe(order: Order, prefix: Option<String>) -> TaskResult<String> {
    Ok(format!("{}{}:{}", prefix.unwrap_or_default(), order.id, order.items.join(",")))
}

#[task(bind = true)]
async fn whoami(req: Request) -> TaskResult<(String, u32, Option<String>)> {
    Ok((req.id.clone(), req.retries, req.root_id.clone()))
}

#[task(max_retries = 0)]
async fn boom() -> TaskResult<()> {
    Err(TaskError::value_error("deliberate"))
}

#[task(max_retries = 0)]
async fn panics() -> TaskResult<()> {
    panic!("kaboom")
}

fn tasks(b: celeriac::AppBuilder) -> celeriac::AppBuilder {
    b.task(add).task(describe).task(whoami).task(boom).task(panics)
}

async fn exercise(app: &App) {
    let (shutdown, worker) = start_worker(app, 2);
    let r = add::delay(app, 2, 3).await.unwrap();
    assert_eq!(r.get::<i64>(Duration::from_secs(10)).await.unwrap(), 5);
    assert_eq!(r.state().await.unwrap(), State::Success);

    let order = Order { id: 7, items: vec!["a".into(), "b".into()] };
    let r = describe::s(order, None).kwarg("prefix", "#").delay(app).await;
    // prefix given twice (positional null and keyword) is an argument error, not a silent pick:
    let err = r.unwrap().get::<String>(Duration::from_secs(10)).await.unwrap_err().to_string();
    assert!(err.contains("shop.describe") && err.contains("prefix"), "{err}");

    let mut sig = celeriac::Signature::new("shop.describe", vec![]);
    sig.kwargs.insert("order".into(), serde_json::json!({"id": 9, "items": ["x"]}));
    let r = sig.delay(app).await.unwrap();
    assert_eq!(r.get::<String>(Duration::from_secs(10)).await.unwrap(), "9:x");

    let r = whoami::delay(app).await.unwrap();
    let (id, retries, root) = r.get::<(String, u32, Option<String>)>(Duration::from_secs(10)).await.unwrap();
    assert_eq!((id.as_str(), retries, root.as_deref()), (r.id(), 0, Some(r.id())));

    let r = boom::delay(app).await.unwrap();
    match r.get::<()>(Duration::from_secs(10)).await.unwrap_err() {
        celeriac::Error::TaskFailed { exc, .. } => {
            assert_eq!((exc.exc_type.as_str(), exc.exc_module.as_str()), ("ValueError", "builtins"));
        }
        other => panic!("unexpected {other}"),
    }

    let r = panics::delay(app).await.unwrap();
    match r.get::<()>(Duration::from_secs(10)).await.unwrap_err() {
        celeriac::Error::TaskFailed { exc, .. } => assert!(exc.message().contains("kaboom"), "{exc}"),
        other => panic!("unexpected {other}"),
    }
    // The worker survived the panic.
    assert_eq!(add::delay(app, 1, 1).await.unwrap().get::<i64>(Duration::from_secs(10)).await.unwrap(), 2);

    shutdown.graceful();
    let summary = worker.await.unwrap();
    assert_eq!(summary.succeeded, 4);
    assert_eq!(summary.failed, 3);
}

#[tokio::test]
async fn memory_end_to_end() {
    let app = memory_app(tasks(App::builder())).await;
    exercise(&app).await;
}

#[tokio::test]
async fn sqlite_end_to_end() {
    let (_dir, url) = sqlite_url();
    let app = tasks(App::builder()).broker_url(&url).build().await.unwrap();
    exercise(&app).await;
}

#[tokio::test]
async fn redis_end_to_end() {
    let Some(url) = redis_url(1).await else { return };
    let app = tasks(App::builder()).broker_url(&url).build().await.unwrap();
    exercise(&app).await;
}

#[tokio::test]
async fn redis_global_keyprefix_prefixes_every_key() {
    let Some(url) = redis_url(7).await else { return };
    let app = tasks(App::builder())
        .broker_url(&url)
        .set("broker_transport_options", toml::Value::Table(toml::toml! { global_keyprefix = "shop:" }))
        .set("result_backend_transport_options", toml::Value::Table(toml::toml! { global_keyprefix = "shop" }))
        .build()
        .await
        .unwrap();
    let (shutdown, worker) = start_worker(&app, 1);
    let r = add::delay(&app, 20, 22).await.unwrap();
    assert_eq!(r.get::<i64>(Duration::from_secs(10)).await.unwrap(), 42);
    shutdown.graceful();
    worker.await.unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert!(keys.contains(&"shop:_kombu.binding.celery".to_owned()), "{keys:?}");
    assert!(keys.contains(&format!("shop_celery-task-meta-{}", r.id())), "the backend adds Celery's `_`: {keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("shop")), "nothing outside the prefix: {keys:?}");
}

#[tokio::test]
async fn get_times_out_with_a_clear_error() {
    let app = memory_app(tasks(App::builder())).await;
    let r = add::delay(&app, 1, 2).await.unwrap();
    let err = r.get::<i64>(Duration::from_millis(100)).await.unwrap_err();
    assert!(matches!(err, celeriac::Error::Timeout { .. }));
    assert!(err.to_string().contains("PENDING"), "{err}");
}
