//! What a task is: the [`Task`] trait (implemented by `#[task]`), its options with Celery's
//! names and defaults, the request context a bound task sees, arguments, and typed outcomes.
//!
//! Not for: running tasks (see `worker/`) or sending them (see `canvas/`, `app`).

use crate::app::App;
use crate::protocol::{BUILTINS, DeliveryInfo, ExceptionInfo, ResultMeta, Signature, State};
use crate::retry::RetryPolicy;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use tokio_util::sync::CancellationToken;

/// The result type of a task function: `Ok(value)` or a typed [`TaskError`].
pub type TaskResult<T> = Result<T, TaskError>;

/// A task, erased to JSON in and out. `#[celeriac::task]` implements it; users rarely do.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Celeriac task",
    note = "put `#[celeriac::task]` on an `async fn` to make a task, then register the generated type"
)]
pub trait Task: Send + Sync + 'static {
    /// The registered name, e.g. `"myapp.tasks.add"`.
    fn name(&self) -> &str;

    /// Options from the `#[task(...)]` attribute.
    fn options(&self) -> TaskOptions;

    /// Runs the task with decoded arguments; the future owns everything it needs.
    fn run(&self, request: Request, args: Args) -> BoxFuture<'static, TaskResult<Value>>;

    /// Called after a run returned a value.
    fn on_success(&self, _request: &Request, _result: &Value) {}

    /// Called when a run will be retried.
    fn on_retry(&self, _request: &Request, _exc: &ExceptionInfo) {}

    /// Called when the task failed for good.
    fn on_failure(&self, _request: &Request, _exc: &ExceptionInfo) {}

    /// Called after every run that reached a state, with that state.
    fn after_return(&self, _request: &Request, _state: &State, _result: &Value) {}
}

/// Per-task options, named and defaulted as Celery's `Task` attributes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskOptions {
    /// `max_retries`, `default_retry_delay`, `autoretry_for`, `retry_backoff*`, `retry_jitter`.
    pub retry: RetryPolicy,
    /// `acks_late`; `None` takes `task_acks_late`.
    pub acks_late: Option<bool>,
    /// `ignore_result`; `None` takes `task_ignore_result`.
    pub ignore_result: Option<bool>,
    /// `track_started`; `None` takes `task_track_started`.
    pub track_started: Option<bool>,
    /// `time_limit` (hard) in seconds; `None` takes `task_time_limit`.
    pub time_limit: Option<f64>,
    /// `soft_time_limit` in seconds; `None` takes `task_soft_time_limit`.
    pub soft_time_limit: Option<f64>,
    /// `rate_limit`, e.g. `"10/s"`, `"100/m"`.
    pub rate_limit: Option<String>,
    /// Default queue for this task.
    pub queue: Option<String>,
    /// Default priority (0-9).
    pub priority: Option<u8>,
}

/// What a bound task (`bind = true`) sees of its own call.
#[derive(Clone)]
pub struct Request {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Retries so far.
    pub retries: u32,
    /// First task of the workflow.
    pub root_id: Option<String>,
    /// Task that sent this one.
    pub parent_id: Option<String>,
    /// Group id, when in a group.
    pub group: Option<String>,
    /// Position in the group.
    pub group_index: Option<u64>,
    /// The ETA it was scheduled for.
    pub eta: Option<DateTime<Utc>>,
    /// When it expires.
    pub expires: Option<DateTime<Utc>>,
    /// Exchange, routing key (queue) and priority.
    pub delivery_info: DeliveryInfo,
    /// Priority of the message.
    pub priority: u8,
    /// Whether the broker delivered it before (a previous worker did not finish it).
    pub redelivered: bool,
    /// Node name of the worker running it.
    pub hostname: String,
    /// Positional arguments as sent.
    pub args: Vec<Value>,
    /// Keyword arguments as sent.
    pub kwargs: Map<String, Value>,
    /// True when run inline by `task_always_eager`.
    pub is_eager: bool,
    pub(crate) app: App,
    pub(crate) soft_limit: CancellationToken,
    /// Ids of tasks sent with [`Request::send`], stored as the result's `children`.
    pub(crate) children: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("task", &self.task)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl Request {
    /// The app running this task, to send further tasks.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Resolves when the soft time limit is reached: clean up and return
    /// [`TaskError::soft_time_limit_exceeded`] (or anything else) before the hard limit.
    pub async fn soft_time_limit_reached(&self) {
        self.soft_limit.cancelled().await;
    }

    /// Whether the soft time limit has passed.
    pub fn is_soft_time_limit_exceeded(&self) -> bool {
        self.soft_limit.is_cancelled()
    }

    /// Stores a custom state with metadata, e.g. `("PROGRESS", {"done": 5, "total": 10})`,
    /// as Celery's `update_state` does, so clients can show progress.
    pub async fn update_state(&self, state: &str, meta: Value) -> Result<(), crate::Error> {
        let mut record = ResultMeta::new(&self.id, State::parse(state), meta);
        record.children = None;
        self.app.backend().store(&record, self.app.config().result_expires_duration()).await?;
        Ok(())
    }

    /// Sends `signature` as a child of this task (`parent_id` = this id, same `root_id`).
    pub async fn send(&self, mut signature: Signature) -> Result<crate::AsyncResult, crate::Error> {
        signature.options.insert("parent_id".into(), Value::String(self.id.clone()));
        let root = self.root_id.clone().unwrap_or_else(|| self.id.clone());
        signature.options.insert("root_id".into(), Value::String(root));
        let sent = self.app.send_signature(signature).await?;
        self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(sent.id().to_owned());
        Ok(sent)
    }

    /// Ids of the tasks this run has sent so far.
    pub fn sent_children(&self) -> Vec<String> {
        self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A retry request for this task, for `return Err(req.retry()...)`.
    pub fn retry(&self) -> Retry {
        Retry::default()
    }
}

/// An explicit retry request (Celery's `self.retry(...)`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retry {
    /// Seconds to wait; default `default_retry_delay`.
    pub countdown: Option<f64>,
    /// Absolute time to run at (wins over `countdown`).
    pub eta: Option<DateTime<Utc>>,
    /// The error that caused the retry, stored in the RETRY record.
    pub exc: Option<ExceptionInfo>,
    /// Override `max_retries` for this retry (`Some(None)` = unlimited).
    pub max_retries: Option<Option<u32>>,
}

impl Retry {
    /// Wait `seconds` before the retry.
    pub fn countdown(mut self, seconds: f64) -> Self {
        self.countdown = Some(seconds);
        self
    }

