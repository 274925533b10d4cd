"""`linkus-2fa doctor` says what a login would log: which file, line and column is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, PamStack


def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pam_linkus.cli", "--config", str(config), "doctor", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )


def test_doctor_passes_on_a_good_setup(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    pam_dir = pam_stack.root / "pam.d"
    pam_dir.mkdir()
    (pam_dir / "sshd").write_text("auth requisite pam_unix.so nodelay\n"
                                  "auth [success=ok ignore=ignore default=die] pam_linkus.so\n")
    result = doctor(pam_stack.config_path, user, "--pam-dir", str(pam_dir))
    # Whether this host's clock is synchronised is not the test's business.
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL") and "clock" not in line]
    assert not fails, result.stdout + result.stderr
    assert f"ok   pam: {pam_dir}/sshd:2: auth [success=ok ignore=ignore default=die] pam_linkus.so" in result.stdout
    assert f"ok   config file: {pam_stack.config_path}" in result.stdout
    assert "clock:" in result.stdout


def test_doctor_names_file_line_column_of_a_broken_extensions_file(pam_stack: PamStack) -> None:
    pam_stack.extensions_path.write_text('extensions:\n  "1001": {method: totp}\n...\n')
    result = doctor(pam_stack.config_path)
    assert result.returncode != 0
    assert f"{pam_stack.extensions_path}:2:3" in result.stdout + result.stderr
    assert "needs a secret" in result.stdout + result.stderr


def test_doctor_names_a_bad_config_key(pam_stack: PamStack) -> None:
    body = pam_stack.config_path.read_text().removesuffix("...\n")  # the key goes before the end marker
    lines = body.count("\n")
    pam_stack.config_path.write_text(body + "enforse: all\n...\n")
    result = doctor(pam_stack.config_path, "--pam-dir", str(pam_stack.root))
    assert result.returncode != 0
    assert f"{pam_stack.config_path}:{lines + 1}:1: unknown key in top level (known: " in result.stdout
    assert "enforse" not in result.stdout + result.stderr  # an unknown key could be a misplaced secret


def test_doctor_flags_pam_lines_that_let_a_failure_through(pam_stack: PamStack) -> None:
    pam_dir = pam_stack.root / "pam.d"
    pam_dir.mkdir()
    (pam_dir / "good").write_text("@include common-auth\n"
                                  "auth [success=ok ignore=ignore default=die] pam_linkus.so\n")
    (pam_dir / "sshd").write_text("# sshd\nauth requisite pam_unix.so\nauth\tsufficient\tpam_linkus.so\n")
    (pam_dir / "login").write_text("auth required pam_unix.so\n"
                                   "AUTH [success=ok default=ignore] pam_linkus.so \\\n  debug\n")
    (pam_dir / "su").write_text("auth required pam_linkus.so\nauth required pam_unix.so\n")
    (pam_dir / "chfn").write_text("@include common-auth\nauth required pam_python.so pam_linkus.py\n")
    (pam_dir / "web").write_text("@include common-auth\nauth required pam_linkus.so config=/etc/x.yaml\n")
    (pam_dir / "other").write_text("auth sufficient pam_rootok.so\n")
    result = doctor(pam_stack.config_path, "--pam-dir", str(pam_dir))
    out = result.stdout
    assert result.returncode == 1
    assert f"ok   pam: {pam_dir}/good:2: auth [success=ok ignore=ignore default=die] pam_linkus.so" in out
    assert f"FAIL pam: {pam_dir}/sshd:3: 'sufficient'" in out
    assert f"FAIL pam: {pam_dir}/login:2: auth_err=ignore maxtries=ignore" in out
    assert f"FAIL pam: {pam_dir}/su:1: no password module" in out
    assert f"FAIL pam: {pam_dir}/chfn:2: loads pam_linkus.py through pam_python" in out
    assert f"FAIL pam: {pam_dir}/web:2: option config= belongs to the old pam_python module" in out
    assert "pam.d/other" not in out


def test_doctor_checks_smtp_when_an_extension_uses_email(pam_stack: PamStack) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    pam_stack.write_config(smtp={"host": "127.0.0.1", "port": closed_port, "security": "none", "timeout": 3})
    pam_stack.extensions_path.write_text('extensions:\n  "2001":\n    method: email\n    email: a@example.com\n...\n')
    result = doctor(pam_stack.config_path, "--pam-dir", str(pam_stack.root))
    assert result.returncode == 1
    assert f"FAIL smtp: 127.0.0.1:{closed_port} (none): ConnectionRefusedError" in result.stdout


def test_doctor_smtp_ok_against_a_real_server(pam_stack: PamStack) -> None:
    import socket

    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            raise AssertionError("doctor must not send mail")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        pam_stack.write_config(smtp={"host": "127.0.0.1", "port": port, "security": "none", "timeout": 5})
        result = doctor(pam_stack.config_path, "--smtp", "--pam-dir", str(pam_stack.root))
        assert f"ok   smtp: 127.0.0.1:{port} (none)" in result.stdout, result.stdout
    finally:
        controller.stop()


def test_doctor_shows_the_gates_sites_and_warns_on_risky_ones(pam_stack: PamStack) -> None:
    """Each site on a line (host, path, who, enforce, exempt networks, lifetimes); WARN for a site any
    extension passes on its password alone, a wide exempt network, an empty return_hosts, a missing group."""
    risky = {"enforce": "enrolled", "idle_timeout": 600, "sites": [
        {"name": "phones", "path": "/provisioning/", "allow_extensions": ["201"],
         "exempt_networks": ["10.0.0.0/8", "192.168.7.0/24", "fd00::/48"]},
        {"name": "open", "host": "pbx.example.com", "path": "/ucp/", "enforce": "enrolled",
         "session_lifetime": 3600}]}
    pam_stack.write_config(gate=risky)
    out = doctor(pam_stack.config_path, "--pam-dir", str(pam_stack.root)).stdout
    gate_lines = [line for line in out.splitlines() if " gate" in line]
    assert ("ok   gate site open: pbx.example.com /ucp/; who may pass: any extension; enforce enrolled; exempt "
            "networks none; session 3600 s, idle 600 s") in gate_lines, out
    assert ("ok   gate site phones: no host (return_hosts is empty) /provisioning/; who may pass: extensions 201; "
            "enforce enrolled; exempt networks 10.0.0.0/8, 192.168.7.0/24, fd00::/48; session 43200 s, idle 600 s"
            ) in gate_lines, out
    warns = [line for line in gate_lines if line.startswith("WARN")]
    assert len(warns) == 5, out
    # linkusd's own load-time warning (config.gate_warnings), word for word
    assert warns[0] == "WARN gate: return_hosts is empty, so the sites without host (phones) match no request (403)"
    assert "WARN gate return_hosts: empty: a return URL naming a host always goes to default_return" in warns[1]
    assert warns[2].startswith("WARN gate site phones: exempt network 10.0.0.0/8 is wide (16777216 addresses)")
    assert warns[3].startswith("WARN gate site phones: exempt network fd00::/48 is wide")
    assert warns[4].startswith("WARN gate site open: any extension may pass, and one without 2FA on its password")

    safe = {"enforce": "all", "return_hosts": ["pbx.example.com"], "sites": [
        {"name": "admin", "path": "/admin/", "allow_groups": ["root"], "exempt_networks": ["192.168.7.0/24"]},
        {"name": "open", "path": "/ucp/", "enforce": "enrolled"},
        {"name": "typo", "path": "/x/", "allow_groups": ["no-such-group-linkus"]}]}
    pam_stack.write_config(gate=safe)
    out = doctor(pam_stack.config_path, "--pam-dir", str(pam_stack.root)).stdout
    gate_lines = [line for line in out.splitlines() if " gate" in line]
    assert "ok   gate site admin: any of return_hosts (pbx.example.com) /admin/; who may pass: Unix groups root" \
           in "\n".join(gate_lines), out
    assert [line for line in gate_lines if line.startswith("WARN")] == [
        "WARN gate: site 'typo': Unix group 'no-such-group-linkus' (allow_groups) does not exist on this host"]
    pam_stack.write_config(gate={"return_hosts": ["pbx.example.com"], "sites": []})
    out = doctor(pam_stack.config_path, "--pam-dir", str(pam_stack.root)).stdout
    assert "WARN gate: no sites: every request the gate is asked about is refused (403)" in out.splitlines(), out


def test_doctor_warns_when_the_self_service_stack_locks_passwords(pam_stack: PamStack) -> None:
    """pam_faillock/pam_tally2 in self_service.pam_service (also through an include): a stranger's wrong
    passwords at the page or the gate would lock the owner's password and get the owner's right password
    logged as wrong from the owner's address (docs/web.md): a WARN naming the module."""
    pam_dir = pam_stack.root / "pam.d"
    pam_dir.mkdir()
    pam_stack.write_config(self_service={"pam_service": "linkus-self"})
    (pam_dir / "linkus-self").write_text("auth required pam_unix.so\naccount required pam_unix.so\n")
    lines = doctor(pam_stack.config_path, "--pam-dir", str(pam_dir)).stdout.splitlines()
    assert not [line for line in lines if "self-service PAM service" in line and line.startswith("WARN")], lines
    (pam_dir / "common-auth").write_text("auth required pam_faillock.so preauth\nauth required pam_unix.so\n"
                                         "auth [default=die] pam_faillock.so authfail\n")
    for stack in ("@include common-auth\n", "auth include common-auth\n",
                  "AUTH\trequired\t/lib/x86_64-linux-gnu/security/pam_tally2.so deny=3\nauth required pam_unix.so\n"):
        (pam_dir / "linkus-self").write_text(stack)
        out = doctor(pam_stack.config_path, "--pam-dir", str(pam_dir)).stdout
        (warn,) = [line for line in out.splitlines() if line.startswith("WARN self-service PAM service")]
        assert "pam_faillock" in warn or "pam_tally2" in warn, warn
        assert "linkus-self uses" in warn and "fail2ban" in warn
