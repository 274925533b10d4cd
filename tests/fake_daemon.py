"""A fake linkusd for the native PAM module's tests: scripted good conversations and hostile peers.

It has its own small encoder/decoder written from docs/protocol.md (not pam_linkus.protocol), so the
C module and the lead's Python side are each checked against an independent reading of the spec.

Run as a separate process (``python3 fake_daemon.py CONFIG_JSON``) so that it can drop to another uid
before listen() (SO_PEERCRED reports the credentials of the listening process at listen() time) and so
that a login under valgrind or ASan never shares a GIL with it. Every connection is recorded as one JSON
line: the frames the client sent (decoded strictly) and any protocol error the fake found in them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1
FRAME_MAX = 4096

START, ANSWER, NO_ANSWER, STATUS, RELOAD = 0x01, 0x02, 0x03, 0x04, 0x05
PROMPT, INFO, RESULT, SPLIT, STATUS_REPLY = 0x10, 0x11, 0x20, 0x21, 0x22

FIELD_NAMES = {
    0x01: "MODE", 0x02: "USER", 0x03: "SERVICE", 0x04: "PROFILE", 0x05: "RHOST", 0x06: "TTY",
    0x07: "RUSER", 0x08: "FLAGS", 0x09: "KEPT", 0x0A: "TEXT", 0x0B: "STYLE", 0x0C: "OUTCOME",
    0x0D: "DIGITS", 0x0E: "JSON", 0x0F: "PROMPT", 0x10: "DEADLINE",
}
TAGS = {name: tag for tag, name in FIELD_NAMES.items()}
#: (min, max) length of each field.
FIELD_LIMITS = {
    "MODE": (1, 1), "USER": (0, 256), "SERVICE": (1, 128), "PROFILE": (1, 64), "RHOST": (0, 1024),
    "TTY": (0, 256), "RUSER": (0, 256), "FLAGS": (4, 4), "KEPT": (0, 16), "TEXT": (0, 512),
    "STYLE": (1, 1), "OUTCOME": (1, 1), "DIGITS": (1, 1), "JSON": (0, 65000), "PROMPT": (1, 200),
    "DEADLINE": (9, 9),
}
#: Client -> daemon messages: (allowed fields, required fields).
CLIENT_MESSAGES = {
    START: ({"MODE", "USER", "SERVICE", "PROFILE", "RHOST", "TTY", "RUSER", "FLAGS", "KEPT", "PROMPT", "DEADLINE"},
            {"MODE", "USER", "SERVICE"}),
    ANSWER: ({"TEXT", "DEADLINE"}, {"TEXT"}),
    NO_ANSWER: (set(), set()),
}
OUTCOMES = {"success": 0, "skip": 1, "denied": 2, "locked": 3, "unavailable": 4, "conversation": 5}


class ProtocolError(Exception):
    """The client sent something docs/protocol.md does not allow."""


# ------------------------------------------------------------------ encoding


def encode_field(tag: int | str, value: bytes | str | int) -> bytes:
    """One field; an int value is one byte (STYLE, OUTCOME, DIGITS, MODE)."""
    if isinstance(tag, str):
        tag = TAGS[tag]
    if isinstance(value, int):
        value = bytes([value])
    elif isinstance(value, str):
        value = value.encode()
    return struct.pack(">BH", tag, len(value)) + value


def encode_frame(msg_type: int, fields: Iterable[tuple[int | str, bytes | str | int]] = (), *,
                 version: int = VERSION, length: int | None = None, raw_fields: bytes = b"") -> bytes:
    """A frame; ``version``, ``length`` and ``raw_fields`` let a test build hostile ones."""
    body = bytes([version, msg_type]) + b"".join(encode_field(t, v) for t, v in fields) + raw_fields
    return struct.pack(">I", len(body) if length is None else length) + body


def prompt(text: str, style: int = 1) -> bytes:
    return encode_frame(PROMPT, [("STYLE", style), ("TEXT", text)])


def info(text: str, style: int = 4) -> bytes:
    return encode_frame(INFO, [("STYLE", style), ("TEXT", text)])


def result(outcome: int | str) -> bytes:
    return encode_frame(RESULT, [("OUTCOME", OUTCOMES[outcome] if isinstance(outcome, str) else outcome)])


def split(digits: int, text: str | None = None) -> bytes:
    fields: list[tuple[int | str, bytes | str | int]] = [("DIGITS", digits)]
    if text is not None:
        fields.append(("TEXT", text))
    return encode_frame(SPLIT, fields)


# ------------------------------------------------------------------ decoding


@dataclass
class Frame:
    type: int
    fields: dict[str, bytes] = field(default_factory=dict)

    def text(self, name: str) -> str:
        return self.fields[name].decode("utf-8", "replace")


def decode_body(body: bytes, messages: dict[int, tuple[set[str], set[str]]] = CLIENT_MESSAGES) -> Frame:
    """Decode and check one frame body against the spec; raise ProtocolError."""
    if len(body) < 2 or len(body) > FRAME_MAX:
        raise ProtocolError(f"body of {len(body)} bytes")
    if body[0] != VERSION:
        raise ProtocolError(f"version {body[0]}")
    if body[1] not in messages:
        raise ProtocolError(f"type 0x{body[1]:02x}")
    allowed, required = messages[body[1]]
    frame = Frame(body[1])
    pos = 2
    while pos < len(body):
        if len(body) - pos < 3:
            raise ProtocolError("truncated field header")
        tag, flen = struct.unpack_from(">BH", body, pos)
        pos += 3
        name = FIELD_NAMES.get(tag, f"0x{tag:02x}")
        if name not in allowed:
            raise ProtocolError(f"field {name} not allowed")
        if name in frame.fields:
            raise ProtocolError(f"field {name} repeated")
        if pos + flen > len(body):
            raise ProtocolError(f"field {name} overruns")
        low, high = FIELD_LIMITS[name]
        if not low <= flen <= high:
            raise ProtocolError(f"field {name} of {flen} bytes")
        frame.fields[name] = body[pos:pos + flen]
        pos += flen
    missing = required - frame.fields.keys()
    if missing:
        raise ProtocolError(f"missing {sorted(missing)}")
    if frame.type == ANSWER and len(frame.fields["TEXT"]) > 257:
        raise ProtocolError("answer over 257 bytes")
    if "FLAGS" in frame.fields and int.from_bytes(frame.fields["FLAGS"], "big") & ~0b11:
        raise ProtocolError("unknown FLAGS bits")
    if "DEADLINE" in frame.fields and frame.fields["DEADLINE"][0] != 1:
        raise ProtocolError("DEADLINE of an unknown clock")
    return frame


class PeerClosed(Exception):
    pass


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise PeerClosed
        data += chunk
    return data


def read_frame(conn: socket.socket) -> Frame:
    (length,) = struct.unpack(">I", recv_exact(conn, 4))
    if not 2 <= length <= FRAME_MAX:
        raise ProtocolError(f"length {length}")
    return decode_body(recv_exact(conn, length))


# ------------------------------------------------------------------ the server process


class Session:
    """One connection: reads and records the client's frames, plays one behaviour."""

    def __init__(self, conn: socket.socket, behaviour: dict[str, Any]):
        self.conn = conn
        self.b = behaviour
        self.frames: list[Frame] = []
        self.error = ""

    def read(self) -> Frame:
        frame = read_frame(self.conn)
        self.frames.append(frame)
        return frame

    def hold(self) -> None:
        """Say nothing until the client gives up (bounded)."""
        self.conn.settimeout(float(self.b.get("hold", 60)))
        try:
            while self.conn.recv(4096):
                pass
        except OSError:
            pass

    def play(self) -> None:
        kind = self.b["kind"]
        if kind == "no_read":
            self.hold()
            return
        if kind == "turn_away":
            # as linkusd turns a caller away: closed at once, nothing read (after "after" seconds, the
            # client's START waits unread, and the close becomes a reset)
            time.sleep(float(self.b.get("after", 0)))
            return
        start = self.read()
        if start.type != START:
            raise ProtocolError("first frame is not START")
        if kind == "good":
            self.good(start)
        elif kind == "outcome":
            self.conn.sendall(result(self.b["outcome"]))
        elif kind == "raw":
            self.conn.sendall(bytes.fromhex(self.b["send"]))
            if self.b.get("then") == "hold":
                self.hold()
        elif kind == "drip":
            for byte in bytes.fromhex(self.b["send"]):
                self.conn.sendall(bytes([byte]))
                time.sleep(float(self.b.get("interval", 1.0)))
        elif kind == "close_after_prompt":
            self.conn.sendall(prompt("Verification code: "))
            self.read()
        elif kind == "hold_after_answer":
            self.conn.sendall(prompt("Verification code: "))
            self.read()
            self.hold()
        else:
            raise ValueError(kind)

    def good(self, start: Frame) -> None:
        code = self.b.get("code", "123456")
        if start.fields["MODE"] == b"\x02":
            self.conn.sendall(split(int(self.b.get("digits", 6)), self.b.get("split_text")))
            return
        if "KEPT" in start.fields:
            kept = start.fields["KEPT"]
            # an empty code after a 0-digit split: the extension has no 2FA, as linkusd would say
            verdict = "success" if kept == code.encode() else "skip" if kept == b"" and self.b.get("digits") == 0 \
                else "denied"
            self.conn.sendall(result(verdict))
            return
        for style, text in self.b.get("infos", []):
            self.conn.sendall(info(text, style))
        for _ in range(int(self.b.get("prompts", 1))):
            self.conn.sendall(prompt(self.b.get("prompt", "Verification code: "), int(self.b.get("style", 1))))
            reply = self.read()
            if reply.type == NO_ANSWER:
                self.conn.sendall(result("conversation"))
                return
        answer = self.frames[-1].fields["TEXT"]
        self.conn.sendall(result("success" if answer == code.encode() else "denied"))


