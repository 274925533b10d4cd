"""An account's group memberships: Unix groups (NSS) and LDAP groups (the directory entry).

Group policy for PAM logins (``group_policy`` in pam_linkus.yaml) and the web gate's
``allow_groups`` / ``allow_ldap_groups`` both ask the same two questions, answered here:

* **Unix groups**: ``pwd.getpwnam(account)`` then ``os.getgrouplist`` (every group, not only
  the primary one), turned into names with ``grp``. An account with no passwd entry has
  none. Cost: one NSS passwd lookup plus one group-list call; with ``files`` that is a read
  of /etc/passwd and /etc/group (microseconds to a millisecond on a PBX-sized host). NSS may
  itself be remote (sssd, winbind, nss-ldap): then the call can block for as long as that
  NSS module's own timeout, and Python cannot put a deadline on a libc call. So callers run
  it where a blocking call is allowed (linkusd's worker pool, after the flow's Offload), and
  sssd's cache keeps it local in practice. Python's ``pwd`` cannot tell "no such user" from
  "NSS could not be asked" (both are KeyError): an account NSS cannot resolve has no Unix
  groups -- which is why group rules can only make a login stricter, and why a login whose
  password module also needs that NSS fails anyway when NSS is down (docs/guide.md).
* **LDAP groups**: the DN values of ``ldap.group_attribute`` (default ``memberOf``) read in
  the SAME search as the extension's settings (``ExtensionSettings.directory_groups``, no
  extra round trip). A rule names a group either by the value of the DN's first RDN
  (``cn=admins,ou=groups,dc=pbx`` -> ``admins``) or by the full DN; a name compares ignoring
  case, a DN as a DN (``parse_dn``: escapes, attribute type aliases, case, spaces). ``None`` means the directory's
  answer is not known (not asked, could not be asked, an offline-cache entry without
  groups): a rule that names an LDAP group then cannot be decided, and callers fail closed.

A YAML extension has no directory groups (``directory_groups`` stays None); local accounts
are grouped with Unix groups.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Most Unix groups looked at per account (getgrouplist's answer is cut there; far above any real host).
MAX_UNIX_GROUPS = 4096


class MembershipUnknown(Exception):
    """A rule names an LDAP group and the account's directory groups are not known.

    Not a LinkusError on purpose: callers decide what it means (the PAM flow and the gate
    turn it into "unavailable"; doctor shows it).
    """


@dataclass(frozen=True)
class Membership:
    """What groups an account is in.

    ``unix``: group names from NSS. ``ldap``: names (first-RDN values, casefolded) of the
    directory groups, or None when unknown. ``ldap_dns``: the same groups as normalised DNs
    (casefolded), so a rule may name a full DN.
    """

    unix: frozenset[str]
    ldap: frozenset[str] | None
    ldap_dns: frozenset[str] = frozenset()

    @property
    def ldap_known(self) -> bool:
        return self.ldap is not None


def unix_groups(account: str) -> frozenset[str]:
    """The names of every Unix group ``account`` is in (primary and supplementary); none
    when NSS has no passwd entry for it. A gid without a name is left out (it can match no rule)."""
    if not account or "\x00" in account:
        return frozenset()
    try:
        entry = pwd.getpwnam(account)
        gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
    except (KeyError, OSError, ValueError):
        return frozenset()
    names = set()
    for gid in gids[:MAX_UNIX_GROUPS]:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except (KeyError, OverflowError):
            continue
    return frozenset(names)


#: RFC 4519 / 4524 short names for the attribute types group DNs use, from their long names and
#: OIDs: ``commonName=admins`` and ``2.5.4.3=admins`` are ``cn=admins``. Any other type is kept
#: as given (lower-cased), so it equals only itself.
_TYPE_ALIASES = {
    "commonname": "cn", "2.5.4.3": "cn",
    "organizationalunitname": "ou", "2.5.4.11": "ou",
    "organizationname": "o", "2.5.4.10": "o",
    "domaincomponent": "dc", "0.9.2342.19200300.100.1.25": "dc",
    "userid": "uid", "0.9.2342.19200300.100.1.1": "uid",
    "localityname": "l", "2.5.4.7": "l",
    "stateorprovincename": "st", "2.5.4.8": "st",
    "countryname": "c", "2.5.4.6": "c",
}
_SPACES = re.compile(r"\s+")
#: Characters escaped in the canonical form, so a value holding them cannot fake a separator.
_CANONICAL_ESCAPES = str.maketrans({c: "\\" + c for c in '\\,+="<>;#'})


def parse_dn(dn: str) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """A DN as RDNs, each a sorted tuple of (attribute type, value): types lower-cased with the
    common aliases mapped (``commonName``/``CN``/``2.5.4.3`` -> ``cn``), values unescaped (RFC 4514
    ``\\,``, ``\\2C``, ``\\c3\\a9``), compared as caseIgnoreMatch does for ``cn``: case folded,
    leading/trailing spaces dropped, inner runs of spaces made one. None when it is not a DN we
    can compare (no ``=``, an empty type, a BER ``#`` value, escaped bytes that are not UTF-8)."""
    text = dn.strip()
    if not text:
        return None
    rdns = []
    for rdn in _split_unescaped(text, ","):
        avas = []
        for ava in _split_unescaped(rdn, "+"):
            kind, sep, raw = ava.partition("=")
            kind = kind.strip().lower()
            if not sep or not kind or "\\" in kind:
                return None
            value = _unescape(raw.strip())
            if value is None:
                return None
            avas.append((_TYPE_ALIASES.get(kind, kind), _SPACES.sub(" ", value.strip()).casefold()))
        rdns.append(tuple(sorted(avas)))
    return tuple(rdns)


def normalize_dn(dn: str) -> str:
    """A DN in one canonical spelling (``parse_dn``), so two DNs equal as DNs are equal strings;
    a text that does not parse is only trimmed and case-folded (it equals only itself)."""
    parsed = parse_dn(dn)
    if parsed is None:
        return "\x00" + dn.strip().casefold()  # cannot equal a canonical DN
    return ",".join("+".join(f"{kind}={value.translate(_CANONICAL_ESCAPES)}" for kind, value in rdn)
                    for rdn in parsed)


def ldap_group_key(rule_group: str) -> str:
    """What a rule's LDAP group is compared as: a full DN (it holds ``=``) canonical, a first-RDN
    value case-folded. Two rule entries with the same key name the same group."""
    return normalize_dn(rule_group) if "=" in rule_group else rule_group.casefold()


def _split_unescaped(text: str, separator: str) -> list[str]:
    """``text`` split at every ``separator`` that no backslash escapes (RFC 4514)."""
    if "\\" not in text:
        return text.split(separator)  # the common case, at C speed
    parts: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == separator:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


_HEX = frozenset("0123456789abcdefABCDEF")


def _unescape(value: str) -> str | None:
    """An RFC 4514 attribute value without its escapes (``\\,`` and ``\\c3\\a9``); None when it is
    BER-encoded (``#...``) or its escaped bytes are not UTF-8."""
    if value.startswith("#"):
        return None
    if "\\" not in value:
        return value
    data = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 2 < len(value) and value[i + 1] in _HEX and value[i + 2] in _HEX:
            data.append(int(value[i + 1:i + 3], 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            data.extend(value[i + 1].encode("utf-8", "surrogatepass"))
            i += 2
        else:
            data.extend(value[i].encode("utf-8", "surrogatepass"))
            i += 1
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def group_name(dn: str) -> str | None:
    """The value of a DN's first RDN (``cn=admins,ou=groups,dc=pbx`` -> ``admins``), casefolded;
    None for a multi-valued first RDN (``cn=a+uid=b``) or a value that is not text: such a group
    can be named only by its full DN."""
    first = _split_unescaped(dn.strip(), ",")[0]
    if len(_split_unescaped(first, "+")) > 1:
        return None
    _attr, sep, value = first.partition("=")
    if not sep:
        return None
    name = _unescape(value.strip())
    if not name:
        return None
    return name.casefold()


def membership(account: str, directory_groups: Iterable[str] | None) -> Membership:
    """The Membership of ``account``: its Unix groups (NSS, see ``unix_groups``) and its directory
    groups (the DN values from the entry's ``ldap.group_attribute``; None: not known)."""
    unix = unix_groups(account)
    if directory_groups is None:
        return Membership(unix, None)
    dns = list(directory_groups)
    names = frozenset(n for n in (group_name(dn) for dn in dns) if n)
    return Membership(unix, names, frozenset(normalize_dn(dn) for dn in dns))


def ldap_group_matches(rule_group: str, member: Membership) -> bool:
    """Whether the account is in ``rule_group`` (a first-RDN value, or a full DN when it holds ``=``).
    MembershipUnknown when the directory's answer is not known."""
    if member.ldap is None:
        raise MembershipUnknown("the account's LDAP groups are not known")
    if "=" in rule_group:
        return normalize_dn(rule_group) in member.ldap_dns
    return rule_group.casefold() in member.ldap


def matches(rule_groups: Iterable[str], rule_ldap_groups: Iterable[str], member: Membership) -> bool:
    """True when the account is in any of ``rule_groups`` (Unix) or ``rule_ldap_groups`` (LDAP).

    A Unix match decides without the directory. Otherwise, if the rule names an LDAP group and
    the account's directory groups are not known, raise MembershipUnknown: never guess "not a
    member" (that could pick a weaker policy, or let someone through a gate site)."""
    if any(group in member.unix for group in rule_groups):
        return True
    ldap_groups = list(rule_ldap_groups)
    if not ldap_groups:
        return False
    return any(ldap_group_matches(group, member) for group in ldap_groups)
