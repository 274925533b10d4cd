"""Benchmark plumbing: a throwaway workspace (users, /etc/pam.d services, files), timed
pamtester logins, statistics and what /proc says about a process. Everything made here
is removed in ``Workspace.close``.

Nothing here is a test: numbers are reported, never asserted, except the
correctness counts of the parallel run (errors, exactly-once replay, lockout).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from plumbing import LogCatcher  # noqa: E402 - the tests' syslog stand-in, one copy

from pam_linkus.totp import decode_secret, totp  # noqa: E402

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PASSWORD = "Linkus-bench-pw-1"
#: The PAM module under test (`make -C native`), loaded by absolute path.
NATIVE_SO = REPO / "native" / "pam_linkus.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def code_at(when: float, secret: str = SECRET) -> str:
    return totp(decode_secret(secret), when)


def pam_messages() -> dict[str, str]:
    """pam_strerror text -> PAM code name, to read pamtester's verdicts."""
    lib = ctypes.CDLL("libpam.so.0")
    lib.pam_strerror.restype = ctypes.c_char_p
    lib.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    names = {0: "PAM_SUCCESS", 3: "PAM_SERVICE_ERR", 4: "PAM_SYSTEM_ERR", 6: "PAM_PERM_DENIED",
             7: "PAM_AUTH_ERR", 9: "PAM_AUTHINFO_UNAVAIL", 10: "PAM_USER_UNKNOWN", 11: "PAM_MAXTRIES",
             19: "PAM_CONV_ERR", 25: "PAM_IGNORE", 26: "PAM_ABORT"}
    return {lib.pam_strerror(None, code).decode(): name for code, name in names.items()}


class Workspace:
    """A root-only directory under /run, throwaway users and PAM services; ``close`` removes them.

    /run, not /tmp: linkusd refuses config files below a directory others may write
    (/tmp is 1777). On this host /run is on the same ext4 file system as /var/lib,
    where a real state file lives, so the SQLite fsyncs cost what they cost there.
    """

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("bench/run.py must run as root (it creates users and /etc/pam.d services)")
        for tool in ("pamtester", "useradd", "userdel", "chpasswd"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} is missing: run `make deps-test` first")
        if not NATIVE_SO.exists():
            raise SystemExit(f"{NATIVE_SO} is missing: run `make -C native` first")
        self.tag = secrets.token_hex(3)
        self.root = Path(f"/run/linkus-bench-{self.tag}")
        self.root.mkdir(mode=0o711)
        self.users: list[str] = []
        self.services: list[Path] = []
        self.messages = pam_messages()

    def user(self) -> str:
        name = f"lkb{self.tag}{len(self.users):02d}"
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        self.users.append(name)
        subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True)
        return name

    def service(self, case: str, auth_lines: str) -> str:
        name = f"linkus-bench-{self.tag}-{case}"
        path = Path("/etc/pam.d", name)
        path.write_text(auth_lines + "account required pam_permit.so\n")
        self.services.append(path)
        return name

    def file(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.root / name
        path.write_text(text)
        os.chmod(path, mode)
        return path

    def catcher(self, name: str) -> LogCatcher:
        return LogCatcher(self.root / f"{name}.log.sock")

    def close(self) -> None:
        for path in self.services:
            path.unlink(missing_ok=True)
        for name in self.users:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def pamtester(service: str, user: str, answers: list[str], messages: dict[str, str],
              timeout: float = 60.0) -> tuple[str, float]:
    """One login through libpam; (PAM code name, wall seconds of the whole process)."""
    data = "".join(a + "\n" for a in answers).encode()
    started = time.perf_counter()
    proc = subprocess.run(["pamtester", service, user, "authenticate"], input=data, capture_output=True,
                          timeout=timeout, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode == 0:
        return "PAM_SUCCESS", elapsed
    err = proc.stderr.decode(errors="replace").strip().rsplit("pamtester: ", 1)[-1]
    return messages.get(err, f"? {err[:60]}"), elapsed


def avoid_step_edge(margin: float = 0.3) -> None:
    """Codes are computed just before a login; do not start one in the last moments of a step."""
    left = 30 - time.time() % 30
    if left < margin:
        time.sleep(left + 0.05)


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def percentile_ms(values: list[float], pct: float) -> float:
    """Nearest-rank percentile, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index] * 1000


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "load": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
