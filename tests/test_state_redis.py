"""The Redis store: the StateStore contract, plus what only a network store has --
TTLs, key prefix, a server that stops or hangs, TLS, ACL users, Sentinel."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import (
    HostileRedis,
    RedisServer,
    Sentinel,
    TlsFiles,
    free_port,
)
from state_contract import Opener, StateContract
from state_steps import NOW, STEP, fail, totp_attempt

from pam_linkus.config import Config, StateConfig
from pam_linkus.errors import ConfigError, StateUnavailable
from pam_linkus.state import open_store
from pam_linkus.state.base import EmailLimits, TotpAttempt
from pam_linkus.state.redis_store import CACHE_TTL, REPLAY_TTL

#: What docs/guide.md, "Several hosts: Redis state", recommends for a cluster's ACL user (as written there).
ACL_RULES = "-@all +@read +@write +eval +ping -@dangerous"


def state_config(**redis: Any) -> StateConfig:
    return Config.from_mapping({"state": {"backend": "redis", "redis": redis}}).state


def fast(**redis: Any) -> StateConfig:
    """Short timeouts: these tests wait for failures on purpose."""
    return state_config(connect_timeout=1.0, timeout=1.0, **redis)


def prefix() -> str:
    return f"t{secrets.token_hex(4)}:"


class TestRedisState(StateContract):
    @pytest.fixture
    def opener(self, redis_server: RedisServer) -> Opener:
        config = state_config(url=redis_server.url, prefix=prefix())
        return lambda: open_store(config)

    @pytest.fixture
    def unavailable_opener(self) -> Opener:
        config = fast(url=f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
        return lambda: open_store(config)


# -- keys, TTLs, prefix -------------------------------------------------------------


def test_every_key_has_the_prefix_and_a_ttl_unless_it_must_outlive_one(redis_server: RedisServer) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p, failure_ttl=86400))
    totp_attempt(store, "1001", NOW, STEP)  # also notes the success in the enrollment record
    fail(store, "1002", NOW, max_failures=3, duration=900, permanent_after=10)
    fail(store, "1003", NOW, max_failures=1, duration=0, permanent_after=10)
    # a refused attempt on that lock for good leaves it without a TTL
    assert store.reserve_attempt("1003", NOW, max_failures=1, duration=0, permanent_after=10).permanent
    store.cache_settings("ldap", "1004", "{}", NOW)
    store.start_grace("1005", "192.0.2.7", NOW, 3600)
    store.issue_email_code("1006", "h", NOW, EmailLimits(lifetime=300))
    store.set_recovery_codes("1007", "salt", ["d1", "d2"])
    store.close()
    r = redis_server.client()
    ttls = {key.removeprefix(p): r.ttl(key) for key in r.keys("*")}
    want = {
        "{1001}:totp": REPLAY_TTL,
        "{1001}:enrol": -1,  # when enrolled, last success: kept until `linkus-2fa disable`
        "{1002}:fail": 86400,
        "{1003}:fail": -1,  # only `linkus-2fa unlock` ends this lock
        "{1004}:cache": CACHE_TTL,
        "{1005}:grace": 3600,
        "{1006}:email": 300 + 60,
        "{1006}:email_sends": 3660,
        "email_sends": 120,
        "{1007}:recovery": -1,  # recovery codes stay valid until used or replaced
        "{1007}:recovery_salt": -1,
    }
    assert sorted(ttls) == sorted(want)
    for key, ttl in want.items():
        assert ttl - 5 <= ttls[key] <= ttl, key


def test_a_temporary_lock_outlives_its_key_ttl(redis_server: RedisServer) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p, failure_ttl=86400))
    now = time.time()
    status = fail(store, "1001", now, max_failures=1, duration=5 * 86400, permanent_after=10)
    assert status.locked_until == now + 5 * 86400
    ttl = redis_server.client().ttl(f"{p}{{1001}}:fail")
    assert 6 * 86400 - 10 <= ttl <= 6 * 86400 + 1
    store.close()


def test_a_prefix_separates_clusters_on_one_server(redis_server: RedisServer) -> None:
    a = open_store(state_config(url=redis_server.url, prefix=prefix()))
    b = open_store(state_config(url=redis_server.url, prefix=prefix()))
    assert totp_attempt(a, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    assert totp_attempt(b, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    fail(a, "1001", NOW, max_failures=3, duration=900, permanent_after=10)
    assert b.lock_status("1001", NOW).failures == 0
    a.close()
    b.close()


# -- Redis goes away ----------------------------------------------------------------


def test_a_stopped_server_is_unavailable_and_a_restarted_one_works_again(redis_server: RedisServer) -> None:
    store = open_store(fast(url=redis_server.url, prefix=prefix()))
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    redis_server.stop()
    with pytest.raises(StateUnavailable):
        totp_attempt(store, "1001", NOW, STEP + 1)
    with pytest.raises(StateUnavailable):
        store.lock_status("1001", NOW)
    with pytest.raises(StateUnavailable):
        store.reserve_attempt("1001", NOW, max_failures=3, duration=900, permanent_after=10)
    with pytest.raises(StateUnavailable):
        store.settle_failure("1001", NOW, max_failures=3, duration=900, permanent_after=10)
    redis_server.start()  # same port, empty (no persistence in tests): scripts must be loaded again
    assert totp_attempt(store, "1001", NOW, STEP + 1).verdict == TotpAttempt.ACCEPTED
    assert totp_attempt(store, "1001", NOW, STEP + 1).verdict == TotpAttempt.REPLAYED
    store.close()


def test_a_hanging_server_times_out_as_unavailable(redis_server: RedisServer) -> None:
    store = open_store(fast(url=redis_server.url, prefix=prefix()))
    assert store.lock_status("1001", NOW).failures == 0  # connected
    redis_server.pause()
    try:
        for call in (
            lambda: totp_attempt(store, "1001", NOW, STEP),
            lambda: open_store(fast(url=redis_server.url)).lock_status("1001", NOW),  # a new connection
        ):
            started = time.monotonic()
            with pytest.raises(StateUnavailable) as info:
                call()
            assert time.monotonic() - started < 5.0
            assert "Timeout" in str(info.value)
    finally:
        redis_server.resume()
    store.close()


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture
def tls_server(redis_dir: Path, tls_files: TlsFiles) -> Any:
    servers: list[RedisServer] = []

    def start(cert: Path, key: Path) -> RedisServer:
        server = RedisServer(redis_dir / f"tls{len(servers)}", tls=(cert, key, tls_files.ca_cert)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_tls_with_the_right_ca_works(tls_server: Any, tls_files: TlsFiles) -> None:
    server = tls_server(tls_files.server_cert, tls_files.server_key)
    assert server.url.startswith("rediss://127.0.0.1:")
    store = open_store(fast(url=server.url, ca_file=str(tls_files.ca_cert), prefix=prefix()))
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
    store.close()


@pytest.mark.parametrize("which", ["rogue", "wrong_name", "system_cas"])
def test_tls_refuses_a_certificate_it_cannot_verify(tls_server: Any, tls_files: TlsFiles, which: str) -> None:
    cert, key, ca = {
        "rogue": (tls_files.rogue_cert, tls_files.rogue_key, tls_files.ca_cert),  # signed by another CA
        "wrong_name": (tls_files.wrong_name_cert, tls_files.wrong_name_key, tls_files.ca_cert),  # not 127.0.0.1
        "system_cas": (tls_files.server_cert, tls_files.server_key, None),  # our CA is not a system CA
    }[which]
    server = tls_server(cert, key)
    options = {"url": server.url, "prefix": prefix()}
    if ca is not None:
        options["ca_file"] = str(ca)
    store = open_store(fast(**options))
    with pytest.raises(StateUnavailable) as info:
        totp_attempt(store, "1001", NOW, STEP)
    assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()


# -- ACL user and password file ------------------------------------------------------


@pytest.fixture
def acl_server(redis_dir: Path) -> Any:
    password = secrets.token_urlsafe(24)
    server = RedisServer(redis_dir / "acl", config_lines=[
        "user default off",
        f"user pbx on >{password} ~cluster1:* {ACL_RULES}",
    ]).start()
    yield server, password
    server.stop()


def password_file(directory: Path, text: str, mode: int = 0o600) -> str:
    path = directory / f"redis-{secrets.token_hex(3)}.pw"
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def test_acl_user_with_password_file_works(acl_server: Any, private_dir: Path) -> None:
    server, password = acl_server
    store = open_store(fast(url=server.url, username="pbx", password_file=password_file(private_dir, password),
                            prefix="cluster1:"))
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
    status = fail(store, "1002", NOW, max_failures=1, duration=60, permanent_after=3)
    assert status.locked_until == NOW + 60
    store.unlock("1002")
    store.forget("1001")
    assert store.lock_status("1002", NOW).failures == 0
    from pam_linkus.state.base import EmailCheck, EmailLimits  # the email scripts run under the same ACL

    assert store.issue_email_code("1003", "h1", NOW, EmailLimits()).issued is True
    store.discard_email_code("1003", "h1")
    assert store.issue_email_code("1003", "h2", NOW, EmailLimits()).issued is True
    assert store.verify_email_code("1003", "h2", NOW) == EmailCheck.ACCEPTED
    store.close()


@pytest.mark.parametrize("problem", ["wrong_password", "no_password", "other_prefix", "readable_file"])
def test_acl_refusals_are_unavailable(acl_server: Any, private_dir: Path, problem: str) -> None:
    server, password = acl_server
    options: dict[str, Any] = {"url": server.url, "username": "pbx", "prefix": "cluster1:"}
    if problem == "wrong_password":
        options["password_file"] = password_file(private_dir, password + "x")
    elif problem == "other_prefix":
        options.update(password_file=password_file(private_dir, password), prefix="cluster2:")
    elif problem == "readable_file":
        options["password_file"] = password_file(private_dir, password, 0o644)
    with pytest.raises(StateUnavailable) as info:
        store = open_store(fast(**options))
        totp_attempt(store, "1001", NOW, STEP)
    assert password not in str(info.value)


def test_a_password_in_the_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="password_file"):
        state_config(url="redis://pbx:secret@127.0.0.1:6379/0")
    state_config(url="redis://pbx@127.0.0.1:6379/0")  # a user name alone is fine


@pytest.mark.parametrize("redis", [
    {"url": "redis://127.0.0.1/0", "sentinels": ["127.0.0.1:26379"], "service_name": "m"},
    {"sentinels": ["127.0.0.1:26379"]},
    {"sentinels": ["127.0.0.1"], "service_name": "m"},
    {"tls": True},
    {"service_name": "m"},
    {"url": "http://127.0.0.1/"},
    {"prefix": "a{b}:"},
    {"failure_ttl": 60},
    {"sentinel_password_file": "/etc/pam_linkus/sentinel.pw"},
    {"url": "redis://pbx@127.0.0.1/0", "username": "other"},
])
def test_inconsistent_redis_config_is_refused(redis: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        state_config(**redis)


# -- Sentinel -------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup(redis_dir: Path) -> Any:
    if not shutil.which("redis-sentinel"):
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    service = f"m{secrets.token_hex(3)}"
    master = RedisServer(redis_dir / "master").start()
    replica = RedisServer(redis_dir / "replica", replica_of=master.port).start()
    sentinel = Sentinel(redis_dir / "sentinel", master.port, service).start()
    yield master, replica, sentinel
    sentinel.stop()
    replica.stop()
    master.stop()


def test_sentinel_finds_the_master_and_follows_a_failover(sentinel_setup: Any) -> None:
    master, replica, sentinel = sentinel_setup
    config = fast(sentinels=[f"127.0.0.1:{sentinel.port}"], service_name=sentinel.service, prefix=prefix())
    store = open_store(config)
    assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
    # the replica has the replay record (its first full sync may take seconds on a loaded machine; the
    # client waits longer than WAIT itself, else it times out first)
    assert master.client(socket_timeout=20).wait(1, 15000) == 1
    master.stop()
    deadline = time.monotonic() + 60
    while True:  # bounded: Sentinel notices after 1 s and promotes the replica
        try:
            answer = totp_attempt(store, "1001", NOW, STEP).verdict
            break
        except StateUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert answer == TotpAttempt.REPLAYED  # the record survived the failover: still a replay
    assert replica.client().role()[0] == "master"
    assert totp_attempt(store, "1001", NOW, STEP + 1).verdict == TotpAttempt.ACCEPTED
    store.close()


def test_sentinel_with_the_recommended_acl_user(redis_dir: Path, private_dir: Path) -> None:
    """The master check must work under the guide's ACL (which denies @dangerous, e.g. ROLE)."""
    if not shutil.which("redis-sentinel"):
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    password = secrets.token_urlsafe(24)
    master = RedisServer(redis_dir / "acl-master", config_lines=[
        f"user pbx on >{password} ~cluster1:* {ACL_RULES}"]).start()
    sentinel = Sentinel(redis_dir / "acl-sentinel", master.port, f"m{secrets.token_hex(3)}")
    try:
        sentinel.start()
        store = open_store(fast(sentinels=[f"127.0.0.1:{sentinel.port}"], service_name=sentinel.service,
                                username="pbx", password_file=password_file(private_dir, password),
                                prefix="cluster1:"))
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
        store.close()
    finally:
        sentinel.stop()
        master.stop()


