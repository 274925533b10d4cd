"""Contract for the web gate sessions of a StateStore (any backend; state.base ``gate_*``).

``StateContract`` inherits ``GateSessionContract``, so SQLite and Redis pass the same
tests. Needs the ``store``, ``opener`` and ``unavailable_opener`` fixtures of that
suite. Times are injected (``NOW``); Redis TTLs run in real time and no test waits for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from state_steps import NOW

from pam_linkus.errors import StateUnavailable
from pam_linkus.state.base import GATE_ID_LEN

LIFE, IDLE = 3600, 600
LIMITS: dict[str, Any] = {"lifetime": LIFE, "idle": IDLE, "max_per_account": 3, "max_total": 50}


def key(n: int | str) -> str:
    """A token hash as linkusd makes them (64 hex digits)."""
    return hashlib.sha256(f"token-{n}".encode()).hexdigest()


def create(store: Any, n: int | str, account: str = "1001", now: float = NOW, **over: Any) -> bool:
    ok: bool = store.gate_create(key(n), account, "totp", "192.0.2.7", "", now, **{**LIMITS, **over})
    return ok


def check(store: Any, n: int | str, now: float, *, lifetime: float = LIFE, idle: float = IDLE,
          touch_after: float = 10) -> Any:
    return store.gate_check(key(n), now, lifetime=lifetime, idle=idle, touch_after=touch_after)


class GateSessionContract:
    def test_a_new_session_is_found_with_what_was_stored(self, store: Any) -> None:
        assert create(store, 1)
        sess = check(store, 1, NOW + 1)
        assert (sess.account, sess.method, sess.client, sess.created, sess.seen) == (
            "1001", "totp", "192.0.2.7", NOW, NOW)
        assert sess.id == key(1)[:GATE_ID_LEN]
        assert sess.locked_until == 0.0
        assert check(store, 2, NOW + 1) is None

    def test_the_session_ends_at_its_lifetime_and_after_its_idle_timeout(self, store: Any) -> None:
        create(store, 1)
        create(store, 2)
        # kept alive by use every 300 s, it still ends at the absolute lifetime
        for t in range(300, LIFE, 300):
            assert check(store, 1, NOW + t, touch_after=1) is not None, t
        assert check(store, 1, NOW + LIFE) is None
        # never used again: ends IDLE s after creation
        assert check(store, 2, NOW + IDLE - 1, touch_after=10**6) is not None
        assert check(store, 2, NOW + IDLE) is None

    def test_seen_is_written_only_after_touch_after(self, store: Any) -> None:
        create(store, 1)
        assert check(store, 1, NOW + 5, touch_after=10).seen == NOW
        assert check(store, 1, NOW + 9, touch_after=10).seen == NOW  # not touched at +5
        assert check(store, 1, NOW + 10, touch_after=10).seen == NOW  # touched now, reports what it decided on
        assert check(store, 1, NOW + 11, touch_after=10).seen == NOW + 10
        # the idle end moves with the touch
        assert check(store, 1, NOW + 10 + IDLE - 1, touch_after=10**6) is not None

    def test_a_stricter_site_limit_refuses_without_touching(self, store: Any) -> None:
        create(store, 1)
        assert check(store, 1, NOW + 200, idle=100, touch_after=1) is None
        # not touched by the refused check: the site's idle still counts from NOW
        assert check(store, 1, NOW + 201, idle=100, touch_after=1) is None
        assert check(store, 1, NOW + 200, lifetime=100) is None
        assert check(store, 1, NOW + 202) is not None  # the longer limits still let it pass

    def test_the_accounts_lock_comes_with_the_session(self, store: Any) -> None:
        create(store, 1)
        for _ in range(3):
            store.reserve_attempt("1001", NOW, max_failures=3, duration=900, permanent_after=10)
        store.settle_failure("1001", NOW, max_failures=3, duration=900, permanent_after=10)
        assert check(store, 1, NOW + 1).locked_until == NOW + 900

    def test_at_most_max_per_account_the_least_recently_seen_pushed_out(self, store: Any) -> None:
        for n in range(3):
            assert create(store, n, now=NOW + n)
        check(store, 0, NOW + 20, touch_after=1)  # 0 is now the most recently seen
        assert create(store, 3, now=NOW + 21)
        alive = [n for n in range(4) if check(store, n, NOW + 22, touch_after=10**6) is not None]
        assert alive == [0, 2, 3]
        assert create(store, "other", account="1002", now=NOW + 22)  # another account is not touched
        assert len(store.gate_sessions("1001", NOW + 23)) == 3

    def test_the_total_is_bounded_and_ended_sessions_make_room(self, store: Any) -> None:
        for n in range(4):
            assert create(store, n, account=f"10{n:02d}", max_total=4)
        assert not create(store, 9, account="1099", max_total=4)
        assert check(store, 9, NOW + 1) is None
        store.gate_revoke(key=key(0))
        assert create(store, 9, account="1099", max_total=4)
        # sessions past their idle end count no more
        assert create(store, 10, account="1100", now=NOW + IDLE + 1, max_total=4)

    def test_list_by_account_and_all(self, store: Any) -> None:
        create(store, 1, account="1001")
        create(store, 2, account="1002", now=NOW + 1)
        create(store, 3, account="1002", now=NOW + 2)
        assert [s.key for s in store.gate_sessions(None, NOW + 3)] == [key(1), key(2), key(3)]
        assert [s.account for s in store.gate_sessions("1002", NOW + 3)] == ["1002", "1002"]
        assert store.gate_sessions("1003", NOW + 3) == []
        assert [s.key for s in store.gate_sessions(None, NOW + IDLE)] == [key(2), key(3)]

    @pytest.mark.parametrize("how", ["key", "id", "account", "all"])
    def test_revocation_is_seen_by_the_next_check(self, opener: Callable[[], Any], how: str) -> None:
        one, other = opener(), opener()  # two hosts sharing the store
        try:
            create(one, 1, account="1001")
            create(one, 2, account="1002")
            assert check(other, 1, NOW + 1) is not None
            selector = {"key": {"key": key(1)}, "id": {"id": key(1)[:GATE_ID_LEN]},
                        "account": {"account": "1001"}, "all": {"everyone": True}}[how]
            assert other.gate_revoke(**selector) == (2 if how == "all" else 1)
            assert check(one, 1, NOW + 2) is None
            assert (check(one, 2, NOW + 2) is None) == (how == "all")
            assert other.gate_revoke(**selector) == 0
        finally:
            one.close()
            other.close()

    def test_an_id_must_be_whole(self, store: Any) -> None:
        create(store, 1)
        assert store.gate_revoke(id=key(1)[:4]) == 0
        assert store.gate_revoke(id=key(1)[:GATE_ID_LEN].upper()) == 0
        assert check(store, 1, NOW + 1) is not None
        with pytest.raises(ValueError):
            store.gate_revoke(account="1001", everyone=True)

    @pytest.mark.parametrize("operation", ["create", "check", "list", "revoke"])
    def test_an_unreachable_store_is_unavailable_for_gate_sessions(self, unavailable_opener: Callable[[], Any],
                                                                   operation: str) -> None:
        calls: dict[str, Callable[[Any], Any]] = {
            "create": lambda s: create(s, 1),
            "check": lambda s: check(s, 1, NOW),
            "list": lambda s: s.gate_sessions(None, NOW),
            "revoke": lambda s: s.gate_revoke(everyone=True),
        }
        with pytest.raises(StateUnavailable):
            store = unavailable_opener()
            try:
                calls[operation](store)
            finally:
                store.close()
