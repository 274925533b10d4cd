"""Mails that tell people something happened to an account (``notify`` config section).

Why it looks like this:

* The owner of an extension learns of what a stranger with their password would
  do: a lock (someone typed wrong codes after the right password), 2FA switched
  off, a new method enrolled, new recovery codes. The optional admin address
  learns of locks and of *spraying*: wrong codes for ``spraying.extensions``
  distinct extensions within ``spraying.window`` seconds -- many passwords are
  known at once, one mail says so (``SprayWatch``).
* A login never waits for SMTP: ``Notifier.submit`` only puts the event on a
  bounded queue; one thread sends, each message under ``smtp.timeout`` overall
  (pam_linkus.mail). A full queue drops the event with a log line (counted).
* Throttled per extension and event kind (``notify.interval``) and in all
  (``notify.max_per_hour``): a loop of locks or enrolments cannot turn the PBX
  into a mail cannon, nor bury the owner's mailbox.
* The text follows the email code's rules (pam_linkus.mailtext, emailcode):
  fixed sentences of ours, the extension name, the host name, a time, and
  values from outside only through ``safe`` (printable, cut); recipient checked
  with ``check_address``. No code, secret or password is ever handed here.
* Everything takes ``now`` from the caller's clock, so tests inject time.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pam_linkus.errors import LinkusError
from pam_linkus.logline import LOG_INFO, LOG_NOTICE, LOG_WARNING, SyslogSink, format_fields
from pam_linkus.mailtext import check_address, mask_address

if TYPE_CHECKING:
    from pam_linkus.config import Config
    from pam_linkus.mail import Mailer

#: The events that mail the extension's own address.
OWNER_KINDS = ("locked", "disabled", "enrolled", "recovery-codes")
#: Events waiting to be sent; more are dropped with a log line.
QUEUE_CAPACITY = 200
#: Accounts the spraying watch remembers at once (bounded whatever names arrive).
SPRAY_MEMORY = 10000
#: How many extension names a spraying alert lists.
SPRAY_LIST = 20


def safe(value: str, limit: int = 200) -> str:
    """A value from outside as it may stand in a mail: printable, one line, cut."""
    return "".join(c if c.isprintable() else "?" for c in value)[:limit]


def client_text(address: str | None) -> str:
    """Where an action came from, for the mail: an IP address, or a neutral phrase (a host
    name or anything else a client may have sent is not repeated)."""
    if not address:
        return "an unknown address"
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return "an address that is not an IP address"


def same_address(one: str, other: str) -> bool:
    """Whether two addresses are one mailbox for our purpose (case aside: domains ignore it, and a
    mail server that told local parts apart by case would be rare): a change mails each once."""
    return one.strip().casefold() == other.strip().casefold()


#: Our own services, in our words.
SERVICE_WORDS = {"linkus-web": "the Security Settings page", "linkus-gate": "the web gate"}
#: Where the PAM services this host has are configured (the admin's names, not a client's).
PAM_DIR = "/etc/pam.d"
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def service_text(service: str | None, pam_dir: str = PAM_DIR) -> str | None:
    """The PAM service for a mail, in a bounded form that carries nothing a client chose.

    The service name is whatever the calling program passed to pam_start, so it is repeated
    only when it names a service configured on this host (a file in /etc/pam.d: the admin's
    word, e.g. "sshd"); our own services get our words; anything else is "a login".
    """
    if not service:
        return None
    if service in SERVICE_WORDS:
        return SERVICE_WORDS[service]
    if _SERVICE_NAME.fullmatch(service) and os.path.isfile(os.path.join(pam_dir, service)):
        return f"PAM service {service}"
    return "a login"


@dataclass(frozen=True)
class Event:
    """Something that happened to ``ext``; ``address`` None: the one on file is looked up when sent.

    ``by``: who did it, in words of ours ("you, on the Security Settings page", "the
    administrator (alice)", "a login"); ``client``: the address it came from, when known.
    ``previous``: this copy goes to the address on file before the change (an enrolment that
    moved the codes elsewhere): whoever did it may own only the new address, so the old one
    must hear of it too, as a disable tells the address it had.
    """

    kind: str
    ext: str
    when: float
    address: str | None = None
    by: str = "a login"
    client: str | None = None
    method: str | None = None
    service: str | None = None
    previous: bool = False


def compose(event: Event, host: str, *, admin: bool = False) -> tuple[str, str]:
    """Subject and body of an owner's mail, or (``admin``, for ``locked``) the admin's copy."""
    ext = safe(event.ext, 64)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(event.when))
    where = f" from {client_text(event.client)}" if event.client is not None else ""
    said = service_text(event.service)
    service = f" ({said})" if said else ""
    end = ("\nHave the password changed and check the account (docs/fail2ban.md says how).\n" if admin else
           "\nIf this was not you, change your password now and tell your administrator.\n")
    if event.kind == "locked":
        subject = f"Extension {ext} locked after wrong codes"
        body = (f"Extension {ext} on {host} was locked at {when} after too many wrong verification codes"
                f"{where}{service}.\n\n"
                "A code is asked only after the right password: whoever typed those codes knows the\n"
                "password of this extension. Logins are refused until the lock ends or an administrator\n"
                "unlocks it.\n" + end)
    elif event.kind == "disabled":
        subject = f"Two-factor authentication switched off for {ext}"
        body = (f"Two-factor authentication for extension {ext} on {host} was switched off at {when} "
                f"by {event.by}{where}.\n\n"
                "Logins now need the password only.\n" + end)
    elif event.kind == "enrolled":
        method = {"totp": "an authenticator app", "email": "codes sent by email"}.get(event.method or "",
                                                                                   "a new method")
        subject = f"New two-factor method for {ext}"
        body = (f"Two-factor authentication for extension {ext} on {host} was set up with {method} "
                f"at {when} by {event.by}{where}.\n\n"
                "Codes from an earlier app or address no longer work.\n"
                + ("This mail goes to the address on file before this change; the codes now go elsewhere.\n"
                   if event.previous else "") + end)
    elif event.kind == "recovery-codes":
        subject = f"New recovery codes for {ext}"
        body = (f"New recovery codes for extension {ext} on {host} were made at {when} by {event.by}{where}.\n\n"
                "The earlier recovery codes no longer work.\n" + end)
    else:
        raise ValueError(f"unknown notification kind {event.kind[:30]!r}")
    return subject, body


def compose_spraying(extensions: list[str], count: int, window: int, when: float, host: str) -> tuple[str, str]:
    """The admin's mail when wrong codes came for many extensions in a short time."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(when))
    names = "".join(f"    {safe(name, 64)}\n" for name in extensions[:SPRAY_LIST])
    more = f"    ... and {count - SPRAY_LIST} more\n" if count > SPRAY_LIST else ""
    subject = f"Wrong codes for {count} extensions on {host}"
    body = (f"At {stamp}, {count} different extensions on {host} had wrong verification codes within\n"
            f"{window} seconds:\n\n{names}{more}\n"
            "A code is asked only after the right password, so the passwords of these extensions\n"
            "are probably known to someone. Have them changed, check the accounts, and look at the\n"
            "log lines of pam_linkus (and fail2ban, if it runs) for the addresses.\n")
    return subject, body


class Throttle:
    """At most one mail per key per ``interval`` s and ``max_per_hour`` mails in all.

    Keys are ``kind:ext`` of real extensions and a few admin kinds; the table is
    pruned as it grows, so its size stays bounded by the extensions that had events
    within one interval.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._sent: collections.deque[float] = collections.deque()

    def allow(self, key: str | None, now: float, interval: float, max_per_hour: int) -> str | None:
        """None and the mail is counted, or why it is not sent (``key`` None: the cap in all only)."""
        last = self._last.get(key) if key is not None else None
        if last is not None and now - last < interval:
            return "throttled (extension)"
        while self._sent and now - self._sent[0] >= 3600:
            self._sent.popleft()
        if len(self._sent) >= max_per_hour:
            return "throttled (all)"
        self._sent.append(now)
        if key is not None:
            self._last[key] = now
        if len(self._last) > SPRAY_MEMORY:
            for old, stamp in list(self._last.items()):
                if now - stamp >= interval:
                    del self._last[old]
        return None


class SprayWatch:
    """Wrong codes for ``extensions`` distinct extensions within ``window`` s: one alert.

    The alert fires when the count of distinct extensions with a wrong code in the last
    ``window`` seconds reaches the limit, and not again until that count has fallen
    below the limit (the spray stopped for a window), so one long attack is one mail.
    """

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._fired = False

    def wrong_code(self, ext: str, now: float, extensions: int, window: float) -> list[str] | None:
        """Record one wrong code; the extensions of the spray when the alert fires now, else None."""
        seen = self._seen
        seen[ext] = now
        seen.move_to_end(ext)
        while seen and (now - next(iter(seen.values())) > window or len(seen) > SPRAY_MEMORY):
            seen.popitem(last=False)
        if len(seen) < extensions:
            self._fired = False
            return None
        if self._fired:
            return None
        self._fired = True
        return list(seen)


@dataclass(frozen=True)
class _Spray:
    extensions: list[str]
    count: int
    window: int
    when: float


class Notifier:
    """linkusd's notifications: ``submit`` from anywhere (never blocks), one thread sends.

    ``current`` gives the config to act on (None: no config loaded, nothing is sent);
    ``mailer`` makes a Mailer for a config; ``lookup`` gives an extension's address on
    file (or None). All three are called in the sending thread only.
    """

    def __init__(self, sink: SyslogSink, *, current: Callable[[], Config | None],
                 mailer: Callable[[Config], Mailer], lookup: Callable[[str], str | None],
                 clock: Callable[[], float] = time.time, capacity: int = QUEUE_CAPACITY) -> None:
        self.sink = sink
        self.current = current
        self.mailer = mailer
        self.lookup = lookup
        self.clock = clock
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue[Event | _Spray] = queue.Queue(capacity)
        self._spray = SprayWatch()
        self._spray_lock = threading.Lock()
        self._throttle = Throttle()
        self._thread = threading.Thread(target=self._run, name="linkusd-notify", daemon=True)
        self._thread.start()

    def enabled(self) -> bool:
        config = self.current()
        return config is not None and config.notify.enabled

    def submit(self, event: Event) -> bool:
        """Queue ``event``; False when notifications are off or the queue is full (logged)."""
        if not self.enabled() or event.kind not in OWNER_KINDS:
            return False
        return self._put(event, event.kind, event.ext)

    def wrong_code(self, ext: str, now: float) -> None:
        """A counted wrong code for ``ext`` (a real extension's canonical name): watch for spraying."""
        config = self.current()
        if config is None or not config.notify.enabled or not config.notify.admin:
            return
        spray = config.notify.spraying
        with self._spray_lock:
            found = self._spray.wrong_code(ext, now, spray.extensions, spray.window)
        if found is not None:
            self._put(_Spray(found, len(found), spray.window, now), "spraying", "-")

    def _put(self, item: Event | _Spray, kind: str, ext: str) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._log(LOG_WARNING, kind, ext, result="dropped", reason="notification queue full")
            return False
        return True

    def _log(self, severity: int, kind: str, ext: str, **fields: object) -> None:
        self.sink.send(severity, format_fields({"action": "notify", "kind": kind, "ext": ext, **fields}))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every event queued so far was handled; for tests and a clean stop."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._handle(item)
            except Exception as exc:  # noqa: BLE001 - one bad event must not end the thread
                self._log(LOG_WARNING, "error", "-", result="failed", reason=type(exc).__name__)
            finally:
                self._queue.task_done()

    def _handle(self, item: Event | _Spray) -> None:
        config = self.current()
        if config is None or not config.notify.enabled:
            return
        cfg = config.notify
        host = safe(socket.gethostname(), 100)
        now = self.clock()
        if isinstance(item, _Spray):
            assert cfg.admin is not None
            subject, body = compose_spraying(item.extensions, item.count, item.window, item.when, host)
            # no per-kind interval: SprayWatch already makes one long spray one mail
            self._send(config, "spraying", "-", cfg.admin, subject, body, now, None, admin=True)
            return
        subject, body = compose(item, host)
        address = item.address
        if address is None:
            try:
                address = self.lookup(item.ext)
            except LinkusError as exc:
                self._log(LOG_WARNING, item.kind, item.ext, result="failed", reason=exc.reason)
                address = None
        if address:
            key = f"{item.kind}:{item.ext}" + (":previous" if item.previous else "")
            self._send(config, item.kind, item.ext, address, subject, body, now, key)
        if item.kind == "locked" and cfg.admin:
            subject, body = compose(item, host, admin=True)
            self._send(config, item.kind, item.ext, cfg.admin, subject, body, now, f"admin:locked:{item.ext}",
                       admin=True)

    def _send(self, config: Config, kind: str, ext: str, to: str, subject: str, body: str, now: float,
              key: str | None, *, admin: bool = False) -> None:
        cfg = config.notify
        who = "admin" if admin else "owner"
        try:
            check_address(to)
        except ValueError:
            self._log(LOG_WARNING, kind, ext, to=who, result="failed", reason="address is not one plain address")
            return
        refused = self._throttle.allow(key, now, cfg.interval, cfg.max_per_hour)
        if refused is not None:
            self._log(LOG_INFO, kind, ext, to=who, result=refused)
            return
        try:
            self.mailer(config).send(to, subject, body, now=now)
        except LinkusError as exc:
            self._log(LOG_WARNING, kind, ext, to=who, result="failed", reason=exc.reason)
            return
        self.sent += 1
        self._log(LOG_NOTICE, kind, ext, to=who, address=mask_address(to), result="sent")


def send_now(config: Config, mailer: Mailer, event: Event, address: str) -> None:
    """One owner's mail right away, for ``linkus-2fa`` (a person waits for the command anyway,
    and it runs once per change: no queue, no throttle). Raises MailUnavailable or ConfigError."""
    subject, body = compose(event, safe(socket.gethostname(), 100))
    mailer.send(address, subject, body, now=event.when)
