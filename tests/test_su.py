"""The real setuid `su`, run by an unprivileged user, through pam_linkus.so and linkusd.

`su` is where the pam_python design gave local root away. Here Debian's own /bin/su
runs in a private mount namespace with a throwaway file bind-mounted over
/etc/pam.d/su (the machine's file is never changed): the caller is a normal user,
su is setuid root, and the stack is pam_unix then pam_linkus.so. linkusd sees a
root peer (euid 0) whose real uid is the caller's, and caps it as that user.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pexpect
import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at

pytestmark = pytest.mark.pam


def su_stack(stack: PamStack) -> Path:
    file = stack.root / "su-pam"
    file.write_text(
        "auth requisite pam_unix.so nodelay\n"
        f"auth [success=ok ignore=ignore default=die] {stack.module_line}\n"
        "auth required pam_permit.so\n"
        "account required pam_permit.so\n"
        "session required pam_permit.so\n"
    )
    return file


def run_su(stack: PamStack, caller: str, target: str, code: str | None, *, path_dir: Path | None = None) -> str:
    """`su target -c 'echo OK-$(id -u)'` typed by ``caller`` on a pty; returns everything printed."""
    if not shutil.which("unshare") or not Path("/bin/su").exists():
        pytest.fail("util-linux unshare and /bin/su are needed")
    env_path = f"{path_dir}:/usr/bin:/bin" if path_dir else "/usr/bin:/bin"
    script = ('mount --bind "$1" /etc/pam.d/su && '
              'exec setpriv --reuid="$2" --regid="$2" --init-groups env -i PATH="$4" '
              'PYTHONPATH=/nonexistent /bin/su "$3" -c "echo OK-\\$(id -u)"')
    child = pexpect.spawn("unshare", ["-m", "--propagation", "private", "sh", "-c", script, "sh",
                                      str(su_stack(stack)), caller, target, env_path],
                          encoding="utf-8", timeout=30)
    child.expect("Password: ")
    child.sendline(PASSWORD)
    if code is not None:
        child.expect("Authentication code: ")
        child.sendline(code)
    child.expect(pexpect.EOF)
    return str(child.before)


def test_su_asks_for_the_code_and_refuses_a_wrong_or_replayed_one(pam_stack: PamStack, make_user: object) -> None:
    caller, target = make_user(), make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(target)
    code = code_at(SECRET, time.time())
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert "OK-" not in run_su(pam_stack, caller, target, wrong)
    out = run_su(pam_stack, caller, target, code)
    assert "OK-" in out and "OK-0" not in out
    assert "OK-" not in run_su(pam_stack, caller, target, code)  # replay
    line = pam_stack.log.wait_for("reason=replayed code")
    assert f"user={target}" in line and "caller_uid=" in line and "caller_uid=0 " not in line


def test_su_with_a_hostile_path_runs_nothing_of_the_caller(pam_stack: PamStack, make_user: object) -> None:
    """The old hole: a PATH with bin/python3 and a sitecustomize.py. Nothing of it may run."""
    caller, target = make_user(), make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(target)
    trap = pam_stack.root / "trap"
    marker = pam_stack.root / "marker"
    (trap / "bin").mkdir(parents=True)
    (trap / "lib" / "python3.11").mkdir(parents=True)
    for name in ("python3", "python3.11"):
        exe = trap / "bin" / name
        exe.write_text(f"#!/bin/sh\ntouch {marker}\n")
        exe.chmod(0o755)
    (trap / "lib" / "python3.11" / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w')\n")
    trap.chmod(0o755)
    pam_stack.root.chmod(0o711)
    wrong = f"{(int(code_at(SECRET, time.time())) + 1) % 1_000_000:06d}"
    assert "OK-" not in run_su(pam_stack, caller, target, wrong, path_dir=trap / "bin")
    assert not marker.exists()
