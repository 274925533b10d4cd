"""The SMTP sender that carries email codes (``smtp`` config section).

One message costs at most ``smtp.timeout`` seconds in all (connect, greeting,
TLS, AUTH, data): smtplib's timeout is per read, so a server that drips a
``220-`` greeting one line a second would never trip it; a watchdog shuts the
socket down when the message's deadline passes. Every failure -- connection refused, timeout, TLS
handshake or certificate, refused AUTH, refused sender or recipient -- becomes
MailUnavailable here, the boundary of this component, with a message that names
the server and the kind of failure (never the code or the password).

TLS is verified against the system trust store or ``smtp.ca_file``, with the
host name checked. STARTTLS that the server does not offer is an error, never
a silent fallback to plaintext; plaintext (``security: none``) is accepted only
towards a local relay on the loopback interface, and never with AUTH.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Protocol

from nss_config.yaml_reader import read_secret_file
from pam_linkus.errors import ConfigError, MailUnavailable
from pam_linkus.mailtext import check_address

if TYPE_CHECKING:
    from pam_linkus.config import SmtpConfig


class Mailer(Protocol):
    """Hands one message to a mail server (SmtpMailer below; tests give a fake)."""

    def send(self, to: str, subject: str, body: str, *, now: float) -> None:
        """Send or raise MailUnavailable (or ConfigError); never leaves a half-sent state."""
        ...


class _Watchdog:
    """Shuts a connection's socket down when the message's deadline passes, waking
    whichever read or write is blocked (smtplib then raises SMTPServerDisconnected
    or OSError)."""

    def __init__(self, conn: smtplib.SMTP, seconds: float):
        self.conn = conn
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SmtpMailer:
    """Sends one message per call over a fresh connection (one login, one mail)."""

    def __init__(self, config: SmtpConfig):
        self.config = config

    def send(self, to: str, subject: str, body: str, *, now: float) -> None:
        """Hand one plain-text message for ``to`` to the SMTP server within
        ``smtp.timeout`` seconds overall, or raise MailUnavailable."""
        cfg = self.config
        try:
            check_address(cfg.sender)
        except ValueError as exc:
            raise ConfigError(f"smtp.from {exc}") from None
        try:
            check_address(to)
        except ValueError as exc:
            raise ConfigError(f"recipient address {exc}") from None
        message = _message(cfg.sender, to, subject, body, now)
        password = None
        if cfg.username:
            assert cfg.password_file is not None  # SmtpConfig requires it with username
            password = read_secret_file(cfg.password_file, "SMTP password")
        context = _tls_context(cfg) if cfg.security != "none" else None
        conn = self._new(context)
        watchdog = _Watchdog(conn, cfg.timeout)
        try:
            with watchdog:
                try:
                    conn.connect(cfg.host, cfg.port)
                    self._converse(conn, context, password, message, to)
                except BaseException:
                    conn.close()
                    raise
            try:
                conn.quit()  # after the deadline's watchdog: QUIT has its own per-read timeout
            except (smtplib.SMTPException, OSError):
                conn.close()  # the message was accepted; a lost QUIT changes nothing
            return
        except OSError as exc:  # smtplib's and ssl's errors, timeouts and refusals are all OSErrors
            reason = f"timed out after {cfg.timeout:g} s" if watchdog.fired else _describe(exc, cfg.timeout)
        # Raised outside the except block, so nothing is chained to it: what is logged
        # is this one line, never smtplib's exception or its traceback.
        raise MailUnavailable(f"SMTP server {cfg.host}:{cfg.port}: {reason}")

    def _new(self, context: ssl.SSLContext | None) -> smtplib.SMTP:
        """An unconnected client (no host given: nothing happens until ``connect``,
        which runs under the watchdog)."""
        cfg = self.config
        # An explicit HELO name: smtplib's default asks the resolver for our FQDN,
        # a DNS round trip that can hang a login.
        helo = cfg.helo or socket.gethostname()
        conn = (smtplib.SMTP_SSL(local_hostname=helo, timeout=cfg.timeout, context=context)
                if cfg.security == "tls" else smtplib.SMTP(local_hostname=helo, timeout=cfg.timeout))
        # The name TLS checks the certificate against (implicit TLS and STARTTLS);
        # smtplib sets it only when the constructor connects.
        conn._host = cfg.host  # type: ignore[attr-defined]
        return conn

    def _converse(
        self, conn: smtplib.SMTP, context: ssl.SSLContext | None, password: str | None, message: bytes, to: str
    ) -> None:
        cfg = self.config
        conn.ehlo()
        if cfg.security == "starttls":
            if not conn.has_extn("starttls"):
                raise MailUnavailable(
                    f"SMTP server {cfg.host}:{cfg.port} does not offer STARTTLS; refusing to send in plaintext"
                )
            conn.starttls(context=context)
            conn.ehlo()
        if cfg.username and password is not None:
            conn.login(cfg.username, password)
        conn.sendmail(cfg.sender, [to], message)


def _describe(exc: OSError, timeout: float) -> str:
    """What went wrong, for the log: the kind of failure, never a code or password."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure ({exc.reason or type(exc).__name__})"
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"authentication refused ({exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "recipient refused"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib turns a read timeout into "Connection unexpectedly closed: timed out"
        return f"timed out after {timeout:g} s" if "timed out" in str(exc) else "connection closed"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"refused ({exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPException):
        return type(exc).__name__
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    return exc.strerror or type(exc).__name__


def _tls_context(cfg: SmtpConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=cfg.ca_file)
    except FileNotFoundError:
        raise ConfigError("smtp.ca_file does not exist", cfg.ca_file) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _message(sender: str, to: str, subject: str, body: str, now: float) -> bytes:
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(now, localtime=True)
    # The sender's domain, not make_msgid's default getfqdn() (a DNS lookup).
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body)
    return message.as_bytes()
