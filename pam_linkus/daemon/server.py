"""linkusd's two sockets: who may ask, how much, and one transaction per connection.

Every connection is an asyncio task whose life reads top to bottom in one place:
``handle_pam`` (and ``PamLogin.run`` for a login) or ``handle_web``, on the one
transport both sockets share (transport.py: a whole frame per deadline, in turn).
While the flow waits for a person's answer the task only awaits the socket: it
holds no worker thread, and that wait has its own long deadline
(``answer_timeout``); the work between two answers runs on the event loop or in
the engine's pools under the short one (``work_timeout``). Caps bound what anyone
can hold: connections in all, per calling real uid (a local user running many
setuid `su` logins reaches us as euid 0, but keeps their real uid) and per
target account; the web socket has caps of its own (``web_cap``, and per uid) so
that no web peer can take PAM's slots. A peer that breaks the protocol loses its
connection and nothing else. A connection turned away before any work (a peer
that may not ask, a caller over its cap) is closed at once, and one dropped
before a login started (closed, silent or malformed before its first whole
frame) is closed too; neither costs a log line of its own: a flood of them must
not become a flood of descriptors or syslog lines, so they are counted per
calling uid and summarised (``Refusals``). A login that started ends in its own
line (``PamLogin._end``).

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
import traceback
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from pam_linkus import protocol
from pam_linkus.daemon.gate import GateService
from pam_linkus.daemon.selfservice import SelfService
from pam_linkus.daemon.transport import Channel
from pam_linkus.errors import ConversationFailed, LinkusError, Unavailable
from pam_linkus.flow import Ask, Context, Info, LoginRequest, Offload, login, split_digits
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING
from pam_linkus.outcome import Decision, Outcome
from pam_linkus.protocol import F, Msg, PeerClosed, ProtocolError

if TYPE_CHECKING:
    from pam_linkus.daemon.engine import Engine, Snapshot
    from pam_linkus.flow import Steps

T = TypeVar("T")
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


class Limits(NamedTuple):
    """The daemon section's deadlines and caps, read once per connection (a reload may change them)."""

    work_timeout: float
    answer_timeout: float
    max_connections: int
    max_per_caller: int
    max_per_caller_root: int
    max_per_account: int


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


#: A web connection kept open between two calls closes after this many idle seconds (linkus-web drops
#: its idle ones sooner, WEB_KEEP_IDLE in pam_linkus/web/app.py).
WEB_IDLE = 10.0
#: Calls on one web connection at most; then it closes (linkus-web opens another).
WEB_CALLS_PER_CONNECTION = 10000


