//! A protocol v2 task message and its kombu envelope (`celery/app/amqp.py` `as_task_v2`,
//! `kombu/transport/virtual/base.py`).
//!
//! [`Message::from_wire`] / [`Message::to_wire`] read and write the JSON envelope that virtual
//! transports (Redis, SQS, and our SQLite and in-memory brokers) store: the body base64-encoded,
//! headers and properties beside it. Field order follows what Celery 5.7 writes, so a captured
//! message re-encodes to the same bytes. Not for: sending (see `broker/`) or running (`worker/`).

use super::{Signature, message_codec, pyjson, time};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// Why bytes are not a task message we can run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The envelope is not the JSON object kombu writes.
    #[error("undecodable envelope: {0}")]
    Envelope(#[source] serde_json::Error),
    /// `properties.body_encoding` says base64 but the body is not.
    #[error("body is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The body is not `[args, kwargs, embed]`.
    #[error("undecodable body (expected [args, kwargs, embed]): {0}")]
    Body(#[source] serde_json::Error),
    /// Only JSON bodies are accepted (Celery's default `accept_content`).
    #[error("unsupported content type {0:?}: only application/json is accepted")]
    ContentType(String),
    /// Compressed bodies (`task_compression`) are not supported.
    #[error("unsupported compression {0:?}: send uncompressed JSON")]
    Compression(String),
    /// Neither a v2 `task` header nor a v1 body with `task`.
    #[error("not a task message: no `task` header (protocol v2) and no `task` in the body (v1)")]
    NotATask,
}

/// Protocol v2 headers, in the order Celery 5.7 writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskHeaders {
    /// Sender's language: `"py"` from Python, `"rs"` from us. Informational.
    #[serde(default, deserialize_with = "null_default")]
    pub lang: String,
    /// Registered task name. Its presence marks protocol v2.
    pub task: String,
    /// Task id (a UUID string).
    pub id: String,
    /// Alternative name for logs.
    #[serde(default)]
    pub shadow: Option<String>,
    /// Earliest run time, ISO-8601 (kept as sent; see [`TaskHeaders::eta_time`]).
    #[serde(default)]
    pub eta: Option<String>,
    /// Expiry time, ISO-8601.
    #[serde(default)]
    pub expires: Option<String>,
    /// Group id when part of a group or chord header.
    #[serde(default)]
    pub group: Option<String>,
    /// Position in the group.
    #[serde(default)]
    pub group_index: Option<u64>,
    /// Retries so far.
    #[serde(default, deserialize_with = "null_default")]
    pub retries: u32,
    /// `[hard, soft]` time limits in seconds (numbers kept as sent: `10` stays `10`).
    #[serde(default = "no_limits", deserialize_with = "limits_or_none")]
    pub timelimit: (Option<Number>, Option<Number>),
    /// First task of the workflow.
    #[serde(default)]
    pub root_id: Option<String>,
    /// Task that sent this one.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Python `repr(args)`, for logs.
    #[serde(default)]
    pub argsrepr: Option<String>,
    /// Python `repr(kwargs)`, for logs.
    #[serde(default)]
    pub kwargsrepr: Option<String>,
    /// Sender node name.
    #[serde(default)]
    pub origin: Option<String>,
    /// Do not store the result.
    #[serde(default, deserialize_with = "null_default")]
    pub ignore_result: bool,
    /// Set by `Task.replace()`.
    #[serde(default, deserialize_with = "null_default")]
    pub replaced_task_nesting: u32,
    /// Stamping API (5.3+).
    #[serde(default)]
    pub stamped_headers: Option<Value>,
    /// Stamping API (5.3+).
    #[serde(default, deserialize_with = "null_default")]
    pub stamps: Map<String, Value>,
    /// Any other header (user headers, `redelivered`, ...), kept in order.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `null` reads as the default: Celery's `send_task()` writes `"ignore_result": null` and other
/// writers may null any field.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn no_limits() -> (Option<Number>, Option<Number>) {
    (None, None)
}

fn limits_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(Option<Number>, Option<Number>), D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or((None, None)))
}

impl Properties {
    /// What an absent or `null` `properties` reads as: every field at its default.
    pub(super) fn empty() -> Self {
        Properties {
            correlation_id: None,
            reply_to: None,
            delivery_mode: None,
            expiration: None,
            delivery_info: DeliveryInfo::default(),
            priority: 0,
            body_encoding: None,
            delivery_tag: None,
            extra: Map::new(),
        }
    }
}

impl TaskHeaders {
    /// The named protocol v2 headers, in the order Celery 5.7 writes them (everything else is
    /// kept in `extra`).
    pub const FIELDS: [&str; 19] = [
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
    ];

