//! Chords, as Celery's `_chord.apply_async` / `run` apply them: the body is frozen first
//! (its id is the chord's result), the header group is frozen with the body as every member's
//! `chord`, the backend is told about the header (`apply_chord`), and the header is sent. The
//! member that completes the header sends the body (see `dispatch`). An empty header sends the
//! body at once with `[]`.

use super::apply::{Call, Ctx, Freeze, apply_async as apply_any, canvas_error, new_id, take, take_str};
use super::result::Res;
use super::tree::{Node, Sig};
use crate::Error;
use serde_json::{Map, Value};

/// `_descend`: how many completions a signature contributes to a chord: one per task, a
/// group's members, a chain's last non-empty step, a chord's body.
pub(crate) fn descend(sig: &Sig) -> usize {
    match &sig.node {
        Node::Task => 1,
        Node::Group(tasks) => tasks.iter().map(descend).sum(),
        Node::Chain(tasks) => tasks.iter().rev().map(descend).find(|n| *n > 0).unwrap_or(0),
        Node::Chord(parts) => parts.body.as_ref().map(descend).unwrap_or(0),
    }
}

/// `_clear_chord_option`: removes the chord callback from the terminal tasks of `sig`.
fn clear_chord_option(sig: &mut Sig) {
    sig.base.options.remove("chord");
    match &mut sig.node {
        Node::Group(tasks) => tasks.iter_mut().for_each(clear_chord_option),
        Node::Chain(tasks) => {
            if let Some(last) = tasks.last_mut() {
                clear_chord_option(last);
            }
        }
        Node::Chord(parts) => {
            if let Some(b) = parts.body.as_mut() {
                clear_chord_option(b);
            }
        }
        Node::Task => {}
    }
}

/// `_strip_chord_header_links`: a chord about to be sent carries its body once, not in every
/// header task too (`run` puts it back when the header is sent).
pub(crate) fn strip_header_links(sig: &mut Sig) {
    match &mut sig.node {
        Node::Chord(parts) => {
            clear_chord_option(&mut parts.header);
            strip_header_links(&mut parts.header);
            if let Some(b) = parts.body.as_mut() {
                strip_header_links(b);
            }
        }
        Node::Group(tasks) | Node::Chain(tasks) => tasks.iter_mut().for_each(strip_header_links),
        Node::Task => {}
    }
}

/// `_unroll_body`: `chord(header, chain(a, b, c))` becomes `chord(header, a), b, c`.
pub(crate) fn unroll_body(chord: &Sig, allow: bool) -> Vec<Sig> {
    let mut task = chord.clone();
    let Some(body) = task.body().cloned() else { return vec![task] };
    let mut body_tasks = body.unchain_tasks(allow).into_iter();
    let first_options = super::chain::first_task_options(&body);
    let Some(first) = body_tasks.next() else { return vec![task] };
    let first = first.clone_with(&[], &Map::new(), &first_options);
    if let Some(parts) = task.chord_parts_mut() {
        parts.body = Some(first);
    }
    let mut out = vec![task];
    out.extend(body_tasks);
    out
}

