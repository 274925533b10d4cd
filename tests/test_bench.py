"""bench/run.py's latency round robin compares like with like.

Each module's timed login must pay for its own durable write only: the untimed state reset
after a login (the oath usersfile and the google-authenticator file are rewritten in place,
linkusd's state is forgotten) must be on disk before the next timed login starts, or that
login's fsync commits it. And no case may always follow the same neighbour: a fixed cyclic
order made pam_oath always run after google-authenticator's reset and pam_linkus (YAML)
after pam_oath's (bench/README, "What the figures depend on").

Real pamtester logins through real libpam, with pam_oath over a usersfile and pam_permit, in
throwaway linkus-test-* services; the scheduler is bench/run.py's own.
"""

from __future__ import annotations

import base64
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LogCatcher, PamStack, code_at, require_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import harness  # bench/ is not a package: its modules import each other by name
import run

SECRET = harness.SECRET
SECRET_HEX = base64.b32decode(SECRET).hex()


@pytest.fixture
def services(private_dir: Path, log_catcher: LogCatcher) -> Iterator[list[PamStack]]:
    """Four throwaway PAM services (no linkusd: their stacks are set below)."""
    require_root()
    stacks = []
    for i in range(4):
        root = private_dir / f"s{i}"
        root.mkdir(mode=0o711)
        stacks.append(PamStack(root, log_catcher, start=False))
    yield stacks
    for stack in stacks:
        stack.remove()


def _cases(stacks: list[PamStack], private_dir: Path, user: str, events: list[tuple[str, str]]) -> list[Any]:
    """pam_oath over a usersfile (reset as the bench resets it) and three pam_permit stacks; every
    login and every reset is recorded in ``events``."""
    usersfile = private_dir / "users.oath"
    oath_text = f"HOTP/T30 {user} - {SECRET_HEX}\n"
    usersfile.write_text(oath_text)
    usersfile.chmod(0o600)

    def reset_oath() -> None:  # as bench/run.py's: pam_oath records the last code in the file
        usersfile.write_text(oath_text)
    stacks[0].set_pam(auth_lines=f"auth required pam_oath.so usersfile={usersfile} window=3\n")
    for stack in stacks[1:]:
        stack.set_pam(auth_lines="auth required pam_permit.so\n")

    def answers(name: str, codes: bool) -> Any:
        def make() -> list[str]:
            events.append(("login", name))
            return [code_at(SECRET, time.time())] if codes else []
        return make

    def reset(name: str, then: Any = None) -> Any:
        def do() -> None:
            if then is not None:
                then()
            events.append(("reset", name))
        return do

    return [run.Case("oath", stacks[0].service, user, answers("oath", True), reset=reset("oath", reset_oath)),
            run.Case("permit-a", stacks[1].service, user, answers("permit-a", False), reset=reset("permit-a")),
            run.Case("permit-b", stacks[2].service, user, answers("permit-b", False), reset=reset("permit-b")),
            run.Case("permit-c", stacks[3].service, user, answers("permit-c", False), reset=reset("permit-c"))]


def test_every_timed_login_starts_after_the_previous_reset_is_settled(
        services: list[PamStack], private_dir: Path, user: str) -> None:
    events: list[tuple[str, str]] = []
    cases = _cases(services, private_dir, user, events)
    messages = harness.pam_messages()
    done = run.run_round_robin(cases, 4, messages, seconds=60, settle=lambda: events.append(("settle", "")))
    assert done == 4
    assert all(not case.wrong and len(case.times) == 4 for case in cases), [(c.name, c.wrong) for c in cases]
    logins = [i for i, (kind, _) in enumerate(events) if kind == "login"]
    assert len(logins) == 4 + 16  # one untimed warm-up login per case, then 4 rounds
    for before, login in itertools.pairwise(logins):
        between = [kind for kind, _ in events[before + 1:login]]
        assert between == ["reset", "settle"], (events[before], events[login], between)


def test_no_case_always_follows_the_same_neighbour(services: list[PamStack], private_dir: Path, user: str) -> None:
    events: list[tuple[str, str]] = []
    cases = _cases(services, private_dir, user, events)
    run.run_round_robin(cases, 12, harness.pam_messages(), seconds=60)
    order = [name for kind, name in events if kind == "login"][4:]  # the timed logins
    before: dict[str, list[str]] = {}
    for prev, name in itertools.pairwise(order):
        before.setdefault(name, []).append(prev)
    # A fixed cyclic order (each round starting one case later) gives each case the same
    # predecessor in 3 rounds of 4; shuffled rounds give it each of the other three about
    # as often. The order is seeded, so this is the same on every run.
    share = {name: max(prevs.count(p) for p in prevs) / len(prevs) for name, prevs in before.items()}
    assert max(share.values()) <= 0.6, share
