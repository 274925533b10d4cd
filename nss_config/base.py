"""Per-extension 2FA settings and the contract every settings source keeps.

A source answers one of three things for a user name, like an NSS module:

* found            -> ``ExtensionSettings``
* not here         -> ``None`` (the chain asks the next source)
* could not ask    -> raises ``SourceUnavailable`` (the chain stops: fail closed)

``settings_from_mapping`` is the one validator of an entry, shared by the YAML
and LDAP sources so that both accept and refuse exactly the same entries.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from nss_config.errors import ConfigError


class SettingsSource(Protocol):
    """A place extension settings come from (YAML file, LDAP directory)."""

    name: str

    def lookup(self, user: str) -> ExtensionSettings | None:
        """Found / None for "not here" / raise SourceUnavailable."""
        ...


METHODS = ("totp", "email", "none")
ALGORITHMS = ("SHA1", "SHA256", "SHA512")
DIGITS = (6, 8)
ENTRY_KEYS = ("method", "enabled", "secret", "algorithm", "digits", "period", "email")
#: Keys only a YAML entry carries (LDAP has no attribute for them: a short secret there is refused).
YAML_ONLY_KEYS = ("legacy_short_secret",)
_KNOWN_KEYS = frozenset(ENTRY_KEYS + YAML_ONLY_KEYS)
#: RFC 4226 R6: a shared secret of at least 128 bits.
MIN_SECRET_BITS = 128
#: Shortest secret still accepted under ``legacy_short_secret`` (Google Authenticator's 80 bits).
MIN_LEGACY_SECRET_BITS = 80
#: Longest secret accepted: a key is hashed on every login, on linkusd's event loop, and a
#: 10 MB one blocked it for 1.4 s (issue 17.12). 1024 bits is twice the longest key RFC 6238
#: uses (64 bytes for SHA512) and far above what authenticator apps generate (160 bits).
MAX_SECRET_BITS = 1024
#: Longest secret text looked at: the key's base32 with a space or dash after every character.
_MAX_SECRET_TEXT = 2 * (MAX_SECRET_BITS // 5 + 1) + 16
MAX_USER_LEN = 256


class ExtensionSettings:
    """One extension's second-factor settings, as a source stated them.

    ``secret`` stays base32 text here; it is decoded only by the TOTP verifier.
    ``__repr__`` never shows it.
    """

    __slots__ = ("user", "method", "enabled", "secret", "algorithm", "digits", "period", "email", "source",
                 "account", "legacy_short_secret", "directory_groups")

    def __init__(
        self,
        user: str,
        method: str,
        *,
        enabled: bool = True,
        secret: str | None = None,
        algorithm: str = "SHA1",
        digits: int = 6,
        period: int = 30,
        email: str | None = None,
        source: str = "?",
        account: str | None = None,
        legacy_short_secret: bool = False,
        directory_groups: frozenset[str] | None = None,
    ):
        self.user = user
        #: The canonical name as the source holds it (YAML: the key as written;
        #: LDAP: the entry's uid value). All state is keyed by it, so name
        #: variants that the source matches to one entry share one record.
        self.account = user if account is None else account
        self.method = method
        self.enabled = enabled
        self.secret = secret
        self.algorithm = algorithm
        self.digits = digits
        self.period = period
        self.email = email
        self.source = source
        #: The secret is shorter than 128 bits and was accepted only because the entry
        #: says so (a migrated Google Authenticator key); doctor flags it until re-enrollment.
        self.legacy_short_secret = legacy_short_secret
        #: The DNs of the directory groups the entry is in (``ldap.group_attribute``, read in the
        #: same search); None when the source says nothing about groups (YAML) -- "unknown", never
        #: "none" (pam_linkus.groups turns them into names and matches rules).
        self.directory_groups = directory_groups

    @property
    def enrolled(self) -> bool:
        """True when this extension must give a second factor."""
        return self.enabled and self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for caches (compiled index, LDAP offline cache); groups as a sorted list."""
        data = {k: getattr(self, k) for k in self.__slots__}
        if self.directory_groups is not None:
            data["directory_groups"] = sorted(self.directory_groups)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtensionSettings:
        data = dict(data)
        if data.get("directory_groups") is not None:
            data["directory_groups"] = frozenset(data["directory_groups"])
        return cls(data.pop("user"), data.pop("method"), **data)

    def __repr__(self) -> str:
        return (
            f"ExtensionSettings({self.user!r}, method={self.method!r}, enabled={self.enabled}, "
            f"source={self.source!r}, secret={'<set>' if self.secret else None})"
        )

    def __eq__(self, other: object) -> bool:
        """The same second-factor settings; ``directory_groups`` is not a setting (it says what
        the directory knows about the account's groups, and only the LDAP source fills it)."""
        if not isinstance(other, ExtensionSettings):
            return False
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("directory_groups")
        theirs.pop("directory_groups")
        return mine == theirs

    __hash__ = None  # type: ignore[assignment]


