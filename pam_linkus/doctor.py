"""``linkus-2fa doctor``: check what a login will meet, and say what is wrong, where.

Every check uses the same code a login uses (load_config, the sources, the state
store), so "ok" here means a login gets that far. Problems are ``FAIL`` (a login
is refused, or a failed code is let through) and make the exit status 1;
``WARN`` is something to look at that does not break anything by itself.

The PAM check reads each file of /etc/pam.d as libpam does (pam_linkus.pamconf)
and judges every ``auth`` rule that loads pam-linkus: the control field must end
the login on every failure outcome (auth_err, maxtries, authinfo_unavail,
conv_err) and must not let a right code skip the password; ``sufficient``,
``optional`` or ``[default=ignore]`` would let a wrong code through whenever
another module succeeds, which is exactly the bypass a second factor must not
have. Options pam_linkus.so does not know refuse every login through the line,
so they are failures here too; a rule that still loads pam_python is a failure
(Python inside a setuid login process is a local-root hole: migrate-pam).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import smtplib
import socket
import ssl
import stat
import struct
import subprocess
import time
from typing import TYPE_CHECKING

from nss_config.chain import build_chain
from nss_config.yaml_reader import MAX_EXTENSIONS_BYTES, open_checked, read_secret_file
from nss_config.yaml_source import read_extensions
from pam_linkus import groups, policy, protocol
from pam_linkus.config import gate_warnings, load_config, missing_unix_groups
from pam_linkus.errors import LinkusError
from pam_linkus.pamconf import PamRule, parse_rules
from pam_linkus.password import PAM_DIR, ServiceRefused, check_service
from pam_linkus.state import open_store

if TYPE_CHECKING:
    from collections.abc import Callable

    from pam_linkus.config import Config, GateConfig, GateSite, GroupRule, Profile

    Report = Callable[[str, str, str], None]

#: Return values of pam-linkus that must end the login (default= covers the rest).
FAILURE_KEYS = ("auth_err", "maxtries", "authinfo_unavail", "conv_err")
#: Actions that make the stack fail.
FAILING_ACTIONS = ("die", "bad")
#: Modules (or includes) that check the password; pam-linkus belongs after one.
PASSWORD_MODULES = ("pam_unix", "pam_sss", "pam_ldap", "pam_krb5", "pam_winbind", "pam_userdb")
PROBE_USER = "linkus-doctor-probe"
#: Options of pam_linkus.so (native/pam_linkus.c): name -> takes a value.
MODULE_OPTIONS = {"socket": True, "timeout": True, "prompt": True, "profile": True, "log_socket": True,
                  "echo_code": False, "forward_pass": False, "debug": False}
#: Options of the old pam_python module that pam_linkus.so refuses.
OLD_OPTIONS = ("config", "cache_dir")
MIGRATE_HINT = "run `linkus-2fa migrate-pam`"


class Finding:
    """One line of doctor's output: level (``ok``, ``WARN``, ``FAIL``), what was checked, detail."""

    __slots__ = ("level", "what", "detail")

    def __init__(self, level: str, what: str, detail: str = ""):
        self.level = level
        self.what = what
        self.detail = detail

    def __repr__(self) -> str:
        return f"Finding({self.level!r}, {self.what!r}, {self.detail!r})"


class Doctor:
    """Collects results; ``failures`` decides the exit status."""

    def __init__(self, out: Callable[[str], None] = print):
        self.failures = 0
        self._out = out

    def report(self, level: str, what: str, detail: str = "") -> None:
        if level == "FAIL":
            self.failures += 1
        self._out(f"{level:<4} {what}{': ' + detail if detail else ''}")

    def add(self, findings: list[Finding]) -> None:
        for finding in findings:
            self.report(finding.level, finding.what, finding.detail)


