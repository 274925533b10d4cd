"""`linkus-2fa self` (password through PAM, then the current code), parallel enrollments, and the
migration from google-authenticator-libpam, each through the real command and real PAM."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pam_client as client
import pytest
import yaml
from cli_helpers import cli_argv, finish, password_service, read_key, run_cli, spawn_cli
from conftest import PASSWORD, REPO, SECRET, PamStack, code_at

pytestmark = pytest.mark.pam
__all__ = ["password_service"]  # the fixture, re-exported for pytest


def test_self_service_needs_the_right_password(pam_stack: PamStack, user: str, password_service: str) -> None:
    pam_stack.write_config(self_service={"pam_service": password_service})
    env = {"SUDO_USER": user}
    before = pam_stack.extensions_path.read_bytes()
    child = spawn_cli(pam_stack, "self", "enroll", "--no-qr", env=env)
    child.expect("Password: ")
    child.sendline("not-" + PASSWORD)
    rc, output = finish(child)
    assert rc == 1
    assert "password not accepted" in output
    assert pam_stack.extensions_path.read_bytes() == before
    assert 'result=wrong-password' in pam_stack.log.wait_for(f'action=self-check ext={user}')

    child = spawn_cli(pam_stack, "self", "enroll", "--no-qr", env=env)
    child.expect("Password: ")
    child.sendline(PASSWORD)
    secret = read_key(child)
    child.expect("Enter the 6-digit code the app shows now: ")
    now = time.time()
    child.sendline(code_at(secret, now))
    child.expect("Edited successfully.")
    assert finish(child)[0] == 0
    audit = pam_stack.log.wait_for(f'action=enroll ext={user}')
    assert f'by={user}' in audit and 'via=self' in audit

    # Enrolled now: disabling also needs a current code, checked by the login flow itself.
    child = spawn_cli(pam_stack, "self", "disable", env=env)
    child.expect("Password: ")
    child.sendline(PASSWORD)
    child.expect("Authentication code: ")
    child.sendline(f"{(int(code_at(secret, now + 30)) + 1) % 1_000_000:06d}")
    rc, output = finish(child)
    assert rc == 1 and "wrong code" in output
    assert yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]["secret"] == secret

    child = spawn_cli(pam_stack, "self", "disable", env=env)
    child.expect("Password: ")
    child.sendline(PASSWORD)
    child.expect("Authentication code: ")
    child.sendline(code_at(secret, now + 30))
    child.expect("2FA disabled")
    assert finish(child)[0] == 0
    assert yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]["enabled"] is False


def test_self_service_only_ever_acts_on_the_sudo_user(pam_stack: PamStack, user: str) -> None:
    other = run_cli(pam_stack, "self", "enroll", "someone-else", env={"SUDO_USER": user})
    assert other.returncode == 2 and "unrecognized arguments: someone-else" in other.stderr
    config = run_cli(pam_stack, "self", "enroll", "--config", "/tmp/x.yaml", env={"SUDO_USER": user})
    assert config.returncode == 2
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    no_sudo = subprocess.run(cli_argv(pam_stack, "self", "status"), capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=60, check=False)
    assert no_sudo.returncode == 1 and "SUDO_USER is not set" in no_sudo.stderr


def test_parallel_enrollments_lose_nothing(pam_stack: PamStack) -> None:
    pam_stack.extensions_path.write_text('# the admin\'s note\nextensions:\n  "keep":  # keep me\n'
                                         f"    method: totp\n    secret: {SECRET}\n...\n")
    names = [f"ext{secrets.token_hex(3)}" for _ in range(8)]
    procs = [subprocess.Popen(cli_argv(pam_stack, "enroll", name, "--no-confirm", "--no-qr"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    outputs = {}
    for name, proc in zip(names, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs[name] = out
    text = pam_stack.extensions_path.read_text()
    assert text.startswith("# the admin's note\n") and '"keep":  # keep me' in text
    entries = yaml.safe_load(text)["extensions"]
    assert set(entries) == {"keep", *names}
    assert entries["keep"]["secret"] == SECRET
    for name in names:
        secret = entries[name]["secret"]
        assert " ".join(secret[i:i + 4] for i in range(0, 32, 4)) in outputs[name]
    assert oct(pam_stack.extensions_path.stat().st_mode & 0o777) == "0o600"


def make_google_authenticator_file(directory: Path) -> Path:
    home = directory / "home"
    home.mkdir()
    path = home / ".google_authenticator"
    subprocess.run(["google-authenticator", "--time-based", "--disallow-reuse", "--force", "--rate-limit=3",
                    "--rate-time=30", "--window-size=3", "--emergency-codes=5", "--qr-mode=NONE", "--quiet",
                    "--no-confirm", f"--secret={path}"],
                   env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True, timeout=30,
                   stdin=subprocess.DEVNULL, capture_output=True)
    return path


def oathtool(secret: str, when: float) -> str:
    return subprocess.run(["oathtool", "--totp", "-b", secret, "-N", f"@{int(when)}"], capture_output=True,
                          text=True, check=True, timeout=10).stdout.strip()


def test_import_from_google_authenticator_accepts_the_same_codes(pam_stack: PamStack, user: str,
                                                                  private_dir: Path) -> None:
    ga_file = make_google_authenticator_file(private_dir)
    lines = ga_file.read_text().splitlines()
    secret, scratch = lines[0], [line for line in lines if line.isdigit()]
    assert len(scratch) == 5
    ga_service = f"linkus-test-ga-{secrets.token_hex(4)}"
    Path("/etc/pam.d", ga_service).write_text(
        f"auth required pam_google_authenticator.so secret={ga_file} user=root\naccount required pam_permit.so\n")
    try:
        now = time.time()
        first, second = oathtool(secret, now), oathtool(secret, now + 30)
        assert first == code_at(secret, now)
        # Used with the old module before the migration ...
        assert client.authenticate(ga_service, user, None, first).auth == "PAM_SUCCESS"
        result = run_cli(pam_stack, "import-google", user, "--file", str(ga_file))
        assert result.returncode == 0, result.stderr
        assert "5 scratch codes are now recovery codes" in result.stdout
        # ... so it is a replay for pam-linkus too; the next code works with both modules.
        assert pam_stack.login(user, first).auth == "PAM_AUTH_ERR"
        assert pam_stack.login(user, second).auth == "PAM_SUCCESS"
        assert client.authenticate(ga_service, user, None, second).auth == "PAM_SUCCESS"
        # Scratch codes became single-use recovery codes.
        assert pam_stack.login(user, scratch[2]).auth == "PAM_SUCCESS"
        assert pam_stack.login(user, scratch[2]).auth == "PAM_AUTH_ERR"
        status = run_cli(pam_stack, "status", user)
        assert "recovery:     4 codes left" in status.stdout
        assert "recovery_codes=5" in pam_stack.log.wait_for(f'action=import-google ext={user}')
        assert all(secret not in line for line in pam_stack.log.lines)
    finally:
        Path("/etc/pam.d", ga_service).unlink(missing_ok=True)


def test_import_refuses_a_counter_based_file(pam_stack: PamStack, user: str, private_dir: Path) -> None:
    path = private_dir / "hotp"
    path.write_text(f'{SECRET}\n" HOTP_COUNTER 1\n12345678\n')
    before = pam_stack.extensions_path.read_bytes()
    result = run_cli(pam_stack, "import-google", user, "--file", str(path))
    assert result.returncode == 1 and "counter-based (HOTP)" in result.stderr
    assert pam_stack.extensions_path.read_bytes() == before


def test_self_service_recovery_codes_after_password_and_a_recovery_code(pam_stack: PamStack, user: str,
                                                                        password_service: str) -> None:
    pam_stack.write_config(self_service={"pam_service": password_service})
    pam_stack.enroll_totp(user)
    first = run_cli(pam_stack, "recovery-codes", user, "--count", "2")
    old_codes = [line.strip() for line in first.stdout.splitlines() if line.startswith("  ")]
    child = spawn_cli(pam_stack, "self", "recovery-codes", env={"SUDO_USER": user})
    child.expect("Password: ")
    child.sendline(PASSWORD)
    child.expect("Authentication code: ")
    child.sendline(old_codes[0])  # the phone is gone: a recovery code proves the second factor
    child.expect("Edited successfully.")
    printed = str(child.before)
    assert finish(child)[0] == 0
    new_codes = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert len(new_codes) == 10 and not set(new_codes) & set(old_codes)
    assert pam_stack.login(user, old_codes[1]).auth == "PAM_AUTH_ERR"  # replaced
    assert pam_stack.login(user, new_codes[0]).auth == "PAM_SUCCESS"
    status = run_cli(pam_stack, "self", "status", env={"SUDO_USER": user})
    assert status.returncode == 0 and "recovery:     9 codes left" in status.stdout
