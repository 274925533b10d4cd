"""The LDAP source: extension settings from a directory (README.md, "LDAP directory").

One login costs at most one connection, one bind and one search, on the first
server of ``ldap.uris`` that answers. A login speaks LDAP through the small
client in nss_config.ldap_wire (importing ``ldap3`` alone cost about 60 ms of
every login); ``ldap3`` remains for doctor's step-by-step check and the writer.
``ssl`` and ``socket`` are imported inside the functions that talk to the
directory, so a host whose chain stops at an earlier source never pays for them.

What the directory says, and what the login makes of it:

* exactly one entry, with 2FA attributes   -> found (validated by ``settings_from_mapping``)
* one entry without any of method / enabled / secret, or no entry -> not here (None)
* two or more entries                      -> SourceUnavailable (ambiguous; never "pick one")
* an entry whose attributes do not validate -> ConfigError (unavailable, names the DN)
* no server could be asked (refused, timeout, TLS or certificate failure, bind
  refused, search error)                   -> SourceUnavailable, or, only when
  ``cache_max_age`` is set, the settings last read for that extension if they
  are young enough. A directory that is down is never "not enrolled".

Safety choices that are not configurable: the certificate and host name are
always verified; referrals are never followed; the bind is never retried
anonymously; the user name is escaped per RFC 4515 before it enters the filter.
"""

from __future__ import annotations

import time

from nss_config.base import ENTRY_KEYS, check_user_name, settings_from_mapping
from pam_linkus.errors import ConfigError, LinkusError, SourceUnavailable
from pam_linkus.strictyaml import read_secret_file

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from nss_config.base import ExtensionSettings
    from pam_linkus.config import LdapConfig
    from pam_linkus.state.base import StateStore

    #: One search answer: (DN, attribute name lower-cased -> raw values) per entry,
    #: and whether the server stopped at the size limit.
    Entries = tuple[list[tuple[str, dict[str, list[bytes]]]], bool]

#: Key of the offline cache in the state store.
CACHE_SOURCE = "ldap"
#: Attributes whose presence makes an entry "configured for 2FA"; an entry with
#: only ``mail`` (every directory user) is "not here", so the next source may answer.
PRESENCE_KEYS = ("method", "enabled", "secret")
#: More than one match is ambiguous; asking for two is enough to know.
SIZE_LIMIT = 2
_SCOPES = {"base": "BASE", "one": "LEVEL", "subtree": "SUBTREE"}


