//! Golden tests against real Celery 5.7.0 events and remote-control (pidbox) traffic on Redis
//! (`tests/fixtures/events/`, captured by `tests/interop/capture.sh --only events`; see
//! `tests/fixtures/README.md`).
//!
//! Every captured payload parses as an [`Envelope`] and re-encodes to the very same bytes, an
//! envelope built with [`Envelope::new`] from the same parts equals it too, and the fields that
//! Flower and `celery events` read are where they expect them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use celeriac::protocol::Envelope;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/events");

/// The Redis DB the capture used as broker: kombu puts it in every channel name.
const DB: u32 = 9;
const NODE: &str = "fixtures@celeriac";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct Fixture {
    name: String,
    bytes: Vec<u8>,
    env: Envelope,
    /// `("channel", "/9.celeryev/...")` or `("list", "<oid>.reply.celery.pidbox")`.
    kind: &'static str,
    key: String,
}

impl Fixture {
    fn exchange(&self) -> &str {
        self.env.properties["delivery_info"]["exchange"].as_str().unwrap()
    }

    fn routing_key(&self) -> &str {
        self.env.properties["delivery_info"]["routing_key"].as_str().unwrap()
    }

    fn delivery_mode(&self) -> u64 {
        self.env.properties["delivery_mode"].as_u64().unwrap()
    }

    /// The events of a `celeryev` message (a `task.multi` body is a list of them).
    fn events(&self) -> Vec<&Map<String, Value>> {
        match &self.env.body {
            Value::Array(items) => items.iter().map(|e| e.as_object().unwrap()).collect(),
            Value::Object(e) => vec![e],
            other => panic!("{}: event body is {other}", self.name),
        }
    }
}

fn index() -> Map<String, Value> {
    let text = fs::read_to_string(Path::new(DIR).join("index.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every fixture file (all `*.json` but `index.json`), sorted by name.
fn fixtures() -> Vec<Fixture> {
    let index = index();
    let mut names: Vec<String> = fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json") && n != "index.json")
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures in {DIR}");
    names
        .into_iter()
        .map(|name| {
            let bytes = fs::read(Path::new(DIR).join(&name)).unwrap();
            let env = Envelope::from_wire(&bytes).unwrap_or_else(|| panic!("{name}: not an envelope"));
            let entry = index.get(&name).unwrap_or_else(|| panic!("{name}: not in index.json")).as_object().unwrap();
            let (kind, key) = match (entry.get("channel"), entry.get("list")) {
                (Some(Value::String(c)), None) => ("channel", c.clone()),
                (None, Some(Value::String(l))) => ("list", l.clone()),
                other => panic!("{name}: index entry needs one of channel/list: {other:?}"),
            };
            Fixture { name, bytes, env, kind, key }
        })
        .collect()
}

fn fixture(name: &str) -> Fixture {
    fixtures().into_iter().find(|f| f.name == format!("{name}.json")).unwrap_or_else(|| panic!("no fixture {name}"))
}

/// Fails with the first differing byte and some context on both sides.
fn assert_same_bytes(what: &str, ours: &[u8], celery: &[u8]) {
    if ours == celery {
        return;
    }
    let at = ours.iter().zip(celery).position(|(a, b)| a != b).unwrap_or(ours.len().min(celery.len()));
    let show = |b: &[u8]| String::from_utf8_lossy(&b[at.saturating_sub(60)..(at + 60).min(b.len())]).into_owned();
    panic!(
        "{what}: bytes differ at offset {at} (ours {} bytes, Celery {} bytes)\n  ours:   …{}…\n  celery: …{}…",
        ours.len(),
        celery.len(),
        show(ours),
        show(celery)
    );
}

fn is_number(v: &Value) -> bool {
    v.as_f64().is_some()
}

fn is_float(v: &Value) -> bool {
    v.is_f64()
}

// ---------------------------------------------------------------------------------------------
// Every file
// ---------------------------------------------------------------------------------------------

#[test]
fn index_lists_every_fixture_with_a_description() {
    let index = index();
    let files: BTreeSet<String> = fixtures().into_iter().map(|f| f.name).collect();
    let listed: BTreeSet<String> = index.keys().cloned().collect();
    assert_eq!(files, listed, "index.json vs the files in {DIR}");
    for (name, entry) in &index {
        let d = entry["description"].as_str().unwrap_or_default();
        assert!(!d.is_empty() && !d.contains('\n'), "{name}: one-line description");
    }
}

#[test]
fn every_fixture_round_trips_byte_for_byte() {
    for f in fixtures() {
        // The body first, for a precise message when only the JSON inside differs.
        let env: Map<String, Value> = serde_json::from_slice(&f.bytes).unwrap();
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.decode(env["body"].as_str().unwrap()).unwrap();
        let ours = celeriac::protocol::pyjson::to_vec(&f.env.body).unwrap();
        assert_same_bytes(&format!("{} body", f.name), &ours, &body);
        assert_same_bytes(&f.name, &f.env.to_wire(), &f.bytes);
        // And it parses back to the same envelope.
        assert_eq!(Envelope::from_wire(&f.env.to_wire()).as_ref(), Some(&f.env), "{}", f.name);
    }
}

/// `value` with every float made again from its `f64`, the way Rust code builds an event
/// (`Value::from(runtime)`), so that the encoder, not the captured text, decides the spelling.
fn floats_from_f64(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.is_f64() => Value::from(n.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.iter().map(floats_from_f64).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), floats_from_f64(v))).collect()),
        other => other.clone(),
    }
}

