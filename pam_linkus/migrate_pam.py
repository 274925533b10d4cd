"""``linkus-2fa migrate-pam``: rewrite pam_python lines of the old module into pam_linkus.so lines.

Why: every ``pam_python.so pam_linkus.py`` line starts CPython inside the login
process -- with su and sudo, a local-root hole no code of ours can close
(issue 11). An upgrade must not leave one behind, and must not lock anyone out
either, so the rewrite keeps each line's place and control and maps the options:

- ``prompt=``, ``echo_code``, ``debug``, ``log_socket=`` are kept as they are;
- ``config=`` and ``cache_dir=`` are dropped (linkusd reads the config; there are
  no caches any more), with a note;
- ``forward_pass`` (single-field mode) becomes the two-line form of
  docs/protocol.md: the old line becomes ``pam_linkus.so forward_pass``, and a
  second ``pam_linkus.so`` line is added right after the password module that
  follows it, so the code is checked only after the password succeeded;
- a leading ``-`` is dropped: a missing module would otherwise be skipped silently.

A file is written atomically (a temporary file in the same directory, then
rename), with its owner and mode kept and the old text kept as FILE.linkus-bak.
A file with an option we cannot map, or a forward_pass line without a password
module right after it, is left alone and reported: guessing would risk a bypass.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable

from nss_config.yaml_writer import YamlWriter
from pam_linkus.config import load_config
from pam_linkus.doctor import loads_pam_python_linkus
from pam_linkus.errors import LinkusError
from pam_linkus.pamconf import PamRule, parse_rules, render_arg

KEPT_OPTIONS = ("prompt", "echo_code", "debug", "log_socket", "forward_pass")
DROPPED_OPTIONS = ("config", "cache_dir")
BACKUP_SUFFIX = ".linkus-bak"
CHECKER_CONTROL = "[success=ok ignore=ignore default=die]"


class Unmappable(Exception):
    """A line this tool will not rewrite by itself (the message says why)."""


class FilePlan:
    """What migrating one file means: its new text and the lines to print."""

    def __init__(self, path: str, new_text: str, notes: list[str]):
        self.path = path
        self.new_text = new_text
        self.notes = notes


def _new_args(rule: PamRule, notes: list[str], where: str) -> list[str]:
    args: list[str] = []
    for arg in rule.args[1:]:  # args[0] is the path of pam_linkus.py
        name = arg.partition("=")[0]
        if name in DROPPED_OPTIONS:
            notes.append(f"{where}: dropped {name}= (linkusd reads /etc/pam_linkus/pam_linkus.yaml; no caches)")
        elif name in KEPT_OPTIONS:
            args.append(arg)
        else:
            raise Unmappable(f"{where}: option {name[:40]!r} of the old module has no pam_linkus.so equivalent")
    return args


def _line(kind: str, control: str, args: list[str]) -> str:
    return " ".join([kind, control, "pam_linkus.so", *(render_arg(a) for a in args)])


def _password_rule_after(rules: list[PamRule], index: int) -> PamRule:
    """The password rule that must follow a forward_pass line, checked to end the stack on failure."""
    for rule in rules[index + 1:]:
        if rule.kind != "auth":
            continue
        actions = rule.actions()
        success, default = actions.get("success", actions.get("default", "bad")), actions.get("default", "bad")
        if rule.include is not None or rule.control in ("include", "substack"):
            raise Unmappable("forward_pass is followed by an include; put the password module (requisite) "
                             "right after it by hand")
        if success != "ok" or default not in ("die", "bad"):
            raise Unmappable("the password module after the forward_pass line must be requisite or required "
                             "(a success there must not end the stack before the code is checked)")
        return rule
    raise Unmappable("forward_pass is not followed by a password module")


def plan_file(path: str, text: str) -> FilePlan | None:
    """The rewrite of one PAM file, or None if it has no old line; Unmappable if it must be done by hand."""
    rules = parse_rules(text)
    old = [(i, r) for i, r in enumerate(rules) if loads_pam_python_linkus(r)]
    if not old:
        return None
    lines = text.split("\n")
    replace: dict[int, tuple[int, list[str]]] = {}  # first physical line (0-based) -> (last, new lines)
    notes: list[str] = []
    for index, rule in old:
        where = f"{path}:{rule.first_line}"
        args = _new_args(rule, notes, where)
        kind = rule.kind
        if rule.dash:
            notes.append(f"{where}: dropped the leading '-' (a missing module must refuse logins, not skip)")
        new = _line(kind, rule.control, args)
        notes.append(f"{where}: {' '.join(lines[rule.first_line - 1:rule.last_line]).strip()}")
        notes.append(f"{where}:   -> {new}")
        replace[rule.first_line - 1] = (rule.last_line - 1, [new])
        if "forward_pass" in args:
            try:
                password = _password_rule_after(rules, index)
            except Unmappable as exc:
                raise Unmappable(f"{where}: {exc}") from None
            checker = _line(kind, CHECKER_CONTROL, [a for a in args if a != "forward_pass" and
                                                    a.partition("=")[0] != "prompt"])
            first, (last, new_lines) = password.first_line - 1, replace.get(
                password.first_line - 1, (password.last_line - 1, lines[password.first_line - 1:password.last_line]))
            replace[first] = (last, [*new_lines, checker])
            notes.append(f"{path}:{password.last_line}: added after the password module: {checker}")
    out: list[str] = []
    number = 0
    while number < len(lines):
        if number in replace:
            last, new_lines = replace[number]
            out.extend(new_lines)
            number = last + 1
        else:
            out.append(lines[number])
            number += 1
    return FilePlan(path, "\n".join(out), notes)


def write_atomically(path: str, text: str) -> str:
    """Replace ``path`` by ``text`` (same owner and mode), keeping the old file as a backup; return its name."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    backup = path + BACKUP_SUFFIX
    n = 1
    while os.path.lexists(backup):
        backup = f"{path}{BACKUP_SUFFIX}.{n}"
        n += 1
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.linkus-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchown(handle.fileno(), st.st_uid, st.st_gid)
            os.fchmod(handle.fileno(), stat.S_IMODE(st.st_mode))
            os.fsync(handle.fileno())
        os.link(path, backup)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return backup


