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

import base64
import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli
from conftest import PASSWORD, SECRET, code_at
from nginx_server import (
    EchoUpstream,
    HttpsClient,
    Nginx,
    example_block,
    fill,
    free_port,
    gate_sign_in,
    header_values,
    self_signed,
)
from smtp_server import code_in
from web_site import Site, WebServer, logged, start_browser

from pam_linkus.web import strings
from pam_linkus.web.app import CHECK_DEADLINE
from pam_linkus.web.gate import COOKIE_HEADER, SIGN_IN_HEADER, sign_in_url, upstream_cookies

pytestmark = pytest.mark.timeout(180)

FORGED = "root"
#: The gate session's cookie under HTTPS and on plain HTTP (the interface); its step cookies are others.
SESSION_COOKIES = ("__Host-linkus_gate", "linkus_gate")


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
    "linkus_gate=no-sign-in": (401, {}),  # a 401 without X-Linkus-Sign-In: the bare sign-in page
    "linkus_gate=elsewhere": (401, {SIGN_IN_HEADER: "https://evil.example/"}),  # not the gate's page: ditto
}


def stand_in_check(record: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """Answers by the session cookie (either name), as the gate reads it; a pass carries the
    gate's own X-Linkus-Cookie (``upstream_cookies``, the function linkus-web answers it with)."""
    pairs = [p.strip().partition("=") for c in header_values(record, "Cookie") for p in c.split(";")]
    session = [value for name, _eq, value in pairs if name in SESSION_COOKIES]
    if record["path"].startswith("/linkus-gate/auth"):
        # no session: the gate's own 401, naming the sign-in page with the whole request URI encoded
        (uri,) = header_values(record, "X-Original-URI")
        status, headers = CHECK_ANSWERS.get(f"linkus_gate={session[0]}" if session else "",
                                            (401, {SIGN_IN_HEADER: sign_in_url(uri)}))
        if status == 204:
            headers = {**headers, COOKIE_HEADER: upstream_cookies(header_values(record, "Cookie"))}
        return status, headers
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
                                            "?rd=/admin/config.php%3Fdisplay%3Dextensions")
    assert gui.count() == 0
    asked = [r for r in check.seen if r["path"] == "/linkus-gate/auth"]
    assert [r["method"] for r in asked] == ["GET", "GET", "GET"]  # the check is a GET without a body
    assert [header_values(r, "X-Original-Method") for r in asked] == [["GET"], ["POST"], ["HEAD"]]


def test_the_return_url_comes_back_whole_and_a_401_without_the_address_goes_to_the_bare_sign_in(
        wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream]) -> None:
    client, gui, _check = wiring
    uri = "/admin/config.php?display=extensions&extdisplay=201&tech=pjsip&q=a%26b%2Bc"
    where = urllib.parse.urlsplit(client(uri).header("Location") or "")
    assert where.path == "/linkus-gate/sign-in"
    assert urllib.parse.parse_qs(where.query) == {"rd": [uri]}  # every parameter, the %-escapes too
    for cookie in ("linkus_gate=no-sign-in", "linkus_gate=elsewhere"):
        reply = client(uri, headers=[("Cookie", cookie)])
        assert reply.status == 302 and reply.header("Location") == (
            f"https://127.0.0.1:{client.port}/linkus-gate/sign-in"), (cookie, reply.header("Location"))
    assert gui.count() == 0


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


