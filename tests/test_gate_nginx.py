"""The web gate end to end (issue 18 item 10): Debian's nginx running docs/gate.md's example server
block (taken from the page: tests/nginx_server.py), in front of a stand-in GUI that echoes the headers
it got.

Two parts:
- the block's own wiring, with a stand-in for the gate's check whose answers the test chooses and
  which records the subrequests nginx sends it (what a client sends that must never arrive; what the
  check is told; what 401/403/500 become);
- the real thing: linkusd and linkus-web (on its unix socket, as the shipped unit runs it) behind the
  same block, with headless Chromium for the sign-in and a plain HTTPS client for the many checks.

TLS is nginx's, with a self-signed certificate for 127.0.0.1 made per test; the clients trust exactly
that certificate (Chromium is told to ignore certificate errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nginx_server import EchoUpstream, HttpsClient, Nginx, example_block, fill, free_port, header_values, self_signed

pytestmark = pytest.mark.timeout(180)

FORGED = "root"


def start_nginx(where: Path, *, upstream: str, linkus_web: str, worker_user: str | None = None,
                worker_group: str | None = None) -> tuple[Nginx, HttpsClient]:
    cert, key = self_signed(where)
    port = free_port()
    block = fill(example_block(), upstream=upstream, linkus_web=linkus_web, port=port, cert=cert, key=key)
    server = Nginx(where / "nginx", block, port=port, worker_user=worker_user, worker_group=worker_group)
    checked = server.check()
    assert checked.returncode == 0, checked.stderr
    server.start()
    return server, HttpsClient(port, cert)


# -- the example block's wiring, with a stand-in for the check -------------------------------------------

#: The stand-in check's answers, by the cookie the client sent.
CHECK_ANSWERS: dict[str, tuple[int, dict[str, str]]] = {
    "linkus_gate=good": (204, {"X-Linkus-User": "201", "X-Linkus-Method": "totp"}),
    "linkus_gate=other-site": (403, {}),
    "linkus_gate=phones": (204, {"X-Linkus-User": "", "X-Linkus-Method": "exempt"}),
    "linkus_gate=broken": (500, {}),
}


def stand_in_check(record: dict[str, Any]) -> tuple[int, dict[str, str]]:
    cookie = header_values(record, "Cookie")
    if record["path"].startswith("/linkus-gate/auth"):
        return CHECK_ANSWERS.get(cookie[0] if cookie else "", (401, {}))
    return 200, {}  # the gate's own pages


@pytest.fixture
def wiring(tmp_path: Path) -> Iterator[tuple[HttpsClient, EchoUpstream, EchoUpstream]]:
    gui = EchoUpstream()
    check = EchoUpstream(answer=stand_in_check)
    server, client = start_nginx(tmp_path, upstream=gui.url, linkus_web=check.url, worker_user="nobody",
                                 worker_group="nogroup")
    try:
        yield client, gui, check
    finally:
        server.stop()
        gui.close()
        check.close()


def test_the_example_block_parses_with_the_default_socket_address(tmp_path: Path) -> None:
    """The shipped unit's address (a unix socket, with nginx's trailing colon) is what most sites use."""
    cert, key = self_signed(tmp_path)
    block = fill(example_block(), upstream="http://127.0.0.1:8080",
                 linkus_web="http://unix:/run/linkus-web/http.sock:", port=free_port(), cert=cert, key=key)
    assert "proxy_pass http://unix:/run/linkus-web/http.sock:/linkus-gate/auth;" in block
    checked = Nginx(tmp_path / "nginx", block, port=free_port(), worker_user="nobody", worker_group="nogroup").check()
    assert checked.returncode == 0, checked.stderr


def test_without_a_session_nothing_reaches_the_gui_and_the_browser_goes_to_sign_in(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    client, gui, check = wiring
    for method in ("GET", "POST", "HEAD"):
        reply = client("/admin/config.php?display=extensions", method=method,
                       headers=[("X-Linkus-User", FORGED), ("Cookie", "linkus_gate=made-up")],
                       body=b"x=1" if method == "POST" else None)
        assert reply.status == 302, (method, reply.status, reply.body[:200])
        assert reply.header("Location") == (f"https://127.0.0.1:{client.port}/linkus-gate/sign-in"
                                            "?rd=/admin/config.php?display=extensions")
    assert gui.count() == 0
    asked = [r for r in check.seen if r["path"] == "/linkus-gate/auth"]
    assert [r["method"] for r in asked] == ["GET", "GET", "GET"]  # the check is a GET without a body
    assert [header_values(r, "X-Original-Method") for r in asked] == [["GET"], ["POST"], ["HEAD"]]


def test_the_check_is_told_the_request_and_never_the_clients_identity_header(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    client, gui, check = wiring
    reply = client("/admin/a%20b/?x=1&y=2", method="POST", body=b"secret-form-field=1",
                   headers=[("Cookie", "linkus_gate=good"), ("X-Linkus-User", FORGED), ("X-Linkus-Method", "exempt"),
                            ("X-Forwarded-For", "203.0.113.9"), ("X-Real-IP", "203.0.113.9"),
                            ("X-Original-URI", "/ucp/"), ("X-Original-Host", "evil.example"),
                            ("X-Forwarded-Proto", "http")])
    assert reply.status == 200
    (asked,) = [r for r in check.seen if r["path"] == "/linkus-gate/auth"]
    want = {"X-Original-URI": ["/admin/a%20b/?x=1&y=2"], "X-Original-Host": ["127.0.0.1"],
            "X-Original-Method": ["POST"], "X-Forwarded-Proto": ["https"], "X-Forwarded-For": ["127.0.0.1"],
            "X-Real-IP": ["127.0.0.1"], "Cookie": ["linkus_gate=good"], "X-Linkus-User": [],
            "X-Linkus-Method": [], "Content-Length": []}
    assert {name: header_values(asked, name) for name in want} == want
    assert asked["method"] == "GET"

    (seen,) = gui.seen
    assert seen["method"] == "POST" and seen["path"] == "/admin/a%20b/?x=1&y=2"
    assert header_values(seen, "X-Linkus-User") == ["201"]
    assert header_values(seen, "X-Linkus-Method") == ["totp"]
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Real-IP") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert reply.json()["path"] == "/admin/a%20b/?x=1&y=2"


def test_a_forged_identity_header_never_reaches_the_gui_in_any_spelling(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    """Two copies, other letter cases, and with an exempt answer (the gate names nobody): the GUI sees
    the gate's value or none. (nginx refuses underscores in header names by default, so
    ``X_Linkus_User`` is dropped before it could be mistaken by a CGI-style GUI.)"""
    client, gui, _check = wiring
    forged = [("X-Linkus-User", FORGED), ("x-linkus-user", "admin"), ("X-LINKUS-USER", "1000"),
              ("X_Linkus_User", FORGED)]
    assert client("/admin/", headers=[("Cookie", "linkus_gate=good"), *forged]).status == 200
    assert client("/provisioning/cfg.xml", headers=[("Cookie", "linkus_gate=phones"), *forged]).status == 200
    good, exempt = gui.seen
    assert header_values(good, "X-Linkus-User") == ["201"]
    assert header_values(exempt, "X-Linkus-User") == []
    assert header_values(exempt, "X-Linkus-Method") == ["exempt"]
    for record in (good, exempt):
        assert not [name for name, _value in record["headers"] if "linkus_user" in name.lower()]


def test_403_stays_403_and_a_broken_check_lets_nobody_in(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    client, gui, _check = wiring
    refused = client("/admin/", headers=[("Cookie", "linkus_gate=other-site")])
    assert refused.status == 403
    broken = client("/admin/", headers=[("Cookie", "linkus_gate=broken"), ("X-Linkus-User", FORGED)])
    assert broken.status == 503
    assert b"Sign-in is unavailable" in broken.body and broken.header("Cache-Control") == "no-store"
    assert gui.count() == 0


def test_the_gates_own_pages_pass_without_a_check_and_the_check_is_internal(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    client, gui, check = wiring
    assert client("/linkus-gate/auth", headers=[("Cookie", "linkus_gate=good")]).status == 404
    page = client("/linkus-gate/sign-in?rd=/admin/", headers=[("X-Linkus-User", FORGED)])
    assert page.status == 200
    assert [r["path"] for r in check.seen] == ["/linkus-gate/sign-in?rd=/admin/"]  # no subrequest before it
    assert header_values(check.seen[0], "X-Linkus-User") == []
    assert header_values(check.seen[0], "X-Forwarded-Proto") == ["https"]
    too_big = client("/linkus-gate/sign-in", method="POST", body=b"x" * 20000)
    assert too_big.status == 413
    assert gui.count() == 0


def test_the_check_down_means_nobody_passes(tmp_path: Path) -> None:
    gui = EchoUpstream()
    gone = free_port()  # nothing listens there
    server, client = start_nginx(tmp_path, upstream=gui.url, linkus_web=f"http://127.0.0.1:{gone}",
                                 worker_user="nobody", worker_group="nogroup")
    try:
        reply = client("/admin/", headers=[("Cookie", "linkus_gate=good"), ("X-Linkus-User", FORGED)])
        assert reply.status == 503 and b"Nobody can pass" not in reply.body and b"nobody can pass" in reply.body
        assert client("/linkus-gate/sign-in").status == 502  # the gate's own page: nginx's own error
        assert gui.count() == 0
    finally:
        server.stop()
        gui.close()
