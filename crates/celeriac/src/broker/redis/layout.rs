//! Where things live in Redis: key names (kombu's and Celeriac's own) and the value formats
//! that must stay byte-compatible with kombu (`unacked` triples, binding members, envelopes
//! flagged redelivered). No I/O here; `mod.rs` and the maintenance tasks use these names.

use crate::protocol::pyjson;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// kombu's separator between a queue name and its priority bucket, and between the parts of
/// a binding member.
pub const SEP: &str = "\x06\x16";
/// kombu's priority buckets.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];

/// The list key of `queue` for `priority` (kombu's buckets, 0 served first).
pub fn queue_key(queue: &str, priority: u8) -> String {
    let bucket = PRIORITY_STEPS.iter().rev().find(|s| **s <= priority.min(9)).copied().unwrap_or(0);
    if bucket == 0 { queue.to_owned() } else { format!("{queue}{SEP}{bucket}") }
}

/// The queue a list key belongs to (`celery\x06\x166` → `celery`).
pub(super) fn queue_of_list(list: &str) -> &str {
    list.split(SEP).next().unwrap_or(list)
}

/// Every key name of one broker, with `global_keyprefix` applied.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// `global_keyprefix` (empty by default).
    pub prefix: String,
    /// This process's node id (a random hex string, no dots).
    pub node: String,
    /// kombu's `unacked` hash: `delivery tag → [envelope, exchange, routing key]`.
    pub unacked: String,
    /// kombu's `unacked_index` sorted set: `delivery tag → delivery time` (float seconds).
    pub unacked_index: String,
    /// kombu's `unacked_mutex`, taken while restoring messages past the visibility timeout.
    pub unacked_mutex: String,
    /// *Celeriac*: ETA messages parked until due, `[list key, envelope, node]` by due time (ms).
    pub delayed: String,
    /// *Celeriac*: this node's claims, `delivery tag → the unacked_index score it last wrote`.
    pub claims: String,
    /// *Celeriac*: this node's liveness key (expires unless refreshed).
    pub alive: String,
    /// *Celeriac*: the nodes that claim messages, `node → JSON list of its holding lists`, so
    /// recovery finds a dead node's keys without scanning the keyspace.
    pub nodes: String,
    /// *Celeriac*: dead letters by id.
    pub dead: String,
    /// *Celeriac*: dead-letter ids by time.
    pub dead_index: String,
    /// *Celeriac*: the dead-letter id counter.
    pub dead_seq: String,
}

impl Keys {
    /// The names for `node`, with kombu's key names overridable as in kombu.
    pub fn new(prefix: &str, node: &str, unacked: &str, unacked_index: &str, unacked_mutex: &str) -> Self {
        let k = |name: &str| format!("{prefix}{name}");
        Keys {
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            unacked: k(unacked),
            unacked_index: k(unacked_index),
            unacked_mutex: k(unacked_mutex),
            delayed: k("celeriac.delayed"),
            claims: k(&format!("{CLAIMS}{node}")),
            alive: k(&format!("{ALIVE}{node}")),
            nodes: k("celeriac.nodes"),
            dead: k("celeriac.dead_letters"),
            dead_index: k("celeriac.dead_letters.index"),
            dead_seq: k("celeriac.dead_letters.seq"),
        }
    }

    /// `name` with the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The prefixed list key of `queue` for `priority`.
    pub fn list(&self, queue: &str, priority: u8) -> String {
        self.key(&queue_key(queue, priority))
    }

    /// The holding list a blocking pop of the (prefixed) list `list` moves into:
    /// `celeriac.inflight.<node>.<list>`.
    pub fn inflight(&self, list: &str) -> String {
        let bare = list.strip_prefix(self.prefix.as_str()).unwrap_or(list);
        self.key(&format!("{INFLIGHT}{}.{bare}", self.node))
    }

    /// kombu's routing table of `exchange`.
    pub fn binding(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding.{exchange}"))
    }

