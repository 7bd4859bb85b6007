//! Every `#[task]` option, and what `Task::options` / `Task::name` report for it.

use celeriac::retry::Backoff;
use celeriac::{ExceptionInfo, Request, State, Task, TaskResult, task};
use serde_json::Value;

fn succeeded(_request: &Request, _result: &Value) {}

fn retrying(_request: &Request, _exc: &ExceptionInfo) {}

fn failed(_request: &Request, _exc: &ExceptionInfo) {}

fn returned(_request: &Request, _state: &State, _result: &Value) {}

#[task(
    name = "tests.everything",
    max_retries = 7,
    default_retry_delay = 2.5,
    autoretry_for = ["Timeout", HttpError],
    retry_backoff = true,
    retry_backoff_max = 60,
    retry_jitter = false,
    acks_late = true,
    ignore_result = false,
    track_started,
    time_limit = 30,
    soft_time_limit = 25.5,
    rate_limit = "10/s",
    queue = "reports",
    priority = 9,
    blocking,
    bind = true,
    on_success = succeeded,
    on_retry = retrying,
    on_failure = failed,
    after_return = returned,
)]
async fn everything(request: Request, x: i64) -> TaskResult<String> {
    Ok(format!("{} {x}", request.id))
}

#[task(max_retries = None, retry_backoff = 2)]
async fn add(x: i64, y: i64) -> TaskResult<i64> {
    Ok(x + y)
}

#[task]
async fn defaults() -> TaskResult<()> {
    Ok(())
}

mod reports {
    #[celeriac::task]
    pub async fn nightly() -> celeriac::TaskResult<()> {
        Ok(())
    }
}

fn main() {
    let options = everything.options();
    assert_eq!(options.retry.max_retries, Some(7));
    assert_eq!(options.retry.default_retry_delay, 2.5);
    assert_eq!(options.retry.autoretry_for, ["Timeout", "HttpError"]);
    assert_eq!(options.retry.backoff, Some(Backoff { factor: 1, maximum: 60, jitter: false }));
    assert_eq!(options.acks_late, Some(true));
    assert_eq!(options.ignore_result, Some(false));
    assert_eq!(options.track_started, Some(true));
    assert_eq!(options.time_limit, Some(30.0));
    assert_eq!(options.soft_time_limit, Some(25.5));
    assert_eq!(options.rate_limit.as_deref(), Some("10/s"));
    assert_eq!(options.queue.as_deref(), Some("reports"));
    assert_eq!(options.priority, Some(9));
    assert!(options.blocking);
    assert_eq!(Task::name(&everything), "tests.everything");
    assert_eq!(everything::name(), "tests.everything");

    let options = add.options();
    assert_eq!(options.retry.max_retries, None);
    assert_eq!(options.retry.backoff, Some(Backoff { factor: 2, maximum: 600, jitter: true }));
    assert!(!options.blocking, "not blocking unless asked");

    // Without `name`, a task is named after its module path and function, joined with `.`.
    // trybuild builds each case as its own crate with a generated name (`trybuild008`), so
    // the expected names are built from the crate name rather than spelled out.
    let krate = env!("CARGO_CRATE_NAME");
    assert_eq!(Task::name(&add), format!("{krate}.add"));
    assert_eq!(add::name(), format!("{krate}.add"));
    assert_eq!(Task::name(&reports::nightly), format!("{krate}.reports.nightly"));
    assert_eq!(<defaults as Task>::options(&defaults), celeriac::TaskOptions::default());
}
