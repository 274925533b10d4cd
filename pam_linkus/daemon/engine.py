"""linkusd's engine: the current config snapshot, its reload, and the worker pools.

A Snapshot is everything a login decides with: the parsed config, the settings
chain (YAML held in memory, LDAP with warm connections) and the state store. It
is built aside -- in its own thread, never in a worker -- and swapped in with
one assignment, so no login waits for a reload and none parses YAML. A config
that fails to load keeps the last good snapshot serving and says so (syslog,
``status()``, which ``linkus-2fa doctor`` reads); with no good snapshot at all,
every login is refused as unavailable. A large extensions file is parsed in a
child process and held packed (nss_config.yaml_source), so a 100,000-extension
reload costs that thread ~0.1 s of GIL, in slices of ~0.5 ms.

Work runs in thread pools under a deadline (``run``): the PAM pool and the web
pool are separate, and each calling uid has its own small share of the PAM pool,
so one local user's flood of `su` logins cannot delay anyone else's.
"""

from __future__ import annotations

import asyncio
import grp
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from nss_config.chain import SourceChain, build_chain
from pam_linkus import __version__
from pam_linkus.config import Config, gate_warnings, load_config, missing_unix_groups
from pam_linkus.daemon.metrics import Stats
from pam_linkus.errors import (
    CodeRejected,
    CodeThrottled,
    ConfigError,
    LinkusError,
    Locked,
    MailUnavailable,
    SourceUnavailable,
    StateUnavailable,
    Unavailable,
)
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, SyslogSink
from pam_linkus.mail import Mailer, SmtpMailer
from pam_linkus.notify import Event, Notifier
from pam_linkus.state import open_store
from pam_linkus.state.base import StateStore

T = TypeVar("T")

#: How often the watcher looks at the files a snapshot was built from.
WATCH_INTERVAL = 1.0
#: How long a login on the event loop waits for the SQLite write lock before "unavailable".
LOOP_BUSY_TIMEOUT = 0.5
#: How often expired state is pruned.
PRUNE_INTERVAL = 600.0
#: How long a stopping linkusd waits for queued notification mails (pam_linkus.notify).
SHUTDOWN_MAIL_WAIT = 3.0


def _signature(path: str) -> tuple[int, int, int, int, int] | None:
    """What changes when a file is replaced or edited (None: it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Snapshot:
    """One loaded config and what was built from it; immutable once published."""

    config: Config
    chain: SourceChain
    store: StateStore
    loaded_at: float
    files: dict[str, tuple[int, int, int, int, int] | None]
    allowed_gids: frozenset[int]
    trusted_gids: frozenset[int]
    web_gid: int | None
    #: SQLite state: linkusd runs a login's steps on its event loop (server.PamLogin), but
    #: for the parts the flow announces as waiting for a server (flow.Offload: LDAP, SMTP)
    inline: bool = False
    #: Problems found while building that do not stop the load (said once, at the reload).
    warnings: tuple[str, ...] = ()
    users: int = 0  # logins using it right now (event loop thread only)
    retired: bool = False

    def close(self) -> None:
        self.store.close()
        closer = getattr(self.chain, "close", None)
        if callable(closer):
            closer()


def build_snapshot(config_path: str, clock: Callable[[], float]) -> Snapshot:
    """Load and check everything a login needs; raise a LinkusError naming what is wrong."""
    before = _signature(config_path)
    config = load_config(config_path)
    files = {config_path: before}
    if "yaml" in config.sources:
        files[config.yaml.path] = _signature(config.yaml.path)
    daemon = config.daemon
    allowed = daemon.group_ids(daemon.allowed_groups)
    trusted = daemon.group_ids(daemon.trusted_groups)
    try:
        web_gid: int | None = grp.getgrnam(daemon.web_group).gr_gid
    except KeyError:
        web_gid = None  # linkus-web not installed: the web socket serves root only
    store = open_store(config.state)
    try:
        chain = build_chain(config, state=lambda: store, clock=clock)
    except BaseException:
        store.close()
        raise
    inline = config.state.backend == "sqlite"
    warnings = group_policy_warnings(config, chain) + tuple(gate_warnings(config.gate))
    return Snapshot(config, chain, store, clock(), files, allowed, trusted, web_gid, inline, warnings)


def group_policy_warnings(config: Config, chain: SourceChain) -> tuple[str, ...]:
    """What makes group rules fail closed for every account, found at the reload so it is said
    once in syslog (each such login then says "unavailable"): Unix groups this host does not
    have, and a ``ldap.group_attribute`` the directory's schema does not define."""
    found = [f"group_policy: rule {rule.name!r}: Unix group {group!r} does not exist on this host"
             for rule, group in missing_unix_groups(config.group_policy)]
    if any(rule.ldap_groups for rule in config.group_policy):
        try:
            problem = chain.group_attribute_problem()
        except LinkusError as exc:
            problem = f"could not check ldap.group_attribute ({exc.reason})"
        if problem is not None:
            found.append(f"group_policy: {problem}: the account's LDAP groups are unknown, so every "
                         "login a rule naming ldap_groups could apply to is unavailable")
    return tuple(found)


