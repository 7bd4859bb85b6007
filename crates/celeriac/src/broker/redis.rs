//! Redis broker (`redis://host:port/db`) in kombu's layout, so Celeriac and Celery workers and
//! clients share queues (spec §2).
//!
//! - A queue is a list per priority bucket (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`; 0 is
//!   served first); publishing is `LPUSH` of the kombu JSON envelope, consuming takes from the
//!   right end. Publishing to a queue records kombu's `_kombu.binding.<q>` entry.
//! - Unacknowledged messages live in kombu's `unacked` hash (`tag → [envelope, exchange,
//!   routing_key]`) and `unacked_index` sorted set (score = delivery time), so Python workers
//!   can restore ours and we restore theirs after `visibility_timeout` (3600 s), under kombu's
//!   `unacked_mutex`.
//! - **Beyond kombu:** the pop and the unacked record are one Lua script (kombu pops first and
//!   records later, losing the message if the worker dies in between). A worker renews the
//!   `unacked_index` score of what it holds, lists what it holds in `celeriac.held.<node>`, and
//!   keeps `celeriac.alive.<node>` fresh; other Celeriac workers give a dead worker's messages
//!   back within seconds instead of after the visibility timeout.
//! - **Beyond kombu:** a message whose ETA is in the future waits in the `celeriac.delayed`
//!   sorted set (not in `unacked`), and is moved back to its queue when due, so a long ETA never
//!   outlives the visibility timeout and never runs twice.
//! - Dead letters: `celeriac.dead_letters` (hash) and `celeriac.dead_letters.index` (by time).

use super::{Broker, BrokerError, DeadLetter, Delivery, QueueStats, peek_ids};
use crate::config::Config;
use crate::protocol::pyjson;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// kombu's separator between a queue name and its priority bucket.
pub const SEP: &str = "\x06\x16";
/// kombu's priority buckets.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// How long a Celeriac worker's liveness key lives without renewal.
const ALIVE_MS: u64 = 10_000;

