"""`make install` (packaging/install.sh) and `make demo` (packaging/demo.py), as the README tells a new
user to run them on a fresh Debian 12 without systemd as PID 1, then the Security Settings page
served by linkus-web against the linkusd that install.sh started.

All of it runs in a private root (tests/private_root.py: an overlay of this machine's / in a private
mount namespace with a fresh /run): install.sh writes the PAM module next to pam_unix.so,
/usr/local, /opt/pam-linkus, /etc/pam_linkus, /var/lib/pam_linkus and starts linkusd on
/run/linkusd there, never on this machine, whose own linkusd (if any) keeps running untouched.
The fresh /run has no /run/systemd/system: install.sh takes its non-systemd path (linkusd goes to
the background by itself), the path this test is about, also on a host where systemd is PID 1.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, REPO, require_root, write_yaml
from private_root import PrivateRoot, private_root
from web_site import free_port, start_browser, wait_for

from pam_linkus.protocol import Msg, call_control

pytestmark = [pytest.mark.pam, pytest.mark.timeout(300)]

MODULE = Path(f"/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}/security/pam_linkus.so")
RUN_DIR = Path("/run/linkusd")
LOCK = RUN_DIR / "linkusd.lock"
PREFIX = Path("/opt/pam-linkus")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PIP_NO_INDEX": "1"}
OLD_LINE = "auth [success=ok ignore=ignore default=die] pam_python.so pam_linkus.py config=/etc/pam_linkus/x.yaml\n"


def install(root: PrivateRoot, prefix: Path = PREFIX, **env: str) -> subprocess.CompletedProcess[str]:
    return root.run(["bash", str(REPO / "packaging" / "install.sh"), str(prefix)], timeout=240, check=False,
                    env={**CLEAN_ENV, **env})


def running_pid(root: PrivateRoot) -> int | None:
    """The pid of the linkusd holding the root's /run/linkusd instance lock, or None."""
    if not root.path(LOCK).exists():
        return None
    held = root.run(["flock", "-n", str(LOCK), "true"], check=False).returncode != 0
    return int(root.path(LOCK).read_text().split()[0]) if held else None


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie that nobody in the private root reaped yet does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture(scope="module")
def fresh_machine() -> Iterator[PrivateRoot]:
    require_root()
    with private_root() as root:
        # A fresh machine, also where this one has pam-linkus installed (only the root's copy goes).
        root.run(["rm", "-rf", str(MODULE), "/etc/pam_linkus", "/var/lib/pam_linkus", "/usr/local/sbin/linkusd",
                  "/usr/local/sbin/linkus-2fa", "/usr/local/bin/linkus-web", str(PREFIX), "/usr/share/pam-linkus",
                  "/etc/pam.d/linkus-2fa"])
        yield root


def test_install_refuses_stacks_that_load_the_pam_python_module(fresh_machine: PrivateRoot) -> None:
    root = fresh_machine
    old = f"/etc/pam.d/linkus-test-{os.urandom(4).hex()}"
    root.path(old).write_text(OLD_LINE)
    try:
        refused = install(root, Path("/opt/refused"))
    finally:
        root.path(old).unlink()
    assert refused.returncode == 1
    assert f"install.sh:   {old}" in refused.stderr and "LINKUS_MIGRATE_PAM=yes make install" in refused.stderr
    # Refused before anything changed.
    assert not root.path("/opt/refused").exists() and not root.path(MODULE).exists()
    assert not root.path("/etc/pam_linkus").exists()


@pytest.fixture(scope="module")
def installed(fresh_machine: PrivateRoot) -> dict[str, Any]:
    root = fresh_machine
    # The first install is an upgrade whose admin agreed to the rewrite of the old PAM lines.
    old = f"/etc/pam.d/linkus-test-{os.urandom(4).hex()}"
    root.path(old).write_text("auth requisite pam_unix.so\n" + OLD_LINE)
    backup = root.path(old + ".linkus-bak")
    first = install(root, LINKUS_MIGRATE_PAM="yes")
    migrated, kept = root.path(old).read_text(), backup.read_text() if backup.exists() else None
    assert first.returncode == 0, first.stdout + first.stderr
    pid = running_pid(root)
    made = stat.S_IMODE(os.lstat(root.path(RUN_DIR)).st_mode)
    root.path(RUN_DIR).chmod(0o700)  # what an older linkusd made under its umask: an upgrade repairs it
    # An older version's files have no end marker, which this version requires: the upgrade adds it.
    root.path("/etc/pam_linkus/extensions.yaml").write_text(OLD_EXTENSIONS)
    root.path("/etc/pam_linkus/pam_linkus.yaml").write_text(OLD_CONFIG)
    pam_service = root.path("/etc/pam.d/linkus-2fa")
    made_pam = (pam_service.read_text(), stat.S_IMODE(pam_service.stat().st_mode)) if pam_service.exists() else None
    pam_service.write_text(EDITED_PAM_SERVICE)  # the administrator's edit: the upgrade must keep it
    again = install(root)
    assert again.returncode == 0, again.stdout + again.stderr
    return {"root": root, "first": first, "again": again, "pid": pid, "migrated": migrated, "kept": kept,
            "run_dir_mode": made, "extensions": root.path("/etc/pam_linkus/extensions.yaml").read_text(),
            "config": root.path("/etc/pam_linkus/pam_linkus.yaml").read_text(),
            "made_pam": made_pam, "kept_pam": pam_service.read_text()}


