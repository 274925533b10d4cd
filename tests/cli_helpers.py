"""Driving the real ``linkus-2fa`` command for tests: subprocesses, and a pty (pexpect) where it prompts.

The command runs as ``python -m pam_linkus.cli`` from this checkout with the
pam_stack's config and its syslog catcher socket, so its audit lines can be read.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import REPO, PamStack

KEY_LINE = re.compile(r"Key:\s+([A-Z2-7 ]+)\r?\n")


def cli_argv(stack: PamStack, *args: str) -> list[str]:
    return [sys.executable, "-m", "pam_linkus.cli", "--config", str(stack.config_path),
            "--log-socket", str(stack.log.path), *args]


def run_cli(stack: PamStack, *args: str, env: dict[str, str] | None = None, stdin: str = "",
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(stack, *args), capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          input=stdin, env={**os.environ, **(env or {})}, check=False)


def spawn_cli(stack: PamStack, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    argv = cli_argv(stack, *args)
    child = pexpect.spawn(argv[0], argv[1:], cwd=str(REPO), env={**os.environ, **(env or {})}, timeout=timeout,
                          encoding="utf-8")
    return child


def finish(child: Any) -> tuple[int, str]:
    """Wait for the command to end; its exit status and everything it printed."""
    child.expect(pexpect.EOF)
    child.close()
    return int(child.exitstatus if child.exitstatus is not None else -1), str(child.before)


def read_key(child: Any) -> str:
    """The secret as the command prints it for typing, without the spaces."""
    child.expect(KEY_LINE)
    return str(child.match.group(1)).replace(" ", "")


@pytest.fixture
def password_service() -> Iterator[str]:
    """A throwaway PAM service that checks the account password only (for ``self``)."""
    name = f"linkus-test-pw-{secrets.token_hex(4)}"
    path = Path("/etc/pam.d", name)
    path.write_text("auth required pam_unix.so\naccount required pam_permit.so\n")
    yield name
    path.unlink(missing_ok=True)
