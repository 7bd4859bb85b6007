//! Remote control over the broker's `celery.pidbox` fanout, so `celery inspect`, `celery
//! control` and Flower work with Celeriac workers (spec §7.3). Requests are
//! `{"method", "arguments", "destination", "ticket", "reply_to"}`; replies
//! `{"<node>": <answer>}` go to the `reply.celery.pidbox` exchange with the request's ticket.

use super::Shutdown;
use super::events::Events;
use super::state::WorkerState;
use crate::app::App;
use crate::protocol::{Envelope, ExceptionInfo, ResultMeta, State};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(crate) struct Control {
    pub app: App,
    pub state: Arc<WorkerState>,
    pub events: Events,
    pub shutdown: Shutdown,
    pub concurrency: usize,
    pub prefetch: usize,
    pub processed: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Listens for remote-control requests until the worker stops.
pub(crate) async fn run(control: Control) {
    let mut rx = match control.app.broker().subscribe_fanout("celery.pidbox").await {
        Ok(Some(rx)) => rx,
        Ok(None) => return, // this transport has no broadcast: no remote control
        Err(e) => {
            tracing::warn!(error = %e, "remote control unavailable");
            return;
        }
    };
    while let Some(payload) = rx.recv().await {
        let Some(request) = Envelope::from_wire(&payload) else { continue };
        if let Some(clock) = request.headers.get("clock").and_then(Value::as_u64) {
            control.state.observe_clock(clock);
        }
        control.handle(&request.body).await;
    }
}

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

impl Control {
    fn for_me(&self, body: &Value) -> bool {
        match body.get("destination") {
            Some(Value::Array(nodes)) => nodes.iter().any(|n| n.as_str() == Some(&self.state.hostname)),
            _ => true,
        }
    }

    async fn handle(&self, body: &Value) {
        if !self.for_me(body) {
            return;
        }
        let method = body.get("method").and_then(Value::as_str).unwrap_or_default();
        let args = body.get("arguments").and_then(Value::as_object).cloned().unwrap_or_default();
        tracing::debug!(method, "remote control");
        let reply = self.dispatch(method, &args).await;
        if let (Some(ticket), Some(reply_to), Some(reply)) = (body.get("ticket"), body.get("reply_to"), reply) {
            let exchange = reply_to.get("exchange").and_then(Value::as_str).unwrap_or("reply.celery.pidbox");
            let routing_key = reply_to.get("routing_key").and_then(Value::as_str).unwrap_or_default();
            let mut headers = Map::new();
            headers.insert("ticket".into(), ticket.clone());
            headers.insert("clock".into(), self.state.tick().into());
            let mut answer = Map::new();
            answer.insert(self.state.hostname.clone(), reply);
            let envelope = Envelope::new(Value::Object(answer), headers, exchange, routing_key, 1);
            if let Err(e) = self.app.broker().publish_direct(exchange, routing_key, &envelope.to_wire()).await {
                tracing::warn!(error = %e, "could not reply to remote control");
            }
        }
    }

    /// The answer to one command (`None`: no reply at all).
    async fn dispatch(&self, method: &str, args: &Map<String, Value>) -> Option<Value> {
        let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(match method {
            "ping" => ok("pong"),
            "registered" => Value::from(self.app.task_names()),
            "active" => Value::from(self.state.running()),
            "reserved" => Value::from(self.state.reserved()),
            "scheduled" => json!([]),
            "revoked" => Value::from(self.state.revoked_ids()),
            "active_queues" => Value::from(self.state.queues().iter().map(|q| queue_info(q)).collect::<Vec<_>>()),
            "stats" => self.stats(),
            "conf" => serde_json::to_value(self.app.config()).unwrap_or(Value::Null),
            "clock" => json!({"clock": self.state.clock.load(Ordering::Relaxed)}),
            "report" => json!({"ok": format!("celeriac {} on {}", env!("CARGO_PKG_VERSION"), self.state.hostname)}),
            "hello" => json!({"revoked": {}, "clock": self.state.clock.load(Ordering::Relaxed)}),
            "query_task" => {
                let ids: Vec<String> = match args.get("ids") {
                    Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                    Some(Value::String(s)) => vec![s.clone()],
                    _ => Vec::new(),
                };
                let mut found = Map::new();
                for info in self.state.running() {
                    if let Some(id) = info.get("id").and_then(Value::as_str).filter(|id| ids.iter().any(|x| x == id)) {
                        found.insert(id.to_owned(), json!(["active", info]));
                    }
                }
                Value::Object(found)
            }
            "enable_events" => {
                let was = self.state.task_events.swap(true, Ordering::Relaxed);
                ok(if was { "task events already enabled" } else { "task events enabled" })
            }
            "disable_events" => {
                let was = self.state.task_events.swap(false, Ordering::Relaxed);
                ok(if was { "task events disabled" } else { "task events already disabled" })
            }
            "heartbeat" => {
                self.events.heartbeat((self.processed)()).await;
                return None;
            }
            "revoke" | "terminate" => {
                let ids: Vec<String> = match args.get("task_id") {
                    Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                    Some(Value::String(s)) => vec![s.clone()],
                    _ => Vec::new(),
                };
                let terminate =
                    method == "terminate" || args.get("terminate").and_then(Value::as_bool).unwrap_or(false);
                for id in &ids {
                    self.state.revoke(id);
                    if terminate {
                        self.state.terminate(id);
                    }
                    // Celery 5.6+ stores REVOKED at once, even for ids this worker never saw.
                    let mut meta = ResultMeta::exception(id, State::Revoked, &ExceptionInfo::revoked("revoked"), None);
                    meta.children = None;
                    let _ = self.app.backend().store(&meta, self.app.config().result_expires_duration()).await;
                }
                ok(format!("tasks {} flagged as revoked", ids.join(", ")))
            }
            "rate_limit" => {
                let Some(task) = text("task_name") else { return Some(json!({"error": "task_name is required"})) };
                if self.app.task(&task).is_none() {
                    return Some(json!({"error": format!("unknown task {task}")}));
                }
                let rate = args.get("rate_limit").and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                if let Some(r) = rate.as_deref().filter(|r| !r.is_empty() && *r != "0")
                    && let Err(e) = super::RateLimit::parse(r)
                {
                    return Some(json!({"error": format!("invalid rate limit string: {e}")}));
                }
                let off = rate.as_deref().is_none_or(|r| r.is_empty() || r == "0");
                self.state.set_rate_limit(&task, if off { None } else { rate.clone() });
                ok(if off {
                    "rate limit disabled successfully".to_owned()
                } else {
                    "new rate limit set successfully".to_owned()
                })
            }
            "time_limit" => {
                let Some(task) = text("task_name") else { return Some(json!({"error": "task_name is required"})) };
                if self.app.task(&task).is_none() {
                    return Some(json!({"error": format!("unknown task {task}")}));
                }
                let num = |k: &str| args.get(k).and_then(Value::as_f64);
                self.state.set_time_limits(&task, num("hard"), num("soft"));
                ok("time limits set successfully")
            }
            "add_consumer" => {
                let Some(queue) = text("queue") else { return Some(json!({"error": "queue is required"})) };
                let mut queues = self.state.queues.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !queues.contains(&queue) {
                    queues.push(queue.clone());
                }
                ok(format!("add consumer {queue}"))
            }
            "cancel_consumer" => {
                let Some(queue) = text("queue") else { return Some(json!({"error": "queue is required"})) };
                self.state.queues.write().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|q| *q != queue);
                ok(format!("no longer consuming from {queue}"))
            }
            "shutdown" => {
                tracing::warn!("shutdown requested by remote control");
                self.shutdown.graceful();
                ok("Warm shutdown")
            }
            other => json!({"error": format!("KeyError('{other}')")}),
        })
    }

    fn stats(&self) -> Value {
        let broker_url = self.app.broker().url();
        let (transport, rest) = broker_url.split_once("://").unwrap_or(("", &broker_url));
        let host = rest.rsplit('@').next().unwrap_or_default();
        let (hostname, port) = host.split('/').next().unwrap_or_default().split_once(':').unwrap_or((host, "0"));
        json!({
            "total": self.state.totals(),
            "pid": std::process::id(),
            "clock": self.state.clock.load(Ordering::Relaxed).to_string(),
            "uptime": self.state.started.elapsed().as_secs(),
            "pool": {
                "implementation": "celeriac:tokio",
                "max-concurrency": self.concurrency,
                "processes": [std::process::id()],
                "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
                "writes": {"total": 0, "avg": "0%", "all": "", "raw": "", "strategy": "", "inqueues": {"total": 0, "active": 0}}
            },
            "broker": {
                "hostname": hostname, "userid": null, "virtual_host": host.split('/').nth(1).unwrap_or("0"),
                "port": port.parse::<u16>().unwrap_or(0), "insist": false, "ssl": matches!(transport, "rediss" | "amqps"),
                "transport": transport, "connect_timeout": 4, "transport_options": {}, "login_method": null,
                "uri_prefix": null, "heartbeat": 0.0, "failover_strategy": "round-robin", "alternates": []
            },
            "prefetch_count": self.prefetch,
            "rusage": rusage(),
        })
    }
}

fn rusage() -> Value {
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({"maxrss": rss_kib, "utime": 0.0, "stime": 0.0, "ixrss": 0, "idrss": 0, "isrss": 0, "minflt": 0, "majflt": 0,
           "nswap": 0, "inblock": 0, "oublock": 0, "msgsnd": 0, "msgrcv": 0, "nsignals": 0, "nvcsw": 0, "nivcsw": 0})
}

/// kombu's `Queue.as_dict(recurse=True)` for a direct queue of that name.
fn queue_info(name: &str) -> Value {
    json!({
        "name": name,
        "exchange": {"name": name, "type": "direct", "arguments": null, "durable": true, "passive": false,
                     "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": name, "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "alias": null,
        "bindings": [], "no_declare": null, "expires": null, "message_ttl": null, "max_length": null,
        "max_length_bytes": null, "max_priority": null
    })
}
