"""A minimal RESP2 client: what RedisStore needs, nothing more.

redis-py costs about 100 ms per login to import (it pulls in asyncio and
importlib.metadata), far more than the round trip it is used for; pam_python
pays that in every login process. This client speaks RESP2 over ``_socket``
(``socket`` imports ``enum`` and friends; ``ssl`` only when TLS is configured)
and does one thing per call: send a command, read one reply, under a deadline.

Fail closed: any socket error, timeout, malformed or oversized reply raises a
RedisError and drops the connection (the next call connects afresh); an error
reply raises ResponseError and keeps it (the stream is still in step). Replies
are bounded (line length, bulk size, array length, nesting, total size), so a
hostile or broken server cannot make a login allocate without limit.

The exception class names follow redis-py's, because they appear in the
store's log lines (``redis lock status: TimeoutError: ...``) that admins know.
"""

from __future__ import annotations

import _socket
import time

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, TypeAlias

    Arg: TypeAlias = "str | bytes | int"

#: Bounds on one reply; far above anything the store's commands and scripts return.
MAX_LINE = 64 * 1024
MAX_BULK = 8 * 1024 * 1024
MAX_ARRAY = 100_000
MAX_DEPTH = 8
MAX_REPLY = 16 * 1024 * 1024

_BUILTIN_TIMEOUT = _socket.timeout  # the builtin TimeoutError, shadowed below


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class ConnectionError(RedisError):  # shadows the builtin on purpose: redis-py's name, in log lines
    """The connection failed or broke; it has been closed."""


class TimeoutError(ConnectionError):
    """Connecting or waiting for a reply took longer than allowed."""


class ProtocolError(ConnectionError):
    """The server sent something that is not a well-formed, bounded RESP2 reply."""


class ResponseError(RedisError):
    """The server answered with an error reply (``-ERR ...``)."""


class AuthenticationError(ConnectionError):
    """AUTH was refused."""


