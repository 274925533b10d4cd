"""pam_linkus.groups: Unix groups from NSS, LDAP group DNs turned into names, and rule matching."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from pam_linkus import groups
from pam_linkus.groups import Membership, MembershipUnknown


@pytest.mark.parametrize(("dn", "name"), [
    ("cn=admins,ou=groups,dc=pbx,dc=example", "admins"),
    ("CN = Admins , ou=groups", "admins"),
    ("cn=sales\\, east,ou=groups", "sales, east"),
    ("cn=caf\\c3\\a9,dc=x", "café"),
    ("cn=a+uid=b,dc=x", None),        # multi-valued first RDN: only the full DN names it
    ("cn=#0403616263,dc=x", None),    # BER value
    ("cn=\\ff,dc=x", None),           # not UTF-8
    ("admins", None),                 # not a DN
])
def test_group_name_is_the_first_rdn_value(dn: str, name: str | None) -> None:
    assert groups.group_name(dn) == name


def test_normalize_dn_ignores_case_and_spaces_around_separators() -> None:
    assert groups.normalize_dn(" CN=Admins , OU = Groups,dc=PBX ") == "cn=admins,ou=groups,dc=pbx"
    assert groups.normalize_dn("cn=a\\,b") == "cn=a\\,b"


@pytest.mark.parametrize(("a", "b"), [
    ("cn=Ren\\c3\\a9,ou=groups,dc=pbx", "CN=René,OU=Groups,DC=PBX"),          # UTF-8 escapes
    ("cn=sales\\2C east,dc=pbx", "cn=sales\\, east,dc=pbx"),                   # hex vs backslash escape
    ("commonName=admins,organizationalUnitName=groups,o=Acme", "cn=admins,ou=groups,O=acme"),
    ("domainComponent=pbx,dc=example", "dc=pbx,DC=example"),
    ("userid=bob,l=Paris,st=IDF,c=FR", "uid=bob,localityName=paris,stateOrProvinceName=idf,countryName=fr"),
    ("2.5.4.3=admins,dc=pbx", "cn=admins,dc=pbx"),                             # the OID of cn
    (" cn = admins , ou = groups ", "cn=admins,ou=groups"),                    # spaces around = and ,
    ("cn=ad  mins,dc=pbx", "cn=ad mins,dc=pbx"),                              # inner spaces (caseIgnoreMatch)
    ("cn=a+uid=b,dc=pbx", "UID=B+CN=A,dc=pbx"),                              # multi-valued RDN in any order
    ("cn=a\\+b,dc=pbx", "cn=a\\2bb,dc=pbx"),
    ("1.2.3.4=x,dc=pbx", "1.2.3.4=X,dc=pbx"),                                  # unknown OID kept as given
])
def test_dns_equal_as_dns_are_equal(a: str, b: str) -> None:
    assert groups.parse_dn(a) is not None
    assert groups.normalize_dn(a) == groups.normalize_dn(b)
    member = groups.membership("no-such-account-linkus-test", [a])
    assert groups.matches([], [b], member)


@pytest.mark.parametrize(("a", "b"), [
    ("cn=a\\,b,dc=pbx", "cn=a,cn=b,dc=pbx"),         # an escaped comma is not a separator
    ("cn=a\\+b,dc=pbx", "cn=a+cn=b,dc=pbx"),
    ("cn=admins,ou=groups", "ou=admins,ou=groups"),  # the type counts
    ("cn=admins,ou=groups", "cn=admins,ou=group"),
    ("1.2.3.4=x,dc=pbx", "1.2.3.5=x,dc=pbx"),
    ("cn=admins,dc=pbx", "cn=admins,dc=pbx,dc=com"),
])
def test_dns_that_differ_as_dns_do_not_match(a: str, b: str) -> None:
    member = groups.membership("no-such-account-linkus-test", [a])
    assert not groups.matches([], [b], member)


def test_unix_groups_of_a_real_account_are_every_group_it_is_in() -> None:
    me = pwd.getpwuid(os.getuid())
    expected = {grp.getgrgid(g).gr_name for g in os.getgrouplist(me.pw_name, me.pw_gid)}
    assert groups.unix_groups(me.pw_name) == expected
    assert grp.getgrgid(me.pw_gid).gr_name in expected


@pytest.mark.parametrize("name", ["no-such-account-linkus-test", "", "a\x00b"])
def test_an_account_without_a_passwd_entry_has_no_unix_groups(name: str) -> None:
    assert groups.unix_groups(name) == frozenset()


def test_membership_turns_dns_into_names_and_keeps_full_dns() -> None:
    member = groups.membership("no-such-account-linkus-test", ["cn=Admins,ou=groups,dc=pbx", "cn=x+uid=y,dc=pbx"])
    assert member.unix == frozenset()
    assert member.ldap == frozenset({"admins"})
    assert member.ldap_dns == frozenset({"cn=admins,ou=groups,dc=pbx", "cn=x+uid=y,dc=pbx"})
    assert groups.membership("no-such-account-linkus-test", None).ldap is None


def test_matches_by_unix_group_ldap_name_or_full_dn() -> None:
    member = Membership(frozenset({"sudo"}), frozenset({"admins"}), frozenset({"cn=admins,ou=groups,dc=pbx"}))
    assert groups.matches(["sudo"], [], member)
    assert not groups.matches(["wheel"], [], member)
    assert groups.matches([], ["ADMINS"], member)
    assert groups.matches([], ["CN=Admins, ou=Groups, dc=pbx"], member)
    assert not groups.matches([], ["cn=admins,ou=other,dc=pbx"], member)
    assert not groups.matches(["wheel"], ["sales"], member)
    assert not groups.matches([], [], member)


def test_unknown_directory_groups_never_mean_not_a_member() -> None:
    member = Membership(frozenset({"sudo"}), None)
    assert groups.matches(["sudo"], ["admins"], member)  # a Unix match decides without the directory
    assert not groups.matches(["wheel"], [], member)     # the rule names no LDAP group
    with pytest.raises(MembershipUnknown):
        groups.matches(["wheel"], ["admins"], member)
