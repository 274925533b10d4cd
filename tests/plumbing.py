"""What the tests' fixtures and bench/ both use: the syslog stand-in and stopping a server they started.

No pytest and no fixtures here, so bench/ imports it (and the server helpers that need it,
ldap_server and redis_server) without loading tests/conftest.py (issue 19 item 9).
conftest re-exports both names for the tests.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class LogCatcher:
    """A datagram socket standing in for /dev/log; collects the module's syslog lines.

    bench/harness.py drains it between timed logins with ``take``.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.lines.append(data.decode("utf-8", "replace"))

    def wait_for(self, needle: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                # every text value is quoted in the log (logline); tests may name it bare
                found = [line for line in self.lines if needle in line or needle in line.replace('"', "")]
            if found:
                return found[0].replace('"', "")
            time.sleep(0.02)
        raise AssertionError(f"no log line with {needle!r}; got {self.lines!r}")

    def settled(self) -> list[str]:
        """All lines so far (after the datagrams in flight arrived), keeping them."""
        time.sleep(0.3)
        with self._lock:
            return list(self.lines)

    def take(self) -> list[str]:
        """All lines so far (after the datagrams in flight arrived), emptying the list."""
        time.sleep(0.3)
        with self._lock:
            lines, self.lines = self.lines, []
        return lines

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """Stop a server a fixture started: SIGTERM, then SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


#: A local user's connect flood, run as ``python3 -c FLOOD_SCRIPT SOCKET SECONDS MAX_CONNECTS FRAME_HEX``
#: (as a uid linkusd does not serve): it keeps 200 connections open at a time, sends each a frame, and
#: prints how many it made; bounded in count and in time (tests/test_daemon.py, bench/transport_ab.py).
FLOOD_SCRIPT = """
import socket, struct, sys, time
end, made, held = time.monotonic() + float(sys.argv[2]), 0, []
for _ in range(int(sys.argv[3])):
    if time.monotonic() > end:
        break
    if len(held) == 200:
        for s in held:
            s.close()
        held = []
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 0))  # blocking, at most 1 s
    held.append(s)
    try:
        s.connect(sys.argv[1])
        made += 1
        s.send(bytes.fromhex(sys.argv[4]))
    except OSError:
        pass
for s in held:
    s.close()
print(made)
"""
