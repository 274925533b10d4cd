"""group_policy: parsing, how rules combine with a service profile, and the flow's use of it.

Without PAM: a real SqliteStore, the real Unix groups of the account running the tests (NSS),
a chain stand-in that answers settings and directory groups, an injected clock. The same
feature goes through real PAM, a real Unix group and a real slapd in test_pam_group_policy.py.
"""

from __future__ import annotations

import grp
import os
import pwd
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, code_at
from fakes import Clock, Prompter

from nss_config.base import ExtensionSettings
from pam_linkus import policy
from pam_linkus.config import Config, GroupRule, Profile
from pam_linkus.errors import CodeRejected, ConfigError, NotEnrolled, SourceUnavailable
from pam_linkus.flow import Context, LoginRequest, authenticate, split_digits
from pam_linkus.groups import Membership
from pam_linkus.outcome import Outcome
from pam_linkus.state.sqlite_store import SqliteStore

T0 = 1_700_000_000.0
#: The account running the tests: it has a passwd entry and a primary group NSS can name.
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(pwd.getpwuid(os.getuid()).pw_gid).gr_name
OTHER_GROUP = "linkus-no-such-group"
ADMINS_DN = "cn=admins,ou=groups,dc=pbx"


class Chain:
    """Settings and the directory's group DNs (None: not known), as SourceChain.lookup_account."""

    waits_for_servers = False

    def __init__(self, settings: ExtensionSettings | None, directory: frozenset[str] | None = None, *,
                 down: bool = False):
        self.settings = settings
        self.directory = directory
        self.down = down
        self.lookups = 0

    def lookup(self, user: str) -> ExtensionSettings | None:
        return self.lookup_account(user)[0]

    def lookup_account(self, user: str, *, want_groups: bool = True
                       ) -> tuple[ExtensionSettings | None, frozenset[str] | None]:
        self.lookups += 1
        if self.down:
            raise SourceUnavailable("ldap://192.0.2.1: timed out")
        return self.settings, self.directory


TOTP = ExtensionSettings(ME, "totp", secret=SECRET, source="test")
EMAIL = ExtensionSettings(ME, "email", email="a@example.com", source="test")


def config(rules: list[dict[str, Any]], **keys: Any) -> Config:
    return Config.from_mapping({"sources": keys.pop("sources", ["yaml", "ldap"]),
                                "ldap": {"uris": ["ldaps://ldap.example"], "bind_dn": "cn=x",
                                         "bind_password_file": "/nonexistent", "base": "dc=pbx"},
                                "group_policy": rules, **keys})


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(str(tmp_path / "state.db"))
    yield s
    s.close()


def login(cfg: Config, store: SqliteStore, chain: Chain, *answers: str, rhost: str | None = None) -> Any:
    ctx = Context(cfg, Clock(T0), chain, store)  # type: ignore[arg-type]
    return authenticate(LoginRequest(ME, "sshd", rhost), ctx, Prompter(*answers))


# -- config ------------------------------------------------------------------------------


def test_rules_parse_in_order_with_unset_keys_as_none() -> None:
    cfg = config([{"name": "admins", "unix_groups": ["sudo", "wheel"], "ldap_groups": [ADMINS_DN],
                   "enforce": "all", "methods": ["totp"]},
                  {"unix_groups": "phones", "exempt_networks": ["10.9.0.0/16"], "grace_period": 0}])
    first, second = cfg.group_policy
    assert (first.name, first.unix_groups, first.ldap_groups, first.enforce, first.methods) == (
        "admins", ["sudo", "wheel"], [ADMINS_DN], "all", ["totp"])
    assert (first.exempt_networks, first.grace_period) == (None, None)
    assert (second.name, second.unix_groups, second.exempt_networks, second.grace_period) == (
        "rule 2", ["phones"], [ip_network("10.9.0.0/16")], 0)
    assert Config.from_mapping({}).group_policy == []


