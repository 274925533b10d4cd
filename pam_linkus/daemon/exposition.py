"""``/metrics``: linkusd's ``Stats`` as Prometheus / OpenMetrics text, over a small HTTP listener.

Imported only when ``metrics.listen`` is set (linkusd imports this module lazily, and it is the
one that imports the Prometheus client): a host without python3-prometheus-client runs linkusd
as before, with metrics off.

The numbers live in ``Stats`` (plain counters the daemon bumps anyway); a custom collector in
a registry of its own turns them into metric families at scrape time, so there is no
``prometheus_client`` object in the login path and no state in the client's global registry.

The listener runs on linkusd's event loop and takes no PAM worker: a scrape is one short
request, the text is a few kilobytes built in well under a millisecond. Bounded like the PAM
socket: at most ``MAX_CLIENTS`` connections at once (more are closed at accept), a request
head of at most ``MAX_HEAD`` bytes that has to arrive whole within ``REQUEST_TIMEOUT``, a
reply that has to be taken within ``SEND_TIMEOUT``; then the connection is closed. A
scraper that connects and says nothing costs one slot for ``REQUEST_TIMEOUT`` seconds, never
a login and never the other slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from pam_linkus import __version__
from pam_linkus.daemon.metrics import BUCKETS, ERROR_KINDS
from pam_linkus.daemon.server import _credentials as peer_credentials

if TYPE_CHECKING:
    from pam_linkus.daemon.engine import Engine

#: Scrape connections at once; more are closed at accept (Prometheus makes one at a time). On TCP
#: any local user can take all of them (slow connections): the unix socket with ``metrics.group``
#: lets only the group connect, caps each uid at ``MAX_PER_UID`` and keeps root's own slots apart.
MAX_CLIENTS = 4
#: Connections at once per peer uid on the unix socket (SO_PEERCRED).
MAX_PER_UID = 2
#: Largest request head (request line and headers) read.
MAX_HEAD = 8192
REQUEST_TIMEOUT = 5.0
SEND_TIMEOUT = 5.0


class LinkusCollector(Collector):
    """Metric families built from the engine's ``Stats`` at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        stats = engine.stats
        summary = stats.summary()
        logins = CounterMetricFamily("linkus_logins", "Logins ended, by outcome, method and PAM service "
                                     "(linkus-gate: the web gate)", labels=["outcome", "method", "service"])
        for (outcome, method, service), n in sorted(stats.logins.items()):
            logins.add_metric([outcome, method, service], n)
        yield logins
        cumulative, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in BUCKETS), "+Inf"), stats.duration_buckets, strict=True):
            running += n
            cumulative.append((bound, float(running)))
        yield HistogramMetricFamily("linkus_login_duration_seconds", "Time from a login's first frame to its "
                                    "outcome, the person's typing included", buckets=cumulative,
                                    sum_value=stats.duration_sum)
        in_use = GaugeMetricFamily("linkus_connections", "Connections open now, by socket",
                                   labels=["socket"])
        for name in ("pam", "web"):
            in_use.add_metric([name], engine.active.get(name, 0))
        yield in_use
        waiting = GaugeMetricFamily("linkus_logins_waiting_for_answer", "Logins waiting for the person's answer "
                                    "(they hold no worker)")
        waiting.add_metric([], engine.active.get("parked", 0))
        yield waiting
        refused = CounterMetricFamily("linkus_connections_refused", "Connections turned away at accept: a peer "
                                      "that may not ask (peer), over a cap (cap), a login over daemon.max_per_account "
                                      "(account-cap), a uid over its cap on the metrics unix socket (uid-cap)",
                                      labels=["socket", "reason"])
        for sock, reason in (("pam", "peer"), ("pam", "cap"), ("pam", "account-cap"), ("web", "peer"), ("web", "cap"),
                             ("metrics", "peer"), ("metrics", "cap"), ("metrics", "uid-cap")):
            refused.add_metric([sock, reason], stats.refused.get((sock, reason), 0))
        yield refused
        yield CounterMetricFamily("linkus_web_signins_throttled", "Web sign-ins and password checks refused as "
                                  "throttled (too many failures for the extension or address)",
                                  value=stats.web_throttled)
        reloads = CounterMetricFamily("linkus_config_reloads", "Configuration loads by result",
                                      labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], stats.reloads.get(result, 0))
        yield reloads
        if stats.last_reload is not None:
            yield GaugeMetricFamily("linkus_config_last_reload_timestamp_seconds", "When the last load ended",
                                    value=stats.last_reload)
            yield GaugeMetricFamily("linkus_config_last_reload_duration_seconds", "How long the last load took",
                                    value=stats.last_reload_seconds or 0.0)
            yield GaugeMetricFamily("linkus_config_last_reload_success", "1 if the last load succeeded "
                                    "(else the previous configuration still serves)",
                                    value=1.0 if stats.last_reload_ok else 0.0)
        yield GaugeMetricFamily("linkus_config_loaded", "1 while a configuration is loaded (0: every login "
                                "is refused)", value=1.0 if engine.current is not None else 0.0)
        errors = CounterMetricFamily("linkus_errors", "Logins and web calls that ended unavailable, by the "
                                     "component that could not be asked", labels=["kind"])
        counted = summary["errors"]
        assert isinstance(counted, dict)
        for kind in ERROR_KINDS:
            errors.add_metric([kind], counted.get(kind, 0))
        yield errors
        codes = CounterMetricFamily("linkus_email_codes", "Email codes sent, and sends refused as throttled",
                                    labels=["result"])
        sent = summary["email_codes"]
        assert isinstance(sent, dict)
        for result in ("sent", "throttled"):
            codes.add_metric([result], sent.get(result, 0))
        yield codes
        if stats.enrolled is not None:
            enrolled = GaugeMetricFamily("linkus_extensions_enrolled", "Extensions with 2FA on, by method, in "
                                         "the loaded YAML settings (LDAP is not counted)", labels=["method"])
            counts = {"totp": 0, "email": 0, **stats.enrolled}  # a method nobody uses is a 0, not a gap
            for method, n in sorted(counts.items()):
                enrolled.add_metric([method], n)
            yield enrolled
        notices = CounterMetricFamily("linkus_notifications", "Notification mails (locks, 2FA off, new method, "
                                      "recovery codes, spraying) handed to SMTP, and dropped because their "
                                      "queue was full", labels=["result"])
        notices.add_metric(["sent"], engine.notifier.sent)
        notices.add_metric(["dropped"], engine.notifier.dropped)
        yield notices
        yield InfoMetricFamily("linkus_build", "linkusd's version",
                               value={"version": __version__, "python": sys.version.split()[0]})
        yield GaugeMetricFamily("linkus_start_time_seconds", "When linkusd started (Unix time)",
                                value=stats.started)


