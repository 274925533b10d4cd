#!/usr/bin/python3
"""pam-linkus benchmark: what one login costs next to the C modules, at 10 to 100,000
extensions, and under parallel logins. Run as root: ``make bench`` or
``python3 bench/run.py [--quick]``; prints Markdown tables (``--readme`` also writes
them into bench/README.md).

Every number is a median of many logins, taken round-robin across the cases so
that a change in machine load hits all cases alike. Logins go through real
libpam with pamtester (answers on stdin); each measured time is the wall time
of a whole pamtester process, as a login costs sshd's forked child.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backends
from harness import (
    PASSWORD,
    REPO,
    SECRET,
    SYSTEM_SITE,
    Workspace,
    code_at,
    machine,
    median_ms,
    pamtester,
    percentile_ms,
)
from linkus import LinkusSetup

#: Modules a YAML+SQLite login with warm caches must not import (tests/test_lazy_imports.py asserts it).
FORBIDDEN = ("yaml", "ldap3", "redis", "smtplib", "ssl", "_ssl", "segno", "email", "dataclasses", "typing",
             "enum", "re", "socket", "hashlib", "_hashlib", "hmac", "base64", "json", "secrets", "random",
             "logging", "subprocess", "threading", "argparse", "pathlib", "urllib", "inspect", "ctypes",
             "sqlite3", "datetime", "syslog")


class Case:
    """One row of the latency table: a PAM service, a user, the answers, an untimed reset."""

    def __init__(self, name: str, service: str, user: str, answers: Any, *, reset: Any = None,
                 expect: str = "PAM_SUCCESS", group: str = "peers"):
        self.name = name
        self.service = service
        self.user = user
        self.answers = answers
        self.reset = reset
        self.expect = expect
        self.group = group
        self.times: list[float] = []
        self.wrong: list[str] = []


def run_round_robin(cases: list[Case], rounds: int, messages: dict[str, str]) -> None:
    for case in cases:  # one untimed login each: page cache, pyc, caches, connections
        _one(case, messages, timed=False)
    for _ in range(rounds):
        for case in cases:
            _one(case, messages, timed=True)


def _one(case: Case, messages: dict[str, str], *, timed: bool) -> None:
    _avoid_step_edge()
    code, elapsed = pamtester(case.service, case.user, case.answers(), messages)
    if code != case.expect:
        case.wrong.append(code)
    elif timed:
        case.times.append(elapsed)
    if case.reset is not None:
        case.reset()


def _avoid_step_edge() -> None:
    """Codes are computed just before a login; do not start one in the last 0.3 s of a step."""
    left = 30 - time.time() % 30
    if left < 0.3:
        time.sleep(left + 0.05)


# -- the cases ------------------------------------------------------------------------------


def peer_cases(ws: Workspace, user: str) -> list[Case]:
    empty = ws.file("empty_module.py", (
        "def pam_sm_authenticate(pamh, flags, argv):\n    return pamh.PAM_SUCCESS\n\n"
        "def pam_sm_setcred(pamh, flags, argv):\n    return pamh.PAM_SUCCESS\n"), 0o644)
    ga_text = f'{SECRET}\n" TOTP_AUTH\n" DISALLOW_REUSE\n" WINDOW_SIZE 3\n'
    ga = ws.file("google_authenticator", ga_text, 0o400)
    from pam_linkus.totp import decode_secret

    oath_text = f"HOTP/T30 {user} - {decode_secret(SECRET).hex()}\n"
    oath = ws.file("users.oath", oath_text)

    def reset_ga() -> None:  # DISALLOW_REUSE records used codes in the file: put it back
        os.chmod(ga, 0o600)
        ga.write_text(ga_text)
        os.chmod(ga, 0o400)

    def reset_oath() -> None:  # pam_oath records the last code in the usersfile: put it back
        oath.write_text(oath_text)

    unix = "auth requisite pam_unix.so nodelay\n"
    pw = lambda: [PASSWORD]  # noqa: E731
    pw_code = lambda: [PASSWORD, code_at(time.time())]  # noqa: E731
    return [
        Case("pam_permit", ws.service("permit", "auth required pam_permit.so\n"), user, lambda: []),
        Case("pam_python (empty module) alone", ws.service("emptyalone", f"auth required pam_python.so {empty}\n"),
             user, lambda: []),
        Case("pam_unix", ws.service("unix", "auth required pam_unix.so nodelay\n"), user, pw),
        Case("pam_unix + pam_python (empty module)",
             ws.service("empty", unix + f"auth required pam_python.so {empty}\n"), user, pw),
        Case("pam_unix + pam_google_authenticator",
             ws.service("ga", unix + f"auth required pam_google_authenticator.so secret={ga} user=root\n"),
             user, pw_code, reset=reset_ga),
        Case("pam_unix + pam_oath",
             ws.service("oath", unix + f"auth required pam_oath.so usersfile={oath} window=3\n"),
             user, pw_code, reset=reset_oath),
    ]


def linkus_case(name: str, setup: LinkusSetup, user: str, group: str) -> Case:
    return Case(name, setup.service, user, lambda: [PASSWORD, code_at(time.time())],
                reset=lambda: setup.forget(user), group=group)


# -- parallel -------------------------------------------------------------------------------


def parallel(ws: Workspace, setup: LinkusSetup, users: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each its own extension, logging in with fresh codes for ``seconds``."""
    results: list[list[tuple[str, float]]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)
    deadline = [0.0]

    def client(i: int) -> None:
        user = users[i]
        store = setup.new_store()
        try:
            barrier.wait()
            if i == 0:
                deadline[0] = time.monotonic() + seconds
            while not deadline[0]:
                time.sleep(0.001)
            while time.monotonic() < deadline[0]:
                _avoid_step_edge()
                results[i].append(pamtester(setup.service, user, [PASSWORD, code_at(time.time())], ws.messages))
                store.forget(user)  # the next login is a fresh code, not a replay (untimed by the client)
        finally:
            store.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    flat = [r for rs in results for r in rs]
    ok = [t for code, t in flat if code == "PAM_SUCCESS"]
    errors = [code for code, _ in flat if code != "PAM_SUCCESS"]
    return {"clients": clients, "logins": len(flat), "seconds": round(wall, 2),
            "per_second": round(len(ok) / wall, 1) if wall else 0.0,
            "p50_ms": round(percentile_ms(ok, 50), 1), "p99_ms": round(percentile_ms(ok, 99), 1),
            "errors": len(errors), "error_codes": sorted(set(errors))}


