"""TOTP logins through real libpam + pam_python (pam_unix first, then pam_linkus)."""

from __future__ import annotations

import time

import pytest
from conftest import SECRET, PamStack, code_at

pytestmark = pytest.mark.pam


def test_right_code_logs_in_and_is_logged_without_the_code(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    result = pam_stack.login(user, code, rhost="192.0.2.7")
    assert result.auth == "PAM_SUCCESS" and result.account == "PAM_SUCCESS"
    assert result.prompts == ["Password: ", "Authentication code: "]
    line = pam_stack.log.wait_for(f"user={user}")
    assert "outcome=success" in line and "method=totp" in line and "rhost=192.0.2.7" in line
    assert code not in line and SECRET not in line


def test_wrong_code_is_denied(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    good = code_at(SECRET, time.time())
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    assert pam_stack.login(user, wrong).auth == "PAM_AUTH_ERR"
    assert "outcome=denied" in pam_stack.log.wait_for(f"user={user}")


def test_replayed_code_is_denied(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    assert pam_stack.login(user, code).auth == "PAM_SUCCESS"
    assert pam_stack.login(user, code).auth == "PAM_AUTH_ERR"
    assert 'reason="replayed code' in pam_stack.log.wait_for("replayed")


def test_pamtester_answers_on_stdin(pam_stack: PamStack, user: str) -> None:
    from conftest import PASSWORD

    pam_stack.enroll_totp(user)
    ok = pam_stack.pamtester(user, PASSWORD, code_at(SECRET, time.time()))
    assert ok.returncode == 0, ok.stderr
    assert "Authentication code:" in ok.stdout + ok.stderr
