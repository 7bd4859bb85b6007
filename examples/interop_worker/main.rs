//! A Celeriac worker whose tasks carry Python-style names (`rust.*`), for the Python interop
//! tests in `tests/interop/` (run by `tests/interop/run.sh`). A Python Celery client calls them
//! through its stub tasks of the same names in `tests/interop/interop_app.py`.
//!
//! Every `rust.*` task is routed to the queue `rust`, so a Python worker on `python` never
//! sees them. `shared.work` is also a task of the Python app: both kinds of worker consume the
//! queue `shared` (tests/interop/test_shared_queue.py).
//!
//! ```text
//! cargo build -p celeriac --example interop_worker
//! target/debug/examples/interop_worker --broker redis://127.0.0.1:6379/12 worker -Q rust -c 4
//! ```
//!
//! Not for: anything but those tests; the task bodies are deliberately trivial.

use celeriac::{App, Request, TaskError, TaskResult, task};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::Duration;

/// `x + y`.
#[task(name = "rust.add", queue = "rust")]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

/// `x * y`.
#[task(name = "rust.mul", queue = "rust")]
async fn mul(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x * y)
}

/// Returns its argument unchanged: a JSON round trip through Rust.
#[task(name = "rust.echo", queue = "rust")]
async fn echo(value: Value) -> TaskResult<Value> {
    Ok(value)
}

/// Fails with Python's `builtins.ValueError(message)`.
#[task(name = "rust.fail", queue = "rust", max_retries = 0)]
async fn fail(message: String) -> TaskResult<()> {
    Err(TaskError::python("builtins", "ValueError", message))
}

/// Fails with an error class Python does not have: `rust.PaymentDeclined`.
#[task(name = "rust.custom_error", queue = "rust", max_retries = 0)]
async fn custom_error() -> TaskResult<()> {
    Err(TaskError::new("PaymentDeclined", "card declined by the issuer"))
}

/// Asks for one retry (1 s later), then returns `x`: Python sees RETRY, then SUCCESS.
#[task(name = "rust.retry_once", queue = "rust", bind = true)]
async fn retry_once(req: Request, x: i64) -> TaskResult<i64> {
    if req.retries == 0 {
        return Err(req.retry().countdown(1.0).into());
    }
    Ok(x)
}

/// Meant to be called with keyword arguments only; `b` may be left out.
#[task(name = "rust.kwargs_only", queue = "rust")]
async fn kwargs_only(a: i64, b: Option<String>) -> TaskResult<Value> {
    Ok(json!({ "a": a, "b": b }))
}

/// Sleeps `seconds`, then returns them.
#[task(name = "rust.sleep", queue = "rust")]
async fn sleep(seconds: f64) -> TaskResult<f64> {
    tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
    Ok(seconds)
}

/// The sum of a list (a chord body: it receives the header's results).
#[task(name = "rust.tsum", queue = "rust")]
async fn tsum(numbers: Vec<i64>) -> TaskResult<i64> {
    Ok(numbers.iter().sum())
}

/// One run of a task both languages have: logs `start`/`done` lines (`<n> rust <pid>`) to
/// the file `INTEROP_SHARED_LOG` names, sleeping `seconds` in between.
#[task(name = "shared.work", queue = "shared", acks_late = true, bind = true)]
async fn shared_work(req: Request, n: i64, seconds: f64) -> TaskResult<Value> {
    let log = |what: &str| -> TaskResult<()> {
        let Some(path) = std::env::var_os("INTEROP_SHARED_LOG") else { return Ok(()) };
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        std::io::Write::write_all(
            &mut f,
            format!("{what} {n} rust {} {}\n", std::process::id(), req.redelivered).as_bytes(),
        )?;
        Ok(())
    };
    log("start")?;
    tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
    log("done")?;
    Ok(json!(["rust", n]))
}

fn main() -> ExitCode {
    celeriac::cli::main(
        App::builder()
            .from_env()
            .task(add)
            .task(mul)
            .task(echo)
            .task(fail)
            .task(custom_error)
            .task(retry_once)
            .task(kwargs_only)
            .task(sleep)
            .task(tsum)
            .task(shared_work),
    )
}
