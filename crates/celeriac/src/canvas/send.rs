//! The client side of sending: a signature and its options become a protocol v2 message on the
//! routed queue (or, with `task_always_eager`, an inline run).

use super::apply::{Call, Ctx, Current, Freeze};
use super::tree::{Node, Sig};
use crate::Error;
use crate::app::App;
use crate::protocol::{Embed, Message, Signature, TaskBody, TaskHeaders, args_repr, py_repr, time};
use crate::result::AsyncResult;
use crate::task::Request;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// Sends `signature`, of any kind, from a client (or runs it inline in eager mode). A canvas
/// is frozen first and recorded for `celeriac workflow`.
pub(crate) async fn apply_async(app: &App, signature: Signature) -> Result<AsyncResult, Error> {
    let ctx = Ctx::client(app);
    let mut sig = Sig::from_signature(signature).map_err(|e| super::apply::canvas_error("signature", e))?;
    if let Node::Group(tasks) = &mut sig.node {
        // Applied directly, a group flattens nested groups in order (`_prepared`); freezing
        // first must not reorder them (`_freeze_unroll` would).
        *tasks = flatten_in_order(std::mem::take(tasks));
    }
    let has_links = sig.opt("link").is_some() || sig.opt("link_error").is_some();
    if !matches!(sig.node, Node::Task) || has_links {
        // Recorded for `celeriac workflow`: canvases, and tasks with callbacks.
        let res = super::apply::freeze(&ctx, &mut sig, Freeze::default())?;
        super::workflow::save(app, &sig, &res.id()).await?;
    }
    let res = super::apply::apply_async(&ctx, sig, Call::default()).await?;
    Ok(AsyncResult::new(res.id(), app.clone()).with_tuple(res.as_tuple()))
}

fn flatten_in_order(tasks: Vec<Sig>) -> Vec<Sig> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.node {
            Node::Group(inner) => out.extend(flatten_in_order(inner)),
            Node::Chain(ref steps) if steps.is_empty() => {}
            _ => out.push(t),
        }
    }
    out
}

/// Sends `signature` from a running task: it is the parent, and the result joins its
/// `children`.
pub(crate) async fn apply_from(request: &Request, signature: Signature) -> Result<AsyncResult, Error> {
    let ctx = Ctx {
        app: request.app.clone(),
        current: Some(Current {
            id: request.id.clone(),
            root_id: request.root_id.clone(),
            priority: Some(request.priority),
            trail: request.children.clone(),
        }),
        headers: Map::new(),
        outbox: None,
    };
    let sig = Sig::from_signature(signature).map_err(|e| super::apply::canvas_error("signature", e))?;
    let res = super::apply::apply_async(&ctx, sig, Call::default()).await?;
    Ok(AsyncResult::new(res.id(), request.app.clone()).with_tuple(res.as_tuple()))
}

/// Sends plain task signatures in one broker batch (eager mode: one by one, inline).
pub(crate) async fn send_batch(app: &App, signatures: Vec<Signature>) -> Result<Vec<AsyncResult>, Error> {
    if app.config().task_always_eager {
        let mut out = Vec::with_capacity(signatures.len());
        for s in signatures {
            out.push(apply_async(app, s).await?);
        }
        return Ok(out);
    }
    let now = Utc::now();
    let mut built = Vec::with_capacity(signatures.len());
    for s in &signatures {
        if s.subtask_type.is_some() {
            return Err(super::apply::canvas_error(&s.task, "send_batch takes plain tasks; send canvases one by one"));
        }
        built.push(build_message(app, s, now)?);
    }
    let refs: Vec<(&str, &Message)> = built.iter().map(|(q, m)| (q.as_str(), m)).collect();
    app.broker().publish_many(&refs).await?;
    Ok(built.iter().map(|(_, m)| AsyncResult::new(m.headers.id.clone(), app.clone())).collect())
}

/// Sends one plain task signature (options already merged).
pub(crate) async fn send_one(app: &App, signature: Signature) -> Result<(), Error> {
    let (queue, message) = build_message(app, &signature, Utc::now())?;
    if app.config().task_always_eager {
        // Boxed: an eager task may send further tasks, which run eagerly too.
        Box::pin(crate::worker::eager::run(app, message)).await?;
        return Ok(());
    }
    app.broker().publish(&queue, &message).await?;
    Ok(())
}

fn text(options: &Map<String, Value>, key: &str) -> Option<String> {
    options.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn seconds(options: &Map<String, Value>, key: &str) -> Option<f64> {
    options.get(key).and_then(Value::as_f64)
}

fn signatures(options: &Map<String, Value>, key: &str) -> Result<Option<Vec<Signature>>, Error> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(Signature::deserialize)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|source| Error::Encode { task: key.to_owned(), source }),
        Some(one) => Signature::deserialize(one)
            .map(|s| Some(vec![s]))
            .map_err(|source| Error::Encode { task: key.to_owned(), source }),
    }
}

/// Absolute time for an `eta`/`expires` option given as seconds from `now` or as ISO text.
fn absolute(options: &Map<String, Value>, key: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match options.get(key)? {
        Value::Number(n) => n.as_f64().map(|s| now + chrono::Duration::microseconds((s * 1e6) as i64)),
        Value::String(s) => time::parse_iso(s),
        _ => None,
    }
}

