//! The beat lease in Redis, beside the broker's keys:
//!
//! - `<prefix>celeriac.beat.lease`: `"<token> <holder>"`, set with `NX PX <lease>`; renewed
//!   (`PEXPIRE`) only by its holder, so it vanishes when the leader stops renewing.
//! - `<prefix>celeriac.beat.token`: the fencing token counter (`INCR` on every new lease).
//! - `<prefix>celeriac.beat.sent`: a hash, entry name → `"<tick ms> <token>"`.
//!
//! Each operation is one Lua script, so a check and the write it guards are atomic. Expiry runs
//! on the Redis server's clock, not the beat hosts'.

use super::{BeatStore, Claim, LastSent, Leader, StoreError};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;

/// Takes a free lease with a new token, or renews the caller's. Returns the token, or 0.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local sp = string.find(cur, ' ', 1, true)
  if sp and string.sub(cur, sp + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, 1, sp - 1))
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
";

/// Deletes the lease if it is still `"<token> <holder>"`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Records a tick if the lease is still the caller's and the tick is later than the stored
/// one: 1 claimed, 0 already sent, -1 not the leader.
const CLAIM: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local last = redis.call('HGET', KEYS[2], ARGV[2])
if last then
  local sp = string.find(last, ' ', 1, true)
  local tick = tonumber(sp and string.sub(last, 1, sp - 1) or last)
  if tick and tick >= tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
return 1
";

/// Lease and last-sent ticks in a Redis database.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    url: String,
    lease_key: String,
    token_key: String,
    sent_key: String,
    acquire: redis::Script,
    release: redis::Script,
    claim: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.url).field("lease_key", &self.lease_key).finish()
    }
}

fn err(operation: &'static str) -> impl Fn(redis::RedisError) -> StoreError {
    move |e| StoreError::storage(operation, e)
}

impl RedisStore {
    /// Connects to `url`; keys start with `prefix` (the broker's `global_keyprefix`).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = crate::broker::redis::url::client(url).map_err(|e| StoreError::storage("open", e))?;
        let conn = ConnectionManager::new(client).await.map_err(err("connect"))?;
        Ok(RedisStore {
            conn,
            url: crate::broker::redact(url),
            lease_key: format!("{prefix}celeriac.beat.lease"),
            token_key: format!("{prefix}celeriac.beat.token"),
            sent_key: format!("{prefix}celeriac.beat.sent"),
            acquire: redis::Script::new(ACQUIRE),
            release: redis::Script::new(RELEASE),
            claim: redis::Script::new(CLAIM),
        })
    }
}

#[async_trait]
impl BeatStore for RedisStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn acquire(&self, holder: &str, lease: Duration) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let ms = lease.as_millis().max(1) as u64;
        let token: i64 = self
            .acquire
            .key(&self.lease_key)
            .key(&self.token_key)
            .arg(holder)
            .arg(ms)
            .invoke_async(&mut conn)
            .await
            .map_err(err("acquire"))?;
        Ok((token > 0).then_some(token as u64))
    }

    async fn release(&self, holder: &str, token: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(&self.lease_key)
            .arg(format!("{token} {holder}"))
            .invoke_async(&mut conn)
            .await
            .map_err(err("release"))?;
        Ok(())
    }

    async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<String> =
            redis::cmd("GET").arg(&self.lease_key).query_async(&mut conn).await.map_err(err("leader"))?;
        Ok(value.and_then(|v| {
            let (token, holder) = v.split_once(' ')?;
            Some(Leader { holder: holder.to_owned(), token: token.parse().ok()? })
        }))
    }

    async fn last_sent(&self) -> Result<HashMap<String, LastSent>, StoreError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&self.sent_key).query_async(&mut conn).await.map_err(err("last_sent"))?;
        Ok(all
            .into_iter()
            .filter_map(|(entry, v)| {
                let (tick, token) = v.split_once(' ')?;
                let tick = Utc.timestamp_millis_opt(tick.parse().ok()?).single()?;
                Some((entry, LastSent { tick, token: token.parse().ok()? }))
            })
            .collect())
    }

    async fn claim(&self, holder: &str, token: u64, entry: &str, tick: DateTime<Utc>) -> Result<Claim, StoreError> {
        let mut conn = self.conn.clone();
        let outcome: i64 = self
            .claim
            .key(&self.lease_key)
            .key(&self.sent_key)
            .arg(format!("{token} {holder}"))
            .arg(entry)
            .arg(tick.timestamp_millis())
            .arg(token)
            .invoke_async(&mut conn)
            .await
            .map_err(err("claim"))?;
        Ok(match outcome {
            1 => Claim::Claimed,
            0 => Claim::AlreadySent,
            _ => Claim::NotLeader,
        })
    }
}