/// Pops up to N messages across the given list keys in order and records each as unacked in
/// kombu's layout, in one atomic step.
const CLAIM: &str = r#"
local n = tonumber(ARGV[1])
local now = ARGV[2]
local nkeys = #KEYS
local unacked, index, held = KEYS[nkeys - 2], KEYS[nkeys - 1], KEYS[nkeys]
local out = {}
local got = 0
for i = 1, nkeys - 3 do
  while got < n do
    local m = redis.call('RPOP', KEYS[i])
    if not m then break end
    local tag, ex, rk
    local ok, env = pcall(cjson.decode, m)
    if ok and type(env) == 'table' and type(env.properties) == 'table' then
      tag = env.properties.delivery_tag
      local di = env.properties.delivery_info
      if type(di) == 'table' then ex = di.exchange; rk = di.routing_key end
    end
    if type(tag) ~= 'string' then tag = 'celeriac-' .. redis.sha1hex(m .. now .. got) end
    if type(ex) ~= 'string' then ex = '' end
    if type(rk) ~= 'string' then rk = ARGV[2 + i] end
    redis.call('HSET', unacked, tag, '[' .. m .. ', ' .. cjson.encode(ex) .. ', ' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', index, now, tag)
    redis.call('SADD', held, tag)
    got = got + 1
    out[#out + 1] = ARGV[2 + i]
    out[#out + 1] = tag
    out[#out + 1] = m
  end
end
return out
"#;

/// Removes an unacked message (if still there) and puts `payload` on `dest`: at the front
/// (`front`), the back (`back`), or into the delayed set at score ARGV[4] (`delay`).
const RESTORE: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if ARGV[3] == 'front' then
  redis.call('RPUSH', ARGV[5], ARGV[2])
elseif ARGV[3] == 'back' then
  redis.call('LPUSH', ARGV[5], ARGV[2])
else
  redis.call('ZADD', KEYS[4], ARGV[4], cjson.encode({ARGV[5], ARGV[2]}))
end
return 1
"#;

/// Moves due delayed messages to the back of their lists.
const PROMOTE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local item = cjson.decode(member)
    redis.call('LPUSH', item[1], item[2])
  end
end
return #due
"#;

/// The Redis broker.
pub struct RedisBroker {
    client: redis::Client,
    db: i64,
    conn: ConnectionManager,
    url: String,
    prefix: String,
    visibility: Duration,
    polling_interval: Duration,
    node: String,
    keys: Keys,
    declared: Mutex<HashSet<String>>,
    /// Tags handed to this process's consumer and not settled yet. A tag in our `held` set
    /// that is not here was claimed by a script whose reply was lost (the connection dropped):
    /// housekeeping gives it back.
    delivered: Mutex<HashSet<String>>,
    housekeeping: Mutex<Housekeeping>,
    claim: redis::Script,
    restore: redis::Script,
    promote: redis::Script,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").field("url", &self.url).field("node", &self.node).finish_non_exhaustive()
    }
}

struct Keys {
    unacked: String,
    unacked_index: String,
    unacked_mutex: String,
    delayed: String,
    held: String,
    alive: String,
    dead: String,
    dead_index: String,
    dead_seq: String,
}

#[derive(Default)]
struct Housekeeping {
    last_promote: Option<tokio::time::Instant>,
    last_recover: Option<tokio::time::Instant>,
    last_alive: Option<tokio::time::Instant>,
}

fn err(operation: &'static str) -> impl FnOnce(redis::RedisError) -> BrokerError {
    move |e| BrokerError::storage(operation, e)
}

fn now_secs() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6
}

/// The list key of `queue` for `priority` (kombu's buckets, 0 served first).
pub fn queue_key(queue: &str, priority: u8) -> String {
    let bucket = PRIORITY_STEPS.iter().rev().find(|s| **s <= priority.min(9)).copied().unwrap_or(0);
    if bucket == 0 { queue.to_owned() } else { format!("{queue}{SEP}{bucket}") }
}

impl RedisBroker {
    /// Connects to `url`. Transport options: `visibility_timeout` (3600), `global_keyprefix`,
    /// `polling_interval` (idle poll ceiling, 0.05 s), `unacked_key`, `unacked_index_key`,
    /// `unacked_mutex_key`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self, BrokerError> {
        let client = redis::Client::open(url).map_err(err("open"))?;
        let db = db_number(url);
        let conn = ConnectionManager::new(client.clone()).await.map_err(err("connect"))?;
        let text = |name: &str| match config.broker_transport_options.get(name) {
            Some(toml::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let prefix = text("global_keyprefix").unwrap_or_default();
        let k = |name: &str| format!("{prefix}{name}");
        let node = uuid::Uuid::new_v4().simple().to_string();
        let keys = Keys {
            unacked: k(&text("unacked_key").unwrap_or_else(|| "unacked".into())),
            unacked_index: k(&text("unacked_index_key").unwrap_or_else(|| "unacked_index".into())),
            unacked_mutex: k(&text("unacked_mutex_key").unwrap_or_else(|| "unacked_mutex".into())),
            delayed: k("celeriac.delayed"),
            held: k(&format!("celeriac.held.{node}")),
            alive: k(&format!("celeriac.alive.{node}")),
            dead: k("celeriac.dead_letters"),
            dead_index: k("celeriac.dead_letters.index"),
            dead_seq: k("celeriac.dead_letters.seq"),
        };
        let secs = |name: &str, default: f64| {
            Duration::from_secs_f64(config.transport_seconds(name).unwrap_or(default).max(0.001))
        };
        Ok(RedisBroker {
            client,
            db,
            conn,
            url: super::redact(url),
            visibility: secs("visibility_timeout", 3600.0),
            polling_interval: secs("polling_interval", 0.05),
            prefix,
            node,
            keys,
            declared: Mutex::default(),
            delivered: Mutex::default(),
            housekeeping: Mutex::default(),
            claim: redis::Script::new(CLAIM),
            restore: redis::Script::new(RESTORE),
            promote: redis::Script::new(PROMOTE),
        })
    }

    /// kombu's pub/sub channel for a fanout exchange: `/<db>.<exchange>[/<routing key>]`.
    fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("{}/{}.{exchange}", self.prefix, self.db)
        } else {
            format!("{}/{}.{exchange}/{routing_key}", self.prefix, self.db)
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn declare(&self, queue: &str) -> Result<(), BrokerError> {
        let new = self.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(queue.to_owned());
        if new {
            redis::cmd("SADD")
                .arg(self.key(&format!("_kombu.binding.{queue}")))
                .arg(format!("{queue}{SEP}{SEP}{queue}"))
                .query_async::<()>(&mut self.conn())
                .await
                .map_err(err("declare queue"))?;
        }
        Ok(())
    }

    /// Runs the periodic chores that are due: promoting delayed messages, refreshing this
    /// node's liveness, recovering dead nodes' and stale unacked messages.
    async fn housekeeping(&self) -> Result<(), BrokerError> {
        let now = tokio::time::Instant::now();
        let (promote, alive, recover) = {
            let mut h = self.housekeeping.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = |last: &mut Option<tokio::time::Instant>, every: Duration| {
                let is_due = last.is_none_or(|t| now.duration_since(t) >= every);
                if is_due {
                    *last = Some(now);
                }
                is_due
            };
            (
                due(&mut h.last_promote, Duration::from_millis(200)),
                due(&mut h.last_alive, Duration::from_secs(2)),
                due(&mut h.last_recover, Duration::from_secs(5)),
            )
        };
        let mut conn = self.conn();
        if promote {
            let now_ms = Utc::now().timestamp_millis();
            self.promote
                .key(&self.keys.delayed)
                .arg(now_ms)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(err("promote delayed"))?;
        }
        if alive {
            redis::cmd("SET")
                .arg(&self.keys.alive)
                .arg(1)
                .arg("PX")
                .arg(ALIVE_MS)
                .query_async::<()>(&mut conn)
                .await
                .map_err(err("heartbeat"))?;
        }
        if recover {
            self.recover_lost_replies().await?;
            self.recover_dead_nodes().await?;
            self.restore_visible().await?;
        }
        Ok(())
    }

    fn settled(&self, tag: &str) {
        self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(tag);
    }

    /// Gives back messages this node claimed but never received (the claim's reply was lost
    /// with the connection).
    async fn recover_lost_replies(&self) -> Result<(), BrokerError> {
        let held: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.keys.held)
            .query_async(&mut self.conn())
            .await
            .map_err(err("held tags"))?;
        let lost: Vec<String> = {
            let delivered = self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            held.into_iter().filter(|t| !delivered.contains(t)).collect()
        };
        if !lost.is_empty() {
            let restored = self.restore_tags(&lost, &self.keys.held).await?;
            tracing::warn!(restored, "gave back messages claimed while the connection dropped");
        }
        Ok(())
    }

    /// Gives back the messages held by Celeriac workers whose liveness key expired.
    async fn recover_dead_nodes(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let pattern = self.key("celeriac.held.*");
        let held_sets: Vec<String> =
            redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.map_err(err("scan held"))?;
        for held in held_sets {
            let node = held.rsplit('.').next().unwrap_or_default().to_owned();
            let alive: bool = redis::cmd("EXISTS")
                .arg(self.key(&format!("celeriac.alive.{node}")))
                .query_async(&mut conn)
                .await
                .map_err(err("liveness"))?;
            if alive {
                continue;
            }
            let tags: Vec<String> =
                redis::cmd("SMEMBERS").arg(&held).query_async(&mut conn).await.map_err(err("held tags"))?;
            let restored = self.restore_tags(&tags, &held).await?;
            if restored > 0 {
                tracing::warn!(node = %node, restored, "gave back the messages of a worker that stopped heartbeating");
            }
            redis::cmd("DEL").arg(&held).query_async::<()>(&mut conn).await.map_err(err("held cleanup"))?;
        }
        Ok(())
    }

    /// kombu's `restore_visible`: messages unacked for longer than the visibility timeout go
    /// back to their queues (under `unacked_mutex`, as kombu does).
    async fn restore_visible(&self) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let token = uuid::Uuid::new_v4().to_string();
        let locked: Option<String> = redis::cmd("SET")
            .arg(&self.keys.unacked_mutex)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(300_000)
            .query_async(&mut conn)
            .await
            .map_err(err("unacked mutex"))?;
        if locked.is_none() {
            return Ok(());
        }
        let ceiling = now_secs() - self.visibility.as_secs_f64();
        let stale: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.keys.unacked_index)
            .arg("-inf")
            .arg(ceiling)
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(err("stale unacked"))?;
        let restored = self.restore_tags(&stale, &self.keys.held).await;
        let _: redis::RedisResult<i64> = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(&self.keys.unacked_mutex)
        .arg(&token)
        .invoke_async(&mut conn)
        .await;
        let restored = restored?;
        if restored > 0 {
            tracing::warn!(restored, "restored messages unacknowledged for longer than the visibility timeout");
        }
        Ok(())
    }

    /// Restores unacked messages by tag to the front of their queues, flagged redelivered as
    /// kombu does. Returns how many were restored.
    async fn restore_tags(&self, tags: &[String], held: &str) -> Result<usize, BrokerError> {
        let mut conn = self.conn();
        let mut restored = 0;
        for tag in tags {
            let stored: Option<String> = redis::cmd("HGET")
                .arg(&self.keys.unacked)
                .arg(tag)
                .query_async(&mut conn)
                .await
                .map_err(err("read unacked"))?;
            let Some(stored) = stored else { continue };
            let Some((payload, queue, priority)) = unpack_unacked(&stored) else { continue };
            let dest = self.key(&queue_key(&queue, priority));
            let done: i64 = self
                .restore
                .key(&self.keys.unacked)
                .key(&self.keys.unacked_index)
                .key(held)
                .key(&self.keys.delayed)
                .arg(tag)
                .arg(payload)
                .arg("front")
                .arg(0)
                .arg(dest)
                .invoke_async(&mut conn)
                .await
                .map_err(err("restore"))?;
            restored += done as usize;
        }
        Ok(restored)
    }

    async fn move_unacked(
        &self,
        delivery: &Delivery,
        mode: &str,
        score: i64,
        payload: &[u8],
    ) -> Result<bool, BrokerError> {
        let priority = priority_of(payload);
        let dest = self.key(&queue_key(&delivery.queue, priority));
        let done: i64 = self
            .restore
            .key(&self.keys.unacked)
            .key(&self.keys.unacked_index)
            .key(&self.keys.held)
            .key(&self.keys.delayed)
            .arg(&delivery.tag)
            .arg(payload)
            .arg(mode)
            .arg(score)
            .arg(dest)
            .invoke_async(&mut self.conn())
            .await
            .map_err(err("requeue"))?;
        Ok(done == 1)
    }

    fn ack_pipe(&self, pipe: &mut redis::Pipeline, tag: &str) {
        pipe.cmd("HDEL").arg(&self.keys.unacked).arg(tag).ignore();
        pipe.cmd("ZREM").arg(&self.keys.unacked_index).arg(tag).ignore();
        pipe.cmd("SREM").arg(&self.keys.held).arg(tag).ignore();
    }
}

