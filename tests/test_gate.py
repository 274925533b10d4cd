"""The web gate (issue 18): linkusd's gate ops on the real Engine (SQLite and the real Redis),
real PAM password checks, and real linkusd + linkus-web processes on a unix socket, asked
the way nginx's auth_request asks. The nginx + Chromium end-to-end tests are in
tests/test_gate_e2e.py (docs/gate.md's example block)."""

from __future__ import annotations

import asyncio
import http.client
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli
from conftest import NATIVE_SO, PASSWORD, code_at
from web_site import Api, Site, WebServer, logged

from pam_linkus.config import Config
from pam_linkus.daemon.gate import check_return, match_site, normal_path
from pam_linkus.web.gate import sign_in_url

CLIENT = "192.0.2.10"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
HOSTS = ["pbx.example.com", "pbx.example.com:8443"]

# -- return URLs -------------------------------------------------------------------------

SAFE = [
    "/", "/admin/", "/admin/config.php?display=extensions&x=1#top", "/ucp/?a=%20b",
    "https://pbx.example.com/admin/", "http://pbx.example.com/", "HTTPS://PBX.EXAMPLE.COM/admin",
    "https://pbx.example.com:8443/recordings/", "https://pbx.example.com",
]
HOSTILE = [
    "", "//evil.example", "///evil.example", "/\\evil.example", "\\\\evil.example", "\\/evil.example",
    "https:/\\evil.example", "https:\\\\evil.example", "https:evil.example", "https:/evil.example",
    "https://evil.example/", "https://evil.example/https://pbx.example.com/", "http://pbx.example.com.evil/",
    "https://pbx@evil.example/", "https://pbx.example.com@evil.example/", "https://user:pw@pbx.example.com/",
    "https://pbx.example.com:9999/", "https://pbx.example.com:/", "https://pbx.example.com:abc/",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,<script>", "ftp://pbx.example.com/",
    "vbscript:x", "file:///etc/passwd", "evil.example", "admin/", "./admin", "?rd=//evil",
    "/%2f%2fevil.example", "/%2F%2Fevil.example", "/%5cevil.example", "https://pbx.example.com%2f@evil.example",
    "https://evil.example%2fpbx.example.com", "/\t/evil.example", "/\n/evil.example", "/\r\nLocation: x",
    "/ /evil", "\x00/", "/admin\x7f", "https://pbx.example.com\\@evil.example", "/é", "https://pbx.exämple.com/",
    "https://[::1]/", "https://127.0.0.1/", "/" + "a" * 2048, " https://pbx.example.com/", "/%00",
]


@pytest.mark.parametrize("url", SAFE)
def test_a_return_url_to_a_listed_host_or_a_local_path_is_kept(url: str) -> None:
    assert check_return(url, HOSTS, "/safe") == url


@pytest.mark.parametrize("url", HOSTILE)
def test_a_hostile_return_url_goes_to_the_default(url: str) -> None:
    assert check_return(url, HOSTS, "/safe") == "/safe"


@pytest.mark.parametrize(("uri", "path"), [
    ("/admin/", "/admin/"), ("/admin", "/admin"), ("/admin/config.php?x=/../", "/admin/config.php"),
    ("/%61dmin/", "/admin/"), ("/x/../admin/", "/admin/"), ("//admin//x", "/admin/x"), ("/./admin/.", "/admin/"),
    ("/ucp/%7Euser", "/ucp/~user"), ("/..", None), ("/a/../../admin", None), ("/adm%2fin", None),
    ("/adm%5Cin", None), ("/admin\\x", None), ("/%0a", None), ("/%ff", None), ("admin", None), ("", None),
    ("/ucp/x.php?a=b;c#", None), ("/ucp/a%20b", "/ucp/a b"), ("/ADMIN/", "/ADMIN/"),
])
def test_the_request_path_is_matched_as_the_upstream_will_see_it(uri: str, path: str | None) -> None:
    assert normal_path(uri) == path


@pytest.mark.parametrize("uri", [
    "/ucp/..;/admin/", "/provisioning/..;/admin/", "/ucp/;jsessionid=1/../admin/", "/admin;x/", "/ucp/%3b/",
    "/ucp/%252e%252e/admin/", "/ucp/%25/", "/ucp/%u002e%u002e/admin/", "/ucp/%zz/",
    "/ucp/#/../admin/", "/ucp/x#", "/ucp/%23/../admin/", "/ucp/%3f/../admin/",
    "/ucp/%2e%2e/admin/", "/ucp/.%2e/admin/", "/ucp/%2E/admin/",
    "/ucp/\uff0e\uff0e/admin/", "/ucp/%ef%bc%8e%ef%bc%8e/admin/", "/ucp/caf\u00e9", "/ucp/%c0%ae%c0%ae/admin/",
])
def test_a_path_some_upstream_reads_differently_is_refused(uri: str) -> None:
    """Tomcat's "..;", double decoding, a raw '#', encoded dot segments, NFKC look-alikes: 403."""
    assert normal_path(uri) is None


@pytest.mark.parametrize(("path", "site"), [
    ("/ADMIN/x", None), ("/Admin", None), ("/admin/public/x", "public"), ("/admin/PUBLIC/x", None),
    ("/Admin/public/", None), ("/Administrator", "all"), ("/x/Y", "all"), ("/admin/Config.php", "admin"),
])
def test_a_path_whose_site_depends_on_letter_case_is_refused(path: str, site: str | None) -> None:
    """An upstream may or may not ignore case: both readings must give the same site, else 403."""
    sites = [{"name": "all", "path": "/"}, {"name": "admin", "path": "/admin/", "allow_groups": ["root"]},
             {"name": "public", "path": "/admin/public/"}]
    found = match_site(gate_config(sites=sites).gate, "pbx.example.com", path)
    assert (found.name if found else None) == site


def test_a_site_naming_the_host_wins_over_one_without_whatever_the_order() -> None:
    sites = [{"name": "any", "path": "/admin/"}, {"name": "named", "host": "pbx.example.com", "path": "/admin"}]
    for order in (sites, sites[::-1]):
        found = match_site(gate_config(sites=order).gate, "pbx.example.com", "/admin/x")
        assert found is not None and found.name == "named"


