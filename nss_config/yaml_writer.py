"""Changing one extension's entry in the YAML source, safely for the logins that read it.

How an edit is made, and why:

* **Line-based splice of the one entry, located by the YAML parser's own marks.**
  We do not load-and-dump the whole document: that would drop every comment the
  admin wrote and reformat the file (a dump is also a diff nobody can review in
  etckeeper). ruamel.yaml's round trip would keep comments but is one more Debian
  dependency for one command, and it re-indents and re-flows mappings it did not
  need to touch. Instead PyYAML (already a dependency) *composes* the file, which
  gives the exact character span of the extension's key and value; only that span
  is replaced by a freshly written block entry. Everything else -- other entries,
  blank lines, comments between entries -- is byte for byte what it was. Comment
  lines inside the edited entry and a comment after its key are carried over.
  An ``extensions`` mapping written in flow style (``{...}``) is refused with a
  message instead of guessed at.
* **Only a complete file is edited, and it stays complete.** The file must end
  with the end marker ``...`` (nss_config.yaml_source): a file someone is
  writing by hand, or one a full disk cut short, is refused, never "repaired"
  into a file with fewer extensions. New entries go before the marker.
* **Validated before it replaces anything.** The new text is parsed by the same
  strict loader and ``parse_extensions`` as a login uses, and every other entry
  must come out exactly as before and the edited one exactly as intended;
  otherwise nothing is written. So an edit can never leave a file that refuses
  all logins.
* **Atomic and durable.** Temp file in the same directory, same mode and owner,
  fsync, rename over the original, fsync the directory: a login reads the old or
  the new file, never half of one, also after a power cut.
* **Serialised.** An exclusive ``fcntl.flock`` on ``<file>.lock`` next to it is
  held from reading the file to the rename, so two admins (or many bulk
  enrollments) never lose each other's edits.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

import yaml

from nss_config.base import (
    ENTRY_KEYS,
    MIN_SECRET_BITS,
    YAML_ONLY_KEYS,
    normalize_secret,
    settings_from_mapping,
)
from nss_config.errors import ConfigError, SourceUnavailable
from nss_config.yaml_reader import END_MARKER, MAX_EXTENSIONS_BYTES, load_yaml, open_secure
from nss_config.yaml_source import parse_extensions

if TYPE_CHECKING:
    from collections.abc import Callable

    from nss_config.base import ExtensionSettings

    Entry = dict[str, Any]

#: How long an edit waits for another one to finish before giving up.
LOCK_TIMEOUT = 30.0
_DEFAULTS = {"enabled": True, "algorithm": "SHA1", "digits": 6, "period": 30, "legacy_short_secret": False}


class YamlWriter:
    """Edits entries of one extensions.yaml (see the module docstring)."""

    name = "yaml"

    def __init__(self, path: str, *, lock_timeout: float = LOCK_TIMEOUT):
        self.path = path
        self.lock_timeout = lock_timeout

    def current(self, user: str) -> Entry | None:
        """The entry of ``user`` as plain data (None if absent)."""
        data, _ = open_secure(self.path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
        document = load_yaml(data, self.path, require_end=True)
        parse_extensions(document, self.path)
        return _entry_of(document, user)

    def preflight(self, user: str) -> None:
        """Check, before a secret is shown, that the file can be read, parsed and locked."""
        os.close(self._lock())
        self.current(user)

    def update(self, user: str, change: Callable[[Entry | None], Entry | None]) -> ExtensionSettings | None:
        """Replace ``user``'s entry by ``change(old entry)`` (None removes it), atomically.

        ``change`` is called with the lock held, on the file as it is now, so it
        sees every edit that finished before this one.
        """
        lock_fd = self._lock()
        try:
            raw, st = open_secure(self.path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
            document = load_yaml(raw, self.path, require_end=True)
            before = parse_extensions(document, self.path)
            new_entry = change(_entry_of(document, user))
            expected = None
            if new_entry is not None:
                new_entry = _clean(new_entry)
                expected = settings_from_mapping(user, new_entry, f"{self.path}: new entry", "yaml")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError("is not UTF-8", self.path) from None
            new_text = splice(text, user, new_entry, self.path)
            after = parse_extensions(load_yaml(new_text.encode("utf-8"), self.path, require_end=True), self.path)
            self._check(user, before, after, expected)
            self._replace(new_text.encode("utf-8"), st)
            return expected
        finally:
            os.close(lock_fd)

    def mark_legacy_secrets(self, *, dry_run: bool = False) -> list[str]:
        """Add ``legacy_short_secret: true`` to every TOTP entry whose key is 80..127 bits and
        carries no such mark; return their names.

        The pam_python version took over google-authenticator's 80-bit keys without the mark;
        this version refuses such a file as a whole (issue 12.7), which would refuse every
        login after an upgrade. So the upgrade (``linkus-2fa migrate-pam``) marks them, all in
        one atomic write, and doctor keeps flagging them until each extension enrolls again.
        Nothing else in the file changes (checked before the write).
        """
        lock_fd = self._lock()
        try:
            raw, st = open_secure(self.path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)
            document = load_yaml(raw, self.path, require_end=True)
            entries = document.get("extensions") if isinstance(document, dict) else None
            marked: list[str] = []
            updated: dict[str, Entry] = {}
            for user, entry in (entries or {}).items():
                if not isinstance(entry, dict) or entry.get("legacy_short_secret") is True:
                    continue
                secret = entry.get("secret")
                if not isinstance(secret, str):
                    continue
                try:
                    bits = len(normalize_secret(secret, allow_short=True)) * 5 // 8 * 8
                except ValueError:
                    continue  # not base32 at all, or under 80 bits: the load names it
                if bits < MIN_SECRET_BITS:
                    marked.append(user)
                    updated[user] = _clean({**entry, "legacy_short_secret": True})
            if not marked or dry_run:
                return marked
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError("is not UTF-8", self.path) from None
            for user, entry in updated.items():
                text = splice(text, user, entry, self.path)
            after_doc = load_yaml(text.encode("utf-8"), self.path, require_end=True)
            parse_extensions(after_doc, self.path)  # the whole file loads now, or nothing is written
            after = after_doc.get("extensions") or {}
            for user, entry in (entries or {}).items():
                want = updated.get(user, entry)
                if _plain(after.get(user)) != _plain(want):
                    raise ConfigError("refusing to write: marking would change other settings (please report)",
                                      self.path)
            self._replace(text.encode("utf-8"), st)
            return marked
        finally:
            os.close(lock_fd)

    # -- internals -------------------------------------------------------------------

    def _lock(self) -> int:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SourceUnavailable(f"{lock_path}: cannot open the lock file: {exc.strerror}") from None
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SourceUnavailable(
                        f"{self.path}: another linkus-2fa has been editing it for {self.lock_timeout:.0f} s"
                    ) from None
                time.sleep(0.05)
            except OSError as exc:
                os.close(fd)
                raise SourceUnavailable(f"{lock_path}: cannot lock: {exc.strerror}") from None

    def _check(self, user: str, before: dict[str, ExtensionSettings], after: dict[str, ExtensionSettings],
               expected: ExtensionSettings | None) -> None:
        """Refuse the write unless exactly the one entry changed, as intended."""
        others_before = {k: v for k, v in before.items() if k != user}
        others_after = {k: v for k, v in after.items() if k != user}
        if others_before != others_after:
            raise ConfigError("refusing to write: the edit would change other extensions (please report)", self.path)
        if after.get(user) != expected:
            raise ConfigError(f"refusing to write: the entry of {user!r:.60} did not come out as intended "
                              "(please report)", self.path)

    def _replace(self, data: bytes, st: os.stat_result) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, st.st_mode & 0o7777)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SourceUnavailable(f"{self.path}: cannot write: {exc.strerror}") from None
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # the rename happened; a directory that cannot be fsynced (tmpfs) is no error


def _plain(value: Any) -> Any:
    """A parsed entry as plain data (the loader's marked mappings compare by content)."""
    return {k: v for k, v in value.items()} if isinstance(value, dict) else value


def _entry_of(document: Any, user: str) -> Entry | None:
    if not isinstance(document, dict):
        return None
    entries = document.get("extensions")
    if not isinstance(entries, dict) or user not in entries:
        return None
    return dict(entries[user])


def _clean(entry: Entry) -> Entry:
    """Drop keys at their default value and empty ones; keep ENTRY_KEYS order."""
    out: Entry = {}
    for key in (*ENTRY_KEYS, *YAML_ONLY_KEYS):
        if key not in entry or entry[key] is None:
            continue
        if key in _DEFAULTS and entry[key] == _DEFAULTS[key] and key != "enabled":
            continue
        if key == "enabled" and entry[key] is True:
            continue
        out[key] = entry[key]
    unknown = set(entry) - set(ENTRY_KEYS) - set(YAML_ONLY_KEYS)
    if unknown:
        raise ConfigError(f"{len(unknown)} unknown keys in a new entry (please report)")
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if text and text.isascii() and text.replace("-", "").isalnum() and not text[0].isdigit():
        return text
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def render_entry(user: str, entry: Entry, indent: int, inner: int, extra: list[str] | None = None,
                 key_comment: str = "") -> str:
    """The block text of one entry; the first line starts at the key (no leading indent)."""
    first = f"{json.dumps(user)}:" + (f"  {key_comment}" if key_comment else "")
    lines = [first]
    lines += [" " * inner + c for c in extra or []]
    lines += [" " * inner + f"{k}: {_scalar(v)}" for k, v in entry.items()]
    return "\n".join(lines)


def _last_end(node: Any) -> int:
    """Index just after the last character that belongs to ``node``."""
    if isinstance(node, yaml.MappingNode) and node.value and not node.flow_style:
        return _last_end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and node.value and not node.flow_style:
        return _last_end(node.value[-1])
    return int(node.end_mark.index)


def splice(text: str, user: str, entry: Entry | None, path: str) -> str:
    """``text`` with the entry of ``user`` replaced by ``entry`` (None: removed)."""
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        raise ConfigError("is not valid YAML", path) from None
    if root is None:
        if entry is None:
            return text
        return _append(text, "extensions:\n  " + render_entry(user, entry, 2, 4) + "\n")
    if not isinstance(root, yaml.MappingNode) or root.flow_style:
        raise ConfigError("the top level must be a block mapping to be edited by linkus-2fa", path)
    ext_key = ext_value = None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "extensions":
            ext_key, ext_value = key, value
    if ext_key is None or ext_value is None:
        if entry is None:
            return text
        return _append(text, "extensions:\n  " + render_entry(user, entry, 2, 4) + "\n")
    indent = int(ext_key.start_mark.column) + 2
    if isinstance(ext_value, yaml.ScalarNode) or (
        isinstance(ext_value, yaml.MappingNode) and ext_value.flow_style and not ext_value.value
    ):
        # "extensions:" with nothing, or "extensions: {}": the new entry becomes the first.
        if entry is None:
            return text
        start, end = ext_value.start_mark.index, ext_value.end_mark.index
        block = "\n" + " " * indent + render_entry(user, entry, indent, indent + 2)
        return text[:start].rstrip(" ") + block + text[end:]
    if not isinstance(ext_value, yaml.MappingNode) or ext_value.flow_style:
        raise ConfigError("'extensions' is written in flow style ({...}); write it as a block mapping "
                          "(one extension per line) to edit it with linkus-2fa", path)
    target = None
    for key, value in ext_value.value:
        if isinstance(key, yaml.ScalarNode) and key.value == user:
            target = (key, value)
    if target is None:
        if entry is None:
            return text
        indent = int(ext_value.value[0][0].start_mark.column)
        inner = _inner_column(ext_value, indent)
        pos = _line_end(text, _last_end(ext_value.value[-1][1]))
        return text[:pos] + "\n" + " " * indent + render_entry(user, entry, indent, inner) + text[pos:]
    key, value = target
    start = key.start_mark.index
    end = _last_end(value)
    while end > start and text[end - 1] in "\r\n ":
        end -= 1
    if entry is None:
        line_start = text.rfind("\n", 0, start) + 1
        stop = _line_end(text, end)
        rest = text[stop + 1:] if stop < len(text) else ""
        if len(ext_value.value) == 1:
            # The last one goes: "extensions:" with nothing after it is refused as a cut file,
            # so the mapping is written out empty.
            colon = text.index(":", ext_key.end_mark.index)
            return text[:colon + 1] + " {}" + text[colon + 1:line_start] + rest
        return text[:line_start] + rest
    indent = int(key.start_mark.column)
    inner = _inner_column(ext_value, indent)
    # Keep the admin's comments: one after the key, and comment lines inside the entry.
    key_line_rest = text[key.end_mark.index:_line_end(text, key.end_mark.index)]
    key_comment = ""
    if "#" in key_line_rest and isinstance(value, yaml.MappingNode) and not value.flow_style:
        key_comment = key_line_rest[key_line_rest.index("#"):].rstrip()
    body_start = _line_end(text, key.end_mark.index)
    inner_comments = []
    if isinstance(value, yaml.MappingNode) and not value.flow_style:
        # Trailing comments of value lines move to lines of their own; the span
        # then runs to the end of the entry's last line.
        trailing = {}
        for _k, v in value.value:
            rest = text[v.end_mark.index:_line_end(text, v.end_mark.index)].strip()
            if rest.startswith("#"):
                trailing[text.count("\n", 0, v.end_mark.index)] = rest
        first_line = text.count("\n", 0, body_start)
        for offset, line in enumerate(text[body_start:end].split("\n")):
            if line.strip().startswith("#"):
                inner_comments.append(line.strip())
            elif first_line + offset in trailing:
                inner_comments.append(trailing[first_line + offset])
        end = _line_end(text, end)
    return text[:start] + render_entry(user, entry, indent, inner, inner_comments, key_comment) + text[end:]


def _append(text: str, block: str) -> str:
    """``text`` with ``block`` (whole lines) added at the end of the document: before the
    end marker ``...`` that a complete file ends with, after everything else otherwise."""
    lines = text.splitlines(keepends=True)
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].rstrip() == END_MARKER:
            return "".join(lines[:index]) + block + "".join(lines[index:])
    prefix = text if not text or text.endswith("\n") else text + "\n"
    return prefix + block


def _inner_column(entries: Any, indent: int) -> int:
    for _key, value in entries.value:
        if isinstance(value, yaml.MappingNode) and value.value and not value.flow_style:
            return int(value.value[0][0].start_mark.column)
    return indent + 2


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end
