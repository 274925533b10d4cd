#!/usr/bin/python3
"""pam-linkus benchmark: what one login through pam_linkus.so + linkusd costs next to the C
modules pam_oath and pam_google_authenticator, linkusd's own CPU per login, parallel logins
(throughput, exact replay and lockout), 100,000 extensions (login, reload, RSS) and LDAP.
Run as root: ``make bench`` or ``bench/run.py [--quick]``; prints Markdown tables
(``--readme`` also writes them into bench/README.md).

Every latency is a median of many logins taken round-robin across the cases in one run,
so a change in machine load hits all cases alike. Logins go through real libpam with
pamtester (answers on stdin), timed from spawn to exit, as a login costs sshd's child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backends
import floor
from harness import (
    NATIVE_SO,
    PASSWORD,
    SECRET,
    Workspace,
    avoid_step_edge,
    code_at,
    machine,
    median_ms,
    pamtester,
    percentile_ms,
)
from linkus import LinkusSetup, filler_name

CLIENT = Path(__file__).resolve().parent / "client.py"
#: Targets of issue 11 ("Performance"), tightened by issue 20 (LDAP and Redis as cheap as YAML).
TARGET_VS_OATH = 1.2
TARGET_LDAP_REDIS_VS_OATH = 1.3
TARGET_VS_GA = 1.0
TARGET_CPU_MS = 0.6
TARGET_LDAP_CPU_MS = 1.0
#: The shipped default of ldap.cache_ttl: the "cache on" rows use it as a host would.
LDAP_CACHE_TTL = 60
TARGET_SIZE_RATIO = 1.1
TARGET_RELOAD_S = 3.0
TARGET_RSS_MB = 150.0
TARGET_RELOAD_SLOWDOWN = 2.0
TARGET_LDAP_EXTRA_MS = 1.0


class Case:
    """One row of the latency table: a PAM service, a user, the answers, an untimed reset."""

    def __init__(self, name: str, service: str, user: str, answers: Callable[[], list[str]], *,
                 reset: Callable[[], None] | None = None, expect: str = "PAM_SUCCESS"):
        self.name = name
        self.service = service
        self.user = user
        self.answers = answers
        self.reset = reset
        self.expect = expect
        self.times: list[float] = []
        self.wrong: list[str] = []


def settle_fs() -> None:
    """Write out everything dirty and wait for it, untimed, between two logins.

    The state resets are not the modules' work: the oath usersfile and the google-authenticator
    file are rewritten in place (dirty pages, a freed block), linkusd's state is forgotten with
    its own commit, and pam_oath and pam_google_authenticator rename their new file *after* their
    fsync. Left pending, all of that goes into the journal commit of the next timed login's fsync
    (ext4, data=ordered) and its writeback competes with that login: measured, pam_oath after
    google-authenticator's reset took 0.7 ms more (bench/README, "What the figures depend on").
    ``sync()``, not ``syncfs``: the other processes on the machine write to the same file system."""
    os.sync()


def run_round_robin(cases: list[Case], rounds: int, messages: dict[str, str], seconds: float, *,
                    seed: int = 11, settle: Callable[[], None] = settle_fs) -> int:
    """Each round runs every case once, in an order shuffled per round (seeded: the same on
    every run), so no case always follows the same neighbour and its leftovers; after every
    login and its reset, ``settle``. Bounded by ``rounds`` and by ``seconds``. Returns the
    rounds done."""
    for case in cases:  # one untimed login each: page cache, connections
        _one(case, messages, timed=False, settle=settle)
    order = random.Random(seed)
    deadline = time.monotonic() + seconds
    done = 0
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        for case in order.sample(cases, len(cases)):
            _one(case, messages, timed=True, settle=settle)
        done += 1
    return done


def _one(case: Case, messages: dict[str, str], *, timed: bool, settle: Callable[[], None]) -> None:
    avoid_step_edge()
    code, elapsed = pamtester(case.service, case.user, case.answers(), messages)
    if code != case.expect:
        case.wrong.append(code)
    elif timed:
        case.times.append(elapsed)
    if case.reset is not None:
        case.reset()
    settle()


# -- the cases ------------------------------------------------------------------------------


def peer_cases(ws: Workspace, user: str) -> list[Case]:
    """pam_permit, pam_unix and the two C second-factor modules, with and without pam_unix."""
    from pam_linkus.totp import decode_secret

    ga_text = f'{SECRET}\n" TOTP_AUTH\n" DISALLOW_REUSE\n" WINDOW_SIZE 3\n'
    ga = ws.file("google_authenticator", ga_text, 0o400)
    oath_text = f"HOTP/T30 {user} - {decode_secret(SECRET).hex()}\n"
    oath = ws.file("users.oath", oath_text)

    def reset_ga() -> None:  # DISALLOW_REUSE records used codes in the file: put it back
        os.chmod(ga, 0o600)
        ga.write_text(ga_text)
        os.chmod(ga, 0o400)

    def reset_oath() -> None:  # pam_oath records the last code in the usersfile: put it back
        oath.write_text(oath_text)

    unix = "auth requisite pam_unix.so nodelay\n"
    ga_line = f"auth required pam_google_authenticator.so secret={ga} user=root\n"
    oath_line = f"auth required pam_oath.so usersfile={oath} window=3\n"
    pw = lambda: [PASSWORD]  # noqa: E731
    pw_code = lambda: [PASSWORD, code_at(time.time())]  # noqa: E731
    code = lambda: [code_at(time.time())]  # noqa: E731
    return [
        Case("pam_permit", ws.service("permit", "auth required pam_permit.so\n"), user, lambda: []),
        Case("pam_unix", ws.service("unix", "auth required pam_unix.so nodelay\n"), user, pw),
        Case("pam_unix + pam_google_authenticator", ws.service("ga", unix + ga_line), user, pw_code, reset=reset_ga),
        Case("pam_unix + pam_oath", ws.service("oath", unix + oath_line), user, pw_code, reset=reset_oath),
        Case("pam_google_authenticator alone", ws.service("ga-alone", ga_line), user, code, reset=reset_ga),
        Case("pam_oath alone", ws.service("oath-alone", oath_line), user, code, reset=reset_oath),
    ]


def linkus_cases(name: str, setup: LinkusSetup, user: str, *, unix: bool = True) -> list[Case]:
    out = []
    if unix:
        out.append(Case(f"pam_unix + pam_linkus ({name})", setup.service, user,
                        lambda: [PASSWORD, code_at(time.time())], reset=lambda: setup.forget(user)))
    out.append(Case(f"pam_linkus alone ({name})", setup.service_alone, user, lambda: [code_at(time.time())],
                    reset=lambda: setup.forget(user)))
    return out


# -- clients in their own processes ---------------------------------------------------------


def spawn_clients(specs: list[dict[str, Any]]) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen(["/usr/bin/python3", str(CLIENT), json.dumps(spec)], stdout=subprocess.PIPE,
                             text=True) for spec in specs]


def collect(procs: list[subprocess.Popen[str]], messages: dict[str, str],
            timeout: float = 300) -> list[list[tuple[str, float, float]]]:
    """Each client's logins as (PAM code name, started epoch, seconds)."""
    out = []
    for proc in procs:
        text, _ = proc.communicate(timeout=timeout)
        rows = json.loads(text.strip().splitlines()[-1]) if text.strip() else []
        out.append([("PAM_SUCCESS" if not v else messages.get(v, f"? {v[:60]}"), s, e) for v, s, e in rows])
    return out


