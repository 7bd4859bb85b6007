//! In-process result backend (`memory://`), for eager mode and tests. Waiters are woken on
//! every write instead of polling.

use super::{BackendError, ChordPart, ResultBackend, StoreOutcome, may_overwrite};
use crate::protocol::ResultMeta;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    records: Mutex<HashMap<String, (ResultMeta, Option<Instant>)>>,
    chords: Mutex<HashMap<String, Chord>>,
    kv: Mutex<HashMap<String, serde_json::Value>>,
    groups: Mutex<HashMap<String, serde_json::Value>>,
    written: Notify,
}

#[derive(Debug, Default)]
struct Chord {
    size: Option<usize>,
    added: usize,
    done: bool,
    parts: Vec<ChordPart>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ResultMeta, Option<Instant>)>> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    fn url(&self) -> String {
        "memory://".to_owned()
    }

    async fn store(&self, meta: &ResultMeta, expires: Option<Duration>) -> Result<StoreOutcome, BackendError> {
        let outcome = {
            let mut records = self.lock();
            if may_overwrite(records.get(&meta.task_id).map(|(m, _)| &m.status)) {
                records.insert(meta.task_id.clone(), (meta.clone(), expires.map(|e| Instant::now() + e)));
                StoreOutcome::Stored
            } else {
                StoreOutcome::KeptSuccess
            }
        };
        self.written.notify_waiters();
        Ok(outcome)
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let records = self.lock();
        Ok(records.get(task_id).filter(|(_, exp)| exp.is_none_or(|e| e > Instant::now())).map(|(m, _)| m.clone()))
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        self.lock().remove(task_id);
        Ok(())
    }

    async fn cleanup(&self) -> Result<u64, BackendError> {
        let now = Instant::now();
        let mut records = self.lock();
        let before = records.len();
        records.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
        Ok((before - records.len()) as u64)
    }

    async fn set_chord_size(
        &self,
        group_id: &str,
        size: usize,
        _expires: Option<Duration>,
    ) -> Result<(), BackendError> {
        let mut chords = lock(&self.chords);
        let chord = chords.entry(group_id.to_owned()).or_default();
        chord.size = Some(size);
        chord.done = false;
        Ok(())
    }

    async fn add_to_chord(&self, group_id: &str) -> Result<(), BackendError> {
        lock(&self.chords).entry(group_id.to_owned()).or_default().added += 1;
        Ok(())
    }

    async fn chord_part_return(&self, group_id: &str, part: ChordPart) -> Result<Option<Vec<ChordPart>>, BackendError> {
        let mut chords = lock(&self.chords);
        let chord = chords.entry(group_id.to_owned()).or_default();
        if chord.done {
            return Ok(None);
        }
        if !chord.parts.iter().any(|p| p.task_id == part.task_id && p.index == part.index) {
            chord.parts.push(part);
        }
        match chord.size {
            Some(size) if chord.parts.len() == size + chord.added => {}
            _ => return Ok(None),
        }
        chord.done = true;
        let mut parts = chord.parts.clone();
        parts.sort_by_key(|p| p.index.unwrap_or(u64::MAX));
        Ok(Some(parts))
    }

    async fn chord_finished(&self, group_id: &str, body_sent: bool) -> Result<(), BackendError> {
        let mut chords = lock(&self.chords);
        if let Some(chord) = chords.get_mut(group_id) {
            chord.size = None;
            if body_sent {
                chord.added = 0;
                chord.parts.clear();
            }
        }
        Ok(())
    }

    async fn save_group(
        &self,
        group_id: &str,
        result: &serde_json::Value,
        _expires: Option<Duration>,
    ) -> Result<(), BackendError> {
        lock(&self.groups).insert(group_id.to_owned(), result.clone());
        Ok(())
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<serde_json::Value>, BackendError> {
        Ok(lock(&self.groups).get(group_id).cloned())
    }

    async fn put_record(&self, key: &str, json: &[u8], _expires: Option<Duration>) -> Result<(), BackendError> {
        let value = serde_json::from_slice(json).map_err(|e| BackendError::storage("put record", e))?;
        lock(&self.kv).insert(key.to_owned(), value);
        Ok(())
    }

    async fn get_record(&self, key: &str) -> Result<Option<serde_json::Value>, BackendError> {
        Ok(lock(&self.kv).get(key).cloned())
    }

    async fn wait_ready(&self, task_id: &str, timeout: Duration) -> Result<Option<ResultMeta>, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.written.notified();
            let meta = self.get(task_id).await?;
            if meta.as_ref().is_some_and(|m| m.status.is_ready()) || Instant::now() >= deadline {
                return Ok(meta);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}
