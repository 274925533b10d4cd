"""linkusd's two sockets: who may ask, how much, and one transaction per connection.

Every connection is an asyncio task. While the flow waits for a person's answer
the task only awaits the socket: it holds no worker thread, and that wait has its
own long deadline (``answer_timeout``); the work between two answers runs in the
engine's pools under the short one (``work_timeout``). Caps bound what anyone
can hold: connections in all, per calling real uid (a local user running many
setuid `su` logins reaches us as euid 0, but keeps their real uid) and per
target account. A peer that breaks the protocol loses its connection and
nothing else. A connection turned away before any work (a peer that may not ask,
a caller over its cap) is closed at once and costs no log line of its own: a
flood of them must not become a flood of descriptors or syslog lines, so they are
counted per calling uid and summarised (``Refusals``).

No decision after the client gave up: pam_linkus.so sends with START and ANSWER
the moment it stops waiting for our next frame (``DEADLINE``, CLOCK_MONOTONIC,
the clock linkusd reads as ``time.monotonic()``). Every step of the flow -- one of
them is the atomic check-and-record of a code -- starts only while that moment
is more than ``DECISION_MARGIN`` away and the client has not hung up; otherwise
the login ends ``conversation`` with no state changed. What is left is the step
itself: one that starts in time and then stalls past the deadline (the process
stopped, a Redis call that takes its whole work deadline) still commits a
decision the module no longer waits for (docs/protocol.md, "Deadlines").
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pam_linkus import protocol
from pam_linkus.errors import ConversationFailed, LinkusError, Unavailable
from pam_linkus.flow import Ask, Context, Info, LoginRequest, Offload, login, split_digits
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING
from pam_linkus.outcome import Decision, Outcome
from pam_linkus.protocol import F, Msg, ProtocolError

if TYPE_CHECKING:
    from pam_linkus.daemon.engine import Engine, Snapshot
    from pam_linkus.daemon.rawsock import SocketTransport
    from pam_linkus.daemon.selfservice import SelfService
    from pam_linkus.flow import Steps

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
#: A step of the flow starts only while the client waits at least this much longer (DEADLINE): a
#: step is a lookup, an HMAC and one SQLite transaction, milliseconds; 0.5 s leaves room for a busy host.
DECISION_MARGIN = 0.5
#: Why a login ends when the client stopped waiting before a step could start.
_GAVE_UP = "client gave up waiting (its deadline passed)"


def _credentials(sock: socket.socket) -> tuple[int, int, int, frozenset[int]]:
    """pid, uid, gid and groups of the peer (SO_PEERCRED, SO_PEERGROUPS for non-root peers)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid == 0:
        # root is served whatever its groups (allowed_groups, trusted_groups and the web group
        # are for non-root peers only): no need to ask the kernel for them
        return pid, uid, gid, frozenset((gid,))
    groups = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass  # more than 256 groups or an old kernel: the primary gid only
    return pid, uid, gid, frozenset(groups)


class Peer:
    """Who is on the other end (SO_PEERCRED, SO_PEERGROUPS, /proc); read once, never changed."""

    __slots__ = ("pid", "uid", "gid", "ruid", "groups")

    def __init__(self, pid: int, uid: int, gid: int, ruid: int, groups: frozenset[int]) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.ruid = ruid
        self.groups = groups

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid, groups = _credentials(sock)
        return cls(pid, uid, gid, _real_uid(pid, uid), groups)


