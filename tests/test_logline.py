"""Log lines: no outside value can forge a field or a line; the sink never blocks and is thread-safe."""

from __future__ import annotations

import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_linkus.logline import LOG_INFO, SyslogSink, format_fields, quote

#: One field of a line as a reader (a SIEM rule) would split it.
FIELD = re.compile(r'([A-Za-z0-9_-]+)=("(?:[^"\\]|\\.)*"|[^ "]+)(?: |$)')

HOSTILE = [
    'a" result="success', "a result=success", "x\nJan  1 00:00:00 host sshd[1]: Accepted", "a=b", "",
    "tab\there", "nul\0byte", "esc\x1b[31m", "back\\slash\\", '\\"', "ümlaut", "\u2028line sep",
    b"\xff\xfeuser".decode("utf-8", "surrogateescape"), "emoji\U0001f600", "del\x7f",
]


def parse(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = FIELD.match(line, pos)
        assert match, f"unparseable at {pos}: {line!r}"
        assert match.group(1) not in fields, f"field {match.group(1)} twice: {line!r}"
        fields[match.group(1)] = match.group(2)
        pos = match.end()
    return fields


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("key", ["user", "rhost", "tty", "service", "ruser", "reason"])
def test_no_value_forges_a_field_or_a_line(key: str, value: str) -> None:
    line = format_fields({"result": "denied", key: value, "after": "x"})
    assert "\n" not in line and "\r" not in line and line.isascii() and line.isprintable()
    assert parse(line) == {"result": '"denied"', key: quote(value), "after": '"x"'}


def test_every_string_field_is_quoted_the_same_way() -> None:
    line = format_fields({"user": "alice", "rhost": "10.0.0.1", "tty": "/dev/pts/0", "service": "sshd",
                         "ruser": "bob", "reason": "wrong code", "failures": 3, "debug": True})
    assert line == ('user="alice" rhost="10.0.0.1" tty="/dev/pts/0" service="sshd" ruser="bob" '
                    'reason="wrong code" failures=3 debug=yes')


def test_escapes() -> None:
    assert quote('a"b') == r'"a\"b"' and quote("a\\b") == r'"a\\b"'
    assert quote("a\nb") == r'"a\x0ab"' and quote("ü") == r'"\xfc"' and quote("\u2028") == r'"\u2028"'
    assert quote(b"\xff\xfe") == r'"\xff\xfe"' and quote("\udcff") == r'"\xff"'
    assert quote("\U0001f600") == r'"\U0001f600"'
    assert quote("x" * 500) == '"' + "x" * 200 + '..."'


def test_field_names_are_checked() -> None:
    with pytest.raises(ValueError):
        format_fields({"user name": "x"})
    with pytest.raises(ValueError):
        format_fields({'a="b"': "x"})


class Receiver:
    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)

    def read(self) -> str:
        return self.sock.recv(65536).decode()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / f"log-{secrets.token_hex(4)}.sock")
    yield r
    r.sock.close()


def test_sink_writes_one_authpriv_datagram(receiver: Receiver) -> None:
    sink = SyslogSink(str(receiver.path), tag="t")
    assert sink.attempt(LOG_INFO, {"user": "a\nb", "result": "success"})
    line = receiver.read()
    assert re.fullmatch(r'<86>\w{3} [ \d]\d \d\d:\d\d:\d\d pam_linkus\(t\)\[\d+\]: user="a\\x0ab" result="success"',
                        line), line


def test_sink_reports_a_missing_syslog(tmp_path: Path) -> None:
    assert SyslogSink(str(tmp_path / "absent.sock")).send(LOG_INFO, "x") is False


def test_sink_never_blocks_on_a_full_syslog(receiver: Receiver) -> None:
    """Nobody reads the socket: once its queue is full, sends fail at once instead of waiting."""
    sink = SyslogSink(str(receiver.path))
    start = time.monotonic()
    results = [sink.send(LOG_INFO, "x" * 4000) for _ in range(2000)]
    assert time.monotonic() - start < 10
    assert results[0] is True and results[-1] is False


def test_sink_is_thread_safe(receiver: Receiver) -> None:
    sink = SyslogSink(str(receiver.path))
    seen: list[str] = []

    def drain() -> None:
        while len(seen) < 400:
            seen.append(receiver.read())

    reader = threading.Thread(target=drain)
    reader.start()

    def worker(n: int) -> None:
        for i in range(50):
            while not sink.attempt(LOG_INFO, {"thread": n, "i": i}):
                time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    reader.join(30)
    bodies = sorted(s.split(": ", 1)[1] for s in seen)
    assert bodies == sorted(f"thread={n} i={i}" for n in range(8) for i in range(50))
