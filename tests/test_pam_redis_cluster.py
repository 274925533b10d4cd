"""Two PBX "hosts" sharing one Redis, through real libpam + pam_linkus.so.

Each host is its own PAM service with its own pam_linkus.yaml and state
directory; only ``state: {backend: redis}`` points both at the same redis-server.
What one host records, the other must see: a used code, failures, a lock.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, SECRET, LogCatcher, PamStack, code_at, make_private_dir, require_root
from pam_client import ClientOutcome
from pam_conversation import converse
from redis_server import RedisServer, TlsFiles
from smtp_server import SmtpServer, code_in

from pam_linkus.config import Config
from pam_linkus.recovery import digest, generate_codes, new_salt
from pam_linkus.state import open_store

pytestmark = [pytest.mark.pam, pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")]


class Cluster:
    def __init__(self, hosts: list[PamStack], redis: RedisServer):
        self.a, self.b = hosts
        self.hosts = hosts
        self.redis = redis

    def use_redis(self, **redis: Any) -> None:
        self.redis_config = redis
        for host in self.hosts:
            host.write_config(state={"backend": "redis", "redis": redis})

    def store(self) -> Any:
        """A store on the cluster's Redis, as `linkus-2fa` on any host would open it."""
        return open_store(Config.from_mapping({"state": {"backend": "redis", "redis": self.redis_config}}).state)

    def enroll(self, user: str) -> None:
        for host in self.hosts:
            host.enroll_totp(user)


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    require_root()
    made: list[tuple[Path, LogCatcher, PamStack]] = []
    for _ in range(2):
        root = make_private_dir()
        log = LogCatcher(root / "log.sock")
        made.append((root, log, PamStack(root, log, start=False)))
    c = Cluster([stack for _, _, stack in made], redis_server)
    c.use_redis(url=redis_server.url, prefix=f"pbx{secrets.token_hex(3)}:", connect_timeout=1.0, timeout=1.0)
    for _, _, stack in made:
        stack.daemon.start()  # on the Redis config from the start: no SQLite file is ever made
    yield c
    for root, log, stack in made:
        stack.remove()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def wrong(code: str) -> str:
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


def test_a_code_used_on_one_host_is_refused_on_the_other(cluster: Cluster, user: str) -> None:
    cluster.enroll(user)
    code = code_at(SECRET, time.time())
    assert cluster.a.login(user, code).auth == "PAM_SUCCESS"
    assert cluster.b.login(user, code).auth == "PAM_AUTH_ERR"
    line = cluster.b.log.wait_for(f"user={user}")
    assert "outcome=denied" in line and "replayed code" in line
    # each host keeps nothing locally: the SQLite path of the skeleton config is not used
    assert not cluster.a.state_path.exists() and not cluster.b.state_path.exists()


def test_failures_on_both_hosts_add_up_to_one_lockout(cluster: Cluster, user: str) -> None:
    for host in cluster.hosts:
        host.write_config(lockout={"max_failures": 4, "duration": 600})
    cluster.enroll(user)
    bad = wrong(code_at(SECRET, time.time()))
    results = [host.login(user, bad).auth for host in (cluster.a, cluster.b, cluster.a, cluster.b)]
    assert results == ["PAM_AUTH_ERR", "PAM_AUTH_ERR", "PAM_AUTH_ERR", "PAM_MAXTRIES"]
    # the right code no longer helps, on either host
    good = code_at(SECRET, time.time())
    assert cluster.a.login(user, good).auth == "PAM_MAXTRIES"
    assert cluster.b.login(user, good).auth == "PAM_MAXTRIES"
    assert "outcome=locked" in cluster.a.log.wait_for("outcome=locked")


def test_parallel_logins_with_one_code_on_both_hosts_give_one_success(cluster: Cluster, user: str) -> None:
    for host in cluster.hosts:  # the losers' failures must not lock the extension in this test
        host.write_config(lockout={"max_failures": 20})
    cluster.enroll(user)
    code = code_at(SECRET, time.time())
    hosts = [cluster.a, cluster.b] * 4
    with ThreadPoolExecutor(len(hosts)) as pool:
        results = list(pool.map(lambda host: host.login(user, code, timeout=60).auth, hosts))
    assert sorted(results) == ["PAM_AUTH_ERR"] * (len(hosts) - 1) + ["PAM_SUCCESS"]