def _real_uid(pid: int, euid: int) -> int:
    """The caller's real uid: `su` runs as euid 0 but keeps the user's real uid.

    Read from /proc while the caller is connected (it waits for our answer, so the pid
    is still its own); unreadable means -1, a bucket with the strict non-root caps.
    One raw read: the kernel builds the whole file at once, and a text-mode file object
    and a line loop cost more than the read itself.
    """
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 8192)
        finally:
            os.close(fd)
        start = data.index(b"\nUid:") + 5
        return int(data[start:data.index(b"\n", start)].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return -1 if euid == 0 else euid


class Refusals:
    """Connections turned away before any work, counted per calling uid: one summary line per interval.

    A line per refused connection was a flood of its own (one user's loop of connects made 12,000
    authpriv lines a second, and a journald rate limit would then drop real login lines).
    """

    #: Seconds between two summaries (the first refusal of a quiet period starts one).
    INTERVAL = 10.0
    #: Callers named in one line; the rest are added up.
    NAMED = 8
    #: Distinct (uid, reason) counted at once; more are added up as uid "other".
    KEYS = 1024

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counts: Counter[tuple[int | str, str]] = Counter()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, uid: int, why: str) -> None:
        key: tuple[int | str, str] = (uid, why)
        if key not in self.counts and len(self.counts) >= self.KEYS:
            key = ("other", why)
        self.counts[key] += 1
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.INTERVAL, self.flush)

    def flush(self) -> None:
        """Write the summary of what was counted (on the timer, and when linkusd stops)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.counts:
            return
        named = self.counts.most_common(self.NAMED)
        parts = [f"refused {n} connection{'' if n == 1 else 's'} from uid {uid} ({why})" for (uid, why), n in named]
        rest = sum(self.counts.values()) - sum(n for _, n in named)
        if rest:
            parts.append(f"refused {rest} more from {len(self.counts) - len(named)} other callers")
        self.counts.clear()
        self.engine.sink.send(LOG_WARNING, "linkusd: " + "; ".join(parts) + f" (at most one such line per "
                                           f"{self.INTERVAL:g} s)")


class Server:
    """Accepts connections on the PAM and web sockets and runs one transaction each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.per_caller: Counter[int] = Counter()
        self.per_account: Counter[str] = Counter()
        self.connections = 0
        self.refusals = Refusals(engine)
        self._web_service: SelfService | None = None

    def close(self) -> None:
        """On stopping: the refusals counted so far still get their line."""
        self.refusals.flush()

    # -- limits ----------------------------------------------------------------

    def _limits(self) -> tuple[float, float, int, int, int, int]:
        snap = self.engine.current
        if snap is None:
            return _FALLBACK_WORK_TIMEOUT, 180.0, 512, 16, 256, 8
        d = snap.config.daemon
        return (d.work_timeout, d.answer_timeout, d.max_connections, d.max_per_caller, d.max_per_caller_root,
                d.max_per_account)

    # -- PAM socket ------------------------------------------------------------

    def pam_protocol(self) -> PamConnection:
        """The protocol factory of the PAM socket (``rawsock.Listener``)."""
        return PamConnection(self)

    def _peer_allowed(self, uid: int, groups: frozenset[int], snap: Snapshot | None) -> bool:
        if uid == 0:
            return True
        return snap is not None and bool(groups & snap.allowed_gids)

    async def control(self, msg: protocol.Message, transport: SocketTransport, peer: Peer) -> None:
        """STATUS or RELOAD (root only): the reply is the status object."""
        try:
            if peer.uid != 0:
                self.engine.sink.send(LOG_WARNING, f"linkusd: {msg.type.name} from non-root uid {peer.uid} refused")
                return
            if msg.type == Msg.RELOAD:
                await self.engine.reload("requested")
            if not transport.is_closing():
                transport.write(protocol.encode_json(Msg.STATUS_REPLY, self.engine.status()))
        finally:
            transport.close()

    def log_protocol(self, peer: Peer, exc: Exception | str) -> None:
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
            except (ProtocolError, TimeoutError) as exc:
                self.log_protocol(peer, exc)
                return
            try:
                request = call.json()
            except protocol.BadJSON as exc:
                # a whole frame with a body we will not decode (too deep, not JSON): answered, not dropped
                self.engine.sink.send(LOG_NOTICE, f"linkusd: refused a web call from uid {peer.ruid}: {exc}")
                reply: dict[str, object] = {"ok": False, "error": "bad-request"}
            else:
                reply = await self._web_call(request, peer, answer_timeout)
            writer.write(protocol.encode_json(Msg.WEB_REPLY, reply))
            await _drain(writer)
        finally:
            self.engine.active["web"] -= 1
            writer.close()

    async def _web_call(self, request: dict[str, object], peer: Peer, timeout: float) -> dict[str, object]:
        if self._web_service is None:
            from pam_linkus.daemon.selfservice import SelfService

            self._web_service = SelfService(self.engine)
        try:
            async with asyncio.timeout(timeout):
                return await self._web_service.call(request, peer.uid)
        except TimeoutError:
            return {"ok": False, "error": "unavailable"}
        except LinkusError as exc:
            return {"ok": False, "error": exc.outcome}


