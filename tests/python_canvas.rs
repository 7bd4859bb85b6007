//! Python Celery's canvases run on a Celeriac worker: the messages a real Celery 5.7.0 client
//! published for each workflow (captured in `tests/fixtures/canvas/runs/`, with the chord sizes
//! it stored) are fed to a Rust worker whose tasks carry the Python tasks' names, and the final
//! results must equal what the Python worker produced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use celeriac::protocol::{Message, TaskBody, TaskHeaders};
use celeriac::{App, State, TaskError, TaskResult, task};
use serde_json::Value;
use std::time::Duration;

#[task(name = "tasks.add")]
async fn add(x: i64, y: Option<i64>) -> TaskResult<i64> {
    Ok(x + y.unwrap_or(0))
}

#[task(name = "tasks.mul")]
async fn mul(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x * y)
}

#[task(name = "tasks.tsum")]
async fn tsum(numbers: Vec<i64>) -> TaskResult<i64> {
    Ok(numbers.iter().sum())
}

#[task(name = "tasks.echo")]
async fn echo(value: Value) -> TaskResult<Value> {
    Ok(value)
}

#[task(name = "tasks.fail", max_retries = 0)]
async fn fail(kind: Option<Value>) -> TaskResult<()> {
    let _ = kind;
    Err(TaskError::python("builtins", "KeyError", "nope"))
}

/// Old-style errback of the captures: any arguments.
#[task(name = "tasks.on_err")]
async fn on_err(failed_id: Option<String>) -> TaskResult<Option<String>> {
    Ok(failed_id)
}

/// Cases our worker does not run like Celery yet, with the reason.
const KNOWN_GAPS: &[(&str, &str)] = &[];

fn fixture(name: &str) -> Value {
    let path = format!("{}/../../tests/fixtures/canvas/runs/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn message_from(published: &Value) -> Message {
    let h = &published["headers"];
    let text = |k: &str| h[k].as_str().map(str::to_owned);
    let mut headers = TaskHeaders::new(text("task").unwrap(), text("id").unwrap());
    headers.lang = "py".into();
    headers.root_id = text("root_id");
    headers.parent_id = text("parent_id");
    headers.group = text("group");
    headers.group_index = h["group_index"].as_u64();
    let body: TaskBody = serde_json::from_value(published["body"].clone()).unwrap();
    Message::new(headers, &body, published["key"].as_str().unwrap())
}

async fn run_case(name: &str) {
    let doc = fixture(name);
    let (_dir, url) = common::sqlite_url();
    let app = App::builder()
        .broker_url(&url)
        .task(add)
        .task(mul)
        .task(tsum)
        .task(echo)
        .task(fail)
        .task(on_err)
        .build()
        .await
        .unwrap();
    // What the Python client stored besides messages: chord sizes, and the structure of a
    // chord header whose members are groups (`apply_chord` saves it).
    for cmd in doc["backend_commands"].as_array().unwrap() {
        let args = cmd["args"].as_array().unwrap();
        if cmd["by"] == "client" && cmd["command"] == "SET" {
            let key = args[0].as_str().unwrap();
            let Some(rest) = key.strip_prefix("celery-taskset-meta-") else { continue };
            if let Some(gid) = rest.strip_suffix(".s") {
                let size: usize = args[1].as_str().unwrap().parse().unwrap();
                app.backend().set_chord_size(gid, size, None).await.unwrap();
            } else if !rest.contains('.') {
                let saved: Value = serde_json::from_str(args[1].as_str().unwrap()).unwrap();
                app.backend().save_group(rest, &saved["result"], None).await.unwrap();
            }
        }
    }
    for published in doc["published"].as_array().unwrap().iter().filter(|p| p["by"] == "client") {
        let m = message_from(published);
        app.broker().publish(m.queue(), &m).await.unwrap();
    }
    let (shutdown, worker) = common::start_worker(&app, 4);
    let wait = Duration::from_secs(20);
    let expected = &doc["get"];
    let result = &doc["result"];
    if let Some(gid) = result["group"].as_str() {
        let members = doc["result_tree"]["groups"][gid]["results"].as_array().unwrap();
        let mut values = Vec::new();
        for m in members {
            values.push(app.async_result(m["task"].as_str().unwrap()).get::<Value>(wait).await.unwrap());
        }
        assert_eq!(Value::Array(values), expected["value"], "{name}: group values");
    } else {
        let id = result["task"].as_str().unwrap();
        let r = app.async_result(id);
        if let Some(value) = expected.get("value") {
            assert_eq!(&r.get::<Value>(wait).await.unwrap_or_else(|e| panic!("{name}: {e}")), value, "{name}");
        } else {
            // Celery's get() follows parents to the first failure; without that (as the raw
            // record of the result id reads) it is the error stored on the result id itself.
            let raised = &expected["follow_parents_false"]["raised"];
            let meta = r.wait_meta(wait).await.unwrap();
            assert_eq!(meta.status, State::Failure, "{name}");
            let exc = meta.exception_info().unwrap();
            assert_eq!(format!("{}.{}", exc.exc_module, exc.exc_type), raised["type"].as_str().unwrap(), "{name}");
            if exc.exc_type == "ChordError" {
                assert!(
                    exc.message().starts_with("Dependency ") && exc.message().ends_with("raised KeyError('nope')"),
                    "{name}: {}",
                    exc.message()
                );
            }
        }
    }
    shutdown.graceful();
    worker.await.unwrap();
}

#[tokio::test]
async fn python_canvases_give_python_results_on_a_rust_worker() {
    let dir = format!("{}/../../tests/fixtures/canvas/runs", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".json").to_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 12, "all captured runs are present: {names:?}");
    let mut ran = 0;
    for name in &names {
        if let Some((_, why)) = KNOWN_GAPS.iter().find(|(n, _)| n == name) {
            eprintln!("skipping {name}: {why}");
            continue;
        }
        run_case(name).await;
        ran += 1;
    }
    assert_eq!(ran, names.len() - KNOWN_GAPS.len());
}
