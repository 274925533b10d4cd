"""linkusd's two sockets: who may ask, how much, and one transaction per connection.

Every connection is an asyncio task. While the flow waits for a person's answer
the task only awaits the socket: it holds no worker thread, and that wait has its
own long deadline (``answer_timeout``); the work between two answers runs in the
engine's pools under the short one (``work_timeout``). Caps bound what anyone
can hold: connections in all, per calling real uid (a local user running many
setuid `su` logins reaches us as euid 0, but keeps their real uid) and per
target account. A peer that breaks the protocol loses its connection and
nothing else.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pam_linkus import protocol
from pam_linkus.errors import ConversationFailed, LinkusError, Unavailable
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING
from pam_linkus.outcome import Decision, Outcome
from pam_linkus.protocol import F, Msg, ProtocolError

if TYPE_CHECKING:
    from pam_linkus.daemon.engine import Engine, Snapshot
    from pam_linkus.flow import Ask, Context, Info, LoginRequest, Steps
    from pam_linkus.web.api import SelfService

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")

_SEVERITY = {
    Outcome.SUCCESS: LOG_INFO,
    Outcome.SKIP: LOG_INFO,
    Outcome.DENIED: LOG_NOTICE,
    Outcome.LOCKED: LOG_WARNING,
    Outcome.UNAVAILABLE: LOG_ERR,
    Outcome.CONVERSATION: LOG_NOTICE,
}

#: What the person sees when no decision could be had; the same text as pam_linkus.so's own
#: (native/pam_linkus.c, UNAVAILABLE_MESSAGE), which it shows when linkusd cannot be asked at all.
UNAVAILABLE_TEXT = "Two-factor authentication is unavailable; contact your administrator."

#: Defaults while no config is loaded (every login is refused then anyway).
_FALLBACK_WORK_TIMEOUT = 10.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end (SO_PEERCRED, SO_PEERGROUPS, /proc)."""

    pid: int
    uid: int
    gid: int
    ruid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        groups = {gid}
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
            groups.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        except OSError:
            pass  # more than 256 groups or an old kernel: the primary gid only
        return cls(pid, uid, gid, _real_uid(pid, uid), frozenset(groups))


