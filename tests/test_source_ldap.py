"""The LDAP source against a real slapd (tests/ldap_server.py): the shared source
contract, then what only a directory can get wrong -- TLS, binds, timeouts,
failover, duplicates, the offline cache, and ``check`` for linkus-2fa doctor."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import Clock
from ldap_server import (
    PAM_DN,
    SCHEMA,
    SCHEMA_ATTRIBUTES,
    SERVER_NAME,
    BlackHole,
    EndlessReferences,
    GarbageLdap,
    Slapd,
    free_port,
    ldap_config,
    write_password,
)
from source_contract import SECRET, MakeSource, SourceContract

from nss_config.base import ExtensionSettings
from nss_config.ldap_source import LdapSource, build_filter, check
from pam_linkus.config import Config, LdapConfig
from pam_linkus.errors import ConfigError, SourceUnavailable
from pam_linkus.state.sqlite_store import SqliteStore

pytestmark = pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent
#: Seconds of scheduling slack on a busy 2-core machine, on top of the configured timeouts.
SLACK = 3.0


@pytest.fixture
def password_file(private_dir: Path, slapd: Slapd) -> Path:
    return write_password(private_dir / f"bind-{secrets.token_hex(3)}.pw", slapd.pam_password)


def make_config(section: dict[str, Any]) -> LdapConfig:
    return Config.from_mapping({"sources": ["ldap"], "ldap": section}).ldap


class TestLdapSource(SourceContract):
    source_name = "ldap"

    @pytest.fixture
    def make_source(self, slapd: Slapd, password_file: Path) -> MakeSource:
        def make(entries: dict[str, dict[str, Any]]) -> LdapSource:
            base = slapd.tree(entries)
            return LdapSource(make_config(ldap_config(slapd, base, password_file)))

        return make


# -- what the directory answers ---------------------------------------------------------


def test_two_matching_entries_are_ambiguous_not_a_pick(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"dup": {"method": "totp", "secret": SECRET}})
    conn = slapd.admin()
    slapd.add_entry(conn, base, "second", "dup", {"method": "none"})
    conn.unbind()
    source = LdapSource(make_config(ldap_config(slapd, base, password_file)))
    with pytest.raises(SourceUnavailable, match="more than one entry"):
        source.lookup("dup")


def test_three_matching_entries_are_ambiguous_too(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree()
    conn = slapd.admin()
    for i in range(3):
        slapd.add_entry(conn, base, f"d{i}", "trip", {"method": "none"})
    conn.unbind()
    with pytest.raises(SourceUnavailable, match="more than one entry"):
        LdapSource(make_config(ldap_config(slapd, base, password_file))).lookup("trip")


def test_entry_without_2fa_attributes_is_not_here(slapd: Slapd, password_file: Path) -> None:
    # A directory user with only an address: the next source may know them.
    attrs = dict(SCHEMA_ATTRIBUTES, email="mail")
    base = slapd.tree({"plain": {"email": "plain@example.com"}}, attributes=attrs)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, attributes=attrs)))
    assert source.lookup("plain") is None


def test_existing_attributes_can_be_mapped(slapd: Slapd, password_file: Path) -> None:
    # mail for the address, employeeType for the method: no schema change at all.
    attrs = dict(SCHEMA_ATTRIBUTES, email="mail", method="employeeType")
    base = slapd.tree({"mapped": {"method": "email", "email": "mapped@example.com"}}, attributes=attrs)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, attributes=attrs)))
    assert source.lookup("mapped") == ExtensionSettings("mapped", "email", email="mapped@example.com",
                                                        source="ldap")


def test_multi_valued_attribute_is_malformed(slapd: Slapd, password_file: Path) -> None:
    attrs = dict(SCHEMA_ATTRIBUTES, email="mail")
    base = slapd.tree({"multi": {"method": "email", "email": ["a@example.com", "b@example.com"]}},
                      attributes=attrs)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, attributes=attrs)))
    with pytest.raises(ConfigError, match="has 2 values"):
        source.lookup("multi")


def test_filter_template_is_combined_with_the_escaped_name(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    section = ldap_config(slapd, base, password_file,
                          filter="(&(objectClass=linkusTwoFactorAccount)(|(uid={user})(mail={user})))")
    source = LdapSource(make_config(section))
    assert source.lookup("alice") is not None
    assert source.lookup("*") is None


def test_build_filter_escapes_per_rfc_4515() -> None:
    assert build_filter("(uid={user})", "*)(uid=*") == "(uid=\\2a\\29\\28uid=\\2a)"
    assert build_filter("(uid={user})", "a\\b") == "(uid=a\\5cb)"
    assert build_filter("(|(uid={user})(cn={user}))", "x*") == "(|(uid=x\\2a)(cn=x\\2a))"
    assert build_filter("(uid={user})", "{user}") == "(uid={user})"  # inserted once, never re-expanded


def test_wrong_base_is_unavailable_not_absent(slapd: Slapd, password_file: Path) -> None:
    source = LdapSource(make_config(ldap_config(slapd, "ou=nowhere,dc=linkus,dc=test", password_file)))
    with pytest.raises(SourceUnavailable, match="search failed"):
        source.lookup("anyone")


# -- binds and TLS ------------------------------------------------------------------------


def test_wrong_bind_password_is_unavailable(slapd: Slapd, private_dir: Path) -> None:
    wrong = write_password(private_dir / "wrong.pw", "not-the-password")
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    source = LdapSource(make_config(ldap_config(slapd, base, wrong)))
    with pytest.raises(SourceUnavailable, match="invalidCredentials"):
        source.lookup("alice")


def test_password_file_readable_by_others_is_refused(slapd: Slapd, private_dir: Path) -> None:
    loose = write_password(private_dir / "loose.pw", slapd.pam_password)
    loose.chmod(0o644)
    source = LdapSource(make_config(ldap_config(slapd, slapd.tree(), loose)))
    with pytest.raises(ConfigError, match="readable by group or others"):
        source.lookup("alice")


@pytest.mark.parametrize("scheme", ["ldaps", "starttls"])
def test_untrusted_certificate_is_unavailable_and_no_bind_is_sent(
    slapd: Slapd, private_dir: Path, scheme: str
) -> None:
    # A bind DN of this test alone, so the shared server's log can be searched for it.
    probe_dn = f"cn=probe-{secrets.token_hex(4)},dc=linkus,dc=test"
    pw = write_password(private_dir / "probe.pw", "probe-password")
    uri = slapd.ldaps_uri if scheme == "ldaps" else slapd.ldap_uri
    section = ldap_config(slapd, slapd.tree(), pw, uris=[uri], bind_dn=probe_dn,
                          ca_file=str(slapd.pki.other_ca_file))
    with pytest.raises(SourceUnavailable, match=r"(?i)certificate"):
        LdapSource(make_config(section)).lookup("alice")
    time.sleep(0.2)  # slapd writes its log asynchronously
    assert probe_dn not in slapd.log_text()
    # The control: with the right CA the same bind reaches the server (and is refused).
    section["ca_file"] = str(slapd.pki.ca_file)
    with pytest.raises(SourceUnavailable, match="invalidCredentials"):
        LdapSource(make_config(section)).lookup("alice")
    deadline = time.monotonic() + 5
    while probe_dn not in slapd.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f'BIND dn="{probe_dn}"' in slapd.log_text()


def test_host_name_is_verified(slapd: Slapd, password_file: Path) -> None:
    # The certificate names 127.0.0.1 and linkus-ldap.test, not "localhost".
    section = ldap_config(slapd, slapd.tree(), password_file,
                          uris=[f"ldaps://localhost:{slapd.tls_port}"])
    with pytest.raises(SourceUnavailable, match="doesn't match any name"):
        LdapSource(make_config(section)).lookup("alice")
    assert SERVER_NAME  # the name that would match, for whoever reads this test


def test_system_trust_store_does_not_trust_the_test_ca(slapd: Slapd, password_file: Path) -> None:
    section = ldap_config(slapd, slapd.tree(), password_file)
    del section["ca_file"]
    with pytest.raises(SourceUnavailable, match=r"(?i)certificate"):
        LdapSource(make_config(section)).lookup("alice")


# -- unreachable servers, timeouts, failover --------------------------------------------


def test_server_stopped_is_unavailable_quickly(own_slapd: Slapd, private_dir: Path) -> None:
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    source = LdapSource(make_config(ldap_config(
        own_slapd, own_slapd.tree({"alice": {"method": "totp", "secret": SECRET}}), pw)))
    assert source.lookup("alice") is not None
    own_slapd.stop()
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="no server answered"):
        source.lookup("alice")
    assert time.monotonic() - started < 2 + SLACK


@pytest.mark.parametrize("scheme", ["ldaps", "ldap"])
def test_server_that_never_answers_is_unavailable_within_the_timeout(
    black_hole: BlackHole, private_dir: Path, slapd: Slapd, scheme: str
) -> None:
    pw = write_password(private_dir / "hole.pw", "whatever")
    section = ldap_config(slapd, "dc=linkus,dc=test", pw, uris=[f"{scheme}://127.0.0.1:{black_hole.port}"],
                          connect_timeout=1, timeout=1)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="no server answered"):
        LdapSource(make_config(section)).lookup("alice")
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2 + SLACK, elapsed


def test_failover_to_the_second_uri(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    closed = f"ldaps://127.0.0.1:{free_port()}"
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[closed, slapd.ldaps_uri])))
    found = source.lookup("alice")
    assert found is not None and found.secret == SECRET


def test_failover_past_a_server_that_never_answers(
    slapd: Slapd, password_file: Path, black_hole: BlackHole
) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    uris = [f"ldaps://127.0.0.1:{black_hole.port}", slapd.ldap_uri]
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=uris, connect_timeout=1,
                                                timeout=1)))
    started = time.monotonic()
    assert source.lookup("alice") is not None
    assert time.monotonic() - started < 2 + SLACK


def test_every_failure_is_named(slapd: Slapd, password_file: Path, black_hole: BlackHole) -> None:
    closed = f"ldaps://127.0.0.1:{free_port()}"
    hole = f"ldap://127.0.0.1:{black_hole.port}"
    source = LdapSource(make_config(ldap_config(slapd, slapd.tree(), password_file, uris=[closed, hole],
                                                connect_timeout=1, timeout=1)))
    with pytest.raises(SourceUnavailable) as caught:
        source.lookup("alice")
    assert closed in caught.value.reason and hole in caught.value.reason
    assert slapd.pam_password not in caught.value.reason


# -- the offline cache ---------------------------------------------------------------------


T0 = 1_700_000_000.0


@pytest.fixture
def store(private_dir: Path) -> Any:
    state_dir = private_dir / "state"
    state_dir.mkdir(mode=0o700)
    opened = SqliteStore(str(state_dir / "state.db"))
    yield opened
    opened.close()


def test_cache_off_server_down_is_unavailable_and_store_never_opened(
    own_slapd: Slapd, private_dir: Path
) -> None:
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    base = own_slapd.tree({"alice": {"method": "totp", "secret": SECRET}})

    def no_store() -> Any:
        raise AssertionError("the store was opened with the cache off")

    source = LdapSource(make_config(ldap_config(own_slapd, base, pw)), state=no_store)
    assert source.lookup("alice") is not None
    own_slapd.stop()
    with pytest.raises(SourceUnavailable):
        source.lookup("alice")


def test_cache_on_serves_last_read_settings_up_to_max_age(
    own_slapd: Slapd, private_dir: Path, store: SqliteStore
) -> None:
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    groups = ["cn=admins,ou=groups,dc=linkus,dc=test", "cn=sales,ou=groups,dc=linkus,dc=test"]
    base = own_slapd.tree({"alice": {"method": "totp", "secret": SECRET, "digits": 8, "seeAlso": groups},
                           "bob": {"method": "none"}})
    clock = Clock(T0)
    source = LdapSource(make_config(ldap_config(own_slapd, base, pw, cache_max_age=3600, group_attribute="seeAlso")),
                        state=lambda: store, clock=clock)
    live = source.lookup("alice")
    assert live is not None and live.source == "ldap"
    assert live.directory_groups == frozenset(groups)  # read in the same search
    own_slapd.stop()
    clock.now += 3600
    cached = source.lookup("alice")
    assert cached is not None and cached.source == "ldap-cache"
    assert (cached.method, cached.secret, cached.digits) == ("totp", SECRET, 8)
    assert cached.directory_groups == frozenset(groups)  # the groups are cached with the settings
    clock.now += 1
    with pytest.raises(SourceUnavailable):
        source.lookup("alice")  # too old
    with pytest.raises(SourceUnavailable):
        source.lookup("carol")  # never read: never "not enrolled" because the server is down
    with pytest.raises(SourceUnavailable):
        source.lookup("bob")  # not read while the server was up


def test_cache_never_answers_for_another_account_whose_name_casefolds_alike(
    own_slapd: Slapd, private_dir: Path, store: SqliteStore
) -> None:
    """Two directory accounts, "strass" and "straß" (the same under str.casefold): while the directory is
    down, each name gets its own last-read settings, never the other's secret or its "2FA off"."""
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    other = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    base = own_slapd.tree({"strass": {"method": "totp", "secret": SECRET},
                           "stra\u00df": {"method": "totp", "secret": other}})
    clock = Clock(T0)
    source = LdapSource(make_config(ldap_config(own_slapd, base, pw, cache_max_age=3600)),
                        state=lambda: store, clock=clock)
    first, second = source.lookup("strass"), source.lookup("stra\u00df")
    assert first is not None and second is not None and (first.secret, second.secret) == (SECRET, other)
    own_slapd.stop()
    clock.now += 1
    cached = source.lookup("strass")
    assert cached is not None and cached.source == "ldap-cache"
    assert (cached.account, cached.secret) == ("strass", SECRET)
    with pytest.raises(SourceUnavailable):
        source.lookup("STRASS")  # never read under that spelling: not answered from another's entry


