"""Reading google-authenticator-libpam secret files (``~/.google_authenticator``).

The migration path from the most common peer module: ``linkus-2fa import-google``
takes the secret (the user keeps the account in their app, the codes stay the
same), the step size, the steps already used (so a code used with the old module
cannot be replayed with this one) and the scratch codes, which become recovery
codes. HOTP (counter-based) files are refused: pam-linkus does TOTP only.

File format (google-authenticator-libpam, ``google-authenticator(1)``)::

    JBSWY3DPEHPK3PXP              first line: the base32 secret
    " RATE_LIMIT 3 30 1700000000  option lines start with a double quote
    " WINDOW_SIZE 17
    " DISALLOW_REUSE 56666666     steps already used (when reuse is disallowed)
    " TOTP_AUTH                   (or " HOTP_COUNTER n)
    12345678                      8-digit scratch codes, one per line
"""

from __future__ import annotations

import os
import stat

from nss_config.base import normalize_secret
from pam_linkus.errors import ConfigError

MAX_BYTES = 64 * 1024


class GoogleAuthenticatorFile:
    """What an import takes from the file (``__repr__`` hides secret and codes)."""

    __slots__ = ("secret", "period", "scratch_codes", "used_step", "window_size")

    def __init__(self, secret: str, period: int, scratch_codes: list[str], used_step: int | None,
                 window_size: int | None):
        self.secret = secret
        self.period = period
        self.scratch_codes = scratch_codes
        self.used_step = used_step
        self.window_size = window_size

    def __repr__(self) -> str:
        return f"GoogleAuthenticatorFile(period={self.period}, scratch_codes={len(self.scratch_codes)})"


def read_file(path: str) -> GoogleAuthenticatorFile:
    """Read a user's file without following symlinks (it lives in the user's home)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open: {exc.strerror}", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("is not a regular file", path)
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError("is too large for a google-authenticator file", path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError("is not a google-authenticator file (not ASCII)", path) from None
    return parse(text, path)


def parse(text: str, path: str = "<google-authenticator file>") -> GoogleAuthenticatorFile:
    lines = text.splitlines()
    if not lines:
        raise ConfigError("is empty", path)
    try:
        secret = normalize_secret(lines[0], allow_short=True)  # import-google marks short keys legacy_short_secret
    except ValueError as exc:
        raise ConfigError(f"line 1: {exc}", path) from None
    period, used, window, totp_mode = 30, None, None, False
    scratch: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        if line.startswith('"'):
            words = line[1:].split()
            if not words:
                continue
            option, values = words[0], words[1:]
            if option == "HOTP_COUNTER":
                raise ConfigError("is set up for counter-based (HOTP) codes; pam-linkus does time-based "
                                  "codes only: enroll the extension anew", path)
            if option == "TOTP_AUTH":
                totp_mode = True
            elif option == "STEP_SIZE" and values and values[0].isdigit():
                period = int(values[0])
            elif option == "WINDOW_SIZE" and values and values[0].isdigit():
                window = int(values[0])
            elif option == "DISALLOW_REUSE":
                steps = [int(v) for v in values if v.isdigit()]
                if steps:
                    used = max(steps)
        elif line.strip():
            code = line.strip()
            if not (code.isascii() and code.isdigit() and len(code) == 8):
                raise ConfigError(f"line {number}: not a scratch code (8 digits)", path)
            scratch.append(code)
    if not totp_mode:
        raise ConfigError("has no TOTP_AUTH line; only time-based files can be imported", path)
    if not 10 <= period <= 300:
        raise ConfigError(f"STEP_SIZE {period} is outside 10..300 seconds", path)
    return GoogleAuthenticatorFile(secret, period, scratch, used, window)
