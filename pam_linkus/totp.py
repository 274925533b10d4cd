"""TOTP (RFC 6238) over HOTP (RFC 4226), implemented directly.

No I/O and no clock of its own: callers pass ``now`` (seconds since the epoch),
so tests inject time instead of patching it. HMAC is the standard library's
(``hmac.digest``).
The time step is computed from UNIX time, never through local time (pyotp <= 2.10
goes through local time and is an hour off around DST changes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from urllib.parse import quote, urlencode

from pam_linkus.codes import normalize_code
from pam_linkus.errors import CodeRejected

_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_VALUES = {c: i for i, c in enumerate(_B32_ALPHABET)}
_ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
#: How far outside the window ``clock_skew_steps`` looks (10 steps: 5 minutes at 30 s).
SKEW_SEARCH_STEPS = 10


def hmac_digest(key: bytes, message: bytes, algorithm: str) -> bytes:
    """RFC 2104 HMAC of ``message`` under ``key`` with SHA1, SHA256 or SHA512."""
    try:
        name = _ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError("unknown algorithm") from None
    return hmac.digest(key, message, getattr(hashlib, name))


def decode_secret(secret: str) -> bytes:
    """Base32 text (spaces, dashes, lower case and missing padding allowed) to key bytes."""
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
        if hmac.compare_digest(candidate.encode(), normalized.encode()) and matched < 0:
            matched = step
    if matched < 0:
        raise CodeRejected("wrong code")
    return matched


def clock_skew_steps(
    key: bytes,
    code: str,
    now: float,
    *,
    window: int = 1,
    period: int = 30,
    digits: int = 6,
    algorithm: str = "SHA1",
    search: int = SKEW_SEARCH_STEPS,
) -> int | None:
    """For a code ``match_totp`` refused: how many steps off the clock seems to be.

    Looks at the steps just outside the window (``window + 1`` to ``search`` steps
    either side of ``now``) and returns the signed offset of the nearest one the
    code belongs to (negative: the app's clock is behind the host's), or None.
    The login is still denied; the caller only logs "clock off by about N steps",
    so a host whose clock drifted is found before everyone is locked out. A random
    wrong code matches one of these ~2*search steps with probability ~2*search/10**digits,
    so one such line is a hint, many for many extensions a diagnosis.
    """
    normalized = normalize_code(code, digits)
    if normalized is None:
        return None
    current = time_step(now, period)
    for distance in range(window + 1, search + 1):
        for offset in (-distance, distance):
            step = current + offset
            if step >= 0 and hmac.compare_digest(hotp(key, step, digits=digits, algorithm=algorithm).encode(),
                                                 normalized.encode()):
                return offset
    return None


def generate_secret(bits: int = 160) -> str:
    """A new random base32 secret (no padding); at least 128 bits as DESIGN.md asks."""
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
    # The label is "issuer:account" with one literal colon; a colon inside the issuer
    # (or the account) is percent-encoded, or apps would split the label there.
    label = f"{quote(issuer, safe='@')}:{quote(account, safe='@')}"
    params = {"secret": secret, "issuer": issuer, "algorithm": algorithm, "digits": digits, "period": period}
    return f"otpauth://totp/{label}?{urlencode(params, quote_via=quote, safe='')}"
