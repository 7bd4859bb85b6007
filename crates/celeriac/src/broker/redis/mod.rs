//! Redis broker (`redis://host:port/db`, `rediss://` with TLS) in kombu's layout, so Celeriac
//! and Celery workers and clients share queues (spec §2). The key names are listed in
//! `layout.rs` and in `docs/CELERY_INTEROP.md` ("Redis layout").
//!
//! - A queue is a list per priority bucket (`q`, `q\x06\x163`, `q\x06\x166`, `q\x06\x169`; 0 is
//!   served first); publishing is `LPUSH` of the kombu JSON envelope (batches in one pipeline),
//!   consuming takes from the right end. Consuming or publishing to a queue records kombu's
//!   `_kombu.binding.<exchange>` entry.
//! - Unacknowledged messages live in kombu's `unacked` hash (`tag → [envelope, exchange,
//!   routing_key]`) and `unacked_index` sorted set (score = delivery time), so Python workers
//!   can restore ours and we restore theirs after `visibility_timeout` (3600 s), under kombu's
//!   `unacked_mutex`. A restore routes through `_kombu.binding.<exchange>` as kombu's does.
//! - **Beyond kombu:** nothing is ever only in a reply. A claim moves messages into a per-node
//!   holding list in one Lua script (kombu pops first and records later, losing the message if
//!   the worker dies in between), then records them in `unacked` and trims them from the
//!   holding list in one MULTI; an idle worker blocks on the server, moving into the same
//!   holding lists (`blocking.rs`). A worker renews the `unacked_index` score of what it holds, records its
//!   claims in `celeriac.claims.<node>` and keeps `celeriac.alive.<node>` fresh from a timer of
//!   its own (`maintenance.rs`); other Celeriac workers give a dead worker's messages back within
//!   seconds instead of after the visibility timeout.
//! - **Beyond kombu:** a message whose ETA is in the future waits in the `celeriac.delayed`
//!   sorted set (not in `unacked`), and is moved back to its queue when due, so a long ETA never
//!   outlives the visibility timeout and never runs twice.
//! - Dead letters: `celeriac.dead_letters` (hash) and `celeriac.dead_letters.index` (by time).
//! - Revokes and shared rate buckets: `celeriac.revoked*`, `celeriac.rate.<key>` (`ops.rs`).

mod blocking;
mod layout;
mod maintenance;
mod ops;
mod scripts;
pub(crate) mod url;

pub use layout::{PRIORITY_STEPS, SEP, queue_key};

use super::{Broker, BrokerError, DeadLetter, DeadLetterInfo, Delivery, Parked, QueueStats, Revoked, peek_ids};
use crate::config::Config;
use crate::protocol::Message;
use async_trait::async_trait;
use blocking::Watchers;
use chrono::{DateTime, TimeZone, Utc};
use layout::{Keys, Unacked, binding_member, delayed_member, mark_redelivered, priority_of, route};
use redis::aio::ConnectionManager;
use scripts::Scripts;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn err(operation: &'static str) -> impl FnOnce(redis::RedisError) -> BrokerError {
    move |e| BrokerError::storage(operation, e)
}

/// Whether an envelope carries kombu's `"redelivered": true` mark (set in its headers and
/// delivery_info when a message is restored), found in the text without decoding the JSON:
/// the body is base64 or an escaped string, so the quoted key can only be an envelope key.
fn marked_redelivered(envelope: &[u8]) -> bool {
    memchr::memmem::find_iter(envelope, b"\"redelivered\"").any(|at| {
        let rest = &envelope[at + b"\"redelivered\"".len()..];
        let value = rest.iter().position(|b| !matches!(b, b' ' | b':' | b'\t' | b'\n' | b'\r')).map(|i| &rest[i..]);
        value.is_some_and(|v| v.starts_with(b"true"))
    })
}

fn now_secs() -> f64 {
    Utc::now().timestamp_micros() as f64 / 1e6
}

/// The Redis broker.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        // Ends the watchers and the maintenance timer.
        self.inner.stop.cancel();
    }
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &self.inner.url)
            .field("node", &self.inner.keys.node)
            .finish_non_exhaustive()
    }
}

