"""Gate sessions in the SQLite store (the StateStore's ``gate_*`` methods; see state.base).

A mixin of ``SqliteStore``, kept apart so the login state and the web gate's
sessions read separately. Table ``gate_sessions`` (migration 7): one row per session,
keyed by the token's keyed hash. ``gate_check`` is one read statement (the session and
its account's lock, joined) plus, at most every ``touch_after`` seconds, one short
write of ``seen``: an auth check per proxied request must not take the write lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pam_linkus.state.base import GATE_ID_LEN, GateSession

T = TypeVar("T")

_COLUMNS = "key, account, method, created, seen, client, site, expires, idle"


def _session(row: tuple[Any, ...], locked_until: float = 0.0) -> GateSession:
    return GateSession(str(row[0]), str(row[1]), str(row[2]), float(row[3]), float(row[4]), str(row[5]),
                       str(row[6]), float(row[7]), float(row[8]), locked_until)


def _dead(now: float) -> tuple[str, tuple[float, float]]:
    """The WHERE clause of sessions past their stored limits."""
    return "(expires <= ? OR seen + idle <= ?)", (now, now)


class SqliteGateSessions:
    """``gate_*`` of the StateStore contract on SQLite."""

    if TYPE_CHECKING:
        def _write(self, body: Callable[[sqlite3.Connection], T]) -> T: ...
        def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]: ...

    def gate_create(self, key: str, account: str, method: str, client: str, site: str, now: float, *,
                    lifetime: int, idle: int, max_per_account: int, max_total: int) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            where, args = _dead(now)
            db.execute(f"DELETE FROM gate_sessions WHERE {where}", args)  # noqa: S608 - fixed text
            mine = [r[0] for r in db.execute(
                "SELECT key FROM gate_sessions WHERE account = ? ORDER BY seen, created", (account,))]
            for old in mine[: max(0, len(mine) - max_per_account + 1)]:
                db.execute("DELETE FROM gate_sessions WHERE key = ?", (old,))
            (total,) = db.execute("SELECT count(*) FROM gate_sessions").fetchone()
            if total >= max_total:
                return False
            db.execute(f"INSERT OR REPLACE INTO gate_sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                       (key, account, method, now, now, client, site, now + lifetime, float(idle)))
            return True

        return self._write(body)

    def gate_check(self, key: str, now: float, *, lifetime: float, idle: float,
                   touch_after: float) -> GateSession | None:
        rows = self._read(
            "SELECT g.key, g.account, g.method, g.created, g.seen, g.client, g.site, g.expires, g.idle, "
            "coalesce(f.locked_until, 0) FROM gate_sessions g LEFT JOIN failures f ON f.user = g.account "
            "WHERE g.key = ?", (key,))
        if not rows:
            return None
        sess = _session(rows[0], float(rows[0][9]))
        if not sess.alive(now):
            self._write(lambda db: db.execute("DELETE FROM gate_sessions WHERE key = ? AND (expires <= ? "
                                              "OR seen + idle <= ?)", (key, now, now)))
            return None
        if not sess.alive(now, lifetime, idle):
            return None
        if now - sess.seen >= touch_after:
            # one statement, and only forward: a revocation in between leaves nothing to touch
            self._write(lambda db: db.execute("UPDATE gate_sessions SET seen = ? WHERE key = ? AND seen < ?",
                                              (now, key, now)))
        return sess

    def gate_sessions(self, account: str | None, now: float) -> list[GateSession]:
        where, args = _dead(now)
        if account is None:
            rows = self._read(f"SELECT {_COLUMNS} FROM gate_sessions WHERE NOT {where} "  # noqa: S608 - fixed text
                              "ORDER BY created", args)
        else:
            rows = self._read(f"SELECT {_COLUMNS} FROM gate_sessions WHERE account = ? AND NOT {where} "  # noqa: S608
                              "ORDER BY created", (account, *args))
        return [_session(r) for r in rows]

    def gate_revoke(self, *, key: str | None = None, id: str | None = None,
                    account: str | None = None, everyone: bool = False) -> int:
        chosen = [x for x in (key, id, account) if x is not None] + ([True] if everyone else [])
        if len(chosen) != 1:
            raise ValueError("gate_revoke takes exactly one selector")
        args: tuple[object, ...]
        if key is not None:
            sql, args = "DELETE FROM gate_sessions WHERE key = ?", (key,)
        elif id is not None:
            if len(id) != GATE_ID_LEN or any(c not in "0123456789abcdef" for c in id):
                return 0
            sql, args = "DELETE FROM gate_sessions WHERE substr(key, 1, ?) = ?", (len(id), id)
        elif account is not None:
            sql, args = "DELETE FROM gate_sessions WHERE account = ?", (account,)
        else:
            sql, args = "DELETE FROM gate_sessions", ()

        return self._write(lambda db: int(db.execute(sql, args).rowcount))
