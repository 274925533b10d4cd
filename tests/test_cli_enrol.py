"""`linkus-2fa` end to end: the real command (on a pty where it prompts), then real logins through PAM."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import finish, read_key, run_cli, spawn_cli
from conftest import SECRET, PamStack, code_at

pytestmark = pytest.mark.pam


def other_code(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def wrong_code(secret: str) -> str:
    """A code that no step around now (+-2) accepts."""
    valid = {code_at(secret, time.time() + d * 30) for d in range(-2, 3)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444", "555555") if c not in valid)


def test_enroll_by_typed_key_then_login_through_pam(pam_stack: PamStack, user: str, private_dir: Path) -> None:
    qr_file = private_dir / "qr.png"
    child = spawn_cli(pam_stack, "enroll", user, "--issuer", "PBX-test", "--qr-file", str(qr_file))
    secret = read_key(child)
    child.expect("Enter the 6-digit code the app shows now: ")
    now = time.time()
    confirm = code_at(secret, now)
    child.sendline(confirm)
    child.expect("Edited successfully.")
    rc, _ = finish(child)
    assert rc == 0
    entry = yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]
    assert entry == {"method": "totp", "secret": secret}
    assert len(secret) * 5 == 160
    assert stat.S_IMODE(os.stat(qr_file).st_mode) == 0o600
    assert qr_file.read_bytes().startswith(b"\x89PNG")
    # The confirmation code was recorded as used: it cannot be replayed at a login.
    assert pam_stack.login(user, confirm).auth == "PAM_AUTH_ERR"
    result = pam_stack.login(user, code_at(secret, now + 30))
    assert (result.auth, result.account) == ("PAM_SUCCESS", "PAM_SUCCESS")
    audit = pam_stack.log.wait_for(f'action=enroll ext={user}')
    assert 'method=totp' in audit and 'confirmed=yes' in audit
    assert all(secret not in line and confirm not in line for line in pam_stack.log.lines)


def test_qr_code_is_drawn_and_the_uri_names_issuer_and_account(pam_stack: PamStack, user: str) -> None:
    result = run_cli(pam_stack, "enroll", user, "--no-confirm", "--issuer", "Yeastar PBX")
    assert result.returncode == 0, result.stderr
    assert "\u2584" in result.stdout or "\u2580" in result.stdout  # half blocks of the terminal QR code
    secret = yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]["secret"]
    assert f"otpauth://totp/Yeastar%20PBX:{user}?secret={secret}&issuer=Yeastar%20PBX" in result.stdout
    assert "algorithm SHA1, 6 digits, every 30 seconds" in result.stdout


def test_wrong_confirmation_code_saves_nothing(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp("someone-else")
    before = pam_stack.extensions_path.read_bytes()
    child = spawn_cli(pam_stack, "enroll", user, "--no-qr")
    secret = read_key(child)
    for _ in range(3):
        child.expect("Enter the 6-digit code the app shows now: ")
        child.sendline(wrong_code(secret))
    rc, output = finish(child)
    assert rc == 1
    assert "nothing was saved" in output and "Edited successfully." not in output
    assert pam_stack.extensions_path.read_bytes() == before
    status = run_cli(pam_stack, "status", user)
    assert "method:       none" in status.stdout
    assert 'result=not-confirmed' in pam_stack.log.wait_for(f'action=enroll ext={user}')


def test_re_enrollment_keeps_the_old_secret_until_the_new_one_is_confirmed(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    child = spawn_cli(pam_stack, "enroll", user, "--no-qr")
    child.expect("already has 2FA")
    new_secret = read_key(child)
    for _ in range(3):
        child.expect("Enter the 6-digit code the app shows now: ")
        child.sendline(wrong_code(new_secret))
    assert finish(child)[0] == 1
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
    # Now confirm properly: the new secret replaces the old one.
    child = spawn_cli(pam_stack, "enroll", user, "--no-qr")
    new_secret = read_key(child)
    child.expect("Enter the 6-digit code the app shows now: ")
    child.sendline(code_at(new_secret, time.time()))
    assert finish(child)[0] == 0
    assert pam_stack.login(user, code_at(SECRET, time.time() + 30)).auth == "PAM_AUTH_ERR"
    assert pam_stack.login(user, code_at(new_secret, time.time() + 30)).auth == "PAM_SUCCESS"


def test_disable_lost_phone_then_login_without_code(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user, email="a@example.com")
    result = run_cli(pam_stack, "disable", user)
    assert result.returncode == 0, result.stderr
    assert "2FA disabled" in result.stdout
    entry = yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]
    assert entry == {"method": "totp", "email": "a@example.com", "enabled": False}
    login = pam_stack.login(user, None)
    assert (login.auth, login.account) == ("PAM_SUCCESS", "PAM_SUCCESS")
    assert login.prompts == ["Password: "]
    assert f'action=disable ext={user}' in pam_stack.log.wait_for('action=disable')


def test_recovery_code_works_once_through_pam(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    result = run_cli(pam_stack, "recovery-codes", user, "--count", "3")
    assert result.returncode == 0, result.stderr
    codes = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(codes) == 3 and all(len(c) == 11 and c[5] == "-" for c in codes)
    first = pam_stack.login(user, codes[0])
    assert (first.auth, first.account) == ("PAM_SUCCESS", "PAM_SUCCESS")
    assert 'reason=recovery code accepted' in pam_stack.log.wait_for("recovery code accepted")
    assert pam_stack.login(user, codes[0]).auth == "PAM_AUTH_ERR"
    assert pam_stack.login(user, codes[1].upper().replace("-", " ")).auth == "PAM_SUCCESS"
    # A wrong recovery code is one failure (not one for TOTP and one for recovery).
    assert pam_stack.login(user, "aaaaa-aaaaa").auth == "PAM_AUTH_ERR"
    status = run_cli(pam_stack, "status", user)
    assert "recovery:     1 codes left" in status.stdout
    assert "failures:     1" in status.stdout
    assert "last success: never" not in status.stdout
    assert all(c not in line for c in codes for line in pam_stack.log.lines)
    audit = pam_stack.log.wait_for('action=recovery-codes')
    assert f'ext={user}' in audit and "count=3" in audit


def test_unlock_clears_a_lockout(pam_stack: PamStack, user: str) -> None:
    pam_stack.write_config(lockout={"max_failures": 2, "duration": 0})
    pam_stack.enroll_totp(user)
    wrong = other_code(code_at(SECRET, time.time()))
    assert pam_stack.login(user, wrong).auth == "PAM_AUTH_ERR"
    assert pam_stack.login(user, wrong).auth == "PAM_MAXTRIES"
    status = run_cli(pam_stack, "status", user)
    assert "locked:       until an admin runs linkus-2fa unlock" in status.stdout
    assert "failures:     2" in status.stdout
    result = run_cli(pam_stack, "unlock", user)
    assert result.returncode == 0 and "2 consecutive failures cleared" in result.stdout
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
    assert f'action=unlock ext={user}' in pam_stack.log.wait_for('action=unlock')


def test_state_only_changes_do_not_reload_linkusd(pam_stack: PamStack, user: str) -> None:
    """Issue 17.13: unlock and new recovery codes change the state store only; a reload of the
    whole config (seconds of CPU with 100,000 extensions) is for changes of the settings."""
    pam_stack.enroll_totp(user)
    loaded = pam_stack.daemon.status()["last_reload"]
    before = len(pam_stack.log.lines)
    for args in (("unlock", user), ("recovery-codes", user, "--count", "3")):
        result = run_cli(pam_stack, *args)
        assert result.returncode == 0, result.stderr
    pam_stack.log.wait_for("action=recovery-codes")
    assert pam_stack.daemon.status()["last_reload"] == loaded
    assert not [line for line in pam_stack.log.lines[before:] if "configuration loaded" in line]
    # A change of the settings still has linkusd load them before the command returns.
    result = run_cli(pam_stack, "disable", user)
    assert result.returncode == 0, result.stderr
    assert pam_stack.daemon.status()["last_reload"] != loaded
    assert pam_stack.login(user, None).auth == "PAM_SUCCESS"


def test_status_and_list_never_show_the_secret(pam_stack: PamStack, user: str) -> None:
    pam_stack.enroll_totp(user)
    assert pam_stack.login(user, code_at(SECRET, time.time())).auth == "PAM_SUCCESS"
    status = run_cli(pam_stack, "status", user)
    listing = run_cli(pam_stack, "list")
    for result in (status, listing):
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout and SECRET[:16] not in result.stdout
    assert "method:       totp (2FA on, from the yaml source)" in status.stdout
    assert "last success: never" not in status.stdout
    assert any(line.startswith(user) and " totp " in line for line in listing.stdout.splitlines())


def test_scripted_bulk_enrollment_with_no_confirm(pam_stack: PamStack, user: str) -> None:
    result = run_cli(pam_stack, "enroll", user, "--no-confirm", "--no-qr")
    assert result.returncode == 0, result.stderr
    secret = yaml.safe_load(pam_stack.extensions_path.read_text())["extensions"][user]["secret"]
    assert " ".join(secret[i:i + 4] for i in range(0, 32, 4)) in result.stdout
    assert pam_stack.login(user, code_at(secret, time.time())).auth == "PAM_SUCCESS"
    assert 'confirmed=no' in pam_stack.log.wait_for(f'action=enroll ext={user}')


def test_invalid_extension_name_is_refused(pam_stack: PamStack) -> None:
    result = run_cli(pam_stack, "enroll", "bad\nname", "--no-confirm")
    assert result.returncode == 1
    assert "invalid extension name" in result.stderr
    assert "bad" not in pam_stack.extensions_path.read_text()


def test_an_unusable_state_store_stops_the_change_before_the_source_is_written(pam_stack: PamStack, user: str,
                                                                               private_dir: Path) -> None:
    shared = private_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    pam_stack.enroll_totp(user)
    pam_stack.config["state"] = {"path": str(shared / "state.db")}
    pam_stack._write_config()  # linkusd would refuse it too; only the CLI is asked here
    before = pam_stack.extensions_path.read_bytes()
    for args in (("enroll", user, "--no-confirm", "--no-qr"), ("disable", user)):
        result = run_cli(pam_stack, *args)
        assert result.returncode == 1, args
        assert "must be owned by root and not writable by group or others" in result.stderr
        assert "Key:" not in result.stdout
    assert pam_stack.extensions_path.read_bytes() == before


def test_a_broken_extensions_file_is_reported_before_a_secret_is_shown(pam_stack: PamStack, user: str) -> None:
    pam_stack.extensions_path.write_text('extensions:\n  "1001": {method: totp}\n...\n')
    result = run_cli(pam_stack, "enroll", user, "--no-qr")
    assert result.returncode == 1
    assert f"{pam_stack.extensions_path}:2:3" in result.stderr and "needs a secret" in result.stderr
    assert "Key:" not in result.stdout
