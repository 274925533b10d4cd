"""One loopback server base for the tests' hostile peers (LDAP, Redis, SMTP fakes).

Each fake says only what it does with a connection (``handle``); the accept loop,
the optional TLS wrap, the stop event and the bounded shutdown live here once.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any


class HostileServer:
    """Accepts on 127.0.0.1:<random port> until closed; ``handle(conn)`` per connection.

    ``context``: a server-side TLS context to wrap each connection in. ``once``: serve
    a single connection, then stop accepting. Connections get ``conn_timeout``.
    """

    conn_timeout = 5.0

    def __init__(self, *, context: ssl.SSLContext | None = None, once: bool = False):
        self.context = context
        self.once = once
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def handle(self, conn: Any) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            try:
                if self.context is not None:
                    with self.context.wrap_socket(raw, server_side=True) as conn:
                        conn.settimeout(self.conn_timeout)
                        self.handle(conn)
                else:
                    with raw:
                        raw.settimeout(self.conn_timeout)
                        self.handle(raw)
            except OSError:
                pass
            if self.once:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.sock.close()


def tls_server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