def run(config_path: str, *, user: str | None, pam_dir: str, smtp: bool, now: float) -> int:
    doc = Doctor()
    try:
        config = load_config(config_path)
    except LinkusError as exc:
        doc.report("FAIL", "config", exc.reason)
        doc.add(check_time_sync())
        check_pam_dir(doc, pam_dir)
        return 1
    doc.report("ok", "config", config_path)
    check_permissions(doc, config)
    doc.add(check_daemon(config))
    doc.add(check_time_sync())
    uses_email = check_sources(doc, config, user)
    check_group_rules(doc, config)
    check_gate(doc, config)
    if user:
        check_policy(doc, config, user)
    check_state(doc, config, now)
    if smtp or uses_email:
        check_smtp(doc, config)
    else:
        doc.report("ok", "smtp", "not checked (no extension in the YAML source uses email; --smtp checks it)")
    check_pam_dir(doc, pam_dir)
    doc.add(check_web(config, pam_dir))
    return 1 if doc.failures else 0


def check_permissions(doc: Doctor, config: Config) -> None:
    """Files and directories as linkusd checks them: root-owned, 0600/0400, whole path safe."""
    files_read = [(config.path, "config file")]
    if "yaml" in config.sources:
        files_read.append((config.yaml.path, "extensions file"))
    for path, what in files_read:
        try:
            os.close(open_checked(path, secret=True, max_bytes=MAX_EXTENSIONS_BYTES)[0])
            doc.report("ok", what, f"{path} (root-owned, mode 0600/0400, parent directories safe)")
        except LinkusError as exc:
            doc.report("FAIL", what, exc.reason)

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
    files: list[tuple[str | None, str]] = [
        (config.ldap.bind_password_file, "ldap.bind_password_file"),
        (config.ldap.writer_password_file, "ldap.writer_password_file"),
        (config.smtp.password_file, "smtp.password_file"),
        (config.state.redis.password_file if config.state.backend == "redis" else None, "state.redis.password_file"),
    ]
    for secret_path, what in files:
        if secret_path is None:
            continue
        try:
            read_secret_file(secret_path, what)
            doc.report("ok", what, secret_path)
        except LinkusError as exc:
            doc.report("FAIL", what, exc.reason)


def check_sources(doc: Doctor, config: Config, user: str | None) -> bool:
    """Check each source; True if an extension of the YAML source uses email."""
    uses_email = False
    if "yaml" in config.sources:
        try:
            extensions = read_extensions(config.yaml.path)
            enrolled = sum(1 for s in extensions.values() if s.enrolled)
            uses_email = any(s.enrolled and s.method == "email" for s in extensions.values())
            doc.report("ok", "yaml source", f"{config.yaml.path}: {len(extensions)} extensions, {enrolled} enrolled")
            for name, settings in sorted(extensions.items()):
                if settings.legacy_short_secret and settings.secret:
                    doc.report("WARN", f"extension {name}", "its TOTP key has fewer than 128 bits "
                               "(legacy_short_secret, from google-authenticator); enroll it again for a new key")
        except LinkusError as exc:
            doc.report("FAIL", "yaml source", exc.reason)
    if "ldap" in config.sources:
        from nss_config.ldap_source import check  # optional: ldap3, only with an LDAP source

        # The LDAP source's own step-by-step check (TLS, bind, search, lookup per server).
        for line in check(config.ldap, user):
            level, _, rest = line.partition(" ")
            what, _, detail = rest.strip().partition(": ")
            doc.report("FAIL" if level == "FAIL" else "ok", what, detail)
        ldap = config.ldap
        kept = (f"answers kept in memory: enrolled {ldap.cache_ttl} s, not here / 2FA off "
                f"{ldap.negative_cache_ttl} s, at most {ldap.cache_size}; a change made in the directory itself "
                f"reaches logins within {ldap.cache_ttl} s, one made through linkusd at once (on that host)")
        doc.report("ok", "ldap cache", kept if ldap.cache_size and ldap.cache_ttl else "off: every login asks")
        if ldap.negative_cache_ttl and ldap.cache_size:
            doc.report("WARN", "ldap negative_cache_ttl",
                       f"where enforce: enrolled applies, an extension enrolled in the directory itself logs in on its "
                       f"password alone for up to {ldap.negative_cache_ttl} s")
        if ldap.cache_max_age:
            doc.report("ok", "ldap offline cache",
                       f"while no server answers, settings read up to {ldap.cache_max_age} s ago answer logins")
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