def test_sentinel_that_knows_no_such_master_is_unavailable(sentinel_setup: Any) -> None:
    _master, _replica, sentinel = sentinel_setup
    store = open_store(fast(sentinels=[f"127.0.0.1:{sentinel.port}"], service_name="nosuchmaster"))
    with pytest.raises(StateUnavailable):
        store.lock_status("1001", NOW)


def test_sentinel_over_tls_verifies_sentinel_and_master(redis_dir: Path, tls_files: TlsFiles) -> None:
    if not shutil.which("redis-sentinel"):
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    pki = (tls_files.server_cert, tls_files.server_key, tls_files.ca_cert)
    master = RedisServer(redis_dir / "tls-master", tls=pki).start()
    sentinel = Sentinel(redis_dir / "tls-sentinel", master.port, f"m{secrets.token_hex(3)}", tls=pki)
    try:
        sentinel.start()
        options = {"sentinels": [f"127.0.0.1:{sentinel.port}"], "service_name": sentinel.service, "tls": True,
                   "prefix": prefix()}
        store = open_store(fast(ca_file=str(tls_files.ca_cert), **options))
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
        store.close()
        rogue = open_store(fast(ca_file=str(tls_files.rogue_ca_cert), **options))
        with pytest.raises(StateUnavailable):
            rogue.lock_status("1001", NOW)
    finally:
        sentinel.stop()
        master.stop()