@pytest.mark.parametrize(("sent", "gui_gets"), [
    ("PHPSESSID=abc; linkus_gate=good; lang=en", ["PHPSESSID=abc; lang=en"]),
    ("linkus_gate=good; PHPSESSID=abc", ["PHPSESSID=abc"]),
    ("__Host-linkus_gate_pre=p; PHPSESSID=abc; __Host-linkus_gate=good; linkus_gate_step=s; x=1;"
     " __Host-linkus_gate_code=c", ["PHPSESSID=abc; x=1"]),
    ("linkus_gate=good", []),
    ("xlinkus_gate=keep; linkus_gate=good", ["xlinkus_gate=keep"]),
    # any number of dummies (other ports or pages of this host name can plant them), odd spacing,
    # duplicates, every name linkus-web sets: the live session never passes
    ("; ".join(f"linkus_gate_d{i}=x" for i in range(10)) + ";PHPSESSID=abc;  linkus_gate=good;;"
     "\tlang=en ;linkus_gate=good; __Host-linkus_gate=good;LINKUS_GATE=good; linkus_session=s;"
     " __Host-linkus_session=s; linkus_pre=p; linkus_code_csrf=c; linkus_ext=e; linkus_gate_x = good",
     ["PHPSESSID=abc; lang=en"]),
    ("linkus_gate=good; linkus_session=s", []),
])
def test_the_gui_never_gets_the_gates_cookies(wiring: tuple[HttpsClient, EchoUpstream, EchoUpstream],
                                              sent: str, gui_gets: list[str]) -> None:
    client, gui, check = wiring
    assert client("/admin/", headers=[("Cookie", sent)]).status == 200
    (asked,) = [r for r in check.seen if r["path"] == "/linkus-gate/auth"]
    assert header_values(asked, "Cookie") == [sent]  # the check reads them all
    assert header_values(gui.seen[0], "Cookie") == gui_gets
    assert not [v for _k, v in gui.seen[0]["headers"] if "=good" in v or "=good" in v.replace(" ", "")]


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
    client, gui, check = wiring
    refused = client("/admin/", headers=[("Cookie", "linkus_gate=other-site")])
    assert refused.status == 403  # the gate's page as its body (the stand-in answers it 200), the status kept
    assert check.seen[-1]["path"] == "/linkus-gate/forbidden"
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


# -- the real gate: linkusd + linkus-web behind the example block ----------------------------------------


class Gate:
    """A site (tests/web_site.py) with a gate: section, its linkusd, linkus-web on a unix socket as the
    shipped unit runs it (--trust-proxy --secure-cookies; the socket's group is nginx's workers', who are
    not in the web group), the echo GUI and nginx with the example block in front."""

    def __init__(self, site: Site, tmp_path: Path):
        self.site = site
        self.stack = site.stack
        self.tag = secrets.token_hex(3)
        self.groups: list[str] = []
        self.users: list[str] = []
        self.admins = self._group(f"lkga{self.tag}")
        self.proxy_group = self._group(f"lkgp{self.tag}")
        self.proxy_user = f"lkgp{self.tag}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g",
                        self.proxy_group, self.proxy_user], check=True)
        self.users.append(self.proxy_user)
        self.port = free_port()
        self.stack.write_config(gate={
            "enforce": "all", "not_enrolled": "refuse",
            "return_hosts": [f"127.0.0.1:{self.port}"], "default_return": "/ucp/",
            "sites": [
                {"name": "provisioning", "path": "/provisioning/", "exempt_networks": ["127.0.0.2/32"]},
                {"name": "admin", "path": "/admin/", "allow_groups": [self.admins]},
                {"name": "portal", "path": "/ucp/"},
            ]})
        self.stack.daemon.start()
        self.web = WebServer(site, tmp_path)
        subprocess.run(["usermod", "-aG", self.proxy_group, self.web.user], check=True)
        web_dir = site.root / "linkus-web"
        web_dir.mkdir(mode=0o750)
        shutil.chown(web_dir, self.web.user, self.proxy_group)
        self.web_socket = web_dir / "http.sock"
        self.web.start("--unix", str(self.web_socket), "--unix-group", self.proxy_group, "--trust-proxy",
                       "--secure-cookies")
        self.gui = EchoUpstream()
        self.cert, key = self_signed(tmp_path)
        block = fill(example_block(), upstream=self.gui.url, linkus_web=f"http://unix:{self.web_socket}:",
                     port=self.port, cert=self.cert, key=key)
        self.nginx = Nginx(tmp_path / "nginx", block, port=self.port, worker_user=self.proxy_user,
                           worker_group=self.proxy_group)
        self.nginx.start()
        self.base = f"https://127.0.0.1:{self.port}"

    def _group(self, name: str) -> str:
        subprocess.run(["groupadd", name], check=True)
        self.groups.append(name)
        return name

    def client(self, source: str = "127.0.0.1") -> HttpsClient:
        return HttpsClient(self.port, self.cert, source=source)

    def enrol(self, *users: str, admin: bool = False) -> None:
        """TOTP with the demo secret for each (replay state is per account, so they do not collide)."""
        for name in users:
            self.stack.extensions[name] = {"method": "totp", "secret": SECRET}
            if admin:
                subprocess.run(["usermod", "-aG", self.admins, name], check=True)
        self.stack.write_extensions()

    def session(self, client: HttpsClient) -> dict[str, str]:
        return {k: v for k, v in client.cookies.items() if k in SESSION_COOKIES}

    def close(self) -> None:
        """Every step runs even when one before it fails (a leftover user or group outlives the test)."""
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            for group in self.groups:
                steps.callback(subprocess.run, ["groupdel", group], check=False, capture_output=True)
            for name in self.users:
                steps.callback(subprocess.run, ["userdel", name], check=False, capture_output=True)
            for stop in (self.stack.daemon.stop, self.web.stop, self.gui.close, self.nginx.stop):
                steps.callback(stop)


