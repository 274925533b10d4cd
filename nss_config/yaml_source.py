"""The YAML source: /etc/pam_linkus/extensions.yaml.

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

The whole file is validated on every read, so one broken entry is reported (and
refuses logins) at once instead of on the day that extension logs in.

In the PAM module the file is read through a compiled index (nss_config.yaml_index,
rebuilt whenever the file changes), so a login costs the same with 10 or 100,000
extensions and never imports ``yaml`` while the index is current.
"""

from __future__ import annotations

from nss_config.base import settings_from_mapping
from pam_linkus.errors import ConfigError
from pam_linkus.strictyaml import MAX_EXTENSIONS_BYTES, load_yaml, open_secure

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from typing import Any

    from nss_config.base import ExtensionSettings

TOP_KEYS = ("extensions", "version")


def parse_extensions(data: Any, path: str, source: str = "yaml") -> dict[str, ExtensionSettings]:
    """Validate a parsed extensions document into settings by user name."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping with an 'extensions' key", path)
    marks = getattr(data, "marks", {})
    for key in data:
        if key not in TOP_KEYS:
            line, col = marks.get(key, (0, 0))
            raise ConfigError(f"unknown top-level key {key!r:.40} (expected: extensions)", f"{path}:{line}:{col}")
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
        result[user] = settings_from_mapping(user, entry, f"{path}:{line}:{col}", source)
    return result


def read_extensions(path: str) -> dict[str, ExtensionSettings]:
    """Read, check and validate the whole file (it holds secrets: mode 0600, root)."""
    data, _ = open_secure(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    return parse_extensions(load_yaml(data, path), path)


class YamlSource:
    """Settings from a root-only YAML file; a broken file is a ConfigError (unavailable).

    With ``cache_dir`` (the PAM module) lookups go through the compiled index;
    without (the CLI, tests) the file is parsed on every lookup.
    """

    name = "yaml"

    def __init__(self, path: str, *, cache_dir: str | None = None):
        self.path = path
        self.cache_dir = cache_dir

    def lookup(self, user: str) -> ExtensionSettings | None:
        if self.cache_dir is not None:
            from nss_config.yaml_index import lookup

            return lookup(self.path, user, self.cache_dir)
        return read_extensions(self.path).get(user)