def test_cache_forgets_a_user_the_directory_no_longer_has(
    own_slapd: Slapd, private_dir: Path, store: SqliteStore
) -> None:
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    base = own_slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    clock = Clock(T0)
    section = ldap_config(own_slapd, base, pw, cache_max_age=3600)
    source = LdapSource(make_config(section), state=lambda: store, clock=clock)
    assert source.lookup("alice") is not None
    conn = own_slapd.admin()
    conn.delete(f"cn=e0,{base}")
    conn.unbind()
    assert source.lookup("alice") is None
    own_slapd.stop()
    with pytest.raises(SourceUnavailable):
        source.lookup("alice")


def test_cache_is_not_used_for_ambiguous_answers(
    slapd: Slapd, password_file: Path, store: SqliteStore
) -> None:
    base = slapd.tree({"dup": {"method": "totp", "secret": SECRET}})
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, cache_max_age=3600)),
                        state=lambda: store, clock=Clock(T0))
    assert source.lookup("dup") is not None
    conn = slapd.admin()
    slapd.add_entry(conn, base, "second", "dup", {"method": "none"})
    conn.unbind()
    with pytest.raises(SourceUnavailable, match="more than one"):
        source.lookup("dup")


def test_sqlite_settings_cache_methods(store: SqliteStore) -> None:
    assert store.cached_settings("ldap", "u", 100.0, 10) is None
    store.cache_settings("ldap", "u", '{"method": "none"}', 100.0)
    assert store.cached_settings("ldap", "u", 110.0, 10) == '{"method": "none"}'
    assert store.cached_settings("ldap", "u", 110.1, 10) is None
    assert store.cached_settings("ldap", "u", 99.0, 10) is None  # stored "in the future": clock went back
    assert store.cached_settings("other", "u", 100.0, 10) is None
    store.cache_settings("ldap", "u", '{"method": "totp"}', 200.0)
    assert store.cached_settings("ldap", "u", 200.0, 10) == '{"method": "totp"}'
    store.cache_settings("ldap", "u", None, 201.0)
    assert store.cached_settings("ldap", "u", 201.0, 10) is None
    store.cache_settings("ldap", "u", "{}", 300.0)
    store.forget("u")
    assert store.cached_settings("ldap", "u", 300.0, 10) is None


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"uris": ["ldap://h"], "start_tls": False}, "start_tls: must be true"),
    ({"uris": ["http://h"]}, "ldaps://host"),
    ({"uris": ["ldaps://"]}, "ldaps://host"),
    ({"bind_dn": None}, "bind_dn: is required"),
    ({"bind_password_file": None}, "bind_password_file: is required"),
    ({"base": None}, "base: is required"),
    ({"filter": "uid={user}"}, "parenthesised"),
    ({"filter": "(uid=alice)"}, "must contain {user}"),
    ({"attributes": {"email": "mail; x"}}, "attribute name"),
    ({"attributes": {"email": "linkusTotpSecret"}}, "same LDAP attribute"),
    ({"attributes": {"phone": "x"}}, "unknown key"),
    ({"timeout": 2.5}, "timeout: must be an integer"),
    ({"referrals": True}, "unknown key"),
])
def test_config_refuses(change: dict[str, Any], message: str) -> None:
    section: dict[str, Any] = {"uris": ["ldaps://h"], "bind_dn": "cn=x", "bind_password_file": "/p",
                               "base": "dc=x"}
    section.update(change)
    section = {k: v for k, v in section.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("{", "\\{")):
        make_config(section)