class LdapSource:
    """Settings from an LDAP directory; see the module docstring for the answers.

    ``state`` is a callable returning the state store, called only when the
    offline cache is on, so a login that does not need the cache never opens it.
    """

    name = "ldap"

    def __init__(
        self,
        config: LdapConfig,
        *,
        state: Callable[[], StateStore] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self._state = state
        self._clock = clock

    @property
    def _caching(self) -> bool:
        return self.config.cache_max_age > 0 and self._state is not None

    def lookup(self, user: str) -> ExtensionSettings | None:
        try:
            check_user_name(user)
        except ValueError:
            return None  # no directory entry can carry such a name
        password = read_secret_file(_required(self.config.bind_password_file), "LDAP bind password")
        try:
            entries = search(self.config, password, user)
        except SourceUnavailable:
            cached = self._cached(user)
            if cached is None:
                raise
            return cached
        settings = settings_from_entries(self.config, user, entries)
        if self._caching:
            self._remember(user, settings)
        return settings

    # -- the offline cache --------------------------------------------------------

    def _remember(self, user: str, settings: ExtensionSettings | None) -> None:
        """Keep what the directory said; forget the user when it says "not here"."""
        import json

        assert self._state is not None
        data = None
        if settings is not None:
            data = json.dumps({k: getattr(settings, k) for k in ENTRY_KEYS}, sort_keys=True)
        self._state().cache_settings(CACHE_SOURCE, user, data, self._clock())

    def _cached(self, user: str) -> ExtensionSettings | None:
        if not self._caching:
            return None
        import json

        assert self._state is not None
        try:
            text = self._state().cached_settings(CACHE_SOURCE, user, self._clock(), self.config.cache_max_age)
        except LinkusError:
            return None  # the directory's failure is the one to report
        if text is None:
            return None
        try:
            entry = json.loads(text)
        except ValueError:
            return None
        try:
            return settings_from_mapping(user, entry, "LDAP offline cache", "ldap-cache")
        except ConfigError:
            return None


def _require_ldap3() -> None:
    """A host configured for LDAP without python3-ldap3 is misconfigured, not broken."""
    try:
        import ldap3  # noqa: F401
    except ImportError:
        raise ConfigError("the LDAP source needs python3-ldap3 (apt-get install python3-ldap3)") from None


def _required(value: str | None) -> str:
    if not value:  # LdapConfig refuses this already; kept for callers that build configs by hand
        raise ConfigError("ldap.bind_password_file is required")
    return value


def build_filter(template: str, user: str) -> str:
    """The search filter with ``user`` escaped per RFC 4515 (``*``, ``(``, ``)``, ``\\``, NUL).

    Plain ``replace`` rather than ``str.format``: a template with other braces
    must not be interpreted, and the user name is only ever inserted escaped.
    """
    from nss_config.ldap_wire import escape_value

    return template.replace("{user}", escape_value(user))


def encoded_filter(template: str, user: str) -> bytes:
    """``build_filter`` encoded to BER; a template the encoder refuses is a ConfigError
    (LdapConfig checks the template at config load, so this is only a safety net)."""
    from nss_config.ldap_wire import FilterError, encode_filter

    try:
        return encode_filter(build_filter(template, user))
    except FilterError as exc:
        problem = str(exc)
    raise ConfigError(f"ldap.filter: {problem}")


def search(config: LdapConfig, password: str, user: str) -> Entries:
    """Ask the servers of ``config.uris`` in order (through nss_config.ldap_wire);
    the first that answers decides.

    Raises SourceUnavailable naming each server's failure when none answers.
    """
    from nss_config import ldap_wire

    filter_ber = encoded_filter(config.filter, user)
    context = None
    try:
        context = ldap_wire.tls_context(config.ca_file)
    except OSError as exc:  # _ssl.SSLError is an OSError
        problem = describe_error(exc)
    if context is None:  # raised here, outside the except block: no exception as context (see drop_frames)
        raise ConfigError(f"ldap.ca_file: {problem}", config.ca_file)
    failures = []
    for uri in config.uris:
        try:
            return ldap_wire.search(
                uri, context, start_tls=config.start_tls, connect_timeout=config.connect_timeout,
                timeout=config.timeout, bind_dn=config.bind_dn or "", password=password, base=config.base,
                scope=config.scope, filter_ber=filter_ber, attributes=list(config.attributes.values()),
                size_limit=SIZE_LIMIT)
        except ldap_wire.LdapWireError as exc:
            failures.append(f"{uri}: {exc}")
    raise SourceUnavailable("LDAP: no server answered: " + "; ".join(failures))


def make_tls(config: LdapConfig) -> Any:
    import ssl

    from ldap3 import Tls
    from ldap3.core.exceptions import LDAPException

    try:
        # CERT_REQUIRED also makes ldap3 check the host name after the handshake.
        return Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file)
    except LDAPException as exc:
        problem = describe_error(exc)
        drop_frames(exc)
    raise ConfigError(f"ldap.ca_file: {problem}", config.ca_file)


def new_connection(config: LdapConfig, uri: str, password: str, tls: Any, *, bind_dn: str | None = None,
                read_only: bool = True) -> Any:
    """A connection object for ``uri`` (binding as ``bind_dn``, by default the
    lookup's ``ldap.bind_dn``); no I/O yet (``open_secured`` does that)."""
    import ldap3

    server = ldap3.Server(
        uri,
        use_ssl=uri.lower().startswith("ldaps://"),
        tls=tls,
        connect_timeout=config.connect_timeout,
        get_info=ldap3.NONE,  # no schema or root DSE reads: one bind + one search per login
        allowed_referral_hosts=[],  # and auto_referrals=False below: never follow one
    )
    return ldap3.Connection(
        server,
        user=bind_dn or config.bind_dn,
        password=password,
        authentication=ldap3.SIMPLE,
        auto_bind=ldap3.AUTO_BIND_NONE,
        client_strategy=ldap3.SYNC,
        read_only=read_only,
        receive_timeout=config.timeout,
        auto_referrals=False,
        raise_exceptions=False,
        check_names=False,
    )


