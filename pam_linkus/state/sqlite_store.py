"""SQLite state store: the default, one file shared by every login process of a host.

Each decision is one short transaction that takes the write lock before it reads
(``BEGIN IMMEDIATE``), so parallel logins serialise on the database lock and a
replayed code can never be accepted twice. WAL mode keeps readers from blocking
on writers. The file is created 0600 in a root-only directory.

Schema changes are appended to ``MIGRATIONS``; ``PRAGMA user_version`` says how
many have run.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from pam_linkus.errors import Locked, StateUnavailable
from pam_linkus.state.base import LockStatus, next_lock

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

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
)

#: How long a login waits for another process's write lock before "unavailable".
BUSY_TIMEOUT = 5.0


class SqliteStore:
    """StateStore on one SQLite file; see pam_linkus.state.base for the contract."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT):
        self.path = path
        self._db = self._connect(path, busy_timeout)

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
            db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            self._migrate(db)
            return db
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {path}: {exc}") from None
        except OSError as exc:
            raise StateUnavailable(f"state file {path}: {exc.strerror}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version >= len(MIGRATIONS):
            return
        if version == 0:
            db.execute("PRAGMA journal_mode=WAL")
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
        """Run ``body`` in one BEGIN IMMEDIATE transaction; errors -> StateUnavailable."""
        db = self._db
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

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- the contract ------------------------------------------------------------

    def lock_status(self, user: str, now: float) -> LockStatus:
        try:
            row = self._db.execute("SELECT count, locked_until FROM failures WHERE user = ?", (user,)).fetchone()
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state file {self.path}: {exc}") from None
        return LockStatus(row[0], row[1]) if row else LockStatus()

    def accept_totp_step(self, user: str, step: int, now: float) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT locked_until FROM failures WHERE user = ?", (user,)).fetchone()
            if row and row[0] > now:
                raise Locked(locked_until=row[0])
            cur = db.execute(
                "INSERT INTO totp_used (user, step) VALUES (?, ?) "
                "ON CONFLICT (user) DO UPDATE SET step = excluded.step WHERE excluded.step > totp_used.step",
                (user, step),
            )
            if cur.rowcount != 1:
                return False
            db.execute("DELETE FROM failures WHERE user = ?", (user,))
            return True

        return self._write(body)

    def record_failure(
        self, user: str, now: float, *, max_failures: int, duration: int, permanent_after: int
    ) -> LockStatus:
        def body(db: sqlite3.Connection) -> LockStatus:
            row = db.execute("SELECT count, locked_until FROM failures WHERE user = ?", (user,)).fetchone()
            count = (row[0] if row else 0) + 1
            locked_until = max(next_lock(count, now, max_failures, duration, permanent_after), row[1] if row else 0.0)
            db.execute(
                "INSERT INTO failures (user, count, locked_until, last_failure) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET count = excluded.count, "
                "locked_until = excluded.locked_until, last_failure = excluded.last_failure",
                (user, count, locked_until, now),
            )
            return LockStatus(count, locked_until)

        return self._write(body)

    def unlock(self, user: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM failures WHERE user = ?", (user,)))

    def forget(self, user: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            for table in ("totp_used", "failures"):
                db.execute(f"DELETE FROM {table} WHERE user = ?", (user,))  # noqa: S608 - fixed names

        self._write(body)

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass
