"""Redis-only property of grace periods: one hash per extension that expires with its last period."""

from __future__ import annotations

import secrets

from redis_server import RedisServer
from state_contract import NOW

from pam_linkus.config import Config
from pam_linkus.state import open_store


def test_grace_hash_has_the_prefix_and_expires_with_the_last_period(redis_server: RedisServer) -> None:
    prefix = f"t{secrets.token_hex(4)}:"
    config = Config.from_mapping({"state": {"backend": "redis", "redis": {"url": redis_server.url,
                                                                          "prefix": prefix}}}).state
    store = open_store(config)
    try:
        store.start_grace("1001", "192.0.2.7", NOW, 300)
        store.start_grace("1001", "2001:db8::7", NOW, 900)
        r = redis_server.client()
        key = f"{prefix}{{1001}}:grace"
        assert set(r.hkeys(key)) == {"192.0.2.7", "2001:db8::7"}
        assert 890 <= r.ttl(key) <= 900
        store.forget("1001")
        assert r.exists(key) == 0
    finally:
        store.close()
