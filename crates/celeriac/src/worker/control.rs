//! Remote control over the broker's `celery.pidbox` fanout, so `celery inspect`, `celery
//! control` and Flower work with Celeriac workers (spec §7.3). Requests are
//! `{"method", "arguments", "destination", "ticket", "reply_to"}`; replies
//! `{"<node>": <answer>}` go to the `reply.celery.pidbox` exchange with the request's ticket.

use super::Shutdown;
use super::events::Events;
use super::state::WorkerState;
use crate::app::App;
use crate::protocol::pyjson::python_float_repr;
use crate::protocol::{Envelope, Message, args_repr, py_repr};
use serde_json::{Map, Value, json};
use std::collections::HashSet;
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

/// Broadcasts a remote-control command to every worker without waiting for replies, as
/// `app.control.broadcast(method, arguments=...)` does; `false` when the broker has no
/// broadcast.
pub(crate) async fn broadcast(app: &App, method: &str, arguments: Value) -> Result<bool, crate::Error> {
    let body = json!({"method": method, "arguments": arguments, "destination": null, "pattern": null, "matcher": null});
    let expires = chrono::Utc::now().timestamp_micros() as f64 / 1e6 + 1.0;
    let mut headers = Map::new();
    headers.insert("clock".into(), Value::from(1));
    headers.insert("expires".into(), Value::from(expires));
    let envelope = Envelope::new(body, headers, "celery.pidbox", "", 2);
    Ok(app.broker().publish_fanout("celery.pidbox", "", &envelope.to_wire()).await?)
}

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

