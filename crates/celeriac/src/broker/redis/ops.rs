//! The Redis side of `broker::ops`: the persisted revoked set and the shared rate buckets.
//!
//! - `celeriac.revoked`: sorted set, task id → expiry (ms since the epoch); pruned on read.
//! - `celeriac.revoked.terminate`: the same for revokes with `terminate`.
//! - `celeriac.revoked.version`: a counter bumped by every revoke (workers poll it).
//! - `celeriac.rate.<key>`: one rate bucket (hash: `tat`, GCRA's theoretical arrival time, and
//!   `ticket`, the end of its line; ms on the server's clock) and `celeriac.rate.<key>.waiters`
//!   (sorted set: waiting task id → turn), expiring once idle. The check and the update are one
//!   Lua script on the server's clock, so workers with skewed clocks still share one schedule.

use super::{Inner, err};
use crate::broker::ops::STALE_TURNS;
use crate::broker::{BrokerError, Revoked};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::Duration;

/// `broker::ops::attempt` in Lua, on the server's clock. KEYS: the bucket hash (`tat`,
/// `ticket`), its line (sorted set waiter → turn). ARGV: interval (ms), burst, waiter, stale
/// turns. Returns 0 when a start was taken, else the wait in ms (at least 1).
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local waiter = ARGV[3]
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[4]) * interval))
local b = redis.call('HMGET', KEYS[1], 'tat', 'ticket')
local tat = math.max(tonumber(b[1] or '0') or 0, now)
local ticket = tonumber(b[2] or '0') or 0
local holder = redis.call('ZSCORE', KEYS[2], waiter)
local others_due = false
if not holder then
  others_due = #redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1) > 0
end
local allow_at = tat - (burst - 1) * interval
local result
if allow_at <= now and (holder or not others_due) then
  tat = tat + interval
  if holder then redis.call('ZREM', KEYS[2], waiter) end
  result = 0
elseif holder then
  result = math.max(1, math.ceil(allow_at - now))
else
  local turn = math.max(ticket, allow_at, now)
  ticket = turn + interval
  redis.call('ZADD', KEYS[2], turn, waiter)
  result = math.max(1, math.ceil(turn - now))
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', tat), 'ticket', string.format('%.3f', ticket))
local ttl = math.ceil(math.max(tat, ticket) - now + tonumber(ARGV[4]) * interval) + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return result
"#;

static ACQUIRE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ACQUIRE));

impl Inner {
    fn revoked_keys(&self) -> [String; 3] {
        [
            self.keys.key("celeriac.revoked"),
            self.keys.key("celeriac.revoked.terminate"),
            self.keys.key("celeriac.revoked.version"),
        ]
    }

    pub(super) async fn persist_revoked(
        &self,
        ids: &[String],
        terminate: bool,
        expires_at: DateTime<Utc>,
    ) -> Result<(), BrokerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let [all, term, version] = self.revoked_keys();
        let at = expires_at.timestamp_millis();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in ids {
            pipe.cmd("ZADD").arg(&all).arg(at).arg(id).ignore();
            if terminate {
                pipe.cmd("ZADD").arg(&term).arg(at).arg(id).ignore();
            }
        }
        pipe.cmd("INCR").arg(&version).ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(err("revoke"))
    }

    pub(super) async fn revoked_version(&self) -> Result<u64, BrokerError> {
        let [_, _, version] = self.revoked_keys();
        let v: Option<u64> =
            redis::cmd("GET").arg(&version).query_async(&mut self.conn()).await.map_err(err("read revoked"))?;
        Ok(v.unwrap_or(0))
    }

    pub(super) async fn persisted_revoked(&self) -> Result<Vec<Revoked>, BrokerError> {
        let [all, term, _] = self.revoked_keys();
        let now = Utc::now().timestamp_millis();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&all).arg("-inf").arg(now).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&term).arg("-inf").arg(now).ignore();
        pipe.cmd("ZRANGE").arg(&all).arg(0).arg(-1).arg("WITHSCORES");
        pipe.cmd("ZRANGE").arg(&term).arg(0).arg(-1);
        let (entries, terminate): (Vec<(String, f64)>, Vec<String>) =
            pipe.query_async(&mut self.conn()).await.map_err(err("read revoked"))?;
        let terminate: HashSet<String> = terminate.into_iter().collect();
        Ok(entries
            .into_iter()
            .map(|(id, at)| Revoked {
                terminate: terminate.contains(&id),
                expires_at: Utc.timestamp_millis_opt(at as i64).single().unwrap_or_default(),
                id,
            })
            .collect())
    }

    pub(super) async fn rate_limit_acquire(
        &self,
        key: &str,
        waiter: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Duration, BrokerError> {
        let bucket = self.keys.key(&format!("celeriac.rate.{key}"));
        let mut invocation = ACQUIRE_SCRIPT.prepare_invoke();
        invocation
            .key(&bucket)
            .key(format!("{bucket}.waiters"))
            .arg(format!("{:.3}", interval.as_secs_f64() * 1000.0))
            .arg(burst.max(1))
            .arg(waiter)
            .arg(STALE_TURNS);
        let wait: i64 = invocation.invoke_async(&mut self.conn()).await.map_err(err("rate limit"))?;
        Ok(Duration::from_millis(wait.max(0) as u64))
    }
}