/// What the broker, its watchers and its maintenance timer share.
struct Inner {
    /// Opens the dedicated (pub/sub) connections.
    client: redis::Client,
    /// The database number (in kombu's fanout channel names).
    db: i64,
    /// Every non-blocking command; reconnects by itself.
    conn: ConnectionManager,
    /// The URL without its password.
    url: String,
    /// kombu's `visibility_timeout`: the lease.
    visibility: Duration,
    keys: Keys,
    /// Binding members already declared by this process (`exchange SEP member`).
    declared: Mutex<HashSet<String>>,
    /// Tags handed to this process's consumers and not settled yet. A tag in our claims that
    /// is not here was claimed by a script whose reply was lost (the connection dropped, or the
    /// fetch was cancelled): maintenance gives it back.
    delivered: Mutex<HashSet<String>>,
    /// Held (shared) by a claim from before its script runs until its tags are in
    /// `delivered`, and (exclusively) by the lost-reply check, which otherwise could take a
    /// claim in progress for a lost one.
    claiming: tokio::sync::RwLock<()>,
    watchers: Watchers,
    /// Set once the maintenance timer runs (started by the first fetch).
    maintenance: tokio::sync::OnceCell<()>,
    /// Cancelled when the broker is dropped.
    stop: CancellationToken,
    scripts: Scripts,
    /// Acks go out in batches: one `ACK_MANY` for all those waiting.
    acker: crate::batch::Coalescer<String, i64>,
}

impl RedisBroker {
    /// Connects to `url` (`redis://`, `rediss://` with kombu's `ssl_*` query parameters,
    /// `redis+unix://`). Transport options: `visibility_timeout` (3600), `global_keyprefix`,
    /// `polling_interval` (the longest single blocking pop, 1 s), `unacked_key`,
    /// `unacked_index_key`, `unacked_mutex_key`.
    pub async fn connect(url: &str, config: &Config) -> Result<Self, BrokerError> {
        let client = url::client(url)?;
        if url.starts_with("rediss://") {
            // A TLS mistake is not transient: one attempt, reported as such, before the
            // reconnecting manager (which would retry it for half a minute).
            url::probe_tls(&client, url).await?;
        }
        let conn = ConnectionManager::new(client.clone()).await.map_err(err("connect"))?;
        let text = |name: &str| match config.broker_transport_options.get(name) {
            Some(toml::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let prefix = text("global_keyprefix").unwrap_or_default();
        let node = uuid::Uuid::new_v4().simple().to_string();
        let keys = Keys::new(
            &prefix,
            &node,
            &text("unacked_key").unwrap_or_else(|| "unacked".into()),
            &text("unacked_index_key").unwrap_or_else(|| "unacked_index".into()),
            &text("unacked_mutex_key").unwrap_or_else(|| "unacked_mutex".into()),
        );
        let secs = |name: &str, default: f64| {
            Duration::from_secs_f64(config.transport_seconds(name).unwrap_or(default).max(0.001))
        };
        let stop = CancellationToken::new();
        let acker = {
            let (conn, script) = (conn.clone(), redis::Script::new(scripts::ACK_MANY));
            let keys = [keys.unacked.clone(), keys.unacked_index.clone(), keys.claims.clone()];
            crate::batch::Coalescer::new(512, move |tags: Vec<String>| {
                let (mut conn, script, keys) = (conn.clone(), script.clone(), keys.clone());
                Box::pin(async move {
                    let mut inv = script.prepare_invoke();
                    inv.key(&keys[0]).key(&keys[1]).key(&keys[2]);
                    for t in &tags {
                        inv.arg(t);
                    }
                    inv.invoke_async::<Vec<i64>>(&mut conn).await.map_err(|e| e.to_string())
                })
            })
        };
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                watchers: Watchers::new(client.clone(), conn.clone(), secs("polling_interval", 1.0), stop.clone()),
                client,
                db: layout::db_number(url),
                conn,
                url: super::redact(url),
                visibility: secs("visibility_timeout", 3600.0),
                keys,
                declared: Mutex::default(),
                delivered: Mutex::default(),
                claiming: tokio::sync::RwLock::new(()),
                maintenance: tokio::sync::OnceCell::new(),
                stop,
                acker,
                scripts: Scripts::new(),
            }),
        })
    }
}

