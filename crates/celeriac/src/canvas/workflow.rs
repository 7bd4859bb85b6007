//! Workflow status: given the id a workflow was sent under (or its root id), the tree of every
//! signature in it with its state, timing, retries and result, plus its rollback if it had one.
//! Canvases sent from a client are recorded (frozen, with all task ids) under `workflow:<id>`.

use super::primitives::{Kind, kind};
use super::saga::{Rollback, rollback};
use super::tree::{Node, Sig};
use crate::Error;
use crate::app::App;
use crate::protocol::{Signature, State};
use futures::future::BoxFuture;
use serde_json::Value;
use std::fmt;

/// Records a frozen canvas under its result id and its first task's id, and every group in it
/// (so `App::group_result` works before the group is sent). Walks the in-memory tree: decoding
/// the members back from JSON cost more than sending a chord of 10,000.
pub(crate) async fn save(app: &App, frozen: &Sig, result_id: &str) -> Result<(), Error> {
    let json = serde_json::to_vec(frozen).unwrap_or_default();
    let expires = app.config().result_expires_duration();
    let mut groups = Vec::new();
    collect_groups(frozen, &mut groups);
    let backend = app.backend();
    let tuples: Vec<(String, Value)> = groups
        .into_iter()
        .map(|(gid, members)| {
            let tuple =
                super::result::Res::group(gid.clone(), members.into_iter().map(super::result::Res::task).collect());
            (gid, tuple.as_tuple())
        })
        .collect();
    let mut keys = vec![format!("workflow:{result_id}")];
    if let Some(first) = first_task_id(frozen)
        && first != result_id
    {
        keys.push(format!("workflow:{first}"));
    }
    // Independent writes: sent together (one round trip on a pipelining backend).
    let saves = futures::future::try_join_all(tuples.iter().map(|(gid, t)| backend.save_group(gid, t, expires)));
    let records = futures::future::try_join_all(keys.iter().map(|k| backend.put_record(k, &json, expires)));
    tokio::try_join!(saves, records)?;
    Ok(())
}

/// The id under which `sig`'s result is stored (once frozen): a task's id, a chain's last
/// step's, a chord's body's, a group's id.
fn result_id(sig: &Sig) -> Option<String> {
    match &sig.node {
        Node::Task | Node::Group(_) => sig.id().map(str::to_owned),
        Node::Chain(steps) => steps.last().and_then(result_id),
        Node::Chord(parts) => parts.body.as_ref().and_then(result_id),
    }
}

/// Every group in `sig` with its members' result ids (a chord's header is not one: its
/// members are recorded with the chord).
fn collect_groups(sig: &Sig, out: &mut Vec<(String, Vec<String>)>) {
    match &sig.node {
        Node::Task => {}
        Node::Chain(steps) => steps.iter().for_each(|s| collect_groups(s, out)),
        Node::Group(members) => {
            if let Some(gid) = sig.id() {
                out.push((gid.to_owned(), members.iter().filter_map(result_id).collect()));
            }
            members.iter().for_each(|m| collect_groups(m, out));
        }
        Node::Chord(parts) => {
            // A chord without a body is not a canvas that can run; nothing in it is recorded.
            if let Some(body) = &parts.body {
                parts.header.tasks().iter().for_each(|m| collect_groups(m, out));
                collect_groups(body, out);
            }
        }
    }
}

/// The id of the task a canvas starts with (a group's or chord's own id).
fn first_task_id(sig: &Sig) -> Option<String> {
    match &sig.node {
        Node::Chain(steps) => steps.first().and_then(first_task_id),
        _ => sig.id().map(str::to_owned),
    }
}

