"""What counts as a code typed by a user.

Only ASCII digits, after removing spaces ("123 456" is how apps show codes).
Everything else -- Unicode digits such as Arabic-Indic or full-width ones (which
``str.isdigit`` and ``int`` accept!), signs, underscores (which ``int`` accepts),
newlines, overlong input, bytes that are not ASCII (invalid UTF-8 as it
arrives from a socket, or its surrogate escapes in a ``str``) -- is a wrong
code, never an error.
"""

from __future__ import annotations

#: Longest answer we look at; anything longer is wrong without further work.
MAX_INPUT = 64
_ASCII_DIGITS = frozenset("0123456789")


def normalize_code(raw: str | bytes | None, digits: int) -> str | None:
    """Return exactly ``digits`` ASCII digits, or None if ``raw`` is not such a code."""
    if raw is None or len(raw) > MAX_INPUT:
        return None
    if isinstance(raw, bytes):
        if not raw.isascii():
            return None
        raw = raw.decode("ascii")
    code = raw.replace(" ", "")
    if len(code) != digits or not set(code) <= _ASCII_DIGITS:
        return None
    return code
