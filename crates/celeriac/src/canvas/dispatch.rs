//! What the worker does after a run, as Celery's `trace.py` and the result backend do it, from
//! the message's `embed` and headers:
//!
//! - success: the `link` callbacks (several go out as one group), then the next `chain` step
//!   with the result prepended; after the result is stored, a chord member's part is counted
//!   and the member that completes the chord sends the body ([`chord_part_return`]);
//! - failure: the chord part (the body then fails with `ChordError`), FAILURE for every
//!   remaining chain step (`_fail_chain`), and the errbacks: new-style ones (`request, exc,
//!   traceback`) run inline here, old-style ones are sent with the failed task's id;
//! - the saga hooks (Celeriac's rollback).

use super::apply::{Call as Apply, Ctx, Current, apply_async, apply_signature, apply_value};
use super::result::Res;
use super::saga;
use super::tree::{Node, Sig};
use crate::backend::ChordPart;
use crate::protocol::{CELERY_EXCEPTIONS, ExceptionInfo, ResultMeta, Signature, State, py_repr};
use crate::worker::Call;
use serde_json::{Map, Value, json};

/// The apply context of a finished call: it is the current worker task.
pub(crate) fn ctx_of(call: &Call, headers: Map<String, Value>) -> Ctx {
    Ctx {
        app: call.app.clone(),
        current: Some(Current {
            id: call.request.id.clone(),
            root_id: call.request.root_id.clone(),
            priority: Some(call.request.priority),
            trail: call.request.children.clone(),
        }),
        headers,
        outbox: None,
    }
}

fn priority(call: &Call) -> Option<Value> {
    call.app.config().task_inherit_parent_priority.then(|| Value::from(call.request.priority))
}

/// Sends the `link` callbacks and the next chain step (`_dispatch_callbacks_and_chain`).
pub(crate) async fn on_success(call: &Call, value: &Value) {
    let headers = saga::headers_after_success(call, value);
    let ctx = ctx_of(call, headers);
    let root = call.request.root_id.clone().unwrap_or_else(|| call.request.id.clone());
    let opts = |a: Apply| {
        a.opt("parent_id", call.request.id.clone()).opt("root_id", root.clone()).opt("priority", priority(call))
    };
    let Some(embed) = call.body.embed.as_ref() else { return };
    let callbacks: Vec<Value> = embed.callbacks.iter().flatten().map(sig_value).collect();
    if callbacks.len() > 1 {
        let mut plain = Vec::new();
        for cb in callbacks {
            match Sig::from_value(&cb) {
                Ok(s) if s.is_group() => {
                    if let Err(e) = apply_async(&ctx, s, opts(Apply::args(vec![value.clone()]))).await {
                        tracing::error!(task_id = %call.request.id, error = %e, "could not send a callback group");
                    }
                }
                Ok(s) => plain.push(s),
                Err(e) => tracing::error!(task_id = %call.request.id, error = %e, "callback is not a signature"),
            }
        }
        if !plain.is_empty() {
            let g = Sig::group(plain, Map::new());
            if let Err(e) = apply_async(&ctx, g, opts(Apply::args(vec![value.clone()]))).await {
                tracing::error!(task_id = %call.request.id, error = %e, "could not send the callbacks");
            }
        }
    } else if let Some(cb) = callbacks.first() {
        apply_value(&ctx, cb, opts(Apply::args(vec![value.clone()]))).await;
    }
    if let Some(chain) = embed.chain.as_ref()
        && let Some((next, rest)) = chain.split_last()
    {
        let rest = Value::Array(rest.iter().map(sig_value).collect());
        apply_signature(&ctx, next, opts(Apply::args(vec![value.clone()])).opt("chain", rest)).await;
    }
}

fn sig_value(sig: &Signature) -> Value {
    serde_json::to_value(sig).unwrap_or(Value::Null)
}

/// After SUCCESS is stored: counts a chord member and continues a compensation.
pub(crate) async fn after_success(call: &Call, value: &Value) {
    chord_part_return(call, State::Success, value.clone()).await;
    saga::after_compensation(call, State::Success, None).await;
}

