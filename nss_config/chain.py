"""The ordered chain of settings sources, configured by ``sources:`` in pam_linkus.yaml.

The chain moves to the next source only when a source says "not here". A source
that could not be asked stops the chain with SourceUnavailable, unless the admin
set ``on_source_unavailable: next`` -- and even then, if no later source knows
the user, the answer is still "unavailable", never "not enrolled": an LDAP outage
must not turn into "this extension has no 2FA".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nss_config.answer_cache import NOT_CACHED, NotCached
from nss_config.errors import SourceUnavailable
from nss_config.yaml_source import YamlSource

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from nss_config.base import ExtensionSettings, SettingsSource
    from nss_config.options import SettingsCache, SourceOptions


class SourceChain:
    """Ask sources in order; see the module docstring for the rules."""

    __slots__ = ("sources", "skip_unavailable", "waits_for_servers")

    def __init__(self, sources: Sequence[SettingsSource], *, skip_unavailable: bool = False):
        self.sources = list(sources)
        self.skip_unavailable = skip_unavailable
        #: a lookup may wait for a server (LDAP): linkusd then does it in a worker, not on
        #: its event loop (flow.Offload); sources that only read memory say False
        self.waits_for_servers = any(getattr(source, "waits_for_servers", True) for source in self.sources)

    def lookup(self, user: str) -> ExtensionSettings | None:
        """The first source's answer that is not "not here" (see the class docstring)."""
        return self.lookup_account(user, want_groups=False)[0]

    def lookup_account(self, user: str, *, want_groups: bool = True
                       ) -> tuple[ExtensionSettings | None, frozenset[str] | None]:
        """``lookup``, and the DNs of the account's directory groups (pam_linkus.groups).

        The groups come from the directory source's own search for the settings (no extra
        round trip), also when that entry says "not here". Only when an earlier source (YAML)
        answered and the directory was not asked, and ``want_groups`` is set (a group rule names
        an LDAP group), is the directory asked for the groups alone. Groups are None when no
        directory source is configured or one could not be asked (``on_source_unavailable:
        next``): unknown, never "none".
        """
        first_error: SourceUnavailable | None = None
        groups: frozenset[str] | None = None
        asked_directory = False
        found: ExtensionSettings | None = None
        for number, source in enumerate(self.sources):
            account_lookup = getattr(source, "lookup_account", None)
            try:
                if account_lookup is not None:
                    asked_directory = True
                    found, groups = account_lookup(user)
                else:
                    found = source.lookup(user)
            except SourceUnavailable as exc:
                if not self.skip_unavailable:
                    raise
                first_error = first_error or exc
                continue
            if found is not None:
                if want_groups and not asked_directory:
                    groups = self._groups_only(user, self.sources[number + 1:])
                return found, groups
        if first_error is not None:
            raise first_error
        return None, groups

    def _groups_only(self, user: str, later: Sequence[SettingsSource]) -> frozenset[str] | None:
        for source in later:
            account_lookup = getattr(source, "lookup_account", None)
            if account_lookup is None:
                continue
            try:
                groups: frozenset[str] | None = account_lookup(user)[1]
                return groups
            except SourceUnavailable:
                if not self.skip_unavailable:
                    raise
        return None

    def recall(self, user: str) -> ExtensionSettings | NotCached | None:
        """What ``lookup`` would answer from memory alone (YAML held in memory, LDAP's recent
        answers), or NOT_CACHED when a source would have to ask a server first."""
        if not self.waits_for_servers:
            return self.lookup(user)
        for source in self.sources:
            if not getattr(source, "waits_for_servers", True):
                found = source.lookup(user)
            else:
                recall = getattr(source, "recall", None)
                if recall is None:
                    return NOT_CACHED
                recalled: ExtensionSettings | NotCached | None = recall(user)
                if isinstance(recalled, NotCached):
                    return NOT_CACHED
                found = recalled
            if found is not None:
                return found
        return None

    def forget_answers(self) -> None:
        """Drop the answers sources keep in memory: linkusd changed a source (self-service)."""
        for source in self.sources:
            forget = getattr(source, "forget_answers", None)
            if forget is not None:
                forget()

    def group_attribute_problem(self, *, ask: bool = True) -> str | None:
        """Why the directory source cannot tell an account's groups (its schema does not define
        ``ldap.group_attribute``, or could not be read), or None. ``ask``: see LdapSource."""
        for source in self.sources:
            check = getattr(source, "group_attribute_problem", None)
            if check is not None:
                problem: str | None = check(ask=ask)
                return problem
        return None

    def counts(self) -> tuple[int, int] | None:
        """(extensions, enrolled) held by the sources that load a whole file (YAML); None when
        none does (LDAP is asked per login and has no count)."""
        held: list[Any] = [source for source in self.sources if hasattr(source, "enrolled")]
        if not held:
            return None
        return sum(len(source) for source in held), sum(int(source.enrolled) for source in held)

    def enrolled_by_method(self) -> dict[str, int] | None:
        """Enrolled extensions by method in the sources that load a whole file (YAML); None when
        none does. Counted when the file loads, so reading it costs nothing."""
        held: list[Any] = [source for source in self.sources if hasattr(source, "enrolled_by_method")]
        if not held:
            return None
        total: dict[str, int] = {}
        for source in held:
            for method, n in source.enrolled_by_method.items():
                total[method] = total.get(method, 0) + n
        return total

    def load_summary(self, previous: SourceChain | None) -> tuple[str, bool]:
        """The counts for linkusd's "configuration loaded" line, and whether the number of
        enrolled extensions dropped since ``previous`` (worth a warning: a file that lost its
        enrollments lets those extensions log in without a code)."""
        now = self.counts()
        if now is None:
            return "", False
        text = f"extensions={now[0]} enrolled={now[1]}"
        before = previous.counts() if previous is not None else None
        if before is not None and now[1] < before[1]:
            return f"{text} (enrolled dropped from {before[1]})", True
        return text, False

    def close(self) -> None:
        """Release what the sources hold (LDAP's warm connections) when linkusd
        replaces this snapshot; lookups still running finish on their own."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()


def build_chain(
    config: SourceOptions,
    state: Callable[[], SettingsCache] | None = None,
    clock: Callable[[], float] | None = None,
) -> SourceChain:
    """Build the configured chain, once per config snapshot (linkusd), not per login.

    The YAML source is loaded here (ConfigError on a bad file); the LDAP source
    opens its connections on first use and keeps them warm.

    ``state`` returns the state store and is called only by sources that keep an
    offline cache (LDAP's ``cache_max_age``) when they need it, so a login that
    never touches the cache never opens the store; None means no cache.
    """
    sources: list[SettingsSource] = []
    for name in config.sources:
        if name == "yaml":
            sources.append(YamlSource.load(config.yaml.path))
        elif name == "ldap":
            from nss_config.ldap_source import LdapSource  # optional: ldap3, only with an LDAP source

            if clock is None:
                sources.append(LdapSource(config.ldap, state=state))
            else:
                sources.append(LdapSource(config.ldap, state=state, clock=clock))
        else:  # config.py validates names; this is a programming error
            raise AssertionError(f"unknown source {name!r}")
    return SourceChain(sources, skip_unavailable=config.on_source_unavailable == "next")
