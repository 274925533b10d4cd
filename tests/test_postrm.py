"""`apt purge` (postrm purge) leaves no pam-linkus file behind, and nothing of the admin's is removed."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POSTRM = REPO / "packaging" / "debian" / "libpam-linkus.postrm"


def run_postrm(root: Path, action: str) -> None:
    """The real script with its two absolute paths moved under ``root``."""
    script = POSTRM.read_text().replace("/etc/pam_linkus", f"{root}/etc/pam_linkus").replace(
        "/var/lib/pam_linkus", f"{root}/var/lib/pam_linkus")
    assert script.count(str(root)) >= 4  # every path was moved; nothing runs against the host
    (root / "postrm").write_text(script)
    subprocess.run(["sh", "-e", str(root / "postrm"), action], check=True, timeout=30)


def make_install(root: Path) -> Path:
    etc = root / "etc" / "pam_linkus"
    etc.mkdir(parents=True)
    (root / "var" / "lib" / "pam_linkus").mkdir(parents=True)
    (root / "var" / "lib" / "pam_linkus" / "state.db").write_text("")
    for name in ("extensions.yaml", "extensions.yaml.lock", ".extensions.yaml.0123abcd.tmp"):
        (etc / name).write_text("")
    return etc


def test_purge_removes_lock_and_directory(tmp_path: Path) -> None:
    etc = make_install(tmp_path)
    run_postrm(tmp_path, "purge")
    assert not etc.exists() and not (tmp_path / "var" / "lib" / "pam_linkus").exists()


def test_purge_keeps_the_admins_own_files(tmp_path: Path) -> None:
    etc = make_install(tmp_path)
    (etc / "smtp.password").write_text("x")
    run_postrm(tmp_path, "purge")
    assert sorted(p.name for p in etc.iterdir()) == ["smtp.password"]


def test_remove_keeps_everything(tmp_path: Path) -> None:
    etc = make_install(tmp_path)
    run_postrm(tmp_path, "remove")
    assert (etc / "extensions.yaml").exists() and (etc / "extensions.yaml.lock").exists()
