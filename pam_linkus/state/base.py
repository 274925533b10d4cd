"""The StateStore contract: what every state backend (SQLite, Redis) must do.

Every operation that decides a login is ONE atomic step in the backend (SQLite:
a single statement or a ``BEGIN IMMEDIATE`` transaction that takes the write lock
before reading; Redis: one command or one Lua script). Never read-then-write
across two steps: two parallel logins with the same code must give exactly one
success. Backend errors become ``StateUnavailable`` inside the backend.

The contract is tested once, in tests/state_contract.py, and every backend's
test module subclasses that suite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

#: ``locked_until`` of a lock only an admin can open (an epoch far in the future,
#: representable as a 64-bit integer in SQLite and as a Redis integer).
FOREVER = 2**62

#: How long the last accepted TOTP step of an extension is kept. A step can only
#: match while it lies within ``totp.window`` (at most 10) steps of now, and a
#: period is at most 300 s: after 3,300 s (plus clock skew between hosts) a
#: forgotten step can no longer be replayed. One day is far beyond that.
REPLAY_TTL = 86400

#: How long an offline copy of an extension's settings (``ldap.cache_max_age``,
#: at most 30 days) is kept after it was last written.
CACHE_TTL = 31 * 86400

#: How long an unlocked failure count is kept after its last failure (Redis:
#: ``state.redis.failure_ttl``; the same default for SQLite's ``prune``).
FAILURE_TTL = 30 * 86400


class LockStatus:
    """Consecutive failures of an extension and until when it is locked (epoch s)."""

    __slots__ = ("failures", "locked_until")

    def __init__(self, failures: int = 0, locked_until: float = 0.0):
        self.failures = failures
        self.locked_until = locked_until

    def locked(self, now: float) -> bool:
        return self.locked_until > now

    @property
    def permanent(self) -> bool:
        return self.locked_until >= FOREVER

    def __repr__(self) -> str:
        return f"LockStatus(failures={self.failures}, locked_until={self.locked_until})"


class Enrollment:
    """What the state store knows about an extension's enrollment (never a secret).

    ``method`` and ``since`` are None for an extension enrolled by editing the
    source by hand (the store first heard of it at a successful login);
    ``last_success`` is None until the first successful login after enrollment.
    """

    __slots__ = ("method", "since", "last_success", "recovery_left")

    def __init__(self, method: str | None, since: float | None, last_success: float | None, recovery_left: int = 0):
        self.method = method
        self.since = since
        self.last_success = last_success
        self.recovery_left = recovery_left

    def __repr__(self) -> str:
        return (f"Enrollment(method={self.method!r}, since={self.since}, last_success={self.last_success}, "
                f"recovery_left={self.recovery_left})")


def next_lock(failures: int, now: float, max_failures: int, duration: int, permanent_after: int) -> float:
    """``locked_until`` after the ``failures``-th consecutive failure (0 = not locked).

    Shared by all backends so the lockout rule is written once: lock for
    ``duration`` from the ``max_failures``-th failure on (each further failure
    re-locks), and for good -- until an admin unlock -- at ``permanent_after``.
    ``duration`` 0 means every lock waits for the admin.
    """
    if failures >= permanent_after:
        return float(FOREVER)
    if failures >= max_failures:
        return float(FOREVER) if duration == 0 else now + duration
    return 0.0


class TotpAttempt:
    """What ``totp_attempt`` decided: ``verdict`` (one of the constants) and ``status``.

    ``status`` is the extension's LockStatus after the attempt, which the flow
    needs for its messages and log reasons: the consecutive failures counted so
    far and until when it is locked (``status.locked(now)`` after a failure: this
    one was the failure that locked it).

    - ACCEPTED: the code matched a step newer than the last accepted one; failures cleared.
    - WRONG: no step matched; one failure counted, the lock set when due.
    - REPLAYED: the step matched but it (or a newer one) was accepted before; counted as WRONG.
    - LOCKED: locked before the attempt, or parallel reservations took every slot;
      no code was checked, nothing reserved.
    - RESERVED: no step matched and the caller asked to keep the attempt open
      (the answer may be a recovery code): the attempt is counted as reserved,
      exactly as after ``reserve_attempt``; the caller settles it
      (``use_recovery_code`` / ``settle_success`` or ``settle_failure``).
    """

    ACCEPTED = "accepted"
    WRONG = "wrong code"
    REPLAYED = "replayed code"
    LOCKED = "locked"
    RESERVED = "reserved"

    __slots__ = ("verdict", "status")

    def __init__(self, verdict: str, status: LockStatus):
        self.verdict = verdict
        self.status = status

    def __repr__(self) -> str:
        return f"TotpAttempt({self.verdict!r}, {self.status!r})"


class EmailCheck:
    """What ``verify_email_code`` found; values are what the log reason says."""

    ACCEPTED = "accepted"
    WRONG = "wrong code"
    EXHAUSTED = "wrong code, no attempts left on this code"
    EXPIRED = "expired code"
    MISSING = "no code pending (used, replaced or never sent)"


def same_address(stored: str, code_hash: str) -> bool:
    """Whether a stored code's hash has the address tag of ``code_hash`` (see ``issue_email_code``)."""
    tag, dot, _rest = code_hash.partition(".")
    return not dot or stored.startswith(tag + ".")


