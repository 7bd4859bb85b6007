//! Celery's wire formats: task messages (protocol v2, reading v1), signatures, result records
//! and exceptions. Each type owns its encoding (`from_wire` / `to_wire`) and writes the same
//! bytes Python's `json.dumps` writes, so golden fixtures captured from Celery round-trip.
//!
//! This module imports nothing else from the crate: brokers, backends and the worker build on
//! it, never the other way round.

mod exception;
mod message;
pub mod pyjson;
mod result_meta;
mod signature;
mod state;
pub mod time;

pub use exception::{BILLIARD_EXCEPTIONS, BUILTINS, CELERY_EXCEPTIONS, ExceptionInfo};
pub use message::{DeliveryInfo, Embed, Message, Properties, ProtocolError, TaskBody, TaskHeaders};
pub use result_meta::{ResultMeta, result_tuple};
pub use signature::Signature;
pub use state::State;

/// Python-style `repr()` of JSON values, as Celery's `argsrepr`/`kwargsrepr` headers carry.
pub fn py_repr(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => pyjson::python_float_repr(f),
            _ => n.to_string(),
        },
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("'{k}': {}", py_repr(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `repr()` of an args tuple: `(2, 3)`, `(1,)`, `()`.
pub fn args_repr(args: &[serde_json::Value]) -> String {
    match args {
        [one] => format!("({},)", py_repr(one)),
        many => format!("({})", many.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
    }
}