#: The states of a PAM connection.
_OPENING, _WORKING, _ASKING, _DONE = range(4)
#: More than one whole frame buffered while none was asked for is a protocol violation.
_MAX_BUFFERED = 4 + protocol.PAM_MAX_BODY
#: The reason logged when the client closed its end before the login ended.
_HUNG_UP = "client hung up (PeerClosed)"
#: Pool work in flight (a task nobody awaits must be referenced somewhere).
_IN_FLIGHT: set[asyncio.Future[object]] = set()


class PamConnection:
    """One PAM transaction (a login, a single-field split, or STATUS/RELOAD) on one connection.

    Driven by the callbacks of its transport (rawsock.SocketTransport, on the loop's
    add_reader) rather than by a task reading an asyncio stream: that plumbing (a task,
    stream objects, a timeout context per read, a worker round trip per step) was most of
    linkusd's CPU per login. With SQLite state (``Snapshot.inline``) the
    flow's steps run right here on the event loop -- a step is a dictionary lookup, an
    HMAC and one SQLite transaction -- and a step that is about to wait for a server
    (LDAP, SMTP) or hash a recovery code says so (``flow.Offload``) and continues in the
    PAM pool. With Redis every step runs in the pool. Pool work runs under the work
    deadline and the calling uid's share of the pool.

    While the flow waits for the person, nothing runs for this connection: a timer
    (``answer_timeout``) and the buffer. A frame has to arrive whole before its
    deadline (``work_timeout`` for the first, ``answer_timeout`` for an answer), so a
    slow drip costs its own connection only.
    """

    __slots__ = ("server", "engine", "transport", "peer", "state", "buf", "expect", "timer", "counted",
                 "account_key", "max_account", "work_timeout", "answer_timeout", "snap", "steps", "ctx", "req",
                 "start", "mode", "flags", "began", "exchanges", "told_error", "inline", "parked", "lost", "pending",
                 "reply_by")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.engine = server.engine
        self.transport: SocketTransport | None = None
        self.peer: Peer | None = None
        self.state = _OPENING
        self.buf = bytearray()
        self.expect: frozenset[Msg] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False
        self.account_key: str | None = None
        self.snap: Snapshot | None = None
        self.steps: Steps | None = None
        self.ctx: Context | None = None
        self.req: LoginRequest | None = None
        self.start: protocol.Message | None = None
        self.mode = 0
        self.flags = 0
        self.began = time.monotonic()
        self.exchanges = 0
        self.told_error = False
        self.inline = False
        self.parked = False
        self.lost = False
        self.pending = False  # pool work or a STATUS/RELOAD task is running for this connection
        self.reply_by: float | None = None  # when the client stops waiting for our next frame (DEADLINE)

    # -- the transport's callbacks ---------------------------------------------------

    def connection_made(self, transport: SocketTransport) -> None:
        self.transport = transport
        server, engine = self.server, self.engine
        (self.work_timeout, self.answer_timeout, max_conn, max_caller, max_caller_root,
         self.max_account) = server._limits()
        sock: socket.socket = transport.get_extra_info("socket")  # type: ignore[assignment]
        try:
            pid, uid, gid, groups = _credentials(sock)
        except OSError:
            self.state = _DONE
            transport.abort()
            return
        if not server._peer_allowed(uid, groups, engine.current):
            # a stranger costs no read, no deadline, no /proc and no line of its own
            engine.health.refused_peers += 1
            self._reject(uid, "not root and in no group of daemon.allowed_groups")
            return
        peer = self.peer = Peer(pid, uid, gid, _real_uid(pid, uid), groups)
        cap = max_caller_root if peer.ruid == 0 else max_caller
        if server.per_caller[peer.ruid] >= cap or server.connections >= max_conn:
            engine.health.over_capacity += 1
            self._reject(peer.ruid, "over its cap of logins at once" if server.per_caller[peer.ruid] >= cap
                         else "over daemon.max_connections")
            return
        server.connections += 1
        server.per_caller[peer.ruid] += 1
        engine.active["pam"] += 1
        self.counted = True
        self._wait(protocol.PAM_OPENERS, self.work_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state == _DONE:
            return
        self.buf += data
        if self.expect is not None:
            self._take_frame()
        elif len(self.buf) > _MAX_BUFFERED:
            self._violation(ProtocolError("more than a frame sent while none was asked for"))

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost says what that means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self.state == _OPENING and self.peer is not None:
            self.state = _DONE
            self.server.log_protocol(self.peer, "peer closed the connection mid-frame or before it")
        elif self.state == _ASKING:
            self._conclude(Outcome.CONVERSATION, _HUNG_UP)
        elif self.state == _WORKING and not self.pending:
            # a step on the loop raised out of a callback (asyncio closed the transport): a bug;
            # still one log line, and the snapshot and the account's slot are given back
            if self.req is not None:
                self._conclude(Outcome.UNAVAILABLE, "internal error: the connection's handler failed")
            else:
                self.state = _DONE
                self._close()
        # _WORKING with work pending: that work ends the login when it returns
        self._uncount()

    # -- frames ----------------------------------------------------------------------

    def _wait(self, expected: frozenset[Msg], timeout: float) -> None:
        """Accept one frame of ``expected`` types, whole within ``timeout`` seconds."""
        self.expect = expected
        self.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)
        if self.buf:
            self._take_frame()

    def _take_frame(self) -> None:
        buf, expected = self.buf, self.expect
        assert expected is not None
        if len(buf) < 4:
            return
        try:
            size = protocol.body_length(bytes(buf[:4]), protocol.PAM_MAX_BODY)
            if len(buf) < 4 + size:
                return
            body = bytes(buf[4:4 + size])
            del buf[:4 + size]
            msg = protocol.decode_body(body, expected)
        except ProtocolError as exc:
            self._violation(exc)
            return
        self.expect = None
        self._cancel_timer()
        if self.state == _OPENING:
            self._opened(msg)
        else:
            self._answered(msg)

    def _timed_out(self) -> None:
        self.timer = None
        self.expect = None
        if self.state == _OPENING:
            assert self.peer is not None
            self.state = _DONE
            self.server.log_protocol(self.peer, TimeoutError())
            self._close()
        elif self.state == _ASKING:
            self._conclude(Outcome.CONVERSATION, f"no answer within {self.answer_timeout:g} s")

    def _violation(self, exc: ProtocolError) -> None:
        if self.state == _OPENING:
            assert self.peer is not None
            self.state = _DONE
            self.server.log_protocol(self.peer, exc)
            self._close()
        elif self.state == _ASKING:
            self._conclude(Outcome.CONVERSATION, f"client hung up ({type(exc).__name__})")
        elif self.transport is not None:
            self.transport.abort()  # while a step runs in the pool: it ends the login when it returns

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- the transaction -------------------------------------------------------------

    def _opened(self, msg: protocol.Message) -> None:
        server, engine, peer = self.server, self.engine, self.peer
        assert peer is not None and self.transport is not None
        self.state = _WORKING
        if msg.type in (Msg.STATUS, Msg.RELOAD):
            self.pending = True
            self._track(asyncio.ensure_future(server.control(msg, self.transport, peer)))
            return
        try:
            req, self.mode, self.flags = _request(msg, peer, engine.current)
            self.reply_by = msg.deadline(time.monotonic())
        except ProtocolError as exc:
            self.state = _DONE
            server.log_protocol(peer, exc)
            self._close()
            return
        self.req, self.start = req, msg
        account_key = req.user.casefold()
        if server.per_account[account_key] >= self.max_account:
            engine.health.over_capacity += 1
            self._end(Outcome.UNAVAILABLE, "too many logins at once for this account")
            return
        server.per_account[account_key] += 1
        self.account_key = account_key
        try:
            snap = self.snap = engine.acquire()
        except Unavailable as exc:
            self._end(Outcome.UNAVAILABLE, exc.reason)
            return
        self.inline = snap.inline
        ctx = self.ctx = Context(
            snap.config, engine.clock, snap.chain, snap.store,
            mailer_factory=lambda: engine.mailer(snap.config),
            totp_prompt=msg.text(F.PROMPT),
            echo_code=bool(self.flags & protocol.FLAG_ECHO_CODE),
        )
        if self.mode == protocol.MODE_SPLIT:
            work = partial(split_digits, req, ctx)
            if not self.inline or snap.chain.waits_for_servers:
                self._pool(work, self._split_done)
                return
            try:
                digits = work()
            except Exception as exc:  # noqa: BLE001 - every error ends the login, see _failed
                self._failed(exc)
                return
            self._split_done(digits)
            return
        self.steps = login(req, ctx)
        self._advance(None)

    def _advance(self, reply: str | None) -> None:
        """Run the flow to its next step: here if the snapshot is local, else in the pool.

        Any step may change state (spend a code's step, count or reset failures), so none starts
        once the client stopped waiting for its outcome: the login ends ``conversation``.
        """
        self.state = _WORKING
        assert self.steps is not None
        gone = self._gone()
        if gone is not None:
            self._conclude(Outcome.CONVERSATION, gone)
            return
        if not self.inline:
            self._pool(partial(_step, self.steps, reply, self.reply_by), self._stepped)
            return
        try:
            step = _step(self.steps, reply, self.reply_by)
        except Exception as exc:  # noqa: BLE001 - every error ends the login, see _failed
            self._failed(exc)
            return
        self._stepped(step)

    def _stepped(self, step: object) -> None:
        if isinstance(step, Decision):
            self._conclude(step.outcome, step.reason)
            return
        if self.lost:
            self._conclude(Outcome.CONVERSATION, _HUNG_UP)
            return
        if isinstance(step, Offload):
            assert self.steps is not None
            self._pool(partial(_step, self.steps, None, self.reply_by), self._stepped)
            return
        self.exchanges += 1
        if self.exchanges > protocol.MAX_EXCHANGES:
            self._failed(Unavailable("too many prompts in one login"))
            return
        transport = self.transport
        assert transport is not None
        if isinstance(step, Ask):
            style = protocol.STYLE_ECHO_ON if step.echo else protocol.STYLE_ECHO_OFF
            transport.write(protocol.encode(Msg.PROMPT, {F.STYLE: style, F.TEXT: _cut(step.prompt)}))
            self.state = _ASKING
            self.parked = True
            self.engine.active["parked"] += 1
            self._wait(_ANSWERS, self.answer_timeout)
            return
        assert isinstance(step, Info)
        self._info(step.text, error=step.error)
        self._advance(None)

    def _gone(self) -> str | None:
        """Why the client no longer waits for this login's outcome; None while it does.

        Its DEADLINE is near or past, or it hung up: an EOF waiting behind the frame just read
        (a module that gave up while linkusd was stopped, then closed) is seen here, before the
        frame is acted on, with one non-consuming read.
        """
        if self.lost:
            return _HUNG_UP
        if self.reply_by is not None and self.reply_by - time.monotonic() < DECISION_MARGIN:
            return _GAVE_UP
        assert self.transport is not None
        sock: socket.socket = self.transport.get_extra_info("socket")  # type: ignore[assignment]
        try:
            if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return _HUNG_UP
        except (BlockingIOError, InterruptedError):
            pass  # nothing to read: it is waiting
        except OSError:
            return _HUNG_UP
        return None

    def _answered(self, msg: protocol.Message) -> None:
        try:
            self.reply_by = msg.deadline(time.monotonic())
        except ProtocolError as exc:
            self._violation(exc)
            return
        self._unpark()
        # Invalid UTF-8 or an over-long answer is a wrong code, never an error.
        reply = None if msg.type == Msg.NO_ANSWER else msg.fields[F.TEXT].decode("utf-8", "surrogateescape")
        self._advance(reply)

    def _pool(self, work: Callable[[], object], then: Callable[[Any], None]) -> None:
        """Run ``work`` in the PAM pool (work deadline, the caller's share); ``then`` its result."""
        assert self.peer is not None
        self.state = _WORKING
        future = asyncio.ensure_future(self.engine.run(work, ruid=self.peer.ruid, timeout=self.work_timeout))
        self.pending = True

        def done(fut: asyncio.Future[object]) -> None:
            self.pending = False
            if fut.cancelled():
                self._failed(Unavailable("daemon stopping"))
            elif (exc := fut.exception()) is not None:
                self._failed(exc)
            else:
                then(fut.result())

        self._track(future)
        future.add_done_callback(done)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, LinkusError):
            self._conclude(exc.outcome, exc.reason)
        elif isinstance(exc, (ConnectionError, ProtocolError)):
            self._conclude(Outcome.CONVERSATION, f"client hung up ({type(exc).__name__})")
        else:
            self._conclude(Outcome.UNAVAILABLE, internal_error(self.engine, exc))

    def _split_done(self, digits: int) -> None:
        assert self.snap is not None and self.transport is not None
        self.state = _DONE
        fields: dict[F, bytes | str | int] = {F.DIGITS: digits, F.TEXT: self.snap.config.prompts.password_and_code}
        self.transport.write(protocol.encode(Msg.SPLIT, fields))
        self._close()

    def _info(self, text: str, *, error: bool) -> None:
        assert self.transport is not None
        self.told_error = self.told_error or error
        style = protocol.STYLE_ERROR if error else protocol.STYLE_INFO
        self.transport.write(protocol.encode(Msg.INFO, {F.STYLE: style, F.TEXT: _cut(text)}))

    def _conclude(self, outcome: str, reason: str) -> None:
        """End the login: close a flow left suspended, then the log line and the RESULT."""
        if self.state == _DONE:
            return
        self._unpark()
        self._cancel_timer()
        steps = self.steps
        if steps is not None and inspect.getgeneratorstate(steps) == inspect.GEN_SUSPENDED:
            if self.inline:
                with contextlib.suppress(Exception):
                    steps.close()
            else:  # the flow is the pool's: closing it may run a finally that talks to a server
                self._track(asyncio.ensure_future(self.engine.run(steps.close, ruid=0, timeout=self.work_timeout)))
        self._end(outcome, reason)

    def _end(self, outcome: str, reason: str) -> None:
        self.state = _DONE
        engine, transport = self.engine, self.transport
        assert transport is not None
        if outcome == Outcome.UNAVAILABLE and not self.told_error:
            self._info(UNAVAILABLE_TEXT, error=True)
        health = engine.health
        health.outcomes[outcome] = health.outcomes.get(outcome, 0) + 1
        engine.sink.attempt(_SEVERITY[outcome], _field_map(self, outcome, reason))
        transport.write(protocol.encode(Msg.RESULT, {F.OUTCOME: protocol.OUTCOME_CODES[outcome]}))
        self._close()

    def _reject(self, uid: int, why: str) -> None:
        """Turn the connection away before any work: closed at once, nothing read, nothing written.

        No RESULT: waiting for the client's START first is what let refused connections pile up
        (a flood held thousands of descriptors). pam_linkus.so sees the close, refuses the login
        as unavailable and writes its own line with service, user and rhost. Counted per uid
        against the caller that made it, summarised by ``Refusals``.
        """
        assert self.transport is not None
        self.state = _DONE
        self.server.refusals.add(uid, why)
        self.transport.abort()

    def _close(self) -> None:
        self._cancel_timer()
        self._release()
        if self.transport is not None:
            self.transport.close()

    def _release(self) -> None:
        """Give back the snapshot and the account's slot (each once)."""
        if self.snap is not None:
            snap, self.snap = self.snap, None
            self.engine.release(snap)
        self._release_account()

    def _unpark(self) -> None:
        if self.parked:
            self.parked = False
            self.engine.active["parked"] -= 1

    def _release_account(self) -> None:
        key, self.account_key = self.account_key, None
        if key is not None:
            per_account = self.server.per_account
            per_account[key] -= 1
            if not per_account[key]:
                del per_account[key]

    def _uncount(self) -> None:
        if self.counted and self.peer is not None:
            self.counted = False
            server = self.server
            server.connections -= 1
            server.per_caller[self.peer.ruid] -= 1
            if not server.per_caller[self.peer.ruid]:
                del server.per_caller[self.peer.ruid]
            self.engine.active["pam"] -= 1

    @staticmethod
    def _track(future: asyncio.Future[Any]) -> None:
        _IN_FLIGHT.add(future)
        future.add_done_callback(_IN_FLIGHT.discard)


