#!/usr/bin/python3
"""Compare the 100,000-extension reload of two or more checkouts, interleaved in one run.

    bench/reload_ab.py [--reps N] [--extensions N] NAME=DIR [NAME=DIR ...]

Each DIR is a checkout (``git worktree``, ``git archive`` of a commit...) whose pam_linkus and
nss_config one linkusd runs; the PAM module is this checkout's native/pam_linkus.so. Every
repetition runs bench/run.py's ``reload_window`` (4 clients, RELOAD, RSS) once per checkout,
the order rotating each repetition, so the machine's drift hits every checkout alike; each
window logs in as extensions no earlier window used (no replays). Prints one JSON line per
window and the medians per checkout. Run as root, like bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Workspace, pam_messages
from linkus import LinkusSetup
from run import reload_window

KEYS = ("reload_s", "worst_during_ms", "p50_during_ms", "median_before_ms", "slowdown", "over_2x", "rss_mb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--extensions", type=int, default=100_000)
    parser.add_argument("--control", type=float, metavar="S",
                        help="also a window of S seconds without a reload (a linkusd of the first checkout)")
    parser.add_argument("variants", nargs="+", help="NAME=DIR")
    args = parser.parse_args(argv)
    variants = [(name, Path(path).resolve()) for name, path in (v.split("=", 1) for v in args.variants)]
    per_window = 4 * 800
    if args.reps * per_window > args.extensions // 3:
        parser.error("not enough TOTP extensions for that many windows")
    messages = pam_messages()
    ws = Workspace()
    setups: dict[str, LinkusSetup] = {}
    runs = [(name, name) for name, _ in variants]
    if args.control:
        runs.append(("no reload", "no reload"))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runs}
    try:
        user = ws.user()
        for name, code in variants + ([("no reload", variants[0][1])] if args.control else []):
            setups[name] = LinkusSetup(ws, name.replace(" ", "-"), [user], extensions=args.extensions, code=code)
            setups[name].start(timeout=120)
        first = dict.fromkeys(setups, 0)  # per linkusd (each has its own state): fresh extensions each window
        for rep in range(args.reps):
            for name, setup_name in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                time.sleep(2.0)  # let the previous window's clients and the old snapshot go
                control = args.control if name == "no reload" else None
                row = reload_window(setups[setup_name], args.extensions, 4, messages, False,
                                    first=first[setup_name], control_s=control)
                first[setup_name] += per_window
                rows[name].append(row)
                print(json.dumps({"variant": name, "rep": rep, **row}), flush=True)
    finally:
        for setup in setups.values():
            setup.close()
        ws.close()
    for name, _ in runs:
        medians = {k: statistics.median(r[k] for r in rows[name] if r[k] is not None) for k in KEYS}
        errors = sum(r["errors"] for r in rows[name])
        print(json.dumps({"variant": name, "windows": len(rows[name]), "errors": errors, **medians}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
