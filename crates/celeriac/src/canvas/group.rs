//! Groups, as Celery's `group.apply_async` applies them: the group's id becomes every
//! member's `group_id`, nested groups are flattened, each member is frozen with its index and
//! sent, and when the members belong to a chord the last one sends the chord's size first.

use super::apply::{Call, Ctx, Freeze, apply_async as apply_any, canvas_error, new_id, take};
use super::result::Res;
use super::tree::{Node, Sig};
use crate::Error;
use serde_json::{Map, Value};

/// `_freeze_gid`: the call's options over the group's (immutable ones kept), the group id
/// taken from `task_id` (or new) and set as `group_id`.
fn freeze_gid(sig: &Sig, options: Map<String, Value>) -> (Map<String, Value>, String, Option<String>) {
    let mut merged = sig.base.options.clone();
    for (k, v) in options {
        let locked = ["group_id", "stamped_headers"].contains(&k.as_str()) && sig.base.options.contains_key(&k);
        if !locked {
            merged.insert(k, v);
        }
    }
    let group_id = match merged.remove("task_id") {
        Some(Value::String(s)) => s,
        _ => new_id(),
    };
    merged.insert("group_id".into(), Value::String(group_id.clone()));
    let root_id = merged.get("root_id").and_then(Value::as_str).map(str::to_owned);
    (merged, group_id, root_id)
}

/// `_prepared`: the members, nested groups flattened and empty chains dropped, each frozen
/// into the group with its index.
fn prepared(ctx: &Ctx, tasks: Vec<Sig>, group_id: &str, root_id: &Option<String>, out: &mut Vec<(Sig, Res)>) {
    for (index, mut task) in tasks.into_iter().enumerate() {
        match task.node {
            Node::Group(inner) => prepared(ctx, inner, group_id, root_id, out),
            Node::Chain(steps) if steps.is_empty() => {}
            _ => {
                let res = super::apply::freeze(
                    ctx,
                    &mut task,
                    Freeze {
                        group_id: Some(group_id.to_owned()),
                        root_id: root_id.clone(),
                        group_index: Some(Value::from(index)),
                        ..Freeze::default()
                    },
                );
                match res {
                    Ok(res) => out.push((task, res)),
                    Err(e) => tracing::error!(error = %e, "group member could not be frozen; skipped"),
                }
            }
        }
    }
}

/// `group.apply_async`.
pub(crate) async fn apply_async(ctx: &Ctx, sig: Sig, call: Call) -> Result<Res, Error> {
    let Call { args, kwargs, mut options } = call;
    if take(&mut options, "link").is_some() {
        return Err(canvas_error(sig.name(), "Cannot add link to group: use a chord"));
    }
    if take(&mut options, "link_error").is_some() {
        return Err(canvas_error(sig.name(), "Cannot add link to group: do that on individual tasks"));
    }
    let add_to_parent = !matches!(options.remove("add_to_parent"), Some(Value::Bool(false)));
    if sig.tasks().is_empty() {
        let mut sig = sig;
        return Ok(freeze(ctx, &mut sig, Freeze::default()));
    }
    let (mut options, group_id, root_id) = freeze_gid(&sig, options);
    let mut members = Vec::new();
    let tasks = match sig.node {
        Node::Group(tasks) => tasks,
        _ => sig.tasks().to_vec(),
    };
    prepared(ctx, tasks, &group_id, &root_id, &mut members);
    let chord = take(&mut options, "chord");
    options.remove("group_index");
    options.remove("add_to_parent");
    let results = apply_tasks(ctx, members, &group_id, chord, &args, &kwargs, &options).await?;
    let mut result = Res::group(group_id, results);
    let members = result.results();
    if members.len() == 1 && members[0].is_group() {
        result = members[0].clone();
    }
    if add_to_parent && let Some(cur) = &ctx.current {
        cur.trail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(result.as_tuple());
    }
    Ok(result)
}

