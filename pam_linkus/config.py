"""The main config file, /etc/pam_linkus/pam_linkus.yaml, parsed into typed sections.

Every key is documented in the shipped packaging/pam_linkus.yaml and in
pam_linkus.yaml(5); an unknown key is an error, because a misspelt ``enforce``
that is silently ignored is a bypass.

Only linkusd and the admin tools read this file (never a login process), so the
sections are ordinary classes filled by a ``Reader``: the Reader is what gives
every error its ``file:line:col`` and refuses unknown keys. Error messages name
keys we know and positions, never a value and never an unknown key (a secret
pasted into the wrong place would otherwise end up in syslog).
"""

from __future__ import annotations

import grp
import ipaddress
import posixpath
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from nss_config.yaml_reader import MAX_CONFIG_BYTES, MarkedDict, load_yaml, open_secure
from pam_linkus.errors import ConfigError
from pam_linkus.groups import ldap_group_key, parse_dn
from pam_linkus.mailtext import PLACEHOLDERS, check_address, fill

DEFAULT_CONFIG_PATH = "/etc/pam_linkus/pam_linkus.yaml"
DEFAULT_EXTENSIONS_PATH = "/etc/pam_linkus/extensions.yaml"
DEFAULT_STATE_DIR = "/var/lib/pam_linkus"

_MISSING = object()


