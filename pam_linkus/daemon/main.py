"""`linkusd`: start-up, sockets, systemd integration, signals.

Under systemd (linkusd.socket + linkusd.service, Type=notify) the sockets come
by socket activation (LISTEN_FDS, named "pam" and "web") and readiness, reloads
and the watchdog go through $NOTIFY_SOCKET. Without systemd, `linkusd` binds the
sockets itself and goes to the background once it is ready; `linkusd
--foreground` stays attached (containers, tests, the demo).

linkusd never exits because of a bad config: socket activation would give up
after a few restarts and leave every login unavailable with no hint. It keeps the
last good config, or with none refuses every login, and says why in syslog and
in `linkus-2fa doctor`. One instance only: a lock file next to the sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import os
import resource
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from nss_config.yaml_reader import check_parent_dirs
from pam_linkus.config import Config, MetricsConfig, load_config
from pam_linkus.daemon.engine import Engine, build_snapshot
from pam_linkus.daemon.server import Server, web_cap
from pam_linkus.daemon.transport import ACCEPT_PAUSE, Listener
from pam_linkus.errors import ConfigError, LinkusError
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_WARNING, QueuedSyslogSink
from pam_linkus.nodump import forbid_core_dumps

DEFAULT_CONFIG = "/etc/pam_linkus/pam_linkus.yaml"
DEFAULT_PAM_SOCKET = "/run/linkusd/pam.sock"
DEFAULT_WEB_SOCKET = "/run/linkusd/web.sock"
SD_LISTEN_FDS_START = 3
#: Descriptors linkusd needs besides its connections (sockets, pools, state, LDAP/Redis/SMTP, logging).
FD_RESERVE = 128
#: Seconds between checks that the socket files are still this daemon's (SocketWatch).
SOCKET_CHECK_EVERY = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # no abbreviations: install.sh reads a running daemon's --config from its command line
    parser = argparse.ArgumentParser(prog="linkusd", description="The pam-linkus daemon (see linkusd(8)).",
                                     allow_abbrev=False)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="main config file (default: %(default)s)")
    parser.add_argument("--foreground", action="store_true", help="stay in the foreground, log also to stderr")
    parser.add_argument("--quiet", action="store_true",
                        help="with --foreground: log to syslog only, as under systemd (benchmarks)")
    parser.add_argument("--pam-socket", help="PAM socket path (default: daemon.pam_socket of the config)")
    parser.add_argument("--web-socket", help="web socket path (default: daemon.web_socket of the config)")
    parser.add_argument("--log-socket", default="/dev/log", help="syslog socket (default: %(default)s)")
    parser.add_argument("--no-web", action="store_true", help="do not open the web socket")
    parser.add_argument("--check", action="store_true",
                        help="load the config and the extension settings as a start would, say what is wrong, "
                             "and exit (0: they load); serves nothing (install.sh runs it before a restart)")
    return parser.parse_args(argv)


def check_config(config_path: str) -> int:
    """``--check``: build what a start builds (config, sources, state store) and report; 0 if it loads.

    An upgrade restarts linkusd: a config the running daemon only kept as "last good" in memory, or one
    the new code reads more strictly, would leave the restarted daemon refusing every login. The
    installers ask this first and leave the old daemon running when the answer is no.
    """
    try:
        snap = build_snapshot(config_path, time.time)
    except LinkusError as exc:
        print(f"linkusd: configuration not loadable: {exc.reason}", file=sys.stderr)
        return 1
    snap.chain.close()
    snap.store.close()
    path = snap.config.metrics.path
    if path is not None and (problem := metrics_dir_problem(path)) is not None:
        print(f"linkusd: configuration not loadable: {config_path}: {problem}", file=sys.stderr)
        return 1
    print(f"linkusd: configuration ok: {config_path}")
    return 0


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET, without libsystemd; silent when there is none."""

    def __init__(self) -> None:
        self.path = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        self.watchdog: float | None = None
        if usec and usec.isdigit() and (pid is None or pid == str(os.getpid())):
            self.watchdog = int(usec) / 1e6

    def __call__(self, message: str) -> None:
        if not self.path:
            return
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), address)


