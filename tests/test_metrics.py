"""linkusd's /metrics and ``linkus-2fa status`` summary, against a real linkusd and real PAM logins.

Counters are checked as exact deltas between two scrapes; the listener runs on a unix socket in
the test's private directory (no port to race for) except where TCP itself is the point.
"""

from __future__ import annotations

import grp
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli
from conftest import DAEMON_PYTHON, PASSWORD, REPO, SECRET, PamStack, code_at, write_yaml
from prometheus_client.parser import text_string_to_metric_families
from smtp_server import closed_port
from test_pam_email import enroll_email, login, mailed_code, setup_email

from pam_linkus import __version__, protocol
from pam_linkus.config import Config
from pam_linkus.daemon.engine import error_kind
from pam_linkus.daemon.metrics import LOCKED_CAP, SERVICE_CAP, Stats
from pam_linkus.errors import ConfigError, MailUnavailable, SourceUnavailable, StateUnavailable, Unavailable
from pam_linkus.protocol import Msg, encode_json

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(address: str | tuple[str, int], path: str = "/metrics", *, timeout: float = 5.0) -> tuple[str, str]:
    """One HTTP/1.1 GET over a unix socket path or a (host, port); the status line and the body."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: linkusd\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body.decode()


def scrape(address: str | tuple[str, int]) -> Samples:
    status, body = http_get(address)
    assert status == "HTTP/1.1 200 OK", status
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def with_metrics(stack: PamStack, listen: str, **config: Any) -> None:
    """Restart the stack's linkusd with ``metrics.listen`` (read at start only)."""
    stack.daemon.stop()
    stack.config.update({"metrics": {"listen": listen}, **config})
    write_yaml(stack.config_path, stack.config, end=True)
    stack.daemon.start()


@pytest.fixture
def metrics_stack(pam_stack: PamStack) -> tuple[PamStack, str]:
    address = str(pam_stack.daemon.run_dir / "metrics.sock")
    with_metrics(pam_stack, address, lockout={"max_failures": 2, "duration": 600})
    return pam_stack, address


