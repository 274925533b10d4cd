"""The LDAP source: extension settings from a directory (docs/guide.md, "LDAP directory").

One ``LdapSource`` lives as long as a config snapshot in linkusd and is shared by
the worker threads: it keeps a few bound connections per server warm (each used
by one thread at a time, taken from and returned to a small idle list under a
lock), so a login normally costs one search round trip. A connection that fails
is closed and replaced; a warm one that fails is retried once fresh.

What the directory says, and what the login makes of it:

* exactly one entry, with 2FA attributes   -> found (validated by ``settings_from_mapping``);
  ``account`` is the entry's own value of the filter's name attribute (``uid``),
  so every spelling the directory matches (case, spaces) shares one state record
* one entry without any of method / enabled / secret, or no entry -> not here (None)
* two or more entries                      -> SourceUnavailable (ambiguous; never "pick one")
* an entry whose attributes do not validate -> ConfigError (unavailable, names the DN)
* no server could be asked (refused, reset, closed, timeout, TLS or certificate
  failure -- also a plain server behind ldaps://, bind refused, search error,
  too many responses) -> the next server of ``uris``; when none answers,
  SourceUnavailable, or, only when ``cache_max_age`` is set, the settings last
  read for that extension if they are young enough. A directory that is down is
  never "not enrolled".

Deadlines: each server gets at most ``timeout`` seconds for everything (connect,
TLS, bind, search), one lookup at most ``timeout`` x the number of ``uris``
overall: a watchdog shuts the socket down when a server's time runs out,
so a server that drips or sends endless references cannot hold a worker; at most
``MAX_RESPONSES`` search responses are accepted.

Safety choices that are not configurable: the certificate and host name are
always verified (TLS 1.2 or later); referrals are never followed; the bind is
never retried anonymously; the user name is escaped per RFC 4515 before it
enters the filter. Every ldap3 / socket / ssl exception is translated once, in
``ldap_errors``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from pyasn1.error import PyAsn1Error  # type: ignore[import-untyped]

from nss_config.answer_cache import AnswerCache, NotCached
from nss_config.base import ENTRY_KEYS, ExtensionSettings, check_user_name, settings_from_mapping
from nss_config.errors import ConfigError, LinkusError, SourceUnavailable
from nss_config.yaml_reader import read_secret_file

if TYPE_CHECKING:
    from nss_config.options import LdapOptions, SettingsCache

#: One search answer: (DN, attribute name lower-cased -> raw values) per entry,
#: and whether the server stopped at the size limit.
Entries = tuple[list[tuple[str, dict[str, list[bytes]]]], bool]

T = TypeVar("T")

#: Key of the offline cache in the state store. Entries are kept under the name exactly as asked;
#: older versions kept them under its casefold (where "straß" and "strass" met), under the
#: key "ldap": those rows are no longer read and expire from the store on their own.
CACHE_SOURCE = "ldap-by-name"
#: Attributes whose presence makes an entry "configured for 2FA"; an entry with
#: only ``mail`` (every directory user) is "not here", so the next source may answer.
PRESENCE_KEYS = ("method", "enabled", "secret")
#: More than one match is ambiguous; asking for two is enough to know.
SIZE_LIMIT = 2
#: Entries + references + done accepted from one search; more is a broken or hostile server.
MAX_RESPONSES = 16
#: Warm connections kept per server.
IDLE_PER_SERVER = 8
_SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "subtree": ldap3.SUBTREE}
_NAME_ATTRIBUTE = re.compile(r"\(([A-Za-z][A-Za-z0-9-]*|[0-9][0-9.]*)=\{user\}\)")


#: What ldap3's BER decoder raises on a malformed reply (seen with hostile
#: frames: a truncated bindResponse gives IndexError), besides LDAPException.
_MALFORMED_REPLY: tuple[type[BaseException], ...] = (IndexError, KeyError, ValueError, TypeError, PyAsn1Error)


@contextmanager
def ldap_errors(server: str) -> Iterator[None]:
    """The one translation of lower-layer errors for a server: SourceUnavailable
    naming the server and the error's kind; raised ``from None``, so the lower-layer
    traceback is never shown."""
    try:
        yield
    except StepFailed as exc:
        raise SourceUnavailable(f"{server}: {exc}") from None
    except (LDAPException, OSError) as exc:  # ssl.SSLError, ConnectionResetError, BrokenPipeError...
        raise SourceUnavailable(f"{server}: {describe_error(exc)}") from None
    except _MALFORMED_REPLY as exc:  # after LDAPException: some of ldap3's are ValueErrors too
        raise SourceUnavailable(f"{server}: malformed reply ({type(exc).__name__})") from None


def name_attribute(template: str) -> str | None:
    """The attribute the filter compares with the name (``uid`` in ``(uid={user})``)."""
    found = _NAME_ATTRIBUTE.search(template)
    return found.group(1) if found else None


def check_filter(template: str) -> str | None:
    """None if ``template`` with an escaped name is a filter ldap3 can send, else the problem."""
    try:
        parse_filter(build_filter(template, "x"), None, auto_escape=False, auto_encode=True,
                     validator=None, check_names=False)
    except LDAPException as exc:
        return describe_error(exc)
    return None


class LdapSource:
    """Settings from an LDAP directory; see the module docstring for the answers.

    ``state`` is a callable returning the state store, called only when the
    offline cache is on. ``ticks`` is the clock of the in-memory cache of recent
    answers (``ldap.cache_ttl``, nss_config.answer_cache).
    """

    name = "ldap"

    def __init__(
        self,
        config: LdapOptions,
        *,
        state: Callable[[], SettingsCache] | None = None,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self._state = state
        self._clock = clock
        self.answers = AnswerCache(config.cache_ttl, config.negative_cache_ttl, config.cache_size, ticks=ticks)
        self._tls: Any = None
        self._password: str | None = None
        self._idle: dict[str, list[Any]] = {uri: [] for uri in config.uris}
        self._lock = threading.Lock()
        self._closed = False
        self._name_attribute = name_attribute(config.filter)
        #: Whether the schema defines ``group_attribute``: True, False, None (the server would not
        #: show its schema). Asked once per source (config snapshot), on the first connection.
        #: Until it is True the account's directory groups are unknown: an attribute the schema
        #: lacks is in no entry, and its absence would read as "in no group", so rules naming
        #: ldap_groups would never match.
        self._group_attribute_defined: bool | None = None
        self._schema_asked = False

    @property
    def _caching(self) -> bool:
        return self.config.cache_max_age > 0 and self._state is not None

    def recall(self, user: str) -> ExtensionSettings | NotCached | None:
        """The answer ``lookup`` would give from memory alone, or NOT_CACHED: linkusd
        then asks the directory in a worker (flow.Offload), not on its event loop."""
        try:
            check_user_name(user)
        except ValueError:
            return None
        return self.answers.get(user)

    def forget_answers(self) -> None:
        """A change was made through linkusd (self-service): the next lookup asks again."""
        self.answers.clear()

    def lookup(self, user: str) -> ExtensionSettings | None:
        return self.lookup_account(user)[0]

    def lookup_account(self, user: str) -> tuple[ExtensionSettings | None, frozenset[str] | None]:
        """``lookup``, and the DNs of the entry's groups (``ldap.group_attribute``) from the same
        search -- also when the entry has no 2FA attributes ("not here"), since group policy
        applies to it too. Groups: empty when there is no entry; None when not known (the answer
        came from the offline cache without them, or the schema does not define
        ``group_attribute`` or could not be read: ``group_attribute_problem``)."""
        try:
            check_user_name(user)
        except ValueError:
            return None, frozenset()  # no directory entry can carry such a name
        kept = self.answers.get_account(user)
        if not isinstance(kept, NotCached):
            return kept
        asked_at, generation = self.answers.now(), self.answers.generation()
        try:
            entries = self.search(user)
        except SourceUnavailable:
            cached = self._cached(user)
            if cached is None:
                raise
            return cached, cached.directory_groups  # the offline cache's answer is never kept in memory
        known = self._group_attribute_defined is True
        groups = entry_groups(self.config, entries) if known else None
        settings = settings_from_entries(self.config, user, entries, name_attribute=self._name_attribute,
                                         groups_known=known)
        self.answers.put(user, settings, asked_at, generation, groups)
        if self._caching:
            self._remember(user, settings)
        return settings, groups

    # -- connections ------------------------------------------------------------------

    def _setup(self) -> tuple[Any, str]:
        if self._tls is None or self._password is None:
            self._password = read_secret_file(_required(self.config.bind_password_file), "LDAP bind password")
            self._tls = make_tls(self.config)
        return self._tls, self._password

    def _take(self, uri: str) -> Any | None:
        with self._lock:
            idle = self._idle.setdefault(uri, [])
            return idle.pop() if idle else None

    def _give_back(self, uri: str, conn: Any) -> None:
        with self._lock:
            idle = self._idle.setdefault(uri, [])
            if not self._closed and len(idle) < IDLE_PER_SERVER:
                idle.append(conn)
                return
        close_quietly(conn)

    def close(self) -> None:
        """Unbind every warm connection (config snapshot replaced, daemon stopping)."""
        with self._lock:
            self._closed = True  # connections in use are closed when they come back
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle = {uri: [] for uri in self.config.uris}
        for conn in conns:
            close_quietly(conn)

    def search(self, user: str) -> Entries:
        """Ask the servers of ``uris`` in order within one overall deadline; the
        first that answers decides. SourceUnavailable names each failure."""
        search_filter = build_filter(self.config.filter, user)
        extra = ((self._name_attribute,) if self._name_attribute else ()) + (self.config.group_attribute,)
        return self._on_servers(lambda conn: find_entries(self.config, conn, search_filter, extra))

    def group_attribute_problem(self, *, ask: bool = True) -> str | None:
        """None when the directory's schema defines ``ldap.group_attribute``, else why the
        account's directory groups are unknown. With ``ask``, asks the directory when not yet
        known (linkusd's reload thread, doctor), so a snapshot reports it once; SourceUnavailable
        when no server answered. Without, no I/O (the flow's reason for an unavailable login)."""
        if ask and not self._schema_asked:
            self._on_servers(lambda conn: None)
        return self._group_attribute_text()

    def _group_attribute_text(self) -> str | None:
        attribute = self.config.group_attribute
        if not self._schema_asked:
            return f"ldap.group_attribute {attribute} is not checked yet (no server answered since the reload)"
        if self._group_attribute_defined is None:
            return (f"the bind DN may not read the directory's schema (root DSE subschemaSubentry, its "
                    f"attributeTypes), so ldap.group_attribute {attribute} cannot be checked")
        if not self._group_attribute_defined:
            return (f"ldap.group_attribute {attribute} is not defined in the directory's schema "
                    "(memberOf needs the memberof overlay)")
        return None

    def _on_servers(self, work: Callable[[Any], T]) -> T:
        tls, password = self._setup()
        deadline = time.monotonic() + self.config.timeout * len(self.config.uris)
        failures = []
        for uri in self.config.uris:
            warm = self._take(uri)
            server_deadline = min(deadline, time.monotonic() + self.config.timeout)
            for conn in ([warm] if warm is not None else []) + [None]:
                remaining = server_deadline - time.monotonic()
                if remaining <= 0:
                    failures.append(f"{uri}: no answer within ldap.timeout ({self.config.timeout} s)")
                    break
                try:
                    with ldap_errors(uri):
                        return self._work_on(uri, conn, tls, password, work, remaining)
                except SourceUnavailable as exc:
                    if conn is None:  # a fresh connection failed too: next server
                        failures.append(exc.reason)
        raise SourceUnavailable("LDAP: no server answered: " + "; ".join(failures))

    def _work_on(self, uri: str, conn: Any, tls: Any, password: str, work: Callable[[Any], T],
                 remaining: float) -> T:
        fresh = conn is None
        if fresh:
            conn = new_connection(self.config, uri, password, tls,
                                  connect_timeout=min(self.config.connect_timeout, remaining))
        watchdog = threading.Timer(remaining, _abort, (conn,))
        watchdog.daemon = True
        watchdog.start()
        ok = False
        try:
            if fresh:
                open_secured(conn)
                bind_or_fail(self.config, conn)
            if not self._schema_asked:
                # Once per snapshot, on the connection already open: a group attribute the
                # schema lacks (memberOf without the overlay, a typo) reads as "in no group".
                # Two threads may both ask: the same answer, written twice.
                self._group_attribute_defined = schema_defines(conn, self.config.group_attribute,
                                                               self.config.timeout)
                self._schema_asked = True
            found = work(conn)
            ok = True
            return found
        finally:
            watchdog.cancel()
            if ok:
                self._give_back(uri, conn)
            else:
                close_quietly(conn)

    # -- the offline cache --------------------------------------------------------

    def _remember(self, user: str, settings: ExtensionSettings | None) -> None:
        """Keep what the directory said; forget the user when it says "not here"."""
        assert self._state is not None
        data = None
        if settings is not None:
            mapping: dict[str, Any] = {k: getattr(settings, k) for k in ENTRY_KEYS}
            mapping["account"] = settings.account
            if settings.directory_groups is not None:
                mapping["directory_groups"] = sorted(settings.directory_groups)
            data = json.dumps(mapping, sort_keys=True)
        # Keyed by the name exactly as asked, like the in-memory answers: two directory accounts whose
        # names casefold alike ("straß", "strass") are two entries, and one's settings must never
        # answer for the other while the directory is down.
        self._state().cache_settings(CACHE_SOURCE, user, data, self._clock())

    def _cached(self, user: str) -> ExtensionSettings | None:
        if not self._caching:
            return None
        assert self._state is not None
        try:
            text = self._state().cached_settings(CACHE_SOURCE, user, self._clock(),
                                                 self.config.cache_max_age)
        except LinkusError:
            return None  # the directory's failure is the one to report
        if text is None:
            return None
        try:
            entry = json.loads(text)
            account = entry.pop("account", user)
            if not isinstance(account, str):
                return None
            groups = entry.pop("directory_groups", None)  # absent in entries cached before groups
            if groups is not None and not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
                return None
            return settings_from_mapping(user, entry, "LDAP offline cache", "ldap-cache", account=account,
                                         directory_groups=None if groups is None else frozenset(groups))
        except (ValueError, AttributeError, ConfigError):
            return None


def _abort(conn: Any) -> None:
    """The lookup's deadline passed: wake the thread blocked on this connection."""
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _required(value: str | None) -> str:
    if not value:  # LdapConfig refuses this already; kept for callers that build configs by hand
        raise ConfigError("ldap.bind_password_file is required")
    return value


def build_filter(template: str, user: str) -> str:
    """The search filter with ``user`` escaped per RFC 4515 (``*``, ``(``, ``)``, ``\\``, NUL).

    Plain ``replace`` rather than ``str.format``: a template with other braces
    must not be interpreted, and the user name is only ever inserted escaped.
    """
    return template.replace("{user}", escape_filter_chars(user))


def make_tls(config: LdapOptions) -> Any:
    """Verified TLS: chain (``ca_file``, else the system CAs), host name, TLS >= 1.2."""
    try:
        # CERT_REQUIRED also makes ldap3 check the host name after the handshake.
        # ldap3 builds its context with ssl.create_default_context: TLS 1.2 at least
        # since Python 3.10.
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file)
    except LDAPException as exc:
        raise ConfigError(f"ldap.ca_file: {describe_error(exc)}", config.ca_file) from None


def new_connection(config: LdapOptions, uri: str, password: str, tls: Any, *, bind_dn: str | None = None,
                   read_only: bool = True, connect_timeout: float | None = None) -> Any:
    """A connection object for ``uri`` (binding as ``bind_dn``, by default the
    lookup's ``ldap.bind_dn``); no I/O yet (``open_secured`` does that)."""
    server = ldap3.Server(
        uri,
        use_ssl=uri.lower().startswith("ldaps://"),
        tls=tls,
        connect_timeout=connect_timeout or config.connect_timeout,
        get_info=ldap3.NONE,  # no schema or root DSE reads: one bind + one search
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
    try:
        conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # only slower, never less safe


def bind_or_fail(config: LdapOptions, conn: Any) -> None:
    if not conn.bind(read_server_info=False):
        raise StepFailed(f"bind as {conn.user!r:.200} refused ({conn.result.get('description', '?')})")


def find_entries(config: LdapOptions, conn: Any, search_filter: str, extra: tuple[str, ...] = ()) -> Entries:
    conn.search(
        config.base,
        search_filter,
        search_scope=_SCOPES[config.scope],
        attributes=[*config.attributes.values(), *extra],
        size_limit=SIZE_LIMIT,
        time_limit=config.timeout,
    )
    result = conn.result.get("result")
    if result not in (0, 4):  # success, sizeLimitExceeded (more than SIZE_LIMIT entries)
        raise StepFailed(f"search failed ({conn.result.get('description', '?')})")
    if len(conn.response or []) > MAX_RESPONSES:
        raise StepFailed(f"search answered with more than {MAX_RESPONSES} responses")
    entries = []
    for item in conn.response or []:
        if item.get("type") != "searchResEntry":
            continue  # a continuation reference: referrals are not followed
        raw = item.get("raw_attributes") or {}
        entries.append((str(item.get("dn", "")), {str(k).lower(): list(v) for k, v in raw.items()}))
    return entries, result == 4


_ATTRIBUTE_TYPE = re.compile(r"^\(\s*([0-9][0-9.]*)(?:\s+NAME\s+(\([^)]*\)|'[^']*'))?")


def schema_defines(conn: Any, attribute: str, timeout: int) -> bool | None:
    """Whether the directory's subschema (RFC 4512: the root DSE's ``subschemaSubentry``) lists
    ``attribute`` by name or OID among its ``attributeTypes``; None when the server will not show
    it (no subschemaSubentry, a refused search, no attribute types). A failed connection raises
    (LDAPException, OSError: ``ldap_errors`` turns it into "this server did not answer")."""
    try:
        conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["subschemaSubentry"],
                    size_limit=1, time_limit=timeout)
        dns = [v for item in conn.response or [] if item.get("type") == "searchResEntry"
               for k, vs in (item.get("raw_attributes") or {}).items() if str(k).lower() == "subschemasubentry"
               for v in vs]
        if conn.result.get("result") != 0 or len(dns) != 1:
            return None
        conn.search(dns[0].decode("utf-8"), "(objectClass=subschema)", search_scope=ldap3.BASE,
                    attributes=["attributeTypes"], size_limit=1, time_limit=timeout)
        if conn.result.get("result") != 0:
            return None
        definitions = [v for item in conn.response or [] if item.get("type") == "searchResEntry"
                       for k, vs in (item.get("raw_attributes") or {}).items() if str(k).lower() == "attributetypes"
                       for v in vs]
    except UnicodeDecodeError:
        return None
    if not definitions:
        return None  # a schema with no attribute types is one we were not allowed to read
    wanted = attribute.casefold()
    for raw in definitions:
        found = _ATTRIBUTE_TYPE.match(raw.decode("utf-8", "replace"))
        if found is None:
            continue
        names = re.findall(r"'([^']*)'", found.group(2) or "")
        if wanted == found.group(1) or wanted in (n.casefold() for n in names):
            return True
    return False


class StepFailed(Exception):
    """A step of the conversation with one server failed; the callers here (and
    in ldap_writer) turn it into SourceUnavailable naming the server, so it never
    reaches the flow."""


def close_quietly(conn: Any) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass  # the answer (or the failure) is already known; closing changes nothing


def describe_error(exc: BaseException) -> str:
    """One short line about a lower-layer error (ldap3 puts whole certificates in some)."""
    text = " ".join(str(exc).split())
    start = text.find("{'subject'")
    if start >= 0:  # "certificate {<the whole certificate>} doesn't match any name in [...]"
        end = text.rfind("}")
        text = text[:start] + text[end + 1:].lstrip() if end > start else text[:start]
    # ldap3 wraps messages in tuple reprs ("('...',)"), and ssl names its C source lines.
    text = re.sub(r"\s*\(?_ssl\.c:\d+\)?:?", "", text).strip("()\"', ") or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def settings_from_entries(config: LdapOptions, user: str, found: Entries, *,
                          name_attribute: str | None = None, groups_known: bool = True) -> ExtensionSettings | None:
    """Interpret a search answer (see the module docstring); ``account`` is the
    entry's value of ``name_attribute`` (the one equal to ``user`` ignoring case
    when it has several), else ``user``."""
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
    account = user
    if name_attribute:
        values = [v.decode("utf-8", "replace") for v in raw.get(name_attribute.lower(), [])]
        same = [v for v in values if v.casefold() == user.casefold()]
        if len(same) == 1:
            account = same[0]
        elif len(values) == 1:
            account = values[0]
        else:
            raise SourceUnavailable(f"LDAP: {where}: cannot tell the account's own name from {name_attribute}")
        try:
            check_user_name(account)
        except ValueError:
            raise ConfigError(f"{name_attribute} is not a usable account name", where) from None
    return settings_from_mapping(user, mapping, where, "ldap", account=account,
                                 directory_groups=entry_groups(config, found) if groups_known else None)


#: Most group DNs accepted from one entry's ``group_attribute``; more is refused, never cut
#: (a cut list could drop the group a stricter rule names).
MAX_GROUP_VALUES = 4096


def entry_groups(config: LdapOptions, found: Entries) -> frozenset[str]:
    """The DNs in the single entry's ``ldap.group_attribute`` (none without an entry). A value
    that is not UTF-8 or too many values: ConfigError naming the DN (the login is unavailable)."""
    entries, truncated = found
    if truncated or len(entries) != 1:
        return frozenset()  # no entry; more than one is refused by settings_from_entries
    dn, raw = entries[0]
    values = raw.get(config.group_attribute.lower(), [])
    where = f"LDAP entry {dn!r:.200}"
    if len(values) > MAX_GROUP_VALUES:
        raise ConfigError(f"attribute {config.group_attribute} has more than {MAX_GROUP_VALUES} values", where)
    try:
        return frozenset(value.decode("utf-8") for value in values)
    except UnicodeDecodeError:
        raise ConfigError(f"attribute {config.group_attribute} has a value that is not UTF-8", where) from None


def entry_mapping(config: LdapOptions, user: str, where: str, raw: dict[str, list[bytes]]) -> dict[str, Any]:
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


def check(config: LdapOptions, sample_user: str | None = None) -> list[str]:
    """Check the directory the way a login would and say what fails, step by step.

    Returns lines in the doctor's format: ``"ok   ldap <what>: <detail>"`` or
    ``"FAIL ldap <what>: <detail>"``; the check failed if any line starts with
    ``"FAIL"``. Each server of ``uris`` is tried on its own (connect + TLS, bind,
    and the sample search when ``sample_user`` is given), with ldap3; then, for
    ``sample_user``, the lookup a login would do, through the login's own client
    (``LdapSource``: first answering server, entry validated, no cache), so
    doctor tests what logins use. Never raises a LinkusError.
    """
    lines: list[str] = []

    def say(ok: bool, what: str, detail: str) -> None:
        lines.append(f"{'ok  ' if ok else 'FAIL'} ldap {what}: {detail}")

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
        finally:
            close_quietly(conn)
    if sample_user:
        source = LdapSource(config)
        try:
            found = source.lookup(sample_user)
        except LinkusError as exc:
            say(False, f"lookup {sample_user}", exc.reason)
        else:
            detail = "not here (no 2FA attributes or no entry)" if found is None else (
                f"method={found.method} enabled={'yes' if found.enabled else 'no'} account={found.account!r:.60}")
            say(True, f"lookup {sample_user}", detail)
        finally:
            source.close()
    return lines