def test_config_defaults_are_safe() -> None:
    config = make_config({"uris": ["ldaps://h"], "bind_dn": "cn=x", "bind_password_file": "/p",
                          "base": "dc=x"})
    assert (config.start_tls, config.cache_max_age, config.scope) == (True, 0, "subtree")
    assert config.connect_timeout == 3.0 and config.timeout == 3


# -- cost --------------------------------------------------------------------------------------


def test_one_bind_and_one_search_per_lookup(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"counted": {"method": "totp", "secret": SECRET}})
    source = LdapSource(make_config(ldap_config(slapd, base, password_file)))
    assert source.lookup("counted") is not None
    deadline = time.monotonic() + 5
    needle = f'base="{base}"'
    while needle not in slapd.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = slapd.log_text()
    conn_ids = {line.split("conn=")[1].split()[0] for line in log.splitlines() if needle in line}
    assert len(conn_ids) == 1
    (conn_id,) = conn_ids
    ops = [line for line in log.splitlines() if f"conn={conn_id} op=" in line]
    assert sum(" BIND dn=" in line and "method=" in line for line in ops) == 1
    # the schema (root DSE, then the subschema entry) is read once per source: group_attribute
    assert sum(" SRCH base=" in line for line in ops) == 3
    assert sum("SRCH base=\"\"" in line or "cn=Subschema" in line for line in ops) == 2
    assert source.lookup("counted") is not None  # on the warm connection: one search, no schema
    deadline = time.monotonic() + 5
    while len([ln for ln in slapd.log_text().splitlines() if f"conn={conn_id} op=" in ln and needle in ln]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ops = [line for line in slapd.log_text().splitlines() if f"conn={conn_id} op=" in line]
    assert sum(" SRCH base=" in line for line in ops) == 4
    assert sum("SRCH base=\"\"" in line or "cn=Subschema" in line for line in ops) == 2
    source.close()


# -- doctor ------------------------------------------------------------------------------------


def test_check_says_ok_for_every_step(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    lines = check(make_config(ldap_config(slapd, base, password_file, uris=[slapd.ldaps_uri, slapd.ldap_uri])),
                  "alice")
    assert [line for line in lines if line.startswith("FAIL")] == []
    text = "\n".join(lines)
    assert "TLS via ldaps, certificate and host name verified" in text
    assert "TLS via StartTLS" in text
    assert f"bound as {PAM_DN}" in text
    assert "lookup alice: method=totp enabled=yes" in text
    assert SECRET not in text and slapd.pam_password not in text


def test_check_names_what_fails(slapd: Slapd, private_dir: Path, black_hole: BlackHole) -> None:
    wrong = write_password(private_dir / "wrong.pw", "nope")
    closed = f"ldaps://127.0.0.1:{free_port()}"
    section = ldap_config(slapd, slapd.tree(), wrong, uris=[closed, slapd.ldaps_uri], timeout=1,
                          connect_timeout=1)
    fails = [line for line in check(make_config(section), "alice") if line.startswith("FAIL")]
    assert any(closed in line and "connect:" in line for line in fails), fails
    assert any(slapd.ldaps_uri in line and "bind:" in line and "invalidCredentials" in line for line in fails)
    assert any("lookup alice" in line for line in fails)
    section = ldap_config(slapd, slapd.tree(), wrong, ca_file=str(slapd.pki.other_ca_file))
    fails = [line for line in check(make_config(section)) if line.startswith("FAIL")]
    assert len(fails) == 1 and "connect:" in fails[0] and "certificate" in fails[0].lower()
    missing = ldap_config(slapd, slapd.tree(), private_dir / "missing.pw")
    assert check(make_config(missing))[0].startswith("FAIL ldap bind password:")


def test_check_reports_ambiguous_sample(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"dup": {"method": "none"}})
    conn = slapd.admin()
    slapd.add_entry(conn, base, "again", "dup", {"method": "none"})
    conn.unbind()
    fails = [x for x in check(make_config(ldap_config(slapd, base, password_file)), "dup") if x.startswith("FAIL")]
    assert len(fails) == 2 and "2 entries (ambiguous)" in fails[0] and "more than one" in fails[1]


# -- the shipped schema -----------------------------------------------------------------------


def test_ldif_schema_loads_into_cn_config(tmp_path: Path) -> None:
    conf = tmp_path / "base.conf"
    conf.write_text("include /etc/ldap/schema/core.schema\n")
    out = tmp_path / "slapd.d"
    out.mkdir()
    subprocess.run(["slaptest", "-f", str(conf), "-F", str(out)], check=True, capture_output=True, timeout=30)
    subprocess.run(["slapadd", "-n", "0", "-F", str(out), "-l", str(SCHEMA.with_suffix(".ldif"))], check=True,
                   capture_output=True, timeout=30)
    loaded = (out / "cn=config" / "cn=schema" / "cn={1}linkus-2fa.ldif").read_text()
    assert "NAME 'linkusTwoFactorAccount'" in loaded
    # Same definitions as the .schema file: every attribute name appears in both.
    for name in SCHEMA_ATTRIBUTES.values():
        assert name in loaded and name in SCHEMA.read_text()


def test_linkus_2fa_doctor_prints_the_ldap_checks(
    slapd: Slapd, password_file: Path, private_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from pam_linkus.doctor import run

    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    (private_dir / "state").mkdir(mode=0o700)
    config_path = private_dir / "pam_linkus.yaml"
    config_path.write_text(yaml.safe_dump({
        "sources": ["ldap"], "state": {"path": str(private_dir / "state" / "state.db")},
        "ldap": ldap_config(slapd, base, password_file),
    }, explicit_end=True))
    config_path.chmod(0o600)
    pam_dir = private_dir / "pam.d"
    pam_dir.mkdir()
    run(str(config_path), user="alice", pam_dir=str(pam_dir), smtp=False, now=time.time())
    out = capsys.readouterr().out
    assert f"ok   ldap {slapd.ldaps_uri}: connected, TLS via ldaps, certificate and host name verified" in out
    assert "ok   ldap lookup alice: method=totp enabled=yes" in out
    assert "FAIL ldap" not in out
    stopped = ldap_config(slapd, base, password_file, uris=[f"ldaps://127.0.0.1:{free_port()}"])
    config_path.write_text(yaml.safe_dump({"sources": ["ldap"], "ldap": stopped,
                                           "state": {"path": str(private_dir / "state" / "state.db")}},
                                          explicit_end=True))
    assert run(str(config_path), user=None, pam_dir=str(pam_dir), smtp=False, now=time.time()) == 1
    assert "Connection refused" in capsys.readouterr().out


def test_referrals_are_never_followed(slapd: Slapd, password_file: Path, black_hole: BlackHole) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    manage_dsa_it = ("2.16.840.1.113730.3.4.2", True, None)
    elsewhere = f"ldap://127.0.0.1:{black_hole.port}/ou=people,dc=elsewhere"
    conn = slapd.admin()
    conn.add(f"ou=moved,{base}", ["referral", "extensibleObject"], {"ou": "moved", "ref": elsewhere},
             controls=[manage_dsa_it])
    conn.unbind()
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, timeout=2)))
    started = time.monotonic()
    found = source.lookup("alice")
    assert found is not None and found.secret == SECRET
    assert source.lookup("bob") is None  # a continuation reference is not chased into the black hole
    assert time.monotonic() - started < 1.5
    # A base that is itself a referral: the server answers "referral", which is no answer.
    moved = LdapSource(make_config(ldap_config(slapd, f"ou=moved,{base}", password_file, timeout=2)))
    with pytest.raises(SourceUnavailable, match="referral"):
        moved.lookup("alice")


