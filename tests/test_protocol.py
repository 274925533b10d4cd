"""pam_linkus.protocol against the hand-written frames of tests/protocol_examples.py."""

from __future__ import annotations

import struct

import protocol_examples as ex
import pytest

from pam_linkus import protocol
from pam_linkus.protocol import F, Msg, ProtocolError


def decode(frame: bytes, expected: set[Msg], max_body: int = protocol.PAM_MAX_BODY) -> protocol.Message:
    length = protocol.body_length(frame[:4], max_body)
    body = frame[4:]
    assert len(body) == length, "example frame is not whole"
    return protocol.decode_body(body, expected)


def test_encoder_writes_the_spec_bytes() -> None:
    assert protocol.encode(Msg.START, {F.MODE: 2, F.USER: "alice", F.SERVICE: "pbx-web"}) == ex.START_SPLIT
    assert protocol.encode(Msg.ANSWER, {F.TEXT: "123456"}) == ex.ANSWER
    assert protocol.encode(Msg.NO_ANSWER) == ex.NO_ANSWER
    assert protocol.encode(Msg.PROMPT, {F.STYLE: 1, F.TEXT: "Authentication code: "}) == ex.PROMPT
    assert protocol.encode(Msg.SPLIT, {F.DIGITS: 6, F.TEXT: "Password & verification code: "}) == ex.SPLIT
    for name, code in protocol.OUTCOME_CODES.items():
        assert protocol.encode(Msg.RESULT, {F.OUTCOME: code}) == ex.RESULT[name]


def test_good_client_frames_decode() -> None:
    start = decode(ex.START_AUTH, set(protocol.PAM_OPENERS))
    assert start.type == Msg.START
    assert start.text(F.USER) == "alice" and start.text(F.RHOST) == "192.0.2.7" and start.u32(F.FLAGS) == 0
    kept = decode(ex.START_KEPT, set(protocol.PAM_OPENERS))
    assert kept.fields[F.KEPT] == b"123456"
    assert decode(ex.ANSWER, {Msg.ANSWER, Msg.NO_ANSWER}).fields[F.TEXT] == b"123456"
    assert decode(ex.NO_ANSWER, {Msg.ANSWER, Msg.NO_ANSWER}).type == Msg.NO_ANSWER
    assert decode(ex.START_EMPTY_USER, set(protocol.PAM_OPENERS)).fields[F.USER] == b""


def test_deadline_field_is_the_clients_monotonic_give_up_time() -> None:
    """START and ANSWER may carry DEADLINE: CLOCK_MONOTONIC milliseconds; read as time.monotonic() seconds."""
    now = 1_000_000.0
    for frame, expected in ((ex.START_DEADLINE, protocol.PAM_OPENERS), (ex.ANSWER_DEADLINE, {Msg.ANSWER})):
        assert decode(frame, set(expected)).deadline(now) == 1_000_000.5
    assert decode(ex.START_AUTH, set(protocol.PAM_OPENERS)).deadline(now) is None
    assert decode(ex.START_DEADLINE, set(protocol.PAM_OPENERS)).deadline(2_000_000.0) == 1_000_000.5  # passed
    # bounded: no client waits longer than timeout=300 for a frame, so further ahead is a protocol error
    with pytest.raises(ProtocolError, match="DEADLINE"):
        decode(ex.START_DEADLINE, set(protocol.PAM_OPENERS)).deadline(now - protocol.MAX_DEADLINE_AHEAD - 1)
    assert protocol.encode(Msg.ANSWER, {F.TEXT: "123456", F.DEADLINE: protocol.deadline_value(1_000_000.5)}) \
        == ex.ANSWER_DEADLINE


@pytest.mark.parametrize(("name", "frame", "says"), ex.HOSTILE_CLIENT, ids=[h[0] for h in ex.HOSTILE_CLIENT])
def test_hostile_client_frames_are_protocol_errors(name: str, frame: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        length = protocol.body_length(frame[:4], protocol.PAM_MAX_BODY)
        protocol.decode_body(frame[4:4 + length], set(protocol.PAM_OPENERS) | {Msg.ANSWER})


def test_encoder_refuses_out_of_limit_fields() -> None:
    with pytest.raises(ValueError, match="USER"):
        protocol.encode(Msg.START, {F.MODE: 1, F.USER: "a" * 257, F.SERVICE: "s"})
    with pytest.raises(ValueError, match="over"):
        protocol.encode(Msg.STATUS_REPLY, {F.JSON: b"x" * 5000})


def test_text_field_with_invalid_utf8_or_nul_is_an_error() -> None:
    msg = protocol.Message(Msg.START, {F.SERVICE: b"\xff\xfe"})
    with pytest.raises(ProtocolError, match="UTF-8"):
        msg.text(F.SERVICE)
    with pytest.raises(ProtocolError, match="NUL"):
        protocol.Message(Msg.START, {F.SERVICE: b"a\0b"}).text(F.SERVICE)


def test_json_must_be_an_object() -> None:
    raw = protocol.encode(Msg.WEB_CALL, {F.JSON: b"[1,2]"})
    msg = protocol.decode_body(raw[4:], {Msg.WEB_CALL})
    with pytest.raises(ProtocolError, match="object"):
        msg.json()
    assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
