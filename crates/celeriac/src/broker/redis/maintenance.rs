//! The broker's own timer, started by the first fetch and stopped when the broker is dropped.
//! It runs whether or not the worker fetches (a saturated worker does not fetch, and must not
//! look dead):
//!
//! - every 200 ms: due messages of `celeriac.delayed` go to their queues;
//! - every 2 s: `celeriac.alive.<node>` is refreshed (it lives 10 s), and what sits in this
//!   node's holding lists with no fetch to claim it goes back to its queue;
//! - every 5 s: claims whose reply was lost are given back; the claims and holding lists of
//!   Celeriac nodes whose liveness key expired are given back; messages unacknowledged for
//!   longer than `visibility_timeout` are restored as kombu does (under `unacked_mutex`).
//!
//! Not for: claiming or acking (`mod.rs`), blocking pops (`blocking.rs`).

use super::{Inner, Mode, err, now_secs};
use crate::broker::BrokerError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a node's liveness key lives without a refresh.
pub(super) const ALIVE_MS: u64 = 10_000;
/// The timer's tick.
const TICK: Duration = Duration::from_millis(200);
/// Ticks between liveness refreshes (2 s).
const ALIVE_EVERY: u64 = 10;
/// Ticks between recovery scans (5 s).
const RECOVER_EVERY: u64 = 25;

/// Marks this node alive and starts the timer, once.
pub(super) async fn ensure_started(inner: &Arc<Inner>) -> Result<(), BrokerError> {
    inner
        .maintenance
        .get_or_try_init(|| async {
            // Alive before the first claim, so no other node takes the claim for a dead one's.
            inner.refresh_alive().await?;
            tokio::spawn(run(inner.clone()));
            Ok::<(), BrokerError>(())
        })
        .await
        .map(|_| ())
}

async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.stop.cancelled() => return,
        }
        let chores = async {
            inner.promote().await?;
            if n.is_multiple_of(ALIVE_EVERY) {
                inner.refresh_alive().await?;
                inner.watchers.sweep().await.map_err(err("give back"))?;
            }
            if n.is_multiple_of(RECOVER_EVERY) {
                inner.recover_lost_replies().await?;
                inner.recover_dead_nodes().await?;
                inner.restore_visible().await?;
            }
            Ok::<(), BrokerError>(())
        };
        match chores.await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("broker maintenance works again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "broker maintenance failed (liveness, delayed messages, recovery); retrying");
            }
            Err(_) => {}
        }
        n += 1;
    }
}

impl Inner {
    /// Refreshes the liveness key and this node's entry in the node registry (with the
    /// holding lists its watchers use).
    pub(super) async fn refresh_alive(&self) -> Result<(), BrokerError> {
        let lists = serde_json::to_string(&self.watchers.holding_lists()).unwrap_or_else(|_| "[]".to_owned());
        redis::pipe()
            .cmd("SET")
            .arg(&self.keys.alive)
            .arg(1)
            .arg("PX")
            .arg(ALIVE_MS)
            .ignore()
            .cmd("HSET")
            .arg(&self.keys.nodes)
            .arg(&self.keys.node)
            .arg(lists)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(err("heartbeat"))
    }

    async fn promote(&self) -> Result<(), BrokerError> {
        self.scripts
            .promote
            .key(&self.keys.delayed)
            .arg(chrono::Utc::now().timestamp_millis())
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map_err(err("promote delayed"))?;
        Ok(())
    }

    /// Gives back messages this node claimed but never received (the claim's reply was lost
    /// with the connection, or the fetch was cancelled). Holds `claiming` exclusively, so a
    /// claim whose script ran but whose tags are not recorded yet is never taken for one.
    pub(super) async fn recover_lost_replies(&self) -> Result<(), BrokerError> {
        let _no_claim_in_progress = self.claiming.write().await;
        let claimed: Vec<String> =
            redis::cmd("HKEYS").arg(&self.keys.claims).query_async(&mut self.conn()).await.map_err(err("claims"))?;
        let lost: Vec<String> = {
            let delivered = super::lock(&self.delivered);
            claimed.into_iter().filter(|t| !delivered.contains(t)).collect()
        };
        if !lost.is_empty() {
            let restored = self.restore_claimed(&lost, &self.keys.claims).await?;
            if restored > 0 {
                tracing::warn!(restored, "gave back messages claimed while the connection dropped");
            }
        }
        Ok(())
    }

