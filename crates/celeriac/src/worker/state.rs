//! What a running worker knows about itself, shared by the consumer, the event dispatcher and
//! remote control: queues, running and reserved requests, revoked ids, per-task totals and
//! limit overrides.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// Revoked ids kept (Celery's `REVOKES_MAX`).
const REVOKES_MAX: usize = 50_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `(hard, soft)` time limits in seconds.
type Limits = (Option<f64>, Option<f64>);

/// What remote control shows of a request (Celery's `Request.info()`), kept as plain fields:
/// every task is recorded, few are ever inspected, so the JSON is built only when asked.
#[derive(Debug, Clone)]
pub(crate) struct RequestSnapshot {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub exchange: String,
    pub routing_key: String,
    pub priority: u8,
    pub redelivered: bool,
    /// Unix time the task started (`None` while reserved).
    pub time_start: Option<f64>,
    pub acknowledged: bool,
}

impl RequestSnapshot {
    /// `Request.info()` of this request on worker `hostname`.
    pub(crate) fn info(&self, hostname: &str) -> Map<String, Value> {
        let json = serde_json::json!({
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
            "type": self.name,
            "hostname": hostname,
            "time_start": self.time_start,
            "acknowledged": self.acknowledged,
            "delivery_info": {
                "exchange": self.exchange,
                "routing_key": self.routing_key,
                "priority": self.priority,
                "redelivered": self.redelivered,
            },
            "worker_pid": std::process::id(),
        });
        match json {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// A running request: what remote control shows, and how to stop it.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub info: RequestSnapshot,
    pub terminate: CancellationToken,
}

/// Shared worker state.
#[derive(Debug)]
pub(crate) struct WorkerState {
    pub hostname: String,
    pub queues: RwLock<Vec<String>>,
    /// Told when `queues` changes (`add_consumer` / `cancel_consumer`): a fetch in progress
    /// stops, and the next one asks for the new queues at once.
    pub queues_changed: tokio::sync::Notify,
    pub task_events: AtomicBool,
    pub clock: AtomicU64,
    pub started: std::time::Instant,
    revoked: Mutex<(HashSet<String>, VecDeque<String>)>,
    /// Stamped-header values revoked (`revoke_by_stamped_headers`): header → values.
    revoked_stamps: Mutex<HashMap<String, Vec<Value>>>,
    running: Mutex<HashMap<String, RequestInfo>>,
    reserved: Mutex<HashMap<String, RequestSnapshot>>,
    totals: Mutex<BTreeMap<String, u64>>,
    rate_limits: Mutex<HashMap<String, Option<String>>>,
    time_limits: Mutex<HashMap<String, Limits>>,
}

impl WorkerState {
    pub(crate) fn new(hostname: String, queues: Vec<String>, task_events: bool) -> Self {
        WorkerState {
            hostname,
            queues: RwLock::new(queues),
            queues_changed: tokio::sync::Notify::new(),
            task_events: AtomicBool::new(task_events),
            clock: AtomicU64::new(0),
            started: std::time::Instant::now(),
            revoked: Mutex::default(),
            revoked_stamps: Mutex::default(),
            running: Mutex::default(),
            reserved: Mutex::default(),
            totals: Mutex::default(),
            rate_limits: Mutex::default(),
            time_limits: Mutex::default(),
        }
    }

    pub(crate) fn queues(&self) -> Vec<String> {
        self.queues.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Lamport clock: the next value.
    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adjusts the clock to a received value (`max(local, received) + 1`).
    pub(crate) fn observe_clock(&self, received: u64) {
        self.clock.fetch_max(received, Ordering::Relaxed);
        self.clock.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn revoke(&self, id: &str) {
        let mut guard = lock(&self.revoked);
        let (set, order) = &mut *guard;
        if set.insert(id.to_owned()) {
            order.push_back(id.to_owned());
            if order.len() > REVOKES_MAX
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }

    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        lock(&self.revoked).0.contains(id)
    }

    /// Adds revoked stamp values (`revoke_by_stamped_headers`).
    pub(crate) fn revoke_stamps(&self, header: &str, values: Vec<Value>) {
        lock(&self.revoked_stamps).entry(header.to_owned()).or_default().extend(values);
    }

    /// The stamp that revokes a message with these stamps, as Celery's `Request.revoked()`
    /// matches them: a stamped value (or one of a list of them) among the revoked values.
    pub(crate) fn revoking_stamp(&self, stamped_headers: &[String], stamps: &Map<String, Value>) -> Option<String> {
        let revoked = lock(&self.revoked_stamps);
        for name in stamped_headers {
            let (Some(values), Some(stamp)) = (revoked.get(name), stamps.get(name)) else { continue };
            if stamp.is_null() {
                continue;
            }
            let hit = match stamp {
                Value::Array(items) => items.iter().any(|v| values.contains(v)),
                one => values.contains(one),
            };
            if hit {
                return Some(format!("{name}={stamp}"));
            }
        }
        None
    }

    pub(crate) fn revoked_ids(&self) -> Vec<String> {
        lock(&self.revoked).1.iter().cloned().collect()
    }

    pub(crate) fn reserve(&self, info: RequestSnapshot) {
        lock(&self.reserved).insert(info.id.clone(), info);
    }

    pub(crate) fn unreserve(&self, id: &str) {
        lock(&self.reserved).remove(id);
    }

    pub(crate) fn reserved(&self) -> Vec<Value> {
        lock(&self.reserved).values().map(|i| Value::Object(i.info(&self.hostname))).collect()
    }

    pub(crate) fn start(&self, info: RequestSnapshot) -> CancellationToken {
        let token = CancellationToken::new();
        lock(&self.running).insert(info.id.clone(), RequestInfo { info, terminate: token.clone() });
        token
    }

    pub(crate) fn finish(&self, id: &str, task: &str) {
        lock(&self.running).remove(id);
        *lock(&self.totals).entry(task.to_owned()).or_default() += 1;
    }

    pub(crate) fn running(&self) -> Vec<Value> {
        lock(&self.running).values().map(|r| Value::Object(r.info.info(&self.hostname))).collect()
    }

    pub(crate) fn active_count(&self) -> usize {
        lock(&self.running).len()
    }

    /// Stops a running task (`revoke --terminate`); returns whether it was running here.
    pub(crate) fn terminate(&self, id: &str) -> bool {
        lock(&self.running).get(id).map(|r| r.terminate.cancel()).is_some()
    }

    pub(crate) fn totals(&self) -> BTreeMap<String, u64> {
        lock(&self.totals).clone()
    }

    pub(crate) fn set_rate_limit(&self, task: &str, rate: Option<String>) {
        lock(&self.rate_limits).insert(task.to_owned(), rate);
    }

    /// The rate limit set at run time for `task`, if any (`Some(None)` = turned off).
    pub(crate) fn rate_limit(&self, task: &str) -> Option<Option<String>> {
        lock(&self.rate_limits).get(task).cloned()
    }

    pub(crate) fn set_time_limits(&self, task: &str, hard: Option<f64>, soft: Option<f64>) {
        lock(&self.time_limits).insert(task.to_owned(), (hard, soft));
    }

    pub(crate) fn time_limits(&self, task: &str) -> Option<Limits> {
        lock(&self.time_limits).get(task).copied()
    }
}