/// `_apply_tasks`: sends each member; before any of a chord's header is sent, the chord size
/// (members counted with `_descend`; Celery records it before the last member, and earlier
/// is as safe).
async fn apply_tasks(
    ctx: &Ctx,
    members: Vec<(Sig, Res)>,
    group_id: &str,
    chord: Option<Value>,
    args: &[Value],
    kwargs: &Map<String, Value>,
    options: &Map<String, Value>,
) -> Result<Vec<Res>, Error> {
    // The members' messages go out in broker batches of up to `FLUSH_EVERY` (so workers start
    // on a big group while the rest is being built). A group inside a group joins the outer
    // batches. A failure partway (a member that cannot be built, a publish that fails) leaves
    // the batches already sent, as Celery's member-by-member sending does; the error is the
    // caller's.
    const FLUSH_EVERY: usize = 1000;
    let batched;
    let (ctx, outbox) = match &ctx.outbox {
        None if !ctx.app.config().task_always_eager => {
            let outbox = super::apply::Outbox::default();
            batched = Ctx { outbox: Some(outbox.clone()), ..ctx.clone() };
            (&batched, Some(outbox))
        }
        _ => (ctx, None),
    };
    let last_in_chord = chord.is_some() || members.last().is_some_and(|(sig, _)| sig.opt("chord").is_some());
    if last_in_chord {
        let size = members.iter().map(|(sig, _)| super::chord::descend(sig)).sum();
        ctx.app.backend().set_chord_size(group_id, size, ctx.app.config().result_expires_duration()).await?;
    }
    let flush = |outbox: &super::apply::Outbox| {
        let built = std::mem::take(&mut *outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        async move {
            let refs: Vec<(&str, &crate::protocol::Message)> = built.iter().map(|(q, m)| (q.as_str(), m)).collect();
            ctx.app.broker().publish_many(&refs).await
        }
    };
    let mut results = Vec::with_capacity(members.len());
    for (sig, res) in members {
        let chord_obj = chord.clone().or_else(|| sig.opt("chord").cloned());
        let mut call_options = options.clone();
        call_options.insert("add_to_parent".into(), Value::Bool(false));
        if let Some(c) = chord_obj {
            call_options.insert("chord".into(), c);
        }
        apply_any(ctx, sig, Call { args: args.to_vec(), kwargs: kwargs.clone(), options: call_options }).await?;
        results.push(res);
        if let Some(outbox) = &outbox
            && outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() >= FLUSH_EVERY
        {
            flush(outbox).await?;
        }
    }
    if let Some(outbox) = &outbox {
        flush(outbox).await?;
    }
    Ok(results)
}

/// `_freeze_group_tasks`: the group's id (kept or new), the ids and chord it is frozen into,
/// and its members flattened and frozen in place; returns the group id and member results.
pub(crate) fn freeze_group_tasks(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> (String, Vec<Res>) {
    let opts = &mut sig.base.options;
    let gid = match opts.get("task_id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => {
            let id = new_id();
            opts.insert("task_id".into(), Value::String(id.clone()));
            id
        }
    };
    if let Some(g) = &f.group_id {
        opts.insert("group_id".into(), Value::String(g.clone()));
    }
    if let Some(c) = &f.chord {
        opts.insert("chord".into(), c.clone());
    }
    if let Some(i) = &f.group_index {
        opts.insert("group_index".into(), i.clone());
    }
    let root_id = match opts.get("root_id") {
        Some(v) => v.as_str().map(str::to_owned),
        None => {
            opts.insert("root_id".into(), f.root_id.clone().map(Value::String).unwrap_or(Value::Null));
            f.root_id.clone()
        }
    };
    let parent_id = match opts.get("parent_id") {
        Some(v) => v.as_str().map(str::to_owned),
        None => {
            opts.insert("parent_id".into(), f.parent_id.clone().map(Value::String).unwrap_or(Value::Null));
            f.parent_id.clone()
        }
    };
    // `_freeze_unroll`: flatten nested groups, drop empty chains. Celery puts a nested group's
    // members back on the stack with `extendleft`, which reverses them; so do we.
    let mut stack: std::collections::VecDeque<Sig> = match &mut sig.node {
        Node::Group(tasks) => std::mem::take(tasks).into(),
        _ => Default::default(),
    };
    let mut new_tasks = Vec::new();
    let mut results = Vec::new();
    let mut index = 0u64;
    while let Some(mut task) = stack.pop_front() {
        match task.node {
            Node::Group(inner) => {
                for t in inner {
                    stack.push_front(t);
                }
            }
            Node::Chain(ref steps) if steps.is_empty() => {}
            _ => {
                let res = super::apply::freeze(
                    ctx,
                    &mut task,
                    Freeze {
                        group_id: f.group_id.clone(),
                        chord: f.chord.clone(),
                        root_id: root_id.clone(),
                        parent_id: parent_id.clone(),
                        group_index: Some(Value::from(index)),
                        id: None,
                    },
                );
                match res {
                    Ok(res) => {
                        new_tasks.push(task);
                        results.push(res);
                        index += 1;
                    }
                    Err(e) => tracing::error!(error = %e, "group member could not be frozen; dropped"),
                }
            }
        }
    }
    sig.node = Node::Group(new_tasks);
    (gid, results)
}

/// `group.freeze`.
pub(crate) fn freeze(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> Res {
    let (gid, results) = freeze_group_tasks(ctx, sig, f);
    Res::group(gid, results)
}
