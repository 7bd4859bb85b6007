//! # Celeriac
//!
//! A distributed task queue for Rust that speaks Celery's protocol: define tasks as `async fn`s,
//! enqueue them from Rust (or Python), run them on workers that retry with back-off, and read
//! results from either side. With no server installed it runs on an embedded SQLite file.
//!
//! ```
//! use celeriac::{App, TaskResult, Worker, task};
//! use std::time::Duration;
//!
//! #[task(max_retries = 5, retry_backoff = true, autoretry_for = ["Timeout"])]
//! async fn add(x: i64, y: i64) -> TaskResult<i64> {
//!     Ok(x + y)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), celeriac::Error> {
//! let app = App::builder().broker_url("memory://").task(add).build().await?;
//! let (shutdown, worker) = Worker::new(&app).spawn();
//! let result = add::s(2, 3).delay(&app).await?;
//! assert_eq!(result.get::<i64>(Duration::from_secs(5)).await?, 5);
//! shutdown.graceful();
//! worker.await.ok();
//! # Ok(())
//! # }
//! ```
//!
//! Modules follow the path of a message: [`canvas`] (client side) → [`protocol`] (wire
//! formats) → [`broker`] → [`worker`] (consumer → executor → task) → [`backend`] → [`result`].

// `#[task]` expands to `::celeriac::...` paths; this makes them resolve inside the crate too.
extern crate self as celeriac;

pub mod app;
pub mod backend;
mod batch;
pub mod beat;
pub mod broker;
pub mod canvas;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
mod error;
pub mod protocol;
pub mod reporter;
pub mod result;
pub mod retry;
#[cfg(feature = "sqlite")]
mod sqlite_common;
pub mod task;
pub mod worker;

pub use app::{App, AppBuilder};
pub use celeriac_macros::task;
pub use config::Config;
pub use error::Error;
pub use protocol::{ExceptionInfo, Signature, State};
pub use reporter::{ErrorReporter, FailureReport};
pub use result::{AsyncResult, GroupResult};
pub use task::{Args, FnTask, Params, Request, Retry, Task, TaskError, TaskOptions, TaskResult};
pub use worker::{Shutdown, Worker, WorkerOptions, WorkerSummary};

/// Re-exports the `#[task]` macro's generated code uses. Not for direct use.
#[doc(hidden)]
pub mod __private {
    pub use futures::future::BoxFuture;
    pub use serde_json;

    /// A type usable as a task argument or return value.
    #[diagnostic::on_unimplemented(
        message = "task argument or return type `{Self}` is not serde-serializable",
        note = "derive `serde::Serialize` and `serde::Deserialize` for it (task arguments travel as JSON)"
    )]
    pub trait TaskValue: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> TaskValue for T {}

    /// Compile-time check that `T` can be a task argument.
    pub const fn assert_task_value<T: TaskValue>() {}

    /// Encodes a return value.
    pub fn encode<T: serde::Serialize>(task: &str, value: T) -> Result<serde_json::Value, crate::TaskError> {
        serde_json::to_value(value).map_err(|e| {
            crate::TaskError::python(
                "builtins",
                "TypeError",
                format!("task {task}: cannot encode the return value: {e}"),
            )
        })
    }

    /// Encodes one argument for a signature (a value that cannot be JSON becomes `null`).
    pub fn arg<T: serde::Serialize>(value: T) -> serde_json::Value {
        serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
    }
}

/// The README's example compiles (checked as a doctest).
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