class Reader:
    """Typed access to one mapping of the config; remembers which keys were used.

    ``done()`` refuses keys nobody asked for. Errors name ``file:line:col`` and the
    dotted key, never the value.
    """

    __slots__ = ("_data", "_file", "_prefix", "_used")

    def __init__(self, data: Any, file: str, prefix: str = ""):
        if data is None and not prefix:
            # Nothing but comments (or nothing) before the end marker: a file emptied or cut to
            # its header must not load as "every default" (enforce: enrolled, default state path).
            raise ConfigError("is empty: it holds no settings (write {} for every default)", file)
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix.rstrip('.') or 'the document'} must be a mapping", file)
        self._data = data
        self._file = file
        self._prefix = prefix
        self._used: set[str] = set()

    def where(self, key: str | None = None) -> str:
        """``file:line:col`` of ``key`` (or of the mapping) when the parser recorded it."""
        marks = getattr(self._data, "marks", {})
        if key is not None and key in marks:
            line, col = marks[key]
            return f"{self._file}:{line}:{col}"
        start = getattr(self._data, "start", None)
        return f"{self._file}:{start[0]}:{start[1]}" if start else self._file

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._prefix}{key}: {problem}", self.where(key))

    def _get(self, key: str) -> Any:
        """The value of ``key``, or _MISSING when the key is left out (that, and only that, is the
        default). A key written with no value (``enforce:``, ``~``, ``null``) is an error: it
        is what an edit that lost its value looks like, and its default is often the weaker
        setting (``enforce: enrolled``, the default state file, every method; tester 2)."""
        self._used.add(key)
        value = self._data.get(key, _MISSING)
        if value is None:
            raise self.fail(key, "has no value; give one, or leave the key out for its default")
        return value

    def keys(self) -> list[str]:
        """The keys of this mapping, in file order."""
        return list(self._data)

    def has(self, key: str) -> bool:
        return key in self._data

    def string(self, key: str, default: str | None, *, choices: Iterable[str] | None = None,
               max_len: int = 4096) -> str:
        value = self._get(key)
        if value is _MISSING:
            if default is None:
                raise self.fail(key, "is required")
            return default
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        if len(value) > max_len:
            raise self.fail(key, f"is longer than {max_len} characters")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of: {', '.join(choices)}")
        return value

    def optional_string(self, key: str, *, max_len: int = 4096) -> str | None:
        value = self._get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        if len(value) > max_len:
            raise self.fail(key, f"is longer than {max_len} characters")
        return value

    def path(self, key: str, default: str | None) -> str:
        value = self.string(key, default)
        if not value.startswith("/"):
            raise self.fail(key, "must be an absolute path")
        return value

    def optional_path(self, key: str) -> str | None:
        value = self.optional_string(key)
        if value is not None and not value.startswith("/"):
            raise self.fail(key, "must be an absolute path")
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "must be a number")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def string_list(self, key: str, default: list[str], *, choices: Iterable[str] | None = None) -> list[str]:
        value = self._get(key)
        if value is _MISSING:
            return list(default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        if choices is not None:
            allowed = list(choices)
            for number, item in enumerate(value, start=1):
                if item not in allowed:
                    raise self.fail(key, f"entry {number} is unknown; known: {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise self.fail(key, "lists an entry twice")
        return list(value)

    def section(self, key: str) -> Reader:
        """The mapping under ``key``; absent is an empty one, but a key with no value is an error:
        it is what a file cut after ``profiles:`` or ``sshd:`` looks like (issue 17, tester 1)."""
        if self._data.get(key, _MISSING) is None:
            self._used.add(key)
            raise self.fail(key, "has no value; give its settings, write {} for the defaults, or leave it out")
        value = self._get(key)
        if value is _MISSING:
            value = MarkedDict()
        elif not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        return Reader(value, self._file, f"{self._prefix}{key}.")

    def done(self) -> None:
        """Refuse keys nobody asked for, naming the place and the known keys, not the key."""
        for key in self._data:
            if key not in self._used:
                known = ", ".join(sorted(self._used))
                where = self._prefix.rstrip(".") or "top level"
                raise ConfigError(f"unknown key in {where} (known: {known})", self.where(key))


class LockoutConfig:
    """Consecutive failures per extension before a temporary lock, and the hard limit.

    After ``max_failures`` the extension is locked for ``duration`` seconds; each
    further failure locks it again. At ``permanent_after`` consecutive failures
    (NIST SP 800-63B: at most 100) only ``linkus-2fa unlock`` opens it.
    """

    __slots__ = ("max_failures", "duration", "permanent_after")

    def __init__(self, r: Reader):
        self.max_failures = r.integer("max_failures", 5, minimum=1, maximum=100)
        self.duration = r.integer("duration", 900, minimum=0, maximum=30 * 86400)
        self.permanent_after = r.integer("permanent_after", 100, minimum=1, maximum=100)
        if self.permanent_after < self.max_failures:
            raise r.fail("permanent_after", "must not be smaller than max_failures")
        r.done()


class TotpConfig:
    """How lenient TOTP verification is and how new enrollments are labelled."""

    __slots__ = ("window", "issuer")

    def __init__(self, r: Reader):
        self.window = r.integer("window", 1, minimum=0, maximum=10)
        self.issuer = r.optional_string("issuer", max_len=100)
        r.done()


class YamlSourceConfig:
    """Where the YAML source of extension settings lives."""

    __slots__ = ("path",)

    def __init__(self, r: Reader):
        self.path = r.path("path", DEFAULT_EXTENSIONS_PATH)
        r.done()


class LdapConfig:
    """The LDAP source (see nss_config.ldap_source); parsed here so a typo is caught
    at config load, without importing ldap3.

    Checks that need no network run here: a plain ``ldap://`` URI without StartTLS
    is refused (the bind password would cross the wire in clear), and a configured
    directory needs a bind DN and password file, because the entries hold TOTP
    secrets that no anonymous reader should see.
    """

    __slots__ = (
        "attributes", "base", "bind_dn", "bind_password_file", "ca_file", "cache_max_age",
        "cache_size", "cache_ttl", "negative_cache_ttl", "connect_timeout", "filter", "object_class", "scope",
        "start_tls", "timeout", "uris",
        "writer_bind_dn", "writer_password_file", "group_attribute",
    )

    DEFAULT_ATTRIBUTES = {
        "enabled": "linkusTwoFactorEnabled",
        "method": "linkusTwoFactorMethod",
        "secret": "linkusTotpSecret",
        "algorithm": "linkusTotpAlgorithm",
        "digits": "linkusTotpDigits",
        "period": "linkusTotpPeriod",
        "email": "mail",
    }
    DEFAULT_FILTER = "(&(objectClass=inetOrgPerson)(uid={user}))"

    def __init__(self, r: Reader):
        self.uris = r.string_list("uris", [])
        self.start_tls = r.boolean("start_tls", True)
        for uri in self.uris:
            scheme, sep, rest = uri.partition("://")
            host = rest.split("/", 1)[0]
            if not sep or scheme not in ("ldap", "ldaps") or not host or host.startswith(":"):
                raise r.fail("uris", "each URI must be ldaps://host[:port] or ldap://host[:port]")
            if scheme == "ldap" and not self.start_tls:
                raise r.fail("start_tls", "must be true for ldap:// URIs (the bind password would travel in clear)")
        self.ca_file = r.optional_path("ca_file")
        self.bind_dn = r.optional_string("bind_dn", max_len=1024)
        self.bind_password_file = r.optional_path("bind_password_file")
        self.base = r.string("base", "", max_len=1024)
        self.filter = r.string("filter", self.DEFAULT_FILTER, max_len=1024)
        if "{user}" not in self.filter:
            raise r.fail("filter", "must contain {user}")
        if not (self.filter.startswith("(") and self.filter.endswith(")")):
            raise r.fail("filter", "must be one parenthesised LDAP filter, e.g. (uid={user})")
        if self.uris:
            # What ldap3 cannot parse is refused here, never sent as something else.
            from nss_config.ldap_source import check_filter  # optional: ldap3, only with an LDAP source

            problem = check_filter(self.filter)
            if problem is not None:
                raise r.fail("filter", f"not an LDAP filter this module can send: {problem}")
        self.scope = r.string("scope", "subtree", choices=("base", "one", "subtree"))
        attrs = r.section("attributes")
        self.attributes = {k: attrs.string(k, v, max_len=100) for k, v in self.DEFAULT_ATTRIBUTES.items()}
        for key, name in self.attributes.items():
            if not _is_attribute_name(name):
                raise attrs.fail(key, "must be an LDAP attribute name (letters, digits, '-') or an OID")
        if len({n.lower() for n in self.attributes.values()}) != len(self.attributes):
            raise r.fail("attributes", "maps two keys to the same LDAP attribute")
        attrs.done()
        self.connect_timeout = r.number("connect_timeout", 3.0, minimum=0.1, maximum=30)
        # Whole seconds: it is also the search's timeLimit (and ldap3's SO_RCVTIMEO for the writer).
        self.timeout = r.integer("timeout", 3, minimum=1, maximum=30)
        self.cache_max_age = r.integer("cache_max_age", 0, minimum=0, maximum=30 * 86400)
        # The entry's group DNs, read in the same search as its settings (pam_linkus.groups).
        self.group_attribute = r.string("group_attribute", "memberOf", max_len=100)
        if not _is_attribute_name(self.group_attribute):
            raise r.fail("group_attribute", "must be an LDAP attribute name (letters, digits, '-') or an OID")
        # In-memory answers (nss_config.answer_cache): a directory change is seen within cache_ttl;
        # a kept "not enrolled" lets the password alone in under enforce: enrolled, hence its own age.
        self.cache_ttl = r.integer("cache_ttl", 60, minimum=0, maximum=86400)
        self.negative_cache_ttl = r.integer("negative_cache_ttl", 0, minimum=0, maximum=3600)
        if self.negative_cache_ttl > self.cache_ttl:
            # A "not here" answer (with the entry's groups) kept longer than an "enrolled" one would make
            # a group joined or a 2FA switched on in the directory reach logins later than cache_ttl says.
            raise r.fail("negative_cache_ttl", f"must not be longer than cache_ttl ({self.cache_ttl})")
        self.cache_size = r.integer("cache_size", 10000, minimum=0, maximum=1_000_000)
        self.writer_bind_dn = r.optional_string("writer_bind_dn")
        self.writer_password_file = r.optional_path("writer_password_file")
        self.object_class = r.string("object_class", "linkusTwoFactorAccount", max_len=100)
        if self.uris:
            for key in ("bind_dn", "bind_password_file", "base"):
                if not getattr(self, key):
                    raise r.fail(key, "is required when ldap.uris is set (no anonymous binds)")
        r.done()


def _is_attribute_name(name: str) -> bool:
    """RFC 4512 descr (``mail``) or numericoid (``0.9.2342.19200300.100.1.3``)."""
    if not name or not name.isascii():
        return False
    if name[0].isdigit():
        return all(part.isdigit() for part in name.split("."))
    return name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)


class RedisConfig:
    """The Redis state store (pam_linkus.state.redis_store) that hosts of a cluster share.

    Either ``url`` (one server) or ``sentinels`` + ``service_name`` (Sentinel finds
    the master; then ``tls`` and ``db`` say what the URL would have said). The
    password lives in a root-only file, never in this world-readable config, so a
    URL carrying one is refused.
    """

    __slots__ = (
        "url", "username", "password_file", "ca_file", "sentinels", "service_name", "tls", "db",
        "sentinel_username", "sentinel_password_file", "prefix", "connect_timeout", "timeout", "failure_ttl",
    )

    def __init__(self, r: Reader):
        self.sentinels = r.string_list("sentinels", [])
        for entry in self.sentinels:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise r.fail("sentinels", "each entry must be host:port")
        self.service_name = r.optional_string("service_name", max_len=200)
        if self.sentinels:
            if r.has("url"):
                raise r.fail("url", "give either url or sentinels, not both")
            if not self.service_name:
                raise r.fail("service_name", "is required when sentinels are listed")
            self.url = ""
            self.tls = r.boolean("tls", False)
            self.db = r.integer("db", 0, minimum=0, maximum=10000)
            self.sentinel_username = r.optional_string("sentinel_username", max_len=200)
            self.sentinel_password_file = r.optional_path("sentinel_password_file")
        else:
            if self.service_name is not None:
                raise r.fail("service_name", "only means something with sentinels")
            self.sentinel_username = self.sentinel_password_file = None
            for key in ("tls", "db", "sentinel_username", "sentinel_password_file"):
                if r.has(key):
                    raise r.fail(key, "only means something with sentinels; put it in url")
            self.url = r.string("url", "redis://127.0.0.1:6379/0", max_len=1000)
            if not self.url.startswith(("redis://", "rediss://", "unix://")):
                raise r.fail("url", "must start with redis://, rediss:// or unix://")
            authority = self.url.partition("://")[2].partition("/")[0]
            if ":" in authority.rpartition("@")[0] or "password=" in self.url:
                raise r.fail("url", "must not carry a password; put it in password_file")
            self.tls = self.url.startswith("rediss://")
            self.db = 0
        self.username = r.optional_string("username", max_len=200)
        if self.username is not None and "@" in self.url.partition("://")[2].partition("/")[0]:
            raise r.fail("username", "the url names a user already; give it in one place")
        self.password_file = r.optional_path("password_file")
        self.ca_file = r.optional_path("ca_file")
        self.prefix = r.string("prefix", "linkus:", max_len=100)
        if any(c in self.prefix for c in "{} ") or any(ord(c) < 33 for c in self.prefix):
            raise r.fail("prefix", "must not contain braces, spaces or control characters")
        self.connect_timeout = r.number("connect_timeout", 2.0, minimum=0.1, maximum=60)
        self.timeout = r.number("timeout", 2.0, minimum=0.1, maximum=60)
        self.failure_ttl = r.integer("failure_ttl", 30 * 86400, minimum=86400, maximum=3650 * 86400)
        r.done()


class StateConfig:
    """Where replay records, failure counts and codes live."""

    __slots__ = ("backend", "path", "redis")

    def __init__(self, r: Reader):
        self.backend = r.string("backend", "sqlite", choices=("sqlite", "redis"))
        self.path = r.path("path", f"{DEFAULT_STATE_DIR}/state.db")
        self.redis = RedisConfig(r.section("redis"))
        r.done()


class SmtpConfig:
    """The SMTP server that carries email codes (pam_linkus.mail).

    ``security``: ``tls`` (implicit TLS, port 465), ``starttls`` (port 587; a
    server that does not offer STARTTLS is an error, never a plaintext fallback)
    or ``none`` -- accepted only for a relay on the loopback interface, and never
    with AUTH, so a password or code never crosses a network in clear.
    """

    __slots__ = (
        "host", "port", "security", "ca_file", "username", "password_file", "sender",
        "timeout", "helo",
    )

    LOOPBACK = ("127.0.0.1", "::1", "localhost")

    def __init__(self, r: Reader):
        self.host = r.string("host", "127.0.0.1", max_len=255)
        self.security = r.string("security", "starttls", choices=("tls", "starttls", "none"))
        self.port = r.integer("port", 465 if self.security == "tls" else 587 if self.security == "starttls" else 25,
                              minimum=1, maximum=65535)
        self.ca_file = r.optional_path("ca_file")
        self.username = r.optional_string("username", max_len=255)
        self.password_file = r.optional_path("password_file")
        if self.username and not self.password_file:
            raise r.fail("password_file", "is required when username is set")
        if self.security == "none" and self.host not in self.LOOPBACK:
            raise r.fail("security", "none (plaintext) is allowed only towards 127.0.0.1, ::1 or localhost")
        if self.security == "none" and self.username:
            raise r.fail("username", "AUTH is not sent over plaintext (security: none)")
        self.sender = r.string("from", "pam-linkus@localhost", max_len=254)
        if not _plain_address_ish(self.sender):
            raise r.fail("from", "must be one plain address local@domain (no name, no comma, no spaces)")
        self.timeout = r.number("timeout", 10.0, minimum=0.1, maximum=60)
        self.helo = r.optional_string("helo", max_len=255)
        if self.helo is not None and not _plain_address_ish("x@" + self.helo):
            raise r.fail("helo", "must be a host name")
        r.done()


def _plain_address_ish(text: str) -> bool:
    """Cheap load-time check; pam_linkus.mailtext.check_address is the full one at send time."""
    return text.count("@") == 1 and not any(c in text for c in ' ,;<>()"\\') and text.isprintable()


#: Default mail subject; a changed one is checked for placeholders at load.
DEFAULT_EMAIL_SUBJECT = "Verification code for {user} on {host}"  # a login's, or a new address's


class EmailConfig:
    """Lifetime, attempts and throttles of email codes, and the message text.

    ``send_interval`` / ``max_per_hour`` throttle one extension,
    ``global_max_per_minute`` the whole host (or the Redis cluster), so that
    repeated logins cannot turn the PBX into a mail cannon.
    """

    __slots__ = (
        "code_lifetime", "max_attempts", "send_interval", "max_per_hour", "global_max_per_minute",
        "subject", "template_file", "key_file",
    )

    def __init__(self, r: Reader):
        self.code_lifetime = r.integer("code_lifetime", 300, minimum=30, maximum=3600)
        self.max_attempts = r.integer("max_attempts", 3, minimum=1, maximum=10)
        self.send_interval = r.integer("send_interval", 60, minimum=0, maximum=3600)
        self.max_per_hour = r.integer("max_per_hour", 5, minimum=1, maximum=100)
        self.global_max_per_minute = r.integer("global_max_per_minute", 60, minimum=1, maximum=10000)
        self.subject = r.string("subject", DEFAULT_EMAIL_SUBJECT, max_len=200)
        if any(ord(c) < 32 or ord(c) == 127 for c in self.subject):
            raise r.fail("subject", "must be one line without control characters")
        if self.subject != DEFAULT_EMAIL_SUBJECT:
            try:
                fill(self.subject, {name: "" for name in PLACEHOLDERS if name != "code"})
            except KeyError as exc:
                name = exc.args[0]
                raise r.fail("subject", "must not contain {code}" if name == "code"
                             else f"unknown placeholder {{{name}}}") from None
        self.template_file = r.optional_path("template_file")
        self.key_file = r.path("key_file", f"{DEFAULT_STATE_DIR}/email.key")
        r.done()


class SprayingConfig:
    """When wrong codes for many extensions in a short time mail the admin (pam_linkus.notify)."""

    __slots__ = ("extensions", "window")

    def __init__(self, r: Reader):
        self.extensions = r.integer("extensions", 5, minimum=2, maximum=10000)
        self.window = r.integer("window", 600, minimum=10, maximum=86400)
        r.done()


class NotifyConfig:
    """Mails to the extension's address on file (and the admin's) when something happens to an
    account: a lock, 2FA switched off, a new method, new recovery codes (pam_linkus.notify).

    On by default only when the config has an ``smtp`` section: a host that never set up mail
    does not start talking to 127.0.0.1:587. ``admin``: one plain address for locks and spraying.
    """

    __slots__ = ("enabled", "admin", "interval", "max_per_hour", "spraying")

    def __init__(self, r: Reader, *, smtp_configured: bool):
        self.enabled = r.boolean("enabled", smtp_configured)
        admin = r.optional_string("admin", max_len=254)
        if admin is not None:
            try:
                check_address(admin)
            except ValueError as exc:
                raise r.fail("admin", f"{exc} (one plain address local@domain)") from None
        self.admin = admin
        self.interval = r.integer("interval", 900, minimum=0, maximum=7 * 86400)
        self.max_per_hour = r.integer("max_per_hour", 60, minimum=1, maximum=10000)
        self.spraying = SprayingConfig(r.section("spraying"))
        r.done()


class SelfServiceConfig:
    """``linkus-2fa self``: the PAM service that checks the user's account password.

    It should hold the password modules only (e.g. ``auth required pam_unix.so``),
    not pam-linkus: the CLI asks the current code itself, through the same flow.
    """

    __slots__ = ("pam_service",)

    def __init__(self, r: Reader):
        self.pam_service = r.string("pam_service", "linkus-2fa", max_len=100)
        if not self.pam_service.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise r.fail("pam_service", "must be a PAM service name (letters, digits, - _ .)")
        r.done()


class PromptsConfig:
    """The texts the user sees; the PAM line's prompt= overrides ``totp``."""

    __slots__ = (
        "totp", "email", "locked", "email_sent", "email_pending", "email_throttled", "password_and_code",
    )

    def __init__(self, r: Reader):
        self.totp = _prompt(r, "totp", "Authentication code: ")
        self.password_and_code = _prompt(r, "password_and_code", "Password & verification code: ")
        self.email = _prompt(r, "email", "Email code: ")
        self.email_sent = _prompt(r, "email_sent", "A verification code was sent to {address}.")
        self.email_pending = _prompt(
            r, "email_pending", "The code sent to {address} a moment ago is still valid; no new code was sent."
        )
        self.email_throttled = _prompt(
            r, "email_throttled", "No new code can be sent yet; try again in {seconds} s."
        )
        self.locked = _prompt(r, "locked", "Too many failed attempts; contact your administrator.")
        r.done()


def _prompt(r: Reader, key: str, default: str) -> str:
    value = r.string(key, default, max_len=200)
    if any(ord(c) < 32 for c in value):
        raise r.fail(key, "must not contain control characters")
    return value


_V4_MAPPED = IPv6Network("::ffff:0:0/96")


def _networks(r: Reader, key: str) -> list[IPv4Network | IPv6Network]:
    """A list of CIDR networks, parsed now so a typo refuses logins at config load
    (and ``linkus-2fa doctor`` names it) instead of silently never matching.

    Host bits set (``10.1.2.3/8``) and a zero-length prefix (every address: that is
    2FA switched off, say so with ``enforce`` or by un-enrolling) are errors, and so are
    entries that merged cover every IPv4 or every IPv6 address (``0.0.0.0/1`` + ``128.0.0.0/1``).
    """
    networks: list[IPv4Network | IPv6Network] = []
    for number, text in enumerate(r.string_list(key, []), start=1):
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise r.fail(key, f"entry {number} is not a CIDR network (address/prefix, no host bits)") from None
        if network.prefixlen == 0:
            raise r.fail(key, f"entry {number} would exempt every address")
        if isinstance(network, IPv6Network) and network.subnet_of(_V4_MAPPED):
            # the policy compares a ::ffff:a.b.c.d client as the IPv4 address it is: such an entry
            # could never match
            raise r.fail(key, f"entry {number} is an IPv4-mapped IPv6 network: write it in IPv4 form")
        networks.append(network)
    # Entries that are each narrower can still add up to everything ([0.0.0.0/1, 128.0.0.0/1]):
    # merged, they are one /0 (tester 11).
    v4 = [n for n in networks if isinstance(n, IPv4Network)]
    v6 = [n for n in networks if isinstance(n, IPv6Network)]
    merged: list[IPv4Network | IPv6Network] = [*ipaddress.collapse_addresses(v4),
                                              *ipaddress.collapse_addresses(v6)]
    if any(n.prefixlen == 0 for n in merged):
        raise r.fail(key, "its entries together would exempt every address")
    return networks


#: The second factors a profile can accept.
PROFILE_METHODS = ("totp", "email")
#: What the ``profile=`` option and the keys of ``profiles`` may look like (protocol: 1..64 bytes).
_PROFILE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _is_group_name(name: str) -> bool:
    """A POSIX-ish group name (what ``groupadd`` accepts), so a typo fails at load."""
    return (0 < len(name) <= 32 and name.isascii() and not name.startswith("-")
            and all(c.isalnum() or c in "-_." for c in name.rstrip("$")))


class DaemonConfig:
    """How linkusd listens and how much work it takes on (docs/protocol.md, DESIGN.md).

    - ``pam_socket`` / ``web_socket``: the two sockets (PAM clients; linkus-web).
    - ``allowed_groups``: a PAM peer that is not root is served only if one of its
      groups (SO_PEERGROUPS, not only the primary one) is listed; empty: root only.
    - ``trusted_groups``: non-root peers whose PAM_RHOST counts for
      ``exempt_networks`` and ``grace_period``; from anyone else the address is
      only logged, since a local program can claim any address.
    - ``web_group``: the group that may use the web socket.
    - ``work_timeout``: seconds for daemon work and for each outside call
      (LDAP, Redis, SMTP) within one step of a login.
    - ``answer_timeout``: seconds a person may take to answer a prompt; a waiting
      connection holds no worker, so this may be long.
    - ``workers`` / ``web_workers``: threads for PAM work and for web calls.
    - ``max_connections``: open connections at once, all peers together.
    - ``max_per_caller`` / ``max_per_caller_root``: concurrent transactions per
      calling real uid (setuid su/sudo reach linkusd as euid 0 for any user, so
      the caller's real uid is what is capped); root callers (sshd, login) get more.
    - ``max_per_account``: concurrent transactions per target extension, so no one
      can hold every slot of somebody else's login.
    """

    __slots__ = (
        "pam_socket", "web_socket", "allowed_groups", "trusted_groups", "web_group", "work_timeout",
        "answer_timeout", "workers", "web_workers", "max_connections", "max_per_caller", "max_per_caller_root",
        "max_per_account",
    )

    def __init__(self, r: Reader):
        self.pam_socket = r.path("pam_socket", "/run/linkusd/pam.sock")
        self.web_socket = r.path("web_socket", "/run/linkusd/web.sock")
        if self.pam_socket == self.web_socket:
            raise r.fail("web_socket", "must differ from pam_socket")
        self.allowed_groups = r.string_list("allowed_groups", [])
        self.trusted_groups = r.string_list("trusted_groups", [])
        for key, names in (("allowed_groups", self.allowed_groups), ("trusted_groups", self.trusted_groups)):
            for number, name in enumerate(names, start=1):
                if not _is_group_name(name):
                    raise r.fail(key, f"entry {number} is not a group name")
        self.web_group = r.string("web_group", "linkus-web", max_len=32)
        if not _is_group_name(self.web_group):
            raise r.fail("web_group", "is not a group name")
        self.work_timeout = r.number("work_timeout", 10.0, minimum=0.5, maximum=120)
        self.answer_timeout = r.number("answer_timeout", 180.0, minimum=10, maximum=3600)
        self.workers = r.integer("workers", 8, minimum=1, maximum=256)
        self.web_workers = r.integer("web_workers", 2, minimum=1, maximum=64)
        self.max_connections = r.integer("max_connections", 512, minimum=1, maximum=65536)
        self.max_per_caller = r.integer("max_per_caller", 16, minimum=1, maximum=65536)
        self.max_per_caller_root = r.integer("max_per_caller_root", 256, minimum=1, maximum=65536)
        self.max_per_account = r.integer("max_per_account", 8, minimum=1, maximum=65536)
        for key in ("max_per_caller", "max_per_caller_root"):
            if getattr(self, key) > self.max_connections:
                raise r.fail(key, "must not be larger than max_connections")
        r.done()

    @staticmethod
    def group_ids(names: Iterable[str]) -> frozenset[int]:
        """The gids of ``names``; ConfigError for a group this host does not have.

        Looked up when linkusd (re)loads, not at parse time, so a config can be
        checked on another host; a missing group is an error, not "nobody".
        """
        gids = set()
        for name in names:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                raise ConfigError(f"daemon: group {name!r} does not exist on this host") from None
        return frozenset(gids)


class MetricsConfig:
    """linkusd's Prometheus endpoint (docs/operations.md); off unless ``listen`` is given.

    ``listen``: ``127.0.0.1:PORT`` / ``[::1]:PORT`` (any 127.0.0.0/8 address) or the absolute path of a
    unix socket. Only loopback: the counters tell an outsider when logins fail and how many
    extensions use which method, and linkusd has no business accepting connections from the
    network. Host names are refused too (``localhost`` may resolve to anything /etc/hosts says).

    ``group`` (unix socket only): the scraper's group; the socket is 0660 root:GROUP and a peer
    outside it is turned away (SO_PEERCRED). Without it the socket is 0600, root only. The
    recommended form: any local user can squat or connect to a loopback TCP port, never to a
    socket in a root-owned directory that only the group may open.
    """

    __slots__ = ("listen", "host", "port", "path", "group")

    def __init__(self, r: Reader, daemon: DaemonConfig):
        self.listen = r.optional_string("listen", max_len=256)
        self.group = r.optional_string("group", max_len=32)
        self.host: str | None = None
        self.port = 0
        self.path: str | None = None
        if self.group is not None and not _is_group_name(self.group):
            raise r.fail("group", "is not a group name")
        if self.listen is not None:
            if self.listen.startswith("/"):
                if self.listen in (daemon.pam_socket, daemon.web_socket):
                    raise r.fail("listen", "must not be the PAM or the web socket")
                if posixpath.normpath(self.listen) != self.listen or self.listen.endswith("/"):
                    raise r.fail("listen", "must be a normalized absolute path")
                self.path = self.listen
            else:
                self.host, self.port = _loopback_address(r, self.listen)
        if self.group is not None and self.path is None:
            raise r.fail("group", "needs listen to be a unix socket path (a TCP port has no group)")
        r.done()


def _loopback_address(r: Reader, text: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback IP literal (IPv6 in brackets) and a port 1-65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # ::1:9816 -- is 9816 the port or the address's last group?
        raise r.fail("listen", "an IPv6 address needs brackets: [::1]:PORT")
    if "%" in host:  # a scope (fe80::1%eth0, ::1%lo) binds nowhere on loopback
        raise r.fail("listen", "must not name a scope (%...): use [::1]:PORT")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise r.fail("listen", "must be LOOPBACK-IP:PORT (127.0.0.1:9816, [::1]:9816) or an absolute "
                               "unix socket path") from None
    if not address.is_loopback:
        raise r.fail("listen", "must be a loopback address (127.0.0.0/8 or ::1): metrics are not served "
                               "to the network")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) <= 65535:
        raise r.fail("listen", "needs a port between 1 and 65535")
    return str(address), int(port)


class Profile:
    """The policy for one PAM service (or the top-level policy when none is named).

    ``enforce``: ``enrolled`` (extensions without 2FA log in with the password) or
    ``all`` (they are denied). ``exempt_networks``: requests from these networks
    skip the second factor (only when linkusd trusts the caller's PAM_RHOST).
    ``grace_period``: seconds after a successful second factor from the same
    address during which another login skips it (0: off). ``methods``: the second
    factors this service accepts; an extension enrolled with another one is denied.
    """

    __slots__ = ("name", "enforce", "exempt_networks", "grace_period", "methods")

    def __init__(self, name: str, enforce: str, exempt_networks: list[IPv4Network | IPv6Network],
                 grace_period: int, methods: list[str]):
        self.name = name
        self.enforce = enforce
        self.exempt_networks = exempt_networks
        self.grace_period = grace_period
        self.methods = methods

    def __repr__(self) -> str:
        return (f"Profile({self.name!r}, enforce={self.enforce!r}, exempt_networks={len(self.exempt_networks)}, "
                f"grace_period={self.grace_period}, methods={self.methods!r})")

    @classmethod
    def read(cls, name: str, r: Reader, base: Profile) -> Profile:
        """A ``profiles.NAME`` section; a key it leaves out is the top-level value."""
        enforce = r.string("enforce", base.enforce, choices=("enrolled", "all"))
        networks = _networks(r, "exempt_networks") if r.has("exempt_networks") else list(base.exempt_networks)
        grace = r.integer("grace_period", base.grace_period, minimum=0, maximum=30 * 86400)
        methods = r.string_list("methods", base.methods, choices=PROFILE_METHODS)
        if not methods:
            raise r.fail("methods", "must name at least one method")
        r.done()
        return cls(name, enforce, networks, grace, methods)


#: Longest LDAP group a rule may name (a first-RDN value or a full DN).
MAX_LDAP_GROUP_LEN = 1024
#: Most rules in ``group_policy`` (each login checks every one).
MAX_GROUP_RULES = 256


class GroupRule:
    """One entry of ``group_policy``: accounts in any of its groups get its keys as well.

    ``unix_groups`` (NSS groups) and ``ldap_groups`` (first-RDN values or full DNs of
    ``ldap.group_attribute``) say who it applies to; ``enforce``, ``methods``,
    ``exempt_networks`` and ``grace_period`` what it asks. A key it leaves out is None and
    constrains nothing; how a rule and the service's profile combine is ``policy.combine``
    (the stricter value wins on every key, docs/guide.md "Policy by group").
    """

    __slots__ = ("name", "unix_groups", "ldap_groups", "enforce", "methods", "exempt_networks", "grace_period")

    KEYS = ("enforce", "methods", "exempt_networks", "grace_period")

    def __init__(self, r: Reader, number: int):
        self.name = r.string("name", f"rule {number}", max_len=64)
        if not (0 < len(self.name) <= 64 and all(c.isalnum() or c in "-_. " for c in self.name)):
            raise r.fail("name", "must be 1-64 letters, digits, spaces, '-', '_' or '.'")
        self.unix_groups = r.string_list("unix_groups", [])
        for index, name in enumerate(self.unix_groups, start=1):
            if not _is_group_name(name):
                raise r.fail("unix_groups", f"entry {index} is not a group name")
        self.ldap_groups = r.string_list("ldap_groups", [])
        seen: set[str] = set()
        for index, name in enumerate(self.ldap_groups, start=1):
            if (not name or len(name) > MAX_LDAP_GROUP_LEN or name != name.strip()
                    or any(ord(c) < 32 or ord(c) == 127 for c in name)):
                raise r.fail("ldap_groups", f"entry {index} is not a group name or DN")
            if "=" in name and parse_dn(name) is None:
                raise r.fail("ldap_groups", f"entry {index} is not a DN this module can compare")
            if ldap_group_key(name) in seen:  # the same group twice (a name ignoring case, a DN as a DN)
                raise r.fail("ldap_groups", "lists an entry twice")
            seen.add(ldap_group_key(name))
        if len({g.casefold() for g in self.unix_groups}) != len(self.unix_groups):
            raise r.fail("unix_groups", "lists a group twice (compared ignoring case)")
        self.enforce: str | None = r.string("enforce", "", choices=("enrolled", "all")) if r.has("enforce") else None
        self.methods: list[str] | None = None
        if r.has("methods"):
            self.methods = r.string_list("methods", [], choices=PROFILE_METHODS)
            if not self.methods:
                raise r.fail("methods", "must name at least one method")
        self.exempt_networks: list[IPv4Network | IPv6Network] | None = (
            _networks(r, "exempt_networks") if r.has("exempt_networks") else None)
        self.grace_period: int | None = (r.integer("grace_period", 0, minimum=0, maximum=30 * 86400)
                                         if r.has("grace_period") else None)
        r.done()  # first: a misspelt key (enfore, unix_group) is named as unknown, not as missing
        if not self.unix_groups and not self.ldap_groups:
            raise r.fail("unix_groups", "a rule must name at least one group (unix_groups or ldap_groups)")
        if all(getattr(self, key) is None for key in self.KEYS):
            raise r.fail("enforce", f"a rule must set at least one of {', '.join(self.KEYS)}")

    def __repr__(self) -> str:
        return (f"GroupRule({self.name!r}, unix_groups={self.unix_groups!r}, ldap_groups={self.ldap_groups!r}, "
                f"enforce={self.enforce!r}, methods={self.methods!r}, "
                f"exempt_networks={None if self.exempt_networks is None else len(self.exempt_networks)}, "
                f"grace_period={self.grace_period!r})")


def _group_rules(r: Reader, key: str) -> list[GroupRule]:
    """``group_policy``: a list of rules; a rule name or a group named twice is an error (every
    matching rule applies, so a group in two rules is two places to read for one answer)."""
    value = r._get(key)
    if value is _MISSING:
        return []
    if not isinstance(value, list):
        raise r.fail(key, "must be a list of rules")
    if len(value) > MAX_GROUP_RULES:
        raise r.fail(key, f"has more than {MAX_GROUP_RULES} rules")
    rules: list[GroupRule] = []
    names: set[str] = set()
    unix: set[str] = set()
    ldap: set[str] = set()
    for number, item in enumerate(value, start=1):
        sub = Reader(item, r._file, f"{r._prefix}{key}[{number}].")
        rule = GroupRule(sub, number)
        if rule.name in names:
            raise sub.fail("name", "is the name of an earlier rule")
        if unix & {g.casefold() for g in rule.unix_groups}:
            raise sub.fail("unix_groups", "names a group an earlier rule names (compared ignoring case)")
        if ldap & {ldap_group_key(g) for g in rule.ldap_groups}:
            raise sub.fail("ldap_groups", "names a group an earlier rule names (a name ignoring case, a DN as a DN)")
        names.add(rule.name)
        unix.update(g.casefold() for g in rule.unix_groups)
        ldap.update(ldap_group_key(g) for g in rule.ldap_groups)
        rules.append(rule)
    return rules


def missing_unix_groups(rules: Iterable[GroupRule]) -> list[tuple[GroupRule, str]]:
    """(rule, group) for every Unix group a rule names that this host's NSS does not know (a
    typo such as ``whell`` matches nobody): not an error -- the config may be written for
    another host, and a rule can only tighten -- but linkusd warns at load and doctor shows it."""
    found = []
    for rule in rules:
        for group in rule.unix_groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                found.append((rule, group))
    return found


class Config:
    """The whole main config. Build with ``load_config`` or ``Config.from_mapping``."""

    __slots__ = (
        "path", "enforce", "sources", "on_source_unavailable", "yaml", "ldap", "state",
        "totp", "lockout", "email", "smtp", "prompts", "exempt_networks", "grace_period",
        "recovery_codes", "self_service", "daemon", "profiles", "default_profile", "group_policy", "notify",
        "metrics", "gate",
    )

    SOURCES = ("yaml", "ldap")

    def __init__(self, r: Reader, path: str):
        self.path = path
        self.enforce = r.string("enforce", "enrolled", choices=("enrolled", "all"))
        self.sources = r.string_list("sources", ["yaml"], choices=self.SOURCES)
        if not self.sources:
            raise r.fail("sources", "must name at least one source")
        self.on_source_unavailable = r.string("on_source_unavailable", "fail", choices=("fail", "next"))
        self.yaml = YamlSourceConfig(r.section("yaml"))
        self.ldap = LdapConfig(r.section("ldap"))
        if "ldap" in self.sources and not self.ldap.uris:
            raise r.fail("ldap", "sources lists ldap but ldap.uris is empty")
        self.state = StateConfig(r.section("state"))
        self.totp = TotpConfig(r.section("totp"))
        self.lockout = LockoutConfig(r.section("lockout"))
        self.email = EmailConfig(r.section("email"))
        self.smtp = SmtpConfig(r.section("smtp"))
        self.notify = NotifyConfig(r.section("notify"), smtp_configured=r.has("smtp"))
        self.prompts = PromptsConfig(r.section("prompts"))
        self.exempt_networks = _networks(r, "exempt_networks")
        self.grace_period = r.integer("grace_period", 0, minimum=0, maximum=30 * 86400)
        self.recovery_codes = r.integer("recovery_codes", 10, minimum=1, maximum=50)
        self.self_service = SelfServiceConfig(r.section("self_service"))
        self.daemon = DaemonConfig(r.section("daemon"))
        self.metrics = MetricsConfig(r.section("metrics"), self.daemon)
        self.gate = GateConfig(r.section("gate"))
        #: The top-level policy: what a service without a profile of its own gets.
        self.default_profile = Profile("", self.enforce, self.exempt_networks, self.grace_period,
                                       list(PROFILE_METHODS))
        self.profiles: dict[str, Profile] = {}
        profiles = r.section("profiles")
        for name in profiles.keys():
            if not (0 < len(name) <= 64 and set(name) <= _PROFILE_NAME_CHARS):
                raise ConfigError("profiles: a profile name must be 1-64 letters, digits, '-', '_' or '.'",
                                  profiles.where(name))
            self.profiles[name] = Profile.read(name, profiles.section(name), self.default_profile)
        profiles.done()
        #: Policy by group (docs/guide.md "Policy by group"): every matching rule applies.
        self.group_policy = _group_rules(r, "group_policy")
        if "ldap" not in self.sources:
            for rule in self.group_policy:
                if rule.ldap_groups:
                    raise ConfigError(f"group_policy: rule {rule.name!r} names ldap_groups, but sources does not "
                                      "list ldap", r.where("group_policy"))
        r.done()

    def profile(self, name: str, *, explicit: bool) -> Profile:
        """The policy for a login: the PAM line's ``profile=`` (explicit) or the service name.

        An explicit profile that is not configured raises ConfigError: the admin
        asked for a policy that does not exist, and guessing one could be weaker, so
        the login is unavailable. An implicit one (the service name) that is not
        configured gets the top-level policy.
        """
        found = self.profiles.get(name)
        if found is not None:
            return found
        if explicit:
            raise ConfigError(f"profile {name[:64]!r} (the PAM line's profile=) is not defined in profiles",
                              self.path)
        return self.default_profile

    @classmethod
    def from_mapping(cls, data: Any, path: str = "<config>") -> Config:
        return cls(Reader(data, path), path)


def load_config(path: str = DEFAULT_CONFIG_PATH) -> Config:
    """Read, check and parse the main config; any problem is a ConfigError naming file:line:col.

    The file must end with the end marker ``...`` (as extensions.yaml): every prefix of a YAML
    file cut at a line is valid YAML, and a cut or emptied config would otherwise load with
    defaults -- enforcement off, state in the default SQLite file instead of Redis.
    """
    data, _ = open_secure(path, secret=True, max_bytes=MAX_CONFIG_BYTES)
    return Config.from_mapping(load_yaml(data, path, require_end=True), path)


class GateSite:
    """One ``gate.sites`` entry: a host and path prefix in front of a PBX web GUI, and who may pass.

    ``allow_groups`` (Unix groups of the account's passwd entry), ``allow_ldap_groups`` and
    ``allow_extensions`` are alternatives (any one admits); all three empty: any extension.
    ``enforce``, ``session_lifetime`` and ``idle_timeout`` default to the gate's;
    a site may only shorten the two times (a session is stored with the gate's).
    """

    __slots__ = ("name", "host", "path", "allow_groups", "allow_ldap_groups", "allow_extensions", "enforce",
                 "session_lifetime", "idle_timeout", "exempt_networks")

    def __init__(self, r: Reader, gate: GateConfig):
        self.name = r.string("name", None, max_len=64)
        if not (self.name and set(self.name) <= _PROFILE_NAME_CHARS):
            raise r.fail("name", "must be 1-64 letters, digits, '-', '_' or '.'")
        host = r.optional_string("host", max_len=255)
        self.host = _gate_host(r, "host", host) if host is not None else None
        self.path = r.string("path", None, max_len=1024)
        if (not self.path.startswith("/") or self.path.startswith("//") or any(c in self.path for c in "?#\\%;")
                or any(ord(c) <= 32 or ord(c) == 127 for c in self.path)
                or any(part in (".", "..") for part in self.path.split("/"))):
            raise r.fail("path", "must be a plain path prefix starting with one '/' (no query, %, ;, \\, dot segments)")
        if self.path != self.path.lower():
            # the auth check matches the request path lower-cased (an upstream may ignore case), so a
            # site written with capitals would never be what it looks like: say so at load
            raise r.fail("path", "must be in lower case (request paths are matched lower-cased)")
        self.allow_groups = r.string_list("allow_groups", [])
        for number, name in enumerate(self.allow_groups, start=1):
            if not _is_group_name(name):
                raise r.fail("allow_groups", f"entry {number} is not a group name")
        self.allow_ldap_groups = r.string_list("allow_ldap_groups", [])
        self.allow_extensions = r.string_list("allow_extensions", [])
        for key in ("allow_ldap_groups", "allow_extensions"):
            for number, value in enumerate(getattr(self, key), start=1):
                if not value or len(value) > 256 or any(ord(c) < 32 for c in value):
                    raise r.fail(key, f"entry {number} is empty, too long or holds control characters")
        self.enforce = r.string("enforce", gate.enforce, choices=("enrolled", "all"))
        self.session_lifetime = r.integer("session_lifetime", gate.session_lifetime, minimum=60,
                                          maximum=gate.session_lifetime)
        self.idle_timeout = r.integer("idle_timeout", gate.idle_timeout, minimum=60, maximum=gate.idle_timeout)
        self.exempt_networks = _networks(r, "exempt_networks")
        r.done()

    def __repr__(self) -> str:
        return f"GateSite({self.name!r}, host={self.host!r}, path={self.path!r})"


def _gate_host(r: Reader, key: str, value: str) -> str:
    """A host name (or [IPv6]/IPv4 literal) with an optional :port, lowercased; anything else is an error."""
    host = value.strip().lower()
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-.:[]")
    if not host or host != value.lower() or not set(host) <= allowed or len(host) > 255:
        raise r.fail(key, "must be a host name with an optional :port (no scheme, path or user)")
    return host


def site_path_key(path: str) -> str:
    """A site path as the auth check compares it: lower case, without trailing "/" ("/Admin/" and
    "/admin" are one site: the longer one would never apply)."""
    return path.lower().rstrip("/")


def gate_warnings(gate: GateConfig) -> list[str]:
    """What makes the gate refuse more than its config seems to say, found at load (said once in
    syslog, as group_policy's missing Unix groups): not errors -- the config may be written for
    another host or before its sites -- but each one locks people out of a GUI.

    No sites (every proxied request is refused), host-less sites while ``return_hosts`` is empty
    (such a site matches no host), and ``allow_groups`` naming a Unix group this host lacks."""
    found: list[str] = []
    if not gate.configured:
        return found
    if not gate.sites:
        found.append("gate: no sites: every request the gate is asked about is refused (403)")
    if not gate.return_hosts:
        hostless = [site.name for site in gate.sites if site.host is None]
        if hostless:
            found.append(f"gate: return_hosts is empty, so the sites without host ({', '.join(hostless)}) "
                         "match no request (403)")
    for site in gate.sites:
        for group in site.allow_groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                found.append(f"gate: site {site.name!r}: Unix group {group!r} (allow_groups) does not exist "
                             "on this host")
    return found


class GateConfig:
    """``gate``: the web gate in front of a PBX's own web GUIs (docs/gate.md).

    Read by linkusd only; linkus-web holds no policy. ``enforce``: ``all`` (an account
    without 2FA never passes) or ``enrolled`` (it passes on its password, only where the
    site says so too). ``not_enrolled``: ``enroll`` sends such an account to the Security
    Settings page, ``refuse`` stops it. ``return_hosts``/``default_return``: where a
    sign-in may send the browser back to. ``touch_interval``: seconds between two writes
    of a session's last use (the idle timeout is exact to this much). ``account_check_interval``:
    seconds an account's settings, groups and 2FA are trusted before an auth check asks again
    (sessions, revocations and locks are read on every check). ``check_timeout``: the auth
    check's deadline for the state store.
    """

    __slots__ = ("enforce", "not_enrolled", "session_lifetime", "idle_timeout", "return_hosts", "default_return",
                 "sites", "max_sessions_per_account", "max_sessions", "touch_interval", "account_check_interval",
                 "check_timeout", "configured")

    def __init__(self, r: Reader):
        #: The file has a ``gate`` section with settings (a host without one uses no gate: no warnings).
        self.configured = bool(r._data)
        self.enforce = r.string("enforce", "all", choices=("all", "enrolled"))
        self.not_enrolled = r.string("not_enrolled", "enroll", choices=("enroll", "refuse"))
        self.session_lifetime = r.integer("session_lifetime", 43200, minimum=60, maximum=30 * 86400)
        self.idle_timeout = r.integer("idle_timeout", 1800, minimum=60, maximum=self.session_lifetime)
        self.return_hosts = [_gate_host(r, "return_hosts", h) for h in r.string_list("return_hosts", [])]
        self.default_return = r.string("default_return", "/", max_len=1024)
        if (not self.default_return.startswith("/") or self.default_return.startswith(("//", "/\\"))
                or any(ord(c) <= 32 or ord(c) == 127 or c == "\\" for c in self.default_return)):
            raise r.fail("default_return", "must be a local path starting with one '/'")
        self.max_sessions_per_account = r.integer("max_sessions_per_account", 10, minimum=1, maximum=100)
        self.max_sessions = r.integer("max_sessions", 2000, minimum=1, maximum=4000)
        self.touch_interval = r.integer("touch_interval", 30, minimum=1, maximum=600)
        if self.touch_interval * 2 > self.idle_timeout:
            raise r.fail("touch_interval", "must be at most half of idle_timeout")
        self.account_check_interval = r.integer("account_check_interval", 30, minimum=0, maximum=3600)
        self.check_timeout = r.number("check_timeout", 1.0, minimum=0.05, maximum=10)
        self.sites: list[GateSite] = []
        value = r._get("sites")
        if value is not _MISSING:
            if not isinstance(value, list):
                raise r.fail("sites", "must be a list of site mappings")
            for number, item in enumerate(value, start=1):
                if not isinstance(item, dict):
                    raise r.fail("sites", f"entry {number} must be a mapping")
                site = GateSite(Reader(item, r._file, f"{r._prefix}sites[{number}]."), self)
                if any(s.name == site.name for s in self.sites):
                    raise r.fail("sites", f"entry {number}: the name {site.name!r} is used twice")
                for other in self.sites:
                    if other.host == site.host and site_path_key(other.path) == site_path_key(site.path):
                        # one of the two would never apply (e.g. /admin and /admin/): refused, never silent
                        raise r.fail("sites", f"entry {number} ({site.name!r}): the same host and path as "
                                     f"{other.name!r} ({other.path!r}); one of them would never apply")
                self.sites.append(site)
        r.done()
