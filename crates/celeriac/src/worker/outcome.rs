//! Recording what happened to a run: result records (with Celery's optional fields), per-task
//! hooks and the app's error reporters. Shared by the worker and eager mode.

use super::executor::Effective;
use crate::app::App;
use crate::protocol::{ExceptionInfo, Message, ResultMeta, State, TaskBody};
use crate::reporter::FailureReport;
use crate::task::{Request, Task};
use serde_json::Value;
use std::sync::Arc;

/// Everything known about one call being run.
pub(crate) struct Call {
    pub app: App,
    pub task: Arc<dyn Task>,
    /// Shared with `request.message`.
    pub message: Arc<Message>,
    pub body: TaskBody,
    pub request: Request,
    pub effective: Effective,
    /// When the run started.
    pub started_at: chrono::DateTime<chrono::Utc>,
}

impl Call {
    /// A result record for this call, with `group_id`, `parent_id` and (with
    /// `result_extended`) name, args, kwargs, worker, retries and queue.
    pub(crate) fn meta(&self, status: State, result: Value) -> ResultMeta {
        let mut meta = ResultMeta::new(&self.request.id, status, result);
        meta.group_id = self.request.group.clone();
        meta.parent_id = self.request.parent_id.clone();
        meta.retries = Some(self.request.retries);
        if meta.status.is_ready() {
            // Celeriac extension (Python ignores unknown keys): when the run started.
            meta.extra.insert("date_started".into(), Value::String(crate::protocol::time::to_iso(&self.started_at)));
        }
        if self.app.config().result_extended {
            meta.name = Some(self.request.task.clone());
            meta.args = Some(self.body.args.clone());
            meta.kwargs = Some(self.body.kwargs.clone());
            meta.worker = Some(self.request.hostname.clone());
            meta.queue = Some(self.message.queue().to_owned());
        }
        meta
    }

