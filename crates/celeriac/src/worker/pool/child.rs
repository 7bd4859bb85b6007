//! The pool process side: the worker binary started again with [`super::POOL_CHILD_ENV`] set
//! connects to the worker's socket, says hello, and then runs one job after another until the
//! worker closes the socket (or kills it at a hard time limit).
//!
//! Not for: deciding what a result means (the worker does that, with its own retry rules) or
//! storing it.

use super::wire::{self, Hello, Job, Outcome, Reply};
use crate::app::App;
use crate::protocol::{ExceptionInfo, Message};
use crate::worker::executor::{self, Effective};
use std::path::Path;
use tokio::net::UnixStream;

/// Serves jobs from the worker listening on `socket` until it hangs up.
pub(crate) async fn serve(app: &App, socket: &Path) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(socket).await?;
    wire::write_frame(&mut stream, &Hello { pid: std::process::id() }).await?;
    while let Some(job) = wire::read_frame::<_, Job>(&mut stream).await? {
        let reply = run(app, job).await;
        wire::write_frame(&mut stream, &reply).await?;
    }
    Ok(())
}

/// Runs one job. The hard limit is the worker's to enforce (it kills this process), so only
/// the soft timer runs here; the body always runs on a blocking thread, so that the timer
/// fires even while the body spins.
async fn run(app: &App, job: Job) -> Reply {
    let failure =
        |exc: ExceptionInfo| Reply { result: Outcome::Failure { exc, traceback: None }, children: Vec::new() };
    let message = match Message::from_wire(job.message.as_bytes()) {
        Ok(m) => m,
        Err(e) => return failure(ExceptionInfo::new("ProtocolError", e.to_string(), "celeriac")),
    };
    let body = match message.task_body() {
        Ok(b) => b,
        Err(e) => return failure(ExceptionInfo::new("ProtocolError", e.to_string(), "celeriac")),
    };
    let Some(task) = app.task(&message.headers.task).cloned() else {
        return failure(ExceptionInfo::not_registered(&message.headers.task));
    };
    let mut effective = Effective::new(app, task.as_ref(), &message);
    effective.time_limit = None;
    effective.soft_time_limit = job.soft_time_limit;
    let message = std::sync::Arc::new(message);
    let request = executor::request(app, &message, &body, &job.hostname, job.redelivered, false);
    let children = request.children.clone();
    let result = executor::run_task(task, request, &effective, true)
        .await
        .unwrap_or_else(|| Err(crate::TaskError::from_exception(ExceptionInfo::time_limit_exceeded(0.0))));
    let children = children.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Reply { result: result.into(), children }
}
