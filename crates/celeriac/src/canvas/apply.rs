//! Applying a signature of any kind, on the client and in the worker alike: freezing (assigning
//! every task id up front), chain upgrade (a group followed by a step becomes a chord, as
//! Celery does), and sending the entry tasks with the rest of the workflow embedded in their
//! messages (`embed.chain`, `embed.chord`, `group`/`group_index`).

use super::primitives::{Kind, chord, kind};
use crate::Error;
use crate::app::App;
use crate::protocol::Signature;
use crate::result::AsyncResult;
use futures::future::BoxFuture;
use serde_json::{Map, Value};

/// Where a signature is applied from: the task that sends it and its workflow.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lineage {
    /// The sending task (`parent_id`).
    pub parent_id: Option<String>,
    /// The workflow's first task (`root_id`).
    pub root_id: Option<String>,
    /// Extra headers every message of the applied canvas carries (saga state).
    pub headers: Map<String, Value>,
}

fn canvas_error(sig: &Signature, problem: impl std::fmt::Display) -> Error {
    Error::Canvas { task: sig.task.clone(), problem: problem.to_string() }
}

fn kind_of(sig: &Signature) -> Result<Kind, Error> {
    kind(sig).map_err(|p| canvas_error(sig, p))
}

fn to_values(sigs: &[Signature]) -> Value {
    Value::Array(sigs.iter().map(|s| serde_json::to_value(s).unwrap_or(Value::Null)).collect())
}

fn set_members(sig: &mut Signature, key: &str, members: &[Signature]) {
    sig.kwargs.insert(key.to_owned(), to_values(members));
}

/// Flattens nested chains and turns `group, next` into `chord(group, next)`.
fn upgrade(steps: Vec<Signature>) -> Result<Vec<Signature>, Error> {
    let mut flat = Vec::with_capacity(steps.len());
    for step in steps {
        match kind_of(&step)? {
            Kind::Chain(inner) => flat.extend(upgrade(inner)?),
            _ => flat.push(step),
        }
    }
    let mut out: Vec<Signature> = Vec::with_capacity(flat.len());
    while let Some(step) = flat.pop() {
        match (kind_of(&step)?, out.pop()) {
            (Kind::Group(members), Some(next)) => {
                let mut upgraded = chord(members, next);
                if let Some(id) = step.options.get("task_id") {
                    upgraded.options.insert("task_id".into(), id.clone());
                }
                out.push(upgraded);
            }
            (_, next) => {
                out.extend(next);
                out.push(step);
            }
        }
    }
    out.reverse();
    Ok(out)
}

/// Flattens groups nested in groups (their members join the outer group).
fn flatten_group(members: Vec<Signature>) -> Result<Vec<Signature>, Error> {
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        match kind_of(&m)? {
            Kind::Group(inner) => out.extend(flatten_group(inner)?),
            _ => out.push(m),
        }
    }
    Ok(out)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn ensure_id(sig: &mut Signature) -> String {
    match sig.task_id() {
        Some(id) => id.to_owned(),
        None => {
            let id = new_id();
            sig.options.insert("task_id".into(), Value::String(id.clone()));
            id
        }
    }
}

/// Sets an option on the task that produces `sig`'s result: the task itself, or a chain's
/// last step.
fn set_on_final(sig: &mut Signature, key: &str, value: Value) -> Result<(), Error> {
    match kind_of(sig)? {
        Kind::Task => {
            sig.options.insert(key.to_owned(), value);
            Ok(())
        }
        Kind::Chain(mut steps) => {
            let last = steps.last_mut().ok_or_else(|| canvas_error(sig, "empty chain"))?;
            set_on_final(last, key, value)?;
            set_members(sig, "tasks", &steps);
            Ok(())
        }
        _ => Err(canvas_error(
            sig,
            "a group or chord cannot be a member of a group or chord header here; wrap it in a chain with a final task",
        )),
    }
}

/// Assigns every task id in the canvas; returns the id whose result is the canvas's result.
pub(crate) fn freeze(sig: &mut Signature) -> Result<String, Error> {
    match kind_of(sig)? {
        Kind::Task => Ok(ensure_id(sig)),
        Kind::Chain(steps) => {
            let mut steps = upgrade(steps)?;
            let mut last = None;
            for s in &mut steps {
                last = Some(freeze(s)?);
            }
            set_members(sig, "tasks", &steps);
            let last = last.ok_or_else(|| canvas_error(sig, "empty chain"))?;
            sig.options.insert("task_id".into(), Value::String(last.clone()));
            Ok(last)
        }
        Kind::Group(members) => {
            let gid = ensure_id(sig);
            let mut members = flatten_group(members)?;
            for (i, m) in members.iter_mut().enumerate() {
                set_on_final(m, "group_id", Value::String(gid.clone()))?;
                set_on_final(m, "group_index", Value::from(i))?;
                freeze(m)?;
            }
            set_members(sig, "tasks", &members);
            Ok(gid)
        }
        Kind::Chord { header, mut body } => {
            let gid = ensure_id(sig);
            let mut header = flatten_group(header)?;
            for (i, m) in header.iter_mut().enumerate() {
                set_on_final(m, "group_id", Value::String(gid.clone()))?;
                set_on_final(m, "group_index", Value::from(i))?;
                freeze(m)?;
            }
            let body_id = freeze(&mut body)?;
            if body.subtask_type.is_none() {
                body.options.insert("group_id".into(), Value::String(gid.clone()));
            }
            let mut header_sig = super::primitives::group(header);
            header_sig.options.insert("task_id".into(), Value::String(gid));
            sig.kwargs.insert("header".into(), serde_json::to_value(header_sig).unwrap_or(Value::Null));
            sig.kwargs.insert("body".into(), serde_json::to_value(&*body).unwrap_or(Value::Null));
            Ok(body_id)
        }
    }
}

