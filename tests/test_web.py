"""Web logins: a small WSGI app on a real HTTP server (wsgiref, threaded, 127.0.0.1)
calling PAM through pam_linkus.client, as a PBX web UI would.

Two-step mode (password and code in separate fields or pages; the stack asks
password then code) and single-field mode (``password123456`` in one field, the
stack runs pam_linkus first with ``forward_pass``). Every request goes through
real libpam + pam_python in a child process, and pam_acct_mgmt follows a
successful pam_authenticate.
"""

from __future__ import annotations

import json
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at
from pam_client import (
    ClientBusy,
    ClientError,
    ClientOutcome,
    ClientTimeout,
    PamClient,
    authenticate,
)

pytestmark = pytest.mark.pam

#: HTTP status the example app answers for each outcome.
STATUS = {
    ClientOutcome.SUCCESS: "200 OK",
    ClientOutcome.NEED_CODE: "401 Unauthorized",
    ClientOutcome.DENIED: "403 Forbidden",
    ClientOutcome.ACCOUNT_REFUSED: "403 Forbidden",
    ClientOutcome.LOCKED: "423 Locked",
    ClientOutcome.UNAVAILABLE: "503 Service Unavailable",
}


def login_app(pam: PamClient) -> Any:
    """The README example: POST /login with user, password and (optionally) code."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        form = urllib.parse.parse_qs(environ["wsgi.input"].read(min(size, 4096)).decode())
        user = form.get("user", [""])[0]
        password = form.get("password", [""])[0]
        code = form.get("code", [None])[0]
        try:
            # REMOTE_ADDR is the peer of this server; behind a proxy, use the address
            # the trusted proxy reports, never a header the client can set.
            result = pam.authenticate(user, password, code, rhost=environ["REMOTE_ADDR"])
            outcome = result.outcome
        except ValueError:
            outcome = ClientOutcome.DENIED
        except ClientError:  # timeout, busy, crash: try again later
            outcome = ClientOutcome.UNAVAILABLE
        start_response(STATUS[outcome], [("Content-Type", "application/json")])
        return [json.dumps({"outcome": outcome}).encode()]

    return app


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class WebApp:
    def __init__(self, pam: PamClient):
        self.server = make_server("127.0.0.1", 0, login_app(pam), server_class=ThreadingWSGIServer,
                                  handler_class=QuietHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/login"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def post(self, user: str, password: str, code: str | None = None) -> tuple[int, str]:
        fields = {"user": user, "password": password}
        if code is not None:
            fields["code"] = code
        request = urllib.request.Request(self.url, data=urllib.parse.urlencode(fields).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())["outcome"]
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["outcome"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def web(pam_stack: PamStack) -> Iterator[Any]:
    """Factory: ``web(single_field=False, max_concurrent=4)`` -> WebApp on pam_stack's service."""
    apps: list[WebApp] = []

    def make(**kwargs: Any) -> WebApp:
        app = WebApp(PamClient(pam_stack.service, timeout=30, **kwargs))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


# -- two-step mode -----------------------------------------------------------------


def test_two_step_login_asks_for_the_code_only_when_needed(pam_stack: PamStack, web: Any, make_user: Any) -> None:
    enrolled, plain = make_user(), make_user()
    pam_stack.enroll_totp(enrolled)
    app = web()
    assert app.post(plain, PASSWORD) == (200, "success")            # no 2FA: the password is enough
    assert app.post(enrolled, PASSWORD) == (401, "need_code")       # page 1: password right, code needed
    code = code_at(SECRET, time.time())
    assert app.post(enrolled, PASSWORD, code) == (200, "success")   # page 2: password and code
    assert app.post(enrolled, PASSWORD, code) == (403, "denied")    # replayed
    assert app.post(enrolled, "wrong", code_at(SECRET, time.time() + 30)) == (403, "denied")
    line = pam_stack.log.wait_for(f"user={enrolled}")
    assert "rhost=127.0.0.1" in line


def test_account_stack_runs_after_success_and_can_refuse(pam_stack: PamStack, web: Any, user: str) -> None:
    pam_stack.enroll_totp(user)
    Path("/etc/pam.d", pam_stack.service).write_text(
        "auth requisite pam_unix.so nodelay\n"
        f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line}\n"
        "account required pam_succeed_if.so quiet user ingroup root\n"  # only root may use this web UI
    )
    code = code_at(SECRET, time.time())
    result = authenticate(pam_stack.service, user, PASSWORD, code, "127.0.0.1")
    assert (result.auth, result.account, result.outcome) == ("PAM_SUCCESS", "PAM_AUTH_ERR", "account_refused")
    assert result.ok is False
    assert "outcome=success" in pam_stack.log.wait_for(f"user={user}")  # pam-linkus said yes...
    assert web().post(user, PASSWORD, code_at(SECRET, time.time() + 30)) == (403, "account_refused")  # ...app: no


