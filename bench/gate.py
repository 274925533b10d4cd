"""The web gate's cost per proxied request (issue 18 item 11): p50 and p99 of GET requests through
nginx with the gate's check (docs/gate.md's example block, a valid session) against the same nginx
without the check, at 1 and 50 concurrent clients.

As root on Debian 12, from a checkout (after `make deps-test native`):

    .venv/bin/python bench/gate.py                     # 3-4 minutes on 2 busy CPUs
    .venv/bin/python bench/gate.py --rounds 3 --json out.json

Arms, all served by one nginx (one worker), all to the same upstream (a server block of that nginx
answering 200 itself, so the GUI costs nothing and the same for all):
- ``plain``  the example block with the auth_request lines taken out: the baseline;
- ``gate``   the example block as docs/gate.md gives it, LINKUS_WEB = linkus-web on its unix socket
             (as the shipped unit runs it), linkusd behind it, a session made by signing in through
             the gate (password + TOTP) before the timed rounds;
- ``floor``  the example block with the check answered 204 by nginx itself: what auth_request costs
             with a check that costs nothing (the part of the gate's cost that is nginx's);
- ``gate-ka`` the gate with an ``upstream {}`` keepalive pool to linkus-web (docs/gate.md's option);
- ``check``  GET /linkus-gate/auth straight to linkus-web's unix socket, no nginx: what linkus-web
             and linkusd spend per check;
- ``linkusd`` the gate_check web call straight to linkusd's web socket (as linkus-web makes it).
Then ``--logins`` PAM logins (pam_linkus.so alone, TOTP) with no load and while 50 clients hammer the
gate: the check must not hold a linkusd login worker.

Rounds are interleaved (each round runs every arm at every concurrency, in a shuffled order, seeded),
so a change of load on the machine hits every arm alike. The clients are one asyncio loop in this
process, keep-alive connections (TLS to nginx, as a browser); each request is timed from send to the
last byte of the answer. Loops are bounded: ``--requests`` per client per round at 1 client,
``--requests-50`` per client per round at 50. Everything made here (users, groups, PAM service,
directory under /run, processes) is removed at the end; all traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]

from harness import PASSWORD, Workspace, avoid_step_edge, code_at, machine, median_ms, pamtester, percentile_ms  # noqa: E402
from linkus import LinkusSetup  # noqa: E402
from nginx_server import HttpsClient, Nginx, example_block, fill, free_port, gate_sign_in, self_signed  # noqa: E402

ARMS = ("plain", "gate", "gate-ka", "floor", "check", "linkusd")
PYTHON = "/usr/bin/python3"


# -- the clients -----------------------------------------------------------------------------------


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer (Content-Length bodies only, as all arms send); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, flags=re.I)
    length = int(match.group(1)) if match else 0
    if length:
        await reader.readexactly(length)
    return status


async def _client(open_conn: Any, request: bytes, count: int, want: int, samples: list[float]) -> None:
    reader, writer = await open_conn()
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            status = await _read_answer(reader)
            samples.append(time.perf_counter() - started)
            if status != want:
                raise RuntimeError(f"answer {status}, want {want}")
    finally:
        writer.close()


def run_load(open_conn: Any, request: bytes, clients: int, per_client: int, want: int) -> list[float]:
    """``clients`` keep-alive connections, ``per_client`` requests each, all at once; the latencies."""
    samples: list[float] = []

    async def main() -> None:
        await asyncio.gather(*(_client(open_conn, request, per_client, want, samples) for _ in range(clients)))

    asyncio.run(main())
    return samples


# -- the set-up ------------------------------------------------------------------------------------


def on_cpu_seconds(pid: int) -> float:
    """Time on a CPU of all of a process's threads, in ns resolution (schedstat; /proc/PID/stat counts
    in 10 ms ticks, too coarse for a few hundred requests of a tenth of a millisecond)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError):
        pass  # a thread that ended between the listing and the read
    return total / 1e9


def strip_check(block: str) -> str:
    """The example block without the gate: the 8 auth_request, auth_request_set and error_page lines of
    ``location /``."""
    text, count = re.subn(r"^\s*(auth_request|auth_request_set|error_page)\b.*\n", "", block, flags=re.M)
    if count != 8:
        raise SystemExit(f"bench/gate.py: expected 8 gate lines in the example block, found {count}")
    return text


