"""What the tests that install pam-linkus on this machine share: an exact snapshot of the paths they
may change, and one lock so that two such runs (other checkouts on the same machine) never
install, purge or move aside the same files at the same time.

Used by tests/test_debian_package.py (apt install / purge) and tests/test_install_demo.py
(`make install`, `make demo`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Held while a run has pam-linkus installed by a test (package or make install).
LOCK_FILE = Path("/run/lock" if os.path.isdir("/run/lock") else "/tmp", "pam-linkus-package-test.lock")


class Snapshot:
    """An exact copy of some paths (file bytes, symlink targets, modes, owners), to compare and put back."""

    def __init__(self, roots: tuple[Path, ...]):
        self.roots = roots
        self.entries = self._take()

    def _take(self) -> dict[Path, tuple[str, int, int, int, bytes | str | None]]:
        entries: dict[Path, tuple[str, int, int, int, bytes | str | None]] = {}

        def walk(path: Path) -> None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries[path] = ("link", mode, st.st_uid, st.st_gid, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[path] = ("dir", mode, st.st_uid, st.st_gid, None)
                for child in sorted(path.iterdir()):
                    walk(child)
            elif stat.S_ISREG(st.st_mode):
                entries[path] = ("file", mode, st.st_uid, st.st_gid, path.read_bytes())
            else:
                raise AssertionError(f"{path}: not a file, directory or symlink; not touching it")

        for root in self.roots:
            walk(root)
        return entries

    def differences(self) -> list[Path]:
        now = self._take()
        return sorted(p for p in set(now) | set(self.entries) if now.get(p) != self.entries.get(p))

    def remove(self) -> None:
        for root in self.roots:
            if root.is_dir() and not root.is_symlink():
                shutil.rmtree(root)
            elif root.exists() or root.is_symlink():
                root.unlink()

    def restore(self) -> None:
        if not self.differences():
            return
        self.remove()
        for path, (kind, mode, uid, gid, data) in sorted(self.entries.items()):
            if kind == "dir":
                path.mkdir()
            elif kind == "link":
                assert isinstance(data, str)
                os.symlink(data, path)
                continue
            else:
                assert isinstance(data, bytes)
                path.write_bytes(data)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        assert not self.differences()


@contextlib.contextmanager
def machine_lock(timeout: float = 240) -> Iterator[None]:
    """One package test per machine at a time: parallel test runs (other checkouts) would install
    and purge the same package and save each other's state. Waits, bounded, for the other run."""
    with open(LOCK_FILE, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another package test held {LOCK_FILE} for {timeout:.0f} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
