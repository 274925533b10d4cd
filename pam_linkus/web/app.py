"""linkus-web: the Security Settings pages for extension users (docs/web.md).

A separate, unprivileged process (system user ``linkus-web``; it refuses to run
as root). It holds no secret store and decides nothing: every check and change
is one WEB_CALL to linkusd over its web socket (pam_linkus/daemon/selfservice.py
lists the ops); this process only turns pages into calls and replies into pages.

Why Starlette + uvicorn (Debian's python3-starlette / python3-uvicorn): uvicorn
serves TLS and unix sockets itself, Starlette is small and typed; templates are
Jinja2 with autoescape on. Starlette's ``request.form()`` is never used (bookworm's
python3-multipart predates the fix for CVE-2024-24762): ``_form`` reads a
size-capped urlencoded body itself. Nothing here logs a body, a query string or a
header: the access log is method, path, status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import grp
import html
import io
import logging
import os
import secrets
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import uvicorn  # type: ignore[import-untyped]
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pam_linkus import protocol
from pam_linkus.nodump import forbid_core_dumps
from pam_linkus.policy import canonical_address
from pam_linkus.web import strings
from pam_linkus.web.errors import Refused as _Refused
from pam_linkus.web.errors import Unreachable
from pam_linkus.web.gate import ACCOUNT_PREFIX, PREFIX, GatePages

HERE = Path(__file__).resolve().parent
DEFAULT_SOCKET = "/run/linkusd/web.sock"
MAX_BODY = 8192
#: protocol's frame header: the body's length, big-endian u32.
FRAME_HEADER = 4
#: Calls to linkusd at once (below linkusd's default daemon.max_per_caller of 16); also the most
#: connections to linkusd this process holds, busy and idle together (``KeptConnections``).
MAX_CALLS = 12
#: A kept-open connection to linkusd idle this long is closed instead of used (linkusd closes its
#: side after 10 s idle, pam_linkus.daemon.server.WEB_IDLE).
WEB_KEEP_IDLE = 4.0
#: The auth check's deadline for linkusd's answer (its own store read has gate.check_timeout, 1 s by
#: default): a frozen linkusd costs each proxied request this, then a 502 (nobody passes), never the
#: pages' ``--timeout`` (a PAM password check may take that long; a gate check never should).
CHECK_DEADLINE = 2.0
#: The path prefix of the page being answered ("" or ACCOUNT_PREFIX); links, forms and redirects use it.
_BASE: contextvars.ContextVar[str] = contextvars.ContextVar("linkus_web_base", default="")
SESSION_COOKIE = "linkus_session"
PRE_COOKIE = "linkus_pre"
CODE_CSRF_COOKIE = "linkus_code_csrf"
#: The extension typed at a sign-in that went on to the code step: after a wrong code the sign-in
#: form comes back with it filled in (not secret: the person just typed it; path /sign-in only).
EXT_COOKIE = "linkus_ext"
CSP = ("default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
log = logging.getLogger("linkus-web")


class Settings:
    """How this process was started (command line; no config file, no secrets)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, secure_cookies: bool = False,
                 trust_proxy: bool = False, trust_proxy_tcp: bool = False, timeout: float = 20.0):
        self.socket_path = socket_path
        self.secure_cookies = secure_cookies
        #: X-Forwarded-For is taken from connections on the unix socket only (its mode and group say
        #: who may connect), and from 127.0.0.1/::1 only with ``trust_proxy_tcp``: any local process
        #: can connect to a loopback port and write that header itself (issue 17/2).
        self.trust_proxy = trust_proxy
        self.trust_proxy_tcp = trust_proxy_tcp
        self.timeout = timeout