fn nok(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

/// A string or a list of strings (Celery's variadic arguments), as a list.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
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
        if method == "shutdown" {
            // After the reply: the shutdown stops this listener. (Celery's worker exits without
            // replying; answering first lets `celery control shutdown` report success.)
            tracing::warn!("shutdown requested by remote control");
            self.shutdown.graceful();
        }
    }

    /// The answer to one command (`None`: no reply at all).
    async fn dispatch(&self, method: &str, args: &Map<String, Value>) -> Option<Value> {
        let text = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(match method {
            "ping" => ok("pong"),
            "registered" | "dump_tasks" => Value::from(self.registered(&strings(args.get("taskinfoitems")))),
            "active" | "dump_active" => {
                let safe = args.get("safe").and_then(Value::as_bool).unwrap_or(false);
                Value::from(
                    self.state.running().into_iter().map(|i| if safe { safe_info(i) } else { i }).collect::<Vec<_>>(),
                )
            }
            "reserved" | "dump_reserved" => Value::from(self.state.reserved()),
            "scheduled" | "dump_schedule" => Value::from(self.scheduled().await),
            "revoked" | "dump_revoked" => Value::from(self.state.revoked_ids()),
            "active_queues" => Value::from(self.state.queues().iter().map(|q| queue_info(q)).collect::<Vec<_>>()),
            "stats" => self.stats(),
            "conf" | "dump_conf" => censor(serde_json::to_value(self.app.config()).unwrap_or(Value::Null)),
            "clock" => json!({"clock": self.state.clock.load(Ordering::Relaxed)}),
            "report" => json!({"ok": format!("celeriac {} on {}", env!("CARGO_PKG_VERSION"), self.state.hostname)}),
            "hello" => {
                // Mingle: take the other node's revoked ids, answer with ours (oldest first).
                if text("from_node").as_deref() == Some(self.state.hostname.as_str()) {
                    return Some(Value::Null);
                }
                for id in strings(args.get("revoked")) {
                    self.state.revoke(&id);
                }
                json!({"revoked": self.state.revoked_ids(), "clock": self.state.tick()})
            }
            "query_task" => {
                let ids = strings(args.get("ids"));
                let mut found = Map::new();
                let scheduled =
                    self.scheduled().await.into_iter().filter_map(|mut s| s.get_mut("request").map(Value::take));
                let listed = [
                    ("active", self.state.running()),
                    ("reserved", self.state.reserved()),
                    ("scheduled", scheduled.collect()),
                ];
                for (kind, infos) in listed {
                    for info in infos {
                        if let Some(id) =
                            info.get("id").and_then(Value::as_str).filter(|id| ids.iter().any(|x| x == id))
                        {
                            found.entry(id.to_owned()).or_insert_with(|| json!([kind, info]));
                        }
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
                // Celery's handler returns None, and kombu still replies `{"<node>": null}`.
                self.events.heartbeat((self.processed)()).await;
                Value::Null
            }
            "revoke" | "terminate" => {
                let ids = strings(args.get("task_id"));
                let terminate =
                    method == "terminate" || args.get("terminate").and_then(Value::as_bool).unwrap_or(false);
                // A revoke from Python (or an older sender) is persisted here, so it too
                // outlives this worker; Celeriac's own sender did that already.
                if !args.get(super::revoke::PERSISTED).and_then(Value::as_bool).unwrap_or(false)
                    && let Err(e) = super::revoke::persist(&self.app, &ids, terminate, None).await
                {
                    tracing::warn!(error = %e, "could not persist the revoke in the broker");
                }
                return Some(self.revoke(&ids, terminate).await);
            }
            "revoke_by_stamped_headers" => return Some(self.revoke_by_stamped_headers(args)),
            "rate_limit" => {
                let Some(task) = text("task_name").filter(|t| self.app.task(t).is_some()) else {
                    tracing::error!(task = ?text("task_name"), "rate limit attempt for unknown task");
                    return Some(nok("unknown task"));
                };
                let rate = args.get("rate_limit").and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
                if let Some(r) = rate.as_deref().filter(|r| !r.is_empty() && *r != "0")
                    && let Err(e) = super::RateLimit::parse(r)
                {
                    return Some(nok(format!("Invalid rate limit string: {e}")));
                }
                // Celery: an empty rate disables the limit; "0" is a rate of no limit.
                let off = rate.as_deref().is_none_or(|r| r.is_empty() || r == "0");
                self.state.set_rate_limit(&task, if off { None } else { rate.clone() });
                tracing::info!(task, rate = ?rate, "new rate limit set by remote control");
                ok(if rate.as_deref().is_none_or(str::is_empty) {
                    "rate limit disabled successfully".to_owned()
                } else {
                    "new rate limit set successfully".to_owned()
                })
            }
            "time_limit" => {
                let Some(task) = text("task_name").filter(|t| self.app.task(t).is_some()) else {
                    tracing::error!(task = ?text("task_name"), "time limit change for unknown task");
                    return Some(nok("unknown task"));
                };
                let num = |k: &str| args.get(k).and_then(Value::as_f64);
                self.state.set_time_limits(&task, num("hard"), num("soft"));
                ok("time limits set successfully")
            }
            "add_consumer" => {
                let Some(queue) = text("queue") else { return Some(json!({"error": "queue is required"})) };
                // Celery's defaults: a direct exchange and a routing key named after the queue.
                let exchange = text("exchange").filter(|e| !e.is_empty()).unwrap_or_else(|| queue.clone());
                let routing_key = text("routing_key").filter(|r| !r.is_empty()).unwrap_or_else(|| queue.clone());
                if let Err(e) = self.app.broker().declare_queue(&queue, &exchange, &routing_key).await {
                    tracing::warn!(%queue, error = %e, "could not declare the queue");
                }
                let mut queues = self.state.queues.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !queues.contains(&queue) {
                    queues.push(queue.clone());
                }
                drop(queues);
                self.state.queues_changed.notify_waiters();
                ok(format!("add consumer {queue}"))
            }
            "cancel_consumer" => {
                let Some(queue) = text("queue") else { return Some(json!({"error": "queue is required"})) };
                self.state.queues.write().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|q| *q != queue);
                // As kombu's basic_cancel: nothing more is taken from it, not even by the
                // fetch waiting right now.
                self.state.queues_changed.notify_waiters();
                ok(format!("no longer consuming from {queue}"))
            }
            // The shutdown itself starts once the reply is sent (see `handle`).
            "shutdown" => ok("Warm shutdown"),
            other => json!({"error": format!("KeyError('{other}')")}),
        })
    }

    /// Celery's `scheduled`: the ETA tasks this worker received early and parked in the broker
    /// until due, as `{"eta", "priority", "request"}` (`priority` is the timer priority Celery
    /// gives every ETA entry, 6).
    async fn scheduled(&self) -> Vec<Value> {
        let parked = match self.app.broker().parked().await {
            Ok(parked) => parked,
            Err(e) => {
                tracing::warn!(error = %e, "could not list the parked ETA tasks");
                return Vec::new();
            }
        };
        parked
            .into_iter()
            .filter_map(|p| {
                let message = Message::from_wire(&p.payload).ok()?;
                let body = message.task_body().ok()?;
                let redelivered = serde_json::from_slice::<Value>(&p.payload)
                    .ok()
                    .and_then(|v| v.pointer("/headers/redelivered").and_then(Value::as_bool))
                    .unwrap_or(false);
                let info = super::consumer::request_info(&message, &body, redelivered).info(&self.state.hostname);
                Some(json!({"eta": message.headers.eta, "priority": 6, "request": info}))
            })
            .collect()
    }

    /// Celery's `revoke_by_stamped_headers`: remembers the stamp values (a task stamped with
    /// one is not run), and with `terminate` stops running tasks that carry one.
    fn revoke_by_stamped_headers(&self, args: &Map<String, Value>) -> Value {
        let headers: Map<String, Value> = match args.get("headers") {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), Value::from(v))))
                .collect(),
            _ => Map::new(),
        };
        for (name, values) in &headers {
            let values = match values {
                Value::Array(a) => a.clone(),
                one => vec![one.clone()],
            };
            self.state.revoke_stamps(name, values);
        }
        let shown = py_repr(&Value::Object(headers.clone()));
        if !args.get("terminate").and_then(Value::as_bool).unwrap_or(false) {
            return ok(format!("headers {shown} flagged as revoked, but not terminated"));
        }
        let mut terminated = Vec::new();
        for info in self.state.running() {
            let Some(id) = info.get("id").and_then(Value::as_str) else { continue };
            let stamps = info.get("stamps").and_then(Value::as_object).cloned().unwrap_or_default();
            let names: Vec<String> = stamps.keys().cloned().collect();
            if self.state.revoking_stamp(&names, &stamps).is_some() && self.state.terminate(id) {
                terminated.push(id.to_owned());
            }
        }
        if terminated.is_empty() {
            return ok(format!("headers {shown} were not terminated"));
        }
        ok(format!("headers {shown} revoked"))
    }

    /// Celery 5.7's `_revoke`: remembers the ids (a revoked task that reaches this worker
    /// later is not run), stores REVOKED for those that have not started anywhere (no record,
    /// PENDING, RECEIVED, RETRY or REJECTED; a task running here or elsewhere keeps its state,
    /// a finished one its result), and with `terminate` stops those running or waiting here.
    async fn revoke(&self, ids: &[String], terminate: bool) -> Value {
        let mut unique: Vec<&str> = Vec::new();
        for id in ids {
            if !unique.contains(&id.as_str()) {
                unique.push(id);
            }
        }
        for id in &unique {
            self.state.revoke(id);
        }
        let running: HashSet<String> = ids_of(self.state.running());
        let idle: Vec<&str> = unique.iter().copied().filter(|id| !running.contains(*id)).collect();
        super::revoke::store_revoked(&self.app, &idle).await;
        if terminate {
            let reserved = ids_of(self.state.reserved());
            // A reserved one is stopped too: it is revoked, so it will not start.
            let terminated: Vec<&str> =
                unique.iter().copied().filter(|id| self.state.terminate(id) || reserved.contains(*id)).collect();
            if terminated.is_empty() {
                return ok("terminate: tasks unknown");
            }
            tracing::info!(tasks = %terminated.join(", "), "terminating by remote control");
            return ok(format!("terminate: {}", terminated.join(", ")));
        }
        tracing::info!(tasks = %unique.join(", "), "tasks flagged as revoked");
        // Celery formats the ids as a Python set.
        let set = if unique.is_empty() {
            "set()".to_owned()
        } else {
            let items: Vec<String> = unique.iter().map(|id| py_repr(&Value::from(*id))).collect();
            format!("{{{}}}", items.join(", "))
        };
        ok(format!("tasks {set} flagged as revoked"))
    }

    /// Celery's `registered`: sorted names, each followed by `[attr=value ...]` for the
    /// requested attributes that are set (default: `exchange`, `routing_key`, `rate_limit`).
    fn registered(&self, items: &[String]) -> Vec<String> {
        let items: Vec<&str> = if items.is_empty() {
            vec!["exchange", "routing_key", "rate_limit"]
        } else {
            items.iter().map(String::as_str).filter(|i| !i.starts_with('_')).collect()
        };
        self.app
            .task_names()
            .into_iter()
            .filter(|name| !name.starts_with("celery."))
            .map(|name| {
                let fields: Vec<String> =
                    items.iter().filter_map(|item| Some(format!("{item}={}", self.task_attr(&name, item)?))).collect();
                if fields.is_empty() { name } else { format!("{name} [{}]", fields.join(" ")) }
            })
            .collect()
    }

    /// `str(getattr(task, item))` as Celery shows it, with the limits changed at run time;
    /// `None` where Celery's attribute would be `None` (or is unknown).
    fn task_attr(&self, name: &str, item: &str) -> Option<String> {
        let o = self.app.task(name)?.options();
        let c = self.app.config();
        let py_bool = |b: bool| if b { "True" } else { "False" }.to_owned();
        let limits = self.state.time_limits(name);
        match item {
            "name" => Some(name.to_owned()),
            "rate_limit" => self.state.rate_limit(name).unwrap_or(o.rate_limit),
            // Python's str(float): `2.0`, not `2`.
            "time_limit" => limits.and_then(|(hard, _)| hard).or(o.time_limit).map(python_float_repr),
            "soft_time_limit" => limits.and_then(|(_, soft)| soft).or(o.soft_time_limit).map(python_float_repr),
            "queue" => o.queue,
            "priority" => o.priority.map(|p| p.to_string()),
            "acks_late" => Some(py_bool(o.acks_late.unwrap_or(c.task_acks_late))),
            "ignore_result" => Some(py_bool(o.ignore_result.unwrap_or(c.task_ignore_result))),
            "track_started" => Some(py_bool(o.track_started.unwrap_or(c.task_track_started))),
            "max_retries" => o.retry.max_retries.map(|n| n.to_string()),
            "default_retry_delay" => Some(o.retry.default_retry_delay.to_string()),
            _ => None,
        }
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
                "uri_prefix": null, "heartbeat": 0.0, "failover_strategy": "round-robin", "alternates": [],
                "credential_provider": null
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

/// The ids of request infos.
fn ids_of(infos: Vec<Value>) -> HashSet<String> {
    infos.iter().filter_map(|i| i.get("id")?.as_str().map(str::to_owned)).collect()
}

/// `Request.info(safe=True)` (Flower asks `active` so): arguments as their reprs.
fn safe_info(mut info: Value) -> Value {
    if let Value::Object(m) = &mut info {
        if let Some(Value::Array(args)) = m.get("args") {
            let repr = args_repr(args);
            m.insert("args".into(), repr.into());
        }
        if let Some(kwargs @ Value::Object(_)) = m.get("kwargs") {
            let repr = py_repr(kwargs);
            m.insert("kwargs".into(), repr.into());
        }
    }
    info
}

const MASK: &str = "********";

/// Celery's `filter_hidden_settings` for `conf` replies: settings whose names look secret are
/// masked, and so are passwords in broker and backend URLs.
fn censor(value: Value) -> Value {
    const HIDDEN: [&str; 8] = ["API", "TOKEN", "KEY", "SECRET", "PASS", "PROFANITIES_LIST", "SIGNATURE", "DATABASE"];
    let Value::Object(map) = value else { return value };
    let censored = map.into_iter().map(|(key, v)| {
        let upper = key.to_uppercase();
        let v = match v {
            Value::Object(_) => censor(v),
            _ if HIDDEN.iter().any(|w| upper.contains(w)) => MASK.into(),
            Value::String(url) if upper.contains("BROKER_URL") || upper.contains("BACKEND") => {
                mask_password(&url).into()
            }
            other => other,
        };
        (key, v)
    });
    Value::Object(censored.collect())
}

/// `scheme://user:********@host...` (unchanged without a password).
fn mask_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:{MASK}{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_replies_hide_secrets_as_celery_does() {
        let conf = json!({
            "broker_url": "redis://user:s3cret@h:6379/0",
            "result_backend": "redis://:pw@h:6379/1",
            "broker_transport_options": {"sentinel_kwargs": {"password": "x"}, "visibility_timeout": 60},
            "task_routes": {"a.*": "q"},
            "task_default_queue": "celery",
            "result_backend_transport_options": {},
        });
        assert_eq!(
            censor(conf),
            json!({
                "broker_url": "redis://user:********@h:6379/0",
                "result_backend": "redis://:********@h:6379/1",
                "broker_transport_options": {"sentinel_kwargs": {"password": "********"}, "visibility_timeout": 60},
                "task_routes": {"a.*": "q"},
                "task_default_queue": "celery",
                "result_backend_transport_options": {},
            })
        );
        assert_eq!(mask_password("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(mask_password("sqlite://data.db"), "sqlite://data.db");
    }

    #[test]
    fn safe_info_shows_argument_reprs() {
        let info = json!({"id": "i", "args": [1, "a"], "kwargs": {"k": true}});
        assert_eq!(safe_info(info), json!({"id": "i", "args": "(1, 'a')", "kwargs": "{'k': True}"}));
    }

    #[test]
    fn variadic_arguments_are_lists() {
        assert_eq!(strings(Some(&json!(["a", "b"]))), ["a", "b"]);
        assert_eq!(strings(Some(&json!("a"))), ["a"]);
        assert!(strings(None).is_empty());
    }
}
