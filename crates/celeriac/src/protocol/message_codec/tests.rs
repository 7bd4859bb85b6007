//! The one-pass codec against the reference code in `message.rs` (the derived impls and the
//! envelope through `Value`s): every fixture plus some thousands of mutations of them must decode
//! to the same message or the same error text, and encode to the same bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::super::message::{Message, Properties, ProtocolError, TaskBody};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::fmt::Write as _;

/// A result as text that tells every difference apart: the value's `Debug` (numbers by their
/// text) or the error's variant and message (with its position).
fn outcome<T: std::fmt::Debug, E: std::fmt::Debug + std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {e:?} / {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// One input, every comparison
// ---------------------------------------------------------------------------------------------

/// Checks `bytes` through every path; returns a description of the first difference.
fn check_message(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let reference = Message::from_wire_reference(bytes);
    let new = Message::from_wire(bytes);
    if outcome(&reference) != outcome(&new) {
        return Err(format!("from_wire differs on\n{text}\nref: {}\nnew: {}", outcome(&reference), outcome(&new)));
    }
    if let Some(fast) = super::decode(bytes) {
        match &reference {
            Ok(m) if *m == fast => {}
            _ => return Err(format!("fast path differs on\n{text}\nref: {}\nfast: {fast:?}", outcome(&reference))),
        }
    }
    if let Ok(m) = &new {
        check_encode(m).map_err(|e| format!("{e}\non\n{text}"))?;
        check_body(&m.body)?;
    }
    Ok(())
}

fn check_encode(m: &Message) -> Result<(), String> {
    let reference = m.to_wire_reference();
    let wire = m.to_wire();
    if wire != reference {
        return Err(format!(
            "to_wire differs\nref: {}\nnew: {}",
            String::from_utf8_lossy(&reference),
            String::from_utf8_lossy(&wire)
        ));
    }
    Ok(())
}

fn check_body(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let reference = TaskBody::from_wire_reference(bytes);
    let new = TaskBody::from_wire(bytes);
    if outcome(&reference) != outcome(&new) {
        return Err(format!(
            "TaskBody::from_wire differs on\n{text}\nref: {}\nnew: {}",
            outcome(&reference),
            outcome(&new)
        ));
    }
    if let Some(fast) = super::decode_body(bytes) {
        match &reference {
            Ok(b) if *b == fast => {}
            _ => return Err(format!("fast body differs on\n{text}\nref: {}\nfast: {fast:?}", outcome(&reference))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inputs: the fixtures and mutations of them
// ---------------------------------------------------------------------------------------------

fn fixtures() -> Vec<Vec<u8>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let mut out = Vec::new();
    for dir in ["messages", "canvas/messages", "events"] {
        let mut paths: Vec<_> = std::fs::read_dir(format!("{root}/{dir}"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| !p.file_name().unwrap().to_string_lossy().contains(".redis.") && !p.ends_with("index.json"))
            .collect();
        paths.sort();
        out.extend(paths.into_iter().map(|p| std::fs::read(p).unwrap()));
    }
    assert!(out.len() > 40, "fixtures not found");
    out
}

/// JSON kept as text, so that repeated keys and exact number spellings survive.
#[derive(Clone, Debug)]
enum J {
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
    /// A scalar's JSON text.
    Raw(String),
}

impl J {
    fn of(v: &Value) -> J {
        match v {
            Value::Object(m) => J::Obj(m.iter().map(|(k, v)| (k.clone(), J::of(v))).collect()),
            Value::Array(a) => J::Arr(a.iter().map(J::of).collect()),
            other => J::Raw(other.to_string()),
        }
    }

    fn write(&self, out: &mut String, rng: &mut StdRng) {
        let sep = |rng: &mut StdRng| if rng.random_ratio(1, 8) { "," } else { ", " };
        match self {
            J::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep(rng));
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push_str(if rng.random_ratio(1, 8) { ":" } else { ": " });
                    v.write(out, rng);
                }
                out.push('}');
            }
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep(rng));
                    }
                    v.write(out, rng);
                }
                out.push(']');
            }
            J::Raw(text) => out.push_str(text),
        }
    }

    fn text(&self, rng: &mut StdRng) -> String {
        let mut out = String::new();
        self.write(&mut out, rng);
        out
    }

    fn field(&mut self, key: &str) -> Option<&mut J> {
        match self {
            J::Obj(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "-0.0",
    "0.0",
    "1",
    "-1",
    "2",
    "5",
    "10",
    "255",
    "256",
    "300",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211455",
    "340282366920938463463374607431768211456",
    "10000000000000000000000000000000000000000",
    "-10000000000000000000000000000000000000000",
    "1.0",
    "1.5",
    "10.50",
    "1E5",
    "1e+16",
    "1e-7",
    "0.000001",
    "2.5e-300",
    "1e400",
    "100000000000000000000.0",
];

const STRINGS: &[&str] = &[
    "\"\"",
    "\"x\"",
    "\"caf\\u00e9 \\ud83d\\ude00\"",
    "\"caf\u{e9}\"",
    "\"tab\\there\"",
    "\"base64\"",
    "\"BASE64\"",
    "\"application/json\"",
    "\"Application/JSON\"",
    "\"application/x-python-serialize\"",
    "\"gzip\"",
    "\"utf-8\"",
    "\"celery\"",
    "\"2031-01-02T03:04:05.678901+00:00\"",
    "\"W1syLCAzXSwge30sIG51bGxd\"",
    "\"@@@\"",
    "\"\\ud800\"",
];

static KEYS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    // Envelope, then the named headers, then the rest.
    let mut keys = vec!["body", "content-encoding", "content-type", "headers", "properties"];
    keys.extend(crate::protocol::TaskHeaders::FIELDS);
    keys.extend([
        "compression",
        // Properties
        "correlation_id",
        "reply_to",
        "delivery_mode",
        "expiration",
        "delivery_info",
        "priority",
        "body_encoding",
        "delivery_tag",
        "exchange",
        "routing_key",
        // Embed
        "callbacks",
        "errbacks",
        "chain",
        "chord",
        // Signature
        "args",
        "kwargs",
        "options",
        "subtask_type",
        "immutable",
        "chord_size",
        // Others
        "x-trace",
        "redelivered",
        "extra",
        "$serde_json::private::Number",
        "caf\u{e9}",
    ]);
    keys
});