@pytest.fixture
def gate(site: tuple[Site, Any], tmp_path: Path) -> Iterator[Gate]:
    made = Gate(site[0], tmp_path)
    try:
        yield made
    finally:
        made.close()


def spki_pin(cert: Path) -> str:
    """The certificate's SPKI hash, as Chromium's --ignore-certificate-errors-spki-list wants it."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"], capture_output=True,
                         check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                         check=True).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def echoed(reply_or_text: Any) -> dict[str, Any]:
    return dict(json.loads(reply_or_text.body if hasattr(reply_or_text, "body") else reply_or_text))


def on_sign_in(reply: Any, port: int) -> bool:
    where = urllib.parse.urlsplit(reply.header("Location") or "")
    return reply.status == 302 and where.path == "/linkus-gate/sign-in" and where.netloc in ("", f"127.0.0.1:{port}")


FORGED_HEADERS = [("X-Linkus-User", FORGED), ("x-linkus-user", "admin"), ("X-Linkus-Method", "exempt")]


def test_browser_signs_in_with_both_factors_and_signs_out(gate: Gate, make_user: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    user = make_user()
    gate.enrol(user, admin=True)
    pin = f"--ignore-certificate-errors-spki-list={spki_pin(gate.cert)}"  # this certificate only
    driver = start_browser(tmp_path / "chromium", flags=(pin,))
    try:
        # a forged identity header on every request the browser makes
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"X-Linkus-User": FORGED}})

        def at(path: str) -> None:
            WebDriverWait(driver, 20).until(lambda d: urllib.parse.urlsplit(d.current_url).path == path)

        driver.get(gate.base + "/admin/config.php?display=extensions")
        at("/linkus-gate/sign-in")
        assert gate.gui.count() == 0
        driver.find_element(By.CSS_SELECTOR, "#ext").send_keys(user)
        driver.find_element(By.CSS_SELECTOR, "#password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#code"))

        # the password alone opens nothing: the browser's cookies, as they are now, in a plain client
        half = gate.client()
        half.cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
        assert on_sign_in(half("/admin/config.php", headers=FORGED_HEADERS), gate.port)
        assert on_sign_in(half("/ucp/"), gate.port)
        assert gate.gui.count() == 0

        driver.find_element(By.CSS_SELECTOR, "#code").send_keys(code_at(SECRET, time.time()))
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        at("/admin/config.php")
        assert urllib.parse.urlsplit(driver.current_url).query == "display=extensions"
        seen = echoed(driver.find_element(By.TAG_NAME, "body").text)
        assert header_values(seen, "X-Linkus-User") == [user]
        assert header_values(seen, "X-Linkus-Method") == ["totp"]

        (cookie,) = [c for c in driver.get_cookies() if c["name"] in SESSION_COOKIES]
        assert cookie["name"] == "__Host-linkus_gate" and cookie["secure"] and cookie["httpOnly"]
        assert cookie["sameSite"] == "Lax" and cookie["path"] == "/"
        assert len(cookie["value"]) >= 22  # >= 128 bits, however encoded

        # the same session, many requests and paths, forged headers every time: the gate's word only
        full = gate.client()
        # with dummies planted before it (five and more): the GUI still gets only its own cookie
        full.cookies = {**{f"linkus_gate_d{i}": "x" for i in range(6)}, "PHPSESSID": "abc",
                        cookie["name"]: cookie["value"]}
        for path in ("/admin/", "/admin/config.php?display=x&y=1", "/ucp/", "/ucp/index.php"):
            reply = full(path, headers=FORGED_HEADERS)
            assert reply.status == 200, (path, reply.status)
            assert header_values(echoed(reply), "X-Linkus-User") == [user]
            assert header_values(echoed(reply), "Cookie") == ["PHPSESSID=abc"]
        assert all(FORGED not in [v for _k, v in r["headers"]] for r in gate.gui.seen)
        assert not [r for r in gate.gui.seen if "linkus_gate" in json.dumps(r) or cookie["value"] in json.dumps(r)]

        # sign-out at the gate ends access (the browser's and the copied cookie's)
        driver.get(gate.base + "/linkus-gate/sign-out")
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        # the POST's answer before the next page: a navigation started too early would abort it
        WebDriverWait(driver, 20).until(lambda d: strings.GATE_SIGNED_OUT in d.page_source)
        driver.get(gate.base + "/admin/")
        at("/linkus-gate/sign-in")
        assert on_sign_in(full("/admin/"), gate.port)
    finally:
        driver.quit()
    assert logged(gate.site.log, user=user, service="linkus-gate")
    for secret_text in (PASSWORD, cookie["value"]):
        assert all(secret_text not in line for line in gate.site.log.lines)
        assert secret_text not in gate.web.log_text()


def test_policy_revocation_and_the_exempt_network(gate: Gate, make_user: Any) -> None:
    admin, member = make_user(), make_user()
    gate.enrol(admin, admin=True)
    gate.enrol(member)
    clients = {}
    for name in (admin, member):
        client = clients[name] = gate.client()
        # the sign-in address as the gate's 401 gives it: the return URL with all its parameters
        asked = urllib.parse.urlsplit(client("/ucp/inbox?x=1&folder=INBOX&page=2").header("Location") or "")
        assert asked.path == "/linkus-gate/sign-in" and asked.query.startswith("rd="), asked
        done = gate_sign_in(client, name, PASSWORD, code_at(SECRET, time.time()), rd=asked.query[3:])
        back = urllib.parse.urlsplit(done.header("Location"))
        assert done.status in (302, 303) and (back.path, back.query) == ("/ucp/inbox", "x=1&folder=INBOX&page=2")
        assert gate.session(client)
    # per-site policy: only the admins group passes /admin/; a path no site names is refused
    assert clients[admin]("/admin/").status == 200
    refused = clients[member]("/admin/", headers=FORGED_HEADERS)
    assert refused.status == 403 and "may not open this page" in refused.text  # linkus-web's page, nginx's 403
    assert header_values(echoed(clients[member]("/ucp/")), "X-Linkus-User") == [member]
    assert clients[admin]("/recordings/").status == 403

    # the admin lists and revokes; the next request is refused, the other account's session lives on
    listed = run_cli(gate.stack, "gate-sessions")
    assert listed.returncode == 0 and admin in listed.stdout and member in listed.stdout, listed
    revoked = run_cli(gate.stack, "gate-revoke", "--account", admin)
    assert revoked.returncode == 0, revoked
    assert on_sign_in(clients[admin]("/admin/"), gate.port)
    assert clients[member]("/ucp/").status == 200

    # phones: the exempt path only, from the exempt network only, naming nobody
    phone = gate.client(source="127.0.0.2")
    reply = phone("/provisioning/0004f2aabbcc.cfg", headers=FORGED_HEADERS)
    assert reply.status == 200
    assert header_values(echoed(reply), "X-Linkus-User") == []
    assert header_values(echoed(reply), "X-Linkus-Method") == ["exempt"]
    assert on_sign_in(phone("/ucp/"), gate.port)
    assert on_sign_in(gate.client()("/provisioning/0004f2aabbcc.cfg"), gate.port)


#: Return URLs that must not leave the site, as a browser would have them in the sign-in URL.
EVIL_RETURNS = ["//evil.example/", "https://evil.example/", "https:/%5Cevil.example/", "/%5Cevil.example/",
                "%2F%2Fevil.example/", "/\\evil.example/", "javascript:alert(1)", "https://127.0.0.1:{port}@evil.example/",
                "https://127.0.0.1:{port}.evil.example/", "http:evil.example"]


def test_open_redirect_attempts_land_on_the_safe_default(gate: Gate, make_user: Any) -> None:
    users = [make_user() for _ in EVIL_RETURNS]
    gate.enrol(*users)
    for name, rd in zip(users, EVIL_RETURNS, strict=True):
        rd = rd.format(port=gate.port)
        client = gate.client()
        done = gate_sign_in(client, name, PASSWORD, code_at(SECRET, time.time()), rd=rd)
        where = urllib.parse.urlsplit(done.header("Location") or "")
        assert done.status in (302, 303), (rd, done.status, done.text[:300])
        assert where.netloc in ("", f"127.0.0.1:{gate.port}") and where.path == "/ucp/", (rd, where)
        assert client.follow(done).status == 200  # and the session works there


def test_a_locked_account_and_linkusd_down_let_nobody_in(gate: Gate, make_user: Any) -> None:
    locked, later, fine = make_user(), make_user(), make_user()
    gate.enrol(locked, later, fine)
    signed_in_before = gate.client()
    gate_sign_in(signed_in_before, later, PASSWORD, code_at(SECRET, time.time()), rd="/ucp/")
    assert signed_in_before("/ucp/").status == 200
    for name in (locked, later):
        for _ in range(5):  # lockout.max_failures of the site: wrong codes at real PAM logins (one state)
            assert gate.stack.pamtester(name, PASSWORD, "000000").returncode != 0
    client = gate.client()
    gate_sign_in(client, locked, PASSWORD, code_at(SECRET, time.time()), rd="/ucp/")
    assert not gate.session(client)
    assert on_sign_in(client("/ucp/"), gate.port)
    assert on_sign_in(signed_in_before("/ucp/"), gate.port)  # a lock ends the sessions it finds too

    signed_in = gate.client()
    gate_sign_in(signed_in, fine, PASSWORD, code_at(SECRET, time.time()), rd="/ucp/")
    assert signed_in("/ucp/").status == 200
    before = gate.gui.count()
    # linkusd frozen: the check's own short deadline (web.app.CHECK_DEADLINE), not the pages' 20 s
    daemon = gate.stack.daemon.proc
    assert daemon is not None
    daemon.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        frozen = signed_in("/ucp/", headers=FORGED_HEADERS)
        took = time.monotonic() - started
    finally:
        daemon.send_signal(signal.SIGCONT)
    assert frozen.status == 503 and "Sign-in is unavailable" in frozen.text
    assert took < CHECK_DEADLINE + 2, took
    assert gate.gui.count() == before
    gate.stack.daemon.stop()
    down = signed_in("/ucp/", headers=FORGED_HEADERS)
    assert down.status == 503 and "Sign-in is unavailable" in down.text
    assert gate.client()("/admin/").status == 503
    # the sign-in form still shows (it needs nobody), signing in says why it cannot
    late = gate.client()
    tried = gate_sign_in(late, fine, PASSWORD, code_at(SECRET, time.time() + 30), rd="/ucp/")
    assert tried.status == 503 and not gate.session(late)
    assert 'id="sign-in"' not in tried.text
    assert gate.gui.count() == before


def test_an_emailed_code_opens_the_gate(gate: Gate, site: tuple[Site, Any], make_user: Any) -> None:
    """The second factor the account has: here a code by email (sent after the password, as at a PAM
    login); the GUI is told the method."""
    smtp = site[1]
    user = make_user()
    gate.stack.extensions[user] = {"method": "email", "email": "owner@example.com"}
    gate.stack.write_extensions()
    client = gate.client()
    done = gate_sign_in(client, user, PASSWORD, lambda: code_in(smtp.wait_for_message(1)), rd="/ucp/")
    assert done.status == 303 and gate.session(client), (done.status, done.text[:300])
    assert smtp.wait_for_message(1)["to"] == ["owner@example.com"]
    seen = echoed(client.follow(done))
    assert header_values(seen, "X-Linkus-User") == [user]
    assert header_values(seen, "X-Linkus-Method") == ["email"]


def test_an_account_without_2fa_enrolls_under_the_gates_prefix_then_passes_with_both_factors(
        gate: Gate, make_user: Any, tmp_path: Path) -> None:
    """gate enforce: all, not_enrolled: enroll, the documented block: the password lands on the
    Security Settings page under /linkus-gate/account/ (the GUI's /settings is behind the gate), TOTP
    is turned on there, then the gate opens with both factors; no linkus-web cookie reaches the GUI."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gate.stack.config["gate"]["not_enrolled"] = "enroll"
    gate.stack.write_config()
    user = make_user()
    gate.site.add(user)  # 2FA off
    pin = f"--ignore-certificate-errors-spki-list={spki_pin(gate.cert)}"
    driver = start_browser(tmp_path / "chromium", flags=(pin,))
    account = "/linkus-gate/account"
    try:
        def at(path: str) -> None:
            WebDriverWait(driver, 20).until(lambda d: urllib.parse.urlsplit(d.current_url).path == path)

        def fill_in(css: str, value: str) -> None:
            box = driver.find_element(By.CSS_SELECTOR, css)
            box.clear()
            box.send_keys(value)

        def sign_in_at_the_gate() -> None:
            driver.get(gate.base + "/ucp/index.php?x=1")
            at("/linkus-gate/sign-in")
            fill_in("#ext", user)
            fill_in("#password", PASSWORD)
            driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

        sign_in_at_the_gate()
        at(account + "/settings")
        assert driver.find_element(By.CSS_SELECTOR, "#status-2fa").text == "Off"
        # a Security Settings session, no gate session: the GUI still refuses
        names = {c["name"] for c in driver.get_cookies()}
        assert "linkus_session" in names and not names & set(SESSION_COOKIES)
        driver.find_element(By.CSS_SELECTOR, "#enabled").click()
        at(account + "/settings/password")
        fill_in("#password", PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "#confirm").click()
        at(account + "/settings/method")
        driver.find_element(By.CSS_SELECTOR, "label[for=m-totp]").click()
        driver.find_element(By.CSS_SELECTOR, "#next").click()
        at(account + "/settings/authenticator")
        driver.find_element(By.CSS_SELECTOR, "#cant-scan summary").click()
        WebDriverWait(driver, 5).until(lambda d: d.find_element(By.CSS_SELECTOR, "#secret").text.strip())
        secret = driver.find_element(By.CSS_SELECTOR, "#secret").text.replace(" ", "")
        fill_in("#code", code_at(secret, time.time()))
        driver.find_element(By.CSS_SELECTOR, "#save").click()
        at(account + "/settings")
        assert driver.find_element(By.CSS_SELECTOR, "#status-2fa").text == "On"
        assert gate.gui.count() == 0

        sign_in_at_the_gate()  # now the code is asked (the next time step: the last one is spent)
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#code"))
        fill_in("#code", code_at(secret, time.time() + 30))
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        at("/ucp/index.php")
        seen = echoed(driver.find_element(By.TAG_NAME, "body").text)
        assert header_values(seen, "X-Linkus-User") == [user]
        assert header_values(seen, "X-Linkus-Method") == ["totp"]
        assert "linkus_session" in {c["name"] for c in driver.get_cookies()}  # the browser still holds it
        assert not [r for r in gate.gui.seen if "linkus_" in json.dumps(r)]  # the GUI never got one
    finally:
        driver.quit()
