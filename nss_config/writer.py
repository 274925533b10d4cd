"""Which settings source an admin change goes to, and the writer for it.

The change goes to the source that answers for the extension now (the first in
``sources:`` that knows it), so a login reads back exactly what was written; an
extension no source knows yet goes to the first configured source. A source that
cannot be asked stops the change (we cannot know where the extension lives).

Writers share one method, ``update(user, change)``: ``change`` maps the current
entry (plain data with the keys of nss_config.base.ENTRY_KEYS, or None) to the new
one (None removes it), and is called while the writer holds its lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nss_config.errors import ConfigError
from nss_config.yaml_source import YamlSource
from nss_config.yaml_writer import YamlWriter

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from nss_config.base import ExtensionSettings
    from nss_config.options import SourceOptions

    class SettingsWriter(Protocol):
        name: str

        def preflight(self, user: str) -> None:
            """Raise what ``update`` would raise before changing anything (no entry, no access)."""
            ...

        def update(
            self, user: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
        ) -> ExtensionSettings | None: ...


def source_of(config: SourceOptions, user: str) -> tuple[str, ExtensionSettings | None]:
    """The name of the source that answers for ``user`` (or the first one), and its answer."""
    for name in config.sources:
        found = _open_source(config, name).lookup(user)
        if found is not None:
            return name, found
    return config.sources[0], None


def writer_for(config: SourceOptions, source: str) -> SettingsWriter:
    """A writer for the named source; refuses a read-only source with a clear message."""
    if source == "yaml":
        return YamlWriter(config.yaml.path)
    if source == "ldap":
        ldap = config.ldap
        if not ldap.writer_bind_dn or not ldap.writer_password_file:
            raise ConfigError(
                "the LDAP source is read-only here: set ldap.writer_bind_dn and ldap.writer_password_file "
                "to let linkus-2fa change 2FA attributes, or change them in the directory itself"
            )
        from nss_config.ldap_writer import LdapWriter  # optional: ldap3, only with an LDAP source

        writer: SettingsWriter = LdapWriter(ldap)
        return writer
    raise AssertionError(f"unknown source {source!r}")


def _open_source(config: SourceOptions, name: str) -> Any:
    if name == "yaml":
        return YamlSource(config.yaml.path)
    if name == "ldap":
        from nss_config.ldap_source import LdapSource  # optional: ldap3, only with an LDAP source

        return LdapSource(config.ldap, state=None)
    raise AssertionError(f"unknown source {name!r}")
