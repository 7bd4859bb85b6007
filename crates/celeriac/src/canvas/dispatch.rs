//! What the worker sends after a task finished, from the message's `embed`: the next chain
//! step and `link` callbacks on success, `link_error` errbacks on failure (old style: the
//! failed task's id is prepended), as Celery's `trace.py` does.
//!
//! Group/chord signatures inside `embed` are expanded by the workflow engine (next issue);
//! until then such a step is reported as a FAILURE of the step rather than silently skipped.

use crate::protocol::{ExceptionInfo, ResultMeta, Signature, State};
use crate::worker::Call;
use serde_json::Value;

fn child_of(call: &Call, mut sig: Signature, first_arg: Option<Value>) -> Signature {
    if let Some(v) = first_arg.filter(|_| !sig.immutable) {
        sig.args.insert(0, v);
    }
    sig.options.insert("parent_id".into(), Value::String(call.request.id.clone()));
    let root = call.request.root_id.clone().unwrap_or_else(|| call.request.id.clone());
    sig.options.insert("root_id".into(), Value::String(root));
    sig
}

async fn send(call: &Call, sig: Signature) -> Option<String> {
    if sig.subtask_type.is_some() {
        let exc = ExceptionInfo::new("NotImplementedError", format!("canvas primitive {} in a workflow step is not supported yet", sig.task), "builtins");
        tracing::error!(task_id = %call.request.id, "{exc}");
        if let Some(id) = sig.task_id() {
            let meta = ResultMeta::exception(id, State::Failure, &exc, None);
            let _ = call.app.backend().store(&meta, call.app.config().result_expires_duration()).await;
        }
        return None;
    }
    match call.app.send_signature(sig).await {
        Ok(r) => Some(r.id().to_owned()),
        Err(e) => {
            tracing::error!(task_id = %call.request.id, error = %e, "could not send the next workflow step");
            None
        }
    }
}

/// Sends the next chain step and the callbacks; returns the ids of what was sent.
pub(crate) async fn on_success(call: &Call, value: &Value) -> Vec<String> {
    let mut children = Vec::new();
    let Some(embed) = call.body.embed.as_ref() else { return children };
    if let Some(mut chain) = embed.chain.clone()
        && let Some(next) = chain.pop()
    {
        let mut sig = child_of(call, next, Some(value.clone()));
        sig.options.insert("chain".into(), serde_json::to_value(&chain).unwrap_or(Value::Null));
        children.extend(send(call, sig).await);
    }
    for cb in embed.callbacks.iter().flatten() {
        children.extend(send(call, child_of(call, cb.clone(), Some(value.clone()))).await);
    }
    children
}

/// Marks the rest of the chain failed (so waiting clients do not hang) and sends errbacks.
pub(crate) async fn on_failure(call: &Call, exc: &ExceptionInfo) {
    let Some(embed) = call.body.embed.as_ref() else { return };
    for step in embed.chain.iter().flatten() {
        if let Some(id) = step.task_id() {
            let meta = ResultMeta::exception(id, State::Failure, exc, None);
            let _ = call.app.backend().store(&meta, call.app.config().result_expires_duration()).await;
        }
    }
    for eb in embed.errbacks.iter().flatten() {
        let sig = child_of(call, eb.clone(), Some(Value::String(call.request.id.clone())));
        send(call, sig).await;
    }
}