/// One node of a workflow tree.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowNode {
    /// Task name, or `chain` / `group` / `chord` / `header` / `body`.
    pub name: String,
    /// Task id (group id for groups).
    pub id: Option<String>,
    /// State of a task node (PENDING when nothing is stored).
    pub state: Option<State>,
    /// Retries of a task node.
    pub retries: Option<u32>,
    /// When it started, if known.
    pub started: Option<String>,
    /// When it finished.
    pub done: Option<String>,
    /// Its result (or error), shortened.
    pub result: Option<String>,
    /// Its compensation task, if it declared one.
    pub compensation: Option<String>,
    /// Members or steps.
    pub children: Vec<WorkflowNode>,
}

/// A workflow's tree and its rollback.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    /// The tree.
    pub root: WorkflowNode,
    /// The rollback record, if the workflow was rolled back.
    pub rollback: Option<Rollback>,
}

/// The workflow recorded under `id`, with every task's current state.
pub async fn workflow(app: &App, id: &str) -> Result<Option<Workflow>, Error> {
    let Some(value) = app.backend().get_record(&format!("workflow:{id}")).await? else { return Ok(None) };
    let Ok(sig) = serde_json::from_value::<Signature>(value) else { return Ok(None) };
    let mut root = node(app, &sig, None).await?;
    let mut known = Vec::new();
    collect_ids(&root, &mut known);
    add_sent(app, &mut root, &known).await?;
    let root_id = Sig::from_signature(sig).ok().and_then(|s| first_task_id(&s)).unwrap_or_else(|| id.to_owned());
    let rollback = rollback(app, &root_id).await?;
    Ok(Some(Workflow { root, rollback }))
}

fn collect_ids(n: &WorkflowNode, out: &mut Vec<String>) {
    out.extend(n.id.clone());
    n.children.iter().for_each(|c| collect_ids(c, out));
}

/// Adds what each task sent beyond the canvas itself (its `link` callbacks and errbacks, and
/// tasks sent with `Request::send`), from the `children` stored with its result.
fn add_sent<'a>(app: &'a App, n: &'a mut WorkflowNode, known: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
    Box::pin(async move {
        for c in n.children.iter_mut() {
            add_sent(app, c, known).await?;
        }
        if n.state.is_none() || !n.children.is_empty() {
            return Ok(());
        }
        let Some(id) = n.id.clone() else { return Ok(()) };
        let meta = app.async_result(&id).meta().await?;
        for tuple in meta.children.iter().flatten() {
            let Some(res) = super::result::Res::from_tuple(tuple) else { continue };
            for child in res.leaf_ids().into_iter().filter(|c| !known.contains(c)) {
                let m = app.async_result(&child).meta().await?;
                n.children.push(WorkflowNode {
                    name: format!("sent: {}", m.name.clone().unwrap_or_else(|| "task".into())),
                    id: Some(child),
                    state: Some(m.status.clone()),
                    retries: m.retries,
                    started: m.extra.get("date_started").and_then(Value::as_str).map(str::to_owned),
                    done: m.date_done.clone(),
                    result: match m.status {
                        State::Pending => None,
                        State::Failure | State::Retry | State::Revoked => {
                            m.exception_info().map(|e| format!("{}: {}", e.exc_type, e.message()))
                        }
                        _ => Some(short(&m.result)),
                    },
                    compensation: None,
                    children: Vec::new(),
                });
            }
        }
        Ok(())
    })
}

/// Seconds between two ISO times, when both are known.
fn took(started: &Option<String>, done: &Option<String>) -> Option<f64> {
    let s = crate::protocol::time::parse_iso(started.as_deref()?)?;
    let d = crate::protocol::time::parse_iso(done.as_deref()?)?;
    Some((d - s).num_microseconds()? as f64 / 1e6)
}

fn short(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 60 { format!("{}…", text.chars().take(59).collect::<String>()) } else { text }
}

