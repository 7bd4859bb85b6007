//! Reading results: [`AsyncResult`] for one task, [`GroupResult`] for several. `get` always
//! has a timeout and fails with a clear error instead of hanging.

use crate::Error;
use crate::app::App;
use crate::protocol::{ResultMeta, State};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// A handle on one task's result.
#[derive(Debug, Clone)]
pub struct AsyncResult {
    id: String,
    app: App,
    /// Celery's result tuple with the parents known when the canvas was sent.
    tuple: Option<serde_json::Value>,
}

impl AsyncResult {
    /// A handle on the result of `id`.
    pub fn new(id: impl Into<String>, app: App) -> Self {
        AsyncResult { id: id.into(), app, tuple: None }
    }

    pub(crate) fn with_tuple(mut self, tuple: serde_json::Value) -> Self {
        self.tuple = Some(tuple);
        self
    }

    /// Celery's `as_tuple()`: `((id, parent), None)` for a task, `((id, parent), [members])`
    /// for a group, with the parents the sender knew (a chain's earlier steps).
    pub fn as_tuple(&self) -> serde_json::Value {
        self.tuple.clone().unwrap_or_else(|| crate::protocol::result_tuple(&self.id))
    }

    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored record, or a PENDING one when there is none.
    pub async fn meta(&self) -> Result<ResultMeta, Error> {
        Ok(self.app.backend().get(&self.id).await?.unwrap_or_else(|| ResultMeta::pending(&self.id)))
    }

    /// The current state.
    pub async fn state(&self) -> Result<State, Error> {
        Ok(self.meta().await?.status)
    }

    /// Whether the task finished (SUCCESS, FAILURE or REVOKED).
    pub async fn ready(&self) -> Result<bool, Error> {
        Ok(self.state().await?.is_ready())
    }

    /// Waits up to `timeout` for the record to be ready and returns it, whatever its state.
    pub async fn wait_meta(&self, timeout: Duration) -> Result<ResultMeta, Error> {
        let meta = self.app.backend().wait_ready(&self.id, timeout).await?;
        match meta {
            Some(m) if m.status.is_ready() => Ok(m),
            other => Err(Error::Timeout {
                task_id: self.id.clone(),
                waited: timeout,
                state: other.map(|m| m.status.to_string()).unwrap_or_else(|| "PENDING".to_owned()),
            }),
        }
    }

    /// Waits up to `timeout` and returns the value as `T`; a failed or revoked task is an error
    /// carrying the stored exception.
    pub async fn get<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T, Error> {
        let meta = self.wait_meta(timeout).await?;
        into_value(meta)
    }

    /// Deletes the stored result.
    pub async fn forget(&self) -> Result<(), Error> {
        Ok(self.app.backend().forget(&self.id).await?)
    }

    /// Tasks this task sent (from the stored `children`).
    pub async fn children(&self) -> Result<Vec<AsyncResult>, Error> {
        Ok(self.meta().await?.children_ids().into_iter().map(|id| AsyncResult::new(id, self.app.clone())).collect())
    }

    /// The task that sent this one (from the stored `parent_id`).
    pub async fn parent(&self) -> Result<Option<AsyncResult>, Error> {
        Ok(self.meta().await?.parent_id.map(|id| AsyncResult::new(id, self.app.clone())))
    }
}

/// The value of a ready record, or its error.
pub(crate) fn into_value<T: DeserializeOwned>(meta: ResultMeta) -> Result<T, Error> {
    match meta.status {
        State::Success => serde_json::from_value(meta.result.clone())
            .map_err(|source| Error::Decode { task_id: meta.task_id, source }),
        State::Revoked => Err(Error::Revoked {
            exc: meta.exception_info().unwrap_or_else(|| crate::protocol::ExceptionInfo::revoked("revoked")),
            task_id: meta.task_id,
        }),
        _ => Err(Error::TaskFailed {
            exc: meta.exception_info().unwrap_or_else(|| {
                crate::protocol::ExceptionInfo::new("Exception", meta.result.to_string(), "builtins")
            }),
            traceback: meta.traceback,
            task_id: meta.task_id,
        }),
    }
}

/// Results of a group of tasks.
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// Group id.
    pub id: String,
    /// One result per member, in order.
    pub results: Vec<AsyncResult>,
}

impl GroupResult {
    /// A group of `results` under `id`.
    pub fn new(id: impl Into<String>, results: Vec<AsyncResult>) -> Self {
        GroupResult { id: id.into(), results }
    }

    /// How many members finished.
    pub async fn completed_count(&self) -> Result<usize, Error> {
        let mut n = 0;
        for r in &self.results {
            if r.ready().await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether every member finished.
    pub async fn ready(&self) -> Result<bool, Error> {
        Ok(self.completed_count().await? == self.results.len())
    }

    /// Waits for every member (sharing one `timeout`) and returns their values in order; the
    /// first failure is returned as an error.
    pub async fn join<T: DeserializeOwned>(&self, timeout: Duration) -> Result<Vec<T>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.results.len());
        for r in &self.results {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            out.push(r.get(left).await?);
        }
        Ok(out)
    }
}
