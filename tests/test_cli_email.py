"""`linkus-2fa enroll --method email`: a real mail through a real SMTP server, the code typed on a pty,
then a login through real PAM with an emailed code."""

from __future__ import annotations

from typing import Any

import pexpect
import pytest
import yaml
from cli_helpers import finish, spawn_cli
from conftest import PASSWORD, PamStack
from pam_conversation import converse
from smtp_server import code_in
from test_pam_email import setup_email

pytestmark = [pytest.mark.pam, pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")]


def entry(stack: PamStack, user: str) -> Any:
    return yaml.safe_load(stack.extensions_path.read_text())["extensions"].get(user)


def test_email_enrollment_saves_only_after_the_mailed_code(pam_stack: PamStack, user: str, smtp_server: Any,
                                                         ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    child = spawn_cli(pam_stack, "enroll", user, "--method", "email", "--address", "alice@example.com")
    child.expect("A verification code was sent to a\\*\\*\\*@example.com.")
    child.expect("Enter the code from the email: ")
    assert entry(pam_stack, user) is None  # nothing saved yet
    mail = server.wait_for_message(1)
    assert mail["to"] == ["alice@example.com"]
    child.sendline(code_in(mail))
    child.expect("Edited successfully.")
    assert finish(child)[0] == 0
    assert entry(pam_stack, user) == {"method": "email", "email": "alice@example.com"}
    assert 'method=email' in pam_stack.log.wait_for(f'action=enroll ext={user}')

    notice = server.wait_for_subject("New two-factor method")  # the owner is told (pam_linkus.notify)
    assert notice["to"] == ["alice@example.com"] and "the administrator (root)" in notice["message"].get_content()
    assert code_in(mail) not in notice["message"].get_content()
    result = converse(pam_stack.service, user, PASSWORD,
                      lambda prompt, messages: code_in(server.wait_for_subject("Verification code", 2)))
    assert (result.auth, result.account) == ("PAM_SUCCESS", "PAM_SUCCESS")


def test_a_wrong_email_code_saves_nothing(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    before = pam_stack.extensions_path.read_bytes()
    child = spawn_cli(pam_stack, "enroll", user, "--method", "email", "--address", "alice@example.com")
    code = code_in(server.wait_for_message(1))
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(3):
        index = child.expect(["Enter the code from the email: ", pexpect.EOF])
        if index == 1:
            break
        child.sendline(wrong)
    rc, output = finish(child)
    assert rc == 1 and "nothing was saved" in output
    assert pam_stack.extensions_path.read_bytes() == before


def test_changing_the_address_switches_email_2fa_off_until_confirmed(pam_stack: PamStack, user: str,
                                                                    smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    pam_stack.extensions[user] = {"method": "email", "email": "old@example.com"}
    pam_stack.write_extensions()
    child = spawn_cli(pam_stack, "enroll", user, "--method", "email", "--address", "new@example.com")
    child.expect("is off until the new address is confirmed")
    child.expect("Enter the code from the email: ")
    assert entry(pam_stack, user) == {"method": "email", "email": "new@example.com", "enabled": False}
    mail = server.wait_for_message(1)
    assert mail["to"] == ["new@example.com"]
    child.sendline(code_in(mail))
    child.expect("Edited successfully.")
    assert finish(child)[0] == 0
    assert entry(pam_stack, user) == {"method": "email", "email": "new@example.com"}
    # the new address is told, and so is the one on file before (whoever did it may own only the new one)
    notices = [server.wait_for_subject("New two-factor method", n) for n in (1, 2)]
    assert sorted(n["to"][0] for n in notices) == ["new@example.com", "old@example.com"]
    old_notice = next(n for n in notices if n["to"] == ["old@example.com"])["message"].get_content()
    assert "address on file before this change" in old_notice and code_in(mail) not in old_notice
    assert 'result=email-2fa-off-until-confirmed' in pam_stack.log.wait_for('action=email-address-changed')


def test_the_address_comes_from_the_source_when_not_given(pam_stack: PamStack, user: str, smtp_server: Any,
                                                          ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    pam_stack.enroll_totp(user, email="bob@example.org", enabled=False)
    child = spawn_cli(pam_stack, "enroll", user, "--method", "email")
    child.expect("Enter the code from the email: ")
    mail = server.wait_for_message(1)
    assert mail["to"] == ["bob@example.org"]
    child.sendline(code_in(mail))
    assert finish(child)[0] == 0
    assert entry(pam_stack, user) == {"method": "email", "email": "bob@example.org"}