#[test]
fn floats_built_in_rust_encode_like_celery() {
    for f in fixtures() {
        let object = |m: &Map<String, Value>| floats_from_f64(&Value::Object(m.clone())).as_object().unwrap().clone();
        let ours = Envelope {
            body: floats_from_f64(&f.env.body),
            headers: object(&f.env.headers),
            properties: object(&f.env.properties),
        };
        assert_same_bytes(&format!("{} with floats from f64", f.name), &ours.to_wire(), &f.bytes);
    }
}

#[test]
fn envelope_new_lays_out_properties_like_kombu() {
    // Built from the same body, headers, exchange, routing key and delivery mode, with the
    // (random) delivery tag copied over, Envelope::new gives Celery's bytes.
    for f in fixtures() {
        let mut ours = Envelope::new(
            f.env.body.clone(),
            f.env.headers.clone(),
            f.exchange(),
            f.routing_key(),
            u8::try_from(f.delivery_mode()).unwrap(),
        );
        let keys: Vec<&String> = ours.properties.keys().collect();
        let theirs: Vec<&String> = f.env.properties.keys().collect();
        assert_eq!(keys, theirs, "{}: property names and order", f.name);
        ours.properties.insert("delivery_tag".into(), f.env.properties["delivery_tag"].clone());
        assert_same_bytes(&format!("{} built with Envelope::new", f.name), &ours.to_wire(), &f.bytes);
    }
}

