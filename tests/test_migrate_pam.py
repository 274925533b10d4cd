"""`linkus-2fa migrate-pam`: old pam_python lines become pam_linkus.so lines, atomically, with a backup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PamStack

from pam_linkus.doctor import check_pam_text
from pam_linkus.migrate_pam import migrate

REPO = Path(__file__).resolve().parent.parent
CONTROL = "[success=ok ignore=ignore default=die]"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pam_linkus.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)


@pytest.fixture
def pam_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pam.d"
    d.mkdir()
    return d


def test_options_are_mapped_and_the_result_passes_doctor(pam_dir: Path) -> None:
    sshd = pam_dir / "sshd"
    sshd.write_text("# sshd\n@include common-auth\n"
                    f"auth\t{CONTROL}\tpam_python.so /lib/security/pam_linkus.py config=/etc/pam_linkus/x.yaml \\\n"
                    "    cache_dir=/var/cache/pam_linkus [prompt=Your code: ] echo_code debug log_socket=/dev/log\n"
                    "account include common-account\n")
    os.chmod(sshd, 0o644)
    out: list[str] = []
    assert migrate(str(pam_dir), check=True, out=out.append) == 1
    assert sshd.read_text().count("pam_python") == 1  # --check changes nothing
    out.clear()
    assert migrate(str(pam_dir), check=False, out=out.append) == 0
    text = sshd.read_text()
    assert text == ("# sshd\n@include common-auth\n"
                    f"auth {CONTROL} pam_linkus.so [prompt=Your code: ] echo_code debug log_socket=/dev/log\n"
                    "account include common-account\n")
    joined = "\n".join(out)
    assert "dropped config=" in joined and "dropped cache_dir=" in joined and f"migrated {sshd}" in joined
    assert (pam_dir / "sshd.linkus-bak").read_text().count("pam_python") == 1
    assert os.stat(sshd).st_mode & 0o777 == 0o644
    assert [level for _, level, _ in check_pam_text(text)] == ["ok"]
    assert migrate(str(pam_dir), check=True, out=out.append) == 0  # nothing left


def test_forward_pass_becomes_the_single_field_form(pam_dir: Path) -> None:
    web = pam_dir / "web"
    web.write_text(f"auth {CONTROL} pam_python.so pam_linkus.py forward_pass debug\n"
                   "auth requisite pam_unix.so use_first_pass\n"
                   "account required pam_unix.so\n")
    assert migrate(str(pam_dir), check=False, out=lambda _: None) == 0
    assert web.read_text() == (f"auth {CONTROL} pam_linkus.so forward_pass debug\n"
                               "auth requisite pam_unix.so use_first_pass\n"
                               f"auth {CONTROL} pam_linkus.so debug\n"
                               "account required pam_unix.so\n")
    assert [level for _, level, _ in check_pam_text(web.read_text())] == ["ok", "ok"]


@pytest.mark.parametrize(("text", "why"), [
    (f"auth {CONTROL} pam_python.so pam_linkus.py forward_pass\nauth sufficient pam_unix.so use_first_pass\n",
     "must be requisite or required"),
    (f"auth {CONTROL} pam_python.so pam_linkus.py forward_pass\n", "not followed by a password module"),
    (f"auth required pam_unix.so\nauth {CONTROL} pam_python.so pam_linkus.py colour=red\n", "no pam_linkus.so"),
])
def test_what_cannot_be_mapped_is_left_alone(pam_dir: Path, text: str, why: str) -> None:
    path = pam_dir / "svc"
    path.write_text(text)
    out: list[str] = []
    assert migrate(str(pam_dir), check=False, out=out.append) == 1
    assert path.read_text() == text and not (pam_dir / "svc.linkus-bak").exists()
    assert why in "\n".join(out)


def test_dash_is_dropped_and_backups_are_not_migrated_again(pam_dir: Path) -> None:
    path = pam_dir / "login"
    path.write_text(f"auth required pam_unix.so\n-auth {CONTROL} pam_python.so pam_linkus.py\n")
    out: list[str] = []
    assert migrate(str(pam_dir), check=False, out=out.append) == 0
    assert path.read_text() == f"auth required pam_unix.so\nauth {CONTROL} pam_linkus.so\n"
    assert "leading '-'" in "\n".join(out)
    assert sorted(p.name for p in pam_dir.iterdir()) == ["login", "login.linkus-bak"]
    assert migrate(str(pam_dir), check=True, out=out.append) == 0


def test_cli_verb_check_and_config_after_the_verb(pam_dir: Path) -> None:
    (pam_dir / "su").write_text(f"auth required pam_unix.so\nauth {CONTROL} pam_python.so pam_linkus.py\n")
    result = cli("migrate-pam", "--pam-dir", str(pam_dir), "--check", "--config", "/nonexistent")
    assert result.returncode == 1 and "needs migrating" in result.stdout
    # Never this machine's own /etc/pam_linkus/pam_linkus.yaml (the default): its state is not the test's.
    absent = str(pam_dir / "absent.yaml")
    result = cli("migrate-pam", "--pam-dir", str(pam_dir), "--config", absent)
    assert result.returncode == 0 and "pam_linkus.so" in (pam_dir / "su").read_text()
    assert cli("migrate-pam", "--pam-dir", str(pam_dir), "--check", "--config", absent).returncode == 0


def test_migrate_pam_marks_the_short_keys_the_old_version_imported(pam_stack: PamStack, private_dir: Path) -> None:
    """An 80-bit key without legacy_short_secret refuses the whole file in this version: the upgrade
    marks it (one atomic write, comments kept), and logins work again."""
    import yaml
    from cli_helpers import run_cli
    from conftest import SECRET

    short = "JBSWY3DPEHPK3PXP"  # 80 bits, as google-authenticator makes them
    pam_stack.extensions_path.write_text(
        "# the admin's note\nextensions:\n"
        f'  "old": {{method: totp, secret: {short}}}  # imported\n'
        f'  "new": {{method: totp, secret: {SECRET}}}\n...\n'
    )
    assert "legacy_short_secret" in str(pam_stack.daemon.reload()["last_error"])
    pam_dir = private_dir / "pam.d"
    pam_dir.mkdir()
    check = run_cli(pam_stack, "migrate-pam", "--check", "--pam-dir", str(pam_dir))
    assert check.returncode == 1 and "needs legacy_short_secret: extension 'old'" in check.stdout
    done = run_cli(pam_stack, "migrate-pam", "--pam-dir", str(pam_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    text = pam_stack.extensions_path.read_text()
    assert "# the admin's note" in text and "# imported" in text
    entries = yaml.safe_load(text)["extensions"]
    assert entries["old"] == {"method": "totp", "secret": short, "legacy_short_secret": True}
    assert entries["new"] == {"method": "totp", "secret": SECRET}
    assert pam_stack.daemon.reload()["last_error"] is None
    assert run_cli(pam_stack, "migrate-pam", "--check", "--pam-dir", str(pam_dir)).returncode == 0
