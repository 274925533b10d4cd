"""Exempt networks, grace periods, single-field mode and the console break-glass line,
through real libpam + pam_linkus.so (the child-process client and pamtester on a pty)."""

from __future__ import annotations

import time

import pam_client as client
import pexpect
import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at
from pam_client import ClientOutcome

pytestmark = pytest.mark.pam


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


# -- exempt networks and grace periods ---------------------------------------------


def test_exempt_network_skips_the_code_but_not_the_password(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.write_config(exempt_networks=["192.0.2.0/24"])
    result = pam_stack.login(user, None, rhost="192.0.2.7")
    assert (result.auth, result.account, result.prompts) == ("PAM_SUCCESS", "PAM_SUCCESS", ["Password: "])
    line = pam_stack.log.wait_for(f"user={user}")
    assert "outcome=skip" in line and 'reason=exempt network 192.0.2.0/24' in line
    assert pam_stack.login(user, None, rhost="192.0.2.7", password="wrong").auth == "PAM_AUTH_ERR"
    for rhost in ("198.51.100.1", None):
        assert pam_stack.login(user, None, rhost=rhost).outcome == ClientOutcome.NEED_CODE


def test_bad_exempt_network_refuses_logins_and_names_the_key(pam_stack: PamStack, user: str) -> None:
    """A typo in exempt_networks is refused at load: linkusd keeps the last good config while
    running, and with no good one (a restart) refuses every login, naming the key."""
    pam_stack.enroll_totp(user)
    pam_stack.config["exempt_networks"] = ["192.0.2.0/33"]
    pam_stack._write_config()
    assert "exempt_networks" in str(pam_stack.daemon.reload()["last_error"])
    pam_stack.daemon.stop()
    pam_stack.daemon.start()
    result = pam_stack.login(user, code_at(SECRET, time.time()), rhost="192.0.2.7")
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    assert "exempt_networks" in pam_stack.log.wait_for("configuration not loaded")


def test_grace_period_after_a_right_code_from_the_same_host(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.write_config(grace_period=600)
    assert pam_stack.login(user, code_at(SECRET, time.time()), rhost="192.0.2.7").auth == "PAM_SUCCESS"
    result = pam_stack.login(user, None, rhost="192.0.2.7")
    assert (result.auth, result.prompts) == ("PAM_SUCCESS", ["Password: "])
    assert 'reason=grace period' in pam_stack.log.wait_for("grace period")
    assert pam_stack.login(user, None, rhost="192.0.2.7", password="wrong").auth == "PAM_AUTH_ERR"
    for rhost in ("192.0.2.8", None):
        assert pam_stack.login(user, None, rhost=rhost).outcome == ClientOutcome.NEED_CODE


# -- single-field mode (forward_pass) ------------------------------------------------


def test_single_field_password_and_code_in_one_answer(pam_stack: PamStack, make_user: object) -> None:
    pam_stack.set_single_field()
    enrolled, plain = make_user(), make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(enrolled)
    code = code_at(SECRET, time.time())

    result = pam_stack_single(pam_stack, enrolled, PASSWORD, code)
    assert (result.auth, result.account) == ("PAM_SUCCESS", "PAM_SUCCESS")
    assert result.prompts == ["Password & verification code: "]  # one prompt: pam_unix took PAM_AUTHTOK
    assert pam_stack_single(pam_stack, enrolled, PASSWORD, code).auth == "PAM_AUTH_ERR"  # replayed
    next_code = code_at(SECRET, time.time() + 30)
    assert pam_stack_single(pam_stack, enrolled, "wrong", next_code).auth == "PAM_AUTH_ERR"
    assert pam_stack_single(pam_stack, enrolled, PASSWORD, wrong(next_code)).auth == "PAM_AUTH_ERR"
    assert pam_stack_single(pam_stack, enrolled, PASSWORD, None).auth == "PAM_AUTH_ERR"

    # no 2FA: the whole answer is the password
    assert pam_stack_single(pam_stack, plain, PASSWORD, None).auth == "PAM_SUCCESS"
    assert pam_stack_single(pam_stack, plain, PASSWORD, "123456").auth == "PAM_AUTH_ERR"


def pam_stack_single(stack: PamStack, user: str, password: str, code: str | None) -> client.ClientResult:
    return client.authenticate(stack.service, user, password, code, "192.0.2.7", single_field=True, timeout=30)


def test_single_field_with_pamtester(pam_stack: PamStack, user: str) -> None:
    pam_stack.set_single_field()
    pam_stack.enroll_totp(user)
    ok = pam_stack.pamtester(user, PASSWORD + code_at(SECRET, time.time()))
    assert ok.returncode == 0, ok.stderr
    assert "Password & verification code:" in ok.stdout + ok.stderr


# -- console: a pty, and the break-glass line -----------------------------------------


def console_stack(stack: PamStack) -> None:
    """docs/break-glass.md's line for /etc/pam.d/login: the local console skips pam-linkus.
    Debian's login sets PAM_TTY to the full path (/dev/tty1), tested with the real login in
    test_break_glass.py."""
    stack.set_pam(auth_lines=(
        "auth requisite pam_unix.so nodelay\n"
        "auth [success=1 default=ignore] pam_succeed_if.so quiet tty =~ /dev/tty[1-9]*\n"
        f"auth [success=ok ignore=ignore default=die] {stack.module_line}\n"
        "auth required pam_permit.so\n"
    ))


def pty_login(stack: PamStack, user: str, tty: str, *answers: str) -> tuple[int, str]:
    """pamtester on a pty (prompts read with echo off, as login and su do)."""
    child = pexpect.spawn("pamtester", ["-I", f"tty={tty}", stack.service, user, "authenticate"],
                          timeout=20, encoding="utf-8")
    transcript = ""
    for answer in answers:
        child.expect(r"(?i)(password|code): ")
        transcript += str(child.before) + str(child.after)
        child.sendline(answer)
    child.expect(pexpect.EOF)
    transcript += str(child.before)
    child.close()
    return int(child.exitstatus if child.exitstatus is not None else -1), transcript


def test_console_login_on_a_pty_asks_password_then_code_without_echo(pam_stack: PamStack, user: str) -> None:
    console_stack(pam_stack)
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    status, transcript = pty_login(pam_stack, user, "pts/7", PASSWORD, code)
    assert status == 0, transcript
    assert "Password: " in transcript and "Authentication code: " in transcript
    assert PASSWORD not in transcript and code not in transcript  # echo off
    status, transcript = pty_login(pam_stack, user, "pts/7", PASSWORD, code)
    assert status != 0 and "Authentication failure" in transcript  # replayed


def test_break_glass_console_works_while_linkusd_is_down(pam_stack: PamStack, user: str) -> None:
    console_stack(pam_stack)
    pam_stack.enroll_totp(user)
    pam_stack.daemon.stop()  # every 2FA login is refused now...
    status, transcript = pty_login(pam_stack, user, "/dev/tty1", PASSWORD)
    assert status == 0, transcript  # ...but the local console still logs in with the password
    status, transcript = pty_login(pam_stack, user, "/dev/tty1", "wrong")
    assert status != 0  # and the password is still checked
    status, transcript = pty_login(pam_stack, user, "/dev/pts/0", PASSWORD)
    assert status != 0 and "Two-factor authentication is unavailable" in transcript
    # what sshd, su from an ssh session, a short name or no tty at all set: not the console
    assert client.authenticate(pam_stack.service, user, PASSWORD, None, tty="/dev/tty2").auth == "PAM_SUCCESS"
    for tty in ("ssh", "/dev/pts/1", "tty1", "/dev/ttyS0", "x/dev/tty1", None):
        result = client.authenticate(pam_stack.service, user, PASSWORD, None, tty=tty, timeout=30)
        assert result.auth == "PAM_AUTHINFO_UNAVAIL", tty



# -- profiles and prompt= on the PAM line ----------------------------------------------


def test_profile_on_the_pam_line_picks_the_policy(pam_stack: PamStack, make_user: object) -> None:
    """profile=NAME selects a per-service policy in linkusd; an unknown one is unavailable."""
    plain = make_user()  # type: ignore[operator]
    pam_stack.write_config(profiles={"strict": {"enforce": "all"}})
    assert pam_stack.login(plain, None).auth == "PAM_SUCCESS"  # top level: enforce enrolled
    pam_stack.set_pam(options="profile=strict")
    assert pam_stack.login(plain, "000000").auth == "PAM_AUTH_ERR"  # strict: no 2FA, no login
    pam_stack.log.wait_for("policy is enforce: all")
    pam_stack.set_pam(options="profile=nope")
    assert pam_stack.login(plain, None).auth == "PAM_AUTHINFO_UNAVAIL"


def test_prompt_option_is_the_code_prompt(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.set_pam(options="[prompt=Code from your Linkus app: ]")
    result = pam_stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_SUCCESS" and result.prompts == ["Password: ", "Code from your Linkus app: "]


def test_before_the_password_under_enforce_all_every_name_gets_the_code_prompt(pam_stack: PamStack,
                                                                              make_user: object) -> None:
    """Issue 17.11: pam_linkus.so before the password module, enforce: all. An enrolled name, one
    without 2FA and one that does not exist all get the same code prompt, then the same refusal,
    so the stack tells nobody which names exist; linkusd's log says why each was refused."""
    import secrets

    enrolled, plain = make_user(), make_user()  # type: ignore[operator]
    ghost = f"lkx{secrets.token_hex(4)}"
    pam_stack.write_config(enforce="all")
    pam_stack.enroll_totp(enrolled)
    pam_stack.set_pam(auth_lines=(
        f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line}\n"
        "auth requisite pam_unix.so nodelay\n"
        "auth required pam_permit.so\n"
    ))
    code = wrong(code_at(SECRET, time.time()))
    seen = []
    for name in (enrolled, plain, ghost):
        result = pam_stack.login(name, code)
        assert result.auth == "PAM_AUTH_ERR", (name, result)
        seen.append((result.prompts, result.messages))
    assert seen[0] == seen[1] == seen[2], seen
    assert seen[0][0] == ["Authentication code: "]
    pam_stack.log.wait_for(f"user={ghost}")
    refused = [line for line in pam_stack.log.lines if "policy is enforce: all" in line]
    assert any(f"user={plain}" in line.replace('"', "") for line in refused), refused
    assert any(f"user={ghost}" in line.replace('"', "") for line in refused), refused
    # No answer at the prompt is a conversation failure for every name alike.
    assert pam_stack.login(ghost, None).auth == pam_stack.login(enrolled, None).auth == "PAM_CONV_ERR"


@pytest.mark.parametrize("where", ["top", "profile"])
def test_enforce_with_no_value_is_refused_by_a_running_linkusd(pam_stack: PamStack, make_user: object,
                                                               where: str) -> None:
    """Tester 2: ``enforce:`` (null) loaded as ``enrolled``, so a name without 2FA skipped the code.
    Now the reload is refused naming the key, and linkusd keeps the last good config."""
    enrolled, plain = make_user(), make_user()  # type: ignore[operator]
    pam_stack.enroll_totp(enrolled)
    pam_stack.write_config(enforce="all", profiles={pam_stack.service: {"enforce": "all"}})
    assert pam_stack.login(plain, "123456").auth == "PAM_AUTH_ERR"
    if where == "top":
        pam_stack.config["enforce"] = None
        key = "enforce"
    else:
        pam_stack.config["profiles"] = {pam_stack.service: {"enforce": None}}
        key = f"profiles.{pam_stack.service}.enforce"
    pam_stack._write_config()
    error = str(pam_stack.daemon.reload()["last_error"])
    assert f"{key}: has no value" in error and str(pam_stack.config_path) in error, error
    assert pam_stack.login(plain, "123456").auth == "PAM_AUTH_ERR"
    assert pam_stack.login(enrolled, wrong(code_at(SECRET, time.time()))).auth == "PAM_AUTH_ERR"
