//! What the worker does after a task finished, from the message's `embed` and headers, as
//! Celery's `trace.py` does: the next chain step (which may be a group or chord) and `link`
//! callbacks on success; `link_error` errbacks (old style: the failed task's id prepended) and
//! FAILURE for the rest of the chain on failure; counting chord members and sending the chord
//! body (or failing it with `ChordError`); and the saga hooks.

use super::apply::{Lineage, apply};
use super::saga;
use crate::backend::ChordPart;
use crate::protocol::{CELERY_EXCEPTIONS, ExceptionInfo, ResultMeta, Signature, State};
use crate::worker::Call;
use serde_json::Value;

fn lineage(call: &Call, headers: serde_json::Map<String, Value>) -> Lineage {
    Lineage {
        parent_id: Some(call.request.id.clone()),
        root_id: Some(call.request.root_id.clone().unwrap_or_else(|| call.request.id.clone())),
        headers,
    }
}

async fn send(call: &Call, sig: Signature, prepend: Option<Value>, lineage: &Lineage) -> Option<String> {
    match apply(&call.app, sig, prepend, lineage).await {
        Ok(r) => Some(r.id().to_owned()),
        Err(e) => {
            tracing::error!(task_id = %call.request.id, error = %e, "could not send the next workflow step");
            None
        }
    }
}

async fn store_failure(call: &Call, task_id: &str, exc: &ExceptionInfo, extra: Option<(&str, Value)>) {
    let mut meta = ResultMeta::exception(task_id, State::Failure, exc, None);
    if let Some((k, v)) = extra {
        meta.extra.insert(k.to_owned(), v);
    }
    if let Err(e) = call.app.backend().store(&meta, call.app.config().result_expires_duration()).await {
        tracing::error!(task_id, error = %e, "could not store failure");
    }
}

/// Sends the next chain step, the callbacks and (for a chord member) maybe the chord body;
/// returns the ids of what was sent (the result's `children`).
pub(crate) async fn on_success(call: &Call, value: &Value) -> Vec<String> {
    let mut children = Vec::new();
    let headers = saga::headers_after_success(call, value);
    let lineage = lineage(call, headers);
    if let Some(embed) = call.body.embed.as_ref() {
        if let Some(mut chain) = embed.chain.clone()
            && let Some(mut next) = chain.pop()
        {
            if !chain.is_empty() {
                attach_chain(&mut next, chain);
            }
            children.extend(send(call, next, Some(value.clone()), &lineage).await);
        }
        for cb in embed.callbacks.iter().flatten() {
            children.extend(send(call, cb.clone(), Some(value.clone()), &lineage).await);
        }
    }
    children.extend(chord_part(call, State::Success, value.clone()).await);
    saga::after_compensation(call, State::Success, None).await;
    children
}

/// The rest of a chain rides on the next step: as its `chain` option when it is a task, on a
/// chord's body, otherwise as a wrapping chain.
fn attach_chain(next: &mut Signature, rest: Vec<Signature>) {
    match next.subtask_type.as_deref() {
        None => {
            next.options.insert("chain".into(), serde_json::to_value(&rest).unwrap_or(Value::Null));
        }
        _ => {
            let mut steps = vec![next.clone()];
            steps.extend(rest.into_iter().rev());
            *next = super::primitives::chain(steps);
        }
    }
}

/// Marks the rest of the chain failed, sends errbacks, counts a chord member's failure, and
/// starts or continues a saga rollback.
pub(crate) async fn on_failure(call: &Call, exc: &ExceptionInfo) {
    let rollback = saga::start_rollback(call, exc).await;
    if let Some(embed) = call.body.embed.as_ref() {
        for step in embed.chain.iter().flatten() {
            if let Some(id) = super::primitives::result_id(step) {
                store_failure(call, &id, exc, rollback.clone().map(|r| ("rollback", r))).await;
            }
        }
        let lineage = lineage(call, Default::default());
        for eb in embed.errbacks.iter().flatten() {
            send(call, eb.clone(), Some(Value::String(call.request.id.clone())), &lineage).await;
        }
    }
    let value = serde_json::to_value(exc).unwrap_or(Value::Null);
    chord_part(call, State::Failure, value).await;
    saga::after_compensation(call, State::Failure, Some(exc)).await;
}

/// Counts a finished chord member; the member that completes the chord sends the body.
async fn chord_part(call: &Call, state: State, result: Value) -> Option<String> {
    let embed = call.body.embed.as_ref()?;
    let body = embed.chord.clone()?;
    let group = call.request.group.clone()?;
    let part =
        ChordPart { index: call.request.group_index.unwrap_or(0), task_id: call.request.id.clone(), state, result };
    let parts = match call.app.backend().chord_part_return(&group, part).await {
        Ok(Some(parts)) => parts,
        Ok(None) => return None,
        Err(e) => {
            tracing::error!(group_id = %group, error = %e, "could not count chord member");
            return None;
        }
    };
    let lineage = lineage(call, Default::default());
    if let Some(bad) = parts.iter().find(|p| p.state.propagates()) {
        let cause = serde_json::from_value::<ExceptionInfo>(bad.result.clone())
            .map(|e| e.repr())
            .unwrap_or_else(|_| bad.result.to_string());
        let exc =
            ExceptionInfo::new("ChordError", format!("Dependency {} raised {cause}", bad.task_id), CELERY_EXCEPTIONS);
        if let Some(id) = &super::primitives::result_id(&body) {
            store_failure(call, id, &exc, None).await;
            for eb in body
                .options
                .get("link_error")
                .and_then(|v| serde_json::from_value::<Vec<Signature>>(v.clone()).ok())
                .into_iter()
                .flatten()
            {
                send(call, eb, Some(Value::String(id.clone())), &lineage).await;
            }
        }
        return None;
    }
    let results = Value::Array(parts.into_iter().map(|p| p.result).collect());
    send(call, body, Some(results), &lineage).await
}