#[test]
fn channel_and_list_names_follow_kombu_redis_rules() {
    for f in fixtures() {
        assert_eq!(f.env.properties["body_encoding"], "base64", "{}", f.name);
        assert_eq!(f.env.properties["priority"], 0, "{}", f.name);
        assert!(uuid::Uuid::parse_str(f.env.properties["delivery_tag"].as_str().unwrap()).is_ok(), "{}", f.name);
        match f.kind {
            // A fanout exchange on Redis is a PUBLISH to /<db>.<exchange>[/<routing key>].
            "channel" => {
                let expected = if f.routing_key().is_empty() {
                    format!("/{DB}.{}", f.exchange())
                } else {
                    format!("/{DB}.{}/{}", f.exchange(), f.routing_key())
                };
                assert_eq!(f.key, expected, "{}", f.name);
            }
            // A pidbox reply goes through the direct exchange reply.celery.pidbox to the client's
            // queue <oid>.reply.celery.pidbox, bound with routing key <oid>.
            "list" => {
                assert_eq!(f.exchange(), "reply.celery.pidbox", "{}", f.name);
                assert_eq!(f.key, format!("{}.reply.celery.pidbox", f.routing_key()), "{}", f.name);
            }
            _ => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// Fields every event carries, first in this order (Celery's `EventDispatcher.send`), with
/// `timestamp` and `type` last.
fn check_common_fields(name: &str, e: &Map<String, Value>) {
    let keys: Vec<&str> = e.keys().map(String::as_str).collect();
    assert_eq!(keys[..4], ["hostname", "utcoffset", "pid", "clock"], "{name}: leading fields");
    assert_eq!(keys[keys.len() - 2..], ["timestamp", "type"], "{name}: trailing fields");
    assert_eq!(e["hostname"], NODE, "{name}");
    assert!(is_float(&e["utcoffset"]), "{name}: utcoffset is a float (hours): {}", e["utcoffset"]);
    assert!(e["pid"].is_u64(), "{name}");
    assert!(e["clock"].is_u64(), "{name}: clock is an int");
    assert!(is_float(&e["timestamp"]), "{name}: timestamp is a float (epoch seconds)");
    assert!(e["timestamp"].as_f64().unwrap() > 1.5e9, "{name}");
}

#[test]
fn event_messages_go_to_celeryev_with_the_hostname_header() {
    for f in fixtures().into_iter().filter(|f| f.exchange() == "celeryev") {
        assert_eq!(f.delivery_mode(), 1, "{}: events are transient", f.name);
        assert_eq!(Value::Object(f.env.headers.clone()), json!({"hostname": NODE}), "{}", f.name);
        for e in f.events() {
            check_common_fields(&f.name, e);
        }
    }
}

#[test]
fn worker_events_carry_what_flower_reads() {
    for (name, kind) in [
        ("worker-online", "worker-online"),
        ("worker-heartbeat", "worker-heartbeat"),
        ("worker-heartbeat_after_tasks", "worker-heartbeat"),
        ("worker-offline", "worker-offline"),
    ] {
        let f = fixture(name);
        assert_eq!(f.routing_key(), kind.replace('-', "."), "{name}");
        let Value::Object(e) = &f.env.body else { panic!("{name}: a worker event is one object") };
        let keys: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "hostname",
                "utcoffset",
                "pid",
                "clock",
                "freq",
                "active",
                "processed",
                "loadavg",
                "sw_ident",
                "sw_ver",
                "sw_sys",
                "timestamp",
                "type"
            ],
            "{name}: fields in Celery's order"
        );
        assert_eq!(e["type"], kind, "{name}");
        assert_eq!(e["freq"].as_f64(), Some(2.0), "{name}");
        assert!(is_float(&e["freq"]), "{name}: freq is a float");
        assert!(e["active"].is_u64() && e["processed"].is_u64(), "{name}");
        let load = e["loadavg"].as_array().unwrap();
        assert!(load.len() == 3 && load.iter().all(is_number), "{name}: loadavg");
        assert_eq!(e["sw_ident"], "py-celery", "{name}");
        assert_eq!(e["sw_ver"], "5.7.0", "{name}");
        assert_eq!(e["sw_sys"], "Linux", "{name}");
    }
    let f = fixture("worker-heartbeat_after_tasks");
    assert!(f.env.body["processed"].as_u64().unwrap() > 0);
}

#[test]
fn task_events_are_batched_as_task_multi() {
    let mut seen = BTreeSet::new();
    for f in fixtures().into_iter().filter(|f| f.name.starts_with("task_events_")) {
        assert_eq!(f.routing_key(), "task.multi", "{}: the worker batches task events", f.name);
        assert!(f.env.body.is_array(), "{}: a task.multi body is a list", f.name);
        let events = f.events();
        assert!(!events.is_empty(), "{}", f.name);
        let uuid = events[0]["uuid"].as_str().unwrap();
        let mut clock = 0;
        for e in events {
            let kind = e["type"].as_str().unwrap();
            seen.insert(kind.to_owned());
            let name = format!("{} {kind}", f.name);
            assert_eq!(e["uuid"], uuid, "{name}: one task per batch here");
            assert_eq!(e.keys().nth(4).map(String::as_str), Some("uuid"), "{name}: uuid right after clock");
            let c = e["clock"].as_u64().unwrap();
            assert!(c > clock, "{name}: clock increases within a batch");
            clock = c;
            let own: Vec<&str> = e.keys().map(String::as_str).skip(5).take(e.len() - 7).collect();
            let expected: &[&str] = match kind {
                "task-received" => &["name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires"],
                "task-started" => &[],
                "task-succeeded" => &["result", "runtime"],
                "task-failed" | "task-retried" => &["exception", "traceback"],
                "task-revoked" => &["terminated", "signum", "expired"],
                other => panic!("{name}: unexpected event {other}"),
            };
            assert_eq!(own, expected, "{name}: fields");
            match kind {
                "task-received" => {
                    assert!(e["name"].as_str().unwrap().starts_with("tasks."), "{name}");
                    assert!(e["args"].is_string() && e["kwargs"].is_string(), "{name}: reprs");
                    assert!(e["retries"].is_u64(), "{name}");
                }
                "task-succeeded" => {
                    assert!(e["result"].is_string(), "{name}: result is a repr");
                    assert!(is_float(&e["runtime"]), "{name}");
                }
                "task-failed" | "task-retried" => {
                    assert!(e["exception"].is_string(), "{name}");
                    assert!(
                        e["traceback"].as_str().unwrap().starts_with("Traceback (most recent call last):"),
                        "{name}"
                    );
                }
                "task-revoked" => {
                    assert_eq!(e["terminated"], false, "{name}");
                    assert_eq!(e["signum"], Value::Null, "{name}");
                    assert_eq!(e["expired"], false, "{name}");
                }
                _ => {}
            }
        }
    }
    for kind in ["task-received", "task-started", "task-succeeded", "task-failed", "task-retried", "task-revoked"] {
        assert!(seen.contains(kind), "no {kind} among the fixtures (seen: {seen:?})");
    }
}

#[test]
fn task_event_values_match_the_tasks_run() {
    let success = fixture("task_events_success_0");
    let types: Vec<&str> = success.events().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["task-received", "task-started", "task-succeeded"]);
    let events = success.events();
    assert_eq!(events[0]["name"], "tasks.add");
    assert_eq!(events[0]["args"], "(2, 3)");
    assert_eq!(events[0]["kwargs"], "{}");
    assert_eq!(events[0]["root_id"], events[0]["uuid"]);
    assert_eq!(events[0]["parent_id"], Value::Null);
    assert_eq!(events[0]["eta"], Value::Null);
    assert_eq!(events[2]["result"], "5");

    let failure = fixture("task_events_failure_0");
    let failed = failure.events()[2];
    assert_eq!(failed["type"], "task-failed");
    assert_eq!(failed["exception"], "KeyError('nope')");
    assert!(failed["traceback"].as_str().unwrap().ends_with("KeyError: 'nope'\n"));

    // The retried message: same uuid, retries + 1, parent_id = its own id.
    let retried = fixture("task_events_retry_0").events()[2].clone();
    assert_eq!(retried["type"], "task-retried");
    assert_eq!(retried["exception"], "Retry(Retry(...), ValueError('transient'), 0)");
    let again = fixture("task_events_retry_1").events()[0].clone();
    assert_eq!(again["type"], "task-received");
    assert_eq!(again["retries"], 1);
    assert_eq!(again["parent_id"], again["uuid"]);
}

