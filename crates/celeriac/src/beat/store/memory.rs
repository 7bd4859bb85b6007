//! A beat store inside one process: for tests and for `memory://` apps. Instances that share
//! one `MemoryStore` (an `Arc`) elect a leader among themselves.

use super::{BeatStore, Claim, LastSent, Leader, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An in-process lease and last-sent table.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Holder, token, lease end.
    lease: Option<(String, u64, Instant)>,
    /// The last token handed out.
    counter: u64,
    sent: HashMap<String, LastSent>,
}

impl State {
    /// The lease if it has not run out.
    fn live(&mut self) -> Option<&(String, u64, Instant)> {
        if self.lease.as_ref().is_some_and(|(_, _, until)| *until <= Instant::now()) {
            self.lease = None;
        }
        self.lease.as_ref()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl BeatStore for MemoryStore {
    fn describe(&self) -> String {
        "memory://".to_owned()
    }

    async fn acquire(&self, holder: &str, lease: Duration) -> Result<Option<u64>, StoreError> {
        let mut s = self.state();
        let until = Instant::now() + lease;
        let token = match s.live().cloned() {
            Some((h, token, _)) if h == holder => token,
            Some(_) => return Ok(None),
            None => {
                s.counter += 1;
                s.counter
            }
        };
        s.lease = Some((holder.to_owned(), token, until));
        Ok(Some(token))
    }

    async fn release(&self, holder: &str, token: u64) -> Result<(), StoreError> {
        let mut s = self.state();
        if s.live().is_some_and(|(h, t, _)| h == holder && *t == token) {
            s.lease = None;
        }
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        Ok(self.state().live().map(|(holder, token, _)| Leader { holder: holder.clone(), token: *token }))
    }

    async fn last_sent(&self) -> Result<HashMap<String, LastSent>, StoreError> {
        Ok(self.state().sent.clone())
    }

    async fn claim(&self, holder: &str, token: u64, entry: &str, tick: DateTime<Utc>) -> Result<Claim, StoreError> {
        let mut s = self.state();
        if !s.live().is_some_and(|(h, t, _)| h == holder && *t == token) {
            return Ok(Claim::NotLeader);
        }
        if s.sent.get(entry).is_some_and(|last| last.tick >= tick) {
            return Ok(Claim::AlreadySent);
        }
        s.sent.insert(entry.to_owned(), LastSent { tick, token });
        Ok(Claim::Claimed)
    }
}