class EmailIssue:
    """What ``issue_email_code`` did.

    ``issued``: the new code was stored and its mail must now be sent.
    Otherwise the extension (or the host) is throttled and nothing changed:
    ``pending`` says whether an earlier code is still usable (unexpired, attempts
    left), and ``retry_after`` (epoch s) when a new one may be sent.
    """

    __slots__ = ("issued", "pending", "retry_after")

    def __init__(self, issued: bool, pending: bool = False, retry_after: float = 0.0):
        self.issued = issued
        self.pending = pending
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"EmailIssue(issued={self.issued}, pending={self.pending}, retry_after={self.retry_after})"


class EmailLimits:
    """Lifetime, attempts and send throttles of email codes (from ``EmailConfig``).

    Passed to the store as one object so every backend applies the same rule:
    per extension at most one send per ``send_interval`` s and ``max_per_hour``
    per hour; per host (or cluster, with Redis) ``global_max_per_minute``.
    """

    __slots__ = ("lifetime", "max_attempts", "send_interval", "max_per_hour", "global_max_per_minute")

    def __init__(
        self,
        lifetime: int = 300,
        max_attempts: int = 3,
        send_interval: int = 60,
        max_per_hour: int = 5,
        global_max_per_minute: int = 60,
    ):
        self.lifetime = lifetime
        self.max_attempts = max_attempts
        self.send_interval = send_interval
        self.max_per_hour = max_per_hour
        self.global_max_per_minute = global_max_per_minute


def email_retry_after(
    user_sends: list[float], all_sends_last_minute: list[float], now: float, limits: EmailLimits
) -> float:
    """When the next send is allowed (<= ``now``: allowed now); the throttle rule, written once.

    ``user_sends`` are this extension's send times within the last hour,
    ``all_sends_last_minute`` everybody's within the last minute.
    """
    at = now
    if user_sends and limits.send_interval > 0:
        at = max(at, max(user_sends) + limits.send_interval)
    if len(user_sends) >= limits.max_per_hour:
        at = max(at, sorted(user_sends)[len(user_sends) - limits.max_per_hour] + 3600)
    if len(all_sends_last_minute) >= limits.global_max_per_minute:
        at = max(at, sorted(all_sends_last_minute)[len(all_sends_last_minute) - limits.global_max_per_minute] + 60)
    return at