/// `mark_as_failure` after FAILURE is stored: the chord part, the rest of the chain, the
/// errbacks, and the saga rollback.
pub(crate) async fn on_failure(call: &Call, exc: &ExceptionInfo, traceback: Option<&str>) {
    let rollback = saga::start_rollback(call, exc).await;
    let exc_value = serde_json::to_value(exc).unwrap_or(Value::Null);
    chord_part_return(call, State::Failure, exc_value).await;
    if let Some(chain) = call.body.embed.as_ref().and_then(|e| e.chain.as_ref()) {
        let values: Vec<Value> = chain.iter().map(sig_value).collect();
        fail_chain(&ctx_of(call, Map::new()), &values, exc, traceback, rollback.as_ref()).await;
    }
    let errbacks: Vec<Value> =
        call.body.embed.as_ref().and_then(|e| e.errbacks.as_ref()).into_iter().flatten().map(sig_value).collect();
    if !errbacks.is_empty() {
        let request = request_value(call);
        call_errbacks(&ctx_of(call, Map::new()), &request, &errbacks, exc, traceback).await;
    }
    saga::after_compensation(call, State::Failure, Some(exc)).await;
}

/// The failed task's request as new-style errbacks receive it.
pub(crate) fn request_value(call: &Call) -> Value {
    let r = &call.request;
    let embed = call.body.embed.as_ref();
    json!({
        "id": r.id, "task": r.task, "args": r.args, "kwargs": r.kwargs, "retries": r.retries,
        "root_id": r.root_id, "parent_id": r.parent_id, "group": r.group, "group_index": r.group_index,
        "hostname": r.hostname, "delivery_info": r.delivery_info_value(), "is_eager": r.is_eager,
        "callbacks": embed.and_then(|e| e.callbacks.as_ref()).map(|v| serde_json::to_value(v).unwrap_or_default()),
        "errbacks": embed.and_then(|e| e.errbacks.as_ref()).map(|v| serde_json::to_value(v).unwrap_or_default()),
        "chain": embed.and_then(|e| e.chain.as_ref()).map(|v| serde_json::to_value(v).unwrap_or_default()),
        "chord": embed.and_then(|e| e.chord.as_ref()).map(|v| serde_json::to_value(v).unwrap_or_default()),
    })
}

async fn store_failure(ctx: &Ctx, task_id: &str, exc: &ExceptionInfo, traceback: Option<&str>, extra: Option<&Value>) {
    store_failure_with(ctx, task_id, exc, traceback, extra, false).await;
}

/// Stores FAILURE for `task_id`. `with_trail`: the record's `children` are what the current
/// task has sent so far, as Celery's `fail_from_current_stack` stores them (no request of its
/// own, so the current task's).
async fn store_failure_with(
    ctx: &Ctx,
    task_id: &str,
    exc: &ExceptionInfo,
    traceback: Option<&str>,
    extra: Option<&Value>,
    with_trail: bool,
) {
    let mut meta = ResultMeta::exception(task_id, State::Failure, exc, traceback.map(str::to_owned));
    meta.children = Some(match (&ctx.current, with_trail) {
        (Some(cur), true) => cur.trail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
        _ => Vec::new(),
    });
    if let Some(v) = extra {
        meta.extra.insert("rollback".into(), v.clone());
    }
    if let Err(e) = ctx.app.backend().store(&meta, ctx.app.config().result_expires_duration()).await {
        tracing::error!(task_id, error = %e, "could not store failure");
    }
}

/// `_fail_chain`: FAILURE for each remaining step (and its chord part), descending into the
/// bodies of chords in the chain.
async fn fail_chain(ctx: &Ctx, chain: &[Value], exc: &ExceptionInfo, traceback: Option<&str>, extra: Option<&Value>) {
    let mut pending: std::collections::VecDeque<Value> = chain.iter().cloned().collect();
    let mut guard = 0;
    while let Some(elem) = pending.pop_front() {
        guard += 1;
        if guard > 10_000 {
            break;
        }
        let options = elem.get("options").and_then(Value::as_object).cloned().unwrap_or_default();
        let id = options.get("task_id").and_then(Value::as_str).map(str::to_owned);
        let in_chord = options.contains_key("chord");
        let already_failed = match (&id, in_chord) {
            (Some(id), true) => ctx.app.backend().get(id).await.ok().flatten().is_some_and(|m| m.status.propagates()),
            _ => false,
        };
        if let Some(id) = &id {
            store_failure(ctx, id, exc, traceback, extra).await;
        }
        if in_chord
            && !already_failed
            && let Some(id) = &id
        {
            let part = PartOf {
                id: id.clone(),
                group: options.get("group_id").and_then(Value::as_str).map(str::to_owned),
                group_index: options.get("group_index").and_then(Value::as_u64),
                chord: options.get("chord").map(ChordBody::Value),
            };
            Box::pin(part_return(ctx, &part, State::Failure, serde_json::to_value(exc).unwrap_or_default())).await;
        }
        if elem.get("subtask_type").and_then(Value::as_str) == Some("chord")
            && let Some(body) = elem.get("kwargs").and_then(|k| k.get("body")).filter(|b| !b.is_null())
        {
            pending.push_back(body.clone());
        }
    }
}

