"""State stores: SQLite (default, one host) and Redis (a cluster of hosts).

``open_store`` imports the Redis backend only when it is configured, so a SQLite
host needs no python3-redis. One store serves all of linkusd's worker threads (see each
backend's docstring for how); the contract is in ``state.base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pam_linkus.state.sqlite_store import SqliteStore

if TYPE_CHECKING:
    from pam_linkus.config import StateConfig
    from pam_linkus.state.base import StateStore


def open_store(config: StateConfig) -> StateStore:
    """Open the configured store; failures raise StateUnavailable."""
    if config.backend == "redis":
        from pam_linkus.state.redis_store import RedisStore  # optional: redis-py, only with Redis state

        return RedisStore(config.redis)
    return SqliteStore(config.path)
