"""SelfService (linkusd's web ops) on the real Engine, real PAM password checks, real
YAML source and SQLite state, aiosmtpd for mail; the clock is injected."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import PASSWORD, code_at
from smtp_server import code_in
from web_site import Api, Site, logged

from pam_linkus.daemon import selfservice as web_api

CLIENT = "192.0.2.10"


def signed_in(api: Api, user: str) -> dict[str, Any]:
    reply = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert reply["ok"] and reply["state"] == "in", (reply, api.site.log.take())
    return reply


def sess(reply: dict[str, Any]) -> dict[str, str]:
    return {"session": reply["session"], "csrf": reply["csrf"], "client": CLIENT}


def test_totp_enrollment_saves_only_the_confirmed_secret(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user, email="ext@example.com")
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enroll_method", method="totp", **{k: me[k] for k in ("session", "csrf")})["error"] == "step"
    assert api("enroll_start", password="wrong", **me)["error"] == "denied"
    assert api("status", session=me["session"])["pending"] is None
    assert api("enroll_start", password=PASSWORD, **me) == {"ok": True}
    view = api("enroll_method", method="totp", session=me["session"], csrf=me["csrf"])
    secret = view["secret"]
    assert len(secret) * 5 >= 160 and view["uri"].startswith("otpauth://totp/") and f"secret={secret}" in view["uri"]
    bad = api("enroll_confirm", code="000000" if code_at(secret, api.clock.now) != "000000" else "111111", **me)
    assert bad == {"ok": False, "error": "denied", "tries_left": 2}
    assert api.store().lock_status(user, api.clock.now).failures == 1  # wrong codes count towards the lockout
    assert s.entry(user) == {"method": "none", "email": "ext@example.com"}  # nothing saved
    assert api("enroll_confirm", code=code_at(secret, api.clock.now), **me) == {"ok": True, "method": "totp"}
    assert s.entry(user) == {"email": "ext@example.com", "method": "totp", "secret": secret}
    status = api("status", session=me["session"])
    assert status["enabled"] and status["method"] == "totp" and status["since"] == api.clock.now
    assert status["pending"] is None and secret not in str(status)  # the secret is never shown again
    assert logged(s.log, action="enroll", confirmed="yes")["ext"] == user
    assert all(secret not in line for line in s.log.lines)


def test_sign_in_with_2fa_runs_the_login_flow_and_refuses_a_replay(api: Api, site: tuple[Site, Any],
                                                                   user: str) -> None:
    s, _smtp = site
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    s.add(user, method="totp", secret=secret)
    api.reload()
    first = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert first["ok"] and first["state"] == "code" and first["prompt"], (first, s.log.take())
    wrong = api("sign_in_code", code="12345x", **sess(first))
    assert wrong == {"ok": False, "error": "denied"}
    assert api.store().lock_status(user, api.clock.now).failures == 1
    assert api("status", session=first["session"])["error"] == "expired"  # a wrong code ends that sign-in
    second = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    code = code_at(secret, api.clock.now)
    done = api("sign_in_code", code=code, **sess(second))
    assert done["ok"] and done["state"] == "in"
    assert api.store().lock_status(user, api.clock.now).failures == 0
    third = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert api("sign_in_code", code=code, **sess(third))["error"] == "denied"  # replayed


def test_idle_sessions_expire_and_csrf_is_checked(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user)
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enroll_start", password=PASSWORD, session=me["session"], csrf="x" * 43,
               client=CLIENT)["error"] == "bad-request"
    assert api("status", session=me["session"])["pending"] is None
    assert logged(s.log, action="csrf-refused")["ext"] == user
    api.clock.now += web_api.SESSION_IDLE - 1
    assert api("status", session=me["session"])["ok"]  # activity keeps it alive
    api.clock.now += web_api.SESSION_IDLE + 1
    assert api("status", session=me["session"]) == {"ok": False, "error": "expired"}


def test_only_extension_accounts_are_served(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add("root")
    s.add("daemon")
    api.reload()
    answers = [api("sign_in", ext=name, password=PASSWORD, client=CLIENT) for name in ("root", "daemon", user)]
    assert answers == [{"ok": False, "error": "denied"}] * 3  # root, a system account, not in the settings
    assert logged(s.log, ext="root")["result"] == "system-account"
    assert logged(s.log, ext=user)["result"] == "not-an-extension"


def test_malformed_requests_are_refused(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user)
    api.reload()
    me = sess(signed_in(api, user))
    assert api("set_secret", **me)["error"] == "bad-request"
    assert api("status", session=me["session"], ext="someone")["error"] == "bad-request"  # no ext on session ops
    assert api("sign_in", ext=user, password=7, client=CLIENT)["error"] == "bad-request"
    assert api("sign_in", ext=user, password="p" * 600, client=CLIENT)["error"] == "bad-request"
    assert api("sign_in", ext=user, client=CLIENT)["error"] == "bad-request"


def test_wrong_passwords_are_throttled_but_never_lock(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user, method="totp", secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    api.reload()
    for _ in range(web_api.MAX_FAILURES_PER_EXT):
        assert api("sign_in", ext=user, password="wrong", client=CLIENT)["error"] == "denied"
    refused = api("sign_in", ext=user, password=PASSWORD, client="198.51.100.7")
    assert refused["error"] == "throttled" and 0 < refused["retry_after"] <= web_api.FAILURE_WINDOW + 1
    assert api.store().lock_status(user, api.clock.now).failures == 0  # not the extension's lockout
    assert logged(s.log, action="self-check")["result"] == "wrong-password"
    assert all("wrong\"" not in line and "=wrong " not in line for line in s.log.lines)  # no password logged
    api.clock.now += web_api.FAILURE_WINDOW + 1
    assert api("sign_in", ext=user, password=PASSWORD, client=CLIENT)["state"] == "code"


def test_email_enrollment_disable_and_recovery_codes(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, smtp = site
    s.add(user, email="owner@example.com")
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enroll_start", password=PASSWORD, **me)["ok"]
    assert api("enroll_method", method="email", session=me["session"], csrf=me["csrf"]) == {
        "ok": True, "email": "o***@example.com"}
    assert api("enroll_confirm", code="123456", **me)["error"] == "step"  # Save before Send
    assert api("email_send", address="new@example.org", **me) == {"ok": True, "sent_to": "n***@example.org"}
    mail = smtp.wait_for_message(1)
    assert mail["to"] == ["new@example.org"]
    assert api("enroll_confirm", code=code_in(mail), **me) == {"ok": True, "method": "email"}
    assert s.entry(user) == {"method": "email", "email": "new@example.org"}
    enrolled = smtp.wait_for_message(2)  # the owner is told (pam_linkus.notify), at the new address
    assert enrolled["to"] == ["new@example.org"] and "New two-factor method" in enrolled["message"]["Subject"]
    assert code_in(mail) not in enrolled["message"].get_content()
    # and at the address on file before: whoever moved the codes may own only the new one
    told_before = smtp.wait_for_message(3)
    assert told_before["to"] == ["owner@example.com"] and "New two-factor method" in told_before["message"]["Subject"]
    assert "address on file before this change" in told_before["message"].get_content()
    assert code_in(mail) not in told_before["message"].get_content()

    assert api("recovery_codes", password="wrong", **me)["error"] == "denied"
    codes = api("recovery_codes", password=PASSWORD, **me)["codes"]
    assert len(codes) == 10 and api.store().recovery_codes_left(user) == 10
    renewed = smtp.wait_for_message(4)
    assert renewed["to"] == ["new@example.org"] and "New recovery codes" in renewed["message"]["Subject"]
    assert not any(c.replace("-", "") in renewed["message"].get_content().replace("-", "") for c in codes)

    assert api("disable", password="wrong", **me)["error"] == "denied"
    assert s.entry(user).get("enabled", True) is True
    assert api("disable", password=PASSWORD, **me) == {"ok": True}
    assert s.entry(user) == {"method": "email", "email": "new@example.org", "enabled": False}
    notice = smtp.wait_for_message(5)
    assert notice["to"] == ["new@example.org"] and "switched off" in notice["message"]["Subject"]
    assert api.store().recovery_codes_left(user) == 0
    assert logged(s.log, action="disable")["ext"] == user
    assert all(c.replace("-", "") not in line.replace("-", "") for c in codes for line in s.log.lines)


def test_a_pam_service_that_loads_pam_linkus_is_refused(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user)
    api.reload()
    from pathlib import Path

    Path("/etc/pam.d", s.service).write_text("auth required pam_unix.so\nauth required pam_linkus.so\n")
    assert api("sign_in", ext=user, password=PASSWORD, client=CLIENT) == {"ok": False, "error": "unavailable"}
    assert "pam_linkus" in logged(s.log, action="unavailable")["reason"]


def test_the_client_address_is_throttled_across_extensions(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user)
    api.reload()
    for n in range(web_api.MAX_FAILURES_PER_CLIENT):
        assert api("sign_in", ext=f"nobody{n}", password="x", client="203.0.113.9")["error"] == "denied"
    assert api("sign_in", ext=user, password=PASSWORD, client="203.0.113.9")["error"] == "throttled"
    assert api("sign_in", ext=user, password=PASSWORD, client=CLIENT)["state"] == "in"  # others are not


@pytest.mark.parametrize("shared", ["unix", "127.0.0.1", "::1"])
def test_an_address_everyone_shares_throttles_nobody(api: Api, site: tuple[Site, Any], user: str,
                                                      shared: str) -> None:
    """Behind a proxy linkus-web does not trust (or on its unix socket) every browser arrives as one
    address: wrong passwords from it must not throttle everybody; the per-extension limit still holds."""
    s, _smtp = site
    s.add(user)
    api.reload()
    for n in range(web_api.MAX_FAILURES_PER_CLIENT + 5):
        assert api("sign_in", ext=f"nobody{n}", password="x", client=shared)["error"] == "denied"
    assert api("sign_in", ext=user, password=PASSWORD, client=shared)["state"] == "in"
    for _n in range(web_api.MAX_FAILURES_PER_EXT):
        assert api("sign_in", ext=user, password="wrong", client=shared)["error"] == "denied"
    assert api("sign_in", ext=user, password=PASSWORD, client=shared)["error"] == "throttled"


def test_the_failure_table_is_bounded_and_keeps_real_extensions() -> None:
    """Unknown names and addresses come from the client: a flood of new ones stays within the cap and
    forgets the oldest of them, never a real extension's count."""
    table = web_api._FailureTable(cap=100)
    for _n in range(5):
        table.add("ext:1001", 1.0)
    for n in range(10_000):
        table.add(f"name:probe{n}", 2.0)
        table.add(f"ip:198.51.{n // 250}.{n % 250}", 2.0)
    assert len(table) == 101
    times = table.get("ext:1001")
    assert times is not None and len(times) == 5
    assert table.get("name:probe0") is None and table.get("ip:198.51.39.249") is not None


