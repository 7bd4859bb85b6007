//! Redis result backend (`redis://host:port/db`) in Celery's layout (spec §5.1, §6.3):
//! `celery-task-meta-<id>` written with `SETEX <result_expires>` and `PUBLISH`ed on the same
//! name (a SUCCESS is never overwritten), chord counting in `celery-taskset-meta-<gid>.j`
//! (members `[1, id, state, result]` by `group_index`) with the size in `.s`, and clients that
//! wait by `SUBSCRIBE` + `GET` instead of polling.

use super::{BackendError, ChordPart, ResultBackend, StoreOutcome};
use crate::protocol::{ResultMeta, State, pyjson};
use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Counts a chord member the way Celery 5.7's Redis backend does, so Python and Rust members
/// of one chord count together: each `task_id:index` recorded once in `.d`, its
/// `[1, id, state, result]` in the `.j` sorted set by index; the chord is complete when `.j`
/// holds `.s` + `.t` members, and the caller that takes the `.c` claim gets every member. It
/// then cleans up ([`CHORD_DONE`]) after sending the body, or drops only `.s` when the chord
/// failed. Once the chord is done (`.c` = `done`) a member completes nothing, but unlike
/// Celery's script it is still recorded (to expire with the other keys): a frozen chord applied
/// again reuses its group id, and Celery's client clears `done` only just before it sends the
/// last header task, so a fast worker can finish the first member of the new run before that;
/// dropped, the new run would never complete.
///
/// Members are counted in batches: KEYS holds five keys per member (`.j .t .s .d .c`), ARGV
/// four values per member (task id, `[1, id, state, result]`, index, ttl) and last the claim
/// token; members are taken in order, each exactly as one call of its own would be (the keys
/// of a chord get their expiry once per batch). Returns, per member, nothing, (for the one
/// that completed its chord) every member, or the text of the error its counting raised (one
/// member's error, say a key of the wrong type, stays its own: the others are still counted
/// and answered).
const CHORD_PART: &str = r#"
local out = {}
local token = ARGV[#ARGV]
local expired = {}
local function count(i)
  local jkey, tkey, skey, dkey, ckey = KEYS[5 * i + 1], KEYS[5 * i + 2], KEYS[5 * i + 3], KEYS[5 * i + 4], KEYS[5 * i + 5]
  local task_id, entry, score, ttl = ARGV[4 * i + 1], ARGV[4 * i + 2], ARGV[4 * i + 3], tonumber(ARGV[4 * i + 4])
  local done = redis.call('GET', ckey) == 'done'
  local member = task_id .. ':' .. score
  if redis.call('SISMEMBER', dkey, member) == 0 then
    redis.call('ZADD', jkey, score, entry)
    redis.call('SADD', dkey, member)
  end
  if ttl > 0 and not expired[jkey] then
    expired[jkey] = true
    for _, key in ipairs({jkey, tkey, skey, dkey}) do redis.call('EXPIRE', key, ttl) end
  end
  if done then return false end
  local size = redis.call('GET', skey)
  if not size then return false end
  local total = tonumber(size) + tonumber(redis.call('GET', tkey) or '0')
  if redis.call('ZCARD', jkey) == total and redis.call('SET', ckey, token, 'NX', 'EX', 30) then
    return redis.call('ZRANGE', jkey, 0, -1)
  end
  return false
end
for i = 0, #KEYS / 5 - 1 do
  local ok, got = pcall(count, i)
  if ok then
    out[i + 1] = got
  else
    if type(got) == 'table' then got = got.err end
    out[i + 1] = 'error: ' .. tostring(got)
  end
end
return out
"#;

/// After the body was sent, while the claim is still ours (ARGV[1], the token): the counting
/// keys go, and `.c` says `done` so late copies of a member change nothing (Celery's cleanup
/// script). A claim no longer ours (the chord was applied again meanwhile: a new run) is left.
const CHORD_DONE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
return 1
"#;

/// Stores results, a batch in one round trip, never replacing a stored SUCCESS: for each key,
/// `SET` (with its expiry in ms, or none) and `PUBLISH` on the key's name, as Celery does.
/// KEYS: the result keys. ARGV: per key, the record and its expiry in ms (0: none). Returns 1
/// (stored) or 0 (a SUCCESS was there) per key.
const STORE_MANY: &str = r#"
local out = {}
if #KEYS == 0 then return out end
local current = redis.call('MGET', unpack(KEYS))
local written = {}
for i = 1, #KEYS do
  local key, value, ms = KEYS[i], ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  -- A key written earlier in this batch counts as what is stored now.
  local cur = written[key] or current[i]
  if cur and (string.find(cur, '"status": "SUCCESS"', 1, true) or string.find(cur, '"status":"SUCCESS"', 1, true)) then
    out[i] = 0
  else
    if ms > 0 and ms % 1000 == 0 then
      redis.call('SET', key, value, 'EX', ms / 1000)
    elseif ms > 0 then
      redis.call('SET', key, value, 'PX', ms)
    else
      redis.call('SET', key, value)
    end
    redis.call('PUBLISH', key, value)
    written[key] = value
    out[i] = 1
  end
end
return out
"#;

/// One chord member to count: the chord's key stem (`celery-taskset-meta-<gid>`), the member's
/// task id, its `.j` entry and index, and the keys' ttl in seconds.
struct CountedPart {
    keys: String,
    task_id: String,
    entry: Vec<u8>,
    score: String,
    ttl: u64,
}

/// What the member that completed its chord gets: the claim token and every member's entry.
type Completed = (Arc<str>, Vec<Vec<u8>>);

/// One member's answer from [`CHORD_PART`]: nothing, every member, or its error's text.
fn counted(answer: redis::Value, token: &Arc<str>) -> Result<Option<Completed>, String> {
    match answer {
        redis::Value::Nil | redis::Value::Boolean(false) => Ok(None),
        redis::Value::Array(_) => redis::from_redis_value::<Vec<Vec<u8>>>(answer)
            .map(|parts| Some((token.clone(), parts)))
            .map_err(|e| e.to_string()),
        other => Err(match redis::from_redis_value::<String>(other) {
            Ok(text) => text,
            Err(e) => e.to_string(),
        }),
    }
}

/// The Redis result backend.
pub struct RedisBackend {
    client: redis::Client,
    conn: ConnectionManager,
    url: String,
    prefix: String,
    chord_done: redis::Script,
    /// Chord members are counted in batches ([`CHORD_PART`]).
    chord_parts: crate::batch::Coalescer<CountedPart, Result<Option<Completed>, String>>,
    /// Result writes go out in batches (`STORE_MANY`).
    writer: crate::batch::Coalescer<(String, Vec<u8>, u64), i64>,
    /// Seconds chord counting keys live (`result_expires`; 0: no expiry).
    chord_ttl: u64,
    /// Group id → the claim token this backend took for it, until the chord is finished.
    chord_claims: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The subscriber connection every `wait_ready` shares (opened when first needed, again
    /// after it dropped).
    listener: tokio::sync::Mutex<Option<Arc<Listener>>>,
}

impl RedisBackend {
    fn claims(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.chord_claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").field("url", &self.url).finish_non_exhaustive()
    }
}

fn err(operation: &'static str) -> impl FnOnce(redis::RedisError) -> BackendError {
    move |e| BackendError::storage(operation, e)
}

impl RedisBackend {
    /// Connects to `url`; `global_keyprefix` gets Celery's trailing `_` when it lacks one of
    /// `:_-.`.
    pub async fn connect(url: &str, global_keyprefix: Option<&str>) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(err("open"))?;
        let conn = ConnectionManager::new(client.clone()).await.map_err(err("connect"))?;
        let prefix = match global_keyprefix {
            Some(p) if !p.is_empty() && !p.ends_with([':', '_', '-', '.']) => format!("{p}_"),
            Some(p) => p.to_owned(),
            None => String::new(),
        };
        let writer = {
            let (conn, script) = (conn.clone(), redis::Script::new(STORE_MANY));
            crate::batch::Coalescer::new(256, move |items: Vec<(String, Vec<u8>, u64)>| {
                let (mut conn, script) = (conn.clone(), script.clone());
                Box::pin(async move {
                    let mut inv = script.prepare_invoke();
                    for (key, value, ms) in &items {
                        inv.key(key).arg(value.as_slice()).arg(*ms);
                    }
                    inv.invoke_async::<Vec<i64>>(&mut conn).await.map_err(|e| e.to_string())
                })
            })
        };
        let chord_parts = {
            let (conn, script) = (conn.clone(), redis::Script::new(CHORD_PART));
            crate::batch::Coalescer::new(256, move |items: Vec<CountedPart>| {
                let (mut conn, script) = (conn.clone(), script.clone());
                Box::pin(async move {
                    let token: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
                    let mut inv = script.prepare_invoke();
                    for part in &items {
                        for suffix in ["j", "t", "s", "d", "c"] {
                            inv.key(format!("{}.{suffix}", part.keys));
                        }
                        inv.arg(&part.task_id).arg(part.entry.as_slice()).arg(&part.score).arg(part.ttl);
                    }
                    inv.arg(&*token);
                    let done: Vec<redis::Value> = inv.invoke_async(&mut conn).await.map_err(|e| e.to_string())?;
                    Ok(done.into_iter().map(|answer| counted(answer, &token)).collect())
                })
            })
        };
        Ok(RedisBackend {
            writer,
            chord_parts,
            client,
            conn,
            url: crate::broker::redact(url),
            prefix,
            chord_done: redis::Script::new(CHORD_DONE),
            chord_ttl: 86_400,
            chord_claims: Default::default(),
            listener: Default::default(),
        })
    }

    /// Sets how long chord counting keys live (`result_expires`; `None`: forever).
    pub fn with_expiry(mut self, expires: Option<Duration>) -> Self {
        self.chord_ttl = expires.map(|e| e.as_secs().max(1)).unwrap_or(0);
        self
    }

    fn group_key(&self, group_id: &str) -> String {
        format!("{}celery-taskset-meta-{group_id}", self.prefix)
    }

    fn task_key(&self, task_id: &str) -> String {
        format!("{}celery-task-meta-{task_id}", self.prefix)
    }

    fn chord_key(&self, group_id: &str, suffix: &str) -> String {
        format!("{}.{suffix}", self.group_key(group_id))
    }

    fn record_key(&self, key: &str) -> String {
        format!("{}celeriac-record-{key}", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

fn decode(task_id: &str, raw: &[u8]) -> Result<ResultMeta, BackendError> {
    ResultMeta::from_wire(raw).map_err(|source| BackendError::Corrupt { task_id: task_id.to_owned(), source })
}

#[async_trait]
impl ResultBackend for RedisBackend {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn store(&self, meta: &ResultMeta, expires: Option<Duration>) -> Result<StoreOutcome, BackendError> {
        let ms = expires.map(|e| e.as_millis().max(1) as u64).unwrap_or(0);
        let stored = self.writer.call((self.task_key(&meta.task_id), meta.to_wire(), ms)).await.map_err(|e| {
            BackendError::Storage {
                operation: "store",
                source: Box::<dyn std::error::Error + Send + Sync>::from(e.to_string()),
            }
        })?;
        Ok(if stored == 1 { StoreOutcome::Stored } else { StoreOutcome::KeptSuccess })
    }

    async fn get(&self, task_id: &str) -> Result<Option<ResultMeta>, BackendError> {
        let raw: Option<Vec<u8>> =
            redis::cmd("GET").arg(self.task_key(task_id)).query_async(&mut self.conn()).await.map_err(err("get"))?;
        raw.map(|r| decode(task_id, &r)).transpose()
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<ResultMeta>>, BackendError> {
        let mut out = Vec::with_capacity(task_ids.len());
        for chunk in task_ids.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(|id| self.task_key(id)).collect();
            let raws: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut self.conn()).await.map_err(err("get"))?;
            for (id, raw) in chunk.iter().zip(raws) {
                out.push(raw.map(|r| decode(id, &r)).transpose()?);
            }
        }
        Ok(out)
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        redis::cmd("DEL").arg(self.task_key(task_id)).query_async::<()>(&mut self.conn()).await.map_err(err("forget"))
    }

    async fn cleanup(&self) -> Result<u64, BackendError> {
        Ok(0) // Redis expires keys itself.
    }

    async fn set_chord_size(&self, group_id: &str, size: usize, expires: Option<Duration>) -> Result<(), BackendError> {
        // Applying a frozen chord again reuses its group id: it is a new run.
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.chord_key(group_id, "c")).ignore();
        let set = pipe.cmd("SET").arg(self.chord_key(group_id, "s")).arg(size);
        if let Some(e) = expires {
            set.arg("EX").arg(e.as_secs().max(1));
        }
        set.ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(err("set chord size"))
    }

    async fn add_to_chord(&self, group_id: &str) -> Result<(), BackendError> {
        redis::cmd("INCR")
            .arg(self.chord_key(group_id, "t"))
            .query_async::<i64>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(err("add to chord"))
    }

    async fn chord_part_return(&self, group_id: &str, part: ChordPart) -> Result<Option<Vec<ChordPart>>, BackendError> {
        let entry =
            pyjson::to_vec(&serde_json::json!([1, part.task_id, part.state.as_str(), part.result])).unwrap_or_default();
        let counted = CountedPart {
            keys: self.group_key(group_id),
            score: part.index.map(|i| i.to_string()).unwrap_or_else(|| "+inf".to_owned()),
            task_id: part.task_id,
            entry,
            ttl: self.chord_ttl,
        };
        let parts = self.chord_parts.call(counted).await.map_err(|e| e.to_string()).and_then(|r| r).map_err(|e| {
            BackendError::Storage {
                operation: "chord part",
                source: Box::<dyn std::error::Error + Send + Sync>::from(e),
            }
        })?;
        let parts = parts.map(|(token, list)| {
            self.claims().insert(group_id.to_owned(), token.to_string());
            list
        });
        Ok(parts.map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(i, raw)| {
                    let v: Vec<Value> = serde_json::from_slice(raw).ok()?;
                    Some(ChordPart {
                        index: Some(i as u64),
                        task_id: v.get(1)?.as_str()?.to_owned(),
                        state: State::parse(v.get(2)?.as_str()?),
                        result: v.get(3).cloned().unwrap_or(Value::Null),
                    })
                })
                .collect()
        }))
    }

    async fn chord_finished(&self, group_id: &str, body_sent: bool) -> Result<(), BackendError> {
        let token = self.claims().remove(group_id).unwrap_or_default();
        if body_sent {
            let cleaned = self
                .chord_done
                .key(self.chord_key(group_id, "c"))
                .key(self.chord_key(group_id, "j"))
                .key(self.chord_key(group_id, "t"))
                .key(self.chord_key(group_id, "s"))
                .key(self.chord_key(group_id, "d"))
                .arg(&token)
                .arg(self.chord_ttl.max(300))
                .invoke_async::<i64>(&mut self.conn())
                .await
                .map_err(err("chord finished"))?;
            if cleaned == 0 {
                tracing::warn!(
                    group_id,
                    "chord claim lost before cleanup (applied again?); its data is left to expire"
                );
            }
            Ok(())
        } else {
            // Celery drops the size, so a copy of a header task arriving later does not fail
            // the chord again; the members stay for whoever reads them.
            redis::cmd("DEL")
                .arg(self.chord_key(group_id, "s"))
                .query_async::<i64>(&mut self.conn())
                .await
                .map(|_| ())
                .map_err(err("chord finished"))
        }
    }

    async fn save_group(&self, group_id: &str, result: &Value, expires: Option<Duration>) -> Result<(), BackendError> {
        let bytes = pyjson::to_vec(&serde_json::json!({"result": result})).unwrap_or_default();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.group_key(group_id)).arg(bytes);
        if let Some(e) = expires {
            cmd.arg("EX").arg(e.as_secs().max(1));
        }
        cmd.query_async::<()>(&mut self.conn()).await.map_err(err("save group"))
    }

    async fn restore_group(&self, group_id: &str) -> Result<Option<Value>, BackendError> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.group_key(group_id))
            .query_async(&mut self.conn())
            .await
            .map_err(err("restore group"))?;
        Ok(raw.and_then(|r| serde_json::from_slice::<Value>(&r).ok()).and_then(|v| v.get("result").cloned()))
    }

    async fn put_record(&self, key: &str, json: &[u8], expires: Option<Duration>) -> Result<(), BackendError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.record_key(key)).arg(json);
        if let Some(e) = expires {
            cmd.arg("EX").arg(e.as_secs().max(1));
        }
        cmd.query_async::<()>(&mut self.conn()).await.map_err(err("put record"))
    }

    async fn get_record(&self, key: &str) -> Result<Option<Value>, BackendError> {
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.record_key(key))
            .query_async(&mut self.conn())
            .await
            .map_err(err("get record"))?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    async fn wait_ready(&self, task_id: &str, timeout: Duration) -> Result<Option<ResultMeta>, BackendError> {
        // Subscribe first, then read: a result stored in between is seen by the GET.
        let key = self.task_key(task_id);
        let deadline = tokio::time::Instant::now() + timeout;
        // The shared connection, and a second, new one if it turned out dead; a wait for
        // either ends with the deadline (a connection stuck without an answer must not hold
        // every waiter past its timeout). With none, the stored value is read until then.
        let mut waiter = None;
        for _ in 0..2 {
            let listener = match tokio::time::timeout_at(deadline, self.listener()).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) if transient(&e) => break,
                Ok(Err(e)) => return Err(err("subscribe")(e)),
                Err(_) => break,
            };
            match tokio::time::timeout_at(deadline, listener.wait_for(&key)).await {
                Ok(Ok(w)) => {
                    waiter = Some(w);
                    break;
                }
                Ok(Err(e)) if transient(&e) => listener.alive.store(false, Ordering::Release),
                Ok(Err(e)) => return Err(err("subscribe")(e)),
                Err(_) => {
                    listener.alive.store(false, Ordering::Release);
                    break;
                }
            }
        }
        let Some(mut waiter) = waiter else { return self.poll_until(task_id, deadline).await };
        let mut last = self.get_until(task_id, deadline).await?;
        if last.as_ref().is_some_and(|m| m.status.is_ready()) {
            return Ok(last);
        }
        loop {
            match tokio::time::timeout_at(deadline, waiter.next()).await {
                Err(_) => return Ok(last),
                // The connection dropped: read the stored value until the time is up.
                Ok(None) => return self.poll_until(task_id, deadline).await,
                Ok(Some(payload)) => {
                    if let Ok(meta) = decode(task_id, &payload) {
                        let ready = meta.status.is_ready();
                        last = Some(meta);
                        if ready {
                            return Ok(last);
                        }
                    }
                }
            }
        }
    }
}

