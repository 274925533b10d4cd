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
    at config load, without importing ldap3."""

    __slots__ = (
        "uris", "start_tls", "ca_file", "bind_dn", "bind_password_file", "base", "filter",
        "scope", "attributes", "connect_timeout", "timeout", "cache_max_age",
        "writer_bind_dn", "writer_password_file", "object_class",
    )

    ATTRIBUTE_KEYS = ("enabled", "method", "secret", "algorithm", "digits", "period", "email")
    DEFAULT_ATTRIBUTES = {
        "enabled": "linkusTwoFactorEnabled",
        "method": "linkusTwoFactorMethod",
        "secret": "linkusTotpSecret",
        "algorithm": "linkusTotpAlgorithm",
        "digits": "linkusTotpDigits",
        "period": "linkusTotpPeriod",
        "email": "mail",
    }

    def __init__(self, r: Reader):
        self.uris = r.string_list("uris", [])
        for uri in self.uris:
            if not uri.startswith(("ldap://", "ldaps://")):
                raise r.fail("uris", "each URI must start with ldap:// or ldaps://")
        self.start_tls = r.boolean("start_tls", True)
        self.ca_file = r.optional_path("ca_file")
        self.bind_dn = r.optional_string("bind_dn")
        self.bind_password_file = r.optional_path("bind_password_file")
        self.base = r.string("base", "")
        self.filter = r.string("filter", "(&(objectClass=inetOrgPerson)(uid={user}))")
        if self.filter.count("{user}") < 1:
            raise r.fail("filter", "must contain {user}")
        self.scope = r.string("scope", "subtree", choices=("base", "one", "subtree"))
        attrs = r.section("attributes")
        self.attributes = {k: attrs.string(k, v, max_len=100) for k, v in self.DEFAULT_ATTRIBUTES.items()}
        attrs.done()
        self.connect_timeout = r.number("connect_timeout", 3.0, minimum=0.1, maximum=60)
        self.timeout = r.number("timeout", 5.0, minimum=0.1, maximum=60)
        self.cache_max_age = r.integer("cache_max_age", 0, minimum=0, maximum=30 * 86400)
        self.writer_bind_dn = r.optional_string("writer_bind_dn")
        self.writer_password_file = r.optional_path("writer_password_file")
        self.object_class = r.string("object_class", "linkusTwoFactorAccount", max_len=100)
        r.done()


class RedisConfig:
    """The Redis state store (pam_linkus.state.redis_store)."""

    __slots__ = (
        "url", "username", "password_file", "ca_file", "sentinels", "service_name",
        "prefix", "connect_timeout", "timeout",
    )

    def __init__(self, r: Reader):
        self.url = r.string("url", "redis://127.0.0.1:6379/0")
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise r.fail("url", "must start with redis://, rediss:// or unix://")
        self.username = r.optional_string("username", max_len=200)
        self.password_file = r.optional_path("password_file")
        self.ca_file = r.optional_path("ca_file")
        self.sentinels = r.string_list("sentinels", [])
        self.service_name = r.optional_string("service_name", max_len=200)
        if self.sentinels and not self.service_name:
            raise r.fail("service_name", "is required when sentinels are listed")
        self.prefix = r.string("prefix", "linkus:", max_len=100)
        self.connect_timeout = r.number("connect_timeout", 2.0, minimum=0.1, maximum=60)
        self.timeout = r.number("timeout", 2.0, minimum=0.1, maximum=60)
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
    """The SMTP server that carries email codes (pam_linkus.mail)."""

    __slots__ = (
        "host", "port", "security", "ca_file", "username", "password_file", "sender",
        "timeout", "helo",
    )

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
        self.sender = r.string("from", "pam-linkus@localhost", max_len=255)
        self.timeout = r.number("timeout", 10.0, minimum=0.1, maximum=60)
        self.helo = r.optional_string("helo", max_len=255)
        r.done()


class EmailConfig:
    """Lifetime, attempts and throttles of email codes, and the message text."""

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
        self.subject = r.string("subject", "Your login verification code", max_len=200)
        if "\r" in self.subject or "\n" in self.subject:
            raise r.fail("subject", "must be one line")
        self.template_file = r.optional_path("template_file")
        self.key_file = r.path("key_file", f"{DEFAULT_STATE_DIR}/email.key")
        r.done()


class PromptsConfig:
    """The texts the user sees; the PAM line's prompt= overrides ``totp``."""

    __slots__ = ("totp", "email", "locked", "email_sent")

    def __init__(self, r: Reader):
        self.totp = _prompt(r, "totp", "Authentication code: ")
        self.email = _prompt(r, "email", "Email code: ")
        self.email_sent = _prompt(r, "email_sent", "A verification code was sent to {address}.")
        self.locked = _prompt(r, "locked", "Too many failed attempts; contact your administrator.")
        r.done()


def _prompt(r: Reader, key: str, default: str) -> str:
    value = r.string(key, default, max_len=200)
    if any(ord(c) < 32 for c in value):
        raise r.fail(key, "must not contain control characters")
    return value


class Config:
    """The whole main config. Build with ``load_config`` or ``Config.from_mapping``."""

    __slots__ = (
        "path", "enforce", "sources", "on_source_unavailable", "yaml", "ldap", "state",
        "totp", "lockout", "email", "smtp", "prompts", "exempt_networks", "grace_period",
        "recovery_codes", "cache_dir",
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
        self.exempt_networks = r.string_list("exempt_networks", [])
        self.grace_period = r.integer("grace_period", 0, minimum=0, maximum=30 * 86400)
        self.recovery_codes = r.integer("recovery_codes", 10, minimum=1, maximum=50)
        r.done()
        #: Not a config key: where this process may keep compiled caches (the PAM
        #: option cache_dir=); None (the CLI, tests) means read the YAML files directly.
        self.cache_dir: str | None = None

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