def test_included_pam_files_are_followed(tmp_path: Any) -> None:
    from pam_linkus.password import ServiceRefused, check_service

    (tmp_path / "svc").write_text("@include common-pw\nauth required pam_permit.so\n")
    (tmp_path / "common-pw").write_text("auth required pam_unix.so  # not pam_linkus, a comment\n")
    check_service("svc", str(tmp_path))
    (tmp_path / "common-pw").write_text("auth substack deeper\n")
    (tmp_path / "deeper").write_text("auth [default=die] pam_linkus.so\n")
    with pytest.raises(ServiceRefused, match="pam_linkus"):
        check_service("svc", str(tmp_path))
    with pytest.raises(ServiceRefused):
        check_service("absent", str(tmp_path))  # libpam would fall back to "other"


def test_an_include_libpam_reads_in_any_case_is_followed(tmp_path: Any) -> None:
    """libpam matches the type without regard to case and splits at tabs: ``AUTH include inner``
    and ``auth<TAB>INCLUDE`` pull in ``inner``; a service that loads pam_linkus that way is refused."""
    from pam_linkus.password import ServiceRefused, check_service

    (tmp_path / "inner").write_text("auth [default=die] pam_linkus.so\n")
    for line in ("AUTH include inner", "auth\tINCLUDE inner", "Auth Substack inner", "@INCLUDE inner",
                 "auth include \\\ninner"):
        (tmp_path / "svc").write_text(f"auth required pam_unix.so\n{line}\n")
        with pytest.raises(ServiceRefused, match="pam_linkus"):
            check_service("svc", str(tmp_path))


