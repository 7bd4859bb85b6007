//! Saga rollback, a Celeriac extension: a chain step may declare a compensation
//! ([`Signature::compensate_with`]). As the chain runs, each succeeded step's compensation
//! (with the step's result prepended) rides along in the `celeriac_saga` header. When a step
//! fails for good, a rollback record is stored in the backend under `rollback:<root_id>` and the
//! compensations run one at a time, in reverse order, as ordinary tasks with their own retries,
//! acknowledged late so a worker killed mid-rollback hands the step to another worker. Each
//! step's state (pending, running, done, failed) is recorded as it goes, and the chain's
//! result records say whether the rollback is running, done, or failed.
//!
//! Python workers ignore these headers: rollback needs Celeriac workers for the chain's steps.

use super::apply::{Call as Apply, Ctx, apply_async};
use super::tree::Sig;
use crate::Error;
use crate::app::App;
use crate::protocol::{ExceptionInfo, ResultMeta, Signature, State, time};
use crate::worker::Call;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Header with the compensations of the steps that succeeded so far.
pub(crate) const SAGA: &str = "celeriac_saga";
/// Header with this step's own compensation (from `options.compensation`).
pub(crate) const COMPENSATION: &str = "celeriac_compensation";
/// Header marking a compensation message: `{"root_id", "index"}`.
pub(crate) const ROLLBACK: &str = "celeriac_rollback";

/// A compensation owed for a step that succeeded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Owed {
    compensation: Signature,
    step: String,
    step_id: String,
}

/// One compensation in a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackStep {
    /// The compensation task's name.
    pub task: String,
    /// Its task id.
    pub task_id: String,
    /// The step it undoes.
    pub for_step: String,
    /// That step's task id.
    pub for_step_id: String,
    /// `pending`, `running`, `done` or `failed`.
    pub state: String,
    /// Retries of the compensation so far.
    pub retries: u32,
    /// The error, when it failed.
    pub error: Option<ExceptionInfo>,
    /// The compensation call.
    pub compensation: Signature,
}

/// The durable record of one rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// The workflow's root id.
    pub root_id: String,
    /// `running`, `done` (every compensation succeeded) or `failed` (one failed for good).
    pub state: String,
    /// The step that failed.
    pub failed_task: String,
    /// Its task id.
    pub failed_task_id: String,
    /// Why it failed.
    pub error: ExceptionInfo,
    /// The chain's result id, whose record says how the rollback went.
    pub chain_result_id: String,
    /// When the rollback started.
    pub started_at: String,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Compensations in the order they run (reverse order of the steps).
    pub steps: Vec<RollbackStep>,
}

impl Rollback {
    /// A short summary stored in the chain's result records.
    fn summary(&self) -> Value {
        serde_json::json!({"state": self.state, "root_id": self.root_id, "compensations": self.steps.len()})
    }
}

fn key(chain_result_id: &str) -> String {
    format!("rollback:{chain_result_id}")
}

fn index_key(root_id: &str) -> String {
    format!("rollbacks:{root_id}")
}

async fn by_key(app: &App, chain_result_id: &str) -> Result<Option<Rollback>, Error> {
    Ok(app.backend().get_record(&key(chain_result_id)).await?.and_then(|v| serde_json::from_value(v).ok()))
}

/// The rollback of the chain whose result id (or workflow root id) is `id`: with several
/// chains rolled back under one root (chains in a group), the first that failed.
pub async fn rollback(app: &App, id: &str) -> Result<Option<Rollback>, Error> {
    if let Some(r) = by_key(app, id).await? {
        return Ok(Some(r));
    }
    Ok(rollbacks(app, id).await?.into_iter().next())
}

/// Every rollback under the workflow `root_id`, in the order they started.
pub async fn rollbacks(app: &App, root_id: &str) -> Result<Vec<Rollback>, Error> {
    let ids: Vec<String> = app
        .backend()
        .get_record(&index_key(root_id))
        .await?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(r) = by_key(app, &id).await? {
            out.push(r);
        }
    }
    Ok(out)
}

async fn save(app: &App, record: &Rollback) -> Result<(), Error> {
    let json = serde_json::to_vec(record).unwrap_or_default();
    let expires = app.config().result_expires_duration();
    app.backend().put_record(&key(&record.chain_result_id), &json, expires).await?;
    let mut ids: Vec<String> = app
        .backend()
        .get_record(&index_key(&record.root_id))
        .await?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    if !ids.contains(&record.chain_result_id) {
        ids.push(record.chain_result_id.clone());
        let json = serde_json::to_vec(&ids).unwrap_or_default();
        app.backend().put_record(&index_key(&record.root_id), &json, expires).await?;
    }
    Ok(())
}

fn owed(call: &Call) -> Vec<Owed> {
    call.message.headers.extra.get(SAGA).and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}

/// Names of the compensations a failure of this call would run (for error reports).
pub(crate) fn pending_compensations(call: &Call) -> Vec<String> {
    owed(call).into_iter().rev().map(|o| o.compensation.task).collect()
}

/// Headers the steps after a successful call carry: the owed compensations, plus this step's.
pub(crate) fn headers_after_success(call: &Call, value: &Value) -> Map<String, Value> {
    let mut list = owed(call);
    if let Some(mut comp) =
        call.message.headers.extra.get(COMPENSATION).and_then(|v| serde_json::from_value::<Signature>(v.clone()).ok())
    {
        if !comp.immutable {
            comp.args.insert(0, value.clone());
        }
        list.push(Owed { compensation: comp, step: call.request.task.clone(), step_id: call.request.id.clone() });
    }
    let mut headers = Map::new();
    if !list.is_empty() {
        headers.insert(SAGA.into(), serde_json::to_value(list).unwrap_or(Value::Null));
    }
    headers
}

