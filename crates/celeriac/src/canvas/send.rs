//! The client side of sending: a signature and its options become a protocol v2 message on the
//! routed queue (or, with `task_always_eager`, an inline run).

use crate::Error;
use crate::app::App;
use crate::protocol::{Embed, Message, Signature, TaskBody, TaskHeaders, args_repr, py_repr, time};
use crate::result::AsyncResult;
use chrono::{DateTime, Utc};
use serde_json::{Map, Number, Value};

/// Sends `signature`, of any kind (or runs it inline in eager mode).
pub(crate) async fn apply_async(app: &App, signature: Signature) -> Result<AsyncResult, Error> {
    let lineage = super::apply::Lineage::default();
    if signature.subtask_type.is_some() {
        let mut frozen = signature;
        let result_id = super::apply::freeze(&mut frozen)?;
        super::workflow::save(app, &frozen, &result_id).await?;
        return super::apply::apply(app, frozen, None, &lineage).await;
    }
    super::apply::apply(app, signature, None, &lineage).await
}

/// Sends one plain task signature.
pub(crate) async fn send_one(app: &App, signature: Signature) -> Result<AsyncResult, Error> {
    let (queue, message) = build_message(app, &signature, Utc::now())?;
    if app.config().task_always_eager {
        // Boxed: an eager task may send further tasks, which run eagerly too.
        return Box::pin(crate::worker::eager::run(app, message)).await;
    }
    app.broker().publish(&queue, &message).await?;
    Ok(AsyncResult::new(message.headers.id.clone(), app.clone()))
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
            .map(|v| serde_json::from_value(v.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
            .map_err(|source| Error::Encode { task: key.to_owned(), source }),
        Some(one) => serde_json::from_value(one.clone())
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
    let eta = match seconds(options, "countdown") {
        Some(c) => Some(now + chrono::Duration::microseconds((c * 1e6) as i64)),
        None => absolute(options, "eta", now),
    };
    headers.eta = eta.map(|t| time::to_iso(&t));
    let expires = absolute(options, "expires", now);
    headers.expires = expires.map(|t| time::to_iso(&t));
    let limit = |opt: &str, task: Option<f64>| seconds(options, opt).or(task).and_then(Number::from_f64);
    headers.timelimit = (
        limit("time_limit", registered.as_ref().and_then(|o| o.time_limit)),
        limit("soft_time_limit", registered.as_ref().and_then(|o| o.soft_time_limit)),
    );
    headers.argsrepr = Some(args_repr(&signature.args));
    headers.kwargsrepr = Some(py_repr(&Value::Object(signature.kwargs.clone())));
    headers.origin = Some(app.origin().to_owned());
    headers.ignore_result = options
        .get("ignore_result")
        .and_then(Value::as_bool)
        .or(registered.as_ref().and_then(|o| o.ignore_result))
        .unwrap_or(app.config().task_ignore_result);
    headers.retries = options.get("retries").and_then(Value::as_u64).unwrap_or(0) as u32;
    if let Some(Value::Object(extra)) = options.get("headers") {
        headers.extra.extend(extra.clone());
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
            chord: options.get("chord").and_then(|c| serde_json::from_value(c.clone()).ok()),
            extra: Map::new(),
        }),
    };
    let queue = match text(options, "queue") {
        Some(q) => q,
        None => app.config().route(&signature.task, registered.as_ref().and_then(|o| o.queue.as_deref())),
    };
    let mut message = Message::new(headers, &body, &queue);
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
    Ok((queue, message))
}
