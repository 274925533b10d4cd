"""A compiled index of extensions.yaml: a login reads one small bucket, however many extensions there are.

Why: parsing and validating a file of 100,000 extensions takes seconds, and the
PAM module runs in a fresh interpreter for every login. The index is built
from the YAML (after the whole file validated, exactly as without an index)
the first time a login finds it missing or stale, or by ``linkus-2fa warm``,
and then serves lookups in a few system calls:

1. the source file is opened and checked as always (``open_checked``: owner,
   mode, symlink, directory) -- its fstat identity is the index key;
2. the index file's header must name that identity (pam_linkus.filecache);
3. the user name's CRC-32 picks a bucket; one ``pread`` gets the bucket's
   offset, length and CRC from the table, one more gets the bucket (about 16
   extensions, ``marshal`` data), checked against its CRC;
4. the entry found is validated again by ``settings_from_mapping``, the same
   validator the YAML goes through, so the index cannot say what the YAML would not.

Layout after the header (offsets relative to the body): the table, ``buckets``
entries of 16 bytes (offset: 8, length: 4, CRC-32: 4; big-endian), then the
buckets, each a marshalled dict of user name -> entry mapping.

Anything unexpected makes the index a miss: the YAML is parsed, the answer
comes from it, and a new index is written.
"""

from __future__ import annotations

import marshal
import os
import time

from nss_config.base import settings_from_mapping
from pam_linkus.errors import ConfigError
from pam_linkus.filecache import RACY_NS, CacheDir, cache_name, crc, identity, pack, read_header, settled
from pam_linkus.strictyaml import MAX_EXTENSIONS_BYTES, open_checked, read_checked

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from nss_config.base import ExtensionSettings

KIND = "extensions"
#: How long a login waits for another process's rebuild before parsing the YAML itself.
REBUILD_WAIT = 30.0
#: A file at least this large (about 5,000 extensions) that changed less than
#: filecache.RACY_NS ago is waited for (at most that long) rather than parsed
#: unindexed: parsing it costs more than the wait, and after the wait one login
#: rebuilds the index while the others wait for it, instead of every login that
#: starts right after an edit parsing the whole file at once.
SETTLE_WAIT_BYTES = 256 << 10
#: Extensions per bucket on average: a bucket is a few KiB, read and unmarshalled in microseconds.
PER_BUCKET = 16
_SLOT = 16
#: No bucket is larger than this; a table entry that says so is corrupt.
MAX_BUCKET_BYTES = 16 << 20
_ENTRY_FIELDS = ("method", "enabled", "secret", "algorithm", "digits", "period", "email")


def bucket_of(user: str, buckets: int) -> int:
    """The bucket of ``user``: a stable hash (``hash()`` of str differs per process)."""
    import binascii

    return binascii.crc32(user.encode("utf-8", "surrogatepass")) % buckets