def open_secured(conn: Any) -> None:
    """Connect, and establish and verify TLS (ldaps:// handshake or StartTLS)."""
    conn.open(read_server_info=False)
    _no_delay(conn)
    if not conn.server.ssl:
        # start_tls raises on a refused StartTLS or a failed handshake or host
        # check; the explicit test guards the one thing that must never happen:
        # a bind on a connection that is not encrypted.
        conn.start_tls(read_server_info=False)
        if not conn.tls_started:
            raise StepFailed("StartTLS did not start")


def _no_delay(conn: Any) -> None:
    """Send each request at once: with Nagle's algorithm the bind, written right
    after the TLS handshake, waits for a delayed ACK -- 40 ms of every login."""
    import socket

    try:
        conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # only slower, never less safe


def bind_or_fail(config: LdapConfig, conn: Any) -> None:
    if not conn.bind(read_server_info=False):
        raise StepFailed(f"bind as {conn.user!r:.200} refused ({conn.result.get('description', '?')})")


def find_entries(config: LdapConfig, conn: Any, search_filter: str, extra: tuple[str, ...] = ()) -> Entries:
    import ldap3

    conn.search(
        config.base,
        search_filter,
        search_scope=getattr(ldap3, _SCOPES[config.scope]),
        attributes=[*config.attributes.values(), *extra],
        size_limit=SIZE_LIMIT,
        time_limit=config.timeout,
    )
    result = conn.result.get("result")
    if result not in (0, 4):  # success, sizeLimitExceeded (more than SIZE_LIMIT entries)
        raise StepFailed(f"search failed ({conn.result.get('description', '?')})")
    entries = []
    for item in conn.response or []:
        if item.get("type") != "searchResEntry":
            continue  # a continuation reference: referrals are not followed
        raw = item.get("raw_attributes") or {}
        entries.append((str(item.get("dn", "")), {str(k).lower(): list(v) for k, v in raw.items()}))
    return entries, result == 4


class StepFailed(Exception):
    """A step of the conversation with one server failed; the callers here (and
    in ldap_writer) turn it into SourceUnavailable naming the server, so it never
    reaches the flow."""


def drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in ``exc``'s tracebacks.

    ldap3 keeps the exception it raises in a local list of the frame that raised
    it (``exception_history`` in ``open``): a reference cycle that only the
    cyclic GC frees, together with every frame above it -- up to pam_python's
    ``pamh``. If that collection happens after pam_end, pam_python's handle is
    freed twice and the login process segfaults (seen through real PAM). Clearing
    the frames breaks the cycle now, and reference counting frees it at once.
    """
    import traceback

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # skips frames still running
        current.__traceback__ = None
        todo.extend((current.__context__, current.__cause__))
        todo.extend(arg for arg in current.args if isinstance(arg, BaseException))


def close_quietly(conn: Any) -> None:
    from ldap3.core.exceptions import LDAPException

    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass  # the answer (or the failure) is already known; closing changes nothing


def describe_error(exc: BaseException) -> str:
    """One short line about a lower-layer error (ldap3 puts whole certificates in some)."""
    import re

    text = " ".join(str(exc).split())
    start = text.find("{'subject'")
    if start >= 0:  # "certificate {<the whole certificate>} doesn't match any name in [...]"
        end = text.rfind("}")
        text = text[:start] + text[end + 1:].lstrip() if end > start else text[:start]
    # ldap3 wraps messages in tuple reprs ("('...',)"), and ssl names its C source lines.
    text = re.sub(r"\s*\(?_ssl\.c:\d+\)?:?", "", text).strip("()\"', ") or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def settings_from_entries(config: LdapConfig, user: str, found: Entries) -> ExtensionSettings | None:
    """Interpret a search answer (see the module docstring)."""
    entries, truncated = found
    if truncated or len(entries) > 1:
        raise SourceUnavailable(f"LDAP: more than one entry matches {user!r:.60} (ambiguous; fix the directory)")
    if not entries:
        return None
    dn, raw = entries[0]
    where = f"LDAP entry {dn!r:.200}"
    mapping = entry_mapping(config, user, where, raw)
    if not any(key in mapping for key in PRESENCE_KEYS):
        return None
    return settings_from_mapping(user, mapping, where, "ldap")


def entry_mapping(config: LdapConfig, user: str, where: str, raw: dict[str, list[bytes]]) -> dict[str, Any]:
    """An entry's mapped attributes in our keys and YAML types (not yet validated)."""
    mapping: dict[str, Any] = {}
    for key, attribute in config.attributes.items():
        values = raw.get(attribute.lower())
        if not values:
            continue
        if len(values) != 1:
            raise ConfigError(f"attribute {attribute} of {user!r:.60} has {len(values)} values; expected one", where)
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"attribute {attribute} of {user!r:.60} is not UTF-8", where) from None
        mapping[key] = _convert(key, text)
    return mapping


