"""Changing one extension's 2FA attributes in the directory (``linkus-2fa enroll``, ``disable`` ...).

Used by ``nss_config.writer.writer_for`` when the extension lives in LDAP; never
on the login path. How a change is made, and why:

* **Its own bind DN.** ``ldap.writer_bind_dn`` / ``ldap.writer_password_file``:
  the DN every login binds as stays read-only, so a host's login password file
  cannot rewrite anyone's second factor.
* **The same safety as a lookup.** Same TLS verification, timeouts, RFC 4515
  escaping and "exactly one entry" rule; servers of ``uris`` are tried in order
  until one accepts the bind, and that one decides (a read-only replica that
  answers with a referral is an error, never followed).
* **Entries are never created or deleted**: the extension's account must exist
  in the directory; only the mapped 2FA attributes change.
* **One modify operation**, which the server applies atomically (RFC 4511
  section 4.6): a login reads the old or the new settings. Keys in the new entry
  are written (normalised by the same validator as a login uses, so the
  directory holds exactly what a login will read); keys the new entry drops are
  deleted -- except the address (``email``), which belongs to the person
  (often ``mail``) and is replaced but never removed. The auxiliary class
  ``ldap.object_class`` is added to an entry that lacks it (set it to ``""``
  when the mapped attributes need none).
* **Read back.** The entry is searched again and must give exactly the intended
  settings; otherwise the command fails loudly.

Concurrent admin edits of the same extension: the last modify wins (there is no
read-modify-write lock across servers); ``change`` runs on the entry as read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ldap3
from ldap3.core.exceptions import LDAPException

from nss_config.base import ENTRY_KEYS, check_user_name, settings_from_mapping
from nss_config.errors import ConfigError, SourceUnavailable
from nss_config.ldap_source import (
    PRESENCE_KEYS,
    StepFailed,
    bind_or_fail,
    build_filter,
    close_quietly,
    describe_error,
    entry_mapping,
    find_entries,
    make_tls,
    new_connection,
    open_secured,
    settings_from_entries,
)
from nss_config.yaml_reader import read_secret_file

if TYPE_CHECKING:
    from collections.abc import Callable

    from nss_config.base import ExtensionSettings
    from nss_config.options import LdapOptions

    Entry = dict[str, Any]


class _EntryFound(Exception):
    """Raised by ``preflight``'s change: bound and found, stop before modifying."""


class LdapWriter:
    """Edits the 2FA attributes of one directory entry (see the module docstring)."""

    name = "ldap"

    def __init__(self, config: LdapOptions):
        self.config = config

    def preflight(self, user: str) -> None:
        """Bind as the writer and find the entry, changing nothing: ``linkus-2fa``
        calls this before it shows a new secret, so a refusal comes first."""

        def stop(_current: Entry | None) -> Entry | None:
            raise _EntryFound

        try:
            self.update(user, stop)
        except _EntryFound:
            return

    def update(self, user: str, change: Callable[[Entry | None], Entry | None]) -> ExtensionSettings | None:
        """Replace ``user``'s 2FA settings by ``change(current)`` (None removes them)."""
        config = self.config
        try:
            check_user_name(user)
        except ValueError:
            raise ConfigError("invalid extension name") from None
        if not config.writer_bind_dn or not config.writer_password_file:
            raise ConfigError("ldap.writer_bind_dn and ldap.writer_password_file are needed to change the directory")
        password = read_secret_file(config.writer_password_file, "LDAP writer password")
        tls = make_tls(config)
        search_filter = build_filter(config.filter, user)
        failures = []
        for uri in config.uris:
            conn = new_connection(config, uri, password, tls, bind_dn=config.writer_bind_dn, read_only=False)
            try:
                problem = _connect_and_bind(config, conn)
                if problem is None:
                    return self._apply(conn, uri, user, search_filter, change)
                failures.append(f"{uri}: {problem}")
            finally:
                close_quietly(conn)
        raise SourceUnavailable("LDAP: no server accepted the writer's bind: " + "; ".join(failures))

    def _apply(self, conn: Any, uri: str, user: str, search_filter: str,
               change: Callable[[Entry | None], Entry | None]) -> ExtensionSettings | None:
        config = self.config
        try:
            found = find_entries(config, conn, search_filter, ("objectClass",))
            entries, truncated = found
            if truncated or len(entries) > 1:
                raise SourceUnavailable(f"LDAP: more than one entry matches {user!r:.60} (ambiguous)")
            if not entries:
                raise ConfigError(f"no entry under {config.base} matches {user!r:.60}; "
                                  "create the account in the directory first")
            dn, raw = entries[0]
            where = f"LDAP entry {dn!r:.200}"
            current = entry_mapping(config, user, where, raw)
            new = change(current if any(k in current for k in PRESENCE_KEYS) else None)
            expected = None
            if new is not None:
                new = {k: v for k, v in new.items() if v is not None}
                if "email" not in new and "email" in current:
                    new["email"] = current["email"]  # never removed (module docstring), so part of the result
                expected = settings_from_mapping(user, new, f"{where}: new settings", "ldap")
            modifications = self._modifications(current, new, expected, raw)
            if modifications and not conn.modify(dn, modifications):
                raise StepFailed(f"change of {dn!r:.200} refused ({conn.result.get('description', '?')})")
            after = settings_from_entries(config, user, find_entries(config, conn, search_filter))
        except StepFailed as exc:
            problem = str(exc)
        except (LDAPException, OSError) as exc:
            problem = describe_error(exc)
        else:
            if after != expected:
                raise ConfigError(f"{where}: the settings read back are not the ones written (please report)")
            return expected
        raise SourceUnavailable(f"{uri}: {problem}")

    def _modifications(self, current: Entry, new: Entry | None, expected: ExtensionSettings | None,
                       raw: dict[str, list[bytes]]) -> dict[str, list[tuple[Any, list[str]]]]:
        config = self.config
        changes: dict[str, list[tuple[Any, list[str]]]] = {}
        for key in ENTRY_KEYS:
            attribute = config.attributes[key]
            if new is not None and expected is not None and key in new:
                value = getattr(expected, key)  # normalised: what a login will read back
                if current.get(key) != value:
                    changes[attribute] = [(ldap3.MODIFY_REPLACE, [_ldap_value(value)])]
            elif key in current and key != "email":
                changes[attribute] = [(ldap3.MODIFY_DELETE, [])]
        classes = {v.decode("utf-8", "replace").lower() for v in raw.get("objectclass", [])}
        if new is not None and config.object_class and config.object_class.lower() not in classes:
            changes["objectClass"] = [(ldap3.MODIFY_ADD, [config.object_class])]
        return changes


def _connect_and_bind(config: LdapOptions, conn: Any) -> str | None:
    """None when bound; else why not (then the next server is tried)."""
    try:
        open_secured(conn)
        bind_or_fail(config, conn)
    except StepFailed as exc:
        return str(exc)
    except (LDAPException, OSError) as exc:
        return describe_error(exc)
    return None


def _ldap_value(value: object) -> str:
    """Our types to LDAP syntaxes: Boolean ``TRUE``/``FALSE``, Integer as decimal."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)
