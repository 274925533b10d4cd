"""Email codes: issue, mail and verify a one-time 6-digit code (the ``email`` method).

Why it looks like this:

* The code comes from ``secrets`` and only a keyed hash of it is stored
  (HMAC-SHA256 under a root-only key file made on first use, ``email.key_file``):
  someone who reads the state store -- a Redis shared by several hosts, a backup
  of state.db -- cannot try the million codes offline. The extension's name and
  the address the mail went to are part of the hashed message, so a code is bound
  to the extension and to the address it was sent to: a code read at one address
  never confirms another one as the extension's (issue 17/1).
* Issue and verify are each ONE atomic store operation (see StateStore):
  throttles, replacement of the old code, attempt counting and single use cannot
  race between parallel logins.
* A code is stored before its mail is sent (the throttle must be taken first),
  and deleted again if the mail could not be sent: no usable code is left behind
  that nobody received.
* Everything takes ``now`` from the caller's clock, so tests inject time.

Email is a weaker factor than TOTP (a mailbox is often reachable with the same
password; NIST SP 800-63B does not accept email as an out-of-band channel).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nss_config.yaml_reader import open_secure
from pam_linkus.codes import normalize_code
from pam_linkus.errors import CodeRejected, CodeThrottled, ConfigError, StateUnavailable
from pam_linkus.mailtext import DEFAULT_TEMPLATE, check_address, fill, mask_address
from pam_linkus.state.base import EmailCheck, EmailLimits

if TYPE_CHECKING:
    from pam_linkus.config import EmailConfig, PromptsConfig
    from pam_linkus.mail import Mailer
    from pam_linkus.state.base import StateStore

#: Email codes have 6 digits, as in Yeastar Linkus.
DIGITS = 6
#: Bytes of the HMAC key made on first use.
KEY_BYTES = 32
#: What the hashed message starts with (domain separation from any other HMAC use of the key).
_HASH_LABEL = b"pam_linkus email code\0"
#: The same for the address tag in front of a code's hash.
_TAG_LABEL = b"pam_linkus email address\0"

def new_code() -> str:
    """A fresh uniformly random 6-digit code."""
    return f"{secrets.randbelow(10**DIGITS):0{DIGITS}d}"


def code_hash(key: bytes, user: str, code: str, address: str) -> str:
    """``TAG.HMAC``: HMAC-SHA256 of (extension, address, code) under ``key``, as hex (``address`` as
    check_address gives it), behind a tag of the address alone.

    The tag lets the store say whether the code still pending was mailed to the address asked for now
    (``EmailIssue.pending`` compares the part up to the dot): "the code sent a moment ago is still
    valid" must never be said of a code that went to another address (a self-service enrollment to a
    new address, made in this session or another). The tag is of (extension, address) only: a code
    another session mailed to the same address counts, and works there. It tells nothing of the code:
    64 bits of an HMAC of the address.
    """
    name = user.encode("utf-8", "surrogateescape") + b"\0" + address.encode("ascii")
    tag = hmac.new(key, _TAG_LABEL + name, hashlib.sha256).hexdigest()[:16]
    return tag + "." + hmac.new(key, _HASH_LABEL + name + b"\0" + code.encode("ascii"), hashlib.sha256).hexdigest()


def load_key(path: str) -> bytes:
    """Read the HMAC key file, creating it (0600, root) on first use.

    Creation writes a temporary file and hard-links it into place, so parallel
    first logins all end up with the one key that won, never with a half-written
    file. With Redis state, copy this file to every host: a code sent by one host
    may be typed at another while the sender is throttled.
    """
    if not os.path.lexists(path):
        _create_key(path)
    data, _ = open_secure(path, secret=True, max_bytes=1024)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError("email key file must hold one line of hex", path) from None
    if len(key) < 16:
        raise ConfigError("email key file holds fewer than 128 bits", path)
    return key


def _create_key(path: str) -> None:
    directory = os.path.dirname(path) or "."
    try:
        dir_st = os.stat(directory)
        if dir_st.st_uid != os.geteuid() or dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateUnavailable(f"email key directory {directory} must be root's and not writable by others")
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, secrets.token_hex(KEY_BYTES).encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # a parallel first login made it: use that one
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise StateUnavailable(f"email key file {path}: {exc.strerror}") from None


def limits(config: EmailConfig) -> EmailLimits:
    """The store's view of the ``email`` config section."""
    return EmailLimits(
        lifetime=config.code_lifetime,
        max_attempts=config.max_attempts,
        send_interval=config.send_interval,
        max_per_hour=config.max_per_hour,
        global_max_per_minute=config.global_max_per_minute,
    )


def _safe(value: str) -> str:
    """Values from the client (rhost, service) must not bring control characters into a mail."""
    return "".join(c if c.isprintable() else "?" for c in value)[:200]