/// A connection that dropped or was refused (a Redis restart), which the connection manager
/// heals by reconnecting.
fn transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

impl RedisBackend {
    /// The shared subscriber connection, opened (again) if there is none alive.
    async fn listener(&self) -> Result<Arc<Listener>, redis::RedisError> {
        let mut current = self.listener.lock().await;
        if let Some(l) = current.as_ref().filter(|l| l.alive.load(Ordering::Acquire)) {
            return Ok(l.clone());
        }
        let l = Listener::open(&self.client).await?;
        *current = Some(l.clone());
        Ok(l)
    }

    /// `get`, read again while the connection is being re-established (the first command after
    /// a Redis restart fails while the manager reconnects), until `deadline`.
    async fn get_until(
        &self,
        task_id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<ResultMeta>, BackendError> {
        loop {
            let read: Result<Option<Vec<u8>>, redis::RedisError> =
                redis::cmd("GET").arg(self.task_key(task_id)).query_async(&mut self.conn()).await;
            match read {
                Ok(raw) => return raw.map(|r| decode(task_id, &r)).transpose(),
                Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(err("get")(e)),
            }
        }
    }

    async fn poll_until(
        &self,
        task_id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<ResultMeta>, BackendError> {
        loop {
            let meta = self.get_until(task_id, deadline).await?;
            if meta.as_ref().is_some_and(|m| m.status.is_ready()) || tokio::time::Instant::now() >= deadline {
                return Ok(meta);
            }
            tokio::time::sleep(Duration::from_millis(50).min(deadline - tokio::time::Instant::now())).await;
        }
    }
}

/// Result key → its waiters (id, where its records go).
type Waiting = std::collections::HashMap<String, Vec<(u64, mpsc::UnboundedSender<Vec<u8>>)>>;

/// One subscriber connection for every waiting client of a backend (a new connection per
/// `wait_ready` cost a connect and a handshake per `get()`): a reader task hands each
/// published record to the waiters of its key.
struct Listener {
    sink: redis::aio::PubSubSink,
    /// Channel (result key) → its waiters.
    waiters: std::sync::Mutex<Waiting>,
    next_id: AtomicU64,
    /// False once the connection dropped (the reader ended; waiters were let go).
    alive: AtomicBool,
    /// SUBSCRIBE and UNSUBSCRIBE take turns, so a key's last waiter leaving never unsubscribes
    /// after a new waiter of the key subscribed.
    turn: tokio::sync::Mutex<()>,
    /// Dropped with the listener: the reader ends and the connection closes.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Listener {
    async fn open(client: &redis::Client) -> Result<Arc<Listener>, redis::RedisError> {
        let (sink, mut stream) = client.get_async_pubsub().await?.split();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let listener = Arc::new(Listener {
            sink,
            waiters: Default::default(),
            next_id: AtomicU64::new(0),
            alive: AtomicBool::new(true),
            turn: tokio::sync::Mutex::new(()),
            _stop: stop,
        });
        let reader = Arc::downgrade(&listener);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = stream.next() => match msg { Some(m) => m, None => break },
                    _ = &mut stopped => return,
                };
                let Some(listener) = reader.upgrade() else { return };
                let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                if let Some(waiting) = listener.lock_waiters().get(msg.get_channel_name()) {
                    for (_, tx) in waiting {
                        let _ = tx.send(payload.clone());
                    }
                }
            }
            if let Some(listener) = reader.upgrade() {
                listener.alive.store(false, Ordering::Release);
                // Dropping the senders tells every waiter the connection is gone.
                listener.lock_waiters().clear();
            }
        });
        Ok(listener)
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a waiter for `key` and subscribes; records published on `key` from then on
    /// reach the waiter.
    async fn wait_for(self: &Arc<Self>, key: &str) -> Result<Waiter, redis::RedisError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_waiters().entry(key.to_owned()).or_default().push((id, tx));
        let waiter = Waiter { listener: self.clone(), key: key.to_owned(), id, rx };
        let _turn = self.turn.lock().await;
        self.sink.clone().subscribe(key).await?;
        Ok(waiter)
    }
}

/// One waiting client; leaving (drop) unsubscribes the key when it was the key's last.
struct Waiter {
    listener: Arc<Listener>,
    key: String,
    id: u64,
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Waiter {
    /// The next record published on the key; `None` when the connection dropped.
    async fn next(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let last = {
            let mut waiters = self.listener.lock_waiters();
            match waiters.get_mut(&self.key) {
                Some(list) => {
                    list.retain(|(id, _)| *id != self.id);
                    list.is_empty() && waiters.remove(&self.key).is_some()
                }
                None => false,
            }
        };
        if !last || !self.listener.alive.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (listener, key) = (self.listener.clone(), std::mem::take(&mut self.key));
        runtime.spawn(async move {
            let _turn = listener.turn.lock().await;
            if !listener.lock_waiters().contains_key(&key) {
                let _ = listener.sink.clone().unsubscribe(&key).await;
            }
        });
    }
}
