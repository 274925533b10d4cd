"""Compiled caches of the YAML files, so a login neither imports ``yaml`` nor parses a file.

Why: pam_python starts a fresh interpreter in every login process, so whatever a
login imports or parses it pays every time. Importing ``yaml`` alone costs more
than the rest of a login, and parsing an extensions file of 100,000 entries
takes seconds. So the PAM module keeps, in a root-only directory (the PAM
option ``cache_dir=``, default /var/lib/pam_linkus/cache), a compiled copy of
the main config and an index of extensions.yaml, both in ``marshal`` format
(a builtin module: free to import, and it can only build plain data, never
objects that run code).

A cache is a convenience, never an authority. Before one is used:

* the source file itself passes every check of ``strictyaml.open_checked`` (owner,
  mode, no symlink, directory) on every login, exactly as without a cache;
* the cache directory is opened without following symlinks and must be a
  directory owned by us (root) with no access for group or others; the cache
  file likewise (regular, ours, mode 0600), opened relative to that directory;
* its header must name this format, this cache kind and this source path, and
  the source's identity at build time -- device, inode, size, mtime, ctime
  (nanoseconds), owner and mode -- must equal the fstat of the source now.

Anything else -- missing, corrupt, foreign-owned, another format, a different
identity -- means: ignore it, parse the YAML, and write a fresh cache. An edit
of the source changes its ctime (which no one can set back without changing
the system clock), so the very next login sees the edit.

Racy files: file system timestamps are coarser than the clock (a kernel tick,
or one second on some file systems), so a file edited twice within one tick
can keep the same identity. A cache is therefore written only when the source
was last changed more than ``RACY_NS`` before the build started (the rule git
uses for its index); until then a login parses the YAML (or, for a large
extensions file, waits out the rest of ``RACY_NS`` and then builds the index:
see nss_config.yaml_index.SETTLE_WAIT_BYTES). A writer that
edits the file after the build began gives it a ctime past ``built - RACY_NS``,
which differs from the recorded one.

Writes are atomic: a temporary file in the same directory, then rename, so a
reader sees the old cache or the new one, never half of one. Parallel logins
that all find the cache stale all rebuild it; the last rename wins, and every
one of them is equally valid.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from typing import Any

#: Bump when the layout of any cache changes; older caches are then ignored and rebuilt.
FORMAT = 1
MAGIC = b"LNKSC\x00\x00\x01"
#: A source changed less than this before a build is not cached (see "Racy files").
RACY_NS = 2_000_000_000
#: Largest header we read; a header that claims more is corrupt.
MAX_HEADER = 8192
#: Largest cache file we open at all.
MAX_CACHE_BYTES = 1 << 30
DEFAULT_CACHE_DIR = "/var/lib/pam_linkus/cache"
#: MAGIC, then the header's length and CRC-32 (4 bytes each, big-endian), then the header.
_PREFIX = len(MAGIC) + 8
_PYTHON = (sys.version_info[0], sys.version_info[1])


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What must not change between the build of a cache and its use."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_mode)


def settled(st: os.stat_result, build_ns: int) -> bool:
    """True when the source was last changed long enough before ``build_ns`` to cache it."""
    return max(st.st_mtime_ns, st.st_ctime_ns) < build_ns - RACY_NS


def cache_name(kind: str, source: str) -> str:
    """File name of the cache of ``source``: FNV-1a of the path (the header names the path
    exactly, so two paths with one name only evict each other's cache)."""
    h = 0xCBF29CE484222325
    for byte in source.encode("utf-8", "surrogateescape"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{kind}-{h:016x}.cache"


class CacheDir:
    """An open, checked cache directory; files are opened relative to its descriptor.

    ``CacheDir.open(path)`` never fails: when the directory cannot be used safely,
    ``usable`` is False, nothing is read and nothing written (slower, never less safe).
    Use it in ``with``.
    """

    __slots__ = ("path", "fd")

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd

    @property
    def usable(self) -> bool:
        return self.fd >= 0

    @classmethod
    def open(cls, path: str) -> CacheDir:
        """Open (creating it 0700 if its parent is root's) the cache directory."""
        return cls(path, _open_dir(path))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CacheDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_entry(self, name: str) -> int | None:
        """Open cache file ``name`` for reading if it is a regular file of ours, mode 0600."""
        if self.fd < 0:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError:
            return None
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077
                or st.st_size > MAX_CACHE_BYTES):
            os.close(fd)
            return None
        return fd

    def write(self, name: str, data: bytes) -> bool:
        """Replace cache file ``name`` atomically; False (and nothing changed) on any error."""
        if self.fd < 0:
            return False
        tmp = f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.fd)
        except OSError:
            return False
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            return False
        return True

    def rebuild_lock(self, name: str, timeout: float) -> RebuildLock:
        """``with cache.rebuild_lock(name, timeout) as locked``: one process at a time rebuilds ``name``.

        Why: after an edit of a file with 100,000 extensions, every login that
        starts during the seconds of the rebuild would parse the YAML too; with
        the lock they wait for the one rebuild and then read the new index.
        ``locked`` is False when the lock could not be had within ``timeout``
        (the caller then parses on its own: slower, never wrong). The lock is an
        flock on ``.<name>.lock``, released by the kernel if its holder dies.
        """
        return RebuildLock(self, name, timeout)

    def remove_stale_temporaries(self, older_than_ns: int) -> int:
        """Remove temporary files left by writers that died (the warm command calls this)."""
        removed = 0
        if self.fd < 0:
            return removed
        for entry in os.scandir(self.fd):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                try:
                    st = entry.stat(follow_symlinks=False)
                    if st.st_mtime_ns < older_than_ns:
                        os.unlink(entry.name, dir_fd=self.fd)
                        removed += 1
                except OSError:
                    continue
        return removed


