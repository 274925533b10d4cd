"""An interactive PAM client for tests whose answer is only known mid-conversation.

pam_linkus.client answers every code prompt with a code given in advance; an
email code exists only after the module has sent it. Here the PAM transaction
runs in a child process (libpam through ctypes, tests/pam_client.py) and forwards every prompt to the
parent as a JSON line; the parent's ``answer(prompt, messages)`` callback replies
-- e.g. after reading the mail from the SMTP test server.

Run as a script, this file is the child.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

Answer = Callable[[str, list[str]], "str | None"]


class Conversation:
    """How one transaction went: PAM code names, prompts asked, messages shown."""

    def __init__(self, auth: str, account: str | None, prompts: list[str], messages: list[str]):
        self.auth = auth
        self.account = account
        self.prompts = prompts
        self.messages = messages

    def __repr__(self) -> str:
        return f"Conversation(auth={self.auth}, prompts={self.prompts!r}, messages={self.messages!r})"


def converse(service: str, user: str, password: str, answer: Answer, *, rhost: str | None = None,
             timeout: float = 30.0) -> Conversation:
    """Run pam_authenticate (+ acct_mgmt on success); the password prompt gets ``password``,
    every other prompt ``answer(prompt, messages so far)`` (None: hang up)."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-I", str(Path(__file__).resolve())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put("")  # EOF: the child is gone

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    prompts: list[str] = []
    messages: list[str] = []
    try:
        proc.stdin.write(json.dumps({"service": service, "user": user, "rhost": rhost}) + "\n")
        proc.stdin.flush()
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"PAM transaction did not finish within {timeout} s") from None
            if not line:
                proc.wait(5)
                raise AssertionError(f"PAM child died (exit {proc.returncode}): {proc.stderr.read()[-500:]}")
            event = json.loads(line)
            if "info" in event:
                messages.append(event["info"])
            elif "prompt" in event:
                prompts.append(event["prompt"])
                reply = password if "password" in event["prompt"].lower() else answer(event["prompt"], messages)
                proc.stdin.write(json.dumps({"answer": reply}) + "\n")
                proc.stdin.flush()
            else:
                assert proc.wait(10) == 0, f"PAM child exited {proc.returncode}: {proc.stderr.read()[-500:]}"
                return Conversation(event["auth"], event["account"], prompts, messages)
    finally:
        proc.kill()
        proc.wait(5)


def answer_after_stopping(pid: int, reply: str) -> Answer:
    """An ``answer`` that stops process ``pid`` (SIGSTOP) and then gives ``reply``: the module sends it to
    a linkusd that cannot read it yet. The caller sends SIGCONT (in a ``finally``)."""
    import os
    import signal

    def answer(_prompt: str, _messages: list[str]) -> str:
        os.kill(pid, signal.SIGSTOP)
        return reply

    return answer


def _child() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from pam_client import run_transaction

    request: dict[str, Any] = json.loads(sys.stdin.readline())

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def answer(text: str) -> str | None:
        emit({"prompt": text})
        reply: str | None = json.loads(sys.stdin.readline())["answer"]
        return reply

    auth, account = run_transaction(request["service"], request["user"], answer, rhost=request.get("rhost"),
                                    on_message=lambda text: emit({"info": text}))
    emit({"auth": auth, "account": account})


if __name__ == "__main__":
    _child()
