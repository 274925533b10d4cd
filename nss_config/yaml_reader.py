"""Reading root-owned files safely and parsing them as strict YAML.

Why this exists: the files that decide who must give a second factor are a
security boundary. A symlink planted by a user, a group-writable file or parent
directory, an alias bomb, ``1001:`` parsed as an integer key that silently never
matches the login name "1001", or a duplicate key where the second silently
wins, would each turn a typo into a bypass. Everything here refuses such input
with a message that says file, line and column, and never echoes a value or a
key that is not known to be harmless (a secret pasted in a key's place must not
reach syslog).

Why events, not ``yaml.load``: linkusd rebuilds its settings while logins go on.
Measured on this project's Debian 12 host (PyYAML 6.0.3 with libyaml, Python
3.11, idle 2-core VM), with ``bench/yaml_reader_100k.py``: an extensions.yaml of
100,000 extensions (5 keys each, 12.3 MB) loads here in 2.2 s with a peak RSS of
139 MB (+87 MB over the interpreter and the input bytes; the result itself is
most of that); ``yaml.load`` with CSafeLoader took 10.6 s and 519 MB (+467 MB)
for the same file. The loop is Python code between short C calls, so other
threads get the GIL every switch interval: a thread ticking every 1 ms saw gaps of
at most ~100 ms during the load (the cyclic GC walking the new objects; ~40 ms
with the GC off), against 1.7 s during ``yaml.load``. Key positions are kept
packed (``MarkedDict``). A long-running caller may ``gc.freeze()`` after a
reload, so later collections do not walk 100,000 settings again and again.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml
import yaml.resolver
from yaml.constructor import SafeConstructor

from nss_config.errors import ConfigError

try:
    from yaml.cyaml import CParser as _Parser  # type: ignore[attr-defined]
except ImportError:  # PyYAML without libyaml: the pure-Python parser gives the same events
    _Parser = yaml.SafeLoader  # type: ignore[misc,assignment]

#: Upper bound on a main config file; a larger file is an error, not a slow reload.
MAX_CONFIG_BYTES = 1 << 20
#: Upper bound on an extensions file (100,000 extensions fit comfortably).
MAX_EXTENSIONS_BYTES = 64 << 20
#: Deepest nesting of mappings and sequences; our files need 4.
MAX_DEPTH = 32
#: The only file modes accepted for files under /etc/pam_linkus: root ignores
#: mode bits, so 000 would be read as if it were 0600, and anything with group or
#: other bits lets someone else read secrets (or, written, change who needs 2FA).
ALLOWED_MODES = (0o600, 0o400)

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MAP = "tag:yaml.org,2002:map"
SEQ = "tag:yaml.org,2002:seq"
MERGE = "tag:yaml.org,2002:merge"
#: Explicit tags we accept: the core schema and the non-specific ``!``.
CORE_TAGS = frozenset((STR, INT, FLOAT, BOOL, NULL, "!"))


class MarkedDict(dict):  # type: ignore[type-arg]
    """A mapping from a YAML file that remembers where each key stood.

    ``marks[key]`` is ``(line, column)``, 1-based, for error messages about values
    that parsed fine but mean nothing (``enforce: sometimes``). Positions are kept
    packed, one int per key in insertion order, and unpacked only when an error
    asks: 100,000 extensions would otherwise carry 400,000 tuples.
    """

    __slots__ = ("_packed", "start")

    def __init__(self) -> None:
        super().__init__()
        self._packed: list[int] = []
        self.start: tuple[int, int] = (1, 1)

    @property
    def marks(self) -> dict[str, tuple[int, int]]:
        """``{key: (line, column)}`` for every key set by the YAML builder."""
        return {key: (packed >> 20, packed & 0xFFFFF) for key, packed in zip(self, self._packed, strict=False)}


# -- files ------------------------------------------------------------------------------


def check_owner_and_mode(st: os.stat_result, name: str, *, secret: bool = True, owner: int = 0) -> None:
    """Refuse a file that someone other than root could change or read.

    ``secret`` is kept for callers' clarity; every file under /etc/pam_linkus holds
    or points at secrets (the config names password files, extensions.yaml holds
    TOTP secrets), so the rule is the same for all: mode exactly 0600 or 0400.
    """
    del secret
    if st.st_uid != owner:
        raise ConfigError(f"must be owned by uid {owner}, is owned by uid {st.st_uid}", name)
    mode = stat.S_IMODE(st.st_mode)
    if mode not in ALLOWED_MODES:
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "writable by group or others"
        elif mode & (stat.S_IRWXG | stat.S_IRWXO):
            problem = "readable by group or others"
        else:
            problem = "not 0600 or 0400"
        raise ConfigError(f"is mode {mode:04o} ({problem}); it must be 0600 or 0400", name)


def _ancestors(directory: str) -> list[str]:
    """``directory`` and every directory above it, up to ``/``."""
    chain = []
    current = directory
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            return chain
        current = parent


def check_parent_dirs(path: str) -> None:
    """Every directory above ``path`` is root-owned and writable by root alone.

    As OpenSSH's ``safe_path``: a directory anyone else can write lets them rename
    the file away and put their own in its place, so the whole path counts, and the
    sticky bit is no excuse (a 1777 directory lets anyone create the name first).
    Both the path as written and the path with symlinks resolved are checked.
    """
    lexical = os.path.dirname(os.path.abspath(path)) or "/"
    real = os.path.realpath(lexical)
    seen: set[str] = set()
    for directory in (*_ancestors(lexical), *_ancestors(real)):
        if directory in seen:
            continue
        seen.add(directory)
        try:
            st = os.stat(directory)
        except OSError as exc:
            raise ConfigError(f"cannot stat the directory {directory}: {exc.strerror}", path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{directory} is not a directory", path)
        if st.st_uid != 0:
            raise ConfigError(f"the directory {directory} must be owned by root (uid {st.st_uid})", path)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"the directory {directory} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); only root may write it", path)


def open_checked(path: str, *, secret: bool, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open a root-owned regular file without following symlinks; return (fd, fstat).

    The parent directories are checked first (``check_parent_dirs``), then the file
    on the opened descriptor (fstat), so the file that is checked is the file that
    is read. The caller owns ``fd`` and must close it.
    """
    check_parent_dirs(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise ConfigError("is a symbolic link; refusing to follow it", path) from None
        raise ConfigError(f"cannot open: {exc.strerror}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("is not a regular file", path)
        check_owner_and_mode(st, path, secret=secret)
        if st.st_size > max_bytes:
            raise ConfigError(f"is {st.st_size} bytes, larger than the limit of {max_bytes}", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_checked(fd: int, path: str, *, max_bytes: int) -> bytes:
    """Read the whole file behind ``fd`` (from ``open_checked``), at most ``max_bytes``."""
    chunks = []
    remaining = max_bytes + 1
    offset = 0
    while remaining > 0:
        try:
            chunk = os.pread(fd, min(remaining, 1 << 20), offset)
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", path) from None
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
        offset += len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ConfigError(f"grew beyond the limit of {max_bytes} bytes while being read", path)
    return data


def open_secure(path: str, *, secret: bool, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a whole root-owned regular file without following symlinks (see ``open_checked``)."""
    fd, st = open_checked(path, secret=secret, max_bytes=max_bytes)
    try:
        return read_checked(fd, path, max_bytes=max_bytes), st
    finally:
        os.close(fd)


def read_secret_file(path: str, what: str) -> str:
    """Read a one-line secret (a bind or SMTP password) from a root-only file."""
    data, _ = open_secure(path, secret=True, max_bytes=4096)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file is not UTF-8", path) from None
    value = text.rstrip("\r\n")
    if not value or "\n" in value:
        raise ConfigError(f"{what} file must hold exactly one non-empty line", path)
    return value


# -- strict YAML on the event stream -------------------------------------------------------


class _Refused(Exception):
    """A problem at a mark; turned into ConfigError("file:line:col: problem")."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


def _resolver_table() -> dict[Any, list[tuple[str, Any]]]:
    """PyYAML's implicit resolvers (YAML 1.1 as SafeLoader reads it), by first character.

    The same table ``yaml.safe_load`` uses, so ``yes`` is a boolean and ``0777``
    an integer here as well -- and therefore refused as a key.
    """
    return dict(yaml.resolver.Resolver.yaml_implicit_resolvers)


def _scalar(event: Any, table: dict[Any, list[tuple[str, Any]]], constructor: Any) -> Any:
    """The Python value of a scalar event, or _Refused."""
    value: str = event.value
    tag = event.tag
    plain = event.implicit[0]
    if tag is not None and tag not in CORE_TAGS:
        raise _Refused("tags other than the core ones (!!str, !!int, !!bool, !!null, !!float) are not allowed",
                       event.start_mark)
    if tag is None or tag == "!":
        if not plain or tag == "!":
            return value
        tag = STR
        for candidate, regexp in table.get(value[0] if value else "", ()):
            if regexp.match(value):
                tag = candidate
                break
    if tag == STR:
        return value
    if tag == MERGE:
        raise _Refused("merge keys (<<) are not allowed", event.start_mark)
    node = yaml.ScalarNode(tag, value, event.start_mark, event.end_mark)
    try:
        if tag == NULL:
            if value not in ("", "~", "null", "Null", "NULL"):
                raise ValueError
            return None
        if tag == BOOL:
            return constructor.construct_yaml_bool(node)
        if tag == INT:
            return constructor.construct_yaml_int(node)
        if tag == FLOAT:
            return constructor.construct_yaml_float(node)
    except (ValueError, KeyError, yaml.YAMLError):
        raise _Refused(f"not a valid {tag.rsplit(':', 1)[-1]}", event.start_mark) from None
    # Timestamps, binary, sets...: YAML 1.1 types that no setting of ours is.
    raise _Refused("this value would be read as a date or another non-core type; quote it", event.start_mark)


def _parser(data: bytes) -> Any:
    return _Parser(data)


def _build(parser: Any, known_keys: frozenset[str]) -> tuple[Any, bool]:
    """Assemble plain data from the events of one document.

    One loop with the common case inlined (a plain or quoted scalar without tag or
    anchor): this runs a million times for 100,000 extensions.
    """
    table = _resolver_table()
    constructor = SafeConstructor()
    scalar_event, mapping_start, sequence_start = yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent
    collection_end = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
    get_event = parser.get_event
    # Open containers, innermost last: [container, pending key or _NO_KEY, key mark, start mark].
    stack: list[list[Any]] = []
    root: Any = None
    documents = 0
    ended = False  # the document closed with an explicit "..." line
    while True:
        event = get_event()
        if event is None:
            break
        kind = type(event)
        if kind is scalar_event:
            if event.anchor is not None:
                raise _Refused("anchors (&name) and aliases (*name) are not allowed", event.start_mark)
            if event.tag is None and not event.implicit[0]:
                value: Any = event.value  # quoted: always a string
            elif event.tag is None and (event.value[:1] not in table):
                value = event.value  # plain, and no implicit type starts with this character
            else:
                value = _scalar(event, table, constructor)
            mark = event.start_mark
        elif kind is mapping_start or kind is sequence_start:
            if event.anchor is not None:
                raise _Refused("anchors (&name) and aliases (*name) are not allowed", event.start_mark)
            if event.tag is not None and event.tag not in (MAP, SEQ, "!"):
                raise _Refused("tags other than the core ones (!!map, !!seq) are not allowed", event.start_mark)
            if len(stack) >= MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            if stack and stack[-1][1] is _NO_KEY and type(stack[-1][0]) is MarkedDict:
                raise _Refused("a key is not a string; quote it", event.start_mark)
            if kind is mapping_start:
                container: Any = MarkedDict()
                container.start = (event.start_mark.line + 1, event.start_mark.column + 1)
            else:
                container = []
            stack.append([container, _NO_KEY, None, event.start_mark])
            continue
        elif kind in collection_end:
            finished = stack.pop()
            value, mark = finished[0], finished[3]
        elif kind is yaml.AliasEvent:
            raise _Refused("anchors (&name) and aliases (*name) are not allowed", event.start_mark)
        elif kind is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise _Refused("holds more than one YAML document", event.start_mark)
            continue
        elif kind is yaml.DocumentEndEvent:
            ended = bool(event.explicit)
            continue
        else:
            continue
        # A finished value: the document itself, a list item, a key, or a key's value.
        if not stack:
            root = value
            continue
        top = stack[-1]
        parent = top[0]
        if type(parent) is list:
            parent.append(value)
        elif top[1] is _NO_KEY:
            if type(value) is not str:
                raise _Refused("a key is not a string; quote it", mark)
            if value in parent:
                shown = f" {value!r}" if value in known_keys else ""
                raise _Refused(f"duplicate key{shown}", mark)
            top[1] = value
            top[2] = mark
        else:
            key = top[1]
            parent[key] = value
            parent._packed.append((top[2].line + 1) << 20 | min(top[2].column + 1, 0xFFFFF))
            top[1] = _NO_KEY
    return root, ended


NEWLINE = b"\n"
#: The line that ends a complete extensions file (``load_yaml(require_end=True)``).
END_MARKER = "..."
#: Why a file without it is refused: it was being written, or a disk was full.
INCOMPLETE = ("has no end marker: its last line must be '...' (three dots), written after everything else; "
              "without it the file may be cut short (being written, or the disk was full)")

#: Marker for "the open mapping waits for a key".
_NO_KEY = object()


def load_yaml(data: bytes, name: str, *, known_keys: frozenset[str] = frozenset(),
              require_end: bool = False) -> Any:
    """Parse ``data`` strictly into dict (MarkedDict) / list / str / int / float / bool / None.

    Refused, with ConfigError("file:line:col: problem"): anchors and aliases, merge
    keys, tags beyond the core schema, non-string keys, duplicate keys, more than
    one document, nesting deeper than MAX_DEPTH. Messages never quote a value; a
    key is named only if it is in ``known_keys`` (any other key could be a secret
    pasted in the wrong place).

    ``require_end``: the document must close with YAML's end-of-document line ``...``
    (``END_MARKER``). Every prefix of a YAML file cut at a line boundary is itself
    valid YAML -- an empty file, a file with the last extensions missing -- so only a
    marker written last tells a complete file from one being written or cut short
    by a full disk (issue 17.6). Comments after the marker are allowed.
    """
    parser = _parser(data)
    try:
        root, ended = _build(parser, known_keys)
        if require_end and not ended:
            raise ConfigError(INCOMPLETE, f"{name}:{data.count(NEWLINE) + 1}")
        return root
    except _Refused as exc:
        raise ConfigError(exc.problem, _where(name, exc.mark)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(_problem_text(exc), _where(name, mark)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({type(exc).__name__})", name) from None
    except UnicodeDecodeError:
        raise ConfigError("is not valid UTF-8", name) from None
    finally:
        parser.dispose()


def _where(name: str, mark: Any) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name


def _problem_text(exc: Any) -> str:
    problem = exc.problem or "invalid YAML"
    # libyaml's scanner and parser problems never include document text; keep it
    # on one line for syslog.
    return " ".join(str(problem).split())
