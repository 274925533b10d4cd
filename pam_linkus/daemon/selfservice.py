"""linkusd's side of the self-service page: the web message set (docs/protocol.md, "Web messages").

linkus-web is untrusted: it may be compromised, so it gets nothing it could not
get by typing into the page. Every request names an ``op``; a request with an
unknown op, an unknown field, or a field of the wrong type or size is refused
(``bad-request``). Every reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": WORD, ...}`` where WORD is one of:

    bad-request   the request is malformed (a bug or a hostile web process)
    denied        wrong password, wrong code, or not an extension this page serves
                  (the same answer and delay for each, so names cannot be probed)
    expired       no such session, idle too long, or too old: sign in again
    step          the op does not fit the session's state (e.g. Save before Send);
                  a pending enrollment older than PENDING_LIFETIME also ends here
    code          the session still waits for its sign-in code (the page leads back to that step)
    throttled     too many failures for this extension (or typed name) or client address;
                  ``retry_after`` seconds; answered at once and logged (``self-check result=throttled``).
                  With ``reason: "email-code"``: no email code may be sent yet and none
                  usable is pending (a second sign-in or Send within ``email.send_interval``)
    locked        the extension is locked (too many wrong codes); ``until`` epoch or null (admin unlock)
    unavailable   settings, state store, SMTP or PAM could not be asked, or no good config is loaded

Ops (``client`` is the browser's address as the web app saw it: used for logging
and the per-address limit only; ``session``/``csrf`` come from ``sign_in``):

    sign_in        ext, password, client
                   -> state "in", session, csrf   (2FA off: the password is enough, so the user can enroll)
                   -> state "code", session, csrf, prompt, info[]   (2FA on: the login flow asks for a code)
    sign_in_code   session, csrf, code, client    -> state "in" (a wrong code ends the sign-in: start again)
    sign_out       session, csrf                  -> {}   (csrf not checked: it only removes access)
    status         session                        -> ext, enabled, method, email (masked), since,
                                                     last_success, recovery_left, locked, locked_until,
                                                     csrf, idle_timeout, pending (see enroll_method) or null
    enroll_start    session, csrf, password, client -> {}   opens a pending enrollment (the Password window)
    enroll_method   session, csrf, method ("totp"|"email")
                   -> totp: secret, uri, issuer, account   (shown only while pending; never after Save)
                   -> email: email (masked, or null when the extension has no address)
    email_send     session, csrf, address?, client -> sent_to (masked), pending (true: no new mail, the code
                                                     mailed to that address a moment ago is still valid)
                   (address: a new one to confirm; each code is bound to the address it was mailed to,
                   and Save saves exactly that address; another address while throttled: ``throttled``)
    enroll_confirm  session, csrf, code, client    -> method   ("Edited successfully."; nothing saved before);
                   a wrong code: ``denied`` with tries_left = min(the enrollment's tries left, lockout slots
                   left); the enrollment's count survives a method switch
    enroll_cancel   session, csrf                  -> {}
    disable        session, csrf, password, client -> {}   (queues a mail to the address it had: notify)
    recovery_codes session, csrf, password, client -> codes[]  (shown once; older codes stop working)

Rules: only extensions found in the settings chain, never root or a system account
(uid < UID_MIN in the passwd database); the password goes to
``self_service.pam_service`` (refused if it loads pam_linkus), every change needs
it again. Every failure answers ``fail_delay`` seconds after its request started
(``asyncio.sleep`` to that deadline, no worker held), whatever work it did: an
unknown name (no password check) and a wrong password (a PAM check) look alike.
Wrong codes -- at sign-in (through the login flow) and when confirming a new
secret -- count towards the extension's lockout; wrong passwords are throttled and
logged but never lock the extension (else anyone could lock a colleague out of SSH).

Throttling: each password check first reserves one attempt, with no await between
the limit check and the count, under two keys -- the extension (its canonical
account name once the sources know it, else ``name:`` + the casefolded typed name,
so an unknown name throttles only itself) and the client address (never empty).
A reserved attempt stays counted as a failure unless the password proves right,
which gives it back. So parallel requests never run more than the limit's checks.

Sessions: at most MAX_SESSIONS_PER_EXT signed-in ("in") sessions per extension and, apart,
MAX_SESSIONS_PER_EXT still waiting for their code; a new one pushes out the least recently
used of its own kind only, so a password without the code never signs the owner out.

Sessions and pending enrollments live in this object's memory: a restart of linkusd
signs everybody out and drops pending enrollments (nothing half-saved: nothing is
written before a right code).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import pwd
import secrets
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nss_config.base import check_user_name
from pam_linkus import emailcode, enrollment, flow
from pam_linkus import password as pam_password  # by module: tests count its checks
from pam_linkus.errors import CodeRejected, CodeThrottled, ConfigError, Denied, LinkusError, Locked, Unavailable
from pam_linkus.logline import LOG_NOTICE, LOG_WARNING, format_fields
from pam_linkus.mailtext import check_address, mask_address
from pam_linkus.notify import Event, same_address
from pam_linkus.outcome import Outcome
from pam_linkus.recovery import display
from pam_linkus.state.base import FOREVER, LockStatus
from pam_linkus.totp import decode_secret, generate_secret, match_totp, provisioning_uri

if TYPE_CHECKING:
    from collections.abc import Generator

    from nss_config.base import ExtensionSettings
    from pam_linkus.daemon.engine import Engine, Snapshot

SERVICE = "linkus-web"
#: The service name of the web gate's sign-ins (pam_linkus.daemon.gate), in log lines and the flow.
GATE_SERVICE = "linkus-gate"
#: Who made a change from the page, as a notification says it.
BY_OWNER = "you, on the Security Settings page"
#: Seconds a session may sit idle, and its whole life.
SESSION_IDLE, SESSION_MAX = 600.0, 8 * 3600.0
#: Seconds between the Password window and Save of an enrollment.
PENDING_LIFETIME = 600.0
#: Wrong confirmation codes a pending enrollment takes before it is dropped.
CONFIRM_TRIES = 3
MAX_SESSIONS, MAX_SESSIONS_PER_EXT = 2000, 5
#: Sliding window for failures: per extension and per client address.
FAILURE_WINDOW = 900.0
MAX_FAILURES_PER_EXT, MAX_FAILURES_PER_CLIENT = 10, 30
#: Failure keys kept before the ones with nothing in the window are dropped.
MAX_FAILURE_KEYS = 10000
FAIL_DELAY = 2.0
UID_MIN = 1000
RECOVERY_DEFAULT = 10

_TEXT_LIMITS = {"op": 32, "ext": 256, "password": 512, "client": 64, "session": 64, "csrf": 64,
                "code": 64, "method": 8, "address": 254}
_OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required fields, optional fields)
    "sign_in": (frozenset({"ext", "password", "client"}), frozenset()),
    "sign_in_code": (frozenset({"session", "csrf", "code", "client"}), frozenset()),
    "sign_out": (frozenset({"session", "csrf"}), frozenset({"client"})),
    "status": (frozenset({"session"}), frozenset({"client"})),
    "enroll_start": (frozenset({"session", "csrf", "password", "client"}), frozenset()),
    "enroll_method": (frozenset({"session", "csrf", "method"}), frozenset({"client"})),
    "email_send": (frozenset({"session", "csrf", "client"}), frozenset({"address"})),
    "enroll_confirm": (frozenset({"session", "csrf", "code", "client"}), frozenset()),
    "enroll_cancel": (frozenset({"session", "csrf"}), frozenset({"client"})),
    "disable": (frozenset({"session", "csrf", "password", "client"}), frozenset()),
    "recovery_codes": (frozenset({"session", "csrf", "password", "client"}), frozenset()),
}


class WebError(Exception):
    """An answer other than ok; ``word`` is the reply's ``error``."""

    def __init__(self, word: str, reason: str = "", **extra: object):
        super().__init__(reason or word)
        self.word = word
        self.extra = extra


