//! `Task.replace` and `Task.add_to_chord`, as Celery 5.7 does them.
//!
//! Replacing: the replacement inherits the task's id (so results already handed out still
//! resolve), its callbacks and errbacks, its chord and group membership, and the rest of its
//! chain; a group is first turned into a chord ending in `celery.accumulate`, so something can
//! be linked after it. The replaced run then ends with no state of its own (`Ignore`).
//!
//! Adding to a chord: the new signature joins the chord the task is a header member of, and
//! the backend's count of expected members goes up by one.

use super::apply::{Call, Ctx, Current, Freeze, apply_async, canvas_error, freeze};
use super::tree::{Node, Sig};
use crate::protocol::{CELERY_EXCEPTIONS, ExceptionInfo, Signature};
use crate::task::{Request, TaskError};
use crate::{AsyncResult, Error};
use serde_json::{Map, Value};

fn ctx_of(request: &Request) -> Ctx {
    Ctx {
        app: request.app.clone(),
        current: Some(Current {
            id: request.id.clone(),
            root_id: request.root_id.clone(),
            priority: Some(request.priority),
            trail: request.children.clone(),
        }),
        headers: Map::new(),
        outbox: None,
    }
}

fn improperly_configured(message: &str) -> TaskError {
    TaskError::from_exception(ExceptionInfo::new("ImproperlyConfigured", message, CELERY_EXCEPTIONS))
}

fn accumulate() -> Sig {
    let mut s = Signature::new("celery.accumulate", Vec::new());
    s.kwargs.insert("index".into(), Value::from(0));
    Sig::task(s)
}

/// Builds the replacement as `Task.replace` does; `None` with the error to fail with.
pub(crate) fn replacement(ctx: &Ctx, request: &Request, signature: Signature) -> Result<Sig, TaskError> {
    if signature.options.contains_key("chord") {
        return Err(improperly_configured("A signature replacing a task must not be part of a chord"));
    }
    let allow = ctx.allow_error_cb_on_chord_header();
    let mut sig = Sig::from_signature(signature).map_err(|e| TaskError::new("TypeError", e))?;
    if matches!(&sig.node, Node::Chain(t) if t.is_empty()) {
        return Err(improperly_configured("Cannot replace with an empty chain"));
    }
    if sig.is_group() {
        sig = sig.or(accumulate(), allow);
    }
    if let Node::Chain(tasks) = &mut sig.node
        && tasks.last().is_some_and(Sig::is_group)
        && let Some(last) = tasks.pop()
    {
        tasks.push(last.or(accumulate(), allow));
    }
    for cb in request.callbacks() {
        sig.link(serde_json::to_value(cb).unwrap_or_default());
    }
    for eb in request.errbacks() {
        sig.link_error(serde_json::to_value(eb).unwrap_or_default(), allow);
    }
    // A chain's own callbacks move to its last task, so later steps do not link them twice.
    if sig.is_chain()
        && let Some(links) = sig.base.options.remove("link")
    {
        let links = match links {
            Value::Array(items) => items,
            one => vec![one],
        };
        if let Some(Node::Chain(tasks)) = Some(&mut sig.node)
            && let Some(last) = tasks.last_mut()
        {
            last.extend_list_option("link", links);
        }
    }
    freeze(ctx, &mut sig, Freeze { id: Some(request.id.clone()), ..Freeze::default() })
        .map_err(|e| TaskError::new("TypeError", e.to_string()))?;
    let nesting = request.replaced_task_nesting() + 1;
    sig.set("chord", request.chord().map(|c| serde_json::to_value(c).unwrap_or_default()).unwrap_or(Value::Null));
    sig.set("group_id", request.group.clone().map(Value::String).unwrap_or(Value::Null));
    sig.set("group_index", request.group_index.map(Value::from).unwrap_or(Value::Null));
    sig.set("root_id", request.root_id.clone().map(Value::String).unwrap_or(Value::Null));
    sig.set("replaced_task_nesting", nesting);
    if let Node::Chain(tasks) = &mut sig.node {
        for t in tasks {
            t.set("replaced_task_nesting", nesting);
        }
    }
    for step in request.chain().iter().rev() {
        let mut step = Sig::from_signature(step.clone()).map_err(|e| TaskError::new("TypeError", e))?;
        step.set("replaced_task_nesting", nesting);
        sig = sig.or(step, allow);
    }
    Ok(sig)
}

/// `Task.replace`: sends the replacement and ends this run.
pub(crate) async fn replace(request: &Request, signature: Signature) -> TaskError {
    let ctx = ctx_of(request);
    let sig = match replacement(&ctx, request, signature) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if request.is_eager {
        // Eager: the replacement runs inline; its result is this task's.
        return match apply_async(&ctx, sig, Call::default()).await {
            Ok(_) => TaskError::Ignore,
            Err(e) => TaskError::new("ReplaceError", e.to_string()),
        };
    }
    match apply_async(&ctx, sig, Call::default()).await {
        Ok(_) => TaskError::Ignore,
        Err(e) => TaskError::new("ReplaceError", format!("could not send the replacement: {e}")),
    }
}

/// `Task.add_to_chord`.
pub(crate) async fn add_to_chord(request: &Request, signature: Signature) -> Result<AsyncResult, Error> {
    let Some(chord) = request.chord() else {
        return Err(canvas_error(&signature.task, "Current task is not member of any chord"));
    };
    let ctx = ctx_of(request);
    let mut sig = Sig::from_signature(signature).map_err(|e| canvas_error("add_to_chord", e))?;
    sig.set("group_id", request.group.clone().map(Value::String).unwrap_or(Value::Null));
    sig.set("group_index", request.group_index.map(Value::from).unwrap_or(Value::Null));
    sig.set("chord", serde_json::to_value(chord).unwrap_or_default());
    sig.set("root_id", request.root_id.clone().map(Value::String).unwrap_or(Value::Null));
    let res = freeze(&ctx, &mut sig, Freeze::default())?;
    if let Some(g) = &request.group {
        ctx.app.backend().add_to_chord(g).await?;
    }
    apply_async(&ctx, sig, Call::default()).await?;
    Ok(AsyncResult::new(res.id(), ctx.app.clone()))
}
