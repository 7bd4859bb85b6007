//! What a task is: the [`Task`] trait (implemented by `#[task]`), its options with Celery's
//! names and defaults, the request context a bound task sees, arguments, and typed outcomes.
//!
//! Not for: running tasks (see `worker/`) or sending them (see `canvas/`, `app`).

use crate::app::App;
use crate::protocol::{BUILTINS, DeliveryInfo, Embed, ExceptionInfo, Message, ResultMeta, Signature, State};
use crate::retry::RetryPolicy;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
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

    /// The function's parameters, for calling errbacks the way Celery does (a task taking
    /// `request, exc, traceback` is called inline) and for retries with new arguments.
    /// `#[task]` fills it in; the default says nothing is known.
    fn params(&self) -> Params {
        Params::default()
    }

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
    /// *Celeriac*: the body blocks (CPU-bound or synchronous I/O) instead of awaiting. In the
    /// async pool it runs on a blocking thread so it does not stall other tasks; only the
    /// process pool (`worker_pool = "process"`) can stop it at its hard time limit.
    pub blocking: bool,
}

/// A task made from a closure: for tasks defined at run time, with names and parameters
/// known only then (and for Celery's built-in tasks). `#[task]` is the usual way.
pub struct FnTask {
    name: String,
    options: TaskOptions,
    params: Params,
    handler: Arc<dyn Fn(Request, Args) -> BoxFuture<'static, TaskResult<Value>> + Send + Sync>,
}

impl fmt::Debug for FnTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnTask").field("name", &self.name).field("params", &self.params).finish_non_exhaustive()
    }
}

impl FnTask {
    /// A task named `name` whose runs call `handler` with the request and the arguments.
    pub fn new<F, Fut>(name: impl Into<String>, params: Params, handler: F) -> Self
    where
        F: Fn(Request, Args) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = TaskResult<Value>> + Send + 'static,
    {
        FnTask {
            name: name.into(),
            options: TaskOptions::default(),
            params,
            handler: Arc::new(move |req, args| Box::pin(handler(req, args))),
        }
    }

    /// Sets the task's options (Celery's task attributes).
    pub fn with_options(mut self, options: TaskOptions) -> Self {
        self.options = options;
        self
    }
}

impl Task for FnTask {
    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> TaskOptions {
        self.options.clone()
    }

    fn params(&self) -> Params {
        self.params.clone()
    }

    fn run(&self, request: Request, args: Args) -> BoxFuture<'static, TaskResult<Value>> {
        (self.handler)(request, args)
    }
}

/// A task function's parameters, as far as Celery's calling rules need them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Params {
    /// Positional-or-keyword parameter names, in order (a bound task's request not included).
    pub names: Vec<String>,
    /// Takes any number of extra positional arguments (Python's `*args`).
    pub varargs: bool,
    /// Takes any extra keyword arguments (Python's `**kwargs`).
    pub varkw: bool,
    /// Gets its own request (`bind = true`); Celery calls bound errbacks old-style.
    pub bound: bool,
    /// Whether anything is known at all (a hand-written [`Task`] may not say).
    pub known: bool,
}

impl Params {
    /// Plain positional parameters, as `#[task]` generates them.
    pub fn positional(names: &[&str], bound: bool) -> Self {
        Params {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            varargs: false,
            varkw: false,
            bound,
            known: true,
        }
    }

    /// Adds Python's `*args`.
    pub fn with_varargs(mut self) -> Self {
        self.varargs = true;
        self
    }

    /// Adds Python's `**kwargs`.
    pub fn with_varkw(mut self) -> Self {
        self.varkw = true;
        self
    }