def serve(config: dict[str, Any]) -> None:
    path = config["socket"]
    record = open(config["record"], "a", buffering=1)  # opened before any uid change
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    if config.get("peer_uid") is not None:
        # listen() after setuid: SO_PEERCRED shows the client the uid of the process that listened.
        os.setgid(int(config["peer_uid"]))
        os.setgroups([])
        os.setuid(int(config["peer_uid"]))
    behaviour = config["behaviour"]
    listener.listen(0 if behaviour["kind"] == "no_accept" else 64)
    print("ready", flush=True)
    if behaviour["kind"] == "no_accept":  # a hung daemon: connections queue up, none is served
        time.sleep(float(behaviour.get("hold", 60)))
        return
    while True:
        conn, _ = listener.accept()
        session = Session(conn, behaviour)
        conn.settimeout(float(behaviour.get("read_timeout", 30)))
        try:
            session.play()
        except ProtocolError as exc:
            session.error = f"protocol: {exc}"
        except PeerClosed:
            session.error = "closed"
        except OSError as exc:
            session.error = f"os: {type(exc).__name__}"
        finally:
            conn.close()
        record.write(json.dumps({
            "frames": [{"type": f.type, "fields": {k: v.hex() for k, v in f.fields.items()}}
                       for f in session.frames],
            "error": session.error,
        }) + "\n")