def _real_uid(pid: int, euid: int) -> int:
    """The caller's real uid: `su` runs as euid 0 but keeps the user's real uid.

    Read from /proc while the caller is connected (it waits for our answer, so the pid
    is still its own); unreadable means -1, a bucket with the strict non-root caps.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1 if euid == 0 else euid


class Server:
    """Accepts connections on the PAM and web sockets and runs one transaction each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.per_caller: Counter[int] = Counter()
        self.per_account: Counter[str] = Counter()
        self.connections = 0
        self._web_service: SelfService | None = None

    # -- limits ----------------------------------------------------------------

    def _limits(self) -> tuple[float, float, int, int, int, int]:
        snap = self.engine.current
        if snap is None:
            return _FALLBACK_WORK_TIMEOUT, 180.0, 512, 16, 256, 8
        d = snap.config.daemon
        return (d.work_timeout, d.answer_timeout, d.max_connections, d.max_per_caller, d.max_per_caller_root,
                d.max_per_account)

    # -- PAM socket ------------------------------------------------------------

    async def handle_pam(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        work_timeout, answer_timeout, max_conn, max_caller, max_caller_root, max_account = self._limits()
        try:
            peer = Peer.of(sock)
        except OSError:
            writer.close()
            return
        cap = max_caller_root if peer.ruid == 0 else max_caller
        if self.connections >= max_conn or self.per_caller[peer.ruid] >= cap:
            self.engine.health.over_capacity += 1
            self.engine.sink.send(LOG_WARNING, f"linkusd: over capacity, refusing a connection from uid "
                                               f"{peer.ruid} (pid {peer.pid})")
            await self._finish(writer, Outcome.UNAVAILABLE)
            return
        self.connections += 1
        self.per_caller[peer.ruid] += 1
        self.engine.active["pam"] += 1
        try:
            await self._pam_transaction(reader, writer, peer, work_timeout, answer_timeout, max_account)
        finally:
            self.connections -= 1
            self.per_caller[peer.ruid] -= 1
            if not self.per_caller[peer.ruid]:
                del self.per_caller[peer.ruid]
            self.engine.active["pam"] -= 1
            writer.close()

    def _peer_allowed(self, peer: Peer, snap: Snapshot | None) -> bool:
        if peer.uid == 0:
            return True
        return snap is not None and bool(peer.groups & snap.allowed_gids)

    async def _pam_transaction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                               work_timeout: float, answer_timeout: float, max_account: int) -> None:
        if not self._peer_allowed(peer, self.engine.current):
            # refused before it may send anything: a stranger costs no read and no deadline
            self.engine.health.refused_peers += 1
            self.engine.sink.send(LOG_WARNING, f"linkusd: refused a PAM peer: uid {peer.uid} (pid {peer.pid}) is "
                                               f"not root and in no group of daemon.allowed_groups")
            await self._finish(writer, Outcome.UNAVAILABLE)
            return
        try:
            async with asyncio.timeout(work_timeout):
                first = await protocol.read_message(reader, protocol.PAM_OPENERS)
        except (ProtocolError, TimeoutError) as exc:
            self._log_protocol(peer, exc)
            return
        if first.type in (Msg.STATUS, Msg.RELOAD):
            await self._control(first, writer, peer)
            return
        try:
            req, mode, flags = _request(first, peer, self.engine.current)
        except ProtocolError as exc:
            self._log_protocol(peer, exc)
            return
        account_key = req.user.casefold()
        if self.per_account[account_key] >= max_account:
            self.engine.health.over_capacity += 1
            self.engine.sink.send(LOG_WARNING, "linkusd: too many logins at once for one account, refusing one")
            await self._finish(writer, Outcome.UNAVAILABLE)
            return
        self.per_account[account_key] += 1
        try:
            await Transaction(self.engine, reader, writer, peer, req, first, mode, flags,
                              work_timeout, answer_timeout).run()
        finally:
            self.per_account[account_key] -= 1
            if not self.per_account[account_key]:
                del self.per_account[account_key]

    async def _control(self, msg: protocol.Message, writer: asyncio.StreamWriter, peer: Peer) -> None:
        if peer.uid != 0:
            self.engine.sink.send(LOG_WARNING, f"linkusd: {msg.type.name} from non-root uid {peer.uid} refused")
            return
        if msg.type == Msg.RELOAD:
            await self.engine.reload("requested")
        writer.write(protocol.encode_json(Msg.STATUS_REPLY, self.engine.status()))
        await _drain(writer)

    async def _finish(self, writer: asyncio.StreamWriter, outcome: str) -> None:
        writer.write(protocol.encode(Msg.RESULT, {F.OUTCOME: protocol.OUTCOME_CODES[outcome]}))
        await _drain(writer)
        writer.close()

    def _log_protocol(self, peer: Peer, exc: Exception) -> None:
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        self.engine.sink.send(LOG_NOTICE, f"linkusd: dropped a connection from uid {peer.ruid} "
                                          f"(pid {peer.pid}): {what}")

    # -- web socket ------------------------------------------------------------

    async def handle_web(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        work_timeout, answer_timeout, *_ = self._limits()
        try:
            peer = Peer.of(sock)
        except OSError:
            writer.close()
            return
        snap = self.engine.current
        allowed = peer.uid == 0 or (snap is not None and snap.web_gid is not None and snap.web_gid in peer.groups)
        self.engine.active["web"] += 1
        try:
            if not allowed:
                self.engine.health.refused_peers += 1
                self.engine.sink.send(LOG_WARNING, f"linkusd: refused a web peer: uid {peer.uid} is not in "
                                                   f"daemon.web_group")
                return
            try:
                async with asyncio.timeout(work_timeout):
                    call = await protocol.read_message(reader, protocol.WEB_OPENERS,
                                                       max_body=protocol.WEB_MAX_BODY)
                request = call.json()
            except (ProtocolError, TimeoutError) as exc:
                self._log_protocol(peer, exc)
                return
            reply = await self._web_call(request, peer, answer_timeout)
            writer.write(protocol.encode_json(Msg.WEB_REPLY, reply))
            await _drain(writer)
        finally:
            self.engine.active["web"] -= 1
            writer.close()

    async def _web_call(self, request: dict[str, object], peer: Peer, timeout: float) -> dict[str, object]:
        if self._web_service is None:
            from pam_linkus.web.api import SelfService

            self._web_service = SelfService(self.engine)
        try:
            async with asyncio.timeout(timeout):
                return await self._web_service.call(request, peer.uid)
        except TimeoutError:
            return {"ok": False, "error": "unavailable"}
        except LinkusError as exc:
            return {"ok": False, "error": exc.outcome}


class Transaction:
    """One PAM login (or single-field split) on one connection."""

    def __init__(self, engine: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                 req: LoginRequest, start: protocol.Message, mode: int, flags: int, work_timeout: float,
                 answer_timeout: float) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.req = req
        self.start = start
        self.mode = mode
        self.flags = flags
        self.work_timeout = work_timeout
        self.answer_timeout = answer_timeout
        self.began = time.monotonic()
        self.exchanges = 0
        self.told_error = False

    async def run(self) -> None:
        from pam_linkus.flow import Context

        try:
            snap = self.engine.acquire()
        except Unavailable as exc:
            await self._end(Outcome.UNAVAILABLE, exc.reason, None)
            return
        ctx = Context(
            snap.config, self.engine.clock, snap.chain, snap.store,
            mailer_factory=lambda: self.engine.mailer(snap.config),
            totp_prompt=self.start.text(F.PROMPT),
            echo_code=bool(self.flags & protocol.FLAG_ECHO_CODE),
        )
        try:
            if self.mode == protocol.MODE_SPLIT:
                await self._split(ctx, snap)
            else:
                outcome, reason = await self._login(ctx)
                await self._end(outcome, reason, ctx)
        finally:
            self.engine.release(snap)

    async def _split(self, ctx: Context, snap: Snapshot) -> None:
        from pam_linkus.flow import split_digits

        try:
            digits = await self.engine.run(lambda: split_digits(self.req, ctx), ruid=self.peer.ruid,
                                           timeout=self.work_timeout)
        except LinkusError as exc:
            await self._end(exc.outcome, exc.reason, ctx)
            return
        except Exception as exc:  # noqa: BLE001 - an internal error refuses the login
            await self._end(Outcome.UNAVAILABLE, internal_error(self.engine, exc), ctx)
            return
        fields: dict[F, bytes | str | int] = {F.DIGITS: digits, F.TEXT: snap.config.prompts.password_and_code}
        self.writer.write(protocol.encode(Msg.SPLIT, fields))
        await _drain(self.writer)

    async def _login(self, ctx: Context) -> tuple[str, str]:
        from pam_linkus.flow import Ask, login

        steps = login(self.req, ctx)
        reply: str | None = None
        try:
            while True:
                step = await self.engine.run(partial(_advance, steps, reply), ruid=self.peer.ruid,
                                             timeout=self.work_timeout)
                if isinstance(step, Decision):
                    return step.outcome, step.reason
                reply = None
                self.exchanges += 1
                if self.exchanges > protocol.MAX_EXCHANGES:
                    raise Unavailable("too many prompts in one login")
                if isinstance(step, Ask):
                    reply = await self._ask(step.prompt, step.echo)
                else:
                    await self._info(step.text, error=step.error)
        except LinkusError as exc:
            return exc.outcome, exc.reason
        except (ConnectionError, ProtocolError) as exc:
            return Outcome.CONVERSATION, f"client hung up ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - an internal error refuses the login
            return Outcome.UNAVAILABLE, internal_error(self.engine, exc)
        finally:
            # never leave a flow suspended in a thread: close it in the pool as well; a flow that
            # returned or raised is closed already, and a worker round trip is most of a login's CPU
            if inspect.getgeneratorstate(steps) != inspect.GEN_CLOSED:
                try:
                    await self.engine.run(steps.close, ruid=self.peer.ruid, timeout=self.work_timeout)
                except (LinkusError, RuntimeError, ValueError):
                    pass

    async def _ask(self, prompt: str, echo: bool) -> str | None:
        """Relay a prompt; wait for the person without holding a worker."""
        style = protocol.STYLE_ECHO_ON if echo else protocol.STYLE_ECHO_OFF
        self.writer.write(protocol.encode(Msg.PROMPT, {F.STYLE: style, F.TEXT: _cut(prompt)}))
        await _drain(self.writer)
        self.engine.active["parked"] += 1
        try:
            async with asyncio.timeout(self.answer_timeout):
                answer = await protocol.read_message(self.reader, {Msg.ANSWER, Msg.NO_ANSWER})
        except TimeoutError:
            raise ConversationFailed(f"no answer within {self.answer_timeout:g} s") from None
        finally:
            self.engine.active["parked"] -= 1
        if answer.type == Msg.NO_ANSWER:
            return None
        raw = answer.fields[F.TEXT]
        # Invalid UTF-8 or an over-long answer is a wrong code, never an error.
        return raw.decode("utf-8", "surrogateescape")

    async def _info(self, text: str, *, error: bool) -> None:
        style = protocol.STYLE_ERROR if error else protocol.STYLE_INFO
        self.told_error = self.told_error or error
        self.writer.write(protocol.encode(Msg.INFO, {F.STYLE: style, F.TEXT: _cut(text)}))
        await _drain(self.writer)

    async def _end(self, outcome: str, reason: str, ctx: Context | None) -> None:
        if outcome == Outcome.UNAVAILABLE and not self.told_error:
            try:
                await self._info(UNAVAILABLE_TEXT, error=True)
            except (ConnectionError, OSError):
                pass
        health = self.engine.health
        health.outcomes[outcome] = health.outcomes.get(outcome, 0) + 1
        self.engine.sink.attempt(_SEVERITY[outcome], _field_map(self, ctx, outcome, reason))
        try:
            self.writer.write(protocol.encode(Msg.RESULT, {F.OUTCOME: protocol.OUTCOME_CODES[outcome]}))
            await _drain(self.writer)
        except (ConnectionError, OSError):
            pass  # the client is gone; its login ended as whatever its module decided


def internal_error(engine: Engine, exc: BaseException) -> str:
    """Log a bug without its message (it could carry a value) but with where it happened."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    reason = f"internal error: {type(exc).__name__}{where}"
    engine.sink.send(LOG_ERR, f"linkusd: {reason} (login refused)")
    return reason


def _advance(steps: Steps, reply: str | None) -> Ask | Info | Decision:
    """One step of the flow, in a worker thread (a StopIteration cannot cross a Future)."""
    try:
        return steps.send(reply)
    except StopIteration as done:
        decision: Decision = done.value
        return decision


def _request(start: protocol.Message, peer: Peer, snap: Snapshot | None) -> tuple[LoginRequest, int, int]:
    """The LoginRequest a START frame describes (every field already size-checked)."""
    from pam_linkus.flow import LoginRequest

    mode = start.byte(F.MODE)
    if mode not in (protocol.MODE_AUTHENTICATE, protocol.MODE_SPLIT):
        raise ProtocolError(f"unknown MODE {mode}")
    flags = start.u32(F.FLAGS)
    if flags & ~(protocol.FLAG_SILENT | protocol.FLAG_ECHO_CODE):
        raise ProtocolError("unknown FLAGS bits")
    # A user name that is not UTF-8 is kept (surrogate escapes) so the flow refuses
    # it as an invalid name, with the usual log line, instead of dropping the connection.
    user = start.fields[F.USER].decode("utf-8", "surrogateescape")
    kept_raw = start.fields.get(F.KEPT)
    trusted = peer.uid == 0 or (snap is not None and bool(peer.groups & snap.trusted_gids))
    req = LoginRequest(
        user=user,
        service=start.text(F.SERVICE) or "-",
        rhost=start.text(F.RHOST) or None,
        tty=start.text(F.TTY) or None,
        ruser=start.text(F.RUSER) or None,
        profile=start.text(F.PROFILE),
        kept=None if kept_raw is None else kept_raw.decode("utf-8", "surrogateescape"),
        rhost_trusted=trusted,
    )
    return req, mode, flags


def _field_map(t: Transaction, ctx: Context | None, outcome: str, reason: str) -> dict[str, object]:
    req = t.req
    return {
        "service": req.service,
        "user": req.user,
        "account": ctx.account if ctx else "-",
        "rhost": req.rhost or "-",
        "tty": req.tty or "-",
        "ruser": req.ruser or "-",
        "caller_uid": t.peer.ruid,
        "method": ctx.method if ctx else "-",
        "source": ctx.source if ctx else "-",
        "outcome": outcome,
        "reason": reason,
        "ms": int((time.monotonic() - t.began) * 1000),
    }


def _cut(text: str) -> bytes:
    """A text field within its 512-byte limit, cut on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= 512:
        return raw
    return raw[:512].decode("utf-8", "ignore").encode("utf-8")


async def _drain(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass
