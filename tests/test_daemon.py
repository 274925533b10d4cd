"""linkusd itself: config loading and reload, peers, caps, hostile clients, restarts, systemd.

These tests talk to the daemon's socket with tests/daemon_client.py (what the C
module does, in Python) where they need control the module does not give; the
same features pass through real PAM in test_pam_*.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import syslog
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import daemon_client as dc
import pytest
from cli_helpers import run_cli
from conftest import DAEMON_PYTHON, PASSWORD, REPO, SECRET, LogCatcher, PamStack, code_at, require_root, stop_process
from plumbing import FLOOD_SCRIPT

from pam_linkus import protocol
from pam_linkus.daemon import transport
from pam_linkus.protocol import Msg


@pytest.fixture
def stack(private_dir: Path, log_catcher: LogCatcher) -> Iterator[PamStack]:
    require_root()
    s = PamStack(private_dir, log_catcher)
    yield s
    s.remove()


def sock(stack: PamStack) -> str:
    return str(stack.daemon.pam_socket)


def login(stack: PamStack, user: str, *answers: str | None, **start: Any) -> dc.Result:
    return dc.converse(sock(stack), user, list(answers), **start)


# -- logins over the socket ----------------------------------------------------------


def test_totp_login_right_wrong_replayed(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    now = time.time()
    code = code_at(SECRET, now)
    assert login(stack, "alice", code).outcome == "success"
    assert login(stack, "alice", code).outcome == "denied"  # replay
    wrong = f"{(int(code) + 1) % 1000000:06d}"
    result = login(stack, "alice", wrong)
    assert result.outcome == "denied" and result.prompts == ["Authentication code: "]
    stack.log.wait_for("reason=replayed code")
    stack.log.wait_for("outcome=success")


def test_name_variants_share_one_record(stack: PamStack) -> None:
    """Issue 12.1: a code accepted as `alice` is a replay as `ALICE`; the log names the canonical account."""
    stack.enroll_totp("alice")
    code = code_at(SECRET, time.time())
    assert login(stack, "alice", code).outcome == "success"
    assert login(stack, "ALICE", code).outcome == "denied"
    stack.log.wait_for("user=ALICE account=alice")
    for bad in (" alice", "alice ", "ali\nce", "\udcffalice"):
        assert login(stack, bad, code).outcome == "denied"


def test_invalid_utf8_answer_is_a_counted_wrong_code(stack: PamStack) -> None:
    """Issue 12.3: bytes that are not UTF-8 at the code prompt are a wrong code, counted, never an error."""
    stack.enroll_totp("alice")
    assert login(stack, "alice", "\udcff\udcfe").outcome == "denied"
    stack.log.wait_for("(1 consecutive failures)")


def test_no_answer_is_a_conversation_error(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    assert login(stack, "alice", None).outcome == "conversation"


def test_unknown_and_unenrolled_users_look_the_same(stack: PamStack) -> None:
    stack.extensions["bob"] = {"method": "totp", "secret": SECRET, "enabled": False}
    stack.write_extensions()
    a = login(stack, "nobody-here")
    b = login(stack, "bob")
    assert (a.outcome, a.prompts) == (b.outcome, b.prompts) == ("skip", [])


def test_split_answers_do_not_tell_names_apart(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    split = protocol.MODE_SPLIT
    assert login(stack, "alice", mode=split).digits == 6
    assert login(stack, "ALICE", mode=split).digits == 6
    assert login(stack, "ghost", mode=split).digits == 0
    stack.write_config(enforce="all")
    assert login(stack, "ghost", mode=split).digits == 6
    assert login(stack, "ghost", kept="123456").outcome == "denied"


def test_kept_code_is_checked_without_a_prompt(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    code = code_at(SECRET, time.time())
    result = login(stack, "alice", kept=code)
    assert (result.outcome, result.prompts) == ("success", [])
    assert login(stack, "alice", kept=code).outcome == "denied"  # replay
    assert login(stack, "alice", kept="").outcome == "denied"


def test_unknown_explicit_profile_is_unavailable(stack: PamStack) -> None:
    assert login(stack, "alice", profile="no-such-profile").outcome == "unavailable"
    stack.log.wait_for("is not defined in profiles")


def test_lockout_is_exact_under_parallel_guesses(stack: PamStack) -> None:
    """Issue 12.2: 60 wrong codes in parallel (20 at a time), max_failures 5: exactly 5 are checked."""
    stack.write_config(lockout={"max_failures": 5, "duration": 900}, daemon={"max_per_account": 32})
    stack.enroll_totp("alice")
    code = code_at(SECRET, time.time())
    wrong = f"{(int(code) + 500000) % 1000000:06d}"
    outcomes: list[str] = []
    lock = threading.Lock()

    def guess() -> None:
        outcome = login(stack, "alice", wrong).outcome
        with lock:
            outcomes.append(outcome)

    for _ in range(3):
        threads = [threading.Thread(target=guess) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(outcomes) == 60
    # A checked code ends denied, or locked when a parallel guess applied the lock first.
    assert outcomes.count("denied") + outcomes.count("locked") == 60, outcomes
    assert outcomes.count("denied") <= 4
    checked = [line for line in stack.log.lines if "wrong code" in line or "malformed" in line]
    assert len(checked) == 5, checked
    assert login(stack, "alice", code).outcome == "locked"


# -- config loading ----------------------------------------------------------------


def test_broken_config_keeps_the_last_good_one(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    stack.config_path.write_text("enforce: [unclosed\n")
    os.chmod(stack.config_path, 0o600)
    status = stack.daemon.reload()
    assert status["loaded"] is True and "pam_linkus.yaml" in str(status["last_error"])
    line = stack.log.wait_for("configuration not loaded")
    assert "keeping the last good configuration" in line and ":1:" in line
    assert login(stack, "alice", code_at(SECRET, time.time())).outcome == "success"


def test_a_huge_secret_is_refused_at_load_and_the_last_good_settings_stay(stack: PamStack) -> None:
    """Issue 17.12: a 10 MB base32 secret was accepted, and each login of it blocked linkusd's
    event loop for 1.4 s. Now the file is refused at load, naming where the entry stands."""
    stack.enroll_totp("alice")
    stack.extensions["bob"] = {"method": "totp", "secret": "A" * (10 << 20)}
    stack._write_extensions()
    status = stack.daemon.reload()
    assert status["loaded"] is True and "longer than 1024 bits" in str(status["last_error"])
    line = stack.log.wait_for("configuration not loaded")
    assert f"{stack.extensions_path}:5:3" in line and "keeping the last good configuration" in line
    assert "AAAAAAAA" not in line
    assert login(stack, "alice", code_at(SECRET, time.time())).outcome == "success"


def test_the_loaded_line_counts_extensions_and_warns_when_enrolled_ones_drop(stack: PamStack) -> None:
    """A file that lost enrollments (an edit gone wrong) lets those extensions in on the password alone
    under ``enforce: enrolled``: the reload's line says how many are enrolled and warns at a drop."""
    stack.enroll_totp("alice")
    stack.enroll_totp("bob")
    stack.daemon.reload()
    line = stack.log.wait_for("enrolled=2")
    assert "extensions=2 enrolled=2" in line and line.startswith(f"<{syslog.LOG_AUTHPRIV | syslog.LOG_INFO}>")
    del stack.extensions["bob"]
    stack._write_extensions()
    stack.daemon.reload()
    line = stack.log.wait_for("enrolled dropped from 2")
    assert "extensions=1 enrolled=1" in line and line.startswith(f"<{syslog.LOG_AUTHPRIV | syslog.LOG_WARNING}>")


