"""pam-linkus set-ups for the benchmark: one linkusd each (config, extensions, state, sockets)
and the PAM services that load native/pam_linkus.so against it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import NATIVE_SO, REPO, SECRET, Workspace, cpu_seconds, rss_mb

#: Extensions that are not the bench users: a realistic mix of methods.
_FILLER = ("totp", "email", "none")
#: The Python that runs linkusd (the Debian one, as in production and in tests/conftest.py).
DAEMON_PYTHON = "/usr/bin/python3"


def filler_name(i: int) -> str:
    return f"{100000 + i}"


def extensions_yaml(users: list[str], total: int, secret: str = SECRET) -> str:
    """extensions.yaml text with ``users`` enrolled (TOTP) and filler up to ``total`` entries
    (filler ``filler_name(i)`` is TOTP with ``secret`` when i % 3 == 0)."""
    lines = ["extensions:"]
    for user in users:
        lines.append(f'  "{user}": {{method: totp, secret: {secret}}}')
    for i in range(max(0, total - len(users))):
        kind = _FILLER[i % 3]
        name = filler_name(i)
        if kind == "totp":
            lines.append(f'  "{name}": {{method: totp, secret: {secret}}}')
        elif kind == "email":
            lines.append(f'  "{name}": {{method: email, email: ext{name}@pbx.example}}')
        else:
            lines.append(f'  "{name}": {{method: none}}')
    return "\n".join(lines) + "\n...\n"  # the end marker a complete file ends with


class LinkusSetup:
    """One linkusd with its own directory, config, extensions, state, sockets and syslog catcher.

    Started as tests/conftest.py's ``Linkusd`` starts it (``python3 -m pam_linkus.daemon
    --foreground``), except that its stderr (in the foreground every log line is copied
    there) goes to a file: a pipe nobody reads would stall the daemon after 64 KB.
    """

    def __init__(self, ws: Workspace, name: str, users: list[str], *, extensions: int = 10,
                 config: dict[str, Any] | None = None, code: Path = REPO):
        import yaml

        self.ws = ws
        self.name = name
        #: The checkout whose pam_linkus and nss_config this linkusd runs (bench/reload_ab.py
        #: compares two in one run).
        self.code = code
        self.dir = ws.root / name
        self.dir.mkdir(mode=0o711)
        self.config_path = self.dir / "pam_linkus.yaml"
        self.extensions_path = self.dir / "extensions.yaml"
        state = self.dir / "state"
        state.mkdir(mode=0o700)
        self.run_dir = self.dir / "run"
        self.run_dir.mkdir(mode=0o755)
        self.pam_socket = self.run_dir / "pam.sock"
        self.log = ws.catcher(name)
        base: dict[str, Any] = {
            "sources": ["yaml"],
            "yaml": {"path": str(self.extensions_path)},
            "state": {"path": str(state / "state.db")},
            "email": {"key_file": str(state / "email.key")},
            "lockout": {"max_failures": 100, "permanent_after": 100, "duration": 900},
        }
        base.update(config or {})
        self.config = base
        self.config_path.write_text(yaml.safe_dump(base, sort_keys=False, explicit_end=True))
        os.chmod(self.config_path, 0o600)
        self.extensions_path.write_text(extensions_yaml(users, extensions))
        os.chmod(self.extensions_path, 0o600)
        self.service = ws.service(name, self.auth_lines(unix=True))
        self.service_alone = ws.service(f"{name}-alone", self.auth_lines(unix=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: Any = None
        #: linkusd's web socket, for set-ups that run linkus-web (bench/gate.py); None: ``--no-web``.
        self.web_socket: Path | None = None

    @property
    def module_line(self) -> str:
        return f"{NATIVE_SO} socket={self.pam_socket} log_socket={self.log.path}"

    def auth_lines(self, *, unix: bool) -> str:
        return (("auth requisite pam_unix.so nodelay\n" if unix else "")
                + f"auth [success=ok ignore=ignore default=die] {self.module_line}\n"
                "auth required pam_permit.so\n")

    # -- the daemon -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> float:
        """Start linkusd and wait until it answers STATUS with a loaded config; seconds taken."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(self.code)}
        started = time.monotonic()
        with open(self.dir / "linkusd.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--foreground", "--quiet",
                 *(["--web-socket", str(self.web_socket)] if self.web_socket else ["--no-web"]),
                 "--config", str(self.config_path), "--pam-socket", str(self.pam_socket),
                 "--log-socket", str(self.log.path)],
                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=self.code,  # -m looks in cwd first
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"linkusd ({self.name}) exited {self.proc.returncode}: "
                                   f"{(self.dir / 'linkusd.stderr').read_text()[-1500:]}")
            try:
                status = self.control()
            except OSError:
                time.sleep(0.05)
                continue
            if not status.get("loaded"):
                raise RuntimeError(f"linkusd ({self.name}) has no config: {status.get('last_error')}")
            return time.monotonic() - started
        raise RuntimeError(f"linkusd ({self.name}) did not become ready in {timeout} s")

    def control(self, reload: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        from pam_linkus.protocol import Msg, call_control

        return call_control(str(self.pam_socket), Msg.RELOAD if reload else Msg.STATUS, timeout=timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> float:
        return rss_mb(self.pid)

    # -- state, between timed logins ---------------------------------------------------

    def store(self) -> Any:
        """This set-up's state store, opened in the bench process (untimed resets)."""
        if self._store is None:
            from pam_linkus.config import load_config
            from pam_linkus.state import open_store

            self._store = open_store(load_config(str(self.config_path)).state)
        return self._store

    def forget(self, user: str) -> None:
        """Clear replay and failure records, so the next login with a fresh code is not a replay."""
        self.store().forget(user)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def stderr_tail(setup: LinkusSetup) -> str:
    path: Path = setup.dir / "linkusd.stderr"
    return path.read_text(errors="replace")[-800:] if path.exists() else ""
