"""linkusd's one transport for both sockets (pam_linkus/daemon/transport.py) on real sockets and a real
event loop: frames reassembled however they arrive, a deadline per whole frame, a peer that sends ahead
or hangs up, frames that the kernel cannot take at once, a refused peer closed at accept, a task that
raises, and a listener out of file descriptors. Every PAM and web test of linkusd runs through it too
(tests/test_daemon.py, test_web_api.py, test_pam_*.py)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import daemon_client as dc
import pytest

from pam_linkus import protocol
from pam_linkus.daemon import transport
from pam_linkus.daemon.transport import Channel, Listener
from pam_linkus.protocol import F, Msg, PeerClosed

ANSWER = protocol.encode(Msg.ANSWER, {F.TEXT: b"123456"})
START = dc.start_frame("alice")


def _pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # small: a send has to wait
    theirs.settimeout(5)
    return ours, theirs


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))  # bounded, whatever goes wrong


def test_frames_split_anyhow_or_sent_together_are_read_whole_and_in_turn() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)
        theirs.sendall(START + ANSWER[:3])  # START and a piece of the ANSWER in one write
        first = await ch.read(protocol.PAM_OPENERS, 5)
        assert first.type == Msg.START and first.text(F.USER) == "alice"
        for i in range(3, len(ANSWER)):  # the rest a byte at a time
            theirs.sendall(ANSWER[i:i + 1])
        answer = await ch.read(frozenset({Msg.ANSWER}), 5)
        assert answer.fields[F.TEXT] == b"123456" and not ch.buf
        theirs.close()
        ch.close()

    _run(main)


def test_the_deadline_is_for_the_whole_frame_so_a_drip_cannot_stretch_it() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)

        async def drip() -> None:
            for byte in START:  # one byte every 0.1 s: each piece in time, the frame not
                theirs.sendall(bytes([byte]))
                await asyncio.sleep(0.1)

        dripping = asyncio.ensure_future(drip())
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await ch.read(protocol.PAM_OPENERS, 0.5)
        assert asyncio.get_running_loop().time() - started < 1.5
        dripping.cancel()
        theirs.close()
        ch.close()

    _run(main)


def test_a_close_or_reset_mid_frame_is_peer_closed_and_a_bad_frame_a_protocol_error() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)
        theirs.sendall(START[:7])
        theirs.close()
        with pytest.raises(PeerClosed, match="mid-frame or before it"):
            await ch.read(protocol.PAM_OPENERS, 5)
        ch.close()
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)
        theirs.sendall(ANSWER)  # an ANSWER where a START must come
        with pytest.raises(protocol.ProtocolError, match="ANSWER not expected here"):
            await ch.read(protocol.PAM_OPENERS, 5)
        theirs.close()
        ch.close()

    _run(main)


def test_a_peer_that_sends_ahead_costs_at_most_one_frame_of_buffer() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)
        ahead = START + ANSWER * 100_000  # 1.3 MB out of turn: more than the kernel holds
        sender = asyncio.get_running_loop().run_in_executor(None, theirs.sendall, ahead)
        await ch.read(protocol.PAM_OPENERS, 5)
        assert len(ch.buf) <= 4 + protocol.PAM_MAX_BODY  # the rest waits in the kernel, unread
        await asyncio.sleep(0.2)
        assert len(ch.buf) <= 4 + protocol.PAM_MAX_BODY  # nothing reads while no frame is asked for
        ch.close()
        with pytest.raises(OSError):  # the sender was still blocked: we never read it all
            await sender
        theirs.close()

    _run(main)


def test_hung_up_peeks_without_consuming() -> None:
    async def main() -> None:
        ours, theirs = _pair()
        ch = Channel(ours, protocol.PAM_MAX_BODY)
        assert not ch.hung_up()  # waiting
        theirs.sendall(ANSWER)
        assert not ch.hung_up()  # a frame ahead is not a hang-up, and it stays there
        theirs.shutdown(socket.SHUT_WR)
        assert (await ch.read(frozenset({Msg.ANSWER}), 5)).type == Msg.ANSWER
        assert ch.hung_up()  # the EOF queued behind the frame
        theirs.close()
        ch.close()

    _run(main)


def test_a_frame_the_kernel_cannot_take_at_once_goes_out_whole_and_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "SEND_DEADLINE", 0.5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _pair(sndbuf=4096)
        ch = Channel(ours, protocol.WEB_MAX_BODY)
        payload = bytes(range(256)) * 1024  # 256 KiB, far over the socket's buffer
        reader = loop.run_in_executor(None, lambda: b"".join(iter(lambda: theirs.recv(65536), b"")))
        await ch.send(payload[:100_000])
        await ch.send(payload[100_000:])
        ch.close()
        assert await reader == payload
        theirs.close()
        # a peer that never reads: the send gives up at its deadline instead of holding the task
        ours, theirs = _pair(sndbuf=4096)
        ch = Channel(ours, protocol.WEB_MAX_BODY)
        started = loop.time()
        with pytest.raises(TimeoutError):
            await ch.send(payload)
        assert loop.time() - started < 2
        ch.close()
        # a peer that is gone: ConnectionError at once
        theirs.close()
        ours, theirs = _pair()
        theirs.close()
        with pytest.raises(ConnectionError):
            await Channel(ours, protocol.PAM_MAX_BODY).send(ANSWER)
        ours.close()

    _run(main)


async def _listening(path: Path, cls: type[socket.socket] = socket.socket) -> socket.socket:
    sock = cls(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


async def _connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, str(path))
    return client


def test_a_refused_peer_is_closed_at_accept_and_an_admitted_one_served_by_its_own_task(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        served: list[bytes] = []
        verdicts = iter([False, True])

        async def serve(conn: socket.socket) -> None:
            ch = Channel(conn, protocol.PAM_MAX_BODY)
            served.append((await ch.read(protocol.PAM_OPENERS, 5)).fields[F.USER])
            await ch.send(protocol.encode(Msg.RESULT, {F.OUTCOME: 1}))
            ch.close()

        def admit(conn: socket.socket) -> Coroutine[Any, Any, None] | None:
            if next(verdicts):
                return serve(conn)
            conn.close()  # nothing read, nothing written, no task
            return None

        listener = Listener(await _listening(tmp_path / "s.sock"), admit, lambda exc: None, name="test")
        refused = await _connect(tmp_path / "s.sock")
        assert await asyncio.wait_for(loop.sock_recv(refused, 100), 5) == b""  # closed at once
        assert not listener.tasks and not served
        admitted = await _connect(tmp_path / "s.sock")
        await loop.sock_sendall(admitted, START)
        reply = await asyncio.wait_for(loop.sock_recv(admitted, 100), 5)
        assert protocol.decode_body(reply[4:], {Msg.RESULT}).byte(F.OUTCOME) == 1 and served == [b"alice"]
        for sock in (refused, admitted):
            sock.close()
        listener.close()

    _run(main)


def test_a_task_that_raises_is_reported_and_costs_its_connection_only(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(str(context["message"])))

        async def serve(conn: socket.socket) -> None:
            try:
                raise RuntimeError("planted failure")
            finally:
                conn.close()

        listener = Listener(await _listening(tmp_path / "s.sock"), serve, lambda exc: None, name="PAM")
        for _ in range(2):
            client = await _connect(tmp_path / "s.sock")
            assert await asyncio.wait_for(loop.sock_recv(client, 100), 5) == b""
            client.close()
        for _ in range(100):  # bounded: the done callbacks run right after the tasks
            if len(reported) == 2:
                break
            await asyncio.sleep(0.01)
        assert reported == ["PAM connection: RuntimeError"] * 2 and not listener.tasks
        listener.close()

    _run(main)


class _OutOfDescriptors(socket.socket):
    """A listening socket whose first accept fails as a process out of descriptors would."""

    failures = 1

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning_then_serves(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(transport, "ACCEPT_PAUSE", 0.3)

    async def main() -> None:
        errors: list[OSError] = []
        admitted: list[socket.socket] = []

        def admit(conn: socket.socket) -> None:
            admitted.append(conn)
            return None

        listener = Listener(await _listening(tmp_path / "s.sock", _OutOfDescriptors), admit, errors.append,
                            name="test")
        client = await _connect(tmp_path / "s.sock")
        await asyncio.sleep(0.1)
        assert len(errors) == 1 and errors[0].errno == errno.EMFILE and not admitted  # paused, no busy loop
        for _ in range(300):  # bounded: resumed after the pause and accepted it
            if admitted:
                break
            await asyncio.sleep(0.01)
        assert len(admitted) == 1 and len(errors) == 1
        for sock in (client, *admitted):
            sock.close()
        listener.close()

    _run(main)
