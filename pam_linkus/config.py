"""The main config file, /etc/pam_linkus/pam_linkus.yaml, parsed into typed sections.

Every key is documented in README.md ("Config reference"); an unknown key is an
error, because a misspelt ``enforce`` that is silently ignored is a bypass.

Sections are plain ``__slots__`` classes filled by a ``Reader`` rather than
dataclasses: this module is on the login path, and importing ``dataclasses``
costs more than the whole budget of a login inside pam_python.
"""

from __future__ import annotations

from pam_linkus.errors import ConfigError
from pam_linkus.strictyaml import MAX_CONFIG_BYTES, MarkedDict, load_yaml, open_secure

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Iterable
    from ipaddress import IPv4Network, IPv6Network
    from typing import Any

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
        if data is None:
            data = MarkedDict()
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
        self._used.add(key)
        return self._data.get(key, _MISSING)

    def has(self, key: str) -> bool:
        return key in self._data

    def string(self, key: str, default: str | None, *, choices: Iterable[str] | None = None,
               max_len: int = 4096) -> str:
        value = self._get(key)
        if value is _MISSING or value is None:
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
        if value is _MISSING or value is None:
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
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "must be an integer")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self._get(key)
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "must be a number")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING or value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def string_list(self, key: str, default: list[str], *, choices: Iterable[str] | None = None) -> list[str]:
        value = self._get(key)
        if value is _MISSING or value is None:
            return list(default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "must be a list of strings")
        if choices is not None:
            allowed = list(choices)
            for item in value:
                if item not in allowed:
                    raise self.fail(key, f"unknown entry {item!r:.40}; known: {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise self.fail(key, "lists an entry twice")
        return list(value)

    def section(self, key: str) -> Reader:
        value = self._get(key)
        if value is _MISSING or value is None:
            value = MarkedDict()
        elif not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        return Reader(value, self._file, f"{self._prefix}{key}.")

    def done(self) -> None:
        for key in self._data:
            if key not in self._used:
                raise self.fail(key, "unknown key")


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
    """How lenient TOTP verification is and how new enrolments are labelled."""

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
        "connect_timeout", "filter", "object_class", "scope", "start_tls", "timeout", "uris",
        "writer_bind_dn", "writer_password_file",
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
            # The login encodes the filter itself (nss_config.ldap_wire): what it cannot
            # encode is refused here, never sent as something else.
            from nss_config.ldap_wire import FilterError, encode_filter, escape_value

            try:
                encode_filter(self.filter.replace("{user}", escape_value("x")))
            except FilterError as exc:
                raise r.fail("filter", f"not an LDAP filter this module can send: {exc}") from None
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
    """Cheap load-time check; pam_linkus.emailcode.check_address is the full one at send time."""
    return text.count("@") == 1 and not any(c in text for c in ' ,;<>()"\\') and text.isprintable()


#: Default mail subject; a changed one is checked for placeholders at load.
DEFAULT_EMAIL_SUBJECT = "Login verification code for {user} on {host}"


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
            from pam_linkus.emailcode import PLACEHOLDERS, fill

            try:
                fill(self.subject, {name: "" for name in PLACEHOLDERS if name != "code"})
            except KeyError as exc:
                name = exc.args[0]
                raise r.fail("subject", "must not contain {code}" if name == "code"
                             else f"unknown placeholder {{{name}}}") from None
        self.template_file = r.optional_path("template_file")
        self.key_file = r.path("key_file", f"{DEFAULT_STATE_DIR}/email.key")
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
            r, "email_throttled", "Too many codes were sent for this account; try again later."
        )
        self.locked = _prompt(r, "locked", "Too many failed attempts; contact your administrator.")
        r.done()


def _prompt(r: Reader, key: str, default: str) -> str:
    value = r.string(key, default, max_len=200)
    if any(ord(c) < 32 for c in value):
        raise r.fail(key, "must not contain control characters")
    return value


def _networks(r: Reader, key: str) -> list[IPv4Network | IPv6Network]:
    """A list of CIDR networks, parsed now so a typo refuses logins at config load
    (and ``linkus-2fa doctor`` names it) instead of silently never matching.

    Host bits set (``10.1.2.3/8``) and a zero-length prefix (every address: that is
    2FA switched off, say so with ``enforce`` or by un-enrolling) are errors.
    ``ipaddress`` is imported only when the list is not empty.
    """
    texts = r.string_list(key, [])
    if not texts:
        return []
    import ipaddress

    networks: list[IPv4Network | IPv6Network] = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise r.fail(key, f"{text[:60]!r} is not a CIDR network ({exc})") from None
        if network.prefixlen == 0:
            raise r.fail(key, f"{text!r} would exempt every address")
        networks.append(network)
    return networks