    /// Run the retry at `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Record `exc` as the cause.
    pub fn exc(mut self, exc: impl Into<TaskError>) -> Self {
        if let TaskError::Failure { exc, .. } = exc.into() {
            self.exc = Some(exc);
        }
        self
    }

    /// Override `max_retries`.
    pub fn max_retries(mut self, max: Option<u32>) -> Self {
        self.max_retries = Some(max);
        self
    }
}

impl From<Retry> for TaskError {
    fn from(r: Retry) -> Self {
        TaskError::Retry(r)
    }
}

/// Why a task did not return a value. Retry, reject and ignore are outcomes, not failures.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskError {
    /// The task failed with an error (stored as `{exc_type, exc_message, exc_module}`).
    Failure {
        /// The error in Celery's shape.
        exc: ExceptionInfo,
        /// Error chain or backtrace text, stored as `traceback`.
        traceback: Option<String>,
    },
    /// Run again later (`self.retry()`).
    Retry(Retry),
    /// Refuse the message (`Reject`): back to the queue, or to the dead-letter queue.
    Reject {
        /// Put it back in its queue instead of dead-lettering it.
        requeue: bool,
        /// Why, for the dead-letter record and logs.
        reason: String,
    },
    /// Drop silently with no state stored (`Ignore`).
    Ignore,
    /// The message's arguments do not fit the function.
    Arguments(ArgumentError),
}

impl TaskError {
    /// A failure of kind `exc_type` (matched by `autoretry_for`) with a message, module `rust`.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Failure { exc: ExceptionInfo::new(exc_type, message, "rust"), traceback: None }
    }

    /// A failure with a Python exception class, e.g. `("builtins", "ValueError", "bad")`.
    pub fn python(module: &str, exc_type: &str, message: impl Into<String>) -> Self {
        TaskError::Failure { exc: ExceptionInfo::new(exc_type, message, module), traceback: None }
    }

    /// `builtins.ValueError`.
    pub fn value_error(message: impl Into<String>) -> Self {
        Self::python(BUILTINS, "ValueError", message)
    }

    /// A failure from a full [`ExceptionInfo`].
    pub fn from_exception(exc: ExceptionInfo) -> Self {
        TaskError::Failure { exc, traceback: None }
    }

    /// `billiard.exceptions.SoftTimeLimitExceeded`, for a task that stops at its soft limit.
    pub fn soft_time_limit_exceeded(limit: f64) -> Self {
        TaskError::from_exception(ExceptionInfo::soft_time_limit_exceeded(limit))
    }

    /// A retry with the default delay.
    pub fn retry() -> Retry {
        Retry::default()
    }

    /// Reject the message.
    pub fn reject(requeue: bool, reason: impl Into<String>) -> Self {
        TaskError::Reject { requeue, reason: reason.into() }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Failure { exc, .. } => write!(f, "{exc}"),
            TaskError::Retry(r) => write!(f, "retry requested (countdown {:?})", r.countdown),
            TaskError::Reject { requeue, reason } => write!(f, "rejected (requeue: {requeue}): {reason}"),
            TaskError::Ignore => f.write_str("ignored"),
            TaskError::Arguments(e) => write!(f, "{e}"),
        }
    }
}