/// `chord.freeze`: the header becomes a frozen group with the body as its members' chord;
/// the body is frozen with the given ids; returns the body's result, whose first ancestor's
/// parent is the header's group result.
pub(crate) fn freeze(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> Result<Res, Error> {
    let name = sig.name().to_owned();
    let parts = sig.chord_parts_mut().ok_or_else(|| canvas_error(&name, "not a chord"))?;
    // The body first: the header's members carry it frozen (Python shares the object).
    let body_result = match parts.body.as_mut() {
        Some(body) => Some(super::apply::freeze(
            ctx,
            body,
            Freeze {
                id: f.id.clone(),
                root_id: f.root_id.clone(),
                chord: f.chord.clone(),
                group_id: f.group_id.clone(),
                group_index: f.group_index.clone(),
                parent_id: None,
            },
        )?),
        None => None,
    };
    // Python's header tasks hold the body object itself; what goes on the wire is the body with
    // the links of chords nested in it stripped (`run` and `prepare_steps` strip before
    // sending). Serializing it unstripped here would nest every level's body in every header
    // task of the level above: exponential in the depth of nested chords.
    let body_value = parts.body.as_ref().map(|b| {
        let mut stripped = b.clone();
        strip_header_links(&mut stripped);
        stripped.to_value()
    });
    parts.header_frozen = true;
    let header_result = super::group::freeze(
        ctx,
        &mut parts.header,
        Freeze { parent_id: f.parent_id.clone(), root_id: f.root_id.clone(), chord: body_value, ..Freeze::default() },
    );
    let gid = header_result.id();
    sig.set("task_id", gid);
    match body_result {
        Some(body_result) => {
            body_result.root().set_parent(Some(header_result));
            Ok(body_result)
        }
        None => Ok(header_result),
    }
}

/// The options passed on to the body (the header task that fires the body is its parent).
fn body_options(options: &Map<String, Value>) -> Map<String, Value> {
    options.iter().filter(|(k, _)| k.as_str() != "parent_id").map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn as_list(v: Option<Value>) -> Vec<Value> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(one) => vec![one],
    }
}

/// `_link_error_to_body_tasks`: an errback for a group body goes on each of its tasks (a
/// group that runs as one and has its own `link_error` takes it there instead).
fn link_error_to_body_tasks(sig: &mut Sig, errback: &Value, runs_as_group: bool, allow: bool) {
    match &mut sig.node {
        Node::Group(tasks) => {
            if runs_as_group && sig.base.options.get("link_error").is_some_and(|v| !v.is_null()) {
                sig.append_to_list_option("link_error", errback.clone());
            } else {
                for t in tasks.iter_mut() {
                    link_error_to_body_tasks(t, errback, false, allow);
                }
            }
        }
        Node::Chord(parts) => {
            if let Some(b) = parts.body.as_mut() {
                link_error_to_body_tasks(b, errback, true, allow);
            }
        }
        _ => sig.link_error(errback.clone(), allow),
    }
}

/// `_add_body_callbacks`: `link` and `link_error` options of the chord go on its body.
fn add_body_callbacks(body: &mut Sig, options: &mut Map<String, Value>, allow: bool) {
    for cb in as_list(options.remove("link")) {
        if body.is_empty_group() {
            body.append_to_list_option("link", cb);
        } else {
            body.link(cb);
        }
    }
    for eb in as_list(options.remove("link_error")) {
        if body.is_group() {
            link_error_to_body_tasks(body, &eb, true, allow);
        } else {
            body.append_to_list_option("link_error", eb);
        }
    }
}

/// `chord.apply_async`.
pub(crate) async fn apply_async(ctx: &Ctx, sig: Sig, call: Call) -> Result<Res, Error> {
    let Call { args, mut kwargs, mut options } = call;
    let mut options: Map<String, Value> = {
        options.retain(|_, v| !v.is_null());
        options
    };
    let explicit_task_id = take_str(&mut options, "task_id");
    let partial_args = if !args.is_empty() && !sig.base.immutable {
        let mut a = args;
        a.extend(sig.base.args.iter().cloned());
        a
    } else {
        sig.base.args.clone()
    };
    let Node::Chord(parts) = sig.node else { return Err(canvas_error(&sig.base.task, "not a chord")) };
    let parts = *parts;
    let body = match kwargs.remove("body") {
        Some(b) if !b.is_null() => Some(Sig::from_value(&b).map_err(|e| canvas_error("celery.chord", e))?),
        _ => parts.body,
    };
    let Some(body) = body else { return Err(canvas_error("celery.chord", "a chord needs a body")) };
    let mut header_kwargs = match sig.base.kwargs.get("kwargs") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in kwargs {
        header_kwargs.insert(k, v);
    }
    let mut header_delay = Map::new();
    for key in ["countdown", "eta"] {
        if let Some(v) = take(&mut options, key) {
            header_delay.insert(key.into(), v);
        }
    }
    let mut callbacks = Map::new();
    for key in ["link", "link_error"] {
        if let Some(v) = options.remove(key) {
            callbacks.insert(key.into(), v);
        }
    }
    let body = body.clone_with(&[], &Map::new(), &body_options(&options));
    let mut header = parts.header;
    if !parts.header_frozen {
        header.base.options = Map::new();
        let id = sig.base.options.get("task_id").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(new_id);
        header.set("task_id", id);
    }
    let mut merged = sig.base.options.clone();
    for (k, v) in options.into_iter().chain(callbacks) {
        merged.insert(k, v);
    }
    for key in ["countdown", "eta"] {
        merged.remove(key);
    }
    let option_task_id = take_str(&mut merged, "task_id");
    let task_id = explicit_task_id.or(option_task_id);
    run(ctx, &sig.base.options, header, body, partial_args, header_kwargs, task_id, header_delay, merged).await
}

