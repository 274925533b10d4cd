"""Benchmark plumbing: a throwaway workspace (users, /etc/pam.d services, files), timed
pamtester logins, and statistics. Everything made here is removed in ``Workspace.close``.

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

from conftest import LogCatcher  # noqa: E402 - the tests' syslog stand-in

from pam_linkus.totp import decode_secret, totp  # noqa: E402

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
PASSWORD = "Linkus-bench-pw-1"
SYSTEM_SITE = ["/usr/local/lib/python3.11/dist-packages", "/usr/lib/python3/dist-packages"]


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
    """A root-only temp dir, throwaway users and PAM services; ``close`` removes them all."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("bench/run.py must run as root (it creates users and /etc/pam.d services)")
        for tool in ("pamtester", "useradd", "userdel", "chpasswd"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} is missing: run `make deps-test` first")
        self.tag = secrets.token_hex(3)
        self.root = Path(f"/tmp/linkus-bench-{self.tag}")
        self.root.mkdir(mode=0o700)
        self.users: list[str] = []
        self.services: list[Path] = []
        self.log = LogCatcher(self.root / "log.sock")
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

    def close(self) -> None:
        self.log.close()
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


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def percentile_ms(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index] * 1000


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
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "load": os.getloadavg(),
        "uptime": uptime,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
