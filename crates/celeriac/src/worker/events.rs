//! Celery events from the worker, as Flower and `celery events` read them (spec §7):
//! `worker-online`, `worker-heartbeat` every 2 s and `worker-offline` always; `task-*` events
//! when task events are on (`worker_send_task_events`, `-E`, or the `enable_events` command).
//! Each is a JSON object on the `celeryev` fanout exchange with routing key = type with `.`.

use super::state::WorkerState;
use crate::app::App;
use crate::protocol::Envelope;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Seconds between heartbeats.
pub(crate) const HEARTBEAT_FREQ: f64 = 2.0;

/// Sends events for one worker.
#[derive(Clone)]
pub(crate) struct Events {
    app: App,
    state: Arc<WorkerState>,
}

fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0.0, 0.0, 0.0])
}

impl Events {
    pub(crate) fn new(app: App, state: Arc<WorkerState>) -> Self {
        Events { app, state }
    }

    /// Sends an event of `kind` with `fields`.
    pub(crate) async fn send(&self, kind: &str, mut fields: Map<String, Value>) {
        let now = chrono::Utc::now();
        fields.insert("hostname".into(), self.state.hostname.clone().into());
        fields.insert("utcoffset".into(), 0.into());
        fields.insert("pid".into(), std::process::id().into());
        fields.insert("clock".into(), self.state.tick().into());
        fields.insert("timestamp".into(), (now.timestamp_micros() as f64 / 1e6).into());
        fields.insert("type".into(), kind.into());
        let routing_key = kind.replace('-', ".");
        let mut headers = Map::new();
        headers.insert("hostname".into(), self.state.hostname.clone().into());
        let envelope = Envelope::new(Value::Object(fields), headers, "celeryev", &routing_key, 1);
        if let Err(e) = self.app.broker().publish_fanout("celeryev", &routing_key, &envelope.to_wire()).await {
            tracing::debug!(error = %e, "could not send event");
        }
    }

    /// Whether task events are on (callers skip building fields when they are not).
    pub(crate) fn task_events_on(&self) -> bool {
        self.state.task_events.load(Ordering::Relaxed)
    }

    /// Sends a task event if task events are on.
    pub(crate) async fn task(&self, kind: &str, uuid: &str, fields: Map<String, Value>) {
        if !self.task_events_on() {
            return;
        }
        let mut fields = fields;
        fields.insert("uuid".into(), uuid.into());
        self.send(kind, fields).await;
    }

    fn worker_fields(&self, processed: u64) -> Map<String, Value> {
        let mut f = Map::new();
        f.insert("freq".into(), HEARTBEAT_FREQ.into());
        f.insert("active".into(), self.state.active_count().into());
        f.insert("processed".into(), processed.into());
        f.insert("loadavg".into(), loadavg().into());
        f.insert("sw_ident".into(), "celeriac".into());
        f.insert("sw_ver".into(), env!("CARGO_PKG_VERSION").into());
        f.insert("sw_sys".into(), std::env::consts::OS.into());
        f
    }

    /// `worker-heartbeat` now.
    pub(crate) async fn heartbeat(&self, processed: u64) {
        self.send("worker-heartbeat", self.worker_fields(processed)).await;
    }

    /// `worker-online`, then a heartbeat every 2 s until dropped (the caller aborts it).
    pub(crate) async fn run_heartbeats(self, processed: impl Fn() -> u64) {
        self.send("worker-online", self.worker_fields(processed())).await;
        loop {
            tokio::time::sleep(Duration::from_secs_f64(HEARTBEAT_FREQ)).await;
            self.heartbeat(processed()).await;
        }
    }

    /// `worker-offline`.
    pub(crate) async fn offline(&self, processed: u64) {
        self.send("worker-offline", self.worker_fields(processed)).await;
    }
}
