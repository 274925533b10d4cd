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
- A grace period starts only after a right code (``start_grace``, called by the
  flow after a success), per (extension, remote address). A login inside it skips
  the code but does not extend it: only another right code does.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

from pam_linkus.config import Profile
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
    if host is None or not store.grace_active(user, host, now):
        return None
    return Decision(Outcome.SKIP, "grace period", method)


def start_grace(user: str, rhost: str | None, profile: Profile, store: StateStore, now: float) -> None:
    """After a right code: open (or extend) the grace period of (``user``, ``rhost``)."""
    host = _grace_host(rhost, profile)
    if host is not None:
        store.start_grace(user, host, now, profile.grace_period)
