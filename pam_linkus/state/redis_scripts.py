"""The Lua scripts of the Redis state store, one per state decision.

Redis runs a script without interleaving any other command, so each script is
one atomic step, whichever host calls it. Conventions:

- ``KEYS`` are the keys a script touches (all named by the caller, so an ACL
  ``~<prefix>*`` covers them); ``ARGV`` carries ``now`` and limits.
- Times come from the caller as Python ``repr`` strings and are stored as
  given. A time the script computes itself is returned as ``%.17g`` (Lua's
  ``tostring`` keeps only 14 digits, which would shorten ``FOREVER`` and the
  fractions of ``now``). Lua's numbers are IEEE doubles, so ``+`` and ``<``
  give exactly what Python gives.
- TTLs are relative to the caller's ``now`` (``EXPIRE``), plus a margin.

Rules that Python writes once in pam_linkus.state.base (``next_lock``,
``email_retry_after``) are either fed in as computed values or re-stated here
line by line; tests/state_contract.py checks the two against each other.
"""

from __future__ import annotations

#: Shared by scripts that record a successful login on the enrollment hash:
#: the method is kept if known (an extension enrolled by hand gets ``-``).
_NOTE_SUCCESS = """
local function note_success(key, method, now)
  redis.call('HSETNX', key, 'method', method)
  redis.call('HSET', key, 'last', now)
end
"""

#: The lock check of the scripts that accept a code of an attempt reserved before
#: (email and recovery codes): only a lock that needs an admin refuses a right
#: code (a temporary lock may have been set by parallel attempts since the
#: reservation; see state.base.StateStore).
_LOCKED = """
local FOREVER = 4.611686018427388e+18
local function locked(fail_key, now)
  local locked_until = redis.call('HGET', fail_key, 'until')
  if locked_until and tonumber(locked_until) >= FOREVER and tonumber(locked_until) > tonumber(now) then
    return locked_until
  end
  return nil
end
"""

#: The failure hash ``fail``: count, until (locked_until), lockc (the count at
#: which the last lock was set: after it expires one attempt is free), last.
#: KEYS: fail
#: ARGV: now, max_failures, lock_at_max, permanent_after, lock_at_permanent, forever, failure_ttl
#: The lock values are base.next_lock's for the two thresholds; the scripts only
#: pick one by the count, and never shorten a lock. A field that is not a number
#: (data written by hand) makes the script fail: StateUnavailable, never a guess.
_FAILURES = """
local function lock_for(count)
  if count >= tonumber(ARGV[4]) then return ARGV[5] end
  if count >= tonumber(ARGV[2]) then return ARGV[3] end
  return '0'
end
local function later(a, b)
  if tonumber(a) >= tonumber(b) then return a end
  return b
end
local function current()
  local f = redis.call('HMGET', KEYS[1], 'count', 'until', 'lockc')
  local count = tonumber(f[1] or '0')
  local lockc = tonumber(f[3] or '0')
  if count == nil or lockc == nil or tonumber(f[2] or '0') == nil then
    return redis.error_reply('malformed failure record')
  end
  return count, (f[2] or '0'), lockc
end
local function save(count, lock, lockc)
  redis.call('HSET', KEYS[1], 'count', count, 'until', lock, 'lockc', lockc, 'last', ARGV[1])
  if tonumber(lock) >= tonumber(ARGV[6]) then
    redis.call('PERSIST', KEYS[1])
  else
    local left = math.max(0, tonumber(lock) - tonumber(ARGV[1]))
    redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[7]) + left))
  end
end
"""

# -> {count, locked_until}; see StateStore.reserve_attempt
RESERVE_ATTEMPT = _FAILURES + """
local count, lock, lockc = current()
if type(count) == 'table' then return count end
if tonumber(lock) > tonumber(ARGV[1]) then return {count, lock} end
if count >= tonumber(ARGV[2]) and count ~= lockc then
  lock = later(lock_for(count), lock)
  save(count, lock, count)
  return {count, lock}
end
save(count + 1, lock, lockc)
return {count + 1, lock}
"""

# -> {count, locked_until}; see StateStore.settle_failure
SETTLE_FAILURE = _FAILURES + """
local count, lock, lockc = current()
if type(count) == 'table' then return count end
if count >= tonumber(ARGV[2]) then
  lock = later(lock_for(count), lock)
  save(count, lock, count)
end
return {count, lock}
"""

# KEYS: fail, totp, enrol
# ARGV: the seven of _FAILURES, then step ('' = no step matched), keep_reserved
#       ('1' / '0'), replay_ttl
# RESERVE_ATTEMPT, then record the step or SETTLE_FAILURE in one step; see
# StateStore.totp_attempt. The code was matched in Python before the script (Lua
# cannot compute it and the secret stays out of Redis): a refused attempt's step
# is ignored here.
# -> {verdict, count, locked_until} with verdict: 0 locked, 1 wrong, 2 replayed,
#    3 reserved, 4 accepted
TOTP_ATTEMPT = _NOTE_SUCCESS + _FAILURES + """
local count, lock, lockc = current()
if type(count) == 'table' then return count end
if tonumber(lock) > tonumber(ARGV[1]) then return {0, count, lock} end
if count >= tonumber(ARGV[2]) and count ~= lockc then
  lock = later(lock_for(count), lock)
  save(count, lock, count)
  return {0, count, lock}
end
local verdict = 1
if ARGV[8] ~= '' then
  local last = redis.call('GET', KEYS[2])
  if not last or tonumber(last) < tonumber(ARGV[8]) then
    redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[10])
    redis.call('DEL', KEYS[1])
    note_success(KEYS[3], 'totp', ARGV[1])
    return {4, 0, '0'}
  end
  verdict = 2
elseif ARGV[9] == '1' then
  save(count + 1, lock, lockc)
  return {3, count + 1, lock}
end
count = count + 1
if count >= tonumber(ARGV[2]) then
  lock = later(lock_for(count), lock)
  lockc = count
end
save(count, lock, lockc)
return {verdict, count, lock}
"""

# KEYS: fail   ARGV: forever   -> 1
SETTLE_SUCCESS = """
local lock = redis.call('HGET', KEYS[1], 'until')
if lock and tonumber(lock) == nil then return redis.error_reply('malformed failure record') end
if not lock or tonumber(lock) < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: cache   ARGV: source, data, now, ttl   (the text and its time in one step)
CACHE_SETTINGS = """
redis.call('HSET', KEYS[1], 'data:' .. ARGV[1], ARGV[2], 'at:' .. ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: every key of the extension, then the host-wide email sends   ARGV: user
# The extension's sends leave the host-wide throttle too, as in SQLite.
FORGET = """
local global = KEYS[#KEYS]
local sends = KEYS[#KEYS - 1]
for _, member in ipairs(redis.call('ZRANGE', sends, 0, -1)) do
  redis.call('ZREM', global, ARGV[1] .. ' ' .. member)
end
for i = 1, #KEYS - 1 do
  redis.call('DEL', KEYS[i])
end
return 1
"""

# -- enrollment record and recovery codes ----------------------------------------------

# KEYS: enrol, totp   ARGV: method, now, step or '', replay_ttl
# The confirmation code's step replaces the replay record (a new secret starts over).
RECORD_ENROLLMENT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'method', ARGV[1], 'since', ARGV[2])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
return 1
"""

# KEYS: enrol, recovery   -> {method, since, last, codes left} (missing fields: nil)
ENROLLMENT = """
local e = redis.call('HMGET', KEYS[1], 'method', 'since', 'last')
return {e[1], e[2], e[3], redis.call('SCARD', KEYS[2])}
"""

# KEYS: recovery, recovery_salt   ARGV: salt, digest...
SET_RECOVERY_CODES = """
redis.call('DEL', KEYS[1], KEYS[2])
if #ARGV > 1 then
  redis.call('SADD', KEYS[1], unpack(ARGV, 2))
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""

# KEYS: fail, recovery, recovery_salt, enrol   ARGV: now, digest
# SREM finds the digest by the set's hash lookup: its time says nothing about
# the code (the digest is a salted scrypt hash of it).
# -> {0, locked_until} | {1} no such code | {2} spent
USE_RECOVERY_CODE = _LOCKED + _NOTE_SUCCESS + """
local lock = locked(KEYS[1], ARGV[1])
if lock then return {0, lock} end
if redis.call('SREM', KEYS[2], ARGV[2]) == 0 then
  return {1}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[1])
note_success(KEYS[4], '-', ARGV[1])
return {2}
"""

# -- grace periods --------------------------------------------------------------------

