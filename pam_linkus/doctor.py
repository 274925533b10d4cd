"""``linkus-2fa doctor``: check what a login will meet, and say what is wrong, where.

Every check uses the same code a login uses (load_config, the sources, the state
store), so "ok" here means a login gets that far. Problems are ``FAIL`` (a login
is refused, or a failed code is let through) and make the exit status 1;
``WARN`` is something to look at that does not break anything by itself.

The PAM check reads each file of /etc/pam.d and judges every ``auth`` line that
loads pam-linkus: the control field must end the login on every failure outcome
(auth_err, maxtries, authinfo_unavail, conv_err). ``sufficient``, ``optional``
or ``[default=ignore]`` would let a wrong code through whenever another module
succeeds, which is exactly the bypass a second factor must not have.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from pam_linkus.errors import LinkusError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pam_linkus.config import Config

    Report = Callable[[str, str, str], None]

#: Return values of pam-linkus that must end the login (default= covers the rest).
FAILURE_KEYS = ("auth_err", "maxtries", "authinfo_unavail", "conv_err")
#: Actions that make the stack fail.
FAILING_ACTIONS = ("die", "bad")
#: Modules (or includes) that check the password; pam-linkus belongs after one.
PASSWORD_MODULES = ("pam_unix", "pam_sss", "pam_ldap", "pam_krb5", "pam_winbind", "pam_userdb")
PROBE_USER = "linkus-doctor-probe"


class Doctor:
    """Collects results; ``failures`` decides the exit status."""

    def __init__(self, out: Callable[[str], None] = print):
        self.failures = 0
        self._out = out

    def report(self, level: str, what: str, detail: str = "") -> None:
        if level == "FAIL":
            self.failures += 1
        self._out(f"{level:<4} {what}{': ' + detail if detail else ''}")


def run(config_path: str, *, user: str | None, pam_dir: str, smtp: bool, now: float) -> int:
    from pam_linkus.config import load_config

    doc = Doctor()
    try:
        config = load_config(config_path)
    except LinkusError as exc:
        doc.report("FAIL", "config", exc.reason)
        check_pam_dir(doc, pam_dir)
        return 1
    doc.report("ok", "config", config_path)
    check_permissions(doc, config)
    uses_email = check_sources(doc, config, user)
    check_state(doc, config, now)
    if smtp or uses_email:
        check_smtp(doc, config)
    else:
        doc.report("ok", "smtp", "not checked (no extension in the YAML source uses email; --smtp checks it)")
    check_pam_dir(doc, pam_dir)
    return 1 if doc.failures else 0


def check_permissions(doc: Doctor, config: Config) -> None:
    from pam_linkus.strictyaml import read_secret_file

    for directory, what in ((os.path.dirname(config.path), "config directory"),
                            (os.path.dirname(config.state.path), "state directory")):
        try:
            st = os.stat(directory)
        except OSError as exc:
            doc.report("FAIL", what, f"{directory}: {exc.strerror}")
            continue
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            doc.report("FAIL", what, f"{directory} must be owned by root and not writable by group or others")
        elif what == "state directory" and st.st_mode & 0o077:
            doc.report("WARN", what, f"{directory} is mode {stat.S_IMODE(st.st_mode):04o}; 0700 is expected")
        else:
            doc.report("ok", what, directory)
    files = [
        (config.ldap.bind_password_file, "ldap.bind_password_file"),
        (config.ldap.writer_password_file, "ldap.writer_password_file"),
        (config.smtp.password_file, "smtp.password_file"),
        (config.state.redis.password_file if config.state.backend == "redis" else None, "state.redis.password_file"),
    ]
    for path, what in files:
        if path is None:
            continue
        try:
            read_secret_file(path, what)
            doc.report("ok", what, path)
        except LinkusError as exc:
            doc.report("FAIL", what, exc.reason)


def check_sources(doc: Doctor, config: Config, user: str | None) -> bool:
    """Check each source; True if an extension of the YAML source uses email."""
    from nss_config.chain import build_chain

    uses_email = False
    if "yaml" in config.sources:
        from nss_config.yaml_source import read_extensions

        try:
            extensions = read_extensions(config.yaml.path)
            enrolled = sum(1 for s in extensions.values() if s.enrolled)
            uses_email = any(s.enrolled and s.method == "email" for s in extensions.values())
            doc.report("ok", "yaml source", f"{config.yaml.path}: {len(extensions)} extensions, {enrolled} enrolled")
        except LinkusError as exc:
            doc.report("FAIL", "yaml source", exc.reason)
    if "ldap" in config.sources:
        from nss_config.ldap_source import check

        # The LDAP source's own step-by-step check (TLS, bind, search, lookup per server).
        for line in check(config.ldap, user):
            level, _, rest = line.partition(" ")
            what, _, detail = rest.strip().partition(": ")
            doc.report("FAIL" if level == "FAIL" else "ok", what, detail)
        if not config.ldap.writer_bind_dn:
            doc.report("ok", "ldap writes", "read-only (no ldap.writer_bind_dn): linkus-2fa cannot enroll there")
        else:
            doc.report("ok", "ldap writes", f"linkus-2fa binds as {config.ldap.writer_bind_dn}")
    if user:
        try:
            found = build_chain(config).lookup(user)
            doc.report("ok", f"lookup {user}", repr(found) if found else "not found (no 2FA)")
        except LinkusError as exc:
            doc.report("FAIL", f"lookup {user}", exc.reason)
    return uses_email


def check_state(doc: Doctor, config: Config, now: float) -> None:
    from pam_linkus.state import open_store

    try:
        store = open_store(config.state)
        try:
            store.lock_status(PROBE_USER, now)
        finally:
            store.close()
        where = config.state.path if config.state.backend == "sqlite" else config.state.redis.url
        doc.report("ok", "state store", f"{config.state.backend} {where}")
    except LinkusError as exc:
        doc.report("FAIL", "state store", exc.reason)


def check_smtp(doc: Doctor, config: Config) -> None:
    """Connect, greet, start TLS as configured, and quit -- no mail is sent."""
    import smtplib
    import ssl

    cfg = config.smtp
    try:
        context = ssl.create_default_context(cafile=cfg.ca_file) if cfg.security != "none" else None
        conn: smtplib.SMTP
        if cfg.security == "tls":
            conn = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout, context=context)
        else:
            conn = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)
        try:
            conn.ehlo(cfg.helo) if cfg.helo else conn.ehlo()
            if cfg.security == "starttls":
                conn.starttls(context=context)
                conn.ehlo(cfg.helo) if cfg.helo else conn.ehlo()
        finally:
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                conn.close()
        doc.report("ok", "smtp", f"{cfg.host}:{cfg.port} ({cfg.security})")
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        doc.report("FAIL", "smtp", f"{cfg.host}:{cfg.port} ({cfg.security}): {type(exc).__name__}: {exc}"[:300])


# -- PAM lines ----------------------------------------------------------------------


def check_pam_dir(doc: Doctor, pam_dir: str) -> None:
    try:
        names = sorted(os.listdir(pam_dir))
    except OSError as exc:
        doc.report("FAIL", "pam", f"{pam_dir}: {exc.strerror}")
        return
    found = 0
    for name in names:
        path = os.path.join(pam_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read(1 << 20)
        except OSError as exc:
            doc.report("WARN", "pam", f"{path}: {exc.strerror}")
            continue
        for number, level, message in check_pam_text(text):
            found += 1
            doc.report(level, "pam", f"{path}:{number}: {message}")
    if not found:
        doc.report("WARN", "pam", f"no service in {pam_dir} loads pam-linkus yet (see README, "
                   "'Turning it on for a service')")


def pam_lines(text: str) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of each rule, with continuations joined and comments removed.

    A bracketed control field (``[a=b c=d]``) is one token.
    """
    rules: list[tuple[int, list[str]]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        tokens: list[str] = []
        rest = line.strip()
        while rest:
            if rest.startswith("[") and "]" in rest:
                end = rest.index("]") + 1
                tokens.append(rest[:end])
                rest = rest[end:].strip()
            else:
                word, _, rest = rest.partition(" ")
                tokens.append(word)
                rest = rest.strip()
        if tokens:
            rules.append((start, tokens))
    return rules


def _loads_linkus(tokens: list[str]) -> bool:
    return len(tokens) >= 3 and (
        "pam_linkus" in tokens[2] or ("pam_python" in tokens[2] and any("pam_linkus" in t for t in tokens[3:]))
    )


def judge_control(control: str) -> list[tuple[str, str]]:
    """Problems of a control field for the pam-linkus line: (level, message)."""
    simple = {"required": [], "requisite": [],
              "sufficient": [("FAIL", "'sufficient': a wrong code is ignored when another module succeeds, and a "
                              "right one skips the rest of the stack; use [success=ok ignore=ignore default=die]")],
              "optional": [("FAIL", "'optional': a wrong code is ignored; use [success=ok ignore=ignore default=die]")]}
    if not control.startswith("["):
        return simple.get(control, [("WARN", f"unknown control {control!r:.40}")])
    actions: dict[str, str] = {}
    for pair in control.strip("[]").split():
        key, _, value = pair.partition("=")
        actions[key] = value
    default = actions.get("default", "bad")
    problems: list[tuple[str, str]] = []
    leaks = [f"{key}={actions.get(key, default)}" for key in (*FAILURE_KEYS, "default")
             if actions.get(key, default) not in FAILING_ACTIONS]
    if leaks:
        problems.append(("FAIL", f"{' '.join(leaks)} lets a failed second factor through; "
                         "use [success=ok ignore=ignore default=die]"))
    success = actions.get("success", default)
    if success == "done" or success.isdigit():
        problems.append(("WARN", f"success={success} skips the modules after pam-linkus; "
                         "make sure the password is checked before it"))
    return problems


def check_pam_text(text: str) -> list[tuple[int, str, str]]:
    """Findings for one /etc/pam.d file: (line, level, message); ok lines included."""
    findings: list[tuple[int, str, str]] = []
    password_seen = False
    for number, tokens in pam_lines(text):
        if tokens[0].startswith("@include"):
            password_seen = True
            continue
        if tokens[0].lstrip("-") != "auth" or len(tokens) < 3:
            continue
        if tokens[1] in ("include", "substack") or any(m in tokens[2] for m in PASSWORD_MODULES):
            password_seen = True
            continue
        if not _loads_linkus(tokens):
            continue
        problems = judge_control(tokens[1])
        if not password_seen:
            problems.append(("WARN", "no password module (pam_unix, @include common-auth, ...) before it: the "
                             "code would be asked (or mailed) before the password is checked"))
        if not problems:
            findings.append((number, "ok", f"auth {tokens[1]} (fails closed)"))
        findings.extend((number, level, message) for level, message in problems)
    return findings