class _Reservation:
    """One attempt counted in the failure windows before its password is checked."""

    __slots__ = ("keys", "stamp")

    def __init__(self, keys: tuple[str, ...], stamp: float):
        self.keys = keys
        self.stamp = stamp


class _Pending:
    """An enrollment between the Password window and Save.

    ``address`` is set only when a code was mailed there by this enrollment (Save saves exactly
    it, and the code is bound to it); ``tries`` counts this enrollment's wrong codes, whatever
    method they were typed for (a method switch does not start it again).
    """

    __slots__ = ("since", "method", "secret", "address", "tries")

    def __init__(self, since: float):
        self.since = since
        self.method: str | None = None
        self.secret: str | None = None
        self.address: str | None = None
        self.tries = 0


class _Session:
    """A signed-in (or code-waiting) session of the Security Settings page, or -- ``purpose``
    "gate" -- a web gate sign-in waiting for its code (only that step lives here; a gate
    session itself lives in the state store, see pam_linkus.daemon.gate)."""

    __slots__ = ("ext", "csrf", "created", "seen", "state", "login", "pending", "purpose", "site", "factor",
                 "method")

    def __init__(self, ext: str, now: float):
        self.ext = ext
        self.csrf = secrets.token_urlsafe(32)
        self.created = now
        self.seen = now
        self.state = "in"
        self.login: Generator[Any, str | None, Any] | None = None
        self.pending: _Pending | None = None
        self.purpose = "web"
        self.site: str | None = None  # gate: the site the sign-in returns to (its policy applies)
        #: "code": the sign-in (or this session's own enrollment) proved a second factor; "password":
        #: signed in on the password alone because the extension had none (see ``_signed_in``)
        self.factor = "code"
        #: gate: the account's second-factor method, for the login lines of the code step ("-": unknown)
        self.method = "-"

    def drop_login(self) -> None:
        if self.login is not None:
            self.login.close()
            self.login = None


