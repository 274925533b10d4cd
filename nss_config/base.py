"""Per-extension 2FA settings and the contract every settings source keeps.

A source answers one of three things for a user name, like an NSS module:

* found            -> ``ExtensionSettings``
* not here         -> ``None`` (the chain asks the next source)
* could not ask    -> raises ``SourceUnavailable`` (the chain stops: fail closed)

``settings_from_mapping`` is the one validator of an entry, shared by the YAML
and LDAP sources so that both accept and refuse exactly the same entries.
"""

from __future__ import annotations

from pam_linkus.errors import ConfigError

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from typing import Any, Protocol

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
MAX_USER_LEN = 256


class ExtensionSettings:
    """One extension's second-factor settings, as a source stated them.

    ``secret`` stays base32 text here; it is decoded only by the TOTP verifier.
    ``__repr__`` never shows it.
    """

    __slots__ = ("user", "method", "enabled", "secret", "algorithm", "digits", "period", "email", "source",
                 "account")

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

    @property
    def enrolled(self) -> bool:
        """True when this extension must give a second factor."""
        return self.enabled and self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for caches (compiled index, LDAP offline cache)."""
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtensionSettings:
        data = dict(data)
        return cls(data.pop("user"), data.pop("method"), **data)

    def __repr__(self) -> str:
        return (
            f"ExtensionSettings({self.user!r}, method={self.method!r}, enabled={self.enabled}, "
            f"source={self.source!r}, secret={'<set>' if self.secret else None})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExtensionSettings) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


_B32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def normalize_secret(text: str) -> str:
    """Upper-case base32 without spaces, dashes or padding; ValueError if not base32.

    Authenticator apps show secrets in groups ("JBSW Y3DP ..."), and people copy
    them with the spaces; both spellings mean the same key.
    """
    cleaned = "".join(text.split()).replace("-", "").upper().rstrip("=")
    if not cleaned or not set(cleaned) <= _B32:
        raise ValueError("secret is not base32 (letters A-Z and digits 2-7)")
    if len(cleaned) * 5 < 80:
        raise ValueError("secret is shorter than 80 bits")
    return cleaned


def check_user_name(user: str) -> None:
    """Refuse names no source should ever be asked about; ValueError (never echoing the name).

    Empty or huge; leading or trailing whitespace (a directory would ignore it and
    match another spelling of an account); control characters (C0, DEL, C1) and
    line or paragraph separators (log forging); surrogate escapes, i.e. bytes
    that were not UTF-8. The flow turns this into a denial before any lookup.
    """
    if not user or len(user) > MAX_USER_LEN or user != user.strip():
        raise ValueError("invalid user name")
    for c in user:
        code = ord(c)
        if code < 32 or 127 <= code < 160 or code in (0x2028, 0x2029) or 0xD800 <= code <= 0xDFFF:
            raise ValueError("invalid user name")


def settings_from_mapping(user: str, entry: Any, where: str, source: str,
                          account: str | None = None) -> ExtensionSettings:
    """Validate one entry (YAML mapping or LDAP attributes mapped to our keys).

    Raises ConfigError naming ``where`` and the key, never a value.
    """
    if not isinstance(entry, dict):
        raise ConfigError("an extension's settings must be a mapping", where)
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError("unknown key in an extension's settings (expected: " + ", ".join(ENTRY_KEYS) + ")", where)
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
    secret = entry.get("secret")
    if secret is not None:
        if not isinstance(secret, str):
            raise ConfigError("extension: secret must be a base32 string", where)
        try:
            secret = normalize_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"extension: {exc}", where) from None
    email = entry.get("email")
    if email is not None and not isinstance(email, str):
        raise ConfigError("extension: email must be a string", where)
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
    )