def describe_profile(profile: Profile) -> str:
    """One line of a policy's keys, as doctor prints it."""
    networks = ", ".join(str(n) for n in profile.exempt_networks) or "none"
    methods = ", ".join(profile.methods) or "NONE"
    return (f"enforce={profile.enforce} methods={methods} exempt_networks={networks} "
            f"grace_period={profile.grace_period}")


def _rule_keys(rule: GroupRule) -> str:
    keys = []
    if rule.enforce is not None:
        keys.append(f"enforce={rule.enforce}")
    if rule.methods is not None:
        keys.append(f"methods={', '.join(rule.methods)}")
    if rule.exempt_networks is not None:
        keys.append(f"exempt_networks={', '.join(str(n) for n in rule.exempt_networks) or 'none'}")
    if rule.grace_period is not None:
        keys.append(f"grace_period={rule.grace_period}")
    return " ".join(keys)


def check_group_rules(doc: Doctor, config: Config) -> None:
    """What makes group rules match nobody without saying so: a Unix group this host does not
    have (WARN: a typo, or a config written for another host), and an ``ldap.group_attribute``
    the directory's schema does not define (FAIL: every login such a rule could apply to is
    unavailable). What this cannot tell: an ACL that hides the attribute from the bind DN on
    some entries looks exactly like an entry in no group (docs/guide.md "Policy by group")."""
    for rule, group in missing_unix_groups(config.group_policy):
        doc.report("WARN", f"group rule {rule.name}", f"Unix group {group!r} does not exist on this host "
                   "(the rule matches nobody through it)")
    if not any(rule.ldap_groups for rule in config.group_policy):
        return
    attribute = config.ldap.group_attribute
    try:
        problem = build_chain(config).group_attribute_problem()
    except LinkusError as exc:
        doc.report("FAIL", "ldap group_attribute", f"cannot check {attribute}: {exc.reason}")
        return
    if problem is not None:
        doc.report("FAIL", "ldap group_attribute", f"{problem}: the LDAP groups of every account are unknown "
                   "and every login a rule naming ldap_groups could apply to is unavailable")
    else:
        doc.report("ok", "ldap group_attribute", f"{attribute} is defined in the directory's schema")


#: An exempt network wider than this (IPv4 /24, IPv6 /64) is a WARN: the phones' VLAN is rarely
#: larger, and every address in it passes the site naming nobody.
WIDE_EXEMPT = {4: 24, 6: 64}


def describe_site(gate: GateConfig, site: GateSite) -> str:
    """One gate site on one line: where, who may pass, enforce, exempt networks, lifetimes."""
    where = site.host or ("any of return_hosts (" + ", ".join(gate.return_hosts) + ")" if gate.return_hosts
                          else "no host (return_hosts is empty)")
    who = [f"{label} {', '.join(values)}" for label, values in (("Unix groups", site.allow_groups),
                                                                 ("LDAP groups", site.allow_ldap_groups),
                                                                 ("extensions", site.allow_extensions)) if values]
    enforce = "enrolled" if site.enforce == "enrolled" and gate.enforce == "enrolled" else "all"
    exempt = ", ".join(str(n) for n in site.exempt_networks) or "none"
    return (f"{where} {site.path}; who may pass: {' or '.join(who) if who else 'any extension'}; "
            f"enforce {enforce}; exempt networks {exempt}; session {site.session_lifetime} s, "
            f"idle {site.idle_timeout} s")


