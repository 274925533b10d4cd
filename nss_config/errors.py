"""The root of pam-linkus's exception tree and the two errors the sources raise.

Declared here, at the bottom, so that ``nss_config`` imports nothing above it; the
whole tree (with Denied, Locked, StateUnavailable, ...) is drawn and completed in
``pam_linkus.errors``, which re-exports these four: code above the sources imports
every error from there. A source's "could not ask" and a bad file are both
``unavailable``: fail closed.
"""

from __future__ import annotations

#: ``pam_linkus.outcome.Outcome.UNAVAILABLE``, spelt out: the outcome module sits above
#: this package (tests/test_layers.py checks that the two stay the same word).
UNAVAILABLE = "unavailable"


class LinkusError(Exception):
    """Root of the tree; ``outcome`` decides the PAM code."""

    outcome: str = UNAVAILABLE

    @property
    def reason(self) -> str:
        """One-line reason for the log (the exception's message)."""
        return str(self) or type(self).__name__


class Unavailable(LinkusError):
    """Something needed to decide could not be asked: fail closed."""

    outcome = UNAVAILABLE


class ConfigError(Unavailable):
    """An option, a config file or its permissions are wrong.

    ``where`` is ``file:line:column`` (or the option name) when known.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class SourceUnavailable(Unavailable):
    """A settings source (YAML file, LDAP directory) could not answer."""
