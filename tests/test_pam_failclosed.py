"""Broken configuration, a broken install and a missing linkusd refuse logins through real PAM, and say why.

A config that breaks while linkusd runs keeps the last good one (test_daemon.py);
here linkusd starts on the broken files, so it has nothing good to serve with.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at

pytestmark = pytest.mark.pam


def restart_broken(stack: PamStack, breakage: Callable[[], None]) -> None:
    stack.daemon.stop()
    breakage()
    stack.daemon.start()
    assert stack.daemon.status()["loaded"] is False


def test_unknown_option_refuses_and_names_it(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.set_pam(options="enforce_all")
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    assert "enforce_all" in pam_stack.log.wait_for("refusing the login")


def test_malformed_config_refuses_with_file_line_column(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    restart_broken(pam_stack, lambda: pam_stack.config_path.write_text(
        pam_stack.config_path.read_text().removesuffix("...\n") + "enforce: [all\n...\n"))
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
    assert f"{pam_stack.config_path}:" in pam_stack.log.wait_for("configuration not loaded")
    pam_stack.log.wait_for("outcome=unavailable")


def test_broken_extensions_file_refuses_even_unlisted_users(pam_stack: PamStack, user: str) -> None:
    broken = "extensions:\n  1001: {method: nope}\n...\n"
    restart_broken(pam_stack, lambda: pam_stack.extensions_path.write_text(broken))
    assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL", "a broken file must not read as 'not enrolled'"
    assert f"{pam_stack.extensions_path}:2:" in pam_stack.log.wait_for("configuration not loaded")


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606, 0o000])
def test_extensions_file_of_the_wrong_mode_refuses(pam_stack: PamStack, user: str, mode: int) -> None:
    pam_stack.enroll_totp(user)
    restart_broken(pam_stack, lambda: os.chmod(pam_stack.extensions_path, mode))
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
    assert "mode" in pam_stack.log.wait_for("configuration not loaded")


def test_group_writable_config_or_parent_refuses(pam_stack: PamStack, user: str) -> None:
    restart_broken(pam_stack, lambda: os.chmod(pam_stack.config_path, 0o664))
    assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL"
    os.chmod(pam_stack.config_path, 0o600)
    # The same directory holds the sockets' directory: linkusd does not even listen below it (another
    # user could put their own socket there), and the login, reaching nobody, is refused all the same.
    pam_stack.daemon.stop()
    os.chmod(pam_stack.root, 0o1777)
    try:
        with pytest.raises(AssertionError, match=f"the directory {pam_stack.root} is writable by group or others"):
            pam_stack.daemon.start()
        assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL"
    finally:
        os.chmod(pam_stack.root, 0o711)


def test_missing_config_refuses(pam_stack: PamStack, user: str) -> None:
    restart_broken(pam_stack, pam_stack.config_path.unlink)
    assert pam_stack.login(user, None).auth == "PAM_AUTHINFO_UNAVAIL"
    pam_stack.log.wait_for("configuration not loaded")


def test_unusable_state_directory_refuses(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    restart_broken(pam_stack, lambda: os.chmod(pam_stack.state_path.parent, 0o777))
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
    assert "state directory" in pam_stack.log.wait_for("configuration not loaded")


def test_linkusd_not_running_refuses_with_a_fixed_message(pam_stack: PamStack, user: str) -> None:
    """Broken install or stopped daemon: PAM_AUTHINFO_UNAVAIL, one module log line, and the person
    is told plainly (docs/break-glass.md), whatever the stack."""
    pam_stack.enroll_totp(user)
    pam_stack.daemon.stop()
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    assert "Two-factor authentication is unavailable; contact your administrator." in result.messages
    pam_stack.log.wait_for("pam_linkus(linkus-test")
    tester = subprocess.run(["pamtester", pam_stack.service, user, "authenticate"], input=f"{PASSWORD}\n",
                            capture_output=True, text=True, timeout=30, check=False)
    assert tester.returncode != 0 and "Two-factor authentication is unavailable" in tester.stdout + tester.stderr


def test_hang_up_at_the_code_prompt_is_conv_err(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    assert pam_stack.login(user, None).auth == "PAM_CONV_ERR"
    assert "outcome=conversation" in pam_stack.log.wait_for(f"user={user}")


def test_log_line_escapes_hostile_rhost(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.login(user, "000000", rhost='evil\nhost" outcome=success')
    raw = [line for line in pam_stack.log.lines if f'user="{user}"' in line]
    assert raw and "\n" not in raw[0]
    assert raw[0].count(" outcome=") == 1 and 'outcome="denied"' in raw[0]
