"""The TOTP verifier against the RFC test vectors, kept as data (as pyotp does)."""

from __future__ import annotations

import base64

import pytest

from pam_linkus.errors import CodeRejected
from pam_linkus.totp import (
    clock_skew_steps,
    decode_secret,
    generate_secret,
    hotp,
    match_totp,
    provisioning_uri,
    time_step,
    totp,
)

RFC4226_SECRET = b"12345678901234567890"
#: RFC 4226 Appendix D: HOTP values for counters 0..9.
RFC4226_VECTORS = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]

RFC6238_SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
#: RFC 6238 Appendix B: (time, algorithm, 8-digit TOTP).
RFC6238_VECTORS = [
    (59, "SHA1", "94287082"), (59, "SHA256", "46119246"), (59, "SHA512", "90693936"),
    (1111111109, "SHA1", "07081804"), (1111111109, "SHA256", "68084774"), (1111111109, "SHA512", "25091201"),
    (1111111111, "SHA1", "14050471"), (1111111111, "SHA256", "67062674"), (1111111111, "SHA512", "99943326"),
    (1234567890, "SHA1", "89005924"), (1234567890, "SHA256", "91819424"), (1234567890, "SHA512", "93441116"),
    (2000000000, "SHA1", "69279037"), (2000000000, "SHA256", "90698825"), (2000000000, "SHA512", "38618901"),
    (20000000000, "SHA1", "65353130"), (20000000000, "SHA256", "77737706"), (20000000000, "SHA512", "47863826"),
]


@pytest.mark.parametrize(("counter", "expected"), list(enumerate(RFC4226_VECTORS)))
def test_rfc4226_appendix_d(counter: int, expected: str) -> None:
    assert hotp(RFC4226_SECRET, counter) == expected


@pytest.mark.parametrize(("when", "algorithm", "expected"), RFC6238_VECTORS)
def test_rfc6238_appendix_b(when: int, algorithm: str, expected: str) -> None:
    key = RFC6238_SEEDS[algorithm]
    assert totp(key, when, digits=8, algorithm=algorithm) == expected
    assert match_totp(key, expected, when, window=0, digits=8, algorithm=algorithm) == when // 30


def test_time_step_uses_unix_time_only() -> None:
    # 2026-03-29 01:30 UTC is inside the EU DST change; local time must not matter.
    assert time_step(1774747800.0) == 1774747800 // 30
    assert time_step(29.999) == 0 and time_step(30.0) == 1


def test_window_accepts_previous_and_next_step_only() -> None:
    key = RFC6238_SEEDS["SHA1"]
    now = 1_700_000_000.0
    step = time_step(now)
    for offset in (-1, 0, 1):
        assert match_totp(key, totp(key, now + 30 * offset), now, window=1) == step + offset
    for offset in (-2, 2):
        with pytest.raises(CodeRejected):
            match_totp(key, totp(key, now + 30 * offset), now, window=1)
    with pytest.raises(CodeRejected):
        match_totp(key, totp(key, now + 30), now, window=0)


@pytest.mark.parametrize(
    "answer",
    [
        "", "12345", "1234567", "12345a", "+12345", "-12345", "12_345", "123456\n", "9" * 1000,
        "\u0661\u0662\u0663\u0664\u0665\u0666",  # Arabic-Indic digits
        "\uff11\uff12\uff13\uff14\uff15\uff16",  # full-width digits
    ],
)
def test_malformed_codes_are_wrong_codes(answer: str) -> None:
    with pytest.raises(CodeRejected, match="malformed"):
        match_totp(RFC6238_SEEDS["SHA1"], answer, 59.0)


def test_spaces_in_the_code_are_ignored() -> None:
    key = RFC6238_SEEDS["SHA1"]
    code = totp(key, 1_700_000_000)
    assert match_totp(key, f"{code[:3]} {code[3:]}", 1_700_000_000) == time_step(1_700_000_000)


def test_secret_decoding_accepts_app_spellings() -> None:
    raw = b"\x01" * 20
    text = base64.b32encode(raw).decode()
    assert decode_secret(text) == raw
    assert decode_secret(" ".join(text[i : i + 4] for i in range(0, len(text), 4)).lower()) == raw
    with pytest.raises(ValueError, match="base32"):
        decode_secret("not-base32-0189")


def test_new_secrets_have_160_bits_and_refuse_weak_sizes() -> None:
    secret = generate_secret()
    assert len(decode_secret(secret)) == 20
    assert secret != generate_secret()
    with pytest.raises(ValueError):
        generate_secret(64)


def test_provisioning_uri_names_issuer_and_parameters() -> None:
    uri = provisioning_uri("JBSWY3DPEHPK3PXP", "1001", "PBX Main")
    assert uri.startswith("otpauth://totp/PBX%20Main:1001?")
    assert "secret=JBSWY3DPEHPK3PXP" in uri and "issuer=PBX%20Main" in uri
    assert "algorithm=SHA1" in uri and "digits=6" in uri and "period=30" in uri


def test_issuer_with_a_colon_is_percent_encoded() -> None:
    from urllib.parse import parse_qs, unquote, urlsplit

    uri = provisioning_uri("JBSWY3DPEHPK3PXP", "1001", "PBX: Main & Co")
    parts = urlsplit(uri)
    label = parts.path.lstrip("/").removeprefix("totp/")
    assert label.count(":") == 1 and label == "PBX%3A%20Main%20%26%20Co:1001"
    issuer, account = (unquote(p) for p in label.split(":"))
    assert (issuer, account) == ("PBX: Main & Co", "1001")
    assert "issuer=PBX%3A%20Main%20%26%20Co" in parts.query
    assert parse_qs(parts.query)["issuer"] == ["PBX: Main & Co"]


@pytest.mark.parametrize("offset", [-10, -5, -2, 2, 3, 7, 10])
def test_clock_skew_steps_reports_codes_just_outside_the_window(offset: int) -> None:
    key = RFC6238_SEEDS["SHA1"]
    now = 1_700_000_000.0
    code = totp(key, now + 30 * offset)
    with pytest.raises(CodeRejected):
        match_totp(key, code, now, window=1)
    assert clock_skew_steps(key, code, now, window=1) == offset


def test_clock_skew_steps_is_none_inside_the_window_far_away_or_malformed() -> None:
    key = RFC6238_SEEDS["SHA1"]
    now = 1_700_000_000.0
    assert clock_skew_steps(key, totp(key, now + 30), now, window=1) is None  # matched: not skew
    far = totp(key, now + 30 * 11)
    nearby = {totp(key, now + 30 * d) for d in range(-10, 11)}
    assert far not in nearby and clock_skew_steps(key, far, now, window=1) is None
    assert clock_skew_steps(key, "12ab56", now) is None
    assert clock_skew_steps(key, totp(key, now - 30 * 8), now, window=1, search=5) is None
