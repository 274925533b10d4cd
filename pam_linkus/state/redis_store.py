"""Redis state store: one state for several PBX hosts (an HA pair, a cluster).

A code used on host A must be refused on host B, and failures must add up across
hosts, so every decision is ONE atomic step on the Redis server: a single command
or a Lua script (scripts run without interleaving). Nothing reads a value into
Python and writes it back in a second command.

Keys are ``<prefix>{<user>}:<kind>``. The hash tag keeps an extension's keys in
one slot, so each script touches one slot only; the prefix lets several clusters
share one server (and an ACL can confine a cluster to ``~<prefix>*``). Every key
has a TTL except a lock that only an admin may open, so the server does not
collect records of extensions that are long gone.

Redis down, timing out, refusing the password or the certificate: every method
raises StateUnavailable (PAM_AUTHINFO_UNAVAIL). Never a success, never "no replay
record". ``redis`` is imported only here, and this module only when the config
says ``state: {backend: redis}``.
"""

from __future__ import annotations

from pam_linkus.errors import ConfigError, Locked, StateUnavailable
from pam_linkus.state.base import FOREVER, EmailCheck, EmailIssue, Enrolment, LockStatus, next_lock

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    from pam_linkus.config import RedisConfig
    from pam_linkus.state.base import EmailLimits

    T = TypeVar("T")

#: How long the last accepted TOTP step of an extension is kept. A step can only
#: match while it lies within ``totp.window`` (at most 10) steps of now, and a
#: period is at most 300 s: after 3,300 s (plus clock skew between hosts) a
#: forgotten step can no longer be replayed. One day is far beyond that.
REPLAY_TTL = 86400

_FOREVER = repr(float(FOREVER))

# KEYS: fail, totp, enrol   ARGV: now, step, replay_ttl
# -> {0, locked_until} locked | {1} replay (a step >= step was accepted) | {2} accepted
_ACCEPT_TOTP = """
local locked_until = redis.call('HGET', KEYS[1], 'until')
if locked_until and tonumber(locked_until) > tonumber(ARGV[1]) then
  return {0, locked_until}
end
local last = redis.call('GET', KEYS[2])
if last and tonumber(last) >= tonumber(ARGV[2]) then
  return {1}
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[3], 'last', ARGV[1])
redis.call('HSETNX', KEYS[3], 'method', 'totp')
return {2}
"""

# KEYS: enrol, totp   ARGV: method, now, step ('' = none), replay_ttl
_RECORD_ENROLMENT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'method', ARGV[1], 'since', ARGV[2])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
return 1
"""

# KEYS: rc   ARGV: salt, digest...
_SET_RECOVERY = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], '1')
end
if #ARGV > 1 then
  redis.call('HSET', KEYS[1], '_salt', ARGV[1])
end
return 1
"""

# KEYS: fail, rc, enrol   ARGV: now, digest
# -> {0, locked_until} locked | {1} no such code | {2} spent
_USE_RECOVERY = """
local locked_until = redis.call('HGET', KEYS[1], 'until')
if locked_until and tonumber(locked_until) > tonumber(ARGV[1]) then
  return {0, locked_until}
end
if ARGV[2] == '_salt' or redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then
  return {1}
end
if redis.call('HLEN', KEYS[2]) <= 1 then
  redis.call('DEL', KEYS[2])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[3], 'last', ARGV[1])
redis.call('HSETNX', KEYS[3], 'method', '-')
return {2}
"""

# KEYS: fail   ARGV: now, max_failures, lock_at_max, permanent_after, lock_at_permanent, forever, failure_ttl
# The lock values come from base.next_lock (computed in Python for the two
# thresholds), so the lockout rule stays written once; the script only picks
# one by the count it has just incremented, and never shortens a running lock.
# Lock values stay strings: Lua would print 2**62 with 14 digits, below FOREVER.
# -> {count, locked_until}
_RECORD_FAILURE = """
local count = redis.call('HINCRBY', KEYS[1], 'count', 1)
local lock = '0'
if count >= tonumber(ARGV[4]) then
  lock = ARGV[5]
elseif count >= tonumber(ARGV[2]) then
  lock = ARGV[3]
end
local old = redis.call('HGET', KEYS[1], 'until')
if old and tonumber(old) > tonumber(lock) then
  lock = old
end
redis.call('HSET', KEYS[1], 'until', lock, 'last', ARGV[1])
if tonumber(lock) >= tonumber(ARGV[6]) then
  redis.call('PERSIST', KEYS[1])
else
  local left = math.max(0, tonumber(lock) - tonumber(ARGV[1]))
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[7]) + left))
end
return {count, lock}
"""


