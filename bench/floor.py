#!/usr/bin/python3
"""The floor under linkusd's CPU per login on this machine: what the least a login server in
Python can do costs -- an asyncio unix-socket server that accepts, reads SO_PEERCRED, reads a
frame, sends a prompt, reads the answer, commits one SQLite transaction (WAL,
``synchronous=FULL`` or ``OFF``) and sends the result. No config, no flow, no /proc, no log,
no check of what the frames say.

    python3 bench/floor.py serve DIR FULL|OFF      # the server (bench/run.py starts it)

bench/run.py drives it and linkusd alike for "CPU per login", interleaved in one run: pamtester
logins through native/pam_linkus.so (whose frames it answers with valid PROMPT and RESULT frames),
one after another, and reads each server's CPU (schedstat of all its threads). The client pattern matters:
a server woken every few milliseconds runs on cold caches, so only the same client makes the two
figures comparable. linkusd's figure minus this one is what linkusd's own checks, flow, state and
log line cost on top of asyncio and the durable write; the FULL/OFF difference is what the fsync
costs the process in CPU (on a VM it includes the exit to the host per disk flush).
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
import time
from collections.abc import Callable
from pathlib import Path

_UCRED = struct.Struct("3i")
_FRAME = struct.Struct(">I")
#: docs/protocol.md: version 1, PROMPT {STYLE echo off, TEXT}; RESULT {OUTCOME success}
_PROMPT_BODY = bytes([1, 0x10, 0x0B, 0, 1, 1, 0x0A, 0, 6]) + b"Code: "
_PROMPT = _FRAME.pack(len(_PROMPT_BODY)) + _PROMPT_BODY
_RESULT_BODY = bytes([1, 0x20, 0x0C, 0, 1, 0])
_RESULT = _FRAME.pack(len(_RESULT_BODY)) + _RESULT_BODY


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
            self.transport.write(_PROMPT)
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO used (user, step) VALUES ('u', ?) "
                        "ON CONFLICT (user) DO UPDATE SET step = excluded.step", (time.time_ns(),))
        self.db.execute("COMMIT")
        self.transport.write(_RESULT)
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
    """CPU time (ns) of all the threads of ``pid`` (schedstat: exact, not clock ticks)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except OSError:
            pass
    return total


def start(directory: str) -> dict[str, subprocess.Popen[str]]:
    """Both servers (FULL, OFF) with their sockets in ``directory`` (root-owned, not world-writable)."""
    servers: dict[str, subprocess.Popen[str]] = {}
    for mode in ("FULL", "OFF"):
        proc = subprocess.Popen(["/usr/bin/python3", __file__, "serve", directory, mode], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        servers[mode] = proc
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            stop(servers)
            raise RuntimeError(f"floor server {mode} did not start")
    return servers


def socket_path(directory: str, mode: str) -> str:
    return os.path.join(directory, f"floor-{mode}.sock")


def measure(pids: dict[str, int], login: dict[str, Callable[[], object]], count: int = 300,
            block: int = 25) -> dict[str, float]:
    """CPU per login (ms) of each server (``pids``: name -> pid), ``login[name]()`` doing one login
    against it; ``block`` logins at a time, the servers' order rotating, interleaved."""
    used = {name: 0 for name in pids}
    for name in pids:  # warm up
        for _ in range(10):
            login[name]()
    names = list(pids)
    rounds = max(1, count // block)
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            before = _cpu(pids[name])
            for _ in range(block):
                login[name]()
            used[name] += _cpu(pids[name]) - before
    return {name: used[name] / 1e6 / (rounds * block) for name in used}


def stop(servers: dict[str, subprocess.Popen[str]]) -> None:
    for proc in servers.values():
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
