"""`apt purge` (postrm purge) leaves no pam-linkus file behind, nothing of the admin's is removed, and
a running linkusd keeps its instance lock. The real script runs unchanged in a private root
(tests/private_root.py): this machine's /etc/pam_linkus, /var/lib/pam_linkus and /run/linkusd are
never touched."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from private_root import PrivateRoot, private_root

REPO = Path(__file__).resolve().parent.parent
POSTRM = REPO / "packaging" / "debian" / "libpam-linkus.postrm"
LOCK = "/run/linkusd/linkusd.lock"


@pytest.fixture
def root() -> Iterator[PrivateRoot]:
    with private_root() as made:
        # As on a fresh machine, whatever this one has installed (only the root's copy goes).
        made.run(["rm", "-rf", "/etc/pam_linkus", "/var/lib/pam_linkus"])
        made.put(POSTRM, "/tmp/postrm")
        yield made


def run_postrm(root: PrivateRoot, action: str) -> None:
    root.run(["sh", "-e", "/tmp/postrm", action], timeout=30)


def make_install(root: PrivateRoot) -> Path:
    etc = root.path("/etc/pam_linkus")
    etc.mkdir(parents=True)
    state = root.path("/var/lib/pam_linkus")
    state.mkdir(parents=True)
    (state / "state.db").write_text("")
    for name in ("extensions.yaml", "extensions.yaml.lock", ".extensions.yaml.0123abcd.tmp"):
        (etc / name).write_text("")
    root.path("/run/linkusd").mkdir(mode=0o755)
    root.path(LOCK).write_text("")
    return etc


def test_purge_removes_lock_and_directory(root: PrivateRoot) -> None:
    etc = make_install(root)
    run_postrm(root, "purge")
    assert not etc.exists() and not root.path("/var/lib/pam_linkus").exists()
    assert not root.path("/run/linkusd").exists()


def test_purge_keeps_the_admins_own_files(root: PrivateRoot) -> None:
    etc = make_install(root)
    (etc / "smtp.password").write_text("x")
    run_postrm(root, "purge")
    assert sorted(p.name for p in etc.iterdir()) == ["smtp.password"]


def test_remove_keeps_everything(root: PrivateRoot) -> None:
    etc = make_install(root)
    run_postrm(root, "remove")
    assert (etc / "extensions.yaml").exists() and (etc / "extensions.yaml.lock").exists()


def test_purge_keeps_the_lock_of_a_running_linkusd(root: PrivateRoot) -> None:
    """Deleting a running linkusd's lock let a second linkusd start and take its socket: a lock that
    is held stays (the daemon removes nothing on exit; the next boot's /run starts empty)."""
    make_install(root)
    holder = root.popen(["flock", LOCK, "sleep", "60"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while root.run(["flock", "-n", LOCK, "true"], check=False).returncode == 0:
            assert time.monotonic() < deadline, "flock did not take the lock"
            time.sleep(0.05)
        run_postrm(root, "purge")
        assert root.path(LOCK).exists()
        assert root.run(["flock", "-n", LOCK, "true"], check=False).returncode != 0  # the same, held file
    finally:
        holder.kill()
        holder.wait(10)