def web_cap(max_connections: int) -> int:
    """Web connections at once, all web peers together: a quarter of daemon.max_connections, counted
    apart from the PAM connections, so a web peer can never take a PAM login's slot (a web call is one
    short request; linkus-web runs a few at once)."""
    return max(1, max_connections // 4)


class Refusals:
    """Connections turned away or dropped before any work, counted per calling uid: one summary line
    per interval.

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
        self.counts: Counter[tuple[int | str, str, str]] = Counter()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, uid: int, why: str, verb: str = "refused") -> None:
        """Count one connection: ``refused`` (turned away at accept) or ``dropped`` (it broke off or
        broke the protocol before a login started)."""
        key: tuple[int | str, str, str] = (uid, verb, why)
        if key not in self.counts and len(self.counts) >= self.KEYS:
            key = ("other", verb, why)
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
        parts = [f"{verb} {n} connection{'' if n == 1 else 's'} from uid {uid} ({why})"
                 for (uid, verb, why), n in named]
        rest = sum(self.counts.values()) - sum(n for _, n in named)
        if rest:
            parts.append(f"refused or dropped {rest} more from {len(self.counts) - len(named)} other callers")
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
        self.web_per_caller: Counter[int] = Counter()
        self.web_connections = 0
        self.refusals = Refusals(engine)
        self._web_service: SelfService | None = None

    def close(self) -> None:
        """On stopping: the refusals counted so far still get their line."""
        self.refusals.flush()

    # -- limits ----------------------------------------------------------------

    def _limits(self) -> Limits:
        snap = self.engine.current
        if snap is None:
            return Limits(_FALLBACK_WORK_TIMEOUT, 180.0, 512, 16, 256, 8)
        d = snap.config.daemon
        return Limits(d.work_timeout, d.answer_timeout, d.max_connections, d.max_per_caller, d.max_per_caller_root,
                      d.max_per_account)

    # -- PAM socket ------------------------------------------------------------

    def admit_pam(self, conn: socket.socket) -> Coroutine[Any, Any, None] | None:
        """Who may ask and how many at once, decided right after accept (``transport.Listener``):
        the coroutine that serves this connection, or None when it is turned away.

        A connection turned away is closed here and now: nothing read, nothing written, no task,
        no /proc read for a stranger, no line of its own -- waiting for the client's START first is
        what let refused connections pile up (a flood held thousands of descriptors). pam_linkus.so
        sees the close, refuses the login as unavailable and writes its own line with service, user
        and rhost. Counted per uid against the caller that made it, summarised by ``Refusals``.
        """
        limits = self._limits()
        engine = self.engine
        peer = self._admit(conn, limits, lambda uid, groups: self._peer_allowed(uid, groups, engine.current),
                           "not root and in no group of daemon.allowed_groups", self.per_caller,
                           "over its cap of logins at once", self.connections, limits.max_connections,
                           "over daemon.max_connections", "pam")
        if peer is None:
            return None
        self.connections += 1
        self.per_caller[peer.ruid] += 1
        engine.active["pam"] += 1
        return self.handle_pam(Channel(conn, protocol.PAM_MAX_BODY), peer, limits)

    def _admit(self, conn: socket.socket, limits: Limits, allowed: Callable[[int, frozenset[int]], bool],
               not_allowed: str, per_caller: Counter[int], over_caller: str, in_all: int, cap_in_all: int,
               over_all: str, which: str) -> Peer | None:
        """Both sockets' admission: the peer, or None once the connection is closed and counted (a
        peer not ``allowed``; a caller at its cap in ``per_caller``; ``in_all`` at ``cap_in_all``)."""
        engine = self.engine
        try:
            pid, uid, gid, groups = _credentials(conn)
        except OSError:
            conn.close()
            return None
        if not allowed(uid, groups):
            engine.health.refused_peers += 1
            engine.stats.refusal(which, "peer")
            self._refuse(conn, uid, not_allowed)
            return None
        peer = Peer(pid, uid, gid, _real_uid(pid, uid), groups)
        cap = limits.max_per_caller_root if peer.ruid == 0 else limits.max_per_caller
        if per_caller[peer.ruid] >= cap or in_all >= cap_in_all:
            engine.health.over_capacity += 1
            engine.stats.refusal(which, "cap")
            self._refuse(conn, peer.ruid, over_caller if per_caller[peer.ruid] >= cap else over_all)
            return None
        return peer

    def _refuse(self, conn: socket.socket, uid: int, why: str) -> None:
        self.refusals.add(uid, why)
        conn.close()

    async def handle_pam(self, ch: Channel, peer: Peer, limits: Limits) -> None:
        """One PAM connection that ``admit_pam`` let in: one transaction, then the close.

        The first frame (START, or STATUS/RELOAD from root) has to arrive whole within the work
        deadline; a peer that closes, breaks the protocol or is too slow before it is dropped and
        counted (``Refusals``): no login started, so there is no login line to write.
        """
        began = time.monotonic()
        try:
            try:
                first = await ch.read(protocol.PAM_OPENERS, limits.work_timeout)
            except (ProtocolError, TimeoutError) as exc:
                self.dropped(peer, exc)
                return
            if first.type in (Msg.STATUS, Msg.RELOAD):
                await self.control(first, ch, peer)
                return
            await PamLogin(self, ch, peer, limits, began).run(first)
        finally:
            ch.close()
            self.connections -= 1
            self.per_caller[peer.ruid] -= 1
            if not self.per_caller[peer.ruid]:
                del self.per_caller[peer.ruid]
            self.engine.active["pam"] -= 1

    def _peer_allowed(self, uid: int, groups: frozenset[int], snap: Snapshot | None) -> bool:
        if uid == 0:
            return True
        return snap is not None and bool(groups & snap.allowed_gids)

    async def control(self, msg: protocol.Message, ch: Channel, peer: Peer) -> None:
        """STATUS or RELOAD (root only): the reply is the status object."""
        if peer.uid != 0:
            self.refusals.add(peer.ruid, f"{msg.type.name} from a non-root caller", "dropped")
            return
        if msg.type == Msg.RELOAD:
            await self.engine.reload("requested")
        with contextlib.suppress(ConnectionError, TimeoutError):
            await ch.send(protocol.encode_json(Msg.STATUS_REPLY, self.engine.status()))

    def dropped(self, peer: Peer, exc: Exception) -> None:
        """A connection dropped before a login started: counted per uid with the refusals (a loop of
        connect and close must not become a line per connection)."""
        what = "timed out before its first whole frame" if isinstance(exc, TimeoutError) else str(exc)
        self.refusals.add(peer.ruid, what, "dropped")

    # -- web socket ------------------------------------------------------------

    def admit_web(self, conn: socket.socket) -> Coroutine[Any, Any, None] | None:
        """The web socket's admission, like ``admit_pam``'s: a peer that is neither root nor in
        daemon.web_group, or a caller over its cap (max_per_caller, max_per_caller_root), or one past
        ``web_cap`` web connections in all, is closed here at once and counted (``Refusals``)."""
        limits = self._limits()
        engine = self.engine
        def in_web_group(uid: int, groups: frozenset[int]) -> bool:
            snap = engine.current
            return uid == 0 or (snap is not None and snap.web_gid is not None and snap.web_gid in groups)

        peer = self._admit(conn, limits, in_web_group, "not root and not in daemon.web_group", self.web_per_caller,
                           "over its cap of web calls at once", self.web_connections,
                           web_cap(limits.max_connections),
                           "over the web connection cap (a quarter of daemon.max_connections)", "web")
        if peer is None:
            return None
        self.web_connections += 1
        self.web_per_caller[peer.ruid] += 1
        engine.active["web"] += 1
        return self.handle_web(Channel(conn, protocol.WEB_MAX_BODY), peer, limits)

    async def handle_web(self, ch: Channel, peer: Peer, limits: Limits) -> None:
        """One web connection that ``admit_web`` let in: WEB_CALLs in turn, each answered before the
        next is read, then the close.

        The first WEB_CALL must be whole within the work deadline (else dropped and counted). Later
        ones let linkus-web keep a connection open for its gate checks (one per proxied request: a
        connect, SO_PEERCRED and a /proc read each cost more than the check): each must start within
        WEB_IDLE seconds of the last reply (else the connection is closed, quietly: that is how an
        idle one ends), at most WEB_CALLS_PER_CONNECTION on one connection, and only while the peer
        is still root or in daemon.web_group (a reload that takes the group away ends it). An open
        connection counts against the same caps as a call (per uid, ``web_cap``) for its whole life.
        """
        try:
            timeout = limits.work_timeout
            for n in range(WEB_CALLS_PER_CONNECTION):
                try:
                    call = await ch.read(protocol.WEB_OPENERS, timeout)
                except (ProtocolError, TimeoutError) as exc:
                    if n == 0 or not isinstance(exc, (PeerClosed, TimeoutError)):
                        self.dropped(peer, exc)
                    return
                if n and not self._web_peer_allowed(peer):
                    return
                try:
                    request = call.json()
                except protocol.BadJSON as exc:
                    # a whole frame with a body we will not decode (too deep, not JSON): answered, not
                    # dropped, and counted with the refusals (a loop of them must not be a line each)
                    self.refusals.add(peer.ruid, f"a web call: {exc}", "answered bad-request to")
                    reply: dict[str, object] = {"ok": False, "error": "bad-request"}
                else:
                    reply = await self._web_call(request, peer, limits.answer_timeout)
                try:
                    await ch.send(protocol.encode_json(Msg.WEB_REPLY, reply))
                except (ConnectionError, TimeoutError):
                    return
                timeout = WEB_IDLE
        finally:
            ch.close()
            self.web_connections -= 1
            self.web_per_caller[peer.ruid] -= 1
            if not self.web_per_caller[peer.ruid]:
                del self.web_per_caller[peer.ruid]
            self.engine.active["web"] -= 1

    def _web_peer_allowed(self, peer: Peer) -> bool:
        """The web socket's admission rule again, for a later call on an open connection."""
        snap = self.engine.current
        return peer.uid == 0 or (snap is not None and snap.web_gid is not None and snap.web_gid in peer.groups)

    async def _web_call(self, request: dict[str, object], peer: Peer, timeout: float) -> dict[str, object]:
        if self._web_service is None:
            self._web_service = GateService(self.engine)
        try:
            async with asyncio.timeout(timeout):
                return await self._web_service.call(request, peer.uid)
        except TimeoutError:
            return {"ok": False, "error": "unavailable"}
        except LinkusError as exc:
            return {"ok": False, "error": exc.outcome}




