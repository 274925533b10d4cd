"""group_policy through real libpam + pam_linkus.so and a real linkusd: a real Unix group made
for the test (groupadd), LDAP groups from a real slapd, and ``linkus-2fa doctor EXT``."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import SECRET, PamStack, code_at
from ldap_server import SUFFIX, Slapd
from pam_client import ClientOutcome
from test_cli_doctor import doctor
from test_pam_ldap import totp_entry, use_ldap

pytestmark = [pytest.mark.pam, pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")]

ADMINS = f"cn=admins,ou=groups,{SUFFIX}"
SALES = f"cn=sales,ou=groups,{SUFFIX}"


def test_enforce_all_for_a_unix_group_and_enrolled_for_the_rest(pam_stack: PamStack, make_user: Any,
                                                                  make_group: Any) -> None:
    member, other = make_user(), make_user()
    group = make_group(member)
    pam_stack.write_config(enforce="enrolled",
                           group_policy=[{"name": "admins", "unix_groups": [group], "enforce": "all"}])
    result = pam_stack.login(other, None)
    assert (result.auth, result.prompts) == ("PAM_SUCCESS", ["Password: "])  # the password alone
    assert pam_stack.login(member, None).outcome == ClientOutcome.NEED_CODE
    assert pam_stack.login(member, "123456").auth == "PAM_AUTH_ERR"
    line = pam_stack.log.wait_for("outcome=denied")
    assert f"user={member}" in line and "enforce: all" in line
    # enrolled, the member passes with a code; the group's rule does not stop it
    pam_stack.enroll_totp(member)
    assert pam_stack.login(member, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"


def test_a_unix_group_rule_takes_its_members_out_of_an_exempt_network(pam_stack: PamStack, make_user: Any,
                                                                       make_group: Any) -> None:
    member, other = make_user(), make_user()
    group = make_group(member)
    pam_stack.enroll_totp(member)
    pam_stack.enroll_totp(other)
    pam_stack.write_config(exempt_networks=["192.0.2.0/24"],
                           group_policy=[{"unix_groups": [group], "exempt_networks": []}])
    assert pam_stack.login(other, None, rhost="192.0.2.7").auth == "PAM_SUCCESS"
    assert pam_stack.login(member, None, rhost="192.0.2.7").outcome == ClientOutcome.NEED_CODE


def test_an_ldap_group_rule_from_the_entry_s_own_search(pam_stack: PamStack, slapd: Slapd, make_user: Any) -> None:
    """``ldap.group_attribute`` names any DN-valued attribute (slapd here has no memberOf overlay:
    seeAlso). An entry without 2FA attributes is "not here" for settings, and its groups still count."""
    admin, seller, enrolled_admin = make_user(), make_user(), make_user()
    base = slapd.tree({admin: {"seeAlso": ADMINS}, seller: {"seeAlso": SALES},
                       enrolled_admin: {**totp_entry(), "seeAlso": [SALES, ADMINS]}})
    use_ldap(pam_stack, slapd, base, group_attribute="seeAlso")
    pam_stack.write_config(group_policy=[{"name": "admins", "ldap_groups": ["admins"], "enforce": "all"}])
    assert pam_stack.login(seller, None).auth == "PAM_SUCCESS"
    assert pam_stack.login(admin, None).outcome == ClientOutcome.NEED_CODE
    assert pam_stack.login(admin, "123456").auth == "PAM_AUTH_ERR"
    line = pam_stack.log.wait_for("outcome=denied")
    assert f"user={admin} " in line and "enforce: all" in line
    assert pam_stack.login(enrolled_admin, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"


def test_ldap_groups_are_read_when_yaml_answered_first(pam_stack: PamStack, slapd: Slapd, make_user: Any) -> None:
    """sources [yaml, ldap]: the settings come from YAML, the groups from the directory; a rule
    allowing only email codes to the group refuses the member's TOTP."""
    member, other = make_user(), make_user()
    pam_stack.enroll_totp(member)
    pam_stack.enroll_totp(other)
    base = slapd.tree({member: {"seeAlso": ADMINS}, other: {"seeAlso": SALES}})
    use_ldap(pam_stack, slapd, base, sources=["yaml", "ldap"], group_attribute="seeAlso")
    pam_stack.write_config(group_policy=[{"ldap_groups": [ADMINS.upper()], "methods": ["email"]}])
    assert pam_stack.login(other, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
    assert pam_stack.login(member, code_at(SECRET, time.time())).auth == "PAM_AUTH_ERR"
    assert "method totp is not allowed" in pam_stack.log.wait_for(f"user={member} ")


def test_doctor_shows_the_groups_the_rules_and_the_effective_policy(pam_stack: PamStack, make_user: Any,
                                                                     make_group: Any) -> None:
    member = make_user()
    group, second = make_group(member), make_group(member)
    pam_stack.enroll_totp(member)
    pam_stack.write_config(
        grace_period=600, exempt_networks=["10.0.0.0/8"],
        profiles={"sshd": {"methods": ["totp"]}},
        group_policy=[{"name": "admins", "unix_groups": [group], "enforce": "all", "grace_period": 60,
                       "exempt_networks": ["10.1.0.0/16"]},
                      {"name": "phones", "unix_groups": ["nogroup"], "methods": ["email"]},
                      {"name": "noemail", "unix_groups": [second], "methods": ["totp"]}])
    out = doctor(pam_stack.config_path, member, "--pam-dir", str(pam_stack.root)).stdout
    assert f"ok   groups {member}: unix: " in out and group in out
    assert "ok   group rule admins: applies: enforce=all exempt_networks=10.1.0.0/16 grace_period=60" in out
    assert "ok   group rule phones: does not apply (not in its groups)" in out
    assert "ok   group rule noemail: applies: methods=totp" in out
    assert (f"ok   policy {member} (top level): enforce=enrolled methods=totp, email exempt_networks=10.0.0.0/8 "
            "grace_period=600 -> enforce=all methods=totp exempt_networks=10.1.0.0/16 grace_period=60") in out
    assert f"ok   policy {member} (profile sshd): " in out

    pam_stack.write_config(profiles={"sshd": {"methods": ["email"]}})
    result = doctor(pam_stack.config_path, member, "--pam-dir", str(pam_stack.root))
    assert result.returncode == 1
    assert (f"FAIL policy {member} (profile sshd): ") in result.stdout
    assert "no second factor is allowed, every login is denied" in result.stdout


@pytest.mark.parametrize("attribute", ["memberOf", "seeAlsoo"])
def test_a_group_attribute_the_schema_lacks_makes_ldap_group_rules_unavailable(
        pam_stack: PamStack, slapd: Slapd, make_user: Any, attribute: str) -> None:
    """slapd here has no memberof overlay, so memberOf (the default) is in no entry; a typo is in
    none either. Read as "in no group", an enforce: all member would pass on the password alone:
    the groups are unknown instead, the login unavailable, the reload and doctor say why."""
    member = make_user()
    base = slapd.tree({member: {"seeAlso": ADMINS}})
    overrides = {} if attribute == "memberOf" else {"group_attribute": attribute}
    use_ldap(pam_stack, slapd, base, **overrides)
    pam_stack.write_config(group_policy=[{"name": "admins", "ldap_groups": ["admins"], "enforce": "all"}])
    warning = pam_stack.log.wait_for(f"ldap.group_attribute {attribute} is not defined in the directory's schema")
    assert "group_policy" in warning
    result = pam_stack.login(member, None)
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    line = pam_stack.log.wait_for(f"user={member} ")
    assert "outcome=unavailable" in line and f"group_attribute {attribute} is not defined" in line
    out = doctor(pam_stack.config_path, member, "--pam-dir", str(pam_stack.root))
    assert out.returncode == 1
    assert f"FAIL ldap group_attribute: ldap.group_attribute {attribute} is not defined" in out.stdout
    # the attribute the directory has: the rule applies again, the doctor is content
    use_ldap(pam_stack, slapd, base, group_attribute="seeAlso")
    pam_stack.write_config(group_policy=[{"name": "admins", "ldap_groups": ["admins"], "enforce": "all"}])
    assert pam_stack.login(member, None).outcome == ClientOutcome.NEED_CODE
    out = doctor(pam_stack.config_path, member, "--pam-dir", str(pam_stack.root))
    assert "ok   ldap group_attribute: seeAlso is defined in the directory's schema" in out.stdout


def test_a_full_dn_rule_matches_the_directory_s_spelling_as_a_dn(pam_stack: PamStack, slapd: Slapd,
                                                                  make_user: Any) -> None:
    """The directory writes the group DN one way (escapes, case); the rule another way
    (attribute type aliases, spaces, UTF-8): equal as DNs, so the rule applies."""
    member = make_user()
    base = slapd.tree({member: {"seeAlso": f"cn=Ren\\c3\\a9\\2C Admins,ou=groups,{SUFFIX}"}})
    use_ldap(pam_stack, slapd, base, group_attribute="seeAlso")
    rule = "commonName = rené\\, ADMINS, organizationalUnitName=Groups, " + SUFFIX.upper()
    pam_stack.write_config(group_policy=[{"ldap_groups": [rule], "enforce": "all"}])
    assert pam_stack.login(member, None).outcome == ClientOutcome.NEED_CODE


def test_a_unix_group_the_host_lacks_is_warned_at_load_and_by_doctor(pam_stack: PamStack, make_user: Any) -> None:
    member = make_user()
    pam_stack.write_config(group_policy=[{"name": "admins", "unix_groups": ["whell-linkus-test"], "enforce": "all"}])
    line = pam_stack.log.wait_for("does not exist on this host")
    assert "rule 'admins'" in line and "whell-linkus-test" in line
    out = doctor(pam_stack.config_path, member, "--pam-dir", str(pam_stack.root)).stdout
    assert "WARN group rule admins: Unix group 'whell-linkus-test' does not exist on this host" in out


def test_a_grace_opened_before_joining_a_group_ends_by_the_group_s_grace_period(
        pam_stack: PamStack, make_user: Any, make_group: Any) -> None:
    """linkusd's clock is the real one: the group's grace_period is 1 s, and the test waits it out."""
    member = make_user()
    pam_stack.enroll_totp(member)
    pam_stack.write_config(grace_period=600)
    given = time.time()
    assert pam_stack.login(member, code_at(SECRET, given), rhost="192.0.2.7").auth == "PAM_SUCCESS"
    group = make_group(member)
    pam_stack.write_config(group_policy=[{"unix_groups": [group], "grace_period": 1}])
    time.sleep(max(0.0, given + 1.2 - time.time()))
    assert pam_stack.login(member, None, rhost="192.0.2.7").outcome == ClientOutcome.NEED_CODE
    pam_stack.write_config(group_policy=[])
    assert pam_stack.login(member, None, rhost="192.0.2.7").auth == "PAM_SUCCESS"  # 600 s: still in grace
