"""A source's recent answers, kept in memory for a bounded age (``ldap.cache_ttl``).

Why: a login that asks the directory pays its round trip (0.7 ms on loopback, 20 ms
and more for a directory across a WAN) and linkusd's CPU for the search; SSSD answers
most lookups from a cache with a bounded age (``entry_cache_timeout``), and so do we.

The rules, each a security trade-off the admin chooses (docs/guide.md, "LDAP directory", its "Recent answers"):

* An answer is kept from the moment the question was *asked*, not answered, so a
  change made in the directory while the search ran is seen within the age too.
* "Enrolled" answers live ``ttl`` seconds; "not here" and "found but not enrolled"
  (2FA off, no secret yet) live ``negative_ttl`` seconds -- under ``enforce:
  enrolled`` such an answer lets the password alone in, so it gets its own, short,
  age (default 0: never kept).
* No entry outlives its age, for any reason: an expired entry is asked again, and a
  directory that is down then makes the login unavailable (or the separate,
  off-by-default offline cache in the state store answers: ``cache_max_age``).
  Errors ("could not ask", an invalid entry) are never kept.
* ``clear`` drops everything at once (a change made through linkusd); a search that
  was running while it happened does not put its (possibly older) answer back.
* At most ``size`` answers are kept; the oldest goes first.

The clock is ``time.monotonic`` (injected in tests): a wall clock set back must not
make an entry live longer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from nss_config.base import ExtensionSettings


class NotCached:
    """The type of ``NOT_CACHED``: "no answer in memory; asking would wait for a server"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_CACHED"


#: What ``AnswerCache.get`` and ``SourceChain.recall`` return when only a server can answer.
NOT_CACHED: Final = NotCached()


class AnswerCache:
    """Answers by the name as asked, each with its expiry; thread-safe (linkusd's workers share it)."""

    __slots__ = ("ttl", "negative_ttl", "size", "_ticks", "_entries", "_lock", "_generation")

    def __init__(self, ttl: float, negative_ttl: float, size: int, *,
                 ticks: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.size = size
        self._ticks = ticks
        # insertion order is expiry-ish order: a refreshed name is removed and appended
        # (expiry, settings, the entry's group DNs as read in the same search, or None: not known)
        self._entries: dict[str, tuple[float, ExtensionSettings | None, frozenset[str] | None]] = {}
        self._lock = threading.Lock()
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and (self.ttl > 0 or self.negative_ttl > 0)

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._ticks()

    def generation(self) -> int:
        """Taken before a search; ``put`` drops the answer if ``clear`` ran since."""
        return self._generation

    def get(self, user: str) -> ExtensionSettings | NotCached | None:
        """The answer kept for ``user`` if it is younger than its age, else NOT_CACHED."""
        kept = self.get_account(user)
        return kept if isinstance(kept, NotCached) else kept[0]

    def get_account(self, user: str) -> tuple[ExtensionSettings | None, frozenset[str] | None] | NotCached:
        """The answer and the group DNs kept with it (``LdapSource.lookup_account``), or NOT_CACHED."""
        entry = self._entries.get(user)  # a dict read is atomic; expiry is checked on every read
        if entry is None:
            return NOT_CACHED
        if self._ticks() >= entry[0]:
            with self._lock:
                if self._entries.get(user) is entry:
                    del self._entries[user]
            return NOT_CACHED
        return entry[1], entry[2]

    def put(self, user: str, answer: ExtensionSettings | None, asked_at: float, generation: int,
            groups: frozenset[str] | None = None) -> None:
        """Keep ``answer`` (and its entry's ``groups``), asked at ``asked_at`` (this cache's clock),
        unless ``clear`` ran since. Groups live exactly as long as the answer they came with."""
        age = self.ttl if answer is not None and answer.enrolled else self.negative_ttl
        if age <= 0 or self.size <= 0:
            return
        expires = asked_at + age
        with self._lock:
            if generation != self._generation or self._ticks() >= expires:
                return
            self._entries.pop(user, None)
            while len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[user] = (expires, answer, groups)

    def clear(self) -> None:
        """Forget every answer (a change made through linkusd: seen by the very next login)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