#: The reason logged when the client closed its end before the login ended.
_HUNG_UP = "client hung up (PeerClosed)"
_ANSWERS = frozenset({Msg.ANSWER, Msg.NO_ANSWER})
#: Pool work nobody awaits (closing a flow left suspended) must be referenced somewhere.
_IN_FLIGHT: set[asyncio.Future[None]] = set()


class PamLogin:
    """One login (or a single-field split) on a PAM connection, from its START to its RESULT.

    ``run`` is the whole story. With SQLite state (``Snapshot.inline``) the flow's steps
    run right here on the event loop -- a step is a dictionary lookup, an HMAC and one
    SQLite transaction, and a worker round trip per step cost more than the step -- and a
    step that is about to wait for a server (LDAP, SMTP) or hash a recovery code says so
    (``flow.Offload``) and continues in the PAM pool. With Redis every step runs in the
    pool. Pool work runs under the work deadline and the calling uid's share of the pool.

    While the flow waits for the person, this task waits for the ANSWER frame and nothing
    else runs for it: no worker, only its timer (``answer_timeout``) and its buffer.
    Every login ends in exactly one log line (``_end``).
    """

    __slots__ = ("server", "engine", "ch", "peer", "limits", "began", "req", "ctx", "steps", "inline",
                 "reply_by", "told_error")

    def __init__(self, server: Server, ch: Channel, peer: Peer, limits: Limits, began: float) -> None:
        self.server = server
        self.engine = server.engine
        self.ch = ch
        self.peer = peer
        self.limits = limits
        self.began = began
        self.req: LoginRequest | None = None
        self.ctx: Context | None = None
        self.steps: Steps | None = None
        self.inline = False
        self.reply_by: float | None = None  # when the client stops waiting for our next frame (DEADLINE)
        self.told_error = False

    async def run(self, start: protocol.Message) -> None:
        server, engine = self.server, self.engine
        try:
            req, mode, flags = _request(start, self.peer, engine.current)
            totp_prompt = start.text(F.PROMPT)
            self.reply_by = start.deadline(time.monotonic())
        except ProtocolError as exc:  # no login started: counted with the refusals
            server.dropped(self.peer, exc)
            return
        self.req = req
        account_key = req.user.casefold()
        if server.per_account[account_key] >= self.limits.max_per_account:
            engine.health.over_capacity += 1
            engine.stats.refusal("pam", "account-cap")  # linkus_connections_refused_total, status's refused line
            await self._end(Outcome.UNAVAILABLE, "too many logins at once for this account")
            return
        server.per_account[account_key] += 1
        try:
            try:
                snap = engine.acquire()
            except Unavailable as exc:  # no configuration loaded
                engine.stats.error("config")
                await self._end(Outcome.UNAVAILABLE, exc.reason)
                return
            try:
                await self._decide(snap, mode, flags, totp_prompt)
            finally:
                engine.release(snap)
        finally:
            server.per_account[account_key] -= 1
            if not server.per_account[account_key]:
                del server.per_account[account_key]

    async def _decide(self, snap: Snapshot, mode: int, flags: int, totp_prompt: str | None) -> None:
        req, engine = self.req, self.engine
        assert req is not None
        self.inline = snap.inline
        ctx = self.ctx = Context(
            snap.config, engine.clock, snap.chain, snap.store,
            mailer_factory=lambda: engine.mailer(snap.config),
            totp_prompt=totp_prompt,
            echo_code=bool(flags & protocol.FLAG_ECHO_CODE),
        )
        try:
            if mode == protocol.MODE_SPLIT:
                work = partial(split_digits, req, ctx)
                # group rules ask NSS (maybe remote: sssd), never on the event loop
                local = self.inline and not snap.chain.waits_for_servers and not snap.config.group_policy
                digits = work() if local else await self._in_pool(work)
                fields: dict[F, bytes | str | int] = {F.DIGITS: digits, F.TEXT: snap.config.prompts.password_and_code}
                with contextlib.suppress(ConnectionError, TimeoutError):
                    await self.ch.send(protocol.encode(Msg.SPLIT, fields))
                return
            self.steps = login(req, ctx)
            outcome, reason = await self._converse(self.steps)
        except LinkusError as exc:
            outcome, reason = exc.outcome, exc.reason
            # an rhost the caller may not vouch for is only logged: the lock mail never names it
            engine.login_failed(ctx.account, exc, service=req.service,
                                client=req.rhost if req.rhost_trusted else None)
            engine.count_failure(exc, snap.config)
        except (ConnectionError, ProtocolError) as exc:
            outcome, reason = Outcome.CONVERSATION, f"client hung up ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - a bug ends this login (unavailable), never the daemon
            outcome, reason = Outcome.UNAVAILABLE, internal_error(engine, exc)
            engine.stats.error("daemon")
        self._close_flow()
        await self._end(outcome, reason)

    async def _converse(self, steps: Steps) -> tuple[str, str]:
        """Run the flow to its decision: each step here or in the pool, each prompt to the client.

        Any step may change state (spend a code's step, count or reset failures), so none starts
        once the client stopped waiting for its outcome: the login ends ``conversation``.
        """
        reply: str | None = None
        for exchange in range(protocol.MAX_EXCHANGES + 1):  # a PROMPT or INFO each, then the decision
            if (gone := self._gone()) is not None:
                return Outcome.CONVERSATION, gone
            pooled = not self.inline
            step = await self._next_step(steps, reply, pooled)
            while isinstance(step, Offload):  # the flow is about to wait for a server: on in the pool
                pooled = True
                step = await self._next_step(steps, None, pooled)
            if isinstance(step, Decision):
                return step.outcome, step.reason
            if pooled and self.ch.hung_up():  # the loop ran other work meanwhile: was it hung up?
                return Outcome.CONVERSATION, _HUNG_UP
            if exchange == protocol.MAX_EXCHANGES:
                break
            if isinstance(step, Info):
                await self._send(protocol.encode(Msg.INFO, _info_fields(step.text, step.error)))
                self.told_error = self.told_error or step.error
                reply = None
            else:
                reply = await self._ask(step)
        raise Unavailable("too many prompts in one login")

    async def _next_step(self, steps: Steps, reply: str | None, pooled: bool) -> Ask | Info | Offload | Decision:
        if pooled:
            return await self._in_pool(partial(_step, steps, reply, self.reply_by))
        return _step(steps, reply, self.reply_by)

    async def _ask(self, ask: Ask) -> str | None:
        """Show a prompt and wait for the person's answer (the answer deadline, parked)."""
        style = protocol.STYLE_ECHO_ON if ask.echo else protocol.STYLE_ECHO_OFF
        await self._send(protocol.encode(Msg.PROMPT, {F.STYLE: style, F.TEXT: _cut(ask.prompt)}))
        active = self.engine.active
        active["parked"] += 1
        try:
            msg = await self.ch.read(_ANSWERS, self.limits.answer_timeout)
        except TimeoutError:
            raise ConversationFailed(f"no answer within {self.limits.answer_timeout:g} s") from None
        finally:
            active["parked"] -= 1
        self.reply_by = msg.deadline(time.monotonic())
        # Invalid UTF-8 or an over-long answer is a wrong code, never an error.
        return None if msg.type == Msg.NO_ANSWER else msg.fields[F.TEXT].decode("utf-8", "surrogateescape")

    async def _send(self, frame: bytes) -> None:
        try:
            await self.ch.send(frame)
        except (ConnectionError, TimeoutError):
            raise ConversationFailed(_HUNG_UP) from None

    def _gone(self) -> str | None:
        """Why the client no longer waits for this login's outcome; None while it does.

        Its DEADLINE is near or past, or it hung up: an EOF waiting behind the frame just read
        (a module that gave up while linkusd was stopped, then closed) is seen here, before the
        frame is acted on, with one non-consuming read.
        """
        if self.reply_by is not None and self.reply_by - time.monotonic() < DECISION_MARGIN:
            return _GAVE_UP
        return _HUNG_UP if self.ch.hung_up() else None

    async def _in_pool(self, work: Callable[[], T]) -> T:
        """``work`` in the PAM pool, under the work deadline and the caller's share of the pool."""
        try:
            return await self.engine.run(work, ruid=self.peer.ruid, timeout=self.limits.work_timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # linkusd is stopping this task: no decision, the module writes the line
            raise Unavailable("daemon stopping") from None  # the pool dropped the work

    def _close_flow(self) -> None:
        """Close a flow left suspended (its finally blocks run), where its steps ran."""
        steps = self.steps
        if steps is None or inspect.getgeneratorstate(steps) != inspect.GEN_SUSPENDED:
            return
        if self.inline:
            with contextlib.suppress(Exception):
                steps.close()
        else:  # the flow is the pool's: closing it may run a finally that talks to a server
            future = asyncio.ensure_future(self.engine.run(steps.close, ruid=0, timeout=self.limits.work_timeout))
            _IN_FLIGHT.add(future)
            future.add_done_callback(_IN_FLIGHT.discard)

    async def _end(self, outcome: str, reason: str) -> None:
        """The login's one log line and its RESULT (a client gone by then costs nothing more)."""
        self.engine.log_login(_SEVERITY[outcome], _field_map(self, outcome, reason))
        with contextlib.suppress(ConnectionError, TimeoutError):
            if outcome == Outcome.UNAVAILABLE and not self.told_error:
                await self.ch.send(protocol.encode(Msg.INFO, _info_fields(UNAVAILABLE_TEXT, True)))
            await self.ch.send(protocol.encode(Msg.RESULT, {F.OUTCOME: protocol.OUTCOME_CODES[outcome]}))


def _info_fields(text: str, error: bool) -> dict[F, bytes | str | int]:
    return {F.STYLE: protocol.STYLE_ERROR if error else protocol.STYLE_INFO, F.TEXT: _cut(text)}


def internal_error(engine: Engine, exc: BaseException) -> str:
    """Log a bug without its message (it could carry a value) but with where it happened."""
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
    rhost, rhost_clean = _item(start, F.RHOST)
    req = LoginRequest(
        user=user,
        service=start.text(F.SERVICE) or "-",
        rhost=rhost,
        tty=_item(start, F.TTY)[0],
        ruser=_item(start, F.RUSER)[0],
        profile=start.text(F.PROFILE),
        kept=None if kept_raw is None else kept_raw.decode("utf-8", "surrogateescape"),
        rhost_trusted=trusted and rhost_clean,
    )
    return req, mode, flags


def _item(start: protocol.Message, tag: F) -> tuple[str | None, bool]:
    """A PAM item that is only logged or compared (RHOST, TTY, RUSER), and whether it came clean.

    Bytes that are not UTF-8 (or a NUL) come from the login's own client, not from a broken peer: the
    login is taken like any other and ends in its one line, the item decoded with U+FFFD for that line.
    An rhost that did not come clean is never trusted (``rhost_trusted``), so it grants no exemption.
    """
    raw = start.fields.get(tag)
    if not raw:
        return None, True
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").replace("\0", "\ufffd"), False
    if "\0" in value:
        return value.replace("\0", "\ufffd"), False
    return value, True


def _field_map(conn: PamLogin, outcome: str, reason: str) -> dict[str, object]:
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
        # Last, so readers of the earlier fields are undisturbed: whether ``rhost`` is an address
        # linkusd takes as the client's (a root or trusted_groups caller, cleanly encoded). Any
        # other caller's rhost is only what a local process claimed: fail2ban ignores it.
        "rhost_trusted": req.rhost_trusted,
    }


def _cut(text: str) -> bytes:
    """A text field within its 512-byte limit, cut on a character boundary."""
    raw = text.encode("utf-8")
    if len(raw) <= 512:
        return raw
    return raw[:512].decode("utf-8", "ignore").encode("utf-8")

