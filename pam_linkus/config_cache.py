"""The main config through a compiled cache: a login with a warm cache never imports ``yaml``.

The cache holds the YAML document of pam_linkus.yaml as plain data (after it
validated), keyed by the identity of the file (see pam_linkus.filecache for the
rules that make a stale or planted cache unusable). A hit is validated again by
``Config.from_mapping`` -- a few microseconds -- so a cache can never produce a
config the YAML would not.
"""

from __future__ import annotations

import marshal
import os
import time

from pam_linkus.config import Config
from pam_linkus.filecache import CacheDir, cache_name, crc, identity, pack, read_header, settled
from pam_linkus.strictyaml import MAX_CONFIG_BYTES, open_checked, read_checked

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

KIND = "config"


def load_config_cached(path: str, cache_dir: str, *, clock_ns: Callable[[], int] = time.time_ns) -> Config:
    """Like ``config.load_config``, answering from the cache in ``cache_dir`` when it is valid.

    Errors are the same ConfigErrors as ``load_config`` (file checks run first, on
    every call); an unusable cache is silently rebuilt.
    """
    return _load(path, cache_dir, clock_ns, rebuild=False)[0]


def build(path: str, cache_dir: str, *, clock_ns: Callable[[], int] = time.time_ns) -> tuple[Config, bool]:
    """Parse, validate and cache the config now (``linkus-2fa warm``); True if a cache was written."""
    return _load(path, cache_dir, clock_ns, rebuild=True)


def _load(path: str, cache_dir: str, clock_ns: Callable[[], int], *, rebuild: bool) -> tuple[Config, bool]:
    build_ns = clock_ns()  # before the source is read: see filecache, "Racy files"
    fd, st = open_checked(path, secret=False, max_bytes=MAX_CONFIG_BYTES)
    try:
        with CacheDir.open(cache_dir) as cache:
            name = cache_name(KIND, path)
            data = None if rebuild else _read(cache, name, path, st)
            if data is not None:
                return _finish(Config.from_mapping(data, path), cache_dir), False
            from pam_linkus.strictyaml import load_yaml

            document = load_yaml(read_checked(fd, path, max_bytes=MAX_CONFIG_BYTES), path)
            config = Config.from_mapping(document, path)  # only a valid config is ever cached
            written = False
            if cache.usable and settled(st, build_ns) and identity(os.fstat(fd)) == identity(st):
                body = _dumps(document)
                if body is not None:
                    fields = {"crc": crc(body), "size": len(body)}
                    written = cache.write(name, pack(KIND, path, st, build_ns, fields, body))
            return _finish(config, cache_dir), written
    finally:
        os.close(fd)


def _finish(config: Config, cache_dir: str) -> Config:
    config.cache_dir = cache_dir
    return config


def _read(cache: CacheDir, name: str, path: str, st: os.stat_result) -> dict[str, Any] | None:
    fd = cache.open_entry(name)
    if fd is None:
        return None
    try:
        header = read_header(fd, KIND, path, st)
        if header is None:
            return None
        size, checksum, start = header.get("size"), header.get("crc"), header["body_start"]
        if not isinstance(size, int) or not 0 <= size <= MAX_CONFIG_BYTES * 4:
            return None
        try:
            body = os.pread(fd, size, start)
        except OSError:
            return None
        if len(body) != size or crc(body) != checksum:
            return None
        try:
            data = marshal.loads(body)  # noqa: S302 - our own root-only file, CRC checked: plain data
        except (ValueError, EOFError, TypeError):
            return None
        return data if isinstance(data, dict) else None
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    """The document as exact dicts, lists and scalars (marshal refuses dict subclasses)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise ValueError(f"cannot cache a {type(value).__name__}")


def _dumps(document: Any) -> bytes | None:
    try:
        return marshal.dumps(_plain(document))
    except ValueError:
        return None  # something Config accepted but marshal cannot hold: just do not cache