def registry_for(engine: Engine) -> CollectorRegistry:
    """A registry of linkusd's own (no process collectors, nothing in the client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LinkusCollector(engine))
    return registry


class MetricsListener:
    """Serves GET /metrics on one listening socket (TCP on loopback, or unix) on the event loop."""

    def __init__(self, engine: Engine, sock: socket.socket, gid: int | None = None) -> None:
        self.registry = registry_for(engine)
        self.stats = engine.stats
        self.sock = sock
        self.gid = gid  # unix socket: the group whose members (and root) may scrape
        self.clients = 0
        self.per_uid: Counter[int] = Counter()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.sock.family == socket.AF_UNIX:
            self.server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_HEAD)
        else:
            self.server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _peer_uid(self, writer: asyncio.StreamWriter) -> int | None:
        """The unix peer's uid if it may scrape (root, or in ``gid``; anyone when no group is set,
        as the 0600 socket lets only root connect); None: turned away. -1 on TCP (no peer uid)."""
        if self.sock.family != socket.AF_UNIX:
            return -1
        try:
            _pid, uid, _gid, groups = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            return None
        return uid if uid == 0 or self.gid is None or self.gid in groups else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = self._peer_uid(writer)
        # A uid over its own cap is said as such before the shared cap; root's connections (its own
        # MAX_PER_UID) do not count towards the others' MAX_CLIENTS, so group members holding every
        # slot cannot keep root's scrape out (docs/operations.md).
        others = self.clients - self.per_uid[0]
        refusal = ("peer" if uid is None
                   else "uid-cap" if uid >= 0 and self.per_uid[uid] >= MAX_PER_UID
                   else "cap" if uid != 0 and others >= MAX_CLIENTS else None)
        if refusal is not None or uid is None:
            self.stats.refusal("metrics", refusal or "peer")
            writer.transport.abort()
            return
        self.clients += 1
        self.per_uid[uid] += 1
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            status, ctype, body = self._answer(head)
            reply = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n").encode("ascii")
            with contextlib.suppress(TimeoutError, OSError):
                writer.write(reply if head.startswith(b"HEAD ") else reply + body)
                async with asyncio.timeout(SEND_TIMEOUT):
                    await writer.drain()
        finally:
            self.clients -= 1
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a reader that stopped taking the reply: no lingering close
            else:
                writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        """Status line, content type and body for one request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        if target.split("?", 1)[0] != "/metrics":
            return "404 Not Found", "text/plain", b"linkusd serves /metrics only\n"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, ctype = choose_encoder(accept)
        return "200 OK", ctype, encoder(self.registry)
