"""The two ways a linkus-web page ends early, shared by the Security Settings pages and the gate."""

from __future__ import annotations


class Unreachable(Exception):
    """linkusd could not be asked (absent, too slow, garbage): the "unavailable" page."""


class Refused(Exception):
    """A request this process refuses itself (a bad form, a missing session); ``word`` as linkusd's."""

    def __init__(self, word: str):
        super().__init__(word)
        self.word = word
