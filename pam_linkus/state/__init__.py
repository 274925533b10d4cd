"""State stores: SQLite (default, one host) and Redis (a cluster of hosts).

``open_store`` imports only the configured backend: ``redis`` is never imported
on a host that keeps its state in SQLite, nor ``sqlite3`` on a Redis host.
"""

from __future__ import annotations

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from pam_linkus.config import StateConfig
    from pam_linkus.state.base import StateStore


def open_store(config: StateConfig) -> StateStore:
    """Open the configured store; failures raise StateUnavailable."""
    if config.backend == "redis":
        from pam_linkus.state.redis_store import RedisStore

        return RedisStore(config.redis)
    from pam_linkus.state.sqlite_store import SqliteStore

    return SqliteStore(config.path)
