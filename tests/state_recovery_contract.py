"""Contract for the enrollment record and recovery codes of a StateStore (any backend).

A backend's test class inherits ``EnrollmentRecoveryContract`` and provides an
``opener`` fixture (a zero-argument callable opening a new store on the test's own
empty state). Times are injected.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest
from state_steps import NOW, STEP, fail, totp_attempt

from pam_linkus.errors import Locked
from pam_linkus.recovery import digest, new_salt
from pam_linkus.state.base import TotpAttempt

RACERS = 6
RACE_TIMEOUT = 60.0


def _spend(opener: Callable[[], Any], barrier: Any, results: Any, code_digest: str) -> None:
    store = opener()
    try:
        barrier.wait()
        results.put(store.use_recovery_code("1001", code_digest, NOW))
    finally:
        store.close()


class EnrollmentRecoveryContract:
    def test_enrollment_is_recorded_and_successes_update_it(self, opener: Callable[[], Any]) -> None:
        store = opener()
        assert store.enrollment("1001") is None
        store.record_enrollment("1001", "totp", NOW, totp_step=STEP)
        info = store.enrollment("1001")
        assert (info.method, info.since, info.last_success, info.recovery_left) == ("totp", NOW, None, 0)
        # The confirmation code's step counts as used: the same code at a login is a replay.
        assert totp_attempt(store, "1001", NOW + 1, STEP).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW + 31, STEP + 1).verdict == TotpAttempt.ACCEPTED
        assert store.enrollment("1001").last_success == NOW + 31

    def test_re_enrollment_replaces_the_replay_record(self, opener: Callable[[], Any]) -> None:
        store = opener()
        assert totp_attempt(store, "1001", NOW, STEP + 5).verdict == TotpAttempt.ACCEPTED
        store.record_enrollment("1001", "totp", NOW + 10, totp_step=STEP)
        assert totp_attempt(store, "1001", NOW + 11, STEP).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "1001", NOW + 40, STEP + 1).verdict == TotpAttempt.ACCEPTED
        store.record_enrollment("1001", "email", NOW + 50)
        assert totp_attempt(store, "1001", NOW + 51, STEP - 3).verdict == TotpAttempt.ACCEPTED

    def test_a_hand_enrolled_extension_gets_a_record_at_its_first_success(self, opener: Callable[[], Any]) -> None:
        store = opener()
        assert totp_attempt(store, "1002", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        info = store.enrollment("1002")
        assert (info.since, info.last_success) == (None, NOW)

    def test_an_accepted_email_code_records_the_success(self, opener: Callable[[], Any]) -> None:
        from pam_linkus.state.base import EmailCheck, EmailLimits

        store = opener()
        store.issue_email_code("1003", "h" * 64, NOW, EmailLimits())
        assert store.verify_email_code("1003", "h" * 64, NOW + 5) == EmailCheck.ACCEPTED
        assert store.enrollment("1003").last_success == NOW + 5

    def test_recovery_code_works_once_and_clears_failures(self, opener: Callable[[], Any]) -> None:
        store = opener()
        salt = new_salt()
        codes = ["abcdefghij", "klmnopqrst"]
        store.set_recovery_codes("1001", salt, [digest(c, salt) for c in codes])
        assert store.recovery_salt("1001") == salt
        assert store.recovery_codes_left("1001") == 2
        fail(store, "1001", NOW, max_failures=5, duration=60, permanent_after=100)
        assert store.use_recovery_code("1001", digest("wrongwrong", salt), NOW) is False
        assert store.use_recovery_code("1001", digest(codes[0], salt), NOW) is True
        assert store.lock_status("1001", NOW).failures == 0
        assert store.use_recovery_code("1001", digest(codes[0], salt), NOW) is False
        assert store.recovery_codes_left("1001") == 1
        assert store.enrollment("1001").last_success == NOW
        assert store.use_recovery_code("1002", digest(codes[1], salt), NOW) is False

    def test_new_codes_replace_the_old_ones(self, opener: Callable[[], Any]) -> None:
        store = opener()
        salt = new_salt()
        store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
        salt2 = new_salt()
        store.set_recovery_codes("1001", salt2, [digest("zyxwvutsrq", salt2), digest("qrstuvwxyz", salt2)])
        assert store.recovery_salt("1001") == salt2
        assert store.use_recovery_code("1001", digest("abcdefghij", salt2), NOW) is False
        assert store.recovery_codes_left("1001") == 2

    def test_a_permanently_locked_extension_cannot_spend_a_recovery_code(self, opener: Callable[[], Any]) -> None:
        store = opener()
        salt = new_salt()
        store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
        fail(store, "1001", NOW, max_failures=1, duration=0, permanent_after=100)
        with pytest.raises(Locked):
            store.use_recovery_code("1001", digest("abcdefghij", salt), NOW + 1)
        assert store.recovery_codes_left("1001") == 1

    def test_forget_removes_enrollment_and_codes(self, opener: Callable[[], Any]) -> None:
        store = opener()
        salt = new_salt()
        store.record_enrollment("1001", "totp", NOW, totp_step=STEP)
        store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
        store.forget("1001")
        assert store.enrollment("1001") is None
        assert store.recovery_salt("1001") is None
        assert store.recovery_codes_left("1001") == 0

    def test_parallel_logins_spend_a_recovery_code_once(self, opener: Callable[[], Any]) -> None:
        store = opener()
        salt = new_salt()
        code_digest = digest("abcdefghij", salt)
        store.set_recovery_codes("1001", salt, [code_digest])
        store.close()
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(RACERS, timeout=RACE_TIMEOUT)
        results = ctx.Queue()
        procs = [ctx.Process(target=_spend, args=(opener, barrier, results, code_digest)) for _ in range(RACERS)]
        for p in procs:
            p.start()
        try:
            outcomes = [results.get(timeout=RACE_TIMEOUT) for _ in procs]
        finally:
            for p in procs:
                p.join(RACE_TIMEOUT)
                if p.is_alive():
                    p.kill()
        assert sorted(outcomes) == [False] * (RACERS - 1) + [True]