/// The rollback a compensation belongs to (its chain's result id) and its place in it.
fn rollback_header(call: &Call) -> Option<(String, usize)> {
    let h = call.message.headers.extra.get(ROLLBACK)?;
    let key = h.get("key").or_else(|| h.get("root_id"))?.as_str()?.to_owned();
    Some((key, h.get("index")?.as_u64()? as usize))
}

/// Whether this call is a compensation (always acknowledged late).
pub(crate) fn is_compensation(headers: &Map<String, Value>) -> bool {
    headers.contains_key(ROLLBACK)
}

/// Starts the rollback when a saga step fails for good; returns the summary for the chain's
/// result records.
pub(crate) async fn start_rollback(call: &Call, exc: &ExceptionInfo) -> Option<Value> {
    if rollback_header(call).is_some() {
        return None;
    }
    let owed = owed(call);
    if owed.is_empty() {
        return None;
    }
    let app = &call.app;
    let root = call.request.root_id.clone().unwrap_or_else(|| call.request.id.clone());
    let chain_result_id = call
        .body
        .embed
        .as_ref()
        .and_then(|e| e.chain.as_ref())
        .and_then(|c| c.first())
        .and_then(super::primitives::result_id)
        .unwrap_or_else(|| call.request.id.clone());
    if let Ok(Some(existing)) = by_key(app, &chain_result_id).await {
        // This chain's failure was already handled (a redelivered step).
        return Some(existing.summary());
    }
    let steps = owed
        .into_iter()
        .rev()
        .map(|o| RollbackStep {
            task: o.compensation.task.clone(),
            task_id: uuid::Uuid::new_v4().to_string(),
            for_step: o.step,
            for_step_id: o.step_id,
            state: "pending".into(),
            retries: 0,
            error: None,
            compensation: o.compensation,
        })
        .collect();
    let record = Rollback {
        root_id: root,
        state: "running".into(),
        failed_task: call.request.task.clone(),
        failed_task_id: call.request.id.clone(),
        error: exc.clone(),
        chain_result_id,
        started_at: time::to_iso(&Utc::now()),
        finished_at: None,
        steps,
    };
    tracing::warn!(root_id = %record.root_id, compensations = record.steps.len(), "chain failed for good: rolling back");
    if let Err(e) = save(app, &record).await {
        tracing::error!(error = %e, "could not store the rollback record; not rolling back");
        return None;
    }
    send_step(app, &record, 0).await;
    Some(record.summary())
}

async fn send_step(app: &App, record: &Rollback, index: usize) {
    let Some(step) = record.steps.get(index) else { return };
    let mut sig = step.compensation.clone();
    sig.options.insert("task_id".into(), Value::String(step.task_id.clone()));
    sig.options.insert("parent_id".into(), Value::String(record.failed_task_id.clone()));
    sig.options.insert("root_id".into(), Value::String(record.root_id.clone()));
    let mut headers = Map::new();
    headers.insert(
        ROLLBACK.into(),
        serde_json::json!({"root_id": record.root_id, "key": record.chain_result_id, "index": index}),
    );
    let ctx = Ctx { app: app.clone(), current: None, headers, outbox: None };
    let sent = match Sig::from_signature(sig) {
        Ok(sig) => apply_async(&ctx, sig, Apply::default()).await.map(|_| ()),
        Err(e) => Err(super::apply::canvas_error("compensation", e)),
    };
    if let Err(e) = sent {
        tracing::error!(root_id = %record.root_id, error = %e, "could not send compensation");
    }
}

/// Marks a compensation running (called when it starts).
pub(crate) async fn on_start(call: &Call) {
    let Some((root, index)) = rollback_header(call) else { return };
    if let Ok(Some(mut record)) = by_key(&call.app, &root).await
        && let Some(step) = record.steps.get_mut(index)
        // A redelivered compensation that already finished keeps its final state.
        && step.state != "done"
        && step.state != "failed"
    {
        step.state = "running".into();
        step.retries = call.request.retries;
        let _ = save(&call.app, &record).await;
    }
}

/// Records a compensation's final state and sends the next one, or finishes the rollback.
pub(crate) async fn after_compensation(call: &Call, state: State, exc: Option<&ExceptionInfo>) {
    let Some((root, index)) = rollback_header(call) else { return };
    let app = &call.app;
    let Ok(Some(mut record)) = by_key(app, &root).await else { return };
    let Some(step) = record.steps.get_mut(index) else { return };
    if step.state == "done" || step.state == "failed" {
        return; // a redelivered compensation: the record already moved on
    }
    step.state = if state == State::Success { "done" } else { "failed" }.into();
    step.retries = call.request.retries;
    step.error = exc.cloned();
    if index + 1 < record.steps.len() {
        let _ = save(app, &record).await;
        send_step(app, &record, index + 1).await;
        return;
    }
    record.state = if record.steps.iter().all(|s| s.state == "done") { "done" } else { "failed" }.into();
    record.finished_at = Some(time::to_iso(&Utc::now()));
    let _ = save(app, &record).await;
    tracing::warn!(chain = %root, state = %record.state, "rollback finished");
    for reporter in app.error_reporters() {
        reporter.rollback_finished(&record);
    }
    let mut meta = ResultMeta::exception(&record.chain_result_id, State::Failure, &record.error, None);
    meta.extra.insert("rollback".into(), record.summary());
    let _ = app.backend().store(&meta, app.config().result_expires_duration()).await;
}
