"""One helper for the self-service tests: a site (config, extensions, a password-only PAM
service, the web group), the real Engine + SelfService driven in-process with an injected
clock, and real linkusd + linkus-web processes for the browser tests.

Everything is random-named and removed afterwards; the web process runs as a throwaway
non-root user in the throwaway web group.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import NATIVE_SO, REPO, Linkusd, LogCatcher, PamStack, stop_process
from fakes import Clock

PYTHON = "/usr/bin/python3"


class Site:
    """The lead's PamStack (config dir, extensions, state, pam_linkus.so + linkusd, not yet started)
    plus what the self-service page needs: a password-only PAM service, a web group, SMTP."""

    def __init__(self, stack: PamStack, smtp_port: int):
        self.stack = stack
        self.root = stack.root
        self.log = stack.log
        self.service = f"linkus-test-{secrets.token_hex(4)}"
        self.group = f"lkwg{secrets.token_hex(3)}"
        subprocess.run(["groupadd", self.group], check=True)
        Path("/etc/pam.d", self.service).write_text(
            "auth required pam_unix.so nodelay\naccount required pam_unix.so\n")
        self.config_path = stack.config_path
        self.extensions_path = stack.extensions_path
        self.web_socket = stack.daemon.web_socket
        stack.config.update({
            "self_service": {"pam_service": self.service},
            "daemon": {**stack.socket_settings(), "web_group": self.group},  # the CLI must reach this linkusd
            "smtp": {"host": "127.0.0.1", "port": smtp_port, "security": "none", "from": "pbx@example.com",
                     "timeout": 5},
            "email": {**stack.config["email"], "send_interval": 0},
            "lockout": {"max_failures": 5, "duration": 900},
        })
        stack.write_config()

    def add(self, user: str, **entry: Any) -> None:
        """An extension without 2FA unless ``entry`` says otherwise (linkusd reloads it if running)."""
        self.stack.extensions[user] = {"method": "none", **entry}
        self.stack.write_extensions()

    def entry(self, user: str) -> Any:
        return yaml.safe_load(self.extensions_path.read_text())["extensions"].get(user)

    def remove(self) -> None:
        self.stack.remove()
        Path("/etc/pam.d", self.service).unlink(missing_ok=True)
        subprocess.run(["groupdel", self.group], check=False, capture_output=True)


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """The key=value pairs of one syslog line, quoted or not."""
    return {k: v[1:-1] if v.startswith('"') else v for k, v in _FIELD.findall(line)}


def logged(log: LogCatcher, timeout: float = 5.0, **want: str) -> dict[str, str]:
    """Wait for a line with all of ``want`` among its fields; return its fields."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(log.lines):
            got = fields(line)
            if all(got.get(k) == v for k, v in want.items()):
                return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {want}; got {log.lines!r}")
        time.sleep(0.05)


class Api:
    """The real Engine and SelfService in this process, on their own event loop, with a clock."""

    def __init__(self, site: Site, *, fail_delay: float = 0.0):
        from pam_linkus.daemon.engine import Engine
        from pam_linkus.daemon.selfservice import SelfService
        from pam_linkus.logline import SyslogSink

        self.site = site
        self.clock = Clock(time.time())
        self.loop = asyncio.new_event_loop()
        self.engine = Engine(str(site.config_path), SyslogSink(str(site.log.path), tag="linkusd"), clock=self.clock)
        assert self.loop.run_until_complete(self.engine.reload("test")), site.log.lines
        self.service = SelfService(self.engine, fail_delay=fail_delay)

    def __call__(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self.service.call({"op": op, **fields}, 0))

    def store(self) -> Any:
        return self.engine.snapshot().store

    def reload(self) -> None:
        assert self.loop.run_until_complete(self.engine.reload("test"))

    def close(self) -> None:
        snap = self.engine.current
        if snap is not None:
            snap.close()
        self.loop.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not ready within {timeout} s")


class WebServer:
    """linkus-web as a throwaway non-root user in the web group, on a random loopback port."""

    def __init__(self, site: Site, log_dir: Path):
        self.site = site
        self.user = f"lkweb{secrets.token_hex(3)}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "-G", site.group, self.user], check=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "linkus-web.log"  # kept with the test's tmp dir
        self.proc: subprocess.Popen[bytes] | None = None

    def as_user(self) -> list[str]:
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--reset-env"]

    def start(self, *args: str) -> None:
        """Start it; ``args`` replace ``--listen`` (e.g. ``--unix PATH``) or add to it (TLS)."""
        where = [] if "--unix" in args else ["--listen", f"127.0.0.1:{self.port}"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.as_user(), "env", f"PYTHONPATH={REPO}", PYTHON, "-m", "pam_linkus.web.app",
             *where, "--socket", str(self.site.web_socket), "--timeout", "10", *args],
            cwd="/", stdout=log, stderr=log)
        log.close()

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()
            if "--unix" in args:
                return Path(args[args.index("--unix") + 1]).exists()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, "linkus-web")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        subprocess.run(["userdel", self.user], check=False, capture_output=True)


@pytest.fixture
def site(private_dir: Path, log_catcher: LogCatcher, smtp_server: Any) -> Iterator[tuple[Site, Any]]:
    server = smtp_server(security="none")
    made = Site(PamStack(private_dir, log_catcher, start=False), server.port)
    yield made, server
    made.remove()


@pytest.fixture
def api(site: tuple[Site, Any]) -> Iterator[Api]:
    driver = Api(site[0])
    yield driver
    driver.close()


@pytest.fixture
def web(site: tuple[Site, Any], tmp_path: Path) -> Iterator[tuple[Site, Linkusd, WebServer]]:
    if not NATIVE_SO.exists() or not shutil.which("pamtester"):
        pytest.fail("native/pam_linkus.so and pamtester must exist (make test builds and installs them)")
    daemon = site[0].stack.daemon
    daemon.start()
    server = WebServer(site[0], tmp_path)
    try:
        server.start()
        yield site[0], daemon, server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = start_browser(tmp_path / "chromium")
    yield driver
    driver.quit()


@pytest.fixture
def browser_without_js(tmp_path: Path) -> Iterator[Any]:
    driver = start_browser(tmp_path / "chromium-nojs", javascript=False)
    yield driver
    driver.quit()


def start_browser(profile: Path, *, javascript: bool = True, flags: tuple[str, ...] = ()) -> Any:
    """Headless Chromium; ``flags`` are added to its command line (e.g. a test's own TLS trust)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1100,900", *flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    return driver
