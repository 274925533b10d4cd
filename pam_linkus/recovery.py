"""Single-use recovery (backup) codes: made by ``linkus-2fa recovery-codes``, typed at
the code prompt in place of a TOTP or email code when the phone is gone.

Why scrypt with a per-extension salt: a stolen state file (or Redis dump) must not
give the codes back. Recovery codes are short enough to type (new ones carry 50
bits, imported google-authenticator scratch codes only ~26), so a fast hash would
be brute-forced offline in seconds; scrypt makes each guess cost ~16 MiB and tens
of milliseconds. One salt per extension (not per code) means a login computes one
hash, not one per stored code. The store compares digests in constant time.

No I/O here: the flow and the CLI hand digests to the state store.
"""

from __future__ import annotations

import hashlib
import secrets

#: Alphabet of new codes: base32's lower case (no 0/1/8/9, so no O/0 or l/1 confusion).
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
CODE_LENGTH = 10
#: What an answer may look like to be tried as a recovery code (after removing spaces and dashes).
MIN_LENGTH, MAX_LENGTH = 8, 16
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")

# scrypt cost: N=2**14, r=8 -> 16 MiB and ~40 ms per hash on a small PBX host.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 14, 8, 1


def normalize_recovery_code(raw: str | bytes | None) -> str | None:
    """Lower-case ASCII letters and digits without spaces or dashes, or None if the
    answer cannot be a recovery code (so no hash is computed for a typo'd TOTP code).

    Non-ASCII input is refused before ``lower``: the Kelvin sign lower-cases to
    an ASCII ``k``; invalid UTF-8 (bytes, or surrogate escapes) is no code either.
    """
    if raw is None or len(raw) > 64 or not raw.isascii():
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii")
    code = raw.replace(" ", "").replace("-", "").lower()
    if not MIN_LENGTH <= len(code) <= MAX_LENGTH or not set(code) <= _ALLOWED:
        return None
    return code


#: The salt of the hash spent for a name that has no recovery codes (unknown, not enrolled, or
#: enrolled without codes), so a recovery-shaped answer costs every name the same scrypt work
#: and the time does not tell which names hold codes (tester 3). Its digest is never compared.
DUMMY_SALT = "00" * 16


def new_salt() -> str:
    return secrets.token_hex(16)


def digest(code: str, salt: str) -> str:
    """scrypt digest (hex) of a normalised code under the extension's salt."""
    return hashlib.scrypt(
        code.encode("ascii"), salt=bytes.fromhex(salt), n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
        maxmem=64 << 20, dklen=32,
    ).hex()


def generate_codes(count: int) -> list[str]:
    """``count`` new distinct codes, shown to the admin as ``abcde-fghij``."""
    codes: list[str] = []
    while len(codes) < count:
        code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        if code not in codes:
            codes.append(code)
    return codes


def display(code: str) -> str:
    """How a code is printed: two groups of five for a new code, as is for imported ones."""
    return f"{code[:5]}-{code[5:]}" if len(code) == CODE_LENGTH and not code.isdigit() else code
