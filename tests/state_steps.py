"""How the state tests drive a store: through the calls a login makes, nothing else.

A login checks a TOTP code with ``totp_attempt`` and counts any other wrong code
with ``reserve_attempt`` then ``settle_failure`` (pam_linkus/state/base.py,
StateStore). The helpers here are those calls with the lockout filled in, kept
once for the contract suites (tests/state_contract.py,
tests/state_recovery_contract.py) and every test that needs a failure counted.
"""

from __future__ import annotations

from typing import Any

from pam_linkus.state.base import LockStatus, TotpAttempt

NOW = 1_763_900_000.25
STEP = int(NOW // 30)


def totp_attempt(store: Any, user: str, now: float, step: int | None, *, keep_reserved: bool = False,
                 checked: list[int] | None = None, **lockout: int) -> TotpAttempt:
    """``store.totp_attempt`` with a check that returns ``step`` (None: a wrong code) and
    appends to ``checked`` each time the store calls it."""
    def check() -> int | None:
        if checked is not None:
            checked.append(1)
        return step

    limits = {"max_failures": 5, "duration": 900, "permanent_after": 1000, **lockout}
    result: TotpAttempt = store.totp_attempt(user, now, check=check, keep_reserved=keep_reserved, **limits)
    return result


def fail(store: Any, user: str, now: float, *, max_failures: int = 3, duration: int = 900,
         permanent_after: int = 10) -> LockStatus:
    """One wrong code of an extension that is not locked, counted as a login counts it:
    ``reserve_attempt``, then ``settle_failure``; the status after it.

    A refused reservation (locked, or no slot left) fails the test: a test that means
    to count a failure must not go on having counted none.
    """
    lockout = {"max_failures": max_failures, "duration": duration, "permanent_after": permanent_after}
    reserved: LockStatus = store.reserve_attempt(user, now, **lockout)
    assert not reserved.locked(now), f"{user!r} is locked at {now}: no failure can be counted ({reserved!r})"
    status: LockStatus = store.settle_failure(user, now, **lockout)
    return status
