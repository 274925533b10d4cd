"""The StateStore contract (pam_linkus/state/base.py), written once for every backend.

A backend's test module subclasses ``StateContract`` and overrides two fixtures:
``opener`` (a zero-argument callable that opens a NEW store on this test's own,
empty state -- called again in child processes) and ``unavailable_opener`` (one
that opens a store that cannot be reached: every operation, or the opening
itself, must raise StateUnavailable). Races run in real processes
(multiprocessing, fork), each with its own store, bounded in count and time.

Times are injected (``now``), never taken from the wall clock, except that
Redis TTLs run in real time, which no test here waits for.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from state_gate_contract import GateSessionContract
from state_recovery_contract import EnrollmentRecoveryContract
from state_steps import NOW, STEP, fail, totp_attempt

from pam_linkus.errors import Locked, StateUnavailable
from pam_linkus.recovery import digest, new_salt
from pam_linkus.state.base import (
    FOREVER,
    EmailCheck,
    EmailLimits,
    LockStatus,
    TotpAttempt,
    email_retry_after,
    next_lock,
)

#: A current grace_period longer than any period these tests open (it limits nothing).
LONG = 86400
#: Processes per race; the machine has 2 cores, more would only queue.
RACERS = 8
RACE_TIMEOUT = 60.0

Opener = Callable[[], Any]


def _race_child(opener: Opener, barrier: Any, results: Any, body: Callable[[Any, int], Any], index: int) -> None:
    try:
        store = opener()
        try:
            barrier.wait()
            results.put(("ok", body(store, index)))
        finally:
            store.close()
    except BaseException as exc:  # report anything to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def race(opener: Opener, body: Callable[[Any, int], Any], n: int = RACERS) -> list[Any]:
    """Run ``body(store, index)`` in ``n`` processes released at once; return their results."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n, timeout=RACE_TIMEOUT)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_child, args=(opener, barrier, results, body, i)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=RACE_TIMEOUT) for _ in procs]
    finally:
        for p in procs:
            p.join(RACE_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [value for kind, value in out if kind == "error"]
    assert not errors, errors[0]
    return [value for _, value in out]


def expected_locks(counts: int, times: list[float], max_failures: int, duration: int,
                   permanent_after: int) -> list[float]:
    """What the contract says ``locked_until`` is after each failure: next_lock, never shortened."""
    out, current = [], 0.0
    for count, when in zip(range(1, counts + 1), times, strict=True):
        current = max(current, next_lock(count, when, max_failures, duration, permanent_after))
        out.append(current)
    return out


class StateContract(EnrollmentRecoveryContract, GateSessionContract):
    """Every backend passes these; subclasses override ``opener`` and ``unavailable_opener``.

    ``CHECKS_ONLY_ADMITTED``: the backend calls ``totp_attempt``'s check only for an
    attempt it admitted (SQLite: inside its transaction); Redis calls it before its
    script, so there only the verdicts can be counted.
    """

    CHECKS_ONLY_ADMITTED = False

    @pytest.fixture
    def opener(self) -> Opener:
        raise NotImplementedError

    @pytest.fixture
    def unavailable_opener(self) -> Opener:
        raise NotImplementedError

    @pytest.fixture
    def store(self, opener: Opener) -> Iterator[Any]:
        store = opener()
        yield store
        store.close()

    def reserve(self, store: Any, user: str, now: float, *, max_failures: int = 3, duration: int = 900,
                permanent_after: int = 10) -> LockStatus:
        status: LockStatus = store.reserve_attempt(
            user, now, max_failures=max_failures, duration=duration, permanent_after=permanent_after
        )
        return status

    # -- replay ----------------------------------------------------------------------

    def test_unknown_extension_has_no_failures_and_no_lock(self, store: Any) -> None:
        status = store.lock_status("1001", NOW)
        assert (status.failures, status.locked_until) == (0, 0.0)
        assert not status.locked(NOW)

    def test_a_step_is_accepted_once(self, store: Any) -> None:
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW + 1, STEP).verdict == TotpAttempt.REPLAYED

    def test_an_older_step_after_a_newer_one_is_a_replay(self, store: Any) -> None:
        assert totp_attempt(store, "1001", NOW, STEP + 1).verdict == TotpAttempt.ACCEPTED
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW, STEP - 1).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW + 30, STEP + 2).verdict == TotpAttempt.ACCEPTED

    def test_steps_are_kept_per_extension(self, store: Any) -> None:
        users = ["1001", "1002", "a}:totp", "{1001}", "ü-ext", "x" * 200]
        for user in users:
            assert totp_attempt(store, user, NOW, STEP).verdict == TotpAttempt.ACCEPTED, user
        for user in users:
            assert totp_attempt(store, user, NOW, STEP).verdict == TotpAttempt.REPLAYED, user

    def test_acceptance_clears_the_failure_count(self, store: Any) -> None:
        fail(store, "1001", NOW)
        fail(store, "1001", NOW + 1)
        assert store.lock_status("1001", NOW + 2).failures == 2
        assert totp_attempt(store, "1001", NOW + 2, STEP).verdict == TotpAttempt.ACCEPTED
        status = store.lock_status("1001", NOW + 2)
        assert (status.failures, status.locked_until) == (0, 0.0)

    def test_a_replay_does_not_clear_the_failure_count(self, store: Any) -> None:
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        fail(store, "1001", NOW + 1)
        assert totp_attempt(store, "1001", NOW + 2, STEP).verdict == TotpAttempt.REPLAYED
        assert store.lock_status("1001", NOW + 2).failures == 2  # the earlier one kept, the replay counted

    # -- failures and lockout --------------------------------------------------------

    @pytest.mark.parametrize(
        ("max_failures", "duration", "permanent_after"),
        [(3, 900, 7), (1, 0, 4), (5, 60, 5), (2, 30, 100)],
    )
    def test_failures_lock_as_next_lock_says(self, store: Any, max_failures: int, duration: int,
                                             permanent_after: int) -> None:
        # A locked extension counts no failure, so each one comes 7.5 s after the last or,
        # when that one locked, once its lock has expired; a lock for good ends the run.
        n = min(permanent_after, 12)
        times, when = [], NOW
        for count in range(1, n + 1):
            times.append(when)
            lock = next_lock(count, when, max_failures, duration, permanent_after)
            if lock >= FOREVER:
                break
            when = max(when + 7.5, lock)
        want = expected_locks(len(times), times, max_failures, duration, permanent_after)
        for i, when in enumerate(times):
            status = fail(store, "1001", when, max_failures=max_failures, duration=duration,
                          permanent_after=permanent_after)
            assert (status.failures, status.locked_until) == (i + 1, want[i]), i
            seen = store.lock_status("1001", when)
            assert (seen.failures, seen.locked_until) == (i + 1, want[i]), i
        # what locked for good (duration 0, or permanent_after reached) counts nothing more
        if want[-1] >= FOREVER:
            far = times[-1] + 10 * 365 * 86400
            refused = store.reserve_attempt("1001", far, max_failures=max_failures, duration=duration,
                                            permanent_after=permanent_after)
            assert (refused.failures, refused.locked_until) == (len(times), float(FOREVER))

    def test_a_locked_extension_reserves_no_attempt_even_for_a_fresh_step(self, store: Any) -> None:
        for i in range(3):
            status = fail(store, "1001", NOW + i)
        assert status.locked_until == NOW + 2 + 900
        refused = self.reserve(store, "1001", NOW + 10)
        assert refused.locked(NOW + 10) and refused.locked_until == NOW + 2 + 900
        assert store.lock_status("1001", NOW + 10).failures == 3  # nothing reserved
        # after the lock one attempt is free again, and a right code clears it all
        assert totp_attempt(store, "1001", NOW + 903, STEP + 5, max_failures=3).verdict == TotpAttempt.ACCEPTED
        assert store.lock_status("1001", NOW + 903).failures == 0

    def test_a_permanent_lock_refuses_even_a_right_code(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits())
        fail(store, "1001", NOW, max_failures=1, duration=0, permanent_after=5)
        refused = totp_attempt(store, "1001", NOW + 10, STEP + 5, max_failures=1, duration=0, permanent_after=5)
        assert (refused.verdict, refused.status.permanent) == (TotpAttempt.LOCKED, True)
        with pytest.raises(Locked):
            store.verify_email_code("1001", "h1", NOW + 10)
        assert store.lock_status("1001", NOW + 10).permanent
        store.unlock("1001")
        assert totp_attempt(store, "1001", NOW + 11, STEP + 5).verdict == TotpAttempt.ACCEPTED

    def test_a_lock_expires_but_the_count_stays(self, store: Any) -> None:
        for i in range(3):
            fail(store, "1001", NOW + i)
        later = NOW + 2 + 900 + 1
        status = store.lock_status("1001", later)
        assert status.failures == 3 and not status.locked(later)
        # the next failure locks again at once
        again = fail(store, "1001", later)
        assert (again.failures, again.locked_until) == (4, later + 900)

    def test_permanent_after_locks_until_unlock(self, store: Any) -> None:
        lockout = {"max_failures": 2, "duration": 60, "permanent_after": 4}
        for i in range(4):
            status = fail(store, "1001", NOW + 61 * i, **lockout)  # each temporary lock has expired
        assert status.permanent and status.locked_until == float(FOREVER)
        far = NOW + 10 * 365 * 86400
        assert store.lock_status("1001", far).locked(far)
        assert totp_attempt(store, "1001", far, STEP + 10**6, **lockout).verdict == TotpAttempt.LOCKED

    def test_duration_zero_locks_until_unlock(self, store: Any) -> None:
        status = fail(store, "1001", NOW, max_failures=1, duration=0, permanent_after=5)
        assert status.permanent
        assert store.lock_status("1001", NOW + 10**8).locked(NOW + 10**8)

    def test_unlock_clears_count_and_lock_but_not_the_replay_record(self, store: Any) -> None:
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        for i in range(4):
            fail(store, "1001", NOW + 61 * i, max_failures=2, duration=60, permanent_after=4)
        assert store.lock_status("1001", NOW + 200).permanent
        store.unlock("1001")
        status = store.lock_status("1001", NOW + 200)
        assert (status.failures, status.locked_until) == (0, 0.0)
        assert totp_attempt(store, "1001", NOW + 200, STEP).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW + 230, STEP + 1).verdict == TotpAttempt.ACCEPTED

    def test_unlock_of_an_unknown_extension_is_harmless(self, store: Any) -> None:
        store.unlock("nobody")
        assert store.lock_status("nobody", NOW).failures == 0

    def test_forget_removes_every_record_of_one_extension(self, store: Any) -> None:
        for user in ("1001", "1002"):
            assert totp_attempt(store, user, NOW, STEP).verdict == TotpAttempt.ACCEPTED
            fail(store, user, NOW + 1)
        store.forget("1001")
        assert store.lock_status("1001", NOW + 2).failures == 0
        assert totp_attempt(store, "1001", NOW + 2, STEP).verdict == TotpAttempt.ACCEPTED
        assert store.lock_status("1002", NOW + 2).failures == 1
        assert totp_attempt(store, "1002", NOW + 2, STEP).verdict == TotpAttempt.REPLAYED

    def test_failures_are_per_extension(self, store: Any) -> None:
        for i in range(3):
            fail(store, "1001", NOW + i)
        assert store.lock_status("1001", NOW + 3).locked(NOW + 3)
        assert not store.lock_status("1002", NOW + 3).locked(NOW + 3)
        assert totp_attempt(store, "1002", NOW + 3, STEP).verdict == TotpAttempt.ACCEPTED

    def test_a_second_store_sees_what_the_first_wrote(self, store: Any, opener: Opener) -> None:
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        fail(store, "1002", NOW)
        other = opener()
        try:
            assert totp_attempt(other, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
            assert other.lock_status("1002", NOW).failures == 1
        finally:
            other.close()

    # -- settings cache (the LDAP source's offline copy) ------------------------------

    def test_cached_settings_are_returned_only_while_young_enough(self, store: Any) -> None:
        text = '{"method": "totp", "secret": "JBSWY3DPEHPK3PXP", "note": "ü \\n"}'
        assert store.cached_settings("ldap", "1001", NOW, 10) is None
        store.cache_settings("ldap", "1001", text, NOW)
        assert store.cached_settings("ldap", "1001", NOW + 10, 10) == text
        assert store.cached_settings("ldap", "1001", NOW + 10.5, 10) is None
        assert store.cached_settings("ldap", "1001", NOW - 1, 10) is None  # stored "in the future": clock went back
        assert store.cached_settings("other", "1001", NOW, 10) is None
        assert store.cached_settings("ldap", "1002", NOW, 10) is None

    def test_caching_again_replaces_and_none_forgets(self, store: Any) -> None:
        store.cache_settings("ldap", "1001", '{"method": "none"}', NOW)
        store.cache_settings("other", "1001", "kept", NOW)
        store.cache_settings("ldap", "1001", '{"method": "totp"}', NOW + 100)
        assert store.cached_settings("ldap", "1001", NOW + 100, 10) == '{"method": "totp"}'
        store.cache_settings("ldap", "1001", None, NOW + 101)
        assert store.cached_settings("ldap", "1001", NOW + 101, 10) is None
        assert store.cached_settings("other", "1001", NOW + 101, 1000) == "kept"
        store.cache_settings("ldap", "nobody", None, NOW)  # forgetting nothing is harmless

    def test_forget_removes_the_cached_settings(self, store: Any) -> None:
        store.cache_settings("ldap", "1001", "x", NOW)
        store.cache_settings("ldap", "1002", "y", NOW)
        store.forget("1001")
        assert store.cached_settings("ldap", "1001", NOW, 10) is None
        assert store.cached_settings("ldap", "1002", NOW, 10) == "y"

    # -- grace periods (pam_linkus.policy) ---------------------------------------------

    def test_a_grace_period_is_per_extension_and_address_and_ends(self, store: Any) -> None:
        assert store.grace_active("1001", "192.0.2.7", NOW, LONG) is False
        store.start_grace("1001", "192.0.2.7", NOW, 300)
        assert store.grace_active("1001", "192.0.2.7", NOW + 299, LONG) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 300, LONG) is False
        assert store.grace_active("1001", "192.0.2.8", NOW + 1, LONG) is False
        assert store.grace_active("1002", "192.0.2.7", NOW + 1, LONG) is False
        store.start_grace("1001", "2001:db8::7", NOW, 60)
        assert store.grace_active("1001", "2001:db8::7", NOW + 59, LONG) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 59, LONG) is True

    def test_a_grace_period_is_never_shortened(self, store: Any) -> None:
        store.start_grace("1001", "192.0.2.7", NOW, 600)
        store.start_grace("1001", "192.0.2.7", NOW + 10, 60)
        assert store.grace_active("1001", "192.0.2.7", NOW + 599, LONG) is True
        store.start_grace("1001", "192.0.2.7", NOW + 500, 600)  # a later right code extends it
        assert store.grace_active("1001", "192.0.2.7", NOW + 1099, LONG) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 1100, LONG) is False

    def test_an_expired_grace_period_can_start_again(self, store: Any) -> None:
        store.start_grace("1001", "192.0.2.7", NOW, 60)
        store.start_grace("1001", "192.0.2.8", NOW + 100, 60)  # drops the expired one
        assert store.grace_active("1001", "192.0.2.7", NOW + 101, LONG) is False
        store.start_grace("1001", "192.0.2.7", NOW + 200, 60)
        assert store.grace_active("1001", "192.0.2.7", NOW + 201, LONG) is True

    def test_a_grace_period_ends_at_its_start_plus_the_current_period(self, store: Any) -> None:
        """Opened under a long grace_period, it lasts only as long as the policy asked now
        allows from the right code (another profile; the account joined a stricter group)."""
        store.start_grace("1001", "192.0.2.7", NOW, 3600)
        assert store.grace_active("1001", "192.0.2.7", NOW + 59, 60) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 60, 60) is False
        assert store.grace_active("1001", "192.0.2.7", NOW + 60, 3600) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 3600, 7200) is False  # never past its own end
        store.start_grace("1001", "192.0.2.7", NOW + 100, 60)  # a later right code starts it again
        assert store.grace_active("1001", "192.0.2.7", NOW + 159, 60) is True
        assert store.grace_active("1001", "192.0.2.7", NOW + 160, 60) is False
        assert store.grace_active("1001", "192.0.2.7", NOW + 160, 3600) is True  # the end stays the later one

    def test_forget_and_unlock_and_grace(self, store: Any) -> None:
        for user in ("1001", "1002"):
            store.start_grace(user, "192.0.2.7", NOW, 300)
        store.unlock("1001")
        assert store.grace_active("1001", "192.0.2.7", NOW + 1, LONG) is True  # unlock is about failures only
        store.forget("1001")
        assert store.grace_active("1001", "192.0.2.7", NOW + 1, LONG) is False
        assert store.grace_active("1002", "192.0.2.7", NOW + 1, LONG) is True

    def test_parallel_grace_periods_from_many_addresses_all_count(self, opener: Opener) -> None:
        race(opener, lambda s, i: s.start_grace("1001", f"192.0.2.{i + 1}", NOW + i, 300))
        check = opener()
        try:
            for i in range(RACERS):
                assert check.grace_active("1001", f"192.0.2.{i + 1}", NOW + 299, LONG) is True
            assert check.grace_active("1001", "192.0.2.200", NOW + 10, LONG) is False
        finally:
            check.close()

    # -- exact lockout: reserve, then settle --------------------------------------------

    LOCKOUT = {"max_failures": 5, "duration": 900, "permanent_after": 1000}

    def test_a_reservation_counts_a_failure_before_any_code_is_checked(self, store: Any) -> None:
        status = store.reserve_attempt("1001", NOW, **self.LOCKOUT)
        assert (status.failures, status.locked(NOW)) == (1, False)
        assert store.lock_status("1001", NOW).failures == 1
        # a wrong code settles without counting again
        assert store.settle_failure("1001", NOW, **self.LOCKOUT).failures == 1

    def test_settling_the_max_failures_th_wrong_code_locks(self, store: Any) -> None:
        for i in range(5):
            assert not store.reserve_attempt("1001", NOW + i, **self.LOCKOUT).locked(NOW + i)
            status = store.settle_failure("1001", NOW + i, **self.LOCKOUT)
        assert status.failures == 5 and status.locked_until == NOW + 4 + 900
        locked = store.reserve_attempt("1001", NOW + 5, **self.LOCKOUT)
        assert locked.locked(NOW + 5) and locked.failures == 5

    def test_when_parallel_attempts_took_every_slot_the_next_locks_without_reserving(self, store: Any) -> None:
        for _ in range(5):
            assert not store.reserve_attempt("1001", NOW, **self.LOCKOUT).locked(NOW)
        sixth = store.reserve_attempt("1001", NOW, **self.LOCKOUT)
        assert sixth.locked(NOW) and sixth.failures == 5 and sixth.locked_until == NOW + 900

    def test_after_a_lock_expires_exactly_one_attempt_is_free(self, store: Any) -> None:
        for _ in range(5):
            store.reserve_attempt("1001", NOW, **self.LOCKOUT)
            store.settle_failure("1001", NOW, **self.LOCKOUT)
        later = NOW + 901
        assert not store.reserve_attempt("1001", later, **self.LOCKOUT).locked(later)
        second = store.reserve_attempt("1001", later, **self.LOCKOUT)  # a parallel one
        assert second.locked(later) and second.failures == 6
        again = store.settle_failure("1001", later, **self.LOCKOUT)  # the first was wrong too
        assert again.locked_until == later + 900

    def test_a_replayed_step_settles_as_a_failure(self, store: Any) -> None:
        assert totp_attempt(store, "1001", NOW, STEP, **self.LOCKOUT).verdict == TotpAttempt.ACCEPTED
        replayed = totp_attempt(store, "1001", NOW + 1, STEP, **self.LOCKOUT)
        assert (replayed.verdict, replayed.status.failures) == (TotpAttempt.REPLAYED, 1)
        assert store.lock_status("1001", NOW + 1).failures == 1

    def test_settle_success_clears_failures_and_a_temporary_lock(self, store: Any) -> None:
        for _ in range(5):
            store.reserve_attempt("1001", NOW, **self.LOCKOUT)
        store.settle_failure("1001", NOW, **self.LOCKOUT)
        store.settle_success("1001", NOW + 1)
        status = store.lock_status("1001", NOW + 1)
        assert (status.failures, status.locked(NOW + 1)) == (0, False)

    def test_settle_success_keeps_a_permanent_lock(self, store: Any) -> None:
        fail(store, "1001", NOW, max_failures=1, duration=0, permanent_after=5)
        store.settle_success("1001", NOW + 1)
        assert store.lock_status("1001", NOW + 1).permanent

    def test_200_wrong_codes_from_20_threads_check_exactly_max_failures(self, store: Any) -> None:
        """Issue 12 item 2: one shared store (linkusd's worker threads), 200 wrong codes."""
        checked: list[int] = []
        start = threading.Barrier(20, timeout=RACE_TIMEOUT)

        def attempt(i: int) -> None:
            if i < 20:
                start.wait()
            if store.reserve_attempt("1001", NOW, **self.LOCKOUT).locked(NOW):
                return
            checked.append(i)  # here a login would check its (wrong) code
            store.settle_failure("1001", NOW, **self.LOCKOUT)

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(attempt, range(200), timeout=RACE_TIMEOUT))
        assert len(checked) == 5
        status = store.lock_status("1001", NOW)
        assert status.failures == 5 and status.locked(NOW)

    def test_wrong_codes_from_parallel_processes_check_exactly_max_failures(self, opener: Opener) -> None:
        lockout = self.LOCKOUT

        def body(s: Any, _i: int) -> int:
            checked = 0
            for _ in range(25):
                if not s.reserve_attempt("1001", NOW, **lockout).locked(NOW):
                    checked += 1
                    s.settle_failure("1001", NOW, **lockout)
            return checked

        assert sum(race(opener, body)) == 5

    def test_prune_keeps_what_still_decides(self, store: Any) -> None:
        far = NOW + 400 * 86400
        fail(store, "locked", NOW, max_failures=1, duration=0, permanent_after=5)
        store.record_enrollment("1001", "totp", NOW, totp_step=STEP)
        store.issue_email_code("1002", "h1", far - 10, EmailLimits())
        store.start_grace("1003", "192.0.2.1", far - 10, 300)
        assert isinstance(store.prune(far), int)
        assert store.lock_status("locked", far).permanent
        assert store.enrollment("1001") is not None
        assert store.verify_email_code("1002", "h1", far) == EmailCheck.ACCEPTED
        assert store.grace_active("1003", "192.0.2.1", far, LONG) is True

    # -- one-step TOTP attempt (reserve + check + record) ------------------------------

    def test_totp_attempt_accepts_a_step_once_and_a_replay_is_a_failure(self, store: Any) -> None:
        first = totp_attempt(store, "1001", NOW, STEP)
        assert first.verdict == TotpAttempt.ACCEPTED
        assert (first.status.failures, first.status.locked_until) == (0, 0.0)
        again = totp_attempt(store, "1001", NOW + 1, STEP)
        assert (again.verdict, again.status.failures, again.status.locked(NOW + 1)) == (TotpAttempt.REPLAYED, 1, False)
        older = totp_attempt(store, "1001", NOW + 2, STEP - 1)
        assert (older.verdict, older.status.failures) == (TotpAttempt.REPLAYED, 2)
        assert store.lock_status("1001", NOW + 2).failures == 2
        assert totp_attempt(store, "1001", NOW + 3, STEP).verdict == TotpAttempt.REPLAYED  # the record stays
        newer = totp_attempt(store, "1001", NOW + 30, STEP + 1)
        assert newer.verdict == TotpAttempt.ACCEPTED
        assert store.lock_status("1001", NOW + 30).failures == 0
        assert store.enrollment("1001").last_success == NOW + 30

    def test_totp_attempt_takes_the_step_of_the_enrollment_into_account(self, store: Any) -> None:
        store.record_enrollment("1001", "totp", NOW, totp_step=STEP)  # the other writer of the replay record
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED

    def test_totp_attempt_wrong_codes_count_and_lock_at_max_failures(self, store: Any) -> None:
        for i in range(4):
            wrong = totp_attempt(store, "1001", NOW + i, None)
            assert (wrong.verdict, wrong.status.failures, wrong.status.locked(NOW + i)) == (
                TotpAttempt.WRONG, i + 1, False)
        fifth = totp_attempt(store, "1001", NOW + 4, None)
        assert (fifth.verdict, fifth.status.failures, fifth.status.locked_until) == (
            TotpAttempt.WRONG, 5, NOW + 4 + 900)
        seen = store.lock_status("1001", NOW + 5)
        assert (seen.failures, seen.locked_until) == (5, NOW + 4 + 900)

    def test_totp_attempt_while_locked_records_nothing_even_a_right_step(self, store: Any) -> None:
        for i in range(5):
            totp_attempt(store, "1001", NOW + i, None)
        checked: list[int] = []
        refused = totp_attempt(store, "1001", NOW + 10, STEP, checked=checked)
        assert (refused.verdict, refused.status.failures, refused.status.locked_until) == (
            TotpAttempt.LOCKED, 5, NOW + 4 + 900)
        if self.CHECKS_ONLY_ADMITTED:
            assert checked == []
        assert store.lock_status("1001", NOW + 10).failures == 5  # nothing reserved
        # the refused step was not recorded: once the lock expires it is still good
        later = NOW + 4 + 900
        accepted = totp_attempt(store, "1001", later, STEP)
        assert accepted.verdict == TotpAttempt.ACCEPTED
        assert store.lock_status("1001", later).failures == 0

    def test_totp_attempt_after_a_lock_expires_exactly_one_attempt_is_free(self, store: Any) -> None:
        for _ in range(5):
            totp_attempt(store, "1001", NOW, None)
        later = NOW + 900
        sixth = totp_attempt(store, "1001", later, None)
        assert (sixth.verdict, sixth.status.failures, sixth.status.locked_until) == (
            TotpAttempt.WRONG, 6, later + 900)
        assert totp_attempt(store, "1001", later + 1, STEP).verdict == TotpAttempt.LOCKED

    def test_totp_attempt_permanent_lock_refuses_a_right_code_until_unlock(self, store: Any) -> None:
        lockout = {"max_failures": 2, "duration": 60, "permanent_after": 4}
        verdicts, when = [], NOW
        for _ in range(6):
            verdicts.append(totp_attempt(store, "1001", when, None, **lockout).verdict)
            when += 61  # each temporary lock has expired by the next attempt
        assert verdicts == [TotpAttempt.WRONG] * 4 + [TotpAttempt.LOCKED] * 2
        status = store.lock_status("1001", when)
        assert status.permanent and status.failures == 4
        far = NOW + 10 * 365 * 86400
        assert totp_attempt(store, "1001", far, STEP + 10**6, **lockout).verdict == TotpAttempt.LOCKED
        store.unlock("1001")
        assert totp_attempt(store, "1001", far, STEP + 10**6, **lockout).verdict == TotpAttempt.ACCEPTED

    def test_totp_attempt_when_parallel_reservations_took_every_slot_locks(self, store: Any) -> None:
        for _ in range(5):
            assert not store.reserve_attempt("1001", NOW, **self.LOCKOUT).locked(NOW)
        checked: list[int] = []
        sixth = totp_attempt(store, "1001", NOW, STEP, checked=checked)
        assert (sixth.verdict, sixth.status.failures, sixth.status.locked_until) == (
            TotpAttempt.LOCKED, 5, NOW + 900)
        if self.CHECKS_ONLY_ADMITTED:
            assert checked == []
        # the refused step was not recorded: the one attempt free once the lock expires takes it
        assert totp_attempt(store, "1001", NOW + 900, STEP).verdict == TotpAttempt.ACCEPTED

    def test_totp_attempt_follows_reserve_then_settle(self, store: Any) -> None:
        """The one step decides exactly as reserve, check, settle: random attempts (wrong,
        right, replayed) on two extensions, one through ``totp_attempt``, the other through
        ``reserve_attempt`` and ``settle_success`` / ``settle_failure`` with the replay rule
        (a step newer than the last accepted one) kept here, give the same verdicts and the
        same failures and locks after each attempt."""
        lockout = {"max_failures": 3, "duration": 300, "permanent_after": 8}
        rng = random.Random(11)
        when, last = NOW, 0
        last_two: int | None = None  # the last step accepted on "two"
        for i in range(60):
            when += rng.choice([0.5, 5, 100, 301])
            kind = rng.choice(["wrong", "wrong", "right", "replay"])
            step = None if kind == "wrong" else (int(when // 30) + i * 10 if kind == "right" else last)
            one = totp_attempt(store, "one", when, step, **lockout)
            reserved = store.reserve_attempt("two", when, **lockout)
            if reserved.locked(when):
                two = TotpAttempt.LOCKED
            elif step is not None and (last_two is None or step > last_two):
                store.settle_success("two", when)
                last_two, two = step, TotpAttempt.ACCEPTED
            else:
                store.settle_failure("two", when, **lockout)
                two = TotpAttempt.WRONG if step is None else TotpAttempt.REPLAYED
            if one.verdict == TotpAttempt.ACCEPTED:
                last = step or 0
            assert one.verdict == two, (i, kind)
            a, b = store.lock_status("one", when), store.lock_status("two", when)
            assert (a.failures, a.locked_until) == (b.failures, b.locked_until), (i, kind)
            if one.verdict != TotpAttempt.ACCEPTED:
                assert (one.status.failures, one.status.locked_until) == (a.failures, a.locked_until), i
            if a.permanent:
                store.unlock("one")
                store.unlock("two")

    def test_totp_attempt_keep_reserved_leaves_a_wrong_code_to_the_caller(self, store: Any) -> None:
        for i in range(4):
            assert totp_attempt(store, "1001", NOW + i, None).verdict == TotpAttempt.WRONG
        kept = totp_attempt(store, "1001", NOW + 4, None, keep_reserved=True)
        # reserved as reserve_attempt reserves: counted, not locked yet
        assert (kept.verdict, kept.status.failures, kept.status.locked(NOW + 4)) == (TotpAttempt.RESERVED, 5, False)
        # that slot was the last: a parallel attempt now is refused
        assert totp_attempt(store, "1001", NOW + 4, STEP).verdict == TotpAttempt.LOCKED
        settled = store.settle_failure("1001", NOW + 5, **self.LOCKOUT)
        assert (settled.failures, settled.locked(NOW + 5)) == (5, True)

    def test_totp_attempt_keep_reserved_then_a_recovery_code_clears_the_failures(self, store: Any) -> None:
        salt = new_salt()
        store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
        for i in range(2):
            totp_attempt(store, "1001", NOW + i, None)
        kept = totp_attempt(store, "1001", NOW + 2, None, keep_reserved=True)
        assert (kept.verdict, kept.status.failures) == (TotpAttempt.RESERVED, 3)
        assert store.use_recovery_code("1001", digest("abcdefghij", salt), NOW + 3) is True
        status = store.lock_status("1001", NOW + 3)
        assert (status.failures, status.locked_until) == (0, 0.0)
        # keep_reserved changes nothing for a right step
        assert totp_attempt(store, "1001", NOW + 4, STEP, keep_reserved=True).verdict == TotpAttempt.ACCEPTED

    def test_totp_attempt_whose_check_raises_changes_nothing(self, store: Any) -> None:
        def broken() -> int | None:
            raise RuntimeError("broken check")

        with pytest.raises(RuntimeError):
            store.totp_attempt("1001", NOW, check=broken, **self.LOCKOUT)
        assert store.lock_status("1001", NOW).failures == 0  # SQLite: rolled back
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED  # and the store still writes

    def test_totp_attempt_wrong_codes_from_20_threads_count_exactly_max_failures(self, store: Any) -> None:
        checked: list[int] = []
        start = threading.Barrier(20, timeout=RACE_TIMEOUT)

        def attempt(i: int) -> str:
            if i < 20:
                start.wait()
            return totp_attempt(store, "1001", NOW, None, checked=checked).verdict

        with ThreadPoolExecutor(20) as pool:
            verdicts = list(pool.map(attempt, range(200), timeout=RACE_TIMEOUT))
        assert verdicts.count(TotpAttempt.WRONG) == 5
        assert verdicts.count(TotpAttempt.LOCKED) == 195
        if self.CHECKS_ONLY_ADMITTED:
            assert len(checked) == 5
        status = store.lock_status("1001", NOW)
        assert status.failures == 5 and status.locked(NOW)

    def test_totp_attempt_wrong_codes_from_parallel_processes_count_exactly_max_failures(
            self, opener: Opener) -> None:
        checks_only_admitted = self.CHECKS_ONLY_ADMITTED

        def body(s: Any, _i: int) -> int:
            checked: list[int] = []
            wrong = 0
            for _ in range(25):
                if totp_attempt(s, "1001", NOW, None, checked=checked).verdict == TotpAttempt.WRONG:
                    wrong += 1
            assert not checks_only_admitted or len(checked) == wrong
            return wrong

        assert sum(race(opener, body)) == 5

    def test_totp_attempt_parallel_logins_with_one_code_give_exactly_one_success(self, opener: Opener) -> None:
        lockout = {"max_failures": 20}
        results = race(opener, lambda s, _i: totp_attempt(s, "1001", NOW, STEP, **lockout).verdict)
        assert sorted(results) == [TotpAttempt.ACCEPTED] + [TotpAttempt.REPLAYED] * (RACERS - 1)
        check = opener()
        try:
            assert check.lock_status("1001", NOW).failures == RACERS - 1  # every replay counted
        finally:
            check.close()

    def test_totp_attempt_parallel_right_and_wrong_codes_within_the_slots(self, opener: Opener) -> None:
        """Half the racers carry the right step, half a wrong code, max_failures 3. Whatever
        the order: one acceptance at most; without one, exactly 3 wrong codes counted and
        the rest refused; with one, at most 2 failures before it (a 3rd would have locked)
        and at most 3 after it."""
        def body(s: Any, i: int) -> str:
            return totp_attempt(s, "1001", NOW, STEP if i % 2 else None, max_failures=3).verdict

        results = race(opener, body)
        failed = results.count(TotpAttempt.WRONG) + results.count(TotpAttempt.REPLAYED)
        check = opener()
        try:
            status = check.lock_status("1001", NOW)
        finally:
            check.close()
        if TotpAttempt.ACCEPTED not in results:
            assert (results.count(TotpAttempt.WRONG), results.count(TotpAttempt.LOCKED)) == (3, RACERS - 3)
            assert (status.failures, status.locked(NOW)) == (3, True)
        else:
            assert results.count(TotpAttempt.ACCEPTED) == 1
            assert failed <= 5 and status.failures <= 3 and status.failures <= failed

    # -- races between processes -----------------------------------------------------

    def test_parallel_old_and_new_steps_accept_the_new_one_once(self, opener: Opener) -> None:
        # Half offer STEP, half STEP + 1. STEP + 1 wins exactly once whatever the order;
        # STEP at most once, and only if it came before any STEP + 1.
        def body(s: Any, i: int) -> tuple[int, str]:
            step = STEP + i % 2
            return step, totp_attempt(s, "1001", NOW, step, max_failures=RACERS + 1).verdict

        wins = [step for step, verdict in race(opener, body) if verdict == TotpAttempt.ACCEPTED]
        assert wins.count(STEP + 1) == 1 and wins.count(STEP) <= 1

    def test_failures_from_parallel_processes_all_count(self, opener: Opener) -> None:
        per_process = 5
        # every reservation finds a free slot; the last one's settlement locks
        lockout = {"max_failures": RACERS * per_process, "duration": 60, "permanent_after": 100}

        def body(s: Any, _i: int) -> list[int]:
            counts = []
            for _ in range(per_process):
                reserved = s.reserve_attempt("1001", NOW, **lockout)
                assert not reserved.locked(NOW)
                s.settle_failure("1001", NOW, **lockout)
                counts.append(reserved.failures)
            return counts

        results = race(opener, body)
        counts = sorted(c for chunk in results for c in chunk)
        assert counts == list(range(1, RACERS * per_process + 1))  # each increment seen exactly once
        check = opener()
        try:
            status = check.lock_status("1001", NOW)
            assert status.failures == RACERS * per_process
            assert status.locked_until == NOW + 60
        finally:
            check.close()

    # -- email codes -----------------------------------------------------------------

    def test_email_code_is_single_use(self, store: Any) -> None:
        assert store.issue_email_code("1001", "h1", NOW, EmailLimits()).issued is True
        assert store.verify_email_code("1001", "h2", NOW + 1) == EmailCheck.WRONG
        assert store.verify_email_code("1001", "h1", NOW + 2) == EmailCheck.ACCEPTED
        assert store.verify_email_code("1001", "h1", NOW + 3) == EmailCheck.MISSING

    def test_email_code_expires(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits(lifetime=300))
        assert store.verify_email_code("1001", "h2", NOW + 299.5) == EmailCheck.WRONG
        assert store.verify_email_code("1001", "h1", NOW + 300) == EmailCheck.EXPIRED
        assert store.verify_email_code("1001", "h1", NOW + 301) == EmailCheck.MISSING

    def test_email_attempts_run_out(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits(max_attempts=3))
        assert [store.verify_email_code("1001", "", NOW) for _ in range(4)] == [
            EmailCheck.WRONG, EmailCheck.WRONG, EmailCheck.EXHAUSTED, EmailCheck.MISSING]
        assert store.verify_email_code("1001", "h1", NOW) == EmailCheck.MISSING

    def test_a_new_email_code_replaces_the_old_and_resets_no_failures(self, store: Any) -> None:
        limits = EmailLimits(send_interval=0, max_attempts=2)
        store.issue_email_code("1001", "h1", NOW, limits)
        assert store.verify_email_code("1001", "x", NOW) == EmailCheck.WRONG
        fail(store, "1001", NOW)
        assert store.issue_email_code("1001", "h2", NOW + 1, limits).issued is True
        assert store.lock_status("1001", NOW + 1).failures == 1
        assert store.verify_email_code("1001", "h1", NOW + 2) == EmailCheck.WRONG
        assert store.verify_email_code("1001", "h2", NOW + 2) == EmailCheck.ACCEPTED  # fresh attempts
        assert store.lock_status("1001", NOW + 2).failures == 0

    def test_email_codes_are_per_extension(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits())
        store.issue_email_code("1002", "h2", NOW, EmailLimits())
        assert store.verify_email_code("1002", "h1", NOW) == EmailCheck.WRONG
        assert store.verify_email_code("1001", "h1", NOW) == EmailCheck.ACCEPTED

    def test_a_temporary_lock_set_after_the_reservation_does_not_void_it(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits())
        kw = {"max_failures": 3, "duration": 60, "permanent_after": 10}
        for _ in range(3):
            assert not store.reserve_attempt("1001", NOW, **kw).locked(NOW)
        # two parallel attempts were wrong and lock the extension ...
        assert store.settle_failure("1001", NOW, **kw).locked(NOW)
        # ... the third, reserved before, carried the right code
        assert store.verify_email_code("1001", "h1", NOW + 1) == EmailCheck.ACCEPTED
        status = store.lock_status("1001", NOW + 1)
        assert (status.failures, status.locked(NOW + 1)) == (0, False)

    def test_email_send_interval_and_pending_code(self, store: Any) -> None:
        limits = EmailLimits(send_interval=60, max_attempts=1)
        assert store.issue_email_code("1001", "h1", NOW, limits).issued is True
        throttled = store.issue_email_code("1001", "h2", NOW + 10, limits)
        assert (throttled.issued, throttled.pending, throttled.retry_after) == (False, True, NOW + 60)
        assert store.verify_email_code("1001", "h1", NOW + 11) == EmailCheck.ACCEPTED  # the old code still works
        assert store.issue_email_code("1001", "h3", NOW + 20, limits).pending is False
        assert store.issue_email_code("1001", "h4", NOW + 60, limits).issued is True

    def test_a_pending_code_counts_only_for_the_address_it_was_issued_for(self, store: Any) -> None:
        """The part of the hash before the dot tags the address: a code mailed elsewhere (an enrollment
        to a new address, another tab) is never "still valid" for this one."""
        limits = EmailLimits(send_interval=60)
        assert store.issue_email_code("1001", "aaaa.h1", NOW, limits).issued is True
        same = store.issue_email_code("1001", "aaaa.h2", NOW + 10, limits)
        other = store.issue_email_code("1001", "bbbb.h3", NOW + 10, limits)
        assert (same.issued, same.pending) == (False, True)
        assert (other.issued, other.pending, other.retry_after) == (False, False, NOW + 60)
        assert store.issue_email_code("1001", "aaa.h4", NOW + 11, limits).pending is False  # a prefix is no tag

    def test_email_hourly_and_global_throttles(self, store: Any) -> None:
        limits = EmailLimits(send_interval=0, max_per_hour=2, global_max_per_minute=3)
        assert [store.issue_email_code("1001", f"a{i}", NOW + i, limits).issued for i in range(3)] == [
            True, True, False]
        assert store.issue_email_code("1001", "a9", NOW + 2, limits).retry_after == NOW + 3600
        assert store.issue_email_code("1002", "b0", NOW + 3, limits).issued is True
        blocked = store.issue_email_code("1003", "c0", NOW + 4, limits)
        assert (blocked.issued, blocked.retry_after) == (False, NOW + 60)
        assert store.issue_email_code("1003", "c1", NOW + 60, limits).issued is True
        assert store.issue_email_code("1001", "a10", NOW + 3600, limits).issued is True

    def test_a_discarded_email_code_is_gone_and_not_counted(self, store: Any) -> None:
        limits = EmailLimits(send_interval=60)
        store.issue_email_code("1001", "h1", NOW, limits)
        store.discard_email_code("1001", "other")
        assert store.issue_email_code("1001", "h2", NOW + 1, limits).pending is True
        store.discard_email_code("1001", "h1")
        assert store.verify_email_code("1001", "h1", NOW + 2) == EmailCheck.MISSING
        assert store.issue_email_code("1001", "h3", NOW + 2, limits).issued is True

    def test_forget_removes_email_codes_and_sends(self, store: Any) -> None:
        store.issue_email_code("1001", "h1", NOW, EmailLimits(send_interval=60, global_max_per_minute=100))
        store.forget("1001")
        assert store.verify_email_code("1001", "h1", NOW) == EmailCheck.MISSING
        assert store.issue_email_code("1001", "h2", NOW + 1, EmailLimits(send_interval=60)).issued is True

    def test_an_empty_hash_never_matches(self, store: Any) -> None:
        store.issue_email_code("1001", "", NOW, EmailLimits())
        assert store.verify_email_code("1001", "", NOW) == EmailCheck.WRONG

    @pytest.mark.parametrize(("interval", "per_hour", "per_minute"), [(60, 5, 60), (0, 3, 100), (10, 100, 4)])
    def test_email_throttles_follow_email_retry_after(self, store: Any, interval: int, per_hour: int,
                                                      per_minute: int) -> None:
        limits = EmailLimits(send_interval=interval, max_per_hour=per_hour, global_max_per_minute=per_minute)
        sends: list[tuple[str, float]] = []
        for i in range(40):
            user = ("1001", "1002", "1003")[i % 3]
            now = NOW + i * 13.37
            mine = [t for u, t in sends if u == user and t > now - 3600]
            everyone = [t for _, t in sends if t > now - 60]
            want = email_retry_after(mine, everyone, now, limits)
            got = store.issue_email_code(user, f"h{i}", now, limits)
            assert got.issued is (want <= now), i
            if got.issued:
                sends.append((user, now))
            else:
                assert got.retry_after == want, i

    def test_forget_takes_the_sends_out_of_the_global_throttle(self, store: Any) -> None:
        limits = EmailLimits(send_interval=60, global_max_per_minute=2)
        store.issue_email_code("1001", "h1", NOW, limits)
        store.issue_email_code("1002", "h2", NOW, limits)
        store.forget("1001")
        assert store.verify_email_code("1001", "h1", NOW) == EmailCheck.MISSING
        assert store.verify_email_code("1002", "h2", NOW) == EmailCheck.ACCEPTED
        # 1001's send left the global count too
        assert store.issue_email_code("1001", "h3", NOW + 1, limits).issued is True

    def test_parallel_logins_with_one_email_code_give_one_success(self, opener: Opener) -> None:
        setup = opener()
        try:
            setup.issue_email_code("1001", "h1", NOW, EmailLimits(max_attempts=10))
        finally:
            setup.close()
        results = race(opener, lambda s, _i: s.verify_email_code("1001", "h1", NOW + 1))
        assert sorted(results) == sorted([EmailCheck.ACCEPTED] + [EmailCheck.MISSING] * (RACERS - 1))

    def test_parallel_logins_send_one_email(self, opener: Opener) -> None:
        results = race(opener, lambda s, i: s.issue_email_code("1001", f"h{i}", NOW, EmailLimits()).issued)
        assert sorted(results) == [False] * (RACERS - 1) + [True]

    # -- unavailable -----------------------------------------------------------------

    @pytest.mark.parametrize("operation", [
        "lock_status", "totp_attempt", "reserve_attempt", "settle_failure", "settle_success", "unlock", "forget",
        "cache_settings",
        "cached_settings",
        "start_grace", "grace_active", "issue_email_code", "discard_email_code", "verify_email_code",
        "record_enrollment", "enrollment", "set_recovery_codes", "recovery_salt", "recovery_codes_left",
        "use_recovery_code",
    ])
    def test_an_unreachable_store_raises_state_unavailable(self, unavailable_opener: Opener, operation: str) -> None:
        calls: dict[str, Callable[[Any], Any]] = {
            "lock_status": lambda s: s.lock_status("1001", NOW),
            "totp_attempt": lambda s: totp_attempt(s, "1001", NOW, STEP),
            "reserve_attempt": lambda s: s.reserve_attempt("1001", NOW, **self.LOCKOUT),
            "settle_failure": lambda s: s.settle_failure("1001", NOW, **self.LOCKOUT),
            "settle_success": lambda s: s.settle_success("1001", NOW),
            "unlock": lambda s: s.unlock("1001"),
            "forget": lambda s: s.forget("1001"),
            "cache_settings": lambda s: s.cache_settings("ldap", "1001", "x", NOW),
            "cached_settings": lambda s: s.cached_settings("ldap", "1001", NOW, 10),
            "start_grace": lambda s: s.start_grace("1001", "192.0.2.7", NOW, 10),
            "grace_active": lambda s: s.grace_active("1001", "192.0.2.7", NOW, LONG),
            "issue_email_code": lambda s: s.issue_email_code("1001", "h", NOW, EmailLimits()),
            "discard_email_code": lambda s: s.discard_email_code("1001", "h"),
            "verify_email_code": lambda s: s.verify_email_code("1001", "h", NOW),
            "record_enrollment": lambda s: s.record_enrollment("1001", "totp", NOW, totp_step=STEP),
            "enrollment": lambda s: s.enrollment("1001"),
            "set_recovery_codes": lambda s: s.set_recovery_codes("1001", "00" * 16, ["d1", "d2"]),
            "recovery_salt": lambda s: s.recovery_salt("1001"),
            "recovery_codes_left": lambda s: s.recovery_codes_left("1001"),
            "use_recovery_code": lambda s: s.use_recovery_code("1001", "d1", NOW),
        }
        with pytest.raises(StateUnavailable):
            store = unavailable_opener()
            try:
                calls[operation](store)
            finally:
                store.close()
