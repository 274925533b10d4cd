"""The linkusd wire protocol, version 1: the Python side of docs/protocol.md.

Data only: message types, field tags, their limits, and the encoding. The C
module (native/pam_linkus.c) implements the same spec; both are tested against
the frames in tests/protocol_examples.py. Everything a peer sends is checked
here before anyone looks at it, so the daemon never handles an oversized,
repeated, unexpected or malformed field: any of those is a ProtocolError and
the connection is closed.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = 1
#: Largest body on the PAM socket and on the web socket.
PAM_MAX_BODY = 4096
WEB_MAX_BODY = 65536
#: Longest answer the daemon reads as an answer; a client cuts longer ones to ANSWER_CUT.
MAX_ANSWER = 256
ANSWER_CUT = MAX_ANSWER + 1
#: PROMPT + INFO frames in one transaction.
MAX_EXCHANGES = 16
#: Deepest nesting of arrays and objects in a JSON field (web calls are flat, replies two deep):
#: checked before decoding, so a hostile body never reaches the decoder's recursion limit.
MAX_JSON_DEPTH = 8
#: DEADLINE's clock: CLOCK_MONOTONIC in milliseconds (time.monotonic() on Linux), shared by the
#: login process and linkusd on one host. Another clock byte is a protocol error.
CLOCK_MONOTONIC_MS = 1
#: A client waits at most timeout=300 s for a frame: a DEADLINE further ahead is a protocol error.
MAX_DEADLINE_AHEAD = 301.0


class Msg(IntEnum):
    """Message types (docs/protocol.md, "Messages")."""

    START = 0x01
    ANSWER = 0x02
    NO_ANSWER = 0x03
    STATUS = 0x04
    RELOAD = 0x05
    PROMPT = 0x10
    INFO = 0x11
    RESULT = 0x20
    SPLIT = 0x21
    STATUS_REPLY = 0x22
    WEB_CALL = 0x40
    WEB_REPLY = 0x41


class F(IntEnum):
    """Field tags."""

    MODE = 0x01
    USER = 0x02
    SERVICE = 0x03
    PROFILE = 0x04
    RHOST = 0x05
    TTY = 0x06
    RUSER = 0x07
    FLAGS = 0x08
    KEPT = 0x09
    TEXT = 0x0A
    STYLE = 0x0B
    OUTCOME = 0x0C
    DIGITS = 0x0D
    JSON = 0x0E
    PROMPT = 0x0F
    DEADLINE = 0x10


#: (min, max) length of each field's value.
FIELD_LIMITS: dict[F, tuple[int, int]] = {
    F.MODE: (1, 1),
    F.USER: (0, 256),
    F.SERVICE: (1, 128),
    F.PROFILE: (1, 64),
    F.RHOST: (0, 1024),
    F.TTY: (0, 256),
    F.RUSER: (0, 256),
    F.FLAGS: (4, 4),
    F.KEPT: (0, 16),
    F.TEXT: (0, 512),
    F.STYLE: (1, 1),
    F.OUTCOME: (1, 1),
    F.DIGITS: (1, 1),
    F.JSON: (0, 65000),
    F.PROMPT: (1, 200),
    F.DEADLINE: (9, 9),
}

#: For each message type: (required fields, optional fields).
MESSAGE_FIELDS: dict[Msg, tuple[frozenset[F], frozenset[F]]] = {
    Msg.START: (
        frozenset({F.MODE, F.USER, F.SERVICE}),
        frozenset({F.PROFILE, F.RHOST, F.TTY, F.RUSER, F.FLAGS, F.KEPT, F.PROMPT, F.DEADLINE}),
    ),
    Msg.ANSWER: (frozenset({F.TEXT}), frozenset({F.DEADLINE})),
    Msg.NO_ANSWER: (frozenset(), frozenset()),
    Msg.STATUS: (frozenset(), frozenset()),
    Msg.RELOAD: (frozenset(), frozenset()),
    Msg.PROMPT: (frozenset({F.STYLE, F.TEXT}), frozenset()),
    Msg.INFO: (frozenset({F.STYLE, F.TEXT}), frozenset()),
    Msg.RESULT: (frozenset({F.OUTCOME}), frozenset()),
    Msg.SPLIT: (frozenset({F.DIGITS}), frozenset({F.TEXT})),
    Msg.STATUS_REPLY: (frozenset({F.JSON}), frozenset()),
    Msg.WEB_CALL: (frozenset({F.JSON}), frozenset()),
    Msg.WEB_REPLY: (frozenset({F.JSON}), frozenset()),
}

MODE_AUTHENTICATE = 1
MODE_SPLIT = 2
FLAG_SILENT = 1
FLAG_ECHO_CODE = 2
STYLE_ECHO_OFF = 1
STYLE_ECHO_ON = 2
STYLE_ERROR = 3
STYLE_INFO = 4

#: OUTCOME byte <-> outcome name (pam_linkus.outcome.Outcome values).
OUTCOME_CODES = {"success": 0, "skip": 1, "denied": 2, "locked": 3, "unavailable": 4, "conversation": 5}

#: What each socket may send to the daemon, at the start of a connection.
PAM_OPENERS = frozenset({Msg.START, Msg.STATUS, Msg.RELOAD})
WEB_OPENERS = frozenset({Msg.WEB_CALL})

_HEADER = struct.Struct(">I")
_FIELD = struct.Struct(">BH")


class ProtocolError(Exception):
    """The peer broke the protocol; the message says how (never a field's value)."""


class BadJSON(ProtocolError):
    """A whole frame whose JSON field is not one JSON object we accept: the web socket answers
    ``bad-request`` (the frame itself was fine, so the peer is still in step)."""


class PeerClosed(ProtocolError):
    """The peer closed the connection before a whole frame arrived."""


@dataclass(frozen=True)
class Message:
    """One decoded frame: its type and its fields' raw values."""

    type: Msg
    fields: dict[F, bytes] = field(default_factory=dict)

    def text(self, tag: F, default: str | None = None) -> str | None:
        """A text field as str; invalid UTF-8 or a NUL is a protocol error (callers that must
        treat bad bytes otherwise, like answers, read ``fields`` themselves)."""
        raw = self.fields.get(tag)
        if raw is None:
            return default
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"field {tag.name} is not UTF-8") from None
        if "\0" in value:
            raise ProtocolError(f"field {tag.name} holds a NUL")
        return value

    def byte(self, tag: F, default: int = 0) -> int:
        raw = self.fields.get(tag)
        return raw[0] if raw else default

    def u32(self, tag: F, default: int = 0) -> int:
        raw = self.fields.get(tag)
        return int.from_bytes(raw, "big") if raw else default

    def deadline(self, now: float) -> float | None:
        """DEADLINE as a time.monotonic() value (None: the client sent none): the moment the
        client gives up waiting for our next frame. ``now`` bounds it (MAX_DEADLINE_AHEAD)."""
        raw = self.fields.get(F.DEADLINE)
        if raw is None:
            return None
        when = int.from_bytes(raw[1:], "big") / 1000
        if when > now + MAX_DEADLINE_AHEAD:
            raise ProtocolError(f"field DEADLINE more than {MAX_DEADLINE_AHEAD:g} s ahead")
        return when

    def json(self) -> dict[str, object]:
        """The JSON field as an object; anything else is BadJSON: not UTF-8, not JSON, nested
        deeper than MAX_JSON_DEPTH, NaN/Infinity, a repeated key, an integer of thousands of digits."""
        raw = self.fields.get(F.JSON)
        if raw is None:
            raise BadJSON("JSON field missing")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("JSON field is not UTF-8") from None
        if _json_too_deep(text):
            raise BadJSON(f"JSON field nested deeper than {MAX_JSON_DEPTH}")
        try:
            value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except (ValueError, RecursionError):  # RecursionError: only if MAX_JSON_DEPTH were raised a lot
            raise BadJSON("JSON field is not valid JSON") from None
        if not isinstance(value, dict):
            raise BadJSON("JSON field is not an object")
        return value


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json_too_deep(text: str) -> bool:
    """True when arrays/objects nest deeper than MAX_JSON_DEPTH (brackets inside strings do not count).

    One linear pass (the string pattern cannot backtrack: its two branches never match the
    same character), over at most WEB_MAX_BODY characters; malformed text may count wrong,
    but then the decoder refuses it anyway.
    """
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """An object whose key repeats means two readers could see two different requests: refused."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("repeated key")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def encode(msg_type: Msg, fields: dict[F, bytes | str | int] | None = None, *, max_body: int = PAM_MAX_BODY) -> bytes:
    """One whole frame (length prefix included). Ints are written as one byte, except FLAGS (four)."""
    parts = [bytes((VERSION, msg_type))]
    for tag, value in (fields or {}).items():
        if isinstance(value, str):
            raw = value.encode("utf-8")
        elif isinstance(value, int):
            raw = value.to_bytes(4 if tag == F.FLAGS else 1, "big")
        else:
            raw = value
        low, high = FIELD_LIMITS[tag]
        if not low <= len(raw) <= high:
            raise ValueError(f"field {tag.name}: {len(raw)} bytes, allowed {low}..{high}")
        parts.append(_FIELD.pack(tag, len(raw)) + raw)
    body = b"".join(parts)
    if len(body) > max_body:
        raise ValueError(f"frame body of {len(body)} bytes is over {max_body}")
    return _HEADER.pack(len(body)) + body


def deadline_value(when: float) -> bytes:
    """The DEADLINE field's value for a time.monotonic() moment."""
    return bytes((CLOCK_MONOTONIC_MS,)) + int(when * 1000).to_bytes(8, "big")