fn scalar(rng: &mut StdRng) -> J {
    J::Raw(match rng.random_range(0..10) {
        0 => "null".to_owned(),
        1 => "true".to_owned(),
        2 => "false".to_owned(),
        3..=6 => NUMBERS[rng.random_range(0..NUMBERS.len())].to_owned(),
        _ => STRINGS[rng.random_range(0..STRINGS.len())].to_owned(),
    })
}

fn random_value(rng: &mut StdRng, depth: u32) -> J {
    match rng.random_range(0..if depth > 2 { 6 } else { 9 }) {
        0..=5 => scalar(rng),
        6 => J::Arr((0..rng.random_range(0..4)).map(|_| random_value(rng, depth + 1)).collect()),
        7 => J::Obj(
            (0..rng.random_range(0..4))
                .map(|_| (KEYS[rng.random_range(0..KEYS.len())].to_owned(), random_value(rng, depth + 1)))
                .collect(),
        ),
        _ => J::Arr(vec![scalar(rng), scalar(rng)]),
    }
}

fn random_key(rng: &mut StdRng) -> String {
    KEYS[rng.random_range(0..KEYS.len())].to_owned()
}

/// One random change to an object: insert, repeat, remove or replace an entry.
fn mutate_object(obj: &mut J, rng: &mut StdRng) {
    let J::Obj(entries) = obj else {
        *obj = random_value(rng, 1);
        return;
    };
    match rng.random_range(0..7) {
        0 => {
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, (random_key(rng), random_value(rng, 1)));
        }
        5 | 6 => {
            // A key no type names, which lands in `extra`.
            let key = ["x-trace", "redelivered", "extra", "caf\u{e9}", "x-n"][rng.random_range(0..5)];
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, (key.to_owned(), random_value(rng, 1)));
        }
        1 if !entries.is_empty() => {
            let from = rng.random_range(0..entries.len());
            let key = entries[from].0.clone();
            let value = if rng.random_bool(0.5) { entries[from].1.clone() } else { random_value(rng, 1) };
            let at = rng.random_range(0..=entries.len());
            entries.insert(at, (key, value));
        }
        2 if !entries.is_empty() => {
            entries.remove(rng.random_range(0..entries.len()));
        }
        _ if !entries.is_empty() => {
            let at = rng.random_range(0..entries.len());
            entries[at].1 = random_value(rng, 1);
        }
        _ => entries.push((random_key(rng), random_value(rng, 1))),
    }
}

