#!/usr/bin/python3
"""What a Prometheus scrape every second costs the logins: 32 clients, with and without, interleaved.

    bench/metrics_ab.py [--reps N] [--seconds S] [--clients N]

One linkusd with ``metrics.listen`` on a unix socket in its directory. Each repetition runs two
windows of bench/run.py's ``parallel`` load (``--clients`` client processes, pam_linkus alone, a
fresh TOTP extension per login, ``--seconds`` long): one with a scraper that GETs /metrics once a
second (from this process, in a thread, as Prometheus would), one without; which comes first
alternates, so the machine's drift hits both alike. Prints one JSON line per window and the
medians per variant (logins/s, p50 and p99 ms, linkusd CPU ms per login, scrape ms). Run as root,
like bench/run.py. The machine may be shared: compare the two medians of one run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Workspace, pam_messages
from linkus import LinkusSetup
from run import parallel

KEYS = ("per_second", "p50_ms", "p99_ms", "cpu_ms_per_login", "errors")


class Scraper(threading.Thread):
    """GET /metrics over a unix socket once a second until stopped; the time each scrape took."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.took: list[float] = []
        self.failed = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            started = time.perf_counter()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(self.path)
                    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: linkusd\r\n\r\n")
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200 ") and b"linkus_logins_total" in data
            except OSError:
                ok = False
            if ok:
                self.took.append((time.perf_counter() - started) * 1000)
            else:
                self.failed += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=250, help="fresh extensions per client and window")
    args = parser.parse_args(argv)
    messages = pam_messages()
    windows = args.reps * 2
    users = [[[f"m{w}c{c}n{k}" for k in range(args.per_client)] for c in range(args.clients)] for w in range(windows)]
    flat = [u for window in users for client in window for u in client]
    ws = Workspace()
    rows: dict[str, list[dict[str, Any]]] = {"no scrape": [], "scrape 1/s": []}
    scrape_ms: list[float] = []
    setup: LinkusSetup | None = None
    try:
        setup = LinkusSetup(ws, "metrics", flat, extensions=len(flat) + 10, config={
            "daemon": {"max_per_account": 64},
            "metrics": {"listen": str(ws.root / "metrics" / "run" / "metrics.sock")}})
        setup.start(timeout=180)
        metrics_path = str(setup.run_dir / "metrics.sock")
        window = 0
        for rep in range(args.reps):
            order = ["no scrape", "scrape 1/s"] if rep % 2 == 0 else ["scrape 1/s", "no scrape"]
            for name in order:
                time.sleep(2.0)
                scraper = Scraper(metrics_path) if name == "scrape 1/s" else None
                if scraper is not None:
                    scraper.start()
                row = parallel(setup, users[window], args.seconds, messages)
                window += 1
                if scraper is not None:
                    scraper.stop.set()
                    scraper.join()
                    row["scrapes"] = len(scraper.took)
                    row["scrapes_failed"] = scraper.failed
                    row["scrape_ms_p50"] = round(statistics.median(scraper.took), 2) if scraper.took else None
                    scrape_ms += scraper.took
                rows[name].append(row)
                print(json.dumps({"variant": name, "rep": rep, **row}), flush=True)
    finally:
        if setup is not None:
            setup.close()
        ws.close()
    for name, found in rows.items():
        medians = {k: statistics.median(r[k] for r in found if r[k] is not None) for k in KEYS}
        extra = {"scrape_ms_p50": round(statistics.median(scrape_ms), 2) if scrape_ms else None,
                 "scrapes_failed": sum(r.get("scrapes_failed", 0) for r in found)} if name == "scrape 1/s" else {}
        print(json.dumps({"variant": name, "windows": len(found), **medians, **extra}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
