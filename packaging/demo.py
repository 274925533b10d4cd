"""Show a real login through PAM with pam-linkus as installed (``make demo``).

Creates, for the length of the demo only: a local user ``linkus-demo``, a PAM service
``/etc/pam.d/linkus-demo`` (pam_unix, then /lib/security/pam_linkus.py), and a private
config directory with one demo extension. Then it logs in with the right code, a wrong
one and a replayed one, and removes all three again. No existing PAM service, user
or /etc/pam_linkus file is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pam_linkus.client import authenticate
from pam_linkus.totp import decode_secret, generate_secret, provisioning_uri, totp

USER = "linkus-demo"
SERVICE = "linkus-demo"


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root", file=sys.stderr)
        return 1
    if not Path("/lib/security/pam_linkus.py").exists():
        print("demo: /lib/security/pam_linkus.py missing; run `make install` first", file=sys.stderr)
        return 1
    pam_file = Path("/etc/pam.d", SERVICE)
    if pam_file.exists():
        print(f"demo: {pam_file} exists already; remove it if it is a leftover of an earlier demo", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="linkus-demo-"))
    created_user = False
    try:
        password = secrets.token_urlsafe(12)
        if subprocess.run(["id", USER], capture_output=True, check=False).returncode != 0:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
            created_user = True
        subprocess.run(["chpasswd"], input=f"{USER}:{password}\n", text=True, check=True)
        secret = generate_secret()
        (workdir / "state").mkdir(mode=0o700)
        (workdir / "cache").mkdir(mode=0o700)
        config = workdir / "pam_linkus.yaml"
        extensions = workdir / "extensions.yaml"
        config.write_text(
            f"sources: [yaml]\nyaml: {{path: {extensions}}}\nstate: {{path: {workdir}/state/state.db}}\n"
        )
        extensions.write_text(f'extensions:\n  "{USER}":\n    method: totp\n    secret: {secret}\n')
        for path in (config, extensions):
            path.chmod(0o600)
        pam_file.write_text(
            "auth requisite pam_unix.so\n"
            f"auth [success=ok ignore=ignore default=die] pam_python.so pam_linkus.py config={config} "
            f"cache_dir={workdir}/cache\n"
            "account required pam_permit.so\n"
        )
        print(f"Demo extension {USER!r} enrolled with TOTP (SHA1, 6 digits, 30 s).")
        print("  otpauth URI:", provisioning_uri(secret, USER, "pam-linkus demo"))
        _show_qr(provisioning_uri(secret, USER, "pam-linkus demo"))
        key = decode_secret(secret)
        code = totp(key, time.time())
        wrong = f"{(int(code) + 500_000) % 1_000_000:06d}"
        ok = True
        for label, answer, expected in (
            ("right code", code, "PAM_SUCCESS"),
            ("wrong code", wrong, "PAM_AUTH_ERR"),
            ("same code again (replay)", code, "PAM_AUTH_ERR"),
        ):
            result = authenticate(SERVICE, USER, password, answer)
            shown = " / ".join(p.strip() for p in result.prompts)
            verdict = "ok" if result.auth == expected else "UNEXPECTED"
            ok &= result.auth == expected
            print(f"  login with {label:<26} prompts: {shown:<40} -> {result.auth:<13} [{verdict}]")
        print("Demo", "passed." if ok else "FAILED.")
        return 0 if ok else 1
    finally:
        pam_file.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if created_user:
            subprocess.run(["userdel", USER], capture_output=True, check=False)


def _show_qr(uri: str) -> None:
    try:
        import segno
    except ImportError:
        return
    segno.make(uri, error="m").terminal(compact=True)


if __name__ == "__main__":
    sys.exit(main())