    /// Celery's `arity_greater(partial(header, *args, **kwargs), n)`: whether more than `n`
    /// positional arguments can still be passed after `args` and `kwargs` are bound.
    pub fn takes_more_than(&self, n: usize, args: usize, kwargs: &Map<String, Value>) -> bool {
        if self.varargs {
            return true;
        }
        let mut rest: Vec<&String> = self.names.iter().skip(args).collect();
        // A parameter bound by keyword, and every one after it, becomes keyword-only.
        if let Some(i) = rest.iter().position(|name| kwargs.contains_key(name.as_str())) {
            rest.truncate(i);
        }
        rest.len() > n
    }
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
    /// The soft limit in force for this run, in seconds.
    pub(crate) soft_limit_seconds: Option<f64>,
    /// Results of what this run sent (Celery's `request.children`), as result tuples.
    pub(crate) children: Arc<Mutex<Vec<Value>>>,
    /// The message being run (`None` when called inline).
    pub(crate) message: Option<Arc<Message>>,
    /// Callbacks, errbacks, chain and chord of the message.
    pub(crate) embed: Option<Embed>,
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

    /// Whether the soft time limit has passed. A blocking task checks this between steps.
    pub fn is_soft_time_limit_exceeded(&self) -> bool {
        self.soft_limit.is_cancelled()
    }

    /// The error to return once the soft limit is reached (after cleaning up):
    /// `billiard.exceptions.SoftTimeLimitExceeded` with the limit in force for this run.
    pub fn soft_time_limit_exceeded(&self) -> TaskError {
        TaskError::soft_time_limit_exceeded(self.soft_limit_seconds.unwrap_or_default())
    }

    /// Stores a custom state with metadata, e.g. `("PROGRESS", {"done": 5, "total": 10})`,
    /// as Celery's `update_state` does, so clients can show progress.
    pub async fn update_state(&self, state: &str, meta: Value) -> Result<(), crate::Error> {
        let mut record = ResultMeta::new(&self.id, State::parse(state), meta);
        record.children = None;
        self.app.backend().store(&record, self.app.config().result_expires_duration()).await?;
        Ok(())
    }

