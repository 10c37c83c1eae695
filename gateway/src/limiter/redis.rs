//! Redis-compatible counter store: one atomic Lua script per operation.
//!
//! Each operation is one `EVALSHA` (redis-rs [`Script`] sends `EVALSHA`, and
//! on `NOSCRIPT` — a fresh or restarted server — loads the script and
//! retries once). Every key a script touches is passed in `KEYS` and shares
//! one hash tag (see [`super::keys`]), so the scripts also run on Redis
//! Cluster. Every key written gets a TTL in the same script that writes it:
//! a counter when `INCRBY` creates it (its name holds its window, so the
//! first TTL, the window's end plus [`TTL_SLACK_MS`], is the right one and
//! later writes need not repeat it), the in-flight set whenever its TTL
//! would no longer cover the lease just added plus the settle grace
//! ([`SETTLE_GRACE_MS`]: expired records are kept that long, so that their
//! end still settles them). Only `PEXPIRE` without
//! options and `PTTL` are used, so Redis 6 and Garnet run the scripts too.
//!
//! Times come from the caller (`now_ms`), never from the server clock, so
//! every gateway instance agrees on window boundaries with its own clock
//! and tests can drive time with a `ManualClock`. TTLs are therefore set
//! relative (`PEXPIRE`), computed from the caller's time.
//!
//! Three connection modes sit behind [`RedisStore`]; see [`RedisMode`] and
//! docs/LIMITER.md for the measurements that chose the default. On Redis
//! Cluster ([`RedisStore::connect_cluster`]) redis-rs' cluster client routes
//! each `EVALSHA` by its first key — every key of a call shares that key's
//! hash tag, so the whole script runs on the one master owning the slot —
//! follows MOVED/ASK redirections and re-reads the slot map on failover.
//!
//! Not every Redis-compatible server runs scripts atomically (Garnet only
//! with `--lua --lua-transaction-mode`): [`RedisStore::check_server`] finds
//! out at startup what it can and says what it found.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{AsyncConnectionConfig, RedisError, Script, ScriptInvocation, Value};

use super::keys::{Keys, DEFAULT_PREFIX};
use super::wallet::{
    decode_draws, encode_draws, Charged, OutboxItem, OutboxOp, Unended, WalletInit, WalletOp,
    WalletSnapshot, WALLET_TTL_MS,
};
use super::{
    AttemptOutcome, AttemptRequest, CounterStore, EndRequest, KeyScope, RenewRequest, StoreError,
    Usage, UsageRequest, Verdict, SETTLE_GRACE_MS,
};
use crate::catalog::{RequestCharge, UsageEvent};
use crate::plans::WindowLen;

/// Keys outlive their window by this much, so that a gateway whose clock
/// runs slightly behind still finds the counter of a window that has just
/// ended by another instance's clock.
pub const TTL_SLACK_MS: u64 = 5_000;

/// The wallet functions the credit parts of the scripts share (see
/// `limiter::wallet`, which the in-process store runs). A wallet is a hash:
/// `#v` the catalog credit version it was loaded at, `b:<block>` a block
/// as `remaining:expiry ms (0: never):order`. Each admission's draws are
/// kept until its end in the account's admissions hash, apart, so that
/// reading the blocks does not read every request in flight. Numbers are
/// formatted with `%.0f`: Lua's default `tostring` keeps 14 digits, and
/// amounts have up to 16.
const WALLET_LUA: &str = r#"
local function fmt(x)
  return string.format('%.0f', x)
