"""What linkusd counts about itself: one ``Stats`` per daemon, read by ``status()`` and by /metrics.

Always on and cheap (a few dictionary increments per login, no import of the Prometheus
client): ``linkus-2fa status`` shows a summary of it over the PAM socket whether or not the
metrics listener is configured, and ``exposition`` turns it into Prometheus text only when
someone scrapes. Nothing here is global: the Engine owns the one instance.

Labels stay bounded whatever a caller sends: the outcome and method sets are ours, a
service name is kept as its own label only if it looks like a PAM service name and fewer
than ``SERVICE_CAP`` others came first (a local program picks its own service name);
everything else is ``other``. A user name or an rhost is never a label.

Written from the event loop, except ``email_code`` and ``error`` (also called from the
worker threads): those take the lock, and readers copy under it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping

from nss_config.base import METHODS
from pam_linkus.outcome import Outcome

#: Outcomes a login ends in (DESIGN.md); the label never takes another value.
OUTCOMES = (Outcome.SUCCESS, Outcome.SKIP, Outcome.DENIED, Outcome.LOCKED, Outcome.UNAVAILABLE,
            Outcome.CONVERSATION)
#: Method labels: the extension's method, ``-`` when none was known when the login ended.
METHOD_LABELS = frozenset((*METHODS, "-"))
#: Distinct service names kept as labels; later ones are counted as ``other``.
SERVICE_CAP = 32
#: Services that always keep their own label, outside the cap: a local program that logs in under
#: 32 made-up service names first must not fold sshd's or the web gate's logins into ``other``.
KNOWN_SERVICES = frozenset({"sshd", "login", "su", "su-l", "sudo", "sudo-i", "linkus-gate", "linkus-2fa",
                            "linkus-web", "cron", "systemd-user", "other", "-"})
#: Login duration buckets, seconds: a login includes the person typing the code, so the
#: histogram reaches minutes; the low buckets show linkusd's own work (a skip, a refusal).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
#: Error kinds (``linkus_errors_total{kind}``): the component that could not be asked.
ERROR_KINDS = ("ldap", "yaml", "redis", "sqlite", "smtp", "config", "daemon")
#: Minutes kept for "the last hour" of ``linkus-2fa status``.
RECENT_MINUTES = 60
#: Extensions remembered as locked (for ``linkus-2fa status``), newest kept.
LOCKED_CAP = 1000
#: At most this much JSON of those names in the STATUS reply (newest first): the reply is one frame
#: of at most 64 KB, and doctor, reload and status all need it to fit.
LOCKED_REPLY_BYTES = 16384


def _service_ok(name: str) -> bool:
    """A PAM service name as /etc/pam.d files are named: short, ASCII letters, digits, ``-_.+@``."""
    return 0 < len(name) <= 32 and name.isascii() and all(c.isalnum() or c in "-_.+@" for c in name)


class Stats:
    """Counters, gauges and a histogram of one linkusd, and the last hour by minute."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.logins: Counter[tuple[str, str, str]] = Counter()  # (outcome, method, service)
        self.duration_buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.duration_count = 0
        self._services: set[str] = set()
        self.recent: deque[tuple[int, Counter[str]]] = deque(maxlen=RECENT_MINUTES)
        self.refused: Counter[tuple[str, str]] = Counter()  # (socket, reason)
        self.web_throttled = 0
        self.reloads: Counter[str] = Counter()  # result: ok, failed
        self.last_reload: float | None = None
        self.last_reload_seconds: float | None = None
        self.last_reload_ok: bool | None = None
        self.errors: Counter[str] = Counter()
        self.recent_errors: deque[tuple[int, Counter[str]]] = deque(maxlen=RECENT_MINUTES)
        self.email_codes: Counter[str] = Counter()  # sent, throttled
        #: enrolled extensions by method, from the snapshot loaded last (None: a source without counts)
        self.enrolled: dict[str, int] | None = None
        self.locked: OrderedDict[str, float] = OrderedDict()  # account -> when its login ended locked
        self._lock = threading.Lock()

    # -- what linkusd reports ------------------------------------------------------------------

    def service_label(self, service: str) -> str:
        if service in self._services or service in KNOWN_SERVICES:
            return service
        if len(self._services) >= SERVICE_CAP or not _service_ok(service):
            return "other"
        self._services.add(service)
        return service

    def login(self, fields: Mapping[str, object]) -> None:
        """One login ended; ``fields`` is its log line's field map (outcome, method, service, ms, account).

        Called where that one line is written (``Engine.count_login``, hooked to the sink), so each
        login counts once; the Security Settings sign-in, which writes no such line, calls it too.
        """
        outcome = str(fields.get("outcome"))
        if outcome not in OUTCOMES:
            outcome = Outcome.UNAVAILABLE  # never a new label; an unknown outcome is a bug, and no success
        method = str(fields.get("method", "-"))
        method = method if method in METHOD_LABELS else "other"
        self.logins[(outcome, method, self.service_label(str(fields.get("service", "-"))))] += 1
        ms = fields.get("ms")
        if isinstance(ms, int) and not isinstance(ms, bool):
            seconds = ms / 1000
            index = 0
            while index < len(BUCKETS) and seconds > BUCKETS[index]:
                index += 1
            self.duration_buckets[index] += 1
            self.duration_sum += seconds
            self.duration_count += 1
        self._minute(self.recent)[outcome] += 1
        account = fields.get("account")
        if outcome == Outcome.LOCKED and isinstance(account, str) and account != "-":
            self.locked.pop(account, None)
            self.locked[account] = self.clock()
            while len(self.locked) > LOCKED_CAP:
                self.locked.popitem(last=False)

    def _minute(self, window: deque[tuple[int, Counter[str]]]) -> Counter[str]:
        minute = int(self.clock() // 60)
        if not window or window[-1][0] != minute:
            window.append((minute, Counter()))
        return window[-1][1]

    def error(self, kind: str) -> None:
        """A login or web call ended unavailable because ``kind`` (``ERROR_KINDS``) could not be asked."""
        kind = kind if kind in ERROR_KINDS else "daemon"
        with self._lock:
            self.errors[kind] += 1
            self._minute(self.recent_errors)[kind] += 1

    def email_code(self, result: str) -> None:
        """An email code was ``sent`` or refused as ``throttled``."""
        with self._lock:
            self.email_codes[result] += 1

    def refusal(self, socket: str, reason: str) -> None:
        """A connection on ``socket`` (pam, web, metrics) turned away: ``peer``, ``cap``, ``uid-cap`` (metrics),
        or ``account-cap`` (pam: a login over daemon.max_per_account, refused once its START names the account)."""
        self.refused[(socket, reason)] += 1

    def reload(self, ok: bool, seconds: float) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        self.last_reload = self.clock()
        self.last_reload_seconds = seconds
        self.last_reload_ok = ok

    # -- what readers see ----------------------------------------------------------------------

    def _last_hour(self, window: deque[tuple[int, Counter[str]]]) -> dict[str, int]:
        since = int(self.clock() // 60) - RECENT_MINUTES
        total: Counter[str] = Counter()
        with self._lock:
            for minute, counts in window:
                if minute > since:
                    total.update(counts)
        return dict(total)

    def summary(self) -> dict[str, object]:
        """The part of linkusd's STATUS reply that ``linkus-2fa status`` prints (JSON-able)."""
        with self._lock:
            errors = dict(self.errors)
            codes = dict(self.email_codes)
        return {
            "started": self.started,
            "last_hour": self._last_hour(self.recent),
            "errors_last_hour": self._last_hour(self.recent_errors),
            "errors": errors,
            "email_codes": codes,
            "web_throttled": self.web_throttled,
            "refused": {f"{sock}/{reason}": n for (sock, reason), n in self.refused.items()},
            "reloads": dict(self.reloads),
            "last_reload": self.last_reload,
            "last_reload_seconds": self.last_reload_seconds,
            "last_reload_ok": self.last_reload_ok,
            "enrolled": self.enrolled,
            "locked_seen": self._locked_names(),
            "locked_seen_count": len(self.locked),
        }

    def _locked_names(self) -> list[str]:
        names, size = [], 0
        for account in reversed(self.locked):
            size += len(json.dumps(account)) + 1
            if size > LOCKED_REPLY_BYTES:
                break
            names.append(account)
        return names