/// Whether an errback is new-style (called inline with `request, exc, traceback`): a task of
/// this worker, not bound, taking more than one argument besides those stored in it
/// (Celery's `_errback_arity_greater(errback, 1)`).
fn is_new_style(ctx: &Ctx, errback: &Signature) -> bool {
    let Some(task) = ctx.app.task(&errback.task) else { return false };
    let params = task.params();
    if !params.known || params.bound {
        return false;
    }
    if !errback.immutable && (!errback.args.is_empty() || !errback.kwargs.is_empty()) {
        params.takes_more_than(1, errback.args.len(), &errback.kwargs)
    } else {
        params.takes_more_than(1, 0, &Map::new())
    }
}

/// `_call_task_errbacks`: new-style errbacks run here; old-style ones are sent as a group
/// with the failed task's id.
pub(crate) async fn call_errbacks(
    ctx: &Ctx,
    request: &Value,
    errbacks: &[Value],
    exc: &ExceptionInfo,
    traceback: Option<&str>,
) {
    let task_id = request.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
    let root_id = request.get("root_id").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| task_id.clone());
    let mut old_style = Vec::new();
    for eb in errbacks {
        let Ok(sig) = serde_json::from_value::<Signature>(eb.clone()) else {
            tracing::error!(errback = %eb, "errback is not a signature");
            continue;
        };
        if is_new_style(ctx, &sig) {
            let exc_value = serde_json::to_value(exc).unwrap_or_default();
            let tb = traceback.map(|t| Value::String(t.to_owned())).unwrap_or(Value::Null);
            if let Err(e) = run_inline(ctx, &sig, vec![request.clone(), exc_value, tb]).await {
                tracing::error!(errback = %sig.task, error = %e, "Errback raised an exception");
            }
        } else {
            match Sig::from_value(eb) {
                Ok(s) => old_style.push(s),
                Err(e) => tracing::error!(error = %e, "errback is not a signature"),
            }
        }
    }
    if !old_style.is_empty() {
        let g = Sig::group(old_style, Map::new());
        let call = Apply::args(vec![Value::String(task_id.clone())]).opt("parent_id", task_id).opt("root_id", root_id);
        if let Err(e) = apply_async(ctx, g, call).await {
            tracing::error!(error = %e, "could not send the errbacks");
        }
    }
}

/// Calls a registered task in this process (`Signature.__call__`): `args` in front of the
/// stored ones unless the signature is immutable.
pub(crate) async fn run_inline(ctx: &Ctx, sig: &Signature, args: Vec<Value>) -> Result<Value, crate::TaskError> {
    let Some(task) = ctx.app.task(&sig.task).cloned() else {
        return Err(crate::TaskError::from_exception(ExceptionInfo::not_registered(&sig.task)));
    };
    let (args, kwargs) = if sig.immutable {
        (sig.args.clone(), sig.kwargs.clone())
    } else {
        let mut a = args;
        a.extend(sig.args.iter().cloned());
        (a, sig.kwargs.clone())
    };
    let request = crate::task::Request::inline(&ctx.app, &sig.task, args.clone(), kwargs.clone());
    let run = task.run(request, crate::task::Args::new(sig.task.clone(), args, kwargs));
    match tokio::spawn(run).await {
        Ok(r) => r,
        Err(e) => Err(crate::TaskError::new("Panic", e.to_string())),
    }
}

/// `mark_as_revoked`: a revoked (or expired) chord member counts as revoked, which fails the
/// chord.
pub(crate) async fn on_revoked(
    app: &crate::App,
    message: &crate::protocol::Message,
    body: &crate::protocol::TaskBody,
    why: &str,
) {
    let Some(chord) = body.embed.as_ref().and_then(|e| e.chord.as_ref()) else { return };
    let part = PartOf {
        id: message.headers.id.clone(),
        group: message.headers.group.clone(),
        group_index: message.headers.group_index,
        chord: Some(ChordBody::Signature(chord)),
    };
    let exc = serde_json::to_value(ExceptionInfo::revoked(why)).unwrap_or_default();
    part_return(&Ctx::client(app), &part, State::Revoked, exc).await;
}

