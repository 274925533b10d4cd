"""`linkus-2fa doctor` says what a login would log: which file, line and column is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, PamStack


def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pam_linkus.cli", "--config", str(config), "doctor", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )


def test_doctor_passes_on_a_good_setup(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    result = doctor(pam_stack.config_path, user)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


def test_doctor_names_file_line_column_of_a_broken_extensions_file(pam_stack: PamStack) -> None:
    pam_stack.extensions_path.write_text('extensions:\n  "1001": {method: totp}\n')
    result = doctor(pam_stack.config_path)
    assert result.returncode != 0
    assert f"{pam_stack.extensions_path}:2:3" in result.stdout + result.stderr
    assert "needs a secret" in result.stdout + result.stderr


def test_doctor_names_a_bad_config_key(pam_stack: PamStack) -> None:
    pam_stack.config_path.write_text(pam_stack.config_path.read_text() + "enforse: all\n")
    result = doctor(pam_stack.config_path)
    assert result.returncode != 0
    assert "enforse: unknown key" in result.stdout + result.stderr