class SelfService:
    """The web ops above, for linkusd's web socket; one instance per daemon.

    ``OPS``/``TEXT_LIMITS``: the message set; a subclass (the web gate,
    pam_linkus.daemon.gate.GateService) adds its ops to them.
    """

    OPS = _OPS
    TEXT_LIMITS = _TEXT_LIMITS

    def __init__(self, engine: Engine, *, fail_delay: float = FAIL_DELAY, pam_dir: str | None = None) -> None:
        self.engine = engine
        self.fail_delay = fail_delay
        self.pam_dir = pam_dir
        # keyed by sha256(token): a timing leak of the dict lookup tells nothing about a token
        self._sessions: dict[str, _Session] = {}
        self._failures = _FailureTable(MAX_FAILURE_KEYS)
        # one lock per extension around the ops that change its second factor (see _change_lock)
        self._changing: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # -- entry ------------------------------------------------------------------------

    async def call(self, request: dict[str, object], peer_uid: int) -> dict[str, object]:
        """Answer one WEB_CALL; never raises (a bug answers ``unavailable`` and is logged)."""
        op = request.get("op") if isinstance(request, dict) else None
        try:
            fields = self._validate(request)
            handler = getattr(self, "_op_" + str(op))
            reply: dict[str, object] = await handler(fields)
            return {"ok": True, **reply}
        except WebError as exc:
            return {"ok": False, "error": exc.word, **exc.extra}
        except Locked as exc:
            return {"ok": False, "error": "locked", "until": _until(exc.locked_until)}
        except CodeThrottled as exc:
            self.engine.count_failure(exc, None)
            return {"ok": False, "error": "throttled", "retry_after": exc.retry_after, "reason": "email-code"}
        except Denied:
            return {"ok": False, "error": "denied"}
        except LinkusError as exc:
            snap = self.engine.current
            self.engine.count_failure(exc, snap.config if snap is not None else None)
            self._log(LOG_WARNING, "unavailable", op=op, reason=exc.reason, peer_uid=peer_uid)
            return {"ok": False, "error": "unavailable"}
        except Exception as exc:  # noqa: BLE001 -- the daemon must answer, not die; logged with its type only
            self._log(LOG_WARNING, "web-error", op=op, reason=type(exc).__name__, peer_uid=peer_uid)
            return {"ok": False, "error": "unavailable"}

    def _validate(self, request: dict[str, object]) -> dict[str, str]:
        op = request.get("op")
        if not isinstance(op, str) or op not in self.OPS:
            raise WebError("bad-request", "unknown op")
        required, optional = self.OPS[op]
        fields: dict[str, str] = {}
        for key, value in request.items():
            if key == "op":
                continue
            if key not in required and key not in optional:
                raise WebError("bad-request", f"unknown field {key!r:.40}")
            if not isinstance(value, str) or len(value) > self.TEXT_LIMITS[key] or "\x00" in value:
                raise WebError("bad-request", f"bad field {key}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (an escaped one in the JSON) is no one's text
                raise WebError("bad-request", f"bad field {key}") from None
            fields[key] = value
        if required - fields.keys():
            raise WebError("bad-request", "missing field")
        if "client" in fields and not fields["client"]:
            # the per-address limit is keyed on it: never on a missing address (linkus-web always knows one)
            raise WebError("bad-request", "empty client")
        return fields

    # -- helpers ----------------------------------------------------------------------

    def _log(self, severity: int, action: str, **fields: object) -> None:
        line = {"action": action, "via": "web", **{k: v for k, v in fields.items() if v is not None}}
        self.engine.sink.send(severity, format_fields(line))

    def _audit(self, action: str, ext: str, client: str | None, **fields: object) -> None:
        """One line per change, like the CLI's (``action ext by via``); never a secret, code or password."""
        line = {"action": action, "ext": ext, "by": ext, "via": "web", "client": client, **fields}
        self.engine.sink.send(LOG_NOTICE, format_fields(line))

    def _counted(self, sess: _Session, outcome: str, method: str = "-") -> None:
        """This page's sign-in ended (service linkus-web): counted like a PAM login's end, once,
        with no line in the login format (the page writes its own)."""
        self.engine.count_login({"service": SERVICE, "account": sess.ext, "method": method, "outcome": outcome,
                                 "ms": max(0, int((self.engine.clock() - sess.created) * 1000))})

    def _session(self, fields: dict[str, str], *, csrf: bool = True, state: str = "in",
                 purpose: str = "web") -> _Session:
        now = self.engine.clock()
        self._expire(now)
        key = _key(fields["session"])
        sess = self._sessions.get(key)
        if sess is None or sess.purpose != purpose:
            raise WebError("expired")
        if sess.state == "code" and state == "in":
            # still waiting for its sign-in code: the page leads back to that step (issue 17/7).
            # Answered before the CSRF check: it changes nothing and tells only what the page shows.
            raise WebError("code")
        if csrf and not hmac.compare_digest(sess.csrf.encode(), fields.get("csrf", "").encode()):
            self._log(LOG_WARNING, "csrf-refused", ext=sess.ext, client=fields.get("client"))
            raise WebError("bad-request", "csrf")
        if sess.state != state:
            raise WebError("step")
        sess.seen = now
        return sess

    async def _signed_in(self, fields: dict[str, str], *, csrf: bool = True) -> _Session:
        """``_session`` for a signed-in op, ended when it no longer proves enough.

        A session signed in on the password alone (the extension had no second factor) is worth
        only that while the extension stays without one: once a second factor is enrolled --
        from another session, linkus-2fa or the directory -- whoever holds this session has
        proved only the password, and must not get recovery codes, switch 2FA off or enroll
        another authenticator with it. So every op re-reads the settings for such a session
        and ends it (``expired``: sign in again, now with a code). This session's own
        enrollment (``enroll_confirm``) proves the new factor and makes it a "code" session.
        """
        sess = self._session(fields, csrf=csrf)
        await self._recheck(sess, fields)
        return sess

    async def _recheck(self, sess: _Session, fields: dict[str, str]) -> None:
        """End a password-only session whose extension has a second factor now (``_signed_in``).

        Said again under ``_change_lock`` right before an op writes: the op's password check takes
        a while, and an enrollment that completed meanwhile must stop it."""
        if sess.factor != "password":
            return
        ext = sess.ext
        snapshot = self.engine.snapshot()
        settings = await self.engine.run(lambda: snapshot.chain.lookup(ext), pool="web")
        if settings is not None and settings.enrolled:
            self._forget_session(fields["session"])
            self._audit("session-ended", ext, fields.get("client"),
                        reason="a second factor was enrolled since this password-only sign-in")
            raise WebError("expired")

    def _change_lock(self, ext: str) -> asyncio.Lock:
        """The lock the ops that change ``ext``'s second factor (enroll_confirm, disable, recovery_codes)
        hold from their last ``_recheck`` to the reload after their write: an enrollment and a
        password-only session's switch-off or new recovery codes never interleave on this linkusd
        (changes made elsewhere -- linkus-2fa, another host -- are seen at the next op)."""
        lock = self._changing.get(ext)
        if lock is None:
            lock = asyncio.Lock()
            self._changing[ext] = lock
        return lock

    def _expire(self, now: float) -> None:
        for key, sess in list(self._sessions.items()):
            if now - sess.seen > SESSION_IDLE or now - sess.created > SESSION_MAX:
                sess.drop_login()
                del self._sessions[key]

    def _make_room(self, ext: str, state: str, keep: _Session | None = None) -> None:
        """Drop the least recently used sessions of ``ext`` in ``state`` until one more fits.

        Only sessions of the same state are counted and pushed out: one that still waits
        for its code (someone with the password only) never pushes out a signed-in one
        (issue 17/3); a session that becomes signed in makes room among the signed-in ones.
        """
        # oldest use first; equal times in creation order (the dict's), never the random key's
        mine = sorted(((s.seen, n, k) for n, (k, s) in enumerate(self._sessions.items())
                       if s.ext == ext and s.state == state and s is not keep))
        for _seen, _n, key in mine[: max(0, len(mine) - MAX_SESSIONS_PER_EXT + 1)]:
            self._sessions.pop(key).drop_login()

    def _new_session(self, ext: str, now: float, state: str) -> tuple[str, _Session]:
        self._expire(now)
        self._make_room(ext, state)
        if len(self._sessions) >= MAX_SESSIONS:
            self.engine.stats.web_throttled += 1
            raise WebError("throttled", "too many sessions", retry_after=60)
        token = secrets.token_urlsafe(32)
        sess = _Session(ext, now)
        sess.state = state
        self._sessions[_key(token)] = sess
        return token, sess

    def _full(self, limits: list[tuple[str, int]], now: float) -> tuple[str, float] | None:
        """The first key at its limit in the failure window, and when its oldest failure leaves it."""
        for key, limit in limits:
            times = self._failures.get(key)
            if times is None:
                continue
            while times and now - times[0] > FAILURE_WINDOW:
                times.popleft()
            if len(times) >= limit:
                return key, FAILURE_WINDOW - (now - times[0])
        return None

    def _refuse_if_full(self, limits: list[tuple[str, int]], ext: str, client: str, step: str) -> None:
        """``throttled`` (and one log line, like every refused attempt) when a key is at its limit."""
        full = self._full(limits, self.engine.clock())
        if full is not None:
            key, left = full
            self._log(LOG_WARNING, "self-check", ext=ext, client=client, result="throttled", step=step,
                      limit="extension" if key.startswith(("ext:", "name:")) else "address")
            self.engine.stats.web_throttled += 1
            raise WebError("throttled", retry_after=int(left) + 1)

    def _reserve(self, limits: list[tuple[str, int]], ext: str, client: str, step: str) -> _Reservation:
        """Count one attempt under every key now, before the password is checked; ``throttled`` if
        a key is at its limit. No await between the check and the count: linkusd keeps this state
        on one event loop, so parallel requests can never run more checks than the limit.

        The rule: a reserved attempt stays counted as a failure whatever ends it (a wrong
        password, an unknown name, an error, a cancelled request) unless the password proves
        right; then ``_give_back`` removes it, so an owner signing in often is never throttled.
        """
        self._refuse_if_full(limits, ext, client, step)
        now = self.engine.clock()
        for key, _limit in limits:
            self._failures.add(key, now)
        return _Reservation(tuple(key for key, _limit in limits), now)

    def _give_back(self, reservation: _Reservation) -> None:
        for key in reservation.keys:
            times = self._failures.get(key)
            if times is not None and reservation.stamp in times:
                times.remove(reservation.stamp)  # an equal stamp is as good as ours: one attempt fewer

    def _count(self, ext: str, client: str) -> None:
        """A wrong code at sign-in counts like a wrong password (the lockout is what bounds code checks)."""
        now = self.engine.clock()
        for key, _limit in _limits(_ext_key(ext), client):
            self._failures.add(key, now)

    async def _fail(self, word: str, ext: str, client: str, action: str, deadline: float, *,
                    log: bool = True, **fields: object) -> None:
        """Log, wait (without a worker) until ``deadline`` (event-loop time), then answer ``word``.

        Every failure answers at the same moment after its request's start, however much work
        it did: a wrong password for a real extension (a PAM check) and an unknown name (no
        check) cannot be told apart by their timing.
        """
        if log:  # the web gate writes its own line, in the PAM login format (pam_linkus.daemon.gate)
            self._log(LOG_WARNING, action, ext=ext, client=client, **fields)
        loop = asyncio.get_running_loop()
        if loop.time() > deadline:
            # the check took longer than fail_delay: this answer is late, and its lateness tells
            self._log(LOG_WARNING, "slow-check", step=fields.get("step"), fail_delay=self.fail_delay)
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        raise WebError(word)

    def _deadline(self) -> float:
        """When a failure of the request starting now answers (event-loop time)."""
        return asyncio.get_running_loop().time() + self.fail_delay

    async def _lookup(self, name: str) -> ExtensionSettings | None:
        """The settings of a checked name (``_check_name``), or None."""
        snapshot = self.engine.snapshot()
        settings: ExtensionSettings | None = await self.engine.run(lambda: snapshot.chain.lookup(name), pool="web")
        return settings

    async def _password(self, ext: str, password: str, client: str, why: str, *,
                        deadline: float | None = None, reservation: _Reservation | None = None,
                        via: str = "web") -> None:
        """Check the account password through the configured PAM service; ``denied`` at the deadline.

        The attempt is reserved first (``_reserve``) unless the caller did; a right password gives it back.
        """
        if deadline is None:
            deadline = self._deadline()
        if reservation is None:
            reservation = self._reserve(_limits(_ext_key(ext), client), ext, client, why)
        service = self.engine.snapshot().config.self_service.pam_service
        pam_dir = self.pam_dir or pam_password.PAM_DIR

        def check() -> bool:
            try:
                return pam_password.check_password(service, ext, password, pam_dir)
            except pam_password.ServiceRefused as exc:
                raise ConfigError(str(exc)) from None

        if not await self.engine.run(check, pool="web"):
            await self._fail("denied", ext, client, "self-check", deadline, via=via, result="wrong-password",
                             step=why)
        self._give_back(reservation)

    def _notify(self, kind: str, ext: str, client: str, *, address: str | None = None,
                method: str | None = None, previous: bool = False) -> None:
        """Tell the owner (queued: the page never waits for SMTP; pam_linkus.notify)."""
        self.engine.notifier.submit(Event(kind, ext, self.engine.clock(), address=address, by=BY_OWNER,
                                          client=client, method=method, previous=previous))

    async def _changed(self, what: str) -> None:
        """Reload after a write, so the page and the next login see it now, not at the next file poll."""
        reload = getattr(self.engine, "reload", None)
        if reload is not None and not await reload(f"self-service {what}"):
            self._log(LOG_WARNING, "reload-failed", step=what)

    def _issuer(self) -> str:
        return self.engine.snapshot().config.totp.issuer or socket.gethostname()

    # -- sign-in ----------------------------------------------------------------------

    async def _op_sign_in(self, f: dict[str, str]) -> dict[str, object]:
        deadline = self._deadline()
        client, name = f["client"], f["ext"]
        _check_name(name)
        self._refuse_if_full(_limits(None, client), name, client, "sign-in")
        settings = await self._lookup(name)
        # Keyed on the canonical account once the name is known to be an extension, else on the
        # typed name as the sources compare it (casefolded), in its own namespace: an unknown
        # name throttles only itself, never a real extension and never everyone.
        ext, key, refusal = _who(name, settings)
        reservation = self._reserve(_limits(key, client), ext, client, "sign-in")
        if refusal is not None:
            # no password check to run: the answer comes at the same deadline as a wrong password's
            await self._fail("denied", name, client, "web-refused", deadline, result=refusal)
        assert settings is not None
        await self._password(ext, f["password"], client, "sign-in", deadline=deadline, reservation=reservation)
        now = self.engine.clock()
        if not settings.enrolled:
            token, sess = self._new_session(ext, now, "in")
            sess.factor = "password"
            self._audit("web-sign-in", ext, client, factor="password")
            return {"state": "in", "session": token, "csrf": sess.csrf}
        token, sess = self._new_session(ext, now, "code")
        gen = self._start_login(ext)
        try:
            kind, payload, infos = await self.engine.run(lambda: _advance(gen, None), pool="web")
        except BaseException as exc:
            self._forget_session(token)  # the generator has ended, or a worker still runs it: just drop it
            if (outcome := _outcome_of(exc)) is not None:
                self._counted(sess, outcome)
            if isinstance(exc, Locked):
                # the right password, but the extension is locked: every refusal has its line. Not
                # counted by fail2ban: the lock may be someone else's doing (docs/fail2ban.md)
                self._log(LOG_WARNING, "self-check", ext=ext, client=client, result="locked", step="sign-in")
            raise
        return self._login_step(token, sess, gen, kind, payload, infos, client)

    def _start_login(self, ext: str, service: str = SERVICE) -> Generator[Any, str | None, Any]:
        snapshot = self.engine.snapshot()
        # rhost stays None: the address comes from the web process, which we do not trust,
        # so no exempt network or grace period applies here.
        req = flow.LoginRequest(ext, service=service, rhost=None, rhost_trusted=False)
        ctx = _flow_context(snapshot, self.engine)
        gen: Generator[Any, str | None, Any] = flow.login(req, ctx)
        return gen

    def _login_step(self, token: str, sess: _Session, gen: Generator[Any, str | None, Any], kind: str,
                    payload: Any, infos: list[str], client: str) -> dict[str, object]:
        if kind == "ask":
            sess.login = gen  # parked until the next call brings the answer; no worker is held
            return {"state": "code", "session": token, "csrf": sess.csrf, "prompt": payload, "info": infos}
        method = str(getattr(payload, "method", "-") or "-")
        if getattr(payload, "outcome", None) != Outcome.SUCCESS:
            # a policy skip (exempt network, grace) is not proof: the page wants a code it has seen
            self._forget_session(token)
            self._counted(sess, Outcome.DENIED, method)
            raise WebError("denied")
        self._counted(sess, Outcome.SUCCESS, method)
        self._make_room(sess.ext, "in", keep=sess)
        sess.state = "in"
        self._audit("web-sign-in", sess.ext, client, factor="code")
        return {"state": "in", "session": token, "csrf": sess.csrf, "info": infos}

    async def _op_sign_in_code(self, f: dict[str, str]) -> dict[str, object]:
        sess, gen, kind, payload, infos = await self._code_step(f, "web")
        return self._login_step(f["session"], sess, gen, kind, payload, infos, f["client"])

    async def _code_step(self, f: dict[str, str], purpose: str,
                         on_fail: Callable[[_Session, LinkusError], None] | None = None,
                         ) -> tuple[_Session, Generator[Any, str | None, Any], str, Any, list[str]]:
        """Give the waiting login flow of session ``f["session"]`` its code; the flow's next step.

        Shared by the Security Settings sign-in and the web gate (``purpose``): the same replay,
        lockout and throttles as a PAM login, a wrong code answered at the fixed deadline.
        ``on_fail`` (the gate): called for a wrong code, a lock or an outage (Unavailable) instead of
        this page's own log line and count; the gate writes one line in the PAM login format (one
        line per outcome for fail2ban), and that line is the outcome's one count (service linkus-gate).
        """
        service = SERVICE if purpose == "web" else GATE_SERVICE
        deadline = self._deadline()
        sess = self._session(f, state="code", purpose=purpose)
        token = f["session"]
        gen = sess.login
        if gen is None:
            raise WebError("step")  # no code asked, or another request is answering it right now
        sess.login = None  # taken: a parallel request cannot drive the same generator
        try:
            kind, payload, infos = await self.engine.run(lambda: _advance(gen, f["code"]), pool="web")
        except Denied as exc:
            self._forget_session(token)
            if on_fail is None:  # the gate's on_fail writes its login line, and that line is counted
                self._counted(sess, Outcome.DENIED)
            self._count(sess.ext, f["client"])
            # a replayed code (a right code someone, maybe the owner in another tab, used first) counts
            # towards the lockout as at a PAM login (the flow did that), but it is no wrong code of this
            # client: fail2ban and the spraying watch never see it (docs/fail2ban.md)
            replayed = exc.reason.startswith("replayed code")
            if not replayed:
                self.engine.login_failed(sess.ext, exc, service=service, client=f["client"])
            if on_fail is not None:
                on_fail(sess, exc)
            await self._fail("denied", sess.ext, f["client"], "web-sign-in", deadline, log=on_fail is None,
                             result="replayed-code" if replayed else "wrong-code")
            raise
        except BaseException as exc:
            self._forget_session(token)
            outcome = _outcome_of(exc)
            if on_fail is None:
                if outcome is not None:
                    self._counted(sess, outcome)
            elif isinstance(exc, (Locked, Unavailable)):
                on_fail(sess, exc)  # the gate writes its login line (service linkus-gate), and it counts
            if isinstance(exc, Locked):  # docs/fail2ban.md: only the code that set the lock counts
                if on_fail is None:
                    self._log(LOG_WARNING, "web-sign-in", ext=sess.ext, client=f["client"], **_lock_result(exc))
                self.engine.login_failed(sess.ext, exc, service=service, client=f["client"])
            raise
        return sess, gen, kind, payload, infos

    def _forget_session(self, token: str) -> None:
        sess = self._sessions.pop(_key(token), None)
        if sess is not None:
            sess.drop_login()

    async def _op_sign_out(self, f: dict[str, str]) -> dict[str, object]:
        # Whatever the form token says (an old tab's, or none that matches): signing out only
        # removes access, so the session ends here, not only the browser's cookie.
        self._forget_session(f["session"])
        return {}

    # -- status -----------------------------------------------------------------------

    async def _op_status(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f, csrf=False)
        snapshot = self.engine.snapshot()
        now = self.engine.clock()

        def read() -> tuple[Any, Any, Any]:
            store = snapshot.store
            return snapshot.chain.lookup(sess.ext), store.enrollment(sess.ext), store.lock_status(sess.ext, now)

        settings, info, lock = await self.engine.run(read, pool="web")
        pending = self._pending_view(sess, now, lock, snapshot.config.lockout.max_failures)
        return {
            "ext": sess.ext,
            "enabled": bool(settings is not None and settings.enrolled),
            "method": settings.method if settings is not None and settings.enrolled else None,
            "email": _masked(settings.email) if settings is not None else None,
            "since": info.since if info is not None else None,
            "last_success": info.last_success if info is not None else None,
            "recovery_left": info.recovery_left if info is not None else 0,
            "locked": bool(lock.locked(now)),
            "locked_until": _until(lock.locked_until) if lock.locked(now) else None,
            "csrf": sess.csrf,
            "idle_timeout": int(SESSION_IDLE),
            "pending": pending,
        }

    def _pending_view(self, sess: _Session, now: float, lock: LockStatus, max_failures: int
                      ) -> dict[str, object] | None:
        pend = sess.pending
        if pend is None or now - pend.since > PENDING_LIFETIME:
            sess.pending = None
            return None
        view: dict[str, object] = {"method": pend.method,
                                   "tries_left": _tries_left(pend, lock, now, max_failures)}
        if pend.method == "totp" and pend.secret is not None:
            view.update(self._totp_view(sess.ext, pend.secret))
        if pend.method == "email":
            view["sent_to"] = _masked(pend.address) if pend.address else None
        return view

    def _totp_view(self, ext: str, secret: str) -> dict[str, object]:
        issuer = self._issuer()
        return {"secret": secret, "uri": provisioning_uri(secret, ext, issuer), "issuer": issuer, "account": ext}

    # -- enrollment --------------------------------------------------------------------

    def _pending(self, sess: _Session, method: str | None = None) -> _Pending:
        pend = sess.pending
        if pend is None or self.engine.clock() - pend.since > PENDING_LIFETIME:
            sess.pending = None
            raise WebError("step", "no pending enrollment")
        if method is not None and pend.method != method:
            raise WebError("step", "another method is pending")
        return pend

    async def _op_enroll_start(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        await self._password(sess.ext, f["password"], f["client"], "enroll")
        sess.pending = _Pending(self.engine.clock())
        return {}

    async def _op_enroll_method(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        pend = self._pending(sess)
        if f["method"] not in ("totp", "email"):
            raise WebError("bad-request", "method")
        pend.method = f["method"]  # pend.tries stays: a switch must not buy three more guesses
        if pend.method == "totp":
            pend.secret = pend.secret or generate_secret(160)
            pend.address = None
            return self._totp_view(sess.ext, pend.secret)
        pend.secret = None
        snapshot = self.engine.snapshot()
        settings = await self.engine.run(lambda: snapshot.chain.lookup(sess.ext), pool="web")
        return {"email": _masked(settings.email) if settings is not None else None}

    async def _op_email_send(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        pend = self._pending(sess, "email")
        snapshot = self.engine.snapshot()
        config = snapshot.config
        if f.get("address"):
            target = f["address"]
        else:
            settings = await self.engine.run(lambda: snapshot.chain.lookup(sess.ext), pool="web")
            target = (settings.email if settings is not None else None) or ""
        try:
            target = check_address(target)
        except ValueError:
            raise WebError("bad-request", "address") from None
        engine = self.engine

        def send() -> emailcode.Delivery:
            key = emailcode.load_key(config.email.key_file)
            return emailcode.deliver(snapshot.store, key, engine.mailer(config), config.email, user=sess.ext,
                                     address=target, service=SERVICE, rhost=None, now=engine.clock())

        delivery = await self.engine.run(send, pool="web")
        if delivery.state == emailcode.Delivery.SENT:
            pend.address = target
            self._audit("email-code-sent", sess.ext, f["client"], step="enroll")
            return {"sent_to": _masked(target)}
        if delivery.state == emailcode.Delivery.PENDING and pend.address == target:
            # this enrollment mailed a code here a moment ago and it still works: say so, send nothing
            return {"sent_to": _masked(target), "pending": True}
        # Throttled, and no code this enrollment sent to this address: never report a send that did
        # not happen, and never let a code that went elsewhere confirm this address (issue 17/1).
        raise CodeThrottled(f"email code throttled, next send in {delivery.retry_after} s", delivery.retry_after)

    async def _op_enroll_confirm(self, f: dict[str, str]) -> dict[str, object]:
        deadline = self._deadline()
        sess = await self._signed_in(f)
        pend = self._pending(sess)
        if pend.method is None or (pend.method == "email" and pend.address is None):
            raise WebError("step", "nothing to confirm yet")
        async with self._change_lock(sess.ext):
            await self._recheck(sess, f)
            return await self._confirm(f, sess, pend, deadline)

    async def _confirm(self, f: dict[str, str], sess: _Session, pend: _Pending, deadline: float
                       ) -> dict[str, object]:
        """enroll_confirm's check and write, under the extension's ``_change_lock``."""
        snapshot = self.engine.snapshot()
        config, store, ext, client = snapshot.config, snapshot.store, sess.ext, f["client"]
        method, secret, address = pend.method, pend.secret, pend.address
        before = await self.engine.run(lambda: snapshot.chain.lookup(ext), pool="web")
        previous = before.email if before is not None else None  # told too when the codes move away
        lock_after: list[LockStatus | None] = [None]  # the lockout after a wrong code, for tries_left

        def confirm() -> str:
            now = self.engine.clock()
            lockout = config.lockout
            lock_after[0] = None
            limits = {"max_failures": lockout.max_failures, "duration": lockout.duration,
                      "permanent_after": lockout.permanent_after}
            # Reserved before the code is checked, as at a login: parallel confirmations can
            # never check more than max_failures codes before the lock.
            status = store.reserve_attempt(ext, now, **limits)
            if status.locked(now):
                raise Locked("extension is locked", status.locked_until)
            try:
                if method == "totp":
                    assert secret is not None
                    step = match_totp(decode_secret(secret), f["code"], now, window=config.totp.window)
                    saved = enrollment.save_totp(config, store, ext, secret, step, now)
                else:
                    assert address is not None
                    emailcode.verify(store, emailcode.load_key(config.email.key_file), ext, f["code"], now,
                                     address=address)
                    saved = enrollment.save_email(config, store, ext, address, now)
            except CodeRejected:
                after = store.settle_failure(ext, now, **limits)
                if after.locked(now):
                    raise Locked("locked after a wrong confirmation code", after.locked_until,
                                     newly=True) from None
                lock_after[0] = after
                raise
            store.settle_success(ext, now)
            return saved

        try:
            source = await self.engine.run(confirm, pool="web")
        except CodeRejected:
            pend.tries += 1
            after = lock_after[0] or LockStatus()
            left = _tries_left(pend, after, self.engine.clock(), config.lockout.max_failures)
            if left <= 0:
                sess.pending = None
            self._audit("enroll", ext, client, method=method, result="wrong-code")
            await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
            raise WebError("denied", tries_left=max(left, 0)) from None
        except Locked as exc:
            sess.pending = None
            self._audit("enroll", ext, client, method=method, **_lock_result(exc))
            self.engine.login_failed(ext, exc, service=SERVICE, client=client)
            raise
        sess.pending = None
        sess.factor = "code"  # the right code of the new factor: this session has proved it
        self._audit("enroll", ext, client, method=method, source=source, confirmed="yes")
        await self._changed("enrollment")
        self._notify("enrolled", ext, client, method=method, address=address)
        if previous and not same_address(previous, address or previous):
            self._notify("enrolled", ext, client, method=method, address=previous, previous=True)
        return {"method": method}

    async def _op_enroll_cancel(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        sess.pending = None
        return {}

    # -- other changes ----------------------------------------------------------------

    async def _op_disable(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        await self._password(sess.ext, f["password"], f["client"], "disable")
        async with self._change_lock(sess.ext):
            await self._recheck(sess, f)
            snapshot = self.engine.snapshot()
            config, store, ext = snapshot.config, snapshot.store, sess.ext
            source, before = await self.engine.run(lambda: enrollment.switch_off(config, store, ext), pool="web")
            address = before.email if before is not None and before.enrolled else None
            sess.pending = None
            self._audit("disable", ext, f["client"], source=source)
            await self._changed("disable")
        if address:  # the address it had while 2FA was on (its entry keeps it, but say so explicitly)
            self._notify("disabled", ext, f["client"], address=address)
        return {}

    async def _op_recovery_codes(self, f: dict[str, str]) -> dict[str, object]:
        sess = await self._signed_in(f)
        await self._password(sess.ext, f["password"], f["client"], "recovery-codes")
        async with self._change_lock(sess.ext):
            await self._recheck(sess, f)
            snapshot = self.engine.snapshot()
            store, ext = snapshot.store, sess.ext
            count = getattr(snapshot.config, "recovery_codes", RECOVERY_DEFAULT) or RECOVERY_DEFAULT
            settings = await self.engine.run(lambda: snapshot.chain.lookup(ext), pool="web")
            if settings is None or not settings.enrolled:
                raise WebError("step", "2FA is off")
            codes = await self.engine.run(lambda: enrollment.new_recovery_codes(store, ext, count), pool="web")
        self._audit("recovery-codes", ext, f["client"], count=count)
        self._notify("recovery-codes", ext, f["client"])
        return {"codes": [display(c) for c in codes]}


# -- module helpers ----------------------------------------------------------------------


def _tries_left(pend: _Pending, lock: LockStatus, now: float, max_failures: int) -> int:
    """Wrong codes this enrollment may still take: its own CONFIRM_TRIES, but never more than the
    lockout allows (the next wrong code after ``max_failures`` locks, so an unlocked extension
    always has at least that one)."""
    if lock.locked(now):
        return 0
    return max(0, min(CONFIRM_TRIES - pend.tries, max(1, max_failures - lock.failures)))


def _who(name: str, settings: ExtensionSettings | None) -> tuple[str, str, str | None]:
    """(extension, throttle key, refusal) of a sign-in by ``name``: the canonical account and its key
    when the sources know it, else the typed name in its own namespace; the refusal
    ("not-an-extension", "system-account") or None. Shared by the page and the gate."""
    if settings is None:
        return name, _name_key(name), "not-an-extension"
    ext = _account(settings)
    return ext, _ext_key(ext), "system-account" if _is_system_account(ext) else None


def _check_name(name: str) -> None:
    """``bad-request`` for a name no source is ever asked about (empty, padded, control characters)."""
    try:
        check_user_name(name)
    except ValueError:
        raise WebError("bad-request", "invalid extension name") from None


def _ext_key(account: str) -> str:
    """The per-extension failure key: the canonical account name, as its source returned it."""
    return "ext:" + account


def _name_key(name: str) -> str:
    """The failure key of a typed name that is no extension this page serves."""
    return "name:" + name.casefold()


def _lock_result(exc: Locked) -> dict[str, str]:
    """The log fields of a refusal by the lockout. The wrong code that set the lock is a wrong code
    of this client (``result="wrong-code" lock="set"``: fail2ban counts it); a try while the
    extension is locked is ``result="locked"``, which fail2ban does not count: someone else may
    have set the lock, and the owner's own tries must not get the owner banned (docs/fail2ban.md)."""
    return {"result": "wrong-code", "lock": "set"} if exc.newly else {"result": "locked"}


def _client_key(client: str) -> str | None:
    """The per-address failure key, or None for an address many people share.

    linkus-web reports ``unix`` for its unix socket and the proxy's own address for a
    reverse proxy it does not trust (no ``--trust-proxy``): every browser then arrives
    as the same address, and a limit on it would let one person with 30 wrong
    passwords throttle everybody's sign-in. For those only the per-extension limit
    applies (and the log line still names the address).
    """
    if client == "unix":
        return None
    try:
        if ipaddress.ip_address(client.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:
        pass
    return "ip:" + client


def _limits(ext_key: str | None, client: str) -> list[tuple[str, int]]:
    """The failure keys one attempt counts under, with their limits (never a key of nothing)."""
    limits = [] if ext_key is None else [(ext_key, MAX_FAILURES_PER_EXT)]
    client_key = _client_key(client)
    if client_key is not None:
        limits.append((client_key, MAX_FAILURES_PER_CLIENT))
    return limits


class _FailureTable:
    """Recent failure times per key, bounded in memory whatever names and addresses arrive.

    Keys of real extensions (``ext:``) are as many as the settings have and are kept in
    full. Keys of unknown names and addresses come from the client, so at most
    ``cap`` of them are kept, the least recently touched leaving first: forgetting one
    only lets that name or address try again, never raises a real extension's limit.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._extensions: dict[str, collections.deque[float]] = {}
        self._others: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def get(self, key: str) -> collections.deque[float] | None:
        return (self._extensions if key.startswith("ext:") else self._others).get(key)

    def add(self, key: str, now: float) -> None:
        if key.startswith("ext:"):
            self._extensions.setdefault(key, collections.deque(maxlen=64)).append(now)
            return
        times = self._others.get(key)
        if times is None:
            times = self._others[key] = collections.deque(maxlen=64)
            while len(self._others) > self.cap:
                self._others.popitem(last=False)
        else:
            self._others.move_to_end(key)
        times.append(now)

    def __len__(self) -> int:
        return len(self._extensions) + len(self._others)


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _account(settings: ExtensionSettings) -> str:
    return str(getattr(settings, "account", None) or settings.user)


def _masked(address: str | None) -> str | None:
    return mask_address(address) if address else None


def _until(locked_until: float | None) -> float | None:
    if locked_until is None or locked_until >= FOREVER:
        return None
    return locked_until


def _is_system_account(name: str) -> bool:
    """root, or an account the passwd database (NSS: files, LDAP, sssd) gives a uid below UID_MIN."""
    if name == "root":
        return True
    try:
        return pwd.getpwnam(name).pw_uid < UID_MIN
    except KeyError:
        return False  # an extension without a local account: PAM decides whether its password is right


def _advance(gen: Generator[Any, str | None, Any], answer: str | None) -> tuple[str, Any, list[str]]:
    """Run the login generator to its next Ask (("ask", prompt, infos)) or its end (("done", decision, infos))."""
    infos: list[str] = []
    value = answer
    try:
        while True:
            item = gen.send(value)
            value = None
            if isinstance(item, flow.Offload):
                continue  # already in the web pool
            if isinstance(item, flow.Ask):
                return "ask", item.prompt, infos
            infos.append(item.text)
    except StopIteration as stop:
        return "done", stop.value, infos


def _flow_context(snapshot: Snapshot, engine: Engine) -> flow.Context:
    """The flow's Context for a web sign-in, built from the daemon's snapshot."""
    config = snapshot.config
    return flow.Context(config=config, clock=engine.clock, chain=snapshot.chain, store=snapshot.store,
                        mailer_factory=lambda: engine.mailer(config), echo_code=True)


def _outcome_of(exc: BaseException) -> str | None:
    """The login outcome a second-factor step that raised ``exc`` ended in; None: no outcome
    (a refusal of the request itself, or a cancelled call)."""
    if isinstance(exc, Locked):
        return Outcome.LOCKED
    if isinstance(exc, Denied):
        return Outcome.DENIED
    if isinstance(exc, Unavailable):
        return Outcome.UNAVAILABLE
    return None