end
-- The unexpired blocks in drain order (expired ones are deleted), their
-- balance, and whether the wallet is loaded.
local function wallet_blocks(key, now)
  local raw = redis.call('HGETALL', key)
  if #raw == 0 then
    return {}, 0, false
  end
  local blocks, balance = {}, 0
  for i = 1, #raw, 2 do
    local f = raw[i]
    if string.sub(f, 1, 2) == 'b:' then
      local rem, rest, exp, ord = string.match(raw[i + 1], '^(%d+)(:(%d+):(%d+))$')
      rem, exp, ord = tonumber(rem), tonumber(exp), tonumber(ord)
      if exp ~= 0 and exp <= now then
        redis.call('HDEL', key, f)
      else
        -- rest (`:expiry:order`) is written back as it was read.
        blocks[#blocks + 1] = {f, rem, exp, ord, rest}
        balance = balance + rem
      end
    end
  end
  if #blocks > 1 then
  table.sort(blocks, function(a, b)
    local ea = a[3] == 0 and math.huge or a[3]
    local eb = b[3] == 0 and math.huge or b[3]
    if ea ~= eb then
      return ea < eb
    end
    return a[4] < b[4]
  end)
  end
  return blocks, balance, true
end
-- Take up to amount in drain order: what was taken and the draws
-- (`id=n;id=n`).
local function wallet_draw(key, blocks, amount)
  local left, parts = amount, {}
  for _, b in ipairs(blocks) do
    if left <= 0 then
      break
    end
    local take = math.min(b[2], left)
    if take > 0 then
      b[2] = b[2] - take
      left = left - take
      redis.call('HSET', key, b[1], fmt(b[2]) .. b[5])
      parts[#parts + 1] = string.sub(b[1], 3) .. '=' .. fmt(take)
    end
  end
  return amount - left, table.concat(parts, ';')
end
-- The total of draws (`id=n;id=n`).
local function draws_total(d)
  local total = 0
  for n in string.gmatch(d, '=(%d+)') do
    total = total + tonumber(n)
  end
  return total
end
-- Add draws to the blocks still held (sign 1: give back), or take them
-- (sign -1: hold back, at most what a block has).
local function wallet_adjust(key, draws, sign)
  for id, n in string.gmatch(draws, '([^;=]+)=(%d+)') do
    local v = redis.call('HGET', key, 'b:' .. id)
    if v then
      local rem, rest = string.match(v, '^(%d+)(:.*)$')
      local left = math.max(tonumber(rem) + sign * tonumber(n), 0)
      redis.call('HSET', key, 'b:' .. id, fmt(left) .. rest)
    end
  end
end
"#;

/// Admit or deny. KEYS[1] in-flight zset, KEYS[1+i] window i's counter;
/// with credits also the account's wallet and outbox.
/// ARGV: now, request id, max concurrent, lease expiry ms, slack ms, settle
/// grace ms, then per window: limit, amount, ttl ms; with credits then the
/// amount, the balance threshold, the endpoint (for the ledger) and the
/// admitting gateway's instance id.
/// Returns {verdict, window index (1-based, 0 if none), in flight, used...,
/// [balance, draws]} with verdict 0 admitted, 1 window full, 2 concurrency
/// full, 3 duplicate, 4 wallet not loaded, 5 balance too low.
/// Nothing is written unless admitted. Public for benchmarks that load it
/// into `redis-benchmark`.
pub const ATTEMPT_LUA: &str = r#"
local now = tonumber(ARGV[1])
local id = ARGV[2]
local max_conc = tonumber(ARGV[3])
local expiry = tonumber(ARGV[4])
local slack = tonumber(ARGV[5])
local grace = tonumber(ARGV[6])
-- Without credits: 1 + n keys and 6 + 3n arguments; with: 4 + n and
-- 10 + 3n.
local credits = #ARGV - 6 ~= 3 * (#KEYS - 1)
local n = credits and #KEYS - 4 or #KEYS - 1
local used = {}
for i = 1, n do
  used[i] = redis.call('GET', KEYS[i + 1]) or 0
end
local live = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')
local verdict, at = 0, 0
-- A live duplicate would be one of the live records.
local score = live > 0 and redis.call('ZSCORE', KEYS[1], id)
if score and tonumber(score) > now then
  verdict = 3
else
  for i = 1, n do
    local limit = tonumber(ARGV[4 + 3 * i])
    local amount = tonumber(ARGV[5 + 3 * i])
    if tonumber(used[i]) + math.max(amount, 1) > limit then
      verdict, at = 1, i
      break
    end
  end
  if verdict == 0 and max_conc > 0 and live >= max_conc then
    verdict = 2
  end
end
local wallet, outbox, blocks, balance
if verdict == 0 and credits then
  wallet, outbox = KEYS[n + 2], KEYS[n + 3]
  local loaded
  blocks, balance, loaded = wallet_blocks(wallet, now)
  if not loaded then
    verdict = 4
  elseif balance < tonumber(ARGV[8 + 3 * n]) or balance < tonumber(ARGV[7 + 3 * n]) then
    verdict = 5
  end
end
local draws = ''
if verdict == 0 and credits then
  local amount = tonumber(ARGV[7 + 3 * n])
  if amount > 0 then
    local taken
    taken, draws = wallet_draw(wallet, blocks, amount)
    balance = balance - taken
    -- Who admitted it, what it drew, where: until its end, which records
    -- the charge (one ledger row with the per-unit charge) or gives the
    -- draws back; or the reaper, should its gateway die first. A wallet
    -- loaded meanwhile holds these draws back. Kept as long as an end may
    -- still settle (the lease keeper extends it).
    local adm = KEYS[n + 4]
    redis.call('HSET', adm, id, ARGV[10 + 3 * n] .. '|' .. draws .. '|' .. ARGV[9 + 3 * n])
    if redis.call('PTTL', adm) < grace then
      redis.call('PEXPIRE', adm, 2 * grace)
    end
  end
end
if verdict == 0 then
  for i = 1, n do
    local amount = ARGV[5 + 3 * i]
    if amount ~= '0' then
      used[i] = redis.call('INCRBY', KEYS[i + 1], amount)
      -- Equal to the amount: this INCRBY created the key (or found the 0
      -- a give-back left, where a fresh TTL is harmless).
      if used[i] == tonumber(amount) then
        redis.call('PEXPIRE', KEYS[i + 1], ARGV[6 + 3 * i])
      end
    end
  end
  -- Expired records are kept for the grace (an end still settles them);
  -- past it they go.
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - grace)
  redis.call('ZADD', KEYS[1], ARGV[4], id)
  -- The set must live as long as its longest lease plus the grace plus
  -- the slack. With nothing live, every record left has expired and needs
  -- at most grace + slack, and the set may be new (no TTL): set it. Else
  -- its TTL already covers the older leases (every write keeps it so), and
  -- is extended only if it falls short of this one; by one lease more than
  -- needed, so that a busy set pays one PTTL per admission and one PEXPIRE
  -- per lease.
  local keep = expiry - now + grace + slack
  if live == 0 or redis.call('PTTL', KEYS[1]) < keep then
    redis.call('PEXPIRE', KEYS[1], keep + expiry - now)
  end
  live = live + 1
end
local out = {verdict, at, live}
for i = 1, n do
  out[3 + i] = used[i]
end
if credits then
  out[4 + n] = balance or 0
  out[5 + n] = draws
end
return out
"#;

/// End a request. KEYS[1] in-flight zset; per settlement i:
/// KEYS[2i] counter of the current window, KEYS[2i+1] counter of the
/// admission window; with credits then the wallet, the outbox and the
/// unended admissions. ARGV: now, request id, settle grace ms, then per
/// settlement: units to add, units to give back, ttl ms of the current
/// window's counter; with credits or a usage record then the per-unit
/// charge, 1 to refund the admission charge (else 0), the endpoint, the
/// usage record (JSON; empty for none) and what the admission drew as the
/// attempt answered (`<total>|<draws>`; empty: read it from the account's
/// unended admissions). Returns 1 if the request's
/// record was there, live or expired less than the grace ago (and settles
/// windows, the per-unit charge and the usage record only then). The
/// admission's charge is recorded (or given back) whenever it is still
/// unended: with the per-unit charge as one ledger entry `req:<id>` (the
/// usage record carries it when there is one, else a ledger row), or,
/// when the wallet was dropped meanwhile, as `adm:<id>` beside an
/// undecided `use:<id>`.
const END_LUA: &str = r#"
local now = tonumber(ARGV[1])
local id = ARGV[2]
-- Without credits or usage: 1 + 2n keys and 3 + 3n arguments; with: 4 + 2n
-- and 8 + 3n.
local credits = (#ARGV - 3) % 3 ~= 0
local n = credits and (#KEYS - 4) / 2 or (#KEYS - 1) / 2
local score = redis.call('ZSCORE', KEYS[1], id)
if score then
  redis.call('ZREM', KEYS[1], id)
end
-- The record is there, live or expired less than the grace ago: settle.
local settles = score and tonumber(score) + tonumber(ARGV[3]) > now
if credits then
  local wallet, outbox, adm = KEYS[2 * n + 2], KEYS[2 * n + 3], KEYS[2 * n + 4]
  -- The admission's draws are recorded now, with the per-unit charge, as
  -- one ledger row (or given back when nothing was served) -- also when
  -- the record is gone, so an admission is never left uncharged.
  local adm_draws, adm_taken = '', 0
  local given = ARGV[8 + 3 * n]
  local admitted
  if given ~= '' then
    -- The gateway says what the admission drew (`total|draws`): the
    -- record need not be read back, only taken (once).
    admitted = redis.call('HDEL', adm, id) == 1
    if admitted then
      local total
      total, adm_draws = string.match(given, '^(%d+)|(.*)$')
      adm_taken = tonumber(total)
    end
  else
    local record = redis.call('HGET', adm, id)
    admitted = record ~= false
    if admitted then
      redis.call('HDEL', adm, id)
      adm_draws = string.match(record, '^[^|]*|([^|]*)')
      adm_taken = draws_total(adm_draws)
    end
  end
  local charge = settles and tonumber(ARGV[4 + 3 * n]) or 0
  local usage = settles and ARGV[7 + 3 * n] ~= '' and ARGV[7 + 3 * n]
  local entry = {}
  local taken = 0
  if ARGV[5 + 3 * n] == '1' then
    wallet_adjust(wallet, adm_draws, 1)
  elseif admitted or charge > 0 then
    local blocks, balance, loaded = nil, 0, true
    if charge > 0 then
      blocks, balance, loaded = wallet_blocks(wallet, now)
    end
    if loaded then
      local unit_draws = ''
      if charge > 0 then
        taken, unit_draws = wallet_draw(wallet, blocks, charge)
      end
      -- Both lists, one after the other: the gateway merges a block
      -- named twice (decode_draws), which costs far less there.
      local draws = adm_draws
      if unit_draws ~= '' then
        draws = adm_draws == '' and unit_draws or adm_draws .. ';' .. unit_draws
      end
      if usage then
        -- The usage record carries the charge: one row for both.
        entry[#entry + 1] = 'h'
        entry[#entry + 1] = 'h\t' .. fmt(adm_taken + charge) .. '\t' .. fmt(adm_taken + taken)
          .. '\t' .. draws .. '\t' .. usage
        usage = false
      else
        entry[#entry + 1] = 'c'
        entry[#entry + 1] = 'c\t' .. ARGV[1] .. '\treq:' .. id .. '\t' .. fmt(adm_taken + charge)
          .. '\t' .. fmt(adm_taken + taken) .. '\t' .. draws .. '\t' .. id .. '\t' .. ARGV[6 + 3 * n]
      end
    else
      -- Not loaded (invalidated meanwhile): the admission as it was
      -- decided; the per-unit charge the catalog decides.
      if admitted then
        entry[#entry + 1] = 'c'
        entry[#entry + 1] = 'c\t' .. ARGV[1] .. '\tadm:' .. id .. '\t' .. fmt(adm_taken)
          .. '\t' .. fmt(adm_taken) .. '\t' .. adm_draws .. '\t' .. id .. '\t' .. ARGV[6 + 3 * n]
      end
      entry[#entry + 1] = 'u'
      entry[#entry + 1] = 'u\t' .. ARGV[1] .. '\tuse:' .. id .. '\t' .. ARGV[4 + 3 * n]
        .. '\t\t\t' .. id .. '\t' .. ARGV[6 + 3 * n]
    end
  end
  -- The usage record (unless it carries the charge), with what the
  -- per-unit charge took.
  if usage then
    entry[#entry + 1] = 'g'
    entry[#entry + 1] = 'g\t' .. fmt(taken) .. '\t' .. usage
  end
  if #entry > 0 then
    redis.call('XADD', outbox, '*', unpack(entry))
  end
end
if not settles then
  return 0
end
for i = 1, n do
  local add = ARGV[3 * i + 1]
  local back = tonumber(ARGV[3 * i + 2])
  if add ~= '0' then
    -- As in the attempt: a TTL when INCRBY created the key.
    if redis.call('INCRBY', KEYS[2 * i], add) == tonumber(add) then
      redis.call('PEXPIRE', KEYS[2 * i], ARGV[3 * i + 3])
    end
  elseif back > 0 then
    local v = redis.call('GET', KEYS[2 * i + 1])
    if v then
      local take = math.min(tonumber(v), back)
      if take > 0 then
        redis.call('DECRBY', KEYS[2 * i + 1], take)
      end
    end
  end
end
return 1
"#;

/// Read usage. KEYS[1] in-flight zset, KEYS[1+i] window i's counter.
/// ARGV: now. Returns {in flight, used...}. Writes nothing.
const USAGE_LUA: &str = r#"
local out = {redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf')}
for i = 2, #KEYS do
  out[i] = redis.call('GET', KEYS[i]) or 0
end
return out
"#;

/// Renew a lease. KEYS[1] in-flight zset, KEYS[2] the account's unended
/// admissions (if any), which must outlive the request: its end records
/// the admission's charge from there. ARGV: now, request id, new lease expiry ms, the keys'
/// minimum TTL ms (lease + grace + slack). Returns 1 if the request was
/// (live) in flight.
const RENEW_LUA: &str = r#"
local now = tonumber(ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
local ttl = tonumber(ARGV[4])
for i = 1, #KEYS do
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"#;

/// The attempt script with the wallet functions it calls.
fn attempt_script() -> String {
    format!("{WALLET_LUA}{ATTEMPT_LUA}")
}

/// The end script with the wallet functions it calls.
fn end_script() -> String {
    format!("{WALLET_LUA}{END_LUA}")
}

/// Load a wallet unless loaded. KEYS[1] wallet, KEYS[2] outbox, KEYS[3]
/// newest version seen, KEYS[4] unended admissions, KEYS[5] outbox
/// acknowledgement count. ARGV: version, ttl ms, the acknowledgement count
/// read before the snapshot, then per block (in drain order): id,
/// remaining, expiry ms (0: never). Returns 0 loaded (now or before), 1
/// outbox not empty (or written since the snapshot was read), 2 snapshot
/// older than an invalidation.
const WALLET_INIT_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('XLEN', KEYS[2]) > 0 then
  return 1
end
-- An outbox batch acknowledged since the snapshot was read: the catalog
-- may have recorded it after the read.
if (redis.call('GET', KEYS[5]) or '0') ~= ARGV[3] then
  return 1
end
if tonumber(redis.call('GET', KEYS[3]) or '0') > tonumber(ARGV[1]) then
  return 2
end
redis.call('HSET', KEYS[1], '#v', ARGV[1])
local order = 0
for i = 4, #ARGV, 3 do
  order = order + 1
  redis.call('HSET', KEYS[1], 'b:' .. ARGV[i], ARGV[i + 1] .. ':' .. ARGV[i + 2] .. ':' .. order)
end
-- Admissions not ended yet drew from an earlier wallet and are not in the
-- catalog: hold their draws back.
local adm = redis.call('HGETALL', KEYS[4])
for i = 2, #adm, 2 do
  wallet_adjust(KEYS[1], string.match(adm[i], '^[^|]*|([^|]*)') or '', -1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"#;

/// Invalidate a wallet. KEYS[1] wallet, KEYS[2] newest version seen.
/// ARGV: version (empty: drop the wallet whatever its version), ttl ms of
/// the version key.
const WALLET_INVALIDATE_LUA: &str = r#"
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
  return 1
end
local v = tonumber(ARGV[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') < v then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
local loaded = redis.call('HGET', KEYS[1], '#v')
if loaded and tonumber(loaded) < v then
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// Refund an admission whose gateway died before its end. KEYS[1]
/// wallet, KEYS[2] outbox, KEYS[3] the in-flight set of the admission's
/// endpoint, KEYS[4] the account's unended admissions. ARGV: now, request
/// id. Only when the admission is still unended and its lease has run out
/// (a live request is never reaped): its draws go back, its record goes (a
/// late end settles nothing). The catalog never saw the charge (an end
/// records it), so nothing goes to the outbox. Returns 1 if reaped.
const WALLET_REAP_LUA: &str = r#"
local now, id = tonumber(ARGV[1]), ARGV[2]
local admitted = redis.call('HGET', KEYS[4], id)
if not admitted then
  return 0
end
local score = redis.call('ZSCORE', KEYS[3], id)
if score and tonumber(score) > now then
  return 0
end
redis.call('HDEL', KEYS[4], id)
redis.call('ZREM', KEYS[3], id)
wallet_adjust(KEYS[1], string.match(admitted, '^[^|]*|([^|]*)'), 1)
return 1
"#;

/// Acknowledge outbox entries. KEYS[1] outbox, KEYS[2] its acknowledgement
/// count (a wallet load compares it with the count it read before the
/// catalog). ARGV: the smallest id not acknowledged (one past the newest
/// entry written to the catalog), the count's TTL ms. The
/// writer reads an outbox from its start, so what it acknowledges is a
/// prefix of the stream: `XTRIM MINID` drops it in one pass (an `XDEL` of
/// each id cost 350 µs per batch of ~400 in the benchmark, a third of the
/// outbox's Redis time). An empty outbox is deleted (the one key without a
/// TTL lives only while it holds entries).
const OUTBOX_ACK_LUA: &str = r#"
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// The smallest stream id above every one of `ids` (`ms-seq`), for `XTRIM
/// MINID`; `None` if one is not a stream id.
fn next_stream_id(ids: &[String]) -> Option<String> {
    let mut newest = (0u64, 0u64);
    for id in ids {
        let (ms, seq) = id.split_once('-')?;
        newest = newest.max((ms.parse().ok()?, seq.parse().ok()?));
    }
    Some(match newest.1.checked_add(1) {
        Some(seq) => format!("{}-{seq}", newest.0),
        None => format!("{}-0", newest.0.checked_add(1)?),
    })
}

/// A wallet's balance. KEYS[1] wallet. ARGV: now. Returns -1 when not
/// loaded.
const WALLET_BALANCE_LUA: &str = r#"
local _, balance, loaded = wallet_blocks(KEYS[1], tonumber(ARGV[1]))
if not loaded then
  return -1
end
return balance
"#;

/// How [`RedisStore`] talks to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One multiplexed connection (pipelining every concurrent request)
    /// held by redis-rs' `ConnectionManager`, which reconnects by itself.
    /// The default: measured fastest. With 64 tasks on the 2-core dev box,
    /// 10.8k-23.6k attempt+end pairs/s against 4.8k-8.9k for a pool of 8
    /// (docs/LIMITER.md): the pool pays a PING per checkout, and the
    /// multiplexed connection pipelines concurrent calls.
    Multiplexed,
    /// A deadpool-redis pool of up to `max_size` connections. deadpool
    /// pings a connection on every checkout, so each operation costs an
    /// extra round trip; broken connections are replaced on checkout.
    Pooled { max_size: usize },
    /// redis-rs' async Redis Cluster client: one multiplexed connection per
    /// node, calls routed by key slot, MOVED/ASK and failover handled by
    /// the client. Set by [`RedisStore::connect_cluster`].
    Cluster,
}

/// Options of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Pool or multiplexed connection (default multiplexed).
    pub mode: RedisMode,
    /// Prefix of every key (default `pg:`); tests use a unique one.
    pub key_prefix: String,
    /// A connection attempt gives up after this long.
    pub connect_timeout: Duration,
    /// A reply that takes longer fails the call and (multiplexed mode)
    /// makes the connection reconnect, so a dead server is noticed even
    /// when no TCP reset arrives.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            mode: RedisMode::Multiplexed,
            key_prefix: DEFAULT_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(500),
        }
    }
}

enum Conn {
    Multiplexed(ConnectionManager),
    Pooled(deadpool_redis::Pool),
    // Boxed: the cluster handle is several times larger than the others.
    Cluster(Box<ClusterConnection>),
}

/// The Redis-compatible [`CounterStore`] (Redis >= 6, Valkey; Garnet with
/// `--lua --lua-transaction-mode`).
pub struct RedisStore {
    conn: Conn,
    mode: RedisMode,
    response_timeout: Duration,
    keys: Keys,
    attempt: Script,
    end: Script,
    usage: Script,
    renew: Script,
    wallet_init: Script,
    wallet_invalidate: Script,
    wallet_balance: Script,
    wallet_reap: Script,
    outbox_ack: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("mode", &self.mode)
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on `url` (`redis://[user:pass@]host:port[/db]`) with default
    /// options. Connects lazily: this fails only on a malformed URL, and a
    /// store created while Redis is down starts working when it is back.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// A store on `url` with `options`; lazy like [`RedisStore::connect`].
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        if options.mode == RedisMode::Cluster {
            return Self::connect_cluster(&[url], options).await;
        }
        let bad_url = |e: RedisError| StoreError::Unavailable(format!("bad redis url: {e}"));
        let conn = match options.mode {
            RedisMode::Multiplexed => {
                let client = redis::Client::open(url).map_err(bad_url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(Some(options.response_timeout))
                    // Keep retrying a lost server for a while; after that the
                    // next failed call starts a new round of retries. The
                    // delay between retries is what a returning server waits
                    // to be noticed, so it is capped well under SPEC §9's
                    // "recovers by itself" budget of 1 s (measured in
                    // tests/suite/reliability.rs).
                    .set_max_delay(Duration::from_millis(400));
                Conn::Multiplexed(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(bad_url)?,
                )
            }
            RedisMode::Pooled { max_size } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(Some(options.response_timeout));
                let manager =
                    deadpool_redis::Manager::new_with_config(url, config).map_err(bad_url)?;
                let pool = deadpool_redis::Pool::builder(manager)
                    .max_size(max_size.max(1))
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    // No wait limit of its own: a checkout waits for a call
                    // to finish, and every call is bounded by the connect
                    // and response timeouts (and the limiter's own timeout).
                    // A wait limit would fail bursts that queue briefly.
                    .wait_timeout(None)
                    .create_timeout(Some(options.connect_timeout))
                    .recycle_timeout(Some(options.response_timeout))
                    .build()
                    .map_err(|e| StoreError::Unavailable(format!("redis pool: {e}")))?;
                Conn::Pooled(pool)
            }
            RedisMode::Cluster => {
                return Err(StoreError::Unavailable(
                    "a Redis Cluster is opened with RedisStore::connect_cluster".into(),
                ))
            }
        };
        Ok(Self::with_conn(conn, &options))
    }

    /// A store on the Redis Cluster that `nodes` belong to (any reachable
    /// subset of its nodes; the client discovers the rest from the slot
    /// map). `options.mode` is ignored. Lazy like [`RedisStore::connect`]:
    /// the nodes are contacted on the first call, and a cluster that is
    /// down then is retried on later calls.
    pub async fn connect_cluster(
        nodes: &[impl AsRef<str>],
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        if nodes.is_empty() {
            return Err(StoreError::Unavailable(
                "redis cluster: no node urls given".into(),
            ));
        }
        let client = ClusterClientBuilder::new(nodes.iter().map(|n| n.as_ref()))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("bad redis cluster url: {e}")))?;
        let config = ClusterConfig::new()
            .set_connection_timeout(options.connect_timeout)
            .set_response_timeout(options.response_timeout);
        let conn = client.get_pending_async_connection_with_config(config);
        Ok(Self::with_conn(
            Conn::Cluster(Box::new(conn)),
            &RedisOptions {
                mode: RedisMode::Cluster,
                ..options
            },
        ))
    }

    fn with_conn(conn: Conn, options: &RedisOptions) -> Self {
        RedisStore {
            conn,
            mode: options.mode,
            response_timeout: options.response_timeout,
            keys: Keys::new(&options.key_prefix),
            attempt: Script::new(&attempt_script()),
            end: Script::new(&end_script()),
            usage: Script::new(USAGE_LUA),
            renew: Script::new(RENEW_LUA),
            wallet_init: Script::new(&format!("{WALLET_LUA}{WALLET_INIT_LUA}")),
            wallet_invalidate: Script::new(WALLET_INVALIDATE_LUA),
            wallet_balance: Script::new(&format!("{WALLET_LUA}{WALLET_BALANCE_LUA}")),
            wallet_reap: Script::new(&format!("{WALLET_LUA}{WALLET_REAP_LUA}")),
            outbox_ack: Script::new(OUTBOX_ACK_LUA),
        }
    }

    /// The key names this store uses.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The connection mode.
    pub fn mode(&self) -> RedisMode {
        self.mode
    }

    /// Check that Redis answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("PING");
        let cmd = &mut cmd;
        match &self.conn {
            Conn::Multiplexed(m) => {
                let mut c = m.clone();
                cmd.query_async::<()>(&mut c).await.map_err(map_err)
            }
            Conn::Pooled(p) => {
                let mut c = p.get().await.map_err(map_pool_err)?;
                cmd.query_async::<()>(&mut c).await.map_err(map_err)
            }
            // The cluster client sends PING to every master and succeeds
            // only if all answer: a store with a dead master is not ready.
            Conn::Cluster(c) => {
                let mut c = ClusterConnection::clone(c);
                cmd.query_async::<()>(&mut c).await.map_err(map_err)
            }
        }
    }

    /// Find out, once at startup, whether the server runs our scripts
    /// atomically. Reads `INFO server` (on a cluster, from every master)
    /// and loads the scripts (`SCRIPT LOAD`, on a cluster on every node,
    /// which also saves the first calls a `NOSCRIPT` round trip). Fails
    /// only when the server cannot be reached; everything else is in the
    /// report, for the caller to log.
    pub async fn check_server(&self) -> Result<ServerReport, StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let info_reply = match &self.conn {
            Conn::Cluster(c) => {
                let mut c = ClusterConnection::clone(c);
                let all_masters = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::Special),
                ));
                c.route_command(info, all_masters).await.map_err(map_err)?
            }
            _ => self.query(&info).await?,
        };
        let mut infos = Vec::new();
        collect_text(&info_reply, &mut infos);
        let mut load_error = None;
        for script in [
            &attempt_script(),
            &end_script(),
            USAGE_LUA,
            RENEW_LUA,
            &format!("{WALLET_LUA}{WALLET_INIT_LUA}"),
            WALLET_INVALIDATE_LUA,
            &format!("{WALLET_LUA}{WALLET_BALANCE_LUA}"),
            &format!("{WALLET_LUA}{WALLET_REAP_LUA}"),
            OUTBOX_ACK_LUA,
        ] {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script);
            match self.query(&load).await {
                Ok(_) => {}
                Err(StoreError::Protocol(e)) => {
                    load_error = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(assess_server(&infos, load_error.as_deref()))
    }

    /// Run one command on whatever connection this store has.
    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        match &self.conn {
            Conn::Multiplexed(m) => {
                let mut c = m.clone();
                cmd.query_async(&mut c).await.map_err(map_err)
            }
            Conn::Pooled(p) => {
                let mut c = p.get().await.map_err(map_pool_err)?;
                cmd.query_async(&mut c).await.map_err(map_err)
            }
            Conn::Cluster(c) => {
                let mut c = ClusterConnection::clone(c);
                cmd.query_async(&mut c).await.map_err(map_err)
            }
        }
    }

    async fn run(&self, inv: &ScriptInvocation<'_>) -> Result<Value, StoreError> {
        match &self.conn {
            Conn::Multiplexed(m) => {
                // Cloning a ConnectionManager is cheap: clones share the
                // one multiplexed connection.
                let mut c = m.clone();
                self.invoke(inv, &mut c).await
            }
            Conn::Pooled(p) => {
                let mut c = p.get().await.map_err(map_pool_err)?;
                self.invoke(inv, &mut c).await
            }
            // Clones share the node connections. `EVALSHA` routes by its
            // first key; `SCRIPT LOAD` after a NOSCRIPT goes to every node.
            Conn::Cluster(c) => {
                let mut c = ClusterConnection::clone(c);
                self.invoke(inv, &mut c).await
            }
        }
    }

    async fn invoke(
        &self,
        inv: &ScriptInvocation<'_>,
        c: &mut impl ConnectionLike,
    ) -> Result<Value, StoreError> {
        inv.invoke_async::<Value>(c).await.map_err(|e| {
            // A reply that did not come in time is a timeout, not an
            // outage: the script may still have run (the limiter then
            // releases what it may have taken).
            if e.is_timeout() {
                StoreError::Timeout(self.response_timeout)
            } else {
                map_err(e)
            }
        })
    }
}

/// What [`RedisStore::check_server`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerReport {
    /// The servers, e.g. `redis 7.0.15` or `garnet 1.0.44` (one per
    /// cluster master, duplicates removed).
    pub servers: Vec<String>,
    /// Scripts are not atomic or do not run at all: limits can overshoot
    /// or every call fails. Log at error level.
    pub problems: Vec<String>,
    /// Things that could not be verified or are outside what plangate is
    /// tested on. Log at warn level.
    pub warnings: Vec<String>,
}

/// Judge `INFO server` replies (one per node) and the outcome of loading
/// the scripts (`Some(error)` if the server refused). Pure, for tests.
pub fn assess_server(infos: &[String], script_load_error: Option<&str>) -> ServerReport {
    let mut report = ServerReport::default();
    let mut garnet = false;
    for info in infos {
        let field = |name: &str| {
            info.lines().find_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(str::to_owned)
            })
        };
        // Valkey and Garnet also report a `redis_version` for
        // compatibility: their own fields decide.
        let (name, version) = if let Some(v) = field("garnet_version") {
            garnet = true;
            ("garnet", v)
        } else if let Some(v) = field("valkey_version") {
            ("valkey", v)
        } else if let Some(v) = field("dragonfly_version") {
            ("dragonfly", v)
        } else if let Some(v) = field("redis_version") {
            let name = match field("server_name").as_deref() {
                Some("valkey") => "valkey",
                _ => "redis",
            };
            (name, v)
        } else {
            report.warnings.push(
                "the counter store did not identify itself in INFO server; plangate is tested \
                 on Redis >= 6, Valkey and Garnet (--lua --lua-transaction-mode)"
                    .into(),
            );
            continue;
        };
        let server = format!("{name} {version}");
        if name == "redis" {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok());
            if major.is_some_and(|m| m < 6) {
                report.warnings.push(format!(
                    "{server}: plangate is tested on Redis >= 6; upgrade the counter store"
                ));
            }
        }
        if !report.servers.contains(&server) {
            report.servers.push(server);
        }
    }
    match (script_load_error, garnet) {
        (Some(e), true) => report.problems.push(format!(
            "Garnet refused to load the limiter's Lua scripts ({e}): start Garnet with \
             `--lua --lua-transaction-mode`. Until then every counter call fails and \
             on_store_error decides (open: nothing is limited; closed: every request gets 503)"
        )),
        (Some(e), false) => report.problems.push(format!(
            "the counter store refused to load the limiter's Lua scripts ({e}): every counter \
             call will fail and on_store_error decides (open: nothing is limited; closed: \
             every request gets 503)"
        )),
        (None, true) => report.warnings.push(
            "Garnet runs Lua scripts atomically only when started with \
             `--lua-transaction-mode`, which a client cannot verify: without it concurrent \
             requests can overshoot limits. Make sure the flag is set"
                .into(),
        ),
        (None, false) => {}
    }
    report
}

/// Every text blob in a reply: a plain `INFO` reply is one string; the
/// cluster client answers a multi-node `INFO` with a map from node
/// address to that node's reply.
fn collect_text(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => out.push(s.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|i| collect_text(i, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_text(v, out)),
        _ => {}
    }
}

impl RedisStore {
    /// Every key matching `pattern` of `kind` (a Redis type name).
    async fn scan(&self, pattern: &str, kind: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        match &self.conn {
            Conn::Cluster(c) => {
                // No cluster-wide SCAN in the client: KEYS on every master.
                // Run at start-up and every few minutes, not per request.
                let mut c = ClusterConnection::clone(c);
                let mut cmd = redis::cmd("KEYS");
                cmd.arg(pattern);
                let all_masters = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::CombineArrays),
                ));
                let v = c.route_command(cmd, all_masters).await.map_err(map_err)?;
                collect_text(&v, &mut keys);
            }
            _ => {
                let mut cursor = 0u64;
                loop {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("TYPE")
                        .arg(kind);
                    let reply = array("scan", self.query(&cmd).await?)?;
                    let [next, batch] = <[Value; 2]>::try_from(reply)
                        .map_err(|_| StoreError::Protocol("scan reply".into()))?;
                    cursor = match &next {
                        Value::BulkString(b) => std::str::from_utf8(b)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| bad_reply("scan cursor", &next))?,
                        v => as_u64(v).ok_or_else(|| bad_reply("scan cursor", v))?,
                    };
                    collect_text(&batch, &mut keys);
                    if cursor == 0 {
                        break;
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// One `XRANGE` entry: `[id, [field, op, field, op, ...]]`, each op as
/// the scripts pack it (tab-separated, the endpoint last since it may hold
/// anything): `c|u <t> <key> <requested> <deducted> <draws> <request id>
/// <endpoint>` for a decided (`c`) or undecided (`u`) charge, `r <t>
/// <key>` for a refund, `g <credits> <usage JSON>` for a usage record,
/// `h <requested> <deducted> <draws> <usage JSON>` for a usage record
/// that carries its request's charge (one row for both). An
/// admission writes one op (field `e`); an end writes its refund or
/// per-unit charge and its usage record as one entry (fields `r`, `c`,
/// `g`): one item each, in field order, sharing the entry's id.
fn parse_outbox_entry(v: &Value, out: &mut Vec<OutboxItem>) -> Result<(), StoreError> {
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let bad = || bad_reply("outbox entry", v);
    let Value::Array(parts) = v else {
        return Err(bad());
    };
    let [id, fields] = parts.as_slice() else {
        return Err(bad());
    };
    let id = text(id).ok_or_else(bad)?;
    let fields = match fields {
        Value::Array(f) if !f.is_empty() && f.len() % 2 == 0 => f,
        _ => return Err(bad()),
    };
    for pair in fields.chunks_exact(2) {
        let entry = text(&pair[1]).ok_or_else(bad)?;
        let op = parse_outbox_op(&entry).ok_or_else(bad)?;
        out.push(OutboxItem { id: id.clone(), op });
    }
    Ok(())
}

/// The op of a packed outbox entry: a credit operation, or `g <per-unit
/// credits taken> <usage record JSON>`.
fn parse_outbox_op(entry: &str) -> Option<OutboxOp> {
    if let Some(rest) = entry.strip_prefix("g\t") {
        let (taken, json) = rest.split_once('\t')?;
        let mut usage: UsageEvent = serde_json::from_str(json).ok()?;
        usage.credits = usage.credits.saturating_add(taken.parse().ok()?);
        return Some(OutboxOp::Usage(Box::new(usage)));
    }
    if let Some(rest) = entry.strip_prefix("h\t") {
        let mut f = rest.splitn(4, '\t');
        let requested = f.next()?.parse().ok()?;
        let deducted = f.next()?.parse().ok()?;
        let draws = decode_draws(f.next()?)?;
        let mut usage: UsageEvent = serde_json::from_str(f.next()?).ok()?;
        usage.credits = deducted;
        usage.charge = Some(RequestCharge { requested, draws });
        return Some(OutboxOp::Usage(Box::new(usage)));
    }
    parse_credit_op(entry).map(OutboxOp::Credit)
}

/// A packed credit operation (see [`parse_outbox_entry`]).
fn parse_credit_op(entry: &str) -> Option<WalletOp> {
    let mut f = entry.splitn(8, '\t');
    let kind = f.next()?;
    let at_ms = f.next()?.parse().ok()?;
    let key = f.next()?.to_owned();
    if kind == "r" {
        return Some(WalletOp::Refund { key, at_ms });
    }
    let requested = f.next()?.parse().ok()?;
    let deducted = f.next()?;
    let draws = decode_draws(f.next()?)?;
    let request_id = f.next()?.to_owned();
    let endpoint = f.next()?.to_owned();
    let deducted = match kind {
        "c" => Some(deducted.parse().ok()?),
        "u" => None,
        _ => return None,
    };
    Some(WalletOp::Charge {
        key,
        request_id,
        endpoint,
        requested,
        deducted,
        draws,
        at_ms,
    })
}

fn map_err(e: RedisError) -> StoreError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

fn map_pool_err(e: deadpool_redis::PoolError) -> StoreError {
    match e {
        deadpool_redis::PoolError::Backend(e) => map_err(e),
        other => StoreError::Unavailable(format!("redis pool: {other}")),
    }
}

fn bad_reply(what: &str, v: &Value) -> StoreError {
    StoreError::Protocol(format!("unexpected {what} reply from redis: {v:?}"))
}

/// A counter or count from a script reply: an integer, or the string a
/// `GET` returned.
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn array(what: &str, v: Value) -> Result<Vec<Value>, StoreError> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(bad_reply(what, &other)),
    }
}

fn int_list(what: &str, items: &[Value]) -> Result<Vec<u64>, StoreError> {
    items
        .iter()
        .map(|v| as_u64(v).ok_or_else(|| bad_reply(what, v)))
        .collect()
}

fn flag(what: &str, v: Value) -> Result<bool, StoreError> {
    match as_u64(&v) {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        _ => Err(bad_reply(what, &v)),
    }
}

fn count_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// TTL of window counter keys: until the window ends (a calendar month's
/// real end), plus slack.
fn window_ttl_ms(now_ms: u64, len: WindowLen) -> u64 {
    len.reset_ms(now_ms) + TTL_SLACK_MS
}

impl CounterStore for RedisStore {
    async fn attempt(&self, req: &AttemptRequest<'_>) -> Result<AttemptOutcome, StoreError> {
        let mut inv = self.attempt.prepare_invoke();
        inv.key(self.keys.in_flight(req.account, req.endpoint))
            .arg(req.now_ms)
            .arg(req.request_id)
            .arg(req.max_concurrent)
            .arg(req.now_ms.saturating_add(req.lease_ms))
            .arg(TTL_SLACK_MS)
            .arg(SETTLE_GRACE_MS);
        // A key's own windows are more windows of the same script, under
        // the key's counters (with the account's hash tag): admitted with
        // the account's, all or nothing.
        for (i, w) in req.windows.iter().enumerate() {
            let index = w.len.index(req.now_ms);
            let key = KeyScope::of(req.key, req.windows.len(), i);
            inv.key(self.keys.scoped_window(
                req.account,
                key,
                req.endpoint,
                w.len,
                w.unit.as_str(),
                index,
            ))
            .arg(w.limit)
            .arg(w.amount)
            .arg(window_ttl_ms(req.now_ms, w.len));
        }
        if let Some(ask) = req.credits {
            inv.key(self.keys.wallet(req.account))
                .key(self.keys.outbox(req.account))
                .key(self.keys.admissions(req.account))
                .arg(ask.amount)
                .arg(ask.threshold)
                .arg(req.endpoint)
                .arg(ask.instance);
        }
        let mut reply = array("attempt", self.run(&inv).await?)?;
        let credit_fields = if req.credits.is_some() { 2 } else { 0 };
        if reply.len() != 3 + req.windows.len() + credit_fields {
            return Err(StoreError::Protocol(format!(
                "attempt reply has {} fields, expected {}",
                reply.len(),
                3 + req.windows.len() + credit_fields
            )));
        }
        let credits = match req.credits {
            None => None,
            Some(_) => {
                let draws = reply.pop().expect("length checked");
                let draws = match &draws {
                    Value::BulkString(b) => std::str::from_utf8(b).ok(),
                    Value::SimpleString(s) => Some(s.as_str()),
                    _ => None,
                }
                .and_then(decode_draws)
                .ok_or_else(|| bad_reply("attempt draws", &draws))?;
                let balance = reply.pop().expect("length checked");
                let balance =
                    as_u64(&balance).ok_or_else(|| bad_reply("attempt balance", &balance))?;
                Some(Charged { balance, draws })
            }
        };
        let nums = int_list("attempt", &reply)?;
        let verdict = match (nums[0], nums[1]) {
            (0, _) => Verdict::Admitted,
            (1, i) if i >= 1 && i as usize <= req.windows.len() => Verdict::WindowFull {
                index: i as usize - 1,
            },
            (2, _) => Verdict::ConcurrencyFull,
            (3, _) => Verdict::Duplicate,
            (4, _) if credits.is_some() => Verdict::NoWallet,
            (5, _) if credits.is_some() => Verdict::NoCredits,
            (v, i) => {
                return Err(StoreError::Protocol(format!(
                    "attempt reply has verdict {v} / window {i}"
                )))
            }
        };
        let admitted_or_poor = matches!(verdict, Verdict::Admitted | Verdict::NoCredits);
        Ok(AttemptOutcome {
            verdict,
            used: nums[3..].to_vec(),
            in_flight: count_u32(nums[2]),
            credits: credits.filter(|_| admitted_or_poor),
        })
    }

    async fn end(&self, req: &EndRequest<'_>) -> Result<bool, StoreError> {
        let mut inv = self.end.prepare_invoke();
        inv.key(self.keys.in_flight(req.account, req.endpoint))
            .arg(req.now_ms)
            .arg(req.request_id)
            .arg(SETTLE_GRACE_MS);
        for (i, s) in req.settlements.iter().enumerate() {
            let unit = s.unit.as_str();
            let current = s.len.index(req.now_ms);
            let key = KeyScope::of(req.key, req.settlements.len(), i);
            inv.key(
                self.keys
                    .scoped_window(req.account, key, req.endpoint, s.len, unit, current),
            )
            .key(self.keys.scoped_window(
                req.account,
                key,
                req.endpoint,
                s.len,
                unit,
                s.admitted_index,
            ))
            .arg(s.actual.saturating_sub(s.reserved))
            .arg(s.reserved.saturating_sub(s.actual))
            .arg(window_ttl_ms(req.now_ms, s.len));
        }
        if !req.credits.is_empty() || req.usage.is_some() {
            let usage = match req.usage {
                Some(u) => serde_json::to_string(u)
                    .map_err(|e| StoreError::Protocol(format!("usage record: {e}")))?,
                None => String::new(),
            };
            inv.key(self.keys.wallet(req.account))
                .key(self.keys.outbox(req.account))
                .key(self.keys.admissions(req.account))
                .arg(req.credits.charge)
                .arg(if req.credits.refund { "1" } else { "0" })
                .arg(req.endpoint)
                .arg(usage)
                .arg(match req.admission {
                    Some(draws) => {
                        let total: u64 = draws.iter().map(|d| d.credits).sum();
                        format!("{total}|{}", encode_draws(draws))
                    }
                    None => String::new(),
                });
        }
        flag("end", self.run(&inv).await?)
    }

    async fn wallet_init(
        &self,
        account: &str,
        snapshot: &WalletSnapshot,
    ) -> Result<WalletInit, StoreError> {
        let mut inv = self.wallet_init.prepare_invoke();
        inv.key(self.keys.wallet(account))
            .key(self.keys.outbox(account))
            .key(self.keys.wallet_version(account))
            .key(self.keys.admissions(account))
            .key(self.keys.outbox_acks(account))
            .arg(snapshot.version)
            .arg(WALLET_TTL_MS)
            .arg(snapshot.acks);
        for b in &snapshot.blocks {
            inv.arg(&b.id)
                .arg(b.remaining)
                .arg(b.expires_ms.unwrap_or(0));
        }
        let v = self.run(&inv).await?;
        match as_u64(&v) {
            Some(0) => Ok(WalletInit::Loaded),
            Some(1) => Ok(WalletInit::Pending),
            Some(2) => Ok(WalletInit::Stale),
            _ => Err(bad_reply("wallet init", &v)),
        }
    }

    async fn wallet_invalidate(
        &self,
        account: &str,
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut inv = self.wallet_invalidate.prepare_invoke();
        inv.key(self.keys.wallet(account))
            .key(self.keys.wallet_version(account))
            .arg(version.map(|v| v.to_string()).unwrap_or_default())
            .arg(WALLET_TTL_MS);
        self.run(&inv).await.map(|_| ())
    }

    async fn wallet_balance(&self, account: &str, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let mut inv = self.wallet_balance.prepare_invoke();
        inv.key(self.keys.wallet(account)).arg(now_ms);
        match self.run(&inv).await? {
            Value::Int(-1) => Ok(None),
            v => as_u64(&v)
                .map(Some)
                .ok_or_else(|| bad_reply("wallet balance", &v)),
        }
    }

    async fn outbox_read(&self, account: &str, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.outbox(account))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(max);
        let reply = self.query(&cmd).await?;
        let entries = array("outbox", reply)?;
        let mut items = Vec::with_capacity(entries.len() * 2);
        for entry in &entries {
            parse_outbox_entry(entry, &mut items)?;
        }
        Ok(items)
    }

    async fn outbox_ack(&self, account: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let next = next_stream_id(ids)
            .ok_or_else(|| StoreError::Protocol(format!("outbox entry ids {ids:?}")))?;
        let mut inv = self.outbox_ack.prepare_invoke();
        inv.key(self.keys.outbox(account))
            .key(self.keys.outbox_acks(account))
            .arg(next)
            .arg(WALLET_TTL_MS);
        self.run(&inv).await.map(|_| ())
    }

    async fn outbox_acks(&self, account: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.keys.outbox_acks(account));
        match self.query(&cmd).await? {
            Value::Nil => Ok(0),
            v => as_u64(&v).ok_or_else(|| bad_reply("outbox acknowledgements", &v)),
        }
    }

    async fn heartbeat(&self, instance: &str, ttl_ms: u64) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.keys.instance(instance))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms);
        self.query(&cmd).await.map(|_| ())
    }

    async fn instance_alive(&self, instance: &str) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.keys.instance(instance));
        let v = self.query(&cmd).await?;
        Ok(as_u64(&v) == Some(1))
    }

    async fn unended_admissions(&self, account: &str) -> Result<Vec<Unended>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.keys.admissions(account));
        let v = self.query(&cmd).await?;
        let mut fields = Vec::new();
        collect_text(&v, &mut fields);
        Ok(fields
            .chunks_exact(2)
            .filter_map(|kv| {
                let request_id = &kv[0];
                let mut parts = kv[1].splitn(3, '|');
                let instance = parts.next()?;
                let _draws = parts.next()?;
                let endpoint = parts.next()?;
                Some(Unended {
                    request_id: request_id.to_owned(),
                    instance: instance.to_owned(),
                    endpoint: endpoint.to_owned(),
                })
            })
            .collect())
    }

    async fn reap(
        &self,
        account: &str,
        admission: &Unended,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut inv = self.wallet_reap.prepare_invoke();
        inv.key(self.keys.wallet(account))
            .key(self.keys.outbox(account))
            .key(self.keys.in_flight(account, &admission.endpoint))
            .key(self.keys.admissions(account))
            .arg(now_ms)
            .arg(&admission.request_id);
        flag("reap", self.run(&inv).await?)
    }

    async fn reset_windows(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        windows: &[crate::plans::Window],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if windows.is_empty() {
            return Ok(());
        }
        // Every key shares the account's hash tag: one DEL, one slot.
        let mut cmd = redis::cmd("DEL");
        for w in windows {
            cmd.arg(self.keys.scoped_window(
                account,
                key,
                endpoint,
                w.len,
                w.unit.as_str(),
                w.len.index(now_ms),
            ));
        }
        self.query(&cmd).await?;
        Ok(())
    }

    async fn wallet_accounts(&self) -> Result<Vec<String>, StoreError> {
        let keys = self.scan(&self.keys.wallet_pattern(), "hash").await?;
        let mut accounts: Vec<String> = keys
            .iter()
            .filter_map(|k| self.keys.wallet_account(k))
            .collect();
        accounts.sort();
        accounts.dedup();
        Ok(accounts)
    }

    async fn outbox_accounts(&self) -> Result<Vec<String>, StoreError> {
        let keys = self.scan(&self.keys.outbox_pattern(), "stream").await?;
        let mut accounts: Vec<String> = keys
            .iter()
            .filter_map(|k| self.keys.outbox_account(k))
            .collect();
        accounts.sort();
        accounts.dedup();
        Ok(accounts)
    }

    async fn usage(&self, req: &UsageRequest<'_>) -> Result<Usage, StoreError> {
        let mut inv = self.usage.prepare_invoke();
        inv.key(self.keys.in_flight(req.account, req.endpoint))
            .arg(req.now_ms);
        for (i, w) in req.windows.iter().enumerate() {
            let index = w.len.index(req.now_ms);
            let key = KeyScope::of(req.key, req.windows.len(), i);
            inv.key(self.keys.scoped_window(
                req.account,
                key,
                req.endpoint,
                w.len,
                w.unit.as_str(),
                index,
            ));
        }
        let reply = array("usage", self.run(&inv).await?)?;
        let nums = int_list("usage", &reply)?;
        match nums.split_first() {
            Some((&in_flight, used)) if used.len() == req.windows.len() => Ok(Usage {
                used: used.to_vec(),
                in_flight: count_u32(in_flight),
            }),
            _ => Err(StoreError::Protocol(format!(
                "usage reply has {} fields, expected {}",
                nums.len(),
                1 + req.windows.len()
            ))),
        }
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<bool, StoreError> {
        let mut inv = self.renew.prepare_invoke();
        inv.key(self.keys.in_flight(req.account, req.endpoint))
            .key(self.keys.admissions(req.account))
            .arg(req.now_ms)
            .arg(req.request_id)
            .arg(req.now_ms.saturating_add(req.lease_ms))
            .arg(
                req.lease_ms
                    .saturating_add(SETTLE_GRACE_MS)
                    .saturating_add(TTL_SLACK_MS),
            );
        flag("renew", self.run(&inv).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stream_id_is_one_past_the_newest() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            next_stream_id(&ids(&["5-0", "7-3", "7-1"])).as_deref(),
            Some("7-4")
        );
        assert_eq!(
            next_stream_id(&ids(&["9-18446744073709551615"])).as_deref(),
            Some("10-0")
        );
        assert_eq!(next_stream_id(&ids(&["9"])), None);
        assert_eq!(next_stream_id(&ids(&["a-1"])), None);
    }

    fn info(fields: &[&str]) -> String {
        let mut s = String::from("# Server\r\n");
        for f in fields {
            s.push_str(f);
            s.push_str("\r\n");
        }
        s
    }

    #[test]
    fn assess_server_cases() {
        struct Case {
            infos: Vec<String>,
            load_error: Option<&'static str>,
            servers: &'static [&'static str],
            problems: usize,
            warnings: usize,
        }
        let cases = [
            Case {
                infos: vec![info(&["redis_version:7.0.15", "redis_mode:standalone"])],
                load_error: None,
                servers: &["redis 7.0.15"],
                problems: 0,
                warnings: 0,
            },
            Case {
                infos: vec![info(&["redis_version:5.0.7"])],
                load_error: None,
                servers: &["redis 5.0.7"],
                problems: 0,
                warnings: 1,
            },
            Case {
                infos: vec![info(&[
                    "redis_version:7.2.4",
                    "server_name:valkey",
                    "valkey_version:8.0.1",
                ])],
                load_error: None,
                servers: &["valkey 8.0.1"],
                problems: 0,
                warnings: 0,
            },
            // Garnet with Lua: atomic only with --lua-transaction-mode,
            // which cannot be seen from a client.
            Case {
                infos: vec![info(&["garnet_version:1.0.44", "redis_version:7.2.5"])],
                load_error: None,
                servers: &["garnet 1.0.44"],
                problems: 0,
                warnings: 1,
            },
            // Garnet without --lua: every script call fails.
            Case {
                infos: vec![info(&["garnet_version:1.0.44"])],
                load_error: Some("ERR unknown command"),
                servers: &["garnet 1.0.44"],
                problems: 1,
                warnings: 0,
            },
            Case {
                infos: vec![info(&["redis_version:7.0.15"])],
                load_error: Some("NOPERM this user has no permissions"),
                servers: &["redis 7.0.15"],
                problems: 1,
                warnings: 0,
            },
            // Three cluster masters of one version: reported once.
            Case {
                infos: vec![info(&["redis_version:7.0.15"]); 3],
                load_error: None,
                servers: &["redis 7.0.15"],
                problems: 0,
                warnings: 0,
            },
            Case {
                infos: vec![info(&["uptime_in_seconds:5"])],
                load_error: None,
                servers: &[],
                problems: 0,
                warnings: 1,
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let r = assess_server(&c.infos, c.load_error);
            assert_eq!(r.servers, c.servers, "case {i}: {r:?}");
            assert_eq!(r.problems.len(), c.problems, "case {i}: {r:?}");
            assert_eq!(r.warnings.len(), c.warnings, "case {i}: {r:?}");
        }
    }

    #[test]
    fn outbox_entries_parse_as_the_scripts_pack_them() {
        let charge = parse_credit_op("c\t1700\tadm:r1\t5\t3\tqb_1=2;qb_2=1\tr1\tgpt\t4o");
        assert_eq!(
            charge,
            Some(WalletOp::Charge {
                key: "adm:r1".into(),
                request_id: "r1".into(),
                endpoint: "gpt\t4o".into(),
                requested: 5,
                deducted: Some(3),
                draws: decode_draws("qb_1=2;qb_2=1").unwrap(),
                at_ms: 1700,
            })
        );
        let undecided = parse_credit_op("u\t1\tuse:r1\t9\t\t\tr1\te");
        assert!(matches!(
            undecided,
            Some(WalletOp::Charge {
                deducted: None,
                requested: 9,
                ..
            })
        ));
        assert_eq!(
            parse_credit_op("r\t7\tadm:r1"),
            Some(WalletOp::Refund {
                key: "adm:r1".into(),
                at_ms: 7
            })
        );
        // A usage record carrying its request's charge: its credits are
        // what was taken.
        let json = r#"{"request_id":"r1","account_id":"a","key_id":null,"endpoint":"e","route":"/v1/x","units":[],"credits":1,"status":200,"degraded":false,"streamed":false,"cut_short":false,"started_at":"2026-12-07T00:00:00.000Z","ended_at":"2026-12-07T00:00:01.000Z"}"#;
        let Some(OutboxOp::Usage(event)) =
            parse_outbox_op(&format!("h\t9\t4\tqb_1=3;qb_2=1\t{json}"))
        else {
            panic!("h entry unparsed");
        };
        assert_eq!(event.credits, 4);
        assert_eq!(
            event.charge,
            Some(RequestCharge {
                requested: 9,
                draws: decode_draws("qb_1=3;qb_2=1").unwrap(),
            })
        );
        assert!(parse_outbox_op("h\t9\t4\tqb_1=3").is_none());
        for bad in [
            "",
            "x\t1\tk",
            "c\t1\tk\t5",
            "c\tz\tk\t5\t3\t\tr\te",
            "r\t-1\tk",
        ] {
            assert_eq!(parse_credit_op(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cluster_info_map_is_flattened() {
        let reply = Value::Map(vec![
            (
                Value::SimpleString("127.0.0.1:7001".into()),
                Value::BulkString(info(&["redis_version:7.0.15"]).into_bytes()),
            ),
            (
                Value::SimpleString("127.0.0.1:7002".into()),
                Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: info(&["redis_version:7.0.14"]),
                },
            ),
        ]);
        let mut out = Vec::new();
        collect_text(&reply, &mut out);
        let r = assess_server(&out, None);
        assert_eq!(r.servers, ["redis 7.0.15", "redis 7.0.14"]);
    }
}