    /// Gives back the claims and holding lists of Celeriac nodes whose liveness key expired,
    /// found in the node registry (no keyspace scan: a worker sharing its Redis database with
    /// millions of result keys pays nothing for them). A dead node leaves the registry once
    /// nothing of it is left.
    async fn recover_dead_nodes(&self) -> Result<(), BrokerError> {
        let mut dead: HashMap<String, bool> = HashMap::from([(self.keys.node.clone(), false)]);
        let nodes: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&self.keys.nodes).query_async(&mut self.conn()).await.map_err(err("nodes"))?;
        for (node, lists) in nodes {
            if !self.is_dead(&mut dead, &node).await? {
                continue;
            }
            let claims = self.keys.claims_of(&node);
            let tags: Vec<String> =
                redis::cmd("HKEYS").arg(&claims).query_async(&mut self.conn()).await.map_err(err("claims"))?;
            let restored = self.restore_claimed(&tags, &claims).await?;
            if restored > 0 {
                tracing::warn!(node = %node, restored, "gave back the messages of a worker that stopped heartbeating");
            }
            for inflight in serde_json::from_str::<Vec<String>>(&lists).unwrap_or_default() {
                let Some((owner, source)) = self.keys.parse_inflight(&inflight) else { continue };
                if owner != node {
                    continue;
                }
                let n: u64 = self
                    .scripts
                    .give_back
                    .key(&inflight)
                    .key(&source)
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(err("give back"))?;
                if n > 0 {
                    tracing::warn!(node = %node, restored = n, "gave back the messages a stopped worker was moving");
                }
            }
            let left: u64 =
                redis::cmd("HLEN").arg(&claims).query_async(&mut self.conn()).await.map_err(err("claims"))?;
            if left == 0 {
                redis::cmd("HDEL")
                    .arg(&self.keys.nodes)
                    .arg(&node)
                    .query_async::<()>(&mut self.conn())
                    .await
                    .map_err(err("nodes"))?;
            }
        }
        Ok(())
    }

    pub(super) async fn is_dead(&self, cache: &mut HashMap<String, bool>, node: &str) -> Result<bool, BrokerError> {
        if let Some(dead) = cache.get(node) {
            return Ok(*dead);
        }
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.keys.alive_of(node))
            .query_async(&mut self.conn())
            .await
            .map_err(err("liveness"))?;
        cache.insert(node.to_owned(), !exists);
        Ok(!exists)
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
        let restored = self.restore_stale().await;
        let _: redis::RedisResult<i64> =
            self.scripts.release.key(&self.keys.unacked_mutex).arg(&token).invoke_async(&mut conn).await;
        let restored = restored?;
        if restored > 0 {
            tracing::warn!(restored, "restored messages unacknowledged for longer than the visibility timeout");
        }
        Ok(())
    }

    async fn restore_stale(&self) -> Result<usize, BrokerError> {
        let ceiling = now_secs() - self.visibility.as_secs_f64();
        let stale: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.keys.unacked_index)
            .arg("-inf")
            .arg(format!("{ceiling:.6}"))
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(&mut self.conn())
            .await
            .map_err(err("stale unacked"))?;
        let mut restored = 0;
        for tag in stale {
            let stored: Option<String> = redis::cmd("HGET")
                .arg(&self.keys.unacked)
                .arg(&tag)
                .query_async(&mut self.conn())
                .await
                .map_err(err("read unacked"))?;
            let Some(stored) = stored else { continue };
            let Some(u) = super::layout::unpack_unacked(&stored) else { continue };
            let dests = self.destinations(&u).await?;
            if self.restore(&tag, None, &stored, Some(ceiling), &u.payload, Mode::Front, &dests).await? {
                restored += 1;
            }
        }
        Ok(restored)
    }
}
