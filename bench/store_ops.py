"""The state store's work for one TOTP login: ``lock_status``, then ``totp_attempt``
with the HMAC check inside.

Issue 11 compared this one step with the two-step path it replaced (``reserve_attempt``,
the check, ``accept_totp_step`` or ``settle_failure``); ``accept_totp_step`` has since
been removed from the stores, and with it that variant (run this file at commit 0176a5f
for the comparison). It runs in this process against a real store, in batches;
medians of the batches are printed as microseconds per login: CPU (``process_time``:
user + system, fsync's wait excluded) and wall (fsync included). SQLite also reports
statements per login (``set_trace_callback``). Redis runs when redis-server is
installed (a throwaway one on loopback, the tests' own fixture).

Usage: ``.venv/bin/python bench/store_ops.py [--rounds 15] [--batch 200] [--no-redis]``;
fsync per login: ``strace -f -c -e trace=fsync,fdatasync .venv/bin/python bench/store_ops.py
--only one-step --rounds 1 --batch 500 --no-redis``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pam_linkus.errors import CodeRejected
from pam_linkus.state.base import TotpAttempt
from pam_linkus.totp import decode_secret, hotp, match_totp

SECRET = decode_secret("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
LOCKOUT = {"max_failures": 5, "duration": 900, "permanent_after": 1000}
T0 = 1_800_000_000.0
USERS = 50


def _check(answer: str, now: float) -> Callable[[], int | None]:
    def check() -> int | None:
        try:
            return match_totp(SECRET, answer, now)
        except CodeRejected:
            return None

    return check


def one_step(store: Any, user: str, now: float, answer: str) -> bool:
    if store.lock_status(user, now).locked(now):
        return False
    attempt = store.totp_attempt(user, now, check=_check(answer, now), **LOCKOUT)
    return bool(attempt.verdict == TotpAttempt.ACCEPTED)


VARIANTS: dict[str, Callable[[Any, str, float, str], bool]] = {"one-step": one_step}


class Clock:
    """Each login a step later than the last, so every right code is a fresh step."""

    def __init__(self) -> None:
        self.now = T0

    def tick(self) -> float:
        self.now += 30
        return self.now


def batch(store: Any, fn: Callable[[Any, str, float, str], bool], clock: Clock, n: int, prefix: str,
          wrong_every: int) -> tuple[float, float]:
    """``n`` logins (every ``wrong_every``-th with a wrong code); (cpu s, wall s)."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        now = clock.tick()
        right = hotp(SECRET, int(now // 30))
        answer = right if not wrong_every or i % wrong_every else ("000000" if right != "000000" else "111111")
        ok = fn(store, f"{prefix}{i % USERS}", now, answer)
        assert ok == (answer == right), (prefix, i)
    return time.process_time() - c0, time.perf_counter() - w0


def compare(name: str, store: Any, rounds: int, n: int, only: str | None, wrong_every: int) -> None:
    variants = [only] if only else list(VARIANTS)
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    clocks = {v: Clock() for v in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            c, w = batch(store, VARIANTS[v], clocks[v], n, f"{v}-", wrong_every)
            cpu[v].append(c / n * 1e6)
            wall[v].append(w / n * 1e6)
    label = "every login right" if not wrong_every else f"every {wrong_every}th login wrong"
    print(f"{name} ({label}; {rounds} rounds x {n} logins, medians, us per login)")
    for v in variants:
        print(f"  {v:9s} cpu {statistics.median(cpu[v]):8.1f}   wall {statistics.median(wall[v]):8.1f}"
              f"   (cpu min {min(cpu[v]):.1f} max {max(cpu[v]):.1f})")


def statements_per_login(store: Any) -> None:
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    clock = Clock()
    for v, fn in VARIANTS.items():
        for kind, wrong in (("right", False), ("wrong", True)):
            seen.clear()
            now = clock.tick()
            answer = "000000" if wrong else hotp(SECRET, int(now // 30))
            fn(store, f"trace-{v}", now, answer)
            commits = seen.count("COMMIT")
            print(f"  {v:9s} {kind}: {len(seen)} statements, {commits} COMMIT")
        store.unlock(f"trace-{v}")
    store._db.set_trace_callback(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--only", choices=list(VARIANTS))
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--wrong-every", type=int, default=0, help="every Nth login a wrong code (0: none)")
    args = parser.parse_args(argv)

    from pam_linkus.state.sqlite_store import SqliteStore

    with tempfile.TemporaryDirectory(prefix="linkus-store-ops-") as tmp:
        store = SqliteStore(str(Path(tmp) / "state.db"))
        try:
            if not args.only:
                print("SQLite statements per login")
                statements_per_login(store)
            compare("SQLite", store, args.rounds, args.batch, args.only, args.wrong_every)
        finally:
            store.close()
        if args.no_redis:
            return 0
        try:
            from redis_server import RedisServer
            from test_state_redis import state_config

            from pam_linkus.state import open_store

            server = RedisServer(Path(tmp) / "redis").start()
        except (ImportError, OSError, RuntimeError) as exc:
            print(f"Redis skipped: {type(exc).__name__}: {exc}")
            return 0
        try:
            rstore = open_store(state_config(url=server.url, prefix="bench:"))
            try:
                compare("Redis", rstore, args.rounds, args.batch, args.only, args.wrong_every)
            finally:
                rstore.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