# KEYS: grace   ARGV: now, rhost, until
# A field is "<until> <started>" (started: the latest right code; a value of only
# "<until>", written before starts were kept, is never honoured by grace_active).
# Drops the extension's expired periods in the same step, keeps a later end,
# and lets the hash live exactly as long as its latest period (a host whose
# clock is behind then asks for a code a little early: the safe side).
START_GRACE = """
local now = tonumber(ARGV[1])
local new_until = ARGV[3]
local latest = tonumber(new_until)
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local u = tonumber(string.match(all[i + 1], '^(%S+)'))
  if u == nil or u <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    if all[i] == ARGV[2] and u > tonumber(new_until) then
      new_until = string.match(all[i + 1], '^(%S+)')
    end
    if u > latest then latest = u end
  end
end
redis.call('HSET', KEYS[1], ARGV[2], new_until .. ' ' .. ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(latest - now))
return 1
"""

# -- email codes ----------------------------------------------------------------------

# KEYS: email, email_sends (this extension's, member "<at> <hash>", kept an hour),
#       the host-wide sends (member "<user> <at> <hash>", kept a minute: only the
#       last minute counts)
# ARGV: now, hash, expires, max_attempts, send_interval, max_per_hour,
#       global_max_per_minute, an hour ago, a minute ago, user, code_ttl, address tag ("TAG." or "": any)
# The throttle is base.email_retry_after, line by line.
# -> {1} issued | {0, pending (0/1), retry_after}
ISSUE_EMAIL_CODE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[9])
local mine = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local everyone = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[9], '+inf', 'WITHSCORES')
local at = now
local n = #mine / 2
local interval = tonumber(ARGV[5])
if n > 0 and interval > 0 then
  at = math.max(at, tonumber(mine[2 * n]) + interval)
end
local per_hour = tonumber(ARGV[6])
if n >= per_hour then
  at = math.max(at, tonumber(mine[2 * (n - per_hour + 1)]) + 3600)
end
local g = #everyone / 2
local per_minute = tonumber(ARGV[7])
if g >= per_minute then
  at = math.max(at, tonumber(everyone[2 * (g - per_minute + 1)]) + 60)
end
if at > now then
  local code = redis.call('HMGET', KEYS[1], 'expires', 'attempts', 'hash')
  local pending = 0
  local tag = ARGV[12]
  if code[1] and tonumber(code[1]) > now and tonumber(code[2]) > 0
     and (tag == '' or (code[3] and string.sub(code[3], 1, #tag) == tag)) then
    pending = 1
  end
  return {0, pending, string.format('%.17g', at)}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'expires', ARGV[3], 'attempts', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[11])
local member = ARGV[1] .. ' ' .. ARGV[2]
redis.call('ZADD', KEYS[2], ARGV[1], member)
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[10] .. ' ' .. member)
redis.call('EXPIRE', KEYS[2], 3660)
redis.call('EXPIRE', KEYS[3], 120)
return {1}
"""

# KEYS: email, email_sends, host-wide sends   ARGV: hash, user
DISCARD_EMAIL_CODE = """
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
local suffix = ' ' .. ARGV[1]
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(member, -#suffix) == suffix then
    redis.call('ZREM', KEYS[2], member)
    redis.call('ZREM', KEYS[3], ARGV[2] .. ' ' .. member)
  end
end
return 1
"""

# KEYS: fail, email, enrol   ARGV: now, hash
# Lua strings are interned, so == compares two references, not their bytes.
# -> {0, locked_until} | {1, verdict} with verdict: 0 missing, 1 expired,
#    2 accepted, 3 exhausted, 4 wrong
VERIFY_EMAIL_CODE = _LOCKED + _NOTE_SUCCESS + """
local lock = locked(KEYS[1], ARGV[1])
if lock then return {0, lock} end
local code = redis.call('HMGET', KEYS[2], 'hash', 'expires', 'attempts')
if not code[1] then return {1, 0} end
if tonumber(code[2]) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[2])
  return {1, 1}
end
if ARGV[2] ~= '' and code[1] == ARGV[2] then
  redis.call('DEL', KEYS[2])
  redis.call('DEL', KEYS[1])
  note_success(KEYS[3], 'email', ARGV[1])
  return {1, 2}
end
if tonumber(code[3]) <= 1 then
  redis.call('DEL', KEYS[2])
  return {1, 3}
end
redis.call('HINCRBY', KEYS[2], 'attempts', -1)
return {1, 4}
"""

# -- web gate sessions (state.redis_gate) ------------------------------------------------
# A session is the hash ``<prefix>gate:<key>`` (``key``: the token's keyed hash); the
# account's index ``<prefix>{<account>}:gate`` (zset, score: last seen) and the index of all
# ``<prefix>gate_sessions`` (zset, score: absolute end) bound their numbers and serve the
# admin's list and revocations. These scripts name a session's keys and its account's lock
# from the stored account, so they touch keys the caller could not list in advance: the
# store runs on one Redis server (or a Sentinel-managed master), never Redis Cluster --
# as the cluster-wide email throttle already requires. Every key has a TTL.

_GATE_DROP = """
local function gate_drop(prefix, all_key, skey)
  local account = redis.call('HGET', prefix .. 'gate:' .. skey, 'account')
  redis.call('DEL', prefix .. 'gate:' .. skey)
  redis.call('ZREM', all_key, skey)
  if account then
    redis.call('ZREM', prefix .. '{' .. account .. '}:gate', skey)
    return 1
  end
  return 0
end
"""

#: KEYS: session hash, account index, all index. ARGV: now, account, method, client, site,
#: expires, idle, max_per_account, max_total, prefix, session ttl, index ttl.
GATE_CREATE = _GATE_DROP + """
local now = tonumber(ARGV[1])
local prefix = ARGV[10]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local mine = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, m in ipairs(mine) do
  if redis.call('EXISTS', prefix .. 'gate:' .. m) == 0 then
    redis.call('ZREM', KEYS[2], m)
    redis.call('ZREM', KEYS[3], m)
  end
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[8]) + 1
if over > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
    gate_drop(prefix, KEYS[3], m)
  end
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    local f = redis.call('HMGET', prefix .. 'gate:' .. m, 'seen', 'idle')
    if not f[1] or now >= tonumber(f[1]) + tonumber(f[2]) then
      gate_drop(prefix, KEYS[3], m)
    end
  end
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then
    return 0
  end
