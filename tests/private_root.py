"""A private root for the tests that install, purge or start system-wide things (`make install`,
the Debian package, its maintainer scripts): they run there, never on this machine's own paths.

The root is an overlay of this machine's / (read-only lower layer) with a throwaway upper layer on a
tmpfs, in a private mount namespace (``unshare --mount --propagation private``), with fresh /run and
/tmp. Whatever a test writes there — the PAM module next to pam_unix.so, /usr/local, /opt,
/etc/pam_linkus, /var/lib/pam_linkus, /var/lib/dpkg, /etc/systemd, users and groups, linkusd's
/run/linkusd — lives only in the upper layer and is gone when the root is closed. A linkusd that this
machine runs on /run/linkusd is neither seen nor disturbed (tests/conftest.py checks that it still
answers, with the same state file, at the end of the run).

Commands run inside with ``run`` (nsenter into the namespace and the root); the test process reads and
writes the root's files and connects to its sockets through ``path()`` (/proc/PID/root of the process
that holds the namespace). ``close`` ends every process still in the namespace (a daemonized linkusd)
and with them the namespace and its tmpfs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: The checkout the tests run from (bound into every root at the same path).
REPO = Path(__file__).resolve().parent.parent
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Where the (empty, on this machine) mount points of the private roots are made.
BASE = Path("/run/linkus-tests")

#: Runs in the new mount namespace: the overlay, the API file systems, fresh /run and /tmp; then the
#: holder (the root's first process) waits for its stdin to close.
SETUP = r"""
set -eu
base=$1
mount -t tmpfs -o mode=0700 linkus-root "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay linkus-root -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
r=$base/root
mount --rbind /dev "$r/dev"
mount --rbind /proc "$r/proc"
mount --rbind /sys "$r/sys"
mount -t tmpfs -o mode=0755 linkus-run "$r/run"
mkdir -m 1777 "$r/run/lock"
mount -t tmpfs -o mode=1777 linkus-tmp "$r/tmp"
# This checkout, at its own path: the fresh /tmp or /run would hide one that lies there (CI's clone
# may), and the overlay shows only the file system of / (not a checkout on a mount of its own).
repo=$2
mkdir -p "$r$repo"
mount --bind "$repo" "$r$repo"
# The account files as they are now (copied up: users other runs add or delete on this machine
# meanwhile do not change under the root), without the lock files such a run may hold right now.
for f in passwd group shadow gshadow subuid subgid; do
    if [ -e "$r/etc/$f" ]; then touch -c -r "$r/etc/$f" "$r/etc/$f"; fi
done
rm -f "$r/etc/passwd.lock" "$r/etc/group.lock" "$r/etc/shadow.lock" "$r/etc/gshadow.lock" "$r/etc/.pwd.lock"
cd "$r"
exec chroot "$r" /bin/sh -c 'echo ready; read -r _ || true'
"""


class PrivateRoot:
    """One private root; see the module docstring. Use ``private_root()``."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root (mount namespaces)")
        BASE.mkdir(mode=0o755, exist_ok=True)
        self.mountpoint = BASE / f"root-{secrets.token_hex(4)}"
        self.mountpoint.mkdir(mode=0o700)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", SETUP, "linkus-root",
             str(self.mountpoint), str(REPO)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLEAN_ENV)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()  # the holder says "ready" or exits (EOF)
        if line != b"ready\n":
            self.holder.wait(10)
            err = self.holder.stderr.read().decode(errors="replace") if self.holder.stderr else ""
            self.mountpoint.rmdir()
            pytest.fail(f"cannot make a private root (unshare, overlayfs on tmpfs): {err.strip()}")
        self.pid = self.holder.pid
        self.namespace = os.readlink(f"/proc/{self.pid}/ns/mnt")
        self.root = Path(f"/proc/{self.pid}/root")

    def path(self, inside: str | Path) -> Path:
        """A path of the root as this process reaches it (files, sockets, directories)."""
        return self.root / str(inside).lstrip("/")

    def run(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 240,
            check: bool = True, input: str | None = None, cwd: str = "/") -> subprocess.CompletedProcess[str]:
        """A command inside the root (as root, with a clean environment unless ``env`` is given)."""
        result = subprocess.run(
            ["nsenter", f"--target={self.pid}", "--mount", "--root", "--wd=/", "--", "env", f"--chdir={cwd}", *cmd],
            capture_output=True, text=True, timeout=timeout, env=env or CLEAN_ENV, check=False,
            input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{list(cmd)} exited {result.returncode} in the private root:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """A long-running process inside the root (closed with the root if still running)."""
        return subprocess.Popen(["nsenter", f"--target={self.pid}", "--mount", "--root", "--wd=/", "--", *cmd],
                                **{"env": CLEAN_ENV, **kw})

    def put(self, source: Path, inside: str) -> str:
        """Copy a file of this machine into the root; returns its path inside."""
        shutil.copy(source, self.path(inside))
        return inside

    def processes(self) -> list[int]:
        """Every process in the root's mount namespace but the holder."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.pid:
                with contextlib.suppress(OSError):
                    zombie = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                    if not zombie and os.readlink(f"/proc/{entry}/ns/mnt") == self.namespace:
                        found.append(int(entry))
        return found

    def close(self) -> None:
        """End every process of the root (TERM, then KILL after 10 s), then the holder: the namespace,
        the overlay and its tmpfs go with the last of them."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.holder.stdin:
            self.holder.stdin.close()
        try:
            self.holder.wait(10)
        except subprocess.TimeoutExpired:
            self.holder.kill()
            self.holder.wait(10)
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream:
                stream.close()
        assert not self.processes(), f"processes left in the private root: {self.processes()}"
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


@contextlib.contextmanager
def private_root() -> Iterator[PrivateRoot]:
    root = PrivateRoot()
    try:
        yield root
    finally:
        root.close()


class Snapshot:
    """An exact copy of some paths (file bytes, symlink targets, modes, owners), to compare later."""

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
                raise AssertionError(f"{path}: not a file, directory or symlink")

        for root in self.roots:
            walk(root)
        return entries

    def differences(self) -> list[Path]:
        now = self._take()
        return sorted(p for p in set(now) | set(self.entries) if now.get(p) != self.entries.get(p))
