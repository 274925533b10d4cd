"""linkus-web's systemd unit: clean under `systemd-analyze verify` (its exit code says nothing
about typos, so stderr must be empty) and hardened below a stated exposure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import REPO

#: `systemd-analyze security` exposure we promise for linkus-web (0 = fully locked, 10 = none).
MAX_EXPOSURE = 2.0


def _unit_copy(tmp_path: Path) -> Path:
    # ExecStart must name an existing executable for verify; everything else is the shipped unit.
    text = (REPO / "packaging" / "systemd" / "linkus-web.service").read_text()
    unit = tmp_path / "linkus-web.service"
    unit.write_text(text.replace("/usr/bin/linkus-web", "/bin/true"))
    return unit


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_copy(tmp_path))], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(_unit_copy(tmp_path))],
                            capture_output=True, text=True, check=False)
    found = re.search(r"Overall exposure level for linkus-web\.service: ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE
    text = (REPO / "packaging" / "systemd" / "linkus-web.service").read_text()
    assert "User=linkus-web" in text and "NoNewPrivileges=yes" in text
    assert "InaccessiblePaths=-/etc/pam_linkus" in text


def test_doctor_checks_the_pam_service_and_the_web_group(tmp_path: Path, make_user: Any) -> None:
    import secrets

    from pam_linkus.doctor import check_web

    group = f"lkwg{secrets.token_hex(3)}"
    config = SimpleNamespace(self_service=SimpleNamespace(pam_service="svc"),
                             daemon=SimpleNamespace(web_group=group))
    (tmp_path / "svc").write_text("auth required pam_unix.so\n")
    assert [(f.level, f.what) for f in check_web(config, str(tmp_path))] == [  # type: ignore[arg-type]
        ("ok", "self-service PAM service"), ("ok", "web group")]
    (tmp_path / "svc").write_text("@include common-auth\n")
    (tmp_path / "common-auth").write_text("auth [default=die] pam_linkus.so\n")
    subprocess.run(["groupadd", group], check=True)
    try:
        for member in (make_user(), make_user()):
            subprocess.run(["usermod", "-a", "-G", group, member], check=True)
        found = {f.what: f for f in check_web(config, str(tmp_path))}  # type: ignore[arg-type]
        assert found["self-service PAM service"].level == "FAIL" and "pam_linkus" in found[
            "self-service PAM service"].detail
        assert found["web group"].level == "WARN" and "several members" in found["web group"].detail
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def test_units_turn_core_dumps_off() -> None:
    """A core of linkusd or linkus-web would hold TOTP secrets and passwords (the processes also say
    PR_SET_DUMPABLE 0 themselves: tests/test_daemon.py, test_web_process_is_not_dumpable below)."""
    for name in ("linkusd.service", "linkus-web.service"):
        lines = (REPO / "packaging" / "systemd" / name).read_text().splitlines()
        assert "LimitCORE=0" in lines, name


def test_web_process_is_not_dumpable(web: tuple[Any, Any, Any]) -> None:
    """linkus-web's memory holds a sign-in's password for a moment: no core (limit 0), and another
    process of the same user may not read its memory or environ (not dumpable)."""
    _, _, server = web
    pid = server.proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert [line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size")] == \
        [["0", "0"]], limits
    sleeper = subprocess.Popen([*server.as_user(), "sleep", "60"])
    try:
        def read(target: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*server.as_user(), "cat", f"/proc/{target}/environ"], capture_output=True,
                                  text=True, timeout=30, check=False)

        assert read(sleeper.pid).returncode == 0  # the same user reads a dumpable process
        refused = read(pid)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    finally:
        sleeper.kill()
        sleeper.wait(10)


def _exec_start(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("ExecStart=").split()


def test_the_shipped_unit_trusts_forwarded_for_only_on_its_unix_socket() -> None:
    """Issue 17/2: no TCP listener any local user can reach together with --trust-proxy: the unit
    listens on /run/linkus-web/http.sock (0660, nginx's group www-data), made in its RuntimeDirectory."""
    text = (REPO / "packaging" / "systemd" / "linkus-web.service").read_text()
    argv = _exec_start(text)
    assert "--listen" not in argv and "--trust-proxy-tcp" not in argv, argv
    assert argv[argv.index("--unix") + 1] == "/run/linkus-web/http.sock" and "--trust-proxy" in argv
    assert argv[argv.index("--unix-group") + 1] == "www-data"
    assert "RuntimeDirectory=linkus-web" in text.splitlines()
    from pam_linkus.web.app import build_parser

    args = build_parser().parse_args(argv[1:])  # the unit's command line is one linkus-web accepts
    assert args.unix_mode == "0660"


def _run_web(server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    from web_site import PYTHON

    return subprocess.run([*server.as_user(), "env", f"PYTHONPATH={REPO}", PYTHON, "-m", "pam_linkus.web.app",
                           "--socket", str(server.site.web_socket), *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd="/")


def test_trust_proxy_is_refused_on_a_tcp_listener(web: tuple[Any, Any, Any]) -> None:
    """Any local process can connect to 127.0.0.1:PORT and write X-Forwarded-For itself."""
    _, _, server = web
    refused = _run_web(server, "--listen", "127.0.0.1:1", "--trust-proxy")
    assert refused.returncode == 2 and "--trust-proxy needs --unix" in refused.stderr, refused
    assert _run_web(server, "--unix", "/nonexistent/x.sock", "--trust-proxy-tcp").returncode == 2


def test_the_unix_socket_is_the_proxy_groups_only_and_its_forwarded_for_counts(
        web: tuple[Any, Any, Any], make_user: Any, user: str, tmp_path: Path) -> None:
    import http.client
    import os
    import shutil
    import socket
    import stat
    import urllib.parse

    from web_site import WebServer, logged

    site_, _daemon, _plain = web
    site_.add(user)
    unix = WebServer(site_, tmp_path)
    sock_dir = site_.root / "run" / "http"
    sock_dir.mkdir()
    shutil.chown(sock_dir, unix.user)
    path = sock_dir / "http.sock"
    try:
        unix.start("--unix", str(path), "--unix-group", site_.group, "--trust-proxy")
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, __import__("grp").getgrnam(site_.group).gr_gid)
        stranger = make_user()  # a local user outside the proxy's group cannot even connect
        probe = subprocess.run(["setpriv", f"--reuid={stranger}", f"--regid={stranger}", "--init-groups",
                                "/usr/bin/python3", "-c",
                                f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"],
                               capture_output=True, text=True, timeout=30, check=False)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))

        conn = UnixConnection("localhost", timeout=20)
        conn.request("GET", "/sign-in")
        response = conn.getresponse()
        page = response.read().decode()
        pre = response.getheader("Set-Cookie", "").split(";")[0]
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        body = urllib.parse.urlencode({"csrf": csrf, "ext": user, "password": "wrong"})
        conn.request("POST", "/sign-in", body=body, headers={
            "Cookie": pre, "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": "198.51.100.23"})
        assert conn.getresponse().status == 401
        conn.close()
        assert logged(site_.log, action="self-check", result="wrong-password")["client"] == "198.51.100.23"
    finally:
        unix.stop()


def test_a_forwarded_address_counts_only_as_ipaddress_writes_it(web: tuple[Any, Any, Any], user: str,
                                                                tmp_path: Path) -> None:
    """X-Forwarded-For reaches the log (and fail2ban) only as ipaddress writes it: leading zeros
    (octal to inet_aton, invalid to fail2ban) or a scope leave the client unknown (the proxy's address)."""
    import http.client
    import urllib.parse
    from concurrent.futures import ThreadPoolExecutor

    from web_site import WebServer, fields

    site_, _daemon, _plain = web
    site_.add(user)
    proxied = WebServer(site_, tmp_path)
    cases = {"198.051.100.010": "127.0.0.1", "127.000.000.001": "127.0.0.1", "fe80::1%eth0": "127.0.0.1",
             "::ffff:198.51.100.23": "198.51.100.23", "2001:DB8:0::1": "2001:db8::1"}

    def sign_in(forwarded: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", proxied.port, timeout=20)
        try:
            conn.request("GET", "/sign-in")
            response = conn.getresponse()
            page = response.read().decode()
            pre = response.getheader("Set-Cookie", "").split(";")[0]
            csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            body = urllib.parse.urlencode({"csrf": csrf, "ext": user, "password": "wrong"})
            conn.request("POST", "/sign-in", body=body, headers={
                "Cookie": pre, "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": forwarded})
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        proxied.start("--trust-proxy", "--trust-proxy-tcp")
        site_.log.take()
        with ThreadPoolExecutor(len(cases)) as pool:  # each wrong password answers after 2 s: at once
            assert list(pool.map(sign_in, cases)) == [401] * len(cases)
        got = sorted(fields(line)["client"] for line in site_.log.take() if 'result="wrong-password"' in line)
        assert got == sorted(cases.values()), got
    finally:
        proxied.stop()
