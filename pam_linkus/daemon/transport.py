"""linkusd's sockets, both of them: accepting, and whole frames in and out, in turn.

The PAM socket and the web socket are served alike. A ``Listener`` accepts and asks
its ``admit`` callback, right after ``accept`` and before a byte is read, whether
this peer is served: a peer that is not is closed there and then (a flood of
refused connects costs neither descriptors nor tasks). An admitted connection gets
its own task, a coroutine that reads that connection's life top to bottom
(``Server.handle_pam``, ``Server.handle_web``) through a ``Channel``: ``read`` one
whole frame before a deadline, ``send`` one, ``hung_up`` (a non-consuming peek).

Under a Channel is the event loop's own socket API (``sock_recv``,
``sock_sendall``) on the accepted non-blocking socket, no asyncio transport or
stream: a PAM transaction is a few frames of at most 4 KiB each way, in turn,
and needs nothing more. What this costs next to the callback transport and
six-flag state machine it replaced (rawsock.py, until commit 639298f), measured
side by side (bench/transport_ab.py, bench/README.md "One transport for both
sockets"): about 0.05 ms more of linkusd's CPU per login (0.74 against 0.67 ms,
medians of two interleaved runs of six rounds; more in every paired round, but
less than the 0.1-0.2 ms spread of either one's own rounds), and no difference
beyond the noise in login latency or 32-client throughput; under a flood of
refused connects (this one turns away ~15% more per second) a root login's
median is the same, its worst of 12 ~50 ms later. A frame that is there
already is read without a timer or a wait (``read``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from pam_linkus import protocol
from pam_linkus.protocol import Msg, PeerClosed

#: Connections taken per readiness of a listening socket (then others get their turn).
ACCEPT_BATCH = 32
#: When the process is out of file descriptors: stop accepting for this long.
ACCEPT_PAUSE = 1.0
#: How long a frame may take to go out to a peer that does not read (a frame is at most 64 KiB,
#: the kernel takes 200 KiB: only a peer that stopped reading and sends ahead ever waits).
SEND_DEADLINE = 10.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_HEADER = 4


class Channel:
    """One accepted connection: whole frames in, each within its own deadline, and frames out.

    Nothing reads while no frame is asked for: what a peer sends out of turn waits in the
    kernel's buffer, and this one holds at most one frame's worth beyond the frame asked for
    (each read takes at most a header and a largest body), so a peer that sends ahead costs
    memory the kernel bounds, never ours.
    """

    __slots__ = ("sock", "max_body", "buf", "_loop")

    def __init__(self, sock: socket.socket, max_body: int) -> None:
        self.sock = sock
        self.max_body = max_body
        self.buf = bytearray()
        self._loop = asyncio.get_running_loop()

    async def read(self, expected: frozenset[Msg], timeout: float) -> protocol.Message:
        """The next frame, of one of the ``expected`` types, whole within ``timeout`` seconds.

        The deadline covers the whole frame, so a peer that sends a byte at a time cannot stretch
        it. Raises TimeoutError, PeerClosed (EOF or a reset before the frame was whole) or
        ProtocolError (the frame is malformed or not expected here).
        """
        deadline = self._loop.time() + timeout
        while True:
            msg = self._take(expected)
            if msg is not None:
                return msg
            try:  # most frames are there already: no timer, no wait
                data: bytes | None = self.sock.recv(_HEADER + self.max_body)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:  # a reset: the peer is gone as surely as with an EOF
                data = b""
            if data is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self._loop.sock_recv(self.sock, _HEADER + self.max_body)
                except TimeoutError:
                    raise
                except OSError:
                    data = b""
            if not data:
                raise PeerClosed("peer closed the connection mid-frame or before it")
            self.buf += data

    def _take(self, expected: frozenset[Msg]) -> protocol.Message | None:
        """A whole frame from the buffer, or None while it is not all there."""
        buf = self.buf
        if len(buf) < _HEADER:
            return None
        size = protocol.body_length(bytes(buf[:_HEADER]), self.max_body)
        if len(buf) < _HEADER + size:
            return None
        body = bytes(buf[_HEADER:_HEADER + size])
        del buf[:_HEADER + size]
        return protocol.decode_body(body, expected)

    async def send(self, frame: bytes) -> None:
        """Send one frame whole; raises ConnectionError (or TimeoutError after SEND_DEADLINE)
        when the peer is gone or does not take it. Sent at once when the socket has room, as
        a PAM frame always does."""
        try:
            sent = self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ConnectionError(f"cannot send: {exc.strerror}") from None
        if sent < len(frame):
            try:
                async with asyncio.timeout(SEND_DEADLINE):
                    await self._loop.sock_sendall(self.sock, frame[sent:])
            except TimeoutError:  # an OSError too, but not the peer's: it stopped reading
                raise
            except OSError as exc:
                raise ConnectionError(f"cannot send: {exc.strerror}") from None

    def hung_up(self) -> bool:
        """True once the peer closed its end (or reset it); nothing is consumed (MSG_PEEK), so an
        EOF queued behind the frame just read is seen before that frame is acted on."""
        try:
            return not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False  # nothing to read: it is waiting
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


#: What a listener asks of each accepted connection: the coroutine that serves it, or None
#: when it is refused (then ``admit`` has closed it already).
Admit = Callable[[socket.socket], "Coroutine[Any, Any, None] | None"]


class Listener:
    """Accepts on one listening socket; each connection ``admit`` takes is served by its own task.

    Out of file descriptors (EMFILE and kin) the listening socket stays readable, so accepting
    again at once would spin: it pauses ACCEPT_PAUSE seconds instead and says so (``on_pause``).
    A task that raises is reported to the loop's exception handler (linkusd: syslog) and costs
    its own connection only.
    """

    def __init__(self, sock: socket.socket, admit: Admit, on_pause: Callable[[OSError], object], *,
                 name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._admit = admit
        self._on_pause = on_pause
        self._name = name
        self._closed = False
        self.tasks: set[asyncio.Task[None]] = set()  # referenced while they run (the loop holds weak refs)
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._on_pause(exc)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                continue
            serve = self._admit(conn)
            if serve is not None:
                task = self._loop.create_task(serve)
                self.tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._loop.call_exception_handler({"message": f"{self._name} connection: {type(exc).__name__}",
                                               "exception": exc, "task": task})

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (connections under way go on until the loop stops)."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