// ---------------------------------------------------------------------------------------------
// Remote control (pidbox)
// ---------------------------------------------------------------------------------------------

#[test]
fn pidbox_requests_carry_method_arguments_ticket_and_reply_to() {
    let requests: Vec<Fixture> = fixtures().into_iter().filter(|f| f.name.ends_with("_request.json")).collect();
    assert!(requests.len() >= 4);
    for f in &requests {
        let name = &f.name;
        assert_eq!(f.key, format!("/{DB}.celery.pidbox"), "{name}");
        assert_eq!((f.exchange(), f.routing_key()), ("celery.pidbox", ""), "{name}");
        assert_eq!(f.delivery_mode(), 2, "{name}: the client sends requests persistent");
        let h: Vec<&str> = f.env.headers.keys().map(String::as_str).collect();
        assert_eq!(h, ["clock", "expires"], "{name}: headers");
        assert!(f.env.headers["clock"].is_u64(), "{name}");
        assert!(is_float(&f.env.headers["expires"]), "{name}: expires = send time + timeout");
        let body = f.env.body.as_object().unwrap();
        let keys: Vec<&str> = body.keys().map(String::as_str).collect();
        let replies = body.contains_key("ticket");
        let expected: &[&str] = if replies {
            &["method", "arguments", "destination", "pattern", "matcher", "ticket", "reply_to"]
        } else {
            &["method", "arguments", "destination", "pattern", "matcher"]
        };
        assert_eq!(keys, expected, "{name}: body fields");
        assert!(body["method"].is_string() && body["arguments"].is_object(), "{name}");
        assert!(body["destination"].is_null() || body["destination"].is_array(), "{name}");
        assert_eq!((&body["pattern"], &body["matcher"]), (&Value::Null, &Value::Null), "{name}");
        if replies {
            assert!(uuid::Uuid::parse_str(body["ticket"].as_str().unwrap()).is_ok(), "{name}");
            let reply_to = body["reply_to"].as_object().unwrap();
            assert_eq!(reply_to.keys().collect::<Vec<_>>(), ["exchange", "routing_key"], "{name}");
            assert_eq!(reply_to["exchange"], "reply.celery.pidbox", "{name}");
            assert!(uuid::Uuid::parse_str(reply_to["routing_key"].as_str().unwrap()).is_ok(), "{name}: oid");
        }
    }

    let ping = fixture("pidbox_ping_request");
    assert_eq!(ping.env.body["method"], "ping");
    assert_eq!(ping.env.body["arguments"], json!({}));
    assert_eq!(ping.env.body["destination"], Value::Null);
    let ping = fixture("pidbox_ping_destination_request");
    assert_eq!(ping.env.body["destination"], json!([NODE]));
    assert_eq!(fixture("pidbox_stats_request").env.body["method"], "stats");

    let revoke = fixture("pidbox_revoke_request");
    assert_eq!(revoke.env.body["method"], "revoke");
    let args = revoke.env.body["arguments"].as_object().unwrap();
    assert_eq!(args.keys().collect::<Vec<_>>(), ["task_id", "terminate", "signal"]);
    assert!(args["task_id"].is_string(), "one id is sent as a string, not a list");
    assert_eq!((&args["terminate"], &args["signal"]), (&json!(false), &json!("SIGTERM")));
    assert!(revoke.env.body.get("ticket").is_none() && revoke.env.body.get("reply_to").is_none());

    let enable = fixture("pidbox_enable_events_request");
    assert_eq!(enable.env.body["method"], "enable_events");
    assert_eq!(enable.env.body["arguments"], json!({}));
    assert!(enable.env.body.get("ticket").is_none());
}