@pytest.mark.parametrize(("rules", "message"), [
    ([{"unix_groups": ["sudo"], "enforce": "all", "mystery": 1}], r"unknown key in group_policy\[1\]"),
    ([{"unix_groups": ["bad group"], "enforce": "all"}], r"group_policy\[1\]\.unix_groups: entry 1 is not a group"),
    ([{"unix_groups": ["-x"], "enforce": "all"}], "not a group name"),
    ([{"ldap_groups": ["adm\nins"], "enforce": "all"}], "ldap_groups: entry 1 is not a group name or DN"),
    ([{"ldap_groups": ["Admins", "admins"], "enforce": "all"}], "lists an entry twice"),
    ([{"unix_groups": ["sudo", "sudo"], "enforce": "all"}], "lists an entry twice"),
    ([{"name": "a", "unix_groups": ["sudo"], "enforce": "all"},
      {"name": "a", "unix_groups": ["wheel"], "enforce": "all"}], r"group_policy\[2\]\.name: is the name of an"),
    ([{"unix_groups": ["sudo"], "enforce": "all"}, {"unix_groups": ["sudo"], "grace_period": 0}],
     r"group_policy\[2\]\.unix_groups: names a group an earlier rule names"),
    ([{"ldap_groups": ["admins"], "enforce": "all"}, {"ldap_groups": ["ADMINS"], "grace_period": 0}],
     "names a group an earlier rule names"),
    ([{"ldap_groups": ["cn=Admins,dc=pbx", "commonName=admins, DC=PBX"], "enforce": "all"}], "lists an entry twice"),
    ([{"ldap_groups": ["cn=Ren\\c3\\a9,dc=pbx"], "enforce": "all"}, {"ldap_groups": ["CN=René,dc=pbx"],
      "grace_period": 0}], r"group_policy\[2\]\.ldap_groups: names a group an earlier rule names"),
    ([{"ldap_groups": ["cn=x,=y"], "enforce": "all"}], "entry 1 is not a DN this module can compare"),
    ([{"unix_groups": ["sudo"], "enfore": "all"}], r"unknown key in group_policy\[1\] \(known: "),
    ([{"unix_group": ["sudo"], "enforce": "all"}], r"unknown key in group_policy\[1\] \(known: "),
    ([{"unix_groups": ["Admins", "admins"], "enforce": "all"}], "lists a group twice"),
    ([{"unix_groups": ["Admins"], "enforce": "all"}, {"unix_groups": ["admins"], "grace_period": 0}],
     r"group_policy\[2\]\.unix_groups: names a group an earlier rule names"),
    ([{"enforce": "all"}], "must name at least one group"),
    ([{"unix_groups": ["sudo"]}], "must set at least one of enforce, methods, exempt_networks, grace_period"),
    ([{"unix_groups": ["sudo"], "methods": []}], "must name at least one method"),
    ([{"unix_groups": ["sudo"], "methods": ["sms"]}], "entry 1 is unknown"),
    ([{"unix_groups": ["sudo"], "enforce": "some"}], "enforce: must be one of"),
    ([{"unix_groups": ["sudo"], "exempt_networks": ["10.0.0.1/8"]}], "exempt_networks: entry 1 is not a CIDR"),
    ([{"unix_groups": ["sudo"], "grace_period": -1}], "grace_period: must be between"),
    ([{"unix_groups": ["sudo"], "enforce": None}], "has no value"),
    (["sudo"], r"group_policy\[1\] must be a mapping"),
    ({"sudo": {"enforce": "all"}}, "group_policy: must be a list of rules"),
])
def test_a_bad_rule_is_a_config_error_naming_it(rules: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(rules)


def test_an_ldap_group_without_an_ldap_source_is_an_error() -> None:
    with pytest.raises(ConfigError, match="names ldap_groups, but sources does not list ldap"):
        config([{"ldap_groups": ["admins"], "enforce": "all"}], sources=["yaml"])


def test_the_error_never_shows_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        config([{"unix_groups": ["s3cret value"], "enforce": "all"}])
    assert "s3cret" not in str(caught.value)


# -- combination: the stricter value wins on every key -----------------------------------


def rule(**keys: Any) -> GroupRule:
    return config([{"unix_groups": ["g"], **keys}]).group_policy[0]


PROFILE = Profile("sshd", "enrolled", [ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")], 600,
                  ["totp", "email"])


def test_no_rule_leaves_the_profile_as_it_is() -> None:
    assert policy.combine(PROFILE, []) is PROFILE


def test_enforce_all_if_the_profile_or_any_rule_says_all() -> None:
    assert policy.combine(PROFILE, [rule(enforce="enrolled")]).enforce == "enrolled"
    assert policy.combine(PROFILE, [rule(enforce="enrolled"), rule(enforce="all")]).enforce == "all"
    strict = Profile("x", "all", [], 0, ["totp"])
    assert policy.combine(strict, [rule(enforce="enrolled")]).enforce == "all"


def test_methods_are_the_intersection_and_may_become_empty() -> None:
    assert policy.combine(PROFILE, [rule(methods=["totp"])]).methods == ["totp"]
    assert policy.combine(PROFILE, [rule(grace_period=5)]).methods == ["totp", "email"]
    assert policy.combine(PROFILE, [rule(methods=["totp"]), rule(methods=["email"])]).methods == []
    email_only = Profile("web", "enrolled", [], 0, ["email"])
    assert policy.combine(email_only, [rule(methods=["totp"])]).methods == []


def test_an_address_is_exempt_only_where_the_profile_and_every_rule_that_sets_networks_agree() -> None:
    narrower = policy.combine(PROFILE, [rule(exempt_networks=["10.1.0.0/16", "192.0.2.0/24"])])
    assert narrower.exempt_networks == [ip_network("10.1.0.0/16")]  # 192.0.2.0/24: not in the profile
    wider = policy.combine(PROFILE, [rule(exempt_networks=["10.1.2.0/24"]), rule(exempt_networks=["8.0.0.0/6"])])
    assert wider.exempt_networks == [ip_network("10.1.2.0/24")]  # 8.0.0.0/6 holds 10/8 in part
    assert policy.combine(PROFILE, [rule(exempt_networks=[])]).exempt_networks == []
    untouched = policy.combine(PROFILE, [rule(enforce="all")])
    assert untouched.exempt_networks == PROFILE.exempt_networks
    none = Profile("x", "enrolled", [], 0, ["totp"])
    assert policy.combine(none, [rule(exempt_networks=["10.0.0.0/8"])]).exempt_networks == []


def test_grace_period_is_the_shortest() -> None:
    assert policy.combine(PROFILE, [rule(grace_period=60), rule(grace_period=3600)]).grace_period == 60
    assert policy.combine(PROFILE, [rule(grace_period=0)]).grace_period == 0
    assert policy.combine(PROFILE, [rule(grace_period=9999)]).grace_period == 600


def test_the_combined_policy_names_its_parts() -> None:
    cfg = config([{"name": "admins", "unix_groups": ["g"], "enforce": "all"}])
    assert policy.combine(PROFILE, cfg.group_policy).name == "sshd+admins"
    assert policy.combine(cfg.default_profile, cfg.group_policy).name == "(top level)+admins"


def test_matching_rules_by_unix_group_and_ldap_group() -> None:
    cfg = config([{"name": "u", "unix_groups": ["sudo"], "enforce": "all"},
                  {"name": "l", "ldap_groups": ["admins"], "methods": ["totp"]},
                  {"name": "n", "unix_groups": ["wheel"], "grace_period": 0}])
    member = Membership(frozenset({"sudo"}), frozenset({"admins"}), frozenset({ADMINS_DN}))
    assert [r.name for r in policy.matching_rules(cfg.group_policy, member)] == ["u", "l"]


# -- the flow ----------------------------------------------------------------------------


def test_a_member_without_2fa_is_refused_under_the_group_s_enforce_all(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [MY_GROUP], "enforce": "all"}])
    with pytest.raises(NotEnrolled, match="enforce: all"):
        login(cfg, store, Chain(None, frozenset()), "123456")
    other = config([{"unix_groups": [OTHER_GROUP], "enforce": "all"}])
    decision = login(other, store, Chain(None, frozenset()))
    assert (decision.outcome, decision.reason) == (Outcome.SKIP, "not enrolled")