def test_redis_down_is_unavailable_and_back_up_works_without_manual_steps(cluster: Cluster, user: str,
                                                                           make_user: Any) -> None:
    cluster.enroll(user)
    without_2fa = make_user()
    cluster.redis.stop()
    for host in cluster.hosts:
        assert host.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
        assert "outcome=unavailable" in host.log.wait_for(f"user={user}")
        # an extension without 2FA never asks the store: Redis being down does not stop it
        assert host.login(without_2fa, None).auth == "PAM_SUCCESS"
    cluster.redis.start()
    code = code_at(SECRET, time.time())
    assert cluster.b.login(user, code).auth == "PAM_SUCCESS"
    assert cluster.a.login(user, code).auth == "PAM_AUTH_ERR"


def test_a_hanging_redis_is_unavailable_within_the_timeout(cluster: Cluster, user: str) -> None:
    cluster.enroll(user)
    cluster.redis.pause()
    try:
        started = time.monotonic()
        result = cluster.a.login(user, code_at(SECRET, time.time()))
        elapsed = time.monotonic() - started
    finally:
        cluster.redis.resume()
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    assert elapsed < 15  # connect_timeout/timeout 1 s, plus pam_unix and interpreter start
    assert "Timeout" in cluster.a.log.wait_for("outcome=unavailable")


def test_tls_and_acl_user_through_pam(cluster: Cluster, user: str, tls_files: TlsFiles, redis_dir: Path) -> None:
    password = secrets.token_urlsafe(24)
    server = RedisServer(redis_dir / "tls-acl", tls=(tls_files.server_cert, tls_files.server_key, tls_files.ca_cert),
                         config_lines=["user default off", f"user pbx on >{password} ~site7:* +@all"]).start()
    try:
        for host in cluster.hosts:
            pw = host.root / "redis.pw"
            pw.write_text(password + "\n")
            pw.chmod(0o600)
            host.write_config(state={"backend": "redis", "redis": {
                "url": server.url, "ca_file": str(tls_files.ca_cert), "username": "pbx",
                "password_file": str(pw), "prefix": "site7:", "connect_timeout": 2.0, "timeout": 2.0,
            }})
        cluster.enroll(user)
        code = code_at(SECRET, time.time())
        assert cluster.a.login(user, code).auth == "PAM_SUCCESS"
        assert cluster.b.login(user, code).auth == "PAM_AUTH_ERR"
        # a server whose certificate our CA did not sign is refused
        cluster.b.write_config(state={"backend": "redis", "redis": {
            "url": server.url, "ca_file": str(tls_files.rogue_ca_cert), "username": "pbx",
            "password_file": str(cluster.b.root / "redis.pw"), "prefix": "site7:",
        }})
        assert cluster.b.login(user, code_at(SECRET, time.time())).auth == "PAM_AUTHINFO_UNAVAIL"
        assert "certificate verify failed" in cluster.b.log.wait_for("outcome=unavailable")
    finally:
        server.stop()


def test_a_recovery_code_spent_on_one_host_is_refused_on_the_other(cluster: Cluster, user: str) -> None:
    cluster.enroll(user)
    salt, codes = new_salt(), generate_codes(2)
    store = cluster.store()
    store.set_recovery_codes(user, salt, [digest(c, salt) for c in codes])
    store.close()
    assert cluster.a.login(user, codes[0]).auth == "PAM_SUCCESS"
    assert "recovery code accepted" in cluster.a.log.wait_for(f"user={user}")
    assert cluster.b.login(user, codes[0]).auth == "PAM_AUTH_ERR"
    assert cluster.b.login(user, codes[1]).auth == "PAM_SUCCESS"
    store = cluster.store()
    assert store.recovery_codes_left(user) == 0
    store.close()


