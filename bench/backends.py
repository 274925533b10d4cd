"""LDAP and Redis cases of the benchmark (real slapd / redis-server on loopback).

Filled in when the LDAP source and the Redis store are on main; until then
``Servers`` adds no cases and the report says so.
"""

from __future__ import annotations

from typing import Any

from harness import Workspace
from linkus import LinkusSetup


class Servers:
    def __init__(self, ws: Workspace, *, ldap: bool, redis: bool):
        self.ws = ws
        self.want_ldap = ldap
        self.want_redis = redis

    def cases(self, ws: Workspace, user: str, setups: list[LinkusSetup]) -> list[tuple[str, LinkusSetup]]:
        return []

    def size_cases(self, ws: Workspace, user: str, n: int, setups: list[LinkusSetup]) -> list[tuple[str, LinkusSetup]]:
        return []

    def ldap_round_trip_ms(self, rounds: int) -> float | None:
        return None

    def parallel(self, ws: Workspace, users: list[str], levels: list[int], seconds: float, run: Any,
                 setups: list[LinkusSetup]) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass
