"""The SQLite store passes the StateStore contract (tests/state_contract.py)."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from state_contract import Opener, StateContract
from state_steps import fail, totp_attempt

from pam_linkus.errors import StateUnavailable
from pam_linkus.state import sqlite_store
from pam_linkus.state.base import REPLAY_TTL, EmailLimits, TotpAttempt
from pam_linkus.state.sqlite_store import MIGRATIONS, SqliteStore


class TestSqliteState(StateContract):
    CHECKS_ONLY_ADMITTED = True

    @pytest.fixture
    def opener(self, private_dir: Path) -> Opener:
        path = str(private_dir / "state.db")
        return lambda: SqliteStore(path)

    @pytest.fixture
    def unavailable_opener(self, private_dir: Path) -> Opener:
        # A state directory others may write to: the store refuses it rather than trust it.
        shared = private_dir / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        path = str(shared / "state.db")
        return lambda: SqliteStore(path)


def test_state_does_not_grow_with_the_number_of_logins(private_dir: Path) -> None:
    """Issue 12 item 16: 40 simulated days (beyond every TTL) of logins by ever new
    extensions every 3 hours, pruned each time: every table stays bounded."""
    store = SqliteStore(str(private_dir / "state.db"))
    lockout = {"max_failures": 5, "duration": 900, "permanent_after": 1000}
    limits = EmailLimits(lifetime=300)
    now = 1_763_900_000.0
    peak: dict[str, int] = {}
    try:
        for period in range(40 * 8):
            for i in range(2):
                user = f"ext{period}-{i}"  # never the same extension twice: the worst case for growth
                store.reserve_attempt(user, now, **lockout)
                store.settle_failure(user, now, **lockout)
                assert totp_attempt(store, user, now + 1, int(now // 30), **lockout).verdict == TotpAttempt.ACCEPTED
                store.start_grace(user, "192.0.2.1", now + 1, 600)
                store.issue_email_code(user, f"h{i}", now + 2, limits)
                store.cache_settings("ldap", user, "{}", now)
            now += 3 * 3600
            store.prune(now)
            for table, rows in store.counts().items():
                peak[table] = max(peak.get(table, 0), rows)
        # one day of replay records, 30 days of idle failure counts (here none: all cleared), no more
        assert peak["totp_used"] <= 2 * 9  # one day of replay records
        assert peak["failures"] <= 2
        assert peak["email_codes"] <= 2 and peak["email_sends"] <= 2 and peak["grace"] <= 2
        assert peak["settings_cache"] <= 2 * 8 * 32  # 31 days of cached settings
        assert store.counts()["settings_cache"] < 2 * 8 * 40  # the oldest days are gone
    finally:
        store.close()


def test_each_thread_gets_its_own_connection_and_close_closes_all(private_dir: Path) -> None:
    store = SqliteStore(str(private_dir / "state.db"))
    seen: list[object] = []

    def work() -> None:
        seen.append(store._db)
        fail(store, "1001", 1.0, max_failures=5, duration=60, permanent_after=10)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({id(db) for db in seen}) == 4
    assert store.lock_status("1001", 1.0).failures == 4
    store.close()
    with pytest.raises(StateUnavailable):
        threading.Thread(target=lambda: store.lock_status("1001", 1.0)).run()


def old_state_db(path: str, version: int, *rows: str) -> None:
    """A state file as schema ``version`` left it (its migrations only), with ``rows`` inserted."""
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version = {version}")
    for row in rows:
        db.execute(row)
    db.commit()
    db.close()
    os.chmod(path, 0o600)


def test_an_old_schema_is_migrated_with_locks_kept(private_dir: Path) -> None:
    path = str(private_dir / "state.db")
    old_state_db(path, 5, "INSERT INTO failures VALUES ('1001', 5, 100.0, 50.0)")
    store = SqliteStore(path)
    try:
        # the lock set at count 5 has expired: exactly one attempt is free again
        lockout = {"max_failures": 5, "duration": 900, "permanent_after": 1000}
        assert not store.reserve_attempt("1001", 200.0, **lockout).locked(200.0)
        assert store.reserve_attempt("1001", 200.0, **lockout).locked(200.0)
    finally:
        store.close()


def test_a_grace_row_from_before_starts_were_kept_never_counts(private_dir: Path) -> None:
    """Migration 7 gives old grace rows no start: one more code, never a skip (fail closed)."""
    path = str(private_dir / "state.db")
    old_state_db(path, 6, "INSERT INTO grace VALUES ('1001', '192.0.2.7', 5000.0)")
    store = SqliteStore(path)
    try:
        assert store.grace_active("1001", "192.0.2.7", 1000.0, 86400) is False
        store.start_grace("1001", "192.0.2.7", 1000.0, 60)  # the next right code gives it a start
        assert store.grace_active("1001", "192.0.2.7", 1059.0, 60) is True
        assert store.grace_active("1001", "192.0.2.7", 1060.0, 60) is False
    finally:
        store.close()


def traced(store: SqliteStore) -> list[str]:
    """Every statement this thread's connection of ``store`` runs from now on."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    return statements


def test_a_totp_attempt_is_one_short_write_transaction(private_dir: Path) -> None:
    """Issue 11: one durable write (one COMMIT, one fsync) per TOTP login, few statements."""
    store = SqliteStore(str(private_dir / "state.db"))
    try:
        statements = traced(store)
        assert totp_attempt(store, "1001", 1000.0, 33).verdict == TotpAttempt.ACCEPTED
        assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
        assert len(statements) == 5  # BEGIN, read failures, replay upsert, success upsert, COMMIT
        for step in (None, 33, None):  # wrong, replayed, wrong
            statements.clear()
            totp_attempt(store, "1001", 1001.0, step)
            assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
            assert len(statements) <= 5
        statements.clear()
        assert totp_attempt(store, "1001", 1031.0, 34).verdict == TotpAttempt.ACCEPTED  # clears the failures too
        assert len(statements) == 6
    finally:
        store.close()


def test_prune_deletes_in_short_batches_and_keeps_rows_renewed_meanwhile(
        private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(str(private_dir / "state.db"))
    monkeypatch.setattr(sqlite_store, "PRUNE_PAUSE", 0.0)
    now = 1_763_900_000.0
    old = now - REPLAY_TTL - 10
    try:
        for i in range(1201):
            store.record_enrollment(f"ext{i}", "totp", old, totp_step=1)
        store.record_enrollment("fresh", "totp", now, totp_step=1)
        read = store._read

        def read_then_renew(sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
            rows = read(sql, args)
            if sql.startswith("SELECT user FROM totp_used"):  # a login of ext7 lands between read and deletes
                assert totp_attempt(store, "ext7", now, 2).verdict == TotpAttempt.ACCEPTED
            return rows

        monkeypatch.setattr(store, "_read", read_then_renew)
        statements = traced(store)
        assert store.prune(now) == 1200
        assert statements.count("BEGIN IMMEDIATE") == 4  # the old rows found: 1201 = 500 + 500 + 201
        assert store.counts()["totp_used"] == 2
        assert totp_attempt(store, "ext7", now, 2).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "fresh", now, 1).verdict == TotpAttempt.REPLAYED
        assert totp_attempt(store, "ext8", now, 1).verdict == TotpAttempt.ACCEPTED
    finally:
        store.close()