end
local skey = string.sub(KEYS[1], string.len(prefix) + 6)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'account', ARGV[2], 'method', ARGV[3], 'created', ARGV[1], 'seen', ARGV[1],
           'client', ARGV[4], 'site', ARGV[5], 'expires', ARGV[6], 'idle', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[11])
redis.call('ZADD', KEYS[2], now, skey)
redis.call('EXPIRE', KEYS[2], ARGV[12])
redis.call('ZADD', KEYS[3], ARGV[6], skey)
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[12]) then
  redis.call('EXPIRE', KEYS[3], ARGV[12])
end
return 1
"""

#: KEYS: session hash. ARGV: now, lifetime, idle, touch_after, prefix, idle ttl margin.
#: Reply: {} (no live session) or the stored fields and the account's lock end.
GATE_CHECK = """
local f = redis.call('HMGET', KEYS[1], 'account', 'method', 'created', 'seen', 'client', 'site', 'expires', 'idle')
if not f[1] then
  return {}
end
local now = tonumber(ARGV[1])
local created, seen, expires, idle = tonumber(f[3]), tonumber(f[4]), tonumber(f[7]), tonumber(f[8])
if now >= expires or now >= seen + idle then
  redis.call('DEL', KEYS[1])
  return {}
end
if now >= created + tonumber(ARGV[2]) or now >= seen + tonumber(ARGV[3]) then
  return {}
end
local locked = redis.call('HGET', ARGV[5] .. '{' .. f[1] .. '}:fail', 'until') or '0'
if now - seen >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'seen', ARGV[1])
  local ttl = math.min(expires - now, idle)
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + tonumber(ARGV[6]))
  redis.call('ZADD', ARGV[5] .. '{' .. f[1] .. '}:gate', 'XX', now, string.sub(KEYS[1], string.len(ARGV[5]) + 6))
end
return {f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], locked}
"""

#: KEYS: an index (an account's, or all). ARGV: now, prefix. Reply: flat list of 9 fields per live session.
GATE_LIST = """
local now = tonumber(ARGV[1])
local out = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local f = redis.call('HMGET', ARGV[2] .. 'gate:' .. m, 'account', 'method', 'created', 'seen', 'client', 'site',
                       'expires', 'idle')
  if f[1] and now < tonumber(f[7]) and now < tonumber(f[4]) + tonumber(f[8]) then
    table.insert(out, m)
    for i = 1, 8 do table.insert(out, f[i]) end
  end
end
return out
"""

#: KEYS: all index, and the account's index (by account). ARGV: how (key|id|account|all), value, prefix.
GATE_REVOKE = _GATE_DROP + """
local how, value, prefix = ARGV[1], ARGV[2], ARGV[3]
local n = 0
if how == 'key' then
  n = gate_drop(prefix, KEYS[1], value)
elseif how == 'account' then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    n = n + gate_drop(prefix, KEYS[1], m)
  end
  redis.call('DEL', KEYS[2])
else
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if how == 'all' or string.sub(m, 1, string.len(value)) == value then
      n = n + gate_drop(prefix, KEYS[1], m)
    end
  end
end
return n
"""
