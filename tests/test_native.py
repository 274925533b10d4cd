"""The native PAM module native/pam_linkus.so against a fake linkusd (tests/fake_daemon.py).

Real libpam with throwaway /etc/pam.d/linkus-test-<hex> services loading the module by absolute path,
driven by pamtester, by python-pam in-process, and by native/tests/driver (under valgrind). Hostile
daemons must end in PAM_AUTHINFO_UNAVAIL with the module's own log line, never a crash or a success.
pamtester exits 1 both for "denied" and "module did not load": the tests assert on its message, the
fake daemon's record and the log line, not only on the exit code.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import struct
import subprocess
import syslog
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, REPO, LogCatcher, require_root
from fake_daemon import (
    ANSWER,
    RESULT,
    SPLIT,
    START,
    FakeDaemon,
    encode_frame,
    info,
    prompt,
    result,
)

NATIVE = REPO / "native"
SO = NATIVE / "pam_linkus.so"
ASAN_SO = NATIVE / "pam_linkus-asan.so"
CANARY_SO = NATIVE / "pam_linkus-canary.so"
DRIVER = NATIVE / "tests" / "driver"
CODE = "424242"


def pam_constants() -> dict[str, int]:
    """The real PAM return codes, read from libpam's header (no copies of the numbers here)."""
    text = Path("/usr/include/security/_pam_types.h").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define (PAM_[A-Z_]+)\s+(\d+)\b", text)}


PAM = pam_constants()
#: pamtester's message (pam_strerror) for each code a login here can end in.
MESSAGES = {
    "PAM_SUCCESS": "successfully authenticated",
    "PAM_AUTH_ERR": "Authentication failure",
    "PAM_MAXTRIES": "Have exhausted maximum number of retries",
    "PAM_AUTHINFO_UNAVAIL": "Authentication service cannot retrieve authentication info",
    "PAM_CONV_ERR": "Conversation error",
    "PAM_PERM_DENIED": "Permission denied",  # every module said PAM_IGNORE
}
UNAVAIL = MESSAGES["PAM_AUTHINFO_UNAVAIL"]


