"""SSH logins through a real OpenSSH sshd with pam-linkus in its PAM stack.

The /etc/pam.d lines and sshd_config settings are the ones docs/guide.md shows
("sshd, console, su and sudo"): password + code over keyboard-interactive, and
public key + code with ``AuthenticationMethods publickey,keyboard-interactive``.
"""

from __future__ import annotations

import socket
import time

import paramiko
import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at
from sshd_server import KEY_AND_CODE, PASSWORD_AND_CODE, SshServer, ssh_login, sshd_factory  # noqa: F401

pytestmark = pytest.mark.pam


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


@pytest.fixture
def password_server(sshd_factory: object) -> SshServer:  # noqa: F811
    return sshd_factory(PASSWORD_AND_CODE, "keyboard-interactive")  # type: ignore[operator,no-any-return]


@pytest.fixture
def key_server(sshd_factory: object) -> SshServer:  # noqa: F811
    return sshd_factory(KEY_AND_CODE, "publickey,keyboard-interactive")  # type: ignore[operator,no-any-return]


# -- password + code ---------------------------------------------------------------


def test_password_and_right_code_runs_the_command(password_server: SshServer, pam_stack: PamStack,
                                                  user: str) -> None:
    pam_stack.enroll_totp(user)
    login = ssh_login(password_server, user, code=code_at(SECRET, time.time()))
    assert login.prompts == ["Password: ", "Authentication code: "]
    assert login.output.split() == ["linkus-ok", user] and login.exit_status == 0
    line = pam_stack.log.wait_for(f"user={user}")
    assert f"service={pam_stack.service}" in line and "rhost=127.0.0.1" in line and "outcome=success" in line
    assert f"Accepted keyboard-interactive/pam for {user} from 127.0.0.1" in password_server.log()


def test_wrong_and_replayed_codes_are_refused(password_server: SshServer, pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(password_server, user, code=wrong(code))
    assert ssh_login(password_server, user, code=code).exit_status == 0
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(password_server, user, code=code)
    assert "replayed code" in pam_stack.log.wait_for("replayed")


def test_wrong_password_never_reaches_the_code(password_server: SshServer, pam_stack: PamStack,
                                               user: str) -> None:
    pam_stack.enroll_totp(user)
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(password_server, user, password="wrong", code=code_at(SECRET, time.time()))
    time.sleep(0.5)  # pam-linkus was never run, so it logged nothing
    assert not [line for line in pam_stack.log.lines if f"user={user}" in line]


def test_exempt_network_and_grace_period_over_ssh(password_server: SshServer, pam_stack: PamStack,
                                                  user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_stack.write_config(grace_period=600)
    assert ssh_login(password_server, user, code=code_at(SECRET, time.time())).exit_status == 0
    login = ssh_login(password_server, user, code=None)  # within the grace period: password only
    assert login.prompts == ["Password: "] and login.exit_status == 0
    assert 'reason=grace period' in pam_stack.log.wait_for("grace period")

    pam_stack.write_config(grace_period=0, exempt_networks=["127.0.0.0/8"])
    login = ssh_login(password_server, user, code=None)
    assert login.prompts == ["Password: "] and login.exit_status == 0
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(password_server, user, password="wrong", code=None)


# -- public key + code -------------------------------------------------------------


def test_key_and_right_code_without_a_password(key_server: SshServer, pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    key = key_server.authorize(user)
    login = ssh_login(key_server, user, key=key, password=None, code=code_at(SECRET, time.time()))
    assert login.remaining == ["keyboard-interactive"]  # the key alone was a partial success
    assert login.prompts == ["Authentication code: "]  # pam_unix is skipped on this path
    assert login.output.split() == ["linkus-ok", user]
    assert f"Accepted keyboard-interactive/pam for {user} from 127.0.0.1" in key_server.log()


def test_key_without_a_right_code_is_refused(key_server: SshServer, pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    key = key_server.authorize(user)
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(key_server, user, key=key, keyboard_interactive=False)  # key only, no code
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(key_server, user, key=key, code="")
    code = code_at(SECRET, time.time())
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(key_server, user, key=key, code=wrong(code))
    assert ssh_login(key_server, user, key=key, code=code).exit_status == 0
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(key_server, user, key=key, code=code)  # replayed


def test_code_without_the_key_is_refused(key_server: SshServer, pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    key_server.authorize(user)
    with pytest.raises(paramiko.BadAuthenticationType) as info:
        ssh_login(key_server, user, code=code_at(SECRET, time.time()))
    assert info.value.allowed_types == ["publickey"]


def test_extension_without_2fa_gives_key_and_password(key_server: SshServer, pam_stack: PamStack,
                                                      user: str) -> None:
    key = key_server.authorize(user)
    login = ssh_login(key_server, user, key=key, password=PASSWORD)
    assert login.prompts == ["Password: "] and login.exit_status == 0
    with pytest.raises(paramiko.AuthenticationException):
        ssh_login(key_server, user, key=key, password="wrong")


# -- LoginGraceTime ----------------------------------------------------------------


def test_login_grace_time_ends_an_unanswered_code_prompt(sshd_factory: object, pam_stack: PamStack,  # noqa: F811
                                                          user: str) -> None:
    server: SshServer = sshd_factory(PASSWORD_AND_CODE, "keyboard-interactive",  # type: ignore[operator]
                                     login_grace_time=3)
    pam_stack.enroll_totp(user)
    code = code_at(SECRET, time.time())

    def slow_code() -> str:
        time.sleep(8)  # the user walks away from the prompt
        return code

    started = time.monotonic()
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        ssh_login(server, user, code=slow_code)
    assert time.monotonic() - started < 30
    # sshd ended the login before an answer came: nothing was recorded, the code is still good
    assert not [line for line in pam_stack.log.lines if "outcome=success" in line]
    assert ssh_login(server, user, code=code).exit_status == 0


# -- the "password" method must stay off --------------------------------------------


def test_password_method_cannot_skip_the_code_but_counts_failures(sshd_factory: object,  # noqa: F811
                                                                   pam_stack: PamStack, user: str) -> None:
    """With PasswordAuthentication yes, sshd answers EVERY hidden PAM prompt with the
    password, so the code prompt gets the password: always refused, and counted as a
    wrong code (lockout). docs/guide.md: keep PasswordAuthentication no."""
    server: SshServer = sshd_factory(PASSWORD_AND_CODE, "password",  # type: ignore[operator]
                                     password_authentication=True)
    pam_stack.enroll_totp(user)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(user, PASSWORD)
    finally:
        transport.close()
    line = pam_stack.log.wait_for(f"user={user}")
    assert "outcome=denied" in line and "malformed code (1 consecutive failures)" in line
