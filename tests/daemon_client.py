"""A PAM-less client of linkusd's socket, for daemon tests: what pam_linkus.so does, in Python.

Used where a test needs control the C module does not give (hundreds of parked
conversations, a chosen real uid, a hostile byte stream); every feature also has
a test through real PAM (pam_linkus.so).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from pam_linkus import protocol
from pam_linkus.protocol import F, Msg

OUTCOMES = {code: name for name, code in protocol.OUTCOME_CODES.items()}


@dataclass
class Result:
    outcome: str
    prompts: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    digits: int | None = None


def start_frame(user: str, *, service: str = "sshd", mode: int = protocol.MODE_AUTHENTICATE,
                rhost: str | None = None, kept: str | None = None, profile: str | None = None) -> bytes:
    fields: dict[F, bytes | str | int] = {F.MODE: mode, F.USER: user.encode("utf-8", "surrogateescape"),
                                          F.SERVICE: service}
    if rhost is not None:
        fields[F.RHOST] = rhost
    if kept is not None:
        fields[F.KEPT] = kept
    if profile is not None:
        fields[F.PROFILE] = profile
    return protocol.encode(Msg.START, fields)


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def converse(path: str, user: str, answers: list[str | None] | None = None, *, timeout: float = 20.0,
             **start: object) -> Result:
    """One transaction: START, then each PROMPT gets the next answer (None: NO_ANSWER)."""
    queue = list(answers or [])
    deadline = time.monotonic() + timeout
    result = Result("?")
    with connect(path, timeout) as sock:
        sock.sendall(start_frame(user, **start))  # type: ignore[arg-type]
        while True:
            msg = protocol.recv_message(sock, {Msg.PROMPT, Msg.INFO, Msg.RESULT, Msg.SPLIT}, deadline=deadline)
            if msg.type == Msg.RESULT:
                result.outcome = OUTCOMES[msg.byte(F.OUTCOME)]
                return result
            if msg.type == Msg.SPLIT:
                result.outcome = "split"
                result.digits = msg.byte(F.DIGITS)
                return result
            text = msg.text(F.TEXT) or ""
            if msg.type == Msg.INFO:
                result.infos.append(text)
                continue
            result.prompts.append(text)
            answer = queue.pop(0) if queue else None
            if answer is None:
                sock.sendall(protocol.encode(Msg.NO_ANSWER))
            else:
                sock.sendall(protocol.encode(Msg.ANSWER, {F.TEXT: answer.encode("utf-8", "surrogateescape")}))


def park(path: str, user: str, **start: object) -> tuple[socket.socket, str]:
    """Open a login and leave it at its first prompt (or end); returns the socket and what came first."""
    sock = connect(path)
    sock.sendall(start_frame(user, **start))  # type: ignore[arg-type]
    msg = protocol.recv_message(sock, {Msg.PROMPT, Msg.INFO, Msg.RESULT}, deadline=time.monotonic() + 10)
    if msg.type == Msg.RESULT:
        return sock, OUTCOMES[msg.byte(F.OUTCOME)]
    return sock, msg.type.name.lower()