def test_real_logins_counted_exactly_and_summarised(metrics_stack: tuple[PamStack, str], user: str,
                                                    make_user: Any) -> None:
    stack, address = metrics_stack
    plain = make_user()  # no 2FA: enforce "enrolled" lets it in with the password (skip)
    stack.enroll_totp(user)
    before = scrape(address)
    service = stack.service
    now = time.time()
    assert stack.login(user, code_at(SECRET, now)).auth == "PAM_SUCCESS"
    # pam_linkus.so says PAM_IGNORE; the stack's pam_permit makes it a success
    assert stack.login(plain, None).auth == "PAM_SUCCESS"
    wrong = "000000" if code_at(SECRET, now) != "000000" else "111111"
    assert stack.login(user, wrong).auth == "PAM_AUTH_ERR"
    assert stack.login(user, wrong).auth == "PAM_MAXTRIES"
    after = scrape(address)

    def delta(outcome: str, method: str) -> float:
        return (value(after, "linkus_logins_total", outcome=outcome, method=method, service=service)
                - value(before, "linkus_logins_total", outcome=outcome, method=method, service=service))

    assert delta("success", "totp") == 1
    assert delta("skip", "-") == 1  # an extension no source knows: no method
    assert delta("denied", "totp") == 1
    assert delta("locked", "totp") == 1
    count = value(after, "linkus_login_duration_seconds_count") - value(before, "linkus_login_duration_seconds_count")
    assert count == 4
    assert value(after, "linkus_extensions_enrolled", method="totp") == 1
    assert ("linkus_extensions_enrolled", (("method", "email"),)) in after  # a 0, not a gap
    assert value(after, "linkus_extensions_enrolled", method="email") == 0
    assert value(after, "linkus_connections", socket="pam") == 0
    assert value(after, "linkus_build_info", version=__version__, python=_python()) == 1
    assert 0 < value(after, "linkus_start_time_seconds") <= time.time()
    assert ("linkus_notifications_total", (("result", "dropped"),)) in after

    # the admin's summary, from linkusd over its PAM socket, the lock checked in the store
    result = run_cli(stack, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "success 1" in out and "denied 1" in out and "locked 1" in out, out
    assert f"locked now:   1: {user} (until " in out, out
    assert "last reload:" in out and ", ok in " in out, out
    assert "notices:      none" in out, out  # no notify section: nothing mailed
    # the summary needs no metrics listener: the same numbers with metrics off
    stack.daemon.stop()
    del stack.config["metrics"]
    write_yaml(stack.config_path, stack.config, end=True)
    stack.daemon.start()
    assert stack.login(user, code_at(SECRET, time.time())).auth == "PAM_MAXTRIES"
    again = run_cli(stack, "status")
    assert again.returncode == 0, again.stderr
    assert "1 logins: locked 1" in again.stdout and f"locked now:   1: {user}" in again.stdout, again.stdout


def _python() -> str:
    out = subprocess.run([DAEMON_PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_codes_and_smtp_errors_counted(metrics_stack: tuple[PamStack, str], user: str, smtp_server: Any,
                                             ca: Any) -> None:
    stack, address = metrics_stack
    setup_email(stack, None, ca, port=closed_port())
    enroll_email(stack, user)
    before = scrape(address)
    assert login(stack, user, lambda p, m: "123456").auth == "PAM_AUTHINFO_UNAVAIL"
    down = scrape(address)
    assert value(down, "linkus_errors_total", kind="smtp") == value(before, "linkus_errors_total", kind="smtp") + 1
    assert value(down, "linkus_email_codes_total", result="sent") == value(before, "linkus_email_codes_total",
                                                                           result="sent")
    assert value(down, "linkus_logins_total", outcome="unavailable", method="email", service=stack.service) == 1
    server = smtp_server(auth=True)
    setup_email(stack, server, ca)  # one mail per 60 s
    assert login(stack, user, mailed_code(server)).auth == "PAM_SUCCESS"
    assert login(stack, user, lambda p, m: "123456").auth == "PAM_AUTH_ERR"  # told to wait: throttled
    after = scrape(address)
    assert value(after, "linkus_email_codes_total", result="sent") == value(down, "linkus_email_codes_total",
                                                                            result="sent") + 1
    assert value(after, "linkus_email_codes_total", result="throttled") == value(
        down, "linkus_email_codes_total", result="throttled") + 1
    assert value(after, "linkus_errors_total", kind="smtp") == value(down, "linkus_errors_total", kind="smtp")
    assert value(after, "linkus_extensions_enrolled", method="email") == 1
    assert len(server.messages) == 1


def test_reloads_good_and_bad_show(metrics_stack: tuple[PamStack, str]) -> None:
    stack, address = metrics_stack
    before = scrape(address)
    stack.write_config(grace_period=0)  # a good reload (write_config asserts it loaded)
    good = scrape(address)
    assert value(good, "linkus_config_reloads_total", result="ok") == value(
        before, "linkus_config_reloads_total", result="ok") + 1
    assert value(good, "linkus_config_last_reload_success") == 1
    stack.write_config(metrics={"listen": "127.0.0.1:9816"})  # read at start only: said, and not served
    stack.log.wait_for("metrics.listen or metrics.group changed; it takes effect when linkusd restarts")
    assert value(scrape(address), "linkus_config_reloads_total", result="ok") == value(
        good, "linkus_config_reloads_total", result="ok") + 1
    assert value(good, "linkus_config_last_reload_timestamp_seconds") >= value(
        before, "linkus_config_last_reload_timestamp_seconds")
    assert 0 <= value(good, "linkus_config_last_reload_duration_seconds") < 30
    good = scrape(address)
    write_yaml(stack.config_path, {**stack.config, "no_such_key": 1}, end=True)
    status = stack.daemon.reload()
    assert status["last_error"], status
    bad = scrape(address)
    assert value(bad, "linkus_config_reloads_total", result="failed") == value(
        good, "linkus_config_reloads_total", result="failed") + 1
    assert value(bad, "linkus_config_reloads_total", result="ok") == value(good, "linkus_config_reloads_total",
                                                                           result="ok")
    assert value(bad, "linkus_config_last_reload_success") == 0
    assert value(bad, "linkus_config_loaded") == 1  # the last good one still serves


def test_error_kinds() -> None:
    ldap = {"uris": ["ldaps://ldap.example"], "bind_dn": "cn=linkusd", "bind_password_file": "/etc/x.pw",
            "base": "dc=example"}
    config = Config.from_mapping({"sources": ["ldap", "yaml"], "ldap": ldap,
                                  "state": {"backend": "redis", "redis": {"url": "redis://127.0.0.1:6379/0"}}})
    assert error_kind(MailUnavailable("SMTP server x: refused"), config) == "smtp"
    assert error_kind(StateUnavailable("redis: down"), config) == "redis"
    assert error_kind(StateUnavailable("state file: locked"), Config.from_mapping({})) == "sqlite"
    assert error_kind(SourceUnavailable("ldaps://ldap.example: timeout"), config) == "ldap"
    assert error_kind(SourceUnavailable("yaml: this snapshot's extensions were released"), config) == "yaml"
    assert error_kind(ConfigError("bad", "x.yaml"), config) == "config"
    assert error_kind(Unavailable("daemon work took longer than 10 s"), config) == "daemon"


def test_no_config_counts_as_a_config_error_in_the_summary(pam_stack: PamStack, user: str) -> None:
    pam_stack.daemon.stop()
    write_yaml(pam_stack.config_path, {**pam_stack.config, "enforce": "sometimes"}, end=True)
    pam_stack.daemon.start()
    assert pam_stack.login(user, "123456").auth == "PAM_AUTHINFO_UNAVAIL"
    summary = pam_stack.daemon.status()["summary"]
    assert summary["errors"] == {"config": 1}
    assert summary["reloads"] == {"failed": 1}
    assert summary["last_hour"] == {"unavailable": 1}
    result = run_cli(pam_stack, "status", "--config", str(pam_stack.config_path))
    assert result.returncode == 1 and "enforce" in result.stderr  # the command reads the same file


@pytest.mark.parametrize("listen", ["0.0.0.0:9816", "10.1.2.3:9816", "[::]:9816", "localhost:9816",
                                    "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "metrics.sock"])
def test_config_refuses_what_is_not_loopback(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        Config.from_mapping({"metrics": {"listen": listen}})


def test_config_refuses_the_pam_socket_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen: must not be the PAM or the web socket"):
        Config.from_mapping({"daemon": {"pam_socket": "/run/x/pam.sock"}, "metrics": {"listen": "/run/x/pam.sock"}})
    with pytest.raises(ConfigError, match=r"unknown key in metrics"):
        Config.from_mapping({"metrics": {"port": 9816}})
    ok = Config.from_mapping({"metrics": {"listen": "[::1]:9816"}}).metrics
    assert (ok.host, ok.port, ok.path) == ("::1", 9816, None)


def test_real_linkusd_refuses_a_non_loopback_listener(pam_stack: PamStack) -> None:
    write_yaml(pam_stack.config_path, {**pam_stack.config, "metrics": {"listen": "0.0.0.0:9816"}}, end=True)
    check = subprocess.run([DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--check", "--config",
                            str(pam_stack.config_path)], capture_output=True, text=True, cwd=REPO, check=False,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert check.returncode == 1
    assert "metrics.listen: must be a loopback address" in check.stderr
    # and a running linkusd keeps its last good config when asked to load it
    status = pam_stack.daemon.reload()
    assert "metrics.listen" in str(status["last_error"])


def test_off_by_default_no_listener(pam_stack: PamStack) -> None:
    pid = pam_stack.daemon.proc.pid if pam_stack.daemon.proc else 0
    listening = subprocess.run(["ss", "-H", "-l", "-n", "-p", "-t", "-u", "-x"], capture_output=True, text=True,
                               check=True).stdout
    mine = [line.split() for line in listening.splitlines() if f"pid={pid}," in line]
    assert not [line for line in mine if line[0] in ("tcp", "udp")], mine  # no TCP or UDP socket at all
    streams = sorted(line[4] for line in mine if line[0] == "u_str" and line[1] == "LISTEN")
    assert streams == [str(pam_stack.daemon.pam_socket), str(pam_stack.daemon.web_socket)], mine
    assert "summary" in pam_stack.daemon.status()


def test_slow_scrapers_block_no_login_and_no_other_scrape(pam_stack: PamStack, user: str) -> None:
    port = _free_port()
    with_metrics(pam_stack, f"127.0.0.1:{port}")
    pam_stack.enroll_totp(user)
    address = ("127.0.0.1", port)
    silent = [socket.create_connection(address) for _ in range(3)]  # connected, sending nothing
    try:
        assert value(scrape(address), "linkus_connections_refused_total", socket="metrics", reason="cap") == 0
        half = socket.create_connection(address)  # the fourth slot: half a request head, for now
        silent.append(half)
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost")
        extra = socket.create_connection(address)  # over the cap of 4: closed at once
        extra.settimeout(3)
        assert extra.recv(100) == b""
        extra.close()
        started = time.monotonic()
        assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
        assert time.monotonic() - started < 3
        half.sendall(b": linkusd\r\n\r\n")  # the slow one finishes its request: served
        half.settimeout(5)
        data = b""
        while chunk := half.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        body = data.partition(b"\r\n\r\n")[2].decode()
        assert f'linkus_logins_total{{method="totp",outcome="success",service="{pam_stack.service}"}} 1.0' in body
        assert 'linkus_connections_refused_total{reason="cap",socket="metrics"} 1.0' in body
        # a silent one is dropped once its request deadline (5 s) passes
        silent[0].settimeout(10)
        waited = time.monotonic()
        assert silent[0].recv(100) == b""
        assert time.monotonic() - waited < 6
    finally:
        for conn in silent:
            conn.close()
    status, _body = http_get(address, "/other")
    assert status.startswith("HTTP/1.1 404")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_bounded_service_labels() -> None:
    """A caller picks its own service name: past the cap, and for names no PAM file has, ``other``."""
    stats = Stats(clock=lambda: 1000.0)
    for n in range(SERVICE_CAP + 5):
        stats.login({"outcome": "denied", "method": "totp", "service": f"svc{n}", "ms": 3})
    stats.login({"outcome": "success", "method": "x" * 40, "service": "bad name\n", "ms": 3})
    stats.login({"outcome": "locked", "method": "totp", "service": "sshd", "ms": 3})
    stats.login({"outcome": "success", "method": "totp", "service": "linkus-gate", "ms": 3})
    services = {service for _, _, service in stats.logins}
    assert len(services) == SERVICE_CAP + 3 and "other" in services
    assert stats.logins[("denied", "totp", "other")] == 5
    assert stats.logins[("success", "other", "other")] == 1
    assert stats.logins[("locked", "totp", "sshd")] == 1  # past the cap, a known service keeps its label
    assert stats.logins[("success", "totp", "linkus-gate")] == 1
    assert list(stats.locked) == []  # no account in those fields: nothing to list as locked
    for n in range(LOCKED_CAP + 10):  # long names: the STATUS reply stays one frame
        stats.login({"outcome": "locked", "method": "totp", "service": "sshd", "account": f"{n:04d}" + "\u00e9" * 200})
    summary = stats.summary()
    assert len(stats.locked) == LOCKED_CAP and summary["locked_seen_count"] == LOCKED_CAP
    names = summary["locked_seen"]
    assert isinstance(names, list) and 0 < len(names) < LOCKED_CAP
    assert names[0].startswith(f"{LOCKED_CAP + 9:04d}")  # newest first
    assert len(encode_json(Msg.STATUS_REPLY, {"summary": summary})) < 65536


def test_web_page_and_gate_second_factors_counted_once(site: tuple[Any, Any], make_user: Any) -> None:
    """Security Settings (linkus-web) and the web gate (linkus-gate) through a real linkusd's web
    socket: each second-factor outcome is one count, locks included, and the locked show in status."""
    s = site[0]
    address = str(s.stack.daemon.run_dir / "metrics.sock")
    s.stack.config.update({"metrics": {"listen": address}, "lockout": {"max_failures": 2, "duration": 600},
                           "gate": {"return_hosts": ["pbx.example.com"], "sites": [{"name": "all", "path": "/"}]}})
    s.stack.write_config(daemon={"web_group": s.group})  # the sockets' paths too: the CLI asks this linkusd
    page_user, gate_user = make_user(), make_user()
    s.add(page_user, method="totp", secret=SECRET)
    s.add(gate_user, method="totp", secret=SECRET)
    s.stack.daemon.start()
    web = str(s.web_socket)
    client = "192.0.2.10"

    def call(op: str, **fields: str) -> dict[str, Any]:
        return dict(protocol.call_web(web, {"op": op, "client": client, **fields}))

    def with_code(prefix: str, user: str, code: str) -> dict[str, Any]:
        started = call(prefix + "sign_in", ext=user, password=PASSWORD)
        assert started.get("state") == "code", started
        return call(prefix + ("code" if prefix else "sign_in_code"), session=started["session"],
                    csrf=started["csrf"], code=code)

    before = scrape(address)
    good = code_at(SECRET, time.time())
    wrong = "000000" if good != "000000" else "111111"
    for prefix, user in (("", page_user), ("gate_", gate_user)):
        assert with_code(prefix, user, good)["ok"] is True
        assert with_code(prefix, user, wrong)["error"] == "denied"
        assert with_code(prefix, user, wrong)["error"] == "locked"  # the second failure sets the lock
        locked = call(prefix + "sign_in", ext=user, password=PASSWORD)  # the right password, locked
        assert locked["error"] == "locked", locked
    after = scrape(address)
    for service in ("linkus-web", "linkus-gate"):
        def delta(outcome: str, method: str, service: str = service) -> float:
            labels = {"outcome": outcome, "method": method, "service": service}
            return value(after, "linkus_logins_total", **labels) - value(before, "linkus_logins_total", **labels)

        assert delta("success", "totp") == 1, service
        # the gate's code step knows the account's method since its sign-in: its lines (and counts) name it
        assert delta("denied", "totp" if service == "linkus-gate" else "-") == 1, service
        assert delta("locked", "-") + delta("locked", "totp") == 2, service
    assert value(after, "linkus_login_duration_seconds_count") - value(
        before, "linkus_login_duration_seconds_count") == 8
    out = run_cli(s.stack, "status").stdout
    assert "success 2" in out and "denied 2" in out and "locked 4" in out, out
    assert "locked now:   2: " in out and page_user in out and gate_user in out, out


@pytest.mark.parametrize(("listen", "problem"), [
    ("[::1%lo]:9816", "must not name a scope"), ("[fe80::1%eth0]:9816", "must not name a scope"),
    ("::1:9816", "needs brackets"), ("/run/linkusd/../x/metrics.sock", "normalized")])
def test_config_refuses_addresses_that_cannot_bind_or_are_ambiguous(listen: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"metrics\.listen: .*{problem}"):
        Config.from_mapping({"metrics": {"listen": listen}})


def test_config_group_is_for_a_unix_socket_only() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.group: needs listen to be a unix socket path"):
        Config.from_mapping({"metrics": {"listen": "127.0.0.1:9816", "group": "prometheus"}})
    with pytest.raises(ConfigError, match=r"metrics\.group: is not a group name"):
        Config.from_mapping({"metrics": {"listen": "/run/linkusd/metrics.sock", "group": "a b"}})
    ok = Config.from_mapping({"metrics": {"listen": "/run/linkusd/metrics.sock", "group": "prometheus"}}).metrics
    assert (ok.path, ok.group) == ("/run/linkusd/metrics.sock", "prometheus")


def _check(stack: PamStack) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--check", "--config", str(stack.config_path)],
                          capture_output=True, text=True, cwd=REPO, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_check_refuses_a_metrics_socket_in_a_directory_others_can_write(pam_stack: PamStack) -> None:
    open_dir = pam_stack.root / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    write_yaml(pam_stack.config_path, {**pam_stack.config, "metrics": {"listen": str(open_dir / "m.sock")}},
               end=True)
    check = _check(pam_stack)
    assert check.returncode == 1 and f"{open_dir} must be a directory owned by root" in check.stderr, check
    write_yaml(pam_stack.config_path, {**pam_stack.config, "metrics": {
        "listen": str(pam_stack.daemon.run_dir / "metrics" / "m.sock")}}, end=True)
    check = _check(pam_stack)  # absent under a safe parent: linkusd makes it at start
    assert check.returncode == 0, check


def _status(stack: PamStack) -> str:
    result = run_cli(stack, "status")
    assert result.returncode == 0, result.stderr
    return result.stdout


def _wait(what: str, check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_squatted_port_is_tried_again_said_once_and_shown(pam_stack: PamStack) -> None:
    squatter = socket.create_server(("127.0.0.1", 0))  # any local user can take a free loopback port first
    port = squatter.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    try:
        with_metrics(pam_stack, listen)
        _wait("two tries", lambda: (pam_stack.daemon.status().get("metrics") or {}).get("tries", 0) >= 2)
        out = _status(pam_stack)
        assert f"metrics:      NOT serving on {listen}: Address already in use (tried " in out, out
    finally:
        squatter.close()
    _wait("serving", lambda: (pam_stack.daemon.status().get("metrics") or {}).get("serving"))
    assert value(scrape(("127.0.0.1", port)), "linkus_config_loaded") == 1
    assert f"metrics:      serving on {listen}" in _status(pam_stack)
    lines = pam_stack.log.lines
    assert sum(f"cannot serve metrics on {listen}: Address already in use" in line for line in lines) == 1, lines
    assert sum(f"serving metrics on {listen}" in line for line in lines) == 1, lines


def test_a_config_broken_at_start_serves_metrics_once_fixed(pam_stack: PamStack) -> None:
    address = str(pam_stack.daemon.run_dir / "metrics.sock")
    pam_stack.daemon.stop()
    pam_stack.config["metrics"] = {"listen": address}
    write_yaml(pam_stack.config_path, {**pam_stack.config, "enforce": "sometimes"}, end=True)
    pam_stack.daemon.start()
    status = pam_stack.daemon.status()
    assert not status["loaded"] and status["metrics"] is None  # nothing to serve yet (the CLI cannot load it)
    pam_stack.write_config()  # fixed: loads at the reload, and the listener starts with it
    _wait("serving", lambda: (pam_stack.daemon.status().get("metrics") or {}).get("serving"))
    pam_stack.log.wait_for(f"serving metrics on {address}")
    samples = scrape(address)
    assert value(samples, "linkus_config_reloads_total", result="failed") == 1  # the start's failed load
    assert value(samples, "linkus_config_reloads_total", result="ok") == 1
    assert value(samples, "linkus_config_loaded") == 1
    assert oct(Path(address).stat().st_mode & 0o777) == "0o600"  # no metrics.group: root only
    pam_stack.daemon.stop()
    assert not Path(address).exists()  # removed on stop


_HOLD = """
import socket, sys
path = sys.argv[1]
held = [socket.socket(socket.AF_UNIX) for _ in range(2)]
for conn in held:
    conn.connect(path)
extra = socket.socket(socket.AF_UNIX)
extra.connect(path)
extra.settimeout(5)
print("third:", extra.recv(10) == b"", flush=True)
sys.stdin.read()
"""


def test_unix_socket_group_and_per_uid_cap(pam_stack: PamStack, make_user: Any) -> None:
    """Only the group (and root) can connect; a member holding slow connections blinds nobody else."""
    group = f"lkmg{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    try:
        member, second, outsider = make_user(), make_user(), make_user()
        for user in (member, second):
            subprocess.run(["usermod", "-aG", group, user], check=True)
        address = str(pam_stack.daemon.run_dir / "metrics.sock")
        with_metrics(pam_stack, address)
        pam_stack.write_config(metrics={"listen": address, "group": group})  # group: read at the next start
        pam_stack.daemon.stop()
        pam_stack.daemon.start()
        st = Path(address).stat()
        assert (oct(st.st_mode & 0o777), st.st_uid, grp.getgrgid(st.st_gid).gr_name) == ("0o660", 0, group)
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]); " \
                "s.sendall(b'GET /metrics HTTP/1.1\\r\\n\\r\\n'); print(s.recv(12))"
        denied = subprocess.run([DAEMON_PYTHON, "-c", probe, address], user=outsider, capture_output=True,
                                text=True, check=False, timeout=30)
        assert "PermissionError" in denied.stderr, denied  # the file mode: no connect at all
        allowed = subprocess.run([DAEMON_PYTHON, "-c", probe, address], user=member, extra_groups=[group],
                                 capture_output=True, text=True, check=False, timeout=30)
        assert allowed.stdout.strip() == "b'HTTP/1.1 200'", allowed
        holders = [subprocess.Popen([DAEMON_PYTHON, "-c", _HOLD, address], user=who, extra_groups=[group],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for who in (member, second)]
        try:
            for holder in holders:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "third: True"  # its third one closed at once
            # two members hold all 4 shared slots: root's scrape has slots of its own
            samples = scrape(address)
            assert value(samples, "linkus_connections_refused_total", socket="metrics", reason="uid-cap") == 2
        finally:
            for holder in holders:
                holder.communicate("", timeout=10)
        os.chmod(address, 0o666)  # were the mode ever wider, SO_PEERCRED still turns the outsider away
        wider = subprocess.run([DAEMON_PYTHON, "-c", probe, address], user=outsider, capture_output=True,
                               text=True, check=False, timeout=30)
        # connected (the mode let it), then closed before any answer: reset, broken pipe or EOF
        assert "HTTP" not in wider.stdout and "PermissionError" not in wider.stderr, wider
        samples = scrape(address)
        assert value(samples, "linkus_connections_refused_total", socket="metrics", reason="peer") == 1
        assert "metrics/uid-cap 2" in _status(pam_stack)
    finally:
        pam_stack.daemon.stop()
        subprocess.run(["groupdel", group], check=False, capture_output=True)
