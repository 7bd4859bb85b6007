//! The kombu envelope of messages that are not tasks: events and remote-control (pidbox)
//! requests and replies. Same layout as a task message on virtual transports: a base64 body,
//! headers and properties.

use super::pyjson;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

/// A non-task message: JSON body, free-form headers and properties.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The decoded body.
    pub body: Value,
    /// Message headers (`hostname` for events, `ticket`/`clock` for pidbox).
    pub headers: Map<String, Value>,
    /// Properties (`delivery_mode`, `delivery_info`, ...).
    pub properties: Map<String, Value>,
}

impl Envelope {
    /// A JSON message for `exchange`/`routing_key` with `delivery_mode` (1 = transient).
    pub fn new(body: Value, headers: Map<String, Value>, exchange: &str, routing_key: &str, delivery_mode: u8) -> Self {
        let mut properties = Map::new();
        properties.insert("delivery_mode".into(), delivery_mode.into());
        properties
            .insert("delivery_info".into(), serde_json::json!({"exchange": exchange, "routing_key": routing_key}));
        properties.insert("priority".into(), 0.into());
        properties.insert("body_encoding".into(), "base64".into());
        properties.insert("delivery_tag".into(), uuid::Uuid::new_v4().to_string().into());
        Envelope { body, headers, properties }
    }

    /// Parses an envelope; `None` if the bytes are not one or the body is not JSON.
    pub fn from_wire(bytes: &[u8]) -> Option<Self> {
        let mut raw: Map<String, Value> = serde_json::from_slice(bytes).ok()?;
        // Taken out of the parsed map rather than cloned.
        let object = |v: Option<Value>| match v {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let properties = object(raw.remove("properties"));
        let headers = object(raw.remove("headers"));
        let body_bytes = match (raw.get("body"), properties.get("body_encoding").and_then(Value::as_str)) {
            (Some(Value::String(s)), Some("base64")) => BASE64.decode(s.as_bytes()).ok()?,
            (Some(Value::String(s)), _) => s.clone().into_bytes(),
            (Some(other), _) => other.to_string().into_bytes(),
            (None, _) => return None,
        };
        let body = serde_json::from_slice(&body_bytes).ok()?;
        Some(Envelope { body, headers, properties })
    }

    /// The envelope bytes, as kombu writes them.
    pub fn to_wire(&self) -> Vec<u8> {
        // Written piece by piece, the same bytes as `pyjson::to_vec` of the object
        // `{"body", "content-encoding", "content-type", "headers", "properties"}` without
        // copying headers and properties into it first.
        let body = pyjson::to_vec(&self.body).unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() * 4 / 3 + 512);
        out.extend_from_slice(b"{\"body\": \"");
        // The base64 alphabet needs no escaping.
        out.extend_from_slice(BASE64.encode(body).as_bytes());
        out.extend_from_slice(
            b"\", \"content-encoding\": \"utf-8\", \"content-type\": \"application/json\", \"headers\": ",
        );
        out.extend_from_slice(&pyjson::to_vec(&self.headers).unwrap_or_default());
        out.extend_from_slice(b", \"properties\": ");
        out.extend_from_slice(&pyjson::to_vec(&self.properties).unwrap_or_default());
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire() {
        let mut headers = Map::new();
        headers.insert("hostname".into(), "w1@host".into());
        let e = Envelope::new(
            serde_json::json!({"type": "worker-heartbeat", "freq": 2.0}),
            headers,
            "celeryev",
            "worker.heartbeat",
            1,
        );
        let back = Envelope::from_wire(&e.to_wire()).unwrap();
        assert_eq!(back, e);
        assert!(Envelope::from_wire(b"nope").is_none());
    }

    #[test]
    fn written_as_the_object_it_stands_for() {
        // The bytes `to_wire` assembles are those of the whole envelope as one `Value`.
        let mut headers = Map::new();
        headers.insert("hostname".into(), "w1@h\u{e9}st".into());
        headers.insert("clock".into(), serde_json::json!([-0, 1e-05, {"b": 1, "a": null}]));
        let mut e =
            Envelope::new(serde_json::json!([{"type": "task-sent", "n": 1.5}]), headers, "celeryev", "task.multi", 1);
        e.properties.insert("x".into(), serde_json::json!({}));
        let env = serde_json::json!({
            "body": BASE64.encode(pyjson::to_vec(&e.body).unwrap()),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": e.headers,
            "properties": e.properties,
        });
        assert_eq!(String::from_utf8(e.to_wire()).unwrap(), pyjson::to_string(&env).unwrap());
        let empty = Envelope { body: Value::Null, headers: Map::new(), properties: Map::new() };
        assert_eq!(
            String::from_utf8(empty.to_wire()).unwrap(),
            r#"{"body": "bnVsbA==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {}, "properties": {}}"#
        );
    }

    #[test]
    fn floats_made_in_rust_are_written_as_python_writes_them() {
        let body = serde_json::json!({"runtime": 5e-05, "tiny": 1e-07, "big": 1e16, "t": 1795612203.4737475, "n": 2});
        let mut headers = Map::new();
        headers.insert("expires".into(), 1e-05.into());
        let e = Envelope::new(body, headers, "celeryev", "task.multi", 1);
        let wire: Value = serde_json::from_slice(&e.to_wire()).unwrap();
        let text = String::from_utf8(BASE64.decode(wire["body"].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!(text, r#"{"runtime": 5e-05, "tiny": 1e-07, "big": 1e+16, "t": 1795612203.4737475, "n": 2}"#);
        assert!(String::from_utf8(e.to_wire()).unwrap().contains(r#""headers": {"expires": 1e-05}"#));
    }
}