def create_app(settings: Settings) -> Any:
    """The ASGI app."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    pages = _Pages(settings, env)
    gate = GatePages(pages, SESSION_COOKIE)
    any_method = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes = [
        # the web gate (pam_linkus/web/gate.py); nginx sends these paths here unchanged
        Route(PREFIX + "/auth", gate.auth, methods=any_method),
        Route(PREFIX + "/sign-in", gate.sign_in_form, methods=["GET"]),
        Route(PREFIX + "/sign-in", gate.sign_in, methods=["POST"]),
        Route(PREFIX + "/code", gate.code_form, methods=["GET"]),
        Route(PREFIX + "/code", gate.code, methods=["POST"]),
        Route(PREFIX + "/sign-out", gate.sign_out_form, methods=["GET"]),
        Route(PREFIX + "/sign-out", gate.sign_out, methods=["POST"]),
        Route(PREFIX + "/forbidden", gate.forbidden, methods=["GET"]),
        Route(PREFIX + "/unavailable", gate.unavailable_page, methods=["GET"]),
        Mount(PREFIX + "/static", app=StaticFiles(directory=str(HERE / "static")), name="gate-static"),
        Route("/", pages.index, methods=["GET"]),
        Route("/sign-in", pages.sign_in_form, methods=["GET"]),
        Route("/sign-in", pages.sign_in, methods=["POST"]),
        Route("/sign-in/code", pages.code_form, methods=["GET"]),
        Route("/sign-in/code", pages.code, methods=["POST"]),
        Route("/sign-out", pages.sign_out, methods=["POST"]),
        Route("/settings", pages.settings, methods=["GET"]),
        Route("/settings/2fa", pages.toggle, methods=["POST"]),
        Route("/settings/password", pages.password_form, methods=["GET"]),
        Route("/settings/password", pages.password, methods=["POST"]),
        Route("/settings/method", pages.method_form, methods=["GET"]),
        Route("/settings/method", pages.method, methods=["POST"]),
        Route("/settings/authenticator", pages.authenticator, methods=["GET"]),
        Route("/settings/email", pages.email, methods=["GET"]),
        Route("/settings/email/send", pages.email_send, methods=["POST"]),
        Route("/settings/confirm", pages.confirm, methods=["POST"]),
        Route("/settings/cancel", pages.cancel, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: pages.not_found, 405: pages.not_found})
    return _Headers(_Account(app), settings)


class _Account:
    """The Security Settings pages under ACCOUNT_PREFIX as well as at /: the prefix is taken off the
    path and kept in ``_BASE`` (links, forms, redirects and cookie paths put it back). Only those
    pages: a path under the prefix that names the gate's own (``/linkus-gate/...``) is left as it is,
    so it matches nothing (404): ``/linkus-gate/auth`` is never reachable through this prefix."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == ACCOUNT_PREFIX or path.startswith(ACCOUNT_PREFIX + "/"):
            inner = path[len(ACCOUNT_PREFIX):] or "/"
            if not inner.startswith(PREFIX + "/") and inner != PREFIX:
                scope = {**scope, "path": inner, "raw_path": inner.encode("latin-1", "replace")}
                token = _BASE.set(ACCOUNT_PREFIX)
                try:
                    await self.app(scope, receive, send)
                finally:
                    _BASE.reset(token)
                return
        await self.app(scope, receive, send)


class _Headers:
    """Security headers on every response, and the only access log: method, path, status."""

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.settings = settings
        # encoded once: this wrapper runs for every gate check (one per request nginx proxies)
        extra = [("content-security-policy", CSP), ("x-frame-options", "DENY"),
                 ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"),
                 ("cross-origin-opener-policy", "same-origin"),
                 ("permissions-policy", "camera=(), microphone=(), geolocation=()")]
        if settings.secure_cookies:
            extra.append(("strict-transport-security", "max-age=31536000"))
        self.static_headers = [(k.encode(), v.encode()) for k, v in extra]
        self.page_headers = [*self.static_headers, (b"cache-control", b"no-store")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]
        method, path = scope.get("method", "-"), _printable(scope.get("path", "-"))

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                static = path.startswith(("/static/", PREFIX + "/static/"))
                headers = [*message.get("headers", ()), *(self.static_headers if static else self.page_headers)]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            # the path only: never the query string, a header or a body; and no line per proxied
            # request for nginx's auth subrequests (linkusd summarises refused ones)
            if path != PREFIX + "/auth" or status[0] >= 500:
                log.info("%s %s %s", method, path, status[0])


def _printable(text: str) -> str:
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text[:200])


