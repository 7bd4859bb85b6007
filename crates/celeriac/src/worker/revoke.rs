//! Revokes that outlive a worker: `celeriac revoke` / [`crate::App::revoke`] record the ids in
//! the broker with an expiry (`worker_revoke_expires`, 3 h) *and* broadcast Celery's `revoke`
//! control command. Every worker loads the persisted set before it fetches its first message,
//! and then polls the broker's cheap version number (once a second), so a revoke sent while
//! no worker ran, or before a worker restarted, still stops the task: the worker finds it
//! revoked when the message is received and again when it starts, and stores REVOKED.
//!
//! Celery keeps revokes in each worker's memory (lost on restart unless `--statedb`); here
//! the broadcast still reaches running workers (Python ones too) at once, and the broker
//! record covers the rest. Not here: the in-memory set and the checks (`state.rs`,
//! `consumer.rs`), the remote-control handler (`control.rs`).

use super::state::WorkerState;
use crate::app::App;
use crate::protocol::{ExceptionInfo, ResultMeta, State};
use std::sync::Arc;
use std::time::Duration;

/// How often a worker looks for revokes persisted by others.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);

/// The argument a Celeriac broadcast adds so that workers do not persist again what the
/// sender already did (Celery's handler ignores arguments it does not know).
pub(crate) const PERSISTED: &str = "celeriac_persisted";

/// Revokes `ids` for every worker, now and after restarts: persists them in the broker until
/// `expires` (default `worker_revoke_expires`), broadcasts Celery's `revoke` (with
/// `terminate`, running tasks are stopped), and stores REVOKED for those that have not started.
pub(crate) async fn revoke(
    app: &App,
    ids: &[String],
    terminate: bool,
    expires: Option<Duration>,
) -> Result<(), crate::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let persisted = persist(app, ids, terminate, expires).await?;
    let args = serde_json::json!({"task_id": ids, "terminate": terminate, "signal": "SIGTERM", PERSISTED: persisted});
    super::control::broadcast(app, "revoke", args).await?;
    store_revoked(app, ids).await;
    Ok(())
}

/// Records `ids` in the broker; `false` where it keeps no such record.
pub(crate) async fn persist(
    app: &App,
    ids: &[String],
    terminate: bool,
    expires: Option<Duration>,
) -> Result<bool, crate::Error> {
    let expires = expires.unwrap_or_else(|| Duration::from_secs_f64(app.config().worker_revoke_expires.max(1.0)));
    let until = chrono::Utc::now() + chrono::Duration::from_std(expires).unwrap_or(chrono::Duration::hours(3));
    Ok(app.broker().persist_revoked(ids, terminate, until).await?)
}

/// Stores REVOKED for the ids that have not started anywhere (no record, PENDING, RECEIVED,
/// RETRY or REJECTED), as Celery's revoke handler does; a running or finished task keeps its
/// state.
pub(crate) async fn store_revoked(app: &App, ids: &[impl AsRef<str>]) {
    let backend = app.backend();
    for id in ids.iter().map(AsRef::as_ref) {
        let stored = match backend.get(id).await {
            Ok(meta) => meta.map_or(State::Pending, |m| m.status),
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "failed to mark task as revoked in the backend");
                continue;
            }
        };
        if !matches!(stored, State::Pending | State::Received | State::Retry | State::Rejected) {
            continue;
        }
        let mut meta = ResultMeta::exception(id, State::Revoked, &ExceptionInfo::revoked("revoked"), None);
        meta.children = None;
        if let Err(e) = backend.store(&meta, app.config().result_expires_duration()).await {
            tracing::warn!(task_id = %id, error = %e, "failed to mark task as revoked in the backend");
        }
    }
}

/// Loads the persisted revokes into `state` (stopping those with `terminate` that run here);
/// returns the version read, `None` if the broker could not be read.
pub(crate) async fn load(app: &App, state: &WorkerState) -> Option<u64> {
    let broker = app.broker();
    let read = async {
        let version = broker.revoked_version().await?;
        let entries = broker.persisted_revoked().await?;
        Ok::<_, crate::broker::BrokerError>((version, entries))
    };
    match read.await {
        Ok((version, entries)) => {
            for r in entries {
                state.revoke(&r.id);
                if r.terminate && state.terminate(&r.id) {
                    tracing::warn!(task_id = %r.id, "terminating a task revoked in the broker");
                }
            }
            Some(version)
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read the revoked ids persisted in the broker");
            None
        }
    }
}

/// Reloads the persisted revokes whenever the broker's version moves; runs until aborted.
pub(crate) async fn watch(app: App, state: Arc<WorkerState>, mut version: Option<u64>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        match app.broker().revoked_version().await {
            Ok(v) if Some(v) == version => {}
            Ok(_) => version = load(&app, &state).await,
            Err(e) => tracing::debug!(error = %e, "could not poll the revoked version"),
        }
    }
}