/// A mutation of a fixture envelope, as text.
fn mutate_message(fixture: &[u8], rng: &mut StdRng) -> String {
    let mut env = J::of(&serde_json::from_slice::<Value>(fixture).unwrap());
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..10) {
            0 => mutate_object(&mut env, rng),
            1..=4 => {
                if let Some(h) = env.field("headers") {
                    mutate_object(h, rng);
                }
            }
            5 | 6 => {
                if let Some(p) = env.field("properties") {
                    mutate_object(p, rng);
                }
            }
            7 => {
                if let Some(d) = env.field("properties").and_then(|p| p.field("delivery_info")) {
                    mutate_object(d, rng);
                }
            }
            8 => {
                if let Some(s) = env.field("headers").and_then(|h| h.field("stamps")) {
                    mutate_object(s, rng);
                }
            }
            _ => {
                // A new body: a mutated `[args, kwargs, embed]`, base64 or plain.
                let Some(J::Raw(body)) = env.field("body").cloned() else { continue };
                let Ok(b64) = serde_json::from_str::<String>(&body) else { continue };
                let Ok(decoded) = BASE64.decode(b64) else { continue };
                let text = mutate_body(&decoded, rng);
                let encoded = if rng.random_bool(0.8) { BASE64.encode(&text) } else { text };
                *env.field("body").unwrap() = J::Raw(serde_json::to_string(&encoded).unwrap());
            }
        }
    }
    env.text(rng)
}

/// One of the signatures in `embed` (in `callbacks`, `errbacks`, `chain` or `chord`, or nested
/// in a signature's `kwargs`), if there is one.
fn signature_in<'a>(embed: &'a mut J, rng: &mut StdRng) -> Option<&'a mut J> {
    let J::Obj(entries) = embed else { return None };
    let mut found: Vec<&'a mut J> = Vec::new();
    for (key, value) in entries.iter_mut() {
        match (key.as_str(), value) {
            ("callbacks" | "errbacks" | "chain", J::Arr(items)) => {
                found.extend(items.iter_mut().filter(|i| matches!(i, J::Obj(_))))
            }
            ("chord", sig @ J::Obj(_)) => found.push(sig),
            _ => {}
        }
    }
    if found.is_empty() {
        return None;
    }
    let at = rng.random_range(0..found.len());
    Some(found.swap_remove(at))
}

