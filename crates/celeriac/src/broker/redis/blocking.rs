//! Waiting on the server instead of polling: an idle consumer blocks in Redis until a
//! message arrives on one of its lists.
//!
//! A blocking pop cannot take from several lists into `unacked` atomically, and a message that
//! only exists in a reply is lost when the worker dies before it records it (kombu's BRPOP
//! loses it that way). So each watched list (one per queue and priority bucket) gets a
//! *watcher*: a dedicated connection that runs `BLMOVE <list> <holding list> RIGHT LEFT`, where
//! the holding list is this node's `celeriac.inflight.<node>.<list>`. The message is never only
//! in flight: it is on the queue, in the holding list, or (after a claim, which serves
//! holding lists first, priority 0 first) in kombu's `unacked`. Dead-node recovery gives back
//! the holding lists of a node whose liveness key expired.
//!
//! A watcher blocks only while a fetch wants its list (`arm`); what it moves while nobody
//! wants it goes straight back to the front of its list (`GIVE_BACK`), in order.
//!
//! Not for: claiming (`TAKE` in `scripts.rs`, recorded by `run_claim` in `mod.rs`) or recovery (`maintenance.rs`).

use super::scripts::GIVE_BACK;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The watchers of one broker.
pub(super) struct Watchers {
    shared: Arc<Shared>,
}

struct Shared {
    /// Opens the dedicated connections.
    client: redis::Client,
    /// For give-backs (not blocking).
    conn: ConnectionManager,
    give_back: redis::Script,
    /// The longest single blocking pop (kombu's `polling_interval`, 1 s): how soon a watcher
    /// notices it is no longer wanted or that its connection died.
    block_timeout: Duration,
    /// Wakes every waiting fetch when a watcher moved a message.
    wake: Notify,
    stop: CancellationToken,
    watches: Mutex<HashMap<String, Arc<Watch>>>,
    /// Taken by a claim for its two steps and by every give-back: a give-back empties a
    /// holding list, and must not take the tail a claim has taken but not recorded yet.
    turn: tokio::sync::Mutex<()>,
}

/// One watched list.
struct Watch {
    /// The queue list (prefixed).
    source: String,
    /// Where the blocking pop moves to (prefixed).
    inflight: String,
    state: Mutex<WatchState>,
    /// Wakes the watcher when armed.
    arm: Notify,
    /// Wakes `release` when a blocking pop has ended.
    idle: Notify,
}

#[derive(Default)]
struct WatchState {
    /// Fetches in progress that include this list.
    wanted: usize,
    /// Block until then (a fetch's deadline); `None` when no fetch wants the list.
    armed_until: Option<Instant>,
    /// Messages moved into the holding list so far.
    moved: u64,
    /// A blocking pop is in progress (until its move, if any, is claimable or given back).
    popping: bool,
    /// The server's id of the watcher's connection (`CLIENT ID`), to `CLIENT UNBLOCK` it.
    client_id: Option<i64>,
}

