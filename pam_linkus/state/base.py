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

#: ``locked_until`` of a lock only an admin can open (an epoch far in the future,
#: representable as a 64-bit integer in SQLite and as a Redis integer).
FOREVER = 2**62


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


TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from typing import Protocol

    class StateStore(Protocol):
        """See the module docstring; ``now`` is always passed in (injected clock)."""

        def lock_status(self, user: str, now: float) -> LockStatus:
            """Failures and lock of ``user`` as of ``now``."""
            ...

        def accept_totp_step(self, user: str, step: int, now: float) -> bool:
            """Atomically accept TOTP time step ``step`` for ``user``.

            Raises Locked if the extension is locked at ``now``. Returns False if a
            step >= ``step`` was accepted before (replay, also of an older step).
            Otherwise records ``step`` as the last accepted one, clears the failure
            count, and returns True -- all in one atomic write.
            """
            ...

        def record_failure(
            self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
        ) -> LockStatus:
            """Atomically count one more consecutive failure and lock per ``next_lock``."""
            ...

        def unlock(self, user: str) -> None:
            """Clear failures and lock (admin action)."""
            ...

        def forget(self, user: str) -> None:
            """Remove every record of ``user`` (2FA disabled, extension removed)."""
            ...

        def close(self) -> None:
            ...
