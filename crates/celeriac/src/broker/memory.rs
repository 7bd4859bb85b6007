//! In-process broker (`memory://`) for eager mode, tests and single-binary demos. Same lease
//! semantics as the durable brokers; nothing survives the process.

use super::ops::{Attempt, Bucket, STALE_TURNS, attempt};
use super::{Broker, BrokerError, DeadLetter, DeadLetterInfo, Delivery, QueueStats, Revoked, peek_ids};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    id: u64,
    queue: String,
    priority: u8,
    payload: Vec<u8>,
    visible_at: DateTime<Utc>,
    lease_token: Option<u64>,
    delivery_count: u32,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    messages: BTreeMap<u64, Entry>,
    dead: Vec<DeadLetter>,
    /// Persisted revokes by id, and a counter bumped on each change.
    revoked: std::collections::HashMap<String, Revoked>,
    revoked_version: u64,
    /// Shared rate buckets (ms since the broker started) and their lines: waiter → turn.
    buckets: std::collections::HashMap<String, (Bucket, std::collections::HashMap<String, f64>)>,
}

/// The in-memory broker.
#[derive(Debug)]
pub struct MemoryBroker {
    state: Mutex<State>,
    published: Notify,
    lease: Duration,
    /// The clock of the rate buckets.
    started: std::time::Instant,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// An empty broker with a 30 s lease.
    pub fn new() -> Self {
        MemoryBroker {
            state: Mutex::new(State::default()),
            published: Notify::new(),
            lease: Duration::from_secs(30),
            started: std::time::Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn parse_tag(tag: &str) -> Option<(u64, u64)> {
        let (id, token) = tag.split_once(':')?;
        Some((id.parse().ok()?, token.parse().ok()?))
    }

    fn take_due(&self, queues: &[String], max: usize) -> Vec<Delivery> {
        let now = Utc::now();
        let mut state = self.lock();
        let mut picked: Vec<(usize, u8, u64)> = state
            .messages
            .values()
            .filter(|e| e.visible_at <= now)
            .filter_map(|e| queues.iter().position(|q| *q == e.queue).map(|qi| (qi, e.priority, e.id)))
            .collect();
        picked.sort_unstable();
        picked.truncate(max);
        let lease_until = now + chrono::Duration::from_std(self.lease).unwrap_or_default();
        let mut out = Vec::with_capacity(picked.len());
        for (_, _, id) in picked {
            state.next_id += 1;
            let token = state.next_id;
            if let Some(e) = state.messages.get_mut(&id) {
                e.lease_token = Some(token);
                e.visible_at = lease_until;
                e.delivery_count += 1;
                out.push(Delivery {
                    tag: format!("{id}:{token}"),
                    queue: e.queue.clone(),
                    payload: e.payload.clone(),
                    delivery_count: e.delivery_count,
                });
            }
        }
        out
    }

    /// Runs `f` on the entry `tag` still holds the lease of.
    fn with_leased<T>(&self, tag: &str, f: impl FnOnce(&mut State, u64) -> T) -> Option<T> {
        let (id, token) = Self::parse_tag(tag)?;
        let mut state = self.lock();
        let held = state.messages.get(&id).is_some_and(|e| e.lease_token == Some(token));
        held.then(|| f(&mut state, id))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn url(&self) -> String {
        "memory://".to_owned()
    }

    fn lease(&self) -> Duration {
        self.lease
    }

    async fn publish_raw(
        &self,
        queue: &str,
        payload: &[u8],
        priority: u8,
        visible_at: DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        {
            let mut state = self.lock();
            state.next_id += 1;
            let id = state.next_id;
            state.messages.insert(
                id,
                Entry {
                    id,
                    queue: queue.to_owned(),
                    priority,
                    payload: payload.to_vec(),
                    visible_at,
                    lease_token: None,
                    delivery_count: 0,
                },
            );
        }
        self.published.notify_waiters();
        Ok(())
    }

    async fn fetch(&self, queues: &[String], max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.published.notified();
            let got = self.take_due(queues, max);
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            // Wake on publish, or poll for ETAs and expired leases coming due.
            let step = deadline.min(tokio::time::Instant::now() + Duration::from_millis(50));
            let _ = tokio::time::timeout_at(step, notified).await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<bool, BrokerError> {
        Ok(self.with_leased(&delivery.tag, |s, id| s.messages.remove(&id)).is_some())
    }

    async fn requeue(&self, delivery: &Delivery, at: Option<DateTime<Utc>>) -> Result<(), BrokerError> {
        self.with_leased(&delivery.tag, |s, id| {
            if let Some(e) = s.messages.get_mut(&id) {
                e.lease_token = None;
                e.visible_at = at.unwrap_or_else(Utc::now);
            }
        });
        self.published.notify_waiters();
        Ok(())
    }

    async fn renew(&self, deliveries: &[Delivery]) -> Result<(), BrokerError> {
        let until = Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or_default();
        for d in deliveries {
            self.with_leased(&d.tag, |s, id| {
                if let Some(e) = s.messages.get_mut(&id) {
                    e.visible_at = until;
                }
            });
        }
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.dead_letter_with(delivery, &DeadLetterInfo { reason: reason.to_owned(), ..Default::default() }).await
    }

    async fn dead_letter_with(&self, delivery: &Delivery, info: &DeadLetterInfo) -> Result<(), BrokerError> {
        let (task_id, task_name) = peek_ids(&delivery.payload);
        let mut state = self.lock();
        if let Some((id, _)) = Self::parse_tag(&delivery.tag) {
            state.messages.remove(&id);
        }
        state.next_id += 1;
        let id = state.next_id.to_string();
        state.dead.push(DeadLetter {
            id,
            queue: delivery.queue.clone(),
            task_id,
            task_name,
            reason: info.reason.clone(),
            error_type: info.error_type.clone(),
            traceback: info.traceback.clone(),
            retries: info.retries,
            replayed_as: None,
            payload: delivery.payload.clone(),
            created_at: Utc::now(),
        });
        Ok(())
    }

    async fn mark_dead_letter_replayed(&self, id: &str, task_id: &str) -> Result<bool, BrokerError> {
        let mut state = self.lock();
        let found = state.dead.iter_mut().find(|d| d.id == id);
        Ok(found.map(|d| d.replayed_as = Some(task_id.to_owned())).is_some())
    }

    async fn persist_revoked(
        &self,
        ids: &[String],
        terminate: bool,
        expires_at: DateTime<Utc>,
    ) -> Result<bool, BrokerError> {
        let mut state = self.lock();
        for id in ids {
            state.revoked.insert(id.clone(), Revoked { id: id.clone(), terminate, expires_at });
        }
        state.revoked_version += 1;
        Ok(true)
    }

    async fn revoked_version(&self) -> Result<u64, BrokerError> {
        Ok(self.lock().revoked_version)
    }

    async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        let now = Utc::now();
        let mut state = self.lock();
        state.revoked.retain(|_, r| r.expires_at > now);
        Ok(state.revoked.values().cloned().collect())
    }

    async fn rate_limit_acquire(
        &self,
        key: &str,
        waiter: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Duration, BrokerError> {
        let now = self.started.elapsed().as_secs_f64() * 1000.0;
        let interval = interval.as_secs_f64() * 1000.0;
        let mut state = self.lock();
        let (bucket, line) = state.buckets.entry(key.to_owned()).or_default();
        line.retain(|_, turn| *turn >= now - STALE_TURNS * interval);
        let holder = line.get(waiter).copied();
        let others_due = line.iter().any(|(w, turn)| w != waiter && *turn <= now);
        Ok(match attempt(bucket, now, interval, burst, holder, others_due) {
            Attempt::Granted => {
                line.remove(waiter);
                Duration::ZERO
            }
            Attempt::Wait { wait, joined } => {
                if let Some(turn) = joined {
                    line.insert(waiter.to_owned(), turn);
                }
                wait
            }
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(self.lock().dead.iter().rev().take(limit).cloned().collect())
    }

    async fn dead_letter_by_id(&self, id: &str) -> Result<Option<DeadLetter>, BrokerError> {
        Ok(self.lock().dead.iter().find(|d| d.id == id).cloned())
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let mut state = self.lock();
        let before = state.dead.len();
        state.dead.retain(|d| d.id != id);
        Ok(state.dead.len() != before)
    }

    async fn purge_dead_letters(&self) -> Result<u64, BrokerError> {
        let mut state = self.lock();
        let n = state.dead.len() as u64;
        state.dead.clear();
        Ok(n)
    }

    async fn purge(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut state = self.lock();
        let before = state.messages.len();
        state.messages.retain(|_, e| e.queue != queue || e.lease_token.is_some());
        Ok((before - state.messages.len()) as u64)
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, BrokerError> {
        let now = Utc::now();
        let state = self.lock();
        let mut by_queue: BTreeMap<String, QueueStats> = BTreeMap::new();
        for e in state.messages.values() {
            let s = by_queue
                .entry(e.queue.clone())
                .or_insert_with(|| QueueStats { queue: e.queue.clone(), ..Default::default() });
            if e.lease_token.is_some() && e.visible_at > now {
                s.leased += 1;
            } else if e.visible_at > now {
                s.scheduled += 1;
            } else {
                s.ready += 1;
            }
        }
        Ok(by_queue.into_values().collect())
    }
}