class GateSetup:
    """linkusd (with its web socket), linkus-web as a throwaway user, nginx with four server blocks."""

    def __init__(self, ws: Workspace, *, real_gate: bool = True, web_python: str = PYTHON):
        self.ws = ws
        self.web_python = web_python
        #: False: only the nginx arms that need no linkus-web (plain, floor); linkusd is not started
        self.real_gate = real_gate
        self.user = ws.user()
        self.pam_user = ws.user()  # PAM logins during the gate's load (its replay records are reset between)
        self.tag = secrets.token_hex(3)
        self.groups: list[str] = []
        self.system_users: list[str] = []
        self.web_group = self._group(f"lkbw{self.tag}")       # opens linkusd's web socket
        self.proxy_group = self._group(f"lkbn{self.tag}")     # nginx's workers: linkus-web's socket
        self.web_user = self._system_user(f"lkbw{self.tag}", self.web_group, extra=self.proxy_group)
        self.proxy_user = self._system_user(f"lkbn{self.tag}", self.proxy_group)
        password_service = ws.service("pw", "auth required pam_unix.so nodelay\n")
        self.linkusd = LinkusSetup(ws, "gate", [self.user, self.pam_user], config={
            "self_service": {"pam_service": password_service},
            "daemon": {"web_group": self.web_group},
            "gate": {"enforce": "all", "return_hosts": ["127.0.0.1"], "default_return": "/",
                     "sites": [{"name": "all", "path": "/"}]},
        } if real_gate else None)
        self.linkusd.web_socket = self.linkusd.run_dir / "web.sock"
        self.web_dir = ws.root / "linkus-web"
        self.web_dir.mkdir(mode=0o755)
        shutil.chown(self.web_dir, self.web_user, self.proxy_group)
        self.web_sock = self.web_dir / "http.sock"
        self.web: subprocess.Popen[bytes] | None = None
        self.nginx: Nginx | None = None
        self.ports: dict[str, int] = {}

    def _group(self, name: str) -> str:
        subprocess.run(["groupadd", name], check=True)
        self.groups.append(name)
        return name

    def _system_user(self, name: str, group: str, extra: str | None = None) -> str:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", group,
                        *(["-G", extra] if extra else []), name], check=True)
        self.system_users.append(name)
        return name

    def start(self) -> None:
        if self.real_gate:
            self._start_web()
        self._start_nginx()

    def _start_web(self) -> None:
        self.linkusd.start()
        log = (self.ws.root / "linkus-web.log").open("ab")
        self.web = subprocess.Popen(
            ["setpriv", f"--reuid={self.web_user}", f"--regid={self.web_group}", "--init-groups", "--reset-env",
             "env", f"PYTHONPATH={self.linkusd.code}", self.web_python, "-m", "pam_linkus.web.app", "--unix",
             str(self.web_sock), "--unix-group", self.proxy_group, "--trust-proxy", "--secure-cookies",
             "--socket", str(self.linkusd.web_socket)], cwd="/", stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while not self.web_sock.exists():
            if self.web.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("linkus-web did not start: "
                                 + (self.ws.root / "linkus-web.log").read_text(errors="replace")[-1500:])
            time.sleep(0.05)

    def _start_nginx(self) -> None:
        cert, key = self_signed(self.ws.root)
        self.cert = cert
        for name in ("gate", "gate-ka", "plain", "floor", "upstream", "stand_in"):
            self.ports[name] = free_port()
        upstream = f"http://127.0.0.1:{self.ports['upstream']}"
        block = example_block()
        gate = fill(block, upstream=upstream, linkus_web=f"http://unix:{self.web_sock}:", port=self.ports["gate"],
                    cert=cert, key=key)
        plain = strip_check(fill(block, upstream=upstream, linkus_web=f"http://unix:{self.web_sock}:",
                                 port=self.ports["plain"], cert=cert, key=key))
        floor = fill(block, upstream=upstream, linkus_web=f"http://127.0.0.1:{self.ports['stand_in']}",
                     port=self.ports["floor"], cert=cert, key=key)
        # docs/gate.md's optional tuning: kept-alive connections to linkus-web (an upstream {} in http {});
        # keepalive_timeout below uvicorn's 5 s, so nginx never reuses a connection linkus-web is closing
        keepalive = fill(block, upstream=upstream, linkus_web="http://linkus_web", port=self.ports["gate-ka"],
                         cert=cert, key=key)
        extra = (f"upstream linkus_web {{ server unix:{self.web_sock}; keepalive 16; keepalive_timeout 4s; }}\n"
                 f"server {{ listen 127.0.0.1:{self.ports['upstream']}; location / {{ default_type text/plain; "
                 'return 200 "upstream ok\\n"; } }\n'
                 f"server {{ listen 127.0.0.1:{self.ports['stand_in']}; location / {{ "
                 "add_header X-Linkus-User bench; add_header X-Linkus-Method totp; return 204; } }\n")
        blocks = "\n".join((gate, keepalive, plain, floor, extra))
        self.nginx = Nginx(self.ws.root / "nginx", blocks, port=self.ports["gate"],
                           worker_user=self.proxy_user, worker_group=self.proxy_group, access_log=False)
        checked = self.nginx.check()
        if checked.returncode != 0:
            raise SystemExit(f"nginx -t: {checked.stderr}")
        self.nginx.start()

    def processes(self) -> dict[str, list[int]]:
        """The pids whose CPU time a run is charged: nginx's workers, linkus-web, linkusd, this client."""
        found: dict[str, list[int]] = {"client": [os.getpid()]}
        if self.nginx is not None and self.nginx.proc is not None:
            master = self.nginx.proc.pid
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
            found["nginx"] = [master, *map(int, children)]
        if self.web is not None:
            found["linkus-web"] = [self.web.pid, *self._descendants(self.web.pid)]
        if self.linkusd.proc is not None:
            found["linkusd"] = [self.linkusd.pid]
        return found

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        """setpriv execs env, which execs python: one pid, but look one level down all the same."""
        try:
            return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def cpu(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for name, pids in self.processes().items():
            total[name] = 0.0
            for pid in pids:
                total[name] += on_cpu_seconds(pid)
        return total

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        if self.web is not None and self.web.poll() is None:
            self.web.terminate()
            self.web.wait(10)
        self.linkusd.close()
        for name in self.system_users:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        for name in self.groups:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


# -- signing in through the gate (a session for the timed rounds) ------------------------------------


def sign_in(setup: GateSetup) -> str:
    """Sign in through nginx as a browser would (password, then the TOTP code); the Cookie header."""
    client = HttpsClient(setup.ports["gate"], setup.cert)
    last = gate_sign_in(client, setup.user, PASSWORD, code_at(time.time()), rd="/admin/")
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items() if k == "__Host-linkus_gate")
    if not cookie:
        raise SystemExit(f"bench/gate.py: signing in through the gate gave no session ({last.status})")
    return cookie


def logins_under_load(setup: GateSetup, load: Load, logins: int) -> dict[str, Any]:
    """PAM logins (pam_linkus.so alone, TOTP) with no load, then while 50 clients hammer the gate: the
    check must not hold a linkusd worker, so logins keep working and nothing is refused."""
    import threading

    def one() -> tuple[str, float]:
        setup.linkusd.forget(setup.pam_user)  # untimed: the next code is not a replay
        avoid_step_edge()
        return pamtester(setup.linkusd.service_alone, setup.pam_user, [code_at(time.time())], setup.ws.messages)

    quiet = [one() for _ in range(logins)]
    done = threading.Event()
    failed: list[BaseException] = []

    def hammer() -> None:
        try:
            while not done.is_set():
                load(50, 40)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    time.sleep(1.0)  # the load is running
    loaded = [one() for _ in range(logins)]
    done.set()
    thread.join(120)
    return {"quiet": {"codes": sorted({c for c, _t in quiet}), "median_ms": median_ms([t for _c, t in quiet])},
            "under_gate_load": {"codes": sorted({c for c, _t in loaded}),
                                "median_ms": median_ms([t for _c, t in loaded]),
                                "max_ms": max(t for _c, t in loaded) * 1000},
            "load_errors": [repr(e)[:200] for e in failed]}


# -- the run ---------------------------------------------------------------------------------------


def run_calls(path: str, call: dict[str, object], clients: int, per_client: int) -> list[float]:
    """gate_check straight on linkusd's web socket (protocol.call_web, as linkus-web makes it), from
    ``clients`` threads; the latencies. No linkus-web, no nginx: what linkusd and its socket cost."""
    from concurrent.futures import ThreadPoolExecutor

    from pam_linkus.protocol import call_web

    def one_client() -> list[float]:
        mine = []
        for _ in range(per_client):
            started = time.perf_counter()
            reply = call_web(path, call, timeout=10)
            mine.append(time.perf_counter() - started)
            if reply.get("ok") is not True:
                raise RuntimeError(f"gate_check answered {reply}")
        return mine

    with ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(lambda _i: one_client(), range(clients)) for x in part]


