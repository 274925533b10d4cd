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
