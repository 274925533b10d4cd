"""A real OpenSSH sshd on 127.0.0.1 for the tests, with its own PAM service.

sshd names its PAM service after the basename of argv[0], so a symlink
/run/linkus-test-<random>/<service> -> /usr/sbin/sshd, started by its absolute
path, authenticates through the throwaway /etc/pam.d/<service> of the test's
PamStack. Host key, sshd_config and authorized_keys live in that private
directory under /run (root-owned 0755 all the way up, so StrictModes stays on);
the system's /etc/ssh/sshd_config is never read. Logins are driven with
paramiko's keyboard-interactive (and publickey) authentication.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import PASSWORD, PamStack, stop_process

SSHD = "/usr/sbin/sshd"

#: /etc/pam.d/sshd for "password + code" (docs/guide.md, "sshd, console, su and sudo"): Debian's
#: common-auth, then pam-linkus.
PASSWORD_AND_CODE = """\
auth [success=1 default=ignore] pam_unix.so nullok nodelay
auth requisite pam_deny.so
auth required pam_permit.so
auth [success=ok ignore=ignore default=die] {module}
"""

#: /etc/pam.d/sshd for "public key + code" (the same section): no pam_unix when pam-linkus answered;
#: an extension without 2FA (skip) gives its password instead of a code.
KEY_AND_CODE = """\
auth [success=1 ignore=ignore default=die] {module}
auth requisite pam_unix.so nodelay
auth required pam_permit.so
"""

REST = """\
account required pam_unix.so
session required pam_permit.so
password required pam_deny.so
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SshServer:
    """One sshd process; ``stop()`` ends it and removes its directory."""

    def __init__(self, stack: PamStack, *, auth_lines: str, authentication_methods: str,
                 login_grace_time: int = 60, password_authentication: bool = False):
        self.stack = stack
        self.dir = Path(f"/run/linkus-test-{secrets.token_hex(6)}")
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.keys_dir = self.dir / "authorized_keys"
        self.keys_dir.mkdir(mode=0o755)
        self.host_key = self.dir / "host_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        Path("/etc/pam.d", stack.service).write_text(auth_lines.format(module=stack.module_line) + REST)
        self.program = self.dir / stack.service  # the PAM service name sshd will use
        self.program.symlink_to(SSHD)
        self.authentication_methods = authentication_methods
        self.login_grace_time = login_grace_time
        self.password_authentication = password_authentication
        self.log_path = self.dir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._start()

    def _write_config(self) -> Path:
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            "PidFile none\n"
            "UsePAM yes\n"
            "KbdInteractiveAuthentication yes\n"
            f"PasswordAuthentication {'yes' if self.password_authentication else 'no'}\n"
            "PubkeyAuthentication yes\n"
            f"AuthenticationMethods {self.authentication_methods}\n"
            f"AuthorizedKeysFile {self.keys_dir}/%u\n"
            "StrictModes yes\n"
            "PermitRootLogin no\n"
            "UseDNS no\n"
            f"LoginGraceTime {self.login_grace_time}\n"
            "MaxAuthTries 6\n"
            "PrintMotd no\n"
            "LogLevel VERBOSE\n"
        )
        return config

    def _start(self) -> None:
        last = ""
        for _ in range(3):  # the free port may be taken between the probe and sshd's bind
            self.port = free_port()
            config = self._write_config()
            check = subprocess.run([str(self.program), "-t", "-f", str(config)], capture_output=True, text=True,
                                   check=False)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t: {check.stderr}")
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen([str(self.program), "-D", "-e", "-f", str(config)],
                                             stdout=log, stderr=log)
            if self._wait_ready(10.0):
                return
            last = self.log_path.read_text(errors="replace")[-2000:]
            self._stop_proc()
        raise RuntimeError(f"sshd did not start: {last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.settimeout(2)
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def authorize(self, user: str) -> paramiko.PKey:
        """A new key pair for ``user``; the public half goes to its authorized_keys."""
        path = self.dir / f"key-{user}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        target = self.keys_dir / user
        target.write_text(Path(f"{path}.pub").read_text())
        os.chmod(target, 0o644)
        return paramiko.Ed25519Key.from_private_key_file(str(path))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _stop_proc(self) -> None:
        stop_process(self.proc, 5.0)
        self.proc = None

    def stop(self) -> None:
        self._stop_proc()
        shutil.rmtree(self.dir, ignore_errors=True)


class SshLogin:
    """What one paramiko login saw: the keyboard-interactive prompts and the command's output."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.remaining: list[str] | None = None
        self.output = ""
        self.exit_status: int | None = None


def ssh_login(
    server: SshServer,
    user: str,
    *,
    password: str | None = PASSWORD,
    code: str | Callable[[], str] | None = None,
    key: paramiko.PKey | None = None,
    keyboard_interactive: bool = True,
    command: str = "echo linkus-ok; id -un",
) -> SshLogin:
    """Log in and run ``command``. Raises paramiko.AuthenticationException when refused,
    paramiko.SSHException/EOFError when sshd drops the connection."""
    seen = SshLogin()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = 10
    transport.auth_timeout = 60
    try:
        transport.start_client(timeout=10)
        if key is not None:
            seen.remaining = transport.auth_publickey(user, key)

        def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
            answers = []
            for text, _echo in prompts:
                seen.prompts.append(text)
                if "password" in text.lower():
                    answers.append(password or "")
                else:
                    answers.append((code() if callable(code) else code) or "")
            return answers

        if keyboard_interactive:
            transport.auth_interactive(user, handler)
        if not transport.is_authenticated():
            raise paramiko.AuthenticationException("not authenticated")
        channel = transport.open_session(timeout=10)
        channel.settimeout(20)
        channel.exec_command(command)
        seen.output = channel.makefile("rb").read().decode(errors="replace")
        seen.exit_status = channel.recv_exit_status()
        return seen
    finally:
        transport.close()


@pytest.fixture
def sshd_factory(pam_stack: PamStack) -> Iterator[Any]:
    """Factory: ``sshd_factory(auth_lines, authentication_methods, **kw)`` -> SshServer."""
    if not os.path.exists(SSHD):
        pytest.fail("openssh-server must be installed (make deps-test installs it)")
    servers: list[SshServer] = []

    def make(auth_lines: str, authentication_methods: str, **kwargs: Any) -> SshServer:
        server = SshServer(pam_stack, auth_lines=auth_lines, authentication_methods=authentication_methods,
                           **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
