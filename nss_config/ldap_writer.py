"""Changing one extension's 2FA attributes in the LDAP source (``linkus-2fa``).

Why it looks like this:

* **A separate writer bind.** Logins bind as ``ldap.bind_dn``, which should only
  read; changes bind as ``ldap.writer_bind_dn`` with the password in
  ``ldap.writer_password_file``. Without both the source is read-only and
  ``nss_config.writer`` refuses with a message before anything is shown.
* **The same connection rules as a login.** TLS verified (ldaps or StartTLS),
  timeouts, no referrals, the user escaped in the filter, exactly one entry --
  reused from ``nss_config.ldap_source``, not written twice.
* **One modify operation**, which a directory applies atomically to the entry:
  the attributes of the new entry are replaced, the ones it no longer has are
  deleted, and the auxiliary object class (``ldap.object_class``) is added when
  the entry lacks it. The new entry is validated by ``settings_from_mapping``
  before it is sent and read back (with the writer bind) and compared after.
* We never create or delete directory entries: the extension's entry (the user)
  belongs to whoever manages the directory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nss_config.base import ENTRY_KEYS, settings_from_mapping
from pam_linkus.errors import ConfigError, SourceUnavailable
from pam_linkus.strictyaml import read_secret_file

if TYPE_CHECKING:
    from collections.abc import Callable

    from nss_config.base import ExtensionSettings
    from pam_linkus.config import LdapConfig

    Entry = dict[str, Any]


#: What ``preflight``'s change returns: look, do not touch.
_NO_CHANGE: dict[str, Any] = {}


class LdapWriter:
    """Writes 2FA attributes of one extension's directory entry (see the module docstring)."""

    name = "ldap"

    def __init__(self, config: LdapConfig):
        if not config.writer_bind_dn or not config.writer_password_file:
            raise ConfigError("the LDAP source is read-only: ldap.writer_bind_dn and ldap.writer_password_file "
                              "are not set")
        self.config = config

    def preflight(self, user: str) -> None:
        """Bind as the writer and find the entry, before a secret is shown for it."""
        self.update(user, lambda old: _NO_CHANGE)

    def update(self, user: str, change: Callable[[Entry | None], Entry | None]) -> ExtensionSettings | None:
        from ldap3.core.exceptions import LDAPException

        from nss_config.ldap_source import _close, _describe, _drop_frames, _Failed, _open, _tls

        config = self.config
        assert config.writer_password_file is not None
        password = read_secret_file(config.writer_password_file, "LDAP writer password")
        failures = []
        tls = _tls(config)
        for uri in config.uris:
            conn = _writer_connection(config, uri, password, tls)
            try:
                _open(conn)
                if not conn.bind(read_server_info=False):
                    raise _Failed(f"bind as {config.writer_bind_dn!r:.200} refused "
                                  f"({conn.result.get('description', '?')})")
                return self._modify(conn, user, change)
            except _Failed as exc:
                failures.append(f"{uri}: {exc}")
            except (LDAPException, OSError) as exc:  # ssl.SSLError and socket timeouts are OSErrors
                failures.append(f"{uri}: {_describe(exc)}")
                _drop_frames(exc)
            finally:
                _close(conn)
        raise SourceUnavailable("LDAP: no server took the change: " + "; ".join(failures))

    def _modify(self, conn: Any, user: str, change: Callable[[Entry | None], Entry | None]) -> ExtensionSettings | None:
        import ldap3

        from nss_config.ldap_source import _Failed

        config = self.config
        dn, raw, classes = _the_entry(config, conn, user)
        old = _entry_from_raw(config, raw)
        new = change(old if any(k in old for k in ("method", "enabled", "secret")) else None)
        if new is _NO_CHANGE:
            return None
        expected = None
        if new is not None:
            unknown = set(new) - set(ENTRY_KEYS)
            if unknown:
                raise ConfigError(f"unknown keys {sorted(unknown)!r:.80}")
            new = {k: v for k, v in new.items() if v is not None}
            expected = settings_from_mapping(user, new, f"LDAP entry {dn!r:.200} (new values)", "ldap")
        changes: dict[str, list[tuple[Any, list[str]]]] = {}
        for key, attribute in config.attributes.items():
            present = bool(raw.get(attribute.lower()))
            if new is not None and key in new:
                changes[attribute] = [(ldap3.MODIFY_REPLACE, [_ldap_value(new[key])])]
            elif present and key != "email":
                # The address is the user's (often plain ``mail``): 2FA changes never delete it.
                changes[attribute] = [(ldap3.MODIFY_DELETE, [])]
        if new is not None and config.object_class.lower() not in classes:
            changes["objectClass"] = [(ldap3.MODIFY_ADD, [config.object_class])]
        if changes and not conn.modify(dn, changes):
            raise _Failed(f"modify of {dn!r:.200} refused ({conn.result.get('description', '?')}: "
                          f"{conn.result.get('message', '')!s:.200})")
        from nss_config.ldap_source import settings_from_entries

        _dn, raw_after, _classes = _the_entry(config, conn, user)
        after = settings_from_entries(config, user, ([(dn, raw_after)], False))
        if new is not None and after != expected:
            raise SourceUnavailable(f"LDAP: {dn!r:.200} did not read back as written (an overlay or ACL "
                                    "changed it?)")
        return after


