"""One syslog line per authentication attempt, facility authpriv.

We write RFC 3164 datagrams to the syslog socket ourselves instead of calling
``syslog.openlog``: openlog is process-wide state (ident, facility) shared by every
thread of linkusd and by the host program of the CLI, and the socket path must be
configurable so tests can read the lines.

Every value goes through ``quote``: a user name, a remote host, a tty, a service
name and a reason all come from outside (a PAM client, a directory, a file), and a
value carrying ``"``, ``=``, a space or a newline must not be able to forge another
field or another line. So every string value is written the same way -- in double
quotes, with ``"`` and ``\\`` escaped and everything outside printable ASCII as
``\\xNN`` / ``\\uNNNN`` (bytes that were not UTF-8, given as bytes or as
surrogate escapes, come out as the ``\\xNN`` of the original byte). Codes, secrets
and passwords are never handed to this module.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

LOG_AUTHPRIV = 10 << 3
LOG_ALERT, LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 1, 3, 4, 5, 6, 7
IDENT = "pam_linkus"
#: Characters of a value kept beyond this are cut (with ``...`` inside the quotes).
MAX_VALUE_CHARS = 200
#: A datagram longer than this is cut; rsyslog and journald take at least 8 KiB.
MAX_DATAGRAM = 8192


def _escape_char(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def quote(value: object) -> str:
    """``value`` as one double-quoted, escaped token; the only way a value reaches a line.

    Integers and booleans are ours, never outside input, and are written bare.
    """
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    cut = len(text) > MAX_VALUE_CHARS
    if cut:
        text = text[:MAX_VALUE_CHARS]
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text and "=" not in text:
        return '"' + text + ('..."' if cut else '"')  # the usual case, without a loop in Python
    out = []
    for c in text:
        if c in '"\\=':
            # Written as \xNN, not \", so no quote or '=' ever stands inside a value: even a
            # naive grep for `outcome=success` cannot be fooled by a forged rhost.
            out.append(f"\\x{ord(c):02x}")
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(_escape_char(c))
    return '"' + "".join(out) + ('..."' if cut else '"')


def _check_key(key: str) -> str:
    # Keys are ours (literals in the code); refuse rather than escape, so a bug that
    # passes outside input as a key is found in tests, not in a forged line.
    rest = key.replace("_", "").replace("-", "")
    if not key or not key.isascii() or (rest and not rest.isalnum()):
        raise ValueError("log field names are [A-Za-z0-9_-]+")
    return key


#: Keys already checked (they are literals of our code: a handful).
_KEYS_SEEN: set[str] = set()


def format_fields(fields: Mapping[str, object]) -> str:
    """``key="value"`` pairs, every value through ``quote``."""
    parts = []
    for key, value in fields.items():
        if key not in _KEYS_SEEN:
            _KEYS_SEEN.add(_check_key(key))
        parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


class SyslogSink:
    """Sends lines to a syslog datagram socket.

    Thread-safe (each call uses its own socket; nothing is shared but two
    immutable attributes) and never blocking: a datagram is sent with
    ``MSG_DONTWAIT``, so a stalled syslog daemon costs a lost line, never a
    waiting login. ``send`` never raises (logging must not change a login's
    outcome); it returns whether the line was handed to syslog, so a command run
    by a person can say on stderr that its audit line was lost.
    """

    def __init__(self, socket_path: str = "/dev/log", *, tag: str | None = None):
        self.socket_path = socket_path
        self.tag = tag
        #: Called with each ``attempt`` line's fields before it is sent: linkusd's Engine counts
        #: logins here, so a login line written by any caller (PAM, the web gate) is counted once.
        self.on_attempt: Callable[[Mapping[str, object]], None] | None = None
        self._stamp = ""
        self._stamp_second = -1

    def send(self, severity: int, message: str) -> bool:
        data = self.datagram(severity, message)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError:
            return False
        try:
            sock.sendto(data, socket.MSG_DONTWAIT, self.socket_path)
        except OSError:
            return False  # no syslog daemon, or its queue is full: never wait for it
        finally:
            sock.close()
        return True

    def attempt(self, severity: int, fields: Mapping[str, object]) -> bool:
        """One structured line (``format_fields``); True if syslog took it."""
        if self.on_attempt is not None:
            self.on_attempt(fields)
        return self.send(severity, format_fields(fields))

    def datagram(self, severity: int, message: str) -> bytes:
        now = int(time.time())
        if now != self._stamp_second:  # strftime/localtime once a second, not once a line
            self._stamp = time.strftime("%b %d %H:%M:%S", time.localtime(now))
            self._stamp_second = now
        ident = f"{IDENT}({self.tag})" if self.tag else IDENT
        return f"<{LOG_AUTHPRIV | severity}>{self._stamp} {ident}[{os.getpid()}]: {message}".encode(
            "utf-8", "backslashreplace")[:MAX_DATAGRAM]


class QueuedSyslogSink(SyslogSink):
    """linkusd's sink: a line is sent at once when syslog can take it, else queued for a thread.

    A burst of logins must not lose its lines (the kernel queues only a few datagrams
    on a unix socket, so MSG_DONTWAIT alone drops them while syslog catches up), and no
    login may wait for syslog either. So the caller (the event loop) sends without
    waiting while nothing is queued; a line syslog cannot take right now goes to a
    bounded queue, and one thread sends the queue in order, waiting up to
    ``SEND_TIMEOUT`` per line. Lines queue behind queued lines, so their order holds.
    Only when syslog is stuck long enough to fill the queue are lines dropped, and
    counted (``dropped``). In ``--foreground`` (``echo``) the thread also writes every
    line to stderr: a stderr nobody reads blocks that thread, never a login (and
    then lines bound for syslog queue behind it: the queue's bound holds).
    """

    SEND_TIMEOUT = 2.0

    def __init__(self, socket_path: str = "/dev/log", *, tag: str | None = None, capacity: int = 10000,
                 echo: TextIO | None = None):
        super().__init__(socket_path, tag=tag)
        self.dropped = 0
        self.echo = echo
        self._queue: queue.Queue[tuple[bytes | None, str]] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._pending = 0  # lines queued and not yet handed to syslog by the thread
        self._direct: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="linkusd-syslog", daemon=True)
        self._thread.start()

    def send(self, severity: int, message: str) -> bool:
        data = self.datagram(severity, message)
        with self._lock:
            sent = not self._pending and self._send_now(data)
            if sent and self.echo is None:
                return True
            try:
                self._queue.put_nowait((None if sent else data, message))
            except queue.Full:
                if sent:
                    return True  # only its stderr copy is lost
                self.dropped += 1
                return False
            if not sent:
                self._pending += 1
        return True

    def _send_now(self, data: bytes) -> bool:
        """One datagram without waiting; False when syslog cannot take it now (the thread will)."""
        sock = self._direct
        try:
            if sock is None:
                sock = self._direct = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.sendto(data, socket.MSG_DONTWAIT, self.socket_path)
        except OSError:
            if sock is not None:
                sock.close()
            self._direct = None
            return False
        return True

    def _run(self) -> None:
        sock: socket.socket | None = None
        while True:
            data, message = self._queue.get()
            if data is not None:
                try:
                    if sock is None:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                        sock.settimeout(self.SEND_TIMEOUT)
                    sock.sendto(data, self.socket_path)
                except OSError:
                    self.dropped += 1
                    if sock is not None:
                        sock.close()
                    sock = None
                with self._lock:
                    self._pending -= 1
            if self.echo is not None:
                try:
                    print(message, file=self.echo, flush=True)
                except (OSError, ValueError):
                    self.echo = None

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until queued lines are handed to syslog, e.g. before exiting."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
