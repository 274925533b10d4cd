"""The minimal RESP2 client (pam_linkus.state.resp): codec, bounds, timeouts, Sentinel discovery.

The codec is fed byte streams directly (one byte per recv, to cover every split
point); connection behaviour runs against scripted fake servers on loopback and
against a real redis-server.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis_server import RedisServer, free_port

from pam_linkus.config import Config
from pam_linkus.errors import StateUnavailable
from pam_linkus.state import open_store, resp
from pam_linkus.state.resp import (
    Client,
    ConnectionError,
    Endpoint,
    MasterNotFoundError,
    Parser,
    ProtocolError,
    ResponseError,
    TimeoutError,
    encode_command,
    parse_url,
)

# -- encoding -------------------------------------------------------------------------


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command(["GET", "k"]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert encode_command(["SET", b"k\r\n", 42, -7, ""]) == (
        b"*5\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n$2\r\n-7\r\n$0\r\n\r\n"
    )
    assert encode_command(["é"]) == b"*1\r\n$2\r\n\xc3\xa9\r\n"  # length in bytes, not characters
    with pytest.raises(TypeError):
        encode_command(["SET", 1.5])  # type: ignore[list-item]


# -- decoding -------------------------------------------------------------------------


def feeder(data: bytes, chunk: int = 1) -> Callable[[], bytes]:
    """recv() handing out ``data`` ``chunk`` bytes at a time, then EOF."""
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    pieces.reverse()
    return lambda: pieces.pop() if pieces else b""


def parse(data: bytes, chunk: int = 1) -> Any:
    return Parser(feeder(data, chunk)).read()


@pytest.mark.parametrize(("wire", "value"), [
    (b"+OK\r\n", "OK"),
    (b"+\r\n", ""),
    (b":0\r\n", 0),
    (b":-42\r\n", -42),
    (b":9223372036854775807\r\n", 9223372036854775807),
    (b"$5\r\nhello\r\n", "hello"),
    (b"$0\r\n\r\n", ""),
    (b"$4\r\na\r\nb\r\n", "a\r\nb"),  # CRLF inside a bulk string is data
    (b"$2\r\n\xc3\xa9\r\n", "é"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n:1\r\n$-1\r\n+x\r\n", [1, None, "x"]),
    (b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\na\r\n*0\r\n", [[1, ["a"]], []]),
])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_every_reply_type(wire: bytes, value: Any, chunk: int) -> None:
    assert parse(wire, chunk) == value


def test_nested_arrays_keep_their_shape() -> None:
    assert parse(b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\na\r\n*0\r\n") == [[1, ["a"]], []]


def test_error_replies_raise_and_the_stream_stays_in_step() -> None:
    parser = Parser(feeder(b"-ERR wrong\r\n*3\r\n:1\r\n-NOPERM no\r\n:3\r\n+next\r\n"))
    with pytest.raises(ResponseError, match=r"^ERR wrong$"):
        parser.read()
    with pytest.raises(ResponseError, match=r"^NOPERM no$"):  # an error inside an array is an error too
        parser.read()
    assert parser.read() == "next"  # the array was read to its end


def test_several_replies_in_one_packet() -> None:
    parser = Parser(feeder(b":1\r\n$1\r\na\r\n*-1\r\n", 1024))
    assert [parser.read(), parser.read(), parser.read()] == [1, "a", None]


@pytest.mark.parametrize("wire", [
    b"?what\r\n",  # unknown type
    b"\r\n",  # empty line
    b":\r\n",
    b":1_0\r\n",  # int() would accept these
    b": 1\r\n",
    b":+1\r\n",
    b":12345678901234567890\r\n",  # more than 64 bits
    b"$-2\r\n",
    b"$abc\r\n",
    b"*-2\r\n",
    b"$3\r\nabcd\r\n",  # longer than announced
    b"$3\r\nabcXY\r\n",  # not terminated by CRLF where announced
    b"$2\r\n\xff\xfe\r\n",  # not UTF-8
    b"+\xff\r\n",
])
def test_malformed_replies_are_protocol_errors(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(wire, 1024)


@pytest.mark.parametrize("wire", [b"", b"+OK", b"+OK\r", b"$5\r\nhel", b"*2\r\n:1\r\n", b"*1\r\n*1\r\n"])
def test_truncated_replies_are_connection_errors(wire: bytes) -> None:
    with pytest.raises(ConnectionError, match="closed"):
        parse(wire)


def test_oversized_replies_are_refused_before_they_are_read() -> None:
    with pytest.raises(ProtocolError, match="bulk"):
        parse(b"$%d\r\n" % (resp.MAX_BULK + 1), 1024)  # refused on the header: nothing allocated
    with pytest.raises(ProtocolError, match="array"):
        parse(b"*%d\r\n" % (resp.MAX_ARRAY + 1), 1024)
    with pytest.raises(ProtocolError, match="nested"):
        parse(b"*1\r\n" * (resp.MAX_DEPTH + 1) + b":1\r\n", 1024)
    assert parse(b"*1\r\n" * resp.MAX_DEPTH + b":1\r\n", 1024) is not None  # the limit itself is fine
    with pytest.raises(ProtocolError, match="too long"):  # a line that never ends
        Parser(lambda: b"+" + b"x" * 65536).read()


def test_a_reply_larger_than_the_total_budget_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resp, "MAX_REPLY", 100)
    assert parse(b"*2\r\n$30\r\n" + b"a" * 30 + b"\r\n$30\r\n" + b"b" * 30 + b"\r\n", 1024) == ["a" * 30, "b" * 30]
    with pytest.raises(ProtocolError, match="too large"):
        parse(b"*4\r\n" + (b"$30\r\n" + b"a" * 30 + b"\r\n") * 4, 1024)


# -- URLs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "parsed"), [
    ("redis://127.0.0.1:6380/2", ("127.0.0.1", 6380, "", None, 2, False)),
    ("redis://redis.example", ("redis.example", 6379, "", None, 0, False)),
    ("rediss://pbx@h:1/0", ("h", 1, "", "pbx", 0, True)),
    ("redis://us%40er@[::1]:7000/3", ("::1", 7000, "", "us@er", 3, False)),
    ("redis://[::1]/", ("::1", 6379, "", None, 0, False)),
    ("unix:///run/redis/redis.sock?db=4", ("", 0, "/run/redis/redis.sock", None, 4, False)),
    ("unix:///run/redis.sock", ("", 0, "/run/redis.sock", None, 0, False)),
])
def test_urls(url: str, parsed: tuple[Any, ...]) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", [
    "http://h/", "redis://", "redis://:6379/0", "redis://h:0/", "redis://h:99999/", "redis://h:x/",
    "redis://h/x", "redis://[::1/0", "unix://relative.sock", "redis://h/0?socket_timeout=1", "redis://h/0?db=x",
])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


# -- connections against scripted servers ------------------------------------------------


class FakeServer:
    """A loopback server answering each command with ``handler(args)``: bytes to send,
    None to send nothing (and keep the connection open), b"" to close it, a list of
    pieces to send slowly."""

    def __init__(self, handler: Callable[[list[str]], Any]):
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.commands: list[list[str]] = []
        self.open: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        parser = Parser(lambda: conn.recv(4096))
        for _ in range(50):  # bounded
            try:
                args = parser.read()
            except (OSError, resp.RedisError):
                return
            self.commands.append(args)
            answer = self.handler(args)
            if answer == b"":
                conn.close()
                return
            if isinstance(answer, list):  # a slow server: one piece every 0.3 s
                for piece in answer:
                    time.sleep(0.3)
                    try:
                        conn.sendall(piece)
                    except OSError:
                        return
            elif answer is not None:
                conn.sendall(answer)

    def endpoint(self, **kwargs: Any) -> Endpoint:
        return Endpoint(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self) -> None:
        self.listener.close()
        for conn in self.open:
            conn.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[list[str]], bytes | None]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(handler: Callable[[list[str]], bytes | None]) -> FakeServer:
        servers.append(FakeServer(handler))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_a_server_that_sends_nothing_times_out(fake: Any) -> None:
    server = fake(lambda args: None)
    client = Client(endpoint=server.endpoint(), connect_timeout=1.0, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="Timeout"):
        client.call("PING")
    assert 0.4 < time.monotonic() - started < 3.0


def test_a_server_that_trickles_bytes_still_times_out_per_call(fake: Any) -> None:
    # A byte every 0.3 s for 3 s: each recv is quick, the call as a whole is not.
    server = fake(lambda args: [b"*9\r\n"] + [b":1\r\n"] * 9)
    client = Client(endpoint=server.endpoint(), connect_timeout=1.0, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.call("PING")
    assert 0.9 < time.monotonic() - started < 2.0


def test_auth_and_select_come_first_and_an_error_reply_keeps_the_connection(fake: Any) -> None:
    answers = {"AUTH": b"+OK\r\n", "SELECT": b"+OK\r\n", "GET": b"-ERR nope\r\n", "PING": b"+PONG\r\n"}
    server = fake(lambda args: answers[args[0]])
    client = Client(endpoint=server.endpoint(username="pbx", password="pw", db=3), connect_timeout=1, timeout=1)
    with pytest.raises(ResponseError, match="ERR nope"):
        client.call("GET", "k")
    assert client.call("PING") == "PONG"
    assert server.commands == [["AUTH", "pbx", "pw"], ["SELECT", "3"], ["GET", "k"], ["PING"]]
    assert len(server.open) == 1
    client.close()


def test_a_malformed_reply_drops_the_connection_and_the_next_call_reconnects(fake: Any) -> None:
    replies = iter([b"$3\r\nabcdef\r\n", b"+PONG\r\n"])
    server = fake(lambda args: next(replies))
    client = Client(endpoint=server.endpoint(), connect_timeout=1, timeout=1)
    with pytest.raises(ProtocolError):
        client.call("PING")
    assert client.call("PING") == "PONG"
    assert len(server.open) == 2


def test_a_refused_password_is_an_authentication_error(fake: Any) -> None:
    server = fake(lambda args: b"-WRONGPASS invalid username-password pair\r\n")
    client = Client(endpoint=server.endpoint(password="secret-pw"), connect_timeout=1, timeout=1)
    with pytest.raises(resp.AuthenticationError) as info:
        client.call("PING")
    assert "secret-pw" not in str(info.value)


def test_nobody_listening_is_a_connection_error() -> None:
    client = Client(endpoint=Endpoint(host="127.0.0.1", port=free_port()), connect_timeout=1, timeout=1)
    with pytest.raises(ConnectionError, match="Error connecting"):
        client.call("PING")


def redis_state(url: str) -> Any:
    return open_store(Config.from_mapping({"state": {"backend": "redis", "redis": {
        "url": url, "connect_timeout": 1.0, "timeout": 1.0}}}).state)


@pytest.mark.parametrize("reply", [b"-ERR something broke\r\n", b"*2\r\n:1\r\n-ERR half\r\n", b"%1\r\n", b""])
def test_the_store_turns_error_replies_and_garbage_into_unavailable(fake: Any, reply: bytes) -> None:
    server = fake(lambda args: reply)
    store = redis_state(f"redis://127.0.0.1:{server.port}/0")
    with pytest.raises(StateUnavailable, match=r"^redis accept code: "):
        store.accept_totp_step("1001", 1, 0.0)
    with pytest.raises(StateUnavailable):
        store.lock_status("1001", 0.0)
    store.close()


# -- Sentinel ---------------------------------------------------------------------------


def sentinel_answering(master_port: int | None) -> Callable[[list[str]], bytes | None]:
    def answer(args: list[str]) -> bytes:
        assert args[:2] == ["SENTINEL", "get-master-addr-by-name"]
        if master_port is None:
            return b"*-1\r\n"
        return b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%d\r\n" % (len(str(master_port)), master_port)
    return answer


def node(role: str) -> Callable[[list[str]], bytes | None]:
    hello = b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:2\r\n$4\r\nrole\r\n$%d\r\n%s\r\n" % (
        len(role), role.encode())
    return lambda args: hello if args == ["HELLO", "2"] else b"+PONG\r\n"


def test_sentinels_are_asked_in_order_until_one_names_a_real_master(fake: Any) -> None:
    master, replica = fake(node("master")), fake(node("replica"))
    down = Endpoint(host="127.0.0.1", port=free_port())
    unknown, stale, good = fake(sentinel_answering(None)), fake(sentinel_answering(replica.port)), \
        fake(sentinel_answering(master.port))
    client = Client(sentinels=[down, unknown.endpoint(), stale.endpoint(), good.endpoint()], service_name="m",
                    master=Endpoint(), connect_timeout=1, timeout=1)
    assert client.call("PING") == "PONG"
    assert master.commands == [["HELLO", "2"], ["PING"]]
    assert replica.commands == [["HELLO", "2"]]  # asked, refused: it is not the master
    assert unknown.commands == stale.commands == good.commands == [["SENTINEL", "get-master-addr-by-name", "m"]]


def test_no_sentinel_naming_a_master_is_master_not_found(fake: Any) -> None:
    replica, silent = fake(node("replica")), fake(lambda args: None)
    client = Client(sentinels=[fake(sentinel_answering(replica.port)).endpoint(), silent.endpoint()],
                    service_name="m", master=Endpoint(), connect_timeout=1, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(MasterNotFoundError, match="No master found for 'm'") as info:
        client.call("PING")
    assert "not a master" in str(info.value) and "TimeoutError" in str(info.value)
    assert time.monotonic() - started < 4.0


# -- a real server ------------------------------------------------------------------------


def test_against_redis_server(redis_server: RedisServer) -> None:
    host, port, _, _, _, _ = parse_url(redis_server.url)
    client = Client(endpoint=Endpoint(host=host, port=port, db=1), connect_timeout=2, timeout=2)
    assert client.call("SET", "k", "vé") == "OK"
    assert client.call("GET", "k") == "vé"
    assert client.call("GET", "missing") is None
    assert client.call("RPUSH", "l", "a", "b", 3) == 3
    assert client.call("LRANGE", "l", 0, -1) == ["a", "b", "3"]
    assert client.call("EVAL", "return {1, false, 'x', {2, {}}}", 0) == [1, None, "x", [2, []]]
    with pytest.raises(ResponseError, match="unknown command"):
        client.call("NOSUCHCOMMAND")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        client.call("HGET", "l", "f")
    assert client.call("PING") == "PONG"
    assert redis_server.client(db=1).get("k") == "vé"  # SELECT took effect
    client.close()