class RebuildLock:
    """See ``CacheDir.rebuild_lock``."""

    __slots__ = ("_cache", "_name", "_timeout", "_fd")

    def __init__(self, cache: CacheDir, name: str, timeout: float):
        self._cache = cache
        self._name = f".{name}.lock"
        self._timeout = timeout
        self._fd = -1

    def __enter__(self) -> bool:
        import fcntl
        import time

        if self._cache.fd < 0:
            return False
        try:
            fd = os.open(self._name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self._cache.fd)
        except OSError:
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            return False
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
                continue
            except OSError:
                os.close(fd)
                return False
            self._fd = fd
            return True

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1


def _open_dir(path: str) -> int:
    """A descriptor of the checked cache directory, or -1."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not _may_create_in(os.path.dirname(path.rstrip("/")) or "/"):
            return -1
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # a parallel login made it; it is checked below like any other
        except OSError:
            return -1
        try:
            fd = os.open(path, flags)
        except OSError:
            return -1
    except OSError:
        return -1  # a symlink (ELOOP), not a directory, no permission
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        return -1
    return fd


def _may_create_in(parent: str) -> bool:
    """Create the cache directory only inside a directory root owns and only root can write."""
    try:
        st = os.lstat(parent)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def pack(kind: str, source: str, source_st: os.stat_result, build_ns: int, fields: dict[str, Any],
         body: bytes) -> bytes:
    """Header (with ``fields``) followed by ``body``.

    Offsets that ``fields`` record are relative to the start of the body;
    ``body_start`` in the header says where that is in the file.
    """
    header = {
        "kind": kind,
        "format": FORMAT,
        "python": _PYTHON,
        "source": source,
        "identity": identity(source_st),
        "built_ns": build_ns,
        **fields,
    }
    # The header's own length decides where the body starts, and the header
    # records that start: iterate until the length is stable (at most twice).
    start = 0
    for _ in range(4):
        blob = marshal.dumps({**header, "body_start": start})
        new_start = _PREFIX + len(blob)
        if new_start == start:
            break
        start = new_start
    if len(blob) > MAX_HEADER:
        raise ValueError("cache header too large")
    return MAGIC + len(blob).to_bytes(4, "big") + crc(blob).to_bytes(4, "big") + blob + body


def read_header(fd: int, kind: str, source: str, source_st: os.stat_result) -> dict[str, Any] | None:
    """The header of the cache file ``fd`` if it was built from exactly this source file; else None."""
    try:
        head = os.pread(fd, _PREFIX + MAX_HEADER, 0)
    except OSError:
        return None
    if len(head) < _PREFIX or not head.startswith(MAGIC):
        return None
    size = int.from_bytes(head[len(MAGIC): len(MAGIC) + 4], "big")
    blob = head[_PREFIX: _PREFIX + size]
    if size > MAX_HEADER or len(blob) != size or crc(blob) != int.from_bytes(head[len(MAGIC) + 4: _PREFIX], "big"):
        return None
    try:
        # Only bytes that we wrote (root-only file in a root-only directory) and
        # that passed their CRC reach marshal; it builds plain data, runs nothing.
        header = marshal.loads(blob)  # noqa: S302
    except (ValueError, EOFError, TypeError):
        return None
    if not isinstance(header, dict):
        return None
    built_ns = header.get("built_ns")
    if (
        header.get("kind") != kind
        or header.get("format") != FORMAT
        or header.get("python") != _PYTHON
        or header.get("source") != source
        or header.get("identity") != identity(source_st)
        or header.get("body_start") != _PREFIX + size
        or not isinstance(built_ns, int)
        or not settled(source_st, built_ns)
    ):
        return None
    return header


def crc(data: bytes) -> int:
    """CRC-32 of a cache block: catches a torn or damaged file (binascii is builtin, free)."""
    import binascii

    return binascii.crc32(data)
