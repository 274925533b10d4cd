#!/usr/bin/python3
"""The floor under linkusd's CPU per login on this machine: what the least a login server in
Python can do costs -- an asyncio unix-socket server that accepts, reads SO_PEERCRED, reads a
frame, sends a prompt, reads the answer, commits one SQLite transaction (WAL,
``synchronous=FULL`` or ``OFF``) and sends the result. No config, no flow, no /proc, no log.

    python3 bench/floor.py serve DIR FULL|OFF      # the server (bench/run.py starts it)
    python3 bench/floor.py [N]                     # both servers, N connections each, interleaved

linkusd's figure (bench/run.py ``daemon_cpu``) minus this one is what linkusd's own checks,
flow, state and log line cost on top of asyncio and the durable write; the FULL/OFF difference is
what the fsync costs the process in CPU (on a VM it includes the exit to the host per disk
flush). The client is a Python socket client in its own process, so the figure is the
server's CPU (schedstat of all its threads), not the client's.
"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_UCRED = struct.Struct("3i")
_FRAME = struct.Struct(">I")


class _Login(asyncio.Protocol):
    """START -> PROMPT -> ANSWER -> one commit -> RESULT."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.buf = b""
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < 4 or len(self.buf) < 4 + _FRAME.unpack(self.buf[:4])[0]:
            return
        self.buf = b""
        if not self.answered:
            self.answered = True
            self.transport.write(_FRAME.pack(6) + b"PROMPT")
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO used (user, step) VALUES ('u', ?) "
                        "ON CONFLICT (user) DO UPDATE SET step = excluded.step", (time.time_ns(),))
        self.db.execute("COMMIT")
        self.transport.write(_FRAME.pack(2) + b"OK")
        self.transport.close()


def serve(directory: str, mode: str) -> None:
    db = sqlite3.connect(os.path.join(directory, f"floor-{mode}.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if mode == 'FULL' else 'OFF'}")
    db.execute("CREATE TABLE IF NOT EXISTS used (user TEXT PRIMARY KEY, step INTEGER)")

    async def main() -> None:
        path = os.path.join(directory, f"floor-{mode}.sock")
        server = await asyncio.get_running_loop().create_unix_server(lambda: _Login(db), path)
        print("ready", flush=True)
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes

    asyncio.run(main())


def _cpu(pid: int) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except OSError:
            pass
    return total


def _logins(path: str, count: int) -> None:
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(_FRAME.pack(5) + b"START")
            sock.recv(100)
            sock.sendall(_FRAME.pack(6) + b"123456")
            sock.recv(100)


def measure(count: int = 600, directory: str | None = None) -> dict[str, float]:
    """CPU per connection (ms) of the FULL and the OFF server, in blocks of 50, interleaved."""
    own = directory is None
    work = directory or tempfile.mkdtemp(prefix="linkus-floor-", dir="/run")
    servers: dict[str, subprocess.Popen[str]] = {}
    try:
        for mode in ("FULL", "OFF"):
            proc = subprocess.Popen(["/usr/bin/python3", __file__, "serve", work, mode], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"floor server {mode} did not start")
            servers[mode] = proc
        used = {mode: 0 for mode in servers}
        for mode in servers:  # warm up
            _logins(os.path.join(work, f"floor-{mode}.sock"), 20)
        block = 50
        for i in range(max(1, count // block)):
            for mode in (("FULL", "OFF") if i % 2 == 0 else ("OFF", "FULL")):
                pid = servers[mode].pid
                before = _cpu(pid)
                _logins(os.path.join(work, f"floor-{mode}.sock"), block)
                used[mode] += _cpu(pid) - before
        per = {mode: used[mode] / 1e6 / (max(1, count // block) * block) for mode in used}
        return {"full_ms": round(per["FULL"], 3), "off_ms": round(per["OFF"], 3),
                "logins": max(1, count // block) * block}
    finally:
        for proc in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if own:
            for name in os.listdir(work):
                os.unlink(os.path.join(work, name))
            os.rmdir(work)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        print(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 600))
