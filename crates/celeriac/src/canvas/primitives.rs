//! `chain`, `group` and `chord`, built as Celery builds them: signatures named `celery.chain`,
//! `celery.group` and `celery.chord` with `subtask_type` set and their members under
//! `kwargs.tasks` / `kwargs.header` / `kwargs.body`, so they serialize to Celery's exact JSON
//! and nest inside each other and inside messages.

use super::tree::{Sig, fold_chain};
use crate::protocol::Signature;
use serde_json::{Map, Value};

fn tree(sig: Signature) -> Sig {
    Sig::from_signature(sig.clone()).unwrap_or_else(|_| Sig::task(sig))
}

/// Steps run one after another, each getting the previous result prepended to its arguments
/// (unless immutable). Built as Celery's `chain(...)` builds it: nested chains are flattened
/// and a group followed by a step becomes a chord.
pub fn chain(steps: impl IntoIterator<Item = Signature>) -> Signature {
    fold_chain(steps.into_iter().map(tree).collect(), false).to_signature()
}

/// Members run in parallel; the group's result is the list of their results.
pub fn group(members: impl IntoIterator<Item = Signature>) -> Signature {
    Sig::group(members.into_iter().map(tree).collect(), Map::new()).to_signature()
}

/// The header members run in parallel; when all have finished, `body` runs with the list of
/// their results (in header order) prepended.
pub fn chord(header: impl IntoIterator<Item = Signature>, body: Signature) -> Signature {
    Sig::chord_of(header.into_iter().map(tree).collect(), Some(tree(body)), Map::new()).to_signature()
}

/// The kinds of signature.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Task,
    Chain(Vec<Signature>),
    Group(Vec<Signature>),
    Chord { header: Vec<Signature>, body: Box<Signature> },
}

fn members(value: Option<&Value>) -> Vec<Signature> {
    value.and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}

/// The id under which `sig`'s result is stored (once frozen): a task's id, a chain's last
/// step's, a chord's body's, a group's id.
pub(crate) fn result_id(sig: &Signature) -> Option<String> {
    match kind(sig).ok()? {
        Kind::Task | Kind::Group(_) => sig.task_id().map(str::to_owned),
        Kind::Chain(steps) => steps.last().and_then(result_id),
        Kind::Chord { body, .. } => result_id(&body),
    }
}

/// What a signature is, with its members decoded.
pub(crate) fn kind(sig: &Signature) -> Result<Kind, String> {
    match sig.subtask_type.as_deref() {
        None => Ok(Kind::Task),
        Some("chain") => Ok(Kind::Chain(members(sig.kwargs.get("tasks")))),
        Some("group") => Ok(Kind::Group(members(sig.kwargs.get("tasks")))),
        Some("chord") => {
            let header = match sig.kwargs.get("header") {
                Some(Value::Array(_)) => members(sig.kwargs.get("header")),
                Some(h) => {
                    let g: Signature = serde_json::from_value(h.clone()).map_err(|e| format!("chord header: {e}"))?;
                    members(g.kwargs.get("tasks"))
                }
                None => Vec::new(),
            };
            let body = sig.kwargs.get("body").ok_or("chord without a body")?;
            let body: Signature = serde_json::from_value(body.clone()).map_err(|e| format!("chord body: {e}"))?;
            Ok(Kind::Chord { header, body: Box::new(body) })
        }
        Some(_) => Ok(Kind::Task),
    }
}

impl Signature {
    /// Declares `undo` as this step's compensation: if the chain it belongs to later fails for
    /// good, `undo` runs (with this step's result prepended, unless immutable), in reverse
    /// order of the steps that succeeded. A Celeriac extension (`options.compensation`).
    pub fn compensate_with(self, undo: Signature) -> Self {
        let value = serde_json::to_value(undo).unwrap_or(Value::Null);
        self.set("compensation", value)
    }

    /// The declared compensation, if any.
    pub fn compensation(&self) -> Option<Signature> {
        self.options.get("compensation").and_then(|v| serde_json::from_value(v.clone()).ok())
    }
}