def test_email_keys_have_the_prefix_and_a_ttl(redis_server: RedisServer) -> None:
    from pam_linkus.state.base import EmailLimits

    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p))
    assert store.issue_email_code("1001", "h1", NOW, EmailLimits(lifetime=300)).issued
    store.close()
    r = redis_server.client()
    assert sorted(r.keys("*")) == [f"{p}email_sends", f"{p}{{1001}}:email", f"{p}{{1001}}:email_sends"]
    assert 300 < r.ttl(f"{p}{{1001}}:email") <= 360
    assert 3600 < r.ttl(f"{p}{{1001}}:email_sends") <= 3660
    assert 60 < r.ttl(f"{p}email_sends") <= 120


def test_sentinels_with_a_password_need_sentinel_password_file(redis_dir: Path, private_dir: Path) -> None:
    if not shutil.which("redis-sentinel"):
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    password = secrets.token_urlsafe(24)
    master = RedisServer(redis_dir / "pw-master").start()
    sentinel = Sentinel(redis_dir / "pw-sentinel", master.port, f"m{secrets.token_hex(3)}", requirepass=password)
    try:
        sentinel.start()
        options = {"sentinels": [f"127.0.0.1:{sentinel.port}"], "service_name": sentinel.service, "prefix": prefix()}
        without = open_store(fast(**options))
        # each Sentinel is asked in turn; none names a master to a client it refuses
        with pytest.raises(StateUnavailable, match="MasterNotFoundError"):
            without.lock_status("1001", NOW)
        store = open_store(fast(sentinel_password_file=password_file(private_dir, password), **options))
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        store.close()
    finally:
        sentinel.stop()
        master.stop()


