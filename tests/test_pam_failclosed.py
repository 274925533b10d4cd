"""Broken configuration and broken installs refuse logins through real PAM, and say why."""

from __future__ import annotations

import os
import time

import pytest
from conftest import SECRET, PamStack, code_at

pytestmark = pytest.mark.pam


def test_unknown_option_refuses_and_names_it(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.set_pam(options="enforce_all")
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    assert "unknown option 'enforce_all'" in pam_stack.log.wait_for("outcome=unavailable")


def test_malformed_config_refuses_with_file_line_column(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.config_path.write_text(pam_stack.config_path.read_text() + "enforce: [all\n")
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    line = pam_stack.log.wait_for("outcome=unavailable")
    assert f"{pam_stack.config_path}:" in line


def test_broken_extensions_file_refuses_even_unlisted_users(pam_stack: PamStack, user: str) -> None:
    pam_stack.extensions_path.write_text('extensions:\n  1001: {method: none}\n')
    result = pam_stack.login(user, None)
    assert result.auth == "PAM_AUTHINFO_UNAVAIL", "a broken file must not read as 'not enrolled'"
    assert f"{pam_stack.extensions_path}:2:3" in pam_stack.log.wait_for("outcome=unavailable")


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606])
def test_readable_or_writable_extensions_file_refuses(pam_stack: PamStack, user: str, mode: int) -> None:
    pam_stack.enroll_totp(user)
    os.chmod(pam_stack.extensions_path, mode)
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
    assert "mode" in pam_stack.log.wait_for("outcome=unavailable")


def test_group_writable_config_refuses(pam_stack: PamStack, user: str) -> None:
    os.chmod(pam_stack.config_path, 0o664)
    assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL"


def test_unreadable_or_missing_config_refuses(pam_stack: PamStack, user: str) -> None:
    pam_stack.config_path.unlink()
    assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL"
    assert "cannot open" in pam_stack.log.wait_for("outcome=unavailable")


def test_unusable_state_directory_refuses(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    os.chmod(pam_stack.state_path.parent, 0o777)
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
    assert "state directory" in pam_stack.log.wait_for("outcome=unavailable")


def test_broken_install_refuses(pam_stack: PamStack, user: str) -> None:
    """The loader cannot import the package: every login is refused, nothing crashes."""
    pam_stack.loader.write_text(
        pam_stack.loader.read_text().replace("from pam_linkus.pam_face import", "from pam_linkus.absent import")
    )
    result = pam_stack.login(user, None)
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"


def test_hang_up_at_the_code_prompt_is_conv_err(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    assert pam_stack.login(user, None).auth == "PAM_CONV_ERR"
    assert "outcome=conversation" in pam_stack.log.wait_for(f"user={user}")


def test_log_line_escapes_hostile_rhost(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.login(user, "000000", rhost='evil\nhost" outcome=success')
    line = pam_stack.log.wait_for(f"user={user}")
    assert "\n" not in line and "outcome=denied" in line
    assert line.count("outcome=") == 1 or 'rhost="evil\\x0ahost\\x22 outcome=success"' in line
