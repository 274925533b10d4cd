"""The console break-glass recipe of docs/break-glass.md against the real /bin/login on a pty.

`login` always uses the PAM service name "login", so each test runs it in a private
mount namespace (`unshare -m`) with a throwaway file bind-mounted over
/etc/pam.d/login: the machine's own file is never modified, and the mount vanishes
with the namespace. `pam_deny.so` stands in for the pam_linkus.so line the recipe
skips: a login that gets in passed the recipe line, one that is refused did not.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pexpect
import pytest
from conftest import PASSWORD, require_root

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "break-glass.md"


def recipe_line() -> str:
    """The pam_succeed_if line exactly as docs/break-glass.md gives it."""
    lines = [line.strip() for line in DOC.read_text().splitlines() if "pam_succeed_if.so" in line]
    assert len(set(lines)) == 1, lines
    return lines[0]


def stack(root: Path, skip_line: str) -> Path:
    """A login service: record PAM_TTY, check the password, then the recipe line before 'the code'."""
    record = root / "pam_tty"
    script = root / "record-tty"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$PAM_TTY" > {record}\n')
    os.chmod(script, 0o700)
    service = root / "login"
    service.write_text(
        f"auth optional pam_exec.so quiet {script}\n"
        "auth requisite pam_unix.so\n"
        f"{skip_line}\n"
        "auth requisite pam_deny.so\n"  # the pam_linkus.so line in real life
        "auth required pam_permit.so\n"
        "account required pam_permit.so\n"
        "session required pam_permit.so\n"
    )
    os.chmod(service, 0o644)
    return service


def login(service: Path, user: str) -> tuple[bool, str]:
    """Run the real /bin/login for ``user`` on a pty with ``service`` as /etc/pam.d/login."""
    require_root()
    if not shutil.which("unshare") or not Path("/bin/login").exists():
        pytest.fail("util-linux unshare and the login package are needed")
    child = pexpect.spawn("unshare", ["-m", "--propagation", "private", "sh", "-c",
                                      'mount --bind "$1" /etc/pam.d/login && exec /bin/login "$2"',
                                      "sh", str(service), user],
                          timeout=30, encoding="utf-8", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                             "TERM": "dumb"})
    try:
        child.expect("Password: ")
        child.sendline(PASSWORD)
        index = child.expect(["Login incorrect", r"\$ ", pexpect.EOF, pexpect.TIMEOUT])
        if index == 1:
            child.sendline("echo in-$((6*7)); exit")
            child.expect("in-42")
            return True, str(child.before)
        return False, str(child.before)
    finally:
        child.close(force=True)


def test_recipe_is_documented_for_full_tty_paths() -> None:
    line = recipe_line()
    assert re.fullmatch(r"auth\s+\[success=1 default=ignore\]\s+pam_succeed_if\.so quiet tty =~ "
                        r"/dev/tty\[1-9\]\*", line), line


def test_login_sets_pam_tty_to_the_full_path(private_dir: Path, user: str) -> None:
    """What the recipe must match: /bin/login gives PAM_TTY as /dev/..., not tty1 or pts/0."""
    service = stack(private_dir, "auth [success=1 default=ignore] pam_permit.so")  # always skips the deny
    ok, transcript = login(service, user)
    assert ok, transcript
    recorded = (private_dir / "pam_tty").read_text()
    assert re.fullmatch(r"/dev/pts/[0-9]+", recorded), recorded


def test_the_recipe_does_not_open_a_pty(private_dir: Path, user: str) -> None:
    """On a pty (what an SSH or su session has) the recipe line does not match: 'the code' is still asked."""
    ok, transcript = login(stack(private_dir, recipe_line()), user)
    assert not ok, transcript
    assert re.fullmatch(r"/dev/pts/[0-9]+", (private_dir / "pam_tty").read_text())


def console_form_for_ptys(line: str) -> str:
    """The recipe with ptys standing in for the virtual consoles (no test can type on tty1)."""
    assert "/dev/tty[1-9]*" in line
    return line.replace("/dev/tty[1-9]*", "/dev/pts/[0-9]*")


def test_the_recipe_form_matches_what_login_sets(private_dir: Path, user: str) -> None:
    """The recipe's form (full /dev path), with ptys for consoles, skips 'the code';
    the old recipe's bare-name form (tty[0-9]*, here pts/[0-9]*) never matched what login sets."""
    ok, transcript = login(stack(private_dir, console_form_for_ptys(recipe_line())), user)
    assert ok, transcript
    old_form = recipe_line().replace("/dev/tty[1-9]*", "pts/[0-9]*")
    ok, transcript = login(stack(private_dir, old_form), user)
    assert not ok, transcript


def test_wrong_password_is_refused_even_where_the_recipe_matches(private_dir: Path, user: str) -> None:
    """The recipe skips only the code: pam_unix still decides the password."""
    service = stack(private_dir, console_form_for_ptys(recipe_line()))
    child = pexpect.spawn("unshare", ["-m", "--propagation", "private", "sh", "-c",
                                      'mount --bind "$1" /etc/pam.d/login && exec /bin/login "$2"',
                                      "sh", str(service), user], timeout=30, encoding="utf-8")
    try:
        child.expect("Password: ")
        child.sendline("not-the-password")
        child.expect("Login incorrect", timeout=30)
    finally:
        child.close(force=True)