def replay_exactness(ws: Workspace, setup: LinkusSetup, user: str, clients: int, rounds: int) -> dict[str, Any]:
    """``clients`` logins at once, one user, one code: exactly one success per round."""
    successes, denied, other = 0, 0, []
    ws.log.take()
    for _ in range(rounds):
        setup.forget(user)
        if 30 - time.time() % 30 < 8:  # all logins of a round must see the same time step
            time.sleep(30 - time.time() % 30 + 0.2)
        code = code_at(time.time())
        out = _burst(ws, setup.service, user, code, clients)
        successes += out.count("PAM_SUCCESS")
        denied += out.count("PAM_AUTH_ERR")
        other += [c for c in out if c not in ("PAM_SUCCESS", "PAM_AUTH_ERR")]
    lines = ws.log.take()
    replayed = sum(1 for line in lines if f"user={user}" in line and "replayed code" in line)
    return {"clients": clients, "rounds": rounds, "successes": successes, "expected_successes": rounds,
            "denied": denied, "replayed_in_log": replayed, "other": other,
            "exact": successes == rounds and denied == rounds * (clients - 1) == replayed and not other}


def lockout_exactness(ws: Workspace, setup: LinkusSetup, user: str, clients: int, max_failures: int) -> dict[str, Any]:
    """``clients`` wrong codes at once: failures counted once each, the lock at exactly max_failures."""
    setup.forget(user)
    ws.log.take()
    good = code_at(time.time())
    wrong = f"{(int(good) + 500000) % 1000000:06d}"
    out = _burst(ws, setup.service, user, wrong, clients)
    lines = [line for line in ws.log.take() if f"user={user}" in line]
    counted = sum(1 for line in lines if 'reason="wrong code' in line)
    status = setup.store().lock_status(user, time.time())
    right_code_while_locked, _ = pamtester(setup.service, user, [PASSWORD, good], ws.messages)
    setup.forget(user)
    auth_err, maxtries = out.count("PAM_AUTH_ERR"), out.count("PAM_MAXTRIES")
    locks = clients >= max_failures
    return {"clients": clients, "max_failures": max_failures, "denied": auth_err, "locked": maxtries,
            "failures_in_log": counted, "failures_in_store": status.failures,
            "right_code_while_locked": right_code_while_locked,
            "exact": (auth_err == min(clients, max_failures - 1) and auth_err + maxtries == clients
                      and counted == status.failures and (status.failures >= max_failures) == locks
                      and right_code_while_locked == ("PAM_MAXTRIES" if locks else "PAM_SUCCESS"))}


