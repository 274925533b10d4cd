"""The shipped fail2ban filter and jail (packaging/fail2ban, docs/fail2ban.md) with the real fail2ban.

The lines come from a real linkusd (PAM logins through pam_linkus.so, caught by the tests' syslog
stand-in) and from the real Engine's web sign-ins; they are written as rsyslog's auth.log and as
fail2ban formats journal entries. ``fail2ban-regex`` says which address each line gives; a
``fail2ban-server`` of the test's own (socket, pid, database and configuration in tmp_path, an action
that appends to a file: no firewall is touched) bans after ``maxretry`` failures and not before.
Hostile values -- user names and rhosts holding quotes, ``rhost="..."``, a whole forged line -- must
never make an address other than the login's own appear, nor a line count twice.
"""

from __future__ import annotations

import collections
import configparser
import grp
import ipaddress
import random
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pam_client
import pytest
from conftest import DAEMON_PYTHON, PASSWORD, REPO, PamStack, code_at
from web_site import Api

from pam_linkus.daemon.selfservice import FAILURE_WINDOW, MAX_FAILURES_PER_EXT

FILTER = REPO / "packaging" / "fail2ban" / "filter.d" / "pam-linkus.conf"
JAIL = REPO / "packaging" / "fail2ban" / "jail.d" / "pam-linkus.conf"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ATTACKER, ATTACKER2, BYSTANDER = "192.0.2.50", "2001:db8::50", "192.0.2.70"
#: The address the hostile values name: it must never be banned or even matched.
FORGED = "198.51.100.99"
FORGED_LINE = (f'v" account="v" rhost="{FORGED}" tty="-" ruser="-" caller_uid=0 method="totp" source="yaml" '
               f'outcome="locked" reason="x" ms=1')
HOSTILE_NAMES = [f'evil" rhost="{FORGED}', f"a rhost={FORGED} outcome=locked", FORGED_LINE, f"{FORGED} \\\" {FORGED}"]
HOSTILE_RHOSTS = [f'{FORGED}" tty="x', f"{FORGED}.evil.example", "evil.example", f"{FORGED} ", f"[{FORGED}]x"]


def require_fail2ban() -> None:
    if not shutil.which("fail2ban-regex") or not shutil.which("fail2ban-server"):
        pytest.fail("fail2ban must be installed (make deps-test)")


def as_auth_log(datagram: str) -> str:
    """``<pri>Mmm dd HH:MM:SS tag[pid]: msg`` as rsyslog writes it to auth.log (with the host name)."""
    line = re.sub(r"^<\d+>", "", datagram)
    return f"{line[:15]} pbx {line[16:]}"


def as_journal(datagram: str) -> str:
    """The same line as fail2ban's systemd backend formats a journal entry (ISO date, host, tag)."""
    line = re.sub(r"^<\d+>", "", datagram)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f" pbx {line[16:]}"


