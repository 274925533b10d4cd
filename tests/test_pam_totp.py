"""TOTP logins through real libpam + pam_linkus.so (pam_unix first, then pam_linkus)."""

from __future__ import annotations

import time

import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at

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
    assert 'reason=replayed code' in pam_stack.log.wait_for("replayed")


def test_pamtester_answers_on_stdin(pam_stack: PamStack, user: str) -> None:
    from conftest import PASSWORD

    pam_stack.enroll_totp(user)
    ok = pam_stack.pamtester(user, PASSWORD, code_at(SECRET, time.time()))
    assert ok.returncode == 0, ok.stderr
    assert "Authentication code:" in ok.stdout + ok.stderr


def test_previous_and_next_step_accepted(pam_stack: PamStack, make_user: object) -> None:
    now = time.time()
    for offset in (-30, 30):
        u = make_user()  # type: ignore[operator]
        pam_stack.enroll_totp(u)
        assert pam_stack.login(u, code_at(SECRET, now + offset)).auth == "PAM_SUCCESS"
    u = make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(u)
    assert pam_stack.login(u, code_at(SECRET, now + 120)).auth == "PAM_AUTH_ERR"


def test_parallel_logins_with_one_code_give_exactly_one_success(pam_stack: PamStack, user: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pam_stack.write_config(lockout={"max_failures": 20})
    pam_stack.enroll_totp(user)
    # Stay clear of a step boundary so every login sees the same step.
    if time.time() % 30 > 22:
        time.sleep(30 - time.time() % 30 + 0.5)
    code = code_at(SECRET, time.time())
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: pam_stack.login(user, code, timeout=60).auth, range(8)))
    assert sorted(results) == ["PAM_AUTH_ERR"] * 7 + ["PAM_SUCCESS"]
    # Each replay counted as a failure, across the 8 processes.
    assert len([line for line in pam_stack.log.lines if "replayed code" in line]) == 7


def test_lockout_through_pam_and_its_expiry(pam_stack: PamStack, user: str) -> None:
    pam_stack.write_config(lockout={"max_failures": 3, "duration": 3})
    pam_stack.enroll_totp(user)
    wrong = f"{(int(code_at(SECRET, time.time())) + 7) % 1_000_000:06d}"
    assert [pam_stack.login(user, wrong).auth for _ in range(3)] == ["PAM_AUTH_ERR", "PAM_AUTH_ERR", "PAM_MAXTRIES"]
    locked = pam_stack.login(user, code_at(SECRET, time.time()))
    assert locked.auth == "PAM_MAXTRIES"
    assert locked.prompts == ["Password: "], "a locked extension is not asked for a code"
    assert any("contact your administrator" in m for m in locked.messages)
    time.sleep(3.5)
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"


def test_not_enrolled_skips_under_enforce_enrolled(pam_stack: PamStack, user: str) -> None:
    result = pam_stack.login(user, None)
    assert result.auth == "PAM_SUCCESS", "pam_unix decides; pam_linkus returned PAM_IGNORE"
    assert result.prompts == ["Password: "]
    assert "outcome=skip" in pam_stack.log.wait_for(f"user={user}")


def test_skip_is_ignore_never_success(pam_stack: PamStack, user: str) -> None:
    # With pam_linkus alone in the stack, a skip must not authenticate anybody.
    pam_stack.set_pam(auth_lines=f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line}\n")
    assert pam_stack.login(user, None).auth != "PAM_SUCCESS"
    assert "outcome=skip" in pam_stack.log.wait_for(f"user={user}")


def test_not_enrolled_denied_under_enforce_all(pam_stack: PamStack, user: str) -> None:
    pam_stack.write_config(enforce="all")
    pam_stack.extensions[user] = {"method": "none"}
    pam_stack.write_extensions()
    # asked for a code like an enrolled extension (issue 17.11), then denied whatever it is
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_AUTH_ERR" and result.prompts == ["Password: ", "Authentication code: "]
    assert "outcome=denied" in pam_stack.log.wait_for(f"user={user}")


