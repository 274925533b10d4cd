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

Measured (Debian 12, 2 cores, Python 3.11, the event-based strict loader): a
100,000-extension file loads in ~2.2 s; parsed in a child process
(``load_in_child``, chosen by size) linkusd's RSS stays at ~80 MB after the
reload instead of ~200 MB, and logins served during it are not held up by the
parse (tests/test_daemon.py: none over 0.5 s with 32 clients). A lookup costs
~1.2 us.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time
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
    def load(cls, path: str, *, in_child: bool | None = None) -> YamlSource:
        """Load and validate the whole file; a large one (over ``CHILD_THRESHOLD``, or ``in_child``)
        in a child process, so the daemon's own threads never wait for the parse (see ``load_in_child``)."""
        if in_child is None:
            try:
                in_child = os.stat(path).st_size > CHILD_THRESHOLD
            except OSError:
                in_child = False  # _load says what is wrong with the file
        if in_child:
            return cls(path, _extensions=load_in_child(path))
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


#: Files larger than this are parsed in a child process (a 100,000-extension file is ~7 MB).
CHILD_THRESHOLD = 512 * 1024
#: Entries per marshalled chunk: the parent yields the GIL between chunks.
CHUNK = 2000
#: Largest output a child may send back (far above 10x the largest file it may read).
MAX_CHILD_OUTPUT = 16 * MAX_EXTENSIONS_BYTES
CHILD_TIMEOUT = 120.0
_FIELDS = ("user", "method", "enabled", "secret", "algorithm", "digits", "period", "email", "legacy_short_secret")


def load_in_child(path: str, *, timeout: float = CHILD_TIMEOUT) -> dict[str, ExtensionSettings]:
    """Parse and validate in a child Python, get the entries back as marshalled tuples.

    Why: the strict parse of 100,000 entries is seconds of CPU in Python code and ~80 MB of
    document tree. In a thread of linkusd it holds the GIL most of that time, so logins
    served meanwhile wait (measured: medians 8 ms -> 90 ms, worst 0.5-0.7 s), and the
    allocator keeps the tree's memory afterwards. The child does all of it; the parent only
    turns tuples into settings, a chunk at a time, yielding the GIL between chunks.
    The child is this same interpreter in isolated mode (-I: no environment, no user site),
    with this package's directory first on sys.path. Errors come back as the ConfigError's
    message (file:line:col, never a value); a crash, a timeout or oversized output is a
    ConfigError too: the daemon keeps its last good snapshot.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from nss_config.yaml_source import child_main; child_main(sys.argv[2])")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", code, package_root, path], capture_output=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL, env={})
    except subprocess.TimeoutExpired:
        raise ConfigError(f"loading took longer than {timeout:g} s", path) from None
    except OSError as exc:
        raise ConfigError(f"could not start the loader ({type(exc).__name__})", path) from None
    if done.returncode == 2:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(message[-1][:500] if message else "invalid")  # already names file:line:col
    if done.returncode != 0 or len(done.stdout) > MAX_CHILD_OUTPUT:
        raise ConfigError(f"the loader failed (exit {done.returncode})", path)
    return _from_chunks(done.stdout, path)


def _from_chunks(data: bytes, path: str) -> dict[str, ExtensionSettings]:
    folded: dict[str, ExtensionSettings] = {}
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        size = int.from_bytes(view[pos:pos + 4], "big")
        rows = marshal.loads(view[pos + 4:pos + 4 + size])  # noqa: S302 - our own child, over a private pipe
        pos += 4 + size
        for key, *values in rows:
            fields = dict(zip(_FIELDS, values, strict=True))
            user = fields.pop("user")
            folded[key] = ExtensionSettings(user, source="yaml", account=user, **fields)
        time.sleep(0)  # let the event loop and the workers run between chunks
    if pos != len(view):
        raise ConfigError("the loader's output was cut short", path)
    return folded


def child_main(path: str) -> None:
    """In the child: the whole strict load, then the entries as length-prefixed marshal chunks."""
    try:
        folded = _load(path)
    except ConfigError as exc:
        sys.stderr.write(str(exc).replace("\n", " ") + "\n")
        sys.exit(2)
    out = sys.stdout.buffer
    items = list(folded.items())
    for start in range(0, len(items), CHUNK):
        rows = [(key, *(getattr(settings, name) for name in _FIELDS)) for key, settings in items[start:start + CHUNK]]
        blob = marshal.dumps(rows)
        out.write(len(blob).to_bytes(4, "big") + blob)
    out.flush()
