"""TOTP (RFC 6238) over HOTP (RFC 4226), implemented directly.

No I/O and no clock of its own: callers pass ``now`` (seconds since the epoch),
so tests inject time instead of patching it. The time step is computed here from
UNIX time, never through local time (pyotp <= 2.10 goes through local time and is
an hour off around DST changes).
"""

from __future__ import annotations

from _operator import _compare_digest as compare_digest

from pam_linkus.codes import normalize_code
from pam_linkus.errors import CodeRejected

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_VALUES = {c: i for i, c in enumerate(_B32_ALPHABET)}


def _digest(algorithm: str) -> tuple[Callable[[bytes], Any], int]:
    """The hash constructor and block size for ``algorithm``.

    Why not ``hashlib``/``hmac``: they load OpenSSL's libcrypto, several
    milliseconds in every login process (pam_python starts a fresh interpreter
    each time). CPython's builtin ``_sha1``/``_sha256``/``_sha512`` are the same
    hash functions, compiled in and free to import; HMAC over them is RFC 2104,
    checked against the RFC 4226/6238 vectors in the tests.
    """
    if algorithm == "SHA1":
        from _sha1 import sha1  # type: ignore[import-not-found]

        return sha1, 64  # type: ignore[no-any-return]
    if algorithm == "SHA256":
        from _sha256 import sha256  # type: ignore[import-not-found]

        return sha256, 64
    if algorithm == "SHA512":
        from _sha512 import sha512  # type: ignore[import-not-found]

        return sha512, 128
    raise ValueError(f"unknown algorithm {algorithm!r}")


def hmac_digest(key: bytes, message: bytes, algorithm: str) -> bytes:
    """RFC 2104 HMAC of ``message`` under ``key``."""
    new, block = _digest(algorithm)
    if len(key) > block:
        key = new(key).digest()
    key = key.ljust(block, b"\0")
    inner = new(bytes(b ^ 0x36 for b in key) + message).digest()
    return bytes(new(bytes(b ^ 0x5C for b in key) + inner).digest())


def decode_secret(secret: str) -> bytes:
    """Base32 text (spaces, dashes, lower case and missing padding allowed) to key bytes.

    Decoded here rather than by ``base64.b32decode``: ``base64`` imports ``re``,
    milliseconds per login.
    """
    cleaned = "".join(secret.split()).replace("-", "").upper().rstrip("=")
    if not cleaned or any(c not in _B32_VALUES for c in cleaned):
        raise ValueError("secret is not base32")
    if len(cleaned) % 8 in (1, 3, 6):
        raise ValueError("secret is not base32 (impossible length)")
    bits = 0
    for c in cleaned:
        bits = (bits << 5) | _B32_VALUES[c]
    nbits = 5 * len(cleaned)
    nbytes = nbits // 8
    return (bits >> (nbits - 8 * nbytes)).to_bytes(nbytes, "big")


def hotp(key: bytes, counter: int, *, digits: int = 6, algorithm: str = "SHA1") -> str:
    """RFC 4226 HOTP value of ``counter`` as a zero-padded decimal string."""
    if counter < 0:
        raise ValueError("counter must not be negative")
    mac = hmac_digest(key, counter.to_bytes(8, "big"), algorithm)
    offset = mac[-1] & 0x0F
    binary = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(binary % 10**digits).zfill(digits)


def time_step(now: float, period: int = 30, t0: int = 0) -> int:
    """RFC 6238 T = floor((unix time - T0) / X), from UNIX time only."""
    return int((now - t0) // period)


def totp(key: bytes, now: float, *, digits: int = 6, period: int = 30, algorithm: str = "SHA1") -> str:
    """The code an authenticator app shows at ``now``."""
    return hotp(key, time_step(now, period), digits=digits, algorithm=algorithm)


def match_totp(
    key: bytes,
    code: str,
    now: float,
    *,
    window: int = 1,
    period: int = 30,
    digits: int = 6,
    algorithm: str = "SHA1",
) -> int:
    """Return the time step ``code`` belongs to, within +-``window`` steps of ``now``.

    Raises CodeRejected for a malformed or wrong code. Every candidate step is
    computed and compared in constant time, whichever matches, so the response
    time does not tell which step (if any) was close.
    """
    normalized = normalize_code(code, digits)
    if normalized is None:
        raise CodeRejected("malformed code")
    current = time_step(now, period)
    matched = -1
    for step in range(current - window, current + window + 1):
        if step < 0:
            continue
        candidate = hotp(key, step, digits=digits, algorithm=algorithm)
        if compare_digest(candidate.encode(), normalized.encode()) and matched < 0:
            matched = step
    if matched < 0:
        raise CodeRejected("wrong code")
    return matched


def generate_secret(bits: int = 160) -> str:
    """A new random base32 secret (no padding); at least 128 bits as DESIGN.md asks."""
    import base64
    import secrets

    if bits < 128 or bits % 8:
        raise ValueError("a new secret has at least 128 bits, in whole bytes")
    return base64.b32encode(secrets.token_bytes(bits // 8)).decode().rstrip("=")


def provisioning_uri(
    secret: str,
    account: str,
    issuer: str,
    *,
    algorithm: str = "SHA1",
    digits: int = 6,
    period: int = 30,
) -> str:
    """The otpauth:// URI an authenticator app scans (Key Uri Format)."""
    from urllib.parse import quote, urlencode

    label = quote(f"{issuer}:{account}", safe="@:")
    params = {"secret": secret, "issuer": issuer, "algorithm": algorithm, "digits": digits, "period": period}
    return f"otpauth://totp/{label}?{urlencode(params, quote_via=quote)}"
