//! The crate's top-level error. Each variant names what went wrong and, where there is one,
//! the fix.

use crate::backend::BackendError;
use crate::broker::BrokerError;
use crate::config::ConfigError;
use crate::protocol::{ExceptionInfo, ProtocolError};
use std::time::Duration;

/// Everything that can go wrong outside a task's own code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unknown or has a bad value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The result backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Bytes that are not a task message.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// No task of that name is registered with this app.
    #[error("task {name:?} is not registered{}", suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    NotRegistered {
        /// The name asked for.
        name: String,
        /// The closest registered name.
        suggestion: Option<String>,
    },
    /// `AsyncResult::get` waited longer than its timeout.
    #[error(
        "timed out after {waited:?} waiting for the result of task {task_id} (state {state}); is a worker consuming its queue?"
    )]
    Timeout {
        /// Task id.
        task_id: String,
        /// How long it waited.
        waited: Duration,
        /// The last state seen.
        state: String,
    },
    /// The task failed (FAILURE), with the stored exception.
    #[error("task {task_id} failed: {exc}")]
    TaskFailed {
        /// Task id.
        task_id: String,
        /// The stored exception.
        exc: ExceptionInfo,
        /// The stored traceback.
        traceback: Option<String>,
    },
    /// The task was revoked or expired.
    #[error("task {task_id} was revoked: {exc}")]
    Revoked {
        /// Task id.
        task_id: String,
        /// The stored `TaskRevokedError`.
        exc: ExceptionInfo,
    },
    /// A stored result does not decode into the type asked for.
    #[error("result of task {task_id} does not decode as the requested type: {source}")]
    Decode {
        /// Task id.
        task_id: String,
        /// The decode error.
        source: serde_json::Error,
    },
    /// A canvas (chain, group, chord) that cannot be applied.
    #[error("cannot apply {task}: {problem}")]
    Canvas {
        /// The canvas signature's task name.
        task: String,
        /// What is wrong.
        problem: String,
    },
    /// Arguments could not be encoded.
    #[error("cannot encode arguments for task {task}: {source}")]
    Encode {
        /// Task name.
        task: String,
        /// The encode error.
        source: serde_json::Error,
    },
}