def activated_sockets() -> dict[str, socket.socket]:
    """Sockets passed by systemd, by their FileDescriptorName ("pam", "web")."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    found = {}
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        label = labels[index] if index < len(labels) else ("pam" if index == 0 else "web")
        found[label] = socket.socket(fileno=fd)
    return found


def _safe_socket_dir(path: str) -> None:
    """The socket's directory: made root-owned 0755 if absent (whatever the umask: linkus-web and
    the ``allowed_groups`` callers must pass through it to reach their sockets); refused if anyone
    else could write it (pam_linkus.so refuses such a socket anyway)."""
    directory = os.path.dirname(path)
    try:
        os.mkdir(directory, 0o755)
        os.chmod(directory, 0o755)  # noqa: S103 - mkdir's mode went through the umask (077)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise SystemExit(f"linkusd: {directory} must be a directory owned by root, not writable by others")
    try:
        # every directory above it too: one that another user may write lets them rename the socket's
        # directory away and put their own (and their own socket) in its place
        check_parent_dirs(path)
    except ConfigError as exc:
        raise SystemExit(f"linkusd: {exc.reason}") from None


def _served(path: str) -> bool:
    """Whether some process accepts connections on the socket at ``path`` (a live linkusd, perhaps
    one whose lock file was deleted): connect and hang up. Refused or gone: a stale file."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a full backlog, a timeout: someone is there; never take it over
        return True