def check_gate(doc: Doctor, config: Config) -> None:
    """The web gate's sites as linkusd will apply them, and what is risky in them (WARN): a site any
    extension may pass on its password alone (enforce: enrolled in the gate and the site, no allow
    list), an exempt network wider than WIDE_EXEMPT (everyone in it passes naming nobody), an empty
    return_hosts while a site has no host (that site matches no request: all 403), a Unix group in
    allow_groups this host does not have. Nothing is said when no site is configured."""
    gate = config.gate
    # what linkusd itself warns about at load (config.gate_warnings: no sites, host-less sites with
    # an empty return_hosts, a missing Unix group), word for word, so doctor and syslog agree
    warnings = gate_warnings(gate)
    if not gate.sites:
        doc.report("ok", "gate", "no sites (the web gate lets nothing through: every protected path is 403)")
        for warning in warnings:
            doc.report("WARN", "gate", warning.removeprefix("gate: "))
        return
    doc.report("ok", "gate", f"{len(gate.sites)} site{'' if len(gate.sites) == 1 else 's'}; enforce "
               f"{gate.enforce}, not_enrolled {gate.not_enrolled}, return_hosts "
               f"{', '.join(gate.return_hosts) or 'none'}, default_return {gate.default_return}")
    for warning in warnings:
        doc.report("WARN", "gate", warning.removeprefix("gate: "))
    if not gate.return_hosts:
        doc.report("WARN", "gate return_hosts", "empty: a return URL naming a host always goes to default_return")
    for site in gate.sites:
        what = f"gate site {site.name}"
        doc.report("ok", what, describe_site(gate, site))
        if (site.enforce == "enrolled" and gate.enforce == "enrolled"
                and not (site.allow_groups or site.allow_ldap_groups or site.allow_extensions)):
            doc.report("WARN", what, "any extension may pass, and one without 2FA on its password alone "
                       "(enforce: enrolled in the gate and the site, no allow_groups/allow_ldap_groups/"
                       "allow_extensions)")
        for network in site.exempt_networks:
            if network.prefixlen < WIDE_EXEMPT[network.version]:
                doc.report("WARN", what, f"exempt network {network} is wide ({network.num_addresses} addresses): "
                           "every address in it passes naming nobody, with no sign-in")


def check_policy(doc: Doctor, config: Config, user: str) -> None:
    """The effective policy of ``user``: its groups, each group rule that matches, and the
    result for the top-level policy and for every service profile (as a login computes it)."""
    rules = config.group_policy
    try:
        _settings, directory_groups = build_chain(config).lookup_account(
            user, want_groups=any(rule.ldap_groups for rule in rules))
    except LinkusError as exc:
        doc.report("FAIL", f"policy {user}", f"cannot look the account up: {exc.reason}")
        return
    member = groups.membership(user, directory_groups)
    unix = ", ".join(sorted(member.unix)) or "none (no passwd entry, or in no group)"
    if member.ldap is None:
        ldap = "not known (no ldap source, or it did not answer)" if "ldap" in config.sources else "no ldap source"
    else:
        ldap = ", ".join(sorted(member.ldap)) or (
            f"none (in no group, or the bind DN may not read {config.ldap.group_attribute} on this entry: "
            "an ACL that hides it looks the same)")
    doc.report("ok", f"groups {user}", f"unix: {unix}; ldap: {ldap}")
    if not rules:
        doc.report("ok", f"group rules {user}", "none configured (group_policy)")
    matching = []
    for rule in rules:
        try:
            matched = groups.matches(rule.unix_groups, rule.ldap_groups, member)
        except groups.MembershipUnknown:
            doc.report("FAIL", f"group rule {rule.name}", "cannot be decided: the account's LDAP groups are "
                       "not known, so its logins are unavailable")
            return
        if matched:
            matching.append(rule)
            doc.report("ok", f"group rule {rule.name}", f"applies: {_rule_keys(rule)}")
        else:
            doc.report("ok", f"group rule {rule.name}", "does not apply (not in its groups)")
    profiles = [("top level", config.default_profile), *(
        (f"profile {name}", profile) for name, profile in sorted(config.profiles.items()))]
    for label, profile in profiles:
        effective = policy.combine(profile, matching)
        detail = f"{describe_profile(profile)} -> {describe_profile(effective)}" if matching else \
            describe_profile(profile)
        if not effective.methods:
            doc.report("FAIL", f"policy {user} ({label})", f"{detail}: no second factor is allowed, every "
                       "login is denied")
        else:
            doc.report("ok", f"policy {user} ({label})", detail)