fn node<'a>(app: &'a App, sig: &'a Signature, label: Option<&'a str>) -> BoxFuture<'a, Result<WorkflowNode, Error>> {
    Box::pin(async move {
        let mut n = WorkflowNode {
            name: label.unwrap_or(&sig.task).to_owned(),
            id: sig.task_id().map(str::to_owned),
            state: None,
            retries: None,
            started: None,
            done: None,
            result: None,
            compensation: sig.compensation().map(|c| c.task),
            children: Vec::new(),
        };
        match kind(sig).map_err(|p| Error::Canvas { task: sig.task.clone(), problem: p })? {
            Kind::Task => {
                if let Some(id) = &n.id {
                    let meta = app.async_result(id).meta().await?;
                    n.retries = meta.retries;
                    n.started = meta.extra.get("date_started").and_then(Value::as_str).map(str::to_owned);
                    n.done = meta.date_done.clone();
                    n.result = match meta.status {
                        State::Pending => None,
                        State::Failure | State::Retry | State::Revoked => {
                            meta.exception_info().map(|e| format!("{}: {}", e.exc_type, e.message()))
                        }
                        _ => Some(short(&meta.result)),
                    };
                    n.state = Some(meta.status);
                }
            }
            Kind::Chain(steps) => {
                n.name = "chain".into();
                for s in &steps {
                    n.children.push(node(app, s, None).await?);
                }
            }
            Kind::Group(members) => {
                n.name = label.unwrap_or("group").into();
                for m in &members {
                    n.children.push(node(app, m, None).await?);
                }
            }
            Kind::Chord { header, body } => {
                n.name = "chord".into();
                let mut h = WorkflowNode {
                    name: "header".into(),
                    id: n.id.clone(),
                    state: None,
                    retries: None,
                    started: None,
                    done: None,
                    result: None,
                    compensation: None,
                    children: Vec::new(),
                };
                for m in &header {
                    h.children.push(node(app, m, None).await?);
                }
                n.children.push(h);
                let mut b = node(app, &body, None).await?;
                b.name = format!("body: {}", b.name);
                n.children.push(b);
            }
        }
        Ok(n)
    })
}

impl fmt::Display for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn line(f: &mut fmt::Formatter<'_>, n: &WorkflowNode, prefix: &str, last: bool, top: bool) -> fmt::Result {
            let branch = if top {
                ""
            } else if last {
                "└─ "
            } else {
                "├─ "
            };
            write!(f, "{prefix}{branch}{}", n.name)?;
            if let Some(state) = &n.state {
                write!(f, "  [{state}]")?;
            }
            if let Some(id) = &n.id {
                write!(f, "  {id}")?;
            }
            if let Some(r) = n.retries.filter(|r| *r > 0) {
                write!(f, "  retries={r}")?;
            }
            match took(&n.started, &n.done) {
                Some(t) => write!(f, "  started={}  took={t:.3}s", n.started.as_deref().unwrap_or_default())?,
                None => {
                    if let Some(s) = &n.started {
                        write!(f, "  started={s}")?;
                    }
                    if let Some(d) = &n.done {
                        write!(f, "  done={d}")?;
                    }
                }
            }
            if let Some(r) = &n.result {
                write!(f, "  → {r}")?;
            }
            if let Some(c) = &n.compensation {
                write!(f, "  (undo: {c})")?;
            }
            writeln!(f)?;
            let child_prefix =
                if top { prefix.to_owned() } else { format!("{prefix}{}", if last { "   " } else { "│  " }) };
            for (i, c) in n.children.iter().enumerate() {
                line(f, c, &child_prefix, i + 1 == n.children.len(), false)?;
            }
            Ok(())
        }
        line(f, &self.root, "", true, true)?;
        if let Some(r) = &self.rollback {
            writeln!(f, "rollback [{}] after {} {} failed: {}", r.state, r.failed_task, r.failed_task_id, r.error)?;
            for s in &r.steps {
                write!(f, "   {} for {}  [{}]  {}", s.task, s.for_step, s.state, s.task_id)?;
                if s.retries > 0 {
                    write!(f, "  retries={}", s.retries)?;
                }
                if let Some(e) = &s.error {
                    write!(f, "  → {e}")?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
