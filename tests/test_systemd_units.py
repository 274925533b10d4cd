"""The systemd units in packaging/systemd: verified, hardened, and in agreement with linkusd.

CI has no systemd as PID 1, so what can be checked here is checked with systemd's own offline
tools (``systemd-analyze verify`` and ``security --offline=yes``), and the daemon is run in
stand-ins for the unit: ``systemd-socket-activate`` for the socket units (descriptor names,
sd_notify), ``setpriv`` for CapabilityBoundingSet= (empty) and NoNewPrivileges=, the kernel's
PR_SET_MDWE for MemoryDenyWriteExecute=, and a libseccomp filter built from the unit's own
SystemCallFilter= lines (expanded by systemd-analyze) and RestrictAddressFamilies= for the system
call filter, and a private mount namespace for ProtectSystem=strict + ReadWritePaths= +
PrivateTmp= (roughly: every mount read-only, the state and socket directories read-write).
PrivateDevices=, ProtectHome= as systemd sets it up, StateDirectory=, ProcSubset=,
RestrictNamespaces=, the Protect* kernel settings, LockPersonality=, RestrictRealtime=,
RestrictSUIDSGID=, and the watchdog's restart only a real systemd host exercises.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DAEMON_PYTHON, PASSWORD, REPO, SECRET, LogCatcher, PamStack, code_at, require_root

from pam_linkus.daemon import main as daemon_main

UNITS = REPO / "packaging" / "systemd"
OWN_UNITS = ("linkusd.socket", "linkusd-web.socket", "linkusd.service")
MAN = REPO / "packaging" / "man"
#: The highest `systemd-analyze security` exposure accepted for linkusd.service (0 = locked down,
#: 10 = unprotected). It is 1.9 today; what is left is running as root (needed: root-only
#: config, PAM password checks), the network (LDAP/SMTP/Redis) and no IP allow list (site-specific).
MAX_EXPOSURE = 2.0
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def unit(name: str) -> configparser.ConfigParser:
    """A unit file as sections of (key -> last value); repeated keys keep the last one."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def values(name: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps only the last)."""
    return [line.split("=", 1)[1] for line in (UNITS / name).read_text().splitlines() if line.startswith(key + "=")]


def analyze_verify(tmp_path: Path, units: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of units written to tmp_path, with the man pages they name on MANPATH
    (verify runs `man` for every Documentation=man: entry) and ExecStart= on a file that exists."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (Debian's systemd package has it)")
    mandir = tmp_path / "man"
    for page in MAN.iterdir():
        section = mandir / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    linkusd = tmp_path / "linkusd"
    linkusd.write_text("#!/bin/sh\nexit 0\n")
    linkusd.chmod(0o755)
    unitdir = tmp_path / "units"
    unitdir.mkdir()
    for name, text in units.items():
        (unitdir / name).write_text(text.replace("ExecStart=/usr/sbin/linkusd", f"ExecStart={linkusd}"))
    return subprocess.run(["systemd-analyze", "verify", *(str(unitdir / n) for n in units)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=unitdir,
                          env={**CLEAN_ENV, "MANPATH": str(mandir), "SYSTEMD_LOG_LEVEL": "notice"})


def test_units_verify_with_empty_stderr(tmp_path: Path) -> None:
    result = analyze_verify(tmp_path, {name: (UNITS / name).read_text() for name in OWN_UNITS})
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_verify_catches_a_typo_so_the_check_above_means_something(tmp_path: Path) -> None:
    """systemd-analyze exits 0 on an unknown key: only its stderr tells."""
    units = {name: (UNITS / name).read_text() for name in OWN_UNITS}
    units["linkusd.service"] = units["linkusd.service"].replace("ProtectSystem=strict", "ProtectSystme=strict")
    result = analyze_verify(tmp_path, units)
    assert "ProtectSystme" in result.stderr, result.stderr


def test_security_exposure_is_under_the_threshold() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                             str(UNITS / "linkusd.service")],
                            capture_output=True, text=True, timeout=60, check=False, env=CLEAN_ENV)
    found = re.search(r"Overall exposure level for linkusd\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
    # The settings the brief asks for each show as met (a check mark) in the table.
    met = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("✓")}
    for setting in ("NoNewPrivileges=", "PrivateTmp=", "PrivateDevices=", "ProtectKernelTunables=",
                    "ProtectKernelModules=", "ProtectControlGroups=", "RestrictNamespaces=~user",
                    "LockPersonality=", "MemoryDenyWriteExecute=", "RestrictRealtime=", "RestrictSUIDSGID=",
                    "SystemCallArchitectures=", "SystemCallFilter=~@privileged", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
                    "ProtectSystem=", "UMask="):
        assert setting in met, f"{setting} not met:\n{result.stdout}"