def _convert(key: str, text: str) -> Any:
    """LDAP syntaxes to the YAML types ``settings_from_mapping`` expects.

    Anything that does not convert is passed on as text, so the one validator
    refuses it with the same message as for the YAML source.
    """
    if key == "enabled":
        return {"TRUE": True, "FALSE": False}.get(text, text)  # RFC 4517 Boolean
    if key in ("digits", "period") and text.isascii() and text.isdigit():
        return int(text)
    return text


# -- linkus-2fa doctor ------------------------------------------------------------


def check(config: LdapConfig, sample_user: str | None = None) -> list[str]:
    """Check the directory the way a login would and say what fails, step by step.

    Returns lines in the doctor's format: ``"ok   ldap <what>: <detail>"`` or
    ``"FAIL ldap <what>: <detail>"``; the check failed if any line starts with
    ``"FAIL"``. Each server of ``uris`` is tried on its own (connect + TLS, bind,
    and the sample search when ``sample_user`` is given), with ldap3; then, for
    ``sample_user``, the lookup a login would do, through the login's own client
    (nss_config.ldap_wire: first answering server, entry validated, no cache), so
    doctor tests what logins use. Never raises a LinkusError.
    """
    lines: list[str] = []

    def say(ok: bool, what: str, detail: str) -> None:
        lines.append(f"{'ok  ' if ok else 'FAIL'} ldap {what}: {detail}")

    try:
        _require_ldap3()
    except LinkusError as exc:
        say(False, "ldap3", exc.reason)
        return lines
    from ldap3.core.exceptions import LDAPException

    if not config.uris:
        say(False, "uris", "no server configured (ldap.uris)")
        return lines
    try:
        password = read_secret_file(_required(config.bind_password_file), "LDAP bind password")
    except LinkusError as exc:
        say(False, "bind password", exc.reason)
        return lines
    say(True, "bind password", f"{config.bind_password_file} readable, root-only")
    try:
        tls = make_tls(config)
    except LinkusError as exc:
        say(False, "ca_file", exc.reason)
        return lines
    say(True, "ca_file", config.ca_file or "system trust store")
    search_filter = build_filter(config.filter, sample_user) if sample_user else None
    for uri in config.uris:
        conn = new_connection(config, uri, password, tls)
        step = "connect"
        try:
            open_secured(conn)
            how = "ldaps" if conn.server.ssl else "StartTLS"
            say(True, uri, f"connected, TLS via {how}, certificate and host name verified")
            step = "bind"
            bind_or_fail(config, conn)
            say(True, uri, f"bound as {config.bind_dn}")
            if search_filter is not None:
                step = "search"
                entries, truncated = find_entries(config, conn, search_filter)
                unique = len(entries) <= 1 and not truncated
                count = f"more than {len(entries)}" if truncated else str(len(entries))
                say(unique, uri, f"search {search_filter} under {config.base}: {count} entries"
                    + ("" if unique else " (ambiguous)"))
        except StepFailed as exc:
            say(False, uri, f"{step}: {exc}")
        except (LDAPException, OSError) as exc:
            say(False, uri, f"{step}: {describe_error(exc)}")
            drop_frames(exc)
        finally:
            close_quietly(conn)
    if sample_user:
        try:
            found = LdapSource(config).lookup(sample_user)
        except LinkusError as exc:
            say(False, f"lookup {sample_user}", exc.reason)
        else:
            detail = "not here (no 2FA attributes or no entry)" if found is None else (
                f"method={found.method} enabled={'yes' if found.enabled else 'no'}")
            say(True, f"lookup {sample_user}", detail)
    return lines