def check_state(doc: Doctor, config: Config, now: float) -> None:
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


# -- the daemon -------------------------------------------------------------------------


def check_daemon(config: Config, socket_path: str | None = None) -> list[Finding]:
    """Ask linkusd's STATUS over its PAM socket (docs/protocol.md).

    FAIL when the socket is missing, unsafe (pam_linkus.so would refuse it) or
    nobody answers: every login is refused. FAIL when linkusd has no valid config,
    WARN when it serves an older config because the current file does not load
    (with its reason). ok with version, uptime and counters otherwise.
    """
    path = socket_path or config.daemon.pam_socket
    try:
        st = os.lstat(path)
        parent = os.lstat(os.path.dirname(path))
    except OSError as exc:
        stranded = orphaned_listeners(path)
        if stranded:
            return [Finding("FAIL", "linkusd", f"{path}: {exc.strerror}: every login is refused; "
                                               f"{_stranded_text(path, stranded)}")]
        return [Finding("FAIL", "linkusd", f"{path}: {exc.strerror}: linkusd is not running, every login is "
                                           "refused (start it: systemctl start linkusd.socket, or linkusd)")]
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or parent.st_uid != 0 or parent.st_mode & 0o022:
        return [Finding("FAIL", "linkusd", f"{path} is not a root-owned socket in a root-only directory: "
                                           "pam_linkus.so refuses it")]
    try:
        status = protocol.call_control(path, timeout=5)
    except (OSError, protocol.ProtocolError) as exc:
        stranded = orphaned_listeners(path)
        return [Finding("FAIL", "linkusd", f"{path}: no answer ({type(exc).__name__}): every login is refused"
                        + (f"; {_stranded_text(path, stranded)}" if stranded else ""))]
    findings = []
    stranded = orphaned_listeners(path)
    if stranded:
        findings.append(Finding("FAIL", "linkusd", f"pid {status.get('pid')} serves {path}; "
                                                   f"{_stranded_text(path, stranded)}"))
    if status.get("socket_problem"):
        findings.append(Finding("FAIL", "linkusd", str(status["socket_problem"])))
    if not status.get("loaded"):
        return [*findings, Finding("FAIL", "linkusd", f"running without a valid configuration, refusing "
                                                      f"every login: {status.get('last_error')}")]
    if status.get("last_error"):
        findings.append(Finding("WARN", "linkusd", f"serving the last good configuration; the current file does "
                                                   f"not load: {status.get('last_error')}"))
    uptime = int(time.time() - float(str(status.get("started", time.time()))))
    findings.append(Finding("ok", "linkusd", f"version {status.get('version')}, pid {status.get('pid')}, "
                                             f"up {uptime} s, outcomes {status.get('outcomes')}"))
    return findings


def _stranded_text(path: str, pids: list[int]) -> str:
    return (f"linkusd pid {', '.join(map(str, pids))} still listens on a socket that was bound to {path} and "
            "has since been removed or replaced: logins do not reach it (stop it, then start linkusd)")


