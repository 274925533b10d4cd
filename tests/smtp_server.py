"""A real SMTP server (aiosmtpd) on 127.0.0.1 for the email-code tests.

``smtp_server`` is a factory: ``smtp_server(security="starttls", auth=True)``
starts a server in a thread on a random free port (plain, STARTTLS required, or
implicit TLS; optional AUTH required) with a certificate from a throwaway CA
made for this test session, and stops it after the test. ``ca`` holds the
CA's certificate (to trust) and a second, self-signed certificate (not to).

Messages the server accepted are kept, parsed; ``wait_for_message`` blocks up to
a bound so tests never depend on tight timing.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from hostile_server import HostileServer

SMTP_USER = "pbx-mailer"


class ThrowawayCA:
    """A CA and a server certificate for 127.0.0.1/localhost, plus an untrusted self-signed one."""

    def __init__(self, directory: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
                 names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Any:
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            if ca:
                builder = builder.add_extension(
                    x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                  content_commitment=False, key_encipherment=False, data_encipherment=False,
                                  key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            else:
                builder = builder.add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]),
                    critical=False)
                builder = builder.add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            return builder.sign(issuer_key, hashes.SHA256())

        def write(path: Path, *items: Any) -> Path:
            data = b""
            for item in items:
                if hasattr(item, "private_bytes"):
                    data += item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
                else:
                    data += item.public_bytes(serialization.Encoding.PEM)
            path.write_bytes(data)
            path.chmod(0o600)
            return path

        ca_key, server_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        tag = secrets.token_hex(3)
        ca_cert = cert(f"linkus test CA {tag}", ca_key, f"linkus test CA {tag}", ca_key, True)
        server_cert = cert("localhost", server_key, f"linkus test CA {tag}", ca_key, False)
        rogue_cert = cert("localhost", rogue_key, "localhost", rogue_key, False)
        other_cert = cert("mail.example.net", server_key, f"linkus test CA {tag}", ca_key, False,
                          names=("mail.example.net",))
        self.ca_file = write(directory / "ca.pem", ca_cert)
        self.pems = {
            "good": write(directory / "server.pem", server_cert, server_key),
            "untrusted": write(directory / "rogue.pem", rogue_cert, rogue_key),
            "wrong-name": write(directory / "other.pem", other_cert, server_key),
        }

    def server_context(self, cert: str = "good") -> ssl.SSLContext:
        """``good``: CA-signed for localhost/127.0.0.1; ``untrusted``: self-signed;
        ``wrong-name``: CA-signed for another host name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.pems[cert]))
        return context


class _Handler:
    def __init__(self, server: SmtpServer):
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.server.refuse_rcpt:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.server.cond:
            self.server.messages.append(
                {"from": envelope.mail_from, "to": list(envelope.rcpt_tos), "message": message,
                 "tls": session.ssl is not None or self.server.security == "tls",
                 "auth": getattr(session, "auth_data", None)})
            self.server.cond.notify_all()
        return "250 Message accepted"


class _Controller(Controller):
    """aiosmtpd's Controller, bound to port 0: learn the port before it connects to itself."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """One aiosmtpd server in a thread; see the module docstring."""

    def __init__(self, ca: ThrowawayCA, *, security: str = "starttls", auth: bool = False,
                 cert: str = "good", refuse_rcpt: bool = False):
        self.security = security
        self.refuse_rcpt = refuse_rcpt
        self.password = secrets.token_urlsafe(12)
        self.messages: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.auth_attempts = 0
        kwargs: dict[str, Any] = {"hostname": "127.0.0.1", "port": 0, "ready_timeout": 10.0,
                                  "server_hostname": "localhost"}
        if security == "tls":
            kwargs["ssl_context"] = ca.server_context(cert)
        elif security == "starttls":
            kwargs["tls_context"] = ca.server_context(cert)
            kwargs["require_starttls"] = True
        if auth:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = security == "starttls"  # implicit TLS is TLS from the first byte
        self.controller = _Controller(_Handler(self), **kwargs)
        self.controller.start()
        self.port: int = self.controller.port

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        self.auth_attempts += 1
        ok = isinstance(data, LoginPassword) and data.login == SMTP_USER.encode() and \
            secrets.compare_digest(data.password, self.password.encode())
        # handled=False on failure: aiosmtpd then answers 535 itself
        return AuthResult(success=ok, handled=ok, auth_data=data.login if ok else None)

    def wait_for_message(self, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """The ``count``-th message (1-based), waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no message #{count} within {timeout} s (have {len(self.messages)})")
                self.cond.wait(left)
            return self.messages[count - 1]

    def with_subject(self, fragment: str) -> list[dict[str, Any]]:
        """The messages so far whose subject contains ``fragment`` (code mails and notifications
        of pam_linkus.notify travel separately, so their order is not fixed)."""
        with self.cond:
            return [m for m in self.messages if fragment in str(m["message"]["Subject"])]

    def wait_for_subject(self, fragment: str, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """The ``count``-th message (1-based) whose subject contains ``fragment``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(found := [m for m in self.messages if fragment in str(m["message"]["Subject"])]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no message #{count} with {fragment!r} in its subject within {timeout} s "
                                         f"(subjects: {[str(m['message']['Subject']) for m in self.messages]})")
                self.cond.wait(left)
            return found[count - 1]

    def stop(self) -> None:
        self.controller.stop()


def code_in(message: dict[str, Any]) -> str:
    """The 6-digit code in a message body (the default template puts it on its own line)."""
    body = message["message"].get_content()
    match = re.search(r"^\s*(\d{6})\s*$", body, re.M)
    assert match is not None, body
    return match.group(1)


def closed_port() -> int:
    """A loopback port nobody listens on (bound and released: connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Fixtures under their own names, so test modules can import them without
# shadowing (``from smtp_server import ca_fixture, smtp_server_fixture``).
@pytest.fixture(scope="session", name="ca")
def ca_fixture(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA(tmp_path_factory.mktemp("linkus-ca"))


@pytest.fixture(name="smtp_server")
def smtp_server_fixture(ca: ThrowawayCA) -> Iterator[Any]:
    started: list[SmtpServer] = []

    def start(**kwargs: Any) -> SmtpServer:
        server = SmtpServer(ca, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class EndlessGreeting(HostileServer):
    """A hostile 'SMTP server' on 127.0.0.1 whose ``220-`` greeting never ends: one
    continuation line every ``pause`` s (well inside any per-read timeout).
    Bounded: one connection, 100 lines, then it hangs up."""

    def __init__(self, pause: float = 0.2):
        self.pause = pause
        self.lines_sent = 0
        super().__init__(once=True)

    def handle(self, conn: Any) -> None:
        for _ in range(100):
            conn.sendall(b"220-still greeting\r\n")
            self.lines_sent += 1
            if self.stop.wait(self.pause):
                return
