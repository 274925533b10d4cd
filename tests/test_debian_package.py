"""The Debian package, end to end: build it (dpkg-buildpackage), lint it (lintian), install it,
start the installed linkusd by hand (no systemd here), log in through the installed
pam_linkus.so, purge it.

The package must install the C module where this architecture's libpam looks (next to
pam_unix.so), never enable its pam-auth-update profile by itself, refuse to upgrade a machine
whose PAM stacks still load the pam_python module, and leave nothing behind when purged.

Everything that installs, starts or purges runs in a private root (tests/private_root.py: an
overlay of this machine's / in a private mount namespace, fresh /run and /tmp): apt, dpkg's
database, the module next to pam_unix.so, /etc/pam_linkus, /var/lib/pam_linkus, the users the tests
log in as and the installed linkusd all live there and go with it. This machine, and a linkusd it
runs on /run/linkusd, are never touched. Inside the root /etc/pam.d/common-* and /var/lib/pam are
compared byte for byte after install and after purge. pam-auth-update is only ever pointed at a
throwaway root (``--root``) with a throwaway debconf database, except for the package's own
``pam-auth-update --package`` calls, which must change nothing.

Tests run in file order against module-scoped fixtures: one build, one install, one purge
(the purge test is last and says so).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, REPO, LogCatcher, code_at, require_root, write_yaml
from private_root import PrivateRoot, Snapshot, private_root

pytestmark = [pytest.mark.pam, pytest.mark.timeout(300)]

PACKAGE = "libpam-linkus"
MULTIARCH = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
#: Where Debian 12's libpam-modules puts pam_unix.so, and so where a PAM module belongs.
MODULE = Path(f"/lib/{MULTIARCH}/security/pam_linkus.so")
PROFILE = REPO / "packaging" / "pam-configs" / "linkus"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]
MODULE_LINE = "auth\t[success=ok ignore=ignore default=die]\tpam_linkus.so"
OLD_LINE = "auth [success=ok ignore=ignore default=die] pam_python.so pam_linkus.py\n"
TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "pybuild", "lintian", "pamtester", "pam-auth-update", "gcc")

#: What the package leaves besides its own files: (kind, mode), owner root.
LAYOUT = {
    str(MODULE): ("file", 0o644),
    "/usr/sbin/linkusd": ("file", 0o755),
    "/usr/sbin/linkus-2fa": ("file", 0o755),
    "/etc/pam_linkus": ("dir", 0o755),
    "/etc/pam_linkus/pam_linkus.yaml": ("file", 0o600),
    "/etc/pam_linkus/extensions.yaml": ("file", 0o600),
    "/var/lib/pam_linkus": ("dir", 0o700),
}
#: Must be byte-identical after install and after purge (in the private root).
PAM_PATHS = (*sorted(Path("/etc/pam.d").glob("common-*")), Path("/var/lib/pam"))


def run(cmd: list[str], *, timeout: float = 240, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", CLEAN_ENV),
                            stdin=subprocess.DEVNULL, check=False, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def installed_status(root: PrivateRoot) -> str:
    result = root.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE], check=False)
    return result.stdout.strip() if result.returncode == 0 else "not known"


def pam_auth_update(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pam-auth-update on a throwaway root, with a throwaway debconf database (never the machine's)."""
    return run(["pam-auth-update", "--root", str(root), *args],
               env={**CLEAN_ENV, "DEBCONF_SYSTEMRC": str(root / "debconf.conf")})


def throwaway_root(base: Path, profiles: Path, system: Path = Path("/")) -> Path:
    """A copy of ``system``'s PAM config, pam-auth-update state and profiles, plus debconf.conf."""
    root = base / f"root-{secrets.token_hex(4)}"
    (root / "etc" / "pam.d").mkdir(parents=True)
    for common in (system / "etc" / "pam.d").glob("common-*"):
        shutil.copy2(common, root / "etc" / "pam.d")
    shutil.copytree(system / "var" / "lib" / "pam", root / "var" / "lib" / "pam")
    shutil.copytree(profiles, root / "usr" / "share" / "pam-configs")
    (root / "debconf.conf").write_text(
        f"Config: configdb\nTemplates: templatedb\n\n"
        f"Name: configdb\nDriver: File\nFilename: {root}/config.dat\n\n"
        f"Name: templatedb\nDriver: File\nMode: 644\nFilename: {root}/templates.dat\n"
    )
    return root


