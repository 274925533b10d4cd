"""Email codes: issue, mail and verify a one-time 6-digit code (the ``email`` method).

Why it looks like this:

* The code comes from ``secrets`` and only a keyed hash of it is stored
  (HMAC-SHA256 under a root-only key file made on first use, ``email.key_file``):
  someone who reads the state store -- a Redis shared by several hosts, a backup
  of state.db -- cannot try the million codes offline. The extension's name is
  part of the hashed message, so a code is bound to the extension it was sent to.
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

import os

from pam_linkus.errors import CodeRejected, ConfigError, MailUnavailable, StateUnavailable
from pam_linkus.state.base import EmailCheck, EmailLimits

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from pam_linkus.config import Config, EmailConfig
    from pam_linkus.flow import Context, LoginRequest
    from pam_linkus.state.base import StateStore

#: Email codes have 6 digits, as in Yeastar Linkus.
DIGITS = 6
#: Bytes of the HMAC key made on first use.
KEY_BYTES = 32
#: What the hashed message starts with (domain separation from any other HMAC use of the key).
_HASH_LABEL = b"pam_linkus email code\0"

#: Placeholders of the mail subject and body; ``code`` is allowed in the body only.
PLACEHOLDERS = ("code", "user", "host", "time", "rhost", "service", "minutes", "address")

DEFAULT_TEMPLATE = """\
Your verification code for {user} on {host} is:

    {code}

It was requested at {time} from {rhost} ({service}) and is valid for {minutes} minutes.
Nobody from your administration will ever ask you for this code.

If you did not just try to log in, someone knows your password:
change it and tell your administrator.
"""

# RFC 5322 atext: what a dot-atom local part may hold. No quotes, no comments,
# no spaces, no commas, no angle brackets: one plain address, nothing a mail
# header or an SMTP command could be split at.
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-.")
_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def check_address(address: str) -> str:
    """Return ``address`` if it is one plain ``local@domain`` address; else ValueError.

    ASCII only (an internationalised domain is written in its xn-- form); the
    message never echoes the address, which may come from a directory.
    """
    if not isinstance(address, str) or not 3 <= len(address) <= 254:
        raise ValueError("is not one plain address (length)")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local) > 64:
        raise ValueError("is not one plain address local@domain")
    if not set(local) <= _LOCAL_CHARS or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError("has characters that are not allowed in a plain address")
    labels = domain.split(".")
    if not set(domain) <= _DOMAIN_CHARS or any(
        not label or len(label) > 63 or label.startswith("-") or label.endswith("-") for label in labels
    ):
        raise ValueError("has a domain that is not a plain host name")
    return address


def mask_address(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``: enough to recognise, not to harvest."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def new_code() -> str:
    """A fresh uniformly random 6-digit code."""
    import secrets

    return f"{secrets.randbelow(10**DIGITS):0{DIGITS}d}"


def code_hash(key: bytes, user: str, code: str) -> str:
    """HMAC-SHA256 of (extension, code) under ``key``, as hex."""
    import hashlib
    import hmac

    message = _HASH_LABEL + user.encode("utf-8", "surrogateescape") + b"\0" + code.encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def load_key(path: str) -> bytes:
    """Read the HMAC key file, creating it (0600, root) on first use.

    Creation writes a temporary file and hard-links it into place, so parallel
    first logins all end up with the one key that won, never with a half-written
    file. With Redis state, copy this file to every host: a code sent by one host
    may be typed at another while the sender is throttled.
    """
    from nss_config.strictyaml import open_secure

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
    import secrets
    import stat

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


def fill(template: str, values: dict[str, str]) -> str:
    """Replace ``{name}`` placeholders; ``{{`` and ``}}`` are literal braces.

    Deliberately not ``str.format``: a template must not reach attributes
    (``{code.__class__}``) or format specs. An unknown name raises KeyError.
    """
    out: list[str] = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c in "{}" and template.startswith(c * 2, i):
            out.append(c)
            i += 2
        elif c == "{" and (end := template.find("}", i)) > i:
            name = template[i + 1 : end]
            if name not in values:
                raise KeyError(name[:30])
            out.append(values[name])
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _safe(value: str) -> str:
    """Values from the client (rhost, service) must not bring control characters into a mail."""
    return "".join(c if c.isprintable() else "?" for c in value)[:200]


def compose(config: Config, req: LoginRequest, address: str, code: str, now: float) -> tuple[str, str]:
    """Subject and body of the mail; the code goes into the body only."""
    import socket
    import time

    lifetime = config.email.code_lifetime
    values = {
        "user": _safe(req.user),
        "host": _safe(socket.gethostname()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
        "rhost": _safe(req.rhost) if req.rhost else "an unknown address",
        "service": _safe(req.service),
        "minutes": str(lifetime // 60) if lifetime % 60 == 0 else f"{lifetime / 60:.1f}",
        "address": address,
    }
    template = DEFAULT_TEMPLATE
    if config.email.template_file:
        template = _read_template(config.email.template_file)
    try:
        subject = fill(config.email.subject, values)  # no "code" in values: never in the subject
        body = fill(template, {**values, "code": code})
    except KeyError as exc:
        raise ConfigError(f"unknown placeholder {{{exc.args[0]}}} in the email subject or template") from None
    return subject, body


def _read_template(path: str) -> str:
    from nss_config.strictyaml import open_secure

    data, _ = open_secure(path, secret=False, max_bytes=64 * 1024)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("email template is not UTF-8", path) from None
    if "{code}" not in text:
        raise ConfigError("email template must contain {code}", path)
    return text


def deliver(req: LoginRequest, ctx: Context, address: str | None, store: StateStore, key: bytes) -> str:
    """Issue a code and mail it -- or, while throttled, keep the pending one.

    Returns the line telling the user where the code went. Raises
    MailUnavailable when throttled with no usable code, or when the mail could
    not be handed to the SMTP server (the new code is then deleted again).
    """
    try:
        to = check_address(address or "")
    except ValueError as exc:
        raise ConfigError(f"extension {req.user!r:.60}: email address {exc}") from None
    masked = mask_address(to)
    prompts = ctx.config.prompts
    code = new_code()
    digest = code_hash(key, req.user, code)
    now = ctx.clock()
    issue = store.issue_email_code(req.user, digest, now, limits(ctx.config.email))
    if not issue.issued:
        if issue.pending:
            return prompts.email_pending.replace("{address}", masked)
        ctx.prompter.info(prompts.email_throttled)
        raise MailUnavailable(f"email code throttled, next send in {max(1, int(issue.retry_after - now))} s")
    try:
        subject, body = compose(ctx.config, req, to, code, now)
        ctx.mailer().send(to, subject, body, now=now)
    except BaseException:
        store.discard_email_code(req.user, digest)
        raise
    return prompts.email_sent.replace("{address}", masked)


def verify(store: StateStore, key: bytes, user: str, answer: str | bytes, now: float) -> None:
    """Use one attempt of ``user``'s pending code; return on success, else CodeRejected.

    A malformed answer (not 6 ASCII digits) still uses an attempt.
    """
    from pam_linkus.codes import normalize_code

    code = normalize_code(answer, DIGITS)
    digest = code_hash(key, user, code) if code is not None else ""
    verdict = store.verify_email_code(user, digest, now)
    if verdict == EmailCheck.ACCEPTED:
        return
    if code is None and verdict in (EmailCheck.WRONG, EmailCheck.EXHAUSTED):
        verdict = "malformed code" + verdict[len(EmailCheck.WRONG) :]
    raise CodeRejected(verdict)