/// A mutation of a task body `[args, kwargs, embed]`, as text.
fn mutate_body(body: &[u8], rng: &mut StdRng) -> String {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return String::from_utf8_lossy(body).into_owned() };
    let mut j = J::of(&value);
    if let J::Arr(items) = &mut j
        && let Some(embed) = items.get_mut(2)
    {
        for _ in 0..rng.random_range(1..3) {
            if matches!(embed, J::Raw(_)) {
                *embed = J::Obj(Vec::new());
            }
            match signature_in(embed, rng) {
                Some(sig) if rng.random_bool(0.6) => mutate_object(sig, rng),
                _ => mutate_object(embed, rng),
            }
        }
    }
    j.text(rng)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn every_fixture_decodes_and_encodes_as_before() {
    let mut failures = Vec::new();
    for bytes in fixtures() {
        if let Err(e) = check_message(&bytes) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn mutated_fixtures_decode_and_encode_as_before() {
    let fixtures = fixtures();
    let mut rng = StdRng::seed_from_u64(0x5eed_c0de);
    let mut failures = Vec::new();
    let (mut fast, mut total) = (0, 0);
    for _ in 0..6000 {
        let fixture = &fixtures[rng.random_range(0..fixtures.len())];
        let text = mutate_message(fixture, &mut rng);
        total += 1;
        fast += usize::from(super::decode(text.as_bytes()).is_some());
        if let Err(e) = check_message(text.as_bytes()) {
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The mutations must not all fall back, or the fast path went untested.
    assert!(fast * 4 > total, "only {fast} of {total} mutations took the fast path");
}

#[test]
fn mutated_bodies_decode_as_before() {
    let mut rng = StdRng::seed_from_u64(7);
    let bodies: Vec<Vec<u8>> = fixtures().iter().filter_map(|f| Message::from_wire(f).ok()).map(|m| m.body).collect();
    let mut failures = Vec::new();
    let (mut fast, mut total) = (0, 0);
    for _ in 0..4000 {
        let text = if rng.random_ratio(1, 20) {
            format!("[[], {{}}, {}]", random_value(&mut rng, 0).text(&mut rng))
        } else {
            mutate_body(&bodies[rng.random_range(0..bodies.len())], &mut rng)
        };
        total += 1;
        fast += usize::from(super::decode_body(text.as_bytes()).is_some());
        if let Err(e) = check_body(text.as_bytes()) {
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(fast * 4 > total, "only {fast} of {total} mutations took the fast path");
}

#[test]
fn messages_built_in_rust_encode_as_before() {
    // Extra keys that repeat a named field, absent optional properties, plain bodies.
    let fixtures = fixtures();
    let mut rng = StdRng::seed_from_u64(11);
    let mut failures = Vec::new();
    for i in 0..3000 {
        let Ok(mut m) = Message::from_wire(&fixtures[i % fixtures.len()]) else { continue };
        for _ in 0..rng.random_range(0..4) {
            let key = random_key(&mut rng);
            let value: Value = serde_json::from_str(&random_value(&mut rng, 1).text(&mut rng)).unwrap_or(Value::Null);
            match rng.random_range(0..3) {
                0 => m.headers.extra.insert(key, value),
                1 => m.properties.extra.insert(key, value),
                _ => m.properties.delivery_info.extra.insert(key, value),
            };
        }
        if rng.random_ratio(1, 4) {
            m.properties.reply_to = None;
            m.properties.delivery_mode = None;
        }
        if rng.random_ratio(1, 4) {
            m.properties.body_encoding = None;
            m.body = if rng.random_bool(0.5) { b"[[], {}, null]".to_vec() } else { vec![0xff, b'"', 0x7f, 0xc3, 0xa9] };
        }
        if rng.random_ratio(1, 8) {
            m.content_type = "caf\u{e9}/\"json\"".to_owned();
        }
        if let Err(e) = check_encode(&m) {
            let mut dump = String::new();
            let _ = write!(dump, "{m:?}");
            failures.push(format!("{e}\nfor {dump}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------
// Edges, spelled out
// ---------------------------------------------------------------------------------------------

const ADD: &str =
    "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d";

fn envelope(headers: &str, properties: &str) -> String {
    format!(
        r#"{{"body": "{ADD}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {headers}, "properties": {properties}}}"#
    )
}

#[test]
fn a_repeated_header_keeps_its_last_value_and_first_place() {
    // Through `Value`s a repeated key collapses: the last value, in the first key's place.
    let raw = envelope(
        r#"{"task": "a", "id": "i", "x-b": 1, "x-a": 1, "task": "b", "x-b": 2}"#,
        r#"{"body_encoding": "base64", "priority": 1, "priority": 2}"#,
    );
    check_message(raw.as_bytes()).unwrap();
    let m = Message::from_wire(raw.as_bytes()).unwrap();
    assert_eq!((m.headers.task.as_str(), m.properties.priority), ("b", 2));
    assert_eq!(m.headers.extra.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(), ["x-b=2", "x-a=1"]);
    // The hand-written impl read directly rejects a repeated named field, as the derive did.
    // The one-pass reader declines a repeated named field.
    assert!(super::decode(raw.as_bytes()).is_none());
}

#[test]
fn a_repeated_envelope_field_is_still_an_error() {
    let raw = format!(r#"{{"body": "{ADD}", "body": "", "headers": {{"task": "t", "id": "i"}}}}"#);
    check_message(raw.as_bytes()).unwrap();
    assert!(matches!(Message::from_wire(raw.as_bytes()), Err(ProtocolError::Envelope(_))));
}

#[test]
fn unknown_keys_anywhere_are_kept_in_order() {
    let raw = envelope(
        r#"{"x-first": [1, {"b": 2, "a": 1}], "lang": "py", "task": "t", "id": "i", "x-mid": null, "stamps": {"s2": 1, "s1": 2}, "x-last": "z"}"#,
        r#"{"x-p": true, "delivery_info": {"priority": 3, "exchange": "", "x": 1, "routing_key": "q"}, "body_encoding": "base64", "redelivered": false}"#,
    );
    check_message(raw.as_bytes()).unwrap();
    let m = Message::from_wire(raw.as_bytes()).unwrap();
    assert_eq!(m.headers.extra.keys().collect::<Vec<_>>(), ["x-first", "x-mid", "x-last"]);
    assert_eq!(m.properties.extra.keys().collect::<Vec<_>>(), ["x-p", "redelivered"]);
    assert_eq!(m.properties.delivery_info.extra.keys().collect::<Vec<_>>(), ["priority", "x"]);
    let wire = String::from_utf8(m.to_wire()).unwrap();
    assert!(
        wire.contains(
            r#""stamps": {"s2": 1, "s1": 2}, "x-first": [1, {"b": 2, "a": 1}], "x-mid": null, "x-last": "z"}"#
        ),
        "{wire}"
    );
    assert!(wire.contains(r#""delivery_info": {"exchange": "", "routing_key": "q", "priority": 3, "x": 1}, "priority": 0, "body_encoding": "base64", "x-p": true, "redelivered": false}"#), "{wire}");
}

#[test]
fn null_or_absent_properties_read_as_defaults() {
    for properties in ["null", "{}"] {
        let raw = envelope(r#"{"task": "t", "id": "i"}"#, properties);
        check_message(raw.as_bytes()).unwrap();
        let m = Message::from_wire(raw.as_bytes()).unwrap();
        assert_eq!(m.properties, Properties::empty());
        // Not base64 then: the body text is the body.
        assert_eq!(m.body, ADD.as_bytes());
    }
    let raw = r#"{"body": null, "headers": {"task": "t", "id": "i"}}"#;
    check_message(raw.as_bytes()).unwrap();
    let m = Message::from_wire(raw.as_bytes()).unwrap();
    assert!(m.body.is_empty());
    assert_eq!((m.content_encoding.as_str(), m.content_type.as_str()), ("utf-8", "application/json"));
}

#[test]
fn numbers_in_headers_read_as_through_values() {
    // The reference reads headers into `Value`s and converts them again, and that second pass
    // turns `-0` into `0`; the one-pass reader must give the same numbers.
    let raw = envelope(
        r#"{"task": "t", "id": "i", "timelimit": [-0, 1.50], "x-n": [-0, 1E5, 10000000000000000000000000000000000000000], "stamps": {"a": -0}}"#,
        r#"{"body_encoding": "base64", "x-q": -0}"#,
    );
    check_message(raw.as_bytes()).unwrap();
    let m = Message::from_wire(raw.as_bytes()).unwrap();
    assert_eq!(m.headers.timelimit.0.as_ref().map(ToString::to_string).as_deref(), Some("0"));
    assert_eq!(m.headers.extra["x-n"][0].to_string(), "0");
    assert_eq!(m.properties.extra["x-q"].to_string(), "0");
}

#[test]
fn bad_messages_fail_as_before() {
    let cases = [
        "".to_owned(),
        "[]".to_owned(),
        "{}".to_owned(),
        r#"{"body": "x"} trailing"#.to_owned(),
        envelope(r#"{"task": "t", "id": "i"}"#, r#"{"body_encoding": "base64", "delivery_mode": 300}"#),
        envelope(r#"{"task": "t", "id": "i", "retries": -1}"#, r#"{"body_encoding": "base64"}"#),
        envelope(r#"{"task": "t", "id": "i", "compression": "application/x-gzip"}"#, r#"{"body_encoding": "base64"}"#),
        envelope(r#"{"task": "t"}"#, r#"{"body_encoding": "base64"}"#),
        envelope(r#"{"task": null, "id": "i"}"#, r#"{"body_encoding": "base64"}"#),
        envelope("null", r#"{"body_encoding": "base64"}"#),
        envelope(r#"{"task": "t", "id": "i"}"#, "[]"),
        envelope(r#"{"task": "t", "id": "i"}"#, r#"{"delivery_info": null}"#),
        r#"{"body": "@@@", "headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}}"#.to_owned(),
        r#"{"body": [1, 2], "headers": {"task": "t", "id": "i"}}"#.to_owned(),
        r#"{"body": "x", "content-type": "application/x-yaml", "headers": {"task": "t", "id": "i"}}"#.to_owned(),
        r#"{"body": "x", "content-type": "APPLICATION/JSON", "headers": {"task": "t", "id": "i"}}"#.to_owned(),
        r#"{"body": "x", "content-encoding": null, "headers": {"task": "t", "id": "i"}}"#.to_owned(),
        r#"{"body": "e30=", "headers": {}, "properties": {"body_encoding": "base64"}}"#.to_owned(),
    ];
    for raw in cases {
        check_message(raw.as_bytes()).unwrap();
    }
    // Not UTF-8: in a header, in the body text, in the decoded body.
    let mut header = envelope(r#"{"task": "t", "id": "i", "x": "?"}"#, r#"{"body_encoding": "base64"}"#).into_bytes();
    let at = header.iter().position(|&b| b == b'?').unwrap();
    header[at] = 0xff;
    let plain = b"{\"body\": \"\xc3\", \"headers\": {\"task\": \"t\", \"id\": \"i\"}}".to_vec();
    let decoded = format!(
        r#"{{"body": "{}", "headers": {{"task": "t", "id": "i"}}, "properties": {{"body_encoding": "base64"}}}}"#,
        BASE64.encode(b"[[\"\xff\"], {}, null]")
    )
    .into_bytes();
    for raw in [header, plain, decoded] {
        check_message(&raw).unwrap();
    }
    check_body(b"[[\"\xff\"], {}, null]").unwrap();
}

#[test]
fn embed_reads_as_the_derive_did() {
    for body in [
        r#"[[], {}, {"x": -0, "callbacks": null, "x": 2, "chord": null}]"#,
        r#"[[], {}, {"chain": [], "chain": []}]"#,
        r#"[[], {}, {"chain": null, "errbacks": [{"task": "t", "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false, "chord_size": 2}]}]"#,
        r#"[[], {}, {"chord": 5}]"#,
        r#"[[], {}, {"chain": [{"task": "a", "x": -0, "args": [1.0], "task": "b"}]}]"#,
        r#"[[], {}, {"chain": [{"args": []}]}]"#,
        r#"[[], {}, {"chain": [{"task": "a", "args": null}]}]"#,
        r#"[[], {}, {"chord": {"task": "a", "immutable": true, "chord_size": 2, "z": {"b": 1, "a": 2}}, "callbacks": []}]"#,
        r#"[[], {}, {"errbacks": [{"task": "a"}, {"task": "b", "options": {"link": [{"task": "c"}]}}, null]}]"#,
        r#"[[], {}, []]"#,
        r#"[[], {}, null]"#,
        r#"[[], {}]"#,
    ] {
        check_body(body.as_bytes()).unwrap();
    }
}

#[test]
fn field_tables_follow_the_field_enums() {
    // `Seen` and the error messages index these tables by the enums' discriminants.
    for (i, name) in super::HEADER_FIELDS.iter().enumerate() {
        assert_eq!(super::header_field(name).map(|f| f as usize), Some(i), "{name}");
    }
    for (i, name) in super::PROPERTY_FIELDS.iter().enumerate() {
        assert_eq!(super::property_field(name).map(|f| f as usize), Some(i), "{name}");
    }
    for (i, name) in super::DELIVERY_INFO_FIELDS.iter().enumerate() {
        assert_eq!(super::delivery_info_field(name).map(|f| f as usize), Some(i), "{name}");
    }
    for (i, name) in super::EMBED_FIELDS.iter().enumerate() {
        assert_eq!(super::embed_field(name).map(|f| f as usize), Some(i), "{name}");
    }
    for (i, name) in super::SIGNATURE_FIELDS.iter().enumerate() {
        assert_eq!(super::signature_field(name).map(|f| f as usize), Some(i), "{name}");
    }
    for (i, name) in super::ENVELOPE_FIELDS.iter().enumerate() {
        assert_eq!(super::envelope_field(name).map(|f| f as usize), Some(i), "{name}");
    }
}