def encode_json(msg_type: Msg, obj: dict[str, object]) -> bytes:
    return encode(msg_type, {F.JSON: json.dumps(obj, separators=(",", ":")).encode()}, max_body=WEB_MAX_BODY)


def body_length(header: bytes, max_body: int) -> int:
    """The body length a 4-byte header announces, checked against the limit."""
    (length,) = _HEADER.unpack(header)
    if length < 2:
        raise ProtocolError(f"frame of {length} bytes is too short")
    if length > max_body:
        raise ProtocolError(f"frame of {length} bytes is over the limit of {max_body}")
    return int(length)


#: Byte -> member, without an Enum call per field (a frame is decoded on every login).
_MSG_BY_CODE: dict[int, Msg] = {int(m): m for m in Msg}
_FIELD_BY_CODE: dict[int, F] = {int(f): f for f in F}


def decode_body(body: bytes, expected: frozenset[Msg] | set[Msg]) -> Message:
    """Check and decode a frame body; ``expected`` are the types acceptable at this point."""
    if body[0] != VERSION:
        raise ProtocolError(f"protocol version {body[0]}, expected {VERSION}")
    msg_type = _MSG_BY_CODE.get(body[1])
    if msg_type is None:
        raise ProtocolError(f"unknown message type 0x{body[1]:02x}")
    if msg_type not in expected:
        raise ProtocolError(f"message {msg_type.name} not expected here")
    required, optional = MESSAGE_FIELDS[msg_type]
    fields: dict[F, bytes] = {}
    pos = 2
    while pos < len(body):
        if pos + _FIELD.size > len(body):
            raise ProtocolError("field header overruns the frame")
        tag_byte, length = _FIELD.unpack_from(body, pos)
        pos += _FIELD.size
        tag = _FIELD_BY_CODE.get(tag_byte)
        if tag is None:
            raise ProtocolError(f"unknown field 0x{tag_byte:02x} in {msg_type.name}")
        if tag not in required and tag not in optional:
            raise ProtocolError(f"field {tag.name} not allowed in {msg_type.name}")
        if tag in fields:
            raise ProtocolError(f"field {tag.name} repeated")
        low, high = FIELD_LIMITS[tag]
        if not low <= length <= high:
            raise ProtocolError(f"field {tag.name} of {length} bytes, allowed {low}..{high}")
        if pos + length > len(body):
            raise ProtocolError(f"field {tag.name} overruns the frame")
        if tag == F.DEADLINE and body[pos] != CLOCK_MONOTONIC_MS:
            raise ProtocolError(f"field DEADLINE of unknown clock {body[pos]}")
        fields[tag] = body[pos:pos + length]
        pos += length
    missing = required - fields.keys()
    if missing:
        raise ProtocolError("missing field " + ",".join(sorted(t.name for t in missing)))
    return Message(msg_type, fields)


