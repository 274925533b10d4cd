"""The YAML source: /etc/pam_linkus/extensions.yaml, parsed once and held in memory.

File format (every key documented in README.md, "Extension settings")::

    extensions:
      "1001":                 # always a quoted string: 1001: would be an integer
        method: totp          # totp | email | none
        secret: JBSWY3DPEHPK3PXP...
        algorithm: SHA1       # optional: SHA1 | SHA256 | SHA512
        digits: 6             # optional: 6 | 8
        period: 30            # optional, seconds
      "1002":
        method: email
        email: alice@example.com
      "1003":
        method: totp
        enabled: false        # 2FA switched off (lost phone)

The whole file is validated when it is loaded, so one broken entry is reported
(and keeps the daemon on its last good snapshot) at once instead of on the day
that extension logs in.

Names: lookups ignore case (``str.casefold``) and return the key as written in
the file (``ExtensionSettings.account``), so ``H1A`` and ``h1a`` are one account
with one replay record and one lockout. Two keys that differ only by case refuse
the file (``file:line:col``). Names with surrounding spaces or control
characters match nothing (``check_user_name``).

linkusd builds a new ``YamlSource`` with ``YamlSource.load(path)`` aside when the
file changes and swaps it in; a ``YamlSource`` never changes after it is built,
so worker threads read it without a lock.

Measured (this machine: Debian 12, 2 cores, Python 3.11, PyYAML 6 with libyaml,
the strict loader of pam_linkus.strictyaml as of this commit): 100,000 TOTP
extensions (a 7.4 MB file) load in 8.9 s with a peak RSS of 378 MB (260 MB
still held by the allocator afterwards); the snapshot itself holds ~40 MB
(tracemalloc); a lookup costs ~1.2 us. Nearly all of the load is the strict
loader's node-based parse (being rewritten on libyaml events by another change):
load in a child process or on events to meet linkusd's reload budget.
"""

from __future__ import annotations

from typing import Any

from nss_config.base import ExtensionSettings, check_user_name, settings_from_mapping
from pam_linkus.errors import ConfigError
from pam_linkus.strictyaml import MAX_EXTENSIONS_BYTES, load_yaml, open_secure

TOP_KEYS = ("extensions", "version")


def parse_extensions(data: Any, path: str, source: str = "yaml") -> dict[str, ExtensionSettings]:
    """Validate a parsed extensions document into settings by the key as written."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping with an 'extensions' key", path)
    marks = getattr(data, "marks", {})
    for key in data:
        if key not in TOP_KEYS:
            line, col = marks.get(key, (0, 0))
            raise ConfigError("unknown top-level key (expected: extensions, version)", f"{path}:{line}:{col}")
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError("version must be 1", path)
    entries = data.get("extensions")
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise ConfigError("extensions must be a mapping of extension name to settings", path)
    entry_marks = getattr(entries, "marks", {})
    result: dict[str, ExtensionSettings] = {}
    for user, entry in entries.items():
        line, col = entry_marks.get(user, (0, 0))
        where = f"{path}:{line}:{col}"
        try:
            check_user_name(user)
        except ValueError:
            raise ConfigError("extension name has surrounding spaces or control characters", where) from None
        result[user] = settings_from_mapping(user, entry, where, source, account=user)
    return result


def read_extensions(path: str) -> dict[str, ExtensionSettings]:
    """Read, check and validate the whole file (it holds secrets: mode 0600, root)."""
    data, _ = open_secure(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    return parse_extensions(load_yaml(data, path), path)


def fold_names(extensions: dict[str, ExtensionSettings], path: str,
               marks: dict[str, tuple[int, int]] | None = None) -> dict[str, ExtensionSettings]:
    """Index by ``casefold``; two names that fold to one refuse the file
    (``path:line:col`` of the second, from ``marks``)."""
    folded: dict[str, ExtensionSettings] = {}
    for name, settings in extensions.items():
        key = name.casefold()
        if key in folded:
            line, col = (marks or {}).get(name, (0, 0))
            raise ConfigError("two extensions differ only by upper/lower case; keep one", f"{path}:{line}:{col}")
        folded[key] = settings
    return folded


class YamlSource:
    """Settings from a root-only YAML file, held in memory; see the module docstring.

    ``YamlSource(path)`` loads at once (ConfigError on a bad file: unavailable);
    ``YamlSource.load(path)`` says the same; ``from_settings`` builds one from
    validated settings (tests, the admin tools).
    """

    name = "yaml"

    def __init__(self, path: str, *, _extensions: dict[str, ExtensionSettings] | None = None):
        self.path = path
        if _extensions is None:
            _extensions = _load(path)
        self._by_name = _extensions

    @classmethod
    def load(cls, path: str) -> YamlSource:
        return cls(path)

    @classmethod
    def from_settings(cls, path: str, extensions: dict[str, ExtensionSettings]) -> YamlSource:
        return cls(path, _extensions=fold_names(extensions, path))

    def __len__(self) -> int:
        return len(self._by_name)

    def lookup(self, user: str) -> ExtensionSettings | None:
        try:
            check_user_name(user)
        except ValueError:
            return None  # no key of a valid file can be such a name
        return self._by_name.get(user.casefold())


def _load(path: str) -> dict[str, ExtensionSettings]:
    data, _ = open_secure(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    document = load_yaml(data, path)
    extensions = parse_extensions(document, path)
    entries = document.get("extensions") if isinstance(document, dict) else None
    return fold_names(extensions, path, getattr(entries, "marks", {}))
