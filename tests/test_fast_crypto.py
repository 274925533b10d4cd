"""TOTP's HMAC and base32 without hashlib/hmac/base64 (pam_linkus.totp): same results.

The module computes HMAC over CPython's builtin _sha1/_sha256/_sha512 and decodes
base32 itself, because hashlib (OpenSSL) and base64 (re) cost milliseconds in
every login process. These tests hold it to the RFC vectors and to the stdlib.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random

import pytest

from pam_linkus.totp import decode_secret, hmac_digest, hotp, totp

# RFC 6238 appendix B: the seeds are ASCII "1234567890" repeated to the hash size.
SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
RFC6238 = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize(("when", "sha1", "sha256", "sha512"), RFC6238)
def test_rfc6238_vectors(when: int, sha1: str, sha256: str, sha512: str) -> None:
    for algorithm, expected in (("SHA1", sha1), ("SHA256", sha256), ("SHA512", sha512)):
        assert totp(SEEDS[algorithm], when, digits=8, algorithm=algorithm) == expected


def test_rfc4226_vectors() -> None:
    expected = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]
    assert [hotp(SEEDS["SHA1"], i) for i in range(10)] == expected


@pytest.mark.parametrize(("algorithm", "reference"),
                         [("SHA1", hashlib.sha1), ("SHA256", hashlib.sha256), ("SHA512", hashlib.sha512)])
def test_hmac_matches_the_stdlib(algorithm: str, reference: object) -> None:
    rng = random.Random(6238)
    for key_len in (0, 1, 10, 20, 63, 64, 65, 127, 128, 129, 300):
        key = rng.randbytes(key_len)
        message = rng.randbytes(rng.randrange(0, 200))
        assert hmac_digest(key, message, algorithm) == hmac.new(key, message, reference).digest()  # type: ignore[arg-type]


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        hmac_digest(b"k", b"m", "MD5")


def test_base32_matches_the_stdlib() -> None:
    rng = random.Random(4648)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for length in range(1, 90):
        text = "".join(rng.choice(alphabet) for _ in range(length))
        try:
            expected: bytes | None = base64.b32decode(text + "=" * (-len(text) % 8))
        except ValueError:
            expected = None
        try:
            got: bytes | None = decode_secret(text)
        except ValueError:
            got = None
        assert got == expected, text


@pytest.mark.parametrize("text", ["", "JBSWY3DP!", "JBSWY3D0", "JBSWY3DPE", "ÄBSWY3DP", "JBSW\u0663Y3DP"])
def test_base32_refuses_what_is_not_base32(text: str) -> None:
    with pytest.raises(ValueError):
        decode_secret(text)


def test_base32_accepts_how_apps_show_secrets() -> None:
    assert decode_secret("jbsw y3dp-ehpk 3pxp") == base64.b32decode("JBSWY3DPEHPK3PXP")
    assert decode_secret("JBSWY3DPEHPK3PXP====") == base64.b32decode("JBSWY3DPEHPK3PXP")