class DaemonConfig:
    """linkusd's sockets, who may use them, deadlines and caps (interim; see docs)."""

    __slots__ = ("pam_socket", "web_socket", "allowed_groups", "trusted_groups", "web_group", "work_timeout",
                 "answer_timeout", "workers", "web_workers", "max_connections", "max_per_caller",
                 "max_per_caller_root", "max_per_account")

    def __init__(self, r: Reader):
        self.pam_socket = r.path("pam_socket", "/run/linkusd/pam.sock")
        self.web_socket = r.path("web_socket", "/run/linkusd/web.sock")
        self.allowed_groups = r.string_list("allowed_groups", [])
        self.trusted_groups = r.string_list("trusted_groups", [])
        self.web_group = r.string("web_group", "linkus-web", max_len=64)
        self.work_timeout = r.number("work_timeout", 10.0, minimum=1.0, maximum=120.0)
        self.answer_timeout = r.number("answer_timeout", 180.0, minimum=10.0, maximum=3600.0)
        self.workers = r.integer("workers", 8, minimum=1, maximum=128)
        self.web_workers = r.integer("web_workers", 2, minimum=1, maximum=32)
        self.max_connections = r.integer("max_connections", 512, minimum=8, maximum=65536)
        self.max_per_caller = r.integer("max_per_caller", 16, minimum=1, maximum=4096)
        self.max_per_caller_root = r.integer("max_per_caller_root", 256, minimum=1, maximum=65536)
        self.max_per_account = r.integer("max_per_account", 8, minimum=1, maximum=1024)
        r.done()


class Profile:
    """The policy one login runs under: the top level, or a per-service profile."""

    __slots__ = ("enforce", "exempt_networks", "grace_period", "methods")

    def __init__(self, enforce: str, exempt_networks: list[IPv4Network | IPv6Network], grace_period: int,
                 methods: tuple[str, ...]):
        self.enforce = enforce
        self.exempt_networks = exempt_networks
        self.grace_period = grace_period
        self.methods = methods


class Config:
    """The whole main config. Build with ``load_config`` or ``Config.from_mapping``."""

    __slots__ = (
        "path", "enforce", "sources", "on_source_unavailable", "yaml", "ldap", "state",
        "totp", "lockout", "email", "smtp", "prompts", "exempt_networks", "grace_period",
        "recovery_codes", "self_service", "cache_dir", "daemon",
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
        self.prompts = PromptsConfig(r.section("prompts"))
        self.exempt_networks = _networks(r, "exempt_networks")
        self.grace_period = r.integer("grace_period", 0, minimum=0, maximum=30 * 86400)
        self.recovery_codes = r.integer("recovery_codes", 10, minimum=1, maximum=50)
        self.self_service = SelfServiceConfig(r.section("self_service"))
        self.daemon = DaemonConfig(r.section("daemon"))
        r.done()
        #: Not a config key: where this process may keep compiled caches (the PAM
        #: option cache_dir=); None (the CLI, tests) means read the YAML files directly.
        self.cache_dir: str | None = None

    def profile(self, name: str, *, explicit: bool) -> Profile:
        """The policy of a profile (interim: only the top-level policy exists)."""
        if explicit:
            raise ConfigError(f"unknown profile {name[:64]!r}", "profile=")
        return Profile(self.enforce, self.exempt_networks, self.grace_period, ("totp", "email"))

    @classmethod
    def from_mapping(cls, data: Any, path: str = "<config>") -> Config:
        return cls(Reader(data, path), path)


def load_config(path: str = DEFAULT_CONFIG_PATH, *, cache_dir: str | None = None) -> Config:
    """Read, check and parse the main config; any problem is a ConfigError naming file:line:col.

    With ``cache_dir`` (the PAM module), a valid compiled cache is used instead of
    parsing the YAML (pam_linkus.config_cache), and the sources use theirs.
    """
    if cache_dir is not None:
        from pam_linkus.config_cache import load_config_cached

        return load_config_cached(path, cache_dir)
    data, _ = open_secure(path, secret=False, max_bytes=MAX_CONFIG_BYTES)
    return Config.from_mapping(load_yaml(data, path), path)
