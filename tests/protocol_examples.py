"""Frames of docs/protocol.md written out byte by byte, good and hostile.

Written by hand from the spec (not with pam_linkus.protocol), so the Python
codec is checked against the spec and not against itself. The daemon is tested
with the client->daemon frames (tests/test_protocol.py, tests/test_daemon.py);
the C module with the daemon->client ones (tests/fake_daemon.py).
"""

from __future__ import annotations

import struct


def field(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + struct.pack(">H", len(value)) + value


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def body(msg_type: int, *fields: bytes, version: int = 1) -> bytes:
    return bytes([version, msg_type]) + b"".join(fields)


def deadline(ms: int, clock: int = 1) -> bytes:
    """The DEADLINE field: clock:u8 (1 = CLOCK_MONOTONIC, milliseconds), then ms:u64."""
    return field(0x10, bytes([clock]) + struct.pack(">Q", ms))


# -- good, client -> daemon ------------------------------------------------------

START_AUTH = frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"alice"), field(0x03, b"sshd"),
                        field(0x05, b"192.0.2.7"), field(0x06, b"ssh"), field(0x08, b"\x00\x00\x00\x00")))
START_SPLIT = frame(body(0x01, field(0x01, b"\x02"), field(0x02, b"alice"), field(0x03, b"pbx-web")))
START_KEPT = frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"alice"), field(0x03, b"pbx-web"),
                        field(0x09, b"123456")))
ANSWER = frame(body(0x02, field(0x0A, b"123456")))
#: The client's give-up deadline (CLOCK_MONOTONIC 1,000,000.5 s) with START and with ANSWER.
START_DEADLINE = frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"alice"), field(0x03, b"sshd"),
                            deadline(1_000_000_500)))
ANSWER_DEADLINE = frame(body(0x02, field(0x0A, b"123456"), deadline(1_000_000_500)))
#: An empty user name is a login like any other (denied by linkusd as an invalid name).
START_EMPTY_USER = frame(body(0x01, field(0x01, b"\x01"), field(0x02, b""), field(0x03, b"sshd")))
NO_ANSWER = frame(body(0x03))
STATUS = frame(body(0x04))

GOOD_CLIENT = {"start_auth": START_AUTH, "start_split": START_SPLIT, "start_kept": START_KEPT,
               "answer": ANSWER, "no_answer": NO_ANSWER, "status": STATUS, "start_deadline": START_DEADLINE,
               "answer_deadline": ANSWER_DEADLINE, "start_empty_user": START_EMPTY_USER}

# -- good, daemon -> client ------------------------------------------------------

PROMPT = frame(body(0x10, field(0x0B, b"\x01"), field(0x0A, b"Authentication code: ")))
INFO = frame(body(0x11, field(0x0B, b"\x04"), field(0x0A, b"A code was sent to a***@example.com.")))
RESULT = {name: frame(body(0x20, field(0x0C, bytes([code]))))
          for name, code in (("success", 0), ("skip", 1), ("denied", 2), ("locked", 3), ("unavailable", 4),
                             ("conversation", 5))}
SPLIT = frame(body(0x21, field(0x0D, b"\x06"), field(0x0A, b"Password & verification code: ")))

# -- hostile, either direction: (name, bytes, what the receiver must say) --------

HOSTILE_CLIENT = [
    ("wrong version", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x03, b"s"), version=2)),
     "version"),
    ("unknown type", frame(body(0x7F)), "unknown message type"),
    ("daemon type from a client", RESULT["success"], "not expected"),
    ("oversized length", struct.pack(">I", 1 << 30) + b"\x01\x01", "over the limit"),
    ("too short", struct.pack(">I", 1) + b"\x01", "too short"),
    ("unknown field", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x03, b"s"),
                                 field(0x55, b"x"))), "unknown field"),
    ("field not allowed", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x03, b"s"),
                                     field(0x0C, b"\x00"))), "not allowed"),
    ("repeated field", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x02, b"b"),
                                  field(0x03, b"s"))), "repeated"),
    ("field overruns", frame(body(0x01, field(0x01, b"\x01"), bytes([0x02]) + struct.pack(">H", 100) + b"abc")),
     "overruns"),
    ("field header cut", frame(body(0x01, field(0x01, b"\x01"), b"\x02\x00")), "overruns"),
    ("user too long", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a" * 257), field(0x03, b"s"))),
     "allowed 0..256"),
    ("deadline too short", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x03, b"s"),
                                      field(0x10, b"\x01" + b"\x00" * 7))), "allowed 9..9"),
    ("deadline of an unknown clock", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"), field(0x03, b"s"),
                                                deadline(5, clock=2))), "unknown clock"),
    ("deadline in STATUS", frame(body(0x04, deadline(5))), "not allowed"),
    ("missing service", frame(body(0x01, field(0x01, b"\x01"), field(0x02, b"a"))), "missing field SERVICE"),
    ("answer too long", frame(body(0x02, field(0x0A, b"1" * 513))), "allowed 0..512"),
]

HOSTILE_DAEMON = [
    ("wrong version", frame(body(0x20, field(0x0C, b"\x00"), version=9))),
    ("unknown type", frame(body(0x66))),
    ("unknown outcome", frame(body(0x20, field(0x0C, b"\x09")))),
    ("result without outcome", frame(body(0x20))),
    ("oversized length", struct.pack(">I", 0x7FFFFFFF) + b"\x01\x20"),
    ("truncated", frame(body(0x20, field(0x0C, b"\x00")))[:-1]),
    ("field overruns", frame(body(0x10, field(0x0B, b"\x01"), bytes([0x0A]) + struct.pack(">H", 4000) + b"x"))),
    ("prompt too long", frame(body(0x10, field(0x0B, b"\x01"), field(0x0A, b"P" * 600)))),
    ("unknown style", frame(body(0x10, field(0x0B, b"\x09"), field(0x0A, b"Code: ")))),
    ("garbage", b"\xde\xad\xbe\xef" * 8),
]
