"""SelfService (linkusd's web ops) on the real Engine, real PAM password checks, real
YAML source and SQLite state, aiosmtpd for mail; the clock is injected."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import PASSWORD, code_at
from smtp_server import code_in
from web_site import Api, Site, logged

from pam_linkus.web import api as web_api

pytest_plugins = ["web_site"]
CLIENT = "192.0.2.10"


def signed_in(api: Api, user: str) -> dict[str, Any]:
    reply = api("sign_in", ext=user, password=PASSWORD, client=CLIENT)
    assert reply["ok"] and reply["state"] == "in", (reply, api.site.log.take())
    return reply


def sess(reply: dict[str, Any]) -> dict[str, str]:
    return {"session": reply["session"], "csrf": reply["csrf"], "client": CLIENT}


def test_totp_enrolment_saves_only_the_confirmed_secret(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, _smtp = site
    s.add(user, email="ext@example.com")
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enrol_method", method="totp", **{k: me[k] for k in ("session", "csrf")})["error"] == "step"
    assert api("enrol_start", password="wrong", **me)["error"] == "denied"
    assert api("status", session=me["session"])["pending"] is None
    assert api("enrol_start", password=PASSWORD, **me) == {"ok": True}
    view = api("enrol_method", method="totp", session=me["session"], csrf=me["csrf"])
    secret = view["secret"]
    assert len(secret) * 5 >= 160 and view["uri"].startswith("otpauth://totp/") and f"secret={secret}" in view["uri"]
    bad = api("enrol_confirm", code="000000" if code_at(secret, api.clock.now) != "000000" else "111111", **me)
    assert bad == {"ok": False, "error": "denied", "tries_left": 2}
    assert api.store().lock_status(user, api.clock.now).failures == 1  # wrong codes count towards the lockout
    assert s.entry(user) == {"method": "none", "email": "ext@example.com"}  # nothing saved
    assert api("enrol_confirm", code=code_at(secret, api.clock.now), **me) == {"ok": True, "method": "totp"}
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
    assert api("enrol_start", password=PASSWORD, session=me["session"], csrf="x" * 43,
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


def test_email_enrolment_disable_and_recovery_codes(api: Api, site: tuple[Site, Any], user: str) -> None:
    s, smtp = site
    s.add(user, email="owner@example.com")
    api.reload()
    me = sess(signed_in(api, user))
    assert api("enrol_start", password=PASSWORD, **me)["ok"]
    assert api("enrol_method", method="email", session=me["session"], csrf=me["csrf"]) == {
        "ok": True, "email": "o***@example.com"}
    assert api("enrol_confirm", code="123456", **me)["error"] == "step"  # Save before Send
    assert api("email_send", address="new@example.org", **me) == {"ok": True, "sent_to": "n***@example.org"}
    mail = smtp.wait_for_message(1)
    assert mail["to"] == ["new@example.org"]
    assert api("enrol_confirm", code=code_in(mail), **me) == {"ok": True, "method": "email"}
    assert s.entry(user) == {"method": "email", "email": "new@example.org"}

    assert api("recovery_codes", password="wrong", **me)["error"] == "denied"
    codes = api("recovery_codes", password=PASSWORD, **me)["codes"]
    assert len(codes) == 10 and api.store().recovery_codes_left(user) == 10

    assert api("disable", password="wrong", **me)["error"] == "denied"
    assert s.entry(user).get("enabled", True) is True
    assert api("disable", password=PASSWORD, **me) == {"ok": True}
    assert s.entry(user) == {"method": "email", "email": "new@example.org", "enabled": False}
    notice = smtp.wait_for_message(2)
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


def test_included_pam_files_are_followed(tmp_path: Any) -> None:
    from pam_linkus.web.password import ServiceRefused, check_service

    (tmp_path / "svc").write_text("@include common-pw\nauth required pam_permit.so\n")
    (tmp_path / "common-pw").write_text("auth required pam_unix.so  # not pam_linkus, a comment\n")
    check_service("svc", str(tmp_path))
    (tmp_path / "common-pw").write_text("auth substack deeper\n")
    (tmp_path / "deeper").write_text("auth [default=die] pam_linkus.so\n")
    with pytest.raises(ServiceRefused, match="pam_linkus"):
        check_service("svc", str(tmp_path))
    with pytest.raises(ServiceRefused):
        check_service("absent", str(tmp_path))  # libpam would fall back to "other"