def _socket_inodes(pid: int | str) -> set[int]:
    """The socket inodes a process holds open (socket:[N] in /proc/PID/fd)."""
    found: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _listener_pid(path: str) -> int | None:
    """The pid that listens on the socket file at ``path`` now (SO_PEERCRED of a connection, which
    names the listener's pid before it even accepts), or None if nobody does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def orphaned_listeners(path: str) -> list[int]:
    """Processes listening on a unix socket bound to ``path`` that is not the socket file at ``path``.

    /proc/net/unix keeps the name a socket was bound to after its file is unlinked, so a linkusd
    whose socket file was deleted or replaced (by a package purge, a second linkusd) shows up here
    while no login can reach it. systemd holding the same listening socket (activation) is no orphan.
    """
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return []
    listening = set()
    for row in rows:
        cols = row.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening (__SO_ACCEPTCON)
        if len(cols) >= 8 and cols[7] == path and int(cols[3], 16) & 0x10000:
            listening.add(int(cols[6]))
    serving = _listener_pid(path) if listening else None
    if serving is not None:
        listening -= _socket_inodes(serving)
    if not listening:
        return []
    holders = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _socket_inodes(pid) & listening]
    return sorted(pid for pid in holders if pid != 1)  # pid 1: systemd's own copy of a socket unit


# -- the clock --------------------------------------------------------------------------

#: A TOTP code is valid for 30 s (window 1: +-30 s): a clock a minute off locks everyone out.
TIME_COMMANDS = (
    ("timedatectl", ["timedatectl", "show", "--property=NTPSynchronized", "--value"]),
    ("chronyc", ["chronyc", "-n", "tracking"]),
    ("ntpq", ["ntpq", "-pn"]),
)


def _time_sync_verdict(name: str, output: str) -> bool | None:
    """True synchronised, False not, None this tool could not tell."""
    if name == "timedatectl":
        value = output.strip().lower()
        return True if value == "yes" else False if value == "no" else None
    if name == "chronyc":
        for line in output.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Leap status":
                return value.strip() != "Not synchronised"
        return None
    if name == "ntpq":
        peers = [line for line in output.splitlines()[2:] if line.strip()]
        if not peers:
            return None
        return any(line.startswith("*") for line in peers)
    return None


def check_time_sync(*, search_path: str | None = None, timeout: float = 5.0) -> list[Finding]:
    """Is the clock synchronised? Asks timedatectl, chronyc or ntpq, the first that can tell.

    A host whose clock is off refuses every right code; this is the hint the
    admin needs before anyone is locked out. ``search_path`` replaces PATH (tests).
    """
    for name, argv in TIME_COMMANDS:
        program = shutil.which(name, path=search_path)
        if program is None:
            continue
        try:
            done = subprocess.run([program, *argv[1:]], capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            continue
        verdict = _time_sync_verdict(name, done.stdout) if done.returncode == 0 else None
        if verdict is True:
            return [Finding("ok", "clock", f"synchronised ({name})")]
        if verdict is False:
            return [Finding("FAIL", "clock", f"not synchronised ({name}): TOTP codes fail once the clock is "
                            "more than ~30 s off; start an NTP client (systemd-timesyncd, chrony)")]
    return [Finding("WARN", "clock", "cannot tell whether the clock is synchronised (no timedatectl, chronyc "
                    "or ntpq answered); TOTP codes fail once it is more than ~30 s off")]


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
        if name.startswith(".") or not os.path.isfile(path) or name.endswith((".linkus-bak", ".dpkg-old", "~")):
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
        doc.report("WARN", "pam",
                   f"no service in {pam_dir} loads pam-linkus yet (see README.md, 'Turn it on for a service')")


def loads_pam_python_linkus(rule: PamRule) -> bool:
    """The old module: ``pam_python.so [/path/]pam_linkus.py ...``."""
    return rule.module_name == "pam_python" and any(
        arg.rsplit("/", 1)[-1] == "pam_linkus.py" for arg in rule.args[:1])


def judge_options(args: list[str]) -> list[tuple[str, str]]:
    """Problems of pam_linkus.so's options: pam_linkus.so refuses every login over any of them."""
    problems: list[tuple[str, str]] = []
    for arg in args:
        name, sep, _value = arg.partition("=")
        if name in OLD_OPTIONS:
            problems.append(("FAIL", f"option {name}= belongs to the old pam_python module; pam_linkus.so refuses "
                             f"every login with it (linkusd reads the config): remove it or {MIGRATE_HINT}"))
        elif name not in MODULE_OPTIONS:
            problems.append(("FAIL", "an unknown option: pam_linkus.so refuses every login through this line "
                             f"(known: {', '.join(MODULE_OPTIONS)})"))
        elif MODULE_OPTIONS[name] != bool(sep):
            problems.append(("FAIL", f"option {name} {'needs a' if MODULE_OPTIONS[name] else 'takes no'} value; "
                             "pam_linkus.so refuses every login through this line"))
    return problems