class GateSession:
    """One web gate session as the state store keeps it (never its token).

    ``key`` is the keyed hash of the browser's token (HMAC, linkusd's key): a copy of
    the store gives no usable cookie. ``id`` is a short, non-secret handle for the
    admin (``linkus-2fa gate-sessions``/``gate-revoke``): the first 16 hex digits of
    ``key``. ``expires`` is the absolute end (created + lifetime), ``idle`` the idle
    timeout in seconds, ``seen`` the last use as recorded (written at most every few
    seconds, not per request). ``locked_until`` is the account's lock, read with the
    session in the same step, so a lock ends access at the next request.
    """

    __slots__ = ("key", "account", "method", "created", "seen", "client", "site", "expires", "idle",
                 "locked_until")

    def __init__(self, key: str, account: str, method: str, created: float, seen: float, client: str,
                 site: str, expires: float, idle: float, locked_until: float = 0.0):
        self.key = key
        self.account = account
        self.method = method
        self.created = created
        self.seen = seen
        self.client = client
        self.site = site
        self.expires = expires
        self.idle = idle
        self.locked_until = locked_until

    @property
    def id(self) -> str:
        return self.key[:GATE_ID_LEN]

    def alive(self, now: float, lifetime: float | None = None, idle: float | None = None) -> bool:
        """Within its stored limits and, when given, within ``lifetime``/``idle`` (a site's stricter ones)."""
        if now >= self.expires or now >= self.seen + self.idle:
            return False
        if lifetime is not None and now >= self.created + lifetime:
            return False
        return not (idle is not None and now >= self.seen + idle)

    def __repr__(self) -> str:
        return f"GateSession(id={self.id!r}, account={self.account!r}, created={self.created}, seen={self.seen})"


#: Hex digits of a gate session's key that make its admin id (64 bits: unique in practice).
GATE_ID_LEN = 16


