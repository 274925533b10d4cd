"""`linkus-2fa` writing to a real slapd with the writer bind, then logins through real PAM reading it back."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
import yaml
from cli_helpers import finish, read_key, run_cli, spawn_cli
from conftest import SECRET, PamStack, code_at
from ldap_server import (
    ADMIN_DN,
    SCHEMA_ATTRIBUTES,
    Slapd,
    ldap_config,
    write_password,
)

pytestmark = [pytest.mark.pam, pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")]


def use_ldap(stack: PamStack, server: Slapd, base: str, *, writer: bool = True, **overrides: Any) -> None:
    pw = write_password(stack.root / f"bind-{secrets.token_hex(3)}.pw", server.pam_password)
    section = ldap_config(server, base, pw, **overrides)
    if writer:
        wpw = write_password(stack.root / f"writer-{secrets.token_hex(3)}.pw", server.admin_password)
        section.update(writer_bind_dn=ADMIN_DN, writer_password_file=str(wpw))
    stack.write_config(sources=["ldap"], ldap=section)


def attributes(server: Slapd, base: str, user: str) -> dict[str, list[str]]:
    conn = server.admin()
    try:
        conn.search(base, f"(uid={user})", attributes=["*"])
        assert len(conn.entries) == 1
        data = conn.entries[0].entry_attributes_as_dict
        return {k: [str(v) for v in vals] for k, vals in data.items()}
    finally:
        conn.unbind()


def test_enroll_into_ldap_then_login_and_disable(pam_stack: PamStack, slapd: Slapd, user: str) -> None:
    # A plain directory user: no 2FA attributes, not even the auxiliary object class yet.
    base = slapd.tree({user: {"mail": f"{user}@example.com"}})
    use_ldap(pam_stack, slapd, base)
    assert pam_stack.login(user, None).auth == "PAM_SUCCESS"  # not enrolled: password only
    child = spawn_cli(pam_stack, "enroll", user, "--no-qr")
    secret = read_key(child)
    child.expect("Enter the 6-digit code the app shows now: ")
    now = time.time()
    child.sendline(code_at(secret, now))
    child.expect("Edited successfully.")
    assert finish(child)[0] == 0
    attrs = attributes(slapd, base, user)
    assert attrs[SCHEMA_ATTRIBUTES["secret"]] == [secret]
    assert attrs[SCHEMA_ATTRIBUTES["method"]] == ["totp"]
    assert attrs[SCHEMA_ATTRIBUTES["enabled"]] == ["TRUE"]
    assert "linkusTwoFactorAccount" in attrs["objectClass"]
    assert attrs["mail"] == [f"{user}@example.com"]
    assert 'source=ldap' in pam_stack.log.wait_for(f'action=enroll ext={user}')
    assert pam_stack.login(user, code_at(secret, now + 30)).auth == "PAM_SUCCESS"

    result = run_cli(pam_stack, "disable", user)
    assert result.returncode == 0, result.stderr
    attrs = attributes(slapd, base, user)
    assert SCHEMA_ATTRIBUTES["secret"] not in attrs
    assert attrs[SCHEMA_ATTRIBUTES["enabled"]] == ["FALSE"]
    login = pam_stack.login(user, None)
    assert (login.auth, login.prompts) == ("PAM_SUCCESS", ["Password: "])


def test_a_read_only_ldap_source_is_refused_before_a_secret_is_shown(pam_stack: PamStack, slapd: Slapd,
                                                                     user: str) -> None:
    base = slapd.tree({user: {"method": "totp", "secret": SECRET}})
    use_ldap(pam_stack, slapd, base, writer=False)
    for args in (("enroll", user, "--no-confirm"), ("disable", user), ("import-google", user, "--file", "/x")):
        result = run_cli(pam_stack, *args)
        assert result.returncode == 1, args
        assert "LDAP source is read-only" in result.stderr, result.stderr
        assert "Key:" not in result.stdout
    assert attributes(slapd, base, user)[SCHEMA_ATTRIBUTES["secret"]] == [SECRET]


def test_an_extension_without_a_directory_entry_is_not_created(pam_stack: PamStack, slapd: Slapd) -> None:
    base = slapd.tree({})
    use_ldap(pam_stack, slapd, base)
    result = run_cli(pam_stack, "enroll", "nobody-here", "--no-qr")
    assert result.returncode == 1
    assert "matches 'nobody-here'; create the account in the directory first" in result.stderr
    assert "Key:" not in result.stdout  # found out before a secret was shown and confirmed
    assert yaml.safe_load(pam_stack.extensions_path.read_text()) == {"extensions": {}}


def test_doctor_checks_the_directory(pam_stack: PamStack, slapd: Slapd, user: str) -> None:
    base = slapd.tree({user: {"method": "totp", "secret": SECRET}})
    use_ldap(pam_stack, slapd, base)
    result = run_cli(pam_stack, "doctor", user, "--pam-dir", str(pam_stack.root))
    assert result.returncode == 0, result.stdout
    assert f"ok   ldap {slapd.ldaps_uri}: connected, TLS via ldaps" in result.stdout
    assert f"ok   ldap lookup {user}: method=totp enabled=yes" in result.stdout
    assert f"ok   ldap writes: linkus-2fa binds as {ADMIN_DN}" in result.stdout


def test_kept_ldap_answers_serve_logins_and_a_linkus_2fa_change_is_seen_at_once(
    pam_stack: PamStack, slapd: Slapd, user: str
) -> None:
    """ldap.cache_ttl through real PAM: a change made in the directory itself waits for the TTL
    (the login still checks the old secret); one made with linkus-2fa (which asks linkusd to
    RELOAD) is seen by the very next login."""
    import ldap3

    base = slapd.tree({user: {"method": "totp", "secret": SECRET}})
    use_ldap(pam_stack, slapd, base, cache_ttl=3600)
    now = time.time()
    assert pam_stack.login(user, code_at(SECRET, now)).auth == "PAM_SUCCESS"
    new_secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    conn = slapd.admin()
    try:
        assert conn.modify(f"cn=e0,{base}", {SCHEMA_ATTRIBUTES["secret"]: [(ldap3.MODIFY_REPLACE, [new_secret])]})
    finally:
        conn.unbind()
    assert pam_stack.login(user, code_at(new_secret, now)).auth == "PAM_AUTH_ERR"  # the kept secret
    assert pam_stack.login(user, code_at(SECRET, now + 30)).auth == "PAM_SUCCESS"
    assert "source=ldap " in pam_stack.log.lines[-1].replace('"', "")

    result = run_cli(pam_stack, "disable", user)
    assert result.returncode == 0, result.stderr
    login = pam_stack.login(user, None)
    assert (login.auth, login.prompts) == ("PAM_SUCCESS", ["Password: "])  # 2FA off: seen at once


def test_doctor_tells_the_ldap_cache_and_its_trade_offs(pam_stack: PamStack, slapd: Slapd, user: str) -> None:
    """doctor says how long a directory change may take to reach logins, and warns when "not enrolled"
    answers are kept (the password alone is enough for that long under enforce: enrolled)."""
    base = slapd.tree({user: {"method": "totp", "secret": SECRET}})
    use_ldap(pam_stack, slapd, base, cache_ttl=120, negative_cache_ttl=30, cache_max_age=3600)
    result = run_cli(pam_stack, "doctor", user)
    assert "ok   ldap cache: answers kept in memory: enrolled 120 s, not here / 2FA off 30 s" in result.stdout
    assert "reaches logins within 120 s" in result.stdout
    assert "WARN ldap negative_cache_ttl: where enforce: enrolled applies" in result.stdout
    assert "ok   ldap offline cache: while no server answers, settings read up to 3600 s ago" in result.stdout
