"""linkus-2fa's command line itself: --config anywhere, pipes, truthful messages, audit lines that get lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
SHORT = "JBSWY3DPEHPK3PXP"  # 80 bits, as google-authenticator writes them


class Setup:
    def __init__(self, root: Path):
        self.root = root
        self.config = root / "pam_linkus.yaml"
        self.extensions = root / "extensions.yaml"
        (root / "state").mkdir(mode=0o700)
        # Sockets of its own (no linkusd listens there): enroll's RELOAD must never reach the host's linkusd.
        self.config.write_text(yaml.safe_dump({"yaml": {"path": str(self.extensions)},
                                               "state": {"path": str(root / "state" / "state.db")},
                                               "daemon": {"pam_socket": str(root / "run" / "pam.sock"),
                                                          "web_socket": str(root / "run" / "web.sock")}},
                                              explicit_end=True))
        os.chmod(self.config, 0o600)
        self.write_extensions({"1001": {"method": "totp", "secret": SECRET}})

    def write_extensions(self, extensions: dict[str, object]) -> None:
        self.extensions.write_text(yaml.safe_dump({"extensions": extensions}, explicit_end=True))
        os.chmod(self.extensions, 0o600)

    def entry(self, ext: str) -> dict[str, object]:
        return dict(yaml.safe_load(self.extensions.read_text())["extensions"][ext])

    def run(self, *args: str, log_socket: str = "/nonexistent/log.sock") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pam_linkus.cli", "--log-socket", log_socket, *args],
                              capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
                              stdin=subprocess.DEVNULL)


@pytest.fixture
def setup(private_dir: Path) -> Setup:
    return Setup(private_dir)


def test_config_before_or_after_the_verb(setup: Setup) -> None:
    before = setup.run("--config", str(setup.config), "status", "1001")
    after = setup.run("status", "1001", "--config", str(setup.config))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert "method:       totp" in after.stdout and before.stdout == after.stdout
    wrong = setup.run("status", "1001", "--config", str(setup.root / "absent.yaml"))
    assert wrong.returncode == 1 and "absent.yaml: cannot open" in wrong.stderr


def test_help_documents_config() -> None:
    top = subprocess.run([sys.executable, "-m", "pam_linkus.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True).stdout
    verb = subprocess.run([sys.executable, "-m", "pam_linkus.cli", "list", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=True).stdout
    assert "--config" in top and "before or after the verb" in top and "--config" in verb


def test_self_service_takes_no_config_after_the_verb(setup: Setup) -> None:
    result = setup.run("self", "status", "--config", str(setup.config))
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_list_into_a_closed_pipe_exits_quietly(setup: Setup) -> None:
    setup.write_extensions({str(2000 + i): {"method": "totp", "secret": SECRET} for i in range(3000)})
    head = subprocess.Popen([sys.executable, "-m", "pam_linkus.cli", "--log-socket", "/nonexistent",
                             "--config", str(setup.config), "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    assert head.stdout is not None and head.stderr is not None
    head.stdout.readline()
    head.stdout.close()  # what `| head -1` does
    stderr = head.stderr.read().decode()
    assert head.wait(timeout=60) == 141
    assert stderr == ""


def test_lost_audit_line_is_said_on_stderr(setup: Setup) -> None:
    result = setup.run("--config", str(setup.config), "unlock", "1001", log_socket=str(setup.root / "no.sock"))
    assert result.returncode == 0, result.stderr
    assert "did not take the audit line" in result.stderr and 'action="unlock" ext="1001"' in result.stderr


def test_no_confirm_reenrollment_says_the_old_key_is_replaced_at_once(setup: Setup) -> None:
    result = setup.run("--config", str(setup.config), "enroll", "1001", "--no-confirm", "--no-qr")
    assert result.returncode == 0, result.stderr
    assert "replaced by the new key now" in result.stdout and "only once the new key is confirmed" not in result.stdout
    assert setup.entry("1001")["secret"] != SECRET


def test_enrol_is_the_same_verb_as_enroll(setup: Setup) -> None:
    """The project writes "enroll"; the British spelling people type works the same."""
    result = setup.run("--config", str(setup.config), "enrol", "1001", "--no-confirm", "--no-qr")
    assert result.returncode == 0, result.stderr
    assert "replaced by the new key now" in result.stdout and setup.entry("1001")["secret"] != SECRET


def test_issuer_with_a_colon_is_encoded_in_the_printed_uri(setup: Setup) -> None:
    result = setup.run("--config", str(setup.config), "enroll", "1002", "--no-confirm", "--no-qr",
                       "--issuer", "PBX:Main")
    assert result.returncode == 0, result.stderr
    assert "otpauth://totp/PBX%3AMain:1002?" in result.stdout and "issuer=PBX%3AMain" in result.stdout


def test_import_google_marks_a_short_key_and_doctor_flags_it_until_reenrollment(setup: Setup) -> None:
    ga = setup.root / "ga"
    ga.write_text(f'{SHORT}\n" RATE_LIMIT 3 30\n" WINDOW_SIZE 3\n" DISALLOW_REUSE\n" TOTP_AUTH\n12345678\n')
    os.chmod(ga, 0o400)
    result = setup.run("--config", str(setup.config), "import-google", "1003", "--file", str(ga))
    assert result.returncode == 0, result.stderr
    assert "fewer than 128 bits" in result.stdout
    assert setup.entry("1003") == {"method": "totp", "secret": SHORT, "legacy_short_secret": True}
    pam_dir = setup.root / "pam.d"
    pam_dir.mkdir()
    doctor = setup.run("--config", str(setup.config), "doctor", "--pam-dir", str(pam_dir))
    assert "WARN extension 1003: its TOTP key has fewer than 128 bits" in doctor.stdout, doctor.stdout
    assert setup.run("--config", str(setup.config), "enroll", "1003", "--no-confirm", "--no-qr").returncode == 0
    assert "legacy_short_secret" not in setup.entry("1003")
    doctor = setup.run("--config", str(setup.config), "doctor", "--pam-dir", str(pam_dir))
    assert "extension 1003" not in doctor.stdout


def test_doctor_names_unsafe_files_and_directories(setup: Setup) -> None:
    pam_dir = setup.root / "pam.d"
    pam_dir.mkdir()
    os.chmod(setup.extensions, 0o644)
    doctor = setup.run("--config", str(setup.config), "doctor", "--pam-dir", str(pam_dir))
    assert doctor.returncode == 1
    assert f"FAIL extensions file: {setup.extensions}: is mode 0644" in doctor.stdout, doctor.stdout
    os.chmod(setup.extensions, 0o600)
    os.chmod(setup.root, 0o1777)
    try:
        doctor = setup.run("--config", str(setup.config), "doctor", "--pam-dir", str(pam_dir))
    finally:
        os.chmod(setup.root, 0o700)
    assert doctor.returncode == 1
    assert f"FAIL config: {setup.config}: the directory {setup.root} is writable by group or others" in doctor.stdout
