"""linkusd's PAM-socket transport (pam_linkus/daemon/rawsock.py) on real sockets and a real event loop:
writes the kernel does not take at once, close and abort, a callback that raises, and a listener
that runs out of file descriptors. The daemon tests (tests/test_daemon.py) run every PAM login
through it as well."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from pam_linkus.daemon import rawsock
from pam_linkus.daemon.rawsock import Listener, SocketTransport


class Recorder:
    """A protocol that records its callbacks; ``fail_on`` makes one of them raise."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.events: list[Any] = []
        self.transport: SocketTransport | None = None
        self.fail_on = fail_on

    def _event(self, name: str, *args: Any) -> None:
        self.events.append((name, *args))
        if name == self.fail_on:
            raise RuntimeError(f"planted failure in {name}")

    def connection_made(self, transport: SocketTransport) -> None:
        self.transport = transport
        self._event("made")

    def data_received(self, data: bytes) -> None:
        self._event("data", data)

    def eof_received(self) -> bool | None:
        self._event("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._event("lost")


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # small: writes stay queued
    theirs.settimeout(5)
    return ours, theirs


async def _until(check: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_a_write_the_kernel_cannot_take_at_once_goes_out_whole_and_in_order_then_close() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        proto = Recorder()
        transport = SocketTransport(asyncio.get_running_loop(), ours, proto)
        payload = bytes(range(256)) * 4096  # 1 MiB, far over the socket's buffer
        transport.write(payload[:500_000])
        transport.write(payload[500_000:])  # queued behind the first
        transport.close()  # closes once everything is out
        assert proto.events == [("made",)]
        received = bytearray()
        while True:
            chunk = await asyncio.get_running_loop().run_in_executor(None, theirs.recv, 65536)
            if not chunk:
                break
            received += chunk
        assert bytes(received) == payload
        await _until(lambda: proto.events[-1] == ("lost",))
        assert proto.events.count(("lost",)) == 1
        theirs.close()

    asyncio.run(main())


def test_abort_drops_what_is_queued_and_a_peer_that_never_reads_is_closed_after_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rawsock, "CLOSE_DEADLINE", 0.3)

    async def main() -> None:
        for how in ("abort", "close"):
            ours, theirs = _pair()
            proto = Recorder()
            transport = SocketTransport(asyncio.get_running_loop(), ours, proto)
            transport.write(b"x" * 1_000_000)
            getattr(transport, how)()
            await _until(lambda proto=proto: ("lost",) in proto.events, 3.0)  # nobody ever read
            assert proto.events.count(("lost",)) == 1
            theirs.close()

    asyncio.run(main())


def test_data_then_eof_reach_the_protocol_and_write_eof_keeps_reading() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        proto = Recorder()
        transport = SocketTransport(asyncio.get_running_loop(), ours, proto)
        transport.write(b"RESULT")
        transport.write_eof()
        assert theirs.recv(100) == b"RESULT" and theirs.recv(100) == b""  # our side is shut
        theirs.sendall(b"late")  # their side is not: we still read
        theirs.shutdown(socket.SHUT_WR)
        await _until(lambda: ("lost",) in proto.events)
        assert proto.events == [("made",), ("data", b"late"), ("eof",), ("lost",)]
        theirs.close()

    asyncio.run(main())


def test_a_callback_that_raises_costs_its_connection_and_is_reported() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(str(context["message"])))
        ours, theirs = _pair()
        proto = Recorder(fail_on="data")
        SocketTransport(loop, ours, proto)
        theirs.sendall(b"boom")
        await _until(lambda: ("lost",) in proto.events)
        assert reported == ["PAM connection: RuntimeError in data_received"]
        assert theirs.recv(100) == b""  # closed
        theirs.close()

    asyncio.run(main())


class _OutOfDescriptors(socket.socket):
    """A listening socket whose first accept fails as a process out of descriptors would."""

    failures = 1

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning_then_serves(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(rawsock, "ACCEPT_PAUSE", 0.3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s.sock")
        listening = _OutOfDescriptors(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(path)
        listening.listen(8)
        errors: list[OSError] = []
        protos: list[Recorder] = []

        def factory() -> Recorder:
            protos.append(Recorder())
            return protos[-1]

        listener = Listener(loop, listening, factory, errors.append)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        client.connect(path)
        await asyncio.sleep(0.1)
        assert len(errors) == 1 and errors[0].errno == errno.EMFILE and not protos  # paused, no busy loop
        await _until(lambda: len(protos) == 1, 3.0)  # resumed after the pause and accepted it
        client.close()
        listener.close()

    asyncio.run(main())