/// The envelope, queue and priority in a kombu `unacked` value `[envelope, exchange, rk]`,
/// with kombu's `redelivered` flags set.
fn unpack_unacked(stored: &str) -> Option<(Vec<u8>, String, u8)> {
    let triple: Vec<Value> = serde_json::from_str(stored).ok()?;
    let mut envelope = triple.first()?.clone();
    let routing_key = triple.get(2).and_then(Value::as_str).unwrap_or("celery").to_owned();
    if let Some(headers) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
        headers.insert("redelivered".into(), Value::Bool(true));
    }
    let priority = envelope.pointer("/properties/priority").and_then(Value::as_u64).unwrap_or(0) as u8;
    if let Some(info) = envelope.pointer_mut("/properties/delivery_info").and_then(Value::as_object_mut) {
        info.insert("redelivered".into(), Value::Bool(true));
    }
    Some((pyjson::to_vec(&envelope).ok()?, routing_key, priority))
}

/// The database number in a `redis://host:port/db` URL (0 when absent).
fn db_number(url: &str) -> i64 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split('?').next().unwrap_or_default();
    path.split_once('/').and_then(|(_, db)| db.trim_matches('/').parse().ok()).unwrap_or(0)
}

fn priority_of(payload: &[u8]) -> u8 {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.pointer("/properties/priority").and_then(Value::as_u64))
        .unwrap_or(0)
        .min(9) as u8
}

