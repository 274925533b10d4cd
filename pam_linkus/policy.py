"""Exempt networks and grace periods: the two ways a login may go without a code.

Both are off by default, and both end in a skip (PAM_IGNORE), never a success:
the rest of the stack (the password) still decides the login, so neither can
ever let someone in on its own.

Both key on PAM_RHOST, and only when it is an IP address. An empty or absent
rhost (console, su, a web app that did not pass the client's address) never
matches: otherwise every local login would look "exempt". A host name never
matches either, because the reverse DNS name of an address is chosen by whoever
owns the address block, not by us.

- Exempt networks are decided before the extension's settings are read and
  before the state store is opened: they need no I/O, and they keep working as a
  break-glass path from the management network while LDAP or Redis is down.
- Group rules (``group_policy``) only ever make a login stricter: ``combine`` merges the
  service's profile with every rule whose groups the account is in, the stricter value
  winning on each key. An exemption the profile grants can therefore only be taken away by
  a rule that sets ``exempt_networks``: ``rules_that_may_revoke`` names those for an
  address, and when there are none the exemption is still decided before any I/O.
- A grace period starts only after a right code (``start_grace``, called by the
  flow after a success), per (extension, remote address). A login inside it skips
  the code but does not extend it: only another right code does. It counts only while
  now < the right code's time + the grace_period of the policy this login gets (``in_grace``
  passes it): a period opened under a longer one (another profile, before the account
  joined a stricter group) never outlives what the current policy allows.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pam_linkus.config import GroupRule, Profile
from pam_linkus.groups import Membership, matches
from pam_linkus.outcome import Decision, Outcome
from pam_linkus.state.base import StateStore


def client_address(rhost: str | None) -> IPv4Address | IPv6Address | None:
    """The IP address in PAM_RHOST, or None (absent, empty, a host name, garbage).

    An IPv4-mapped IPv6 address (``::ffff:192.0.2.7``, what a dual-stack socket
    reports) is the IPv4 address it carries, so one exemption or grace period
    covers both spellings.
    """
    if not rhost:
        return None
    try:
        address = ipaddress.ip_address(rhost)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def canonical_address(text: str | None) -> str | None:
    """``text`` as Python's ipaddress writes it if it is an IP address (an IPv4-mapped IPv6 one as
    IPv4), else None: the one spelling an address is logged, limited and banned under.

    ipaddress refuses IPv4 with leading zeros (``127.000.000.001``, octal to inet_aton); a scope
    (``%eth0``) and anything over 64 characters are refused here too: no client's address anyone
    could ban or look up. linkus-web reports clients in this form; the gate trusts exactly this form.
    """
    if not text or len(text) > 64 or "%" in text:
        return None
    address = client_address(text)
    return None if address is None else str(address)


def exempt_network(rhost: str | None, profile: Profile) -> Decision | None:
    """A skip when ``rhost`` lies in one of ``exempt_networks``, else None."""
    if not profile.exempt_networks:
        return None
    address = client_address(rhost)
    if address is None:
        return None
    for network in profile.exempt_networks:
        if address.version == network.version and address in network:
            return Decision(Outcome.SKIP, f"exempt network {network}")
    return None


def _grace_host(rhost: str | None, profile: Profile) -> str | None:
    if profile.grace_period <= 0:
        return None
    address = client_address(rhost)
    return None if address is None else str(address)


def in_grace(user: str, rhost: str | None, profile: Profile, store: StateStore, now: float,
             method: str) -> Decision | None:
    """A skip while ``user`` has a grace period from ``rhost``, else None."""
    host = _grace_host(rhost, profile)
    if host is None or not store.grace_active(user, host, now, profile.grace_period):
        return None
    return Decision(Outcome.SKIP, "grace period", method)


def start_grace(user: str, rhost: str | None, profile: Profile, store: StateStore, now: float) -> None:
    """After a right code: open (or extend) the grace period of (``user``, ``rhost``)."""
    host = _grace_host(rhost, profile)
    if host is not None:
        store.start_grace(user, host, now, profile.grace_period)


Network = IPv4Network | IPv6Network


def intersect_networks(a: Sequence[Network], b: Sequence[Network]) -> list[Network]:
    """The addresses in both lists, as CIDR networks: two CIDR blocks are either disjoint or
    one holds the other, so the intersection is the smaller block of every overlapping pair."""
    found: list[Network] = []
    for x in a:
        for y in b:
            if x.version != y.version:
                continue
            if x.subnet_of(y):  # type: ignore[arg-type]
                found.append(x)
            elif y.subnet_of(x):  # type: ignore[arg-type]
                found.append(y)
    v4 = [n for n in found if isinstance(n, IPv4Network)]
    v6 = [n for n in found if isinstance(n, IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def matching_rules(rules: Sequence[GroupRule], member: Membership) -> list[GroupRule]:
    """The rules whose groups ``member`` is in; MembershipUnknown when a rule that names an
    LDAP group cannot be decided (the directory's answer is not known)."""
    return [rule for rule in rules if matches(rule.unix_groups, rule.ldap_groups, member)]


def combine(profile: Profile, rules: Sequence[GroupRule]) -> Profile:
    """The policy of an account: ``profile`` made stricter by every matching rule.

    enforce: ``all`` if the profile or any rule says so; methods: those the profile and every
    rule that sets methods allow (possibly none: the flow then refuses the login);
    exempt_networks: the addresses the profile and every rule that sets exempt_networks exempt;
    grace_period: the shortest. A key a rule leaves out constrains nothing.
    """
    if not rules:
        return profile
    enforce = profile.enforce
    methods = list(profile.methods)
    networks: list[Network] = list(profile.exempt_networks)
    grace = profile.grace_period
    for rule in rules:
        if rule.enforce == "all":
            enforce = "all"
        if rule.methods is not None:
            methods = [m for m in methods if m in rule.methods]
        if rule.exempt_networks is not None:
            networks = intersect_networks(networks, rule.exempt_networks)
        if rule.grace_period is not None:
            grace = min(grace, rule.grace_period)
    name = "+".join([profile.name or "(top level)", *(rule.name for rule in rules)])
    return Profile(name, enforce, networks, grace, methods)


def in_networks(rhost: str | None, networks: Sequence[Network]) -> bool:
    address = client_address(rhost)
    return address is not None and any(address.version == n.version and address in n for n in networks)


def rules_that_may_revoke(rhost: str | None, rules: Sequence[GroupRule]) -> list[GroupRule]:
    """The rules that would take ``rhost`` out of an exemption if they matched: those that set
    ``exempt_networks`` without this address. None of them: the exemption needs no lookup."""
    return [rule for rule in rules if rule.exempt_networks is not None
            and not in_networks(rhost, rule.exempt_networks)]