EDITED_PAM_SERVICE = "auth required pam_unix.so nodelay\naccount required pam_unix.so\n"


def test_install_makes_the_self_service_pam_service_once(installed: dict[str, Any]) -> None:
    """Issue 17/8: the default self_service.pam_service exists after install (password modules only),
    and an existing one is never edited."""
    made = installed["made_pam"]
    assert made is not None and made[1] == 0o644
    rules = [line.split() for line in made[0].splitlines() if line and not line.startswith("#")]
    assert rules == [["auth", "required", "pam_unix.so"], ["account", "required", "pam_unix.so"]]
    assert installed["kept_pam"] == EDITED_PAM_SERVICE
    doctor = installed["root"].run(["/usr/local/sbin/linkus-2fa", "doctor"], check=False)
    [line] = [line for line in doctor.stdout.splitlines() if "self-service PAM service" in line]
    assert line.split()[0] == "ok", doctor.stdout


OLD_EXTENSIONS = '''extensions:
  "1001": {method: totp, secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP}  # no newline at the end'''
#: The shipped config as an older version had it: everything but the end marker line.
OLD_CONFIG = (REPO / "packaging" / "pam_linkus.yaml").read_text().removesuffix("...\n")


def test_an_upgrade_ends_older_config_and_extensions_files_with_the_marker(installed: dict[str, Any]) -> None:
    assert installed["extensions"] == OLD_EXTENSIONS + "\n...\n"
    assert installed["config"] == OLD_CONFIG + "...\n" == (REPO / "packaging" / "pam_linkus.yaml").read_text()
    assert installed["root"].path("/usr/share/pam-linkus/add-end-marker.sh").stat().st_mode & 0o777 == 0o755
    status = call_control(str(installed["root"].path(RUN_DIR / "pam.sock")), timeout=10)
    assert status["loaded"] is True and not status.get("last_error"), status


def test_install_with_migrate_pam_rewrites_the_old_lines(installed: dict[str, Any]) -> None:
    assert installed["migrated"] == ("auth requisite pam_unix.so\n"
                                     "auth [success=ok ignore=ignore default=die] pam_linkus.so\n")
    assert installed["kept"] == "auth requisite pam_unix.so\n" + OLD_LINE


def test_install_layout(installed: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    venv = PREFIX / "venv"
    expected = {MODULE: ("file", 0o644), Path("/etc/pam_linkus"): ("dir", 0o755),
                Path("/etc/pam_linkus/pam_linkus.yaml"): ("file", 0o600),
                Path("/etc/pam_linkus/extensions.yaml"): ("file", 0o600), Path("/var/lib/pam_linkus"): ("dir", 0o700),
                # repaired by the second install; linkus-web and allowed_groups pass through it
                RUN_DIR: ("dir", 0o755)}
    assert installed["run_dir_mode"] == 0o755
    for path, (kind, mode) in expected.items():
        st = os.lstat(root.path(path))
        assert (stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)), path
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, 0), path
    assert root.path(MODULE).read_bytes() == (REPO / "native" / "pam_linkus.so").read_bytes()
    assert os.readlink(root.path("/usr/local/sbin/linkusd")) == str(venv / "bin" / "linkusd")
    assert os.readlink(root.path("/usr/local/sbin/linkus-2fa")) == str(venv / "bin" / "linkus-2fa")
    assert root.path("/etc/pam_linkus/pam_linkus.yaml").read_bytes() == \
        (REPO / "packaging/pam_linkus.yaml").read_bytes()
    assert root.run(["id", "-gn", "linkus-web"]).stdout == "linkus-web\n"
    assert os.readlink(root.path("/usr/local/bin/linkus-web")) == str(venv / "bin" / "linkus-web")


def test_install_puts_the_ldap_schema_where_the_man_page_says(installed: dict[str, Any]) -> None:
    """pam_linkus.yaml(5) and the schema's own comments name /usr/share/pam-linkus/ldap."""
    root: PrivateRoot = installed["root"]
    page = (REPO / "packaging" / "man" / "pam_linkus.yaml.5").read_text()
    assert "/usr/share/pam\\-linkus/ldap" in page or "/usr/share/pam-linkus/ldap" in page
    for schema in sorted((REPO / "packaging" / "ldap").iterdir()):
        installed_copy = root.path(f"/usr/share/pam-linkus/ldap/{schema.name}")
        assert installed_copy.read_bytes() == schema.read_bytes(), schema.name
        assert stat.S_IMODE(installed_copy.stat().st_mode) == 0o644