def test_a_member_in_an_ldap_group_named_by_dn_or_name(store: SqliteStore) -> None:
    for name in ("admins", "CN=Admins, ou=groups, dc=pbx"):
        cfg = config([{"ldap_groups": [name], "enforce": "all"}])
        with pytest.raises(NotEnrolled):
            login(cfg, store, Chain(None, frozenset({ADMINS_DN})), "123456")
    cfg = config([{"ldap_groups": ["sales"], "enforce": "all"}])
    assert login(cfg, store, Chain(None, frozenset({ADMINS_DN}))).outcome == Outcome.SKIP


def test_unknown_ldap_groups_make_the_login_unavailable(store: SqliteStore) -> None:
    cfg = config([{"ldap_groups": ["admins"], "enforce": "all"}])
    with pytest.raises(SourceUnavailable, match="LDAP groups are not known"):
        login(cfg, store, Chain(TOTP, None))
    with pytest.raises(SourceUnavailable, match="timed out"):
        login(cfg, store, Chain(TOTP, down=True))


def test_a_method_the_group_does_not_allow_is_refused(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [MY_GROUP], "methods": ["totp"]}])
    with pytest.raises(NotEnrolled, match="method email is not allowed"):
        login(cfg, store, Chain(EMAIL, frozenset()), "123456")
    decision = login(cfg, store, Chain(TOTP, frozenset()), code_at(SECRET, T0))
    assert decision.outcome == Outcome.SUCCESS


