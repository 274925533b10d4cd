"""pam_linkus.mail.SmtpMailer against a real aiosmtpd server on 127.0.0.1:
STARTTLS and implicit TLS with a throwaway CA, AUTH, and every way of failing."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from smtp_server import SMTP_USER, EndlessGreeting, SmtpServer, closed_port

from pam_linkus.config import Config
from pam_linkus.errors import ConfigError, MailUnavailable
from pam_linkus.mail import SmtpMailer

# aiosmtpd warns about AUTH without STARTTLS; with implicit TLS the whole session is TLS.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

TO = "alice@example.com"
NOW = 1_800_000_000.0


def mailer(server_port: int, *, security: str, ca_file: Path | None = None, password_file: Path | None = None,
           timeout: float = 5.0, **extra: Any) -> SmtpMailer:
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": server_port, "security": security,
                            "from": "pbx@example.com", "timeout": timeout, "helo": "pbx.example.com", **extra}
    if ca_file:
        smtp["ca_file"] = str(ca_file)
    if password_file:
        smtp.update(username=SMTP_USER, password_file=str(password_file))
    return SmtpMailer(Config.from_mapping({"smtp": smtp}).smtp)


def password_file(directory: Path, server: SmtpServer, password: str | None = None) -> Path:
    path = directory / "smtp.pw"
    path.write_text((password or server.password) + "\n")
    os.chmod(path, 0o600)
    return path


def test_starttls_with_auth_delivers_a_clear_message(smtp_server: Any, ca: Any, private_dir: Path) -> None:
    server = smtp_server(security="starttls", auth=True)
    m = mailer(server.port, security="starttls", ca_file=ca.ca_file,
               password_file=password_file(private_dir, server))
    m.send(TO, "Login verification code for 1002 on pbx", "Your code:\n\n    123456\n", now=NOW)
    got = server.wait_for_message()
    msg = got["message"]
    assert got["tls"] is True and got["auth"] == SMTP_USER.encode()
    assert got["from"] == "pbx@example.com" and got["to"] == [TO]
    assert msg["To"] == TO and msg["From"] == "pbx@example.com" and msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "Login verification code for 1002 on pbx" and "123456" not in msg["Subject"]
    assert msg["Message-ID"].endswith("@example.com>") and msg["Date"]
    assert msg.get_content().replace("\r\n", "\n") == "Your code:\n\n    123456\n"


def test_implicit_tls_with_auth(smtp_server: Any, ca: Any, private_dir: Path) -> None:
    server = smtp_server(security="tls", auth=True)
    mailer(server.port, security="tls", ca_file=ca.ca_file,
           password_file=password_file(private_dir, server)).send(TO, "s", "123456\n", now=NOW)
    assert server.wait_for_message()["auth"] == SMTP_USER.encode()


def test_plaintext_to_a_loopback_relay(smtp_server: Any) -> None:
    server = smtp_server(security="none")
    mailer(server.port, security="none").send(TO, "s", "123456\n", now=NOW)
    assert server.wait_for_message()["tls"] is False


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_untrusted_certificate_sends_nothing(smtp_server: Any, ca: Any, security: str) -> None:
    server = smtp_server(security=security, cert="untrusted")
    with pytest.raises(MailUnavailable, match="TLS certificate not trusted"):
        mailer(server.port, security=security, ca_file=ca.ca_file).send(TO, "s", "123456\n", now=NOW)
    time.sleep(0.2)
    assert server.messages == []


def test_certificates_are_checked_against_the_system_store_by_default(smtp_server: Any) -> None:
    server = smtp_server(security="starttls")
    with pytest.raises(MailUnavailable, match="TLS certificate not trusted"):
        mailer(server.port, security="starttls").send(TO, "s", "123456\n", now=NOW)
    assert server.messages == []


def test_host_name_is_checked(smtp_server: Any, ca: Any) -> None:
    server = smtp_server(security="tls", cert="wrong-name")  # signed by the trusted CA, for another host
    with pytest.raises(MailUnavailable, match=r"TLS certificate not trusted \(IP address mismatch"):
        mailer(server.port, security="tls", ca_file=ca.ca_file).send(TO, "s", "123456\n", now=NOW)
    assert server.messages == []


def test_no_starttls_offered_is_no_plaintext_fallback(smtp_server: Any, ca: Any) -> None:
    server = smtp_server(security="none")
    with pytest.raises(MailUnavailable, match="does not offer STARTTLS; refusing to send in plaintext"):
        mailer(server.port, security="starttls", ca_file=ca.ca_file).send(TO, "s", "123456\n", now=NOW)
    assert server.messages == []


def test_wrong_smtp_password(smtp_server: Any, ca: Any, private_dir: Path) -> None:
    server = smtp_server(security="starttls", auth=True)
    m = mailer(server.port, security="starttls", ca_file=ca.ca_file,
               password_file=password_file(private_dir, server, "not-the-password"))
    with pytest.raises(MailUnavailable, match=r"authentication refused \(535\)") as raised:
        m.send(TO, "s", "123456\n", now=NOW)
    assert server.auth_attempts >= 1 and server.messages == []
    # translated once: smtplib's exception is not chained to what the caller logs
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_password_file_must_be_root_only(smtp_server: Any, ca: Any, private_dir: Path) -> None:
    server = smtp_server(security="starttls", auth=True)
    pw = password_file(private_dir, server)
    os.chmod(pw, 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        mailer(server.port, security="starttls", ca_file=ca.ca_file, password_file=pw).send(TO, "s", "1", now=NOW)
    assert server.auth_attempts == 0


def test_refused_recipient(smtp_server: Any, ca: Any) -> None:
    server = smtp_server(security="starttls", refuse_rcpt=True)
    with pytest.raises(MailUnavailable, match="recipient refused"):
        mailer(server.port, security="starttls", ca_file=ca.ca_file).send(TO, "s", "123456\n", now=NOW)


def test_server_down() -> None:
    with pytest.raises(MailUnavailable, match=r"SMTP server 127\.0\.0\.1:\d+: Connection refused"):
        mailer(closed_port(), security="tls").send(TO, "s", "123456\n", now=NOW)


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        with pytest.raises(MailUnavailable, match="timed out after 1 s"):
            mailer(listener.getsockname()[1], security="starttls", timeout=1.0).send(TO, "s", "1", now=NOW)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("to", ["alice@example.com\r\nBcc: eve@evil.test", "alice@example.com, eve@evil.test",
                                "Alice <alice@example.com>"])
def test_header_injection_address_sends_nothing(smtp_server: Any, to: str) -> None:
    server = smtp_server(security="none")
    with pytest.raises(ConfigError, match="recipient address"):
        mailer(server.port, security="none").send(to, "s", "123456\n", now=NOW)
    assert server.messages == []


def test_a_greeting_that_never_ends_fails_within_the_overall_deadline() -> None:
    """Issue 12 item 10: ``220-`` continuation lines, each well within the per-read
    timeout, must not hold the message past its deadline."""
    server = EndlessGreeting()
    try:
        m = mailer(server.port, security="none", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(MailUnavailable) as caught:
            m.send(TO, "subject", "body", now=NOW)
        assert time.monotonic() - started < 2.0
        assert "timed out after 1 s" in caught.value.reason
        assert server.lines_sent >= 3  # the greeting really was still going
    finally:
        server.close()