def test_watcher_reloads_when_the_file_changes(stack: PamStack) -> None:
    code = code_at(SECRET, time.time())
    stack.extensions = {"carol": {"method": "totp", "secret": SECRET}}
    stack._write_extensions()  # no explicit reload: the watcher must see it
    deadline = time.monotonic() + 10
    while login(stack, "carol").outcome == "skip" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert login(stack, "carol", code).outcome == "success"


def test_watcher_does_not_build_an_edit_that_a_reload_already_loaded(stack: PamStack) -> None:
    """An edit followed by RELOAD: the watcher, which saw the edit while that reload was
    building, must not build the same files a second time (a 100k build stalls logins)."""
    from pam_linkus.daemon.engine import Engine
    from pam_linkus.logline import SyslogSink

    engine = Engine(str(stack.config_path), SyslogSink(str(stack.log.path), tag="linkusd-test"))
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(engine.reload("first"))
        first = engine.current
        assert loop.run_until_complete(engine.reload("file changed", if_changed=True))
        assert engine.current is first  # nothing changed: no second build
        stack.enroll_totp("dave")  # an edit (stack's own daemon reloads it; ours has not)
        assert engine.changed()
        assert loop.run_until_complete(engine.reload("file changed", if_changed=True))
        assert engine.current is not first and engine.current is not None
        assert engine.current.chain.lookup("dave") is not None
    finally:
        if engine.current is not None:
            engine.current.close()
        engine.shutdown()
        loop.close()


def test_start_without_a_good_config_refuses_every_login(private_dir: Path, log_catcher: LogCatcher) -> None:
    require_root()
    stack = PamStack(private_dir, log_catcher, start=False)
    try:
        stack.config_path.write_text("sources: [nope]\n...\n")
        os.chmod(stack.config_path, 0o600)
        stack.daemon.start()
        assert stack.daemon.status()["loaded"] is False
        assert login(stack, "alice", "123456").outcome == "unavailable"
        log_catcher.wait_for("refusing every login")
        # fixed, it serves without a restart
        stack._write_config()
        assert stack.daemon.reload()["loaded"] is True
        assert login(stack, "alice").outcome == "skip"
    finally:
        stack.remove()


def test_doctor_reports_the_daemon(stack: PamStack) -> None:
    from pam_linkus.config import load_config
    from pam_linkus.doctor import check_daemon

    config = load_config(str(stack.config_path))
    path = str(stack.daemon.pam_socket)
    [ok] = check_daemon(config, path)
    assert ok.level == "ok" and "version" in ok.detail
    stack.config_path.write_text("enforce: sometimes\n...\n")
    os.chmod(stack.config_path, 0o600)
    stack.daemon.reload()
    assert [f.level for f in check_daemon(config, path)] == ["WARN", "ok"]
    assert "enforce" in check_daemon(config, path)[0].detail
    stack.daemon.stop()
    [down] = check_daemon(config, path)
    assert down.level == "FAIL" and "every login is refused" in down.detail