    /// kombu 5.7's record that the bindings of `exchange` do not expire.
    pub fn binding_permanent(&self, exchange: &str) -> String {
        self.key(&format!("_kombu.binding_permanent.{exchange}"))
    }

    /// Another node's claims hash.
    pub fn claims_of(&self, node: &str) -> String {
        self.key(&format!("{CLAIMS}{node}"))
    }

    /// Another node's liveness key.
    pub fn alive_of(&self, node: &str) -> String {
        self.key(&format!("{ALIVE}{node}"))
    }

    /// A `SCAN MATCH` pattern for the (prefixed) keys that start with `start`.
    pub fn pattern(&self, start: &str) -> String {
        let mut out = String::new();
        for c in self.prefix.chars().chain(start.chars()) {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('*');
        out
    }

    /// `(node, source list)` of a holding list key (from the node registry).
    pub fn parse_inflight(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(INFLIGHT)?;
        let (node, list) = rest.split_once('.')?;
        Some((node.to_owned(), self.key(list)))
    }
}

/// Key name starts of Celeriac's per-node keys.
pub(super) const CLAIMS: &str = "celeriac.claims.";
pub(super) const ALIVE: &str = "celeriac.alive.";
pub(super) const INFLIGHT: &str = "celeriac.inflight.";

/// A binding member as kombu writes it: `routing_key SEP pattern SEP queue`.
pub(super) fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{SEP}{queue}")
}

/// The queues a direct exchange's binding members route `routing_key` to (kombu's
/// `DirectExchange.lookup`).
pub(super) fn route<'a>(members: &'a [String], routing_key: &str) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for m in members {
        let mut parts = m.split(SEP);
        if let (Some(rk), Some(_pattern), Some(queue)) = (parts.next(), parts.next(), parts.next())
            && rk == routing_key
            && !out.contains(&queue)
        {
            out.push(queue);
        }
    }
    out
}

/// A message as kombu keeps it in `unacked`, unpacked for a restore.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Unacked {
    /// The envelope with kombu's `redelivered` flags set.
    pub payload: Vec<u8>,
    /// `delivery_info.exchange` at delivery.
    pub exchange: String,
    /// `delivery_info.routing_key` at delivery.
    pub routing_key: String,
    /// `properties.priority`.
    pub priority: u8,
}

/// Unpacks a kombu `unacked` value `[envelope, exchange, routing_key]`, setting the envelope's
/// `redelivered` flags as kombu's restore does.
pub(super) fn unpack_unacked(stored: &str) -> Option<Unacked> {
    let triple: Vec<Value> = serde_json::from_str(stored).ok()?;
    let mut envelope = triple.first()?.clone();
    let exchange = triple.get(1).and_then(Value::as_str).unwrap_or_default().to_owned();
    let routing_key = triple.get(2).and_then(Value::as_str).unwrap_or("celery").to_owned();
    if let Some(headers) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
        headers.insert("redelivered".into(), Value::Bool(true));
    }
    let priority = envelope.pointer("/properties/priority").and_then(Value::as_u64).unwrap_or(0).min(9) as u8;
    if let Some(info) = envelope.pointer_mut("/properties/delivery_info").and_then(Value::as_object_mut) {
        info.insert("redelivered".into(), Value::Bool(true));
    }
    Some(Unacked { payload: pyjson::to_vec(&envelope).ok()?, exchange, routing_key, priority })
}

/// The parts of an envelope that kombu's `unacked` entry needs, read without decoding the rest.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(default, borrow)]
    properties: Option<HeadProperties<'a>>,
}

#[derive(serde::Deserialize)]
struct HeadProperties<'a> {
    #[serde(default, borrow)]
    delivery_tag: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delivery_info: Option<HeadRoute<'a>>,
}

#[derive(serde::Deserialize)]
struct HeadRoute<'a> {
    #[serde(default, borrow)]
    exchange: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    routing_key: Option<Cow<'a, str>>,
}

