"""The six outcomes a login can end in (shared/DESIGN.md, "Outcomes").

Plain string constants rather than an Enum: this module is imported on every
login, and ``enum`` is not free to import inside pam_python's interpreter.
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


#: The one table from outcome to PAM return code name (an attribute of pamh).
PAM_CODE_NAMES = {
    Outcome.SUCCESS: "PAM_SUCCESS",
    Outcome.SKIP: "PAM_IGNORE",
    Outcome.DENIED: "PAM_AUTH_ERR",
    Outcome.LOCKED: "PAM_MAXTRIES",
    Outcome.UNAVAILABLE: "PAM_AUTHINFO_UNAVAIL",
    Outcome.CONVERSATION: "PAM_CONV_ERR",
}


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