/// `payload` with kombu's redelivered flags set (unchanged if it is not an envelope).
fn mark_redelivered(payload: &[u8]) -> Vec<u8> {
    let Ok(mut env) = serde_json::from_slice::<Map<String, Value>>(payload) else { return payload.to_vec() };
    if let Some(h) = env.get_mut("headers").and_then(Value::as_object_mut) {
        h.insert("redelivered".into(), Value::Bool(true));
    }
    pyjson::to_vec(&env).unwrap_or_else(|_| payload.to_vec())
}

#[async_trait]
impl Broker for RedisBroker {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn lease(&self) -> Duration {
        self.visibility
    }

    async fn publish_raw(
        &self,
        queue: &str,
        payload: &[u8],
        priority: u8,
        _visible_at: DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        // ETA messages go on the list as Celery sends them (a Python worker may consume them);
        // a Celeriac worker that receives one early parks it in the delayed set.
        self.declare(queue).await?;
        redis::cmd("LPUSH")
            .arg(self.key(&queue_key(queue, priority)))
            .arg(payload)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("publish"))
    }

    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if queues.is_empty() || max == 0 {
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            self.housekeeping().await?;
            let mut invocation = self.claim.prepare_invoke();
            for q in queues {
                for step in PRIORITY_STEPS {
                    invocation.key(self.key(&queue_key(q, step)));
                }
            }
            invocation.key(&self.keys.unacked).key(&self.keys.unacked_index).key(&self.keys.held);
            invocation.arg(max).arg(format!("{:.6}", now_secs()));
            for q in queues {
                for _ in PRIORITY_STEPS {
                    invocation.arg(q);
                }
            }
            let flat: Vec<Vec<u8>> = invocation.invoke_async(&mut self.conn()).await.map_err(err("fetch"))?;
            if !flat.is_empty() {
                let mut delivered = self.delivered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for c in flat.chunks(3).filter(|c| c.len() == 3) {
                    delivered.insert(String::from_utf8_lossy(&c[1]).into_owned());
                }
                drop(delivered);
                return Ok(flat
                    .chunks(3)
                    .filter(|c| c.len() == 3)
                    .map(|c| {
                        let redelivered = serde_json::from_slice::<Value>(&c[2])
                            .ok()
                            .and_then(|v| v.pointer("/headers/redelivered").and_then(Value::as_bool))
                            .unwrap_or(false);
                        Delivery {
                            queue: String::from_utf8_lossy(&c[0]).into_owned(),
                            tag: String::from_utf8_lossy(&c[1]).into_owned(),
                            payload: c[2].clone(),
                            delivery_count: if redelivered { 2 } else { 1 },
                        }
                    })
                    .collect());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(self.polling_interval);
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<bool, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HDEL").arg(&self.keys.unacked).arg(&delivery.tag);
        pipe.cmd("ZREM").arg(&self.keys.unacked_index).arg(&delivery.tag).ignore();
        pipe.cmd("SREM").arg(&self.keys.held).arg(&delivery.tag).ignore();
        let (removed,): (i64,) = pipe.query_async(&mut self.conn()).await.map_err(err("ack"))?;
        self.settled(&delivery.tag);
        Ok(removed == 1)
    }

    async fn requeue(&self, delivery: &Delivery, at: Option<DateTime<Utc>>) -> Result<(), BrokerError> {
        match at.filter(|t| *t > Utc::now()) {
            Some(t) => self.move_unacked(delivery, "delay", t.timestamp_millis(), &delivery.payload).await?,
            None => self.move_unacked(delivery, "front", 0, &mark_redelivered(&delivery.payload)).await?,
        };
        self.settled(&delivery.tag);
        Ok(())
    }

    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let now = now_secs();
        let mut pipe = redis::pipe();
        for d in deliveries {
            pipe.cmd("ZADD").arg(&self.keys.unacked_index).arg("XX").arg(now).arg(&d.tag).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await.map_err(err("renew"))
    }

    async fn republish(
        &self,
        delivery: &Delivery,
        queue: &str,
        message: &crate::protocol::Message,
    ) -> Result<(), BrokerError> {
        self.declare(queue).await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("LPUSH")
            .arg(self.key(&queue_key(queue, message.properties.priority)))
            .arg(message.to_wire())
            .ignore();
        self.ack_pipe(&mut pipe, &delivery.tag);
        pipe.query_async::<()>(&mut self.conn()).await.map_err(err("republish"))?;
        self.settled(&delivery.tag);
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let id: i64 =
            redis::cmd("INCR").arg(&self.keys.dead_seq).query_async(&mut conn).await.map_err(err("dead-letter"))?;
        let (task_id, task_name) = peek_ids(&delivery.payload);
        let now = Utc::now().timestamp_millis();
        let record = serde_json::json!({
            "id": id.to_string(), "queue": delivery.queue, "task_id": task_id, "task_name": task_name,
            "reason": reason, "payload": String::from_utf8_lossy(&delivery.payload), "created_at": now,
        });
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HSET").arg(&self.keys.dead).arg(id).arg(record.to_string()).ignore();
        pipe.cmd("ZADD").arg(&self.keys.dead_index).arg(now).arg(id).ignore();
        self.ack_pipe(&mut pipe, &delivery.tag);
        pipe.query_async::<()>(&mut conn).await.map_err(err("dead-letter"))?;
        self.settled(&delivery.tag);
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut conn = self.conn();
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(&self.keys.dead_index)
            .arg(0)
            .arg(limit.min(i64::MAX as usize) as i64 - 1)
            .query_async(&mut conn)
            .await
            .map_err(err("list dead letters"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(d) = self.dead_letter_by_id(&id).await? {
                out.push(d);
            }
        }
        Ok(out)
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BrokerError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.dead)
            .arg(id)
            .query_async(&mut self.conn())
            .await
            .map_err(err("read dead letter"))?;
        Ok(raw.and_then(|r| serde_json::from_str::<Value>(&r).ok()).map(|v| {
            let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
            DeadLetter {
                id: text("id").unwrap_or_default(),
                queue: text("queue").unwrap_or_default(),
                task_id: text("task_id"),
                task_name: text("task_name"),
                reason: text("reason").unwrap_or_default(),
                payload: text("payload").unwrap_or_default().into_bytes(),
                created_at: Utc
                    .timestamp_millis_opt(v.get("created_at").and_then(Value::as_i64).unwrap_or(0))
                    .single()
                    .unwrap_or_default(),
            }
        }))
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HDEL").arg(&self.keys.dead).arg(id);
        pipe.cmd("ZREM").arg(&self.keys.dead_index).arg(id).ignore();
        let (n,): (i64,) = pipe.query_async(&mut self.conn()).await.map_err(err("remove dead letter"))?;
        Ok(n == 1)
    }

    async fn purge_dead_letters(&self) -> Result<u64, BrokerError> {
        let mut conn = self.conn();
        let n: u64 =
            redis::cmd("HLEN").arg(&self.keys.dead).query_async(&mut conn).await.map_err(err("purge dead letters"))?;
        redis::cmd("DEL")
            .arg(&self.keys.dead)
            .arg(&self.keys.dead_index)
            .query_async::<()>(&mut conn)
            .await
            .map_err(err("purge dead letters"))?;
        Ok(n)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for step in PRIORITY_STEPS {
            pipe.cmd("LLEN").arg(self.key(&queue_key(queue, step)));
        }
        for step in PRIORITY_STEPS {
            pipe.cmd("DEL").arg(self.key(&queue_key(queue, step))).ignore();
        }
        let lens: Vec<u64> = pipe.query_async(&mut self.conn()).await.map_err(err("purge"))?;
        Ok(lens.iter().sum())
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        let mut conn = self.conn();
        let binding_prefix = self.key("_kombu.binding.");
        let bindings: Vec<String> =
            redis::cmd("KEYS").arg(format!("{binding_prefix}*")).query_async(&mut conn).await.map_err(err("stats"))?;
        let mut queues: Vec<String> = Vec::new();
        for b in bindings {
            let members: Vec<String> =
                redis::cmd("SMEMBERS").arg(&b).query_async(&mut conn).await.map_err(err("stats"))?;
            for m in members {
                if let Some(q) = m.rsplit(SEP).next().filter(|q| !q.contains(".pidbox") && !q.starts_with("celeryev")) {
                    queues.push(q.to_owned());
                }
            }
        }
        queues.sort();
        queues.dedup();
        let delayed: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.keys.delayed)
            .arg(0)
            .arg(9_999)
            .query_async(&mut conn)
            .await
            .map_err(err("stats"))?;
        let unacked: Vec<String> =
            redis::cmd("HVALS").arg(&self.keys.unacked).query_async(&mut conn).await.map_err(err("stats"))?;
        let mut out = Vec::new();
        for q in queues {
            let mut ready = 0;
            for step in PRIORITY_STEPS {
                let n: u64 = redis::cmd("LLEN")
                    .arg(self.key(&queue_key(&q, step)))
                    .query_async(&mut conn)
                    .await
                    .map_err(err("stats"))?;
                ready += n;
            }
            let scheduled = delayed
                .iter()
                .filter_map(|m| serde_json::from_str::<Vec<String>>(m).ok())
                .filter(|item| {
                    item.first()
                        .is_some_and(|k| k.trim_start_matches(&self.prefix).split(SEP).next() == Some(q.as_str()))
                })
                .count() as u64;
            let leased = unacked.iter().filter_map(|v| unpack_unacked(v)).filter(|(_, rk, _)| *rk == q).count() as u64;
            out.push(QueueStats { queue: q, ready, scheduled, leased });
        }
        Ok(out)
    }

    async fn publish_fanout(&self, exchange: &str, routing_key: &str, payload: &[u8]) -> Result<bool, BrokerError> {
        redis::cmd("PUBLISH")
            .arg(self.fanout_channel(exchange, routing_key))
            .arg(payload)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("publish fanout"))?;
        Ok(true)
    }

    async fn subscribe_fanout(
        &self,
        exchange: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>, BrokerError> {
        use futures::StreamExt;
        let pattern = self.fanout_channel(exchange, "");
        let client = self.client.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // A dedicated connection that re-subscribes after the server goes away.
        let mut pubsub = client.get_async_pubsub().await.map_err(err("subscribe"))?;
        pubsub.psubscribe(&pattern).await.map_err(err("subscribe"))?;
        tokio::spawn(async move {
            let mut pubsub = Some(pubsub);
            loop {
                if let Some(mut ps) = pubsub.take() {
                    let mut stream = ps.on_message();
                    while let Some(msg) = stream.next().await {
                        let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                        if tx.send(payload).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(mut ps) = client.get_async_pubsub().await
                    && ps.psubscribe(&pattern).await.is_ok()
                {
                    tracing::info!(%pattern, "re-subscribed after losing the Redis connection");
                    pubsub = Some(ps);
                }
            }
        });
        Ok(Some(rx))
    }

    async fn publish_direct(&self, exchange: &str, routing_key: &str, payload: &[u8]) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key(&format!("_kombu.binding.{exchange}")))
            .query_async(&mut conn)
            .await
            .map_err(err("publish direct"))?;
        for m in members {
            let parts: Vec<&str> = m.split(SEP).collect();
            if let [rk, _pattern, queue] = parts.as_slice()
                && *rk == routing_key
            {
                redis::cmd("LPUSH")
                    .arg(self.key(queue))
                    .arg(payload)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(err("publish direct"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_numbers() {
        assert_eq!(db_number("redis://127.0.0.1:6379/5"), 5);
        assert_eq!(db_number("redis://:pw@h:6379/12?x=1"), 12);
        assert_eq!(db_number("redis://h:6379"), 0);
    }

    #[test]
    fn priority_buckets_follow_kombu() {
        assert_eq!(queue_key("celery", 0), "celery");
        assert_eq!(queue_key("celery", 2), "celery");
        assert_eq!(queue_key("celery", 5), "celery\x06\x163");
        assert_eq!(queue_key("celery", 6), "celery\x06\x166");
        assert_eq!(queue_key("celery", 42), "celery\x06\x169");
    }

    #[test]
    fn unacked_values_unpack_with_redelivered_flags() {
        let stored = r#"[{"body": "e30=", "headers": {"task": "t", "id": "i"}, "properties": {"priority": 6, "delivery_info": {"exchange": "", "routing_key": "jobs"}}}, "", "jobs"]"#;
        let (payload, queue, priority) = unpack_unacked(stored).unwrap();
        assert_eq!((queue.as_str(), priority), ("jobs", 6));
        let env: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(env["headers"]["redelivered"], true);
        assert_eq!(env["properties"]["delivery_info"]["redelivered"], true);
    }
}