_ANSWERS = frozenset({Msg.ANSWER, Msg.NO_ANSWER})

def internal_error(engine: Engine, exc: BaseException) -> str:
    """Log a bug without its message (it could carry a value) but with where it happened."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    reason = f"internal error: {type(exc).__name__}{where}"
    engine.sink.send(LOG_ERR, f"linkusd: {reason} (login refused)")
    return reason


def _step(steps: Steps, reply: str | None, reply_by: float | None) -> Ask | Info | Offload | Decision:
    """One step of the flow, here or in a worker thread (a StopIteration cannot cross a Future).

    In the pool a step may start well after it was queued: the client's deadline is checked
    again right before it (the step left suspended is closed by ``_conclude``).
    """
    if reply_by is not None and reply_by - time.monotonic() < DECISION_MARGIN:
        raise ConversationFailed(_GAVE_UP)
    try:
        return steps.send(reply)
    except StopIteration as done:
        decision: Decision = done.value
        return decision


def _request(start: protocol.Message, peer: Peer, snap: Snapshot | None) -> tuple[LoginRequest, int, int]:
    """The LoginRequest a START frame describes (every field already size-checked)."""

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


def _field_map(conn: PamConnection, outcome: str, reason: str) -> dict[str, object]:
    req, ctx, peer = conn.req, conn.ctx, conn.peer
    assert req is not None and peer is not None
    return {
        "service": req.service,
        "user": req.user,
        "account": ctx.account if ctx else "-",
        "rhost": req.rhost or "-",
        "tty": req.tty or "-",
        "ruser": req.ruser or "-",
        "caller_uid": peer.ruid,
        "method": ctx.method if ctx else "-",
        "source": ctx.source if ctx else "-",
        "outcome": outcome,
        "reason": reason,
        "ms": int((time.monotonic() - conn.began) * 1000),
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