impl Inner {
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// kombu's pub/sub channel for a fanout exchange: `/<db>.<exchange>[/<routing key>]`.
    fn fanout_channel(&self, exchange: &str, routing_key: &str) -> String {
        let prefix = &self.keys.prefix;
        if routing_key.is_empty() {
            format!("{prefix}/{}.{exchange}", self.db)
        } else {
            format!("{prefix}/{}.{exchange}/{routing_key}", self.db)
        }
    }

    /// The binding members of `(queue, exchange, routing_key)` not yet declared by this
    /// process, added to `pipe`; returns their ids for [`Inner::declared`].
    fn declare_into(
        &self,
        pipe: &mut redis::Pipeline,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Option<String> {
        let member = binding_member(routing_key, queue);
        let id = format!("{exchange}{SEP}{member}");
        if lock(&self.declared).contains(&id) {
            return None;
        }
        pipe.cmd("SADD").arg(self.keys.binding(exchange)).arg(&member).ignore();
        pipe.cmd("SADD").arg(self.keys.binding_permanent(exchange)).arg(&member).ignore();
        Some(id)
    }

    fn mark_declared(&self, ids: impl IntoIterator<Item = String>) {
        lock(&self.declared).extend(ids);
    }

    /// Claims up to `max` messages from the holding lists and `queues` (priority 0 first),
    /// recording their tags in `delivered` before a lost-reply check can look.
    async fn claim(&self, queues: &[String], max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let _claiming = self.claiming.read().await;
        let deliveries = self.run_claim(queues, max).await?;
        lock(&self.delivered).extend(deliveries.iter().map(|d| d.tag.clone()));
        Ok(deliveries)
    }

    /// Takes messages into the holding lists (`TAKE`), then records them in kombu's `unacked`
    /// and this node's claims and trims them from the holding lists, in one MULTI. Claims and
    /// give-backs take turns (`Watchers::turn`): the trim relies on the taken messages being
    /// the holding lists' tails, which only a blocking pop (at the head) changes in between.
    async fn run_claim(&self, queues: &[String], max: usize) -> Result<Vec<Delivery>, BrokerError> {
        let _one_at_a_time = self.watchers.turn().await;
        let mut invocation = self.scripts.take.prepare_invoke();
        let mut pairs = Vec::with_capacity(queues.len() * PRIORITY_STEPS.len());
        for q in queues {
            for step in PRIORITY_STEPS {
                let list = self.keys.list(q, step);
                let holding = self.keys.inflight(&list);
                if pairs.iter().any(|(h, _)| *h == holding) {
                    // A queue named twice: its holding list's tail would be taken twice.
                    continue;
                }
                invocation.key(&holding).key(list);
                pairs.push((holding, q.as_str()));
            }
        }
        invocation.arg(max);
        let flat: Vec<Vec<u8>> = invocation.invoke_async(&mut self.conn()).await.map_err(err("fetch"))?;
        let number = |b: &[u8]| std::str::from_utf8(b).ok().and_then(|t| t.parse::<usize>().ok());
        let now = format!("{:.6}", now_secs());
        let (mut unacked, mut index, mut claims) = (redis::cmd("HSET"), redis::cmd("ZADD"), redis::cmd("HSET"));
        unacked.arg(&self.keys.unacked);
        index.arg(&self.keys.unacked_index);
        claims.arg(&self.keys.claims);
        let mut trims = Vec::new();
        let mut deliveries = Vec::new();
        let mut rest = flat.into_iter();
        while let (Some(p), Some(k)) = (rest.next(), rest.next()) {
            let (Some(p), Some(k)) = (number(&p), number(&k)) else { break };
            let Some((holding, queue)) = p.checked_sub(1).and_then(|i| pairs.get(i)) else { break };
            trims.push((holding, k));
            for payload in rest.by_ref().take(k) {
                let (tag, value) = layout::unacked_entry(&payload, queue);
                unacked.arg(&tag).arg(value);
                index.arg(&now).arg(&tag);
                claims.arg(&tag).arg(&now);
                let redelivered = marked_redelivered(&payload);
                deliveries.push(Delivery {
                    queue: (*queue).to_owned(),
                    tag,
                    payload,
                    delivery_count: if redelivered { 2 } else { 1 },
                });
            }
        }
        if trims.is_empty() {
            return Ok(deliveries);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !deliveries.is_empty() {
            pipe.add_command(unacked).ignore().add_command(index).ignore().add_command(claims).ignore();
        }
        for (holding, k) in trims {
            pipe.cmd("LTRIM").arg(holding).arg(0).arg(-(k as i64) - 1).ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await.map_err(err("fetch"))?;
        Ok(deliveries)
    }

    fn settled(&self, tag: &str) {
        lock(&self.delivered).remove(tag);
    }

    /// The list keys a restored message goes to: kombu's `_lookup` (the routing key itself on
    /// the default exchange, else the queues `_kombu.binding.<exchange>` binds to the routing
    /// key), in the message's priority bucket. When no binding matches (kombu would drop the
    /// message), the queue named by the routing key.
    async fn destinations(&self, u: &Unacked) -> Result<Vec<String>, BrokerError> {
        let mut queues = vec![u.routing_key.clone()];
        if !u.exchange.is_empty() {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.keys.binding(&u.exchange))
                .query_async(&mut self.conn())
                .await
                .map_err(err("read bindings"))?;
            let bound = route(&members, &u.routing_key);
            if bound.is_empty() {
                tracing::warn!(
                    exchange = %u.exchange, routing_key = %u.routing_key,
                    "no binding routes a restored message; restoring it to the queue named by its routing key"
                );
            } else {
                queues = bound.into_iter().map(str::to_owned).collect();
            }
        }
        Ok(queues.iter().map(|q| self.keys.list(q, u.priority)).collect())
    }

    /// Runs the restore script. `owner`: the claims hash that must still own the claim (the
    /// entry is removed either way); `stored`: the unacked value read before (must be
    /// unchanged); `ceiling`: the highest unacked_index score that may be restored.
    #[allow(clippy::too_many_arguments)]
    async fn restore(
        &self,
        tag: &str,
        owner: Option<&str>,
        stored: &str,
        ceiling: Option<f64>,
        payload: &[u8],
        mode: Mode,
        dests: &[String],
    ) -> Result<bool, BrokerError> {
        let mut invocation = self.scripts.restore.prepare_invoke();
        invocation
            .key(&self.keys.unacked)
            .key(&self.keys.unacked_index)
            .key(owner.unwrap_or(&self.keys.claims))
            .key(&self.keys.delayed);
        let (mode_name, score, member) = match mode {
            Mode::Front => ("front", 0, String::new()),
            Mode::Delay(at) => {
                ("delay", at, delayed_member(dests.first().map_or("", String::as_str), payload, &self.keys.node))
            }
        };
        invocation
            .arg(tag)
            .arg(stored)
            .arg(payload)
            .arg(mode_name)
            .arg(score)
            .arg(if owner.is_some() { "1" } else { "0" })
            .arg(ceiling.map(|c| format!("{c:.6}")).unwrap_or_default())
            .arg(member);
        for d in dests {
            invocation.arg(d);
        }
        let done: i64 = invocation.invoke_async(&mut self.conn()).await.map_err(err("restore"))?;
        Ok(done == 1)
    }

    /// Gives back claims recorded in the claims hash `owner` (this node's or a dead node's),
    /// to the front of their queues, flagged redelivered as kombu does. Returns how many.
    async fn restore_claimed(&self, tags: &[String], owner: &str) -> Result<usize, BrokerError> {
        let mut restored = 0;
        for tag in tags {
            let stored: Option<String> = redis::cmd("HGET")
                .arg(&self.keys.unacked)
                .arg(tag)
                .query_async(&mut self.conn())
                .await
                .map_err(err("read unacked"))?;
            let unpacked = stored.as_deref().and_then(layout::unpack_unacked);
            let (Some(stored), Some(u)) = (stored.as_deref(), unpacked) else {
                // Acked, restored by someone else, or unreadable: only forget the claim.
                redis::cmd("HDEL")
                    .arg(owner)
                    .arg(tag)
                    .query_async::<()>(&mut self.conn())
                    .await
                    .map_err(err("claims"))?;
                continue;
            };
            let dests = self.destinations(&u).await?;
            if self.restore(tag, Some(owner), stored, None, &u.payload, Mode::Front, &dests).await? {
                restored += 1;
            }
        }
        Ok(restored)
    }

    /// `KEYS`-free listing of the keys matching `pattern` (SCAN).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, BrokerError> {
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, mut keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(err("scan"))?;
            out.append(&mut keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The ack steps of `republish` and `dead_letter`, inside their atomic pipelines.
    fn ack_pipe(&self, pipe: &mut redis::Pipeline, tag: &str) {
        pipe.cmd("HDEL").arg(&self.keys.unacked).arg(tag).ignore();
        pipe.cmd("ZREM").arg(&self.keys.unacked_index).arg(tag).ignore();
        pipe.cmd("HDEL").arg(&self.keys.claims).arg(tag).ignore();
    }
}

/// Where a restore puts the message.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The front of its list (served next).
    Front,
    /// The delayed set, due at this Unix time in ms.
    Delay(i64),
}

#[async_trait]
impl Broker for RedisBroker {
    fn url(&self) -> String {
        self.inner.url.clone()
    }

    fn lease(&self) -> Duration {
        self.inner.visibility
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
        let me = &self.inner;
        let mut pipe = redis::pipe();
        let declared = me.declare_into(&mut pipe, queue, queue, queue);
        pipe.cmd("LPUSH").arg(me.keys.list(queue, priority)).arg(payload).ignore();
        pipe.query_async::<()>(&mut me.conn()).await.map_err(err("publish"))?;
        me.mark_declared(declared);
        Ok(())
    }

    async fn publish_many(&self, messages: &[(&str, &Message)]) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let me = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut declared = Vec::new();
        let mut seen = HashSet::new();
        for (queue, _) in messages {
            if seen.insert(*queue) {
                declared.extend(me.declare_into(&mut pipe, queue, queue, queue));
            }
        }
        for (queue, message) in messages {
            pipe.cmd("LPUSH").arg(me.keys.list(queue, message.properties.priority)).arg(message.to_wire()).ignore();
        }
        pipe.query_async::<()>(&mut me.conn()).await.map_err(err("publish batch"))?;
        me.mark_declared(declared);
        Ok(())
    }

    async fn declare_queue(&self, queue: &str, exchange: &str, routing_key: &str) -> Result<(), BrokerError> {
        let me = &self.inner;
        let mut pipe = redis::pipe();
        let Some(id) = me.declare_into(&mut pipe, queue, exchange, routing_key) else { return Ok(()) };
        pipe.query_async::<()>(&mut me.conn()).await.map_err(err("declare queue"))?;
        me.mark_declared([id]);
        Ok(())
    }

    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        if queues.is_empty() || max == 0 {
            return Ok(Vec::new());
        }
        let me = &self.inner;
        maintenance::ensure_started(me).await?;
        let lists: Vec<(String, String)> = queues
            .iter()
            .flat_map(|q| PRIORITY_STEPS.map(|step| me.keys.list(q, step)))
            .map(|list| {
                let inflight = me.keys.inflight(&list);
                (list, inflight)
            })
            .collect();
        let known = me.watchers.holding_lists().len();
        let mut interest = me.watchers.interest(&lists);
        if me.watchers.holding_lists().len() != known {
            // New holding lists are in the node registry before a blocking pop can fill them.
            me.refresh_alive().await?;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let moved = me.watchers.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            interest.looking();
            let batch = me.claim(queues, max).await?;
            if !batch.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(batch);
            }
            // Nothing there: block on the server until a watcher moves a message.
            interest.arm(deadline);
            tokio::select! {
                _ = moved => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        let me = &self.inner;
        let returned = me.watchers.release().await.map_err(err("give back"))?;
        if returned > 0 {
            tracing::info!(returned, "gave back messages a blocking pop took as the worker stopped");
        }
        // The ETA messages this node parked go back to their queues (as a Celery worker gives
        // back the ETA tasks of its timer when it stops): a Python worker finds them there,
        // another Celeriac worker parks them again. So do those of stopped nodes (a `kill -9`).
        // node → whether its parked messages go back: ours, those of nodes without a liveness
        // key, and members older than node names in them.
        let mut returnable = HashMap::from([(me.keys.node.clone(), true), (String::new(), true)]);
        let (mut start, mut unparked) = (0i64, 0u64);
        loop {
            let page: Vec<String> = redis::cmd("ZRANGE")
                .arg(&me.keys.delayed)
                .arg(start)
                .arg(start + 999)
                .query_async(&mut me.conn())
                .await
                .map_err(err("unpark"))?;
            if page.is_empty() {
                break;
            }
            let mut give_back = Vec::new();
            for m in &page {
                let Some((_, _, node)) = layout::parse_delayed(m) else { continue };
                if me.is_dead(&mut returnable, &node).await? {
                    give_back.push(m.as_str());
                }
            }
            if !give_back.is_empty() {
                let mut invocation = me.scripts.unpark.prepare_invoke();
                invocation.key(&me.keys.delayed);
                for m in &give_back {
                    invocation.arg(*m);
                }
                unparked += invocation.invoke_async::<u64>(&mut me.conn()).await.map_err(err("unpark"))?;
            }
            start += (page.len() - give_back.len()) as i64;
        }
        if unparked > 0 {
            tracing::info!(unparked, "gave back the ETA tasks this worker parked");
        }
        Ok(())
    }

    async fn ack(&self, delivery: &Delivery) -> Result<bool, BrokerError> {
        let me = &self.inner;
        let removed = me.acker.call(delivery.tag.clone()).await.map_err(|e| BrokerError::Storage {
            operation: "ack",
            source: Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()),
        })?;
        me.settled(&delivery.tag);
        Ok(removed == 1)
    }