    /// Headers with every field at what its absence reads as.
    pub(super) fn blank() -> Self {
        TaskHeaders {
            lang: String::new(),
            task: String::new(),
            id: String::new(),
            shadow: None,
            eta: None,
            expires: None,
            group: None,
            group_index: None,
            retries: 0,
            timelimit: (None, None),
            root_id: None,
            parent_id: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            ignore_result: false,
            replaced_task_nesting: 0,
            stamped_headers: None,
            stamps: Map::new(),
            extra: Map::new(),
        }
    }

    /// Headers for a fresh task with every optional field empty.
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        let id = id.into();
        TaskHeaders { lang: "rs".to_owned(), task: task.into(), root_id: Some(id.clone()), id, ..Self::blank() }
    }

    /// The ETA as a time; `None` when absent or unparsable.
    pub fn eta_time(&self) -> Option<DateTime<Utc>> {
        self.eta.as_deref().and_then(time::parse_iso)
    }

    /// The expiry as a time; `None` when absent or unparsable.
    pub fn expires_time(&self) -> Option<DateTime<Utc>> {
        self.expires.as_deref().and_then(time::parse_iso)
    }

    /// `(hard, soft)` time limits in seconds.
    pub fn time_limits(&self) -> (Option<f64>, Option<f64>) {
        (self.timelimit.0.as_ref().and_then(Number::as_f64), self.timelimit.1.as_ref().and_then(Number::as_f64))
    }
}

/// Where a message was routed (`properties.delivery_info`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeliveryInfo {
    /// Exchange name; `""` for the default exchange.
    #[serde(default)]
    pub exchange: String,
    /// Routing key; with the default exchange, the queue name.
    #[serde(default)]
    pub routing_key: String,
    /// Anything else a transport adds (`redelivered`, `priority`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Message properties, in the order kombu writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// Equal to the task id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The client's reply queue (used by `rpc://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// 2 = persistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    /// Message TTL in milliseconds as a string; set only when `expires` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    /// Exchange and routing key.
    #[serde(default)]
    pub delivery_info: DeliveryInfo,
    /// 0-9; on Redis and our SQL brokers 0 is served first.
    #[serde(default)]
    pub priority: u8,
    /// `"base64"` on virtual transports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_encoding: Option<String>,
    /// A fresh UUID per publish on virtual transports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_tag: Option<String>,
    /// Any other property (`expiration`, ...), kept in order.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `embed`, the third element of the body: what runs after this task.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Embed {
    /// `link=`: run with this task's result on success.
    #[serde(default)]
    pub callbacks: Option<Vec<Signature>>,
    /// `link_error=`: run with this task's id on failure.
    #[serde(default)]
    pub errbacks: Option<Vec<Signature>>,
    /// The rest of a chain, **last step first**.
    #[serde(default)]
    pub chain: Option<Vec<Signature>>,
    /// Chord body when this task is in a chord header.
    #[serde(default)]
    pub chord: Option<Signature>,
    /// Other keys, kept in order.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The body `[args, kwargs, embed]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskBody {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// Callbacks, errbacks, chain and chord; `None` when sent as `null`.
    pub embed: Option<Embed>,
}

impl Serialize for TaskBody {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.args, &self.kwargs, &self.embed).serialize(s)
    }
}

impl<'de> Deserialize<'de> for TaskBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (args, kwargs, embed) = <(Vec<Value>, Map<String, Value>, Option<Embed>)>::deserialize(d)?;
        Ok(TaskBody { args, kwargs, embed })
    }
}

impl TaskBody {
    /// Parses the body bytes.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, ProtocolError> {
        // As with `Message::from_wire`: a one-pass reader for `embed`, and the derived impls
        // whenever it declines.
        match message_codec::decode_body(bytes) {
            Some(body) => Ok(body),
            None => Self::from_wire_reference(bytes),
        }
    }

    /// [`TaskBody::from_wire`] with the derived impls (`embed` through serde's flatten buffer).
    pub(super) fn from_wire_reference(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::Body)
    }

    /// Serializes as Python's `json.dumps` would.
    pub fn to_wire(&self) -> Vec<u8> {
        pyjson::to_vec(self).unwrap_or_default()
    }
}

/// A task message: headers, properties and the serialized body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The body bytes (`[args, kwargs, embed]` as JSON), already base64-decoded.
    pub body: Vec<u8>,
    /// `"utf-8"`.
    pub content_encoding: String,
    /// `"application/json"`.
    pub content_type: String,
    /// Protocol v2 headers.
    pub headers: TaskHeaders,
    /// Properties.
    pub properties: Properties,
}

