"""Email codes through real libpam + pam_linkus.so (pam_unix requisite, then pam_linkus),
delivered by a real aiosmtpd server on 127.0.0.1 with STARTTLS / implicit TLS and AUTH."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, SECRET, PamStack, code_at
from pam_conversation import Conversation, converse
from smtp_server import EndlessGreeting, SmtpServer, closed_port, code_in

pytestmark = [pytest.mark.pam, pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")]

ADDRESS = "alice@example.com"


def setup_email(stack: PamStack, server: SmtpServer | None, ca: Any, *, port: int | None = None,
                security: str = "starttls", auth: bool = True, **email: Any) -> None:
    """Point the stack's config at ``server`` (with AUTH from a root-only password file)."""
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": port or (server.port if server else 0),
                            "security": security, "from": "pbx@example.com", "timeout": 5, "helo": "pbx.test"}
    if security != "none":
        smtp["ca_file"] = str(ca.ca_file)
    if auth and server is not None:
        pw = stack.root / "smtp.pw"
        pw.write_text(server.password + "\n")
        os.chmod(pw, 0o600)
        smtp.update(username="pbx-mailer", password_file=str(pw))
    stack.write_config(smtp=smtp, email={"key_file": str(stack.root / "email.key"), **email},
                       lockout={"max_failures": 10, "duration": 900})


def enroll_email(stack: PamStack, user: str, address: str = ADDRESS) -> None:
    stack.extensions[user] = {"method": "email", "email": address}
    stack.write_extensions()


def login(stack: PamStack, user: str, answer: Any, *, password: str = PASSWORD) -> Conversation:
    return converse(stack.service, user, password, answer, rhost="192.0.2.44")


def mailed_code(server: SmtpServer, count: int = 1) -> Any:
    """An answer callback: the code from the ``count``-th mail (waited for)."""
    return lambda prompt, messages: code_in(server.wait_for_subject("Verification code", count))


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_code_arrives_and_logs_in(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any,
                                  security: str) -> None:
    server = smtp_server(security=security, auth=True)
    setup_email(pam_stack, server, ca, security=security)
    enroll_email(pam_stack, user)
    result = login(pam_stack, user, mailed_code(server))
    assert (result.auth, result.account) == ("PAM_SUCCESS", "PAM_SUCCESS")
    assert result.prompts == ["Password: ", "Email code: "]
    assert result.messages == ["A verification code was sent to a***@example.com."]
    mail = server.wait_for_message()
    code = code_in(mail)
    assert mail["to"] == [ADDRESS] and mail["tls"] is True and mail["auth"] == b"pbx-mailer"
    assert mail["message"]["Subject"] == f"Verification code for {user} on {os.uname().nodename}"
    body = mail["message"].get_content()
    assert "192.0.2.44" in body and user in body and code not in mail["message"]["Subject"]
    line = pam_stack.log.wait_for(f"user={user}")
    assert "outcome=success" in line and "method=email" in line and code not in line