_B32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def normalize_secret(text: str, *, allow_short: bool = False) -> str:
    """Upper-case base32 without spaces, dashes or padding; ValueError if not base32.

    Authenticator apps show secrets in groups ("JBSW Y3DP ..."), and people copy
    them with the spaces; both spellings mean the same key. At least 128 bits
    (RFC 4226 R6), at most ``MAX_SECRET_BITS``; ``allow_short`` (the entry's ``legacy_short_secret``) lets
    80..127-bit keys taken over from google-authenticator keep working.
    """
    too_long = f"secret is longer than {MAX_SECRET_BITS} bits"
    if len(text) > _MAX_SECRET_TEXT:
        raise ValueError(too_long)  # before any work on it
    cleaned = "".join(text.split()).replace("-", "").upper().rstrip("=")
    if not cleaned or not set(cleaned) <= _B32:
        raise ValueError("secret is not base32 (letters A-Z and digits 2-7)")
    if len(cleaned) % 8 in (1, 3, 6):
        # no whole number of bytes ends there: the TOTP code could never be computed, so refuse it
        # at load rather than let every login of the extension fail later
        raise ValueError("secret is not base32 (impossible length: a character is missing or extra)")
    bits = len(cleaned) * 5 // 8 * 8
    if bits > MAX_SECRET_BITS:
        raise ValueError(too_long)
    if bits < MIN_LEGACY_SECRET_BITS:
        raise ValueError(f"secret is shorter than {MIN_LEGACY_SECRET_BITS} bits")
    if bits < MIN_SECRET_BITS and not allow_short:
        raise ValueError(f"secret is shorter than {MIN_SECRET_BITS} bits (RFC 4226); enroll again, or mark a "
                         "migrated key with legacy_short_secret: true")
    return cleaned


_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~.-")
_EMAIL_DOMAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")


def check_email_address(address: str) -> None:
    """ValueError unless ``address`` is one plain ``local@domain`` (RFC 5321 lengths).

    No display name, comment, comma, space, CR/LF or quoting: the address goes into
    an SMTP envelope and a header, where any of those could add a recipient or a
    header. ASCII only (an internationalised domain in its xn-- form). The message
    never echoes the address.
    """
    if not 3 <= len(address) <= 254:
        raise ValueError("is not one plain address (length)")
    local, at, domain = address.partition("@")
    if not at or not local or not domain or "@" in domain or len(local) > 64:
        raise ValueError("is not one plain address local@domain")
    if not set(local) <= _EMAIL_LOCAL or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError("has characters that are not allowed in a plain address")
    labels = domain.split(".")
    if (not set(domain) <= _EMAIL_DOMAIN or len(labels) < 2
            or any(not label or len(label) > 63 or label[0] == "-" or label[-1] == "-" for label in labels)):
        raise ValueError("has a domain that is not a host name")


#: What ``check_user_name`` refuses anywhere in a name: C0, DEL, C1, U+2028/2029, surrogates.
#: One regex search instead of a loop over ``ord``: it runs for each of 100,000 keys of a
#: large extensions file (a quarter of its validation time) and on every login.
_BAD_NAME_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_user_name(user: str) -> None:
    """Refuse names no source should ever be asked about; ValueError (never echoing the name).

    Empty or huge; leading or trailing whitespace (a directory would ignore it and
    match another spelling of an account); control characters (C0, DEL, C1) and
    line or paragraph separators (log forging); surrogate escapes, i.e. bytes
    that were not UTF-8. The flow turns this into a denial before any lookup.
    """
    if not user or len(user) > MAX_USER_LEN or user != user.strip() or _BAD_NAME_CHAR.search(user):
        raise ValueError("invalid user name")


def settings_from_mapping(user: str, entry: Any, where: str, source: str,
                          account: str | None = None,
                          directory_groups: frozenset[str] | None = None) -> ExtensionSettings:
    """Validate one entry (YAML mapping or LDAP attributes mapped to our keys).

    Raises ConfigError naming ``where`` and known keys, never a value -- nor the
    extension's name or an unknown key: either could be a secret pasted in the
    wrong place, and ``where`` (file:line:col) already says which entry it is.
    """
    if not isinstance(entry, dict):
        raise ConfigError("extension: its settings must be a mapping", where)
    if not entry.keys() <= _KNOWN_KEYS:
        raise ConfigError(f"extension: unknown key (known: {', '.join(ENTRY_KEYS + YAML_ONLY_KEYS)})", where)
    method = entry.get("method")
    if method not in METHODS:
        raise ConfigError(f"extension: method must be one of {', '.join(METHODS)}", where)
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("extension: enabled must be true or false", where)
    algorithm = entry.get("algorithm", "SHA1")
    if not isinstance(algorithm, str) or algorithm.upper() not in ALGORITHMS:
        raise ConfigError(f"extension: algorithm must be one of {', '.join(ALGORITHMS)}", where)
    digits = entry.get("digits", 6)
    if isinstance(digits, bool) or digits not in DIGITS:
        raise ConfigError("extension: digits must be 6 or 8", where)
    period = entry.get("period", 30)
    if isinstance(period, bool) or not isinstance(period, int) or not 10 <= period <= 300:
        raise ConfigError("extension: period must be an integer from 10 to 300 seconds", where)
    legacy = entry.get("legacy_short_secret", False)
    if not isinstance(legacy, bool):
        raise ConfigError("extension: legacy_short_secret must be true or false", where)
    secret = entry.get("secret")
    if secret is not None:
        if not isinstance(secret, str):
            raise ConfigError("extension: secret must be a base32 string", where)
        try:
            secret = normalize_secret(secret, allow_short=legacy)
        except ValueError as exc:
            raise ConfigError(f"extension: {exc}", where) from None
    email = entry.get("email")
    if email is not None:
        if not isinstance(email, str):
            raise ConfigError("extension: email must be a string", where)
        try:
            check_email_address(email)
        except ValueError as exc:
            raise ConfigError(f"extension: email {exc}", where) from None
    if method == "totp" and enabled and not secret:
        raise ConfigError("extension: method totp needs a secret", where)
    if method == "email" and enabled and not email:
        raise ConfigError("extension: method email needs an email address", where)
    return ExtensionSettings(
        user,
        method,
        enabled=enabled,
        secret=secret,
        algorithm=algorithm.upper(),
        digits=digits,
        period=period,
        email=email,
        source=source,
        account=account,
        legacy_short_secret=legacy,
        directory_groups=directory_groups,
    )
