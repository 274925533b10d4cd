"""python-pam (PyPI python-pam 2.x) in-process against pam_linkus.so: what a PBX web app does.

The pam_python version crashed python-pam on its first call (two interpreters, one
process). With the C module nothing of ours runs in the web app's process but a
small client of linkusd, so the usual library works in-process. The stack is the
single-field one of docs/protocol.md: the user types password and code in one box.
"""

from __future__ import annotations

import time
from pathlib import Path

import pam
import pytest
from conftest import PASSWORD, SECRET, LogCatcher, PamStack, code_at, require_root

pytestmark = pytest.mark.pam


@pytest.fixture
def stack(private_dir: Path, log_catcher: LogCatcher) -> PamStack:
    require_root()
    s = PamStack(private_dir, log_catcher)
    s.set_single_field()
    yield s  # type: ignore[misc]
    s.remove()


def test_password_and_code_in_one_answer(stack: PamStack, user: str) -> None:
    stack.enroll_totp(user)
    client = pam.pam()
    code = code_at(SECRET, time.time())
    assert client.authenticate(user, PASSWORD + code, service=stack.service), client.reason
    assert not client.authenticate(user, PASSWORD + code, service=stack.service)  # replay
    stack.log.wait_for("reason=replayed code")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert not client.authenticate(user, PASSWORD + wrong, service=stack.service)


def test_wrong_password_never_reaches_the_code_check(stack: PamStack, user: str) -> None:
    """The code is checked only after pam_unix accepted the password: no lockout by strangers."""
    stack.write_config(lockout={"max_failures": 2, "duration": 900})
    stack.enroll_totp(user)
    client = pam.pam()
    for _ in range(5):
        assert not client.authenticate(user, "not-the-password" + "123456", service=stack.service)
    assert not [line for line in stack.log.lines if "consecutive failures" in line]
    code = code_at(SECRET, time.time())
    assert client.authenticate(user, PASSWORD + code, service=stack.service), client.reason


def test_user_without_2fa_gives_the_whole_answer_as_password(stack: PamStack, user: str) -> None:
    client = pam.pam()
    assert client.authenticate(user, PASSWORD, service=stack.service), client.reason
    assert not client.authenticate(user, PASSWORD + "123456", service=stack.service)


def test_linkusd_down_refuses_in_process(stack: PamStack, user: str) -> None:
    stack.enroll_totp(user)
    stack.daemon.stop()
    client = pam.pam()
    assert not client.authenticate(user, PASSWORD + code_at(SECRET, time.time()), service=stack.service)
    assert client.code == 9, client.reason  # PAM_AUTHINFO_UNAVAIL