def test_ldaps_uri_at_a_plain_server_fails_over_to_the_next(slapd: Slapd, password_file: Path) -> None:
    """Issue 12 item 9: a plain server behind ldaps:// is an ordinary failure, then failover."""
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    plain_as_ldaps = slapd.ldap_uri.replace("ldap://", "ldaps://", 1)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[plain_as_ldaps, slapd.ldaps_uri],
                                                connect_timeout=1, timeout=2)))
    found = source.lookup("alice")
    assert found is not None and found.account == "alice"


def test_warm_connections_are_shared_by_threads_and_reused(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({f"u{i}": {"method": "totp", "secret": SECRET} for i in range(4)})
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[slapd.ldaps_uri])))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: source.lookup(f"U{i % 4}"), range(40), timeout=60))
    assert [r.account if r else None for r in results] == [f"u{i % 4}" for i in range(40)]
    idle = sum(len(v) for v in source._idle.values())
    assert 1 <= idle <= 4  # at most one connection per thread was ever opened, and kept
    source.close()
    assert sum(len(v) for v in source._idle.values()) == 0


@pytest.mark.parametrize("pause", [0.1, 0.0], ids=["drip", "flood"])
def test_endless_search_references_are_unavailable_within_the_deadline(
    slapd: Slapd, password_file: Path, pause: float
) -> None:
    server = EndlessReferences(slapd.pki, pause)
    try:
        uris = [f"ldaps://127.0.0.1:{server.port}"]
        source = LdapSource(make_config(ldap_config(slapd, "dc=linkus,dc=test", password_file, uris=uris,
                                                    connect_timeout=1, timeout=1)))
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match="no server answered"):
            source.lookup("alice")
        assert time.monotonic() - started < 1 + SLACK
    finally:
        server.close()


