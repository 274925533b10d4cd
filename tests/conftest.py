"""Fixtures that start real components for the tests and clean up after them.

PAM: each ``pam_stack`` gets a throwaway /etc/pam.d/linkus-test-<random> service
(removed afterwards; the machine's own PAM files are never touched) that loads
native/pam_linkus.so, a private root-only directory with pam_linkus.yaml /
extensions.yaml / state / sockets, its own linkusd started from this checkout,
and a syslog socket whose lines the module and linkusd write and the test reads.
Test users are created with a random name and deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pam_client  # noqa: E402
from plumbing import LogCatcher, stop_process  # noqa: E402 - re-exported: the tests import them from here

from pam_linkus.totp import decode_secret, totp  # noqa: E402

#: Fixtures of the real servers (slapd, redis-server, aiosmtpd), for every test module.
pytest_plugins = ["ldap_server", "redis_server", "smtp_server", "web_site"]

#: A 160-bit demo secret; every test that needs one more makes its own.
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PASSWORD = "Linkus-test-pw-1"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (PAM services, users)")


def code_at(secret: str, when: float, *, digits: int = 6, period: int = 30, algorithm: str = "SHA1") -> str:
    return totp(decode_secret(secret), when, digits=digits, period=period, algorithm=algorithm)


def cut_points(data: bytes, seed: int, samples: int = 300) -> list[int]:
    """Where a half-written file may end: every line boundary (the whole file too) and ``samples``
    byte offsets from a fixed seed, so a failure names a cut that reproduces."""
    import random

    lines = data.splitlines(keepends=True)
    cuts = {sum(len(line) for line in lines[:n]) for n in range(len(lines) + 1)}
    rng = random.Random(seed)
    return sorted(cuts | {rng.randrange(len(data)) for _ in range(samples)})


def write_yaml(path: Path, data: Any, mode: int = 0o600, *, end: bool = False) -> None:
    """``end``: "..." last, as pam_linkus.yaml and extensions.yaml must end (a file without it is cut short)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False, explicit_end=end) if not isinstance(data, str) else data)
    os.chmod(path, mode)


#: The PAM module under test, built by `make native` (the test target builds it first).
NATIVE_SO = REPO / "native" / "pam_linkus.so"
#: The Python that runs linkusd in tests (the Debian one, as in production).
DAEMON_PYTHON = "/usr/bin/python3"


class Linkusd:
    """A real linkusd for one test: its own config, sockets and syslog catcher.

    Started in the foreground from this checkout with a clean environment;
    ``reload()`` asks it over the socket to load edited files now instead of
    waiting for its watcher.
    """

    def __init__(self, config_path: Path, run_dir: Path, log: LogCatcher, *, extra_env: dict[str, str] | None = None):
        self.config_path = config_path
        self.run_dir = run_dir
        self.pam_socket = run_dir / "pam.sock"
        self.web_socket = run_dir / "web.sock"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env = extra_env or {}
        self.stderr_path = run_dir.parent / "linkusd.stderr"
        #: A command line to start linkusd under (e.g. setpriv dropping capabilities).
        self.wrapper: list[str] = []

    def start(self, *, wait: bool = True) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
               **self.extra_env}
        # stderr to a file: a pipe nobody reads fills up (linkusd --foreground echoes every line)
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [*self.wrapper, DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--foreground",
                 "--config", str(self.config_path), "--pam-socket", str(self.pam_socket),
                 "--web-socket", str(self.web_socket), "--log-socket", str(self.log.path)],
                stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        from pam_linkus.protocol import call_control

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.stderr_path.read_text(errors="replace")
                raise AssertionError(f"linkusd exited {self.proc.returncode}: {err[-2000:]}")
            try:
                return call_control(str(self.pam_socket), timeout=2)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("linkusd did not become ready")

    def status(self) -> dict[str, Any]:
        from pam_linkus.protocol import call_control

        return call_control(str(self.pam_socket))

    def reload(self) -> dict[str, Any]:
        from pam_linkus.protocol import Msg, call_control

        return call_control(str(self.pam_socket), Msg.RELOAD, timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)


class PamStack:
    """A throwaway PAM service running pam_unix then pam_linkus.so, and the linkusd it asks."""

    def __init__(self, root: Path, log: LogCatcher, *, options: str = "", auth_lines: str | None = None,
                 start: bool = True):
        self.root = root
        self.log = log
        self.service = f"linkus-test-{secrets.token_hex(4)}"
        self.config_path = root / "pam_linkus.yaml"
        self.extensions_path = root / "extensions.yaml"
        self.state_path = root / "state" / "state.db"
        self.state_path.parent.mkdir(mode=0o700)
        run_dir = root / "run"
        run_dir.mkdir(mode=0o755)
        self.daemon = Linkusd(self.config_path, run_dir, log)
        self.config: dict[str, Any] = {
            "sources": ["yaml"],
            "yaml": {"path": str(self.extensions_path)},
            "state": {"path": str(self.state_path)},
            "email": {"key_file": str(root / "state" / "email.key")},
            "daemon": self.socket_settings(),
        }
        self.extensions: dict[str, Any] = {}
        self._write_config()
        self._write_extensions()
        self.set_pam(options=options, auth_lines=auth_lines)
        if start:
            self.daemon.start()

    @property
    def module_line(self) -> str:
        return f"{NATIVE_SO} socket={self.daemon.pam_socket} log_socket={self.log.path}"

    def set_pam(self, *, options: str = "", auth_lines: str | None = None) -> None:
        """(Re)write /etc/pam.d/<service>; ``auth_lines`` replaces the whole auth part."""
        if auth_lines is None:
            auth_lines = (
                "auth requisite pam_unix.so nodelay\n"
                f"auth [success=ok ignore=ignore default=die] {self.module_line} {options}\n"
                "auth required pam_permit.so\n"
            )
        Path("/etc/pam.d", self.service).write_text(auth_lines + "account required pam_permit.so\n")

    def set_linkus_only(self) -> None:
        """pam_linkus.so alone, no password module: how a name that is no local account reaches
        linkusd (as where pam_linkus.so comes first), so tests can log in as any extension name."""
        self.set_pam(auth_lines=f"auth [success=ok ignore=ignore default=die] {self.module_line}\n"
                                "auth required pam_permit.so\n")

    def set_single_field(self) -> None:
        """The three lines of docs/protocol.md: split off the code, check the password, then the code."""
        self.set_pam(auth_lines=(
            f"auth [success=ok ignore=ignore default=die] {self.module_line} forward_pass\n"
            "auth requisite pam_unix.so use_first_pass nodelay\n"
            f"auth [success=ok ignore=ignore default=die] {self.module_line}\n"
            "auth required pam_permit.so\n"
        ))

    def _write_config(self) -> None:
        write_yaml(self.config_path, self.config, end=True)

    def _write_extensions(self) -> None:
        write_yaml(self.extensions_path, {"extensions": self.extensions}, end=True)

    def _reload(self) -> None:
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            status = self.daemon.reload()
            assert status["last_error"] is None, status["last_error"]

    def socket_settings(self) -> dict[str, str]:
        return {"pam_socket": str(self.daemon.pam_socket), "web_socket": str(self.daemon.web_socket)}

    def write_config(self, **changes: Any) -> None:
        """Change top-level keys of pam_linkus.yaml and have linkusd load it now
        (``daemon`` keys are added to the socket paths, which stay)."""
        if "daemon" in changes:
            changes["daemon"] = {**self.socket_settings(), **changes["daemon"]}
        self.config.update(changes)
        self._write_config()
        self._reload()

    def write_extensions(self, extensions: dict[str, Any] | None = None) -> None:
        if extensions is not None:
            self.extensions = extensions
        self._write_extensions()
        self._reload()

    def enroll_totp(self, user: str, secret: str = SECRET, **extra: Any) -> None:
        self.extensions[user] = {"method": "totp", "secret": secret, **extra}
        self.write_extensions()

    def login(self, user: str, code: str | None, *, password: str = PASSWORD, rhost: str | None = None,
              timeout: float = 30.0) -> pam_client.ClientResult:
        return pam_client.authenticate(self.service, user, password, code, rhost, timeout=timeout)

    def pamtester(self, user: str, *answers: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pamtester", self.service, user, "authenticate"],
            input="".join(a + "\n" for a in answers), capture_output=True, text=True, timeout=timeout,
            check=False,
        )

    def remove(self) -> None:
        self.daemon.stop()
        Path("/etc/pam.d", self.service).unlink(missing_ok=True)


