"""Build the compiled caches now, so that no login pays for parsing the YAML.

``linkus-2fa warm`` calls ``warm``; so can any tool that has just written
pam_linkus.yaml or extensions.yaml (the first login after an edit would
otherwise rebuild the index itself -- correct, but seconds with 100,000
extensions). Without it nothing goes wrong: every login checks the caches
against the files and rebuilds what is stale.
"""

from __future__ import annotations

import os
import time

from pam_linkus.errors import ConfigError
from pam_linkus.filecache import DEFAULT_CACHE_DIR, RACY_NS, CacheDir

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable

#: Temporary files older than this were left by a writer that died.
STALE_TEMPORARY_NS = 3600 * 1_000_000_000


def warm(
    config_path: str,
    cache_dir: str = DEFAULT_CACHE_DIR,
    *,
    clock_ns: Callable[[], int] = time.time_ns,
    sleep: Callable[[float], object] = time.sleep,
) -> list[str]:
    """Compile the main config and index extensions.yaml into ``cache_dir``; one report line each.

    A file changed within the last filecache.RACY_NS cannot be cached yet (its
    timestamps could still collide with a further edit); ``warm`` waits that
    long rather than leave the next login to rebuild. Raises ConfigError for a
    broken file or an unusable cache directory.
    """
    from nss_config import yaml_index
    from pam_linkus import config_cache

    with CacheDir.open(cache_dir) as cache:
        if not cache.usable:
            raise ConfigError(
                "cache directory must be a directory owned by root with mode 0700 (or not exist, in a "
                "root-owned directory that only root can write)",
                cache_dir,
            )
        removed = cache.remove_stale_temporaries(clock_ns() - STALE_TEMPORARY_NS)
    lines = [f"cache directory {cache_dir}" + (f": removed {removed} stale temporary files" if removed else "")]
    _wait_until_settled(config_path, clock_ns, sleep)
    config, written = config_cache.build(config_path, cache_dir, clock_ns=clock_ns)
    lines.append(f"config {config_path}: {'compiled' if written else 'valid, NOT cached'}")
    if "yaml" in config.sources:
        _wait_until_settled(config.yaml.path, clock_ns, sleep)
        count, written = yaml_index.build(config.yaml.path, cache_dir, clock_ns=clock_ns)
        lines.append(f"extensions {config.yaml.path}: {count} extensions, {'indexed' if written else 'NOT indexed'}")
    return lines


def _wait_until_settled(path: str, clock_ns: Callable[[], int], sleep: Callable[[float], object]) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return  # the build that follows reports the problem with the file
    wait_ns = max(st.st_mtime_ns, st.st_ctime_ns) + RACY_NS - clock_ns()
    if 0 < wait_ns <= RACY_NS + 1_000_000_000:
        sleep(wait_ns / 1e9 + 0.05)