def test_locked_and_unavailable_outcomes(pam_stack: PamStack, web: Any, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.write_config(lockout={"max_failures": 2})
    app = web()
    now = time.time()
    assert app.post(user, PASSWORD, wrong(code_at(SECRET, now))) == (403, "denied")
    assert app.post(user, PASSWORD, wrong(code_at(SECRET, now))) == (423, "locked")
    assert app.post(user, PASSWORD, code_at(SECRET, now)) == (423, "locked")
    pam_stack.write_config(lockout={"max_failures": 2}, enforce="maybe")
    assert app.post(user, PASSWORD, code_at(SECRET, now)) == (503, "unavailable")


# -- single-field mode -------------------------------------------------------------


def test_single_field_web_login(pam_stack: PamStack, web: Any, make_user: Any) -> None:
    pam_stack.set_pam(auth_lines=(
        f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line} forward_pass\n"
        "auth requisite pam_unix.so use_first_pass nodelay\n"
    ))
    enrolled, plain = make_user(), make_user()
    pam_stack.enroll_totp(enrolled)
    app = web(single_field=True)
    code = code_at(SECRET, time.time())
    assert app.post(enrolled, PASSWORD, code) == (200, "success")
    assert app.post(enrolled, PASSWORD, code) == (403, "denied")  # replayed
    assert app.post(enrolled, PASSWORD) == (403, "denied")        # no code appended
    assert app.post(plain, PASSWORD) == (200, "success")          # no 2FA: the whole field is the password
    # the form's field as typed by the user, code with a space: the client removes spaces from the code
    nxt = code_at(SECRET, time.time() + 30)
    assert app.post(enrolled, PASSWORD, nxt[:3] + " " + nxt[3:]) == (200, "success")


# -- concurrency, bounds and timeouts ------------------------------------------------


def test_concurrent_requests_give_one_success_per_code(pam_stack: PamStack, web: Any, make_user: Any) -> None:
    users = [make_user() for _ in range(4)]
    for u in users:
        pam_stack.enroll_totp(u)
    app = web(max_concurrent=3)
    code = code_at(SECRET, time.time())
    jobs = [u for u in users for _ in range(3)]  # every code sent three times at once
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda u: (u, app.post(u, PASSWORD, code)), jobs))
    assert time.monotonic() - started < 60
    for u in users:
        answers = sorted(r for who, r in results if who == u)
        assert answers == [(200, "success"), (403, "denied"), (403, "denied")], (u, answers)


SLOW = "87.654"  # a sleep nobody else runs, so the test can find (and miss) its process


def slow_stack(stack: PamStack) -> None:
    stack.set_pam(auth_lines=f"auth required pam_exec.so quiet /bin/sleep {SLOW}\nauth required pam_permit.so\n")


def sleepers() -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"^/bin/sleep {SLOW}$"], capture_output=True, text=True, check=False)
    return out.stdout.split()


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_the_child_and_what_it_started(pam_stack: PamStack, user: str) -> None:
    slow_stack(pam_stack)
    started = time.monotonic()
    with pytest.raises(ClientTimeout):
        authenticate(pam_stack.service, user, PASSWORD, None, timeout=2)
    assert time.monotonic() - started < 10
    assert wait_for(lambda: not sleepers()), "the stack's helper outlived the timeout"


def test_pam_client_bounds_concurrent_transactions(pam_stack: PamStack, user: str) -> None:
    slow_stack(pam_stack)
    pam = PamClient(pam_stack.service, max_concurrent=1, timeout=6, wait=1)
    def slow_login() -> None:
        with pytest.raises(ClientTimeout):
            pam.authenticate(user, PASSWORD)

    first = threading.Thread(target=slow_login)
    first.start()
    try:
        assert wait_for(lambda: bool(sleepers())), "the first transaction did not start"
        began = time.monotonic()
        with pytest.raises(ClientBusy):
            pam.authenticate(user, PASSWORD)  # waits for the slot, at most ``wait``
        assert 0.9 <= time.monotonic() - began < 5
    finally:
        first.join(15)
    assert wait_for(lambda: not sleepers())


def test_nul_bytes_are_refused_before_pam(pam_stack: PamStack, web: Any, user: str) -> None:
    with pytest.raises(ValueError, match="user"):
        authenticate(pam_stack.service, user + "\0x", PASSWORD, None)
    assert web().post(user + "\0", PASSWORD) == (403, "denied")