def test_an_email_code_sent_by_one_host_is_used_once_across_both(cluster: Cluster, user: str, smtp_server: Any,
                                                                 ca: Any) -> None:
    """Host A mails a code; the next login lands on B, which is throttled (one mail per 60 s across the
    cluster) and takes A's code; after that the code is gone on both. Needs the same email.key on both."""
    server: SmtpServer = smtp_server(auth=False, security="none")
    key = cluster.a.root / "email.key"
    for host in cluster.hosts:
        host.write_config(
            smtp={"host": "127.0.0.1", "port": server.port, "security": "none", "from": "pbx@example.com",
                  "timeout": 5},
            email={"key_file": str(key)},
        )
        host.extensions[user] = {"method": "email", "email": "alice@example.com"}
        host.write_extensions()
    first = converse(cluster.a.service, user, PASSWORD, lambda p, m: None)  # hangs up at the code prompt
    assert first.auth == "PAM_CONV_ERR"
    code = code_in(server.wait_for_message())
    second = converse(cluster.b.service, user, PASSWORD, lambda p, m: code)
    assert second.auth == "PAM_SUCCESS"
    assert second.messages == ["The code sent to a***@example.com a moment ago is still valid; no new code was sent."]
    third = converse(cluster.a.service, user, PASSWORD, lambda p, m: code)
    # no code pending, and no new mail for 60 s: throttled, which the person is told (not "unavailable")
    assert third.auth == "PAM_AUTH_ERR" and any("try again in" in m for m in third.messages), third.messages
    assert len(server.messages) == 1


def test_a_grace_period_earned_on_one_host_holds_on_the_other(cluster: Cluster, user: str) -> None:
    cluster.enroll(user)
    for host in cluster.hosts:
        host.write_config(grace_period=600)
    assert cluster.a.login(user, code_at(SECRET, time.time()), rhost="192.0.2.7").auth == "PAM_SUCCESS"
    result = cluster.b.login(user, None, rhost="192.0.2.7")
    assert (result.auth, result.prompts) == ("PAM_SUCCESS", ["Password: "])
    assert 'reason=grace period' in cluster.b.log.wait_for("grace period")
    assert cluster.b.login(user, None, rhost="192.0.2.8").outcome == ClientOutcome.NEED_CODE


def test_an_answer_read_after_the_module_gave_up_decides_nothing_on_redis(cluster: Cluster, user: str) -> None:
    """Issue 17.9 with Redis state: every step runs in the pool, where the deadline is checked again."""
    from test_daemon import check_late_answer_decides_nothing

    check_late_answer_decides_nothing(cluster.a, user)




def _client_commands(redis: RedisServer, action: Callable[[], object]) -> list[str]:
    """The commands clients sent while ``action`` ran, as MONITOR sees them: one per round trip
    (no pipelines here), without those a Lua script ran inside the server (``[0 lua]``).

    Read raw: each MONITOR event is one line (the server escapes newlines in arguments)."""
    marker = secrets.token_hex(8)
    with socket.create_connection(("127.0.0.1", redis.port), timeout=10) as sock:
        sock.sendall(b"MONITOR\r\n")
        lines = sock.makefile("rb")
        assert lines.readline() == b"+OK\r\n"
        poke = redis.client()
        try:
            action()
            poke.echo(marker)
        finally:
            poke.close()
        sent = []
        for raw in lines:  # bounded: the socket's timeout ends a stalled read
            line = raw.decode("utf-8", "replace")
            if marker in line:
                return sent
            source, _, command = line.partition("] ")
            if not source.endswith(" lua"):
                sent.append(command.split(" ", 1)[0].strip('"').upper())
    raise AssertionError("MONITOR ended before the marker")

def test_a_totp_login_costs_two_redis_round_trips(cluster: Cluster, user: str) -> None:
    """Issue 20: the lock read before the prompt (a locked extension gets no prompt) and ONE
    script after the answer that reserves, checks replay and records (TOTP_ATTEMPT); nothing
    else, however many keys the login touches."""
    cluster.enroll(user)
    now = time.time()
    assert cluster.a.login(user, code_at(SECRET, now)).auth == "PAM_SUCCESS"  # connections warm
    results = []
    sent = _client_commands(cluster.redis, lambda: results.append(cluster.a.login(user, code_at(SECRET, now + 30))))
    assert results[0].auth == "PAM_SUCCESS"
    assert sent == ["HMGET", "EVAL"]
