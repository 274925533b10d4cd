"""What the sources read from linkusd's main config, declared where they read it.

``pam_linkus.config`` parses and checks pam_linkus.yaml (its ``LdapConfig``,
``YamlSourceConfig`` and ``Config`` have these attributes, and mypy holds them to
it); the sources only name the few attributes they use, so this package imports
nothing above it. Likewise ``SettingsCache`` is the part of the state store the LDAP
source's offline cache needs.
"""

from __future__ import annotations

from typing import Protocol


class LdapOptions(Protocol):
    """The ``ldap`` section (pam_linkus.yaml(5)), as the LDAP source and writer read it."""

    @property
    def uris(self) -> list[str]: ...
    @property
    def start_tls(self) -> bool: ...
    @property
    def ca_file(self) -> str | None: ...
    @property
    def bind_dn(self) -> str | None: ...
    @property
    def bind_password_file(self) -> str | None: ...
    @property
    def base(self) -> str: ...
    @property
    def filter(self) -> str: ...
    @property
    def scope(self) -> str: ...
    @property
    def attributes(self) -> dict[str, str]: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def timeout(self) -> int: ...
    @property
    def cache_max_age(self) -> int: ...
    @property
    def writer_bind_dn(self) -> str | None: ...
    @property
    def writer_password_file(self) -> str | None: ...
    @property
    def object_class(self) -> str: ...
    @property
    def group_attribute(self) -> str: ...


class YamlOptions(Protocol):
    """The ``yaml`` section: where the extensions file is."""

    @property
    def path(self) -> str: ...


class SourceOptions(Protocol):
    """The top-level keys that build the chain: ``sources``, ``on_source_unavailable``, ``yaml``, ``ldap``."""

    @property
    def sources(self) -> list[str]: ...
    @property
    def on_source_unavailable(self) -> str: ...
    @property
    def yaml(self) -> YamlOptions: ...
    @property
    def ldap(self) -> LdapOptions: ...


class SettingsCache(Protocol):
    """The state store's offline cache of a source's answers (``ldap.cache_max_age``).

    Either method may raise a LinkusError (the store could not be asked).
    """

    def cache_settings(self, source: str, user: str, data: str | None, now: float) -> None: ...

    def cached_settings(self, source: str, user: str, now: float, max_age: float) -> str | None: ...