def test_a_broken_warm_connection_is_replaced(slapd: Slapd, password_file: Path) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[slapd.ldaps_uri])))
    assert source.lookup("alice") is not None
    warm = source._idle[slapd.ldaps_uri][0]
    warm.socket.shutdown(socket.SHUT_RDWR)  # as a server restart or an idle timeout would leave it
    assert source.lookup("alice") is not None  # the dead warm connection failed; a fresh one answered
    assert source._idle[slapd.ldaps_uri] and source._idle[slapd.ldaps_uri][0] is not warm
    source.close()


@pytest.mark.parametrize("reply", [
    b"\x30\x03\x02\x01\x01",              # a message with no operation
    b"\x30\x05\x02\x01\x01\x61\x00",      # an empty bindResponse
    b"\x30\x80\x02\x01\x01",              # indefinite length, truncated
    b"\x30\x84\xff\xff\xff\xff",          # a 4 GB length
    b"garbage!" * 10,
], ids=["no-op", "empty-bind-response", "indefinite", "huge-length", "text"])
def test_a_malformed_reply_is_unavailable_then_failover(slapd: Slapd, password_file: Path, reply: bytes) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    server = GarbageLdap(slapd.pki, reply)
    try:
        bad = f"ldaps://127.0.0.1:{server.port}"
        alone = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[bad],
                                                   connect_timeout=1, timeout=1)))
        with pytest.raises(SourceUnavailable, match="no server answered"):
            alone.lookup("alice")
        both = LdapSource(make_config(ldap_config(slapd, base, password_file, uris=[bad, slapd.ldaps_uri],
                                                  connect_timeout=1, timeout=1)))
        assert both.lookup("alice") is not None
    finally:
        server.close()