def test_a_unix_socket_url_works(redis_dir: Path) -> None:
    sock = redis_dir / "unix" / "redis.sock"
    server = RedisServer(redis_dir / "unix", config_lines=[f"unixsocket {sock}", "unixsocketperm 700"]).start()
    try:
        store = open_store(fast(url=f"unix://{sock}?db=0", prefix=prefix()))
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.ACCEPTED
        assert totp_attempt(store, "1001", NOW, STEP).verdict == TotpAttempt.REPLAYED
        server.stop()
        with pytest.raises(StateUnavailable):
            store.lock_status("1001", NOW)
        store.close()
    finally:
        server.stop()


# -- wrongly shaped data and hostile servers (issue 12 items 10, 11) -------------------


@pytest.mark.parametrize("field, value", [("count", "abc"), ("until", "soon"), ("lockc", "x")])
def test_wrongly_shaped_failure_data_is_unavailable(redis_server: RedisServer, field: str, value: str) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p))
    redis_server.client().hset(f"{p}{{1001}}:fail", mapping={"count": "1", "until": "0", field: value})
    lockout = {"max_failures": 5, "duration": 900, "permanent_after": 10}
    for call in (
        lambda: store.reserve_attempt("1001", NOW, **lockout),
        lambda: store.settle_failure("1001", NOW, **lockout),
        lambda: store.totp_attempt("1001", NOW, check=lambda: None, **lockout),
        lambda: store.totp_attempt("1001", NOW, check=lambda: STEP, **lockout),
    ):
        with pytest.raises(StateUnavailable):
            call()
    if field != "lockc":
        with pytest.raises(StateUnavailable):
            store.lock_status("1001", NOW)
    store.close()