def lookup(
    path: str, user: str, cache_dir: str, *, clock_ns: Callable[[], int] = time.time_ns,
    sleep: Callable[[float], object] = time.sleep,
) -> ExtensionSettings | None:
    """The settings of ``user`` from the YAML file at ``path``, through the index in ``cache_dir``.

    Same answers and the same ConfigErrors as ``yaml_source.read_extensions(path).get(user)``.
    """
    build_ns = clock_ns()  # before the source is read: see pam_linkus.filecache, "Racy files"
    fd, st = open_checked(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    try:
        with CacheDir.open(cache_dir) as cache:
            name = cache_name(KIND, path)
            hit, found = _lookup(cache, name, path, st, user)
            if hit:
                return found
            if cache.usable and not settled(st, build_ns) and st.st_size >= SETTLE_WAIT_BYTES:
                wait_ns = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS - build_ns
                if 0 < wait_ns <= RACY_NS:
                    sleep(wait_ns / 1e9 + 0.01)
                    build_ns = clock_ns()  # the content is read after this: the racy rule holds
            if not cache.usable or not settled(st, build_ns):
                return _parse(fd, path).get(user)  # no index can be written: nothing to wait for
            with cache.rebuild_lock(name, REBUILD_WAIT):
                hit, found = _lookup(cache, name, path, st, user)  # rebuilt by whoever held the lock?
                if hit:
                    return found
                extensions = _parse(fd, path)
                _store(cache, name, path, fd, st, build_ns, extensions)
                return extensions.get(user)
    finally:
        os.close(fd)


def build(path: str, cache_dir: str, *, clock_ns: Callable[[], int] = time.time_ns) -> tuple[int, bool]:
    """Parse, validate and index ``path`` now (``linkus-2fa warm``).

    Returns (number of extensions, whether an index was written). No index is
    written while the file is younger than filecache.RACY_NS, or when the
    cache directory is unusable.
    """
    build_ns = clock_ns()
    fd, st = open_checked(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    try:
        extensions = _parse(fd, path)
        with CacheDir.open(cache_dir) as cache:
            written = _store(cache, cache_name(KIND, path), path, fd, st, build_ns, extensions)
        return len(extensions), written
    finally:
        os.close(fd)


def _parse(fd: int, path: str) -> dict[str, ExtensionSettings]:
    from nss_config.yaml_source import parse_extensions
    from pam_linkus.strictyaml import load_yaml

    return parse_extensions(load_yaml(read_checked(fd, path, max_bytes=MAX_EXTENSIONS_BYTES), path), path)


def _lookup(
    cache: CacheDir, name: str, path: str, st: os.stat_result, user: str
) -> tuple[bool, ExtensionSettings | None]:
    """(True, answer) from a valid index; (False, None) when there is none to trust."""
    miss = (False, None)
    fd = cache.open_entry(name)
    if fd is None:
        return miss
    try:
        header = read_header(fd, KIND, path, st)
        if header is None:
            return miss
        buckets, table, start = header.get("buckets"), header.get("table"), header["body_start"]
        if not isinstance(buckets, int) or buckets < 1 or not isinstance(table, int) or table < 0:
            return miss
        try:
            slot = os.pread(fd, _SLOT, start + table + _SLOT * bucket_of(user, buckets))
            if len(slot) != _SLOT:
                return miss
            offset = int.from_bytes(slot[0:8], "big")
            length = int.from_bytes(slot[8:12], "big")
            if length > MAX_BUCKET_BYTES:
                return miss
            blob = os.pread(fd, length, start + offset)
        except (OSError, OverflowError):
            return miss
        if len(blob) != length or crc(blob) != int.from_bytes(slot[12:16], "big"):
            return miss
        try:
            bucket = marshal.loads(blob)  # noqa: S302 - our own root-only file, CRC checked: plain data
        except (ValueError, EOFError, TypeError):
            return miss
        if not isinstance(bucket, dict):
            return miss
        entry = bucket.get(user)
        if entry is None:
            return True, None
        try:
            return True, settings_from_mapping(user, entry, f"{path} (index)", "yaml")
        except ConfigError:
            return miss  # cannot happen for an index we built; the YAML decides
    finally:
        os.close(fd)


def _entry(settings: ExtensionSettings) -> dict[str, Any]:
    """The validated settings as the mapping ``settings_from_mapping`` reads back."""
    values = {key: getattr(settings, key) for key in _ENTRY_FIELDS}
    return {key: value for key, value in values.items() if value is not None}


def encode(extensions: dict[str, ExtensionSettings]) -> tuple[dict[str, int], bytes]:
    """The header fields and body of an index of ``extensions``."""
    buckets = max(1, len(extensions) // PER_BUCKET)
    groups: list[dict[str, dict[str, Any]]] = [{} for _ in range(buckets)]
    for user, settings in extensions.items():
        groups[bucket_of(user, buckets)][user] = _entry(settings)
    table = bytearray()
    blobs = []
    offset = _SLOT * buckets
    for group in groups:
        blob = marshal.dumps(group)
        table += offset.to_bytes(8, "big") + len(blob).to_bytes(4, "big") + crc(blob).to_bytes(4, "big")
        blobs.append(blob)
        offset += len(blob)
    return {"buckets": buckets, "table": 0, "count": len(extensions)}, bytes(table) + b"".join(blobs)


def _store(cache: CacheDir, name: str, path: str, fd: int, st: os.stat_result, build_ns: int,
           extensions: dict[str, ExtensionSettings]) -> bool:
    """Write the index unless the file is too young or changed while it was read."""
    if not cache.usable or not settled(st, build_ns) or identity(os.fstat(fd)) != identity(st):
        return False
    fields, body = encode(extensions)
    return cache.write(name, pack(KIND, path, st, build_ns, fields, body))