def test_sockets_match_the_daemon_and_the_protocol() -> None:
    """Paths, descriptor names, modes and group as linkusd and docs/protocol.md expect them."""
    pam, web = unit("linkusd.socket")["Socket"], unit("linkusd-web.socket")["Socket"]
    assert (pam["ListenStream"], pam["FileDescriptorName"]) == (daemon_main.DEFAULT_PAM_SOCKET, "pam")
    assert (web["ListenStream"], web["FileDescriptorName"]) == (daemon_main.DEFAULT_WEB_SOCKET, "web")
    assert (pam["SocketUser"], pam["SocketGroup"], pam["SocketMode"]) == ("root", "root", "0666")
    assert (web["SocketUser"], web["SocketGroup"], web["SocketMode"]) == ("root", "linkus-web", "0660")
    assert pam["DirectoryMode"] == web["DirectoryMode"] == "0755"  # pam_linkus.so refuses a writable dir
    assert pam["Service"] == web["Service"] == "linkusd.service"
    service = unit("linkusd.service")
    assert service["Service"]["Sockets"].split() == ["linkusd.socket", "linkusd-web.socket"]
    assert service["Service"]["Type"] == "notify" and service["Service"]["Restart"] == "always"
    # No RuntimeDirectory=: it would delete /run/linkusd, and the sockets in it, when linkusd stops.
    assert "RuntimeDirectory" not in service["Service"]
    paths = service["Service"]["ReadWritePaths"].split()
    assert {"/var/lib/pam_linkus", os.path.dirname(daemon_main.DEFAULT_PAM_SOCKET)} <= set(paths)
    assert service["Service"]["CapabilityBoundingSet"] == ""
    # linkusd reads /proc/PID/status of its peers (real uid of a setuid caller): hidepid would hide it.
    assert service["Service"].get("ProtectProc", "default") == "default"
    # Socket activation at boot: the first console login must not wait for the network.
    assert "network-online.target" not in service["Unit"].get("After", "") + service["Unit"].get("Wants", "")
    assert values("linkusd.service", "SystemCallFilter") == ["@system-service", "~@privileged @resources"]


class _Notify:
    """$NOTIFY_SOCKET for a daemon started outside systemd."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def wait_for(self, needle: str) -> str:
        seen = ""
        while needle not in seen:
            seen += self.sock.recv(4096).decode() + "\n"
        return seen


#: Run linkusd as linkusd.service would: the kernel refusing writable+executable memory for the
#: process and its children, as MemoryDenyWriteExecute= does (PR_SET_MDWE, Linux >= 6.3,
#: inherited over exec), and a seccomp filter built from the unit's SystemCallFilter= lines
#: (allowed: @system-service minus @privileged and @resources, as systemd-analyze expands
#: them; anything else fails with SystemCallErrorNumber=EPERM), with socket() allowed only for the
#: families of RestrictAddressFamilies= (others fail with EAFNOSUPPORT, as under systemd).
#: argv[1]: the allowed names; argv[2]: the allowed address families.
SANDBOX_WRAPPER = """
import ctypes, errno, json, runpy, sys
import seccomp
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed")
allowed = json.load(open(sys.argv[1]))
families = json.loads(sys.argv[2])
rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in allowed:
    if name == "socket":
        continue
    try:
        rules.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError):
        pass  # not a system call of this architecture
for family in families:
    rules.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, family))
for family in set(range(46)) - set(families):
    rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
