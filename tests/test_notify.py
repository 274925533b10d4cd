"""Notifications (pam_linkus.notify) against the tests' real SMTP server (aiosmtpd), the clock injected;
and through real PAM and a real linkusd: a lock mails the owner and the admin, wrong codes for many
extensions mail the admin once (spraying)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pam_client
import pytest
from conftest import PamStack, code_at
from fakes import Clock
from plumbing import LogCatcher
from web_site import logged

from pam_linkus import notify
from pam_linkus.config import Config
from pam_linkus.errors import ConfigError
from pam_linkus.logline import SyslogSink
from pam_linkus.mail import SmtpMailer
from pam_linkus.notify import Event, Notifier, compose

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
OWNER, ADMIN = "owner@example.com", "ops@example.net"
CLIENT = "192.0.2.33"


def config(port: int, **notify: Any) -> Config:
    return Config.from_mapping({
        "smtp": {"host": "127.0.0.1", "port": port, "security": "none", "from": "pbx@example.com", "timeout": 5},
        "notify": notify,
    })


@pytest.fixture
def mail(smtp_server: Any, private_dir: Path, log_catcher: LogCatcher) -> Any:
    """A Notifier sending to a real plain SMTP server on loopback, its lines to the log catcher."""
    server = smtp_server(security="none")
    clock = Clock(1_800_000_000.0)
    holder: dict[str, Any] = {"config": config(server.port, admin=ADMIN, interval=900, max_per_hour=60)}
    notifier = Notifier(SyslogSink(str(log_catcher.path), tag="linkusd"), current=lambda: holder["config"],
                        mailer=lambda c: SmtpMailer(c.smtp), lookup={"201": OWNER, "202": None}.get, clock=clock)
    return server, notifier, clock, holder, log_catcher


def sent_to(server: Any) -> list[tuple[str, str]]:
    return [(m["to"][0], str(m["message"]["Subject"])) for m in server.messages]


def test_each_event_mails_the_owner_once_with_its_own_text(mail: Any) -> None:
    server, notifier, clock, _holder, log = mail
    kinds = {"disabled": "switched off", "enrolled": "New two-factor method", "recovery-codes": "New recovery codes"}
    for kind in kinds:
        assert notifier.submit(Event(kind, "201", clock(), by="the administrator (root)", client=CLIENT,
                                     method="totp"))
    assert notifier.submit(Event("locked", "201", clock(), client="host.evil.example\r\nBcc: x@evil.example",
                                 service="sshd\x1b[2J"))
    assert notifier.flush()
    assert sent_to(server) == [(OWNER, "Two-factor authentication switched off for 201"),
                               (OWNER, "New two-factor method for 201"), (OWNER, "New recovery codes for 201"),
                               (OWNER, "Extension 201 locked after wrong codes"),
                               (ADMIN, "Extension 201 locked after wrong codes")]
    bodies = [m["message"].get_content() for m in server.messages]
    assert "by the administrator (root) from 192.0.2.33" in bodies[0] and "an authenticator app" in bodies[1]
    # what a client sent is never repeated: a host name rhost is "not an IP address", control characters go
    assert "evil.example" not in bodies[3] and "Bcc" not in bodies[3] and "\x1b" not in bodies[3]
    assert "change your password now" in bodies[3] and "Have the password changed" in bodies[4]
    assert all(m["to"] == [m["message"]["To"]] for m in server.messages)
    assert not any(SECRET in body for body in bodies)
    assert logged(log, action="notify", kind="locked", to="admin")["result"] == "sent"
    # no address on file: nothing sent, nothing queued for nobody
    assert notifier.submit(Event("disabled", "202", clock()))
    assert notifier.flush() and len(server.messages) == 5


def test_the_lock_mail_names_a_service_only_in_a_bounded_form(tmp_path: Path) -> None:
    """The PAM service is whatever the caller passed to pam_start: repeated only when it is one this
    host configures, else in our words."""
    (tmp_path / "sshd").write_text("")
    said = {service: notify.service_text(service, str(tmp_path)) for service in (
        "sshd", "linkus-gate", "linkus-web", "Call 0800-123 now", "nosuchservice", "../sshd", "sshd\n", "", None)}
    assert said == {"sshd": "PAM service sshd", "linkus-gate": "the web gate",
                    "linkus-web": "the Security Settings page", "Call 0800-123 now": "a login",
                    "nosuchservice": "a login", "../sshd": "a login", "sshd\n": "a login", "": None, None: None}
    _subject, body = compose(Event("locked", "201", 1_800_000_000.0, client=CLIENT,
                                   service="pay-at-evil.example-to-unlock"), "pbx")
    assert "evil" not in body and f"from {CLIENT} (a login)." in body


def test_throttled_per_extension_and_kind_and_in_all(mail: Any) -> None:
    server, notifier, clock, holder, log = mail
    for _ in range(3):
        notifier.submit(Event("recovery-codes", "201", clock()))
    notifier.submit(Event("enrolled", "201", clock(), method="email"))  # another kind: its own throttle
    assert notifier.flush()
    assert [s for _to, s in sent_to(server)] == ["New recovery codes for 201", "New two-factor method for 201"]
    assert logged(log, action="notify", result="throttled (extension)")["kind"] == "recovery-codes"
    clock.now += 900
    notifier.submit(Event("recovery-codes", "201", clock()))
    assert notifier.flush() and len(server.messages) == 3
    # max_per_hour counts every mail of the notifier
    holder["config"] = config(server.port, interval=0, max_per_hour=4)
    for _ in range(3):
        notifier.submit(Event("disabled", "201", clock()))
    assert notifier.flush() and len(server.messages) == 4
    assert logged(log, action="notify", result="throttled (all)")["kind"] == "disabled"
    clock.now += 3600
    notifier.submit(Event("disabled", "201", clock()))
    assert notifier.flush() and len(server.messages) == 5


def test_spraying_alerts_the_admin_once(mail: Any) -> None:
    server, notifier, clock, holder, _log = mail
    holder["config"] = config(server.port, admin=ADMIN, spraying={"extensions": 3, "window": 60})
    for ext in ("301", "302", "301", "302"):
        notifier.wrong_code(ext, clock())
        clock.now += 1
    assert notifier.flush() and server.messages == []  # two extensions, however many codes
    for ext in ("303", "304", "305", "303"):
        notifier.wrong_code(ext, clock())
        clock.now += 1
    assert notifier.flush()
    assert len(server.messages) == 1 and server.messages[0]["to"] == [ADMIN]
    assert str(server.messages[0]["message"]["Subject"]).startswith("Wrong codes for 3 extensions on ")
    body = server.messages[0]["message"].get_content()
    lines = body.splitlines()
    assert all(f"    {ext}" in lines for ext in ("301", "302", "303")) and "304" not in body
    clock.now += 61  # the spray stopped for a window: the next one is news again
    notifier.wrong_code("306", clock())
    assert notifier.flush() and len(server.messages) == 1
    for ext in ("307", "308"):
        notifier.wrong_code(ext, clock())
    assert notifier.flush() and len(server.messages) == 2
    # no admin address: no alert at all
    holder["config"] = config(server.port, spraying={"extensions": 2, "window": 60})
    clock.now += 1000
    for ext in ("401", "402", "403"):
        notifier.wrong_code(ext, clock())
    assert notifier.flush() and len(server.messages) == 2


def test_a_full_queue_drops_with_a_line_and_never_blocks(private_dir: Path, log_catcher: LogCatcher) -> None:
    release = threading.Event()

    class StuckMailer:
        """An SMTP server that does not answer: the sending thread waits, the submitter must not."""

        def send(self, to: str, subject: str, body: str, *, now: float) -> None:
            release.wait(10)

    cfg = config(1)
    notifier = Notifier(SyslogSink(str(log_catcher.path), tag="linkusd"), current=lambda: cfg,
                        mailer=lambda c: StuckMailer(), lookup=lambda ext: OWNER, capacity=2)
    started = time.monotonic()
    results = [notifier.submit(Event("disabled", str(n), 0.0)) for n in range(5)]
    assert time.monotonic() - started < 1.0
    assert results.count(False) >= 2 and notifier.dropped == results.count(False)
    assert logged(log_catcher, action="notify", result="dropped")["reason"] == "notification queue full"
    release.set()
    assert notifier.flush()


def test_off_without_smtp_and_strict_keys() -> None:
    assert not Config.from_mapping({}).notify.enabled  # no smtp section: no mail to a relay nobody set up
    assert Config.from_mapping({"smtp": {}}).notify.enabled
    assert not Config.from_mapping({"smtp": {}, "notify": {"enabled": False}}).notify.enabled
    with pytest.raises(ConfigError, match=r"notify\.admin"):
        Config.from_mapping({"notify": {"admin": "Ops <ops@example.com>"}})
    with pytest.raises(ConfigError, match="unknown key in notify"):
        Config.from_mapping({"notify": {"admins": "ops@example.com"}})
    with pytest.raises(ConfigError, match=r"notify\.spraying\.extensions"):
        Config.from_mapping({"notify": {"spraying": {"extensions": 1}}})


def test_through_pam_a_lock_and_a_spray_mail_owner_and_admin(pam_stack: PamStack, smtp_server: Any) -> None:
    server = smtp_server(security="none")
    pam_stack.set_linkus_only()
    pam_stack.write_config(
        smtp={"host": "127.0.0.1", "port": server.port, "security": "none", "from": "pbx@example.com"},
        lockout={"max_failures": 2, "duration": 900},
        notify={"admin": ADMIN, "spraying": {"extensions": 3, "window": 600}})
    pam_stack.write_extensions({ext: {"method": "totp", "secret": SECRET, "email": f"{ext}@example.com"}
                                for ext in ("501", "502", "503", "504")})
    wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"

    def login(ext: str) -> str:
        return pam_client.authenticate(pam_stack.service, ext, None, wrong, CLIENT, timeout=30).auth

    assert [login("501"), login("501"), login("501")] == ["PAM_AUTH_ERR", "PAM_MAXTRIES", "PAM_MAXTRIES"]
    assert [login("502"), login("503"), login("504")] == ["PAM_AUTH_ERR"] * 3
    spray = server.wait_for_subject("Wrong codes for 3 extensions")
    owner = server.wait_for_subject("Extension 501 locked", 1)
    admin = server.wait_for_subject("Extension 501 locked", 2)
    assert (owner["to"], admin["to"], spray["to"]) == (["501@example.com"], [ADMIN], [ADMIN])
    assert f"from 192.0.2.33 (PAM service {pam_stack.service})." in owner["message"].get_content()
    assert len(server.messages) == 3, [m["message"]["Subject"] for m in server.messages]
    assert pam_stack.daemon.status()["notifications"] == {"sent": 3, "dropped": 0}


def test_a_lock_never_waits_for_a_stuck_mail_server(pam_stack: PamStack) -> None:
    """The lock's mail goes to a server that accepts the connection and never greets (smtp.timeout 10 s):
    the login that locks answers at once all the same (the mail waits in linkusd's queue, not the login)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pam_stack.set_linkus_only()
        pam_stack.write_config(
            smtp={"host": "127.0.0.1", "port": silent.getsockname()[1], "security": "none",
                  "from": "pbx@example.com", "timeout": 10},
            lockout={"max_failures": 1, "duration": 900})
        pam_stack.write_extensions({"601": {"method": "totp", "secret": SECRET, "email": "601@example.com"}})
        wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"
        started = time.monotonic()
        result = pam_client.authenticate(pam_stack.service, "601", None, wrong, CLIENT, timeout=30)
        elapsed = time.monotonic() - started
        assert result.auth == "PAM_MAXTRIES" and elapsed < 3.0, (result.auth, elapsed)