impl Watchers {
    pub fn new(
        client: redis::Client,
        conn: ConnectionManager,
        block_timeout: Duration,
        stop: CancellationToken,
    ) -> Self {
        Watchers {
            shared: Arc::new(Shared {
                client,
                conn,
                give_back: redis::Script::new(GIVE_BACK),
                block_timeout,
                wake: Notify::new(),
                stop,
                watches: Mutex::default(),
                turn: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Registers a fetch's interest in `lists` (`(queue list, holding list)` pairs), starting
    /// the watchers not running yet. Dropping the interest ends it.
    pub fn interest(&self, lists: &[(String, String)]) -> Interest {
        let mut watches = lock(&self.shared.watches);
        let mut mine = Vec::with_capacity(lists.len());
        for (source, inflight) in lists {
            let watch = watches
                .entry(source.clone())
                .or_insert_with(|| {
                    let watch = Arc::new(Watch {
                        source: source.clone(),
                        inflight: inflight.clone(),
                        state: Mutex::default(),
                        arm: Notify::new(),
                        idle: Notify::new(),
                    });
                    tokio::spawn(watch_list(self.shared.clone(), watch.clone()));
                    watch
                })
                .clone();
            let seen = {
                let mut st = lock(&watch.state);
                st.wanted += 1;
                st.moved
            };
            mine.push((watch, seen));
        }
        Interest { shared: self.shared.clone(), watches: mine }
    }

    /// Waits for the turn to touch the holding lists' tails (see [`Shared::turn`]).
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.shared.turn.lock().await
    }

    /// The holding lists of every watch started so far.
    pub fn holding_lists(&self) -> Vec<String> {
        let mut lists: Vec<String> = lock(&self.shared.watches).values().map(|w| w.inflight.clone()).collect();
        lists.sort();
        lists
    }

    /// A future that completes when a watcher moves a message (create it, `enable` it, then
    /// look at the lists, then await it: no wake-up is missed).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.wake.notified()
    }

    /// Ends the blocking pops no fetch wants any more (`CLIENT UNBLOCK`, or waiting for their
    /// timeout where that is refused) and gives back what they moved: a worker that stops
    /// leaves nothing in its holding lists.
    pub async fn release(&self) -> Result<u64, redis::RedisError> {
        let unwanted_pop = |w: &Watch| {
            let st = lock(&w.state);
            st.wanted == 0 && st.popping
        };
        let busy: Vec<Arc<Watch>> = lock(&self.shared.watches).values().filter(|w| unwanted_pop(w)).cloned().collect();
        let mut conn = self.shared.conn.clone();
        for w in &busy {
            let id = lock(&w.state).client_id;
            if let Some(id) = id {
                let _: redis::RedisResult<i64> =
                    redis::cmd("CLIENT").arg("UNBLOCK").arg(id).query_async(&mut conn).await;
            }
        }
        let deadline = Instant::now() + self.shared.block_timeout + Duration::from_secs(1);
        for w in &busy {
            loop {
                let done = w.idle.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !unwanted_pop(w) || Instant::now() >= deadline {
                    break;
                }
                let _ = tokio::time::timeout_at(deadline, done).await;
            }
        }
        self.sweep().await
    }

    /// Gives back what sits in the holding lists nobody wants (a move whose reply was lost).
    pub async fn sweep(&self) -> Result<u64, redis::RedisError> {
        let idle: Vec<Arc<Watch>> =
            lock(&self.shared.watches).values().filter(|w| lock(&w.state).wanted == 0).cloned().collect();
        let mut n = 0;
        for w in idle {
            n += self.shared.give_back(&w).await?;
        }
        Ok(n)
    }
}

/// One fetch's interest in its lists.
pub(super) struct Interest {
    shared: Arc<Shared>,
    /// Each watch with its `moved` count when the fetch last looked at the lists.
    watches: Vec<(Arc<Watch>, u64)>,
}

impl Interest {
    /// Call just before the claim looks at the lists: moves counted after this are the
    /// fetch's to claim, or to give back when it ends without looking again.
    pub fn looking(&mut self) {
        for (watch, seen) in &mut self.watches {
            *seen = lock(&watch.state).moved;
        }
    }

    /// Lets the watchers block until `until`.
    pub fn arm(&self, until: Instant) {
        for (watch, _) in &self.watches {
            let mut st = lock(&watch.state);
            if st.armed_until.is_none_or(|t| t < until) {
                st.armed_until = Some(until);
            }
            drop(st);
            watch.arm.notify_one();
        }
    }
}

impl Drop for Interest {
    fn drop(&mut self) {
        let mut late = Vec::new();
        for (watch, seen) in self.watches.drain(..) {
            let mut st = lock(&watch.state);
            st.wanted = st.wanted.saturating_sub(1);
            if st.wanted == 0 {
                st.armed_until = None;
                if st.moved != seen {
                    late.push(watch.clone());
                }
            }
        }
        // A message moved after the fetch last claimed, with no fetch left to claim it.
        if !late.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                for w in late {
                    if let Err(e) = shared.give_back(&w).await {
                        tracing::warn!(list = %w.source, error = %e, "could not give back a message; recovery will");
                    }
                }
            });
        }
    }
}

