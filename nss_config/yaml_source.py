"""The YAML source: /etc/pam_linkus/extensions.yaml, parsed once and held in memory.

File format (every key documented in docs/guide.md, "Extension settings: YAML")::

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
    ...                       # the end: a file without this line is incomplete

The file must end with the line ``...`` (YAML's end of document), written last:
an empty, half-written or cut-short file is refused like any broken file -- the
daemon keeps its last good snapshot, and with none every login is unavailable --
instead of loading as fewer extensions, whose logins would then skip the code
(issue 17.6). linkus-2fa and the self-service page keep the marker. A file with no
extensions says so with ``extensions: {}``; an empty document or an ``extensions``
key without a value is refused too.

The whole file is validated when it is loaded, so one broken entry is reported
(and keeps the daemon on its last good snapshot) at once instead of on the day
that extension logs in.

Names: lookups ignore case (``str.casefold``) and return the key as written in
the file (``ExtensionSettings.account``), so ``H1A`` and ``h1a`` are one account
with one replay record and one lockout. Two keys that differ only by case refuse
the file (``file:line:col``). Names with surrounding spaces or control
characters match nothing (``check_user_name``).

linkusd builds a new ``YamlSource`` with ``YamlSource.load(path)`` aside when the
file changes and swaps it in; a ``YamlSource`` never changes after it is built
(until ``close`` frees a retired one's entries), so worker threads read it
without a lock.

Measured (Debian 12, 2 cores, Python 3.11, the event-based strict loader,
bench/reload_ab.py): a 100,000-extension file reloads in ~2 s while 4 clients log
in (3.5 s before the changes of PackedExtensions and child_main); parsed in a
child process (``load_in_child``, chosen by size) and held packed, linkusd's RSS
is ~80-95 MB after the reload (~135 MB with settings objects, ~200 MB with the
parse in a thread), and the worst login during the reload is no worse than the
worst of a window with no reload (~30 ms against medians of ~9 ms; it was 250-
500 ms). A lookup costs ~1.1 us.
"""

from __future__ import annotations

import gc
import marshal
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from nss_config.base import ENTRY_KEYS, YAML_ONLY_KEYS, ExtensionSettings, check_user_name, settings_from_mapping
from nss_config.errors import ConfigError, SourceUnavailable
from nss_config.yaml_reader import MAX_EXTENSIONS_BYTES, load_yaml, open_secure

TOP_KEYS = ("extensions", "version")
#: How a file with no extensions says so; anything less is refused, not read as "none".
NO_EXTENSIONS = "write 'extensions: {}' for a file with no extensions"


def parse_extensions(data: Any, path: str, source: str = "yaml") -> dict[str, ExtensionSettings]:
    """Validate a parsed extensions document into settings by the key as written.

    An empty document, a missing ``extensions`` key or one with no value is refused: "no
    extensions" must be written out as ``extensions: {}``. Such a file with a valid end
    marker loaded as zero extensions, so every enrolled extension skipped its code.
    """
    if data is None:
        raise ConfigError(f"is empty: {NO_EXTENSIONS}", path)
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
    if "extensions" not in data:
        raise ConfigError(f"has no 'extensions' key: {NO_EXTENSIONS}", path)
    entries = data["extensions"]
    if entries is None:
        raise ConfigError(f"extensions has no value: {NO_EXTENSIONS}", _where(path, data, "extensions"))
    if not isinstance(entries, dict):
        raise ConfigError("extensions must be a mapping of extension name to settings", path)
    result: dict[str, ExtensionSettings] = {}
    for user, entry in entries.items():
        try:
            check_user_name(user)
        except ValueError:
            raise ConfigError("extension name has surrounding spaces or control characters",
                              _where(path, entries, user)) from None
        if isinstance(entry, dict) and None in entry.values():
            _refuse_null(entry, _where(path, entries, user))
        try:
            result[user] = settings_from_mapping(user, entry, path, source, account=user)
        except ConfigError:
            # Where the entry stands is wanted only when it is refused: working it out for
            # each of 100,000 entries was a fifth of the validation. Same check, again, to
            # raise the same error with file:line:col.
            settings_from_mapping(user, entry, _where(path, entries, user), source, account=user)
            raise
    return result


def _refuse_null(entry: dict[str, Any], where: str) -> None:
    """A key of an entry written with no value (``secret:``, ``~``, ``null``) is an error, as in
    the main config: an edit that lost a value must not load as the key's default (tester 2).
    Only known keys are named; an unknown one is left to ``settings_from_mapping`` (which names
    none: it could be a secret pasted in the wrong place)."""
    for key, value in entry.items():
        if value is None and key in ENTRY_KEYS + YAML_ONLY_KEYS:
            raise ConfigError(f"extension: {key} has no value; give one, or leave the key out", where)


