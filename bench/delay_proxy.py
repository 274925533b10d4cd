"""A TCP proxy on loopback that delays every byte by a fixed time each way: a far directory.

Why not ``tc qdisc ... netem`` on ``lo``: it needs CAP_NET_ADMIN and slows every loopback
user of the machine (other test suites, other daemons). This delays only the connections made
to its own port: ``delay`` seconds from client to server and as long back, so a request and
its answer take ``2 * delay`` more, as a server that far away would. Order is kept; each
chunk leaves ``delay`` after it arrived (a reader stamps it, a writer waits for the stamp).

Bounded: at most ``MAX_CONNECTIONS`` connections at once (linkusd keeps a few warm); every
thread ends when either side closes or the proxy is stopped.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

MAX_CONNECTIONS = 32


class DelayProxy:
    def __init__(self, target_port: int, delay: float, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.delay = delay
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                self._slots.release()
                continue
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            done = threading.Barrier(2, action=self._slots.release)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst, done), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def writer() -> None:
            while True:
                due, data = chunks.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        out = threading.Thread(target=writer, daemon=True)
        out.start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay, data))
            if not data:
                break
        out.join()
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait(timeout=30)

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