def test_a_wrongly_shaped_grace_record_is_unavailable(redis_server: RedisServer) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p))
    redis_server.client().hset(f"{p}{{1001}}:grace", "192.0.2.1", "later")
    with pytest.raises(StateUnavailable):
        store.grace_active("1001", "192.0.2.1", NOW, 300)
    store.close()


def test_a_grace_record_from_before_starts_were_kept_never_counts(redis_server: RedisServer) -> None:
    """"<until>" alone (the old shape): one more code, never a skip; the next right code rewrites it."""
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p))
    redis_server.client().hset(f"{p}{{1001}}:grace", "192.0.2.1", repr(NOW + 3600))
    assert store.grace_active("1001", "192.0.2.1", NOW, 86400) is False
    store.start_grace("1001", "192.0.2.1", NOW, 60)
    assert redis_server.client().hget(f"{p}{{1001}}:grace", "192.0.2.1") == f"{NOW + 3600!r} {NOW!r}"
    assert store.grace_active("1001", "192.0.2.1", NOW + 59, 60) is True
    assert store.grace_active("1001", "192.0.2.1", NOW + 60, 60) is False
    store.close()


@pytest.mark.parametrize("reply, drip", [
    (b"$100000000\r\n", True),          # a bulk string far larger than any record
    (b"*10000000\r\n" + b":1\r\n" * 300000, False),  # an endless array
    (b"+OK", True),                     # a status line that never ends, a byte at a time
])
def test_a_hostile_server_is_unavailable_within_the_deadline(reply: bytes, drip: bool) -> None:
    server = HostileRedis(reply, drip)
    try:
        store = open_store(fast(url=f"redis://127.0.0.1:{server.port}/0", prefix=prefix()))
        start = time.monotonic()
        with pytest.raises(StateUnavailable):
            store.lock_status("1001", NOW)
        assert time.monotonic() - start < 3.0  # timeout 1.0 s: one overall deadline, not one per read
        store.close()
    finally:
        server.close()


def test_every_new_failure_record_has_a_ttl(redis_server: RedisServer) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p, failure_ttl=86400))
    lockout = {"max_failures": 5, "duration": 900, "permanent_after": 10}
    store.reserve_attempt("1001", time.time(), **lockout)
    for _ in range(5):
        store.reserve_attempt("1002", time.time(), **lockout)
    store.settle_failure("1002", time.time(), **lockout)
    r = redis_server.client()
    assert 86400 - 5 <= r.ttl(f"{p}{{1001}}:fail") <= 86400
    assert 86400 + 900 - 5 <= r.ttl(f"{p}{{1002}}:fail") <= 86400 + 900
    assert store.prune(time.time()) == 0
    store.close()