def migrate(pam_dir: str, *, check: bool, out: Callable[[str], None] = print) -> int:
    """Migrate (or, with ``check``, only report) every file of ``pam_dir``; the exit status.

    ``check``: 1 when something needs migrating (or cannot be migrated), else 0.
    Otherwise: 0 when every old line was rewritten (or there was none), 1 when a
    file had to be left alone.
    """
    try:
        names = sorted(os.listdir(pam_dir))
    except OSError as exc:
        out(f"linkus-2fa: {pam_dir}: {exc.strerror}")
        return 1
    pending = failed = 0
    for name in names:
        path = os.path.join(pam_dir, name)
        if name.startswith(".") or BACKUP_SUFFIX in name or not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                text = handle.read(1 << 20)
            plan = plan_file(path, text)
        except Unmappable as exc:
            out(f"FAIL {exc} -- left unchanged; edit it by hand (docs/protocol.md)")
            failed += 1
            continue
        except OSError as exc:
            out(f"FAIL {path}: {exc.strerror}")
            failed += 1
            continue
        if plan is None:
            continue
        pending += 1
        for note in plan.notes:
            out(note)
        if check:
            out(f"needs migrating: {path}")
            continue
        try:
            backup = write_atomically(path, plan.new_text)
        except OSError as exc:
            out(f"FAIL {path}: could not write: {exc.strerror or exc}")
            failed += 1
            continue
        out(f"migrated {path} (the old file is kept as {backup}; delete it once logins work)")
    if check:
        if not pending and not failed:
            out(f"nothing to migrate in {pam_dir}")
        return 1 if pending or failed else 0
    if not pending and not failed:
        out(f"nothing to migrate in {pam_dir}")
    return 1 if failed else 0


def mark_legacy_secrets(config_path: str, *, check: bool, out: Callable[[str], None] = print) -> int:
    """The other half of the upgrade: mark the 80-bit keys the pam_python version imported.

    Without ``legacy_short_secret: true`` this version refuses extensions.yaml as a whole
    (at least 128 bits, issue 12.7), and every login would be refused after the upgrade.
    ``check``: only report (exit 1 when something needs marking).
    """
    if not os.path.exists(config_path):
        return 0  # not installed yet: no extensions to look at
    try:
        config = load_config(config_path)
        if "yaml" not in config.sources:
            return 0
        names = YamlWriter(config.yaml.path).mark_legacy_secrets(dry_run=check)
    except LinkusError as exc:
        out(f"FAIL {exc.reason}")
        return 1
    for name in names:
        verb = "needs" if check else "marked"
        out(f"{verb} legacy_short_secret: extension {name!r} (a key under 128 bits from the old import; "
            "it should enroll again)")
    return 1 if check and names else 0
