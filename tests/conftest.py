"""Fixtures that start real components for the tests and clean up after them.

PAM: each ``pam_stack`` gets a throwaway /etc/pam.d/linkus-test-<random> service
(removed afterwards; the machine's own PAM files are never touched), a private
root-only directory with pam_linkus.yaml / extensions.yaml / state, a loader that
imports pam_linkus from this checkout, and a syslog socket whose lines the test
can read. Test users are created with a random name and deleted afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pam_linkus import client  # noqa: E402
from pam_linkus.totp import decode_secret, totp  # noqa: E402

#: Fixtures of the real servers (slapd, redis-server, aiosmtpd), for every test module.
pytest_plugins = ["ldap_server", "redis_server", "smtp_server"]

#: A 160-bit demo secret; every test that needs one more makes its own.
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PASSWORD = "Linkus-test-pw-1"


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (PAM services, users)")


def code_at(secret: str, when: float, *, digits: int = 6, period: int = 30, algorithm: str = "SHA1") -> str:
    return totp(decode_secret(secret), when, digits=digits, period=period, algorithm=algorithm)


class LogCatcher:
    """A datagram socket standing in for /dev/log; collects the module's syslog lines.

    Shared with bench/harness.py, which drains it between timed logins with ``take``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.lines.append(data.decode("utf-8", "replace"))

    def wait_for(self, needle: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [line for line in self.lines if needle in line]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no log line with {needle!r}; got {self.lines!r}")

    def take(self) -> list[str]:
        """All lines so far (after the datagrams in flight arrived), emptying the list."""
        time.sleep(0.3)
        with self._lock:
            lines, self.lines = self.lines, []
        return lines

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop a server a fixture started: SIGTERM, then SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def write_yaml(path: Path, data: Any, mode: int = 0o600) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    os.chmod(path, mode)


class PamStack:
    """A throwaway PAM service running pam_unix then pam_linkus from this checkout."""

    def __init__(self, root: Path, log: LogCatcher, *, options: str = "", auth_lines: str | None = None):
        self.root = root
        self.log = log
        self.service = f"linkus-test-{secrets.token_hex(4)}"
        self.config_path = root / "pam_linkus.yaml"
        self.extensions_path = root / "extensions.yaml"
        self.state_path = root / "state" / "state.db"
        self.state_path.parent.mkdir(mode=0o700)
        self.cache_dir = root / "cache"  # compiled config/index (pam_linkus.filecache); made on first login
        self.loader = root / "pam_linkus_loader.py"
        self.loader.write_text((REPO / "packaging" / "pam_linkus.py").read_text().replace("@SITE@", str(REPO)))
        self.config: dict[str, Any] = {
            "sources": ["yaml"],
            "yaml": {"path": str(self.extensions_path)},
            "state": {"path": str(self.state_path)},
        }
        self.extensions: dict[str, Any] = {}
        self.write_config()
        self.write_extensions()
        self.set_pam(options=options, auth_lines=auth_lines)

    @property
    def module_line(self) -> str:
        return (f"pam_python.so {self.loader} config={self.config_path} log_socket={self.log.path}"
                f" cache_dir={self.cache_dir}")

    def set_pam(self, *, options: str = "", auth_lines: str | None = None) -> None:
        """(Re)write /etc/pam.d/<service>; ``auth_lines`` replaces the whole auth part."""
        if auth_lines is None:
            auth_lines = (
                "auth requisite pam_unix.so nodelay\n"
                f"auth [success=ok ignore=ignore default=die] {self.module_line} {options}\n"
                "auth required pam_permit.so\n"
            )
        Path("/etc/pam.d", self.service).write_text(auth_lines + "account required pam_permit.so\n")

    def write_config(self, **changes: Any) -> None:
        self.config.update(changes)
        write_yaml(self.config_path, self.config, 0o600)

    def write_extensions(self, extensions: dict[str, Any] | None = None) -> None:
        if extensions is not None:
            self.extensions = extensions
        write_yaml(self.extensions_path, {"extensions": self.extensions})

    def enroll_totp(self, user: str, secret: str = SECRET, **extra: Any) -> None:
        self.extensions[user] = {"method": "totp", "secret": secret, **extra}
        self.write_extensions()

    def login(self, user: str, code: str | None, *, password: str = PASSWORD, rhost: str | None = None,
              timeout: float = 30.0) -> client.ClientResult:
        return client.authenticate(self.service, user, password, code, rhost, timeout=timeout)

    def pamtester(self, user: str, *answers: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pamtester", self.service, user, "authenticate"],
            input="".join(a + "\n" for a in answers), capture_output=True, text=True, timeout=timeout,
            check=False,
        )

    def remove(self) -> None:
        Path("/etc/pam.d", self.service).unlink(missing_ok=True)


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


@pytest.fixture
def user(make_user: Any) -> str:
    return str(make_user())


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A root-owned 0700 directory (config files must live in one).

    Under /run, not /tmp: every directory above a config file must be writable by
    root alone, and /tmp (1777) is not (pam_linkus.strictyaml.check_parent_dirs).
    """
    path = Path(f"/run/linkus-test-{secrets.token_hex(6)}")
    path.mkdir(mode=0o700)
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
    if not Path("/lib/security/pam_python.so").exists() and not shutil.which("pamtester"):
        pytest.fail("libpam-python and pamtester must be installed (make test installs them)")
    stack = PamStack(private_dir, log_catcher)
    yield stack
    stack.remove()