@dataclass
class Health:
    """What ``status()`` reports."""

    started: float = field(default_factory=time.time)
    last_reload: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    refused_peers: int = 0
    over_capacity: int = 0
    #: Set by linkusd's SocketWatch: a socket file it listens on was removed or replaced.
    socket_problem: str | None = None
    #: Set by linkusd's MetricsRunner: the /metrics listener's state (listen, serving, why not, tries).
    metrics: dict[str, object] | None = None


class Engine:
    """Holds the current snapshot and runs work; one per linkusd process."""

    def __init__(self, config_path: str, sink: SyslogSink, *, clock: Callable[[], float] = time.time,
                 workers: int = 8, web_workers: int = 2) -> None:
        self.config_path = config_path
        self.sink = sink
        # every login line, whoever writes it (server.py through log_login, the web gate's own
        # line), is counted where it is written: once, and never forgotten by a new caller
        sink.on_attempt = self.count_login
        self.clock = clock
        self.health = Health()
        self.stats = Stats(clock)
        self._current: Snapshot | None = None
        self._retired: list[Snapshot] = []
        self._workers = workers
        self._pam_pool = ThreadPoolExecutor(workers, thread_name_prefix="linkusd-pam")
        self._web_pool = ThreadPoolExecutor(web_workers, thread_name_prefix="linkusd-web")
        self._reload_lock = asyncio.Lock()
        self._caller_slots: dict[int, asyncio.Semaphore] = {}
        self.active: dict[str, int] = {"pam": 0, "web": 0, "parked": 0}
        # notices are not email codes: not counted as linkus_email_codes_total{result="sent"}
        self.notifier = Notifier(sink, current=self._current_config,
                                 mailer=lambda config: self.mailer(config, codes=False), lookup=self._address_of,
                                 clock=clock)

    # -- notifications ---------------------------------------------------------

    def _current_config(self) -> Config | None:
        snap = self._current
        return snap.config if snap is not None else None

    def _address_of(self, ext: str) -> str | None:
        """The extension's address on file (the notifier's thread; a lookup like a login's)."""
        snap = self._current
        settings = snap.chain.lookup(ext) if snap is not None else None
        return settings.email if settings is not None else None

    def login_failed(self, account: str, exc: LinkusError, *, service: str, client: str | None) -> None:
        """What a failed login tells the notifier: a lock it set mails the owner (and the admin),
        a counted wrong code feeds the spraying watch. Never blocks (``Notifier.submit``)."""
        if not account or account == "-":
            return
        newly_locked = isinstance(exc, Locked) and exc.newly
        if newly_locked:
            self.notifier.submit(Event("locked", account, self.clock(), client=client, service=service))
        if newly_locked or isinstance(exc, CodeRejected):
            self.notifier.wrong_code(account, self.clock())

    # -- snapshots -------------------------------------------------------------

    @property
    def current(self) -> Snapshot | None:
        return self._current

    def snapshot(self) -> Snapshot:
        """The snapshot to decide with; Unavailable when no config ever loaded."""
        if self._current is None:
            raise Unavailable(self.health.last_error or "no valid configuration loaded")
        return self._current

    def acquire(self) -> Snapshot:
        snap = self.snapshot()
        snap.users += 1
        return snap

    def release(self, snap: Snapshot) -> None:
        snap.users -= 1
        if snap.retired and snap.users == 0:
            self._close_retired(snap)

    def _close_retired(self, snap: Snapshot) -> None:
        if snap in self._retired:
            self._retired.remove(snap)
            # closing may block (Redis, LDAP): not in the event loop
            threading.Thread(target=snap.close, name="linkusd-close", daemon=True).start()

    async def reload(self, reason: str, *, if_changed: bool = False) -> bool:
        """Build a new snapshot aside and swap it in; keep the old one on failure.

        ``if_changed`` (the watcher): skip the build when, once the lock is ours, the
        current snapshot already matches the files -- a RELOAD or SIGHUP that ran
        meanwhile loaded the same edit, and a second 100,000-extension build would
        only stall logins again.
        """
        async with self._reload_lock:
            if if_changed and not self.changed():
                return True
            if self._current is not None:
                # A RELOAD follows every change linkus-2fa or self-service makes: whatever the
                # build's fate, no answer the sources kept from before the change serves again.
                self._current.chain.forget_answers()
            loop = asyncio.get_running_loop()
            result: asyncio.Future[Snapshot] = loop.create_future()

            def build() -> None:
                try:
                    snap = build_snapshot(self.config_path, self.clock)
                except BaseException as exc:  # noqa: BLE001 - reported below, never kills the daemon
                    loop.call_soon_threadsafe(_settle, result, None, exc)
                else:
                    loop.call_soon_threadsafe(_settle, result, snap, None)

            threading.Thread(target=build, name="linkusd-reload", daemon=True).start()
            started = time.monotonic()
            try:
                snap = await result
            except LinkusError as exc:
                self.stats.reload(False, time.monotonic() - started)
                return self._reload_failed(reason, exc.reason)
            except Exception as exc:  # noqa: BLE001 - any loader bug keeps the last good config
                self.stats.reload(False, time.monotonic() - started)
                return self._reload_failed(reason, f"internal error: {type(exc).__name__}")
            self.stats.reload(True, time.monotonic() - started)
            self.stats.enrolled = snap.chain.enrolled_by_method()
            if snap.inline:
                self._limit_loop_waits(snap)
            old, self._current = self._current, snap
            self.health.last_reload = time.time()
            self.health.last_error = None
            self.health.last_error_at = None
            counts, dropped = snap.chain.load_summary(old.chain if old is not None else None)
            self.sink.send(LOG_WARNING if dropped else LOG_INFO,
                           f"linkusd: configuration loaded ({reason}) from {self.config_path} "
                           f"in {int((time.monotonic() - started) * 1000)} ms" + (f", {counts}" if counts else ""))
            for warning in snap.warnings:
                self.sink.send(LOG_WARNING, f"linkusd: {warning}")
            serving = self.health.metrics is not None and bool(self.health.metrics.get("serving"))
            if serving and old is not None and (old.config.metrics.listen, old.config.metrics.group) != (
                    snap.config.metrics.listen, snap.config.metrics.group):
                # a listener not serving yet takes the new setting at its next try (MetricsRunner)
                self.sink.send(LOG_NOTICE, "linkusd: metrics.listen or metrics.group changed; it takes effect "
                                           "when linkusd restarts")
            if old is not None:
                old.retired = True
                self._retired.append(old)
                if old.users == 0:
                    self._close_retired(old)
            return True

    def _limit_loop_waits(self, snap: Snapshot) -> None:
        """Local logins run on this (the event loop's) thread: their waits for the state's write
        lock must be short (``LOOP_BUSY_TIMEOUT``), or one held lock stalls every login."""
        limit = getattr(snap.store, "limit_waits_in_this_thread", None)
        if limit is None:
            return
        try:
            limit(LOOP_BUSY_TIMEOUT)
        except LinkusError as exc:  # the logins will say so, each as "unavailable"
            self.sink.send(LOG_NOTICE, f"linkusd: state store: {exc.reason}")

    def _reload_failed(self, reason: str, message: str) -> bool:
        self.health.last_error = message
        self.health.last_error_at = time.time()
        keeping = "keeping the last good configuration" if self._current else "refusing every login"
        self.sink.send(LOG_ERR, f"linkusd: configuration not loaded ({reason}): {message}; {keeping}")
        return False

    def changed(self) -> bool:
        """Did a file the current snapshot was built from change (or was the config never loaded)?"""
        snap = self._current
        if snap is None:
            return _signature(self.config_path) is not None
        return any(_signature(path) != sig for path, sig in snap.files.items())

    async def watch(self) -> None:
        """Reload when the config or the extensions file changes; prune state now and then.

        A failed load is retried only when a file changes again, so a broken file
        costs one syslog line, not one a second.
        """
        last_failed: dict[str, tuple[int, int, int, int, int] | None] | None = None
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.changed():
                files = self._watched_now()
                if files != last_failed:
                    ok = await self.reload("file changed", if_changed=True)
                    last_failed = None if ok else files
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_INTERVAL
                await self._prune()

    def _watched_now(self) -> dict[str, tuple[int, int, int, int, int] | None]:
        paths = [self.config_path] + ([] if self._current is None else list(self._current.files))
        return {path: _signature(path) for path in paths}

    async def _prune(self) -> None:
        snap = self._current
        if snap is None or not hasattr(snap.store, "prune"):
            return
        snap.users += 1
        try:
            removed = await self.run(lambda: snap.store.prune(self.clock()), timeout=60.0)
            if removed:
                self.sink.send(LOG_INFO, f"linkusd: pruned {removed} expired state records")
        except LinkusError as exc:
            self.sink.send(LOG_NOTICE, f"linkusd: pruning state failed: {exc.reason}")
        finally:
            self.release(snap)

    # -- work ------------------------------------------------------------------

    def caller_slots(self, ruid: int) -> asyncio.Semaphore:
        """How much of the PAM pool one calling real uid may use at once (root: all of it)."""
        slots = self._caller_slots.get(ruid)
        if slots is None:
            workers = self._pam_pool._max_workers
            slots = asyncio.Semaphore(workers if ruid == 0 else max(1, workers // 4))
            self._caller_slots[ruid] = slots
        return slots

    async def run(self, fn: Callable[[], T], *, pool: str = "pam", timeout: float | None = None,
                  ruid: int = 0) -> T:
        """Run blocking ``fn`` in a worker thread under the work deadline.

        A timeout is Unavailable; the thread then finishes on its own (every outside
        call has its own deadline), but nobody waits for it.
        """
        if timeout is None:
            snap = self._current
            timeout = snap.config.daemon.work_timeout if snap is not None else 10.0
        loop = asyncio.get_running_loop()
        executor = self._web_pool if pool == "web" else self._pam_pool
        slots = self.caller_slots(ruid) if pool == "pam" else None
        try:
            async with asyncio.timeout(timeout):
                if slots is not None:
                    async with slots:
                        return await loop.run_in_executor(executor, fn)
                return await loop.run_in_executor(executor, fn)
        except TimeoutError:
            raise Unavailable(f"daemon work took longer than {timeout:g} s") from None

    def mailer(self, config: Config, *, codes: bool = True) -> Mailer:
        """The SMTP mailer; ``codes``: what it sends are email codes (counted in ``stats``). Any
        other mail (the notifier's notices) passes ``codes=False``."""
        mailer = SmtpMailer(config.smtp)
        return CountingMailer(mailer, self.stats) if codes else mailer

    # -- what is counted -------------------------------------------------------

    def log_login(self, severity: int, fields: Mapping[str, object]) -> None:
        """A login's one log line (PAM, and the web gate with service "linkus-gate"), and its count.

        The sink's ``attempt`` counts it (``count_login``, hooked in ``__init__``): the one place a
        login line is written is the one place it is counted, for the metrics, the STATUS summary
        and syslog alike, so each login counts exactly once, whatever path wrote it.
        """
        self.sink.attempt(severity, fields)

    def count_login(self, fields: Mapping[str, object]) -> None:
        """Count one login's end (its log line's field map) without writing a line: for the
        Security Settings page's sign-in, whose own lines are not in the login format."""
        outcome = fields.get("outcome")
        if isinstance(outcome, str):
            self.health.outcomes[outcome] = self.health.outcomes.get(outcome, 0) + 1
        self.stats.login(fields)

    def count_failure(self, exc: LinkusError, config: Config | None) -> None:
        """Count what ended a login or web call: an outside component that could not be asked
        (``linkus_errors_total{kind}``), or an email code refused as throttled."""
        if isinstance(exc, CodeThrottled):
            self.stats.email_code("throttled")
        elif isinstance(exc, Unavailable):
            self.stats.error(error_kind(exc, config))

    def status(self) -> dict[str, object]:
        snap = self._current
        return {
            "version": _version(),
            "pid": os.getpid(),
            "started": self.health.started,
            "config": self.config_path,
            "loaded": snap is not None,
            "loaded_at": snap.loaded_at if snap else None,
            "last_reload": self.health.last_reload,
            "last_error": self.health.last_error,
            "last_error_at": self.health.last_error_at,
            "active": dict(self.active),
            "outcomes": dict(self.health.outcomes),
            "refused_peers": self.health.refused_peers,
            "over_capacity": self.health.over_capacity,
            "log_lines_dropped": getattr(self.sink, "dropped", 0),
            "notifications": {"sent": self.notifier.sent, "dropped": self.notifier.dropped},
            "socket_problem": self.health.socket_problem,
            "metrics": self.health.metrics,
            "summary": self.stats.summary(),
        }

    def shutdown(self) -> None:
        self._pam_pool.shutdown(wait=False, cancel_futures=True)
        self._web_pool.shutdown(wait=False, cancel_futures=True)
        # a lock mail queued a moment before the stop still goes out, within a bound
        self.notifier.flush(timeout=SHUTDOWN_MAIL_WAIT)


class CountingMailer:
    """Counts each email code handed to the SMTP server (a failed send raises and is not counted)."""

    def __init__(self, mailer: Mailer, stats: Stats) -> None:
        self.mailer = mailer
        self.stats = stats

    def send(self, to: str, subject: str, body: str, *, now: float) -> None:
        self.mailer.send(to, subject, body, now=now)
        self.stats.email_code("sent")


def error_kind(exc: Unavailable, config: Config | None) -> str:
    """Which component an Unavailable came from, as a ``linkus_errors_total`` label."""
    if isinstance(exc, MailUnavailable):
        return "smtp"
    if isinstance(exc, StateUnavailable):
        return config.state.backend if config is not None else "daemon"
    if isinstance(exc, SourceUnavailable):
        return "yaml" if exc.reason.startswith("yaml") or config is None or "ldap" not in config.sources else "ldap"
    if isinstance(exc, ConfigError):
        return "config"
    return "daemon"


def _settle(future: asyncio.Future[Snapshot], snap: Snapshot | None, exc: BaseException | None) -> None:
    if future.done():
        if snap is not None:
            snap.close()
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert snap is not None
        future.set_result(snap)


def _version() -> str:
    return __version__