def test_lookup_account_gives_the_groups_of_an_entry_without_2fa_attributes(
    slapd: Slapd, password_file: Path
) -> None:
    admins = "cn=admins,ou=groups,dc=linkus,dc=test"
    base = slapd.tree({"plain": {"seeAlso": admins}, "enrolled": {"method": "totp", "secret": SECRET}})
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, group_attribute="seeAlso")))
    try:
        assert source.lookup_account("plain") == (None, frozenset({admins}))  # "not here", groups known
        found, groups = source.lookup_account("enrolled")
        assert found is not None and groups == frozenset() == found.directory_groups
        assert source.lookup_account("nobody") == (None, frozenset())
    finally:
        source.close()

# -- the in-memory cache of recent answers (ldap.cache_ttl, nss_config.answer_cache) ------------

TTL = 30


def _modify(slapd: Slapd, base: str, changes: dict[str, Any]) -> None:
    """Change e0's attributes in the directory itself, as an admin's ldapmodify would."""
    import ldap3

    conn = slapd.admin()
    try:
        mods = {SCHEMA_ATTRIBUTES.get(k, k): [(ldap3.MODIFY_REPLACE, [v])] for k, v in changes.items()}
        assert conn.modify(f"cn=e0,{base}", mods)
    finally:
        conn.unbind()


