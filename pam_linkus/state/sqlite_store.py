"""SQLite state store: the default, one file on one host (linkusd and the admin tools).

Each decision is one short transaction that takes the write lock before it reads
(``BEGIN IMMEDIATE``), so parallel logins serialise on the database lock and a
replayed code can never be accepted twice. WAL mode keeps readers from blocking
on writers; ``synchronous=FULL`` makes a committed replay record survive a power
cut. The file is created 0600 in a root-only directory.

Threads: linkusd's worker threads share one ``SqliteStore``; each thread gets
its own connection (``threading.local``), since a sqlite3 connection must not
run two transactions at once. ``close`` closes every connection the store opened.

Growth: ``prune(now)`` deletes records that can no longer change a decision
(old replay steps, used or expired email codes, sends older than an hour, ended
grace periods, failure counts long idle and not locked, stale cached settings),
so the file does not grow with the number of logins. It deletes in short batches
(``PRUNE_BATCH`` rows per transaction), so it never holds the write lock for long.

Schema changes are appended to ``MIGRATIONS``; ``PRAGMA user_version`` says how
many have run.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pam_linkus.errors import Locked, StateUnavailable
from pam_linkus.state.base import (
    CACHE_TTL,
    FAILURE_TTL,
    FOREVER,
    REPLAY_TTL,
    EmailCheck,
    EmailIssue,
    EmailLimits,
    Enrollment,
    LockStatus,
    TotpAttempt,
    email_retry_after,
    next_lock,
    same_address,
)
from pam_linkus.state.sqlite_gate import SqliteGateSessions

T = TypeVar("T")

#: Append only; never edit a migration that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE totp_used (user TEXT PRIMARY KEY, step INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE failures (
        user TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        locked_until REAL NOT NULL,
        last_failure REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE settings_cache (
        source TEXT NOT NULL,
        user TEXT NOT NULL,
        data TEXT NOT NULL,
        stored_at REAL NOT NULL,
        PRIMARY KEY (source, user)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE email_codes (
        user TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        expires REAL NOT NULL,
        attempts_left INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE email_sends (user TEXT NOT NULL, at REAL NOT NULL, hash TEXT NOT NULL);
    CREATE INDEX email_sends_at ON email_sends (at);
    CREATE INDEX email_sends_user ON email_sends (user, at);
    """,
    # 4: enrollment record (since / last success) and hashed single-use recovery codes. The table keeps
    # its first spelling, `enrolment`: databases written by earlier versions must stay readable.
    """
    CREATE TABLE enrolment (
        user TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        since REAL,
        last_success REAL
    ) WITHOUT ROWID;
    CREATE TABLE recovery_codes (
        user TEXT NOT NULL,
        salt TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (user, digest)
    ) WITHOUT ROWID;
    """,
    # 5: grace periods per (extension, remote address); ``until`` is epoch seconds
    """
    CREATE TABLE grace (
        user TEXT NOT NULL,
        rhost TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (user, rhost)
    ) WITHOUT ROWID;
    """,
    # 6: exact lockout under parallel attempts (``lock_count``: the count at which
    # the last lock was set, so after it expires exactly one attempt is free), and
    # the time a replay step was accepted (``prune`` drops steps a day old).
    # Existing rows: locks count as set at their count; steps as accepted now.
    """
    ALTER TABLE failures ADD COLUMN lock_count INTEGER NOT NULL DEFAULT 0;
    UPDATE failures SET lock_count = count WHERE locked_until > 0;
    ALTER TABLE totp_used ADD COLUMN at REAL NOT NULL DEFAULT 0;
    UPDATE totp_used SET at = CAST(strftime('%s', 'now') AS REAL);
    CREATE INDEX grace_until ON grace (until);
    CREATE INDEX email_codes_expires ON email_codes (expires);
    """,
    # 7: when a grace period started (the latest right code), so it ends at start + the
    # CURRENT policy's grace_period. Existing rows get 0: they never count again (fail
    # closed; their extensions give one more code).
    """
    ALTER TABLE grace ADD COLUMN started REAL NOT NULL DEFAULT 0;
    """,
    # 8: web gate sessions (state.sqlite_gate), keyed by the token's keyed hash
    """
    CREATE TABLE gate_sessions (
        key TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        method TEXT NOT NULL,
        created REAL NOT NULL,
        seen REAL NOT NULL,
        client TEXT NOT NULL,
        site TEXT NOT NULL,
        expires REAL NOT NULL,
        idle REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX gate_sessions_account ON gate_sessions (account, seen);
    CREATE INDEX gate_sessions_expires ON gate_sessions (expires);
    """,
)