class HostLinkusd:
    """What this machine's own linkusd (if one serves /run/linkusd/pam.sock, or the socket its config
    names) looks like: its pid, its socket file, its state file. Tests never install, purge or start
    anything on the host's paths (tests/private_root.py); this is how a run proves it."""

    def __init__(self, socket: str | None = None, state: str | None = None) -> None:
        from pam_linkus.config import load_config
        from pam_linkus.daemon.main import DEFAULT_CONFIG, DEFAULT_PAM_SOCKET
        from pam_linkus.errors import LinkusError

        self.socket, self.state = DEFAULT_PAM_SOCKET, "/var/lib/pam_linkus/state.db"
        try:
            config = load_config(DEFAULT_CONFIG)
            self.socket, self.state = config.daemon.pam_socket, config.state.path
        except (LinkusError, OSError):
            pass  # no config, or a bad one: linkusd then uses the defaults too
        self.socket, self.state = socket or self.socket, state or self.state
        self.pid = self._pid()
        self.last_reload = self._last_reload()
        self.socket_id = self._identity(self.socket)
        self.state_id = self._identity(self.state)
        self.state_was_open = self.pid is not None and self._state_open()

    def _pid(self) -> int | None:
        from pam_linkus.protocol import ProtocolError, call_control

        try:
            pid = call_control(self.socket, timeout=5).get("pid")
        except (OSError, ProtocolError):
            return None
        return pid if isinstance(pid, int) else None

    def _last_reload(self) -> object:
        """When the host's linkusd last loaded its config: a RELOAD from a test (a linkus-2fa run whose
        config names no socket of its own asks /run/linkusd/pam.sock) changes it."""
        from pam_linkus.protocol import ProtocolError, call_control

        try:
            return call_control(self.socket, timeout=5).get("last_reload")
        except (OSError, ProtocolError):
            return None

    @staticmethod
    def _identity(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _state_open(self) -> bool:
        """The daemon still has its state file open, and that file is not deleted."""
        try:
            names = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return False
        targets = set()
        for name in names:
            with contextlib.suppress(OSError):
                targets.add(os.readlink(f"/proc/{self.pid}/fd/{name}"))
        return self.state in targets  # "PATH (deleted)" once the file is unlinked

    def problems(self) -> list[str]:
        if self.pid is None:
            return []
        found = []
        if self._pid() != self.pid:
            found.append(f"linkusd pid {self.pid} no longer answers STATUS on {self.socket} (now: {self._pid()})")
        elif self.last_reload is not None and self._last_reload() != self.last_reload:
            found.append(f"linkusd pid {self.pid} reloaded its config during the run: a test asked it (RELOAD on "
                         f"{self.socket}), or its files changed")
        if self._identity(self.socket) != self.socket_id:
            found.append(f"{self.socket} was removed or replaced")
        if self.state_id is not None and self._identity(self.state) != self.state_id:
            found.append(f"{self.state} was removed or replaced")
        elif self.state_was_open and not self._state_open():
            found.append(f"linkusd pid {self.pid} no longer holds {self.state} (deleted?)")
        return found


@pytest.fixture(scope="session", autouse=True)
def host_linkusd_untouched() -> Iterator[HostLinkusd]:
    """Fails the run if this machine's linkusd, serving when the run began, stopped answering or lost its
    socket or state file during it (what one `make test` once did to an installed host)."""
    host = HostLinkusd()
    yield host
    problems = host.problems()
    if problems:
        pytest.fail("the tests disturbed this machine's own linkusd: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def make_user() -> Iterator[Any]:
    """Factory: a local user with PASSWORD and a random name; all deleted at the end."""
    require_root()
    made: list[str] = []

    def make(prefix: str = "lkt") -> str:
        name = f"{prefix}{secrets.token_hex(4)}"
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture(scope="session")
def make_group() -> Iterator[Any]:
    """Factory: a local Unix group with a random name and the given members; all deleted at the end."""
    require_root()
    made: list[str] = []

    def make(*members: str, prefix: str = "lkg") -> str:
        name = f"{prefix}{secrets.token_hex(4)}"
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        made.append(name)
        for member in members:
            subprocess.run(["usermod", "-a", "-G", name, member], check=True, capture_output=True)
        return name

    yield make
    for name in made:
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.fixture
def user(make_user: Any) -> str:
    return str(make_user())


#: Where tests keep their config, state and sockets: config files must sit in directories that
#: are root-owned and not writable by others all the way up, which rules out /tmp (1777).
TEST_BASE = Path("/run/linkus-tests")


def make_private_dir() -> Path:
    """A root-owned directory, 0711: others may pass through to a socket, never list or write."""
    TEST_BASE.mkdir(mode=0o755, exist_ok=True)
    path = TEST_BASE / secrets.token_hex(6)
    path.mkdir(mode=0o711)
    return path


@pytest.fixture
def private_dir() -> Iterator[Path]:
    require_root()
    path = make_private_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def log_catcher(private_dir: Path) -> Iterator[LogCatcher]:
    catcher = LogCatcher(private_dir / "log.sock")
    yield catcher
    catcher.close()


@pytest.fixture
def pam_stack(private_dir: Path, log_catcher: LogCatcher) -> Iterator[PamStack]:
    require_root()
    if not NATIVE_SO.exists() or not shutil.which("pamtester"):
        pytest.fail("native/pam_linkus.so and pamtester must exist (make test builds and installs them)")
    stack = PamStack(private_dir, log_catcher)
    yield stack
    stack.remove()