# Email codes. Keys: code = <prefix>{user}:email (hash: hash, expires, left),
# sends = <prefix>{user}:email_sends (sorted set: code hash scored by send time),
# all_sends = <prefix>email_sends (the same, for every extension: the global
# throttle). The throttle rule is base.email_retry_after, mirrored here because
# it must run inside the script; the contract suite holds both to one behaviour.
# The issue and discard scripts touch two slots (the global key has no user tag):
# fine on a single server or Sentinel master, which is what RedisStore supports.

# KEYS: code, sends, all_sends
# ARGV: now, hash, expires, max_attempts, send_interval, max_per_hour, global_max_per_minute, code_ttl
# -> {1} issued | {0, pending (0/1), retry_after}
_ISSUE_EMAIL = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 3600)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60)
local retry = now
local interval = tonumber(ARGV[5])
if interval > 0 then
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if last[2] then retry = math.max(retry, tonumber(last[2]) + interval) end
end
local per_hour = tonumber(ARGV[6])
local mine = redis.call('ZCARD', KEYS[2])
if mine >= per_hour then
  local oldest = redis.call('ZRANGE', KEYS[2], mine - per_hour, mine - per_hour, 'WITHSCORES')
  retry = math.max(retry, tonumber(oldest[2]) + 3600)
end
local global_max = tonumber(ARGV[7])
local everyone = redis.call('ZCARD', KEYS[3])
if everyone >= global_max then
  local oldest = redis.call('ZRANGE', KEYS[3], everyone - global_max, everyone - global_max, 'WITHSCORES')
  retry = math.max(retry, tonumber(oldest[2]) + 60)
end
if retry > now then
  local code = redis.call('HMGET', KEYS[1], 'expires', 'left')
  local pending = 0
  if code[1] and tonumber(code[1]) > now and tonumber(code[2]) > 0 then pending = 1 end
  return {0, pending, string.format('%.6f', retry)}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'expires', ARGV[3], 'left', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], 3660)
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[3], 120)
return {1}
"""

# KEYS: code, sends, all_sends   ARGV: hash
_DISCARD_EMAIL = """
if redis.call('HGET', KEYS[1], 'hash') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: fail, code, enrol   ARGV: now, hash
# The stored value is an HMAC under a key Redis never sees, so the timing of
# Lua's string comparison tells an attacker nothing they could steer.
# -> {0, locked_until} locked | {1, verdict}
_VERIFY_EMAIL = """
local locked_until = redis.call('HGET', KEYS[1], 'until')
if locked_until and tonumber(locked_until) > tonumber(ARGV[1]) then
  return {0, locked_until}
end
local code = redis.call('HMGET', KEYS[2], 'hash', 'expires', 'left')
if not code[1] then return {1, 'missing'} end
if tonumber(code[2]) <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[2])
  return {1, 'expired'}
end
if ARGV[2] ~= '' and code[1] == ARGV[2] then
  redis.call('DEL', KEYS[2], KEYS[1])
  redis.call('HSET', KEYS[3], 'last', ARGV[1])
  redis.call('HSETNX', KEYS[3], 'method', 'email')
  return {1, 'accepted'}
end
if tonumber(code[3]) <= 1 then
  redis.call('DEL', KEYS[2])
  return {1, 'exhausted'}
end
redis.call('HINCRBY', KEYS[2], 'left', -1)
return {1, 'wrong'}
"""

_VERDICTS = {
    "accepted": EmailCheck.ACCEPTED,
    "wrong": EmailCheck.WRONG,
    "exhausted": EmailCheck.EXHAUSTED,
    "expired": EmailCheck.EXPIRED,
    "missing": EmailCheck.MISSING,
}

# KEYS: grace (a hash: rhost -> until)   ARGV: now, rhost, until
# Drops this extension's expired periods, keeps the later end for ``rhost``, and
# lets the key expire with its last period.
_START_GRACE = """
local now = tonumber(ARGV[1])
local latest = tonumber(ARGV[3])
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local until_ = tonumber(fields[i + 1])
  if until_ <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif until_ > latest then
    latest = until_
  end
end
local old = redis.call('HGET', KEYS[1], ARGV[2])
if not old or tonumber(old) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], math.max(1, math.ceil(latest - now)))
return 1
"""