def gate_config(**gate: Any) -> Config:
    base = {"return_hosts": ["pbx.example.com"], "sites": [
        {"name": "all", "path": "/"},
        {"name": "admin", "path": "/admin/", "allow_groups": ["root"]},
        {"name": "other-host", "host": "ucp.example.com", "path": "/"},
        {"name": "phones", "path": "/provisioning", "exempt_networks": ["198.51.100.0/24"]},
    ]}
    return Config.from_mapping({"gate": {**base, **gate}})


@pytest.mark.parametrize(("host", "path", "site"), [
    ("pbx.example.com", "/", "all"), ("PBX.example.com", "/admin/x.php", "admin"), ("pbx.example.com", "/admin",
                                                                                     "admin"),
    ("pbx.example.com", "/administrator", "all"), ("pbx.example.com:443", "/admin/", "admin"),
    ("ucp.example.com", "/admin/", "other-host"), ("evil.example", "/", None),
    ("pbx.example.com", "/provisioning/0004f2.cfg", "phones"),
])
def test_sites_match_by_host_then_longest_path(host: str, path: str, site: str | None) -> None:
    found = match_site(gate_config().gate, host, path)
    assert (found.name if found else None) == site


@pytest.mark.parametrize(("gate", "problem"), [
    ({"enforce": "maybe"}, "gate.enforce"), ({"sites": [{"name": "a", "path": "admin"}]}, "sites[1].path"),
    ({"sites": [{"name": "a", "path": "/x/../y"}]}, "sites[1].path"), ({"default_return": "//evil"}, "default_return"),
    ({"sites": [{"name": "a", "path": "/", "idle_timeout": 999999}]}, "idle_timeout"),
    ({"return_hosts": ["https://pbx"]}, "return_hosts"), ({"surprise": 1}, "unknown key in gate"),
    ({"sites": [{"name": "a", "path": "/", "colour": "red"}]}, "unknown key in gate.sites[1]"),
    ({"sites": [{"name": "a", "path": "/"}, {"name": "a", "path": "/b"}]}, "used twice"),
    ({"sites": [{"name": "open", "path": "/admin"}, {"name": "admins", "path": "/admin/", "allow_groups": ["x"]}]},
     "sites.*entry 2 .'admins'.: the same host and path as 'open'"),
    ({"sites": [{"name": "a", "host": "pbx.example.com", "path": "/x/"}, {"name": "b", "host": "PBX.example.com",
                                                                        "path": "/x"}]}, "the same host and path"),
    ({"sites": [{"name": "a", "path": "/Admin/"}]}, "sites[1].path.*lower case"),
    ({"sites": [{"name": "a", "path": "/admin;x/"}]}, "sites[1].path"),
])
def test_gate_config_is_strict(gate: dict[str, Any], problem: str) -> None:
    from pam_linkus.errors import ConfigError

    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        gate_config(**gate)


def test_gate_configs_that_lock_everyone_out_are_warned_at_load() -> None:
    from pam_linkus.config import gate_warnings

    assert gate_warnings(gate_config().gate) == []
    assert gate_warnings(Config.from_mapping({}).gate) == []  # no gate section: no gate, nothing to say
    assert gate_warnings(gate_config(sites=[]).gate) == [
        "gate: no sites: every request the gate is asked about is refused (403)"]
    hostless = gate_warnings(gate_config(return_hosts=[]).gate)
    assert len(hostless) == 1 and "return_hosts is empty" in hostless[0] and "all, admin, phones" in hostless[0]
    missing = gate_warnings(gate_config(sites=[{"name": "a", "path": "/", "allow_groups": ["whell-linkus-x"]}]).gate)
    assert missing == ["gate: site 'a': Unix group 'whell-linkus-x' (allow_groups) does not exist on this host"]


# -- linkusd's gate ops, in process --------------------------------------------------------


