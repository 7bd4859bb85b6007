//! A task call in Celery's JSON form: what `link=`, `embed.chain`, `embed.chord` and canvas
//! primitives carry (`celery/canvas.py`, `Signature`).
//!
//! Canvas building and sending live in `canvas/`; this file only owns the data and its encoding.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One task call: name, arguments and `apply_async` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Registered task name, or `celery.chain` / `celery.group` / `celery.chord`.
    pub task: String,
    /// Positional arguments (a parent's result is prepended unless `immutable`).
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// `apply_async` options: `task_id`, `queue`, `countdown`, `priority`, `link`, ...
    #[serde(default)]
    pub options: Map<String, Value>,
    /// `null` for a task; `"chain"`, `"group"` or `"chord"` for canvas primitives.
    #[serde(default)]
    pub subtask_type: Option<String>,
    /// `.si()`: the parent's result is not prepended.
    #[serde(default)]
    pub immutable: bool,
    /// Keys other writers add (e.g. `chord_size`), kept in order so nothing is lost.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Signature {
    /// A plain task signature with positional arguments.
    pub fn new(task: impl Into<String>, args: Vec<Value>) -> Self {
        Signature {
            task: task.into(),
            args,
            kwargs: Map::new(),
            options: Map::new(),
            subtask_type: None,
            immutable: false,
            extra: Map::new(),
        }
    }

    /// The pre-assigned task id in `options.task_id`, if any.
    pub fn task_id(&self) -> Option<&str> {
        self.options.get("task_id").and_then(Value::as_str)
    }

    /// Parses Celery's JSON form.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Serializes exactly as Python's `json.dumps` would.
    pub fn to_wire(&self) -> Vec<u8> {
        super::pyjson::to_vec(self).unwrap_or_default()
    }
}
