//! App-wide failure hook: one place that sees every final failure (to forward to an error
//! tracker such as Sentry). Per-task hooks are methods of [`crate::Task`].

use crate::protocol::ExceptionInfo;
use serde_json::{Map, Value};

/// A task that failed for good (state FAILURE), with its context.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FailureReport {
    /// Task id.
    pub task_id: String,
    /// Task name.
    pub task_name: String,
    /// The stored exception.
    pub exc: ExceptionInfo,
    /// Error chain / traceback text.
    pub traceback: Option<String>,
    /// Retries before it failed.
    pub retries: u32,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// First task of the workflow.
    pub root_id: Option<String>,
    /// Task that sent it.
    pub parent_id: Option<String>,
    /// Queue it ran from.
    pub queue: String,
    /// Worker node name.
    pub hostname: String,
    /// Compensations this failure starts (saga rollback), in the order they run.
    pub compensations: Vec<String>,
}

/// Receives every final failure. Called on the worker, after the FAILURE is stored; it must
/// not block for long (hand off to a channel for slow I/O).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an error reporter",
    note = "implement `celeriac::ErrorReporter` (one method, `report`) for it"
)]
pub trait ErrorReporter: Send + Sync + 'static {
    /// Called once per final failure.
    fn report(&self, failure: &FailureReport);

    /// Called when the rollback a failure started has finished (`done`: every compensation
    /// succeeded; `failed`: one failed for good), so the tracker learns how it ended.
    fn rollback_finished(&self, _rollback: &crate::canvas::saga::Rollback) {}
}

impl<F: Fn(&FailureReport) + Send + Sync + 'static> ErrorReporter for F {
    fn report(&self, failure: &FailureReport) {
        self(failure)
    }
}