def test_reused_code_is_refused(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    enroll_email(pam_stack, user)
    assert login(pam_stack, user, mailed_code(server)).auth == "PAM_SUCCESS"
    used = code_in(server.wait_for_message(1))
    second = login(pam_stack, user, lambda p, m: used)
    if code_in(server.wait_for_message(2)) != used:  # a new code was mailed; the old one is spent
        assert second.auth == "PAM_AUTH_ERR"
        assert 'reason=wrong code (1 consecutive failures)' in pam_stack.log.wait_for("outcome=denied")


def test_code_of_another_extension_is_refused(pam_stack: PamStack, make_user: Any, smtp_server: Any,
                                              ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)
    alice, bob = make_user(), make_user()
    enroll_email(pam_stack, alice)
    enroll_email(pam_stack, bob, "bob@example.org")
    assert login(pam_stack, alice, lambda p, m: None).auth == "PAM_CONV_ERR"  # alice's code stays pending
    alice_code = code_in(server.wait_for_message(1))
    result = login(pam_stack, bob, lambda p, m: alice_code)
    assert server.wait_for_message(2)["to"] == ["bob@example.org"]
    if code_in(server.wait_for_message(2)) != alice_code:
        assert result.auth == "PAM_AUTH_ERR"


def test_too_many_attempts_kill_the_code(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, max_attempts=2)
    enroll_email(pam_stack, user)
    assert login(pam_stack, user, lambda p, m: "wrong").auth == "PAM_AUTH_ERR"
    second = login(pam_stack, user, lambda p, m: "wrong")  # throttled: the pending code, second attempt
    assert second.auth == "PAM_AUTH_ERR" and "still valid" in second.messages[0]
    third = login(pam_stack, user, mailed_code(server))  # the right code, too late: it is gone
    assert third.auth == "PAM_AUTH_ERR" and third.prompts == ["Password: "]  # throttled, nothing to type
    assert len(server.messages) == 1


def test_throttle_keeps_the_last_code_working(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)  # default: one mail per 60 s
    enroll_email(pam_stack, user)
    assert login(pam_stack, user, lambda p, m: "000000x").auth == "PAM_AUTH_ERR"
    again = login(pam_stack, user, mailed_code(server))
    assert again.auth == "PAM_SUCCESS"
    assert again.messages == ["The code sent to a***@example.com a moment ago is still valid; no new code was sent."]
    third = login(pam_stack, user, lambda p, m: "123456")
    assert third.auth == "PAM_AUTH_ERR" and third.prompts == ["Password: "]
    assert len(third.messages) == 1 and third.messages[0].startswith("No new code can be sent yet; try again in ")
    assert "outcome=denied" in pam_stack.log.wait_for("email code throttled")
    time.sleep(0.3)
    assert len(server.messages) == 1


def test_a_login_right_after_an_email_login_is_told_to_wait(pam_stack: PamStack, user: str, smtp_server: Any,
                                                            ca: Any) -> None:
    """Issue 17/4 through real PAM: the code of the first login is spent and the next mail is a minute
    away: a clear denial that says how long to wait, never "unavailable" (not an outage)."""
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)  # default: one mail per 60 s
    enroll_email(pam_stack, user)
    assert login(pam_stack, user, mailed_code(server)).auth == "PAM_SUCCESS"
    again = login(pam_stack, user, lambda p, m: "123456")
    assert again.auth == "PAM_AUTH_ERR" and again.prompts == ["Password: "]  # no code prompt: nothing to type
    seconds = int(again.messages[0].removeprefix("No new code can be sent yet; try again in ").removesuffix(" s."))
    assert 0 < seconds <= 60, again.messages
    line = pam_stack.log.wait_for("email code throttled")
    assert "outcome=denied" in line and "unavailable" not in line
    assert len(server.messages) == 1


def test_failures_lock_the_extension(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca, send_interval=0)
    pam_stack.write_config(lockout={"max_failures": 2, "duration": 900})
    enroll_email(pam_stack, user)
    assert [login(pam_stack, user, lambda p, m: "999999x").auth for _ in range(2)] == ["PAM_AUTH_ERR",
                                                                                       "PAM_MAXTRIES"]
    # the lock mails the owner once (pam_linkus.notify), off the login's path, with no code in it
    notice = server.wait_for_subject("locked after wrong codes")
    text = notice["message"].get_content()
    assert notice["to"] == [ADDRESS] and "knows the password" in " ".join(text.split())
    assert code_in(server.wait_for_subject("Verification code", 2)) not in text
    assert login(pam_stack, user, mailed_code(server, 2)).auth == "PAM_MAXTRIES"
    assert len(server.with_subject("Verification code")) == 2  # a locked extension gets no code mail
    assert len(server.messages) == 3  # and the refused login while locked is no new lock: no second notice


def test_smtp_down_is_unavailable_and_leaves_no_code(pam_stack: PamStack, user: str, smtp_server: Any,
                                                     ca: Any) -> None:
    setup_email(pam_stack, None, ca, port=closed_port())
    enroll_email(pam_stack, user)
    result = login(pam_stack, user, lambda p, m: "123456")
    assert result.auth == "PAM_AUTHINFO_UNAVAIL" and result.prompts == ["Password: "]
    line = pam_stack.log.wait_for("outcome=unavailable")
    assert "Connection refused" in line and line.startswith("<83>")  # authpriv.err
    # The failed send counted toward no throttle and left no code: once SMTP is back, a login works.
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)
    assert login(pam_stack, user, mailed_code(server)).auth == "PAM_SUCCESS"


def test_untrusted_certificate_sends_nothing(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True, cert="untrusted")
    setup_email(pam_stack, server, ca)
    enroll_email(pam_stack, user)
    result = login(pam_stack, user, lambda p, m: "123456")
    assert result.auth == "PAM_AUTHINFO_UNAVAIL" and result.prompts == ["Password: "]
    assert "TLS certificate not trusted" in pam_stack.log.wait_for("outcome=unavailable")
    assert server.messages == [] and server.auth_attempts == 0


