"""Redis state store: one state for several PBX hosts (an HA pair, a cluster).

A code used on host A must be refused on host B, and failures must add up across
hosts, so every decision is ONE atomic step on the Redis server: a single command
or a Lua script (scripts run without interleaving). Nothing reads a value into
Python and writes it back in a second command.

Keys are ``<prefix>{<user>}:<kind>`` (plus ``<prefix>email_sends`` for the
cluster-wide email throttle). The hash tag keeps an extension's keys in one
slot; the prefix lets several clusters share one server (and an ACL can confine
a cluster to ``~<prefix>*``). Records of passing events (replay steps, failures,
codes, sends, grace periods, cached settings) have TTLs, so the server does not
collect records of extensions that are long gone (``prune`` has nothing to do);
what must outlive any TTL -- a lock only an admin may open, the enrollment
record, unused recovery codes -- stays until ``forget`` (``linkus-2fa disable``).
The scripts live in pam_linkus.state.redis_scripts.

The client is redis-py: one connection pool shared by linkusd's worker threads
(``redis.Redis`` is thread-safe over its pool), or a Sentinel-managed pool that
follows a failover. TLS verifies the chain (``ca_file``, else the system CAs)
and the host name. Every reply is read under an overall deadline
(``timeout``) and a size cap (``MAX_REPLY_BYTES``): a server that drips a reply
or sends one far larger than this store ever needs is "unavailable", not a hang.

Redis down, timing out, refusing the password or the certificate, answering an
error or data of the wrong shape (``HSET ...:fail count abc``): every method
raises StateUnavailable (PAM_AUTHINFO_UNAVAIL), translated once, in ``_call``.
Never a success, never "no replay record".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.connection import SENTINEL, PythonParser, SocketBuffer
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel

from nss_config.yaml_reader import read_secret_file
from pam_linkus.config import RedisConfig
from pam_linkus.errors import ConfigError, Locked, StateUnavailable
from pam_linkus.state import redis_scripts as lua
from pam_linkus.state.base import (
    CACHE_TTL,
    FOREVER,
    REPLAY_TTL,
    EmailCheck,
    EmailIssue,
    EmailLimits,
    Enrollment,
    LockStatus,
    TotpAttempt,
    next_lock,
)
from pam_linkus.state.redis_gate import RedisGateSessions

T = TypeVar("T")

__all__ = ["CACHE_TTL", "MAX_REPLY_BYTES", "REPLAY_TTL", "RedisStore"]

_FOREVER = repr(float(FOREVER))

#: The largest reply this store needs is a few recovery digests or a minute of
#: cluster-wide email sends: far below this. Larger is a broken or hostile server.
MAX_REPLY_BYTES = 1 << 20

#: Connections per store; linkusd's worker pool is smaller.
MAX_CONNECTIONS = 64

#: Every kind of key an extension can have; ``forget`` deletes them all at once.
#: ``email_sends`` must stay last: the FORGET script finds it there. ``enrol`` keeps its first
#: spelling (the project writes "enroll" now): keys written by earlier versions must stay readable.
KINDS = ("totp", "fail", "cache", "enrol", "recovery", "recovery_salt", "grace", "email", "email_sends")

#: The host-wide (cluster-wide) record of email sends, for ``global_max_per_minute``.
GLOBAL_SENDS = "email_sends"

#: TOTP_ATTEMPT's verdicts, in its numbering.
_TOTP_VERDICTS = (TotpAttempt.LOCKED, TotpAttempt.WRONG, TotpAttempt.REPLAYED, TotpAttempt.RESERVED,
                  TotpAttempt.ACCEPTED)

#: VERIFY_EMAIL_CODE's verdicts, in its numbering.
_EMAIL_VERDICTS = (EmailCheck.MISSING, EmailCheck.EXPIRED, EmailCheck.ACCEPTED, EmailCheck.EXHAUSTED,
                   EmailCheck.WRONG)

#: What a Redis round trip can raise, and what reading its answer can raise when
#: the data has the wrong shape; all of it is "unavailable".
_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, ValueError, TypeError, IndexError)


class _BoundedBuffer(SocketBuffer):
    """redis-py's socket buffer with an overall deadline and a byte cap per reply.

    redis-py's own timeout is per ``recv``: a server sending one byte a second
    never trips it. Here each ``recv`` waits at most until the reply's deadline,
    and the bytes of one reply are counted.
    """

    deadline = 0.0
    received = 0

    def start_reply(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.received = 0

    def _read_from_socket(self, length: int | None = None, timeout: Any = SENTINEL,
                          raise_on_timeout: bool = True) -> bool:
        if timeout is not SENTINEL:  # a can_read poll (pub/sub, health checks): unchanged
            return bool(super()._read_from_socket(length, timeout, raise_on_timeout))  # type: ignore[misc]
        want = length or 1
        if self.received + want > MAX_REPLY_BYTES:
            raise RedisError("reply larger than the store needs")
        got = 0
        while got < want:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RedisTimeoutError("reply deadline passed")
            before = self.bytes_written
            super()._read_from_socket(None, remaining, True)  # type: ignore[misc]
            got += self.bytes_written - before
            self.received += self.bytes_written - before
            if self.received > MAX_REPLY_BYTES:
                raise RedisError("reply larger than the store needs")
        return True


class _BoundedParser(PythonParser):
    """The pure-Python RESP parser reading through ``_BoundedBuffer``."""

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self._buffer = _BoundedBuffer(connection._sock, self.socket_read_size, connection.socket_timeout)
        self._reply_seconds = float(connection.socket_timeout or 2.0)
        self._depth = 0

    def read_response(self, disable_decoding: bool = False) -> Any:
        if self._depth == 0 and isinstance(self._buffer, _BoundedBuffer):
            self._buffer.start_reply(self._reply_seconds)
        self._depth += 1
        try:
            return super().read_response(disable_decoding=disable_decoding)
        finally:
            self._depth -= 1


def _tls_options(config: RedisConfig) -> dict[str, Any]:
    return {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": config.ca_file}


def connect(config: RedisConfig) -> redis.Redis[Any]:
    """A client over one pool (or a Sentinel-managed one); no I/O yet: errors
    surface on the first command. Secret files are read here (ConfigError)."""
    password = read_secret_file(config.password_file, "Redis password") if config.password_file else None
    common: dict[str, Any] = {
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.connect_timeout,
        "parser_class": _BoundedParser,
        "decode_responses": True,
        "max_connections": MAX_CONNECTIONS,
    }
    if not config.sentinels:
        options = dict(common, password=password)
        if config.username:
            options["username"] = config.username
        if config.url.startswith("rediss://"):
            options.update(_tls_options(config))
        if config.url.startswith("unix://"):
            del options["socket_connect_timeout"]  # a unix socket connects at once or not at all
        return redis.Redis.from_url(config.url, **options)
    sentinel_password = (read_secret_file(config.sentinel_password_file, "Redis Sentinel password")
                         if config.sentinel_password_file else None)
    tls: dict[str, Any] = dict(_tls_options(config), ssl=True) if config.tls else {}
    # Sentinel asks its sentinels through plain ``redis.Redis`` objects, which
    # take no parser or pool options; their replies are small and per-read timed.
    sentinel_options = {k: v for k, v in common.items() if k not in ("max_connections", "parser_class")}
    sentinel_options.update(tls, username=config.sentinel_username, password=sentinel_password)
    sentinels = []
    for entry in config.sentinels:
        host, _, port_text = entry.rpartition(":")
        sentinels.append((host.removeprefix("[").removesuffix("]"), int(port_text)))
    master_options = dict(common, **tls, username=config.username, password=password, db=config.db)
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options)
    assert config.service_name is not None  # RedisConfig requires it with sentinels
    return sentinel.master_for(config.service_name, **master_options)


class RedisStore(RedisGateSessions):
    """StateStore on a Redis server (or a Sentinel-managed master); see state.base."""

    def __init__(self, config: RedisConfig):
        self.config = config
        self.prefix = config.prefix
        try:
            self._client = connect(config)
        except ConfigError as exc:
            raise StateUnavailable(f"redis: {exc}") from None
        except (RedisError, OSError, ValueError) as exc:
            raise StateUnavailable(f"redis: {type(exc).__name__}: {exc}") from None

    # -- keys and calls ------------------------------------------------------------

    def _key(self, user: str, kind: str) -> str:
        return f"{self.prefix}{{{user}}}:{kind}"

    def _call(self, what: str, body: Callable[[], T]) -> T:
        """Run one Redis round trip AND read its answer; any client, socket or
        shape error -> StateUnavailable (the one translation of this store).

        An error reply (``-ERR``, ``-NOPERM``, a failing script) is an error
        here too: never a success, never "no record". Only the message goes on.
        """
        try:
            return body()
        except _ERRORS as exc:
            reason = f"redis {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise StateUnavailable(reason)

    def _eval(self, what: str, script: str, keys: list[str], args: list[Any],
              read: Callable[[Any], T]) -> T:
        """One Lua script by EVAL, its answer read by ``read``.

        EVAL rather than EVALSHA: one round trip whatever the server has cached,
        and the ACL user docs/guide.md recommends ("Several hosts: Redis state",
        ``+eval``) needs nothing more.
        """
        text = getattr(lua, script)
        return self._call(what, lambda: read(self._client.eval(text, len(keys), *keys, *args)))  # type: ignore[no-untyped-call]

    def _lock_args(self, now: float, max_failures: int, duration: int, permanent_after: int) -> list[Any]:
        return [
            repr(now),
            max_failures,
            repr(next_lock(max_failures, now, max_failures, duration, permanent_after)),
            permanent_after,
            repr(next_lock(permanent_after, now, max_failures, duration, permanent_after)),
            _FOREVER,
            self.config.failure_ttl,
        ]

    # -- the contract --------------------------------------------------------------

    def lock_status(self, user: str, now: float) -> LockStatus:
        def read() -> LockStatus:
            count, locked_until = self._client.hmget(self._key(user, "fail"), "count", "until")
            if count is None:
                return LockStatus()
            return LockStatus(int(count), float(locked_until or 0.0))

        return self._call("lock status", read)

    def _failure_script(self, what: str, script: str, user: str, now: float, max_failures: int, duration: int,
                        permanent_after: int) -> LockStatus:
        args = self._lock_args(now, max_failures, duration, permanent_after)
        return self._eval(what, script, [self._key(user, "fail")], args,
                          lambda a: LockStatus(int(a[0]), float(a[1])))

    def reserve_attempt(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        return self._failure_script("reserve attempt", "RESERVE_ATTEMPT", user, now, max_failures, duration,
                                    permanent_after)

    def settle_failure(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        return self._failure_script("settle failure", "SETTLE_FAILURE", user, now, max_failures, duration,
                                    permanent_after)

    def totp_attempt(
        self, user: str, now: float, *, check: Callable[[], int | None], keep_reserved: bool = False,
        max_failures: int, duration: int, permanent_after: int,
    ) -> TotpAttempt:
        """One round trip: ``check`` (an HMAC in this process) runs first, then one
        script reserves, and records the step or the failure -- or, when the attempt
        is not admitted, ignores it (see StateStore.totp_attempt)."""
        step = check()
        keys = [self._key(user, "fail"), self._key(user, "totp"), self._key(user, "enrol")]
        args = self._lock_args(now, max_failures, duration, permanent_after)
        args += ["" if step is None else step, "1" if keep_reserved else "0", REPLAY_TTL]
        return self._eval("totp attempt", "TOTP_ATTEMPT", keys, args, _totp_attempt)

    def settle_success(self, user: str, now: float) -> None:
        self._eval("settle success", "SETTLE_SUCCESS", [self._key(user, "fail")], [_FOREVER], int)

    def prune(self, now: float) -> int:
        """Nothing to do: every record of a passing event has a TTL (module docstring)."""
        return 0

    def unlock(self, user: str) -> None:
        self._call("unlock", lambda: self._client.delete(self._key(user, "fail")))

    def forget(self, user: str) -> None:
        # One script: no half-forgotten extension, and its email sends leave the
        # host-wide throttle with it (as in SQLite).
        keys = [self._key(user, kind) for kind in KINDS] + [self.prefix + GLOBAL_SENDS]
        self._eval("forget", "FORGET", keys, [user], int)

    # -- settings cache (the LDAP source's offline copy) -----------------------------

    def cache_settings(self, source: str, user: str, data: str | None, now: float) -> None:
        key = self._key(user, "cache")
        if data is None:
            self._call("cache settings", lambda: self._client.hdel(key, f"data:{source}", f"at:{source}"))
            return
        self._eval("cache settings", "CACHE_SETTINGS", [key], [source, data, repr(now), CACHE_TTL], int)

    def cached_settings(self, source: str, user: str, now: float, max_age: float) -> str | None:
        key = self._key(user, "cache")

        def read() -> str | None:
            data, at = self._client.hmget(key, f"data:{source}", f"at:{source}")
            if data is None or at is None or not 0 <= now - float(at) <= max_age:
                return None
            return str(data)

        return self._call("cached settings", read)

    # -- enrollment record and recovery codes -----------------------------------------

    def record_enrollment(self, user: str, method: str, now: float, *, totp_step: int | None = None) -> None:
        keys = [self._key(user, "enrol"), self._key(user, "totp")]
        step = "" if totp_step is None else totp_step
        self._eval("record enrollment", "RECORD_ENROLLMENT", keys, [method, repr(now), step, REPLAY_TTL], int)

    def enrollment(self, user: str) -> Enrollment | None:
        def read(answer: Any) -> Enrollment | None:
            method, since, last, left = answer
            if method is None:
                return Enrollment(None, None, None, int(left)) if left else None
            return Enrollment(str(method), _float(since), _float(last), int(left))

        keys = [self._key(user, "enrol"), self._key(user, "recovery")]
        return self._eval("enrollment", "ENROLLMENT", keys, [], read)

    def set_recovery_codes(self, user: str, salt: str, digests: Sequence[str]) -> None:
        keys = [self._key(user, "recovery"), self._key(user, "recovery_salt")]
        self._eval("set recovery codes", "SET_RECOVERY_CODES", keys, [salt, *digests], int)

    def recovery_salt(self, user: str) -> str | None:
        def read() -> str | None:
            salt = self._client.get(self._key(user, "recovery_salt"))
            return None if salt is None else str(salt)

        return self._call("recovery salt", read)

    def recovery_codes_left(self, user: str) -> int:
        return self._call("recovery codes left", lambda: int(self._client.scard(self._key(user, "recovery"))))

    def use_recovery_code(self, user: str, digest: str, now: float) -> bool:
        keys = [self._key(user, kind) for kind in ("fail", "recovery", "recovery_salt", "enrol")]
        answer = self._eval("use recovery code", "USE_RECOVERY_CODE", keys, [repr(now), digest],
                            lambda a: (int(a[0]), float(a[1]) if int(a[0]) == 0 else 0.0))
        if answer[0] == 0:
            raise Locked(locked_until=answer[1])
        return answer[0] == 2

    # -- grace periods ---------------------------------------------------------------

    def start_grace(self, user: str, rhost: str, now: float, duration: int) -> None:
        args = [repr(now), rhost, repr(now + duration)]  # stored as "<until> <started>"
        self._eval("start grace", "START_GRACE", [self._key(user, "grace")], args, int)

    def grace_active(self, user: str, rhost: str, now: float, period: int) -> bool:
        def read() -> bool:
            value = self._client.hget(self._key(user, "grace"), rhost)
            if value is None:
                return False
            parts = (value.decode() if isinstance(value, bytes) else str(value)).split()
            until = float(parts[0]) if parts else float("nan")  # ValueError: not a grace record
            if len(parts) == 1:
                return False  # written before starts were kept ("<until>"): one more code
            if len(parts) != 2:
                raise ValueError("grace record")
            started = float(parts[1])
            return until > now and started + period > now

        return self._call("grace period", read)

    # -- email codes -----------------------------------------------------------------

    def _email_keys(self, user: str) -> list[str]:
        return [self._key(user, "email"), self._key(user, "email_sends"), self.prefix + GLOBAL_SENDS]

    def issue_email_code(self, user: str, code_hash: str, now: float, limits: EmailLimits) -> EmailIssue:
        args = [
            repr(now), code_hash, repr(now + limits.lifetime), limits.max_attempts, limits.send_interval,
            limits.max_per_hour, limits.global_max_per_minute, repr(now - 3600), repr(now - 60), user,
            limits.lifetime + 60,
            # a pending code counts only with the same address tag (StateStore.issue_email_code)
            code_hash.partition(".")[0] + "." if "." in code_hash else "",
        ]

        def read(answer: Any) -> EmailIssue:
            if int(answer[0]) == 1:
                return EmailIssue(True)
            return EmailIssue(False, pending=int(answer[1]) == 1, retry_after=float(answer[2]))

        return self._eval("issue email code", "ISSUE_EMAIL_CODE", self._email_keys(user), args, read)

    def discard_email_code(self, user: str, code_hash: str) -> None:
        self._eval("discard email code", "DISCARD_EMAIL_CODE", self._email_keys(user), [code_hash, user], int)

    def verify_email_code(self, user: str, code_hash: str, now: float) -> str:
        keys = [self._key(user, "fail"), self._key(user, "email"), self._key(user, "enrol")]
        answer = self._eval("verify email code", "VERIFY_EMAIL_CODE", keys, [repr(now), code_hash],
                            lambda a: (int(a[0]), float(a[1]) if int(a[0]) == 0 else 0.0,
                                       _verdict(_EMAIL_VERDICTS, a[1]) if int(a[0]) else ""))
        if answer[0] == 0:
            raise Locked(locked_until=answer[1])
        return answer[2]

    def close(self) -> None:
        try:
            self._client.close()
            pool = getattr(self._client, "connection_pool", None)
            if pool is not None:
                pool.disconnect()
        except _ERRORS:
            pass  # closing changes nothing about any decision


def _verdict(verdicts: tuple[str, ...], value: Any) -> str:
    """A script's verdict number as its name; out of range (a negative index too) is ValueError,
    read inside ``_call`` so that it is "unavailable", never another verdict."""
    number = int(value)
    if not 0 <= number < len(verdicts):
        raise ValueError(f"unknown verdict {number}")
    return verdicts[number]


def _totp_attempt(answer: Any) -> TotpAttempt:
    """TOTP_ATTEMPT's reply; anything else is ValueError/IndexError/TypeError (unavailable)."""
    return TotpAttempt(_verdict(_TOTP_VERDICTS, answer[0]), LockStatus(int(answer[1]), float(answer[2])))


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)
