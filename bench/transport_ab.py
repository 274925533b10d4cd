#!/usr/bin/python3
"""Compare linkusd's PAM-socket transport of two or more checkouts, interleaved in one run.

    bench/transport_ab.py [--rounds N] [--block N] [--seconds S] NAME=DIR [NAME=DIR ...]

Each DIR is a checkout (``git archive`` of a commit, a worktree) whose pam_linkus and
nss_config one linkusd runs; the PAM module is this checkout's native/pam_linkus.so. Every
round measures each linkusd in turn, the order rotating each round, so the machine's drift
(other engineers' tests on the same CPUs) hits every checkout alike:

- ``cpu_ms``: linkusd's CPU per login (schedstat of all its threads, less its idle rate) over
  ``--block`` sequential pamtester logins (pam_linkus alone, TOTP, SQLite); ``p50_ms``: the
  median wall time of those logins (spawn to exit);
- ``par32_per_s``: logins/s of 32 client processes for ``--seconds`` (fresh extensions);
- ``flood_p50_ms`` / ``flood_max_ms``: a root login (pamtester, TOTP) while four processes of a
  uid linkusd does not serve connect to pam.sock as fast as they can (tests/test_daemon.py's
  flood); ``flood_connects``: how many connections they made in that time.

Prints one JSON line per measurement and, per checkout, the median and the spread (min-max)
over the rounds. Run as root, like bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import _cpu
from harness import Workspace, avoid_step_edge, code_at, median_ms, pamtester
from linkus import DAEMON_PYTHON, LinkusSetup
from plumbing import FLOOD_SCRIPT  # the tests' flood, one copy (harness puts tests/ on the path)
from run import parallel

CLIENTS = 32
FLOODERS = 4
#: Root logins per flood window, 0.2 s apart.
FLOOD_LOGINS = 12



def cpu_block(setup: LinkusSetup, user: str, logins: int, idle_ms_per_s: float) -> dict[str, Any]:
    """``logins`` sequential logins; linkusd's CPU per login (less idle) and their median wall time."""
    times, bad = [], 0
    started, before = time.monotonic(), _cpu(setup.pid)
    for _ in range(logins):
        avoid_step_edge()
        code, elapsed = pamtester(setup.service_alone, user, [code_at(time.time())], setup.ws.messages)
        setup.forget(user)  # untimed for linkusd: the bench process writes the state
        bad += code != "PAM_SUCCESS"
        times.append(elapsed)
    used_ms = (_cpu(setup.pid) - before) / 1e6 - idle_ms_per_s * (time.monotonic() - started)
    return {"cpu_ms": round(used_ms / logins, 3), "p50_ms": round(median_ms(times), 2), "errors": bad}


def flood(setup: LinkusSetup, user: str, seconds: float) -> dict[str, Any]:
    """Root logins while uid 65534 floods pam.sock with connections linkusd refuses at once."""
    procs = [subprocess.Popen([DAEMON_PYTHON, "-c", FLOOD_SCRIPT, str(setup.pam_socket), str(seconds), "200000",
                               "000000020101"], user=65534,
                              group=65534, extra_groups=[], stdout=subprocess.PIPE, text=True)
             for _ in range(FLOODERS)]
    times, bad = [], 0
    try:
        time.sleep(0.5)  # let the flood build up
        for _ in range(FLOOD_LOGINS):
            avoid_step_edge()
            code, elapsed = pamtester(setup.service_alone, user, [code_at(time.time())], setup.ws.messages)
            setup.forget(user)
            bad += code != "PAM_SUCCESS"
            times.append(elapsed)
            time.sleep(0.2)
    finally:
        made = sum(int(proc.communicate(timeout=seconds + 30)[0] or 0) for proc in procs)
    return {"flood_p50_ms": round(median_ms(times), 2), "flood_max_ms": round(max(times) * 1000, 2),
            "flood_connects": made, "flood_errors": bad}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=100, help="sequential logins per CPU block")
    parser.add_argument("--seconds", type=float, default=4.0, help="parallel and flood windows")
    parser.add_argument("variants", nargs="+", help="NAME=DIR")
    args = parser.parse_args(argv)
    variants = [(name, Path(path).resolve()) for name, path in (v.split("=", 1) for v in args.variants)]
    ws = Workspace()
    setups: dict[str, LinkusSetup] = {}
    per_client = int(args.seconds * 60) + 20  # more than a client can do in a window (~600 logins/s in all)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    try:
        user = ws.user()
        par_users = {r: [[f"tc{c}r{r}n{k}" for k in range(per_client)] for c in range(CLIENTS)]
                     for r in range(args.rounds)}
        everyone = [u for r in par_users.values() for client in r for u in client]
        for name, code in variants:
            setups[name] = LinkusSetup(ws, name, [user, *everyone], extensions=len(everyone) + 1, code=code,
                                       config={"daemon": {"max_per_caller_root": 256}})
            setups[name].start(timeout=120)
        idle: dict[str, float] = {}
        for name, setup in setups.items():
            before = _cpu(setup.pid)
            time.sleep(2.0)
            idle[name] = (_cpu(setup.pid) - before) / 1e6 / 2.0
            for _ in range(10):  # warm up
                pamtester(setup.service_alone, user, [code_at(time.time())], ws.messages)
                setup.forget(user)
        names = [name for name, _ in variants]
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            row: dict[str, dict[str, Any]] = {name: {"variant": name, "round": r} for name in names}
            for name in order:
                row[name].update(cpu_block(setups[name], user, args.block, idle[name]))
            for name in order:
                time.sleep(1.0)
                par = parallel(setups[name], par_users[r], args.seconds, ws.messages)
                row[name].update(par32_per_s=par["per_second"], par32_p50_ms=par["p50_ms"],
                                 par32_errors=par["errors"])
            for name in order:
                time.sleep(1.0)
                row[name].update(flood(setups[name], user, args.seconds))
            for name in names:
                rows[name].append(row[name])
                print(json.dumps(row[name]), flush=True)
    finally:
        for setup in setups.values():
            setup.close()
        ws.close()
    keys = ("cpu_ms", "p50_ms", "par32_per_s", "par32_p50_ms", "flood_p50_ms", "flood_max_ms", "flood_connects")
    for name in names:
        summary: dict[str, Any] = {"variant": name, "rounds": len(rows[name])}
        for key in keys:
            values = [row[key] for row in rows[name]]
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summary["errors"] = sum(row["errors"] + row["par32_errors"] + row["flood_errors"] for row in rows[name])
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