def judge_control(rule: PamRule, *, password_before: bool) -> list[tuple[str, str]]:
    """Problems of the control field of a pam_linkus.so rule: (level, message)."""
    fix = "use [success=ok ignore=ignore default=die]"
    if rule.control == "sufficient":
        return [("FAIL", f"'sufficient': a right code ends the stack with success (the password may not have been "
                 f"checked) and a wrong one is ignored when another module succeeds; {fix}")]
    if rule.control == "optional":
        return [("FAIL", f"'optional': a wrong code is ignored; {fix}")]
    if rule.control in ("include", "substack"):
        return [("FAIL", f"'{rule.control}' takes a file, not a module; {fix}")]
    if not rule.control.startswith("[") and rule.control not in ("required", "requisite"):
        return [("FAIL", f"unknown control (libpam ignores the line); {fix}")]
    actions = rule.actions()
    default = actions.get("default", "bad")
    problems: list[tuple[str, str]] = []
    leaks = [f"{key}={actions.get(key, default)}" for key in (*FAILURE_KEYS, "default")
             if actions.get(key, default) not in FAILING_ACTIONS]
    if leaks:
        problems.append(("FAIL", f"{' '.join(leaks)} lets a failed second factor through; {fix}"))
    success = actions.get("success", default)
    if success == "done" or success.isdigit():
        if password_before:
            problems.append(("WARN", f"success={success} skips the modules after pam-linkus; {fix}"))
        else:
            problems.append(("FAIL", f"success={success}: a right code skips the rest of the stack, and no "
                             f"password module comes before it; {fix}"))
    elif success in FAILING_ACTIONS:
        problems.append(("FAIL", f"success={success}: even a right code fails the login; {fix}"))
    return problems


def _is_password_rule(rule: PamRule) -> bool:
    return rule.include is not None or rule.control in ("include", "substack") or (
        rule.module_name in PASSWORD_MODULES)


def check_pam_text(text: str) -> list[tuple[int, str, str]]:
    """Findings for one /etc/pam.d file: (line, level, message); ok lines included."""
    findings: list[tuple[int, str, str]] = []
    rules = parse_rules(text)
    password_seen = False
    for index, rule in enumerate(rules):
        if rule.include is not None:
            password_seen = True
            continue
        if rule.kind != "auth" and not loads_pam_python_linkus(rule) and rule.module_name != "pam_linkus":
            continue
        if loads_pam_python_linkus(rule):
            findings.append((rule.first_line, "FAIL", "loads pam_linkus.py through pam_python (Python inside the "
                             f"login process: a local-root hole); {MIGRATE_HINT}"))
            continue
        if rule.kind != "auth":
            if rule.module_name == "pam_linkus":
                findings.append((rule.first_line, "WARN", f"pam_linkus.so in a {rule.kind} rule does nothing "
                                 "(setcred and the other stages return PAM_IGNORE)"))
            continue
        if rule.module_name != "pam_linkus":
            if _is_password_rule(rule):
                password_seen = True
            continue
        forward = "forward_pass" in rule.args
        problems = judge_options(rule.args)
        if rule.dash:
            problems.append(("FAIL", "'-auth': if pam_linkus.so is missing, libpam skips the line silently and "
                             "logins go on without a second factor; write 'auth'"))
        problems += judge_control(rule, password_before=password_seen or forward)
        if forward:
            later = rules[index + 1:]
            pw = next((i for i, r in enumerate(later) if r.kind == "auth" and _is_password_rule(r)), None)
            checker = pw is not None and any(r.kind == "auth" and r.module_name == "pam_linkus"
                                             and "forward_pass" not in r.args for r in later[pw + 1:])
            if not checker:
                problems.append(("FAIL", "forward_pass splits off a code that no later pam_linkus.so line (after "
                                 "the password module) checks; see docs/protocol.md, single-field mode"))
        elif not password_seen:
            problems.append(("FAIL", "no password module (pam_unix, @include common-auth, ...) before it: anyone "
                             "who knows a name could be asked for (or mailed) a code and lock it out"))
        if not problems:
            findings.append((rule.first_line, "ok", f"auth {rule.control} pam_linkus.so (fails closed)"))
        findings.extend((rule.first_line, level, message) for level, message in problems)
    return findings