@pytest.mark.parametrize("change", [
    {"secret": "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"},  # new secret
    {"method": "email", "email": "alice@example.com"},  # method switched
    {"enabled": "FALSE"},  # 2FA turned off
])
def test_a_directory_change_is_seen_at_the_ttl_and_not_before(
    slapd: Slapd, password_file: Path, change: dict[str, Any]
) -> None:
    base = slapd.tree({"alice": {"method": "totp", "secret": SECRET, "email": "old@example.com"}})
    ticks = Clock(T0)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, cache_ttl=TTL)), ticks=ticks)
    before = source.lookup("alice")
    assert before is not None and before.enrolled and before.secret == SECRET
    _modify(slapd, base, change)
    ticks.now += TTL - 0.001
    assert source.lookup("alice") == before  # from memory: the directory is not asked
    ticks.now += 0.001
    after = source.lookup("alice")
    assert after is not None and after != before
    if "secret" in change:
        assert after.secret == change["secret"]
    elif "method" in change:
        assert (after.method, after.email) == ("email", "alice@example.com")
    else:
        assert not after.enabled and not after.enrolled


def test_not_enrolled_is_kept_only_for_negative_cache_ttl(slapd: Slapd, password_file: Path) -> None:
    """Under enforce: enrolled a kept "not enrolled" lets the password alone in: "not here" and
    "2FA off" live negative_cache_ttl (0: never kept), however long cache_ttl is."""
    base = slapd.tree({"off": {"method": "totp", "secret": SECRET, "enabled": False}})
    ticks = Clock(T0)
    for negative in (0, 5):
        section = ldap_config(slapd, base, password_file, cache_ttl=3600, negative_cache_ttl=negative)
        source = LdapSource(make_config(section), ticks=ticks)
        name = f"new{negative}"
        assert source.lookup(name) is None  # no entry: not here
        off = source.lookup("off")
        assert off is not None and not off.enrolled
        conn = slapd.admin()
        slapd.add_entry(conn, base, f"n{negative}", name, {"method": "totp", "secret": SECRET})
        conn.unbind()
        _modify(slapd, base, {"enabled": "TRUE"})
        if negative:
            ticks.now += negative - 0.001
            assert source.lookup(name) is None and source.lookup("off") == off  # kept, as configured
            ticks.now += 0.001
        found, on = source.lookup(name), source.lookup("off")
        assert found is not None and found.enrolled
        assert on is not None and on.enrolled
        _modify(slapd, base, {"enabled": "FALSE"})