def test_one_answer_per_code_prompt_even_in_parallel(api: Api, site: tuple[Site, Any], user: str) -> None:
    import asyncio

    s, _smtp = site
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    s.add(user, method="totp", secret=secret)
    api.reload()
    first = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    request = {"op": "sign_in_code", "code": code_at(secret, api.clock.now), **sess(first)}

    async def twice() -> list[dict[str, object]]:
        return list(await asyncio.gather(api.service.call(dict(request), 0), api.service.call(dict(request), 0)))

    both = api.loop.run_until_complete(twice())
    assert sorted(str(r.get("state") or r.get("error")) for r in both) == ["in", "step"]


def test_names_like_none_never_throttle_other_extensions(api: Api, site: tuple[Site, Any], user: str) -> None:
    """A per-extension key is never derived from a missing value (issue 17.1): failures under names
    like ``None`` or ``null`` throttle those names only; an empty name or client is refused, not counted."""
    s, _smtp = site
    s.add(user)
    api.reload()
    for n, name in enumerate(("None", "null", "undefined")):
        for _ in range(web_api.MAX_FAILURES_PER_EXT):
            reply = api("sign_in", ext=name, password="x", client=f"198.51.100.{n + 1}")
            assert reply == {"ok": False, "error": "denied"}, reply
    for _ in range(web_api.MAX_FAILURES_PER_EXT + 1):
        assert api("sign_in", ext="", password="x", client="198.51.100.9")["error"] == "bad-request"
        assert api("sign_in", ext=user, password="x", client="")["error"] == "bad-request"
    # that name only, in every spelling the sources would take for it
    assert api("sign_in", ext="NONE", password="x", client="192.0.2.99")["error"] == "throttled"
    assert logged(s.log, action="self-check", result="throttled", ext="NONE")["limit"] == "extension"
    assert signed_in(api, user)["ok"]  # from yet another address: the right password still signs in