def test_a_totp_attempt_is_one_script_and_its_keys_keep_their_ttls(redis_server: RedisServer) -> None:
    """Issue 11: one round trip per TOTP login's decision (the lock read before the prompt aside)."""
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p, failure_ttl=86400))
    lockout = {"max_failures": 1, "duration": 0, "permanent_after": 10}
    r = redis_server.client()
    store.lock_status("warm-up", NOW)  # the connection's own set-up commands
    r.config_resetstat()
    assert store.totp_attempt("1001", NOW, check=lambda: STEP, **lockout).verdict == TotpAttempt.ACCEPTED
    assert store.totp_attempt("1002", NOW, check=lambda: None, **lockout).verdict == TotpAttempt.WRONG
    stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}
    # the commands scripts run count here too; the old path made two scripts per attempt
    assert stats["eval"] == 2 and "evalsha" not in stats
    ttls = {key.removeprefix(p): r.ttl(key) for key in r.keys(f"{p}*")}
    assert ttls.keys() == {"{1001}:totp", "{1001}:enrol", "{1002}:fail"}
    assert REPLAY_TTL - 5 <= ttls["{1001}:totp"] <= REPLAY_TTL
    assert ttls["{1001}:enrol"] == -1 and ttls["{1002}:fail"] == -1  # duration 0: only an unlock ends it
    store.close()


@pytest.mark.parametrize("reply", [
    b"*3\r\n:-1\r\n:0\r\n$1\r\n0\r\n",   # verdict -1 (Python would index ACCEPTED from the end)
    b"*3\r\n:5\r\n:0\r\n$1\r\n0\r\n",    # a verdict the script never returns
    b"*1\r\n:4\r\n",                       # too short
])
def test_a_wrongly_shaped_totp_attempt_reply_is_unavailable(reply: bytes) -> None:
    server = HostileRedis(reply)
    try:
        store = open_store(fast(url=f"redis://127.0.0.1:{server.port}/0", prefix=prefix()))
        with pytest.raises(StateUnavailable):
            store.totp_attempt("1001", NOW, check=lambda: STEP, max_failures=5, duration=900, permanent_after=10)
        store.close()
    finally:
        server.close()


@pytest.mark.parametrize("reply", [b"*2\r\n:1\r\n:-3\r\n", b"*2\r\n:1\r\n:9\r\n"])
def test_an_email_verdict_out_of_range_is_unavailable(reply: bytes) -> None:
    """-3 would index ACCEPTED from the end; 9 raised IndexError outside the translation."""
    server = HostileRedis(reply)
    try:
        store = open_store(fast(url=f"redis://127.0.0.1:{server.port}/0", prefix=prefix()))
        with pytest.raises(StateUnavailable):
            store.verify_email_code("1001", "h", NOW)
        store.close()
    finally:
        server.close()


def test_gate_session_keys_have_the_prefix_and_ttls(redis_server: RedisServer) -> None:
    p = prefix()
    store = open_store(state_config(url=redis_server.url, prefix=p))
    key = "ab" * 32
    assert store.gate_create(key, "1001", "totp", "192.0.2.7", "", NOW, lifetime=3600, idle=600,
                             max_per_account=3, max_total=10)
    assert store.gate_check(key, NOW + 100, lifetime=3600, idle=600, touch_after=10) is not None
    store.close()
    r = redis_server.client()
    ttls = {k.removeprefix(p): r.ttl(k) for k in r.keys("*")}
    want = {f"gate:{key}": 600 + 60, "{1001}:gate": 3600 + 60, "gate_sessions": 3600 + 60}
    assert sorted(ttls) == sorted(want)
    for name, ttl in want.items():
        assert ttl - 5 <= ttls[name] <= ttl, name
    assert r.hget(f"{p}gate:{key}", "seen") == repr(NOW + 100)  # touched: the idle TTL starts again