def _writer_connection(config: LdapConfig, uri: str, password: str, tls: Any) -> Any:
    import ldap3

    server = ldap3.Server(uri, use_ssl=uri.lower().startswith("ldaps://"), tls=tls,
                          connect_timeout=config.connect_timeout, get_info=ldap3.NONE, allowed_referral_hosts=[])
    return ldap3.Connection(server, user=config.writer_bind_dn, password=password, authentication=ldap3.SIMPLE,
                            auto_bind=ldap3.AUTO_BIND_NONE, client_strategy=ldap3.SYNC, read_only=False,
                            receive_timeout=config.timeout, auto_referrals=False, raise_exceptions=False,
                            check_names=False)


def _the_entry(config: LdapConfig, conn: Any, user: str) -> tuple[str, dict[str, list[bytes]], set[str]]:
    """The one entry of ``user``: DN, raw attributes (lower-case names), object classes."""
    import ldap3

    from nss_config.ldap_source import _SCOPES, _Failed, build_filter

    conn.search(config.base, build_filter(config.filter, user), search_scope=getattr(ldap3, _SCOPES[config.scope]),
                attributes=[*config.attributes.values(), "objectClass"], size_limit=2, time_limit=config.timeout)
    result = conn.result.get("result")
    if result not in (0, 4):
        raise _Failed(f"search failed ({conn.result.get('description', '?')})")
    entries = [item for item in conn.response or [] if item.get("type") == "searchResEntry"]
    if result == 4 or len(entries) > 1:
        raise SourceUnavailable(f"LDAP: more than one entry matches {user!r:.60} (ambiguous; fix the directory)")
    if not entries:
        raise ConfigError(f"LDAP: no directory entry for {user!r:.60}; linkus-2fa changes 2FA attributes of "
                          "existing entries only")
    raw = {str(k).lower(): list(v) for k, v in (entries[0].get("raw_attributes") or {}).items()}
    classes = {v.decode("utf-8", "replace").lower() for v in raw.pop("objectclass", [])}
    return str(entries[0]["dn"]), raw, classes


def _entry_from_raw(config: LdapConfig, raw: dict[str, list[bytes]]) -> Entry:
    from nss_config.ldap_source import _convert

    entry: Entry = {}
    for key, attribute in config.attributes.items():
        values = raw.get(attribute.lower())
        if values and len(values) == 1:
            entry[key] = _convert(key, values[0].decode("utf-8", "replace"))
    return entry


def _ldap_value(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"  # RFC 4517 Boolean
    return str(value)
