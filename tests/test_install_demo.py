"""`make install` (packaging/install.sh) and `make demo` (packaging/demo.py) on this machine, as the
README tells a new user to run them on a fresh Debian 12 without systemd as PID 1.

install.sh writes system paths (the PAM module directory, /usr/local/sbin, /etc/pam_linkus,
/var/lib/pam_linkus) and starts linkusd on /run/linkusd: those paths are saved byte for byte
and put back afterwards (tests/machine_state.py, the lock shared with the package test), a
linkusd already running there is stopped for the test and started again after it, and the
venv goes to a throwaway PREFIX. On a host where systemd is PID 1, install.sh enables the
units instead; a test does not do that to a real host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, require_root
from machine_state import Snapshot, machine_lock

from pam_linkus.protocol import call_control

pytestmark = [pytest.mark.pam, pytest.mark.timeout(300)]

MODULE = Path(f"/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}/security/pam_linkus.so")
RUN_DIR = Path("/run/linkusd")
LOCK = RUN_DIR / "linkusd.lock"
MACHINE_PATHS = (MODULE, Path("/etc/pam_linkus"), Path("/var/lib/pam_linkus"), Path("/usr/local/sbin/linkusd"),
                 Path("/usr/local/sbin/linkus-2fa"), Path("/usr/local/bin/linkus-web"),
                 Path("/lib/security/pam_linkus.py"))
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PIP_NO_INDEX": "1"}
OLD_LINE = "auth [success=ok ignore=ignore default=die] pam_python.so pam_linkus.py config=/etc/pam_linkus/x.yaml\n"


def install(prefix: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "packaging" / "install.sh"), str(prefix)], capture_output=True,
                          text=True, timeout=240, check=False, env={**CLEAN_ENV, **env}, stdin=subprocess.DEVNULL)


def running_pid() -> int | None:
    """The pid of the linkusd holding /run/linkusd's instance lock, or None."""
    if not LOCK.exists():
        return None
    held = subprocess.run(["flock", "-n", str(LOCK), "true"], check=False).returncode != 0
    return int(LOCK.read_text().split()[0]) if held else None


def stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), f"linkusd {pid} did not stop"


@pytest.fixture(scope="module")
def fresh_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_root()
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is PID 1: install.sh would enable units on this real host")
    with machine_lock():
        before = running_pid()
        if before is not None:
            stop(before)
        saved = Snapshot(MACHINE_PATHS)
        saved.remove()
        prefix = tmp_path_factory.mktemp("prefix")
        try:
            yield {"prefix": prefix}
        finally:
            pid = running_pid()
            if pid is not None:
                stop(pid)
            saved.restore()
            if before is not None and os.access("/usr/local/sbin/linkusd", os.X_OK):
                subprocess.run(["/usr/local/sbin/linkusd"], check=False, env=CLEAN_ENV, timeout=60)


def test_install_refuses_stacks_that_load_the_pam_python_module(fresh_machine: dict[str, Any]) -> None:
    old = Path("/etc/pam.d", f"linkus-test-{os.urandom(4).hex()}")
    old.write_text(OLD_LINE)
    try:
        refused = install(fresh_machine["prefix"] / "refused")
    finally:
        old.unlink()
    assert refused.returncode == 1
    assert f"install.sh:   {old}" in refused.stderr and "LINKUS_MIGRATE_PAM=yes make install" in refused.stderr
    # Refused before anything changed.
    assert not (fresh_machine["prefix"] / "refused").exists() and not MODULE.exists()
    assert not Path("/etc/pam_linkus").exists()