/// `chord.run`.
#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Ctx,
    own_options: &Map<String, Value>,
    mut header: Sig,
    mut body: Sig,
    partial_args: Vec<Value>,
    kwargs: Map<String, Value>,
    task_id: Option<String>,
    mut header_delay: Map<String, Value>,
    run_options: Map<String, Value>,
) -> Result<Res, Error> {
    let allow = ctx.allow_error_cb_on_chord_header();
    let group_id = header.id().map(str::to_owned).unwrap_or_else(new_id);
    let root_id = body.opt_str("root_id");
    let mut options = own_options.clone();
    for (k, v) in run_options {
        options.insert(k, v);
    }
    // `interval`, `countdown` (chord_unlock retries), `max_retries` and `eager` are
    // parameters of `run`, not options.
    for key in ["interval", "max_retries", "eager"] {
        options.remove(key);
    }
    for key in ["countdown", "eta"] {
        if let Some(v) = options.remove(key).filter(|v| !v.is_null())
            && !header_delay.contains_key(key)
        {
            header_delay.insert(key.into(), v);
        }
    }
    if !options.is_empty() {
        options.remove("task_id");
        add_body_callbacks(&mut body, &mut options, allow);
        for (k, v) in body_options(&options) {
            body.base.options.insert(k, v);
        }
    }
    if body.is_chain() {
        super::chain::unroll_chords(&mut body, allow);
    }
    let body_task_id = task_id.unwrap_or_else(new_id);
    let body_result = super::apply::freeze(
        ctx,
        &mut body,
        Freeze {
            id: Some(body_task_id),
            group_id: Some(group_id.clone()),
            root_id: root_id.clone(),
            ..Freeze::default()
        },
    )?;
    strip_header_links(&mut body);
    for key in ["chain", "chord", "task_id"] {
        options.remove(key);
    }
    header.set("task_id", group_id.clone());
    let body_value = body.to_value();
    let (_, member_results) = super::group::freeze_group_tasks(
        ctx,
        &mut header,
        Freeze {
            group_id: Some(group_id.clone()),
            chord: Some(body_value.clone()),
            root_id: root_id.clone(),
            ..Freeze::default()
        },
    );
    let header_result = if !header.tasks().is_empty() {
        let header_res = Res::group(group_id.clone(), member_results.clone());
        if member_results.iter().any(Res::is_group) {
            // Complex header: the body needs the structure back (`apply_chord`).
            ctx.app
                .backend()
                .save_group(&group_id, &header_res.as_tuple(), ctx.app.config().result_expires_duration())
                .await?;
        }
        let mut header_options = options.clone();
        for (k, v) in header_delay {
            header_options.insert(k, v);
        }
        header_options.insert("task_id".into(), Value::String(group_id.clone()));
        super::group::apply_async(ctx, header, Call { args: partial_args, kwargs, options: header_options }).await?
    } else {
        apply_any(ctx, body, Call::args(vec![Value::Array(Vec::new())])).await?;
        Res::group(group_id, member_results)
    };
    body_result.set_parent(Some(header_result));
    Ok(body_result)
}
