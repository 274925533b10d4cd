"""The six outcomes a login can end in (README.md, "Troubleshooting", has the table).

Plain string constants: they are the words the log line prints and the names
``protocol.OUTCOME_CODES`` turns into the OUTCOME byte; pam_linkus.so maps that
byte to a PAM code (``map_outcome`` in native/pam_linkus.c), the one place a
PAM code is chosen.
"""

from __future__ import annotations


class Outcome:
    """Namespace of outcome names; values are what the syslog line prints."""

    SUCCESS = "success"
    SKIP = "skip"
    DENIED = "denied"
    LOCKED = "locked"
    UNAVAILABLE = "unavailable"
    CONVERSATION = "conversation"

    ALL = (SUCCESS, SKIP, DENIED, LOCKED, UNAVAILABLE, CONVERSATION)


class Decision:
    """How a login that did not raise ended: success or skip, with the reason."""

    __slots__ = ("outcome", "reason", "method")

    def __init__(self, outcome: str, reason: str, method: str = "-"):
        if outcome not in (Outcome.SUCCESS, Outcome.SKIP):
            raise ValueError(f"a Decision is success or skip, not {outcome!r}")
        self.outcome = outcome
        self.reason = reason
        self.method = method

    def __repr__(self) -> str:
        return f"Decision({self.outcome!r}, {self.reason!r}, method={self.method!r})"