@pytest.fixture(scope="session")
def native_build() -> None:
    require_root()
    if shutil.which("gcc") is None or not Path("/usr/include/security/pam_modules.h").exists():
        pytest.fail("gcc and libpam0g-dev must be installed (make deps-test installs them)")
    run = subprocess.run(["make", "-s", "-C", str(NATIVE), "all"], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


class Native:
    """One throwaway service, a socket directory (root, 0700), a fake daemon and a log catcher."""

    def __init__(self, root: Path, log: LogCatcher):
        self.root = root
        self.log = log
        self.sock = root / "pam.sock"
        self.service = f"linkus-test-{secrets.token_hex(4)}"
        self.daemons: list[FakeDaemon] = []
        self.daemon: FakeDaemon | None = None

    def start(self, behaviour: dict[str, Any], *, peer_uid: int | None = None) -> FakeDaemon:
        self.daemon = FakeDaemon(self.sock, behaviour, peer_uid=peer_uid)
        self.daemons.append(self.daemon)
        return self.daemon

    def restart(self, behaviour: dict[str, Any]) -> FakeDaemon:
        """Replace the running fake daemon (if any) by one with another behaviour."""
        if self.daemon is not None:
            self.daemon.stop()
            self.sock.unlink(missing_ok=True)
        return self.start(behaviour)

    def module(self, options: str = "", *, so: Path = SO, timeout: int = 2) -> str:
        return f"{so} socket={self.sock} log_socket={self.log.path} timeout={timeout} {options}".strip()

    def configure(self, options: str = "", *, so: Path = SO, timeout: int = 2, raw: str | None = None) -> None:
        """The service: one pam_linkus line (``raw``: its arguments exactly as given)."""
        args = raw if raw is not None else self.module(options, so=so, timeout=timeout)
        self.write(f"auth [success=ok ignore=ignore default=die] {args}\n")

    def write(self, auth_lines: str) -> None:
        Path("/etc/pam.d", self.service).write_text(auth_lines + "account required pam_permit.so\n")

    def pamtester(self, user: str, *answers: str, ops: tuple[str, ...] = ("authenticate",),
                  items: tuple[str, ...] = (), env: dict[str, str] | None = None,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = ["pamtester", *(f"-I{item}" for item in items), self.service, user, *ops]
        return subprocess.run(cmd, input="".join(a + "\n" for a in answers), capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)

    def driver(self, user: str, *answers: str, count: int = 1, silent: bool = False,
               wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return run_driver([self.case(user, *answers, count=count, silent=silent)], wrap=wrap)

    def case(self, user: str, *answers: str, count: int = 1, silent: bool = False) -> DriverCase:
        return DriverCase(self.service, user, answers, count, silent)

    def connections(self, wait_for: int = 0, timeout: float = 10.0) -> list[dict[str, Any]]:
        assert self.daemon is not None
        return self.daemon.connections(wait_for, timeout)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        Path("/etc/pam.d", self.service).unlink(missing_ok=True)


@pytest.fixture
def native(native_build: None, private_dir: Path, log_catcher: LogCatcher) -> Iterator[Native]:
    stack = Native(private_dir, log_catcher)
    yield stack
    stack.close()


def assert_message(run: subprocess.CompletedProcess[str], code: str) -> None:
    assert run.returncode == (0 if code == "PAM_SUCCESS" else 1), run
    assert MESSAGES[code] in run.stdout + run.stderr, run


@dataclass(frozen=True)
class DriverCase:
    """COUNT logins of USER through SERVICE by native/tests/driver, answering each with ANSWERS."""

    service: str
    user: str
    answers: tuple[str, ...] = ()
    count: int = 1
    silent: bool = False

    def args(self) -> list[str]:
        return [*(["-s"] if self.silent else []), "-n", str(self.count), self.service, self.user, *self.answers]


@dataclass(frozen=True)
class DriverResult:
    """One case's PAM codes (code -> how many), and the descriptors open after its first and last login."""

    codes: dict[int, int]
    fds_first: str
    fds_last: str


def run_driver(cases: list[DriverCase], *, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """All ``cases`` in one driver process (under ``wrap``, e.g. valgrind: one start-up for all)."""
    args: list[str] = []
    for case in cases:
        args += [*(["--"] if args else []), *case.args()]
    return subprocess.run([*wrap, str(DRIVER), *args], capture_output=True, text=True, timeout=600, check=False)


def driver_results(run: subprocess.CompletedProcess[str]) -> list[DriverResult]:
    assert run.returncode == 0, run
    results = []
    for block in re.split(r"^case \d+: .*\n", run.stdout, flags=re.M)[1:]:
        codes = {int(m[1]): int(m[2]) for m in re.finditer(r"^code (\d+): (\d+)$", block, re.M)}
        fds = dict(re.findall(r"^fds (first|last):(.*)$", block, re.M))
        results.append(DriverResult(codes, fds["first"], fds["last"]))
    return results


def driver_codes(run: subprocess.CompletedProcess[str]) -> dict[int, int]:
    """The PAM codes of a driver run of one case."""
    (only,) = driver_results(run)
    return only.codes


# ------------------------------------------------------------------ outcomes


@pytest.mark.parametrize(("outcome", "code"), [
    ("skip", "PAM_IGNORE"), ("denied", "PAM_AUTH_ERR"), ("locked", "PAM_MAXTRIES"),
    ("unavailable", "PAM_AUTHINFO_UNAVAIL"), ("conversation", "PAM_CONV_ERR"),
])
def test_outcome_maps_to_pam_code(native: Native, outcome: str, code: str) -> None:
    native.start({"kind": "outcome", "outcome": outcome})
    native.configure()
    run = native.pamtester("root")
    # Only this module on the stack: PAM_IGNORE leaves libpam with nothing, which it turns into PERM_DENIED.
    assert_message(run, "PAM_PERM_DENIED" if code == "PAM_IGNORE" else code)
    expected = PAM["PAM_PERM_DENIED"] if code == "PAM_IGNORE" else PAM[code]
    assert driver_codes(native.driver("root")) == {expected: 1}
    assert [c["frames"][0].type for c in native.connections(2)] == [START, START]


@pytest.mark.parametrize(("outcome", "code"), [
    ("success", "PAM_SUCCESS"), ("skip", "PAM_PERM_DENIED"), ("denied", "PAM_AUTH_ERR"),
    ("locked", "PAM_MAXTRIES"), ("unavailable", "PAM_AUTHINFO_UNAVAIL"), ("conversation", "PAM_CONV_ERR"),
])
def test_outcome_in_process_python_pam(native: Native, outcome: str, code: str) -> None:
    """The same mapping through python-pam (ctypes, in this process); skip is PERM_DENIED alone on the stack."""
    import pam
    native.start({"kind": "outcome", "outcome": outcome})
    native.configure()
    auth = pam.pam()
    assert auth.authenticate("root", CODE, service=native.service, resetcreds=False) is (code == "PAM_SUCCESS")
    assert auth.code == PAM[code]


def test_skip_is_ignore_not_success(native: Native) -> None:
    """With a module after it, skip lets the stack decide: PAM_IGNORE, never PAM_SUCCESS on its own."""
    native.start({"kind": "outcome", "outcome": "skip"})
    native.write(f"auth [success=ok ignore=ignore default=die] {native.module()}\nauth required pam_permit.so\n")
    assert_message(native.pamtester("root"), "PAM_SUCCESS")
    native.write(f"auth [success=ok ignore=ignore default=die] {native.module()}\nauth required pam_deny.so\n")
    assert_message(native.pamtester("root"), "PAM_AUTH_ERR")


def test_good_conversation_success_and_wrong_code(native: Native) -> None:
    native.start({"kind": "good", "code": CODE, "infos": [[4, "A code is on its way"]]})
    native.configure()
    run = native.pamtester("root", CODE)
    assert_message(run, "PAM_SUCCESS")
    assert "Verification code: " in run.stderr and "A code is on its way" in run.stdout + run.stderr
    assert_message(native.pamtester("root", "000000"), "PAM_AUTH_ERR")
    good, bad = native.connections(2)
    assert good["error"] == bad["error"] == ""
    assert [f.type for f in good["frames"]] == [START, ANSWER]
    assert good["frames"][1].fields["TEXT"] == CODE.encode()
    assert bad["frames"][1].fields["TEXT"] == b"000000"


def test_python_pam_in_process(native: Native) -> None:
    """python-pam calls libpam through ctypes in this very process; it must work (and not crash)."""
    import pam
    native.start({"kind": "good", "code": CODE})
    native.configure()
    auth = pam.pam()
    assert auth.authenticate("root", CODE, service=native.service, resetcreds=False) is True
    assert auth.code == PAM["PAM_SUCCESS"]
    assert auth.authenticate("root", "111111", service=native.service, resetcreds=False) is False
    assert auth.code == PAM["PAM_AUTH_ERR"]


def test_start_fields_items_flags_and_options(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure("profile=web.portal-1 echo_code [prompt=Your code, please: ] debug")
    run = native.pamtester("root", CODE, items=("rhost=192.0.2.7", "tty=pts/9", "ruser=alice"),
                           ops=("authenticate(PAM_SILENT)",))
    assert run.returncode == 0, native.log.take()
    start = native.connections(1)[0]["frames"][0]
    fields = dict(start.fields)
    assert len(fields.pop("DEADLINE")) == 9  # test_start_and_answer_carry_the_give_up_deadline
    assert fields == {
        "MODE": b"\x01", "USER": b"root", "SERVICE": native.service.encode(), "PROFILE": b"web.portal-1",
        "RHOST": b"192.0.2.7", "TTY": b"pts/9", "RUSER": b"alice", "FLAGS": (0b11).to_bytes(4, "big"),
        "PROMPT": b"Your code, please: ",
    }


def test_info_skipped_under_pam_silent_and_error_style(native: Native) -> None:
    native.start({"kind": "good", "code": CODE, "infos": [[3, "mail server slow"], [4, "code sent"]]})
    native.configure()
    loud = native.pamtester("root", CODE)
    assert "mail server slow" in loud.stderr and "code sent" in loud.stdout  # PAM_ERROR_MSG vs PAM_TEXT_INFO
    quiet = native.pamtester("root", CODE, ops=("authenticate(PAM_SILENT)",))
    assert_message(quiet, "PAM_SUCCESS")
    assert "mail server slow" not in quiet.stdout + quiet.stderr and "code sent" not in quiet.stdout + quiet.stderr
    assert native.connections(2)[1]["frames"][0].fields["FLAGS"] == b"\x00\x00\x00\x01"


def test_timeout_never_applies_to_the_person(native: Native) -> None:
    """timeout= bounds each frame from the daemon; a person may take longer than that to answer."""
    native.start({"kind": "good", "code": CODE})
    native.configure(timeout=1)
    proc = subprocess.Popen(["pamtester", native.service, "root", "authenticate"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.5)  # a real process and a real person: nothing to inject a clock into
        out, err = proc.communicate(CODE + "\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and MESSAGES["PAM_SUCCESS"] in out, (out, err)


def test_answer_over_256_bytes_is_cut_to_257(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure()
    assert_message(native.pamtester("root", "9" * 600), "PAM_AUTH_ERR")
    assert native.connections(1)[0]["frames"][1].fields["TEXT"] == b"9" * 257


def test_no_answer_when_the_conversation_fails(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure()
    # The driver has no answer to give: its conversation fails, the module sends NO_ANSWER.
    assert driver_codes(native.driver("root")) == {PAM["PAM_CONV_ERR"]: 1}
    frames = native.connections(1)[0]["frames"]
    assert [f.type for f in frames] == [START, 0x03]


def test_sixteen_prompts_are_allowed(native: Native) -> None:
    native.start({"kind": "good", "code": CODE, "infos": [[4, f"line {i}"] for i in range(15)]})
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_SUCCESS")


def test_setcred_and_other_entry_points_are_ignore(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure()
    # Alone on the stack, PAM_IGNORE from setcred leaves libpam with PERM_DENIED ...
    run = native.pamtester("root", CODE, ops=("authenticate", "setcred"))
    assert "successfully authenticated" in run.stdout and MESSAGES["PAM_PERM_DENIED"] in run.stderr, run
    # ... and with pam_permit after it the stack succeeds: it was neither a success nor a failure.
    native.write(f"auth [success=ok ignore=ignore default=die] {native.module()}\nauth required pam_permit.so\n")
    assert_message(native.pamtester("root", CODE, ops=("authenticate", "setcred")), "PAM_SUCCESS")
    assert len(native.connections(2, timeout=1)) == 2  # setcred contacted nobody


# ------------------------------------------------------------------ hostile daemons


def raw(data: bytes, then: str = "close") -> dict[str, Any]:
    return {"kind": "raw", "send": data.hex(), "then": then}


GOOD_RESULT = result("success")
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "truncated frame": (raw(GOOD_RESULT[:7]), "closed the connection before its result"),
    "truncated header": (raw(GOOD_RESULT[:2]), "closed the connection before its result"),
    "length over 4096": (raw(struct.pack(">I", 4097) + b"\x01\x20" + b"\0" * 64, "hold"), "frame length 4097"),
    "length under 2": (raw(struct.pack(">I", 1) + b"\x01", "hold"), "frame length 1 "),
    "wrong version": (raw(encode_frame(RESULT, [("OUTCOME", 0)], version=2)), "version 2"),
    "unknown type": (raw(encode_frame(0x7F, [("OUTCOME", 0)])), "unknown message type 0x7f"),
    "client type from daemon": (raw(encode_frame(START, [("MODE", 1)])), "unknown message type 0x01"),
    "unknown field": (raw(encode_frame(RESULT, [("OUTCOME", 0), (0x30, b"x")])), "field 0x30 not allowed"),
    "field of another type": (raw(encode_frame(RESULT, [("OUTCOME", 0), ("TEXT", "hi")])),
                              "field 0x0a not allowed in RESULT"),
    "duplicate field": (raw(encode_frame(RESULT, [("OUTCOME", 0), ("OUTCOME", 0)])), "repeated"),
    "overrunning field": (raw(encode_frame(RESULT, raw_fields=b"\x0c\x00\x09\x00")), "field 0x0c overruns"),
    "truncated field header": (raw(encode_frame(RESULT, [("OUTCOME", 0)], raw_fields=b"\x0c\x00")),
                               "truncated field header"),
    "missing field": (raw(encode_frame(RESULT)), "RESULT without a required field"),
    "outcome of two bytes": (raw(encode_frame(RESULT, [("OUTCOME", b"\0\0")])), "field 0x0c of 2 bytes"),
    "unknown outcome": (raw(result(9)), "unknown outcome 9"),
    "huge text": (raw(prompt("x" * 513)), "field 0x0a of 513 bytes"),
    "prompt style of an info": (raw(prompt("Code: ", style=3)), "style 3 in PROMPT"),
    "info style of a prompt": (raw(info("hello", style=1)), "style 1 in INFO"),
    "NUL in text": (raw(prompt("Co\0de: ")), "NUL in the text"),
    "split in authenticate mode": (raw(encode_frame(SPLIT, [("DIGITS", 6)])), "unexpected SPLIT"),
    "too many prompts": (raw(b"".join(info(f"line {i}") for i in range(17)) + GOOD_RESULT), "more than 16 prompts"),
    "garbage": (raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "hold"), "out of range"),
    "silence": (raw(b"", "hold"), "no whole frame within the timeout"),
    "never reads START": ({"kind": "no_read"}, "no whole frame within the timeout"),
    "slow drip of a success": ({"kind": "drip", "send": GOOD_RESULT.hex(), "interval": 0.4},
                               "no whole frame within the timeout"),
    "close mid-conversation": ({"kind": "close_after_prompt"}, "closed the connection before its result"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_daemon_is_unavailable(native: Native, case: str) -> None:
    behaviour, needle = HOSTILE[case]
    native.start(behaviour)
    native.configure()
    started = time.monotonic()
    run = native.pamtester("root", CODE)
    assert_message(run, "PAM_AUTHINFO_UNAVAIL")
    assert time.monotonic() - started < 10
    line = native.log.wait_for(needle)
    assert f"pam_linkus({native.service}:auth)[" in line
    assert line.startswith(f"<{syslog.LOG_AUTHPRIV | syslog.LOG_ERR}>")


def make_socket_dir(native: Native) -> Path:
    """A socket directory of its own, so its owner and mode can be spoiled."""
    sub = native.root / "run"
    sub.mkdir(mode=0o755)
    native.sock = sub / "pam.sock"
    return sub


def test_daemon_absent(native: Native) -> None:
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for(f"linkusd unavailable: {native.sock}: No such file")


def test_nobody_listening(native: Native) -> None:
    native.start({"kind": "good"}).stop()  # the socket file stays, nobody accepts
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("Connection refused")


def test_hung_daemon_that_never_accepts(native: Native) -> None:
    """One connection waits in the backlog (no frame comes), the next finds it full: both time out."""
    native.start({"kind": "no_accept"})
    native.configure(timeout=1)
    started = time.monotonic()
    assert driver_codes(native.driver("root", CODE, count=2)) == {PAM["PAM_AUTHINFO_UNAVAIL"]: 2}
    assert time.monotonic() - started < 8
    native.log.wait_for("no whole frame within the timeout")
    native.log.wait_for("Resource temporarily unavailable")


def test_overlong_user_name_is_refused(native: Native) -> None:
    """Checked before connecting: linkusd never sees the login, which leaves exactly one line, the module's."""
    native.start({"kind": "good", "code": CODE})
    native.configure()
    assert_message(native.pamtester("u" * 300, CODE, items=("rhost=192.0.2.52",)), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("rhost=192.0.2.52")
    [line] = native.log.take()
    assert "outcome=\"unavailable\" reason=\"a PAM item (user, service, rhost, tty or ruser) is too long\"" in line
    assert native.connections(1, timeout=0.5) == []  # not even connected


@pytest.mark.parametrize("after", [0.0, 0.3])
def test_a_connection_turned_away_is_said_so_in_the_logins_one_line(native: Native, after: float) -> None:
    """linkusd closes a caller it turns away at once (before or after our START arrived: EPIPE, EOF or a
    reset here): one line, whose reason says so, not a timeout or a broken pipe."""
    native.start({"kind": "turn_away", "after": after})
    native.configure()
    run = native.pamtester("root", CODE, items=("rhost=192.0.2.53",))
    assert_message(run, "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("rhost=192.0.2.53")
    [line] = native.log.take()
    assert 'outcome="unavailable" reason="linkusd turned the connection away' in line, line


def test_socket_not_owned_by_root(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    os.chown(native.sock, 65534, 65534)
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("not a socket owned by root")
    assert native.connections(1, timeout=0.5) == []


def test_regular_file_instead_of_socket(native: Native) -> None:
    native.sock.write_text("")
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("not a socket owned by root")


def test_symlinked_socket(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    link = native.root / "link.sock"
    link.symlink_to(native.sock)
    real, native.sock = native.sock, link
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("it is a symlink")
    native.sock = real
    assert native.connections(1, timeout=0.5) == []


@pytest.mark.parametrize(("mode", "owner"), [(0o775, 0), (0o757, 0), (0o755, 65534)])
def test_untrusted_socket_directory(native: Native, mode: int, owner: int) -> None:
    sub = make_socket_dir(native)
    native.start({"kind": "good", "code": CODE})
    os.chmod(sub, mode)
    os.chown(sub, owner, 0)
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("its directory is not a root-owned directory")
    assert native.connections(1, timeout=0.5) == []


def test_peer_not_root(native: Native) -> None:
    """The socket file is root's (bound as root), but the process that listens runs as nobody."""
    native.start({"kind": "good", "code": CODE}, peer_uid=65534)
    assert native.sock.stat().st_uid == 0
    native.configure()
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("the peer runs as uid 65534, not root")
    # The module hung up before START.
    assert [c["frames"] for c in native.connections(1)] == [[]]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(("args", "needle"), [
    ("bogus", "unknown option bogus"),
    ("x" * 100, "unknown option " + "x" * 40 + "\n"),
    ("bogus\x01x", "unknown option bogus\\x01x"),
    ("debug=1", "option debug takes no value"),
    ("timeout", "option timeout= needs a value"),
    ("timeout=", "option timeout= needs a value"),
    ("timeout=0", "needs whole seconds 1..300"),
    ("timeout=301", "needs whole seconds 1..300"),
    ("timeout=-5", "needs whole seconds 1..300"),
    ("timeout=1s", "needs whole seconds 1..300"),
    ("socket=run/pam.sock", "option socket= needs an absolute path"),
    ("socket=/" + "a" * 120, "option socket= needs an absolute path"),
    ("profile=a/b", "option profile= needs 1..64"),
    ("profile=" + "p" * 65, "option profile= needs 1..64"),
    ("prompt=" + "p" * 201, "option prompt= is longer than 200 bytes"),
    ("debug debug", "option debug given twice"),
    ("config=/etc/pam_linkus/pam_linkus.yaml",
     "config belongs to the old pam_python module: run linkus-2fa migrate-pam"),
    ("cache_dir=/var/cache/x", "cache_dir belongs to the old pam_python module"),
])
def test_bad_option_refuses_the_login(native: Native, args: str, needle: str) -> None:
    native.start({"kind": "good", "code": CODE})
    socket_arg = "" if args.startswith("socket=") else f"socket={native.sock}"
    native.configure(raw=f"{SO} log_socket={native.log.path} {socket_arg} {args}")
    assert_message(native.pamtester("root", CODE), "PAM_AUTHINFO_UNAVAIL")
    line = native.log.wait_for("refusing the login: ") + "\n"
    assert needle in line
    assert native.connections(1, timeout=0.5) == []


def test_bad_option_before_log_socket_still_logs_there(native: Native) -> None:
    native.configure(raw=f"{SO} bogus log_socket={native.log.path}")
    assert_message(native.pamtester("root"), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("unknown option bogus")


def test_debug_logs_frames_never_the_code(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure("debug")
    assert_message(native.pamtester("root", CODE), "PAM_SUCCESS")
    native.log.wait_for("outcome 0")
    lines = native.log.take()
    assert any(f"connecting to {native.sock}" in x for x in lines)
    assert any("received PROMPT" in x for x in lines) and any("sent ANSWER" in x for x in lines)
    assert lines and all(CODE not in x.split("]: ", 1)[1] for x in lines), lines
    assert all(x.startswith(f"<{syslog.LOG_AUTHPRIV | syslog.LOG_DEBUG}>") for x in lines)


# ------------------------------------------------------------------ single-field mode


def single_field_stack(native: Native, first: str = "") -> None:
    native.write(
        f"auth [success=ok ignore=ignore default=die] {native.module('forward_pass ' + first, timeout=5)}\n"
        "auth requisite pam_unix.so use_first_pass nodelay\n"
        f"auth [success=ok ignore=ignore default=die] {native.module(timeout=5)}\n"
    )


def all_client_bytes(native: Native, count: int) -> bytes:
    return b"".join(v for c in native.connections(count) for f in c["frames"] for v in f.fields.values())


def test_forward_pass_splits_and_sends_the_code_after_the_password(native: Native, user: str) -> None:
    native.start({"kind": "good", "code": CODE, "digits": 6, "split_text": "Password then code: "})
    single_field_stack(native)
    run = native.pamtester(user, PASSWORD + CODE)
    assert_message(run, "PAM_SUCCESS")
    assert "Password then code: " in run.stderr
    first, second = native.connections(2)
    assert [f.type for f in first["frames"]] == [START] and first["frames"][0].fields["MODE"] == b"\x02"
    assert "KEPT" not in first["frames"][0].fields
    assert [f.type for f in second["frames"]] == [START]
    assert second["frames"][0].fields["MODE"] == b"\x01" and second["frames"][0].fields["KEPT"] == CODE.encode()
    assert PASSWORD.encode() not in all_client_bytes(native, 2)


def test_forward_pass_wrong_password_never_reaches_the_code_check(native: Native, user: str) -> None:
    native.start({"kind": "good", "code": CODE, "digits": 6})
    single_field_stack(native)
    assert_message(native.pamtester(user, "not-the-password" + CODE), "PAM_AUTH_ERR")
    time.sleep(0.3)  # the daemon records a connection when it closes; no second one may come
    conns = native.connections(1)
    assert len(conns) == 1 and conns[0]["frames"][0].fields["MODE"] == b"\x02"
    assert b"not-the-password" not in all_client_bytes(native, 1)


def test_forward_pass_wrong_code(native: Native, user: str) -> None:
    native.start({"kind": "good", "code": CODE, "digits": 6})
    single_field_stack(native, "[prompt=Password and code: ]")
    run = native.pamtester(user, PASSWORD + "999999")
    assert_message(run, "PAM_AUTH_ERR")
    assert "Password and code: " in run.stderr
    assert native.connections(2)[1]["frames"][0].fields["KEPT"] == b"999999"


def test_forward_pass_answer_not_longer_than_the_code(native: Native, user: str) -> None:
    """Only a code typed: PAM_AUTHTOK becomes empty (pam_unix refuses it) and no code is checked."""
    native.start({"kind": "good", "code": CODE, "digits": 6})
    single_field_stack(native)
    assert_message(native.pamtester(user, CODE), "PAM_AUTH_ERR")
    time.sleep(0.3)
    assert len(native.connections(1)) == 1


def test_forward_pass_zero_digits_whole_answer_is_the_password(native: Native, user: str) -> None:
    native.start({"kind": "good", "code": CODE, "digits": 0})
    single_field_stack(native)
    run = native.pamtester(user, PASSWORD)  # one answer; the second line does not prompt
    assert_message(run, "PAM_SUCCESS")
    second = native.connections(2)[1]
    assert second["frames"][0].fields["KEPT"] == b""  # an empty code marks the login single-field
    assert [f.type for f in second["frames"]] == [START]
    assert PASSWORD.encode() not in all_client_bytes(native, 2)


def test_forward_pass_uses_an_existing_authtok_and_daemon_down_is_unavailable(native: Native, user: str) -> None:
    native.write(
        "auth required pam_unix.so nodelay\n"  # sets PAM_AUTHTOK to the password only
        f"auth [success=ok ignore=ignore default=die] {native.module('forward_pass')}\n"
    )
    assert_message(native.pamtester(user, PASSWORD), "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("linkusd unavailable")


# ------------------------------------------------------------------ build, valgrind, sanitizers


def test_build_is_hardened(native_build: None) -> None:
    dynamic = subprocess.run(["readelf", "-d", str(SO)], capture_output=True, text=True, check=True).stdout
    assert "BIND_NOW" in dynamic or re.search(r"FLAGS_1.*\bNOW\b", dynamic)
    headers = subprocess.run(["readelf", "-lW", str(SO)], capture_output=True, text=True, check=True).stdout
    assert "GNU_RELRO" in headers
    stack = next(line for line in headers.splitlines() if "GNU_STACK" in line)
    assert "RWE" not in stack
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(SO)], capture_output=True, text=True,
                             check=True).stdout
    imported = set(re.findall(r"UND (\w+)", symbols))
    assert "__stack_chk_fail" in imported and any(s.endswith("_chk") for s in imported - {"__stack_chk_fail"})
    forbidden = {"getenv", "secure_getenv", "execve", "execv", "execvp", "execl", "system", "popen", "openlog",
                 "syslog", "vsyslog", "dlopen", "pam_syslog", "pam_vsyslog"}
    assert not imported & forbidden
    if shutil.which("hardening-check"):
        check = subprocess.run(["hardening-check", str(SO)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout


def test_valgrind_many_transactions(native: Native, user: str) -> None:
    """Every path of the module under memcheck: no error, no definite leak, and no descriptor left
    open from one login to the next -- a good conversation (with an info, silent or not), a wrong
    over-long answer, no answer, hostile daemons, a daemon silent past the timeout, single-field
    mode and a bad option. All cases run in ONE valgrind process, each through its own service and
    fake daemon, several logins each (a fault of a later login, e.g. state kept from the first,
    shows too); a valgrind start-up per case was most of this test's time (issue 19 item 10)."""
    valgrind = ("valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite")
    stacks: list[Native] = []

    def stack(behaviour: dict[str, Any] | None) -> Native:
        """Another service in the same private directory, with its own fake daemon (None: no daemon)."""
        root = native.root / f"case{len(stacks)}"
        root.mkdir(mode=0o700)
        stacks.append(Native(root, native.log))
        if behaviour is not None:
            stacks[-1].start(behaviour)
        return stacks[-1]

    try:
        good = stack({"kind": "good", "code": CODE, "infos": [[4, "info"]]})
        good.configure()
        cases = [
            (good.case(user, CODE, count=20), {PAM["PAM_SUCCESS"]: 20}),
            (good.case(user, "1" * 300, count=5), {PAM["PAM_AUTH_ERR"]: 5}),
            (good.case(user, count=5), {PAM["PAM_CONV_ERR"]: 5}),  # NO_ANSWER
            (good.case(user, CODE, count=5, silent=True), {PAM["PAM_SUCCESS"]: 5}),
        ]
        for name in ("garbage", "too many prompts", "duplicate field", "huge text", "close mid-conversation",
                     "truncated frame"):
            hostile = stack(HOSTILE[name][0])
            hostile.configure()
            cases.append((hostile.case(user, CODE, count=3), {PAM["PAM_AUTHINFO_UNAVAIL"]: 3}))
        silent = stack(HOSTILE["silence"][0])
        silent.configure(timeout=1)
        cases.append((silent.case(user, CODE, count=2), {PAM["PAM_AUTHINFO_UNAVAIL"]: 2}))
        # pam_unix hashes the password in each of these: the dearest logins under valgrind
        single = stack({"kind": "good", "code": CODE, "digits": 6})
        single_field_stack(single)
        cases.append((single.case(user, PASSWORD + CODE, count=3), {PAM["PAM_SUCCESS"]: 3}))
        cases.append((single.case(user, "wrong" + CODE, count=2), {PAM["PAM_AUTH_ERR"]: 2}))
        bogus = stack(None)
        bogus.configure(raw=f"{SO} log_socket={native.log.path} bogus")
        cases.append((bogus.case(user, count=3), {PAM["PAM_AUTHINFO_UNAVAIL"]: 3}))

        done = run_driver([case for case, _ in cases], wrap=valgrind)
        assert done.returncode == 0, done.stderr[-3000:]
        results = driver_results(done)
        assert [result.codes for result in results] == [codes for _, codes in cases]
        for (case, _), result in zip(cases, results, strict=True):
            assert result.fds_first == result.fds_last, (case, result)
    finally:
        for other in stacks:
            other.close()


def sanitizer_env() -> dict[str, str]:
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert Path(libasan).exists(), libasan
    # libcrypt too: ASan intercepts crypt() and finds the real one only if it is loaded at startup
    # (pam_unix loads it later, and the interceptor would jump to NULL).
    return {"PATH": "/usr/bin:/bin", "LD_PRELOAD": f"{libasan}:libcrypt.so.1",
            "ASAN_OPTIONS": "exitcode=77:detect_leaks=0:abort_on_error=0",
            "UBSAN_OPTIONS": "halt_on_error=1:exitcode=78:print_stacktrace=1"}


@pytest.mark.parametrize("case", ["good", "wrong code", "no answer", "garbage", "too many prompts",
                                  "duplicate field", "overrunning field", "huge text", "truncated frame",
                                  "NUL in text", "close mid-conversation", "length over 4096"])
def test_sanitizers_clean(native: Native, case: str) -> None:
    behaviour = HOSTILE[case][0] if case in HOSTILE else {"kind": "good", "code": CODE}
    native.start(behaviour)
    native.configure(so=ASAN_SO)
    answers = {"good": (CODE,), "wrong code": ("0" * 400,), "no answer": ()}.get(case, (CODE,))
    run = native.pamtester("root", *answers, env=sanitizer_env())
    assert run.returncode in (0, 1), run.stderr[-3000:]
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-3000:]
    expected = {"good": "PAM_SUCCESS", "wrong code": "PAM_AUTH_ERR", "no answer": "PAM_CONV_ERR"}
    assert_message(run, expected.get(case, "PAM_AUTHINFO_UNAVAIL"))


def test_sanitizers_clean_single_field(native: Native, user: str) -> None:
    native.start({"kind": "good", "code": CODE, "digits": 6})
    native.write(
        f"auth [success=ok ignore=ignore default=die] {native.module('forward_pass', so=ASAN_SO, timeout=5)}\n"
        "auth requisite pam_unix.so use_first_pass nodelay\n"
        f"auth [success=ok ignore=ignore default=die] {native.module(so=ASAN_SO, timeout=5)}\n"
    )
    run = native.pamtester(user, PASSWORD + CODE, env=sanitizer_env())
    assert "Sanitizer" not in run.stderr, run.stderr[-3000:]
    assert_message(run, "PAM_SUCCESS")


def test_sanitizer_catches_the_canary(native: Native) -> None:
    native.start({"kind": "good", "code": CODE})
    native.configure(so=CANARY_SO)
    run = native.pamtester("root", CODE, env=sanitizer_env())
    # UBSan (object size) or ASan, whichever sees the write first; both stop the process.
    caught = {77: "heap-buffer-overflow", 78: "insufficient space for an object"}
    assert run.returncode in caught and caught[run.returncode] in run.stderr, run.stderr[-3000:]
    assert "pam_linkus.c" in run.stderr


# ------------------------------------------------------------------ the local-root hole of pam_python


def test_setuid_caller_cannot_run_code_from_its_path(native: Native, user: str) -> None:
    """The pam_python hole: a setuid program's CPython found its stdlib through the caller's PATH.

    An unprivileged user runs a setuid-root pamtester with a PATH leading to a bin/python3 whose
    lib/python3.11 holds a sitecustomize.py that creates a marker file (and, in a second run, hostile
    PYTHON*/LD_* variables too). With pam_python on the stack (the control, while libpam-python is still
    installed) the marker appears, created by root; with the native module nothing of it runs, and only
    the one code the daemon accepts logs in.
    """
    native.start({"kind": "good", "code": CODE})
    base = Path(f"/tmp/linkus-suid-{secrets.token_hex(6)}")
    if "nosuid" in subprocess.run(["findmnt", "-no", "OPTIONS", "-T", "/tmp"], capture_output=True, text=True,
                                  check=False).stdout:
        base = Path(f"/var/tmp/linkus-suid-{secrets.token_hex(6)}")
    try:
        base.mkdir(mode=0o755)
        tester = base / "pamtester"
        shutil.copy2("/usr/bin/pamtester", tester)
        os.chown(tester, 0, 0)
        os.chmod(tester, 0o4755)
        marker_dir = base / "marker"
        marker_dir.mkdir()
        os.chmod(marker_dir, 0o1777)
        marker = marker_dir / "pwned"
        evil = base / "evil"
        stdlib = evil / "lib" / "python3.11"
        (evil / "bin").mkdir(parents=True)
        stdlib.mkdir(parents=True)
        shutil.copy2("/usr/bin/python3", evil / "bin" / "python3")
        # The stdlib by symlinks, except Debian's sitecustomize.py (a symlink into /etc) and __pycache__
        # (a root CPython would write there): the fake one is created anew, never written through a link.
        for entry in Path("/usr/lib/python3.11").iterdir():
            if entry.name not in ("sitecustomize.py", "usercustomize.py", "__pycache__"):
                (stdlib / entry.name).symlink_to(entry)
        with open(stdlib / "sitecustomize.py", "x") as fake:
            fake.write(f"open({str(marker)!r}, 'w').close()\n")
        path_only = {"PATH": f"{evil / 'bin'}:/usr/bin:/bin"}
        hostile = {**path_only, "PYTHONPATH": str(stdlib), "PYTHONHOME": str(evil),
                   "PYTHONSTARTUP": str(stdlib / "sitecustomize.py"), "LD_LIBRARY_PATH": str(evil / "lib"),
                   "LD_PRELOAD": str(evil / "lib" / "evil.so"), "HOME": str(evil)}
        uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout)
        gid = int(subprocess.run(["id", "-g", user], capture_output=True, text=True, check=True).stdout)

        def login(answer: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(tester), native.service, user, "authenticate"], input=answer + "\n",
                                  capture_output=True, text=True, env=env, user=uid, group=gid,
                                  extra_groups=[], timeout=60, check=False)

        control = Path("/lib/security/pam_python.so").exists()
        if control:
            module = base / "noop.py"
            module.write_text("def pam_sm_authenticate(pamh, flags, argv):\n    return pamh.PAM_IGNORE\n")
            native.write(f"auth optional pam_python.so {module}\n"
                         f"auth [success=ok ignore=ignore default=die] {native.module()}\n")
            assert_message(login(CODE, path_only), "PAM_SUCCESS")
            assert marker.exists() and marker.stat().st_uid == 0, "control: the pam_python hole did not reproduce"
            marker.unlink()

        native.configure()
        for env in (path_only, hostile):
            assert_message(login("000000", env), "PAM_AUTH_ERR")
            assert_message(login(CODE, env), "PAM_SUCCESS")
        starts = [c["frames"][0].fields for c in native.connections(4 + control)]
        assert [s["USER"] for s in starts] == [user.encode()] * (4 + control)  # it went through the module
        assert not marker.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ the shared examples (tests/protocol_examples.py)


def shared_examples() -> Any:
    import protocol_examples

    return protocol_examples


def test_shared_hostile_daemon_frames(native: Native) -> None:
    """Every hostile daemon->client frame of the shared examples ends in PAM_AUTHINFO_UNAVAIL."""
    examples = shared_examples()
    native.configure()
    for name, data in examples.HOSTILE_DAEMON:
        native.restart(raw(data, "hold"))
        assert driver_codes(native.driver("root", CODE)) == {PAM["PAM_AUTHINFO_UNAVAIL"]: 1}, name


def test_shared_good_daemon_frames(native: Native) -> None:
    """The shared good frames: each RESULT, a PROMPT and an INFO before one, and SPLIT for forward_pass."""
    examples = shared_examples()
    expected = {"success": "PAM_SUCCESS", "skip": "PAM_PERM_DENIED", "denied": "PAM_AUTH_ERR",
                "locked": "PAM_MAXTRIES", "unavailable": "PAM_AUTHINFO_UNAVAIL", "conversation": "PAM_CONV_ERR"}
    scripts = [(examples.RESULT[name], expected[name]) for name in examples.RESULT]
    scripts.append((examples.INFO + examples.PROMPT + examples.RESULT["success"], "PAM_SUCCESS"))
    native.configure()
    for data, code in scripts:
        native.restart(raw(data, "hold"))
        assert driver_codes(native.driver("root", CODE)) == {PAM[code]: 1}, data
    native.restart(raw(examples.SPLIT, "hold"))
    native.configure("forward_pass")
    # PAM_IGNORE alone on the stack: PERM_DENIED; the split itself is checked in the single-field tests.
    assert driver_codes(native.driver("root", "pw" + CODE)) == {PAM["PAM_PERM_DENIED"]: 1}


# ------------------------------------------------------------------ issue 17: deadlines, one line per login


@pytest.mark.parametrize("build", ["plain", "asan"])
def test_start_and_answer_carry_the_give_up_deadline(native: Native, build: str) -> None:
    """Issue 17.9: START and ANSWER carry DEADLINE, laid out as tests/protocol_examples.deadline: clock 1,
    then CLOCK_MONOTONIC milliseconds (time.monotonic() here) when the module stops waiting (timeout=2)."""
    examples = shared_examples()
    native.start({"kind": "good", "code": CODE})
    native.configure(timeout=2, so=ASAN_SO if build == "asan" else SO)
    before = time.monotonic()
    run = native.pamtester("root", CODE, env=sanitizer_env() if build == "asan" else None)
    after = time.monotonic()
    assert "Sanitizer" not in run.stderr, run.stderr[-3000:]
    assert_message(run, "PAM_SUCCESS")
    connection = native.connections(1)[0]
    assert connection["error"] == "", connection
    start, answer = connection["frames"][:2]
    sent = []
    for frame in (start, answer):
        raw = frame.fields["DEADLINE"]
        ms = int.from_bytes(raw[1:], "big")
        assert examples.field(0x10, raw) == examples.deadline(ms)
        sent.append(ms / 1000)
    assert before + 2 - 0.01 <= sent[0] <= sent[1] <= after + 2 + 0.01, (before, sent, after)


@pytest.mark.parametrize("build", ["plain", "asan"])
def test_the_module_gives_up_at_the_deadline_it_sent(native: Native, build: str) -> None:
    """Issue 17.9: silence after the ANSWER: the module gives up at the DEADLINE it announced. It writes
    no line of its own for the login: linkusd holds it and ends it with its line (`conversation`)."""
    native.start({"kind": "hold_after_answer", "hold": 10})
    native.configure(timeout=1, so=ASAN_SO if build == "asan" else SO)
    run = native.pamtester("root", CODE, items=("rhost=192.0.2.50",),
                           env=sanitizer_env() if build == "asan" else None)
    done = time.monotonic()
    assert "Sanitizer" not in run.stderr, run.stderr[-3000:]
    assert_message(run, "PAM_AUTHINFO_UNAVAIL")
    answer = native.connections(1)[0]["frames"][1]
    assert int.from_bytes(answer.fields["DEADLINE"][1:], "big") / 1000 <= done
    line = native.log.wait_for("no whole frame within the timeout")
    # attributable even if linkusd never resumes, but no outcome: linkusd's own line has it
    assert f"service={native.service} user=root rhost=192.0.2.50" in line.replace('"', ""), line
    assert not [line for line in native.log.take() if "outcome=" in line]


@pytest.mark.parametrize("build", ["plain", "asan"])
def test_a_login_linkusd_closed_without_result_has_the_modules_line(native: Native, build: str) -> None:
    """Issue 17.10: linkusd closed the connection without a RESULT (it turns refused peers away so): the
    login's one line comes from the module, with service, user, rhost and outcome."""
    native.start({"kind": "close_after_prompt"})
    native.configure(so=ASAN_SO if build == "asan" else SO)
    run = native.pamtester("root", CODE, items=("rhost=192.0.2.51",),
                           env=sanitizer_env() if build == "asan" else None)
    assert "Sanitizer" not in run.stderr, run.stderr[-3000:]
    assert_message(run, "PAM_AUTHINFO_UNAVAIL")
    line = native.log.wait_for("rhost=192.0.2.51")
    assert f"service={native.service} user=root rhost=192.0.2.51 outcome=unavailable" in line, line
    assert len([ln for ln in native.log.take() if "outcome=" in ln]) == 1


def test_undecided_line_quotes_its_values(native: Native) -> None:
    """A user name or rhost cannot forge a field of the module's line (quoted as logline.quote does)."""
    native.configure()  # no daemon at all
    run = native.pamtester('ev" outcome="success', CODE, items=("rhost=a=b\\c",))
    assert_message(run, "PAM_AUTHINFO_UNAVAIL")
    native.log.wait_for("outcome=")
    [line] = [ln for ln in native.log.take() if "outcome=" in ln]
    assert 'user="ev\\x22 outcome\\x3d\\x22success" rhost="a\\x3db\\x5cc" outcome="unavailable"' in line, line


def test_empty_user_name_goes_to_linkusd(native: Native) -> None:
    """Issue 17.10: an empty user name is sent (linkusd refuses it as an invalid name), not dropped here."""
    native.start({"kind": "outcome", "outcome": "denied"})
    native.configure()
    assert_message(native.pamtester("", CODE), "PAM_AUTH_ERR")
    assert native.connections(1)[0]["frames"][0].fields["USER"] == b""