class StateStore(Protocol):
    """See the module docstring; ``now`` is always passed in (injected clock).

    A TOTP login checks its code in ONE atomic step (one SQLite write
    transaction, one fsync; Redis: one script)::

        attempt = store.totp_attempt(user, now, check=<match_totp>, keep_reserved=<may be
                                     a recovery code>, **lockout)

    ACCEPTED, WRONG, REPLAYED and LOCKED are final: the store has recorded the
    success or counted the failure. RESERVED (no TOTP match, the answer may be a
    recovery code) continues as below from "<check the code>", its attempt
    already reserved: the slow recovery-code hash runs outside any transaction.

    Email codes, recovery codes and the web enrollment check like this (``user``
    is ``settings.account``, the canonical name the source returned)::

        status = store.reserve_attempt(user, now, **lockout)
        if status.locked(now): refuse as locked, check no code
        <check the code>
        right email / recovery code: verify_email_code / use_recovery_code
                     (they reset the failures themselves; settle_success is the same reset alone)
        wrong:       store.settle_failure(user, now, **lockout)

    The reservation counts the attempt as a failure before any code is
    checked, so at most ``max_failures`` codes are ever checked before the
    lock, whatever the number of parallel logins. The checks below refuse
    (Locked) only a lock that needs an admin: a temporary lock that parallel
    wrong attempts set after this attempt was reserved does not void it.
    """

    def lock_status(self, user: str, now: float) -> LockStatus:
        """Failures and lock of ``user`` as of ``now``."""
        ...

    def reserve_attempt(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        """ONE atomic step before a code is checked.

        Locked at ``now``: nothing changes; the status says locked. Else, when
        the failures already counted leave no free slot (``>= max_failures``
        and not exactly the count at which the last lock was set -- after a
        lock expires one attempt is free, as before), the lock is set per
        ``next_lock`` and the locked status returned, nothing reserved.
        Otherwise one failure is counted now and the (unlocked) status returned.
        """
        ...

    def totp_attempt(
        self, user: str, now: float, *, check: Callable[[], int | None], keep_reserved: bool = False,
        max_failures: int, duration: int, permanent_after: int,
    ) -> TotpAttempt:
        """Reserve, check and record one TOTP attempt as ONE atomic step.

        As ``reserve_attempt``: locked at ``now``, or every slot taken by
        parallel reservations (``count >= max_failures`` and not the count at
        which the last lock was set): LOCKED, the lock set per ``next_lock``,
        nothing reserved, and the code's verdict (if any) decides nothing.
        Otherwise ``check()`` gives the time step the code belongs to, or None:

        - a step newer than the last accepted one: ACCEPTED -- recorded as
          used, failures and a temporary lock cleared, the success noted
          (``Enrollment.last_success``);
        - an accepted step (or older): REPLAYED, counted as a failure;
        - None and ``keep_reserved``: RESERVED, the failure counted as by
          ``reserve_attempt`` and nothing more (the caller settles it);
        - None: WRONG, counted as a failure.

        A failure (WRONG, REPLAYED) counts one and locks when due, as
        ``reserve_attempt`` followed by ``settle_failure``.

        ``check`` must be pure, cheap and constant-time in the secret (HMAC,
        no I/O): SQLite calls it inside its write transaction, only for an
        admitted attempt; Redis cannot run it inside Lua and calls it just
        before its one script, whose verdict on the reservation decides
        whether the result counts. Either way at most ``max_failures``
        results ever count (and reach the person) before the lock.
        """
        ...

    def settle_failure(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        """The reserved attempt was wrong (or a replay): count nothing more; if the
        consecutive failures reached ``max_failures``, lock per ``next_lock``
        (never shortening a lock). One atomic step."""
        ...

    def settle_success(self, user: str, now: float) -> None:
        """A right code: clear the consecutive failures and a temporary lock
        (a lock that needs an admin stays). One atomic step."""
        ...

    def prune(self, now: float) -> int:
        """Delete records that can no longer change a decision at ``now``; return
        how many (SQLite rows; Redis: 0, its keys expire by TTL). Kept: locks,
        failure counts younger than the failure TTL, enrollments, recovery codes."""
        ...

    def issue_email_code(self, user: str, code_hash: str, now: float, limits: EmailLimits) -> EmailIssue:
        """Atomically store a new email code for ``user`` unless throttled.

        Throttled (see ``email_retry_after``): nothing changes; report whether
        the earlier code is still usable and was issued for the same address: its hash
        starts with the same ``TAG.`` as ``code_hash`` (emailcode.code_hash; a hash
        without a dot matches any). Otherwise: replace ``user``'s code
        with ``code_hash`` (expiring at ``now + limits.lifetime``, with
        ``limits.max_attempts`` attempts) and record one send -- one atomic
        write. Failure counts are never touched: a new code resets nothing.
        """
        ...

    def discard_email_code(self, user: str, code_hash: str) -> None:
        """The mail with ``code_hash`` could not be sent: delete that code (if it
        is still the current one) and its send record, atomically."""
        ...

    def verify_email_code(self, user: str, code_hash: str, now: float) -> str:
        """Atomically use one attempt on ``user``'s email code; return an EmailCheck.

        Raises Locked if the extension is locked until an admin unlocks it. ACCEPTED: the hash
        matched (constant-time compare where the backend allows), the code is
        deleted (single use) and the failure count cleared. WRONG: one attempt
        used; EXHAUSTED: that was the last, the code is deleted. EXPIRED: the
        code is deleted. MISSING: no code. An empty ``code_hash`` never matches
        (a malformed answer still uses an attempt).
        """
        ...

    def record_enrollment(self, user: str, method: str, now: float, *, totp_step: int | None = None) -> None:
        """Atomically note a confirmed enrollment: ``since`` = ``now``, no last success yet.

        ``totp_step`` is the step of the confirmation code, recorded as used so
        the code typed at enrollment cannot be replayed at a login (the old
        secret's record is replaced); None removes the TOTP replay record.
        """
        ...

    def enrollment(self, user: str) -> Enrollment | None:
        """Method, since, last success and recovery codes left; None if nothing is known."""
        ...

    def set_recovery_codes(self, user: str, salt: str, digests: Sequence[str]) -> None:
        """Atomically replace all recovery codes of ``user`` by these digests (one salt)."""
        ...

    def recovery_salt(self, user: str) -> str | None:
        """The salt of ``user``'s recovery codes, None if none are left."""
        ...

    def recovery_codes_left(self, user: str) -> int:
        ...

    def use_recovery_code(self, user: str, digest: str, now: float) -> bool:
        """Atomically spend the recovery code with ``digest``.

        Raises Locked if the extension is locked until an admin unlocks it. Returns False if no
        stored digest matches (compared in constant time). Otherwise deletes that
        code, clears the failure count and records the success -- one atomic write.
        """
        ...

    def start_grace(self, user: str, rhost: str, now: float, duration: int) -> None:
        """Atomically record that ``user`` gave a right code from ``rhost`` at ``now``:
        logins of ``user`` from ``rhost`` may skip the code until ``now + duration``.

        An existing later end is kept (never shortened), and the start is the latest right
        code's. ``rhost`` is a normalised IP address; the caller never passes an empty one.
        """
        ...

    def grace_active(self, user: str, rhost: str, now: float, period: int) -> bool:
        """True while a grace period of ``user`` from ``rhost`` lasts at ``now`` under the
        CURRENT policy's ``period``: its end, and its start + ``period``, are both after
        ``now``. A period opened under a longer grace_period (another profile, before the
        account joined a stricter group) so ends as the current policy says. A record without
        a start (written before starts were kept) never counts: one more code, never a skip."""
        ...

    def unlock(self, user: str) -> None:
        """Clear failures and lock (admin action)."""
        ...

    def forget(self, user: str) -> None:
        """Remove every record of ``user`` (2FA disabled, extension removed),
        grace periods included."""
        ...

    def cache_settings(self, source: str, user: str, data: str | None, now: float) -> None:
        """Remember ``data`` (opaque text, the source's serialised settings) as what
        ``source`` last said about ``user`` at ``now``; None forgets it.

        The LDAP source's offline cache (``ldap.cache_max_age``): one atomic write.
        """
        ...

    def cached_settings(self, source: str, user: str, now: float, max_age: float) -> str | None:
        """What ``cache_settings`` stored, if it was stored at most ``max_age``
        seconds before ``now`` (and not after ``now``: a clock that went back
        must not make an entry young again); else None."""
        ...

    # -- web gate sessions (docs/protocol.md "Gate messages") -------------------------

    def gate_create(self, key: str, account: str, method: str, client: str, site: str, now: float, *,
                    lifetime: int, idle: int, max_per_account: int, max_total: int) -> bool:
        """Atomically store a new gate session under ``key`` (the token's keyed hash).

        The account's least recently seen sessions are pushed out first so that at most
        ``max_per_account`` remain with the new one. Ended sessions are dropped; if
        ``max_total`` live sessions remain, False and nothing is stored.
        """
        ...

    def gate_check(self, key: str, now: float, *, lifetime: float, idle: float,
                   touch_after: float) -> GateSession | None:
        """The session under ``key`` if it is alive at ``now`` under its stored limits AND
        ``lifetime``/``idle`` (the matched site's; never longer than the stored ones), else None.

        One read (SQLite: one statement; Redis: one script) that also returns the account's
        ``locked_until``. A session past its stored limits is deleted. If it was last seen
        ``touch_after`` s ago or more, ``seen`` becomes ``now`` (the returned session keeps the
        value it had: the caller decided on it).
        """
        ...

    def gate_sessions(self, account: str | None, now: float) -> list[GateSession]:
        """Live sessions of ``account`` (None: everyone's), oldest first."""
        ...

    def gate_revoke(self, *, key: str | None = None, id: str | None = None,
                    account: str | None = None, everyone: bool = False) -> int:
        """End sessions by token hash, by admin id (a prefix of the key), by account, or all;
        exactly one selector. Returns how many ended. The next ``gate_check`` of any host
        sharing the store sees it."""
        ...

    def close(self) -> None:
        ...
