//! Eager mode (`task_always_eager`): `apply_async` runs the task inline, retries included
//! (without waiting out countdowns, as Celery's eager mode), and stores the result so
//! [`crate::AsyncResult`] reads it as usual. For users' own tests.

use super::executor::{self, Decision, Effective};
use super::outcome::Call;
use crate::Error;
use crate::app::App;
use crate::protocol::{ExceptionInfo, Message};
use crate::result::AsyncResult;

/// Runs `message` inline; returns its result handle (or the failure with
/// `task_eager_propagates`).
pub(crate) async fn run(app: &App, mut message: Message) -> Result<AsyncResult, Error> {
    let id = message.headers.id.clone();
    let name = message.headers.task.clone();
    let task = app
        .task(&name)
        .cloned()
        .ok_or_else(|| Error::NotRegistered { suggestion: app.suggest_task(&name), name: name.clone() })?;
    let mut body = message.task_body()?;
    loop {
        let effective = Effective::new(app, task.as_ref(), &message);
        let shared = std::sync::Arc::new(message.clone());
        let request = executor::request(app, &shared, &body, "eager@localhost", false, true);
        let call = Call {
            app: app.clone(),
            task: task.clone(),
            message: shared,
            body: body.clone(),
            request: request.clone(),
            effective,
            started_at: chrono::Utc::now(),
        };
        crate::canvas::saga::on_start(&call).await;
        let decision = executor::name_failure(executor::run(task.clone(), request, &call.effective).await, &name, &id);
        let failure = match decision {
            Decision::Success(value) => {
                crate::canvas::dispatch::on_success(&call, &value).await;
                call.succeeded(&value).await;
                crate::canvas::dispatch::after_success(&call, &value).await;
                None
            }
            Decision::Retry { exc, changes, .. } => {
                call.retrying(exc.as_ref()).await;
                // No waiting in eager mode: the retry runs at once, with its new arguments.
                let (_, next) = call.retry_message(chrono::Utc::now(), &changes)?;
                message = next;
                body = message.task_body()?;
                continue;
            }
            Decision::Failure { exc, traceback, .. } => Some((exc, traceback)),
            Decision::BadArguments(e) => Some((ExceptionInfo::type_error(e.to_string()), None)),
            Decision::Reject { reason, .. } => {
                Some((ExceptionInfo::new("Reject", reason, crate::protocol::CELERY_EXCEPTIONS), None))
            }
            Decision::Ignore => None,
        };
        if let Some((exc, traceback)) = failure {
            call.failed(&exc, traceback.clone()).await;
            crate::canvas::dispatch::on_failure(&call, &exc, traceback.as_deref()).await;
            if app.config().task_eager_propagates {
                return Err(Error::TaskFailed { task_id: id, exc, traceback });
            }
        }
        return Ok(AsyncResult::new(id, app.clone()));
    }
}
