"""Show real logins through PAM with pam-linkus as installed (``make demo``, after ``make install``).

What it uses: the installed ``pam_linkus.so`` (named by file name in the PAM line, so libpam
loads it from the system's module directory), the installed ``linkusd`` and ``pamtester``,
which reads the password and the code from its standard input.

What it creates, for the length of the demo only, all with random names: a local user, a PAM
service ``/etc/pam.d/linkus-demo-<hex>`` (pam_unix, then pam_linkus.so), and a root-only
directory ``/run/linkus-demo-<hex>`` with a demo config, one TOTP extension, its own state and
a socket for a second, private ``linkusd`` that only the demo service talks to
(``socket=`` in its PAM line). The administrator's /etc/pam_linkus, /var/lib/pam_linkus and
the system's linkusd (started by ``make install``: systemd socket activation, or in the
background) are never touched: enrolling a demo extension in the real extensions.yaml could
not be undone exactly if the admin edited it meanwhile, and the demo's replay record must not
land in the real state. The system linkusd is asked for its health and shown.

It then logs in with the right code, a wrong code and the right code again (a replay), prints
each result, and removes everything it created, also when it fails; a second run starts afresh.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pam_linkus.protocol import call_control
from pam_linkus.totp import decode_secret, generate_secret, provisioning_uri, totp

LINKUSD = Path(sys.prefix, "bin", "linkusd")  # the installed one, next to this interpreter
SYSTEM_SOCKET = "/run/linkusd/pam.sock"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
STEPS = (
    # label, answer ("right"/"wrong"), what PAM must say
    ("right code", "right", True),
    ("wrong code", "wrong", False),
    ("right code again (replay)", "right", False),
)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root", file=sys.stderr)
        return 1
    for tool in ("pamtester", "useradd", "chpasswd"):
        if shutil.which(tool, path=CLEAN_ENV["PATH"]) is None:
            print(f"demo: {tool} is missing (make demo installs pamtester)", file=sys.stderr)
            return 1
    if not LINKUSD.exists():
        print(f"demo: {LINKUSD} missing; run `make install` first", file=sys.stderr)
        return 1
    tag = secrets.token_hex(4)
    user, service = f"linkus-demo-{tag}", f"linkus-demo-{tag}"
    workdir = Path(f"/run/linkus-demo-{tag}")
    pam_file = Path("/etc/pam.d", service)
    daemon: subprocess.Popen[bytes] | None = None
    user_made = False
    try:
        _show_system_daemon()
        workdir.mkdir(mode=0o711)  # pamtester (root) must reach the socket; nobody may list or write
        (workdir / "state").mkdir(mode=0o700)
        run_dir = workdir / "run"
        run_dir.mkdir(mode=0o755)  # pam_linkus.so refuses a socket in a directory others can write
        password = secrets.token_urlsafe(12)
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True,
                       env=CLEAN_ENV)
        user_made = True
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True, env=CLEAN_ENV)
        secret = generate_secret()
        config, extensions = workdir / "pam_linkus.yaml", workdir / "extensions.yaml"
        _write_private(config, f"sources: [yaml]\nyaml: {{path: {extensions}}}\n"
                               f"state: {{path: {workdir}/state/state.db}}\n"
                               f"email: {{key_file: {workdir}/state/email.key}}\n...\n")
        _write_private(extensions, f'extensions:\n  "{user}":\n    method: totp\n    secret: {secret}\n...\n')
        socket_path = run_dir / "pam.sock"
        with open(workdir / "linkusd.log", "wb") as log:  # the child keeps its own copy of the descriptor
            daemon = subprocess.Popen(
                [str(LINKUSD), "--foreground", "--no-web", "--config", str(config), "--pam-socket", str(socket_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=CLEAN_ENV,
            )
        _wait_ready(daemon, str(socket_path), workdir)
        pam_file.write_text(
            "# pam-linkus demo (make demo); removed when the demo ends\n"
            "auth requisite pam_unix.so nodelay\n"
            f"auth [success=ok ignore=ignore default=die] pam_linkus.so socket={socket_path}\n"
            "account required pam_permit.so\n"
        )
        uri = provisioning_uri(secret, user, "pam-linkus demo")
        print(f"Demo extension {user!r} enrolled with TOTP (SHA1, 6 digits, 30 s) in a private linkusd.")
        print("  otpauth URI:", uri)
        _show_qr(uri)
        code = totp(decode_secret(secret), time.time())
        answers = {"right": code, "wrong": f"{(int(code) + 500_000) % 1_000_000:06d}"}
        ok = True
        for label, which, must_pass in STEPS:
            result = subprocess.run(["pamtester", service, user, "authenticate"],
                                    input=f"{password}\n{answers[which]}\n", capture_output=True, text=True,
                                    timeout=60, check=False, env=CLEAN_ENV, cwd="/")
            passed = result.returncode == 0
            text = result.stdout + result.stderr
            prompts = " / ".join(p.strip() for p in ("Password:", "Authentication code:") if p in text)
            said = text.rsplit("pamtester: ", 1)[-1].splitlines()[0] if "pamtester: " in text else "(no verdict)"
            verdict = "as expected" if passed == must_pass else "UNEXPECTED"
            ok &= passed == must_pass
            print(f"  {label:<27} {answers[which]} -> {'accepted' if passed else 'refused':<8} "
                  f"[{verdict}]  prompts: {prompts}; pamtester: {said}")
        print("Demo", "passed." if ok else "FAILED.")
        if not ok:
            print((workdir / "linkusd.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        return 0 if ok else 1
    finally:
        pam_file.unlink(missing_ok=True)
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        if user_made:
            subprocess.run(["userdel", user], capture_output=True, check=False, env=CLEAN_ENV)
        shutil.rmtree(workdir, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    """A root-only file, made so (no window with a wider mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _wait_ready(daemon: subprocess.Popen[bytes], socket_path: str, workdir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            log = (workdir / "linkusd.log").read_text(errors="replace")
            raise SystemExit(f"demo: linkusd exited {daemon.returncode}:\n{log[-3000:]}")
        try:
            call_control(socket_path, timeout=2)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the demo linkusd did not become ready")


def _show_system_daemon() -> None:
    """What `make install` started, as `linkus-2fa status` would show it."""
    try:
        status = call_control(SYSTEM_SOCKET, timeout=5)
    except OSError as exc:
        print(f"System linkusd ({SYSTEM_SOCKET}): not answering ({type(exc).__name__}); "
              "logins through pam_linkus.so on this host would be refused.")
        return
    state = "serving" if status.get("loaded") else f"no valid configuration: {status.get('last_error')}"
    print(f"System linkusd ({SYSTEM_SOCKET}): {state}.")


def _show_qr(uri: str) -> None:
    try:
        import segno
    except ImportError:
        return
    segno.make(uri, error="m").terminal(compact=True)


if __name__ == "__main__":
    sys.exit(main())
