//! Chains, as Celery's `_chain.run` / `prepare_steps` apply them: nested chains are spliced,
//! a group followed by a step becomes a chord, every step is frozen (the last with the chain's
//! task id, group and chord), and only the first step is sent, carrying the rest in its
//! `chain` option, last step first, so the worker can `pop()` the next one.

use super::apply::{Call, Ctx, Freeze, apply_async as apply_any, canvas_error, take, take_str};
use super::result::Res;
use super::tree::{Node, Sig};
use crate::Error;
use serde_json::{Map, Value};
use std::collections::VecDeque;

/// Options `_chain.run` consumes instead of passing them to the first task.
const RUN_OPTIONS: [&str; 8] =
    ["chord", "group_id", "group_index", "link", "link_error", "parent_id", "root_id", "task_id"];

/// A chain's options that its first task inherits when the chain is unrolled.
pub(crate) fn first_task_options(chain: &Sig) -> Map<String, Value> {
    chain
        .base
        .options
        .iter()
        .filter(|(k, _)| !RUN_OPTIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What `prepare_steps` works with.
pub(crate) struct Steps<'a> {
    pub args: &'a [Value],
    pub kwargs: &'a Map<String, Value>,
    pub root_id: Option<String>,
    pub link_error: Vec<Value>,
    pub last_task_id: Option<String>,
    pub group_id: Option<String>,
    pub chord_body: Option<Value>,
    pub group_index: Option<Value>,
    /// Apply (clone every step) rather than freeze in place.
    pub clone: bool,
}

/// `prepare_steps`: returns the steps and their results, last step first.
pub(crate) fn prepare_steps(ctx: &Ctx, tasks: Vec<Sig>, s: Steps<'_>) -> Result<(Vec<Sig>, Vec<Res>), Error> {
    let allow = ctx.allow_error_cb_on_chord_header();
    let mut steps: VecDeque<Sig> = tasks.into();
    // The first real task receives the partial arguments: splice leading chains and drop
    // leading empty groups (keeping one if nothing else is left).
    let mut stripped_group = None;
    while let Some(head) = steps.pop_front() {
        match head.node {
            Node::Chain(inner) => {
                for t in inner.into_iter().rev() {
                    steps.push_front(t);
                }
            }
            Node::Group(_) => {
                let head = head.unroll_single();
                if !steps.is_empty() && head.is_empty_group() {
                    stripped_group = Some(head);
                    continue;
                }
                steps.push_front(head);
                break;
            }
            _ => {
                steps.push_front(head);
                break;
            }
        }
    }
    if let Some(g) = stripped_group
        && steps.is_empty()
    {
        steps.push_back(g);
    }

    let mut tasks: Vec<Sig> = Vec::new();
    let mut results: Vec<Res> = Vec::new();
    let mut prev_res: Option<Res> = None;
    let mut has_prev = false;
    let mut i = 0usize;
    while let Some(mut task) = steps.pop_back() {
        let is_first = steps.is_empty();
        let is_last = i == 0;
        if task.is_group() {
            task = task.unroll_single();
            if task.is_empty_group() && (!steps.is_empty() || has_prev) {
                continue;
            }
        }
        if s.clone && task.is_chord() && task.body().is_some_and(Sig::is_chain_led_by_task) {
            steps.extend(super::chord::unroll_body(&task, allow));
            continue;
        }
        if is_first {
            if s.clone {
                task = task.clone_with(s.args, s.kwargs, &Map::new());
            } else {
                let mut args = s.args.to_vec();
                args.append(&mut task.base.args);
                task.base.args = args;
            }
        }
        if let Node::Chain(inner) = task.node {
            steps.extend(inner);
            continue;
        }
        if task.is_group() && has_prev {
            // group(...) | step  ==>  chord(group, step)
            let body = tasks.pop();
            let body_res = results.pop();
            let mut options = Map::new();
            if let Some(br) = body_res.as_ref().filter(|r| !r.is_group()) {
                options.insert("task_id".into(), Value::String(br.id()));
            }
            if let Some(r) = &s.root_id {
                options.insert("root_id".into(), Value::String(r.clone()));
            }
            task = Sig::chord(task, body, options);
            has_prev = !tasks.is_empty();
            // The rest of the chain hangs on the chord's result below, not on the body's.
            let mut node = results.last().cloned();
            while let Some(n) = node.clone() {
                match (n.parent(), &body_res) {
                    (Some(p), Some(b)) if p.same(b) => break,
                    (None, _) => {
                        node = None;
                        break;
                    }
                    (Some(p), _) => node = Some(p),
                }
            }
            if let Some(n) = node {
                n.set_parent(None);
                prev_res = Some(n);
            }
        }
        let res = if is_last {
            super::apply::freeze(
                ctx,
                &mut task,
                Freeze {
                    id: s.last_task_id.clone(),
                    root_id: s.root_id.clone(),
                    group_id: s.group_id.clone(),
                    chord: s.chord_body.clone(),
                    group_index: s.group_index.clone(),
                    parent_id: None,
                },
            )?
        } else {
            super::apply::freeze(ctx, &mut task, Freeze { root_id: s.root_id.clone(), ..Freeze::default() })?
        };
        i += 1;
        if has_prev
            && let Some(p) = &prev_res
            && p.parent().is_none()
        {
            p.set_parent(Some(res.clone()));
        }
        for eb in &s.link_error {
            task.link_error(eb.clone(), allow);
            if let Some(body) = task.body_mut() {
                body.link_error(eb.clone(), allow);
            }
        }
        let is_chord = task.is_chord();
        tasks.push(task);
        results.push(res.clone());
        has_prev = true;
        prev_res = Some(if is_chord { res.root() } else { res });
    }
    if s.clone {
        for t in &mut tasks {
            super::chord::strip_header_links(t);
        }
    }
    Ok((tasks, results))
}

/// `_chain.freeze`: freezes the steps in place and returns the last step's result.
pub(crate) fn freeze(ctx: &Ctx, sig: &mut Sig, f: Freeze) -> Result<Res, Error> {
    let Node::Chain(steps) = std::mem::replace(&mut sig.node, Node::Task) else {
        return Err(canvas_error(sig.name(), "not a chain"));
    };
    let args = sig.base.args.clone();
    let kwargs = sig.base.kwargs.clone();
    let (mut tasks, results) = prepare_steps(
        ctx,
        steps,
        Steps {
            args: &args,
            kwargs: &kwargs,
            root_id: f.root_id,
            link_error: Vec::new(),
            last_task_id: f.id,
            group_id: f.group_id,
            chord_body: f.chord,
            group_index: f.group_index,
            clone: false,
        },
    )?;
    tasks.reverse();
    sig.node = Node::Chain(tasks);
    let first = results.first().cloned().ok_or_else(|| canvas_error(sig.name(), "cannot freeze an empty chain"))?;
    sig.set("task_id", first.id());
    Ok(first)
}

/// `_chain.apply_async` / `run`: sends the first step with the rest in its `chain` option.
pub(crate) async fn apply_async(ctx: &Ctx, sig: Sig, call: Call) -> Result<Res, Error> {
    let Call { args, kwargs, options: call_options } = call;
    let mut options = sig.base.options.clone();
    for (k, v) in call_options {
        options.insert(k, v);
    }
    let Node::Chain(steps) = sig.node else { return Err(canvas_error(&sig.base.task, "not a chain")) };
    let args = if !args.is_empty() && !sig.base.immutable {
        let mut a = args;
        a.extend(sig.base.args.iter().cloned());
        a
    } else {
        sig.base.args.clone()
    };
    let group_id = take_str(&mut options, "group_id");
    let chord = take(&mut options, "chord");
    let task_id = take_str(&mut options, "task_id");
    let link = take(&mut options, "link");
    let link_error = take(&mut options, "link_error");
    let root_id = take_str(&mut options, "root_id");
    let _parent_id = take(&mut options, "parent_id");
    let group_index = take(&mut options, "group_index");
    let link_error = match link_error {
        Some(Value::Array(items)) => items,
        Some(one) => vec![one],
        None => Vec::new(),
    };
    let (mut tasks, results) = prepare_steps(
        ctx,
        steps,
        Steps {
            args: &args,
            kwargs: &kwargs,
            root_id,
            link_error,
            last_task_id: task_id,
            group_id,
            chord_body: chord,
            group_index,
            clone: true,
        },
    )?;
    let Some(last_result) = results.first().cloned() else {
        return Err(canvas_error("celery.chain", "cannot apply an empty chain"));
    };
    if let Some(link) = link
        && let Some(last) = tasks.first_mut()
    {
        let links = match link {
            Value::Array(items) => items,
            one => vec![one],
        };
        last.extend_list_option("link", links);
    }
    let Some(first) = tasks.pop() else { return Err(canvas_error("celery.chain", "cannot apply an empty chain")) };
    let rest = Value::Array(tasks.iter().map(Sig::to_value).collect());
    match options.get_mut("chain") {
        Some(Value::Array(existing)) => {
            if let Value::Array(rest) = rest {
                existing.extend(rest);
            }
        }
        _ => {
            options.insert("chain".into(), rest);
        }
    }
    let applied = apply_any(ctx, first, Call { options, ..Call::default() }).await?;
    Ok(if tasks.is_empty() { applied } else { last_result })
}

/// `_unroll_chords`: splits nested chords whose body is a chain led by a task, so the tail
/// of that chain is not copied into every header task (in place).
pub(crate) fn unroll_chords(sig: &mut Sig, allow: bool) {
    let Node::Chain(steps) = &mut sig.node else { return };
    let mut pending: VecDeque<Sig> = std::mem::take(steps).into();
    let mut out = Vec::new();
    while let Some(mut task) = pending.pop_front() {
        if task.is_chain() {
            unroll_chords(&mut task, allow);
        }
        if task.is_chord() && task.body().is_some_and(Sig::is_chain_led_by_task) {
            for t in super::chord::unroll_body(&task, allow).into_iter().rev() {
                pending.push_front(t);
            }
        } else {
            out.push(task);
        }
    }
    *steps = out;
}