def test_no_method_left_is_refused_with_a_clear_reason(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [MY_GROUP], "methods": ["email"]}],
                 profiles={"sshd": {"methods": ["totp"]}})
    with pytest.raises(NotEnrolled, match=r"policy sshd\+rule 1 allows no second factor"):
        login(cfg, store, Chain(TOTP, frozenset()), code_at(SECRET, T0))


EXEMPT = ["192.0.2.0/24"]


def test_exemption_without_a_rule_on_networks_needs_no_lookup(store: SqliteStore) -> None:
    cfg = config([{"ldap_groups": ["admins"], "enforce": "all"}], exempt_networks=EXEMPT)
    chain = Chain(TOTP, down=True)  # the directory is down: break-glass still works
    decision = login(cfg, store, chain, rhost="192.0.2.7")
    assert (decision.outcome, chain.lookups) == (Outcome.SKIP, 0)


def test_a_rule_that_narrows_the_exemption_takes_its_members_out(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [MY_GROUP], "exempt_networks": ["192.0.2.128/25"]}], exempt_networks=EXEMPT)
    with pytest.raises(CodeRejected):
        login(cfg, store, Chain(TOTP, frozenset()), "000000", rhost="192.0.2.7")
    chain = Chain(TOTP, down=True)  # inside every network that is set: decided before any lookup
    decision = login(cfg, store, chain, rhost="192.0.2.200")
    assert (decision.outcome, decision.reason, chain.lookups) == (Outcome.SKIP, "exempt network 192.0.2.0/24", 0)


def test_a_unix_rule_on_networks_the_account_is_not_in_decides_without_the_directory(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [OTHER_GROUP], "exempt_networks": []}], exempt_networks=EXEMPT)
    chain = Chain(TOTP, down=True)
    assert login(cfg, store, chain, rhost="192.0.2.7").outcome == Outcome.SKIP
    assert chain.lookups == 0