def test_header_injection_address_sends_nothing(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)
    # Refused when the file is loaded (issue 12.8), naming file:line:col and never the value:
    # linkusd keeps the last good settings, where the extension has no email 2FA yet.
    pam_stack.extensions[user] = {"method": "email", "email": "alice@example.com\r\nBcc: eve@evil.test"}
    pam_stack._write_extensions()
    error = str(pam_stack.daemon.reload()["last_error"])
    assert f"{pam_stack.extensions_path}:" in error and "email" in error and "evil" not in error
    line = pam_stack.log.wait_for("configuration not loaded")
    assert "evil" not in line
    login(pam_stack, user, lambda p, m: "123456")
    time.sleep(0.3)
    assert server.messages == []


def test_wrong_password_sends_no_mail(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)
    enroll_email(pam_stack, user)
    result = login(pam_stack, user, lambda p, m: "123456", password="not-the-password")
    assert result.auth == "PAM_AUTH_ERR" and result.prompts == ["Password: "]
    time.sleep(0.5)
    assert server.messages == []  # pam_linkus never ran: no attempt line
    assert not [line for line in pam_stack.log.lines if f'user="{user}"' in line]
    # and the throttle was not touched: the right password right after gets a mail at once
    assert login(pam_stack, user, mailed_code(server)).auth == "PAM_SUCCESS"


def test_email_key_is_created_root_only(pam_stack: PamStack, user: str, smtp_server: Any, ca: Any) -> None:
    server = smtp_server(auth=True)
    setup_email(pam_stack, server, ca)
    enroll_email(pam_stack, user)
    assert login(pam_stack, user, mailed_code(server)).auth == "PAM_SUCCESS"
    st = Path(pam_stack.root / "email.key").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)


def test_two_hosts_share_codes_and_throttles_through_redis(make_user: Any, smtp_server: Any, ca: Any,
                                                           redis_server: Any) -> None:
    """Host A mails a code; at host B (throttled cluster-wide) that code logs in, once."""
    import shutil

    from conftest import LogCatcher, make_private_dir, require_root

    require_root()
    server = smtp_server(auth=True)
    user = make_user()
    made = []
    try:
        for _ in range(2):
            root = make_private_dir()
            log = LogCatcher(root / "log.sock")
            stack = PamStack(root, log)
            made.append((root, log, stack))
            setup_email(stack, server, ca)
            stack.write_config(state={"backend": "redis", "redis": {"url": redis_server.url, "prefix": "pbx:"}})
            enroll_email(stack, user)
        a, b = (stack for _, _, stack in made)
        assert login(a, user, lambda p, m: "000000x").auth == "PAM_AUTH_ERR"
        shutil.copy2(a.root / "email.key", b.root / "email.key")  # docs/guide.md: one key for the cluster
        at_b = login(b, user, mailed_code(server))
        assert at_b.auth == "PAM_SUCCESS" and "still valid" in at_b.messages[0]
        assert login(a, user, mailed_code(server)).auth == "PAM_AUTH_ERR"  # spent, and throttled
        assert len(server.messages) == 1
    finally:
        for root, log, stack in made:
            stack.remove()
            log.close()
            shutil.rmtree(root, ignore_errors=True)


def test_a_stalled_mail_server_holds_up_no_other_login(pam_stack: PamStack, make_user: Any, ca: Any) -> None:
    """linkusd runs the steps of a YAML + SQLite login on its event loop; the flow announces the
    SMTP call (flow.Offload) and that part runs in the worker pool. So while one email login
    waits for a mail server whose greeting never ends, TOTP logins on the same linkusd go
    through at once (were the call on the loop, they would wait for its 5 s deadline)."""
    slow = EndlessGreeting(pause=0.2)
    try:
        setup_email(pam_stack, None, ca, port=slow.port, security="none", auth=False)
        mailer, other = make_user(), make_user()
        enroll_email(pam_stack, mailer)
        pam_stack.enroll_totp(other)
        stalled: list[Conversation] = []
        thread = threading.Thread(target=lambda: stalled.append(login(pam_stack, mailer, lambda p, m: "123456")))
        thread.start()
        deadline = time.monotonic() + 5
        while slow.lines_sent < 2 and time.monotonic() < deadline:  # linkusd is inside the SMTP call now
            time.sleep(0.02)
        assert slow.lines_sent >= 2
        code = code_at(SECRET, time.time())
        for expected in ("PAM_SUCCESS", "PAM_AUTH_ERR"):  # the code, then its replay
            started = time.monotonic()
            assert pam_stack.login(other, code).auth == expected
            assert time.monotonic() - started < 1.5, "a TOTP login waited for the stalled SMTP call"
        assert thread.is_alive()  # the email login is still waiting for its mail server
        thread.join(30)
        assert stalled and stalled[0].auth == "PAM_AUTHINFO_UNAVAIL"
        assert "timed out after 5 s" in pam_stack.log.wait_for(f"user={mailer}")
    finally:
        slow.close()