def test_second_instance_refuses_to_start(stack: PamStack) -> None:
    proc = subprocess.run(
        [DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--foreground", "--config", str(stack.config_path),
         "--pam-socket", str(stack.daemon.pam_socket), "--log-socket", str(stack.log.path)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0 and "another linkusd is running" in proc.stderr
    assert stack.daemon.status()["loaded"] is True


def test_a_second_linkusd_never_takes_a_socket_a_live_daemon_serves(stack: PamStack) -> None:
    """The lock file deleted under a running linkusd (as the package's purge once did): a second
    linkusd gets the lock, but finds the socket served and exits without unlinking it."""
    before = os.lstat(stack.daemon.pam_socket).st_ino
    (stack.daemon.run_dir / "linkusd.lock").unlink()
    proc = subprocess.run(
        [DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--foreground", "--config", str(stack.config_path),
         "--pam-socket", str(stack.daemon.pam_socket), "--no-web", "--log-socket", str(stack.log.path)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0 and f"another process serves {stack.daemon.pam_socket}" in proc.stderr, proc.stderr
    assert os.lstat(stack.daemon.pam_socket).st_ino == before
    assert stack.daemon.status()["pid"] == stack.daemon.proc.pid  # type: ignore[union-attr]


def test_a_stale_socket_file_is_replaced(private_dir: Path, log_catcher: LogCatcher) -> None:
    """A socket file nobody listens on (a linkusd killed with -9) does not stop the next one."""
    stack = PamStack(private_dir, log_catcher, start=False)
    try:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(stack.daemon.pam_socket))
        stale.close()  # bound, never listening: connect is refused
        stack.daemon.start()
        assert stack.daemon.status()["loaded"] is True
    finally:
        stack.remove()


def test_socket_directory_made_by_linkusd_is_0755_and_reachable_by_allowed_groups(
        private_dir: Path, log_catcher: LogCatcher) -> None:
    """Without systemd linkusd makes the directory itself, under its umask 077: it must still be 0755,
    or linkus-web (web.sock) and allowed_groups callers (pam.sock) cannot reach their sockets."""
    stack = PamStack(private_dir, log_catcher, start=False)
    group = f"lkg{os.getpid() % 100000}d"
    subprocess.run(["groupadd", group], check=True)
    try:
        stack.daemon.run_dir.rmdir()
        stack.config["daemon"] = {**stack.socket_settings(), "allowed_groups": [group], "web_group": group}
        stack._write_config()
        stack.daemon.start()
        st = os.lstat(stack.daemon.run_dir)
        assert (oct(st.st_mode & 0o7777), st.st_uid) == ("0o755", 0)
        gid = int(subprocess.run(["getent", "group", group], capture_output=True, text=True,
                                 check=True).stdout.split(":")[2])
        probe = f"import daemon_client as dc; print(dc.converse({sock(stack)!r}, 'alice').outcome)"
        allowed = _as(65534, 65534, [gid], probe)
        assert allowed.stdout.strip() == "skip", allowed.stdout + allowed.stderr
        web = _as(65534, 65534, [gid], f"import socket; s = socket.socket(socket.AF_UNIX); "
                                       f"s.connect({str(stack.daemon.web_socket)!r}); print('connected')")
        assert web.stdout.strip() == "connected", web.stderr
    finally:
        stack.remove()
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def test_socket_watch_reports_each_change_once(tmp_path: Path) -> None:
    from pam_linkus.daemon.main import SocketWatch

    path = str(tmp_path / "pam.sock")
    first = socket.socket(socket.AF_UNIX)
    first.bind(path)
    reports: list[str | None] = []
    watch = SocketWatch([path], reports.append)
    assert watch.check() is None and reports == []
    os.unlink(path)
    assert "pam.sock was removed" in str(watch.check())
    watch.check()
    second = socket.socket(socket.AF_UNIX)
    second.bind(path)
    assert "pam.sock was replaced" in str(watch.check())
    assert [str(r).split(":")[0] for r in reports] == [f"{path} was removed", f"{path} was replaced"]
    first.close()
    second.close()


def test_a_removed_or_replaced_socket_is_noticed_and_said(stack: PamStack) -> None:
    """Within seconds: syslog, the STATUS reply and doctor say that logins no longer reach this linkusd."""
    from pam_linkus.config import load_config
    from pam_linkus.doctor import check_daemon

    pid = stack.daemon.proc.pid  # type: ignore[union-attr]
    config = load_config(str(stack.config_path))
    stack.daemon.web_socket.unlink()
    stack.log.wait_for(f"{stack.daemon.web_socket} was removed", timeout=10)
    assert "web.sock was removed" in str(stack.daemon.status()["socket_problem"])
    assert any(f.level == "FAIL" and "web.sock was removed" in f.detail for f in check_daemon(config, sock(stack)))
    # The PAM socket replaced by another listener: doctor names the stranded daemon.
    stack.daemon.pam_socket.unlink()
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(sock(stack))
    squatter.listen(1)
    try:
        stack.log.wait_for(f"{stack.daemon.pam_socket} was replaced", timeout=10)
        [finding] = [f for f in check_daemon(config, sock(stack)) if f.level == "FAIL"]
        assert f"linkusd pid {pid} still listens" in finding.detail, finding.detail
    finally:
        squatter.close()


def test_the_host_linkusd_check_has_teeth(stack: PamStack) -> None:
    """conftest's session check (HostLinkusd) on a linkusd of our own: quiet while it is left alone, and
    it names a state file replaced under the daemon and a daemon that stopped answering."""
    import shutil as sh

    from conftest import HostLinkusd

    stack.enroll_totp("alice")
    assert login(stack, "alice", code_at(SECRET, time.time())).outcome == "success"  # state.db open now
    watched = HostLinkusd(sock(stack), str(stack.state_path))
    assert watched.pid == stack.daemon.proc.pid and watched.state_was_open  # type: ignore[union-attr]
    assert watched.problems() == []
    copy = stack.state_path.with_name("copy.db")
    sh.copy2(stack.state_path, copy)
    os.replace(copy, stack.state_path)  # what a snapshot "restore" did to an installed host
    assert watched.problems() == [f"{stack.state_path} was removed or replaced"]
    stack.daemon.stop()
    assert f"linkusd pid {watched.pid} no longer answers STATUS" in watched.problems()[0]


#: uid 0 with no capability: what linkusd.service leaves it (CapabilityBoundingSet= empty). Between two
#: such processes only the "dumpable" flag decides whether one may read the other's memory.
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]


def _read_environ_without_caps(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NO_CAPS, "cat", f"/proc/{pid}/environ"], capture_output=True, text=True, timeout=30,
                          check=False)


def test_linkusd_dumps_no_core_and_is_not_dumpable(private_dir: Path, log_catcher: LogCatcher) -> None:
    """A core of linkusd would hold TOTP secrets and passwords: core limit 0 and PR_SET_DUMPABLE 0,
    which the kernel shows by refusing a same-uid, same-capabilities reader its memory and environ."""
    stack = PamStack(private_dir, log_catcher, start=False)
    stack.daemon.wrapper = NO_CAPS
    # Without CAP_CHOWN linkusd cannot give web.sock to a web group (systemd's socket unit does that):
    # name none that exists, as on a machine without linkus-web.
    stack.config["daemon"] = {**stack.socket_settings(), "web_group": f"lkt-none-{os.getpid()}"}
    stack._write_config()
    sleeper = subprocess.Popen([*NO_CAPS, "sleep", "60"])
    try:
        stack.daemon.start()
        pid = stack.daemon.proc.pid  # type: ignore[union-attr]
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert [line.split()[4:6] for line in limits.splitlines() if line.startswith("Max core file size")] == \
            [["0", "0"]], limits
        # The reader works on a dumpable process with the same credentials...
        assert _read_environ_without_caps(sleeper.pid).returncode == 0
        # ... and not on linkusd.
        refused = _read_environ_without_caps(pid)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    finally:
        stop_process(sleeper)
        stack.remove()


# -- peers and capacity --------------------------------------------------------------


def _as(uid: int, gid: int, groups: list[int], code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAEMON_PYTHON, "-c", code], env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
        user=uid, group=gid, extra_groups=groups, capture_output=True, text=True, timeout=30,
    )