/// Options `send_task` and `send_task_message` consume; any other option becomes a message
/// property, as kombu's `publish(**properties)` makes it (e.g. `app_id`).
const CONSUMED: &[&str] = &[
    "task_id",
    "countdown",
    "eta",
    "expires",
    "link",
    "link_error",
    "group_id",
    "group_index",
    "retries",
    "chord",
    "reply_to",
    "time_limit",
    "soft_time_limit",
    "root_id",
    "parent_id",
    "shadow",
    "chain",
    "replaced_task_nesting",
    "ignore_result",
    "stamped_headers",
    "queue",
    "exchange",
    "routing_key",
    "headers",
    "priority",
    "serializer",
    "compression",
    "delivery_mode",
    "retry",
    "retry_policy",
    "producer",
    "connection",
    "publisher",
    "router",
    "route_name",
    "result_cls",
    "task_type",
    "add_to_parent",
    "argsrepr",
    "kwargsrepr",
    "declare",
    "exchange_type",
    "timeout",
    "confirm_timeout",
    "use_link",
    "compensation",
    "interval",
    "max_retries",
    "eager",
    "header_delay",
    "expiration",
    "mandatory",
    "immediate",
    "origin",
];

/// The queue and message for `signature`, as Celery's `send_task` builds them.
pub(crate) fn build_message(app: &App, signature: &Signature, now: DateTime<Utc>) -> Result<(String, Message), Error> {
    let options = &signature.options;
    let registered = app.task(&signature.task).map(|t| t.options());
    let id = text(options, "task_id").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut headers = TaskHeaders::new(signature.task.clone(), id.clone());
    headers.root_id = Some(text(options, "root_id").unwrap_or_else(|| id.clone()));
    headers.parent_id = text(options, "parent_id");
    headers.group = text(options, "group_id");
    headers.group_index = options.get("group_index").and_then(Value::as_u64);
    headers.shadow = text(options, "shadow");
    let eta = match seconds(options, "countdown").filter(|c| *c != 0.0) {
        Some(c) => Some(now + chrono::Duration::microseconds((c * 1e6) as i64)),
        None => absolute(options, "eta", now),
    };
    headers.eta = eta.map(|t| time::to_iso(&t));
    let expires = absolute(options, "expires", now);
    headers.expires = match options.get("expires") {
        // A retry passes the expiry on as the text it was: keep it exactly.
        Some(Value::String(s)) => Some(s.clone()),
        _ => expires.map(|t| time::to_iso(&t)),
    };
    let limit = |opt: &str, task: Option<f64>| match options.get(opt) {
        Some(Value::Number(n)) => Some(n.clone()),
        Some(Value::Null) => None,
        Some(other) => other.as_f64().and_then(Number::from_f64),
        None => task.and_then(Number::from_f64),
    };
    headers.timelimit = (
        limit("time_limit", registered.as_ref().and_then(|o| o.time_limit)),
        limit("soft_time_limit", registered.as_ref().and_then(|o| o.soft_time_limit)),
    );
    headers.argsrepr = Some(text(options, "argsrepr").unwrap_or_else(|| args_repr(&signature.args)));
    headers.kwargsrepr =
        Some(text(options, "kwargsrepr").unwrap_or_else(|| py_repr(&Value::Object(signature.kwargs.clone()))));
    headers.origin = Some(text(options, "origin").unwrap_or_else(|| app.origin().to_owned()));
    headers.ignore_result = options
        .get("ignore_result")
        .and_then(Value::as_bool)
        .or(registered.as_ref().and_then(|o| o.ignore_result))
        .unwrap_or(app.config().task_ignore_result);
    headers.retries = options.get("retries").and_then(Value::as_u64).unwrap_or(0) as u32;
    headers.replaced_task_nesting = options.get("replaced_task_nesting").and_then(Value::as_u64).unwrap_or(0) as u32;
    let stamped: Vec<String> = match options.get("stamped_headers") {
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    if !stamped.is_empty() {
        headers.stamped_headers = Some(Value::from(stamped.clone()));
        for name in &stamped {
            headers.stamps.insert(name.clone(), options.get(name).cloned().unwrap_or(Value::Null));
        }
    }
    if let Some(Value::Object(extra)) = options.get("headers") {
        for (k, v) in extra {
            headers.extra.insert(k.clone(), v.clone());
        }
    }
    if let Some(comp) = options.get("compensation") {
        headers.extra.insert(super::saga::COMPENSATION.into(), comp.clone());
    }
    let body = TaskBody {
        args: signature.args.clone(),
        kwargs: signature.kwargs.clone(),
        embed: Some(Embed {
            callbacks: signatures(options, "link")?,
            errbacks: signatures(options, "link_error")?,
            chain: signatures(options, "chain")?,
            chord: match options.get("chord") {
                None | Some(Value::Null) => None,
                Some(c) => {
                    Some(Signature::deserialize(c).map_err(|source| Error::Encode { task: "chord".into(), source })?)
                }
            },
            extra: Map::new(),
        }),
    };
    let queue = match text(options, "queue") {
        Some(q) => q,
        None => app.config().route(&signature.task, registered.as_ref().and_then(|o| o.queue.as_deref())),
    };
    let mut message = Message::new(headers, &body, &queue);
    message.properties.reply_to = Some(text(options, "reply_to").unwrap_or_else(|| app.oid().to_owned()));
    message.properties.priority = options
        .get("priority")
        .and_then(Value::as_u64)
        .map(|p| p.min(9) as u8)
        .or(registered.as_ref().and_then(|o| o.priority))
        .or(app.config().task_default_priority)
        .unwrap_or(0);
    if let Some(exp) = expires {
        message.properties.expiration = Some(((exp - now).num_milliseconds().max(0)).to_string());
    }
    for (k, v) in options {
        if !CONSUMED.contains(&k.as_str()) && !stamped.iter().any(|s| s == k) {
            message.properties.extra.insert(k.clone(), v.clone());
        }
    }
    Ok((queue, message))
}