Load = Any  # (clients, per_client) -> latencies


def arm_load(setup: GateSetup, arm: str, cookie: str) -> Load:
    """A function that runs ``arm``'s requests: (clients, per_client) -> latencies."""
    context = ssl.create_default_context(cafile=str(setup.cert))
    if arm == "linkusd":
        call: dict[str, object] = {"op": "gate_check", "token": cookie.partition("=")[2], "client": "127.0.0.1",
                                   "host": "127.0.0.1", "uri": "/admin/"}
        return lambda clients, per_client: run_calls(str(setup.linkusd.web_socket), call, clients, per_client)
    if arm == "check":
        path = str(setup.web_sock)
        request = ("GET /linkus-gate/auth HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Original-URI: /admin/\r\n"
                   "X-Original-Host: 127.0.0.1\r\nX-Original-Method: GET\r\nX-Forwarded-Proto: https\r\n"
                   f"X-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n").encode()
        return lambda clients, per_client: run_load(lambda: asyncio.open_unix_connection(path), request, clients,
                                                    per_client, 204)
    port = setup.ports[arm]
    request = (f"GET /admin/ HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n").encode()
    return lambda clients, per_client: run_load(lambda: asyncio.open_connection("127.0.0.1", port, ssl=context),
                                                request, clients, per_client, 200)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ws = Workspace()
    setup = GateSetup(ws, real_gate=bool({"gate", "gate-ka", "check", "linkusd"} & set(args.arms)),
                      web_python=args.web_python)
    results: dict[str, dict[int, list[float]]] = {arm: {1: [], 50: []} for arm in args.arms}
    #: CPU seconds per process kind, per (arm, clients), over all timed rounds
    cpu: dict[str, dict[int, dict[str, float]]] = {arm: {1: {}, 50: {}} for arm in args.arms}
    logins: dict[str, Any] = {}
    try:
        setup.start()
        cookie = sign_in(setup) if setup.real_gate else "linkus_gate=none"
        loads = {arm: arm_load(setup, arm, cookie) for arm in args.arms}
        for load in loads.values():  # warm up: connections, caches, code paths
            load(4, 20)
        rng = random.Random(18)
        cases = [(arm, clients) for arm in args.arms for clients in (1, 50)]
        for round_no in range(args.rounds):
            order = cases[:]
            rng.shuffle(order)
            for arm, clients in order:
                per_client = args.requests if clients == 1 else args.requests_50
                before = setup.cpu()
                results[arm][clients] += loads[arm](clients, per_client)
                after = setup.cpu()
                spent = cpu[arm][clients]
                for name, seconds in after.items():
                    spent[name] = spent.get(name, 0.0) + seconds - before.get(name, 0.0)
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
        if "gate" in loads and args.logins:
            logins = logins_under_load(setup, loads["gate"], args.logins)
    finally:
        setup.close()
        ws.close()
    table: dict[str, Any] = {"machine": machine(), "rounds": args.rounds, "web_python": args.web_python, "arms": {},
                             "logins": logins}
    for arm, by_clients in results.items():
        table["arms"][arm] = {str(clients): {
            "n": len(samples), "p50_ms": percentile_ms(samples, 50), "p99_ms": percentile_ms(samples, 99),
            "cpu_us_per_request": {name: round(seconds / len(samples) * 1e6, 1)
                                   for name, seconds in cpu[arm][clients].items()}}
            for clients, samples in by_clients.items()}
    return table