def test_install_started_linkusd_and_a_second_install_restarts_it(installed: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    first = installed["pid"]
    assert first is not None and f"started in the background (no systemd): pid {first}" in installed["first"].stdout
    pid = running_pid(root)  # an upgrade runs the new code: one new daemon, the old one gone
    assert pid is not None and pid != first and not running(first)
    assert f"linkusd restarted with the new code (no systemd): pid {pid}, was {first}" in installed["again"].stdout
    status = call_control(str(root.path(RUN_DIR / "pam.sock")), timeout=10)
    assert status["loaded"] is True and status["pid"] == pid, status
    script = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].decode()
    assert script == "/usr/local/sbin/linkusd"
    assert os.readlink(root.path(script)) == str(PREFIX / "venv" / "bin" / "linkusd")
    doctor = root.run(["/usr/local/sbin/linkus-2fa", "doctor"], check=False)
    [line] = [line for line in doctor.stdout.splitlines() if "linkusd" in line and "version" in line]
    assert line.split()[0] == "ok" and f"pid {pid}," in line, doctor.stdout


def test_demo_passes_twice_and_leaves_nothing(installed: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    python = PREFIX / "venv" / "bin" / "python"

    def demo_leftovers() -> list[str]:
        users = [line.split(":")[0] for line in root.path("/etc/passwd").read_text().splitlines()]
        return [name for name in (*users, *os.listdir(root.path("/etc/pam.d")), *os.listdir(root.path("/run")))
                if name.startswith("linkus-demo")]

    assert demo_leftovers() == []
    for _ in range(2):
        demo = root.run([str(python), str(REPO / "packaging" / "demo.py")], timeout=120, check=False, env=CLEAN_ENV)
        assert demo.returncode == 0 and demo.stdout.rstrip().endswith("Demo passed."), demo.stdout + demo.stderr
        assert "System linkusd (/run/linkusd/pam.sock): serving." in demo.stdout
        for label, verdict in (("right code ", "accepted"), ("wrong code ", "refused"), ("(replay)", "refused")):
            line = next(line for line in demo.stdout.splitlines() if label in line)
            assert f"-> {verdict}" in line and "[as expected]" in line, line
    assert demo_leftovers() == []


def test_security_settings_page_against_the_installed_linkusd(installed: dict[str, Any], tmp_path: Path) -> None:
    """The README's non-systemd install, end to end: linkus-web, started in the background as the
    linkus-web user with docs/web.md's command, reaches /run/linkusd/web.sock (a directory linkusd
    made itself) and an extension signs in with its password through the PAM service install.sh made."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root: PrivateRoot = installed["root"]
    # As after a reboot without systemd: /run is empty and the admin starts linkusd, which makes
    # /run/linkusd itself (under its umask 077).
    pid = running_pid(root)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "linkusd stopping")
    root.run(["rm", "-rf", str(RUN_DIR)])
    root.run(["/usr/local/sbin/linkusd"], timeout=60)
    assert stat.S_IMODE(os.lstat(root.path(RUN_DIR)).st_mode) == 0o755
    user = f"lkt{secrets.token_hex(4)}"
    root.run(["useradd", "--no-create-home", "--shell", "/bin/sh", user])
    root.run(["chpasswd"], input=f"{user}:{PASSWORD}\n")
    # An extension without 2FA yet, in the installed extensions.yaml; linkusd loads it now.
    write_yaml(root.path("/etc/pam_linkus/extensions.yaml"), {"extensions": {user: {"method": "none"}}}, end=True)
    assert call_control(str(root.path(RUN_DIR / "pam.sock")), Msg.RELOAD, timeout=30)["last_error"] is None
    # Started as docs/web.md says for a host without systemd (issue 17/8), on a free port; the
    # password goes to the PAM service install.sh made (the fixture's edit of it: no delay).
    [command] = [line for line in (REPO / "docs" / "web.md").read_text().splitlines()
                 if line.startswith("setsid -f runuser -u linkus-web -- /usr/local/bin/linkus-web --listen")]
    port = free_port()
    assert "127.0.0.1:8089" in command
    root.run(["sh", "-c", command.replace("127.0.0.1:8089", f"127.0.0.1:{port}")], timeout=30, env=CLEAN_ENV)
    web_uid = int(root.run(["id", "-u", "linkus-web"]).stdout)
    driver = None
    try:
        def up() -> bool:
            import socket

            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, "linkus-web", timeout=30)
        assert len([pid for pid in _pids_of(web_uid) if f"127.0.0.1:{port}" in _cmdline(pid)]) == 1  # in the background
        driver = start_browser(tmp_path / "chromium")
        driver.get(f"http://127.0.0.1:{port}/sign-in")
        driver.find_element(By.CSS_SELECTOR, "#ext").send_keys(user)
        driver.find_element(By.CSS_SELECTOR, "#password").send_keys(PASSWORD)
        driver.find_element(By.CSS_SELECTOR, "#sign-in").click()
        WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith("/settings"))
        assert user in driver.page_source
        assert "POST /sign-in 303" in root.path("/var/log/linkus-web.log").read_text()  # its log, as documented
    finally:
        if driver is not None:
            driver.quit()
        for pid in _pids_of(web_uid):  # only the linkus-web this test started (the root's own user)
            if f"127.0.0.1:{port}" in _cmdline(pid):
                os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize(("before", "after"), [
    ("enforce: all", "enforce: all\n...\n"),  # no newline at the end
    ("enforce: all\n", "enforce: all\n...\n"),
    ("", "...\n"),  # still refused by linkusd (empty), but the script does not guess
    ("enforce: all\n...\n# a comment after it\n", "enforce: all\n...\n# a comment after it\n"),
    ("enforce: all\n...   \n", "enforce: all\n...   \n"),
])
def test_add_end_marker_adds_the_line_once(private_dir: Path, before: str, after: str) -> None:
    """packaging/add-end-marker.sh, which install.sh and the postinst run on upgrade: the marker once,
    on a line of its own; a second run changes nothing; symlinks and missing files are left alone."""
    script = REPO / "packaging" / "add-end-marker.sh"
    config, target, link = private_dir / "pam_linkus.yaml", private_dir / "target.yaml", private_dir / "link.yaml"
    config.write_text(before)
    target.write_text("enforce: all\n")
    link.symlink_to(target)
    for _ in range(2):
        subprocess.run(["sh", str(script), str(config), str(link), str(private_dir / "absent.yaml")], check=True,
                       env=CLEAN_ENV, timeout=30)
        assert config.read_text() == after
    assert target.read_text() == "enforce: all\n" and not (private_dir / "absent.yaml").exists()


def test_install_and_postinst_share_the_marker_script() -> None:
    """One copy of the migration: both callers run the installed script on both files."""
    call = "sh /usr/share/pam-linkus/add-end-marker.sh /etc/pam_linkus/pam_linkus.yaml"
    for path in (REPO / "packaging" / "install.sh", REPO / "packaging" / "debian" / "libpam-linkus.postinst"):
        text = path.read_text()
        assert call in text and "extensions.yaml" in text.split(call, 1)[1].split("\n\n")[0], path
        assert "printf '...\\n'" not in text, path
    assert "packaging/add-end-marker.sh usr/share/pam-linkus/" in \
        (REPO / "packaging" / "debian" / "libpam-linkus.install").read_text()


def test_an_upgrade_restarts_linkusd_only_once_the_new_code_loads_its_config(installed: dict[str, Any]) -> None:
    """The restart keeps the daemon's own arguments, and never happens while the new code refuses the config
    (the running daemon may only hold it as "last good"): the old daemon keeps serving, install says why."""
    root: PrivateRoot = installed["root"]
    old = running_pid(root)
    if old is not None:
        os.kill(old, signal.SIGTERM)
        wait_for(lambda: running_pid(root) is None, "linkusd stopping")
    # in the foreground, as an admin may run it (the restart must not keep it there: install would hang)
    root.popen(["/usr/local/sbin/linkusd", "--foreground", "--quiet", "--no-web"],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: running_pid(root) is not None, "linkusd starting")
    pid = running_pid(root)
    config = root.path("/etc/pam_linkus/pam_linkus.yaml")
    good = config.read_text()
    config.write_text(good.replace("\n...\n", "\nno_such_key: 1\n...\n"))
    try:
        refused = install(root)
        assert refused.returncode == 1 and "keeps serving with the old code" in refused.stderr, refused.stderr
        assert "/etc/pam_linkus/pam_linkus.yaml:" in refused.stderr and running_pid(root) == pid  # untouched
    finally:
        config.write_text(good)
    again = install(root)
    assert again.returncode == 0, again.stdout + again.stderr
    new = running_pid(root)
    assert new not in (None, pid)
    assert Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")[2:] == [b"--no-web", b""]


def test_linkusd_takes_no_abbreviated_option() -> None:
    """install.sh finds a running daemon's --config on its command line: an abbreviation (``--conf``) would
    make it check one file and restart linkusd on another."""
    run = subprocess.run([sys.executable, "-m", "pam_linkus.daemon", "--conf", "/nonexistent", "--check"],
                         capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "unrecognized arguments: --conf" in run.stderr, run.stderr


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""