def matches(lines: list[str], tmp_path: Path, out: str = "ip") -> list[str]:
    """What fail2ban-regex gives for each matched line (``-o ip``: the address), in order."""
    log = tmp_path / f"sample-{time.monotonic_ns()}.log"
    log.write_text("".join(line + "\n" for line in lines))
    done = subprocess.run(["fail2ban-regex", "-o", out, str(log), str(FILTER)], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.splitlines()


def pam_login(stack: PamStack, user: str, code: str, rhost: str) -> str:
    return pam_client.authenticate(stack.service, user, None, code, rhost, timeout=30).auth


def linkusd_lines(stack: PamStack) -> list[str]:
    return [line for line in stack.log.take() if "pam_linkus(linkusd)[" in line and "service=" in line]


def test_the_filter_gives_only_the_logins_own_address(pam_stack: PamStack, tmp_path: Path) -> None:
    require_fail2ban()
    pam_stack.set_linkus_only()
    pam_stack.write_config(enforce="all", lockout={"max_failures": 2, "duration": 900})
    hostile_ext = HOSTILE_NAMES[0]
    pam_stack.write_extensions({**{name: {"method": "totp", "secret": SECRET} for name in HOSTILE_NAMES},
                                "plain": {"method": "totp", "secret": SECRET}})
    wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"
    pam_stack.log.take()
    # an enrolled extension with a hostile name: a wrong code, then the lock, then a try while locked
    assert [pam_login(pam_stack, hostile_ext, wrong, ATTACKER) for _ in range(3)] == [
        "PAM_AUTH_ERR", "PAM_MAXTRIES", "PAM_MAXTRIES"]
    # more enrolled hostile names: a wrong code, then the wrong code that sets the lock
    for name in HOSTILE_NAMES[1:]:
        assert [pam_login(pam_stack, name, wrong, ATTACKER2) for _ in range(2)] == ["PAM_AUTH_ERR", "PAM_MAXTRIES"]
    # hostile rhosts (not IP addresses) with wrong codes, and a right code: nothing to ban
    for rhost in HOSTILE_RHOSTS:
        assert pam_login(pam_stack, "plain", wrong, rhost) in ("PAM_AUTH_ERR", "PAM_MAXTRIES")
    pam_stack.write_extensions({**pam_stack.extensions, "ok": {"method": "totp", "secret": SECRET}})
    assert pam_login(pam_stack, "ok", code_at(SECRET, time.time()), BYSTANDER) == "PAM_SUCCESS"
    assert pam_login(pam_stack, "bad\nname", wrong, BYSTANDER) == "PAM_AUTH_ERR"  # invalid name: no code asked
    lines = linkusd_lines(pam_stack)
    assert len(lines) == 3 + 2 * 3 + len(HOSTILE_RHOSTS) + 2, lines
    assert any(FORGED in line for line in lines)  # the hostile values are in the lines, escaped
    for form in (as_auth_log, as_journal):
        found = matches([form(line) for line in lines], tmp_path)
        # one address per matching line: each wrong code (also the one that set the lock), never the try
        # while locked (docs/fail2ban.md: someone else may have set the lock), none for the rest
        assert collections.Counter(found) == {ATTACKER: 2, ATTACKER2: 2 * 3}, (form.__name__, found)
    rows = matches([as_auth_log(line) for line in lines], tmp_path, "row")
    users = {re.search(r"'user': '([^']*)'", row).group(1) for row in rows}  # type: ignore[union-attr]
    assert 'evil\\\\x22 rhost\\\\x3d\\\\x22198.51.100.99' in users and len(users) == 4


def test_web_sign_in_failures_give_the_clients_address(api: Api, site: tuple[Any, Any], user: str,
                                                       tmp_path: Path) -> None:
    require_fail2ban()
    s, _smtp = site
    s.add(user, method="totp", secret=SECRET)
    api.reload()
    s.log.take()
    assert api("sign_in", ext=user, password="wrong", client=ATTACKER)["error"] == "denied"
    for name in HOSTILE_NAMES:
        assert api("sign_in", ext=name, password="wrong", client=ATTACKER)["error"] == "denied"
    first = api("sign_in", ext=user, password="Linkus-test-pw-1", client=ATTACKER2)
    assert api("sign_in_code", code="000000" if code_at(SECRET, api.clock.now) != "000000" else "111111",
               session=first["session"], csrf=first["csrf"], client=ATTACKER2)["error"] == "denied"
    assert api("sign_in", ext=user, password="wrong", client=f'{FORGED}" result="wrong-password')["error"] == \
        "denied"
    assert api("sign_in", ext=user, password="wrong", client="unix")["error"] == "denied"
    lines = [line for line in s.log.take() if 'via="web"' in line]
    found = matches([as_auth_log(line) for line in lines], tmp_path)
    assert collections.Counter(found) == {ATTACKER: 1 + len(HOSTILE_NAMES), ATTACKER2: 1}, (found, lines)


def test_a_throttle_or_a_lock_someone_else_caused_never_counts_against_the_owner(
        api: Api, site: tuple[Any, Any], user: str, tmp_path: Path) -> None:
    """The page's throttle fires before the password is checked, and a lock stays whoever set it: a
    stranger who knows only the extension number (or its password) must not get the owner, signing
    in with the right password from the owner's address, banned on every port."""
    require_fail2ban()
    s, _smtp = site
    s.add(user, method="totp", secret=SECRET)
    api.reload()
    s.log.take()
    # only the extension number, from two addresses: wrong passwords fill the extension's throttle
    for n in range(MAX_FAILURES_PER_EXT):
        assert api("sign_in", ext=user, password="wrong", client=(ATTACKER, ATTACKER2)[n % 2])["error"] == "denied"
    for _ in range(6):  # the owner, right password, own address: refused by the throttle, and logged
        assert api("sign_in", ext=user, password=PASSWORD, client=BYSTANDER)["error"] == "throttled"
    api.clock.now += FAILURE_WINDOW + 1
    # someone who has the password locks the extension with wrong codes
    wrong = "000000" if code_at(SECRET, api.clock.now) != "000000" else "111111"
    answers = []
    while not answers or answers[-1] == "denied":
        assert len(answers) < 20
        first = api("sign_in", ext=user, password=PASSWORD, client=ATTACKER)
        answers.append(api("sign_in_code", code=wrong, session=first["session"], csrf=first["csrf"],
                           client=ATTACKER)["error"])
    assert answers[-1] == "locked", answers
    for _ in range(6):  # the owner again: the extension is locked
        assert api("sign_in", ext=user, password=PASSWORD, client=BYSTANDER)["error"] == "locked"
    lines = [line for line in s.log.take() if 'via="web"' in line]
    assert sum(f'client="{BYSTANDER}" result="throttled"' in line for line in lines) == 6, lines
    # a sign-in to a locked extension has its line too (the right password: self-check, step sign-in)
    assert sum(f'action="self-check" via="web" ext="{user}" client="{BYSTANDER}" result="locked" step="sign-in"'
               in line for line in lines) == 6, lines
    found = matches([as_auth_log(line) for line in lines], tmp_path)
    half = MAX_FAILURES_PER_EXT // 2
    assert collections.Counter(found) == {ATTACKER: half + len(answers), ATTACKER2: half}, (found, lines)


def test_a_replayed_code_on_the_page_and_at_the_gate_never_counts(api: Api, site: tuple[Any, Any], user: str,
                                                                  tmp_path: Path) -> None:
    """A right code used a second time (the owner's other tab, a double click) is refused and counts
    towards the lockout, as at a PAM login, but it is no wrong code of this client: the page logs
    result="replayed-code" and the gate reason="replayed code", which fail2ban never matches."""
    from pam_linkus.daemon.gate import GateService

    require_fail2ban()
    s, _smtp = site
    s.add(user, method="totp", secret=SECRET)
    s.stack.config["gate"] = {"return_hosts": ["pbx.example.com"], "sites": [{"name": "all", "path": "/"}]}
    s.stack.write_config()
    api.reload()
    api.service = GateService(api.engine, fail_delay=0.0)
    code = code_at(SECRET, api.clock.now)
    s.log.take()
    for op, code_op, in (("sign_in", "sign_in_code"), ("sign_in", "sign_in_code"),
                         ("gate_sign_in", "gate_code")):
        first = api(op, ext=user, password=PASSWORD, client=BYSTANDER)
        api(code_op, code=code, session=first["session"], csrf=first["csrf"], client=BYSTANDER)
    lines = s.log.take()
    page = [line for line in lines if 'via="web"' in line and "result=" in line]
    assert sum('result="replayed-code"' in line for line in page) == 1, lines
    assert not [line for line in page if 'result="wrong-code"' in line], page
    assert sum('service="linkus-gate"' in line and 'reason="replayed code' in line for line in lines) == 1, lines
    assert api.store().lock_status(user, api.clock.now).failures == 2  # the lockout counted both replays
    assert matches([as_auth_log(line) for line in lines], tmp_path) == []


def test_pam_tries_while_locked_and_replayed_codes_never_count(pam_stack: PamStack, tmp_path: Path) -> None:
    """A code someone else used first (replayed) and a try while someone else's lock holds are what
    the owner meets after another person's actions: they are logged, never counted."""
    require_fail2ban()
    pam_stack.set_linkus_only()
    pam_stack.write_config(lockout={"max_failures": 3, "duration": 900})
    pam_stack.write_extensions({"alice": {"method": "totp", "secret": SECRET}})
    code = code_at(SECRET, time.time())
    wrong = "000000" if code != "000000" else "111111"
    pam_stack.log.take()
    assert pam_login(pam_stack, "alice", code, ATTACKER) == "PAM_SUCCESS"
    assert pam_login(pam_stack, "alice", code, BYSTANDER) == "PAM_AUTH_ERR"  # replayed: the attacker was first
    attacker = [pam_login(pam_stack, "alice", wrong, ATTACKER) for _ in range(2)]
    assert attacker == ["PAM_AUTH_ERR", "PAM_MAXTRIES"], attacker
    owner = [pam_login(pam_stack, "alice", code_at(SECRET, time.time()), BYSTANDER) for _ in range(6)]
    assert owner == ["PAM_MAXTRIES"] * 6
    lines = linkusd_lines(pam_stack)
    assert sum(f'rhost="{BYSTANDER}"' in line and 'outcome="locked"' in line for line in lines) == 6, lines
    assert any(f'rhost="{BYSTANDER}"' in line and 'reason="replayed code' in line for line in lines), lines
    for form in (as_auth_log, as_journal):
        found = matches([form(line) for line in lines], tmp_path)
        assert collections.Counter(found) == {ATTACKER: 2}, (form.__name__, found)


def test_an_untrusted_callers_rhost_never_counts_nor_is_mailed_as_the_client(
        pam_stack: PamStack, smtp_server: Any, tmp_path: Path) -> None:
    """Any local process allowed to ask linkusd can put any address in PAM_RHOST: only a root or
    trusted_groups caller's rhost is the client's (DESIGN). The line says so; fail2ban and the lock
    mail take only a trusted one."""
    require_fail2ban()
    server = smtp_server(security="none")
    group = f"lkf{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    try:
        pam_stack.set_linkus_only()
        pam_stack.write_config(
            daemon={"allowed_groups": [group]}, lockout={"max_failures": 2, "duration": 900},
            smtp={"host": "127.0.0.1", "port": server.port, "security": "none", "from": "pbx@example.com"},
            notify={"admin": "ops@example.net"})
        pam_stack.write_extensions({ext: {"method": "totp", "secret": SECRET, "email": f"{ext}@example.com"}
                                    for ext in ("alice", "bob")})
        wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"
        pam_stack.log.take()
        probe = (f"import daemon_client as dc; print([dc.converse({str(pam_stack.daemon.pam_socket)!r}, 'alice', "
                 f"[{wrong!r}], rhost={FORGED!r}).outcome for _ in range(2)])")
        untrusted = subprocess.run([DAEMON_PYTHON, "-c", probe], env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
                                   user=65534, group=65534, extra_groups=[grp.getgrnam(group).gr_gid],
                                   capture_output=True, text=True, timeout=30, check=False)
        assert untrusted.stdout.strip() == "['denied', 'locked']", untrusted
        assert pam_login(pam_stack, "bob", wrong, ATTACKER) == "PAM_AUTH_ERR"  # root (as sshd): trusted
        lines = linkusd_lines(pam_stack)
        assert sum(f'rhost="{FORGED}"' in line and line.endswith(" rhost_trusted=no") for line in lines) == 2, lines
        assert sum(f'rhost="{ATTACKER}"' in line and line.endswith(" rhost_trusted=yes") for line in lines) == 1
        for form in (as_auth_log, as_journal):
            assert matches([form(line) for line in lines], tmp_path) == [ATTACKER], form.__name__
        for nth in (1, 2):  # the owner's mail and the admin's: the claimed address is not the client's
            body = server.wait_for_subject("Extension alice locked", nth)["message"].get_content()
            assert FORGED not in body and "Extension alice" in body, body
    finally:
        subprocess.run(["groupdel", group], check=False)


#: Addresses fail2ban's own <ADDR> takes but that are not as ipaddress writes them: leading zeros
#: (octal to inet_aton: 127.000.000.001 is loopback, 198.051.100.010 is 198.41.100.8), IPv4 inside
#: IPv6 (mapped, translated ::ffff:0:), upper case, zeros written out, brackets. None may ever be matched.
NOT_CANONICAL = ["::ffff:0:1:2", "198.051.100.010", "127.000.000.001", "010.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1",
                 "::ffff:192.0.2.1", "0:0:0:0:0:0:0:1", "2001:DB8::1", "2001:db8::01", "2001:db8:0:0:1:0:0:1",
                 "[2001:db8::1]", "2001:db8::1::1", "2001:db8::0:1", "1:2:3:4:5:6:7::8", "::192.0.2.1",
                 "1.2.3.4.5", "256.1.1.1"]


def test_only_addresses_as_ipaddress_writes_them_are_matched(pam_stack: PamStack, tmp_path: Path) -> None:
    require_fail2ban()
    pam_stack.set_linkus_only()
    pam_stack.write_config(lockout={"max_failures": 100, "duration": 900})
    pam_stack.write_extensions({"alice": {"method": "totp", "secret": SECRET}})
    wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"
    pam_stack.log.take()
    for rhost in [*NOT_CANONICAL, ATTACKER]:
        assert pam_login(pam_stack, "alice", wrong, rhost) == "PAM_AUTH_ERR"
    lines = linkusd_lines(pam_stack)
    assert len(lines) == len(NOT_CANONICAL) + 1 and all(f'rhost="{r}"' in "".join(lines) for r in NOT_CANONICAL)
    assert matches([as_auth_log(line) for line in lines], tmp_path) == [ATTACKER]
    # every address as ipaddress writes it matches, and gives itself: a real line, its rhost replaced
    rng = random.Random(7)
    canonical = ["0.0.0.0", "255.255.255.255", "10.0.0.1", "::1", "::", "2001:db8::", "fe80::1",
                 "2001:db8:0:1:0:1:0:1", "1:0:0:2::3", "::5", "::26:0"]
    canonical.extend(str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(100))
    for _ in range(200):  # IPv6 with zero groups in runs of every length
        groups = [rng.choice([0, 0, 0, rng.getrandbits(rng.choice([4, 8, 16]))]) for _ in range(8)]
        address = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        if address.ipv4_mapped is None and not str(address).startswith("::ffff:"):
            canonical.append(str(address))
    template = as_auth_log(lines[-1])
    found = matches([template.replace(f'rhost="{ATTACKER}"', f'rhost="{a}"') for a in canonical], tmp_path)
    # (fail2ban writes ::26:0, an IPv6 address, as ::0.38.0.0: compared as addresses)
    assert [ipaddress.ip_address(a) for a in found] == [ipaddress.ip_address(a) for a in canonical], found


def test_the_shipped_jail_is_disabled_and_reads_linkusd(tmp_path: Path) -> None:
    jail = configparser.ConfigParser(interpolation=None)
    jail.read(JAIL)
    section = jail["pam-linkus"]
    assert section["enabled"] == "false" and section["filter"] == "pam-linkus"
    assert section["backend"] == "systemd" and "127.0.0.1/8" in section["ignoreip"]
    flt = configparser.ConfigParser(interpolation=None)
    flt.read(FILTER)
    assert "_SYSTEMD_UNIT=linkusd.service" in flt["Definition"]["journalmatch"]


class Fail2ban:
    """A fail2ban-server of this test: its own configuration, socket, pid and database under ``root``;
    the shipped filter and jail, turned on in a jail.local that reads ``log`` and bans into ``banned``."""

    def __init__(self, root: Path, maxretry: int):
        self.conf = root / "conf"
        self.log = root / "auth.log"
        self.banned = root / "banned"
        self.socket, self.pid = root / "f2b.sock", root / "f2b.pid"
        for sub in ("filter.d", "action.d", "jail.d", "fail2ban.d"):
            (self.conf / sub).mkdir(parents=True)
        shutil.copy("/etc/fail2ban/filter.d/common.conf", self.conf / "filter.d")
        shutil.copy(FILTER, self.conf / "filter.d")
        shutil.copy(JAIL, self.conf / "jail.d")
        (self.conf / "fail2ban.conf").write_text(
            f"[Definition]\nloglevel = INFO\nlogtarget = {root / 'fail2ban.log'}\nsyslogsocket = auto\n"
            f"socket = {self.socket}\npidfile = {self.pid}\ndbfile = {root / 'f2b.sqlite3'}\ndbpurgeage = 1d\n")
        (self.conf / "action.d" / "to-file.conf").write_text(
            f"[Definition]\nactionstart =\nactionstop =\nactioncheck =\n"
            f"actionban = echo <ip> >> {self.banned}\nactionunban =\n")
        (self.conf / "jail.conf").write_text(
            "[DEFAULT]\nbanaction = to-file\nbanaction_allports = to-file\nprotocol = tcp\nchain = INPUT\n"
            "port = 0:65535\nusedns = no\nlogencoding = utf-8\n")
        (self.conf / "jail.d" / "pam-linkus.local").write_text(
            f"[pam-linkus]\nenabled = true\nbackend = polling\nlogpath = {self.log}\nmaxretry = {maxretry}\n"
            "action = to-file\n")
        self.log.write_text("")

    def client(self, *args: str) -> str:
        done = subprocess.run(["fail2ban-client", "-c", str(self.conf), "-s", str(self.socket), "-p", str(self.pid),
                               *args], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def start(self) -> None:
        self.client("-x", "start")

    def failed(self) -> int:
        match = re.search(r"Total failed:\s+(\d+)", self.client("status", "pam-linkus"))
        assert match is not None
        return int(match.group(1))

    def wait_failed(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.failed() < count:
            assert time.monotonic() < deadline, f"fail2ban counted {self.failed()} failures, not {count}"
            time.sleep(0.2)

    def bans(self) -> list[str]:
        return self.banned.read_text().split() if self.banned.exists() else []

    def append(self, lines: list[str]) -> None:
        with self.log.open("a") as out:
            out.writelines(as_auth_log(line) + "\n" for line in lines)

    def stop(self) -> None:
        subprocess.run(["fail2ban-client", "-c", str(self.conf), "-s", str(self.socket), "-p", str(self.pid), "stop"],
                       capture_output=True, timeout=60, check=False)


def test_a_running_fail2ban_bans_after_maxretry_failures(pam_stack: PamStack, tmp_path: Path) -> None:
    require_fail2ban()
    pam_stack.set_linkus_only()
    pam_stack.write_config(lockout={"max_failures": 10, "duration": 900})
    hostile = f'x" rhost="{FORGED}'
    pam_stack.write_extensions({"alice": {"method": "totp", "secret": SECRET},
                                hostile: {"method": "totp", "secret": SECRET}})
    wrong = "000000" if code_at(SECRET, time.time()) != "000000" else "111111"
    f2b = Fail2ban(tmp_path, maxretry=3)
    f2b.start()
    try:
        pam_stack.log.take()
        # a forged address in the user name, many times: the attacker's own address counts, never FORGED
        assert [pam_login(pam_stack, hostile, wrong, BYSTANDER) for _ in range(2)] == ["PAM_AUTH_ERR"] * 2
        assert [pam_login(pam_stack, "alice", wrong, ATTACKER) for _ in range(2)] == ["PAM_AUTH_ERR"] * 2
        f2b.append(linkusd_lines(pam_stack))
        f2b.wait_failed(4)
        assert f2b.bans() == []  # two failures each: fewer than maxretry
        assert pam_login(pam_stack, "alice", wrong, ATTACKER) == "PAM_AUTH_ERR"
        f2b.append(linkusd_lines(pam_stack))
        deadline = time.monotonic() + 20
        while not f2b.bans():
            assert time.monotonic() < deadline, "fail2ban did not ban after maxretry failures"
            time.sleep(0.2)
        assert f2b.bans() == [ATTACKER]
        assert FORGED not in f2b.client("status", "pam-linkus")
    finally:
        f2b.stop()