class RedisStore:
    """StateStore on a Redis server (or a Sentinel-managed master); see state.base."""

    def __init__(self, config: RedisConfig):
        import redis

        self.config = config
        self.prefix = config.prefix
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = self._connect(config)
        self._failed = False

    @staticmethod
    def _connect(config: RedisConfig) -> Any:
        """Build the client; it connects on the first command (errors surface there)."""
        import redis

        from pam_linkus.strictyaml import read_secret_file

        try:
            password = read_secret_file(config.password_file, "Redis password") if config.password_file else None
        except ConfigError as exc:
            raise StateUnavailable(f"redis: {exc}") from None
        options: dict[str, Any] = {
            "username": config.username,
            "password": password,
            "socket_connect_timeout": config.connect_timeout,
            "socket_timeout": config.timeout,
            "retry_on_timeout": False,
            "decode_responses": True,
        }
        tls: dict[str, Any] = {}
        if config.tls:
            # redis-py checks the chain by default but not the host name; we want both.
            tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": config.ca_file}
        try:
            if not config.sentinels:
                return redis.Redis.from_url(config.url, **options, **tls)
            from redis.sentinel import Sentinel

            sentinel_options: dict[str, Any] = {
                "socket_connect_timeout": config.connect_timeout,
                "socket_timeout": config.timeout,
            }
            if config.tls:
                sentinel_options.update(ssl=True, **tls)
            sentinels = [(host, int(port)) for host, _, port in (s.rpartition(":") for s in config.sentinels)]
            sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options)
            assert config.service_name is not None  # RedisConfig requires it with sentinels
            return sentinel.master_for(config.service_name, db=config.db, ssl=config.tls, **options, **tls)
        except (redis.RedisError, ValueError) as exc:
            raise StateUnavailable(f"redis: {exc}") from None

    # -- keys and calls ------------------------------------------------------------

    def _key(self, user: str, kind: str) -> str:
        return f"{self.prefix}{{{user}}}:{kind}"

    def _call(self, what: str, body: Callable[[], T]) -> T:
        """Run one Redis round trip; any client or socket error -> StateUnavailable.

        The redis exception is neither chained to ours nor kept with its
        traceback (see ``_drop_tracebacks``); only its message goes on.
        """
        try:
            return body()
        except self._errors as exc:
            reason = f"redis {what}: {type(exc).__name__}: {exc}"
            _drop_tracebacks(exc)
        self._failed = True
        raise StateUnavailable(reason)

    def _eval(self, what: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script with EVAL.

        Not EVALSHA-then-load (redis-py's ``register_script``): on a fresh server
        that path raises and catches NoScriptError inside redis-py, and the
        exception's traceback keeps our callers' frames -- and with them
        pam_python's handle -- in a reference cycle. Collected after pam_end has
        unloaded pam_python, that crashes a host process that goes on running
        Python (a web front end). The server caches the compiled script either way.
        """
        return self._call(what, lambda: self._client.eval(script, len(keys), *keys, *args))

    # -- the contract --------------------------------------------------------------

    def lock_status(self, user: str, now: float) -> LockStatus:
        count, locked_until = self._call(
            "lock status", lambda: self._client.hmget(self._key(user, "fail"), "count", "until")
        )
        if count is None:
            return LockStatus()
        return LockStatus(int(count), float(locked_until or 0.0))

    def accept_totp_step(self, user: str, step: int, now: float) -> bool:
        keys = [self._key(user, "fail"), self._key(user, "totp"), self._key(user, "enrol")]
        answer = self._eval("accept code", _ACCEPT_TOTP, keys, [repr(now), step, REPLAY_TTL])
        if int(answer[0]) == 0:
            raise Locked(locked_until=float(answer[1]))
        return int(answer[0]) == 2

    def record_failure(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        args = [
            repr(now),
            max_failures,
            repr(next_lock(max_failures, now, max_failures, duration, permanent_after)),
            permanent_after,
            repr(next_lock(permanent_after, now, max_failures, duration, permanent_after)),
            _FOREVER,
            self.config.failure_ttl,
        ]
        count, locked_until = self._eval("record failure", _RECORD_FAILURE, [self._key(user, "fail")], args)
        return LockStatus(int(count), float(locked_until))

    def _email_keys(self, user: str) -> list[str]:
        return [self._key(user, "email"), self._key(user, "email_sends"), f"{self.prefix}email_sends"]

    def issue_email_code(self, user: str, code_hash: str, now: float, limits: EmailLimits) -> EmailIssue:
        args = [
            repr(now), code_hash, repr(now + limits.lifetime), limits.max_attempts, limits.send_interval,
            limits.max_per_hour, limits.global_max_per_minute, limits.lifetime + 60,
        ]
        keys = self._email_keys(user)
        answer = self._eval("issue email code", _ISSUE_EMAIL, keys, args)
        if int(answer[0]) == 1:
            return EmailIssue(True)
        return EmailIssue(False, pending=int(answer[1]) == 1, retry_after=float(answer[2]))

    def discard_email_code(self, user: str, code_hash: str) -> None:
        keys = self._email_keys(user)
        self._eval("discard email code", _DISCARD_EMAIL, keys, [code_hash])

    def verify_email_code(self, user: str, code_hash: str, now: float) -> str:
        keys = [self._key(user, "fail"), self._key(user, "email"), self._key(user, "enrol")]
        answer = self._eval("verify email code", _VERIFY_EMAIL, keys, [repr(now), code_hash])
        if int(answer[0]) == 0:
            raise Locked(locked_until=float(answer[1]))
        return _VERDICTS[str(answer[1])]

    def start_grace(self, user: str, rhost: str, now: float, duration: int) -> None:
        self._eval("start grace period", _START_GRACE, [self._key(user, "grace")], [repr(now), rhost,
                                                                                     repr(now + duration)])

    def grace_active(self, user: str, rhost: str, now: float) -> bool:
        until = self._call("grace period", lambda: self._client.hget(self._key(user, "grace"), rhost))
        return until is not None and float(until) > now

    def unlock(self, user: str) -> None:
        self._call("unlock", lambda: self._client.delete(self._key(user, "fail")))

    def forget(self, user: str) -> None:
        # One DEL of all keys: atomic, so no half-forgotten extension.
        keys = [self._key(user, kind) for kind in ("totp", "fail", "email", "email_sends", "grace", "enrol", "rc")]
        self._call("forget", lambda: self._client.delete(*keys))

    # -- enrolment record and recovery codes ------------------------------------------
    # ``enrol`` (hash: method, since, last) and ``rc`` (hash: digest -> 1, plus
    # ``_salt``) have no TTL: they live as long as the enrolment, and ``disable``
    # (forget) removes them. A recovery code must never expire silently.

    def record_enrolment(self, user: str, method: str, now: float, *, totp_step: int | None = None) -> None:
        keys = [self._key(user, "enrol"), self._key(user, "totp")]
        step = "" if totp_step is None else str(totp_step)
        self._eval("record enrolment", _RECORD_ENROLMENT, keys, [method, repr(now), step, REPLAY_TTL])

    def enrolment(self, user: str) -> Enrolment | None:
        method, since, last = self._call(
            "enrolment", lambda: self._client.hmget(self._key(user, "enrol"), "method", "since", "last")
        )
        left = self.recovery_codes_left(user)
        if method is None and last is None and not left:
            return None
        return Enrolment(
            method if method not in (None, "-") else None,
            float(since) if since is not None else None,
            float(last) if last is not None else None,
            left,
        )

    def set_recovery_codes(self, user: str, salt: str, digests: Sequence[str]) -> None:
        self._eval("set recovery codes", _SET_RECOVERY, [self._key(user, "rc")], [salt, *digests])

    def recovery_salt(self, user: str) -> str | None:
        salt = self._call("recovery salt", lambda: self._client.hget(self._key(user, "rc"), "_salt"))
        return str(salt) if salt is not None else None

    def recovery_codes_left(self, user: str) -> int:
        count = int(self._call("recovery codes", lambda: self._client.hlen(self._key(user, "rc"))))
        return max(0, count - 1)

    def use_recovery_code(self, user: str, digest: str, now: float) -> bool:
        # The digest is looked up by HDEL (a hash-table lookup), not compared byte
        # by byte in Python: its timing depends on the scrypt output of a guess
        # under a per-extension salt, which tells an attacker nothing usable.
        keys = [self._key(user, "fail"), self._key(user, "rc"), self._key(user, "enrol")]
        answer = self._eval("use recovery code", _USE_RECOVERY, keys, [repr(now), digest])
        if int(answer[0]) == 0:
            raise Locked(locked_until=float(answer[1]))
        return int(answer[0]) == 2

    def close(self) -> None:
        try:
            self._client.connection_pool.disconnect()
        except self._errors:
            self._failed = True
        if self._failed:
            # redis-py's error paths leave exceptions whose tracebacks hold our
            # callers' frames (and pam_python's handle) in reference cycles; free
            # them now, while pam_python is still loaded (see _eval). Only after a
            # failure, so a normal login does not pay for a collection.
            import gc

            gc.collect()


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Cut an exception chain loose from the frames it holds.

    redis-py's exceptions sit in reference cycles with their tracebacks (a frame
    holds the exception that holds the traceback that holds the frame), and the
    frames reach up to pam_python's handle. Left to the garbage collector they
    may be collected after pam_end has unloaded pam_python, which crashes a host
    process that goes on running Python (a web front end using our client).
    """
    seen = 0
    while exc is not None and seen < 20:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
        seen += 1