def test_non_root_peer_is_refused_unless_its_group_is_allowed(stack: PamStack) -> None:
    group = f"lkg{os.getpid() % 100000}"
    subprocess.run(["groupadd", group], check=True)
    try:
        gid = int(subprocess.run(["getent", "group", group], capture_output=True, text=True,
                                 check=True).stdout.split(":")[2])
        probe = (f"import daemon_client as dc; print(dc.converse({sock(stack)!r}, 'alice', "
                 f"rhost='192.0.2.9').outcome)")
        refused = _as(65534, 65534, [], probe)
        # closed at once, nothing answered (the START may not even get out: EPIPE; a START that got
        # in unread makes the close a reset)
        assert refused.returncode != 0, refused.stdout
        assert any(word in refused.stderr for word in ("PeerClosed", "BrokenPipe", "ConnectionReset")), refused.stderr
        assert stack.daemon.status()["refused_peers"] == 1
        stack.write_config(daemon={"allowed_groups": [group]}, exempt_networks=["192.0.2.0/24"])
        stack.enroll_totp("alice")
        # allowed, but its rhost is not trusted: no exemption, the code is asked
        allowed = _as(65534, 65534, [gid], probe.replace(".outcome)", ".prompts)"))
        assert "Authentication code" in allowed.stdout, allowed.stderr
        stack.write_config(daemon={"allowed_groups": [group], "trusted_groups": [group]})
        trusted = _as(65534, 65534, [gid], probe)
        assert trusted.stdout.strip() == "skip", trusted.stderr
        control = _as(65534, 65534, [gid], f"from pam_linkus import protocol; protocol.call_control({sock(stack)!r})")
        assert control.returncode != 0
    finally:
        subprocess.run(["groupdel", group], check=False)