rules.load()
sys.argv = ["linkusd", *sys.argv[3:]]
runpy.run_module("pam_linkus.daemon", run_name="__main__")
"""


#: The mount namespace of linkusd.service, roughly: ProtectSystem=strict (every mount read-only but
#: the API file systems), ReadWritePaths= (the arguments before "--", bound read-write again),
#: PrivateTmp= (fresh /tmp and /var/tmp). Runs as root before capabilities are dropped, in its own
#: mount namespace (unshare --mount, private propagation): nothing leaks to the host.
NAMESPACE_WRAPPER = r"""
set -e
rw=()
while [ "$1" != -- ]; do rw+=("$1"); shift; done
shift
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
    case "$m" in /dev|/dev/*|/proc|/proc/*|/sys|/sys/*) continue ;; esac
    mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for p in "${rw[@]}"; do mount --bind "$p" "$p"; mount -o remount,bind,rw "$p"; done
# The checkout may itself live under /tmp (CI clones anywhere): hold it in a writable place, then
# put it back on the private /tmp at the same path, so PYTHONPATH still finds it.
if [ -n "${LINKUS_KEEP:-}" ]; then mkdir -p "${rw[0]}/.code"; mount --bind "$LINKUS_KEEP" "${rw[0]}/.code"; fi
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
if [ -n "${LINKUS_KEEP:-}" ] && [ ! -d "$LINKUS_KEEP/pam_linkus" ]; then
    mkdir -p "$LINKUS_KEEP"; mount --bind "${rw[0]}/.code" "$LINKUS_KEEP"
fi
exec "$@"
"""


def syscall_group(name: str) -> set[str]:
    """A systemd system call group (e.g. @system-service) expanded to names, nested groups included."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         timeout=30, check=True, env=CLEAN_ENV).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        names |= syscall_group(item) if item.startswith("@") else {item}
    return names


def unit_address_families() -> str:
    """RestrictAddressFamilies= of linkusd.service as a JSON list of numbers, for the wrapper."""
    import socket as sockets

    names = unit("linkusd.service")["Service"]["RestrictAddressFamilies"].split()
    return json.dumps([int(getattr(sockets, name)) for name in names])


def unit_syscall_allowlist() -> set[str]:
    """What linkusd.service's SystemCallFilter= lines allow."""
    allowed: set[str] = set()
    for value in values("linkusd.service", "SystemCallFilter"):
        deny = value.startswith("~")
        names = set().union(*(syscall_group(g) if g.startswith("@") else {g} for g in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    assert "execve" in allowed and "setuid" not in allowed and "setrlimit" not in allowed
    return allowed


def _mdwe_available() -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(re.sub(r"\D.*", "", release[1]) or 0)) >= (6, 3)


#: What CapabilityBoundingSet= (empty) and NoNewPrivileges=yes leave a root service: uid 0 with no
#: capability at all (exec recomputes root's capabilities from the empty bounding set).
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]


def test_pam_password_check_needs_no_capability(private_dir: Path, log_catcher: LogCatcher, user: str) -> None:
    """linkusd checks self-service passwords through PAM (pam_unix) with no capability: pam_unix reads
    /etc/shadow as its owner, root. A wrong password is still refused, so the check is real."""
    require_root()
    stack = PamStack(private_dir, log_catcher, start=False,
                     auth_lines="auth required pam_unix.so nodelay\n")
    try:
        def check(password: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*NO_CAPS, "pamtester", stack.service, user, "authenticate"],
                                  input=password + "\n", capture_output=True, text=True, timeout=30, check=False,
                                  env=CLEAN_ENV)

        right, wrong = check(PASSWORD), check("not-" + PASSWORD)
        assert right.returncode == 0, right.stdout + right.stderr
        assert wrong.returncode != 0 and "Authentication failure" in wrong.stderr
    finally:
        stack.remove()


def test_daemon_under_the_units_socket_names_without_capabilities_or_wx_memory(
        private_dir: Path, log_catcher: LogCatcher, user: str) -> None:
    """systemd-socket-activate passes both sockets with the units' FileDescriptorName=s; linkusd,
    with no capability, no_new_privs, unable to map writable+executable memory, only the system
    calls the unit allows, and nothing writable but its state and socket directories, says READY=1,
    serves a real login through pam_linkus.so, reloads on SIGHUP (RELOADING=1 then READY=1) and
    says STOPPING=1 on SIGTERM."""
    require_root()
    if not _mdwe_available():
        pytest.fail(f"kernel {os.uname().release} has no PR_SET_MDWE (6.3+); cannot stand in for the unit")
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is missing (Debian's systemd package has it)")
    if subprocess.run([DAEMON_PYTHON, "-c", "import seccomp"], capture_output=True, check=False).returncode != 0:
        pytest.fail("python3-seccomp is missing (make deps-test installs it)")
    allowlist = private_dir / "syscalls.json"
    allowlist.write_text(json.dumps(sorted(unit_syscall_allowlist())))
    stack = PamStack(private_dir, log_catcher, start=False)
    # The first connection starts linkusd (socket activation): give a loaded machine time for that.
    stack.set_pam(options="timeout=60")
    notify = _Notify(private_dir / "notify.sock")
    pam_sock, web_sock = stack.daemon.pam_socket, stack.daemon.web_socket
    names = f"{unit('linkusd.socket')['Socket']['FileDescriptorName']}:" \
            f"{unit('linkusd-web.socket')['Socket']['FileDescriptorName']}"
    proc = subprocess.Popen(
        [activate, "-l", str(pam_sock), "-l", str(web_sock), f"--fdname={names}",
         "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={REPO}", "-E", "WATCHDOG_USEC=2000000",
         "-E", f"LINKUS_KEEP={REPO}",
         "unshare", "--mount", "--propagation", "private", "--", "bash", "-c", NAMESPACE_WRAPPER, "linkusd-ns",
         str(stack.state_path.parent), str(pam_sock.parent), "--",
         *NO_CAPS, DAEMON_PYTHON, "-c", SANDBOX_WRAPPER, str(allowlist), unit_address_families(),
         "--config", str(stack.config_path),
         "--pam-socket", str(pam_sock), "--web-socket", str(web_sock), "--log-socket", str(log_catcher.path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CLEAN_ENV,
    )
    try:
        deadline = time.monotonic() + 20
        while not (pam_sock.exists() and web_sock.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat.S_ISSOCK(os.lstat(web_sock).st_mode)
        stack.enroll_totp(user)  # written before linkusd starts: the first connection starts it
        code = code_at(SECRET, time.time())
        ok = stack.pamtester(user, PASSWORD, code, timeout=90)
        if ok.returncode != 0:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
            raise AssertionError((ok.stdout + ok.stderr, log_catcher.lines, err.decode(errors="replace")[-3000:]))
        assert "READY=1" in notify.wait_for("READY=1")
        assert "WATCHDOG=1" in notify.wait_for("WATCHDOG=1")
        replay = stack.pamtester(user, PASSWORD, code)
        assert replay.returncode != 0 and "Authentication failure" in replay.stderr
        daemon_pid = int((pam_sock.parent / "linkusd.lock").read_text())
        status = Path(f"/proc/{daemon_pid}/status").read_text()
        assert "\nCapEff:\t0000000000000000\n" in status and "\nNoNewPrivs:\t1\n" in status, status
        assert "\nSeccomp:\t2\n" in status, status  # filter mode
        mounts = {line.split()[4]: line.split()[5].split(",") for line in
                  Path(f"/proc/{daemon_pid}/mountinfo").read_text().splitlines()}
        assert "ro" in mounts["/"] and "rw" in mounts[str(stack.state_path.parent)], mounts
        os.kill(daemon_pid, signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        os.kill(daemon_pid, signal.SIGTERM)
        assert "STOPPING=1" in notify.wait_for("STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        notify.sock.close()
        stack.remove()


def test_the_syscall_emulation_has_teeth(tmp_path: Path) -> None:
    """Under the same filter, a call the unit denies (setuid, from @privileged; setpriority, from
    @resources) fails with EPERM, a netlink socket with EAFNOSUPPORT, while allowed ones work:
    the test above means something."""
    allowlist = tmp_path / "syscalls.json"
    allowlist.write_text(json.dumps(sorted(unit_syscall_allowlist())))
    probe = SANDBOX_WRAPPER.split("sys.argv = ")[0] + (
        "import os\n"
        "for call in (lambda: os.setuid(0), lambda: os.setpriority(os.PRIO_PROCESS, 0, 1)):\n"
        "    try:\n"
        "        call()\n"
        "        print('allowed')\n"
        "    except PermissionError:\n"
        "        print('EPERM')\n"
        "import socket\n"
        "try:\n"
        "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
        "    print('allowed')\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
        "socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()\n"
        "print(len(os.listdir('/')) > 0)\n"
    )
    result = subprocess.run([*NO_CAPS, DAEMON_PYTHON, "-c", probe, str(allowlist), unit_address_families()],
                            capture_output=True, text=True, timeout=30, check=False, env=CLEAN_ENV)
    assert result.stdout.split() == ["EPERM", "EPERM", "EAFNOSUPPORT", "True"], result.stdout + result.stderr