def test_an_ldap_rule_on_networks_needs_the_directory_and_fails_closed(store: SqliteStore) -> None:
    cfg = config([{"ldap_groups": ["admins"], "exempt_networks": []}], exempt_networks=EXEMPT)
    with pytest.raises(SourceUnavailable):
        login(cfg, store, Chain(TOTP, down=True), rhost="192.0.2.7")
    with pytest.raises(CodeRejected):  # a member: no exemption
        login(cfg, store, Chain(TOTP, frozenset({ADMINS_DN})), "000000", rhost="192.0.2.7")
    decision = login(cfg, store, Chain(TOTP, frozenset()), rhost="192.0.2.7")  # not a member
    assert decision.outcome == Outcome.SKIP


def test_grace_period_of_a_group_is_the_shorter_one(store: SqliteStore) -> None:
    cfg = config([{"unix_groups": [MY_GROUP], "grace_period": 0}], grace_period=600)
    clock = Clock(T0)
    ctx = Context(cfg, clock, Chain(TOTP, frozenset()), store)  # type: ignore[arg-type]
    req = LoginRequest(ME, "sshd", "192.0.2.7")
    assert authenticate(req, ctx, Prompter(code_at(SECRET, T0))).outcome == Outcome.SUCCESS
    clock.now += 30
    with pytest.raises(CodeRejected):  # no grace for this group: the code is asked again
        authenticate(req, ctx, Prompter("000000"))


# -- grace periods end at the right code + the CURRENT policy's grace_period ---------------


def _at(cfg: Config, store: SqliteStore, now: float, service: str, *answers: str) -> Any:
    ctx = Context(cfg, Clock(now), Chain(TOTP), store)  # type: ignore[arg-type]
    return authenticate(LoginRequest(ME, service, "192.0.2.7"), ctx, Prompter(*answers))


def test_a_grace_opened_under_a_longer_profile_ends_by_the_shorter_one(store: SqliteStore) -> None:
    cfg = config([], profiles={"sshd": {"grace_period": 3600}, "asterisk": {"grace_period": 60}})
    assert _at(cfg, store, T0, "sshd", code_at(SECRET, T0)).outcome == Outcome.SUCCESS
    assert _at(cfg, store, T0 + 30, "asterisk").outcome == Outcome.SKIP   # within 60 s of the code
    assert _at(cfg, store, T0 + 120, "sshd").outcome == Outcome.SKIP      # sshd still allows an hour
    with pytest.raises(CodeRejected):                                       # asterisk: 120 s > 60 s
        _at(cfg, store, T0 + 120, "asterisk", "000000")


def test_a_grace_opened_before_joining_a_stricter_group_ends_by_the_group_s(store: SqliteStore) -> None:
    before = config([], grace_period=3600)
    assert _at(before, store, T0, "sshd", code_at(SECRET, T0)).outcome == Outcome.SUCCESS
    joined = config([{"unix_groups": [MY_GROUP], "grace_period": 60}], grace_period=3600)
    assert _at(joined, store, T0 + 59, "sshd").outcome == Outcome.SKIP
    with pytest.raises(CodeRejected):
        _at(joined, store, T0 + 61, "sshd", "000000")
    assert _at(before, store, T0 + 61, "sshd").outcome == Outcome.SKIP  # the grace itself is still there


def test_single_field_splits_by_the_enforce_the_group_rules_give(store: SqliteStore) -> None:
    """An unenrolled member of an enforce: all group: 6 digits, as for the top level's enforce: all
    (the login is refused later either way); not a member: 0, the whole answer is the password."""
    member = config([{"unix_groups": [MY_GROUP], "enforce": "all"}])
    other = config([{"unix_groups": [OTHER_GROUP], "enforce": "all"}])
    for cfg, digits in ((member, 6), (other, 0)):
        ctx = Context(cfg, Clock(T0), Chain(None, frozenset()), store)  # type: ignore[arg-type]
        assert split_digits(LoginRequest(ME, "sshd"), ctx) == digits
    unknown = config([{"ldap_groups": ["admins"], "enforce": "all"}])
    with pytest.raises(SourceUnavailable):
        split_digits(LoginRequest(ME, "sshd"), Context(unknown, Clock(T0), Chain(None), store))  # type: ignore[arg-type]