def test_parallel_sign_ins_check_at_most_the_limit(api: Api, site: tuple[Site, Any], user: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The attempt is reserved before the password is checked (issue 17.2): 100 parallel wrong
    passwords run at most MAX_FAILURES_PER_EXT checks, and the right password sent while those
    checks are still running is throttled, not signed in."""
    import asyncio

    from pam_linkus import password as web_password

    s, _smtp = site
    s.add(user)
    api.reload()
    api.service.fail_delay = 2.0  # the reserved attempts are still running when the right password comes
    checks: list[str] = []
    real_check = web_password.check_password

    def counted(service: str, name: str, secret: str, pam_dir: str = web_password.PAM_DIR) -> bool:
        checks.append(name)
        return real_check(service, name, secret, pam_dir)

    monkeypatch.setattr(web_password, "check_password", counted)

    def call(password: str, n: int) -> Any:
        request = {"op": "sign_in", "ext": user, "password": password, "client": f"10.0.{n // 250}.{n % 250}"}
        return asyncio.ensure_future(api.service.call(request, 0))

    async def burst() -> tuple[list[dict[str, object]], dict[str, object], int]:
        wrong = [call("wrong", n) for n in range(100)]
        pending = set(wrong)
        for _ in range(100):  # until every attempt past the limit has had its answer
            if len(pending) <= web_api.MAX_FAILURES_PER_EXT:
                break
            _done, pending = await asyncio.wait(pending, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        still_checking = len(pending)
        right = await call(PASSWORD, 999)
        return list(await asyncio.gather(*wrong)), right, still_checking

    answers, right, still_checking = api.loop.run_until_complete(burst())
    words = [str(a.get("error")) for a in answers]
    assert words.count("throttled") == 100 - web_api.MAX_FAILURES_PER_EXT, words
    assert words.count("denied") == web_api.MAX_FAILURES_PER_EXT
    assert len(checks) == web_api.MAX_FAILURES_PER_EXT
    assert still_checking == web_api.MAX_FAILURES_PER_EXT and right["error"] == "throttled", right
    assert logged(s.log, action="self-check", result="throttled")["ext"] == user  # refusals are logged too


def test_a_right_password_gives_its_attempt_back(api: Api, site: tuple[Site, Any], user: str) -> None:
    """Only a wrong password keeps its reserved attempt: the owner signing in often is never throttled."""
    s, _smtp = site
    s.add(user)
    api.reload()
    for _ in range(web_api.MAX_FAILURES_PER_EXT * 2):
        assert signed_in(api, user)["ok"]
    for _ in range(web_api.MAX_FAILURES_PER_EXT - 1):
        assert api("sign_in", ext=user, password="wrong", client=CLIENT)["error"] == "denied"
    assert signed_in(api, user)["ok"]


def test_failures_answer_at_one_deadline_whatever_the_name(site: tuple[Site, Any], user: str) -> None:
    """Timing tells nothing (issue 17.3): a wrong password for a real extension (a real yescrypt
    check through PAM) and an unknown name both answer at the request's deadline. Interleaved,
    bounded samples; the medians differ by less than a third of the password check's own cost."""
    import statistics
    import subprocess
    import time

    s, _smtp = site
    subprocess.run(["chpasswd", "-c", "YESCRYPT"], input=f"{user}:{PASSWORD}\n", text=True, check=True)
    s.add(user)
    driver = Api(s, fail_delay=0.3)
    try:
        def timed(name: str, n: int) -> float:
            start = time.monotonic()
            reply = driver("sign_in", ext=name, password="wrong", client=f"203.0.113.{n}")
            assert reply == {"ok": False, "error": "denied"}, reply
            return time.monotonic() - start

        real, unknown = [], []
        for n in range(8):
            real.append(timed(user, 2 * n))
            unknown.append(timed(f"nobody{user}", 2 * n + 1))
        from pam_linkus.password import check_password

        start = time.monotonic()
        assert not check_password(s.service, user, "wrong")
        cost = time.monotonic() - start
    finally:
        driver.close()
    assert cost > 0.01, cost  # the check is real work, so an answer without a deadline would show it
    assert all(0.3 <= t < 0.3 + 0.15 for t in real + unknown), (real, unknown)
    assert abs(statistics.median(real) - statistics.median(unknown)) < cost / 3, (real, unknown, cost)


def test_sign_out_with_a_stale_form_token_ends_the_session(api: Api, site: tuple[Site, Any], user: str) -> None:
    """Signing out only removes access, so an old tab's token is enough (issue 17.4)."""
    s, _smtp = site
    s.add(user)
    api.reload()
    me = sess(signed_in(api, user))
    assert api("sign_out", session=me["session"], csrf="stale-" + "x" * 37) == {"ok": True}
    assert api("status", session=me["session"]) == {"ok": False, "error": "expired"}


def test_a_deep_or_hostile_json_body_on_web_sock_is_a_bad_request(site: tuple[Site, Any]) -> None:
    """A real linkusd's web socket answers ``bad-request`` to JSON it will not decode (issue 17.12),
    and keeps serving."""
    from daemon_client import connect

    from pam_linkus import protocol
    from pam_linkus.protocol import F, Msg

    s, _smtp = site
    s.stack.daemon.start()
    hostile = [b"[" * 30000 + b"]" * 30000, b'{"op":' + b'{"a":' * 10000 + b"1" + b"}" * 10001,
               b'{"op":"status","session":NaN}', b'{"op":"status","op":"sign_in"}', b'{"op":"status"',
               b'{"op":"status","session":"\\ud800"}', b"\xff", b"[]", b'{"op":' + b"9" * 5000 + b"}"]
    for body in hostile:
        with connect(str(s.web_socket)) as sock:
            sock.sendall(protocol.encode(Msg.WEB_CALL, {F.JSON: body}, max_body=protocol.WEB_MAX_BODY))
            reply = protocol.recv_message(sock, {Msg.WEB_REPLY}, deadline=time_limit(),
                                          max_body=protocol.WEB_MAX_BODY).json()
        assert reply == {"ok": False, "error": "bad-request"}, (body[:40], reply)
    assert protocol.call_web(str(s.web_socket), {"op": "status", "session": "x" * 43}) == {
        "ok": False, "error": "expired"}
    stderr = s.stack.daemon.stderr_path.read_text(errors="replace")
    assert "Traceback" not in stderr and "RecursionError" not in stderr, stderr[-2000:]
    s.stack.daemon.stop()  # the refusals' summary is written at the latest when linkusd stops
    [summary] = [line for line in s.log.lines if "answered bad-request to" in line]  # one line, not one a call
    counted = sum(int(n) for n in re.findall(r"answered bad-request to (\d+) connections? from uid 0", summary))
    assert counted == len(hostile) - 1, summary  # the lone surrogate is JSON: the op refuses that field


def time_limit(seconds: float = 10.0) -> float:
    import time

    return time.monotonic() + seconds


def throttle_email(site_: Site, api: Api, seconds: int = 60) -> None:
    """The shipped one-send-a-minute email throttle (the site turns it off for the other tests)."""
    site_.stack.write_config(email={**site_.stack.config["email"], "send_interval": seconds})
    api.reload()


def test_an_email_code_confirms_only_the_address_it_was_sent_to(api: Api, site: tuple[Site, Any],
                                                                 user: str) -> None:
    """Issue 17/1: Send to one address, Send again to another within the throttle: the second Send
    must say "wait", never "sent", and the first mail's code must save the first address only."""
    s, smtp = site
    s.add(user)
    throttle_email(s, api)
    me = sess(signed_in(api, user))
    assert api("enroll_start", password=PASSWORD, **me)["ok"]
    assert api("enroll_method", method="email", session=me["session"], csrf=me["csrf"])["ok"]
    assert api("email_send", address="owner-real@example.test", **me)["sent_to"] == "o***@example.test"
    api.clock.now += 5
    again = api("email_send", address="attacker-typo@example.test", **me)
    assert again == {"ok": False, "error": "throttled", "retry_after": 55, "reason": "email-code"}
    same = api("email_send", address="owner-real@example.test", **me)  # the code sent there still works
    assert same == {"ok": True, "sent_to": "o***@example.test", "pending": True}
    assert api("status", session=me["session"])["pending"]["sent_to"] == "o***@example.test"
    mail = smtp.wait_for_message(1)
    assert mail["to"] == ["owner-real@example.test"] and len(smtp.messages) == 1
    assert api("enroll_confirm", code=code_in(mail), **me) == {"ok": True, "method": "email"}
    assert s.entry(user) == {"method": "email", "email": "owner-real@example.test"}


def test_a_code_sent_to_another_address_confirms_nothing(api: Api, site: tuple[Site, Any], user: str) -> None:
    """Two tabs of one extension: a code mailed by the second tab (to its address) typed into the
    first (which had sent to a typo) is wrong: each code is bound to the address it went to."""
    s, smtp = site
    s.add(user)
    throttle_email(s, api)
    tabs = [sess(signed_in(api, user)) for _ in range(2)]
    for tab in tabs:
        assert api("enroll_start", password=PASSWORD, **tab)["ok"]
        assert api("enroll_method", method="email", session=tab["session"], csrf=tab["csrf"])["ok"]
    assert api("email_send", address="typo@example.test", **tabs[0])["ok"]
    api.clock.now += 61
    assert api("email_send", address="real@example.test", **tabs[1])["ok"]
    mail = smtp.wait_for_message(2)
    assert mail["to"] == ["real@example.test"]
    assert api("enroll_confirm", code=code_in(mail), **tabs[0])["error"] == "denied"
    assert s.entry(user) == {"method": "none"}


def test_sessions_waiting_for_a_code_never_push_out_a_full_one(api: Api, site: tuple[Site, Any],
                                                                user: str) -> None:
    """Issue 17/3: the password alone (no code) must not sign the owner out."""
    s, _smtp = site
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    s.add(user, method="totp", secret=secret)
    api.reload()
    first = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert api("sign_in_code", code=code_at(secret, api.clock.now), **sess(first))["state"] == "in"
    halves = [api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
              for _ in range(web_api.MAX_SESSIONS_PER_EXT + 2)]
    assert all(h["state"] == "code" for h in halves)
    assert api("status", session=first["session"])["ok"]  # the full session is still there
    # the oldest half-finished ones made room for the newer ones
    assert api("sign_in_code", code="000000", **sess(halves[0]))["error"] == "expired"
    fulls = [first]
    for n, half in enumerate(halves[-web_api.MAX_SESSIONS_PER_EXT:]):
        api.clock.now += 30  # one time step per sign-in: a code is accepted once
        done = api("sign_in_code", code=code_at(secret, api.clock.now), **sess(half))
        assert done["state"] == "in", (n, done)
        fulls.append(half)
    # a sixth full session pushes out the oldest full one, and only that one
    assert api("status", session=first["session"])["error"] == "expired"
    assert all(api("status", session=f["session"])["ok"] for f in fulls[1:])


def test_an_email_sign_in_right_after_another_says_wait(api: Api, site: tuple[Site, Any], user: str) -> None:
    """Issue 17/4: the second sign-in within the throttle is "wait N s", not "unavailable"."""
    s, smtp = site
    s.add(user, method="email", email="wc@example.test")
    throttle_email(s, api)
    first = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert first["state"] == "code"
    assert api("sign_in_code", code=code_in(smtp.wait_for_message(1)), **sess(first))["state"] == "in"
    api.clock.now += 2
    second = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert second == {"ok": False, "error": "throttled", "retry_after": 58, "reason": "email-code"}
    assert not any('action="unavailable"' in line or "action=unavailable" in line for line in s.log.lines)


def test_a_code_mailed_to_a_new_address_is_never_still_valid_for_the_one_on_file(
        api: Api, site: tuple[Site, Any], user: str) -> None:
    """A code mailed to a new address (Change method -> Email -> Send) is pending; a sign-in right after
    must say "wait", not "the code sent to <the address on file> is still valid" (none went there)."""
    s, smtp = site
    s.add(user, method="email", email="e-y@example.test")
    throttle_email(s, api)
    first = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    me = sess({**first, **api("sign_in_code", code=code_in(smtp.wait_for_message(1)), **sess(first))})
    api.clock.now += 61
    assert api("enroll_start", password=PASSWORD, **me)["ok"]
    assert api("enroll_method", method="email", session=me["session"], csrf=me["csrf"])["ok"]
    assert api("email_send", address="q2-new@example.test", **me)["sent_to"] == "q***@example.test"
    api.clock.now += 5
    again = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert again == {"ok": False, "error": "throttled", "retry_after": 55, "reason": "email-code"}, again


def test_tries_left_counts_the_lockout_and_survives_a_method_switch(api: Api, site: tuple[Site, Any],
                                                                    user: str) -> None:
    """Issue 17/5: tries left = min(this enrollment's tries, lockout slots); switching method keeps them."""
    s, _smtp = site
    s.add(user, email="u@example.test")
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enroll_start", password=PASSWORD, **me)["ok"]
    secret = api("enroll_method", method="totp", session=me["session"], csrf=me["csrf"])["secret"]
    wrong = "000000" if code_at(secret, api.clock.now) != "000000" else "111111"
    assert api("enroll_confirm", code=wrong, **me)["tries_left"] == 2
    assert api("enroll_method", method="email", session=me["session"], csrf=me["csrf"])["ok"]
    assert api("status", session=me["session"])["pending"]["tries_left"] == 2
    assert api("enroll_method", method="totp", session=me["session"], csrf=me["csrf"])["ok"]
    assert api("enroll_confirm", code=wrong, **me)["tries_left"] == 1
    assert api("enroll_confirm", code=wrong, **me)["tries_left"] == 0
    assert api("status", session=me["session"])["pending"] is None

    # the lockout (5 in this site) bounds it too: 3 failures already, so one wrong code leaves 1
    store = api.store()
    store.settle_success(user, api.clock.now)
    for _ in range(3):
        store.reserve_attempt(user, api.clock.now, max_failures=5, duration=900, permanent_after=0)
    assert store.lock_status(user, api.clock.now).failures == 3
    assert api("enroll_start", password=PASSWORD, **me)["ok"]
    assert api("enroll_method", method="totp", session=me["session"], csrf=me["csrf"])["ok"]
    assert api("status", session=me["session"])["pending"]["tries_left"] == 2
    assert api("enroll_confirm", code=wrong, **me)["tries_left"] == 1
    assert api("enroll_confirm", code=wrong, **me)["error"] == "locked"


def test_ops_of_a_session_waiting_for_its_code_answer_code(api: Api, site: tuple[Site, Any], user: str) -> None:
    """Issue 17/7: the page leads such a session back to the code step instead of "step expired"."""
    s, _smtp = site
    s.add(user, method="totp", secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    api.reload()
    half = sess(api("sign_in", ext=user, password=PASSWORD, client=CLIENT))
    assert api("enroll_start", password=PASSWORD, **half)["error"] == "code"
    assert api("status", session=half["session"])["error"] == "code"
    assert api("disable", password=PASSWORD, **half)["error"] == "code"


def test_one_web_connection_carries_calls_in_turn_and_linkus_web_keeps_it(site: tuple[Site, Any]) -> None:
    """linkusd answers WEB_CALLs one after another on one connection (linkus-web keeps one open for its
    gate checks); a frame that breaks the protocol ends it. linkus-web's kept connection survives a
    linkusd restart (the check is sent again on a new one) and fails closed while linkusd is down."""
    import asyncio

    from daemon_client import connect

    from pam_linkus import protocol
    from pam_linkus.protocol import F, Msg
    from pam_linkus.web.app import KeptConnections

    s, _smtp = site
    s.stack.daemon.start()
    expired = {"ok": False, "error": "expired"}
    with connect(str(s.web_socket)) as sock:
        for body in (b'{"op":"status","session":"' + b"x" * 43 + b'"}', b"[]", b'{"op":"status","session":"y"}'):
            sock.sendall(protocol.encode(Msg.WEB_CALL, {F.JSON: body}, max_body=protocol.WEB_MAX_BODY))
            reply = protocol.recv_message(sock, {Msg.WEB_REPLY}, deadline=time_limit(),
                                          max_body=protocol.WEB_MAX_BODY).json()
            assert reply == (expired if body != b"[]" else {"ok": False, "error": "bad-request"}), (body, reply)
        sock.sendall(protocol.encode(Msg.STATUS, {}))  # not a web message: the connection ends
        sock.settimeout(5)
        assert sock.recv(1) == b""

    check = {"op": "gate_check", "token": "", "client": "127.0.0.1", "host": "nowhere.invalid", "uri": "/"}

    async def calls() -> list[object]:
        kept = KeptConnections(str(s.web_socket))
        answers: list[object] = [await kept.call(check, timeout=5) for _ in range(3)]
        answers.append(len(kept.idle))  # one connection carried all three
        s.stack.daemon.stop()
        try:
            await kept.call(check, timeout=5)
        except OSError as exc:  # linkusd down: the caller answers 502, nobody passes
            answers.append(("down", isinstance(exc, ConnectionError | FileNotFoundError)))
        s.stack.daemon.start()
        answers.append(await kept.call(check, timeout=5))
        kept.close()
        return answers

    forbidden = {"ok": False, "error": "forbidden"}  # a host no gate site covers
    assert asyncio.run(calls()) == [forbidden, forbidden, forbidden, 1, ("down", True), forbidden]


def test_a_password_only_session_ends_once_a_second_factor_is_enrolled_elsewhere(
        api: Api, site: tuple[Site, Any], user: str) -> None:
    """A session signed in on the password alone (no 2FA then) must not outlive the extension's new second
    factor: whoever holds it proved only the password, so no recovery codes, no switch-off, no second
    authenticator. The session that enrolled the factor itself proved it and goes on."""
    s, _smtp = site
    s.add(user)
    api.reload()
    thief, owner = sess(signed_in(api, user)), sess(signed_in(api, user))
    assert api("enroll_start", password=PASSWORD, **owner) == {"ok": True}
    secret = api("enroll_method", method="totp", session=owner["session"], csrf=owner["csrf"])["secret"]
    assert api("enroll_confirm", code=code_at(secret, api.clock.now), **owner) == {"ok": True, "method": "totp"}
    assert api("status", session=owner["session"])["enabled"]  # the enrolling session goes on
    assert api("recovery_codes", password=PASSWORD, **thief) == {"ok": False, "error": "expired"}
    assert api("status", session=thief["session"]) == {"ok": False, "error": "expired"}  # ended for good
    assert logged(s.log, action="session-ended")["ext"] == user
    # enrolled outside the page (linkus-2fa, the directory): the same for a session signed in before it
    s.add(user)  # 2FA off again (method none)
    api.reload()
    late = sess(signed_in(api, user))
    s.add(user, method="totp", secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    api.reload()
    assert api("disable", password=PASSWORD, **late) == {"ok": False, "error": "expired"}


@pytest.mark.parametrize("op", ["disable", "recovery_codes"])
def test_an_enrollment_during_a_password_only_sessions_change_stops_the_change(
        api: Api, site: tuple[Site, Any], user: str, op: str) -> None:
    """The op's password check takes a while: a second factor enrolled meanwhile (here: another session,
    linkus-2fa, an edit -- then a reload) must stop a password-only session's switch-off or new recovery
    codes, which are re-checked under the extension's change lock right before they write."""
    s, _smtp = site
    s.add(user)
    api.reload()
    thief = sess(signed_in(api, user))
    checked = api.service._password

    async def password_then_enrolled(*args: Any, **kwargs: Any) -> None:
        await checked(*args, **kwargs)
        s.add(user, method="totp", secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
        assert await api.engine.reload("test")

    api.service._password = password_then_enrolled  # type: ignore[method-assign]
    assert api(op, password=PASSWORD, **thief) == {"ok": False, "error": "expired"}
    assert s.entry(user)["method"] == "totp"  # still on: nothing was switched off