/// Attaches the rest of a chain (`rest`, last step first) to the canvas that runs before it.
fn attach_rest(sig: &mut Signature, rest: Vec<Signature>) -> Result<(), Error> {
    if rest.is_empty() {
        return Ok(());
    }
    match kind_of(sig)? {
        Kind::Task => {
            let mut chain: Vec<Signature> =
                sig.options.get("chain").and_then(|c| serde_json::from_value(c.clone()).ok()).unwrap_or_default();
            // Existing steps run first, so they stay at the end (the next step is the last).
            let mut combined = rest;
            combined.append(&mut chain);
            sig.options.insert("chain".into(), to_values(&combined));
            Ok(())
        }
        Kind::Chord { header, mut body } => {
            match kind_of(&body)? {
                Kind::Chain(mut steps) => {
                    let mut rest = rest;
                    rest.reverse();
                    steps.extend(rest);
                    set_members(&mut body, "tasks", &steps);
                }
                _ => attach_rest(&mut body, rest)?,
            }
            let header_sig = sig.kwargs.get("header").cloned();
            sig.kwargs.insert("body".into(), serde_json::to_value(&*body).unwrap_or(Value::Null));
            if header_sig.is_none() {
                set_members(sig, "header", &header);
            }
            Ok(())
        }
        _ => Err(canvas_error(sig, "a group can only end a chain (a group followed by a step becomes a chord)")),
    }
}

/// Applies `sig` with `prepend` added in front of its entry tasks' arguments.
pub(crate) fn apply<'a>(
    app: &'a App,
    mut sig: Signature,
    prepend: Option<Value>,
    lineage: &'a Lineage,
) -> BoxFuture<'a, Result<AsyncResult, Error>> {
    Box::pin(async move {
        let result_id = freeze(&mut sig)?;
        match kind_of(&sig)? {
            Kind::Task => send_task(app, sig, prepend, lineage).await,
            Kind::Chain(steps) => {
                let mut steps = steps.into_iter();
                let mut first = steps.next().ok_or_else(|| canvas_error(&sig, "empty chain"))?;
                let mut rest: Vec<Signature> = steps.collect();
                rest.reverse();
                attach_rest(&mut first, rest)?;
                apply(app, first, prepend, lineage).await?;
                Ok(AsyncResult::new(result_id, app.clone()))
            }
            Kind::Group(members) => {
                let ids: Vec<Value> =
                    members.iter().filter_map(|m| m.task_id().map(|s| Value::String(s.to_owned()))).collect();
                app.backend()
                    .put_record(
                        &format!("group:{result_id}"),
                        &Value::Array(ids),
                        app.config().result_expires_duration(),
                    )
                    .await?;
                for m in members {
                    apply(app, m, prepend.clone(), lineage).await?;
                }
                Ok(AsyncResult::new(result_id, app.clone()))
            }
            Kind::Chord { header, body } => {
                let gid = sig.task_id().map(str::to_owned).unwrap_or_default();
                if header.is_empty() {
                    return apply(app, *body, Some(Value::Array(Vec::new())), lineage).await;
                }
                app.backend().chord_init(&gid, header.len(), app.config().result_expires_duration()).await?;
                let body_value = serde_json::to_value(&*body).unwrap_or(Value::Null);
                for mut m in header {
                    set_on_final(&mut m, "chord", body_value.clone())?;
                    apply(app, m, prepend.clone(), lineage).await?;
                }
                Ok(AsyncResult::new(result_id, app.clone()))
            }
        }
    })
}

async fn send_task(
    app: &App,
    mut sig: Signature,
    prepend: Option<Value>,
    lineage: &Lineage,
) -> Result<AsyncResult, Error> {
    if let Some(v) = prepend.filter(|_| !sig.immutable) {
        sig.args.insert(0, v);
    }
    if let Some(p) = &lineage.parent_id {
        sig.options.entry("parent_id").or_insert_with(|| Value::String(p.clone()));
    }
    if let Some(r) = &lineage.root_id {
        sig.options.entry("root_id").or_insert_with(|| Value::String(r.clone()));
    }
    if !lineage.headers.is_empty() {
        let mut headers = match sig.options.remove("headers") {
            Some(Value::Object(h)) => h,
            _ => Map::new(),
        };
        for (k, v) in &lineage.headers {
            headers.entry(k.clone()).or_insert_with(|| v.clone());
        }
        sig.options.insert("headers".into(), Value::Object(headers));
    }
    super::send::send_one(app, sig).await
}
