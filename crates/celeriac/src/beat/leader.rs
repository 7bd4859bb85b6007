//! The beat loop: hold the lease, and while holding it send each entry's due ticks, each one
//! claimed in the store (with the fencing token) before it is sent.
//!
//! Order per tick: claim (compare-and-set of the entry's last tick, conditioned on the token
//! being the lease's), then publish. So a tick is never sent twice: a deposed leader's claim
//! fails, and a new leader starts from the last claimed tick. A leader killed between a claim
//! and its publish (a window of one broker round trip) loses that one tick.

use super::entry::{Entry, Missed};
use super::store::{self, BeatStore, Claim, LastSent, Leader, StoreError};
use crate::app::App;
use crate::{Error, Signature};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Message headers a beat adds to every task it sends.
pub mod headers {
    /// The entry's name.
    pub const ENTRY: &str = "beat_entry";
    /// The scheduled time of the tick (RFC 3339, UTC, milliseconds).
    pub const TICK: &str = "beat_tick";
    /// The fencing token of the leader that sent it.
    pub const TOKEN: &str = "beat_token";
}

/// A beat failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BeatError {
    /// The lease store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A tick was claimed but could not be sent.
    #[error("beat entry {entry}: sending the tick of {tick} failed: {source}")]
    Send {
        /// Entry name.
        entry: String,
        /// The tick.
        tick: DateTime<Utc>,
        /// What failed.
        source: Box<Error>,
    },
}

/// How a beat instance runs.
#[derive(Debug, Clone)]
pub struct BeatOptions {
    /// How long the lease lasts without renewal: a dead leader is replaced within about this
    /// long (plus a third of it, the followers' polling interval). Default 10 s.
    pub lease: Duration,
    /// This instance's id in the lease (`host:pid:uuid`).
    pub holder: String,
    /// With [`Missed::Skip`], how late a tick may be and still count as due now. Default 5 s.
    pub grace: Duration,
}

impl Default for BeatOptions {
    fn default() -> Self {
        BeatOptions {
            lease: Duration::from_secs(10),
            holder: format!("{}:{}:{}", crate::app::hostname(), std::process::id(), uuid::Uuid::new_v4().simple()),
            grace: Duration::from_secs(5),
        }
    }
}

/// One entry as `beat --list` shows it.
#[derive(Debug, Clone)]
pub struct EntryStatus {
    /// The entry.
    pub entry: Entry,
    /// The zone its schedule runs in.
    pub timezone: Tz,
    /// The last tick sent, from the store.
    pub last: Option<LastSent>,
    /// The next tick (none when disabled or a one-off that is done).
    pub next: Option<DateTime<Utc>>,
}

/// A beat instance: any number may run against one broker; one of them (the lease holder)
/// sends.
pub struct Beat {
    app: App,
    entries: Vec<Entry>,
    store: Arc<dyn BeatStore>,
    options: BeatOptions,
    tz: Tz,
    /// The token while this instance leads.
    token: Option<u64>,
    /// When the lease was last confirmed (a store error keeps leadership until it runs out).
    confirmed: Option<Instant>,
    /// When this instance first led: where entries never sent start counting.
    first_led: Option<DateTime<Utc>>,
    /// Ticks this instance sent.
    sent: u64,
}

impl std::fmt::Debug for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beat")
            .field("store", &self.store.describe())
            .field("entries", &self.entries.len())
            .field("holder", &self.options.holder)
            .field("token", &self.token)
            .finish()
    }
}

impl Beat {
    /// A beat for `app`'s entries (`beat_schedule` and [`crate::AppBuilder::beat_entry`]), with
    /// the lease store beside its broker.
    pub async fn new(app: &App) -> Result<Beat, BeatError> {
        let store = store::open(&app.config().broker_url, app.config()).await?;
        Ok(Beat::with_store(app, store))
    }

    /// A beat for `app`'s entries with the given store.
    pub fn with_store(app: &App, store: Arc<dyn BeatStore>) -> Beat {
        Beat {
            app: app.clone(),
            entries: app.beat_entries().to_vec(),
            store,
            options: BeatOptions::default(),
            tz: app.timezone(),
            token: None,
            confirmed: None,
            first_led: None,
            sent: 0,
        }
    }

    /// Replaces the entries.
    pub fn entries(mut self, entries: Vec<Entry>) -> Self {
        self.entries = entries;
        self
    }

    /// Replaces the options.
    pub fn options(mut self, options: BeatOptions) -> Self {
        self.options = options;
        self
    }

