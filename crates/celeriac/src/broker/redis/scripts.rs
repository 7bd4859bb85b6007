//! The Lua scripts of the Redis broker: every step that must not be split by a crash or by
//! another worker runs as one script. Each keeps kombu's `unacked` / `unacked_index` layout and
//! adds Celeriac's per-node claims hash (`tag → the unacked_index score this node wrote`), so
//! a node can tell its own claim from a later one of the same message (kombu reuses a
//! message's delivery tag when it is restored and delivered again).

/// Takes up to `ARGV[1]` messages into this node's holding lists, without looking inside them:
/// first what a holding list already holds (a blocking pop's move, or a take whose recording
/// failed), then from its queue list, pair by pair (priority 0 first). What it takes from a
/// queue list is appended at the tail of the holding list, so the messages a take returns are
/// always the last ones of their holding list: the recording step (`mod.rs`, one MULTI with
/// kombu's `unacked` entries) trims exactly those, while a blocking pop may add more at the head.
/// A worker that dies in between leaves them in a holding list, which recovery gives back.
/// Parsing the envelopes happens in the worker: in Lua it cost more than every write.
/// KEYS: pairs `(holding list, queue list)` in the order to serve. ARGV: max.
/// Returns, for each pair it took from: the pair's number (from 1), the count, then the
/// messages, oldest first.
pub(super) const TAKE: &str = r#"
local n = tonumber(ARGV[1])
local out = {}
local got = 0
for p = 1, #KEYS / 2 do
  if got >= n then break end
  local holding, source = KEYS[2 * p - 1], KEYS[2 * p]
  local held = redis.call('LRANGE', holding, -(n - got), -1)
  local popped = {}
  if got + #held < n then
    popped = redis.call('RPOP', source, n - got - #held) or {}
  end
  local k = #held + #popped
  if k > 0 then
    out[#out + 1] = tostring(p)
    out[#out + 1] = tostring(k)
    -- The tail of a holding list is its oldest message.
    for i = #held, 1, -1 do out[#out + 1] = held[i] end
    for i = 1, #popped do out[#out + 1] = popped[i] end
    -- Appended oldest last, so the tail stays the oldest; in chunks inside unpack's limit.
    local rev = {}
    for i = #popped, 1, -1 do rev[#rev + 1] = popped[i] end
    for s = 1, #rev, 1000 do
      redis.call('RPUSH', holding, unpack(rev, s, math.min(s + 999, #rev)))
    end
    got = got + k
  end
end
return out
"#;

/// Acknowledges claims of this node, a batch of tags in one round trip: each message is
/// removed from `unacked` only while the claim is still this node's (its unacked_index score is
/// the one the node wrote); a message given back and claimed again elsewhere is left alone.
/// KEYS: unacked, unacked_index, claims. ARGV: the tags. Returns 1 (removed) or 0 per tag.
pub(super) const ACK_MANY: &str = r#"
if #ARGV == 0 then return {} end
local out = {}
local mine = redis.call('HMGET', KEYS[3], unpack(ARGV))
local scores = redis.call('ZMSCORE', KEYS[2], unpack(ARGV))
local done = {}
for i = 1, #ARGV do
  out[i] = 0
  if mine[i] and scores[i] and tonumber(scores[i]) == tonumber(mine[i]) then
    done[#done + 1] = ARGV[i]
    out[i] = 1
  end
end
redis.call('HDEL', KEYS[3], unpack(ARGV))
if #done > 0 then
  redis.call('ZREM', KEYS[2], unpack(done))
  redis.call('HDEL', KEYS[1], unpack(done))
end
return out
"#;

/// Moves the unacked_index score of this node's claims to now (the lease renewal), skipping
/// claims that are no longer its own. KEYS: unacked_index, claims. ARGV: now, tags.
pub(super) const RENEW: &str = r#"
local n = 0
for i = 2, #ARGV do
  local tag = ARGV[i]
  local mine = redis.call('HGET', KEYS[2], tag)
  local score = redis.call('ZSCORE', KEYS[1], tag)
  if mine and score and tonumber(mine) == tonumber(score) then
    redis.call('ZADD', KEYS[1], ARGV[1], tag)
    redis.call('HSET', KEYS[2], tag, ARGV[1])
    n = n + 1
  end
end
return n
"#;

/// Takes a message out of `unacked` and puts `payload` on each destination list: at the front
/// (`front`, what is served next, as kombu's restore), the back (`back`), or into the delayed
/// set with score ARGV[5] (`delay`, the member is ARGV[8] with the destination in it).
/// Conditions, each skipped when its argument is empty: the claim is the owner's (ARGV[6] =
/// '1': the owner's claims hash KEYS[3] holds the current score; the claims entry is removed
/// either way), the score is at most ARGV[7] (stale, for the visibility timeout), the stored
/// value is still ARGV[2] (nobody changed it since it was read).
/// KEYS: unacked, unacked_index, claims, delayed. ARGV: tag, stored, payload, mode, delay
/// score, owned, ceiling, delayed member, then the destination lists (from ARGV[9]).
/// Returns 1 when restored.
pub(super) const RESTORE: &str = r#"
local tag = ARGV[1]
local score = redis.call('ZSCORE', KEYS[2], tag)
if ARGV[6] == '1' then
  local mine = redis.call('HGET', KEYS[3], tag)
  redis.call('HDEL', KEYS[3], tag)
  if not mine or not score or tonumber(mine) ~= tonumber(score) then return 0 end
end
if ARGV[7] ~= '' and score and tonumber(score) > tonumber(ARGV[7]) then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], tag) ~= ARGV[2] then return 0 end
if redis.call('HDEL', KEYS[1], tag) == 0 then return 0 end
redis.call('ZREM', KEYS[2], tag)
for i = 9, #ARGV do
  if ARGV[4] == 'front' then
    redis.call('RPUSH', ARGV[i], ARGV[3])
  elseif ARGV[4] == 'back' then
    redis.call('LPUSH', ARGV[i], ARGV[3])
  else
    redis.call('ZADD', KEYS[4], ARGV[5], ARGV[8])
  end
end
return 1
"#;

/// Moves due delayed messages to the back of their lists. KEYS: delayed. ARGV: now (ms).
pub(super) const PROMOTE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500)
for _, member in ipairs(due) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local item = cjson.decode(member)
    redis.call('LPUSH', item[1], item[2])
  end
end
return #due
"#;

/// Puts parked (delayed) messages back on their lists before they are due: what a stopping
/// worker parked goes where any worker, Python or Rust, finds it. KEYS: delayed. ARGV: the
/// members.
pub(super) const UNPARK: &str = r#"
local n = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    local item = cjson.decode(ARGV[i])
    redis.call('LPUSH', item[1], item[2])
    n = n + 1
  end
end
return n
"#;

/// Gives back what a blocking pop moved into a holding list: each message goes back to the
/// front of the list it came from, in its original order. KEYS: holding list, source list.
pub(super) const GIVE_BACK: &str = r#"
local n = 0
while true do
  local m = redis.call('LPOP', KEYS[1])
  if not m then break end
  redis.call('RPUSH', KEYS[2], m)
  n = n + 1
end
return n
"#;

/// kombu's mutex release: deletes the key only if it still holds our token.
pub(super) const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The scripts, loaded once per broker.
pub(super) struct Scripts {
    pub take: redis::Script,
    pub renew: redis::Script,
    pub restore: redis::Script,
    pub promote: redis::Script,
    pub unpark: redis::Script,
    pub give_back: redis::Script,
    pub release: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            take: redis::Script::new(TAKE),
            renew: redis::Script::new(RENEW),
            restore: redis::Script::new(RESTORE),
            promote: redis::Script::new(PROMOTE),
            unpark: redis::Script::new(UNPARK),
            give_back: redis::Script::new(GIVE_BACK),
            release: redis::Script::new(RELEASE),
        }
    }
}