impl Shared {
    async fn give_back(&self, watch: &Watch) -> Result<u64, redis::RedisError> {
        let _turn = self.turn.lock().await;
        if lock(&watch.state).wanted > 0 {
            // A fetch started meanwhile: its claim takes what is there.
            return Ok(0);
        }
        self.give_back.key(&watch.inflight).key(&watch.source).invoke_async(&mut self.conn.clone()).await
    }

    /// A watcher moved a message: wake the fetches that want it, or give it back.
    async fn moved(&self, watch: &Watch) {
        let wanted = {
            let mut st = lock(&watch.state);
            st.moved += 1;
            st.wanted > 0
        };
        if wanted {
            self.wake.notify_waiters();
        } else if let Err(e) = self.give_back(watch).await {
            tracing::warn!(list = %watch.source, error = %e, "could not give back a message; recovery will");
        }
    }

    async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        // No 500 ms response timeout: the reply of a blocking pop comes when it comes.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.block_timeout + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        self.client.get_multiplexed_async_connection_with_config(&config).await
    }
}

/// The watcher of one list: blocks on its own connection while armed.
async fn watch_list(shared: Arc<Shared>, watch: Arc<Watch>) {
    let mut conn = None;
    let mut failures = 0u32;
    // BLMOVE needs Redis 6.2; before it, BRPOPLPUSH does the same move.
    let mut legacy = false;
    loop {
        let until = loop {
            let armed = watch.arm.notified();
            tokio::pin!(armed);
            armed.as_mut().enable();
            if let Some(t) = lock(&watch.state).armed_until.filter(|t| *t > Instant::now()) {
                break t;
            }
            tokio::select! {
                _ = armed => {}
                _ = shared.stop.cancelled() => return,
            }
        };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match shared.connect().await {
                Ok(mut c) => {
                    let id: Option<i64> = redis::cmd("CLIENT").arg("ID").query_async(&mut c).await.ok();
                    lock(&watch.state).client_id = id;
                    conn.insert(c)
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(list = %watch.source, error = %e, "blocking connection lost; reconnecting");
                    }
                    let pause = Duration::from_millis(100 * 2u64.pow(failures.min(5)));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shared.stop.cancelled() => return,
                    }
                    continue;
                }
            },
        };
        let wait = until.saturating_duration_since(Instant::now()).min(shared.block_timeout);
        let secs = wait.as_secs_f64().max(0.01);
        let mut cmd = if legacy { redis::cmd("BRPOPLPUSH") } else { redis::cmd("BLMOVE") };
        cmd.arg(&watch.source).arg(&watch.inflight);
        if !legacy {
            cmd.arg("RIGHT").arg("LEFT");
        }
        cmd.arg(if legacy { secs.ceil() } else { secs });
        lock(&watch.state).popping = true;
        let moved: redis::RedisResult<Option<Vec<u8>>> = tokio::select! {
            r = cmd.query_async(c) => r,
            _ = shared.stop.cancelled() => return,
        };
        if let Ok(Some(_)) = moved {
            shared.moved(&watch).await;
        }
        lock(&watch.state).popping = false;
        watch.idle.notify_waiters();
        match moved {
            Ok(Some(_)) => failures = 0,
            Ok(None) => failures = 0,
            Err(e) if !legacy && e.detail().is_some_and(|d| d.to_ascii_lowercase().contains("unknown command")) => {
                tracing::info!(error = %e, "BLMOVE refused (Redis before 6.2?): blocking with BRPOPLPUSH");
                legacy = true;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(list = %watch.source, error = %e, "blocking pop failed; reconnecting");
                }
                conn = None;
            }
        }
    }
}