def test_parked_conversations_of_one_user_do_not_delay_another_login(stack: PamStack) -> None:
    """200 `su`-style logins (euid 0, a user's real uid) parked at the code prompt: at most
    max_per_caller are served at once, and a root login (sshd) goes through at once."""
    stack.write_config(daemon={"max_per_caller": 16, "max_per_account": 500})
    stack.enroll_totp("alice")
    stack.enroll_totp("bob")
    script = f"""
import os, sys, time
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
os.setresuid(4242, 0, 0)   # what a setuid su run by uid 4242 looks like
import daemon_client as dc
held, outcomes = [], []
for _ in range(200):
    try:
        s, first = dc.park({sock(stack)!r}, 'alice')
    except (OSError, dc.protocol.ProtocolError) as exc:   # over the cap: closed at once
        first = type(exc).__name__
    else:
        held.append(s)
    outcomes.append(first)
print(outcomes.count('prompt'), len(outcomes) - outcomes.count('prompt'), sorted(set(outcomes)), flush=True)
sys.stdin.read()
"""
    proc = subprocess.Popen([DAEMON_PYTHON, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        first_line = proc.stdout.readline()
        parked, refused = map(int, first_line.split()[:2])  # refused: RESULT unavailable or closed at once
        assert (parked, refused) == (16, 184), first_line
        started = time.monotonic()
        assert login(stack, "bob", code_at(SECRET, time.time())).outcome == "success"
        assert time.monotonic() - started < 2.0
        assert stack.daemon.status()["active"]["parked"] == 16
    finally:
        proc.kill()
        proc.wait(10)


def test_answer_deadline_ends_a_parked_login(stack: PamStack) -> None:
    stack.write_config(daemon={"answer_timeout": 10})
    stack.enroll_totp("alice")
    s, first = dc.park(sock(stack), "alice")
    with s:
        assert first == "prompt"
        s.settimeout(20)
        msg = protocol.recv_message(s, {Msg.RESULT}, deadline=time.monotonic() + 20)
        assert dc.OUTCOMES[msg.byte(protocol.F.OUTCOME)] == "conversation"


@pytest.mark.parametrize("name,frame,says", [h for h in __import__("protocol_examples").HOSTILE_CLIENT],
                         ids=[h[0] for h in __import__("protocol_examples").HOSTILE_CLIENT])
def test_hostile_client_costs_only_its_connection(stack: PamStack, name: str, frame: bytes, says: str) -> None:
    with dc.connect(sock(stack)) as s:
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""  # dropped, nothing answered
    assert login(stack, "someone").outcome == "skip"
    stack.daemon.stop()  # no login started: counted, and summarised (at the latest on stopping)
    stack.log.wait_for("dropped 1 connection from uid 0")


def test_slow_drip_client_is_dropped_at_the_work_deadline(stack: PamStack) -> None:
    stack.write_config(daemon={"work_timeout": 2})
    frame = dc.start_frame("alice")
    started = time.monotonic()
    with dc.connect(sock(stack)) as s:
        try:
            for byte in frame:
                s.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:
            pass
        s.settimeout(10)
        try:
            data = s.recv(100)
        except OSError:
            data = b""
    assert data == b"" and time.monotonic() - started < 8
    stack.daemon.stop()  # no login started: counted, and summarised (at the latest on stopping)
    stack.log.wait_for("dropped 1 connection from uid 0 (timed out before its first whole frame)")


def test_killed_mid_login_then_restarted(stack: PamStack) -> None:
    stack.enroll_totp("alice")
    code = code_at(SECRET, time.time())
    assert login(stack, "alice", code).outcome == "success"
    s, first = dc.park(sock(stack), "alice")
    assert first == "prompt"
    assert stack.daemon.proc is not None
    stack.daemon.proc.send_signal(signal.SIGKILL)
    stack.daemon.proc.wait(10)
    with s:
        s.settimeout(5)
        assert s.recv(100) == b""
    stack.daemon.start()
    assert login(stack, "alice", code).outcome == "denied"  # the replay record survived
    assert login(stack, "alice", code_at(SECRET, time.time() + 30)).outcome == "success"


def test_reload_of_100k_extensions_while_32_clients_log_in(stack: PamStack) -> None:
    """No login waits for a reload: 32 client processes keep logging in while 100,000
    extensions load aside (parsed in a child process); none fails, none takes 0.5 s, and the
    daemon stays under 150 MB."""
    lines = ["extensions:"]
    lines += [f"  ext{i:06d}: {{method: totp, secret: {SECRET}}}" for i in range(100_000)]
    stop_file = stack.root / "stop-clients"
    script = f"""
import os, sys, time
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
import daemon_client as dc
worst, outcomes = 0.0, set()
for _ in range(2000):                      # bounded; the test stops us much earlier
    if os.path.exists({str(stop_file)!r}):
        break
    started = time.monotonic()
    outcomes.add(dc.converse({sock(stack)!r}, 'someone' + sys.argv[1]).outcome)  # one name each (per-account cap)
    worst = max(worst, time.monotonic() - started)
    time.sleep(0.25)                       # 32 clients: ~120 logins/s, a busy PBX, not a flood
print(worst, ','.join(sorted(outcomes)))
"""
    clients = [subprocess.Popen([DAEMON_PYTHON, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
               for i in range(32)]
    try:
        time.sleep(1.0)
        stack.extensions_path.write_text("\n".join(lines) + "\n...\n")
        started = time.monotonic()
        status = stack.daemon.reload()
        reload_s = time.monotonic() - started
        time.sleep(0.5)
    finally:
        stop_file.touch()
        reports = [proc.communicate(timeout=60)[0].split() for proc in clients]
    assert status["last_error"] is None
    assert reload_s < 30
    assert all(outcomes == "skip" for _, outcomes in reports), reports
    assert max(float(worst) for worst, _ in reports) < 0.5, reports
    assert login(stack, "ext099999", code_at(SECRET, time.time())).outcome == "success"
    # the parse ran in a child: the daemon holds the settings, not the document tree
    assert stack.daemon.proc is not None
    rss_kb = int(next(line.split()[1] for line in Path(f"/proc/{stack.daemon.proc.pid}/status").read_text()
                      .splitlines() if line.startswith("VmRSS:")))
    assert rss_kb < 150 * 1024, rss_kb


# -- systemd -------------------------------------------------------------------------


def test_socket_activation_and_readiness(private_dir: Path, log_catcher: LogCatcher) -> None:
    """Under systemd-socket-activate the daemon takes the passed socket and says READY=1."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.fail("systemd-socket-activate is missing (Debian's systemd package has it)")
    stack = PamStack(private_dir, log_catcher, start=False)
    notify_path = private_dir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    proc = subprocess.Popen(
        [activate, "-l", str(stack.daemon.pam_socket), "--fdname=pam", "-E", f"NOTIFY_SOCKET={notify_path}",
         "-E", f"PYTHONPATH={REPO}", DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--no-web",
         "--config", str(stack.config_path), "--pam-socket", str(stack.daemon.pam_socket),
         "--log-socket", str(log_catcher.path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        # the first connection starts linkusd (socket activation)
        result = login(stack, "someone")
        assert result.outcome == "skip"
        messages = notify.recv(4096).decode()
        assert "READY=1" in messages
        assert protocol.call_control(str(stack.daemon.pam_socket))["loaded"] is True
    finally:
        proc.terminate()
        proc.wait(10)
        notify.close()
        stack.remove()
    assert sys.platform.startswith("linux")


def test_a_burst_of_logins_loses_no_log_line(stack: PamStack) -> None:
    """Every login gets its syslog line even in a burst (the kernel queues few datagrams)."""
    names = [f"burst{i}" for i in range(64)]
    threads = [threading.Thread(target=login, args=(stack, name)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in names:
        stack.log.wait_for(f"user={name} ")
    assert stack.daemon.status()["log_lines_dropped"] == 0


def test_a_thousand_logins_with_the_foreground_echo(stack: PamStack) -> None:
    """linkusd --foreground echoes every line to stderr; that echo (and syslog) is written by the
    logging thread, so a stderr that stops draining can never stall the event loop."""
    stack.daemon.stop()
    read_end, write_end = os.pipe()  # a stderr nobody reads: fills after ~64 KB
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--foreground", "--config", str(stack.config_path),
         "--pam-socket", str(stack.daemon.pam_socket), "--no-web", "--log-socket", str(stack.log.path)],
        stdout=subprocess.DEVNULL, stderr=write_end, env=env,
    )
    os.close(write_end)
    try:
        stack.daemon.proc = proc
        stack.daemon.wait_ready()
        for i in range(600):  # ~100 KB of log lines
            assert login(stack, f"echo{i}", timeout=10).outcome == "skip"
    finally:
        stop_process(proc)
        os.close(read_end)


def test_without_foreground_it_goes_to_the_background_once_ready_and_logs(stack: PamStack) -> None:
    """What `make install` does where systemd is not PID 1: `linkusd` returns when it serves."""
    stack.daemon.stop()
    done = subprocess.run(
        [DAEMON_PYTHON, "-m", "pam_linkus.daemon", "--config", str(stack.config_path),
         "--pam-socket", str(stack.daemon.pam_socket), "--no-web", "--log-socket", str(stack.log.path)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    pid = int((stack.daemon.pam_socket.parent / "linkusd.lock").read_text())
    try:
        assert login(stack, "background").outcome == "skip"
        stack.log.wait_for("user=background ")  # the logging thread runs in the forked daemon
        stack.log.wait_for("linkusd: ready on")
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def test_a_held_sqlite_lock_stalls_neither_linkusd_nor_other_requests(stack: PamStack) -> None:
    """Local logins run on linkusd's event loop; one that meets another process's write lock on the
    state file (an admin's sqlite3 shell) gives up after LOOP_BUSY_TIMEOUT (0.5 s) as unavailable,
    so STATUS is answered meanwhile and nothing waits SQLite's 5 s busy timeout."""
    stack.enroll_totp("alice")
    holder = subprocess.Popen(
        [DAEMON_PYTHON, "-c", "import sqlite3, sys, time\n"
         f"db = sqlite3.connect({str(stack.state_path)!r}, isolation_level=None)\n"
         "db.execute('BEGIN IMMEDIATE'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        results: list[tuple[str, float]] = []

        def one() -> None:
            started = time.monotonic()
            outcome = login(stack, "alice", code_at(SECRET, time.time())).outcome
            results.append((outcome, time.monotonic() - started))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        assert stack.daemon.status()["loaded"]
        # behind at most the three logins' waits of 0.5 s each; with SQLite's 5 s it would be >= 5 s
        assert time.monotonic() - started < 3.0
        for thread in threads:
            thread.join(30)
        assert [outcome for outcome, _ in results] == ["unavailable"] * 3
        assert max(seconds for _, seconds in results) < 4.0  # one after another, 0.5 s each, not 5 s
    finally:
        holder.communicate("", timeout=10)
    assert login(stack, "alice", code_at(SECRET, time.time())).outcome == "success"
    assert "database is locked" in stack.log.wait_for("outcome=unavailable")


def _result(s: socket.socket) -> str:
    """The outcome of the RESULT that ends a transaction (PROMPT and INFO frames skipped)."""
    deadline = time.monotonic() + 10
    while True:
        msg = protocol.recv_message(s, {Msg.PROMPT, Msg.INFO, Msg.RESULT}, deadline=deadline)
        if msg.type == Msg.RESULT:
            return dc.OUTCOMES[msg.byte(protocol.F.OUTCOME)]


def test_frames_split_anyhow_or_sent_ahead_make_the_same_login(stack: PamStack) -> None:
    """linkusd assembles frames from whatever the socket delivers: START and ANSWER in one write
    (the answer waits in the buffer until the prompt is out), or an answer a few bytes at a time
    (each piece well inside the answer deadline)."""
    stack.enroll_totp("alice")
    code = code_at(SECRET, time.time())
    answer = protocol.encode(Msg.ANSWER, {protocol.F.TEXT: code.encode()})
    with dc.connect(sock(stack)) as s:
        s.sendall(dc.start_frame("alice") + answer)
        assert _result(s) == "success"
    with dc.connect(sock(stack)) as s:
        s.sendall(dc.start_frame("alice"))
        assert protocol.recv_message(s, {Msg.PROMPT}, deadline=time.monotonic() + 10).type == Msg.PROMPT
        for i in range(0, len(answer), 3):
            s.sendall(answer[i:i + 3])
            time.sleep(0.05)
        assert _result(s) == "denied"  # the same code again: a replay, decided on the reassembled frame
    line = stack.log.wait_for("reason=\"replayed code")
    assert "user=\"alice\"" in line or "user=alice" in line



# -- issue 17: floods, late answers, one line per login -------------------------------


def _linkus_only(stack: PamStack, options: str = "") -> None:
    """A service with pam_linkus.so alone: no password step (non-root callers, odd user names)."""
    stack.set_pam(auth_lines=f"auth [success=ok ignore=ignore default=die] {stack.module_line} {options}\n")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")))


def _attempt_lines(stack: PamStack, needle: str) -> list[str]:
    """The log lines that end a login (they carry an outcome) and mention ``needle``."""
    return [line for line in stack.log.settled() if "outcome=" in line and needle in line.replace('"', "")]


def test_a_flood_of_refused_connections_costs_almost_nothing(stack: PamStack) -> None:
    """Issue 17.7: four processes of a uid that may not ask flood pam.sock; linkusd holds 256 files at
    most. Each refused connection is closed at once without a line of its own; a root login through real
    PAM meanwhile answers fast; the refusals are counted per uid and summarised in one line."""
    import resource

    assert stack.daemon.proc is not None
    pid = stack.daemon.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
    _linkus_only(stack)
    start = dc.start_frame("alice")
    before, rss_before = _fds(pid), _rss_kb(pid)
    floods = [subprocess.Popen([DAEMON_PYTHON, "-c", FLOOD_SCRIPT, sock(stack), "3.0", "5000", start.hex()],
                               user=65534, group=65534, extra_groups=[],
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        time.sleep(0.5)  # let the flood build up (its own bounded clock; nothing to inject here)
        worst_fds, slowest = 0, 0.0
        for _ in range(12):  # logins spread over the flood
            started = time.monotonic()
            run = stack.pamtester("root")
            slowest = max(slowest, time.monotonic() - started)
            assert "Permission denied" in run.stderr + run.stdout, run  # linkusd said skip: PAM_IGNORE
            worst_fds = max(worst_fds, _fds(pid))
            time.sleep(0.2)
    finally:
        made = sum(int(proc.communicate(timeout=30)[0]) for proc in floods)
    assert made > 2000, made  # it was a flood
    assert slowest < 0.5, slowest
    assert worst_fds < before + transport.ACCEPT_BATCH + 16, (before, worst_fds)  # one accept batch at most
    deadline = time.monotonic() + 10
    while stack.daemon.status()["refused_peers"] < made and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.daemon.status()["refused_peers"] == made
    assert _fds(pid) <= before + 2
    assert _rss_kb(pid) < rss_before + 16 * 1024, (rss_before, _rss_kb(pid))
    stack.daemon.stop()  # the summary of the interval under way is written at the latest on stopping
    lines = stack.log.settled()
    assert not [line for line in lines if "too many open files" in line.lower()]
    refusals = [line for line in lines if "uid 65534" in line]
    assert len(refusals) <= 2, refusals[:5]  # one summary per 10 s, not a line per connection
    assert sum(int(n) for line in refusals for n in re.findall(r"refused (\d+) connection", line)) \
        == made, refusals


def check_late_answer_decides_nothing(stack: PamStack, user: str) -> None:
    """timeout=2, linkusd stopped (SIGSTOP) while the person answers; the module gives up after 2 s.
    After SIGCONT linkusd reads the answer but must not decide it: the login ends `conversation` in
    one line, the code is not spent, the failure count is not reset. (Also run on Redis state, whose
    steps run in the pool: tests/test_pam_redis_cluster.py.)"""
    import pam_conversation

    stack.set_pam(options="timeout=2")
    stack.enroll_totp(user)
    code = code_at(SECRET, time.time())
    wrong = f"{(int(code) + 500000) % 1000000:06d}"
    assert stack.login(user, wrong).auth == "PAM_AUTH_ERR"
    stack.log.wait_for("(1 consecutive failures)")
    assert stack.daemon.proc is not None
    pid = stack.daemon.proc.pid
    try:
        late = pam_conversation.converse(stack.service, user, PASSWORD,
                                         pam_conversation.answer_after_stopping(pid, code))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert late.auth == "PAM_AUTHINFO_UNAVAIL", late
    stack.log.wait_for("linkusd unavailable: no whole frame within the timeout")
    line = stack.log.wait_for("outcome=conversation")
    assert f"user={user} " in line and "reason=client gave up waiting" in line, line
    assert len(_attempt_lines(stack, f"user={user} ")) == 2  # the wrong code, and this one
    assert not [ln for ln in stack.log.lines if "outcome=success" in ln.replace('"', "")]
    assert stack.login(user, wrong).auth == "PAM_AUTH_ERR"
    stack.log.wait_for("(2 consecutive failures)")  # not reset by a success nobody got
    assert stack.login(user, code).auth == "PAM_SUCCESS"  # not spent


def test_an_answer_read_after_the_module_gave_up_decides_nothing(stack: PamStack, user: str) -> None:
    """Issue 17.9, SQLite state (the steps run on linkusd's event loop)."""
    check_late_answer_decides_nothing(stack, user)


def test_a_login_refused_by_the_account_cap_has_its_line(stack: PamStack, user: str) -> None:
    """Issue 17.10: the per-account cap ends a login with the usual line (service, user, rhost, outcome)."""
    stack.write_config(daemon={"max_per_account": 1})
    stack.enroll_totp(user)
    held, first = dc.park(sock(stack), user)
    with held:
        assert first == "prompt"
        result = stack.login(user, "123456", rhost="192.0.2.44")
    assert result.auth == "PAM_AUTHINFO_UNAVAIL"
    [line] = _attempt_lines(stack, "rhost=192.0.2.44")
    for part in (f"service={stack.service} ", f"user={user} ", "outcome=unavailable",
                 "reason=too many logins at once for this account"):
        assert part in line.replace('"', ""), line
    assert stack.daemon.status()["summary"]["refused"] == {"pam/account-cap": 1}  # counted, and shown by status
    status = run_cli(stack, "status")
    assert "refused:      pam/account-cap 1 " in status.stdout, status.stdout


def test_a_login_whose_client_left_before_its_result_still_has_its_line(stack: PamStack, user: str) -> None:
    """Each login ends in exactly one line, also when the client is gone by the time linkusd answers:
    a START over the account cap, then the close; the INFO and RESULT meet a closed socket."""
    stack.write_config(daemon={"max_per_account": 1})
    stack.enroll_totp(user)
    held, first = dc.park(sock(stack), user)
    with held:
        assert first == "prompt"
        with dc.connect(sock(stack)) as s:
            s.sendall(dc.start_frame(user, rhost="192.0.2.47"))
        line = stack.log.wait_for("rhost=192.0.2.47")
    assert "outcome=unavailable" in line and "too many logins at once for this account" in line, line
    assert len(_attempt_lines(stack, "rhost=192.0.2.47")) == 1


def test_a_refused_non_root_peer_leaves_one_line_with_its_login(stack: PamStack) -> None:
    """Issue 17.10: a PAM stack run by a uid linkusd does not serve: linkusd closes at once without a
    line; the module's own line names service, user, rhost and outcome."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing")
    _linkus_only(stack)
    os.chmod(stack.log.path, 0o666)  # the module runs as nobody here
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "pamtester",
                          "-I", "rhost=192.0.2.45", stack.service, "nobody", "authenticate"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert "cannot retrieve authentication info" in run.stdout + run.stderr, run
    [line] = _attempt_lines(stack, "rhost=192.0.2.45")
    for part in (f"service={stack.service} ", "user=nobody ", "outcome=unavailable",
                 "reason=linkusd turned the connection away"):
        assert part in line.replace('"', ""), line
    assert not [ln for ln in stack.log.lines if "refused a PAM peer" in ln or "Broken pipe" in ln]


def test_an_empty_user_name_is_denied_with_its_line(stack: PamStack) -> None:
    """Issue 17.10: an empty user name is an invalid name: `denied`, one line, no dropped-connection warning."""
    _linkus_only(stack)
    run = subprocess.run(["pamtester", "-I", "rhost=192.0.2.46", stack.service, "", "authenticate"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert "Authentication failure" in run.stdout + run.stderr, run
    [line] = _attempt_lines(stack, "rhost=192.0.2.46")
    for part in (f"service={stack.service} ", "user= ", "outcome=denied", "reason=invalid user name"):
        assert part in line.replace('"', ""), line
    assert not [ln for ln in stack.log.lines if "mid-frame" in ln or "dropped a connection" in ln]


def test_linkusd_raises_its_file_limit_and_warns_when_it_cannot_hold_max_connections() -> None:
    """Issue 17.7: a start with the soft limit of a shell (here 256) must not leave linkusd pausing accepts."""
    code = """
import resource
from pam_linkus.daemon.main import raise_file_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))
print(raise_file_limit(512), resource.getrlimit(resource.RLIMIT_NOFILE))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
print(raise_file_limit(512))
"""
    done = subprocess.run([DAEMON_PYTHON, "-c", code], env={"PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=30, check=True)
    raised, warned = done.stdout.splitlines()
    assert raised == "None (2048, 2048)"
    assert "only 256 open files" in warned and "max_connections 512" in warned


def test_the_unit_sets_a_file_limit_and_no_journal_rate_limit() -> None:
    """Issue 17.7: systemd's default soft limit is 1,024; journald's rate limit must not drop login lines."""
    unit = (REPO / "packaging" / "systemd" / "linkusd.service").read_text().splitlines()
    assert "LimitNOFILE=16384" in unit and "LogRateLimitIntervalSec=0" in unit
    verify = subprocess.run(["systemd-analyze", "verify", str(REPO / "packaging" / "systemd" / "linkusd.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "Unknown key" not in verify.stderr and "Unknown lvalue" not in verify.stderr, verify.stderr


def _web_flood(path: str, count: int, hold: float) -> str:
    """A script that opens up to ``count`` connections to ``path`` and holds them ``hold`` s (bounded)."""
    return f"""
import socket, time
held, made = [], 0
end = time.monotonic() + 3.0
for _ in range({count}):
    if time.monotonic() > end:
        break
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect({path!r})
        made += 1
        held.append(s)
    except OSError:
        s.close()
time.sleep({hold})  # the hold itself is what is tested: nothing here to inject a clock into
print(made)
"""


def test_a_web_group_member_cannot_exhaust_linkusd_with_held_web_connections(stack: PamStack) -> None:
    """Black-box finding 1: a web-group uid holding many idle web.sock connections must not take
    linkusd's descriptors: web connections are capped like PAM ones (per uid, and in all), the rest are
    closed at once and summarised; root PAM logins meanwhile answer fast."""
    import resource

    assert stack.daemon.proc is not None
    pid = stack.daemon.proc.pid
    stack.write_config(daemon={"web_group": "nogroup", "work_timeout": 3})
    os.chmod(stack.daemon.web_socket, 0o666)  # linkusd gives it to web_group only when it starts
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
    _linkus_only(stack)
    before = _fds(pid)
    flood = subprocess.Popen([DAEMON_PYTHON, "-c", _web_flood(str(stack.daemon.web_socket), 600, 2.0)],
                             user=65534, group=65534, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let the flood build up (its own bounded clock)
        worst_fds, slowest = 0, 0.0
        for _ in range(5):
            started = time.monotonic()
            run = stack.pamtester("root")
            slowest = max(slowest, time.monotonic() - started)
            assert "Permission denied" in run.stderr + run.stdout, run  # linkusd said skip
            worst_fds = max(worst_fds, _fds(pid))
    finally:
        made = int(flood.communicate(timeout=30)[0])
    assert made > 128, made  # more than one listen backlog: linkusd accepted (and closed) the rest
    assert slowest < 1.0, slowest
    assert worst_fds < before + 64, (before, worst_fds)  # a per-uid cap's worth, not one per connection
    stack.daemon.stop()
    lines = stack.log.settled()
    assert not [line for line in lines if "too many open files" in line.lower()]
    mine = [line for line in lines if "uid 65534" in line]
    assert 1 <= len(mine) <= 3, mine[:5]


@pytest.mark.parametrize("which", ["pam", "web"])
def test_a_loop_of_connect_and_close_is_summarised_not_logged_per_connection(stack: PamStack, which: str) -> None:
    """Black-box finding 5: an allowed non-root uid that connects and closes in a loop is counted and
    summarised with the refusals, not one "dropped a connection" line per connection."""
    stack.write_config(daemon={"allowed_groups": ["nogroup"], "web_group": "nogroup"})
    os.chmod(stack.daemon.web_socket, 0o666)  # linkusd gives it to web_group only when it starts
    path = str(sock(stack) if which == "pam" else stack.daemon.web_socket)
    loop = f"""
import socket, time
end, made = time.monotonic() + 1.5, 0
for _ in range(20000):                      # bounded in count and in time
    if time.monotonic() > end:
        break
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect({path!r})
        made += 1
    except OSError:
        pass
    s.close()
print(made)
"""
    done = subprocess.run([DAEMON_PYTHON, "-c", loop], user=65534, group=65534, extra_groups=[],
                          capture_output=True, text=True, timeout=30, check=True)
    made = int(done.stdout)
    assert made > 200, made
    assert login(stack, "someone").outcome == "skip"  # still serving
    stack.daemon.stop()  # the summary of the interval under way is written at the latest on stopping
    lines = stack.log.settled()
    mine = [line for line in lines if "uid 65534" in line]
    assert not [line for line in mine if "dropped a connection" in line], mine[:3]
    assert 1 <= len(mine) <= 3, mine[:5]
    counted = sum(int(n) for line in mine for n in re.findall(r"(?:refused|dropped) (\d+) connection", line))
    assert counted == made, (made, mine)


@pytest.mark.parametrize("field", [protocol.F.RHOST, protocol.F.TTY, protocol.F.RUSER])
def test_a_login_with_an_item_that_is_not_utf8_ends_with_its_line(stack: PamStack, field: protocol.F) -> None:
    """Black-box finding 9: an rhost, tty or ruser that is not UTF-8 is taken like any other login (decoded
    with a replacement for the log, never trusted), ending in its one line, not dropped as a protocol error."""
    fields: dict[protocol.F, bytes | str | int] = {protocol.F.MODE: protocol.MODE_AUTHENTICATE,
                                                   protocol.F.USER: b"someone", protocol.F.SERVICE: "sshd",
                                                   protocol.F.RHOST: "192.0.2.60", field: b"pts/\xc3"}
    with dc.connect(sock(stack)) as s:
        s.sendall(protocol.encode(Msg.START, fields))
        msg = protocol.recv_message(s, {Msg.RESULT, Msg.PROMPT, Msg.INFO}, deadline=time.monotonic() + 10)
    assert msg.type == Msg.RESULT and dc.OUTCOMES[msg.byte(protocol.F.OUTCOME)] == "skip", msg
    line = stack.log.wait_for("user=someone ")
    assert len(_attempt_lines(stack, "user=someone ")) == 1
    assert "service=sshd " in line.replace('"', "") and "outcome=skip" in line.replace('"', ""), line
    assert not [ln for ln in stack.log.lines if "not UTF-8" in ln or "dropped a connection" in ln]


def test_a_socket_below_a_directory_another_user_may_write_is_refused(tmp_path: Path) -> None:
    """Every directory above a socket is root-owned and writable by root alone (DESIGN.md), not only
    its own: else a user who owns one above renames the socket's directory away and serves their own
    socket in its place. The socket's mode comes from the umask at bind, never a chmod by path."""
    from pam_linkus.daemon.main import bind_socket, metrics_dir_problem

    base = Path("/run") / f"linkus-tests-dirs-{os.getpid()}"
    base.mkdir(mode=0o755)
    try:
        home = base / "home"
        home.mkdir(mode=0o755)
        os.chown(home, 65534, 65534)  # nobody's
        inner = home / "sock"
        inner.mkdir(mode=0o755)
        with pytest.raises(SystemExit, match=f"{home}.* must be owned by root"):
            bind_socket(str(inner / "pam.sock"), 0o666)
        assert not (inner / "pam.sock").exists()
        assert "must be owned by root" in (metrics_dir_problem(str(inner / "metrics.sock")) or "")
        os.chown(home, 0, 0)
        assert metrics_dir_problem(str(inner / "metrics.sock")) is None
        sock = bind_socket(str(inner / "pam.sock"), 0o660, group=0)
        try:
            st = os.lstat(inner / "pam.sock")
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0)
        finally:
            sock.close()
    finally:
        shutil.rmtree(base)