def test_a_kept_answer_never_outlives_its_ttl_when_the_directory_is_down(
    own_slapd: Slapd, private_dir: Path
) -> None:
    pw = write_password(private_dir / "own.pw", own_slapd.pam_password)
    base = own_slapd.tree({"alice": {"method": "totp", "secret": SECRET}})
    ticks = Clock(T0)
    source = LdapSource(make_config(ldap_config(own_slapd, base, pw, cache_ttl=TTL)), ticks=ticks)
    kept = source.lookup("alice")
    assert kept is not None
    own_slapd.stop()
    ticks.now += TTL - 1
    assert source.lookup("alice") == kept
    ticks.now += 1
    with pytest.raises(SourceUnavailable):
        source.lookup("alice")  # expired and the directory is down: unavailable, never stale
    with pytest.raises(SourceUnavailable):
        source.lookup("alice")  # and the failure was not kept either


def test_recall_answers_from_memory_only_and_the_cache_is_bounded(slapd: Slapd, password_file: Path) -> None:
    from nss_config.answer_cache import NOT_CACHED
    from nss_config.chain import SourceChain

    users = {f"u{i}": {"method": "totp", "secret": SECRET} for i in range(3)}
    base = slapd.tree(users)
    ticks = Clock(T0)
    source = LdapSource(make_config(ldap_config(slapd, base, password_file, cache_ttl=TTL, cache_size=2)),
                        ticks=ticks)
    chain = SourceChain([source])
    assert chain.recall("u0") is NOT_CACHED  # linkusd would ask in a worker
    first = chain.lookup("u0")
    assert first is not None and chain.recall("u0") == first
    chain.lookup("u1")
    chain.lookup("u2")
    assert len(source.answers) == 2 and chain.recall("u0") is NOT_CACHED  # the oldest went first
    chain.forget_answers()  # what linkusd does on RELOAD (linkus-2fa, self-service)
    assert len(source.answers) == 0 and chain.recall("u2") is NOT_CACHED
    ticks.now += TTL
    assert chain.recall("a\x00b") is None  # no entry can carry it: no search either


def test_an_answer_read_before_a_change_through_linkusd_is_not_kept() -> None:
    """A search that ran while linkusd cleared the cache (a change it made) must not put its
    possibly older answer back for a whole TTL."""
    from nss_config.answer_cache import NOT_CACHED, AnswerCache

    ticks = Clock(T0)
    cache = AnswerCache(TTL, 0, 10, ticks=ticks)
    settings = ExtensionSettings("alice", "totp", secret=SECRET)
    asked_at, generation = cache.now(), cache.generation()
    cache.clear()
    cache.put("alice", settings, asked_at, generation)
    assert cache.get("alice") is NOT_CACHED
    cache.put("alice", settings, asked_at, cache.generation())
    assert cache.get("alice") == settings
    ticks.now += TTL
    assert cache.get("alice") is NOT_CACHED and len(cache) == 0
    cache.put("alice", settings, T0, cache.generation())  # asked a TTL ago: already too old
    assert cache.get("alice") is NOT_CACHED

def test_groups_are_unknown_while_the_schema_does_not_define_the_group_attribute(
        slapd: Slapd, password_file: Path) -> None:
    """memberOf without the overlay (this slapd) is in no entry: "unknown", never "in no group"."""
    base = slapd.tree({"plain": {"seeAlso": "cn=admins,ou=groups,dc=x"}})
    missing = LdapSource(make_config(ldap_config(slapd, base, password_file)))
    defined = LdapSource(make_config(ldap_config(slapd, base, password_file, group_attribute="SEEALSO")))
    try:
        assert missing.lookup_account("plain") == (None, None)
        assert missing.group_attribute_problem(ask=False) == (
            "ldap.group_attribute memberOf is not defined in the directory's schema (memberOf needs the "
            "memberof overlay)")
        assert defined.lookup_account("plain") == (None, frozenset({"cn=admins,ou=groups,dc=x"}))
        assert defined.group_attribute_problem() is None
    finally:
        missing.close()
        defined.close()
