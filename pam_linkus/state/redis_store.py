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
collect records of extensions that are long gone; what must outlive any TTL --
a lock only an admin may open, the enrolment record, unused recovery codes --
stays until ``forget`` (``linkus-2fa disable``). The scripts live in
pam_linkus.state.redis_scripts.

Redis down, timing out, refusing the password or the certificate: every method
raises StateUnavailable (PAM_AUTHINFO_UNAVAIL). Never a success, never "no replay
record". The client is pam_linkus.state.resp (a minimal RESP2 client: redis-py
cost ~100 ms of imports per login); this module is imported only when the
config says ``state: {backend: redis}``.
"""

from __future__ import annotations

from pam_linkus.errors import ConfigError, Locked, StateUnavailable
from pam_linkus.state import redis_scripts as lua
from pam_linkus.state.base import FOREVER, EmailCheck, EmailIssue, Enrolment, LockStatus, next_lock

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    from pam_linkus.config import RedisConfig
    from pam_linkus.state import resp
    from pam_linkus.state.base import EmailLimits

    T = TypeVar("T")

#: How long the last accepted TOTP step of an extension is kept. A step can only
#: match while it lies within ``totp.window`` (at most 10) steps of now, and a
#: period is at most 300 s: after 3,300 s (plus clock skew between hosts) a
#: forgotten step can no longer be replayed. One day is far beyond that.
REPLAY_TTL = 86400

#: How long an offline copy of an extension's settings (``ldap.cache_max_age``,
#: at most 30 days) is kept after it was last written.
CACHE_TTL = 31 * 86400

_FOREVER = repr(float(FOREVER))

#: Every kind of key an extension can have; ``forget`` deletes them all at once.
#: ``email_sends`` must stay last: the FORGET script finds it there.
KINDS = ("totp", "fail", "cache", "enrol", "recovery", "recovery_salt", "grace", "email", "email_sends")

#: The host-wide (cluster-wide) record of email sends, for ``global_max_per_minute``.
GLOBAL_SENDS = "email_sends"

#: VERIFY_EMAIL_CODE's verdicts, in its numbering.
_EMAIL_VERDICTS = (EmailCheck.MISSING, EmailCheck.EXPIRED, EmailCheck.ACCEPTED, EmailCheck.EXHAUSTED,
                   EmailCheck.WRONG)


class RedisStore:
    """StateStore on a Redis server (or a Sentinel-managed master); see state.base."""

    def __init__(self, config: RedisConfig):
        from pam_linkus.state import resp

        self.config = config
        self.prefix = config.prefix
        self._errors: tuple[type[BaseException], ...] = (resp.RedisError, OSError)
        self._client = self._connect(config)
        self._failed = False

    @staticmethod
    def _connect(config: RedisConfig) -> resp.Client:
        """Build the client; it connects on the first command (errors surface there)."""
        from pam_linkus.state import resp
        from pam_linkus.strictyaml import read_secret_file

        try:
            password = read_secret_file(config.password_file, "Redis password") if config.password_file else None
            sentinel_password = (read_secret_file(config.sentinel_password_file, "Redis Sentinel password")
                                 if config.sentinel_password_file else None)
        except ConfigError as exc:
            raise StateUnavailable(f"redis: {exc}") from None
        try:
            # Verify the chain (ca_file, else the system CAs) AND the host name.
            context = resp.tls_context(config.ca_file) if config.tls else None
            if not config.sentinels:
                host, port, path, url_user, db, _ = resp.parse_url(config.url)
                endpoint = resp.Endpoint(host=host, port=port, path=path, ssl_context=context,
                                         username=config.username or url_user, password=password, db=db)
                return resp.Client(endpoint=endpoint, connect_timeout=config.connect_timeout,
                                   timeout=config.timeout)
            sentinels = []
            for entry in config.sentinels:
                host, _, port_text = entry.rpartition(":")
                sentinels.append(resp.Endpoint(host=host.removeprefix("[").removesuffix("]"), port=int(port_text),
                                               ssl_context=context, username=config.sentinel_username,
                                               password=sentinel_password))
            master = resp.Endpoint(ssl_context=context, username=config.username, password=password, db=config.db)
            assert config.service_name is not None  # RedisConfig requires it with sentinels
            return resp.Client(sentinels=sentinels, service_name=config.service_name, master=master,
                               connect_timeout=config.connect_timeout, timeout=config.timeout)
        except (OSError, ValueError) as exc:
            raise StateUnavailable(f"redis: {exc}") from None

    # -- keys and calls ------------------------------------------------------------

    def _key(self, user: str, kind: str) -> str:
        return f"{self.prefix}{{{user}}}:{kind}"

    def _call(self, what: str, body: Callable[[], T]) -> T:
        """Run one Redis round trip; any client or socket error -> StateUnavailable.

        An error reply (``-ERR``, ``-NOPERM``, a failing script) is an error
        here too: never a success, never "no record". The client's exception is
        neither chained to ours nor kept with its traceback (see
        ``_drop_tracebacks``); only its message goes on.
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

        Not EVALSHA-then-load: on a fresh server that path raises and catches
        NOSCRIPT, and a caught exception's traceback keeps our callers' frames --
        and with them pam_python's handle -- in a reference cycle. Collected after
        pam_end has unloaded pam_python, that crashes a host process that goes on
        running Python (a web front end). The server caches the compiled script
        either way, and one round trip is what a login wants.
        """
        return self._call(what, lambda: self._client.call("EVAL", script, len(keys), *keys, *args))

    # -- the contract --------------------------------------------------------------

    def lock_status(self, user: str, now: float) -> LockStatus:
        count, locked_until = self._call(
            "lock status", lambda: self._client.call("HMGET", self._key(user, "fail"), "count", "until")
        )
        if count is None:
            return LockStatus()
        return LockStatus(int(count), float(locked_until or 0.0))

    def accept_totp_step(self, user: str, step: int, now: float) -> bool:
        keys = [self._key(user, "fail"), self._key(user, "totp"), self._key(user, "enrol")]
        answer = self._eval("accept code", lua.ACCEPT_TOTP, keys, [repr(now), step, REPLAY_TTL])
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
        count, locked_until = self._eval("record failure", lua.RECORD_FAILURE, [self._key(user, "fail")], args)
        return LockStatus(int(count), float(locked_until))

    def unlock(self, user: str) -> None:
        self._call("unlock", lambda: self._client.call("DEL", self._key(user, "fail")))

    def forget(self, user: str) -> None:
        # One script: no half-forgotten extension, and its email sends leave the
        # host-wide throttle with it (as in SQLite).
        keys = [self._key(user, kind) for kind in KINDS] + [self.prefix + GLOBAL_SENDS]
        self._eval("forget", lua.FORGET, keys, [user])

    # -- settings cache (the LDAP source's offline copy) -----------------------------

    def cache_settings(self, source: str, user: str, data: str | None, now: float) -> None:
        key = self._key(user, "cache")
        if data is None:
            self._call("cache settings", lambda: self._client.call("HDEL", key, f"data:{source}", f"at:{source}"))
            return
        self._eval("cache settings", lua.CACHE_SETTINGS, [key], [source, data, repr(now), CACHE_TTL])

    def cached_settings(self, source: str, user: str, now: float, max_age: float) -> str | None:
        key = self._key(user, "cache")
        data, at = self._call("cached settings",
                              lambda: self._client.call("HMGET", key, f"data:{source}", f"at:{source}"))
        if data is None or at is None or not 0 <= now - float(at) <= max_age:
            return None
        return str(data)

    # -- enrolment record and recovery codes -----------------------------------------

    def record_enrolment(self, user: str, method: str, now: float, *, totp_step: int | None = None) -> None:
        keys = [self._key(user, "enrol"), self._key(user, "totp")]
        step = "" if totp_step is None else totp_step
        self._eval("record enrolment", lua.RECORD_ENROLMENT, keys, [method, repr(now), step, REPLAY_TTL])

    def enrolment(self, user: str) -> Enrolment | None:
        keys = [self._key(user, "enrol"), self._key(user, "recovery")]
        method, since, last, left = self._eval("enrolment", lua.ENROLMENT, keys, [])
        if method is None:
            return Enrolment(None, None, None, int(left)) if left else None
        return Enrolment(str(method), _float(since), _float(last), int(left))

    def set_recovery_codes(self, user: str, salt: str, digests: Sequence[str]) -> None:
        keys = [self._key(user, "recovery"), self._key(user, "recovery_salt")]
        self._eval("set recovery codes", lua.SET_RECOVERY_CODES, keys, [salt, *digests])

    def recovery_salt(self, user: str) -> str | None:
        salt = self._call("recovery salt", lambda: self._client.call("GET", self._key(user, "recovery_salt")))
        return None if salt is None else str(salt)

    def recovery_codes_left(self, user: str) -> int:
        return int(self._call("recovery codes left", lambda: self._client.call("SCARD", self._key(user, "recovery"))))

    def use_recovery_code(self, user: str, digest: str, now: float) -> bool:
        keys = [self._key(user, kind) for kind in ("fail", "recovery", "recovery_salt", "enrol")]
        answer = self._eval("use recovery code", lua.USE_RECOVERY_CODE, keys, [repr(now), digest])
        if int(answer[0]) == 0:
            raise Locked(locked_until=float(answer[1]))
        return int(answer[0]) == 2

    # -- grace periods ---------------------------------------------------------------

    def start_grace(self, user: str, rhost: str, now: float, duration: int) -> None:
        args = [repr(now), rhost, repr(now + duration)]
        self._eval("start grace", lua.START_GRACE, [self._key(user, "grace")], args)

    def grace_active(self, user: str, rhost: str, now: float) -> bool:
        until = self._call("grace period", lambda: self._client.call("HGET", self._key(user, "grace"), rhost))
        return until is not None and float(until) > now

    # -- email codes -----------------------------------------------------------------

    def _email_keys(self, user: str) -> list[str]:
        return [self._key(user, "email"), self._key(user, "email_sends"), self.prefix + GLOBAL_SENDS]

    def issue_email_code(self, user: str, code_hash: str, now: float, limits: EmailLimits) -> EmailIssue:
        args = [
            repr(now), code_hash, repr(now + limits.lifetime), limits.max_attempts, limits.send_interval,
            limits.max_per_hour, limits.global_max_per_minute, repr(now - 3600), repr(now - 60), user,
            limits.lifetime + 60,
        ]
        answer = self._eval("issue email code", lua.ISSUE_EMAIL_CODE, self._email_keys(user), args)
        if int(answer[0]) == 1:
            return EmailIssue(True)
        return EmailIssue(False, pending=int(answer[1]) == 1, retry_after=float(answer[2]))

    def discard_email_code(self, user: str, code_hash: str) -> None:
        self._eval("discard email code", lua.DISCARD_EMAIL_CODE, self._email_keys(user), [code_hash, user])

    def verify_email_code(self, user: str, code_hash: str, now: float) -> str:
        keys = [self._key(user, "fail"), self._key(user, "email"), self._key(user, "enrol")]
        answer = self._eval("verify email code", lua.VERIFY_EMAIL_CODE, keys, [repr(now), code_hash])
        if int(answer[0]) == 0:
            raise Locked(locked_until=float(answer[1]))
        return _EMAIL_VERDICTS[int(answer[1])]

    def close(self) -> None:
        self._client.close()
        if self._failed:
            # Error paths can leave exceptions whose tracebacks hold our
            # callers' frames (and pam_python's handle) in reference cycles; free
            # them now, while pam_python is still loaded (see _eval). Only after a
            # failure, so a normal login does not pay for a collection.
            import gc

            gc.collect()


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Cut an exception chain loose from the frames it holds.

    Exceptions sit in reference cycles with their tracebacks (a frame
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