def compose(email: EmailConfig, user: str, service: str, rhost: str | None, address: str, code: str,
            now: float) -> tuple[str, str]:
    """Subject and body of the mail; the code goes into the body only."""
    lifetime = email.code_lifetime
    values = {
        "user": _safe(user),
        "host": _safe(socket.gethostname()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
        "rhost": _safe(rhost) if rhost else "an unknown address",
        "service": _safe(service),
        "minutes": str(lifetime // 60) if lifetime % 60 == 0 else f"{lifetime / 60:.1f}",
        "address": address,
    }
    template = DEFAULT_TEMPLATE
    if email.template_file:
        template = _read_template(email.template_file)
    try:
        subject = fill(email.subject, values)  # no "code" in values: never in the subject
        body = fill(template, {**values, "code": code})
    except KeyError as exc:
        raise ConfigError(f"unknown placeholder {{{exc.args[0]}}} in the email subject or template") from None
    return subject, body


def _read_template(path: str) -> str:
    data, _ = open_secure(path, secret=False, max_bytes=64 * 1024)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("email template is not UTF-8", path) from None
    if "{code}" not in text:
        raise ConfigError("email template must contain {code}", path)
    return text


@dataclass(frozen=True)
class Delivery:
    """What ``deliver`` did, for its caller to tell the person (``notice``) and to act on.

    ``SENT``: a new code went to ``masked``. ``PENDING``: the extension is throttled, but
    the code sent a moment ago is still valid; nothing was sent (that code works only if it
    went to this same address: codes are bound to their address). ``THROTTLED``: throttled
    and no usable code: the caller refuses with ``refusal()``. ``retry_after``: seconds
    until the next send (PENDING and THROTTLED).
    """

    SENT = "sent"
    PENDING = "pending"
    THROTTLED = "throttled"

    state: str
    masked: str
    retry_after: int = 0

    def notice(self, prompts: PromptsConfig) -> str:
        """The line for the person, from the ``prompts`` section (the address masked)."""
        if self.state == Delivery.THROTTLED:
            return prompts.email_throttled.replace("{seconds}", str(self.retry_after))
        text = prompts.email_sent if self.state == Delivery.SENT else prompts.email_pending
        return text.replace("{address}", self.masked)

    def refusal(self) -> CodeThrottled:
        """What a THROTTLED delivery ends in: no code can be checked, so a denial telling when to
        try again (not "unavailable": nothing is down, the person sent a code a moment ago)."""
        return CodeThrottled(f"email code throttled, next send in {self.retry_after} s", self.retry_after)


def deliver(store: StateStore, key: bytes, mailer: Mailer, email: EmailConfig, *, user: str,
            address: str | None, service: str, rhost: str | None, now: float) -> Delivery:
    """Issue a code for ``user`` and mail it to ``address`` -- or, while throttled, keep the pending one.

    ``service`` and ``rhost`` only go into the mail's text. Raises ConfigError for an
    address that is not one plain address, MailUnavailable (or ConfigError) when the
    mail could not be handed to the SMTP server (the new code is then deleted again).
    """
    try:
        to = check_address(address or "")
    except ValueError as exc:
        raise ConfigError(f"extension {user!r:.60}: email address {exc}") from None
    masked = mask_address(to)
    code = new_code()
    digest = code_hash(key, user, code, to)
    issue = store.issue_email_code(user, digest, now, limits(email))
    if not issue.issued:
        wait = max(1, int(issue.retry_after - now))
        return Delivery(Delivery.PENDING if issue.pending else Delivery.THROTTLED, masked, wait)
    try:
        subject, body = compose(email, user, service, rhost, to, code, now)
        mailer.send(to, subject, body, now=now)
    except BaseException:
        store.discard_email_code(user, digest)
        raise
    return Delivery(Delivery.SENT, masked)


def verify(store: StateStore, key: bytes, user: str, answer: str | bytes, now: float, *, address: str | None) -> None:
    """Use one attempt of ``user``'s pending code; return on success, else CodeRejected.

    ``address`` is where the code must have been sent (the extension's address at a
    login, the address being confirmed at an enrollment): a code mailed elsewhere is a
    wrong code. A malformed answer (not 6 ASCII digits) still uses an attempt.
    """
    try:
        to = check_address(address or "")
    except ValueError as exc:
        raise ConfigError(f"extension {user!r:.60}: email address {exc}") from None
    code = normalize_code(answer, DIGITS)
    digest = code_hash(key, user, code, to) if code is not None else ""
    verdict = store.verify_email_code(user, digest, now)
    if verdict == EmailCheck.ACCEPTED:
        return
    if code is None and verdict in (EmailCheck.WRONG, EmailCheck.EXHAUSTED):
        verdict = "malformed code" + verdict[len(EmailCheck.WRONG) :]
    raise CodeRejected(verdict)