def auth_lines(common_auth: str) -> list[str]:
    return [line.rstrip() for line in common_auth.splitlines() if line.startswith("auth")]


def pamtester(root: PrivateRoot, service: str, user: str, *answers: str) -> subprocess.CompletedProcess[str]:
    """pamtester in the root with a clean environment from /: nothing but the installed files is importable."""
    return root.run(["pamtester", service, user, "authenticate"], input="".join(a + "\n" for a in answers),
                    timeout=60, check=False)


def wrong(code: str) -> str:
    return f"{(int(code) + 500_000) % 1_000_000:06d}"


# -- build and lint ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """packaging/build-deb.sh: dpkg-buildpackage -us -uc -b in a copy of the checkout."""
    require_root()
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=CLEAN_ENV["PATH"])]
    if missing:
        pytest.fail(f"missing {missing}: `make deps-test` installs debhelper, dh-python, lintian & co.")
    out = tmp_path_factory.mktemp("deb")
    before = run(["git", "-C", str(REPO), "status", "--porcelain"], check=False).stdout
    run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)], timeout=300)
    after = run(["git", "-C", str(REPO), "status", "--porcelain"], check=False).stdout
    assert after == before, "building the package wrote into the checkout"
    debs = sorted(out.glob(f"{PACKAGE}_*_{run(['dpkg', '--print-architecture']).stdout.strip()}.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    result = run(["lintian", "--fail-on", "error,warning", "--display-info", "--pedantic", str(deb)], check=False)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


def test_every_lintian_override_says_why() -> None:
    lines = (REPO / "packaging" / "debian" / f"{PACKAGE}.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert line.startswith(f"{PACKAGE}: ") and i > 0 and lines[i - 1].startswith("#"), line


def test_control_fields(deb: Path) -> None:
    def field(name: str) -> str:
        return run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()

    depends = {d.strip().split()[0] for d in field("Depends").split(",")}
    assert {"python3-yaml", "python3-ldap3", "python3-segno", "libpam-runtime", "adduser", "libpam0g",
            "libc6"} <= depends, depends
    # Redis state, the self-service pages and the metrics listener are optional parts.
    assert {d.strip() for d in field("Recommends").split(",")} == {"python3-redis", "python3-starlette",
                                                                   "python3-uvicorn", "python3-jinja2",
                                                                   "python3-prometheus-client",
                                                                   "python3-httptools", "python3-uvloop"}
    # The pam_python version is gone for good: nothing may pull it in again.
    assert "libpam-python" not in field("Depends") + field("Recommends") + field("Suggests")
    assert field("Architecture") == run(["dpkg", "--print-architecture"]).stdout.strip()
    control = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-e", str(deb), str(control)])
        # extensions.yaml is enrollment data made by postinst, not a conffile (see the postinst). The
        # fail2ban filter and jail are conffiles under /etc/fail2ban, as Debian packages ship theirs:
        # an admin's edits survive upgrades, and the jail stays off (enabled = false) until a .local
        # of the admin's turns it on (docs/fail2ban.md).
        assert sorted((control / "conffiles").read_text().split()) == [
            "/etc/fail2ban/filter.d/pam-linkus.conf", "/etc/fail2ban/jail.d/pam-linkus.conf",
            "/etc/pam_linkus/pam_linkus.yaml"]
    finally:
        shutil.rmtree(control)


def test_package_files(deb: Path) -> None:
    members: dict[str, tarfile.TarInfo] = {}
    contents: dict[str, bytes] = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix(".")
                members[name] = member
                if member.isfile() and not name.startswith("/usr/lib/python3/"):
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    contents[name] = extracted.read()
    assert proc.returncode == 0
    modes = {name: (m.mode, m.uname, m.gname) for name, m in members.items()}
    assert modes["/etc/pam_linkus/pam_linkus.yaml"] == (0o600, "root", "root")
    assert modes[str(MODULE)] == (0o644, "root", "root")
    assert modes["/usr/sbin/linkus-2fa"] == modes["/usr/sbin/linkusd"] == (0o755, "root", "root")
    assert "/usr/bin/linkus-2fa" not in members and "/usr/bin/linkusd" not in members
    assert not any(name.startswith("/lib/security") for name in members)  # the pam_python loader
    for name in ("/usr/lib/python3/dist-packages/pam_linkus/daemon/main.py",
                 "/usr/lib/python3/dist-packages/nss_config/chain.py",
                 "/usr/share/man/man8/pam_linkus.8.gz", "/usr/share/man/man8/linkus-2fa.8.gz",
                 "/usr/share/man/man8/linkusd.8.gz", "/usr/share/man/man5/pam_linkus.yaml.5.gz",
                 "/usr/share/man/man8/linkus-web.8.gz", "/usr/bin/linkus-web", "/lib/systemd/system/linkus-web.service",
                 "/usr/share/pam-linkus/extensions.yaml", "/usr/share/pam-linkus/add-end-marker.sh"):
        assert name in members, name
    assert modes["/usr/share/pam-linkus/add-end-marker.sh"] == (0o755, "root", "root")
    for unit in ("linkusd.socket", "linkusd-web.socket", "linkusd.service"):
        assert contents[f"/lib/systemd/system/{unit}"] == (REPO / "packaging" / "systemd" / unit).read_bytes()
    schemas = sorted((REPO / "packaging" / "ldap").glob("linkus-2fa.*"))
    assert [s.name for s in schemas] == ["linkus-2fa.ldif", "linkus-2fa.schema"]
    for schema in schemas:  # where the schema's own comments tell slapd to find it
        assert contents[f"/usr/share/pam-linkus/ldap/{schema.name}"] == schema.read_bytes(), schema
        assert f"/usr/share/pam-linkus/ldap/{schema.name}" in schemas[1].read_text()
    assert contents["/usr/share/pam-configs/linkus"] == PROFILE.read_bytes()
    for f2b in ("filter.d/pam-linkus.conf", "jail.d/pam-linkus.conf"):  # docs/fail2ban.md; the jail disabled
        for where in ("/etc/fail2ban", "/usr/share/pam-linkus/fail2ban"):
            assert contents[f"{where}/{f2b}"] == (REPO / "packaging" / "fail2ban" / f2b).read_bytes(), (where, f2b)
    assert contents["/etc/pam_linkus/pam_linkus.yaml"] == (REPO / "packaging" / "pam_linkus.yaml").read_bytes()


def test_package_version_is_the_python_version() -> None:
    """debian/changelog names the version dpkg gives the package; it must follow pam_linkus.__version__."""
    from pam_linkus import __version__

    first = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"pam-linkus ({__version__}) "), first


def test_module_is_built_hardened(deb: Path, tmp_path: Path) -> None:
    """dpkg-buildflags' hardening (full RELRO, bind now, fortify, stack protector) reached the module."""
    run(["dpkg-deb", "-x", str(deb), str(tmp_path)])
    module = tmp_path / str(MODULE).lstrip("/")
    dynamic = run(["readelf", "-d", "-W", str(module)]).stdout
    headers = run(["readelf", "-l", "-W", str(module)]).stdout
    symbols = run(["readelf", "--dyn-syms", "-W", str(module)]).stdout
    assert "BIND_NOW" in dynamic or re.search(r"FLAGS.*\bNOW\b", dynamic), dynamic
    assert "GNU_RELRO" in headers
    assert re.search(r"GNU_STACK\s.*\sRW\s", headers), headers  # not executable
    assert "__stack_chk_fail" in symbols
    assert re.search(r"__\w+_chk\b", symbols.replace("__stack_chk_fail", "")), "no _FORTIFY_SOURCE call"


def test_man_page_documents_every_pam_option() -> None:
    """Every option the C module parses (its OPTION_DEFS table) has an entry in pam_linkus(8)."""
    source = (REPO / "native" / "pam_linkus.c").read_text()
    options = dict(re.findall(r'\[O_\w+\] = \{"(\w+)", (true|false)\}', source))
    assert {"socket", "timeout", "prompt", "profile", "log_socket", "echo_code", "forward_pass", "debug"} \
        <= set(options)
    page = (REPO / "packaging" / "man" / "pam_linkus.8").read_text()
    section = page[page.index("\n.SH OPTIONS\n"):page.index("\n.SH SINGLE-FIELD MODE\n")]
    for key, has_value in options.items():
        assert (f"\n.BI {key}= " if has_value == "true" else f"\n.B {key}\n") in section, key


def test_man_pages_have_no_warnings() -> None:
    for page in sorted((REPO / "packaging" / "man").iterdir()):
        result = run(["man", "--warnings", "-l", str(page)], env={**CLEAN_ENV, "MANWIDTH": "80"})
        assert result.stderr == "", f"{page.name}: {result.stderr}"


def test_config_page_names_every_key_the_config_reads() -> None:
    """Every key pam_linkus/config.py reads (r.string("key", ...) & co.) is in pam_linkus.yaml(5)."""
    from pam_linkus.config import Config, DaemonConfig

    source = (REPO / "pam_linkus" / "config.py").read_text()
    keys = set(re.findall(r"\b(?:r|attrs)\.(?:string|integer|number|boolean|path|optional_path|optional_string|"
                          r"string_list|section)\(\"(\w+)\"", source))
    keys |= set(re.findall(r"_prompt\(r, \"(\w+)\"", source))
    assert {"enforce", "max_failures", "bind_password_file", "answer_timeout", "totp"} <= keys
    page = (REPO / "packaging" / "man" / "pam_linkus.yaml.5").read_text().replace("\\-", "-")
    documented = set(re.findall(r"\n\.(?:B|SS) (?:[\w.]+\.)?(\w+)\n", page))
    assert sorted(keys - documented) == []
    not_keys = {"path", "cache_dir", "default_profile"}  # attributes, not keys of the file
    for key in [k for k in Config.__slots__ if k not in not_keys] + [f"daemon.{k}" for k in DaemonConfig.__slots__]:
        assert f"\n.B {key}\n" in page or f"\n.SS {key}" in page, key


def test_man_page_documents_every_verb() -> None:
    import argparse

    from pam_linkus.cli import build_parser

    page = (REPO / "packaging" / "man" / "linkus-2fa.8").read_text()
    verbs_section = page[page.index("\n.SH VERBS\n"):page.index("\n.SH EXIT STATUS\n")].replace("\\-", "-")
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"enroll", "doctor"} <= set(subparsers.choices)
    for verb in subparsers.choices:
        assert f"\n.BR {verb} " in verbs_section or f"\n.BI {verb} " in verbs_section \
            or f"\n.B {verb}\n" in verbs_section, verb


# -- the pam-auth-update profile, in a throwaway root -----------------------------------------


@pytest.fixture
def checkout_profiles(tmp_path: Path) -> Path:
    profiles = tmp_path / "pam-configs"
    shutil.copytree("/usr/share/pam-configs", profiles)
    (profiles / "linkus").unlink(missing_ok=True)  # the installed package's, if any: test the checkout's
    shutil.copy2(PROFILE, profiles / "linkus")
    return profiles


def test_profile_has_the_reviewed_fields() -> None:
    """packaging/pam-configs/README.md gives the reasons; the format has no comments."""
    fields: dict[str, str] = {}
    last = ""
    for line in PROFILE.read_text().splitlines():
        assert not line.startswith("#"), "pam-auth-update profiles have no comment syntax"
        if line[:1].isspace():
            fields[last] = " ".join([*fields[last].split(), *line.split()])
        else:
            last, _, value = line.partition(":")
            fields[last] = value.strip()
    assert fields == {
        "Name": "pam-linkus second factor (TOTP or email code after the password)",
        "Default": "no",
        "Priority": "192",  # below pam_unix's 256
        "Auth-Type": "Additional",
        "Auth": "[success=ok ignore=ignore default=die] pam_linkus.so",
    }


def test_profile_is_not_enabled_by_package_registration(tmp_path: Path, checkout_profiles: Path) -> None:
    root = throwaway_root(tmp_path, checkout_profiles)
    before = {p.name: p.read_bytes() for p in (root / "etc" / "pam.d").iterdir()}
    result = pam_auth_update(root, "--package")
    assert result.stderr == ""  # e.g. no perl warnings from a profile it cannot parse
    assert {p.name: p.read_bytes() for p in (root / "etc" / "pam.d").iterdir()} == before
    assert "linkus" in (root / "var" / "lib" / "pam" / "seen").read_text().split()


def test_enabled_profile_runs_after_the_password_and_disable_restores(tmp_path: Path,
                                                                      checkout_profiles: Path) -> None:
    root = throwaway_root(tmp_path, checkout_profiles)
    common_auth = root / "etc" / "pam.d" / "common-auth"
    before = common_auth.read_bytes()
    pam_auth_update(root, "--package")
    pam_auth_update(root, "--enable", "linkus")
    lines = auth_lines(common_auth.read_text())
    assert MODULE_LINE in lines
    position = lines.index(MODULE_LINE)
    # After the fallback deny and the permit that primes success: reached only when a
    # password module succeeded, and not a Primary alternative to pam_unix.
    assert [line.split()[-1] for line in lines[position - 2:position]] == ["pam_deny.so", "pam_permit.so"]
    assert any("pam_unix.so" in line for line in lines[:position])
    assert [line for line in lines if line != MODULE_LINE] == auth_lines(before.decode())
    pam_auth_update(root, "--disable", "linkus")
    assert common_auth.read_bytes() == before


# -- installed, in a private root --------------------------------------------------------------


@pytest.fixture(scope="module")
def machine() -> Iterator[dict[str, Any]]:
    """A private root standing in for a fresh machine: the package purged there first if this machine
    has it (only the root's copy of dpkg's database changes), its PAM files snapshotted."""
    require_root()
    with private_root() as root:
        if installed_status(root) not in ("not known", "un", "pn"):
            root.run([*APT, "purge", PACKAGE], env=CLEAN_ENV, timeout=300)
        for path in ("/etc/pam_linkus", "/var/lib/pam_linkus", str(MODULE)):  # what `make install` leaves
            root.run(["rm", "-rf", path])
        pam = Snapshot(tuple(root.path(p) for p in PAM_PATHS))
        yield {"root": root, "pam": pam}
        if installed_status(root) not in ("not known", "un", "pn"):
            root.run([*APT, "purge", PACKAGE], env=CLEAN_ENV, timeout=300, check=False)
        changed = pam.differences()
        assert not changed, f"PAM files changed by the package (in the private root): {changed}"


@pytest.fixture(scope="module")
def installed(deb: Path, machine: dict[str, Any]) -> dict[str, Any]:
    root: PrivateRoot = machine["root"]
    package = root.put(deb, f"/tmp/{deb.name}")
    # An upgrade from the pam_python version with a stack still loading it: refused before
    # anything is unpacked (the old lines would refuse every login once the loader is gone).
    old = f"/etc/pam.d/linkus-test-{secrets.token_hex(4)}"
    root.path(old).write_text(OLD_LINE)
    try:
        refused = root.run([*APT, "install", package], timeout=300, check=False, env=CLEAN_ENV)
    finally:
        root.path(old).unlink()
    status_after_refusal = installed_status(root)
    # Again, with the administrator's consent: postinst rewrites the line (linkus-2fa migrate-pam).
    root.path(old).write_text(OLD_LINE)
    try:
        result = root.run([*APT, "--no-install-recommends", "-o", "Dpkg::Options::=--force-confdef",
                           "-o", "Dpkg::Options::=--force-confold", "install", package], timeout=300,
                          env={**CLEAN_ENV, "LINKUS_MIGRATE_PAM": "yes"})
        migrated = root.path(old).read_text()
    finally:
        root.path(old).unlink()
        root.path(old + ".linkus-bak").unlink(missing_ok=True)
    seen = root.path("/var/lib/pam/seen")
    return {"root": root, "package": package, "apt": result, "pam_changed": machine["pam"].differences(),
            "seen": seen.read_text().split(), "seen_before": machine["pam"].entries[seen][4], "refused": refused,
            "old": old, "status_after_refusal": status_after_refusal, "migrated": migrated}


class InstalledLinkusd:
    """/usr/sbin/linkusd as an admin without systemd starts it: it forks into the background once
    ready (the parent exits 0 then); here on its own socket directory in the root's /run."""

    def __init__(self, root: PrivateRoot, log_path: str):
        self.root = root
        self.run_dir = "/run/linkus-pkg"
        self.socket = f"{self.run_dir}/pam.sock"
        started = root.run(["/usr/sbin/linkusd", "--pam-socket", self.socket, "--no-web", "--log-socket", log_path],
                           timeout=60)
        assert started.returncode == 0 and started.stderr == "", started.stderr
        self.pid = int(root.path(f"{self.run_dir}/linkusd.lock").read_text())

    def reload(self) -> None:
        from pam_linkus.protocol import Msg, call_control

        status = call_control(str(self.root.path(self.socket)), Msg.RELOAD, timeout=30)
        assert status["last_error"] is None, status["last_error"]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{self.pid}").exists(), "linkusd did not stop on SIGTERM"


@pytest.fixture(scope="module")
def login_env(installed: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The installed linkusd, a syslog catcher (its socket in the root's /run) and the root."""
    root: PrivateRoot = installed["root"]
    log_path = "/run/linkus-pkg-log.sock"
    log = LogCatcher(root.path(log_path))
    daemon = InstalledLinkusd(root, log_path)
    try:
        yield {"root": root, "log": log, "log_path": log_path, "daemon": daemon}
    finally:
        daemon.stop()
        log.close()


def add_service(env: dict[str, Any], auth: str) -> str:
    name = f"linkus-test-{secrets.token_hex(4)}"
    env["root"].path(f"/etc/pam.d/{name}").write_text(auth + "account required pam_permit.so\n")
    return name


def options(env: dict[str, Any]) -> str:
    return f"socket={env['daemon'].socket} log_socket={env['log_path']}"


def add_user(env: dict[str, Any]) -> str:
    """A local user of the root, with PASSWORD."""
    name = f"lkt{secrets.token_hex(4)}"
    env["root"].run(["useradd", "--no-create-home", "--shell", "/bin/sh", name])
    env["root"].run(["chpasswd"], input=f"{name}:{PASSWORD}\n")
    return name


def enroll(env: dict[str, Any], users: dict[str, str]) -> None:
    """Enroll users with TOTP in the package's own /etc/pam_linkus/extensions.yaml; linkusd loads it now."""
    write_yaml(env["root"].path("/etc/pam_linkus/extensions.yaml"),
               {"extensions": {user: {"method": "totp", "secret": secret} for user, secret in users.items()}},
               end=True)
    env["daemon"].reload()


def test_upgrade_from_pam_python_stacks_is_refused_before_unpacking(installed: dict[str, Any]) -> None:
    refused = installed["refused"]
    assert refused.returncode != 0
    assert installed["status_after_refusal"] in ("not known", "un", "pn", "in")  # in: selected, not installed
    said = refused.stdout + refused.stderr
    assert f"libpam-linkus:   {installed['old']}" in said and "LINKUS_MIGRATE_PAM=yes" in said, said


def test_upgrade_with_migrate_pam_rewrites_the_old_lines(installed: dict[str, Any]) -> None:
    assert installed["migrated"] == "auth [success=ok ignore=ignore default=die] pam_linkus.so\n"


def test_install_leaves_the_layout(installed: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    for path, (kind, mode) in LAYOUT.items():
        st = os.lstat(root.path(path))
        assert (stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)), path
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, 0), path
    assert root.path("/etc/pam_linkus/pam_linkus.yaml").read_bytes() == \
        (REPO / "packaging/pam_linkus.yaml").read_bytes()
    assert root.path("/etc/pam_linkus/extensions.yaml").read_bytes() == \
        (REPO / "packaging/extensions.yaml").read_bytes()
    assert root.run(["dpkg", "-S", str(MODULE)]).stdout.startswith(f"{PACKAGE}: ")
    assert root.run(["getent", "group", "linkus-web"], check=False).returncode == 0
    assert root.run(["id", "-gn", "linkus-web"], check=False).stdout.strip() == "linkus-web"
    # Registered (pam-auth-update --package) so that it is offered, but with "Default: no"
    # nothing but the list of profiles seen changes: common-* are byte-identical.
    assert installed["pam_changed"] in ([], [root.path("/var/lib/pam/seen")]), installed["pam_changed"]
    assert root.path("/usr/share/pam-configs/linkus").read_bytes() == PROFILE.read_bytes()
    seen_before = installed["seen_before"].decode().split()
    assert "linkus" not in seen_before and sorted(installed["seen"]) == sorted([*seen_before, "linkus"])
    for schema in sorted((REPO / "packaging" / "ldap").iterdir()):  # where pam_linkus.yaml(5) says
        assert root.path(f"/usr/share/pam-linkus/ldap/{schema.name}").read_bytes() == schema.read_bytes()


def test_installed_commands_and_package_come_from_dist_packages(installed: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    where = root.run(["/usr/bin/python3", "-c", "import pam_linkus, nss_config; print(pam_linkus.__file__)"])
    assert where.stdout.strip() == "/usr/lib/python3/dist-packages/pam_linkus/__init__.py"
    assert "--foreground" in root.run(["/usr/sbin/linkusd", "--help"]).stdout
    assert "doctor" in root.run(["/usr/sbin/linkus-2fa", "--help"]).stdout
    for page, path in (("pam_linkus", "man8/pam_linkus.8.gz"), ("linkusd", "man8/linkusd.8.gz"),
                       ("pam_linkus.yaml", "man5/pam_linkus.yaml.5.gz")):
        man = root.run(["man", "-w", page], check=False)
        assert man.stdout.strip() == f"/usr/share/man/{path}", man.stderr


def test_login_through_the_installed_module_and_linkusd(login_env: dict[str, Any]) -> None:
    root: PrivateRoot = login_env["root"]
    user, other = add_user(login_env), add_user(login_env)
    secret = "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"
    enroll(login_env, {user: secret})
    # By file name: libpam finds it in this architecture's module directory, where the package put it.
    service = add_service(login_env, f"auth requisite pam_unix.so nodelay\n{MODULE_LINE} {options(login_env)}\n")
    code = code_at(secret, time.time())
    ok = pamtester(root, service, user, PASSWORD, code)
    assert ok.returncode == 0 and "Authentication code:" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    assert "outcome=success" in login_env["log"].wait_for(f"user={user}")
    replay = pamtester(root, service, user, PASSWORD, code)
    assert replay.returncode != 0 and "Authentication failure" in replay.stderr
    # Not enrolled under the default `enforce: enrolled`: the password alone, logged as a skip.
    skip = pamtester(root, service, other, PASSWORD)
    assert skip.returncode == 0, skip.stdout + skip.stderr
    assert "outcome=skip" in login_env["log"].wait_for(f"user={other}")
    assert root.path("/var/lib/pam_linkus/state.db").is_file()


def test_login_through_the_enabled_profile_of_the_installed_package(login_env: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    root: PrivateRoot = login_env["root"]
    throwaway = throwaway_root(tmp_path, root.path("/usr/share/pam-configs"), root.path("/"))
    pam_auth_update(throwaway, "--package")
    pam_auth_update(throwaway, "--enable", "linkus")
    generated = auth_lines((throwaway / "etc" / "pam.d" / "common-auth").read_text())
    assert MODULE_LINE in generated
    stack = "".join(f"{line} {options(login_env)}\n" if line == MODULE_LINE else f"{line}\n" for line in generated)
    service = add_service(login_env, stack)
    user = add_user(login_env)
    secret = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
    enroll(login_env, {user: secret})
    code = code_at(secret, time.time())
    bad_password = pamtester(root, service, user, "not-" + PASSWORD, code)
    assert bad_password.returncode != 0 and "Authentication failure" in bad_password.stderr
    assert "Authentication code:" not in bad_password.stdout + bad_password.stderr  # never asked
    bad_code = pamtester(root, service, user, PASSWORD, wrong(code))
    assert bad_code.returncode != 0 and "Authentication failure" in bad_code.stderr
    assert "outcome=denied" in login_env["log"].wait_for(f"user={user}")
    ok = pamtester(root, service, user, PASSWORD, code)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_linkusd_down_refuses_the_login(login_env: dict[str, Any]) -> None:
    """Fail closed: a socket path nobody listens on is unavailable, never a success."""
    root: PrivateRoot = login_env["root"]
    user = add_user(login_env)
    service = add_service(login_env, f"auth requisite pam_unix.so nodelay\n{MODULE_LINE} "
                                     f"socket=/run/linkus-pkg/nobody.sock log_socket={login_env['log_path']}\n")
    result = pamtester(root, service, user, PASSWORD, "123456")
    assert result.returncode != 0
    assert "linkusd unavailable" in login_env["log"].wait_for("linkusd unavailable")


def test_reinstall_keeps_the_admins_config_and_enrollments(installed: dict[str, Any], login_env: dict[str, Any],
                                                           machine: dict[str, Any]) -> None:
    root: PrivateRoot = installed["root"]
    config, extensions = root.path("/etc/pam_linkus/pam_linkus.yaml"), root.path("/etc/pam_linkus/extensions.yaml")
    config.write_bytes(config.read_bytes() + b"# edited by the admin\n")
    enroll(login_env, {"1001": "KRSXG5CTMVRXEZLUKRSXG5CTMVRXEZLU"})
    before = {path: path.read_bytes() for path in (config, extensions)}
    # No --force-conf*: an unchanged conffile in the package must not even ask.
    root.run([*APT, "install", "--reinstall", installed["package"]], timeout=300, env=CLEAN_ENV)
    assert {path: path.read_bytes() for path in (config, extensions)} == before
    assert [(stat.S_IMODE(p.stat().st_mode), p.stat().st_uid) for p in (config, extensions)] == [(0o600, 0)] * 2
    assert machine["pam"].differences() in ([], [root.path("/var/lib/pam/seen")])


def test_purge_leaves_nothing_and_changes_no_pam_file(installed: dict[str, Any], login_env: dict[str, Any],
                                                      machine: dict[str, Any]) -> None:
    """Last in this file: purges the package the tests above used."""
    root: PrivateRoot = installed["root"]
    login_env["daemon"].stop()
    # One service still naming the module: prerm must warn that it will refuse every login.
    kept = add_service(login_env, f"{MODULE_LINE}\n")
    result = root.run([*APT, "purge", PACKAGE], timeout=300, env=CLEAN_ENV)
    root.path(f"/etc/pam.d/{kept}").unlink()
    assert f"libpam-linkus:   /etc/pam.d/{kept}" in result.stdout + result.stderr, result.stdout  # apt merges them
    assert installed_status(root) in ("not known", "un", "pn")
    for path in (MODULE, Path("/etc/pam_linkus"), Path("/var/lib/pam_linkus"), Path("/usr/sbin/linkus-2fa"),
                 Path("/usr/sbin/linkusd"), Path("/usr/share/pam-configs/linkus"),
                 Path("/usr/lib/python3/dist-packages/pam_linkus"), Path("/lib/systemd/system/linkusd.service"),
                 Path("/lib/systemd/system/linkusd.socket"), Path("/lib/systemd/system/linkusd-web.socket"),
                 Path("/usr/share/pam-linkus")):
        assert not os.path.lexists(root.path(path)), path
    assert machine["pam"].differences() == []


@pytest.mark.parametrize(("check_status", "active", "restarted"), [
    (0, 0, True),     # the new code loads the config: restarted
    (1, 0, False),    # it refuses the config: the old daemon keeps serving, the admin is told why
    (0, 3, False),    # linkusd not running: nothing to restart (the sockets start it on demand)
])
def test_upgrade_restart_waits_for_the_new_code_to_load_the_config(tmp_path: Path, check_status: int, active: int,
                                                                   restarted: bool) -> None:
    """packaging/restart-checked.sh, the postinst's upgrade restart (debhelper itself neither stops nor restarts
    linkusd.service on upgrade): run with stand-ins for systemctl, deb-systemd-invoke and linkusd."""
    bin_dir, calls, run = tmp_path / "bin", tmp_path / "calls", tmp_path / "systemd"
    bin_dir.mkdir()
    run.mkdir()
    for name, status in (("systemctl", active), ("deb-systemd-invoke", 0), ("linkusd", check_status)):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\necho "config: bad key" >&2\n'
                                    f'exit {status}\n')
        (bin_dir / name).chmod(0o755)
    env = dict(CLEAN_ENV, PATH=f"{bin_dir}:{CLEAN_ENV['PATH']}", LINKUSD=str(bin_dir / "linkusd"),
               SYSTEMD_RUN=str(run))
    done = subprocess.run(["sh", str(REPO / "packaging" / "restart-checked.sh")], env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert ("deb-systemd-invoke restart linkusd.service" in lines) is restarted, lines
    assert ("linkusd --check" in lines) is (active == 0), lines
    assert ("keeps serving with the old code: config: bad key" in done.stderr) is (check_status != 0 and active == 0)


def test_the_package_restarts_linkusd_only_through_the_checked_script() -> None:
    """debhelper's own upgrade restart is off for linkusd.service, and the postinst calls the script on upgrade."""
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert "dh_installsystemd --no-enable --no-stop-on-upgrade linkusd.service" in rules
    postinst = (REPO / "packaging" / "debian" / "libpam-linkus.postinst").read_text()
    assert "sh /usr/share/pam-linkus/restart-checked.sh" in postinst.split("#DEBHELPER#", 1)[1]
    assert "packaging/restart-checked.sh usr/share/pam-linkus/" in \
        (REPO / "packaging" / "debian" / "libpam-linkus.install").read_text()