class MasterNotFoundError(ConnectionError):
    """No Sentinel named a reachable master for the service."""


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (the only form servers must accept)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            raise TypeError(f"redis argument of type {type(arg).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _integer(raw: bytes) -> int:
    """Strict: an optional minus and 1-19 ASCII digits (``int()`` would accept ' +1_0')."""
    digits = raw[1:] if raw[:1] == b"-" else raw
    if not digits or len(digits) > 19 or not digits.isdigit():
        raise ProtocolError(f"malformed integer in reply: {raw[:40]!r}")
    return int(raw)


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("reply is not UTF-8") from None


class Parser:
    """Reads replies from a byte stream fed by ``recv`` (a callable returning b"" at EOF)."""

    def __init__(self, recv: Any):
        self._recv = recv
        self._buf = bytearray()
        self._pos = 0
        self._budget = 0

    def _fill(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        data = self._recv()
        if not data:
            raise ConnectionError("Connection closed by server.")
        self._buf += data

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos : end])
                self._pos = end + 2
                self._spend(len(line) + 2)
                return line
            if len(self._buf) - self._pos > MAX_LINE:
                raise ProtocolError("reply line too long")
            self._fill()

    def _exact(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n + 2:
            self._fill()
        data = bytes(self._buf[self._pos : self._pos + n])
        if self._buf[self._pos + n : self._pos + n + 2] != b"\r\n":
            raise ProtocolError("bulk string not terminated by CRLF")
        self._pos += n + 2
        self._spend(n + 2)
        return data

    def _spend(self, n: int) -> None:
        self._budget -= n
        if self._budget < 0:
            raise ProtocolError("reply too large")

    def read(self) -> Any:
        """One whole reply: str, int, None (nil) or list; an error reply raises ResponseError.

        An error inside an array is read to its end first, so the stream stays in step.
        """
        self._budget = MAX_REPLY
        errors: list[str] = []
        value = self._read(0, errors)
        if errors:
            raise ResponseError(errors[0])
        return value

    def _read(self, depth: int, errors: list[str]) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return _text(rest)
        if kind == b"-":
            errors.append(_text(rest))
            return None
        if kind == b":":
            return _integer(rest)
        if kind == b"$":
            n = _integer(rest)
            if n == -1:
                return None
            if not 0 <= n <= MAX_BULK:
                raise ProtocolError(f"bulk string length {n} out of bounds")
            return _text(self._exact(n))
        if kind == b"*":
            n = _integer(rest)
            if n == -1:
                return None
            if not 0 <= n <= MAX_ARRAY:
                raise ProtocolError(f"array length {n} out of bounds")
            if depth >= MAX_DEPTH:
                raise ProtocolError("arrays nested too deeply")
            return [self._read(depth + 1, errors) for _ in range(n)]
        raise ProtocolError(f"unknown reply type {kind!r}")


class Endpoint:
    """Where and how to connect: TCP host/port or a unix socket path, TLS or not, who to be."""

    __slots__ = ("host", "port", "path", "ssl_context", "username", "password", "db")

    def __init__(self, *, host: str = "", port: int = 6379, path: str = "", ssl_context: Any = None,
                 username: str | None = None, password: str | None = None, db: int = 0):
        self.host, self.port, self.path, self.ssl_context = host, port, path, ssl_context
        self.username, self.password, self.db = username, password, db

    def __repr__(self) -> str:
        return self.path if self.path else f"{self.host}:{self.port}"


class Connection:
    """One open connection; every call runs under its own deadline."""

    def __init__(self, endpoint: Endpoint, connect_timeout: float, timeout: float):
        self.timeout = timeout
        self._deadline = 0.0
        self._sock = _open(endpoint, connect_timeout)
        self._parser = Parser(self._recv)
        try:
            if endpoint.password is not None:
                auth = ["AUTH", endpoint.password] if endpoint.username is None else \
                    ["AUTH", endpoint.username, endpoint.password]
                try:
                    self.call(auth)
                except ResponseError as exc:
                    raise AuthenticationError(str(exc)) from None
            if endpoint.db:
                self.call(["SELECT", endpoint.db])
        except RedisError:
            self.close()
            raise

    def _recv(self) -> bytes:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("Timeout reading from socket")
        self._sock.settimeout(left)
        data: bytes = self._sock.recv(65536)
        return data

    def call(self, args: Sequence[Arg]) -> Any:
        """Send one command, return its reply. Broken connection -> closed and raised."""
        if self._sock is None:
            raise ConnectionError("Connection closed.")
        self._deadline = time.monotonic() + self.timeout
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(encode_command(args))
            return self._parser.read()
        except ResponseError:
            raise
        except _BUILTIN_TIMEOUT:
            self.close()
            raise TimeoutError("Timeout reading from socket") from None
        except OSError as exc:
            self.close()
            raise ConnectionError(f"Error while talking to Redis: {exc}") from None
        except RedisError:
            self.close()
            raise

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _open(endpoint: Endpoint, connect_timeout: float) -> Any:
    """A connected (and, with TLS, handshaken and verified) socket, within connect_timeout."""
    sock: Any = None
    try:
        if endpoint.path:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(connect_timeout)
            sock.connect(endpoint.path)
            return sock
        # bytes: a str host would load the idna codec (and ``re``) on every login
        host = endpoint.host.encode() if endpoint.host.isascii() else endpoint.host
        deadline = time.monotonic() + connect_timeout
        last: BaseException | None = None
        for family, kind, proto, _, address in _socket.getaddrinfo(host, endpoint.port, 0, _socket.SOCK_STREAM):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if endpoint.ssl_context is not None:
                import socket  # ssl needs a socket.socket; ssl imports socket anyway

                sock = socket.socket(family, kind, proto)
            else:
                sock = _socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(address)
                break
            except OSError as exc:
                last = exc
                sock.close()
                sock = None
        if sock is None:
            if last is None:
                raise TimeoutError(f"Timeout connecting to {endpoint!r}")
            raise last
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        if endpoint.ssl_context is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock = endpoint.ssl_context.wrap_socket(sock, server_hostname=endpoint.host)
        return sock
    except _BUILTIN_TIMEOUT:
        _close(sock)
        raise TimeoutError(f"Timeout connecting to {endpoint!r}") from None
    except OSError as exc:
        _close(sock)
        raise ConnectionError(f"Error connecting to {endpoint!r}: {exc}") from None


def _close(sock: Any) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def tls_context(ca_file: str | None) -> Any:
    """A client context that verifies the chain (ca_file, else the system CAs) AND the host name."""
    import ssl

    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def parse_url(url: str) -> tuple[str, int, str, str | None, int, bool]:
    """``redis://[user@]host[:port][/db]``, ``rediss://...``, ``unix:///path[?db=N]``.

    Returns (host, port, path, username, db, tls). No ``urllib`` (it imports ``re``).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix"):
        raise ValueError("url must start with redis://, rediss:// or unix://")
    rest, _, query = rest.partition("?")
    db = 0
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        if name != "db":
            raise ValueError(f"url option {name!r} is not supported")
        db = _db(value)
    if scheme == "unix":
        user, at, path = rest.rpartition("@") if "@" in rest.partition("/")[0] else ("", "", rest)
        if not path.startswith("/"):
            raise ValueError("unix:// url needs an absolute path")
        return "", 0, _unquote(path), (_unquote(user) if at else None), db, False
    authority, slash, tail = rest.partition("/")
    user, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError("malformed IPv6 address in url")
        port_text = after[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError("url names no host")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError("url has an invalid port")
    if slash and tail and not query:
        db = _db(tail)
    elif slash and tail:
        _db(tail)
    return host, int(port_text or 6379), "", (_unquote(user) if at else None), db, scheme == "rediss"


def _db(text: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise ValueError("url has an invalid db number")
    return int(text)


def _unquote(text: str) -> str:
    """Percent-decoding, for a user name or path in a URL."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        if raw[i : i + 1] == b"%" and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="strict")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _role(hello: Any) -> str | None:
    """The ``role`` field of a RESP2 HELLO reply (a flat list of names and values).

    HELLO rather than ROLE: ROLE is in ``@dangerous``, which the ACL the README
    recommends for a cluster's user denies; HELLO is allowed to every user.
    """
    if not isinstance(hello, list) or len(hello) % 2:
        return None
    fields = dict(zip(hello[::2], hello[1::2], strict=True))
    role = fields.get("role")
    return role if isinstance(role, str) else None


class Client:
    """Connects lazily, reconnects after a broken connection, finds the master via Sentinel.

    One connection, no pool, no locking: a login process (or one ``linkus-2fa``
    run) owns its store; a threaded program opens one store per thread.
    """

    def __init__(self, *, endpoint: Endpoint | None = None, sentinels: Sequence[Endpoint] = (),
                 service_name: str = "", master: Endpoint | None = None,
                 connect_timeout: float = 2.0, timeout: float = 2.0):
        """``endpoint``: one server. Or ``sentinels`` + ``service_name`` + ``master`` (the master's
        credentials, TLS context and db; its address comes from the Sentinels)."""
        self._endpoint = endpoint
        self._sentinels = list(sentinels)
        self._service = service_name
        self._master = master
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._conn: Connection | None = None

    def _connection(self) -> Connection:
        if self._conn is None:
            if self._endpoint is not None:
                self._conn = Connection(self._endpoint, self.connect_timeout, self.timeout)
            else:
                self._conn = self._discover()
        return self._conn

    def _discover(self) -> Connection:
        """Ask each Sentinel in order for the master; use it only if it says it IS the master
        (a Sentinel may still name a demoted master for a while after a failover)."""
        assert self._master is not None
        reasons: list[str] = []
        for sentinel in self._sentinels:
            try:
                asker = Connection(sentinel, self.connect_timeout, self.timeout)
                try:
                    answer = asker.call(["SENTINEL", "get-master-addr-by-name", self._service])
                finally:
                    asker.close()
                if not (isinstance(answer, list) and len(answer) == 2 and all(isinstance(a, str) for a in answer)
                        and answer[1].isdigit()):
                    reasons.append(f"{sentinel!r}: no master named")
                    continue
                m = self._master
                where = Endpoint(host=answer[0], port=int(answer[1]), ssl_context=m.ssl_context,
                                 username=m.username, password=m.password, db=m.db)
                conn = Connection(where, self.connect_timeout, self.timeout)
                try:
                    role = _role(conn.call(["HELLO", "2"]))
                except RedisError:
                    conn.close()
                    raise
                if role == "master":
                    return conn
                conn.close()
                reasons.append(f"{where!r} is not a master")
            except RedisError as exc:
                reasons.append(f"{sentinel!r}: {type(exc).__name__}: {exc}")
        raise MasterNotFoundError(f"No master found for {self._service!r} ({'; '.join(reasons)})")

    def call(self, *args: Arg) -> Any:
        """One command; any failure but an error reply drops the connection."""
        conn = self._connection()
        try:
            return conn.call(args)
        except ResponseError:
            raise
        except RedisError:
            self._conn = None
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