/// The envelope as it sits in a virtual transport's queue.
#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Value,
    #[serde(rename = "content-encoding", default = "utf8")]
    content_encoding: String,
    #[serde(rename = "content-type", default = "json_type")]
    content_type: String,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    properties: Value,
}

pub(super) fn utf8() -> String {
    "utf-8".to_owned()
}

pub(super) fn json_type() -> String {
    "application/json".to_owned()
}

impl Message {
    /// A new message for `task` with id `id`, body and routing to `queue`.
    pub fn new(headers: TaskHeaders, body: &TaskBody, queue: &str) -> Self {
        let properties = Properties {
            correlation_id: Some(headers.id.clone()),
            reply_to: None,
            delivery_mode: Some(2),
            expiration: None,
            delivery_info: DeliveryInfo { exchange: String::new(), routing_key: queue.to_owned(), extra: Map::new() },
            priority: 0,
            body_encoding: Some("base64".to_owned()),
            delivery_tag: Some(uuid::Uuid::new_v4().to_string()),
            extra: Map::new(),
        };
        Message { body: body.to_wire(), content_encoding: utf8(), content_type: json_type(), headers, properties }
    }

    /// Parses a kombu envelope (v2, or v1 converted to v2).
    pub fn from_wire(bytes: &[u8]) -> Result<Self, ProtocolError> {
        // A plain v2 message is read in one pass straight into the types; anything else (v1,
        // every error, the odd cases listed in `message_codec`) is read the reference way below,
        // which defines the result.
        match message_codec::decode(bytes) {
            Some(message) => Ok(message),
            None => Self::from_wire_reference(bytes),
        }
    }

    /// [`Message::from_wire`] through `Value`s: the envelope, then headers and properties
    /// converted with `from_value` and the derived `Deserialize` impls. The definition the
    /// one-pass reader is held to (see `message_codec/tests.rs`).
    pub(super) fn from_wire_reference(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(ProtocolError::Envelope)?;
        let properties: Properties = if env.properties.is_null() {
            serde_json::from_value(Value::Object(Map::new())).map_err(ProtocolError::Envelope)?
        } else {
            serde_json::from_value(env.properties).map_err(ProtocolError::Envelope)?
        };
        let body = match (&env.body, properties.body_encoding.as_deref()) {
            (Value::String(s), Some("base64")) => BASE64.decode(s.as_bytes())?,
            (Value::String(s), _) => s.clone().into_bytes(),
            (Value::Null, _) => Vec::new(),
            (other, _) => other.to_string().into_bytes(),
        };
        if let Some(Value::String(c)) = env.headers.get("compression") {
            return Err(ProtocolError::Compression(c.clone()));
        }
        if !env.content_type.eq_ignore_ascii_case("application/json") {
            return Err(ProtocolError::ContentType(env.content_type));
        }
        let mut message = Message {
            body,
            content_encoding: env.content_encoding,
            content_type: env.content_type,
            headers: TaskHeaders::new("", ""),
            properties,
        };
        if env.headers.contains_key("task") {
            message.headers = serde_json::from_value(Value::Object(env.headers)).map_err(ProtocolError::Envelope)?;
        } else {
            message.upgrade_v1()?;
        }
        Ok(message)
    }

    /// Converts a protocol v1 body (everything in the body) to v2 headers and body.
    fn upgrade_v1(&mut self) -> Result<(), ProtocolError> {
        let v1: Map<String, Value> = serde_json::from_slice(&self.body).map_err(|_| ProtocolError::NotATask)?;
        let text = |k: &str| v1.get(k).and_then(Value::as_str).map(str::to_owned);
        let task = text("task").ok_or(ProtocolError::NotATask)?;
        let id = text("id").ok_or(ProtocolError::NotATask)?;
        let mut headers = TaskHeaders::new(task, id);
        headers.lang = "py".to_owned();
        headers.eta = text("eta");
        headers.expires = text("expires");
        headers.group = text("taskset").or_else(|| text("group"));
        headers.retries = v1.get("retries").and_then(Value::as_u64).unwrap_or(0) as u32;
        let list = |k: &str| v1.get(k).and_then(|v| serde_json::from_value::<Vec<Signature>>(v.clone()).ok());
        let body = TaskBody {
            args: v1.get("args").and_then(Value::as_array).cloned().unwrap_or_default(),
            kwargs: v1.get("kwargs").and_then(Value::as_object).cloned().unwrap_or_default(),
            embed: Some(Embed {
                callbacks: list("callbacks"),
                errbacks: list("errbacks"),
                chain: None,
                chord: v1.get("chord").and_then(|v| serde_json::from_value(v.clone()).ok()),
                extra: Map::new(),
            }),
        };
        self.headers = headers;
        self.body = body.to_wire();
        Ok(())
    }

