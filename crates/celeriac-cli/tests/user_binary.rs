//! A user's binary: `celeriac::cli::main` with its own tasks registered, driven on a SQLite file
//! through the commands that need registered tasks: `inspect registered`, `call --kwargs
//! --wait` against the binary's own worker, and `workflow <id>` for a chain sent from Rust.
//!
//! This file is both the binary and its tests (`harness = false` in Cargo.toml: a command line
//! needs its own `main`). Run with `USER_BINARY_AS_CLI` set it is the command line;
//! otherwise `main` runs the tests, which run this same executable as the command line. Name
//! filters and `--skip` select tests as libtest's do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use celeriac::{App, AppBuilder, Signature, TaskResult, task};
use std::process::{Command, ExitCode, Output};
use std::time::Duration;
use support::{AS_CLI, Env};

/// `x + y`.
#[task(name = "demo.add")]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

/// `2 * x`.
#[task(name = "demo.double")]
async fn double(x: i64) -> TaskResult<i64> {
    Ok(2 * x)
}

/// A greeting; `punctuation` is optional.
#[task(name = "demo.greet")]
async fn greet(name: String, punctuation: Option<String>) -> TaskResult<String> {
    Ok(format!("Hello, {name}{}", punctuation.unwrap_or_default()))
}

/// What a user's `main` passes to `celeriac::cli::main`.
fn user_app() -> AppBuilder {
    App::builder().from_env().task(add).task(double).task(greet)
}

fn main() -> ExitCode {
    if std::env::var_os(AS_CLI).is_some() {
        return celeriac::cli::main(user_app());
    }
    let tests: &[(&str, fn())] = &[
        ("inspect_registered_lists_the_binarys_own_tasks", inspect_registered_lists_the_binarys_own_tasks),
        ("call_with_kwargs_runs_on_the_binarys_worker", call_with_kwargs_runs_on_the_binarys_worker),
        ("workflow_shows_a_chain_sent_from_rust", workflow_shows_a_chain_sent_from_rust),
    ];
    support::run_tests(tests)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn inspect_registered_lists_the_binarys_own_tasks() {
    let env = Env::new();
    let out = env.run(&["inspect", "registered"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), ["demo.add", "demo.double", "demo.greet"]);
    // The `celeriac` binary has none of its own.
    let bare = Command::new(env!("CARGO_BIN_EXE_celeriac"))
        .args(["--broker", &env.url, "inspect", "registered"])
        .env_remove("CELERIAC_CONFIG")
        .output()
        .unwrap();
    assert!(bare.status.success() && stdout(&bare).trim().is_empty(), "{bare:?}");
}

/// The stored record `call --wait` printed after the task id.
fn waited_result(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    let text = stdout(out);
    let (id, record) = text.split_once('\n').unwrap();
    let record: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(record["task_id"], id.trim(), "{text}");
    assert_eq!(record["status"], "SUCCESS", "{text}");
    record["result"].clone()
}

fn call_with_kwargs_runs_on_the_binarys_worker() {
    let env = Env::new();
    let _worker = env.worker(&["-c", "2"]);
    let wait = ["--wait", "--timeout", "20"];
    let greeted =
        env.run(&[&["call", "demo.greet", "--kwargs", r#"{"name": "Ada", "punctuation": "!"}"#], &wait[..]].concat());
    assert_eq!(waited_result(&greeted), "Hello, Ada!");
    // Optional keyword left out.
    let plain = env.run(&[&["call", "demo.greet", "-k", r#"{"name": "Grace"}"#], &wait[..]].concat());
    assert_eq!(waited_result(&plain), "Hello, Grace");
    // Positional and keyword arguments together, as Celery sends them.
    let sum = env.run(&[&["call", "demo.add", "--args", "[2]", "--kwargs", r#"{"y": 40}"#], &wait[..]].concat());
    assert_eq!(waited_result(&sum), 42);
    // A keyword the task does not take: FAILURE with the reason (exit code 1).
    let wrong =
        env.run(&[&["call", "demo.add", "--args", "[2]", "--kwargs", r#"{"y": 1, "z": 1}"#], &wait[..]].concat());
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(stdout(&wrong).contains("unexpected keyword argument"), "{}", stdout(&wrong));
}

fn workflow_shows_a_chain_sent_from_rust() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(App::builder().broker_url(&env.url).task(add).task(double).build()).unwrap();
    let first = "7d1c2b8e-0000-4000-8000-00000000c0de";
    let sent = rt
        .block_on(
            celeriac::canvas::chain([add::s(2, 3).with_task_id(first), Signature::new(double::name(), vec![])])
                .delay(&app),
        )
        .unwrap();
    let pending = env.run(&["workflow", first]);
    assert!(pending.status.success(), "{pending:?}");
    assert!(stdout(&pending).contains(&format!("demo.add  [PENDING]  {first}")), "{}", stdout(&pending));

    let worker = env.worker(&["-c", "2"]);
    assert_eq!(rt.block_on(sent.get::<i64>(Duration::from_secs(20))).unwrap(), 10);
    drop(worker);
    let out = env.run(&["workflow", first]);
    assert!(out.status.success(), "{out:?}");
    let tree = stdout(&out);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 3, "{tree}");
    assert!(lines[0].starts_with("chain  "), "{tree}");
    assert!(
        lines[1].starts_with(&format!("├─ demo.add  [SUCCESS]  {first}  started="))
            && lines[1].contains("  took=")
            && lines[1].ends_with("→ 5"),
        "{tree}"
    );
    assert!(
        lines[2].starts_with(&format!("└─ demo.double  [SUCCESS]  {}  started=", sent.id()))
            && lines[2].contains("  took=")
            && lines[2].ends_with("→ 10"),
        "{tree}"
    );

    let unknown = env.run(&["workflow", "no-such-workflow"]);
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("no workflow recorded under \"no-such-workflow\""), "{unknown:?}");
}
