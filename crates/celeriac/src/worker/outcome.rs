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
    pub message: Message,
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

    /// Stores SUCCESS and runs `on_success` / `after_return`.
    pub(crate) async fn succeeded(&self, value: &Value, children: &[String]) {
        let mut meta = self.meta(State::Success, value.clone());
        let sent = self.request.sent_children();
        meta.children = Some(sent.iter().chain(children).map(|c| crate::protocol::result_tuple(c)).collect());
        self.store(meta).await;
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

    /// The retry message: same id, `retries + 1`, the new ETA, parent = this task (as Celery).
    pub(crate) fn retry_message(&self, eta: chrono::DateTime<chrono::Utc>) -> Message {
        let mut m = self.message.clone();
        m.headers.retries += 1;
        m.headers.eta = Some(crate::protocol::time::to_iso(&eta));
        m.headers.parent_id = Some(self.request.id.clone());
        m.properties.delivery_tag = Some(uuid::Uuid::new_v4().to_string());
        m
    }
}