/// Any error type becomes a failure whose `exc_type` is the type's name and `exc_module` its
/// Rust module path (with `.`), so `?` works in task bodies and `autoretry_for` can name it.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        let full = std::any::type_name::<E>();
        let path = full.split('<').next().unwrap_or(full);
        let (module, name) = path.rsplit_once("::").unwrap_or(("rust", path));
        let mut chain = Vec::new();
        let mut source = e.source();
        while let Some(s) = source {
            chain.push(format!("caused by: {s}"));
            source = s.source();
        }
        TaskError::Failure {
            exc: ExceptionInfo::new(name, e.to_string(), module.replace("::", ".")),
            traceback: (!chain.is_empty()).then(|| chain.join("\n")),
        }
    }
}

/// A task argument that does not fit. Names the task and the argument.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("task {task}: argument `{argument}`: {problem}")]
pub struct ArgumentError {
    /// Task name.
    pub task: String,
    /// Parameter name (or position).
    pub argument: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The arguments of one call, as the message carries them. Generated code takes them one by one.
#[derive(Debug, Clone)]
pub struct Args {
    task: String,
    args: Vec<Option<Value>>,
    kwargs: Map<String, Value>,
}

impl Args {
    /// Arguments for `task`.
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Args { task: task.into(), args: args.into_iter().map(Some).collect(), kwargs }
    }

    fn error(&self, argument: &str, problem: impl Into<String>) -> ArgumentError {
        ArgumentError { task: self.task.clone(), argument: argument.to_owned(), problem: problem.into() }
    }

    /// Takes parameter number `index` named `name`: positionally, else by keyword; a missing
    /// `Option` parameter is `None`, any other missing one is an error.
    pub fn take<T: DeserializeOwned>(&mut self, index: usize, name: &str) -> Result<T, ArgumentError> {
        let positional = self.args.get_mut(index).and_then(Option::take);
        let keyword = self.kwargs.remove(name);
        let value = match (positional, keyword) {
            (Some(_), Some(_)) => return Err(self.error(name, "got multiple values (positional and keyword)")),
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => {
                return serde_json::from_value(Value::Null).map_err(|_| self.error(name, "missing required argument"));
            }
        };
        serde_json::from_value(value.clone()).map_err(|e| self.error(name, format!("cannot decode {value}: {e}")))
    }

    /// Fails if there are more positional arguments than `expected` or unknown keywords left.
    pub fn finish(self, expected: usize) -> Result<(), ArgumentError> {
        if self.args.len() > expected {
            return Err(self.error(
                &format!("#{}", expected + 1),
                format!("takes {expected} positional argument(s) but {} were given", self.args.len()),
            ));
        }
        if let Some(key) = self.kwargs.keys().next() {
            return Err(self.error(key, "unexpected keyword argument"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(a: Value, k: Value) -> Args {
        Args::new("t.add", serde_json::from_value(a).unwrap(), serde_json::from_value(k).unwrap())
    }

    #[test]
    fn positional_and_keyword_arguments_fill_parameters() {
        let mut a = args(json!([1]), json!({"y": 2}));
        assert_eq!(a.take::<i64>(0, "x").unwrap(), 1);
        assert_eq!(a.take::<i64>(1, "y").unwrap(), 2);
        assert_eq!(a.take::<Option<String>>(2, "z").unwrap(), None);
        a.finish(3).unwrap();
    }

    #[test]
    fn misfits_name_the_task_and_argument() {
        let mut a = args(json!(["x"]), json!({}));
        let e = a.take::<i64>(0, "count").unwrap_err();
        assert_eq!((e.task.as_str(), e.argument.as_str()), ("t.add", "count"));
        let mut a = args(json!([]), json!({}));
        assert!(a.take::<i64>(0, "count").unwrap_err().problem.contains("missing"));
        let a = args(json!([1, 2, 3]), json!({}));
        assert!(a.finish(2).unwrap_err().problem.contains("3 were given"));
        let a = args(json!([]), json!({"nope": 1}));
        assert_eq!(a.finish(0).unwrap_err().argument, "nope");
        let mut a = args(json!([1]), json!({"x": 1}));
        assert!(a.take::<i64>(0, "x").unwrap_err().problem.contains("multiple"));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("upstream said 503")]
    struct HttpError;

    #[test]
    fn std_errors_become_failures_named_after_their_type() {
        let TaskError::Failure { exc, .. } = TaskError::from(HttpError) else { panic!("not a failure") };
        assert_eq!(exc.exc_type, "HttpError");
        assert_eq!(exc.exc_module, "celeriac.task.tests");
        assert_eq!(exc.message(), "upstream said 503");
    }
}