def recv_message(sock: socket.socket, expected: frozenset[Msg] | set[Msg], *, deadline: float,
                 max_body: int = PAM_MAX_BODY) -> Message:
    """Read one frame from a blocking socket before ``deadline`` (time.monotonic) for the WHOLE frame,
    so a peer that sends a byte a second cannot stretch it."""
    header = _recv_exactly(sock, _HEADER.size, deadline)
    return decode_body(_recv_exactly(sock, body_length(header, max_body), deadline), expected)


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("peer too slow")
        sock.settimeout(remaining)
        chunk = sock.recv(left)
        if not chunk:
            raise PeerClosed("peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def call_web(socket_path: str, request: dict[str, object], *, timeout: float = 30.0) -> dict[str, object]:
    """One WEB_CALL on linkusd's web socket, blocking, with an overall deadline; the reply's object.

    Raises OSError (linkusd absent), TimeoutError or ProtocolError: linkus-web shows "unavailable".
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode_json(Msg.WEB_CALL, request))
        return recv_message(sock, {Msg.WEB_REPLY}, deadline=deadline, max_body=WEB_MAX_BODY).json()


def call_control(socket_path: str, msg_type: Msg = Msg.STATUS, *, timeout: float = 10.0) -> dict[str, object]:
    """STATUS or RELOAD on linkusd's PAM socket (root only), for `linkus-2fa doctor` / `status`."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode(msg_type))
        return recv_message(sock, {Msg.STATUS_REPLY}, deadline=deadline, max_body=WEB_MAX_BODY).json()