class _Pages:
    def __init__(self, settings: Settings, env: Any):
        self.conf = settings
        self.env = env
        self.calls = asyncio.Semaphore(MAX_CALLS)
        self.kept = KeptConnections(settings.socket_path)

    # -- plumbing ---------------------------------------------------------------------

    async def call(self, request: dict[str, object]) -> dict[str, Any]:
        try:
            # at most MAX_CALLS connections to linkusd at once: it caps web calls per uid
            # (daemon.max_per_caller, 16 by default) and refuses the ones over it -- a burst of
            # gate checks queues here instead of failing as "unavailable"
            if request.get("op") == "gate_check":
                # the wait for a free connection counts too: a frozen linkusd must not queue checks
                deadline = min(CHECK_DEADLINE, self.conf.timeout)
                async with asyncio.timeout(deadline), self.calls:
                    reply = await self.kept.call(request, timeout=deadline)
            else:
                async with self.calls:
                    reply = await call_web(self.conf.socket_path, request, timeout=self.conf.timeout)
        except (OSError, protocol.ProtocolError, ValueError, TimeoutError) as exc:
            log.warning("linkusd unreachable: %s", type(exc).__name__)
            raise Unreachable from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise Unreachable
        return reply

    def trusted_proxy(self, request: Request) -> bool:
        """Whether this request came from the reverse proxy this process was told to trust."""
        peer = request.client.host if request.client is not None and request.client.host else "unix"
        trusted = ("unix", "127.0.0.1", "::1") if self.conf.trust_proxy_tcp else ("unix",)
        return self.conf.trust_proxy and peer in trusted

    def client(self, request: Request) -> str:
        """The address linkusd logs and limits by: the peer's, or a trusted proxy's X-Forwarded-For.

        Always an address as Python's ipaddress writes it (or the peer as the socket gave it, e.g.
        "unix"): a forwarded value ipaddress does not take -- ``127.000.000.001`` (leading zeros,
        octal to inet_aton), a host name, a scope -- leaves the client unknown (the proxy's own
        address, which fail2ban never bans and no per-address limit counts), never a value that
        fail2ban or a firewall could read as another address.
        """
        peer = request.client.host if request.client is not None and request.client.host else "unix"
        if self.trusted_proxy(request):
            forwarded = request.headers.get("x-forwarded-for", "")
            last = canonical_address(forwarded.rsplit(",", 1)[-1].strip())
            if last is not None:
                return last
        return canonical_address(peer) or peer[:64]

    def render(self, name: str, status: int = 200, **context: Any) -> Response:
        text = self.env.get_template(name).render(t=strings, base=_BASE.get(), **context)
        return HTMLResponse(text, status_code=status)

    def redirect(self, path: str, *, clear: bool = False) -> Response:
        # relative paths only: never built from request.url (CVE-2026-54282 class of bugs)
        if path.startswith("/") and not path.startswith(PREFIX + "/"):
            path = _BASE.get() + path  # this page's own prefix (ACCOUNT_PREFIX or none)
        response = RedirectResponse(path, status_code=303)
        if clear:
            response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def set_cookie(self, response: Response, name: str, value: str) -> None:
        response.set_cookie(name, value, path="/", httponly=True, samesite="strict",
                            secure=self.conf.secure_cookies)

    async def form(self, request: Request, *names: str) -> dict[str, str]:
        """A urlencoded body of at most MAX_BODY bytes, only the named fields, one value each."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise _Refused("bad-request")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise _Refused("bad-request")
        try:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20,
                                           strict_parsing=False)
        except (UnicodeDecodeError, ValueError):
            raise _Refused("bad-request") from None
        found: dict[str, str] = {}
        for key, value in pairs:
            if key in names:
                if key in found:
                    raise _Refused("bad-request")
                found[key] = value
        return found

    def error_page(self, reply: dict[str, Any], template: str = "message.html", **context: Any) -> Response:
        """The page for an error that ends the current step (the gate's pages give their own
        ``template`` and its ``context``: a way back to the gate's sign-in, not to this page's)."""
        word = reply.get("error")
        if word == "expired":
            return self.redirect("/sign-in?expired=1", clear=True)
        if word == "locked":
            until = reply.get("until")
            text = (strings.LOCKED.format(until=time.strftime("%H:%M", time.localtime(until)))
                    if isinstance(until, (int, float)) else strings.LOCKED_ADMIN)
            return self.render(template, 403, title=strings.LOCKED_TITLE, text=text, kind="locked", **context)
        if word == "throttled" and reply.get("reason") == "email-code":
            return self.render(template, 429, title=strings.TITLE, kind="throttled",
                               text=strings.EMAIL_WAIT.format(seconds=_seconds(reply.get("retry_after"))), **context)
        if word == "throttled":
            minutes = max(1, int(reply.get("retry_after", 60)) // 60 + 1)
            return self.render(template, 429, title=strings.TITLE,
                               text=strings.THROTTLED.format(minutes=minutes), kind="throttled", **context)
        if word == "code":
            # signed in with the password, the code not given yet: that step is where every page leads
            return self.redirect("/sign-in/code")
        if word == "step":
            return self.render(template, 409, title=strings.TITLE, text=strings.STEP, kind="step", **context)
        if word == "bad-request":
            return self.render(template, 400, title=strings.TITLE, text=strings.BAD_REQUEST,
                               kind="bad-request", **context)
        return self.unavailable()

    def unavailable(self) -> Response:
        return self.render("message.html", 503, title=strings.UNAVAILABLE_TITLE, text=strings.UNAVAILABLE,
                           kind="unavailable")

    async def guarded(self, request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            return await handler()
        except Unreachable:
            return self.unavailable()
        except _Refused as refused:
            return self.error_page({"error": refused.word})

    def token(self, request: Request) -> str:
        token = request.cookies.get(SESSION_COOKIE, "")
        if not token or len(token) > 64:
            raise _Refused("expired")
        return token

    async def status(self, request: Request) -> dict[str, Any]:
        reply = await self.call({"op": "status", "session": self.token(request), "client": self.client(request)})
        if not reply["ok"]:
            # status answers "step" only to a session that still waits for its sign-in code
            raise _Refused("code" if reply.get("error") == "step" else str(reply.get("error")))
        return reply

    async def changed(self, request: Request, op: str, **fields: str) -> dict[str, Any]:
        """A call that carries the session and the form's CSRF token."""
        return await self.call({"op": op, "session": self.token(request), "client": self.client(request),
                                **fields})

    # -- pages ------------------------------------------------------------------------

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self.render("message.html", 404, title=strings.TITLE, text=strings.NOT_FOUND, kind="not-found")

    async def index(self, request: Request) -> Response:
        return self.redirect("/settings" if request.cookies.get(SESSION_COOKIE) else "/sign-in")

    async def sign_in_form(self, request: Request, error: str | None = None, status: int = 200,
                           ext: str = "") -> Response:
        pre = secrets.token_urlsafe(24)
        notice = strings.EXPIRED if request.query_params.get("expired") else None
        if error is None and request.query_params.get("wrong") == "code":
            # back from a wrong sign-in code: the same extension, the password asked again
            error, ext = strings.WRONG_SIGN_IN_CODE, request.cookies.get(EXT_COOKIE, "")
        # after a wrong sign-in the extension stays typed (only the password is asked again)
        response = self.render("sign_in.html", status, csrf=pre, error=error, notice=notice, ext=ext[:64])
        self.set_cookie(response, PRE_COOKIE, pre)
        response.delete_cookie(EXT_COOKIE, path=_BASE.get() + "/sign-in")
        return response

    async def sign_in(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "ext", "password", "csrf")
            pre = request.cookies.get(PRE_COOKIE, "")
            if not pre or not secrets.compare_digest(pre.encode(), f.get("csrf", "").encode()):
                raise _Refused("bad-request")
            ext = f.get("ext", "").strip()
            reply = await self.call({"op": "sign_in", "ext": ext, "password": f.get("password", ""),
                                     "client": self.client(request)})
            if not reply["ok"]:
                if reply.get("error") in ("denied", "bad-request"):
                    return await self.sign_in_form(request, strings.WRONG_SIGN_IN, 401, ext=ext)
                return self.error_page(reply)
            if reply["state"] == "in":
                response = self.redirect("/settings")
            else:
                # shown here, not after a redirect: the flow's lines ("a code was sent to a***@...") go with it
                infos = [str(i) for i in reply.get("info", []) if isinstance(i, str)][:4]
                response = self.render("code.html", csrf=str(reply["csrf"]), error=None, infos=infos)
            self.set_cookie(response, SESSION_COOKIE, str(reply["session"]))
            response.delete_cookie(PRE_COOKIE, path="/")
            if reply["state"] == "code":
                self.set_cookie(response, CODE_CSRF_COOKIE, str(reply["csrf"]))
                response.set_cookie(EXT_COOKIE, ext[:64], path=_BASE.get() + "/sign-in", httponly=True,
                                    samesite="strict", secure=self.conf.secure_cookies)
            return response

        return await self.guarded(request, run)

    async def code_form(self, request: Request, error: str | None = None) -> Response:
        csrf = request.cookies.get(CODE_CSRF_COOKIE, "")
        if not request.cookies.get(SESSION_COOKIE) or not csrf:
            return self.redirect("/sign-in")
        return self.render("code.html", 200 if error is None else 401, csrf=csrf, error=error, infos=[])

    async def code(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "code", "csrf")
            reply = await self.changed(request, "sign_in_code", code=f.get("code", ""), csrf=f.get("csrf", ""))
            if not reply["ok"]:
                if reply.get("error") == "denied":
                    # a wrong code ended this sign-in: back to the sign-in form (its own URL), the
                    # extension kept from the cookie the sign-in set, focus on the password
                    response = self.redirect("/sign-in?wrong=code", clear=True)
                    response.delete_cookie(CODE_CSRF_COOKIE, path="/")
                    return response
                return self.error_page(reply)
            response = self.redirect("/settings")
            response.delete_cookie(CODE_CSRF_COOKIE, path="/")
            response.delete_cookie(EXT_COOKIE, path=_BASE.get() + "/sign-in")
            return response

        return await self.guarded(request, run)

    async def sign_out(self, request: Request) -> Response:
        async def run() -> Response:
            # Signing out only removes access: linkusd ends the session whatever the form says, so a
            # body that is empty, of another type or malformed must not keep the session alive (17/6).
            try:
                csrf = (await self.form(request, "csrf")).get("csrf", "")
            except _Refused:
                csrf = ""
            token = request.cookies.get(SESSION_COOKIE, "")
            if token and len(token) <= 64:
                await self.changed(request, "sign_out", csrf=csrf)
            response = self.redirect("/sign-in", clear=True)
            response.delete_cookie(CODE_CSRF_COOKIE, path="/")
            return response

        return await self.guarded(request, run)

    async def settings(self, request: Request) -> Response:
        async def run() -> Response:
            st = await self.status(request)
            notice = {"saved": strings.EDITED, "off": strings.DISABLED_DONE,
                      "unchanged": strings.NOTHING_CHANGED}.get(request.query_params.get("done", ""))
            return self.render("settings.html", st=st, notice=notice, when=_when)

        return await self.guarded(request, run)

    async def toggle(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf", "enabled")
            st = await self.status(request)
            if not secrets.compare_digest(st["csrf"].encode(), f.get("csrf", "").encode()):
                raise _Refused("bad-request")
            want = f.get("enabled") == "on"
            if want and not st["enabled"]:
                return self.redirect("/settings/password?for=enable")
            if not want and st["enabled"]:
                return self.redirect("/settings/password?for=disable")
            return self.redirect("/settings?done=unchanged")

        return await self.guarded(request, run)

    async def password_form(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        async def run() -> Response:
            purpose = request.query_params.get("for", "enable")
            if purpose not in ("enable", "disable", "recovery"):
                raise _Refused("bad-request")
            st = await self.status(request)
            return self.render("password.html", status, st=st, purpose=purpose, error=error)

        return await self.guarded(request, run)

    async def password(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf", "password", "for")
            purpose = f.get("for", "")
            op = {"enable": "enroll_start", "disable": "disable", "recovery": "recovery_codes"}.get(purpose)
            if op is None:
                raise _Refused("bad-request")
            reply = await self.changed(request, op, csrf=f.get("csrf", ""), password=f.get("password", ""))
            if not reply["ok"]:
                if reply.get("error") == "denied":
                    request.scope["query_string"] = urllib.parse.urlencode({"for": purpose}).encode()
                    return await self.password_form(request, strings.WRONG_PASSWORD, 401)
                return self.error_page(reply)
            if purpose == "enable":
                return self.redirect("/settings/method")
            if purpose == "disable":
                return self.redirect("/settings?done=off")
            st = await self.status(request)
            return self.render("recovery.html", st=st, codes=reply["codes"])

        return await self.guarded(request, run)

    async def method_form(self, request: Request) -> Response:
        async def run() -> Response:
            st = await self.status(request)
            if st["pending"] is None:
                raise _Refused("step")
            return self.render("method.html", st=st)

        return await self.guarded(request, run)

    async def method(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf", "method")
            reply = await self.changed(request, "enroll_method", csrf=f.get("csrf", ""),
                                       method=f.get("method", ""))
            if not reply["ok"]:
                return self.error_page(reply)
            return self.redirect("/settings/authenticator" if f.get("method") == "totp" else "/settings/email")

        return await self.guarded(request, run)

    async def authenticator(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        async def run() -> Response:
            st = await self.status(request)
            pending = st["pending"]
            if pending is None or pending.get("method") != "totp":
                raise _Refused("step")
            return self.render("authenticator.html", status, st=st, p=pending, qr=_qr_svg(pending["uri"]),
                               grouped=_grouped(pending["secret"]), error=error)

        return await self.guarded(request, run)

    async def email(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        async def run() -> Response:
            st = await self.status(request)
            pending = st["pending"]
            if pending is None or pending.get("method") != "email":
                raise _Refused("step")
            again = pending.get("sent_to") and request.query_params.get("again") == "1"
            return self.render("email.html", status, st=st, p=pending, error=error, again=bool(again))

        return await self.guarded(request, run)

    async def email_send(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf", "address")
            fields = {"csrf": f.get("csrf", "")}
            if f.get("address", "").strip():
                fields["address"] = f["address"].strip()
            reply = await self.changed(request, "email_send", **fields)
            if not reply["ok"]:
                if reply.get("error") == "bad-request":  # the typed address, or none typed and none on file
                    return await self.email(request, strings.BAD_ADDRESS if "address" in fields else strings.NO_ADDRESS,
                                            400)
                if reply.get("error") == "throttled" and reply.get("reason") == "email-code":
                    # nothing was sent: say so and how long to wait, on the same page
                    wait = strings.EMAIL_WAIT.format(seconds=_seconds(reply.get("retry_after")))
                    return await self.email(request, wait, 429)
                return self.error_page(reply)
            return self.redirect("/settings/email?again=1" if reply.get("pending") else "/settings/email")

        return await self.guarded(request, run)

    async def confirm(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf", "code")
            st = await self.status(request)
            method = (st["pending"] or {}).get("method")
            reply = await self.changed(request, "enroll_confirm", csrf=f.get("csrf", ""), code=f.get("code", ""))
            if reply["ok"]:
                return self.redirect("/settings?done=saved")
            if reply.get("error") == "denied":
                left = int(reply.get("tries_left", 0))
                if left <= 0:
                    return self.render("message.html", 401, title=strings.TITLE, text=strings.WRONG_CODE_ENDED,
                                       kind="denied")
                text = (strings.WRONG_CODE_LEFT_ONE if left == 1 else strings.WRONG_CODE_LEFT).format(left=left)
                page = self.authenticator if method == "totp" else self.email
                return await page(request, text, 401)
            return self.error_page(reply)

        return await self.guarded(request, run)

    async def cancel(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.form(request, "csrf")
            reply = await self.changed(request, "enroll_cancel", csrf=f.get("csrf", ""))
            if not reply["ok"]:
                return self.error_page(reply)
            return self.redirect("/settings?done=unchanged")

        return await self.guarded(request, run)


async def call_web(socket_path: str, request: dict[str, object], *, timeout: float) -> dict[str, object]:
    """One WEB_CALL to linkusd on this process's event loop (protocol.call_web's frames, limits
    and overall deadline, without a thread hop: the gate's auth check runs once per proxied request).
    Raises OSError, TimeoutError or ProtocolError (a peer that closes early: PeerClosed)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=protocol.WEB_MAX_BODY + 64)
        try:
            writer.write(protocol.encode_json(protocol.Msg.WEB_CALL, request))
            await writer.drain()
            try:
                header = await reader.readexactly(FRAME_HEADER)
                body = await reader.readexactly(protocol.body_length(header, protocol.WEB_MAX_BODY))
            except asyncio.IncompleteReadError:
                raise protocol.PeerClosed("linkusd closed the connection") from None
            return protocol.decode_body(body, {protocol.Msg.WEB_REPLY}).json()
        finally:
            writer.close()


class _Stale(Exception):
    """A kept connection linkusd had closed (idle, restarted) before this call reached it."""


class KeptConnections:
    """Connections to linkusd's web socket kept open for the gate's checks, one call at a time each.

    A check runs once per request nginx proxies; a new connection per check cost linkusd an accept,
    SO_PEERCRED, a /proc read and its admission, about as much as the check itself. Only gate_check
    goes this way: it changes nothing but a session's last-seen time, so a check whose kept
    connection turns out closed before any reply byte (linkusd's idle timeout, a restart) is simply
    sent again on a new connection; every other call keeps its own connection (a sign-in must never
    be sent twice). Bounds: callers hold ``_Pages.calls`` (MAX_CALLS) while they use one, and a new
    connection is made only when none is idle, so busy + idle <= MAX_CALLS; one idle longer than
    WEB_KEEP_IDLE is closed. A connection is kept only after a whole reply: a timeout, a
    cancellation or an error closes it. Nothing here caches an answer: each check asks linkusd.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.idle: list[tuple[socket.socket, float]] = []

    async def call(self, request: dict[str, object], *, timeout: float) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        frame = protocol.encode_json(protocol.Msg.WEB_CALL, request)
        async with asyncio.timeout(timeout):
            while True:  # bounded: each _Stale uses up one idle connection, and a new one never raises it
                sock, reused = await self._take(loop)
                try:
                    reply = await _exchange(loop, sock, frame, reused)
                except _Stale:
                    sock.close()
                    continue
                except BaseException:
                    sock.close()
                    raise
                self.idle.append((sock, loop.time()))
                return reply

    async def _take(self, loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, bool]:
        now = loop.time()
        while self.idle:
            sock, since = self.idle.pop()
            if now - since < WEB_KEEP_IDLE:
                return sock, True
            sock.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock, False

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[0].close()


async def _exchange(loop: asyncio.AbstractEventLoop, sock: socket.socket, frame: bytes,
                    reused: bool) -> dict[str, object]:
    """One WEB_CALL and its WEB_REPLY on ``sock``; raises _Stale when a ``reused`` connection was
    closed (or reset) before any byte of the reply, PeerClosed when the reply breaks off."""
    try:
        await loop.sock_sendall(sock, frame)
    except (BrokenPipeError, ConnectionResetError):
        if reused:
            raise _Stale from None
        raise
    buf = bytearray()
    need = FRAME_HEADER
    while len(buf) < need:
        try:
            data = await loop.sock_recv(sock, max(need - len(buf), 4096))
        except ConnectionResetError:
            data = b""
        if not data:
            if reused and not buf:
                raise _Stale
            raise protocol.PeerClosed("linkusd closed the connection")
        buf += data
        if need == FRAME_HEADER and len(buf) >= FRAME_HEADER:
            need = FRAME_HEADER + protocol.body_length(bytes(buf[:FRAME_HEADER]), protocol.WEB_MAX_BODY)
    if len(buf) != need:
        raise protocol.ProtocolError("linkusd sent more than one reply")
    return protocol.decode_body(bytes(buf[FRAME_HEADER:]), {protocol.Msg.WEB_REPLY}).json()


def _seconds(value: object) -> int:
    """A ``retry_after`` from linkusd as whole seconds, at least 1 (it is only shown)."""
    return max(1, int(value)) if isinstance(value, (int, float)) else 60


def _when(epoch: object) -> str:
    if not isinstance(epoch, (int, float)) or not epoch:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _grouped(secret: str) -> str:
    return " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))


def _qr_svg(uri: str) -> Any:
    """The otpauth URI as an inline SVG (segno; made here, so the secret never leaves in a URL)."""
    import segno  # optional: only the enrollment page's QR code needs it

    out = io.BytesIO()
    segno.make(uri, error="m").save(out, kind="svg", scale=5, border=4, xmldecl=False, svgns=True, omitsize=True,
                                    title=strings.QR_LABEL, svgclass="qr", lineclass=None)
    svg = out.getvalue().decode("ascii")
    # segno's SVG holds only rect/path elements and our escaped label: safe to embed as markup
    return Markup(svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(strings.QR_LABEL)}" ', 1))  # noqa: S704


# -- command ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linkus-web", allow_abbrev=False,
                                     description="Security Settings pages for extension users (asks linkusd).")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:8089", help="HOST:PORT (default: %(default)s)")
    where.add_argument("--unix", help="listen on this unix socket instead (behind a reverse proxy)")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="linkusd's web socket (default: %(default)s)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="and this key (PEM)")
    parser.add_argument("--unix-mode", default="0660", help="the --unix socket's mode (default: %(default)s)")
    parser.add_argument("--unix-group", help="the --unix socket's group: the reverse proxy's (e.g. www-data)")
    parser.add_argument("--trust-proxy", action="store_true",
                        help="take the client address from X-Forwarded-For of the proxy on the --unix socket")
    parser.add_argument("--trust-proxy-tcp", action="store_true",
                        help="with --listen: also from 127.0.0.1/::1 -- only where no untrusted user can run a "
                             "local process (any of them could set X-Forwarded-For and dodge the per-address limit)")
    parser.add_argument("--secure-cookies", action="store_true",
                        help="mark cookies Secure (behind a TLS proxy; implied by --tls-cert)")
    parser.add_argument("--timeout", type=float, default=20.0, help=argparse.SUPPRESS)
    return parser


def bind_unix(path: str, mode: int, group: str | None) -> socket.socket:
    """The --unix listening socket, made here with ``mode`` and ``group`` before anyone can connect.

    uvicorn's own ``uds`` makes the socket 0666 (any local user could connect and, with
    --trust-proxy, write X-Forwarded-For): the socket is bound under a umask that leaves
    nobody in, then given its group and mode, then listens. A stale socket (one nobody
    listens on any more) is replaced; any other file there is an error.
    """
    gid = grp.getgrnam(group).gr_gid if group else -1
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(17, "exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                raise OSError(98, "another process listens on it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() == 0 or os.getuid() == 0:
        print("linkus-web: refusing to run as root; run it as the linkus-web user", file=sys.stderr)
        return 2
    try:
        forbid_core_dumps()  # a sign-in's password passes through this process
    except OSError as exc:
        print(f"linkus-web: cannot turn core dumps off: {exc.strerror}", file=sys.stderr)
        return 1
    if bool(args.tls_cert) != bool(args.tls_key):
        print("linkus-web: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.trust_proxy and not args.unix and not args.trust_proxy_tcp:
        print("linkus-web: --trust-proxy needs --unix (the proxy's socket; any local user can connect to a "
              "TCP port and fake X-Forwarded-For), or --trust-proxy-tcp on a host without untrusted users",
              file=sys.stderr)
        return 2
    if args.trust_proxy_tcp and (args.unix or not args.trust_proxy):
        print("linkus-web: --trust-proxy-tcp goes with --trust-proxy and --listen", file=sys.stderr)
        return 2
    try:
        unix_mode = int(args.unix_mode, 8)
    except ValueError:
        unix_mode = -1
    if not 0 <= unix_mode <= 0o777 or unix_mode & 0o007:
        print("linkus-web: --unix-mode must be octal, with nothing for others (e.g. 0660)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="linkus-web: %(message)s", stream=sys.stderr)
    settings = Settings(args.socket, secure_cookies=bool(args.secure_cookies or args.tls_cert),
                        trust_proxy=args.trust_proxy, trust_proxy_tcp=args.trust_proxy_tcp, timeout=args.timeout)
    options: dict[str, Any] = {"access_log": False, "log_level": "warning", "server_header": False,
                               "proxy_headers": False, "limit_concurrency": 200, "timeout_keep_alive": 5}
    if args.unix:
        try:
            options["fd"] = bind_unix(args.unix, unix_mode, args.unix_group).detach()
        except (OSError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"no group {args.unix_group!r}"
            print(f"linkus-web: cannot listen on {args.unix}: {reason}", file=sys.stderr)
            return 1
    else:
        host, _, port = args.listen.rpartition(":")
        options["host"] = host.strip("[]") or "127.0.0.1"
        options["port"] = int(port)
    if args.tls_cert:
        options["ssl_certfile"] = args.tls_cert
        options["ssl_keyfile"] = args.tls_key
    uvicorn.run(create_app(settings), **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