def _where(path: str, mapping: Any, key: str) -> str:
    """``path:line:col`` of ``key`` in a MarkedDict (0:0 for plain data)."""
    line, col = getattr(mapping, "marks", {}).get(key, (0, 0))
    return f"{path}:{line}:{col}"


def read_extensions(path: str) -> dict[str, ExtensionSettings]:
    """Read, check and validate the whole file (it holds secrets: mode 0600, root)."""
    data, _ = open_secure(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    return parse_extensions(load_yaml(data, path, require_end=True), path)


def fold_names(extensions: dict[str, ExtensionSettings], path: str,
               entries: Any = None) -> dict[str, ExtensionSettings]:
    """Index by ``casefold``; two names that fold to one refuse the file
    (``path:line:col`` of the second, from the marks of ``entries``, the parsed mapping)."""
    folded: dict[str, ExtensionSettings] = {}
    for name, settings in extensions.items():
        key = name.casefold()
        if key in folded:
            raise ConfigError("two extensions differ only by upper/lower case; keep one", _where(path, entries, name))
        folded[key] = settings
    return folded


class YamlSource:
    """Settings from a root-only YAML file, held in memory; see the module docstring.

    ``YamlSource(path)`` loads at once (ConfigError on a bad file: unavailable);
    ``YamlSource.load(path)`` says the same; ``from_settings`` builds one from
    validated settings (tests, the admin tools).
    """

    #: lookups read memory only (SourceChain.waits_for_servers)
    waits_for_servers = False

    name = "yaml"

    def __init__(self, path: str, *, _extensions: dict[str, ExtensionSettings] | PackedExtensions | None = None):
        self.path = path
        if _extensions is None:
            _extensions = _load(path)
        self._by_name = _extensions
        #: How many extensions must give a second factor: linkusd's reload line reports it, so
        #: a file that lost its enrollments shows as a drop (issue 17, tester 3).
        self.enrolled = (_extensions.enrolled if isinstance(_extensions, PackedExtensions)
                         else sum(1 for settings in _extensions.values() if settings.enrolled))
        #: the same by method, for linkusd's metrics (counted once per load, never per scrape)
        self.enrolled_by_method: dict[str, int] = (
            dict(_extensions.enrolled_by_method) if isinstance(_extensions, PackedExtensions)
            else dict(Counter(settings.method for settings in _extensions.values() if settings.enrolled)))

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

    def close(self) -> None:
        """linkusd retired this snapshot and no login uses it any more: free a large file's
        entries gradually (``PackedExtensions.release``) rather than in one long ``del``."""
        if isinstance(self._by_name, PackedExtensions):
            self._by_name.release()


def _load(path: str) -> dict[str, ExtensionSettings]:
    data, _ = open_secure(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
    document = load_yaml(data, path, require_end=True)
    extensions = parse_extensions(document, path)
    entries = document.get("extensions") if isinstance(document, dict) else None
    return fold_names(extensions, path, entries)


#: Files larger than this are parsed in a child process (a 100,000-extension file is ~7 MB).
CHILD_THRESHOLD = 512 * 1024
#: Entries per marshalled chunk: the parent hands the GIL over between chunks (each ~0.5 ms).
CHUNK = 1000
#: How long the parent sleeps between chunks. ``time.sleep(0)`` releases the GIL, but this
#: thread takes it back before a waiting one has woken up, which then waits for the 5 ms
#: switch interval: measured as logins of 50-75 ms during the ~60 ms of filing 100,000
#: entries. A real sleep hands the GIL over; 100 of them add ~60 ms to the reload.
_PAUSE = 0.0005
#: Largest output a child may send back (far above 10x the largest file it may read).
MAX_CHILD_OUTPUT = 16 * MAX_EXTENSIONS_BYTES
CHILD_TIMEOUT = 120.0
_FIELDS = ("user", "method", "enabled", "secret", "algorithm", "digits", "period", "email", "legacy_short_secret")


def load_in_child(path: str, *, timeout: float = CHILD_TIMEOUT) -> PackedExtensions:
    """Parse and validate in a child Python, get the entries back as marshalled tuples.

    Why: the strict parse of 100,000 entries is seconds of CPU in Python code and ~80 MB of
    document tree. In a thread of linkusd it holds the GIL most of that time, so logins
    served meanwhile wait (measured: medians 8 ms -> 90 ms, worst 0.5-0.7 s), and the
    allocator keeps the tree's memory afterwards. The child does all of it; the parent only
    files each entry's marshalled tuple under its name (``PackedExtensions``), a chunk at a
    time, handing the GIL over between chunks (``_PAUSE``).
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


class PackedExtensions:
    """The settings a child loaded, held as one marshalled tuple per extension.

    Why not ``ExtensionSettings`` objects: 100,000 of them (and their tuples on the
    way) are objects the cyclic GC tracks, so building them in linkusd costs a
    ~40 ms full collection in the middle of the reload and ~0.5 s of GIL-holding
    Python -- measured as logins of 100-250 ms during a reload. Bytes and strings
    are not tracked, and filling a dict from a marshalled chunk is one short C call.
    A lookup unpacks its entry (a few microseconds). ``SHARDS`` dicts instead of one,
    so no insert ever resizes a 100,000-entry table in one go, and a retired
    snapshot's entries are freed a shard at a time (``release``).
    Read-only once built, so worker threads read it without a lock.
    """

    SHARDS = 64

    def __init__(self) -> None:
        self._shards: list[dict[str, bytes]] = [{} for _ in range(self.SHARDS)]
        self._count = 0
        #: enrolled extensions, counted by the child (the parent never unpacks the entries)
        self.enrolled = 0
        self.enrolled_by_method: Counter[str] = Counter()

    def add(self, keys: list[str], blobs: list[bytes], enrolled: int, by_method: dict[str, int]) -> None:
        """While loading only: keys are casefolded names, already unique (the child checked)."""
        shards, mask = self._shards, self.SHARDS - 1
        for key, blob in zip(keys, blobs, strict=True):
            shards[hash(key) & mask][key] = blob
        self._count += len(keys)
        self.enrolled += enrolled
        self.enrolled_by_method.update(by_method)

    def __len__(self) -> int:
        return self._count

    def get(self, key: str) -> ExtensionSettings | None:
        shards = self._shards
        if len(shards) != self.SHARDS:  # released: never "not here", which could skip the second factor
            raise SourceUnavailable("yaml: this snapshot's extensions were released")
        blob = shards[hash(key) & (self.SHARDS - 1)].get(key)
        if blob is None:
            return None
        user, method, enabled, secret, algorithm, digits, period, email, legacy = marshal.loads(blob)  # noqa: S302
        return ExtensionSettings(user, method, enabled=enabled, secret=secret, algorithm=algorithm, digits=digits,
                                 period=period, email=email, source="yaml", account=user,
                                 legacy_short_secret=legacy)

    def release(self) -> None:
        """Free the entries a shard at a time (a retired snapshot, in a thread of its own): one
        ``del`` of 200,000 objects would hold the GIL for several milliseconds."""
        while self._shards:
            self._shards.pop()
            time.sleep(_PAUSE)


def _from_chunks(data: bytes, path: str) -> PackedExtensions:
    packed = PackedExtensions()
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        size = int.from_bytes(view[pos:pos + 4], "big")
        keys, blobs, enrolled, by_method = marshal.loads(view[pos + 4:pos + 4 + size])  # noqa: S302 - our child's
        pos += 4 + size
        packed.add(keys, blobs, enrolled, by_method)
        time.sleep(_PAUSE)  # let the event loop and the workers run between chunks
    if pos != len(view):
        raise ConfigError("the loader's output was cut short", path)
    return packed


def child_main(path: str) -> None:
    """In the child: the whole strict load, then the entries as length-prefixed marshal chunks."""
    # The document tree has no cycles and this process ends after one load: the cyclic GC
    # would only walk the growing tree again and again (a tenth of the load's time).
    gc.disable()
    try:
        folded = _load(path)
    except ConfigError as exc:
        sys.stderr.write(str(exc).replace("\n", " ") + "\n")
        sys.exit(2)
    out = sys.stdout.buffer
    items = list(folded.items())
    for start in range(0, len(items), CHUNK):
        keys = [key for key, _ in items[start:start + CHUNK]]
        blobs = [marshal.dumps(tuple(getattr(settings, name) for name in _FIELDS))
                 for _, settings in items[start:start + CHUNK]]
        by_method = dict(Counter(settings.method for _, settings in items[start:start + CHUNK] if settings.enrolled))
        chunk = marshal.dumps((keys, blobs, sum(by_method.values()), by_method))
        out.write(len(chunk).to_bytes(4, "big") + chunk)
    out.flush()