def _burst(ws: Workspace, service: str, user: str, code: str, clients: int) -> list[str]:
    barrier = threading.Barrier(clients)
    out: list[str] = []
    lock = threading.Lock()

    def go() -> None:
        barrier.wait()
        result, _ = pamtester(service, user, [PASSWORD, code], ws.messages)
        with lock:
            out.append(result)

    threads = [threading.Thread(target=go) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# -- import profile -------------------------------------------------------------------------


def fake_login(setup: LinkusSetup, user: str, answers: list[str], *, site: bool, importtime: bool = False,
               site_dir: Path = REPO) -> tuple[dict[str, Any], str]:
    """One login in /usr/bin/python3 with a fake pamh (bench/fakepam.py); (result, -X importtime output)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fakepam import spec_arg

    spec = {"site": str(site_dir), "argv": setup.module_args(), "user": user, "answers": answers,
            "system_site": [] if site else SYSTEM_SITE}
    cmd = ["/usr/bin/python3", "-I"] + ([] if site else ["-S"]) + (["-X", "importtime"] if importtime else [])
    proc = subprocess.run([*cmd, str(Path(__file__).resolve().parent / "fakepam.py"), spec_arg(spec)],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def import_profile(setup: LinkusSetup, user: str, runs: int) -> dict[str, Any]:
    """What one login imports and what that costs, as pam_python would run it."""
    profile: dict[str, Any] = {}
    for site in (True, False):
        key = "with site (as pam_python)" if site else "without site (-S)"
        times = []
        for _ in range(runs):
            setup.forget(user)
            result, _ = fake_login(setup, user, [code_at(time.time())], site=site)
            if result["code"] != "PAM_SUCCESS":
                raise RuntimeError(f"fake login: {result['code']}")
            times.append(result["login_ms"] / 1000)
        setup.forget(user)
        result, err = fake_login(setup, user, [code_at(time.time())], site=site, importtime=True)
        top = _importtime_top(err)
        profile[key] = {
            "login_ms_median": round(median_ms(times), 2),
            "imported": result["imported"],
            "forbidden_imported": sorted({m.split(".")[0] for m in result["imported"]} & set(FORBIDDEN)),
            "import_us_total": sum(us for _, us in top),
            "top": top[:12],
        }
    # The same login with no caches (what every login cost before the caches existed).
    times = []
    imported: list[str] = []
    for _ in range(max(3, runs // 3)):
        setup.forget(user)
        setup.drop_cache()
        result, _ = fake_login(setup, user, [code_at(time.time())], site=True)
        times.append(result["login_ms"] / 1000)
        imported = result["imported"]
    setup.forget(user)
    setup.warm()
    profile["cold caches (with site)"] = {"login_ms_median": round(median_ms(times), 2),
                                          "yaml_imported": any(m == "yaml" for m in imported)}
    return profile


def backend_profiles(named: list[tuple[str, LinkusSetup]], user: str, runs: int) -> list[dict[str, Any]]:
    """The LDAP and Redis logins under the same microscope: where their extra time goes."""
    out = []
    for name, setup in named:
        times = []
        for _ in range(runs):
            setup.forget(user)
            result, _ = fake_login(setup, user, [code_at(time.time())], site=True)
            times.append(result["login_ms"] / 1000)
        setup.forget(user)
        result, err = fake_login(setup, user, [code_at(time.time())], site=True, importtime=True)
        top = _importtime_top(err)
        out.append({"case": name, "code": result["code"], "login_ms_median": round(median_ms(times), 2),
                    "import_us_total": sum(us for _, us in top), "top": top[:6]})
    return out


def _importtime_top(stderr: str) -> list[tuple[str, int]]:
    """Top-level imports of the login from -X importtime: (module, cumulative us), largest first."""
    rows = []
    inside = False
    for line in stderr.splitlines():
        if line.startswith("--- login "):
            inside = line == "--- login starts ---"
            continue
        if not inside:
            continue
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and not m.group(3):
            rows.append((m.group(4), int(m.group(2))))
    return sorted(rows, key=lambda r: -r[1])


def pam_python_env_check(ws: Workspace, service: str, user: str) -> bool:
    """Does pam_python honour PYTHONPROFILEIMPORTTIME? (It sets Py_IgnoreEnvironmentFlag.)"""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run(["pamtester", service, user, "authenticate"], input=f"{PASSWORD}\n".encode(),
                          capture_output=True, env=env, timeout=30, check=False)
    return b"import time:" in proc.stderr


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter parallel runs (< 5 min)")
    parser.add_argument("--rounds", type=int, help="logins per case (default 40, quick 25)")
    parser.add_argument("--sizes", default="10,1000,10000,100000", help="extension counts")
    parser.add_argument("--clients", default="1,2,8,32", help="parallel client counts")
    parser.add_argument("--seconds", type=float, help="seconds per parallel level (default 15, quick 5)")
    parser.add_argument("--no-ldap", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--readme", action="store_true", help="write the tables into bench/README.md")
    args = parser.parse_args(argv)
    rounds = args.rounds or (25 if args.quick else 40)
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    levels = [int(c) for c in args.clients.split(",") if c]

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pam_linkus"), str(REPO / "nss_config")],
                   check=True)  # pam_python never writes .pyc: without them every login compiles the package
    started = time.monotonic()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below (users, pam.d, servers)
    ws = Workspace()
    results: dict[str, Any] = {"machine_before": machine(), "rounds": rounds}
    setups: list[LinkusSetup] = []
    servers: backends.Servers | None = None
    try:
        print(f"# pam-linkus benchmark ({'quick' if args.quick else 'full'}), {results['machine_before']['date']}",
              flush=True)
        main_user = ws.user()
        client_users = [ws.user() for _ in range(max(levels))]
        servers = backends.Servers(ws, main_user, sizes, ldap=not args.no_ldap, redis=not args.no_redis)
        results["problems"] = servers.problems
        results["ldap_load_seconds"] = getattr(servers, "load_seconds", None)

        # 1. One login, next to the C modules.
        cases = peer_cases(ws, main_user)
        yaml_setup = LinkusSetup(ws, "yaml", [main_user], extensions=10)
        setups.append(yaml_setup)
        cases.append(linkus_case("pam_unix + pam-linkus (YAML, SQLite)", yaml_setup, main_user, "peers"))
        cases.append(Case("pam-linkus (YAML, SQLite) alone", yaml_setup.service_alone(), main_user,
                          lambda: [code_at(time.time())], reset=lambda: yaml_setup.forget(main_user)))
        extra = servers.cases(ws, main_user, setups)
        cases += [linkus_case(name, setup, main_user, "peers") for name, setup in extra]
        for setup in setups:
            setup.warm()
        # 2. Flat in the number of extensions.
        size_cases: list[Case] = []
        build_seconds: dict[str, float] = {}
        for n in sizes:
            setup = LinkusSetup(ws, f"yaml{n}", [main_user], extensions=n)
            setups.append(setup)
            build_seconds[f"yaml {n}"] = round(setup.warm(), 2)
            size_cases.append(linkus_case(f"YAML, {n:,} extensions", setup, main_user, "sizes"))
            for name, ldap_setup in servers.size_cases(ws, main_user, n, setups):
                size_cases.append(linkus_case(name, ldap_setup, main_user, "sizes"))
        print(f"setup done in {time.monotonic() - started:.0f} s; measuring {rounds} rounds", flush=True)
        run_round_robin(cases + size_cases, rounds, ws.messages)
        results["latency"] = [_row(c) for c in cases]
        results["sizes"] = [_row(c) for c in size_cases]
        results["index_build_seconds"] = build_seconds
        results["ldap_round_trip_ms"] = servers.ldap_round_trip_ms(rounds)

        # 3. Parallel logins.
        par_setup = LinkusSetup(ws, "parallel", client_users, extensions=1000)
        lock_setup = LinkusSetup(ws, "lockout", client_users, extensions=1000,
                                 config={"lockout": {"max_failures": 5, "permanent_after": 100, "duration": 900}})
        setups += [par_setup, lock_setup]
        par_setup.warm()
        lock_setup.warm()
        print("parallel logins ...", flush=True)
        results["parallel"] = [parallel(ws, par_setup, client_users, n, seconds) for n in levels]
        top = max(levels)
        results["replay"] = replay_exactness(ws, par_setup, client_users[0], top, 3 if args.quick else 5)
        results["lockout"] = lockout_exactness(ws, lock_setup, client_users[1], top, 5)
        results["parallel_backends"] = []
        if servers.redis is not None:
            red = servers.redis_setup(ws, "redispar", client_users, setups)
            red_lock = servers.redis_setup(ws, "redislock", client_users, setups,
                                           lockout={"max_failures": 5, "permanent_after": 100, "duration": 900})
            for n in levels:
                results["parallel_backends"].append({"backend": "Redis", **parallel(ws, red, client_users, n, seconds)})
            results["replay_redis"] = replay_exactness(ws, red, client_users[2], top, 3 if args.quick else 5)
            results["lockout_redis"] = lockout_exactness(ws, red_lock, client_users[3], top, 5)

        # 4. Import profile of one login.
        results["imports"] = import_profile(yaml_setup, main_user, 5 if args.quick else 15)
        results["backend_imports"] = backend_profiles(extra, main_user, 3 if args.quick else 7)
        results["pam_python_honours_PYTHONPROFILEIMPORTTIME"] = pam_python_env_check(
            ws, cases[1].service, main_user)
        results["machine_after"] = machine()
        results["elapsed_s"] = round(time.monotonic() - started)
    finally:
        for setup in setups:
            setup.close()
        if servers is not None:
            servers.close()
        ws.close()
    report = render(results)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.readme:
        write_readme(report)
    return 0 if results_ok(results) else 1


def _row(case: Case) -> dict[str, Any]:
    return {"case": case.name, "n": len(case.times), "median_ms": round(median_ms(case.times), 2),
            "p90_ms": round(percentile_ms(case.times, 90), 2), "unexpected": case.wrong}


# -- report ---------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows = {r["case"]: r["median_ms"] for r in results["latency"]}
    empty = rows["pam_unix + pam_python (empty module)"]
    out = []
    yaml_add = rows["pam_unix + pam-linkus (YAML, SQLite)"] - empty
    alone = rows["pam-linkus (YAML, SQLite) alone"] - rows["pam_python (empty module) alone"]
    out.append(("YAML+SQLite adds <= 10 ms over the empty pam_python module",
                f"{yaml_add:+.1f} ms (without pam_unix: {alone:+.1f} ms)", yaml_add <= 10))
    ldap_row = next((v for k, v in rows.items() if "LDAP" in k), None)
    rtt = results.get("ldap_round_trip_ms")
    if ldap_row is not None and rtt is not None:
        add = ldap_row - empty - rtt
        out.append(("LDAP adds <= 20 ms over the directory's own round trip", f"{add:+.1f} ms "
                    f"(round trip {rtt:.1f} ms)", add <= 20))
    sizes = results["sizes"]
    for kind in ("YAML", "LDAP"):
        rows_k = [r for r in sizes if r["case"].startswith(kind)]
        if len(rows_k) >= 2:
            ratio = rows_k[-1]["median_ms"] / rows_k[0]["median_ms"]
            out.append((f"{kind}: {rows_k[-1]['case'].split(', ')[1]} within 1.2x of "
                        f"{rows_k[0]['case'].split(', ')[1]}", f"{ratio:.2f}x", ratio <= 1.2))
    par = results["parallel"]
    errors = sum(p["errors"] for p in par) + sum(p["errors"] for p in results.get("parallel_backends", []))
    out.append(("parallel logins: no errors", str(errors), errors == 0))
    out.append(("replay exactly once under parallel logins", _exact_text(results["replay"]),
                results["replay"]["exact"]))
    out.append(("lockout counts exact under parallel logins", _exact_text(results["lockout"]),
                results["lockout"]["exact"]))
    for key, what in (("replay_redis", "replay exactly once, Redis"), ("lockout_redis", "lockout exact, Redis")):
        if key in results:
            out.append((what, _exact_text(results[key]), results[key]["exact"]))
    forbidden = results["imports"]["with site (as pam_python)"]["forbidden_imported"] + \
        results["imports"]["without site (-S)"]["forbidden_imported"]
    out.append(("lazy imports: nothing a YAML+SQLite login does not use", ", ".join(forbidden) or "none",
                not forbidden))
    return out


def _exact_text(d: dict[str, Any]) -> str:
    if "successes" in d:
        return (f"{d['successes']}/{d['expected_successes']} successes, {d['denied']} denied "
                f"({d['replayed_in_log']} logged as replay), {d['clients']} clients x {d['rounds']} rounds")
    return (f"{d['denied']} denied + {d['locked']} locked of {d['clients']}; failures counted "
            f"{d['failures_in_store']} (log {d['failures_in_log']}); right code while locked: "
            f"{d['right_code_while_locked']}")


def results_ok(results: dict[str, Any]) -> bool:
    """Exit status: correctness (errors, replay, lockout, imports) must hold on any machine; the
    timing targets depend on the machine and its load, so they are reported, not enforced."""
    timing = ("adds <=", "within 1.2x")
    return all(ok for name, _, ok in targets(results) if not any(t in name for t in timing))


def render(results: dict[str, Any]) -> str:
    m = results["machine_before"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cpus']} CPUs), Linux {m['kernel']}, Python {m['python']}.",
             f"Load average before: {_load(m)}; after: {_load(results['machine_after'])}. "
             f"{results['rounds']} logins per case, round-robin; whole run {results['elapsed_s']} s.", ""]
    lines += ["### One login (pamtester, wall time of the whole process)", "",
              "| stack | median ms | p90 ms | vs empty pam_python (same stack) |", "| --- | ---: | ---: | ---: |"]
    empty = next(r["median_ms"] for r in results["latency"] if r["case"] == "pam_unix + pam_python (empty module)")
    empty_alone = next(r["median_ms"] for r in results["latency"] if r["case"] == "pam_python (empty module) alone")
    for r in results["latency"]:
        base = empty_alone if r["case"].endswith(" alone") else empty
        lines.append(f"| {r['case']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['median_ms'] - base:+.1f} |"
                     + (f" unexpected: {r['unexpected']}" if r["unexpected"] else ""))
    if results.get("ldap_round_trip_ms") is not None:
        lines.append(f"\nLDAP server round trip (connect, bind, search, from a warm Python process): "
                     f"{results['ldap_round_trip_ms']:.1f} ms median.")
    lines += ["", "### Number of extensions", "", "| source, extensions | median ms | p90 ms | vs smallest |",
              "| --- | ---: | ---: | ---: |"]
    firsts: dict[str, float] = {}
    for r in results["sizes"]:
        kind = r["case"].split(",")[0]
        firsts.setdefault(kind, r["median_ms"])
        lines.append(f"| {r['case']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['median_ms'] / firsts[kind]:.2f}x |")
    builds = ", ".join(f"{k}: {v} s" for k, v in results["index_build_seconds"].items())
    lines.append(f"\nIndex build (`linkus-2fa warm`, parse + validate + write): {builds}.")
    if results.get("ldap_load_seconds") is not None:
        lines.append(f"LDAP: all entries loaded with slapadd + slapindex in {results['ldap_load_seconds']} s; "
                     "the directory indexes uid (eq).")
    for problem in results.get("problems", []):
        lines.append(f"\n**{problem}**")
    lines += ["", "### Parallel logins (YAML with 1,000 extensions, SQLite; each client its own extension)", "",
              "| backend | clients | logins | logins/s | p50 ms | p99 ms | errors |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in results["parallel"]:
        lines.append(f"| SQLite | {p['clients']} | {p['logins']} | {p['per_second']} | {p['p50_ms']} | "
                     f"{p['p99_ms']} | {p['errors']} |")
    for p in results.get("parallel_backends", []):
        lines.append(f"| {p['backend']} | {p['clients']} | {p['logins']} | {p['per_second']} | {p['p50_ms']} | "
                     f"{p['p99_ms']} | {p['errors']} |")
    lines += ["", f"Replay (SQLite): {_exact_text(results['replay'])}.",
              f"Lockout (SQLite, max_failures 5): {_exact_text(results['lockout'])}."]
    if "replay_redis" in results:
        lines += [f"Replay (Redis): {_exact_text(results['replay_redis'])}.",
                  f"Lockout (Redis, max_failures 5): {_exact_text(results['lockout_redis'])}."]
    lines.append("")
    lines += ["### Imports and start-up of one login (warm caches; fake pamh in /usr/bin/python3)", "",
              "| login | login ms (import + run) | imports (us) | largest imports |",
              "| --- | ---: | ---: | --- |"]
    for key in ("with site (as pam_python)", "without site (-S)"):
        p = results["imports"][key]
        top = ", ".join(f"{name} {us / 1000:.1f} ms" for name, us in p["top"][:5])
        lines.append(f"| YAML, SQLite, {key} | {p['login_ms_median']:.1f} | {p['import_us_total']} | {top} |")
    cold = results["imports"]["cold caches (with site)"]
    lines.append(f"| YAML, SQLite, no caches (parses YAML, imports yaml: {cold['yaml_imported']}) | "
                 f"{cold['login_ms_median']:.1f} | | |")
    for p in results.get("backend_imports", []):
        top = ", ".join(f"{name} {us / 1000:.1f} ms" for name, us in p["top"][:5])
        lines.append(f"| {p['case'].split('(')[1].rstrip(')')} (with site) | {p['login_ms_median']:.1f} | "
                     f"{p['import_us_total']} | {top} |")
    honours = results["pam_python_honours_PYTHONPROFILEIMPORTTIME"]
    lines += ["", f"pam_python honours PYTHONPROFILEIMPORTTIME: {'yes' if honours else 'no'} "
              "(it sets Py_IgnoreEnvironmentFlag), hence the fake pamh above.", "",
              "### Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
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