#: How long a login waits for another process's write lock before "unavailable".
BUSY_TIMEOUT = 5.0

#: ``prune`` deletes at most this many rows per write transaction (a few ms of
#: write lock, its fsync included), and pauses at least ``PRUNE_PAUSE`` s between two.
PRUNE_BATCH = 500
PRUNE_PAUSE = 0.002
#: Rows per table one ``prune`` call deletes at most (the keys are held in memory).
PRUNE_MAX_ROWS = 100_000


def _enable_wal(db: sqlite3.Connection, tries: int = 200) -> None:
    """Switch a new state file to WAL (readers then never wait for the writer).

    Several first logins opening a fresh file at once make SQLite answer this
    pragma "database is locked" at once, without its busy handler; so retry for a
    bounded while (about 2 s), and go on in rollback-journal mode if it never
    works: that mode is slower under load but just as correct, so it is no reason
    to refuse a login.
    """
    for _ in range(tries):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.01)


class SqliteStore(SqliteGateSessions):
    """StateStore on one SQLite file; see pam_linkus.state.base for the contract."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT, failure_ttl: int = FAILURE_TTL):
        self.path = path
        self.busy_timeout = busy_timeout
        self.failure_ttl = failure_ttl
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # Writers of this process queue here rather than in SQLite's busy handler,
        # which polls with sleeps growing to 100 ms: a login waiting behind another
        # thread's transaction (a prune batch) wakes as soon as it ends.
        self._write_lock = threading.Lock()
        self._closed = False
        self._local.db = self._register(self._connect(path, busy_timeout))

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on its first use in the thread."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise StateUnavailable(f"state file {self.path}: store closed")
            db = self._register(self._connect(self.path, self.busy_timeout))
            self._local.db = db
        return db

    def limit_waits_in_this_thread(self, seconds: float) -> None:
        """Wait at most ``seconds`` for the write lock in the calling thread.

        linkusd runs the steps of local logins on its event loop: a login there that
        waits the whole ``busy_timeout`` for another process's lock (an admin's
        ``sqlite3`` shell) would hold up every other login and STATUS for as long.
        So on that thread the wait is short and then the login is "unavailable".
        """
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        self._local.busy_timeout = seconds

    def _register(self, db: sqlite3.Connection) -> sqlite3.Connection:
        with self._all_lock:
            self._all.append(db)
        return db

    # -- opening -----------------------------------------------------------------

    def _connect(self, path: str, busy_timeout: float) -> sqlite3.Connection:
        directory = os.path.dirname(path) or "."
        try:
            dir_st = os.stat(directory)
        except OSError as exc:
            raise StateUnavailable(f"state directory {directory}: {exc.strerror}") from None
        if dir_st.st_uid != os.geteuid() or dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateUnavailable(
                f"state directory {directory} must be owned by root and not writable by group or others"
            )
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateUnavailable(f"state file {path}: {exc.strerror}") from None
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise StateUnavailable(f"state file {path} must be a regular file owned by root, mode 0600")
            db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            self._migrate(db, busy_timeout)
            return db
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {path}: {exc}") from None
        except OSError as exc:
            raise StateUnavailable(f"state file {path}: {exc.strerror}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection, busy_timeout: float = BUSY_TIMEOUT) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version >= len(MIGRATIONS):
            return
        if version == 0:
            _enable_wal(db)
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- transactions ------------------------------------------------------------

    def _write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one BEGIN IMMEDIATE transaction; errors -> StateUnavailable.

        One transaction at a time per store (``_write_lock``, waited for at most
        ``busy_timeout``); other processes (the admin CLI) still meet SQLite's lock
        and its busy handler.
        """
        db = self._db
        if not self._write_lock.acquire(timeout=getattr(self._local, "busy_timeout", self.busy_timeout)):
            raise StateUnavailable(f"state file {self.path}: another thread held the write lock too long")
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateUnavailable(f"state file {self.path}: {exc}") from None
            try:
                result = body(db)
                db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                self._rollback()
                raise StateUnavailable(f"state file {self.path}: {exc}") from None
            except BaseException:
                self._rollback()
                raise
        finally:
            self._write_lock.release()

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- the contract ------------------------------------------------------------

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """One read statement (no transaction needed); errors -> StateUnavailable."""
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None

    def lock_status(self, user: str, now: float) -> LockStatus:
        rows = self._read("SELECT count, locked_until FROM failures WHERE user = ?", (user,))
        return LockStatus(int(rows[0][0]), float(rows[0][1])) if rows else LockStatus()

    def reserve_attempt(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        def body(db: sqlite3.Connection) -> LockStatus:
            count, locked_until, lock_count = _failures(db, user)
            if locked_until > now:
                return LockStatus(count, locked_until)
            if count >= max_failures and count != lock_count:
                # Parallel attempts took every slot (or the one slot after a lock
                # expired): lock now, reserve nothing.
                locked_until = max(next_lock(count, now, max_failures, duration, permanent_after), locked_until)
                _set_failures(db, user, count, locked_until, count, now)
                return LockStatus(count, locked_until)
            _set_failures(db, user, count + 1, locked_until, lock_count, now)
            return LockStatus(count + 1, locked_until)

        return self._write(body)

    def totp_attempt(
        self, user: str, now: float, *, check: Callable[[], int | None], keep_reserved: bool = False,
        max_failures: int, duration: int, permanent_after: int,
    ) -> TotpAttempt:
        """reserve_attempt + check + record the step or settle_failure in ONE write
        transaction: one fsync per login instead of two. A success with no failures
        counted runs five statements: BEGIN, the failures read, two upserts, COMMIT."""
        def body(db: sqlite3.Connection) -> TotpAttempt:
            row = db.execute("SELECT count, locked_until, lock_count FROM failures WHERE user = ?",
                             (user,)).fetchone()
            count, locked_until, lock_count = (int(row[0]), float(row[1]), int(row[2])) if row else (0, 0.0, 0)
            if locked_until > now:
                return TotpAttempt(TotpAttempt.LOCKED, LockStatus(count, locked_until))
            if count >= max_failures and count != lock_count:
                # As reserve_attempt: parallel attempts took every slot; lock, check nothing.
                locked_until = max(next_lock(count, now, max_failures, duration, permanent_after), locked_until)
                _set_failures(db, user, count, locked_until, count, now)
                return TotpAttempt(TotpAttempt.LOCKED, LockStatus(count, locked_until))
            # The attempt is admitted (reserved): only now is the code checked.
            step = check()
            if step is not None:
                cur = db.execute(
                    "INSERT INTO totp_used (user, step, at) VALUES (?, ?, ?) "
                    "ON CONFLICT (user) DO UPDATE SET step = excluded.step, at = excluded.at "
                    "WHERE excluded.step > totp_used.step",
                    (user, step, now),
                )
                if cur.rowcount == 1:
                    if row is not None:
                        _clear_failures(db, user, now)
                    _note_success(db, user, "totp", now)
                    return TotpAttempt(TotpAttempt.ACCEPTED, LockStatus())
                verdict = TotpAttempt.REPLAYED
            elif keep_reserved:
                _set_failures(db, user, count + 1, locked_until, lock_count, now)
                return TotpAttempt(TotpAttempt.RESERVED, LockStatus(count + 1, locked_until))
            else:
                verdict = TotpAttempt.WRONG
            count += 1
            if count >= max_failures:
                locked_until = max(next_lock(count, now, max_failures, duration, permanent_after), locked_until)
                lock_count = count
            _set_failures(db, user, count, locked_until, lock_count, now)
            return TotpAttempt(verdict, LockStatus(count, locked_until))

        return self._write(body)

    def settle_failure(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        def body(db: sqlite3.Connection) -> LockStatus:
            count, locked_until, _ = _failures(db, user)
            if count >= max_failures:
                locked_until = max(next_lock(count, now, max_failures, duration, permanent_after), locked_until)
                _set_failures(db, user, count, locked_until, count, now)
            return LockStatus(count, locked_until)

        return self._write(body)

    def settle_success(self, user: str, now: float) -> None:
        def body(db: sqlite3.Connection) -> None:
            _clear_failures(db, user, now)

        self._write(body)

    def prune(self, now: float) -> int:
        """Delete what can no longer decide, in batches of ``PRUNE_BATCH`` rows per write
        transaction, so the write lock is never held for long: a login waiting for it
        (possibly on linkusd's event loop thread) waits one short batch, not the whole prune.

        The keys are found by a read, which in WAL mode takes no write lock; each
        batch deletes them again under the same condition, so a row that a login
        renewed in between (a new replay step, a new failure) stays. Between two
        batches the lock is left free for at least as long as the batch held it.
        At most ``PRUNE_MAX_ROWS`` per table per call; the next call takes the rest.
        """
        deleted, held = 0, 0.0
        for table, key, where, args in (
            ("totp_used", "user", "at <= ?", (now - REPLAY_TTL,)),
            ("failures", "user", "locked_until <= ? AND last_failure <= ?", (now, now - self.failure_ttl)),
            ("email_codes", "user", "expires <= ?", (now,)),
            ("email_sends", "rowid", "at <= ?", (now - 3600,)),
            ("grace", "user, rhost", "until <= ?", (now,)),
            ("settings_cache", "source, user", "stored_at <= ?", (now - CACHE_TTL,)),
            ("gate_sessions", "key", "(expires <= ? OR seen + idle <= ?)", (now, now)),
        ):
            keys = self._read(f"SELECT {key} FROM {table} WHERE {where} LIMIT {PRUNE_MAX_ROWS}", args)  # noqa: S608 - fixed names
            match = " AND ".join(f"{column.strip()} = ?" for column in key.split(","))
            sql = f"DELETE FROM {table} WHERE {match} AND {where}"  # noqa: S608 - fixed names
            for start in range(0, len(keys), PRUNE_BATCH):
                if start:
                    time.sleep(max(held, PRUNE_PAUSE))
                began = time.monotonic()
                deleted += self._delete_batch(sql, [k + args for k in keys[start:start + PRUNE_BATCH]])
                held = time.monotonic() - began
        return deleted

    def _delete_batch(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        def body(db: sqlite3.Connection) -> int:
            return int(db.executemany(sql, rows).rowcount)

        return self._write(body)

    def issue_email_code(self, user: str, code_hash: str, now: float, limits: EmailLimits) -> EmailIssue:
        def body(db: sqlite3.Connection) -> EmailIssue:
            db.execute("DELETE FROM email_sends WHERE at <= ?", (now - 3600,))
            mine = [r[0] for r in db.execute("SELECT at FROM email_sends WHERE user = ?", (user,))]
            everyone = [r[0] for r in db.execute("SELECT at FROM email_sends WHERE at > ?", (now - 60,))]
            retry_after = email_retry_after(mine, everyone, now, limits)
            if retry_after > now:
                row = db.execute(
                    "SELECT hash FROM email_codes WHERE user = ? AND expires > ? AND attempts_left > 0", (user, now)
                ).fetchone()
                pending = row is not None and same_address(row[0], code_hash)
                return EmailIssue(False, pending=pending, retry_after=retry_after)
            db.execute(
                "INSERT INTO email_codes (user, hash, expires, attempts_left) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET hash = excluded.hash, expires = excluded.expires, "
                "attempts_left = excluded.attempts_left",
                (user, code_hash, now + limits.lifetime, limits.max_attempts),
            )
            db.execute("INSERT INTO email_sends (user, at, hash) VALUES (?, ?, ?)", (user, now, code_hash))
            return EmailIssue(True)

        return self._write(body)

    def discard_email_code(self, user: str, code_hash: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM email_codes WHERE user = ? AND hash = ?", (user, code_hash))
            db.execute("DELETE FROM email_sends WHERE user = ? AND hash = ?", (user, code_hash))

        self._write(body)

    def verify_email_code(self, user: str, code_hash: str, now: float) -> str:
        def body(db: sqlite3.Connection) -> str:
            _refuse_permanent_lock(db, user, now)
            code = db.execute("SELECT hash, expires, attempts_left FROM email_codes WHERE user = ?", (user,)).fetchone()
            if code is None:
                return EmailCheck.MISSING
            stored, expires, attempts_left = code
            if expires <= now:
                db.execute("DELETE FROM email_codes WHERE user = ?", (user,))
                return EmailCheck.EXPIRED
            if code_hash and hmac.compare_digest(stored.encode(), code_hash.encode()):
                db.execute("DELETE FROM email_codes WHERE user = ?", (user,))
                _clear_failures(db, user, now)
                _note_success(db, user, "email", now)
                return EmailCheck.ACCEPTED
            if attempts_left <= 1:
                db.execute("DELETE FROM email_codes WHERE user = ?", (user,))
                return EmailCheck.EXHAUSTED
            db.execute("UPDATE email_codes SET attempts_left = attempts_left - 1 WHERE user = ?", (user,))
            return EmailCheck.WRONG

        return self._write(body)

    def start_grace(self, user: str, rhost: str, now: float, duration: int) -> None:
        def body(db: sqlite3.Connection) -> None:
            # Expired periods of this extension go in the same write, so the
            # table holds at most the live (rhost) pairs of each extension.
            db.execute("DELETE FROM grace WHERE user = ? AND until <= ?", (user, now))
            db.execute(
                "INSERT INTO grace (user, rhost, until, started) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, rhost) DO UPDATE SET until = max(grace.until, excluded.until), "
                "started = max(grace.started, excluded.started)",
                (user, rhost, now + duration, now),
            )

        self._write(body)

    def grace_active(self, user: str, rhost: str, now: float, period: int) -> bool:
        try:
            row = self._db.execute(
                "SELECT 1 FROM grace WHERE user = ? AND rhost = ? AND until > ? AND started > 0 "
                "AND started + ? > ?", (user, rhost, now, period, now)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        return row is not None

    def unlock(self, user: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM failures WHERE user = ?", (user,)))

    def forget(self, user: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            for table in (
                "totp_used", "failures", "settings_cache", "email_codes", "email_sends", "enrolment",
                "recovery_codes", "grace",
            ):
                db.execute(f"DELETE FROM {table} WHERE user = ?", (user,))  # noqa: S608 - fixed names

        self._write(body)

    def cache_settings(self, source: str, user: str, data: str | None, now: float) -> None:
        if data is None:
            self._write(lambda db: db.execute(
                "DELETE FROM settings_cache WHERE source = ? AND user = ?", (source, user)))
            return
        self._write(lambda db: db.execute(
            "INSERT INTO settings_cache (source, user, data, stored_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (source, user) DO UPDATE SET data = excluded.data, stored_at = excluded.stored_at",
            (source, user, data, now),
        ))

    def cached_settings(self, source: str, user: str, now: float, max_age: float) -> str | None:
        try:
            row = self._db.execute(
                "SELECT data, stored_at FROM settings_cache WHERE source = ? AND user = ?", (source, user)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        if row is None or not 0 <= now - row[1] <= max_age:
            return None
        return str(row[0])

    # -- enrollment record and recovery codes ---------------------------------------

    def record_enrollment(self, user: str, method: str, now: float, *, totp_step: int | None = None) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO enrolment (user, method, since, last_success) VALUES (?, ?, ?, NULL) "
                "ON CONFLICT (user) DO UPDATE SET method = excluded.method, since = excluded.since, "
                "last_success = NULL",
                (user, method, now),
            )
            if totp_step is None:
                db.execute("DELETE FROM totp_used WHERE user = ?", (user,))
            else:
                db.execute(
                    "INSERT INTO totp_used (user, step, at) VALUES (?, ?, ?) "
                    "ON CONFLICT (user) DO UPDATE SET step = excluded.step, at = excluded.at",
                    (user, totp_step, now),
                )

        self._write(body)

    def enrollment(self, user: str) -> Enrollment | None:
        try:
            row = self._db.execute(
                "SELECT method, since, last_success FROM enrolment WHERE user = ?", (user,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        left = self.recovery_codes_left(user)
        if row is None and not left:
            return None
        if row is None:
            return Enrollment(None, None, None, left)
        return Enrollment(row[0], row[1], row[2], left)

    def set_recovery_codes(self, user: str, salt: str, digests: Sequence[str]) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM recovery_codes WHERE user = ?", (user,))
            db.executemany(
                "INSERT OR IGNORE INTO recovery_codes (user, salt, digest) VALUES (?, ?, ?)",
                [(user, salt, digest) for digest in digests],
            )

        self._write(body)

    def recovery_salt(self, user: str) -> str | None:
        try:
            row = self._db.execute("SELECT salt FROM recovery_codes WHERE user = ? LIMIT 1", (user,)).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        return str(row[0]) if row else None

    def recovery_codes_left(self, user: str) -> int:
        try:
            (count,) = self._db.execute("SELECT count(*) FROM recovery_codes WHERE user = ?", (user,)).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        return int(count)

    def use_recovery_code(self, user: str, digest: str, now: float) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            _refuse_permanent_lock(db, user, now)
            matched = None
            # Compare every stored digest in constant time, whichever matches.
            for (stored,) in db.execute("SELECT digest FROM recovery_codes WHERE user = ?", (user,)).fetchall():
                if hmac.compare_digest(str(stored).encode(), digest.encode()) and matched is None:
                    matched = stored
            if matched is None:
                return False
            db.execute("DELETE FROM recovery_codes WHERE user = ? AND digest = ?", (user, matched))
            _clear_failures(db, user, now)
            _note_success(db, user, None, now)
            return True

        return self._write(body)

    def close(self) -> None:
        """Close every thread's connection; later use from any thread is unavailable."""
        self._closed = True
        with self._all_lock:
            connections, self._all = self._all, []
        for db in connections:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def counts(self) -> dict[str, int]:
        """Rows per table (tests and ``doctor``: state must not grow with logins)."""
        out: dict[str, int] = {}
        for table in ("totp_used", "failures", "settings_cache", "email_codes", "email_sends", "enrolment",
                      "recovery_codes", "grace", "gate_sessions"):
            rows = self._read(f"SELECT count(*) FROM {table}", ())  # noqa: S608 - fixed names
            out[table] = int(rows[0][0])
        return out


def _note_success(db: sqlite3.Connection, user: str, method: str | None, now: float) -> None:
    """Record the last successful login inside the caller's transaction.

    An extension enrolled by editing the source by hand has no enrollment row yet;
    it gets one with an unknown ``since``.
    """
    db.execute(
        "INSERT INTO enrolment (user, method, since, last_success) VALUES (?, ?, NULL, ?) "
        "ON CONFLICT (user) DO UPDATE SET last_success = excluded.last_success",
        (user, method or "-", now),
    )


def _failures(db: sqlite3.Connection, user: str) -> tuple[int, float, int]:
    """(count, locked_until, lock_count) of ``user`` inside the caller's transaction."""
    row = db.execute("SELECT count, locked_until, lock_count FROM failures WHERE user = ?", (user,)).fetchone()
    return (int(row[0]), float(row[1]), int(row[2])) if row else (0, 0.0, 0)


def _set_failures(db: sqlite3.Connection, user: str, count: int, locked_until: float, lock_count: int,
                  now: float) -> None:
    db.execute(
        "INSERT INTO failures (user, count, locked_until, last_failure, lock_count) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (user) DO UPDATE SET count = excluded.count, locked_until = excluded.locked_until, "
        "last_failure = excluded.last_failure, lock_count = excluded.lock_count",
        (user, count, locked_until, now, lock_count),
    )


def _clear_failures(db: sqlite3.Connection, user: str, now: float) -> None:
    """A right code: the consecutive failures and a temporary lock end; a lock
    only an admin may open stays (``_refuse_permanent_lock`` ran before)."""
    db.execute("DELETE FROM failures WHERE user = ? AND locked_until < ?", (user, float(FOREVER)))


def _refuse_permanent_lock(db: sqlite3.Connection, user: str, now: float) -> None:
    """Raise Locked for a lock only an admin may open.

    A temporary lock does not stop a check here: the caller reserved this
    attempt (``reserve_attempt``) before the lock was set by parallel attempts,
    so the attempt is one of the ``max_failures`` allowed.
    """
    row = db.execute("SELECT locked_until FROM failures WHERE user = ?", (user,)).fetchone()
    if row and row[0] >= FOREVER and row[0] > now:
        raise Locked(locked_until=float(row[0]))
