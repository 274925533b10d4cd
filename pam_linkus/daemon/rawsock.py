"""The PAM socket's accept loop and connections, on bare non-blocking sockets.

asyncio's own server machinery (an accept task per connection, a selector transport
with its extra-info lookups, a chain of ``call_soon`` hops before ``connection_made``
and after ``close``) cost linkusd about 0.15 ms of CPU per login, as much as the
login's own work: bench/floor.py measured the same minimal login server both ways.
A PAM transaction needs little of it -- a few frames of at most 4 KiB each way, in
turn -- so this module gives ``server.PamConnection`` the handful of transport
calls it uses (write, write_eof, close, abort, is_closing, get_extra_info) on top of
the event loop's public ``add_reader``/``add_writer``.

Everything else stays asyncio's: the loop, its timers (the connection's deadlines)
and its exception handler. A callback that raises is reported there and costs its
connection, as with asyncio's transports. The web socket keeps asyncio's streams.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Protocol

#: Connections taken per readiness of the listening socket (then others get their turn).
ACCEPT_BATCH = 32
#: When the process is out of file descriptors: stop accepting for this long.
ACCEPT_PAUSE = 1.0
#: How long a closed connection may take to hand its last frames to a peer that does not read.
CLOSE_DEADLINE = 10.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ConnectionProtocol(Protocol):
    """What ``SocketTransport`` calls (server.PamConnection)."""

    def connection_made(self, transport: SocketTransport) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


class SocketTransport:
    """One accepted connection: reads go to the protocol, writes go out at once or wait for room."""

    __slots__ = ("_loop", "_sock", "_fd", "_protocol", "_out", "_closing", "_lost", "_eof_wanted", "_reading")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: ConnectionProtocol) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False
        self._lost = False
        self._eof_wanted = False
        self._reading = False
        ok, _ = self._call(protocol.connection_made, self)
        if ok and not self._closing:
            loop.add_reader(self._fd, self._readable)
            self._reading = True

    # -- what the protocol calls --------------------------------------------------

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes) -> None:
        """Send now; what the socket does not take waits for room (never blocks the loop)."""
        if self._lost or self._eof_wanted or not data:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.abort()
            return
        if sent < len(data):
            self._out += data[sent:]
            self._loop.add_writer(self._fd, self._writable)

    def write_eof(self) -> None:
        """Shut our side for writing once what is queued is sent; reading goes on."""
        if self._lost or self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._out:
            self._shutdown_write()

    def close(self) -> None:
        """Stop reading; close once what is queued is sent."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._out:
            self._loop.call_soon(self._finish)
        else:  # a peer that never reads does not keep the socket: a PAM transaction is a few KiB
            self._loop.call_later(CLOSE_DEADLINE, self.abort)

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        self._closing = True
        self._stop_reading()
        if self._out:
            self._out.clear()
            self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._finish)

    # -- the loop's callbacks -----------------------------------------------------

    def _readable(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if data:
            self._call(self._protocol.data_received, data)
            return
        self._stop_reading()
        ok, keep_open = self._call(self._protocol.eof_received)
        if ok and not keep_open:
            self.close()

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        del self._out[:sent]
        if self._out:
            return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._finish()
        elif self._eof_wanted:
            self._shutdown_write()

    # -- inside -------------------------------------------------------------------

    def _call(self, callback: Callable[..., object], *args: object) -> tuple[bool, object]:
        """A protocol callback: (True, its result); one that raises is reported to the loop's
        exception handler (linkusd: syslog) and costs this connection only: (False, None)."""
        try:
            return True, callback(*args)
        except Exception as exc:  # noqa: BLE001 - reported, never the daemon's end
            self._loop.call_exception_handler({"message": f"PAM connection: {type(exc).__name__} in "
                                                          f"{getattr(callback, '__name__', 'a callback')}",
                                               "exception": exc})
            if not self._lost:
                self.abort()
            return False, None

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()

    def _finish(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._stop_reading()
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._call(self._protocol.connection_lost, None)


class Listener:
    """Accepts on the PAM socket and hands each connection to a new protocol object."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], ConnectionProtocol],
                 on_resource_error: Callable[[OSError], object]) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._on_resource_error = on_resource_error
        self._closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    # the socket stays readable: stop looking at it for a while, or spin
                    self._on_resource_error(exc)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            try:
                conn.setblocking(False)
            except OSError:
                conn.close()
                continue
            SocketTransport(self._loop, conn, self._factory())

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