@pytest.fixture(scope="module")
def installed(fresh_machine: dict[str, Any]) -> Iterator[dict[str, Any]]:
    # The first install is an upgrade whose admin agreed to the rewrite of the old PAM lines.
    old = Path("/etc/pam.d", f"linkus-test-{os.urandom(4).hex()}")
    old.write_text("auth requisite pam_unix.so\n" + OLD_LINE)
    backup = old.with_name(old.name + ".linkus-bak")
    try:
        first = install(fresh_machine["prefix"], LINKUS_MIGRATE_PAM="yes")
        migrated, kept = old.read_text(), backup.read_text() if backup.exists() else None
    finally:
        old.unlink()
        backup.unlink(missing_ok=True)
    assert first.returncode == 0, first.stdout + first.stderr
    pid = running_pid()
    again = install(fresh_machine["prefix"])
    assert again.returncode == 0, again.stdout + again.stderr
    yield {"first": first, "again": again, "pid": pid, "prefix": fresh_machine["prefix"], "migrated": migrated,
           "kept": kept}


def test_install_with_migrate_pam_rewrites_the_old_lines(installed: dict[str, Any]) -> None:
    assert installed["migrated"] == ("auth requisite pam_unix.so\n"
                                     "auth [success=ok ignore=ignore default=die] pam_linkus.so\n")
    assert installed["kept"] == "auth requisite pam_unix.so\n" + OLD_LINE


def test_install_layout(installed: dict[str, Any]) -> None:
    venv = installed["prefix"] / "venv"
    expected = {MODULE: ("file", 0o644), Path("/etc/pam_linkus"): ("dir", 0o755),
                Path("/etc/pam_linkus/pam_linkus.yaml"): ("file", 0o600),
                Path("/etc/pam_linkus/extensions.yaml"): ("file", 0o600), Path("/var/lib/pam_linkus"): ("dir", 0o700)}
    for path, (kind, mode) in expected.items():
        st = os.lstat(path)
        assert (stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)), path
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, 0), path
    assert MODULE.read_bytes() == (REPO / "native" / "pam_linkus.so").read_bytes()
    assert os.readlink("/usr/local/sbin/linkusd") == str(venv / "bin" / "linkusd")
    assert os.readlink("/usr/local/sbin/linkus-2fa") == str(venv / "bin" / "linkus-2fa")
    assert Path("/etc/pam_linkus/pam_linkus.yaml").read_bytes() == (REPO / "packaging/pam_linkus.yaml").read_bytes()
    assert subprocess.run(["id", "-gn", "linkus-web"], capture_output=True, text=True, check=False).stdout == \
        "linkus-web\n"
    assert os.readlink("/usr/local/bin/linkus-web") == str(venv / "bin" / "linkus-web")


def test_install_started_linkusd_and_a_second_install_reloads_it(installed: dict[str, Any]) -> None:
    pid = installed["pid"]
    assert pid is not None and f"started in the background (no systemd): pid {pid}" in installed["first"].stdout
    assert f"linkusd is running (pid {pid}): told to reload" in installed["again"].stdout
    assert running_pid() == pid  # the same daemon, not a second one
    status = call_control(str(RUN_DIR / "pam.sock"), timeout=10)
    assert status["loaded"] is True, status
    script = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()
    assert os.path.realpath(script) == str(installed["prefix"] / "venv" / "bin" / "linkusd")


def test_demo_passes_twice_and_leaves_nothing(installed: dict[str, Any]) -> None:
    python = installed["prefix"] / "venv" / "bin" / "python"
    # Other test runs may add users and services meanwhile: look only at the demo's own names.
    def demo_leftovers() -> list[str]:
        users = [line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines()]
        return [name for name in (*users, *os.listdir("/etc/pam.d"), *os.listdir("/run"))
                if name.startswith("linkus-demo")]

    assert demo_leftovers() == []
    for _ in range(2):
        demo = subprocess.run([str(python), str(REPO / "packaging" / "demo.py")], capture_output=True, text=True,
                              timeout=120, check=False, env=CLEAN_ENV, cwd="/")
        assert demo.returncode == 0 and demo.stdout.rstrip().endswith("Demo passed."), demo.stdout + demo.stderr
        assert "System linkusd (/run/linkusd/pam.sock): serving." in demo.stdout
        for label, verdict in (("right code ", "accepted"), ("wrong code ", "refused"), ("(replay)", "refused")):
            line = next(line for line in demo.stdout.splitlines() if label in line)
            assert f"-> {verdict}" in line and "[as expected]" in line, line
    assert demo_leftovers() == []
