"""Gate sessions in the Redis store (the StateStore's ``gate_*`` methods; see state.base).

A mixin of ``RedisStore``; the scripts and the key layout are in
pam_linkus.state.redis_scripts ("web gate sessions"). Each method is one script:
one round trip, atomic on the server, so a revocation on one host is seen by the
next ``gate_check`` of every other host sharing the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pam_linkus.state.base import GATE_ID_LEN, GateSession

T = TypeVar("T")

#: Seconds a session's key outlives its idle end (the check compares times itself).
TTL_MARGIN = 60


def _session(key: str, f: list[Any], locked_until: float = 0.0) -> GateSession:
    """A script's fields as a GateSession; the wrong shape raises (read inside ``_call``: unavailable)."""
    if len(f) < 8:
        raise ValueError("short gate session reply")
    return GateSession(key, str(f[0]), str(f[1]), float(f[2]), float(f[3]), str(f[4]), str(f[5]), float(f[6]),
                       float(f[7]), locked_until)


class RedisGateSessions:
    """``gate_*`` of the StateStore contract on Redis."""

    if TYPE_CHECKING:
        prefix: str

        def _key(self, user: str, kind: str) -> str: ...
        def _eval(self, what: str, script: str, keys: list[str], args: list[Any],
                  read: Callable[[Any], T]) -> T: ...

    def _gate_keys(self, key: str, account: str) -> list[str]:
        return [f"{self.prefix}gate:{key}", self._key(account, "gate"), f"{self.prefix}gate_sessions"]

    def gate_create(self, key: str, account: str, method: str, client: str, site: str, now: float, *,
                    lifetime: int, idle: int, max_per_account: int, max_total: int) -> bool:
        args = [repr(now), account, method, client, site, repr(now + lifetime), idle, max_per_account, max_total,
                self.prefix, min(lifetime, idle) + TTL_MARGIN, lifetime + TTL_MARGIN]
        return self._eval("gate create", "GATE_CREATE", self._gate_keys(key, account), args,
                          lambda a: int(a) == 1)

    def gate_check(self, key: str, now: float, *, lifetime: float, idle: float,
                   touch_after: float) -> GateSession | None:
        def read(answer: Any) -> GateSession | None:
            if not answer:
                return None
            return _session(key, list(answer), float(answer[8]))

        args = [repr(now), repr(float(lifetime)), repr(float(idle)), repr(float(touch_after)), self.prefix,
                TTL_MARGIN]
        return self._eval("gate check", "GATE_CHECK", [f"{self.prefix}gate:{key}"], args, read)

    def gate_sessions(self, account: str | None, now: float) -> list[GateSession]:
        index = f"{self.prefix}gate_sessions" if account is None else self._key(account, "gate")

        def read(answer: Any) -> list[GateSession]:
            flat = list(answer)
            if len(flat) % 9:
                raise ValueError("gate list reply of the wrong shape")
            found = [_session(str(flat[i]), flat[i + 1:i + 9]) for i in range(0, len(flat), 9)]
            return sorted(found, key=lambda s: (s.created, s.key))

        return self._eval("gate list", "GATE_LIST", [index], [repr(now), self.prefix], read)

    def gate_revoke(self, *, key: str | None = None, id: str | None = None,
                    account: str | None = None, everyone: bool = False) -> int:
        chosen = [x for x in (key, id, account) if x is not None] + ([True] if everyone else [])
        if len(chosen) != 1:
            raise ValueError("gate_revoke takes exactly one selector")
        keys = [f"{self.prefix}gate_sessions"]
        if key is not None:
            how, value = "key", key
        elif id is not None:
            if len(id) != GATE_ID_LEN or any(c not in "0123456789abcdef" for c in id):
                return 0
            how, value = "id", id
        elif account is not None:
            how, value = "account", account
            keys.append(self._key(account, "gate"))
        else:
            how, value = "all", ""
        return self._eval("gate revoke", "GATE_REVOKE", keys, [how, value, self.prefix], int)