    async fn requeue(&self, delivery: &Delivery, at: Option<DateTime<Utc>>) -> Result<(), BrokerError> {
        let me = &self.inner;
        let dest = [me.keys.list(&delivery.queue, priority_of(&delivery.payload))];
        let owner = Some(me.keys.claims.as_str());
        match at.filter(|t| *t > Utc::now()) {
            Some(t) => {
                me.restore(&delivery.tag, owner, "", None, &delivery.payload, Mode::Delay(t.timestamp_millis()), &dest)
                    .await?
            }
            None => {
                let payload = mark_redelivered(&delivery.payload);
                me.restore(&delivery.tag, owner, "", None, &payload, Mode::Front, &dest).await?
            }
        };
        me.settled(&delivery.tag);
        Ok(())
    }

    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let me = &self.inner;
        let mut invocation = me.scripts.renew.prepare_invoke();
        invocation.key(&me.keys.unacked_index).key(&me.keys.claims).arg(format!("{:.6}", now_secs()));
        for d in deliveries {
            invocation.arg(&d.tag);
        }
        invocation.invoke_async::<i64>(&mut me.conn()).await.map_err(err("renew"))?;
        Ok(())
    }

    async fn republish(&self, delivery: &Delivery, queue: &str, message: &Message) -> Result<(), BrokerError> {
        let me = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let declared = me.declare_into(&mut pipe, queue, queue, queue);
        pipe.cmd("LPUSH").arg(me.keys.list(queue, message.properties.priority)).arg(message.to_wire()).ignore();
        me.ack_pipe(&mut pipe, &delivery.tag);
        pipe.query_async::<()>(&mut me.conn()).await.map_err(err("republish"))?;
        me.mark_declared(declared);
        me.settled(&delivery.tag);
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.dead_letter_with(delivery, &DeadLetterInfo { reason: reason.to_owned(), ..Default::default() }).await
    }

    async fn dead_letter_with(&self, delivery: &Delivery, info: &DeadLetterInfo) -> Result<(), BrokerError> {
        let me = &self.inner;
        let mut conn = me.conn();
        let id: i64 =
            redis::cmd("INCR").arg(&me.keys.dead_seq).query_async(&mut conn).await.map_err(err("dead-letter"))?;
        let (task_id, task_name) = peek_ids(&delivery.payload);
        let now = Utc::now().timestamp_millis();
        let record = serde_json::json!({
            "id": id.to_string(), "queue": delivery.queue, "task_id": task_id, "task_name": task_name,
            "reason": info.reason, "error_type": info.error_type, "traceback": info.traceback,
            "retries": info.retries, "payload": String::from_utf8_lossy(&delivery.payload), "created_at": now,
        });
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HSET").arg(&me.keys.dead).arg(id).arg(record.to_string()).ignore();
        pipe.cmd("ZADD").arg(&me.keys.dead_index).arg(now).arg(id).ignore();
        me.ack_pipe(&mut pipe, &delivery.tag);
        pipe.query_async::<()>(&mut conn).await.map_err(err("dead-letter"))?;
        me.settled(&delivery.tag);
        Ok(())
    }

    async fn mark_dead_letter_replayed(&self, id: &str, task_id: &str) -> Result<bool, BrokerError> {
        let me = &self.inner;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&me.keys.dead)
            .arg(id)
            .query_async(&mut me.conn())
            .await
            .map_err(err("read dead letter"))?;
        let Some(mut record) = raw.and_then(|r| serde_json::from_str::<Value>(&r).ok()) else { return Ok(false) };
        if let Some(map) = record.as_object_mut() {
            map.insert("replayed_as".into(), task_id.into());
        }
        redis::cmd("HSET")
            .arg(&me.keys.dead)
            .arg(id)
            .arg(record.to_string())
            .query_async::<()>(&mut me.conn())
            .await
            .map_err(err("mark dead letter replayed"))?;
        Ok(true)
    }

    async fn persist_revoked(
        &self,
        ids: &[String],
        terminate: bool,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        self.inner.persist_revoked(ids, terminate, expires_at).await?;
        Ok(true)
    }

    async fn revoked_version(&self) -> Result<u64, BrokerError> {
        self.inner.revoked_version().await
    }

    async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        self.inner.persisted_revoked().await
    }

    async fn rate_limit_acquire(
        &self,
        key: &str,
        waiter: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Duration, BrokerError> {
        self.inner.rate_limit_acquire(key, waiter, interval, burst).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let me = &self.inner;
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(&me.keys.dead_index)
            .arg(0)
            .arg(limit.min(i64::MAX as usize) as i64 - 1)
            .query_async(&mut me.conn())
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
        let me = &self.inner;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&me.keys.dead)
            .arg(id)
            .query_async(&mut me.conn())
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
                error_type: text("error_type"),
                traceback: text("traceback"),
                retries: v.get("retries").and_then(Value::as_u64).map(|n| n.min(u64::from(u32::MAX)) as u32),
                replayed_as: text("replayed_as"),
                payload: text("payload").unwrap_or_default().into_bytes(),
                created_at: Utc
                    .timestamp_millis_opt(v.get("created_at").and_then(Value::as_i64).unwrap_or(0))
                    .single()
                    .unwrap_or_default(),
            }
        }))
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let me = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HDEL").arg(&me.keys.dead).arg(id);
        pipe.cmd("ZREM").arg(&me.keys.dead_index).arg(id).ignore();
        let (n,): (i64,) = pipe.query_async(&mut me.conn()).await.map_err(err("remove dead letter"))?;
        Ok(n == 1)
    }

    async fn purge_dead_letters(&self) -> Result<u64, BrokerError> {
        let me = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HLEN").arg(&me.keys.dead);
        pipe.cmd("DEL").arg(&me.keys.dead).arg(&me.keys.dead_index).ignore();
        let (n,): (u64,) = pipe.query_async(&mut me.conn()).await.map_err(err("purge dead letters"))?;
        Ok(n)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let me = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for step in PRIORITY_STEPS {
            pipe.cmd("LLEN").arg(me.keys.list(queue, step));
        }
        for step in PRIORITY_STEPS {
            pipe.cmd("DEL").arg(me.keys.list(queue, step)).ignore();
        }
        let lens: Vec<u64> = pipe.query_async(&mut me.conn()).await.map_err(err("purge"))?;
        Ok(lens.iter().sum())
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        let me = &self.inner;
        let mut conn = me.conn();
        let table_prefix = me.keys.binding("");
        // exchange → binding members, for the queue names and to route unacked messages.
        let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in me.scan(&me.keys.pattern("_kombu.binding.")).await? {
            let members: Vec<String> =
                redis::cmd("SMEMBERS").arg(&key).query_async(&mut conn).await.map_err(err("stats"))?;
            tables.insert(key.strip_prefix(table_prefix.as_str()).unwrap_or(&key).to_owned(), members);
        }
        let mut queues: Vec<String> = tables
            .values()
            .flatten()
            .filter_map(|m| m.rsplit(SEP).next())
            .filter(|q| !q.is_empty() && !q.contains(".pidbox") && !q.starts_with("celeryev"))
            .map(str::to_owned)
            .collect();
        queues.sort();
        queues.dedup();
        let mut pipe = redis::pipe();
        for q in &queues {
            for step in PRIORITY_STEPS {
                pipe.cmd("LLEN").arg(me.keys.list(q, step));
            }
        }
        let lens: Vec<u64> =
            if queues.is_empty() { Vec::new() } else { pipe.query_async(&mut conn).await.map_err(err("stats"))? };
        let delayed: Vec<String> = redis::cmd("ZRANGE")
            .arg(&me.keys.delayed)
            .arg(0)
            .arg(9_999)
            .query_async(&mut conn)
            .await
            .map_err(err("stats"))?;
        let unacked: Vec<String> =
            redis::cmd("HVALS").arg(&me.keys.unacked).query_async(&mut conn).await.map_err(err("stats"))?;
        let mut scheduled: HashMap<String, u64> = HashMap::new();
        for (list, _, _) in delayed.iter().filter_map(|m| layout::parse_delayed(m)) {
            let bare = list.strip_prefix(me.keys.prefix.as_str()).unwrap_or(&list);
            *scheduled.entry(layout::queue_of_list(bare).to_owned()).or_default() += 1;
        }
        let mut leased: HashMap<String, u64> = HashMap::new();
        for u in unacked.iter().filter_map(|v| layout::unpack_unacked(v)) {
            let routed = match tables.get(&u.exchange).filter(|_| !u.exchange.is_empty()) {
                Some(members) => route(members, &u.routing_key).into_iter().map(str::to_owned).collect(),
                None => vec![u.routing_key.clone()],
            };
            for q in routed {
                *leased.entry(q).or_default() += 1;
            }
        }
        Ok(queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| QueueStats {
                ready: lens[i * PRIORITY_STEPS.len()..(i + 1) * PRIORITY_STEPS.len()].iter().sum(),
                scheduled: scheduled.get(&q).copied().unwrap_or(0),
                leased: leased.get(&q).copied().unwrap_or(0),
                queue: q,
            })
            .collect())
    }

    async fn parked(&self) -> Result<Vec<Parked>, BrokerError> {
        let me = &self.inner;
        let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&me.keys.delayed)
            .arg(0)
            .arg(9_999)
            .arg("WITHSCORES")
            .query_async(&mut me.conn())
            .await
            .map_err(err("list parked messages"))?;
        Ok(members
            .into_iter()
            .filter_map(|(member, due_ms)| {
                let (list, payload, node) = layout::parse_delayed(&member)?;
                (node == me.keys.node).then(|| {
                    let bare = list.strip_prefix(me.keys.prefix.as_str()).unwrap_or(&list);
                    Parked {
                        due: Utc.timestamp_millis_opt(due_ms as i64).single().unwrap_or_default(),
                        queue: layout::queue_of_list(bare).to_owned(),
                        payload: payload.into_bytes(),
                    }
                })
            })
            .collect())
    }

    async fn publish_fanout(&self, exchange: &str, routing_key: &str, payload: &[u8]) -> Result<bool, BrokerError> {
        let me = &self.inner;
        redis::cmd("PUBLISH")
            .arg(me.fanout_channel(exchange, routing_key))
            .arg(payload)
            .query_async::<()>(&mut me.conn())
            .await
            .map_err(err("publish fanout"))?;
        Ok(true)
    }

    async fn subscribe_fanout(
        &self,
        exchange: &str,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<Vec<u8>>>, BrokerError> {
        use futures::StreamExt;
        let me = &self.inner;
        let pattern = me.fanout_channel(exchange, "");
        let client = me.client.clone();
        let stop = me.stop.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // A dedicated connection that re-subscribes after the server goes away.
        let mut pubsub = client.get_async_pubsub().await.map_err(err("subscribe"))?;
        pubsub.psubscribe(&pattern).await.map_err(err("subscribe"))?;
        tokio::spawn(async move {
            let mut pubsub = Some(pubsub);
            loop {
                if let Some(mut ps) = pubsub.take() {
                    let mut stream = ps.on_message();
                    loop {
                        let msg = tokio::select! {
                            m = stream.next() => m,
                            _ = stop.cancelled() => return,
                        };
                        let Some(msg) = msg else { break };
                        let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                        if tx.send(payload).await.is_err() {
                            return;
                        }
                    }
                }
                if tx.is_closed() || stop.is_cancelled() {
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
        let me = &self.inner;
        let mut conn = me.conn();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(me.keys.binding(exchange))
            .query_async(&mut conn)
            .await
            .map_err(err("publish direct"))?;
        for queue in route(&members, routing_key) {
            redis::cmd("LPUSH")
                .arg(me.keys.key(queue))
                .arg(payload)
                .query_async::<()>(&mut conn)
                .await
                .map_err(err("publish direct"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