/// The `properties` object of an envelope, read from the last `"properties"` key on: kombu
/// (and Celeriac) write it last, and the body before it is base64 or an escaped string, so
/// only the headers are skipped unread. `None` when that does not parse as properties (the
/// caller then reads the whole envelope).
fn last_properties(envelope: &[u8]) -> Option<HeadProperties<'_>> {
    const KEY: &[u8] = b"\"properties\"";
    let at = memchr::memmem::rfind(envelope, KEY)? + KEY.len();
    let rest = &envelope[at..];
    let colon = rest.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    if rest[colon] != b':' {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(&rest[colon + 1..]);
    serde::Deserialize::deserialize(&mut de).ok()
}

/// kombu's `unacked` entry of a message taken from `queue`: its delivery tag and the value
/// `[envelope, exchange, routing_key]` (the envelope's own bytes, not re-encoded). An envelope
/// without a usable tag (not kombu's, or not JSON) gets a fresh one, so it can still be acked,
/// restored and dead-lettered; without routing it is restored to `queue`.
pub(super) fn unacked_entry(envelope: &[u8], queue: &str) -> (String, Vec<u8>) {
    let props =
        last_properties(envelope).or_else(|| serde_json::from_slice::<Head>(envelope).ok().and_then(|h| h.properties));
    let (tag, route) = match props {
        Some(p) => (p.delivery_tag, p.delivery_info),
        None => (None, None),
    };
    let tag = tag.map_or_else(|| format!("celeriac-{}", uuid::Uuid::new_v4()), Cow::into_owned);
    let (exchange, routing_key) = match route {
        Some(r) => (r.exchange.unwrap_or_default(), r.routing_key.unwrap_or(Cow::Borrowed(queue))),
        None => (Cow::Borrowed(""), Cow::Borrowed(queue)),
    };
    let mut value = Vec::with_capacity(envelope.len() + exchange.len() + routing_key.len() + 12);
    value.push(b'[');
    value.extend_from_slice(envelope);
    value.extend_from_slice(b", ");
    value.extend(pyjson::to_vec(exchange.as_ref()).unwrap_or_else(|_| b"\"\"".to_vec()));
    value.extend_from_slice(b", ");
    value.extend(pyjson::to_vec(routing_key.as_ref()).unwrap_or_else(|_| b"\"\"".to_vec()));
    value.push(b']');
    (tag, value)
}

/// The database number in a `redis://host:port/db` URL (0 when absent).
pub(super) fn db_number(url: &str) -> i64 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    path.split_once('/').and_then(|(_, db)| db.trim_matches('/').parse().ok()).unwrap_or(0)
}

/// `properties.priority` of an envelope (0 when absent).
pub(super) fn priority_of(payload: &[u8]) -> u8 {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.pointer("/properties/priority").and_then(Value::as_u64))
        .unwrap_or(0)
        .min(9) as u8
}

/// `payload` with kombu's redelivered flag set (unchanged if it is not an envelope).
pub(super) fn mark_redelivered(payload: &[u8]) -> Vec<u8> {
    let Ok(mut env) = serde_json::from_slice::<Map<String, Value>>(payload) else { return payload.to_vec() };
    if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    pyjson::to_vec(&env).unwrap_or_else(|_| payload.to_vec())
}

/// A member of the delayed set: `[list key, envelope, node]` as JSON text.
pub(super) fn delayed_member(list: &str, payload: &[u8], node: &str) -> String {
    Value::Array(vec![Value::from(list), Value::from(String::from_utf8_lossy(payload).into_owned()), Value::from(node)])
        .to_string()
}

