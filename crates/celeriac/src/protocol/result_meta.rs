//! A stored task result, as Celery's backends write it (`Backend._get_result_meta`):
//! `{"status", "result", "traceback", "children", "date_done", ["group_id"], ["parent_id"],
//! [extended fields], "task_id"}`.

use super::{ExceptionInfo, State, pyjson, time};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The result record of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    /// Task state.
    pub status: State,
    /// Return value; an [`ExceptionInfo`] dict for FAILURE/RETRY/REVOKED.
    #[serde(default)]
    pub result: Value,
    /// Traceback text (Python) or error chain (Rust).
    #[serde(default)]
    pub traceback: Option<String>,
    /// Result tuples of tasks this task sent: `[[id, parent], null]` each.
    #[serde(default)]
    pub children: Option<Vec<Value>>,
    /// When it reached a ready state (ISO-8601), else null.
    #[serde(default)]
    pub date_done: Option<String>,
    /// Group id, only for group members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Parent task id, only when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// `result_extended`: task name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `result_extended`: positional arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Value>>,
    /// `result_extended`: keyword arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Map<String, Value>>,
    /// `result_extended`: worker node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// `result_extended`: retries so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// `result_extended`: queue (routing key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Anything else another writer stored, kept in order.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// The task id (always present, written last).
    #[serde(default)]
    pub task_id: String,
}

impl ResultMeta {
    /// A record with `status` and `result` and nothing else set.
    pub fn new(task_id: impl Into<String>, status: State, result: Value) -> Self {
        let date_done = status.is_ready().then(|| time::to_iso(&Utc::now()));
        ResultMeta {
            status,
            result,
            traceback: None,
            children: Some(Vec::new()),
            date_done,
            group_id: None,
            parent_id: None,
            name: None,
            args: None,
            kwargs: None,
            worker: None,
            retries: None,
            queue: None,
            extra: Map::new(),
            task_id: task_id.into(),
        }
    }

    /// What a missing record means: PENDING.
    pub fn pending(task_id: impl Into<String>) -> Self {
        let mut meta = ResultMeta::new(task_id, State::Pending, Value::Null);
        meta.children = None;
        meta
    }

    /// A FAILURE/RETRY/REVOKED record for `exc`.
    pub fn exception(
        task_id: impl Into<String>,
        status: State,
        exc: &ExceptionInfo,
        traceback: Option<String>,
    ) -> Self {
        let mut meta = ResultMeta::new(task_id, status, serde_json::to_value(exc).unwrap_or(Value::Null));
        meta.traceback = traceback;
        meta
    }

    /// The stored exception, for FAILURE/RETRY/REVOKED.
    pub fn exception_info(&self) -> Option<ExceptionInfo> {
        serde_json::from_value(self.result.clone()).ok()
    }

    /// `date_done` as a time.
    pub fn date_done_time(&self) -> Option<DateTime<Utc>> {
        self.date_done.as_deref().and_then(time::parse_iso)
    }

    /// Ids of the tasks listed in `children`.
    pub fn children_ids(&self) -> Vec<String> {
        fn id_of(tuple: &Value) -> Option<String> {
            // AsyncResult: [[id, parent], null]; GroupResult: [[gid, parent], [children...]].
            tuple.get(0)?.get(0)?.as_str().map(str::to_owned)
        }
        self.children.iter().flatten().filter_map(id_of).collect()
    }

    /// Parses Celery's JSON form.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Serializes exactly as Python's `json.dumps` would.
    pub fn to_wire(&self) -> Vec<u8> {
        pyjson::to_vec(self).unwrap_or_default()
    }
}

/// Celery's result tuple for a plain task: `[[id, null], null]`.
pub fn result_tuple(task_id: &str) -> Value {
    Value::Array(vec![Value::Array(vec![Value::String(task_id.to_owned()), Value::Null]), Value::Null])
}