    /// The kombu envelope bytes, as Python's `json.dumps` would write them.
    pub fn to_wire(&self) -> Vec<u8> {
        message_codec::encode(self).unwrap_or_else(|| self.to_wire_reference())
    }

    /// [`Message::to_wire`] through `Value`s: headers and properties made into maps first, so an
    /// `extra` key that repeats a named field is written once, in the field's place, with the
    /// `extra` value. The definition the one-pass writer is held to.
    pub(super) fn to_wire_reference(&self) -> Vec<u8> {
        let base64 = self.properties.body_encoding.as_deref() == Some("base64");
        let body = if base64 {
            Value::String(BASE64.encode(&self.body))
        } else {
            Value::String(String::from_utf8_lossy(&self.body).into_owned())
        };
        let headers = match serde_json::to_value(&self.headers) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let env = Envelope {
            body,
            content_encoding: self.content_encoding.clone(),
            content_type: self.content_type.clone(),
            headers,
            properties: serde_json::to_value(&self.properties).unwrap_or(Value::Null),
        };
        pyjson::to_vec(&env).unwrap_or_default()
    }

    /// Decodes the body.
    pub fn task_body(&self) -> Result<TaskBody, ProtocolError> {
        TaskBody::from_wire(&self.body)
    }

    /// The queue this message was routed to (the routing key on the default exchange).
    pub fn queue(&self) -> &str {
        &self.properties.delivery_info.routing_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_foreign_message_decodes() {
        // The hand-built message a foreign client may send (spec §1.1 [verified]).
        let raw = br#"{"body": "W1syLCA0MF0sIHt9LCBudWxsXQ==", "content-type": "application/json", "content-encoding": "utf-8", "headers": {"lang": "rs", "task": "tasks.add", "id": "abc"}, "properties": {"correlation_id": "abc", "delivery_info": {"exchange": "", "routing_key": "celery"}, "body_encoding": "base64", "delivery_tag": "t", "priority": 0}}"#;
        let m = Message::from_wire(raw).unwrap();
        assert_eq!(m.headers.task, "tasks.add");
        assert_eq!(m.queue(), "celery");
        let body = m.task_body().unwrap();
        assert_eq!(body.args, vec![Value::from(2), Value::from(40)]);
        assert!(body.embed.is_none());
    }

    #[test]
    fn null_headers_read_as_defaults() {
        // What Celery's `app.send_task()` writes for options it was not given.
        let raw = br#"{"body": "W1sxLCAyXSwge30sIG51bGxdAA==", "content-type": "application/json", "headers": {"lang": null, "task": "t", "id": "i", "retries": null, "timelimit": null, "ignore_result": null, "replaced_task_nesting": null, "stamps": null}, "properties": {"body_encoding": "base64"}}"#;
        let m = Message::from_wire(raw).unwrap();
        assert!(!m.headers.ignore_result);
        assert_eq!((m.headers.retries, m.headers.time_limits()), (0, (None, None)));
    }

    #[test]
    fn v1_body_is_upgraded() {
        let body = br#"{"task": "proj.add", "id": "x1", "args": [1, 2], "kwargs": {"z": 3}, "retries": 2, "eta": null, "expires": null, "utc": true, "callbacks": null, "errbacks": null, "timelimit": [null, null], "taskset": null, "chord": null}"#;
        let env = serde_json::json!({"body": BASE64.encode(body), "content-type": "application/json", "content-encoding": "utf-8", "headers": {}, "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": "celery"}}});
        let m = Message::from_wire(env.to_string().as_bytes()).unwrap();
        assert_eq!(m.headers.task, "proj.add");
        assert_eq!(m.headers.retries, 2);
        let b = m.task_body().unwrap();
        assert_eq!(b.args.len(), 2);
        assert_eq!(b.kwargs["z"], 3);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        assert!(matches!(Message::from_wire(b"not json"), Err(ProtocolError::Envelope(_))));
        let bad64 = br#"{"body": "@@@", "content-type": "application/json", "headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}}"#;
        assert!(matches!(Message::from_wire(bad64), Err(ProtocolError::Base64(_))));
        let pickle = br#"{"body": "", "content-type": "application/x-python-serialize", "headers": {"task": "t", "id": "i"}, "properties": {}}"#;
        assert!(matches!(Message::from_wire(pickle), Err(ProtocolError::ContentType(_))));
        let no_task = br#"{"body": "e30=", "content-type": "application/json", "headers": {}, "properties": {"body_encoding": "base64"}}"#;
        assert!(matches!(Message::from_wire(no_task), Err(ProtocolError::NotATask)));
    }
}