def bind_socket(path: str, mode: int, group: int | None = None) -> socket.socket:
    _safe_socket_dir(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SystemExit(f"linkusd: {path} exists and is not a socket")
        if _served(path):
            raise SystemExit(f"linkusd: another process serves {path}; not taking it over")
        os.unlink(path)  # stale, from a linkusd that is gone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # The socket file gets its mode from the umask at bind (no chmod by path afterwards, which would
    # follow a symlink put in its place), and its group through lchown, which never follows one.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, 0, group, follow_symlinks=False)
    sock.listen(128)
    return sock


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


class SocketWatch:
    """Notices when a socket file this daemon listens on is removed or replaced (a package purge, a
    second daemon, a careless rm): logins would then reach another process or nobody, while this one
    looks healthy. Checked every ``every`` seconds; each change is said once, in syslog, to systemd
    (STATUS=) and in the STATUS reply (``socket_problem``), so that the admin or systemd can act."""

    def __init__(self, paths: Sequence[str], report: Callable[[str | None], None]):
        self.expected = {path: _identity(path) for path in paths}
        self.report = report
        self.problem: str | None = None

    def check(self) -> str | None:
        problems = [f"{path} was {'replaced' if _identity(path) else 'removed'}"
                    for path, identity in self.expected.items() if _identity(path) != identity]
        problem = ("; ".join(problems) + ": logins do not reach this linkusd (pid "
                   f"{os.getpid()}); restart it") if problems else None
        if problem != self.problem:
            self.problem = problem
            self.report(problem)
        return problem

    async def run(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.check()


def instance_lock(pam_socket: str) -> int:
    """Hold an exclusive lock for this socket directory; a second linkusd exits."""
    _safe_socket_dir(pam_socket)
    lock_path = os.path.join(os.path.dirname(pam_socket), "linkusd.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"linkusd: another linkusd is running ({lock_path} is locked)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _start_config(args: argparse.Namespace) -> Config | None:
    """The config as it is at start, for what is fixed until a restart (sockets, pools); None if the
    file does not load: then the defaults serve, and every login is refused until a good config
    loads (the metrics listener starts with the first config that names it, ``MetricsRunner``)."""
    try:
        return load_config(args.config)
    except LinkusError:
        return None


def metrics_socket(metrics: MetricsConfig, gid: int | None) -> socket.socket:
    """The metrics listener's socket: TCP on a loopback address (the config refuses any other), or a
    unix socket in a root-owned directory, 0660 root:``metrics.group`` (0600 without a group). The
    unix socket is the recommended form: any local user may bind a free loopback port first and serve
    made-up numbers, or connect to it; nobody but root and the group can do either with the socket."""
    if metrics.path is not None:
        return bind_socket(metrics.path, 0o660 if gid is not None else 0o600, gid)
    assert metrics.host is not None
    family = socket.AF_INET6 if ":" in metrics.host else socket.AF_INET
    return socket.create_server((metrics.host, metrics.port), family=family, backlog=16)


def metrics_dir_problem(path: str) -> str | None:
    """What ``--check`` says about a unix metrics socket's directory (None: fine), by the rule a start
    applies (``_safe_socket_dir``): root-owned and writable by nobody else, or absent under such a
    parent (linkusd makes it, root 0755)."""
    directory = os.path.dirname(path)
    for where in (directory, os.path.dirname(directory)):
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            if where == directory:
                continue  # made at start, if its parent is safe
            return f"metrics.listen: neither {directory} nor {where} exists"
        except OSError as exc:
            return f"metrics.listen: {where}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return f"metrics.listen: {where} must be a directory owned by root, not writable by others"
        try:
            check_parent_dirs(os.path.join(where, "x"))
        except ConfigError as exc:
            return f"metrics.listen: {exc.reason}"
        return None
    return None


def _why(exc: OSError | SystemExit) -> str:
    """A bind's failure in a few words (``EADDRINUSE``'s text, not create_server's long form)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


#: Seconds between tries of a metrics listener that could not start (a squatted port, a group that
#: does not exist yet): one bind per try, the state change said once in syslog.
METRICS_RETRY = 2.0
#: Seconds between looks for a newly loaded config that names metrics.listen.
METRICS_LOOK = 1.0


class MetricsRunner:
    """The /metrics listener's life. Started when a config that names ``metrics.listen`` first loads
    (at start, or at a later reload after a start with a broken config), tried again every
    ``METRICS_RETRY`` s while it cannot start, one log line per change of state; once serving, fixed
    until a restart. Its state is in the STATUS reply (``engine.health.metrics``) for
    ``linkus-2fa status``. Metrics never decide a login: nothing here can refuse or delay one."""

    def __init__(self, engine: Engine, sink: QueuedSyslogSink) -> None:
        self.engine = engine
        self.sink = sink
        self.listener: Any = None
        self.listen: str | None = None
        self.tries = 0
        self._said: str | None = None
        self._next_try = 0.0
        self._socket_file: tuple[str, tuple[int, int] | None] | None = None

    async def check(self) -> None:
        if self.listener is not None:
            return
        snap = self.engine.current
        metrics = snap.config.metrics if snap is not None else None
        if metrics is None or metrics.listen is None:
            return
        now = time.monotonic()
        if metrics.listen == self.listen and now < self._next_try:
            return
        if metrics.listen != self.listen:
            self.tries = 0
        self.listen, self._next_try = metrics.listen, now + METRICS_RETRY
        self.tries += 1
        try:
            from pam_linkus.daemon import exposition  # needs python3-prometheus-client: only when metrics are on
        except ImportError:
            self._state(False, "python3-prometheus-client is not installed")
            return
        gid = None
        if metrics.group is not None and (gid := _group_id(metrics.group)) is None:
            self._state(False, f"group {metrics.group} does not exist")  # never a wider socket instead
            return
        try:
            sock = metrics_socket(metrics, gid)
        except (OSError, SystemExit) as exc:
            self._state(False, _why(exc))
            return
        listener = exposition.MetricsListener(self.engine, sock, gid)
        try:
            await listener.start()
        except OSError as exc:
            sock.close()
            self._state(False, _why(exc))
            return
        self.listener = listener
        if metrics.path is not None:
            self._socket_file = (metrics.path, _identity(metrics.path))
        self._state(True, None)

    def _state(self, serving: bool, why: str | None) -> None:
        self.engine.health.metrics = {"listen": self.listen, "serving": serving, "why": why, "tries": self.tries,
                                      "retry_seconds": METRICS_RETRY}
        said = f"serving metrics on {self.listen}" if serving else (
            f"cannot serve metrics on {self.listen}: {why}; trying again every {METRICS_RETRY:g} s")
        if said != self._said:
            self._said = said
            self.sink.send(LOG_INFO if serving else LOG_ERR, f"linkusd: {said}")

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(METRICS_LOOK)

    def close(self) -> None:
        """Stop serving; remove the unix socket file if it is still the one this linkusd made."""
        if self.listener is not None:
            self.listener.close()
        if self._socket_file is not None:
            path, identity = self._socket_file
            if identity is not None and _identity(path) == identity:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def raise_file_limit(max_connections: int) -> str | None:
    """Take the soft RLIMIT_NOFILE up to the hard one; a warning when that cannot hold max_connections.

    A shell or a container start gives 1,024 (linkusd.service sets LimitNOFILE): out of descriptors,
    the listener stops accepting for a moment and every login waits behind it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and soft < max_connections + web_cap(max_connections) + FD_RESERVE:
        return (f"linkusd: only {soft} open files allowed (RLIMIT_NOFILE) for daemon.max_connections "
                f"{max_connections}; raise LimitNOFILE= or lower max_connections")
    return None


async def serve(args: argparse.Namespace, sink: QueuedSyslogSink, notify: Notifier, ready_fd: int | None) -> None:
    activated = activated_sockets()
    start_config = _start_config(args)
    settings = start_config.daemon if start_config else None
    pam_path = args.pam_socket or (settings.pam_socket if settings else DEFAULT_PAM_SOCKET)
    web_path = args.web_socket or (settings.web_socket if settings else DEFAULT_WEB_SOCKET)
    web_group = settings.web_group if settings else "linkus-web"
    lock_fd = instance_lock(pam_path)  # noqa: F841 - held for the life of the process
    pam_sock = activated.get("pam") or bind_socket(pam_path, 0o666)
    web_sock = activated.get("web")
    if web_sock is None and not args.no_web:
        gid = _group_id(web_group)
        web_sock = bind_socket(web_path, 0o660 if gid is not None else 0o600, gid)

    # Pool sizes are fixed at start; a reload changes everything else.
    engine = Engine(args.config, sink, workers=settings.workers if settings else 8,
                    web_workers=settings.web_workers if settings else 2)
    await engine.reload("start")
    snap = engine.current
    if (warning := raise_file_limit(snap.config.daemon.max_connections if snap else 512)) is not None:
        sink.send(LOG_WARNING, warning)
    server = Server(engine)
    loop = asyncio.get_running_loop()

    def socket_report(problem: str | None) -> None:
        engine.health.socket_problem = problem
        if problem:
            sink.send(LOG_ERR, f"linkusd: {problem}")
            notify(f"STATUS={problem}")
        else:
            sink.send(LOG_INFO, "linkusd: its sockets are in place again")
            notify("STATUS=serving")

    metrics = MetricsRunner(engine, sink)
    await metrics.check()  # now, if the config loaded at start names metrics.listen
    watch = SocketWatch([pam_path] + ([web_path] if web_sock else []), socket_report)

    def pausing(which: str) -> Callable[[OSError], object]:
        return lambda exc: sink.send(LOG_ERR, f"linkusd: cannot accept {which} connections ({exc.strerror}); "
                                              f"pausing {ACCEPT_PAUSE:g} s")

    pam_server = Listener(pam_sock, server.admit_pam, pausing("PAM"), name="PAM")
    web_server = Listener(web_sock, server.admit_web, pausing("web"), name="web") if web_sock else None

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        what = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        sink.send(LOG_ERR, f"linkusd: internal {what} in the event loop: {str(context.get('message'))[:120]}")

    loop.set_exception_handler(on_error)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_hup() -> None:
        async def again() -> None:
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            await engine.reload("SIGHUP")
            notify("READY=1")
        reloads.add(task := loop.create_task(again()))
        task.add_done_callback(reloads.discard)

    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    tasks = [loop.create_task(engine.watch()), loop.create_task(watch.run(SOCKET_CHECK_EVERY)),
             loop.create_task(metrics.run())]
    if notify.watchdog:
        tasks.append(loop.create_task(_watchdog(notify, notify.watchdog)))
    state = "serving" if engine.current else "refusing every login: no valid configuration"
    notify(f"READY=1\nSTATUS={state}")
    sink.send(LOG_INFO, f"linkusd: ready on {pam_path}" + (f" and {web_path}" if web_sock else "") + f", {state}")
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    await stop.wait()
    notify("STOPPING=1")
    sink.send(LOG_INFO, "linkusd: stopping")
    for task in tasks:
        task.cancel()
    pam_server.close()
    metrics.close()
    server.close()
    if web_server:
        web_server.close()
    engine.shutdown()


async def _watchdog(notify: Notifier, every: float) -> None:
    """Ping the watchdog from the event loop itself: a stuck loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(every / 2)


def _daemonize() -> int:
    """Fork into the background; the parent exits 0 once the child says it is ready."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        ok = os.read(read_fd, 2) == b"ok"
        os._exit(0 if ok else 1)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    return write_fd


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("linkusd: must run as root (it reads root-only config and answers for PAM)", file=sys.stderr)
        return 1
    os.umask(0o077)
    try:
        forbid_core_dumps()  # before any secret is read
    except OSError as exc:
        print(f"linkusd: cannot turn core dumps off: {exc.strerror}", file=sys.stderr)
        return 1
    if args.check:
        return check_config(args.config)
    notify = Notifier()
    under_systemd = notify.path is not None or "LISTEN_FDS" in os.environ
    ready_fd = None if args.foreground or under_systemd else _daemonize()
    # After the fork: the sink's thread must live in the process that serves.
    echo = sys.stderr if args.foreground and not args.quiet else None
    sink = QueuedSyslogSink(args.log_socket, tag="linkusd", echo=echo)
    try:
        asyncio.run(serve(args, sink, notify, ready_fd))
    except SystemExit as exc:
        sink.send(LOG_ERR, str(exc.code))
        raise
    finally:
        sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