    /// A request for a task called inline (`Signature.__call__`), outside any message.
    pub(crate) fn inline(app: &App, task: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Request {
        Request {
            id: uuid::Uuid::new_v4().to_string(),
            task: task.to_owned(),
            retries: 0,
            root_id: None,
            parent_id: None,
            group: None,
            group_index: None,
            eta: None,
            expires: None,
            delivery_info: DeliveryInfo::default(),
            priority: 0,
            redelivered: false,
            hostname: String::new(),
            args,
            kwargs,
            is_eager: false,
            app: app.clone(),
            soft_limit: CancellationToken::new(),
            soft_limit_seconds: None,
            children: Default::default(),
            message: None,
            embed: None,
        }
    }

    /// Sends `signature` (of any kind) as a child of this task: `parent_id` is this task,
    /// `root_id` its root, and the result is recorded in this task's `children`.
    pub async fn send(&self, signature: Signature) -> Result<crate::AsyncResult, crate::Error> {
        crate::canvas::send::apply_from(self, signature).await
    }

    /// Replaces this task with `signature` (Celery's `self.replace`): the replacement gets
    /// this task's id, its callbacks, errbacks, chord and place in a chain, and this run ends
    /// without a result of its own. Use it as `return Err(request.replace(sig).await)`.
    pub async fn replace(&self, signature: Signature) -> TaskError {
        crate::canvas::replace::replace(self, signature).await
    }

    /// Adds `signature` to the chord this task is a header member of (Celery's
    /// `add_to_chord`): the chord's body then waits for it too.
    pub async fn add_to_chord(&self, signature: Signature) -> Result<crate::AsyncResult, crate::Error> {
        crate::canvas::replace::add_to_chord(self, signature).await
    }

    /// Ids of the tasks this run has sent so far.
    pub fn sent_children(&self) -> Vec<String> {
        self.trail()
            .iter()
            .filter_map(|t| t.get(0).and_then(|h| h.get(0)).and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    /// Results of what this run has sent so far, as Celery's result tuples.
    pub fn trail(&self) -> Vec<Value> {
        self.children.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Message headers other than Celery's own (Celery's `request.headers`): what the sender
    /// put in `headers=`.
    pub fn headers(&self) -> Map<String, Value> {
        // Celery's own beyond the named headers (`TaskHeaders::FIELDS`).
        const KNOWN: [&str; 8] =
            ["compression", "chord", "chain", "callbacks", "errbacks", "reply_to", "correlation_id", "delivery_info"];
        let Some(m) = &self.message else { return Map::new() };
        let mut all = serde_json::to_value(&m.headers).ok().and_then(|v| v.as_object().cloned()).unwrap_or_default();
        all.retain(|k, _| !crate::protocol::TaskHeaders::FIELDS.contains(&k.as_str()) && !KNOWN.contains(&k.as_str()));
        all
    }

    /// The message properties (`correlation_id`, `reply_to`, `priority`, `delivery_info`, and
    /// whatever else the sender set, e.g. `app_id`).
    pub fn properties(&self) -> Value {
        self.message.as_ref().and_then(|m| serde_json::to_value(&m.properties).ok()).unwrap_or(Value::Null)
    }

    /// `delivery_info` as Celery's request has it: exchange, routing key, priority, redelivered.
    pub fn delivery_info_value(&self) -> Value {
        serde_json::json!({
            "exchange": self.delivery_info.exchange,
            "routing_key": self.delivery_info.routing_key,
            "priority": self.priority,
            "redelivered": self.redelivered,
        })
    }

    /// The hard time limit the message carries (`timelimit[0]`).
    pub fn time_limit(&self) -> Option<f64> {
        self.message.as_ref().and_then(|m| m.headers.time_limits().0)
    }

    /// The soft time limit the message carries (`timelimit[1]`).
    pub fn soft_time_limit(&self) -> Option<f64> {
        self.message.as_ref().and_then(|m| m.headers.time_limits().1)
    }

    /// How many times the task was replaced on its way here.
    pub fn replaced_task_nesting(&self) -> u32 {
        self.message.as_ref().map(|m| m.headers.replaced_task_nesting).unwrap_or(0)
    }

    /// The chord body this task is a header member of.
    pub fn chord(&self) -> Option<&Signature> {
        self.embed.as_ref().and_then(|e| e.chord.as_ref())
    }

    /// The rest of the chain this task is a step of (last step first).
    pub fn chain(&self) -> &[Signature] {
        self.embed.as_ref().and_then(|e| e.chain.as_deref()).unwrap_or(&[])
    }

    /// The `link` callbacks.
    pub fn callbacks(&self) -> &[Signature] {
        self.embed.as_ref().and_then(|e| e.callbacks.as_deref()).unwrap_or(&[])
    }

    /// The `link_error` errbacks.
    pub fn errbacks(&self) -> &[Signature] {
        self.embed.as_ref().and_then(|e| e.errbacks.as_deref()).unwrap_or(&[])
    }

    /// Stamps (Celery 5.3's stamping API) carried by the message.
    pub fn stamps(&self) -> Map<String, Value> {
        self.message.as_ref().map(|m| m.headers.stamps.clone()).unwrap_or_default()
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
    /// Positional arguments for the retry (default: the same ones).
    pub args: Option<Vec<Value>>,
    /// Keyword arguments for the retry (default: the same ones).
    pub kwargs: Option<Map<String, Value>>,
    /// Further `apply_async` options for the retry message (`expires`, `time_limit`, ...).
    pub options: Map<String, Value>,
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

    /// Retry with these positional arguments.
    pub fn args(mut self, args: Vec<Value>) -> Self {
        self.args = Some(args);
        self
    }

    /// Retry with these keyword arguments.
    pub fn kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.kwargs = Some(kwargs);
        self
    }

    /// An `apply_async` option for the retry message, e.g. `("expires", 60)`.
    pub fn option(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.options.insert(key.to_owned(), value.into());
        self
    }
}

impl From<Retry> for TaskError {
    fn from(r: Retry) -> Self {
        TaskError::Retry(Box::new(r))
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
    Retry(Box<Retry>),
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

    /// The task name these arguments are for.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// All positional and keyword arguments, for tasks that bind them themselves.
    pub fn into_parts(self) -> (Vec<Value>, Map<String, Value>) {
        (self.args.into_iter().flatten().collect(), self.kwargs)
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