    /// Stores `meta` unless results are ignored; a backend error is logged, not fatal.
    pub(crate) async fn store(&self, meta: ResultMeta) {
        if self.effective.ignore_result && !matches!(meta.status, State::Failure) {
            return;
        }
        // Retried with back-off (about 30 s in all), so a backend restart does not lose results.
        let mut pause = std::time::Duration::from_millis(100);
        for attempt in 1..=10 {
            match self.app.backend().store(&meta, self.app.config().result_expires_duration()).await {
                Ok(_) => return,
                Err(e) if attempt == 10 => {
                    tracing::error!(task_id = %meta.task_id, error = %e, "could not store result; giving up")
                }
                Err(e) => {
                    tracing::warn!(task_id = %meta.task_id, error = %e, attempt, "could not store result; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    /// Stores SUCCESS (with what the run and its callbacks sent as `children`) and runs
    /// `on_success` / `after_return`.
    pub(crate) async fn succeeded(&self, value: &Value) {
        // `store` would drop it: not even built for an ignored result.
        if !self.effective.ignore_result {
            let mut meta = self.meta(State::Success, value.clone());
            meta.children = Some(self.request.trail());
            self.store(meta).await;
        }
        self.task.on_success(&self.request, value);
        self.task.after_return(&self.request, &State::Success, value);
    }

    /// Stores RETRY and runs `on_retry`.
    pub(crate) async fn retrying(&self, exc: Option<&ExceptionInfo>) {
        let result = exc.map(|e| serde_json::to_value(e).unwrap_or(Value::Null)).unwrap_or(Value::Null);
        let mut meta = self.meta(State::Retry, result);
        meta.children = Some(vec![crate::protocol::result_tuple(&self.request.id)]);
        self.store(meta).await;
        let cause = exc
            .cloned()
            .unwrap_or_else(|| ExceptionInfo::new("Retry", "retry requested", crate::protocol::CELERY_EXCEPTIONS));
        self.task.on_retry(&self.request, &cause);
        self.task.after_return(&self.request, &State::Retry, &Value::Null);
    }

    /// Stores FAILURE, runs `on_failure` / `after_return` and every error reporter.
    pub(crate) async fn failed(&self, exc: &ExceptionInfo, traceback: Option<String>) {
        let meta = ResultMeta::exception(&self.request.id, State::Failure, exc, traceback.clone());
        let mut full = self.meta(State::Failure, meta.result.clone());
        full.traceback = traceback.clone();
        self.store(full).await;
        self.task.on_failure(&self.request, exc);
        self.task.after_return(&self.request, &State::Failure, &meta.result);
        let report = FailureReport {
            task_id: self.request.id.clone(),
            task_name: self.request.task.clone(),
            exc: exc.clone(),
            traceback,
            retries: self.request.retries,
            args: self.body.args.clone(),
            kwargs: self.body.kwargs.clone(),
            root_id: self.request.root_id.clone(),
            parent_id: self.request.parent_id.clone(),
            queue: self.message.queue().to_owned(),
            hostname: self.request.hostname.clone(),
            compensations: crate::canvas::saga::pending_compensations(self),
        };
        for reporter in self.app.error_reporters() {
            reporter.report(&report);
        }
    }

    /// Stores STARTED (`track_started`).
    pub(crate) async fn started(&self) {
        let info = serde_json::json!({"pid": std::process::id(), "hostname": self.request.hostname});
        let mut meta = self.meta(State::Started, info);
        meta.children = None;
        self.store(meta).await;
    }

    /// The retry message, as Celery's `retry()` builds it with `signature_from_request`: the
    /// same id, parent, root, group, chord, chain, callbacks, errbacks, expiry, time limits,
    /// custom headers, stamps, priority and queue, `retries + 1`, the new ETA, and the
    /// retry's own arguments and options if it gave any.
    pub(crate) fn retry_message(
        &self,
        eta: chrono::DateTime<chrono::Utc>,
        changes: &crate::task::Retry,
    ) -> Result<(String, Message), crate::Error> {
        use serde_json::Map;
        let h = &self.message.headers;
        let mut o = Map::new();
        let text = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        o.insert("task_id".into(), Value::String(h.id.clone()));
        o.insert("root_id".into(), text(&h.root_id));
        o.insert("parent_id".into(), text(&h.parent_id));
        o.insert("group_id".into(), text(&h.group));
        o.insert("group_index".into(), h.group_index.map(Value::from).unwrap_or(Value::Null));
        o.insert("shadow".into(), text(&h.shadow));
        let embed = self.body.embed.clone().unwrap_or_default();
        let to = |v: &Option<Vec<crate::protocol::Signature>>| {
            v.as_ref().map(|s| serde_json::to_value(s).unwrap_or_default()).unwrap_or(Value::Null)
        };
        o.insert(
            "chord".into(),
            embed.chord.as_ref().map(|c| serde_json::to_value(c).unwrap_or_default()).unwrap_or(Value::Null),
        );
        o.insert("chain".into(), to(&embed.chain));
        o.insert("link".into(), to(&embed.callbacks));
        o.insert("link_error".into(), to(&embed.errbacks));
        o.insert("expires".into(), text(&h.expires));
        let (hard, soft) = h.timelimit.clone();
        o.insert("time_limit".into(), hard.map(Value::Number).unwrap_or(Value::Null));
        o.insert("soft_time_limit".into(), soft.map(Value::Number).unwrap_or(Value::Null));
        let mut custom = self.request.headers();
        custom.retain(|k, _| !k.starts_with("x-death") && k != "x-first-death-exchange" && k != "redelivered");
        o.insert("headers".into(), Value::Object(custom));
        o.insert("retries".into(), Value::from(h.retries + 1));
        o.insert("reply_to".into(), text(&self.message.properties.reply_to));
        o.insert("replaced_task_nesting".into(), Value::from(h.replaced_task_nesting));
        o.insert("origin".into(), text(&h.origin));
        if let Some(Value::Array(names)) = &h.stamped_headers {
            o.insert("stamped_headers".into(), Value::Array(names.clone()));
            for (k, v) in &h.stamps {
                o.insert(k.clone(), v.clone());
            }
        }
        o.insert("ignore_result".into(), Value::Bool(h.ignore_result));
        o.insert("priority".into(), Value::from(self.message.properties.priority));
        o.insert("queue".into(), Value::String(self.message.queue().to_owned()));
        o.insert("eta".into(), Value::String(crate::protocol::time::to_iso(&eta)));
        for (k, v) in &changes.options {
            o.insert(k.clone(), v.clone());
        }
        let (args, kwargs) = retry_arguments(self, changes);
        let mut sig = crate::protocol::Signature::new(h.task.clone(), args);
        sig.kwargs = kwargs;
        sig.options = o;
        crate::canvas::send::build_message(&self.app, &sig, chrono::Utc::now())
    }
}

/// The retry's arguments. New positional arguments drop inherited keywords for the same
/// parameters; new keywords take the place of inherited positional ones (Celery #6494).
fn retry_arguments(call: &Call, changes: &crate::task::Retry) -> (Vec<Value>, serde_json::Map<String, Value>) {
    let req = &call.request;
    let params = call.task.params();
    match (&changes.args, &changes.kwargs) {
        (None, None) => (req.args.clone(), req.kwargs.clone()),
        (Some(a), Some(k)) => (a.clone(), k.clone()),
        (Some(a), None) => {
            let mut kwargs = req.kwargs.clone();
            for name in params.names.iter().take(a.len()) {
                kwargs.remove(name);
            }
            (a.clone(), kwargs)
        }
        (None, Some(k)) => {
            if !params.known || req.args.is_empty() {
                return (req.args.clone(), k.clone());
            }
            // Bind the inherited positional arguments to names, then let the new keywords win.
            let mut bound: Vec<(String, Value)> = params.names.iter().cloned().zip(req.args.iter().cloned()).collect();
            let extra: Vec<Value> = req.args.iter().skip(params.names.len()).cloned().collect();
            let mut kwargs = k.clone();
            for (name, value) in bound.iter_mut() {
                if let Some(v) = kwargs.remove(name.as_str()) {
                    *value = v;
                }
            }
            let mut args: Vec<Value> = bound.into_iter().map(|(_, v)| v).collect();
            args.extend(extra);
            (args, kwargs)
        }
    }
}
