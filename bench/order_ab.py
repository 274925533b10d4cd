#!/usr/bin/python3
"""The latency round robin's schedule, before and after, interleaved in one run.

    .venv/bin/python bench/order_ab.py [--rounds N]      # as root, after `make deps-test native`

"before" is the schedule bench/run.py had until issue 17 item 15: a fixed cyclic order (each
round starting one case later) and nothing between a login's untimed state reset and the next
login. "after" is bench/run.py's ``run_round_robin`` today: each round shuffled (seeded), and
``settle_fs`` after every login and its reset. Rounds alternate (one before, one after, with a
settle between them), so both see the same machine. Cases: pam_permit, pam_unix and the
"alone" rows of pam_google_authenticator, pam_oath and pam_linkus (YAML + SQLite), and each
after pam_unix, exactly as bench/run.py sets them up. Prints the medians of each case under
each schedule, what pam_oath costs over pam_permit and pam_linkus / pam_oath.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from harness import Workspace, avoid_step_edge, machine, median_ms, pamtester
from linkus import LinkusSetup


def _login(case: run.Case, messages: dict[str, str], times: list[float], settle: bool) -> None:
    avoid_step_edge()
    code, elapsed = pamtester(case.service, case.user, case.answers(), messages)
    if code == case.expect:
        times.append(elapsed)
    else:
        case.wrong.append(code)
    if case.reset is not None:
        case.reset()
    if settle:
        run.settle_fs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="rounds per schedule (default %(default)s)")
    args = parser.parse_args(argv)
    m = machine()
    ws = Workspace()
    setup = None
    try:
        user = ws.user()
        setup = LinkusSetup(ws, "yaml10", [user])
        setup.start()
        cases = run.peer_cases(ws, user) + run.linkus_cases("YAML, SQLite", setup, user)
        cases.sort(key=lambda c: "alone" in c.name)  # bench/run.py's order: pam_unix rows first
        times: dict[tuple[str, str], list[float]] = {(s, c.name): [] for s in ("before", "after") for c in cases}
        for case in cases:  # warm-up, untimed
            _login(case, ws.messages, [], True)
        shuffle = random.Random(11)
        for r in range(args.rounds):
            shift = r % len(cases)
            for case in cases[shift:] + cases[:shift]:
                _login(case, ws.messages, times["before", case.name], False)
            run.settle_fs()
            for case in shuffle.sample(cases, len(cases)):
                _login(case, ws.messages, times["after", case.name], True)
    finally:
        if setup is not None:
            setup.close()
        ws.close()
    after = machine()
    print(f"{m['date']}, {m['cpu']} ({m['cpus']} CPUs), load {m['load'][0]:.2f} before, "
          f"{after['load'][0]:.2f} after; {args.rounds} rounds per schedule, alternating\n")
    print("| stack | before ms | after ms |\n| --- | ---: | ---: |")
    med = {key: median_ms(v) for key, v in times.items()}
    for case in cases:
        print(f"| {case.name} | {med['before', case.name]:.2f} | {med['after', case.name]:.2f} |"
              + (f" unexpected: {case.wrong}" if case.wrong else ""))
    for s in ("before", "after"):
        permit, oath = med[s, "pam_permit"], med[s, "pam_oath alone"]
        linkus = med[s, "pam_linkus alone (YAML, SQLite)"]
        print(f"\n{s}: pam_oath alone - pam_permit = {oath - permit:+.2f} ms; "
              f"pam_linkus alone / pam_oath alone = {linkus / oath:.2f}x", end="")
    print()
    return 0 if not any(c.wrong for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
