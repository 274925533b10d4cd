"""The one exception tree of pam-linkus.

Every failure that decides a login is one of these; its ``outcome`` is what linkusd
sends (``protocol.OUTCOME_CODES``), and pam_linkus.so maps that to a PAM code in
exactly one place (``map_outcome`` in native/pam_linkus.c). Lower-layer errors
(sqlite3, ldap3, redis, smtplib, OSError, yaml) are translated into this tree at
the boundary of the component that met them, never further up.

::

    LinkusError                      outcome
    +-- Denied                       denied        PAM_AUTH_ERR
    |   +-- CodeRejected             wrong / replayed / expired / malformed code
    |   +-- NotEnrolled              enforce: all and the extension has no 2FA
    |   +-- CodeThrottled            no email code may be sent yet and none is pending
    +-- Locked                       locked        PAM_MAXTRIES
    +-- Unavailable                  unavailable   PAM_AUTHINFO_UNAVAIL
    |   +-- ConfigError              bad option, bad or insecure file
    |   +-- SourceUnavailable        a settings source could not be asked
    |   +-- StateUnavailable         the state store could not be asked
    |   +-- MailUnavailable          SMTP down, refused, TLS failure
    +-- ConversationFailed           conversation  PAM_CONV_ERR

Messages are written for the syslog line and the CLI: they say what is wrong and
where, and never carry a code, a secret or a password.

LinkusError, Unavailable, ConfigError and SourceUnavailable are declared in
``nss_config.errors`` (the settings sources raise them, and that package imports
nothing above it); they are the same classes here, so import every error from this
module.
"""

from __future__ import annotations

from nss_config.errors import ConfigError, LinkusError, SourceUnavailable, Unavailable
from pam_linkus.outcome import Outcome

__all__ = [
    "CodeRejected", "CodeThrottled", "ConfigError", "ConversationFailed", "Denied", "LinkusError", "Locked",
    "MailUnavailable", "NotEnrolled", "SourceUnavailable", "StateUnavailable", "Unavailable",
]


class Denied(LinkusError):
    """The login is refused: the user did not prove the second factor."""

    outcome = Outcome.DENIED


class CodeRejected(Denied):
    """The code was wrong, replayed, expired or not a code at all."""


class NotEnrolled(Denied):
    """The extension has no second factor and the policy requires one."""


class CodeThrottled(Denied):
    """No new email code may be sent yet (send throttles) and no earlier one is usable.

    A denial, not "unavailable": nothing is broken, the person has to wait
    ``retry_after`` seconds (a login right after another one, a second Send).
    """

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Locked(LinkusError):
    """Too many consecutive failures; an admin unlock or the lock's expiry ends it."""

    outcome = Outcome.LOCKED

    def __init__(self, message: str = "extension is locked", locked_until: float | None = None, *,
                 newly: bool = False):
        super().__init__(message)
        self.locked_until = locked_until
        #: This attempt's failure set the lock (the owner is told once, not at every refused try).
        self.newly = newly


class StateUnavailable(Unavailable):
    """The state store (SQLite, Redis) could not be read or written."""


class MailUnavailable(Unavailable):
    """The code could not be handed to the SMTP server."""


class ConversationFailed(LinkusError):
    """The client hung up or gave no answer to a prompt."""

    outcome = Outcome.CONVERSATION
