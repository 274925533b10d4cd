"""nss_config.ldap_writer against a real slapd: what linkus-2fa writes is what a login reads."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from ldap_server import (
    SCHEMA_ATTRIBUTES,
    WRITER_DN,
    Slapd,
    free_port,
    ldap_config,
    write_password,
)
from source_contract import SECRET

from nss_config.base import ExtensionSettings
from nss_config.ldap_source import LdapSource
from nss_config.ldap_writer import LdapWriter
from pam_linkus.config import Config, LdapConfig
from pam_linkus.errors import ConfigError, SourceUnavailable

pytestmark = pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")

MAIL_MAP = dict(SCHEMA_ATTRIBUTES, email="mail")


def make_config(slapd: Slapd, private_dir: Path, base: str, **overrides: Any) -> LdapConfig:
    read_pw = write_password(private_dir / f"r-{secrets.token_hex(3)}.pw", slapd.pam_password)
    write_pw = write_password(private_dir / f"w-{secrets.token_hex(3)}.pw", slapd.writer_password)
    section = ldap_config(slapd, base, read_pw, attributes=MAIL_MAP, writer_bind_dn=WRITER_DN,
                          writer_password_file=str(write_pw))
    section.update(overrides)
    for key in [k for k, v in overrides.items() if v is None]:  # None: the key left out, not written empty
        del section[key]
    return Config.from_mapping({"sources": ["ldap"], "ldap": section}).ldap


def entry_of(slapd: Slapd, base: str, rdn: str = "e0") -> dict[str, list[str]]:
    conn = slapd.admin()
    conn.search(f"cn={rdn},{base}", "(objectClass=*)", search_scope="BASE", attributes=["*"])
    attrs = {k: [str(v) for v in vals] for k, vals in conn.entries[0].entry_attributes_as_dict.items()}
    conn.unbind()
    return attrs


def test_enroll_disable_remove_round_trip(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1001": {"email": "alice@example.com"}}, attributes=MAIL_MAP)
    config = make_config(slapd, private_dir, base)
    writer, source = LdapWriter(config), LdapSource(config)
    assert source.lookup("1001") is None  # only mail: not enrolled
    seen: list[Any] = []

    def enroll(old: dict[str, Any] | None) -> dict[str, Any]:
        seen.append(old)
        return {"method": "totp", "secret": "jbsw y3dp ehpk 3pxp jbsw y3dp ehpk 3pxp", "enabled": True}

    written = writer.update("1001", enroll)
    assert seen == [None]
    assert written == ExtensionSettings("1001", "totp", secret=SECRET, email="alice@example.com", source="ldap")
    assert source.lookup("1001") == written
    attrs = entry_of(slapd, base)
    assert "linkusTwoFactorAccount" in attrs["objectClass"]
    assert attrs["linkusTotpSecret"] == [SECRET]  # normalised, as a login reads it
    assert attrs["mail"] == ["alice@example.com"]

    def disable(old: dict[str, Any] | None) -> dict[str, Any]:
        seen.append(old)
        assert old is not None
        return {**{k: v for k, v in old.items() if k in ("method", "email")}, "enabled": False}

    writer.update("1001", disable)
    assert seen[-1] == {"method": "totp", "secret": SECRET, "enabled": True, "email": "alice@example.com"}
    found = source.lookup("1001")
    assert found is not None and found.enrolled is False and found.secret is None
    assert "linkusTotpSecret" not in entry_of(slapd, base)

    assert writer.update("1001", lambda old: None) is None
    assert source.lookup("1001") is None
    attrs = entry_of(slapd, base)
    assert attrs["mail"] == ["alice@example.com"]  # the person's address stays
    assert not any(name.startswith("linkusTwoFactor") or name.startswith("linkusTotp") for name in attrs)


def test_email_enrollment_replaces_the_address(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1002": {"email": "old@example.com"}}, attributes=MAIL_MAP)
    config = make_config(slapd, private_dir, base)
    LdapWriter(config).update("1002", lambda old: {"method": "email", "email": "new@example.com"})
    assert LdapSource(config).lookup("1002") == ExtensionSettings("1002", "email", email="new@example.com",
                                                                  source="ldap")


def test_invalid_new_settings_write_nothing(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1003": {"method": "totp", "secret": SECRET}})
    config = make_config(slapd, private_dir, base)
    before = entry_of(slapd, base)
    with pytest.raises(ConfigError, match="method must be one of"):
        LdapWriter(config).update("1003", lambda old: {"method": "sms"})
    with pytest.raises(ConfigError, match="not base32"):
        LdapWriter(config).update("1003", lambda old: {"method": "totp", "secret": "!!"})
    assert entry_of(slapd, base) == before


def test_no_entry_and_metacharacters_change_nothing(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1004": {"method": "totp", "secret": SECRET}, "1005": {"method": "none"}})
    config = make_config(slapd, private_dir, base)
    before = [entry_of(slapd, base, "e0"), entry_of(slapd, base, "e1")]
    for name in ("*", "100*", "*)(uid=*", "nobody"):
        with pytest.raises(ConfigError, match="create the account in the directory first"):
            LdapWriter(config).update(name, lambda old: {"method": "none"})
    assert [entry_of(slapd, base, "e0"), entry_of(slapd, base, "e1")] == before


def test_duplicate_entries_are_refused(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1006": {"method": "none"}})
    conn = slapd.admin()
    slapd.add_entry(conn, base, "twin", "1006", {"method": "none"})
    conn.unbind()
    with pytest.raises(SourceUnavailable, match="more than one entry"):
        LdapWriter(make_config(slapd, private_dir, base)).update("1006", lambda old: {"method": "none"})


def test_read_only_bind_is_refused_and_nothing_changes(slapd: Slapd, private_dir: Path) -> None:
    from ldap_server import PAM_DN

    base = slapd.tree({"1007": {"method": "totp", "secret": SECRET}})
    read_pw = write_password(private_dir / "ro.pw", slapd.pam_password)
    config = make_config(slapd, private_dir, base, writer_bind_dn=PAM_DN, writer_password_file=str(read_pw))
    before = entry_of(slapd, base)
    with pytest.raises(SourceUnavailable, match="insufficientAccessRights"):
        LdapWriter(config).update("1007", lambda old: {"method": "none"})
    assert entry_of(slapd, base) == before


def test_writer_needs_its_own_credentials(slapd: Slapd, private_dir: Path) -> None:
    config = make_config(slapd, private_dir, slapd.tree(), writer_bind_dn=None)
    with pytest.raises(ConfigError, match="writer_bind_dn"):
        LdapWriter(config).update("1008", lambda old: None)


def test_writer_fails_over_to_the_second_uri(slapd: Slapd, private_dir: Path) -> None:
    base = slapd.tree({"1009": {"email": "x@example.com"}}, attributes=MAIL_MAP)
    config = make_config(slapd, private_dir, base, uris=[f"ldaps://127.0.0.1:{free_port()}", slapd.ldap_uri])
    LdapWriter(config).update("1009", lambda old: {"method": "none"})
    found = LdapSource(config).lookup("1009")
    assert found is not None and found.method == "none"


def test_wrong_writer_password_names_every_server(slapd: Slapd, private_dir: Path) -> None:
    wrong = write_password(private_dir / "bad.pw", "wrong")
    closed = f"ldaps://127.0.0.1:{free_port()}"
    config = make_config(slapd, private_dir, slapd.tree(), writer_password_file=str(wrong),
                         uris=[closed, slapd.ldaps_uri])
    with pytest.raises(SourceUnavailable) as caught:
        LdapWriter(config).update("1010", lambda old: None)
    assert closed in caught.value.reason and "invalidCredentials" in caught.value.reason