/// The chord membership of a call (or of a chain step failed on its behalf).
struct PartOf<'a> {
    id: String,
    group: Option<String>,
    group_index: Option<u64>,
    chord: Option<ChordBody<'a>>,
}

/// A chord's body as the member carries it; decoded only by the member that completes it.
enum ChordBody<'a> {
    Signature(&'a Signature),
    Value(&'a Value),
}

impl ChordBody<'_> {
    fn to_sig(&self) -> Result<Sig, String> {
        match self {
            ChordBody::Signature(s) => Sig::from_signature((*s).clone()),
            ChordBody::Value(v) => Sig::from_value(v),
        }
    }
}

/// Counts a finished chord member (`on_chord_part_return`).
async fn chord_part_return(call: &Call, state: State, result: Value) {
    let Some(chord) = call.body.embed.as_ref().and_then(|e| e.chord.as_ref()) else { return };
    let part = PartOf {
        id: call.request.id.clone(),
        group: call.request.group.clone(),
        group_index: call.request.group_index,
        chord: Some(ChordBody::Signature(chord)),
    };
    part_return(&ctx_of(call, Map::new()), &part, state, result).await;
}

fn chord_error(message: String) -> ExceptionInfo {
    ExceptionInfo::new("ChordError", message, CELERY_EXCEPTIONS)
}

/// `repr()` of a stored exception (or a value).
fn exc_repr(result: &Value) -> String {
    match serde_json::from_value::<ExceptionInfo>(result.clone()) {
        Ok(e) => format!("{}({})", e.exc_type, e.exc_message.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Err(_) => py_repr(result),
    }
}

async fn part_return(ctx: &Ctx, part: &PartOf<'_>, state: State, result: Value) {
    let (Some(gid), Some(chord)) = (&part.group, &part.chord) else { return };
    let app = &ctx.app;
    let counted = ChordPart { index: part.group_index, task_id: part.id.clone(), state, result };
    let parts = match app.backend().chord_part_return(gid, counted).await {
        Ok(Some(parts)) => parts,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(group_id = %gid, error = %e, "could not count chord member");
            return;
        }
    };
    let callback = match chord.to_sig() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(group_id = %gid, error = %e, "chord body is not a signature");
            return;
        }
    };
    // A complex header (members that are groups) was saved: rebuild its structure.
    let results = match app.backend().restore_group(gid).await {
        Ok(Some(tuple)) => match Res::from_tuple(&tuple) {
            Some(header) => join(ctx, &header).await,
            None => Err(Box::new((chord_error(format!("Join error: cannot read the saved header of {gid}")), None))),
        },
        Ok(None) => flat_results(parts),
        Err(e) => Err(Box::new((chord_error(format!("Join error: {e}")), None))),
    };
    let finished = |sent: bool| async move {
        if let Err(e) = app.backend().chord_finished(gid, sent).await {
            tracing::warn!(group_id = %gid, error = %e, "could not clean up the chord's counting");
        }
    };
    match results {
        Ok(values) => match apply_async(ctx, callback.clone(), Apply::args(vec![values])).await {
            Ok(_) => finished(true).await,
            Err(e) => {
                tracing::error!(group_id = %gid, error = %e, "Chord callback raised");
                chord_error_from_stack(ctx, callback, chord_error(format!("Callback error: {e}")), None).await;
                finished(false).await;
            }
        },
        Err(exc) => {
            tracing::error!(group_id = %gid, error = %exc.0, "Chord raised");
            let (exc, cause) = *exc;
            chord_error_from_stack(ctx, callback, exc, cause).await;
            finished(false).await;
        }
    }
}

/// A chord's error and, when a member failed, that member's own exception.
type ChordFailure = Box<(ExceptionInfo, Option<ExceptionInfo>)>;

/// The header's results in order, or the `ChordError` for the first member that failed (with
/// that member's own exception as its cause).
fn flat_results(parts: Vec<ChordPart>) -> Result<Value, ChordFailure> {
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if p.state.propagates() {
            let cause = serde_json::from_value::<ExceptionInfo>(p.result.clone()).ok();
            return Err(Box::new((
                chord_error(format!("Dependency {} raised {}", p.task_id, exc_repr(&p.result))),
                cause,
            )));
        }
        out.push(p.result);
    }
    Ok(Value::Array(out))
}