    /// The options, to change.
    pub fn options_mut(&mut self) -> &mut BeatOptions {
        &mut self.options
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn BeatStore> {
        &self.store
    }

    /// The fencing token while this instance leads.
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// Ticks this instance has sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Who leads now.
    pub async fn leader(&self) -> Result<Option<Leader>, BeatError> {
        Ok(self.store.leader().await?)
    }

    /// Each entry with its last and next tick, by name.
    pub async fn list(&self, now: DateTime<Utc>) -> Result<Vec<EntryStatus>, BeatError> {
        let last = self.store.last_sent().await?;
        let mut out: Vec<EntryStatus> = self
            .entries
            .iter()
            .map(|e| {
                let last = last.get(&e.name).copied();
                let from = last.map_or(now, |l| l.tick.max(now));
                EntryStatus {
                    timezone: e.zone(self.tz),
                    next: if e.enabled { e.next_after(from, self.tz) } else { None },
                    last,
                    entry: e.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(out)
    }

    /// Runs until `stop` is cancelled, then gives the lease up.
    pub async fn run(mut self, stop: CancellationToken) -> u64 {
        tracing::info!(
            holder = %self.options.holder,
            store = %self.store.describe(),
            entries = self.entries.len(),
            "beat starting"
        );
        loop {
            let wait = match self.step(Utc::now()).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(error = %e, "beat step failed");
                    self.poll_interval()
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(token) = self.token.take()
            && let Err(e) = self.store.release(&self.options.holder, token).await
        {
            tracing::warn!(error = %e, "beat could not release its lease (it runs out by itself)");
        }
        tracing::info!(sent = self.sent, "beat stopped");
        self.sent
    }

    fn poll_interval(&self) -> Duration {
        (self.options.lease / 3).max(Duration::from_millis(10))
    }

    /// One pass: take or renew the lease, send what is due if leading. Returns how long to
    /// wait before the next pass.
    pub async fn step(&mut self, now: DateTime<Utc>) -> Result<Duration, BeatError> {
        match self.store.acquire(&self.options.holder, self.options.lease).await {
            Ok(Some(token)) => {
                if self.token != Some(token) {
                    tracing::info!(token, holder = %self.options.holder, "beat: this instance is now the leader");
                    self.first_led.get_or_insert(now);
                }
                self.token = Some(token);
                self.confirmed = Some(Instant::now());
            }
            Ok(None) => {
                if self.token.take().is_some() {
                    tracing::warn!("beat: lost the lease to another instance");
                }
            }
            Err(e) => {
                // Keep leading while the lease we last confirmed lasts; the store's fencing
                // check refuses our claims anyway if another instance took over.
                if self.confirmed.is_none_or(|at| at.elapsed() >= self.options.lease) {
                    self.token = None;
                }
                return Err(e.into());
            }
        }
        let Some(token) = self.token else {
            return Ok(self.poll_interval());
        };
        let last = self.store.last_sent().await?;
        let next = self.send_due(token, now, &last).await?;
        let until_next = next
            .and_then(|t| (t - Utc::now()).to_std().ok())
            .map_or(self.poll_interval(), |d| d.min(self.poll_interval()));
        Ok(until_next)
    }

    /// Sends each enabled entry's due ticks; returns the soonest next tick.
    async fn send_due(
        &mut self,
        token: u64,
        now: DateTime<Utc>,
        last: &HashMap<String, LastSent>,
    ) -> Result<Option<DateTime<Utc>>, BeatError> {
        let start = self.first_led.unwrap_or(now);
        let mut soonest: Option<DateTime<Utc>> = None;
        for i in 0..self.entries.len() {
            let entry = self.entries[i].clone();
            if !entry.enabled {
                continue;
            }
            let tz = entry.zone(self.tz);
            let since = last.get(&entry.name).map_or(start, |l| l.tick);
            let (ticks, advance_only) = self.due(&entry, tz, since, now);
            for tick in ticks {
                match self.store.claim(&self.options.holder, token, &entry.name, tick).await? {
                    Claim::Claimed if advance_only => {
                        tracing::info!(entry = %entry.name, %tick, "beat: skipped missed ticks up to this one");
                    }
                    Claim::Claimed => self.send(&entry, tick, token).await?,
                    Claim::AlreadySent => {}
                    Claim::NotLeader => {
                        tracing::warn!(token, "beat: the lease moved on; sending nothing more");
                        self.token = None;
                        return Ok(None);
                    }
                }
            }
            if let Some(next) = entry.schedule.next_after(now.max(since), tz) {
                soonest = Some(soonest.map_or(next, |s| s.min(next)));
            }
        }
        Ok(soonest)
    }

    /// The ticks of `entry` to claim now, and whether they are only recorded (skipped), not
    /// sent.
    fn due(&self, entry: &Entry, tz: Tz, since: DateTime<Utc>, now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, bool) {
        let latest = entry.schedule.ticks_between(since, now, tz, 1).0.pop();
        match entry.missed {
            Missed::RunAll { max } => {
                let (ticks, dropped) = entry.schedule.ticks_between(since, now, tz, max);
                if dropped {
                    tracing::warn!(entry = %entry.name, max, "beat: more missed ticks than missed_max; the oldest are dropped");
                }
                (ticks, false)
            }
            Missed::RunOnce => (latest.into_iter().collect(), false),
            Missed::Skip => match latest {
                Some(t) if (now - t).to_std().is_ok_and(|late| late <= self.options.grace) => (vec![t], false),
                Some(t) => (vec![t], true),
                None => (Vec::new(), false),
            },
        }
    }

    async fn send(&mut self, entry: &Entry, tick: DateTime<Utc>, token: u64) -> Result<(), BeatError> {
        let mut sig = Signature::new(&entry.task, entry.args.clone());
        sig.kwargs = entry.kwargs.clone();
        sig.options = entry.options.clone();
        if let Some(queue) = &entry.queue {
            sig.options.insert("queue".to_owned(), Value::from(queue.as_str()));
        }
        let mut extra = match sig.options.remove("headers") {
            Some(Value::Object(h)) => h,
            _ => Map::new(),
        };
        extra.insert(headers::ENTRY.to_owned(), Value::from(entry.name.as_str()));
        extra.insert(headers::TICK.to_owned(), Value::from(tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)));
        extra.insert(headers::TOKEN.to_owned(), Value::from(token));
        sig.options.insert("headers".to_owned(), Value::Object(extra));
        match self.app.send_signature(sig).await {
            Ok(res) => {
                self.sent += 1;
                tracing::info!(entry = %entry.name, task = %entry.task, %tick, id = %res.id(), "beat: sent");
                Ok(())
            }
            Err(e) => {
                tracing::error!(entry = %entry.name, %tick, error = %e, "beat: a claimed tick could not be sent (it is lost)");
                Err(BeatError::Send { entry: entry.name.clone(), tick, source: Box::new(e) })
            }
        }
    }
}