/// `(list key, envelope, node)` of a delayed-set member (node empty for older members).
pub(super) fn parse_delayed(member: &str) -> Option<(String, String, String)> {
    let item: Vec<String> = serde_json::from_str(member).ok()?;
    let mut it = item.into_iter();
    Some((it.next()?, it.next()?, it.next().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_numbers() {
        assert_eq!(db_number("redis://127.0.0.1:6379/5"), 5);
        assert_eq!(db_number("redis://:pw@h:6379/12?x=1"), 12);
        assert_eq!(db_number("rediss://h:6380/3#insecure"), 3);
        assert_eq!(db_number("redis://h:6379"), 0);
    }

    #[test]
    fn priority_buckets_follow_kombu() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("celery", 6), "celery\x06\x166");
        assert_eq!(queue_key("celery", 42), "celery\x06\x169");
        assert_eq!(queue_of_list("celery\x06\x166"), "celery");
    }

    #[test]
    fn unacked_values_unpack_with_redelivered_flags() {
        let stored = r#"[{"body": "e30=", "headers": {"task": "t", "id": "i"}, "properties": {"priority": 6, "delivery_info": {"exchange": "ex", "routing_key": "jobs"}}}, "ex", "jobs"]"#;
        let u = unpack_unacked(stored).unwrap();
        assert_eq!((u.exchange.as_str(), u.routing_key.as_str(), u.priority), ("ex", "jobs", 6));
        let env: Value = serde_json::from_slice(&u.payload).unwrap();
        assert_eq!(env["headers"]["redelivered"], true);
        assert_eq!(env["properties"]["delivery_info"]["redelivered"], true);
    }

    #[test]
    fn unacked_entries_keep_the_envelope_bytes_and_its_routing() {
        let env = br#"{"body": "e30=", "headers": {"task": "t"}, "properties": {"delivery_info": {"exchange": "ex", "routing_key": "jobs\u00e9"}, "delivery_tag": "tag-1"}}"#;
        let (tag, value) = unacked_entry(env, "celery");
        assert_eq!(tag, "tag-1");
        let text = String::from_utf8(value).unwrap();
        assert_eq!(text, format!("[{}, \"ex\", \"jobs\\u00e9\"]", std::str::from_utf8(env).unwrap()));
        let u = unpack_unacked(&text).unwrap();
        assert_eq!((u.exchange.as_str(), u.routing_key.as_str()), ("ex", "jobs\u{e9}"));
        // Not an envelope at all: a fresh tag, restored to the queue it came from.
        let (tag, value) = unacked_entry(b"not json", "celery");
        assert!(tag.starts_with("celeriac-"), "{tag}");
        assert_eq!(value, b"[not json, \"\", \"celery\"]");
        // No delivery_info: the routing is the queue's.
        let (_, value) = unacked_entry(br#"{"properties": {"delivery_tag": "x"}}"#, "jobs");
        assert!(value.ends_with(br#", "", "jobs"]"#));
    }

    #[test]
    fn bindings_route_like_a_direct_exchange() {
        let members = vec![binding_member("rk.a", "q1"), binding_member("rk.b", "q2"), binding_member("rk.a", "q3")];
        assert_eq!(route(&members, "rk.a"), ["q1", "q3"]);
        assert!(route(&members, "q1").is_empty());
    }

    #[test]
    fn per_node_keys_parse_back() {
        let keys = Keys::new("app:", "abc123", "unacked", "unacked_index", "unacked_mutex");
        let list = keys.list("jobs.high", 6);
        let inflight = keys.inflight(&list);
        assert_eq!(inflight, "app:celeriac.inflight.abc123.jobs.high\x06\x166");
        assert_eq!(keys.parse_inflight(&inflight), Some(("abc123".into(), list)));
        assert_eq!(keys.claims_of("abc123"), keys.claims);
        assert_eq!(Keys::new("a*b", "n", "u", "i", "m").pattern("celeriac.claims."), "a\\*bceleriac.claims.*");
        let member = delayed_member("app:jobs", br#"{"a": "/"}"#, "abc123");
        assert_eq!(parse_delayed(&member), Some(("app:jobs".into(), r#"{"a": "/"}"#.into(), "abc123".into())));
    }
}