# ------------------------------------------------------------------ the tests' handle


class FakeDaemon:
    """Starts ``serve`` in its own process; ``connections()`` reads back what clients sent."""

    def __init__(self, socket_path: Path, behaviour: dict[str, Any], *, peer_uid: int | None = None):
        self.socket_path = socket_path
        self.record_path = socket_path.with_name(socket_path.name + ".record")
        self.record_path.write_text("")
        os.chmod(self.record_path, 0o666)  # a daemon that dropped to nobody still records
        config = {"socket": str(socket_path), "record": str(self.record_path), "behaviour": behaviour,
                  "peer_uid": peer_uid}
        self.proc = subprocess.Popen([sys.executable, "-P", __file__, json.dumps(config)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"fake daemon did not start: {line!r}")

    def connections(self, wait_for: int = 0, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The recorded connections: {"frames": [Frame, ...], "error": str}."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [json.loads(x) for x in self.record_path.read_text().splitlines() if x]
            if len(lines) >= wait_for or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return [{"frames": [Frame(f["type"], {k: bytes.fromhex(v) for k, v in f["fields"].items()})
                            for f in c["frames"]], "error": c["error"]} for c in lines]

    def stop(self) -> None:
        # here, not at the top: the daemon's own process runs this file with -P, without tests/ on its path
        from plumbing import stop_process

        stop_process(self.proc, timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