class GateApi(Api):
    """The real Engine and GateService (linkusd's web ops with the gate's) with a clock."""

    def __init__(self, site: Site):
        from pam_linkus.daemon.gate import GateService

        super().__init__(site)
        self.service = GateService(self.engine, fail_delay=0.0)

    def check(self, token: str, uri: str = "/admin/", host: str = "pbx.example.com",
              client: str = CLIENT) -> dict[str, Any]:
        return self("gate_check", token=token, client=client, host=host, uri=uri)

    def sign_in(self, user: str, secret: str | None = SECRET, *, rd: str = "/admin/") -> dict[str, Any]:
        first = self("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT, rd=rd)
        if secret is None or not first["ok"] or first["state"] == "in":
            return first
        return self("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT,
                    code=code_at(secret, self.clock.now), rd=rd)


def configure(s: Site, **gate: Any) -> None:
    s.stack.config["gate"] = {"return_hosts": ["pbx.example.com"], "touch_interval": 10,
                              "sites": [{"name": "admin", "path": "/admin/"}], **gate}
    s.stack.write_config()


@pytest.fixture
def gate_api(site: tuple[Site, Any], user: str) -> Iterator[GateApi]:
    configure(site[0])
    site[0].add(user, method="totp", secret=SECRET)
    driver = GateApi(site[0])
    yield driver
    driver.close()


def test_both_factors_give_a_session_that_passes(gate_api: GateApi, user: str) -> None:
    first = gate_api("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT, rd="https://pbx.example.com/admin/x")
    assert first["ok"] and first["state"] == "code" and "token" not in first
    assert gate_api.check("")["error"] == "expired"  # the password alone gives nothing
    done = gate_api("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT,
                    code=code_at(SECRET, gate_api.clock.now), rd="https://pbx.example.com/admin/x")
    assert done["ok"] and done["state"] == "in" and done["return"] == "https://pbx.example.com/admin/x"
    assert gate_api.check(done["token"]) == {"ok": True, "user": user, "method": "totp", "site": "admin"}
    line = logged(gate_api.site.log, service="linkus-gate", outcome="success")
    assert line["account"] == user and line["rhost"] == CLIENT
    assert all(done["token"] not in text and SECRET not in text for text in gate_api.site.log.lines)
    # the store keeps only a keyed hash of the token
    (stored,) = gate_api.store().gate_sessions(user, gate_api.clock.now)
    assert done["token"] not in repr(vars(stored) if hasattr(stored, "__dict__") else stored.key)
    assert stored.key != done["token"] and len(stored.key) == 64


def test_a_wrong_or_replayed_code_and_a_wrong_password_pass_nobody(gate_api: GateApi, user: str) -> None:
    assert gate_api("gate_sign_in", ext=user, password="wrong", client=CLIENT) == {"ok": False, "error": "denied"}
    assert logged(gate_api.site.log, service="linkus-gate", reason="wrong password")["account"] == user
    first = gate_api("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT)
    wrong = "000000" if code_at(SECRET, gate_api.clock.now) != "000000" else "111111"
    assert gate_api("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT,
                    code=wrong)["error"] == "denied"
    assert 'service=linkus-gate' in gate_api.site.log.wait_for('outcome="denied" reason="wrong code')
    assert gate_api.sign_in(user)["ok"]
    replay = gate_api.sign_in(user)  # the same time step: the code was used
    assert replay == {"ok": False, "error": "denied"}
    assert gate_api.store().lock_status(user, gate_api.clock.now).failures == 1


def test_each_gate_failure_is_counted_once_by_fail2ban(gate_api: GateApi, user: str, tmp_path: Path) -> None:
    import collections

    from test_fail2ban import as_auth_log, matches, require_fail2ban

    require_fail2ban()
    gate_api.site.log.take()
    attacker = "198.51.100.66"
    assert gate_api("gate_sign_in", ext=user, password="wrong", client=attacker)["error"] == "denied"
    assert gate_api("gate_sign_in", ext="nobody-here", password="wrong", client=attacker)["error"] == "denied"
    first = gate_api("gate_sign_in", ext=user, password=PASSWORD, client=attacker)
    assert gate_api("gate_code", session=first["session"], csrf=first["csrf"], client=attacker,
                    code="12345x")["error"] == "denied"
    gate_api.clock.now += 30
    assert gate_api.sign_in(user)["ok"]  # a success from CLIENT counts nothing
    lines = [line for line in gate_api.site.log.take() if "pam_linkus(linkusd)[" in line]
    found = matches([as_auth_log(line) for line in lines], tmp_path)
    assert collections.Counter(found) == {attacker: 3}, (found, lines)
    assert all("caller_uid=-" not in line for line in lines)
    assert sum('service="linkus-gate"' in line and line.endswith("rhost_trusted=yes") for line in lines) == 4


def test_gate_lines_count_the_lock_once_and_never_an_address_linkus_web_cannot_vouch_for(
        gate_api: GateApi, user: str, tmp_path: Path) -> None:
    """As PAM logins (docs/fail2ban.md): the code that set the lock counts, a try while locked does not,
    and a client that is no canonical IP address ("unix", leading zeros, mapped) is rhost_trusted=no."""
    import collections

    from test_fail2ban import as_auth_log, matches, require_fail2ban

    require_fail2ban()
    gate_api.site.log.take()
    attacker = "2001:db8::66"
    for client in ["unix", "198.051.100.066", "::ffff:198.51.100.67", attacker, attacker]:
        gate_api.clock.now += 30
        first = gate_api("gate_sign_in", ext=user, password=PASSWORD, client=client)
        assert first["ok"], (client, first)
        assert gate_api("gate_code", session=first["session"], csrf=first["csrf"], client=client,
                        code="000000")["error"] in ("denied", "locked")
    gate_api.clock.now += 30
    assert gate_api("gate_sign_in", ext=user, password=PASSWORD, client=attacker)["error"] == "locked"
    lines = [line for line in gate_api.site.log.take() if 'service="linkus-gate"' in line]
    assert sum('outcome="locked"' in line for line in lines) == 2, lines  # set, then a try while locked
    assert sum(line.endswith("rhost_trusted=no") for line in lines) == 3, lines
    found = matches([as_auth_log(line) for line in lines], tmp_path)
    assert collections.Counter(found) == {attacker: 2}, (found, lines)  # a wrong code + the 5th, that locked


def test_an_unknown_name_answers_as_a_wrong_password(gate_api: GateApi) -> None:
    assert gate_api("gate_sign_in", ext="nobody-here", password=PASSWORD, client=CLIENT) == {
        "ok": False, "error": "denied"}


def test_sign_out_and_every_revocation_end_access_at_the_next_check(gate_api: GateApi, user: str) -> None:
    tokens = [gate_api.sign_in(user)["token"]]
    for _ in range(3):
        gate_api.clock.now += 30
        tokens.append(gate_api.sign_in(user)["token"])
    assert all(gate_api.check(t)["ok"] for t in tokens)
    assert gate_api("gate_sign_out", token=tokens[0]) == {"ok": True, "ended": 1}
    assert gate_api.check(tokens[0])["error"] == "expired"
    store = gate_api.store()
    ids = [s.id for s in store.gate_sessions(user, gate_api.clock.now)]
    assert store.gate_revoke(id=ids[0]) == 1
    assert gate_api.check(tokens[1])["error"] == "expired" and gate_api.check(tokens[2])["ok"]
    assert store.gate_revoke(account=user) == 2
    assert not any(gate_api.check(t)["ok"] for t in tokens)


def test_cli_lists_and_revokes_by_account_and_all(gate_api: GateApi, site: tuple[Site, Any], user: str,
                                                 make_user: Any) -> None:
    other = str(make_user())
    site[0].add(other, method="totp", secret=SECRET)
    gate_api.reload()
    mine = gate_api.sign_in(user)["token"]
    theirs = gate_api.sign_in(other)["token"]
    listed = run_cli(site[0].stack, "gate-sessions")
    assert listed.returncode == 0 and user in listed.stdout and other in listed.stdout, listed
    assert mine not in listed.stdout and theirs not in listed.stdout  # ids, never the cookie
    rows = [re.split(r" {2,}", line) for line in listed.stdout.splitlines()]
    assert rows[0] == ["ID", "ACCOUNT", "METHOD", "CREATED", "LAST SEEN", "CLIENT"], listed.stdout
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+"
    for row in rows[1:]:  # every column apart, whatever the width of the time zone's name
        assert len(row) == 6 and re.fullmatch(stamp, row[3]) and re.fullmatch(stamp, row[4]), listed.stdout
        assert row[1] in (user, other) and row[2] == "totp" and row[5] == CLIENT, listed.stdout
    unknown = run_cli(site[0].stack, "gate-revoke", "0123456789abcdef")
    assert unknown.returncode == 1 and "0 gate sessions ended" in unknown.stdout
    assert run_cli(site[0].stack, "gate-revoke", "--account", user).returncode == 0
    assert gate_api.check(mine)["error"] == "expired" and gate_api.check(theirs)["ok"]
    assert logged(site[0].log, action="gate-revoke", ext=user)["ended"] == "1"
    assert "1 gate session ended" in run_cli(site[0].stack, "gate-revoke", "--all").stdout
    assert gate_api.check(theirs)["error"] == "expired"
    assert "no gate sessions" in run_cli(site[0].stack, "gate-sessions", user).stdout


def test_idle_and_lifetime_end_a_session(site: tuple[Site, Any], user: str) -> None:
    configure(site[0], idle_timeout=600, session_lifetime=3600,
              sites=[{"name": "admin", "path": "/admin/", "idle_timeout": 300}, {"name": "all", "path": "/"}])
    site[0].add(user, method="totp", secret=SECRET)
    api = GateApi(site[0])
    try:
        token = api.sign_in(user)["token"]
        api.clock.now += 299
        assert api.check(token)["ok"]
        api.clock.now += 299  # the last use was written (touch_interval 10): 299 s idle again
        assert api.check(token)["ok"]
        api.clock.now += 301
        assert api.check(token)["error"] == "expired"  # the admin site's 300 s
        assert api.check(token, uri="/")["ok"]  # the gate's 600 s
        for _ in range(7):
            api.clock.now += 500
            api.check(token, uri="/")
        assert api.check(token, uri="/")["error"] == "expired"  # 3600 s after the sign-in, however used
    finally:
        api.close()


def test_a_lock_and_settings_changes_refuse_an_existing_session(gate_api: GateApi, site: tuple[Site, Any],
                                                                user: str) -> None:
    token = gate_api.sign_in(user)["token"]
    store = gate_api.store()
    for _ in range(5):
        store.reserve_attempt(user, gate_api.clock.now, max_failures=5, duration=900, permanent_after=10)
    store.settle_failure(user, gate_api.clock.now, max_failures=5, duration=900, permanent_after=10)
    assert gate_api.check(token)["error"] == "expired"  # locked: at once
    store.unlock(user)
    assert gate_api.check(token)["ok"]
    site[0].add(user)  # 2FA switched off (gate enforce: all)
    gate_api.reload()  # a new config generation: the account is asked again at once
    assert gate_api.check(token)["error"] == "expired"
    del site[0].stack.extensions[user]
    site[0].stack.write_extensions()
    gate_api.reload()
    assert gate_api.check(token)["error"] == "expired"


def test_the_auth_check_needs_no_web_worker_and_a_dead_store_passes_nobody(gate_api: GateApi, user: str) -> None:
    import threading

    token = gate_api.sign_in(user)["token"]
    release = threading.Event()
    busy = [gate_api.loop.run_in_executor(gate_api.engine._web_pool, release.wait, 30) for _ in range(2)]
    try:
        assert gate_api.check(token)["ok"]  # both web workers are held: the check does not need one
    finally:
        release.set()
        gate_api.loop.run_until_complete(asyncio.gather(*busy))
    gate_api.engine.snapshot().store.close()  # the state store cannot be asked any more
    assert gate_api.check(token) == {"ok": False, "error": "unavailable"}
    assert not any("gate_check" in line for line in gate_api.site.log.lines)  # summarised, not one per request


def test_the_account_is_asked_again_only_after_the_interval(site: tuple[Site, Any], user: str) -> None:
    configure(site[0], account_check_interval=60)
    site[0].add(user, method="totp", secret=SECRET)
    api = GateApi(site[0])
    try:
        token = api.sign_in(user)["token"]
        assert api.check(token)["ok"]
        snapshot = api.engine.snapshot()
        asked: list[str] = []
        real = snapshot.chain

        class Counting:
            def lookup_account(self, name: str, **options: Any) -> Any:
                asked.append(name)
                return real.lookup_account(name, **options)

        snapshot.chain = Counting()  # type: ignore[assignment]
        for _ in range(20):
            assert api.check(token)["ok"]
        assert asked == []  # 20 checks, no settings lookup
        api.clock.now += 61
        assert api.check(token)["ok"] and asked == [user]
    finally:
        api.close()


@pytest.mark.parametrize("rule", ["allow_groups", "allow_extensions"])
def test_allow_rules_refuse_other_accounts_with_403(site: tuple[Site, Any], user: str, make_user: Any,
                                                    rule: str) -> None:
    other = str(make_user())
    group = site[0].group  # a throwaway group: add `user` only
    subprocess.run(["gpasswd", "-a", user, group], check=True, capture_output=True)
    allow = {"allow_groups": [group]} if rule == "allow_groups" else {"allow_extensions": [user]}
    configure(site[0], sites=[{"name": "admin", "path": "/admin/", **allow}, {"name": "all", "path": "/"}])
    site[0].add(user, method="totp", secret=SECRET)
    site[0].add(other, method="totp", secret=SECRET)
    api = GateApi(site[0])
    try:
        mine = api.sign_in(user)["token"]
        api.clock.now += 30
        theirs = api.sign_in(other)["token"]
        assert api.check(mine)["ok"] and api.check(theirs)["error"] == "forbidden"
        assert api.check(theirs, uri="/")["ok"]  # the same session passes the site that lets everyone in
        assert api.check(mine, uri="/admin/../admin/")["ok"]
        assert api.check(theirs, uri="/%61dmin/")["error"] == "forbidden"  # no encoded detour
        assert api.check(theirs, host="elsewhere.example")["error"] == "forbidden"  # no site: fail closed
    finally:
        api.close()


@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")
def test_an_ldap_group_allow_rule_reads_the_directory(site: tuple[Site, Any], user: str, make_user: Any,
                                                      slapd: Any) -> None:
    from ldap_server import SUFFIX
    from test_pam_ldap import use_ldap

    other = str(make_user())
    s = site[0]
    s.add(user, method="totp", secret=SECRET)
    s.add(other, method="totp", secret=SECRET)
    base = slapd.tree({user: {"seeAlso": f"cn=admins,ou=groups,{SUFFIX}"},
                       other: {"seeAlso": f"cn=sales,ou=groups,{SUFFIX}"}})
    use_ldap(s.stack, slapd, base, sources=["yaml", "ldap"], group_attribute="seeAlso")
    configure(s, sites=[{"name": "admin", "path": "/admin/", "allow_ldap_groups": ["admins"]},
                        {"name": "all", "path": "/"}])
    api = GateApi(s)
    try:
        mine = api.sign_in(user)["token"]
        api.clock.now += 30
        theirs = api.sign_in(other)["token"]
        assert api.check(mine)["ok"] and api.check(theirs)["error"] == "forbidden"
        assert api.check(theirs, uri="/")["ok"]
    finally:
        api.close()


def test_exempt_networks_pass_without_a_session(site: tuple[Site, Any], user: str) -> None:
    configure(site[0], sites=[{"name": "phones", "path": "/provisioning/", "exempt_networks": ["198.51.100.0/24"]}])
    api = GateApi(site[0])
    try:
        assert api.check("", uri="/provisioning/x.cfg", client="198.51.100.9") == {
            "ok": True, "user": "", "method": "exempt", "site": "phones"}
        assert api.check("", uri="/provisioning/x.cfg", client="192.0.2.1")["error"] == "expired"
        for detour in ("/provisioning/..;/admin/", "/provisioning/%252e%252e/admin/", "/provisioning/#/../admin/"):
            assert api.check("", uri=detour, client="198.51.100.9")["error"] == "forbidden", detour
    finally:
        api.close()


@pytest.mark.parametrize("policy", ["enroll", "refuse", "enrolled"])
def test_not_enrolled_is_never_let_through_under_enforce_all(site: tuple[Site, Any], user: str, policy: str) -> None:
    if policy == "enrolled":
        configure(site[0], enforce="enrolled")
    else:
        configure(site[0], not_enrolled=policy)
    site[0].add(user)  # no 2FA
    api = GateApi(site[0])
    try:
        reply = api.sign_in(user)
        if policy == "enrolled":
            assert reply["ok"] and reply["state"] == "in"
            assert api.check(reply["token"]) == {"ok": True, "user": user, "method": "password", "site": "admin"}
            site[0].add(user, method="totp", secret=SECRET)  # enrolled since: the code is now due
            api.reload()
            assert api.check(reply["token"])["error"] == "expired"
            return
        assert reply["ok"] is False and reply["error"] == "not-enrolled" and "token" not in reply
        assert reply["enroll"] is (policy == "enroll")
        if policy == "enroll":  # a Security Settings session to turn 2FA on, and nothing for the gate
            assert api("status", session=reply["session"])["enabled"] is False
        assert api.store().gate_sessions(user, api.clock.now) == []
        if policy == "enroll":
            # that session proved the password only: once a second factor exists (enrolled elsewhere),
            # it can neither read the settings nor get recovery codes nor switch 2FA off
            site[0].add(user, method="totp", secret=SECRET)
            api.reload()
            me = {"session": reply["session"], "csrf": reply["csrf"], "client": "192.0.2.10"}
            assert api("recovery_codes", password=PASSWORD, **me) == {"ok": False, "error": "expired"}
            assert api("status", session=reply["session"]) == {"ok": False, "error": "expired"}
    finally:
        api.close()


def test_group_rules_make_the_gate_stricter(site: tuple[Site, Any], make_user: Any, make_group: Any) -> None:
    """An unenrolled member of an ``enforce: all`` group never passes on its password, even where the
    gate and the site say ``enrolled``; a group rule's ``methods`` restrict the gate as a PAM login."""
    s = site[0]
    member, other, totp_user = make_user(), make_user(), make_user()
    group, totp_group = make_group(member), make_group(totp_user)
    s.stack.config["group_policy"] = [{"name": "admins", "unix_groups": [group], "enforce": "all"}]
    configure(s, enforce="enrolled", not_enrolled="refuse")
    s.add(member)
    s.add(other)
    s.add(totp_user, method="totp", secret=SECRET)
    api = GateApi(s)
    try:
        refused = api.sign_in(member)
        assert (refused["ok"], refused["error"], refused["enroll"]) == (False, "not-enrolled", False)
        assert api.store().gate_sessions(member, api.clock.now) == []
        passed = api.sign_in(other)  # not in the group: the password alone, as enforce: enrolled says
        assert passed["ok"] and passed["state"] == "in"
        assert api.check(passed["token"])["method"] == "password"
        totp_token = api.sign_in(totp_user)["token"]
        assert api.check(totp_token)["method"] == "totp"
        # the rules change: other joins an enforce: all rule, totp_user's group now allows email only
        s.stack.config["group_policy"] = [
            {"name": "admins", "unix_groups": [group], "enforce": "all"},
            {"name": "others", "unix_groups": [make_group(other)], "enforce": "all"},
            {"name": "mail-only", "unix_groups": [totp_group], "methods": ["email"]}]
        configure(s, enforce="enrolled", not_enrolled="refuse")
        api.reload()
        assert api.check(passed["token"])["error"] == "expired"
        assert api.check(totp_token)["error"] == "expired"
        api.clock.now += 30
        assert api.sign_in(totp_user)["ok"] is False  # the flow refuses a method the rules do not allow
    finally:
        api.close()


def test_per_account_sessions_are_bounded(site: tuple[Site, Any], user: str) -> None:
    configure(site[0], max_sessions_per_account=2)
    site[0].add(user, method="totp", secret=SECRET)
    api = GateApi(site[0])
    try:
        tokens = []
        for _ in range(3):
            tokens.append(api.sign_in(user)["token"])
            api.clock.now += 30
        assert [api.check(t).get("ok", False) for t in tokens] == [False, True, True]
    finally:
        api.close()


def test_every_gate_second_factor_end_is_one_linkus_gate_count_with_its_line(site: tuple[Site, Any],
                                                                              user: str) -> None:
    """A store outage at the sign-in (right password) or between sign-in and code, and a full session
    table after a right code: each is one login line of service linkus-gate, counted once there (never
    as linkus-web); the code step's lines carry the account's method."""
    configure(site[0], max_sessions=1)
    site[0].add(user, method="totp", secret=SECRET)
    api = GateApi(site[0])
    try:
        logins = api.engine.stats.logins
        first = api("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT)
        wrong = "000000" if code_at(SECRET, api.clock.now) != "000000" else "111111"
        assert api("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT, code=wrong)["ok"] is False
        assert logged(api.site.log, service="linkus-gate", outcome="denied")["method"] == "totp"
        first = api("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT)
        api.engine.snapshot().store.close()  # the store fails between sign-in and code
        assert api("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT,
                   code=code_at(SECRET, api.clock.now)) == {"ok": False, "error": "unavailable"}
        assert logins[("unavailable", "totp", "linkus-gate")] == 1 and not any(
            service == "linkus-web" for _, _, service in logins), logins
        assert logged(api.site.log, service="linkus-gate", outcome="unavailable")["account"] == user
        # the store fails at the sign-in itself, after the right password
        assert api("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT)["error"] == "unavailable"
        assert logins[("unavailable", "totp", "linkus-gate")] == 2, logins
        api.reload()
        api.clock.now += 30
        assert api.sign_in(user)["ok"]  # the one session max_sessions allows
        api.clock.now += 30
        assert api.sign_in(user) == {"ok": False, "error": "throttled", "retry_after": 60}
        line = logged(api.site.log, service="linkus-gate", reason="too many gate sessions (throttled)")
        assert (line["outcome"], line["method"], line["account"]) == ("denied", "totp", user)
        assert logins[("success", "totp", "linkus-gate")] == 1 and logins[("denied", "totp", "linkus-gate")] == 2
    finally:
        api.close()


def test_a_recovery_code_at_the_gate_reaches_the_gui_as_recovery(gate_api: GateApi, user: str) -> None:
    from pam_linkus.recovery import digest, new_salt

    salt = new_salt()
    gate_api.store().set_recovery_codes(user, salt, [digest("abcdefghij", salt)])
    done = gate_api.sign_in(user, secret=None)
    done = gate_api("gate_code", session=done["session"], csrf=done["csrf"], client=CLIENT, code="abcdefghij")
    assert done["ok"] and gate_api.check(done["token"])["method"] == "recovery"
    line = logged(gate_api.site.log, service="linkus-gate", outcome="success")
    assert (line["method"], line["reason"]) == ("totp", "recovery code accepted")  # the metrics' label


def test_a_revocation_on_one_host_is_seen_by_another_sharing_redis(site: tuple[Site, Any], user: str,
                                                                    redis_server: Any) -> None:
    s = site[0]
    s.stack.config["state"] = {"backend": "redis", "redis": {"url": redis_server.url}}
    configure(s)
    s.add(user, method="totp", secret=SECRET)
    one, two = GateApi(s), GateApi(s)
    try:
        token = one.sign_in(user)["token"]
        assert two.check(token)["ok"]  # the other host knows the session
        (sess,) = two.store().gate_sessions(user, two.clock.now)
        assert two.store().gate_revoke(id=sess.id) == 1
        assert one.check(token)["error"] == "expired"
        # wrong gate codes on one host lock the account on the other
        first = two("gate_sign_in", ext=user, password=PASSWORD, client=CLIENT)
        two("gate_code", session=first["session"], csrf=first["csrf"], client=CLIENT, code="12345x")
        assert one.store().lock_status(user, one.clock.now).failures == 1
    finally:
        one.close()
        two.close()


# -- real linkusd + linkus-web, asked like nginx asks ----------------------------------------------


class UnixHTTP(http.client.HTTPConnection):
    """HTTP/1.1 to linkus-web's unix socket (nginx's ``proxy_pass http://unix:...``)."""

    def __init__(self, path: Path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(str(self.path))
        self.sock = sock


class Browser:
    """Just enough of a browser: a cookie jar and forms; requests carry what nginx adds."""

    def __init__(self, path: Path, proto: str = "http"):
        self.path = path
        self.proto = proto
        self.cookies: dict[str, str] = {}
        self.set_cookie: list[str] = []

    def request(self, method: str, url: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = UnixHTTP(self.path)
        try:
            head = {"Host": "pbx.example.com", "X-Forwarded-For": CLIENT, "X-Forwarded-Proto": self.proto,
                    **(headers or {})}
            if self.cookies:
                head["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            body = None
            if form is not None:
                body = urllib.parse.urlencode(form)
                head["Content-Type"] = "application/x-www-form-urlencoded"
            conn.request(method, url, body=body, headers=head)
            response = conn.getresponse()
            text = response.read().decode()
            self.set_cookie = response.headers.get_all("set-cookie") or []
            for line in self.set_cookie:
                name, _, rest = line.partition("=")
                value = rest.split(";", 1)[0].strip('"')
                if "max-age=0" in line.lower() or value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
            return response.status, {k.lower(): v for k, v in response.getheaders()}, text
        finally:
            conn.close()

    def auth(self, uri: str = "/admin/", **headers: str) -> tuple[int, dict[str, str]]:
        status, head, body = self.request("GET", "/linkus-gate/auth", headers={
            "X-Original-URI": uri, "X-Original-Host": "pbx.example.com", "X-Original-Method": "GET", **headers})
        assert body == ""
        return status, head


def form_value(page: str, name: str) -> str:
    marker = f'name="{name}" value="'
    start = page.index(marker) + len(marker)
    return page[start:page.index('"', start)]


@pytest.fixture
def gate_web(site: tuple[Site, Any], user: str, tmp_path: Path) -> Iterator[tuple[Site, Any, Path]]:
    """linkusd, and linkus-web on a unix socket behind a (pretend) nginx it trusts (--trust-proxy)."""
    if not NATIVE_SO.exists() or not shutil.which("pamtester"):
        pytest.fail("native/pam_linkus.so and pamtester must exist (make test builds and installs them)")
    s = site[0]
    configure(s)
    s.add(user, method="totp", secret=SECRET)
    s.stack.daemon.start()
    server = WebServer(s, tmp_path)
    sock_dir = s.root / "run" / "http"
    sock_dir.mkdir()
    shutil.chown(sock_dir, server.user)
    path = sock_dir / "http.sock"
    try:
        server.start("--unix", str(path), "--unix-group", s.group, "--trust-proxy")
        yield s, s.stack.daemon, path
    finally:
        server.stop()


def sign_in_through_the_pages(b: Browser, user: str, code: str, rd: str = "/admin/?x=1") -> tuple[int, dict[str, str]]:
    status, _head, page = b.request("GET", "/linkus-gate/sign-in?rd=" + urllib.parse.quote(rd, safe=""))
    assert status == 200 and 'name="rd" value="' in page
    status, _head, page = b.request("POST", "/linkus-gate/sign-in", {
        "ext": user, "password": PASSWORD, "csrf": form_value(page, "csrf"), "rd": rd})
    assert status == 200 and 'action="/linkus-gate/code"' in page, page
    status, head, _page = b.request("POST", "/linkus-gate/code", {"code": code, "csrf": form_value(page, "csrf"),
                                                                   "rd": rd})
    return status, head


def test_the_gate_through_real_linkusd_and_linkus_web(gate_web: tuple[Site, Any, Path], user: str) -> None:
    s, _daemon, path = gate_web
    b = Browser(path)
    assert b.auth()[0] == 401  # no session
    # the 401 names the sign-in page with the whole return URL encoded (nginx cannot encode it)
    status, head = b.auth("/admin/?a=1&b=x%26y&c=\u00e9")
    # (nginx's raw bytes: a non-ASCII byte stays that byte, %E9; linkusd's return check refuses it)
    assert status == 401 and head["x-linkus-sign-in"] == ("/linkus-gate/sign-in"
                                                          "?rd=/admin/%3Fa%3D1%26b%3Dx%2526y%26c%3D%E9")
    assert b.auth("/admin/" + "a" * 2100)[1]["x-linkus-sign-in"] == "/linkus-gate/sign-in"  # longer than rd
    assert sign_in_url("//evil.example/") == "/linkus-gate/sign-in"  # not a local path
    status, head, page = b.request("GET", "/linkus-gate/sign-in?rd=//evil.example/")
    csrf = form_value(page, "csrf")
    status, head, page = b.request("POST", "/linkus-gate/sign-in", {"ext": user, "password": PASSWORD,
                                                                    "csrf": csrf, "rd": "//evil.example/"})
    assert status == 200 and "linkus_gate_step" in b.cookies
    assert b.auth()[0] == 401  # the password alone passes nothing
    status, head, _ = b.request("POST", "/linkus-gate/code", {"code": code_at(SECRET, time.time()),
                                                               "csrf": form_value(page, "csrf"),
                                                               "rd": "//evil.example/"})
    assert status == 303 and head["location"] == "/"  # the hostile return URL went to default_return
    (cookie,) = [c for c in b.set_cookie if c.startswith("linkus_gate=")]
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path=/", "samesite=lax"} <= attributes and "secure" not in attributes
    status, head = b.auth()
    assert status == 204 and head["x-linkus-user"] == user and head["x-linkus-method"] == "totp"
    assert head["x-linkus-cookie"] == ""  # the session cookie is the gate's: nothing for the GUI
    b.cookies = {"a": "1", **b.cookies, "linkus_session": "s", "z": "2"}
    status, head = b.auth()
    assert status == 204 and head["x-linkus-cookie"] == "a=1; z=2"
    # a name the session parser (Starlette: str.strip()) reads after a no-break space or \x85 is linkus-web's
    # too: the check passes on it, so it never reaches the GUI
    saved, b.cookies = b.cookies, {}
    token = saved["linkus_gate"]
    status, head = b.auth(Cookie=f"a=1;\xa0linkus_gate={token};\x85linkus_session=s; z=2")
    assert status == 204 and head["x-linkus-cookie"] == "a=1; z=2", head
    # a \x0b (no header character): refused cleanly before any page runs, never a pass or a 5xx
    status, _head, _body = b.request("GET", "/linkus-gate/auth", headers={
        "X-Original-URI": "/admin/", "X-Original-Host": "pbx.example.com", "Cookie": f"a=1;\x0blinkus_gate={token}"})
    assert status == 400, status
    b.cookies = saved
    b.cookies = {k: v for k, v in b.cookies.items() if k.startswith("linkus_gate")}
    assert logged(s.log, service="linkus-gate", outcome="success")["account"] == user
    # the Security Settings pages also live under /linkus-gate/account/ (not_enrolled: enroll sends
    # people there), with their own links; the gate's check is never reachable through that prefix
    status, _head, page = b.request("GET", "/linkus-gate/account/sign-in")
    assert status == 200 and 'action="/linkus-gate/account/sign-in"' in page and 'action="/sign-in"' not in page
    assert b.request("GET", "/linkus-gate/account/")[1]["location"] == "/linkus-gate/account/sign-in"
    for hidden in ("/linkus-gate/account/linkus-gate/auth", "/linkus-gate/account/linkus-gate"):
        assert b.request("GET", hidden)[0] == 404, hidden
    for detour in ("/admin/..;/elsewhere/", "/admin/%252e%252e/elsewhere/", "/admin/#/../elsewhere/",
                   "/admin/%2e%2e/elsewhere/"):
        assert b.auth(detour)[0] == 403, detour  # under /admin/ here, elsewhere to some upstream: refused
    # sign-out needs its form token, then ends the session everywhere
    status, _, page = b.request("GET", "/linkus-gate/sign-out")
    token = b.cookies["linkus_gate"]
    status, _, refused = b.request("POST", "/linkus-gate/sign-out", {"csrf": "forged"})
    assert status == 400 and b.auth()[0] == 204
    assert 'href="/linkus-gate/sign-in"' in refused and 'href="/"' not in refused and "Back to Security" not in refused
    status, _, _ = b.request("POST", "/linkus-gate/sign-out", {"csrf": form_value(page, "csrf")})
    assert status == 200 and "linkus_gate" not in b.cookies
    b.cookies["linkus_gate"] = token  # a copy of the old cookie is worth nothing
    assert b.auth()[0] == 401


def test_https_cookies_revocation_by_cli_and_linkusd_down(gate_web: tuple[Site, Any, Path], user: str) -> None:
    s, daemon, path = gate_web
    b = Browser(path, proto="https")
    status, head = sign_in_through_the_pages(b, user, code_at(SECRET, time.time()), rd="https://pbx.example.com/a")
    assert status == 303 and head["location"] == "https://pbx.example.com/a"
    (cookie,) = [c for c in b.set_cookie if c.startswith("__Host-linkus_gate=")]
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path=/", "samesite=lax", "secure"} <= attributes
    assert not any(a.startswith("domain") for a in attributes)
    assert b.auth()[0] == 204
    plain = Browser(path, proto="https")  # the same token under the plain name is not read under HTTPS
    plain.cookies["linkus_gate"] = b.cookies["__Host-linkus_gate"]
    assert plain.auth()[0] == 401
    listed = run_cli(s.stack, "gate-sessions", user)
    assert listed.returncode == 0 and user in listed.stdout and CLIENT in listed.stdout, listed
    session_id = listed.stdout.splitlines()[1].split()[0]
    revoked = run_cli(s.stack, "gate-revoke", session_id)
    assert revoked.returncode == 0 and "1 gate session ended" in revoked.stdout
    assert b.auth()[0] == 401  # the next request
    status, head, page = b.request("GET", "/linkus-gate/forbidden")
    assert status == 403 and 'data-kind="forbidden"' in page and "/linkus-gate/static/style.css" in page
    status, head, page = b.request("GET", "/linkus-gate/static/style.css")
    assert status == 200 and "no-store" not in head.get("cache-control", "")
    daemon.stop()
    assert b.auth()[0] == 502  # linkusd down: nobody passes
    status, _, page = b.request("GET", "/linkus-gate/unavailable")
    assert status == 503 and 'data-kind="unavailable"' in page
    status, _, page = b.request("GET", "/linkus-gate/sign-in")
    assert status == 200
    status, _, page = b.request("POST", "/linkus-gate/sign-in", {"ext": user, "password": PASSWORD,
                                                                 "csrf": form_value(page, "csrf")})
    assert status == 503 and 'data-kind="unavailable"' in page


def test_linkusd_warns_at_load_of_a_gate_that_refuses_everyone(site: tuple[Site, Any]) -> None:
    s = site[0]
    configure(s, return_hosts=[], sites=[{"name": "gui", "path": "/", "allow_groups": ["whell-linkus-test"]}])
    s.stack.daemon.start()
    line = s.log.wait_for("return_hosts is empty")
    assert "pam_linkus(linkusd)" in line and "(gui)" in line
    assert "'whell-linkus-test' (allow_groups) does not exist" in s.log.wait_for("allow_groups")


def test_the_gate_s_error_pages_lead_back_to_the_gate_s_sign_in(gate_web: tuple[Site, Any, Path], user: str) -> None:
    """A stale form (400), a lock (403): the way back is the gate's sign-in with the return URL, never
    the Security Settings page; a return URL that cannot be kept is left out, never written raw."""
    _s, _daemon, path = gate_web
    b = Browser(path)
    rd = "https://pbx.example.com/admin/?a=1&b=<x>"
    status, _, page = b.request("POST", "/linkus-gate/sign-in", {"ext": user, "password": PASSWORD,
                                                                 "csrf": "stale", "rd": rd})
    back = 'href="/linkus-gate/sign-in?rd=' + urllib.parse.quote(rd, safe="") + '"'
    assert status == 400 and 'data-kind="bad-request"' in page and back in page, page
    assert 'href="/"' not in page and "Back to Security" not in page and "/linkus-gate/static/" in page
    status, _, page = b.request("POST", "/linkus-gate/sign-in", {"ext": user, "password": PASSWORD,
                                                                 "csrf": "stale", "rd": "/x\n" + "y" * 3000})
    assert status == 400 and 'href="/linkus-gate/sign-in"' in page and "yyy" not in page


def test_gate_failures_lock_pam_logins(gate_web: tuple[Site, Any, Path], user: str) -> None:
    s, _daemon, path = gate_web
    b = Browser(path)
    for _ in range(4):  # lockout.max_failures of the test site is 5
        status, head = sign_in_through_the_pages(b, user, "12345x")
        assert status == 303 and "wrong=code" in head["location"]
    status, head = sign_in_through_the_pages(b, user, "12345x")
    assert status == 403  # the fifth wrong code locked the extension, and the page says so
    result = s.stack.login(user, code_at(SECRET, time.time()))
    assert result.auth == "PAM_MAXTRIES"  # the PAM login sees the lock the gate's wrong codes set
    status, _, page = b.request("GET", "/linkus-gate/sign-in")
    status, _, page = b.request("POST", "/linkus-gate/sign-in", {"ext": user, "password": PASSWORD,
                                                                 "csrf": form_value(page, "csrf")})
    assert status == 403 and 'data-kind="locked"' in page
    assert 'href="/linkus-gate/sign-in"' in page and "Back to Security" not in page



def test_a_state_file_of_the_release_before_gets_the_gate_table(private_dir: Path) -> None:
    import os
    import sqlite3

    from pam_linkus.state.sqlite_store import MIGRATIONS, SqliteStore

    path = str(private_dir / "state.db")
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:-1]:
        db.executescript(script)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
    db.commit()
    db.close()
    os.chmod(path, 0o600)
    store = SqliteStore(path)
    try:
        assert store.gate_create("ab" * 32, "1001", "totp", CLIENT, "", 1000.0, lifetime=3600, idle=600,
                                 max_per_account=2, max_total=10)
        assert store.counts()["gate_sessions"] == 1
    finally:
        store.close()