def render(table: dict[str, Any]) -> str:
    arms = table["arms"]
    names = ("nginx", "linkus-web", "linkusd", "client")
    lines = ["| arm | clients | requests | p50 ms | p99 ms | p50 added vs plain | CPU µs/request: "
             + ", ".join(names) + " |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, by_clients in arms.items():
        for clients, row in by_clients.items():
            base = arms.get("plain", {}).get(clients)
            direct = arm in ("plain", "check", "linkusd") or base is None
            added = "" if direct else f"{row['p50_ms'] - base['p50_ms']:+.3f}"
            spent = " / ".join(f"{row['cpu_us_per_request'].get(name, 0):.0f}" for name in names)
            lines.append(f"| {arm} | {clients} | {row['n']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {added} "
                         f"| {spent} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="per round, at 1 client (default: %(default)s)")
    parser.add_argument("--requests-50", type=int, default=20,
                        help="per client per round, at 50 clients (default: %(default)s)")
    parser.add_argument("--arms", default=",".join(ARMS), help="a subset of " + ",".join(ARMS))
    parser.add_argument("--logins", type=int, default=8,
                        help="PAM logins timed without and then with 50 clients on the gate (0: none)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--web-python", default=PYTHON,
                        help="the Python that runs linkus-web (default: %(default)s, Debian's: uvicorn on h11 and "
                             "asyncio's loop; a venv with httptools and uvloop shows what they would save)")
    args = parser.parse_args(argv)
    args.arms = [arm for arm in args.arms.split(",") if arm]
    if not set(args.arms) <= set(ARMS) or not args.arms:
        parser.error(f"--arms: choose from {','.join(ARMS)}")
    if os.geteuid() != 0:
        raise SystemExit("bench/gate.py must run as root (users, a PAM service, nginx's worker user)")
    table = run(args)
    print(render(table))
    if table["logins"]:
        print(f"\nPAM logins (pam_linkus alone, TOTP): {table['logins']}")
    print(f"\n{table['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
