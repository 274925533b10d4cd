"""Reading /etc/pam.d files the way libpam reads them, for ``doctor`` and ``migrate-pam``.

Why our own reader: a checker that reads PAM files differently from libpam
reports "ok" for lines libpam runs differently (``auth<TAB>sufficient``,
``AUTH SUFFICIENT``) -- exactly the bypass it exists to find. What libpam 1.5
(Debian 12) does, and this module does too:

- ``#`` starts a comment anywhere on a line; a line ending in ``\\`` continues on
  the next (both joined with a space);
- fields are separated by any run of spaces and tabs;
- the type (``auth``, ``account``, ``password``, ``session``) is matched without
  regard to case, and a leading ``-`` means "skip silently if the module is missing";
- the control is a keyword (``required``, ``requisite``, ``sufficient``,
  ``optional``, ``include``, ``substack``; any case) or ``[value=action ...]``,
  which may contain spaces and runs to the closing ``]``;
- module arguments are split at whitespace, except that ``[...]`` is one argument
  that may contain spaces (``\\]`` inside it is a literal ``]``); the module gets it
  without the brackets, and so does ``PamRule.args``;
- ``@include FILE`` (any case) pulls in another file's rules.
"""

from __future__ import annotations

TYPES = ("auth", "account", "password", "session")
KEYWORD_CONTROLS = ("required", "requisite", "sufficient", "optional", "include", "substack")


class PamRule:
    """One rule of a PAM file (after joining continuations and dropping comments).

    ``first_line``/``last_line`` are 1-based physical lines, so a rewrite can
    replace exactly the text the rule came from.
    """

    __slots__ = ("first_line", "last_line", "kind", "dash", "control", "module", "args", "include")

    def __init__(self, first_line: int, last_line: int, kind: str, dash: bool, control: str, module: str,
                 args: list[str], include: str | None = None):
        self.first_line = first_line
        self.last_line = last_line
        self.kind = kind  # lower case; "" for an @include line
        self.dash = dash
        self.control = control  # lower case keyword, or "[...]" with the brackets
        self.module = module
        self.args = args
        self.include = include

    @property
    def module_name(self) -> str:
        """``pam_unix`` for ``pam_unix.so`` or ``/lib/x86_64-linux-gnu/security/pam_unix.so``."""
        base = self.module.rsplit("/", 1)[-1]
        return base[:-3] if base.endswith(".so") else base

    def actions(self) -> dict[str, str]:
        """The control as ``{value: action}`` (lower case), keywords expanded as libpam does."""
        keyword = {
            "required": {"success": "ok", "new_authtok_reqd": "ok", "ignore": "ignore", "default": "bad"},
            "requisite": {"success": "ok", "new_authtok_reqd": "ok", "ignore": "ignore", "default": "die"},
            "sufficient": {"success": "done", "new_authtok_reqd": "done", "default": "ignore"},
            "optional": {"success": "ok", "new_authtok_reqd": "ok", "default": "ignore"},
        }
        if not self.control.startswith("["):
            return dict(keyword.get(self.control, {}))
        actions: dict[str, str] = {}
        for pair in self.control[1:-1].split():
            key, _, value = pair.partition("=")
            actions[key.lower()] = value.lower()
        return actions

    def __repr__(self) -> str:
        return f"PamRule({self.first_line}, {self.kind!r}, {self.control!r}, {self.module!r}, {self.args!r})"


def logical_lines(text: str) -> list[tuple[int, int, str]]:
    """``(first line, last line, text)`` with comments removed and continuations joined."""
    out: list[tuple[int, int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not pending:
            start = number
        line = line.split("#", 1)[0]
        stripped = line.rstrip(" \t")
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(line)
        joined = " ".join(pending)
        pending = []
        if joined.strip(" \t"):
            out.append((start, number, joined))
    if pending and " ".join(pending).strip(" \t"):
        out.append((start, start + len(pending) - 1, " ".join(pending)))
    return out


def _split(text: str) -> list[str]:
    """Whitespace-separated words; ``[...]`` is one word (``\\]`` inside it is ``]``)."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\n\r\v\f":
            i += 1
            continue
        if text[i] == "[":
            j = i + 1
            chars = ["["]
            while j < n and text[j] != "]":
                if text[j] == "\\" and j + 1 < n and text[j + 1] == "]":
                    chars.append("]")
                    j += 2
                    continue
                chars.append(text[j])
                j += 1
            chars.append("]")
            words.append("".join(chars))
            i = j + 1
            continue
        j = i
        while j < n and text[j] not in " \t\n\r\v\f":
            j += 1
        words.append(text[i:j])
        i = j
    return words


def parse_rules(text: str) -> list[PamRule]:
    """Every rule of one /etc/pam.d file, in order; lines libpam would skip as invalid are left out."""
    rules: list[PamRule] = []
    for first, last, line in logical_lines(text):
        words = _split(line)
        if not words:
            continue
        if words[0].lower() == "@include":
            rules.append(PamRule(first, last, "", False, "include", "", [],
                                 include=words[1] if len(words) > 1 else ""))
            continue
        kind = words[0].lower()
        dash = kind.startswith("-")
        kind = kind.lstrip("-")
        if kind not in TYPES or len(words) < 3:
            continue
        control = words[1] if words[1].startswith("[") else words[1].lower()
        module = words[2]
        rules.append(PamRule(first, last, kind, dash, control, module, [_unbracket(w) for w in words[3:]]))
    return rules


def _unbracket(word: str) -> str:
    """libpam passes ``[a b]`` to the module as ``a b``."""
    return word[1:-1] if word.startswith("[") and word.endswith("]") else word


def render_arg(arg: str) -> str:
    """An argument as it must be written in a PAM file (brackets when it has spaces or brackets)."""
    if arg and not any(c in arg for c in " \t[]"):
        return arg
    return "[" + arg.replace("]", "\\]") + "]"
