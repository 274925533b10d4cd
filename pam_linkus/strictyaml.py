"""Reading root-owned files safely and parsing them as strict YAML.

Why this exists: the files that decide who must give a second factor are a
security boundary. A symlink planted by a user, a group-writable file, an alias
bomb, ``1001:`` parsed as an integer key that silently never matches the login
name "1001", or a duplicate key where the second silently wins, would each turn a
typo into a bypass. Everything here refuses such input with a message that says
file, line and column, and never echoes a value (it could be a secret).

``yaml`` is imported lazily: a login reads compiled caches (pam_linkus.filecache)
and parses YAML only when a source file changed. The checks of ``open_checked``
run on every login all the same, cache or not.
"""

from __future__ import annotations

import os
import stat

from pam_linkus.errors import ConfigError

#: ``typing`` costs milliseconds to import on every login; mypy reads this name as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: Upper bound on a main config file; a larger file is an error, not a slow login.
MAX_CONFIG_BYTES = 1 << 20
#: Upper bound on an extensions file (100,000 extensions fit comfortably).
MAX_EXTENSIONS_BYTES = 64 << 20


class MarkedDict(dict):  # type: ignore[type-arg]
    """A mapping from a YAML file that remembers where each key stood.

    ``marks[key]`` is ``(line, column)``, 1-based, for error messages about values
    that parsed fine but mean nothing (``enforce: sometimes``).
    """

    __slots__ = ("marks", "start")

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, tuple[int, int]] = {}
        self.start: tuple[int, int] = (1, 1)


def check_owner_and_mode(st: os.stat_result, name: str, *, secret: bool, owner: int = 0) -> None:
    """Refuse a file that someone other than root could change (or read, if secret)."""
    if st.st_uid != owner:
        raise ConfigError(f"must be owned by uid {owner}, is owned by uid {st.st_uid}", name)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"must not be writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})", name)
    if secret and st.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ConfigError(
            f"holds secrets and must not be readable by others (mode {stat.S_IMODE(st.st_mode):04o}; use 0600)",
            name,
        )


def open_checked(path: str, *, secret: bool, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open a root-owned regular file without following symlinks; return (fd, fstat).

    Every check runs on every call (they are a few system calls): the directory
    holding the file must not be writable by anyone but root, or the file could be
    swapped between two logins; the file is checked on the opened descriptor
    (fstat), so the file that is checked is the file that is read. Callers that
    find a valid compiled cache for this fstat identity close the descriptor
    without reading; the caller owns ``fd`` and must close it.
    """
    try:
        dir_st = os.stat(os.path.dirname(os.path.abspath(path)) or "/")
    except OSError as exc:
        raise ConfigError(f"cannot stat its directory: {exc.strerror}", path) from None
    if dir_st.st_uid != 0 or (
        dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not dir_st.st_mode & stat.S_ISVTX
    ):
        raise ConfigError("its directory must be owned by root and not writable by others", path)
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


def _make_loader() -> type:
    """Build the strict loader class on first use (keeps ``yaml`` off the hot path)."""
    import yaml
    from yaml.constructor import ConstructorError

    base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class StrictLoader(base):  # type: ignore[misc,valid-type]
        """SafeLoader (libyaml when present) that refuses aliases, non-string keys
        and duplicate keys, and records where each key stood."""

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._seen_nodes: set[int] = set()

        def construct_document(self, node: Any) -> Any:
            self._refuse_aliases(node)
            return super().construct_document(node)

        def _refuse_aliases(self, root: Any) -> None:
            # libyaml resolves an alias to the very same node object, so a node met
            # twice in the tree is an alias; iterative, so depth cannot overflow.
            stack = [root]
            while stack:
                node = stack.pop()
                if id(node) in self._seen_nodes:
                    raise ConstructorError(None, None, "aliases (*name) are not allowed", node.start_mark)
                self._seen_nodes.add(id(node))
                if isinstance(node, yaml.MappingNode):
                    for key, value in node.value:
                        stack.append(key)
                        stack.append(value)
                elif isinstance(node, yaml.SequenceNode):
                    stack.extend(node.value)

        def construct_strict_mapping(self, node: Any) -> MarkedDict:
            if not isinstance(node, yaml.MappingNode):
                raise ConstructorError(None, None, "expected a mapping", node.start_mark)
            result = MarkedDict()
            result.start = (node.start_mark.line + 1, node.start_mark.column + 1)
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(None, None, "merge keys (<<) are not allowed", key_node.start_mark)
                if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    raise ConstructorError(
                        None,
                        None,
                        f"key {shown!s:.40} is not a string; quote it (\"{shown!s:.40}\":)",
                        key_node.start_mark,
                    )
                key = key_node.value
                if key in result:
                    raise ConstructorError(None, None, f"duplicate key {key!r:.60}", key_node.start_mark)
                result[key] = self.construct_object(value_node, deep=True)
                result.marks[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            return result

    StrictLoader.add_constructor("tag:yaml.org,2002:map", StrictLoader.construct_strict_mapping)
    return StrictLoader


def load_yaml(data: bytes, name: str) -> Any:
    """Parse ``data`` strictly; errors become ConfigError("file:line:col: problem").

    Values are never quoted back in messages: a misplaced secret must not reach syslog.
    """
    import yaml

    # Built per call, not kept in a module-level cache: only a cold cache parses
    # YAML in a login process, once, and building the class costs microseconds.
    loader_cls: Callable[[bytes], Any] = _make_loader()
    loader = loader_cls(data)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError(_problem_text(exc), where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({type(exc).__name__})", name) from None
    except RecursionError:
        raise ConfigError("nested too deeply", name) from None
    finally:
        loader.dispose()


def _problem_text(exc: Any) -> str:
    problem = exc.problem or "invalid YAML"
    # libyaml's scanner problems never include document text; our own messages name
    # only keys. Keep it on one line for syslog.
    return " ".join(str(problem).split())