/// Joins a saved header (`GroupResult.join(propagate=True)`): every member's value in the
/// header's structure; the first failure is a `Join error`.
fn join<'a>(ctx: &'a Ctx, header: &'a Res) -> futures::future::BoxFuture<'a, Result<Value, ChordFailure>> {
    Box::pin(async move {
        let timeout = std::time::Duration::from_secs_f64(ctx.app.config().result_chord_join_timeout);
        let mut out = Vec::new();
        for r in header.results() {
            if r.is_group() {
                out.push(join(ctx, &r).await?);
                continue;
            }
            let meta = ctx
                .app
                .backend()
                .wait_ready(&r.id(), timeout)
                .await
                .map_err(|e| Box::new((chord_error(format!("Join error: {e}")), None)))?;
            match meta {
                Some(m) if m.status == State::Success => out.push(m.result),
                Some(m) if m.status.is_ready() => {
                    let cause = m.exception_info();
                    let repr = exc_repr(&m.result);
                    return Err(Box::new((chord_error(format!("Join error: {repr}")), cause)));
                }
                _ => {
                    let exc = chord_error("Join error: TimeoutError('The operation timed out.')".to_owned());
                    return Err(Box::new((exc, None)));
                }
            }
        }
        Ok(Value::Array(out))
    })
}

/// `chord_error_from_stack`: the body's errbacks run and its result is stored FAILURE (a
/// group body: each member, with the failed member's own exception).
pub(crate) async fn chord_error_from_stack(ctx: &Ctx, callback: Sig, exc: ExceptionInfo, cause: Option<ExceptionInfo>) {
    if callback.is_group() {
        let chain = callback.list_option("chain");
        group_chord_error(ctx, callback, cause.unwrap_or_else(|| exc.clone())).await;
        fail_chain(ctx, &chain, &exc, None, None).await;
        return;
    }
    let callback_id = callback.id().map(str::to_owned).unwrap_or_else(super::apply::new_id);
    let errbacks = callback.list_option("link_error");
    let mut request = serde_json::to_value(callback.to_signature()).unwrap_or(json!({}));
    if let Value::Object(m) = &mut request {
        m.insert("id".into(), Value::String(callback_id.clone()));
        m.insert("errbacks".into(), Value::Array(errbacks.clone()));
        m.insert("delivery_info".into(), json!({}));
    }
    call_errbacks(ctx, &request, &errbacks, &exc, None).await;
    store_failure_with(ctx, &callback_id, &exc, None, None, true).await;
    let chain = callback.list_option("chain");
    fail_chain(ctx, &chain, &exc, None, None).await;
}

/// `_result_errbacks`: the id of a signature's result and the errbacks linked to it.
fn result_errbacks(sig: &Sig) -> (Option<String>, Vec<Value>) {
    let mut errbacks = Vec::new();
    let mut node = sig;
    while let Some(body) = node.body() {
        errbacks.extend(node.list_option("link_error"));
        node = body;
    }
    errbacks.extend(node.list_option("link_error"));
    if let Node::Group(tasks) = &node.node {
        for t in tasks {
            errbacks.extend(result_errbacks(t).1);
        }
    }
    (node.id().map(str::to_owned), errbacks)
}

/// `_handle_group_chord_error`: every member of a group body gets its errbacks and FAILURE,
/// the group too, and the members are revoked.
async fn group_chord_error(ctx: &Ctx, mut group: Sig, exc: ExceptionInfo) {
    let group_errbacks = group.list_option("link_error");
    let task_errbacks: Vec<(Option<String>, Vec<Value>)> = group.tasks().iter().map(result_errbacks).collect();
    let frozen = super::group::freeze(ctx, &mut group, super::apply::Freeze::default());
    let mut ids = Vec::new();
    for r in frozen.results() {
        let id = r.id();
        let mut errbacks: Vec<Value> = Vec::new();
        let own = task_errbacks.iter().find(|(tid, _)| tid.as_deref() == Some(id.as_str())).map(|(_, e)| e.clone());
        for eb in own.unwrap_or_default().into_iter().chain(group_errbacks.iter().cloned()) {
            if !errbacks.contains(&eb) {
                errbacks.push(eb);
            }
        }
        let request = json!({"id": id, "errbacks": errbacks, "delivery_info": {}, "task": "unknown"});
        call_errbacks(ctx, &request, &errbacks, &exc, None).await;
        store_failure_with(ctx, &id, &exc, None, None, true).await;
        ids.push(id);
    }
    store_failure_with(ctx, &frozen.id(), &exc, None, None, true).await;
    crate::worker::revoke_everywhere(&ctx.app, &ids).await;
}