#[test]
fn pidbox_replies_answer_their_request() {
    let replies: Vec<Fixture> = fixtures().into_iter().filter(|f| f.name.ends_with("_reply.json")).collect();
    assert_eq!(replies.len(), 3);
    for f in replies {
        let name = &f.name;
        let request = fixture(&name.replace("_reply.json", "_request"));
        assert_eq!(f.kind, "list", "{name}");
        assert_eq!(f.delivery_mode(), 1, "{name}: replies are transient");
        let h: Vec<&str> = f.env.headers.keys().map(String::as_str).collect();
        assert_eq!(h, ["ticket", "clock"], "{name}: headers");
        assert_eq!(f.env.headers["ticket"], request.env.body["ticket"], "{name}");
        assert!(f.env.headers["clock"].is_u64(), "{name}");
        assert_eq!(f.routing_key(), request.env.body["reply_to"]["routing_key"], "{name}");
        let body = f.env.body.as_object().unwrap();
        assert_eq!(body.keys().collect::<Vec<_>>(), [NODE], "{name}: {{node: answer}}");
    }
    assert_eq!(fixture("pidbox_ping_reply").env.body, json!({NODE: {"ok": "pong"}}));
    assert_eq!(fixture("pidbox_ping_destination_reply").env.body, json!({NODE: {"ok": "pong"}}));

    let stats = fixture("pidbox_stats_reply");
    let s = stats.env.body[NODE].as_object().unwrap();
    assert_eq!(
        s.keys().collect::<Vec<_>>(),
        ["total", "pid", "clock", "uptime", "pool", "broker", "prefetch_count", "rusage"],
        "stats fields"
    );
    assert!(s["clock"].is_string(), "stats clock is a string");
    assert!(s["uptime"].is_u64() && s["pid"].is_u64() && s["prefetch_count"].is_u64());
    assert_eq!(s["total"]["tasks.add"], 1);
    assert_eq!(s["broker"]["transport"], "redis");
    assert_eq!(s["broker"]["virtual_host"], DB.to_string());
    assert_eq!(s["pool"]["max-concurrency"], 1);
    assert!(s["rusage"]["utime"].is_f64() && s["rusage"]["maxrss"].is_u64());
}