def parallel(setup: LinkusSetup, users: list[list[str]], seconds: float, messages: dict[str, str]) -> dict[str, Any]:
    """len(users) client processes, each logging in (pam_linkus alone) as its own users, one fresh
    extension per login (no replay, no reset between logins), for at most ``seconds``."""
    start_at = time.time() + 1.5  # after every client process has started
    specs = [{"service": setup.service_alone, "users": mine, "start_at": start_at, "stop_at": start_at + seconds}
             for mine in users]
    cpu0 = setup.cpu()
    results = collect(spawn_clients(specs), messages)
    cpu = setup.cpu() - cpu0
    flat = [r for rs in results for r in rs]
    ok = [e for code, _, e in flat if code == "PAM_SUCCESS"]
    errors = [code for code, _, _ in flat if code != "PAM_SUCCESS"]
    wall = max((s + e for _, s, e in flat), default=start_at) - start_at
    return {"clients": len(users), "logins": len(flat), "seconds": round(wall, 2),
            "per_second": round(len(ok) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": round(percentile_ms(ok, 50), 1), "p99_ms": round(percentile_ms(ok, 99), 1),
            "errors": len(errors), "error_codes": sorted(set(errors)),
            "cpu_ms_per_login": round(cpu / len(flat) * 1000, 2) if flat else None}


def burst(setup: LinkusSetup, user: str, code: str, clients: int, messages: dict[str, str]) -> list[str]:
    """``clients`` logins as one user with one code, started at the same moment."""
    start_at = time.time() + 1.0
    specs = [{"service": setup.service_alone, "users": [user], "code": code, "start_at": start_at,
              "stop_at": start_at + 30} for _ in range(clients)]
    return [code for rs in collect(spawn_clients(specs), messages) for code, _, _ in rs]


def replay_exactness(setup: LinkusSetup, user: str, clients: int, rounds: int,
                     messages: dict[str, str]) -> dict[str, Any]:
    """One code, ``clients`` logins at once: exactly one success per round."""
    successes, denied, other = 0, 0, []
    setup.log.take()
    for _ in range(rounds):
        setup.forget(user)
        if 30 - time.time() % 30 < 8:  # every login of a round must fall in the same time step
            time.sleep(30 - time.time() % 30 + 0.2)
        out = burst(setup, user, code_at(time.time() + 1.0), clients, messages)
        successes += out.count("PAM_SUCCESS")
        denied += out.count("PAM_AUTH_ERR")
        other += [c for c in out if c not in ("PAM_SUCCESS", "PAM_AUTH_ERR")]
    lines = _attempt_lines(setup, user)
    replayed = sum(1 for line in lines if "reason=replayed code" in line)
    unexpected = [line for line in lines if "reason=replayed code" not in line and "outcome=success" not in line]
    lost = clients * rounds - len(lines)
    # A log line can be lost (linkusd sends with MSG_DONTWAIT; the kernel queues 10 datagrams on a unix
    # socket by default), never invented: every line that arrived must be a replay or the one success.
    return {"clients": clients, "rounds": rounds, "successes": successes, "denied": denied,
            "replayed_in_log": replayed, "lines_lost": lost, "other": other,
            "exact": (successes == rounds and denied == rounds * (clients - 1) and not other and not unexpected
                      and replayed + lost >= denied)}


def _attempt_lines(setup: LinkusSetup, user: str) -> list[str]:
    """linkusd's attempt lines for ``user`` since the last take (quotes removed)."""
    lines = [line.replace('"', "") for line in setup.log.take()]
    return [line for line in lines if "(linkusd)" in line and f" user={user} " in line and " outcome=" in line]


def lockout_exactness(setup: LinkusSetup, user: str, clients: int, max_failures: int,
                      messages: dict[str, str]) -> dict[str, Any]:
    """``clients`` wrong codes at once: exactly ``max_failures`` checked (one "wrong code" log
    line each), the rest refused as locked; then the right code is refused too."""
    setup.forget(user)
    setup.log.take()
    if 30 - time.time() % 30 < 8:
        time.sleep(30 - time.time() % 30 + 0.2)
    good = code_at(time.time() + 1.0)
    wrong = f"{(int(good) + 500000) % 1000000:06d}"
    out = burst(setup, user, wrong, clients, messages)
    lines = _attempt_lines(setup, user)
    checked = sum(1 for line in lines if "reason=wrong code" in line)
    lost = clients - len(lines)
    status = setup.store().lock_status(user, time.time())
    right_while_locked, _ = pamtester(setup.service_alone, user, [code_at(time.time())], messages)
    setup.forget(user)
    auth_err, maxtries = out.count("PAM_AUTH_ERR"), out.count("PAM_MAXTRIES")
    return {"clients": clients, "max_failures": max_failures, "denied": auth_err, "locked": maxtries,
            "checked_in_log": checked, "lines_lost": lost, "failures_in_store": status.failures,
            "right_code_while_locked": right_while_locked,
            "exact": _lockout_exact(checked, lost, auth_err, maxtries, clients, max_failures, status.failures,
                                    right_while_locked)}


def _lockout_exact(checked: int, lost: int, denied: int, locked: int, clients: int, max_failures: int,
                   in_store: int, right_while_locked: str) -> bool:
    """Exactly ``max_failures`` codes checked and counted, every other login refused as locked, and
    the right code refused afterwards. A checked wrong code that settles after the last slot was
    reserved ends "locked", so how many checked ones say "denied" (at most max_failures - 1)
    depends on timing. Log lines can be lost (see replay_exactness), never invented."""
    return (max_failures - lost <= checked <= max_failures and denied <= max_failures - 1 and denied + locked == clients
            and in_store == max_failures and right_while_locked == "PAM_MAXTRIES")


# -- linkusd's own cost ---------------------------------------------------------------------


def cpu_per_login(ws: Workspace, setup: LinkusSetup, user: str, logins: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """linkusd's CPU per login and the floor's (bench/floor.py, one FULL and one OFF commit per login,
    nothing else), in one interleaved run: pamtester through pam_linkus.so, one login after another,
    blocks of 25 per server in rotating order; CPU from schedstat (every thread, in ns). linkusd's
    state is put back between its logins from the bench process (untimed, not its CPU)."""
    directory = ws.root / "floor"
    directory.mkdir(mode=0o755)
    servers = floor.start(str(directory))
    try:
        services = {mode: ws.service(f"floor-{mode.lower()}", f"auth required {NATIVE_SO} "
                                     f"socket={floor.socket_path(str(directory), mode)}\n")
                    for mode in servers}
        bad: dict[str, int] = {"linkusd": 0, "FULL": 0, "OFF": 0}

        def one(name: str, service: str) -> None:
            avoid_step_edge()
            code, _ = pamtester(service, user, [code_at(time.time())], ws.messages)
            bad[name] += code != "PAM_SUCCESS"
            if name == "linkusd":
                setup.forget(user)

        setup.forget(user)
        idle_s = 2.0
        before = floor._cpu(setup.pid)
        time.sleep(idle_s)
        idle_ms_per_s = (floor._cpu(setup.pid) - before) / 1e6 / idle_s
        started = time.monotonic()
        logins_fn = {"linkusd": partial(one, "linkusd", setup.service_alone),
                     **{mode: partial(one, mode, service) for mode, service in services.items()}}
        per = floor.measure({"linkusd": setup.pid, **{mode: proc.pid for mode, proc in servers.items()}},
                            logins_fn, logins)
        elapsed = time.monotonic() - started
        done = max(1, logins // 25) * 25
        # the watcher's idle CPU over the run, shared out over linkusd's logins
        idle_per_login = idle_ms_per_s * elapsed / done / 3
        cpu = {"logins": done, "errors": bad["linkusd"], "idle_ms_per_login": round(idle_per_login, 4),
               "ms_per_login": round(per["linkusd"] - idle_per_login, 3), "method": "schedstat"}
        return cpu, {"full_ms": round(per["FULL"], 3), "off_ms": round(per["OFF"], 3), "logins": done,
                     "errors": bad["FULL"] + bad["OFF"]}
    finally:
        floor.stop(servers)


def sequential_cpu(setup: LinkusSetup, user: str, logins: int) -> dict[str, Any]:
    """linkusd's CPU per login (schedstat, all threads) over ``logins`` sequential pamtester logins
    (pam_linkus alone), less its idle rate; the state is put back between logins from the bench
    process, outside the measured spans. For the LDAP set-up: the lookups come from its cache."""
    idle_s = 2.0
    before = floor._cpu(setup.pid)
    time.sleep(idle_s)
    idle_ns_per_s = (floor._cpu(setup.pid) - before) / idle_s
    spent, wall, errors = 0, 0.0, 0
    setup.forget(user)
    for _ in range(logins):
        avoid_step_edge()
        c0, t0 = floor._cpu(setup.pid), time.monotonic()
        code, _ = pamtester(setup.service_alone, user, [code_at(time.time())], {})
        spent += floor._cpu(setup.pid) - c0
        wall += time.monotonic() - t0
        errors += code != "PAM_SUCCESS"
        setup.forget(user)
    ms = (spent - idle_ns_per_s * wall) / 1e6 / logins
    return {"logins": logins, "errors": errors, "ms_per_login": round(ms, 3)}


def fsyncs_per_login(setup: LinkusSetup, user: str, logins: int, messages: dict[str, str]) -> float | None:
    """fsync + fdatasync calls of linkusd per login (strace -c over ``logins`` logins), or None."""
    import shutil

    if not shutil.which("strace"):
        return None
    out = setup.dir / "strace.txt"
    proc = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out),
                             "-p", str(setup.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        for _ in range(logins):
            setup.forget(user)
            avoid_step_edge()
            pamtester(setup.service_alone, user, [code_at(time.time())], messages)
    finally:
        proc.terminate()
        proc.wait(10)
    calls = 0
    for line in out.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync"):
            calls += int(parts[3])
    return round(calls / logins, 2)


def sqlite_fsync_cost(directory: Path, writes: int) -> dict[str, float]:
    """One small durable write, as the replay record's: a BEGIN IMMEDIATE upsert in a WAL file
    on the state's file system, with synchronous=FULL and with OFF (interleaved); median ms.

    Measured separately because the store does not let synchronous be configured: it is FULL,
    always (pam_linkus/state/sqlite_store.py)."""
    path = directory / "fsync-probe.db"
    times: dict[str, list[float]] = {"FULL": [], "OFF": []}
    dbs = {}
    for mode in times:
        db = sqlite3.connect(f"{path}.{mode}", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={mode}")
        db.execute("CREATE TABLE IF NOT EXISTS t (user TEXT PRIMARY KEY, step INTEGER, at REAL) WITHOUT ROWID")
        dbs[mode] = db
    try:
        for i in range(writes):
            for mode, db in dbs.items():
                started = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t VALUES (?, ?, ?) ON CONFLICT (user) DO UPDATE SET step = excluded.step, "
                           "at = excluded.at", ("bench", i, time.time()))
                db.execute("COMMIT")
                times[mode].append(time.perf_counter() - started)
    finally:
        for db in dbs.values():
            db.close()
    full, off = median_ms(times["FULL"]), median_ms(times["OFF"])
    return {"full_ms": round(full, 3), "off_ms": round(off, 3), "fsync_ms": round(full - off, 3)}


# -- 100,000 extensions ---------------------------------------------------------------------


def reload_window(setup: LinkusSetup, total: int, clients: int, messages: dict[str, str],
                  quick: bool, first: int = 0, control_s: float | None = None,
                  hog: bool = False) -> dict[str, Any]:
    """RELOAD of the large file while ``clients`` processes log in (pam_linkus alone, each login
    a fresh TOTP extension of that file), then the daemon's RSS. Logins that ended before the
    reload give the median; the worst login that overlapped the reload is compared with it.
    ``first``: skip that many TOTP extensions (a repeated window logs in as others: no replays).
    ``control_s``: no RELOAD, just that many seconds of the same load (the worst login of a
    window with no reload at all: the floor the reload's figures stand on). ``hog`` (with
    ``control_s``): meanwhile an unrelated CPU-bound process, as long as the reload's child
    parse, so what any busy CPU does to the logins is measured apart from the reload."""
    totp_users = [filler_name(i) for i in range(0, total - 1, 3)][first:]
    per_client = 400 if quick else 800
    before_s, window_s = 3.0, 10.0
    start_at = time.time() + 1.5
    specs = [{"service": setup.service_alone, "users": totp_users[c * per_client:(c + 1) * per_client],
              "start_at": start_at, "stop_at": start_at + window_s, "pause": 0.02} for c in range(clients)]
    procs = spawn_clients(specs)
    time.sleep(max(0.0, start_at + before_s - time.time()))
    r0 = time.time()
    if control_s is None:
        status = setup.control(reload=True)
    elif hog:
        spin = f"import time\nend = time.monotonic() + {control_s}\nwhile time.monotonic() < end: pass\n"
        subprocess.run(["/usr/bin/python3", "-c", spin], check=True, timeout=control_s + 30)
        status = setup.control()
    else:
        time.sleep(control_s)
        status = setup.control()
    r1 = time.time()
    rss = setup.rss()
    results = collect(procs, messages)
    flat = [r for rs in results for r in rs]
    before = [e for code, s, e in flat if code == "PAM_SUCCESS" and s + e < r0]
    during = [e for code, s, e in flat if s < r1 and s + e > r0]
    errors = [code for code, _, _ in flat if code != "PAM_SUCCESS"]
    med = median_ms(before)
    worst = max(during, default=0.0) * 1000
    return {"reload_s": round(r1 - r0, 2), "rss_mb": round(rss, 1), "last_error": status.get("last_error"),
            "clients": clients, "logins": len(flat), "errors": len(errors), "error_codes": sorted(set(errors)),
            "median_before_ms": round(med, 1), "during": len(during), "worst_during_ms": round(worst, 1),
            "p50_during_ms": round(median_ms(during), 1),
            "over_2x": sum(e * 1000 > 2 * med for e in during),
            "slowdown": round(worst / med, 2) if med == med and med > 0 else None}


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and logins (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="logins per latency case (default 60, quick 20)")
    parser.add_argument("--clients", default="1,2,8,32", help="parallel levels (default %(default)s)")
    parser.add_argument("--seconds", type=float, help="at most this long per parallel level (default 12, quick 5)")
    parser.add_argument("--extensions", type=int, default=100_000, help="the large file (default %(default)s)")
    parser.add_argument("--no-ldap", action="store_true")
    parser.add_argument("--ldap-entries", type=int, default=100_000,
                        help="entries of the large directory (default %(default)s; 0: no such row)")
    parser.add_argument("--ldap-delay-ms", type=float, default=20.0,
                        help="round trip added by bench/delay_proxy.py for the far directory (default %(default)s)")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--json", help="write all raw results to this file")
    parser.add_argument("--readme", action="store_true", help="write the tables into bench/README.md")
    parser.add_argument("--from-json", help="only render the tables of a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report = render(saved)
        print(report)
        if args.readme:
            write_readme(report)
        return 0 if results_ok(saved) else 1
    rounds = args.rounds or (20 if args.quick else 60)
    seconds = args.seconds or (5.0 if args.quick else 12.0)
    levels = [int(x) for x in args.clients.split(",")]
    per_level = 150 if args.quick else 600  # logins per parallel level at most, one extension each

    started = time.monotonic()
    results: dict[str, Any] = {"machine_before": machine(), "rounds_asked": rounds}
    ws = Workspace()
    setups: list[LinkusSetup] = []
    servers: backends.Servers | None = None
    try:
        user = ws.user()
        servers = backends.Servers(ws, [user], ldap=not args.no_ldap, redis=not args.no_redis,
                                   ldap_entries=args.ldap_entries, ldap_delay_ms=args.ldap_delay_ms)
        results["problems"] = list(servers.problems)

        # replay at 32 clients: 31 replays count as failures, so this one has max_failures 100
        yaml10 = LinkusSetup(ws, "yaml10", [user, "prep"], config={"daemon": {"max_per_account": 64}})
        big = LinkusSetup(ws, "yaml100k", [user], extensions=args.extensions)
        setups += [yaml10, big]
        named: list[tuple[str, LinkusSetup]] = [("YAML, SQLite", yaml10)]
        ldap = redis = None
        alone: list[tuple[str, LinkusSetup]] = []  # rows without a pam_unix twin
        if servers.slapd is not None:
            def ldap_setup(name: str, which: str, ttl: int) -> LinkusSetup:
                section = servers.ldap_config(which, cache_ttl=ttl)
                made = LinkusSetup(ws, name, [user], config={"sources": ["ldap"], "ldap": section})
                setups.append(made)
                return made

            ldap = ldap_setup("ldap", "small", LDAP_CACHE_TTL)
            named.append(("LDAP, SQLite", ldap))
            alone.append(("LDAP, no cache, SQLite", ldap_setup("ldap-nocache", "small", 0)))
            if servers.slapd_big is not None:
                alone.append((f"LDAP {args.ldap_entries:,} entries, SQLite",
                              ldap_setup("ldap-big", "big", LDAP_CACHE_TTL)))
            if servers.proxy is not None:
                far = f"LDAP +{args.ldap_delay_ms:g} ms round trip"
                alone.append((f"{far}, SQLite", ldap_setup("ldap-far", "far", LDAP_CACHE_TTL)))
                alone.append((f"{far}, no cache, SQLite", ldap_setup("ldap-far-nocache", "far", 0)))
        if servers.redis is not None:
            redis = LinkusSetup(ws, "yaml-redis", [user], config={"state": servers.redis_config(f"b{ws.tag}:")})
            setups.append(redis)
            named.append(("YAML, Redis", redis))
        par_users = [[[f"pl{n}c{c}n{k}" for k in range(per_level // n + 1)] for c in range(n)] for n in levels]
        flat_par = [u for level in par_users for client in level for u in client]
        par = LinkusSetup(ws, "parallel", ["plock", *flat_par], extensions=len(flat_par) + 1000, config={
            "lockout": {"max_failures": 5, "permanent_after": 100, "duration": 900},
            "daemon": {"max_per_account": 64}})
        setups.append(par)
        for setup in setups:
            seconds_taken = setup.start(timeout=120)
            if setup is big:
                results["big_start_s"] = round(seconds_taken, 2)
                results["big_rss_after_start_mb"] = round(big.rss(), 1)
        print(f"[bench] {len(setups)} linkusd ready; latency round-robin ({rounds} rounds)", flush=True)

        cases = peer_cases(ws, user)
        for name, setup in named:
            cases += linkus_cases(name, setup, user)
        cases += linkus_cases(f"YAML {args.extensions:,} extensions, SQLite", big, user, unix=False)
        for name, setup in alone:
            cases += linkus_cases(name, setup, user, unix=False)
        order = ["pam_permit", "pam_unix", "pam_unix + pam_google_authenticator", "pam_unix + pam_oath"]
        cases.sort(key=lambda c: (c.name.endswith(" alone") or "alone (" in c.name,
                                  order.index(c.name) if c.name in order else 99))
        results["rounds"] = run_round_robin(cases, rounds, ws.messages, seconds=900)
        results["latency"] = [_row(c) for c in cases]

        print("[bench] fsync, CPU per login", flush=True)
        results["fsync"] = sqlite_fsync_cost(yaml10.dir / "state", 100 if args.quick else 300)
        results["cpu"], results["floor"] = cpu_per_login(ws, yaml10, user, 100 if args.quick else 300)
        results["fsyncs_per_login"] = fsyncs_per_login(yaml10, user, 20, ws.messages)
        if ldap is not None:
            results["ldap_round_trip_ms"] = servers.ldap_round_trip_ms(ldap.config_path, user, rounds)
            results["ldap_cpu"] = sequential_cpu(ldap, user, 100 if args.quick else 300)
            results["yaml_cpu_seq"] = sequential_cpu(yaml10, user, 100 if args.quick else 300)

        print("[bench] parallel", flush=True)
        results["parallel"] = [parallel(par, users, seconds, ws.messages) for users in par_users]
        results["replay"] = replay_exactness(yaml10, "prep", 32, 2 if args.quick else 3, ws.messages)
        results["lockout"] = lockout_exactness(par, "plock", 32, 5, ws.messages)

        print("[bench] reload of the large file", flush=True)
        results["reload"] = reload_window(big, args.extensions, 4, ws.messages, args.quick)
        # the same load for as long, no reload: how slow the worst login is anyway (fresh extensions)
        control_s = max(1.0, results["reload"]["reload_s"])
        per_window = 4 * (400 if args.quick else 800)
        results["reload_control"] = reload_window(big, args.extensions, 4, ws.messages, args.quick,
                                                  first=per_window, control_s=control_s)
        results["reload_hog"] = reload_window(big, args.extensions, 4, ws.messages, args.quick,
                                              first=2 * per_window, control_s=control_s, hog=True)
        results["reload_idle"] = _reload_idle(big)
    finally:
        for setup in setups:
            setup.close()
        if servers is not None:
            servers.close()
        ws.close()
    results["machine_after"] = machine()
    results["elapsed_s"] = round(time.monotonic() - started)
    report = render(results)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.readme:
        write_readme(report)
    return 0 if results_ok(results) else 1


def _reload_idle(setup: LinkusSetup) -> dict[str, Any]:
    r0 = time.monotonic()
    status = setup.control(reload=True)
    return {"reload_s": round(time.monotonic() - r0, 2), "rss_mb": round(setup.rss(), 1),
            "last_error": status.get("last_error")}


def _row(case: Case) -> dict[str, Any]:
    return {"case": case.name, "n": len(case.times), "median_ms": round(median_ms(case.times), 2),
            "p90_ms": round(percentile_ms(case.times, 90), 2), "unexpected": case.wrong}


# -- report ---------------------------------------------------------------------------------


def _median(results: dict[str, Any], name: str) -> float | None:
    return next((r["median_ms"] for r in results["latency"] if r["case"] == name), None)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    linkus = _median(results, "pam_linkus alone (YAML, SQLite)")
    oath = _median(results, "pam_oath alone")
    ga = _median(results, "pam_google_authenticator alone")
    fsync = results["fsync"]["fsync_ms"]
    per = results.get("fsyncs_per_login")
    note = f"; fsync {fsync:.2f} ms per durable write" + (f", {per:g} per login" if per is not None else "")
    if linkus and oath:
        out.append((f"pam_linkus alone <= {TARGET_VS_OATH}x pam_oath alone",
                    f"{linkus / oath:.2f}x ({linkus:.1f} / {oath:.1f} ms{note})", linkus / oath <= TARGET_VS_OATH))
    if linkus and ga:
        out.append((f"pam_linkus alone <= {TARGET_VS_GA}x pam_google_authenticator alone",
                    f"{linkus / ga:.2f}x ({linkus:.1f} / {ga:.1f} ms)", linkus / ga <= TARGET_VS_GA))
    for row, label in (("pam_linkus alone (LDAP, SQLite)", "LDAP (warm, cache on)"),
                       ("pam_linkus alone (YAML, Redis)", "YAML + Redis")):
        value = _median(results, row)
        if value and oath:
            out.append((f"{label} alone <= {TARGET_LDAP_REDIS_VS_OATH}x pam_oath alone",
                        f"{value / oath:.2f}x ({value:.1f} / {oath:.1f} ms)",
                        value / oath <= TARGET_LDAP_REDIS_VS_OATH))
    ldap10 = _median(results, "pam_linkus alone (LDAP, SQLite)")
    big_ldap = next((r for r in results["latency"] if " entries, SQLite" in r["case"]), None)
    if big_ldap and ldap10 and oath:
        size = big_ldap["case"].split("LDAP ")[1].split(" entries")[0]
        value = big_ldap["median_ms"]
        out.append((f"LDAP with {size} entries <= {TARGET_LDAP_REDIS_VS_OATH}x pam_oath alone, "
                    f"within {TARGET_SIZE_RATIO}x of 10",
                    f"{value / oath:.2f}x pam_oath; {value / ldap10:.2f}x the 10-entry directory",
                    value / oath <= TARGET_LDAP_REDIS_VS_OATH and value / ldap10 <= TARGET_SIZE_RATIO))
    cpu = results["cpu"]["ms_per_login"]
    out.append((f"linkusd CPU per login <= {TARGET_CPU_MS} ms (YAML, SQLite)", f"{cpu:.2f} ms", cpu <= TARGET_CPU_MS))
    if (lc := results.get("ldap_cpu")):
        out.append((f"linkusd CPU per login <= {TARGET_LDAP_CPU_MS:g} ms (LDAP from its cache)",
                    f"{lc['ms_per_login']:.2f} ms", lc["ms_per_login"] <= TARGET_LDAP_CPU_MS))
    errors = sum(p["errors"] for p in results["parallel"])
    out.append(("parallel logins: no errors", str(errors), errors == 0))
    out.append(("replay exact at 32 clients", _exact_text(results["replay"]), results["replay"]["exact"]))
    lk = results["lockout"]
    exact = _lockout_exact(lk["checked_in_log"], lk.get("lines_lost", 0), lk["denied"], lk["locked"],
                           lk["clients"], lk["max_failures"],
                           lk["failures_in_store"], lk["right_code_while_locked"])
    out.append(("lockout exact at 32 clients", _exact_text(lk), exact))
    big = next((r for r in results["latency"] if "extensions, SQLite" in r["case"]), None)
    if big and linkus:
        ratio = big["median_ms"] / linkus
        size = big["case"].split("(")[1].split(" extensions")[0]
        out.append((f"{size} extensions: login within {TARGET_SIZE_RATIO}x of 10",
                    f"{ratio:.2f}x", ratio <= TARGET_SIZE_RATIO))
    rl = results["reload"]
    out.append((f"reload of the large file <= {TARGET_RELOAD_S:g} s",
                f"{rl['reload_s']} s under load, {results['reload_idle']['reload_s']} s idle",
                rl["reload_s"] <= TARGET_RELOAD_S))
    rss = max(rl["rss_mb"], results["reload_idle"]["rss_mb"])
    out.append((f"daemon RSS after the reload <= {TARGET_RSS_MB:g} MB", f"{rss} MB", rss <= TARGET_RSS_MB))
    slow = rl["slowdown"]
    out.append((f"no login slower than {TARGET_RELOAD_SLOWDOWN:g}x median during the reload",
                f"worst {rl['worst_during_ms']} ms = {slow}x the median {rl['median_before_ms']} ms "
                f"({rl['during']} logins overlapped it, {rl['errors']} errors)"
                + (f"; with no reload, the same load for as long: worst {rc['worst_during_ms']} ms = "
                   f"{rc['slowdown']}x" if (rc := results.get("reload_control")) else "")
                + (f"; no reload but a CPU hog as long: {rh['worst_during_ms']} ms = {rh['slowdown']}x"
                   if (rh := results.get("reload_hog")) else ""),
                slow is not None and slow <= TARGET_RELOAD_SLOWDOWN and rl["errors"] == 0))
    ldap = _median(results, "pam_linkus alone (LDAP, SQLite)")
    rtt = results.get("ldap_round_trip_ms")
    if ldap and linkus and rtt is not None:
        extra = ldap - linkus - rtt
        out.append((f"LDAP login <= YAML login + directory round trip + {TARGET_LDAP_EXTRA_MS:g} ms",
                    f"{ldap:.2f} - {linkus:.2f} = {ldap - linkus:+.2f} ms; round trip {rtt:.2f} ms; "
                    f"extra {extra:+.2f} ms", extra <= TARGET_LDAP_EXTRA_MS))
    return out


def _exact_text(d: dict[str, Any]) -> str:
    if "successes" in d:
        return (f"{d['successes']}/{d['rounds']} successes, {d['denied']} denied ({d['replayed_in_log']} logged "
                f"as replay{_lost(d)}), {d['clients']} clients x {d['rounds']} rounds"
                + (f", other {d['other']}" if d["other"] else ""))
    return (f"{d['checked_in_log']} codes checked (\"wrong code\" log lines{_lost(d)}), {d['denied']} denied + "
            f"{d['locked']} locked of {d['clients']}; failures in store {d['failures_in_store']}; "
            f"right code while locked: {d['right_code_while_locked']}")


def _lost(d: dict[str, Any]) -> str:
    lost = d.get("lines_lost", 0)
    return f"; {lost} log lines lost by the syslog queue" if lost else ""


def results_ok(results: dict[str, Any]) -> bool:
    """Exit status: the correctness rows (errors, replay, lockout) must hold on any machine;
    timing targets depend on the machine and its load, so they are reported, not enforced."""
    return all(ok for name, _, ok in targets(results) if name.startswith(("parallel", "replay", "lockout")))


def render(results: dict[str, Any]) -> str:
    m = results["machine_before"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cpus']} CPUs), Linux {m['kernel']}, Python {m['python']}.",
             f"Load average before: {_load(m)}; after: {_load(results['machine_after'])}. "
             f"{results['rounds']} logins per case, round-robin; whole run {results['elapsed_s']} s.", ""]
    oath = _median(results, "pam_oath alone") or float("nan")
    ga = _median(results, "pam_google_authenticator alone") or float("nan")
    uoath = _median(results, "pam_unix + pam_oath") or float("nan")
    uga = _median(results, "pam_unix + pam_google_authenticator") or float("nan")
    lines += ["### One login (pamtester, wall time of the whole process)", "",
              "| stack | median ms | p90 ms | vs pam_oath | vs pam_google_authenticator |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in results["latency"]:
        alone = "alone" in r["case"]
        base_o, base_g = (oath, ga) if alone else (uoath, uga)
        ratio = r["case"] not in ("pam_permit", "pam_unix")
        lines.append(f"| {r['case']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                     + (f"{r['median_ms'] / base_o:.2f}x | {r['median_ms'] / base_g:.2f}x |" if ratio else "| |")
                     + (f" unexpected: {r['unexpected']}" if r["unexpected"] else ""))
    f = results["fsync"]
    lines += ["", "Rows \"alone\" have no pam_unix (whose yescrypt hash is most of a password login) and are "
              "compared with the peer alone; the others with the peer after pam_unix.", "",
              f"SQLite durable write on the state's file system (measured apart: the store's `synchronous` is "
              f"always FULL): {f['full_ms']:.2f} ms with synchronous=FULL, {f['off_ms']:.2f} ms with OFF, so "
              f"**{f['fsync_ms']:.2f} ms of fsync per write**"
              + (f"; linkusd made {results['fsyncs_per_login']:g} fsync/fdatasync calls per login (strace -c)"
                 if results.get("fsyncs_per_login") is not None else "") + "."]
    if results.get("ldap_round_trip_ms") is not None:
        lines.append(f"LDAP round trip (one search on a warm bound connection, ldap3 as in linkusd, from the "
                     f"bench process): {results['ldap_round_trip_ms']:.2f} ms median.")
    c = results["cpu"]
    lines += ["", "### linkusd", "",
              (f"- CPU per login: **{c['ms_per_login']:.3f} ms** (schedstat of all its threads over {c['logins']} "
               f"sequential logins, interleaved with the floor's below; its idle rate, "
               f"{c['idle_ms_per_login']} ms per login, taken off; {c['errors']} errors)."
               if c.get("method") == "schedstat" else
               f"- CPU per login: **{c['ms_per_login']:.3f} ms** ({c['cpu_s']} s utime+stime over {c['logins']} "
               f"sequential logins, less {c['idle_cpu_s']} s idle rate; {c['errors']} errors)."),
              *([f"- The floor on this machine (bench/floor.py: an asyncio unix-socket server that reads "
                 f"SO_PEERCRED, a frame, sends a prompt, reads the answer, commits one SQLite transaction and "
                 f"answers; nothing else): **{results['floor']['full_ms']:.3f} ms** with synchronous=FULL, "
                 f"{results['floor']['off_ms']:.3f} ms with OFF ({results['floor']['logins']} pamtester logins "
                 f"through pam_linkus.so each, interleaved, {results['floor'].get('errors', 0)} errors)."]
                if results.get("floor") else []),
              *([f"- CPU per login with the LDAP source, answered from its cache (cache_ttl {LDAP_CACHE_TTL} s): "
                 f"**{results['ldap_cpu']['ms_per_login']:.3f} ms** (schedstat over "
                 f"{results['ldap_cpu']['logins']} sequential logins, less the idle rate; "
                 f"{results['ldap_cpu']['errors']} errors); YAML measured the same way right after it: "
                 f"{results['yaml_cpu_seq']['ms_per_login']:.3f} ms."]
                if results.get("ldap_cpu") and results.get("yaml_cpu_seq") else []),
              f"- Start with the large file: {results.get('big_start_s')} s to "
              f"ready, RSS {results.get('big_rss_after_start_mb')} MB."]
    rl, ri = results["reload"], results["reload_idle"]
    lines += [f"- RELOAD of the large file: {rl['reload_s']} s while {rl['clients']} client processes log in, "
              f"{ri['reload_s']} s idle; RSS after: {rl['rss_mb']} MB, {ri['rss_mb']} MB "
              f"(errors: {rl['last_error'] or ri['last_error'] or 'none'}).",
              f"- Logins during the reload: {rl['during']} overlapped it; median before {rl['median_before_ms']} ms, "
              f"median of those {rl['p50_during_ms']} ms, worst {rl['worst_during_ms']} ms ({rl['slowdown']}x); "
              f"{rl['logins']} logins in all, {rl['errors']} errors {rl['error_codes'] or ''}; "
              f"{rl.get('over_2x', '?')} of them over 2x the median."]
    if (rc := results.get("reload_control")):
        lines += [f"- Control: the same load for as long with no reload ({rc['reload_s']} s): {rc['during']} "
                  f"logins, median before {rc['median_before_ms']} ms, worst {rc['worst_during_ms']} ms "
                  f"({rc['slowdown']}x), {rc.get('over_2x', '?')} over 2x the median: what pamtester and "
                  f"the machine do to the worst of a few hundred logins anyway."]
    if (rh := results.get("reload_hog")):
        lines += [f"- Control with a CPU hog: the same load, no reload, and an unrelated process spinning on a "
                  f"CPU for as long ({rh['reload_s']} s): {rh['during']} logins, median before "
                  f"{rh['median_before_ms']} ms, median of those {rh['p50_during_ms']} ms, worst "
                  f"{rh['worst_during_ms']} ms ({rh['slowdown']}x), {rh.get('over_2x', '?')} over 2x the median: "
                  f"what the reload's child parse costs the logins by using a CPU at all."]
    for problem in results.get("problems", []):
        lines.append(f"\n**{problem}**")
    lines += ["", "### Parallel logins (pam_linkus alone, YAML + SQLite; each login its own extension)", "",
              "| clients | logins | logins/s | p50 ms | p99 ms | errors | linkusd CPU ms/login |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in results["parallel"]:
        lines.append(f"| {p['clients']} | {p['logins']} | {p['per_second']} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p['errors']}{' ' + str(p['error_codes']) if p['error_codes'] else ''} | "
                     f"{p['cpu_ms_per_login']} |")
    lines += ["", f"Replay: {_exact_text(results['replay'])}.",
              f"Lockout (max_failures 5): {_exact_text(results['lockout'])}.", "",
              "### Targets (issues 11 and 20)", "", "| target | measured | met |", "| --- | --- | --- |"]
    for name, value, ok in targets(results):
        lines.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def _load(m: dict[str, Any]) -> str:
    return " ".join(f"{x:.2f}" for x in m["load"])


def write_readme(report: str) -> None:
    path = Path(__file__).resolve().parent / "README.md"
    text = path.read_text()
    start, end = "<!-- results -->", "<!-- /results -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{report}{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