# -- the self-service page ------------------------------------------------------------


def check_web(config: Config, pam_dir: str = PAM_DIR) -> list[Finding]:
    """The self-service page's rules (docs/web.md): the PAM service holds password modules
    only; the web group reaches linkusd's web socket and holds no root account. Never raises."""
    findings = []
    name = config.daemon.web_group
    try:
        group: grp.struct_group | None = grp.getgrnam(name)
    except KeyError:
        group = None
    service = config.self_service.pam_service
    try:
        check_service(service, pam_dir)
        findings.append(Finding("ok", "self-service PAM service", f"{service} (password modules only)"))
    except ServiceRefused as exc:
        # absent: password checks are refused (fail closed), nothing is exposed; loading pam_linkus is wrong
        absent = not os.path.exists(os.path.join(pam_dir, service))
        level = "WARN" if absent else "FAIL"
        findings.append(Finding(level, "self-service PAM service",
                                f"{exc}; the web page and `linkus-2fa self` cannot check passwords"))
    lockers = sorted(_stack_modules(service, pam_dir) & LOCKING_MODULES)
    if lockers:
        findings.append(Finding("WARN", "self-service PAM service", (
            f"{service} uses {', '.join(lockers)}: anyone who knows an extension number can lock its "
            "password with wrong passwords at the web page or the gate, and the owner's right password is "
            "then refused and logged as a wrong password from the owner's own address (fail2ban counts "
            "it); linkusd's own throttles and lockout already bound the tries (docs/web.md)")))
    if group is None:
        findings.append(Finding("ok", "web group", f"{name} does not exist: the web page is not installed, "
                                                   "linkusd's web socket serves root only"))
        return findings
    members = set(group.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == group.gr_gid}
    privileged = sorted(m for m in members if _uid(m) == 0)
    if privileged:
        findings.append(Finding("FAIL", "web group", f"{name} has root accounts as members ({', '.join(privileged)})"
                                                     ": linkus-web must run unprivileged"))
    elif len(members) > 1:
        findings.append(Finding("WARN", "web group", f"{name} has several members ({', '.join(sorted(members))}): "
                                                     "each of them may call linkusd's web socket; keep only "
                                                     "linkus-web (never the reverse proxy's user)"))
    else:
        findings.append(Finding("ok", "web group", f"{name}: {', '.join(sorted(members)) or 'no members'}"))
    return findings


#: PAM modules that lock a password after failures: in the self-service stack, a stranger's wrong
#: passwords lock the owner out and make the owner's right password look wrong (docs/web.md).
LOCKING_MODULES = frozenset({"pam_faillock", "pam_tally", "pam_tally2"})


def _stack_modules(service: str, pam_dir: str, depth: int = 0, seen: set[str] | None = None) -> set[str]:
    """The module names (``pam_unix``) of a PAM service, its @include, include and substack files
    followed (at most 10 deep, each file once); an unreadable file adds nothing (check_service says so)."""
    seen = set() if seen is None else seen
    if depth > 10 or service in seen or "/" in service or service in ("", ".", ".."):
        return set()
    seen.add(service)
    try:
        with open(os.path.join(pam_dir, service), encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 20)
    except OSError:
        return set()
    found: set[str] = set()
    for rule in parse_rules(text):
        if rule.include is not None:
            found |= _stack_modules(rule.include, pam_dir, depth + 1, seen)
        elif rule.control in ("include", "substack"):
            found |= _stack_modules(rule.module, pam_dir, depth + 1, seen)
        else:
            found.add(rule.module_name)
    return found


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None