def test_disabled_extension_is_not_enrolled(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user, enabled=False)
    assert pam_stack.login(user, None).auth == "PAM_SUCCESS"
    pam_stack.write_config(enforce="all")
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTH_ERR"


def test_8_digit_sha256_extension(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user, algorithm="SHA256", digits=8, period=60)
    code = code_at(SECRET, time.time(), digits=8, period=60, algorithm="SHA256")
    assert pam_stack.login(user, code).auth == "PAM_SUCCESS"


def test_custom_prompt_option(pam_stack: PamStack, user: str) -> None:
    pam_stack.set_pam(options="[prompt=Code from your app: ]")
    pam_stack.enroll_totp(user)
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_SUCCESS" and result.prompts[-1] == "Code from your app: "


def test_debug_option_adds_lines_without_secrets(pam_stack: PamStack, user: str) -> None:
    """``debug`` on the PAM line: the module logs its steps at authpriv.debug, never the code."""
    pam_stack.set_pam(options="debug")
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    assert pam_stack.login(user, code).auth == "PAM_SUCCESS"
    line = pam_stack.log.wait_for("received RESULT")
    assert line.startswith("<87>"), "authpriv.debug"
    pam_stack.log.wait_for(f"connecting to {pam_stack.daemon.pam_socket}")
    assert not [entry for entry in pam_stack.log.lines if code in entry or SECRET in entry or PASSWORD in entry]


def test_setcred_is_decided_by_the_password_module(pam_stack: PamStack, user: str) -> None:
    """pam_linkus answers setcred with PAM_IGNORE: PAM_SUCCESS comes only from a right code."""
    import subprocess

    from conftest import PASSWORD

    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    ok = subprocess.run(["pamtester", pam_stack.service, user, "authenticate", "setcred"],
                        input=f"{PASSWORD}\n{code}\n", capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "credential info has successfully been set" in ok.stdout
    # Alone in the stack, the module grants no credentials.
    pam_stack.set_pam(auth_lines=f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line}\n")
    alone = subprocess.run(["pamtester", pam_stack.service, user, "setcred"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert alone.returncode != 0, alone.stdout + alone.stderr


def test_a_file_rewritten_in_place_never_switches_the_code_off(pam_stack: PamStack, make_user: object) -> None:
    """Issue 17.6: `: > extensions.yaml`, then the new text written later (a hand edit, a full
    disk). Every state in between must leave a wrong code denied, never skipped."""
    first, user = make_user(), make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(first)
    pam_stack.enroll_totp(user)
    whole = pam_stack.extensions_path.read_bytes()
    wrong = f"{(int(code_at(SECRET, time.time())) + 1) % 1_000_000:06d}"
    cut_after_first = whole[:whole.index(f'{user}:'.encode())]  # the first extension only, no end marker
    for text in (b"", cut_after_first):
        with pam_stack.extensions_path.open("r+b") as handle:  # in place: same inode, as an editor's truncate
            handle.truncate(0)
            handle.write(text)
        status = pam_stack.daemon.reload()
        assert "has no end marker" in str(status["last_error"]), status
        assert pam_stack.login(user, wrong).auth == "PAM_AUTH_ERR"
        denied = pam_stack.pamtester(user, PASSWORD, wrong)
        assert denied.returncode != 0 and "Authentication failure" in denied.stderr, denied.stderr
    line = pam_stack.log.wait_for("configuration not loaded")
    assert f"{pam_stack.extensions_path}:1: has no end marker" in line and "keeping the last good" in line
    # Started on such a file, linkusd has no good settings at all: every login is unavailable.
    pam_stack.daemon.stop()
    pam_stack.daemon.start()
    assert pam_stack.login(user, wrong).auth == "PAM_AUTHINFO_UNAVAIL"
    # The whole file back (ending in "..."): the right code logs in again.
    pam_stack.extensions_path.write_bytes(whole)
    assert pam_stack.daemon.reload()["last_error"] is None
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
