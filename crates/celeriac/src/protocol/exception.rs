//! A task error as Celery stores it: `{"exc_type", "exc_message", "exc_module"}`.
//!
//! Python turns this dict back into an exception object by looking the class up in
//! `exc_module` (or fabricating one of that name), so names that Python knows, such as
//! `builtins.ValueError` or `celery.exceptions.MaxRetriesExceededError`, come back as the real
//! classes on the Python side.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// An exception in Celery's JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    /// Class name (`__qualname__`), e.g. `"KeyError"`.
    pub exc_type: String,
    /// The exception's `args`: usually one message string, but any JSON values.
    #[serde(deserialize_with = "args_list")]
    pub exc_message: Vec<Value>,
    /// Module that defines the class, e.g. `"builtins"`.
    pub exc_module: String,
}

fn args_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    // Python writes `exc.args` (a list); some older writers put a bare string.
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => vec![other],
    })
}

/// Module Celery uses for its own exceptions.
pub const CELERY_EXCEPTIONS: &str = "celery.exceptions";
/// Module billiard uses for time limits and lost workers.
pub const BILLIARD_EXCEPTIONS: &str = "billiard.exceptions";
/// Python's module for builtin exceptions.
pub const BUILTINS: &str = "builtins";

impl ExceptionInfo {
    /// An exception with one message argument.
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>, module: impl Into<String>) -> Self {
        ExceptionInfo {
            exc_type: exc_type.into(),
            exc_message: vec![Value::String(message.into())],
            exc_module: module.into(),
        }
    }

    /// The message as one line: the string arguments joined, other values as JSON.
    pub fn message(&self) -> String {
        self.exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Python's `repr(exc)`, as Celery puts it in events: `KeyError('nope')`.
    pub fn repr(&self) -> String {
        let args: Vec<String> = self
            .exc_message
            .iter()
            .map(|v| match v {
                Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
                other => other.to_string(),
            })
            .collect();
        format!("{}({})", self.exc_type, args.join(", "))
    }

    /// `celery.exceptions.MaxRetriesExceededError` carrying the last error as a second argument.
    pub fn max_retries_exceeded(task: &str, id: &str, last: Option<&ExceptionInfo>) -> Self {
        let mut exc = ExceptionInfo::new(
            "MaxRetriesExceededError",
            format!("Can't retry {task}[{id}]: max retries exceeded"),
            CELERY_EXCEPTIONS,
        );
        if let Some(last) = last {
            exc.exc_message[0] = Value::String(format!(
                "Can't retry {task}[{id}]: max retries exceeded; last error: {}: {}",
                last.exc_type,
                last.message()
            ));
            exc.exc_message.push(serde_json::to_value(last).unwrap_or(Value::Null));
        }
        exc
    }

    /// `celery.exceptions.NotRegistered` for an unknown task name.
    pub fn not_registered(task: &str) -> Self {
        ExceptionInfo::new("NotRegistered", task, CELERY_EXCEPTIONS)
    }

    /// `celery.exceptions.TaskRevokedError`, as stored for revoked and expired tasks.
    pub fn revoked(reason: &str) -> Self {
        ExceptionInfo::new("TaskRevokedError", reason, CELERY_EXCEPTIONS)
    }

    /// `billiard.exceptions.TimeLimitExceeded` with the limit in seconds.
    pub fn time_limit_exceeded(seconds: f64) -> Self {
        ExceptionInfo {
            exc_type: "TimeLimitExceeded".into(),
            exc_message: vec![seconds.into()],
            exc_module: BILLIARD_EXCEPTIONS.into(),
        }
    }

    /// `billiard.exceptions.SoftTimeLimitExceeded`.
    pub fn soft_time_limit_exceeded(seconds: f64) -> Self {
        ExceptionInfo {
            exc_type: "SoftTimeLimitExceeded".into(),
            exc_message: vec![seconds.into()],
            exc_module: BILLIARD_EXCEPTIONS.into(),
        }
    }

    /// `billiard.exceptions.WorkerLostError`.
    pub fn worker_lost(message: &str) -> Self {
        ExceptionInfo::new("WorkerLostError", message, BILLIARD_EXCEPTIONS)
    }

    /// `builtins.TypeError`, which Python raises for arguments that do not fit.
    pub fn type_error(message: impl Into<String>) -> Self {
        ExceptionInfo::new("TypeError", message, BUILTINS)
    }
}

impl fmt::Display for ExceptionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}: {}", self.exc_module, self.exc_type, self.message())
    }
}
