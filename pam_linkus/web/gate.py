"""linkus-web's side of the web gate: the /linkus-gate/ pages and nginx's auth subrequest.

Like the Security Settings pages, this decides nothing: each page and each auth
check is one call to linkusd (pam_linkus.daemon.gate lists the ops and says why the
check is cheap). This module turns them into pages, cookies, redirects and status
codes (docs/gate.md, /work/briefs/gate-interface.md):

- ``/linkus-gate/auth`` (nginx ``auth_request``): 204 with ``X-Linkus-User``,
  ``X-Linkus-Method`` and ``X-Linkus-Cookie`` (the client's cookies minus linkus-web's) (pass),
  401 (no valid session), 403 (not for this account, or a path no site covers),
  502 (linkusd cannot be asked: nobody passes). No body.
- ``/linkus-gate/sign-in``, ``/code``, ``/sign-out``: the pages; ``/forbidden`` and
  ``/unavailable`` are pages nginx can show for a 403 or an error (``error_page``).

Cookies: the session cookie ``__Host-linkus_gate`` (Secure; Path=/) under HTTPS --
``--secure-cookies``, or ``X-Forwarded-Proto: https`` from a proxy this process
trusts (``--trust-proxy``, as for X-Forwarded-For) -- else ``linkus_gate``; always
HttpOnly and SameSite=Lax (a link from another site to a protected page must carry
it; a cross-site POST does not). The step cookies of a sign-in are SameSite=Strict.
Under HTTPS only the ``__Host-`` names are read: a sibling host cannot plant them.
Every POST carries a form token that must equal its cookie (double submit), and the
code step's token is also checked by linkusd.
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from pam_linkus.web import strings
from pam_linkus.web.errors import Refused, Unreachable


class Pages(Protocol):
    """What the gate uses of the Security Settings plumbing (pam_linkus.web.app._Pages)."""

    conf: Any

    async def call(self, request: dict[str, object]) -> dict[str, Any]: ...
    def client(self, request: Request) -> str: ...
    def trusted_proxy(self, request: Request) -> bool: ...
    def render(self, name: str, status: int = 200, **context: Any) -> Response: ...
    def redirect(self, path: str, *, clear: bool = False) -> Response: ...
    async def form(self, request: Request, *names: str) -> dict[str, str]: ...
    def error_page(self, reply: dict[str, Any], template: str = ..., **context: Any) -> Response: ...
    def set_cookie(self, response: Response, name: str, value: str) -> None: ...


PREFIX = "/linkus-gate"
#: The Security Settings pages again, under the gate's prefix (pam_linkus.web.app serves them at /
#: and here): nginx's example block passes /linkus-gate/ to linkus-web and gates everything else, so
#: an account sent to turn 2FA on at a gate sign-in (not_enrolled: enroll) goes here, never to
#: /settings (the GUI's path behind the gate).
ACCOUNT_PREFIX = PREFIX + "/account"
SESSION = "linkus_gate"
STEP = "linkus_gate_step"  # the sign-in waiting for its code (linkusd's session of that step)
CODE_CSRF = "linkus_gate_code"
PRE = "linkus_gate_pre"  # the form token of the sign-in and sign-out forms
#: A token, a form token or the ``rd`` field longer than this is nobody's.
MAX_TOKEN, MAX_RD = 64, 2048
#: Identity headers of the auth answer (nginx: auth_request_set $user $upstream_http_x_linkus_user).
USER_HEADER, METHOD_HEADER = "X-Linkus-User", "X-Linkus-Method"
#: On a 401 of the auth answer: where nginx sends the browser (``return 302 $linkus_sign_in``), the
#: sign-in page with the original URI percent-encoded as ``rd`` -- nginx cannot encode it itself, and
#: ``?rd=$request_uri`` loses every parameter after the first ``&``.
SIGN_IN_HEADER = "X-Linkus-Sign-In"
#: On a 204 of the auth answer: the request's Cookie header without any cookie of linkus-web's
#: (``upstream_cookies``); nginx sends it upstream as the Cookie header (``auth_request_set
#: $linkus_cookie $upstream_http_x_linkus_cookie; proxy_set_header Cookie $linkus_cookie;``).
COOKIE_HEADER = "X-Linkus-Cookie"
#: The longest Cookie header handed on (nginx's default large_client_header_buffers line is 8k):
#: cookies past it are left out, whole, never cut.
MAX_COOKIE = 8192
#: Every cookie linkus-web sets is named linkus_* (the gate's linkus_gate*, Security Settings'
#: linkus_session, linkus_pre, linkus_code_csrf, linkus_ext), plain or with a ``__Host-`` or
#: ``__Secure-`` prefix; none of them is ever handed to the GUI.
OWN_COOKIE_PREFIXES = ("linkus_", "__host-linkus_", "__secure-linkus_")


class GatePages:
    """The gate's routes; uses the Security Settings' plumbing (``Pages``)."""

    def __init__(self, pages: Pages, settings_cookie: str):
        self.pages = pages
        self.settings_cookie = settings_cookie  # the Security Settings session (not enrolled: enroll there)

    # -- cookies ------------------------------------------------------------------------

    def secure(self, request: Request) -> bool:
        """HTTPS as the browser sees it: --secure-cookies, or a trusted proxy's X-Forwarded-Proto."""
        if self.pages.conf.secure_cookies:
            return True
        return self.pages.trusted_proxy(request) and request.headers.get("x-forwarded-proto", "") == "https"

    def name(self, request: Request, base: str) -> str:
        return ("__Host-" + base) if self.secure(request) else base

    def cookie(self, request: Request, base: str) -> str:
        value = request.cookies.get(self.name(request, base), "")
        return value if len(value) <= MAX_TOKEN else ""

    def set(self, request: Request, response: Response, base: str, value: str, *, strict: bool = True) -> None:
        response.set_cookie(self.name(request, base), value, path="/", httponly=True,
                            samesite="strict" if strict else "lax", secure=self.secure(request))

    def clear(self, request: Request, response: Response, *bases: str) -> None:
        for base in bases:
            response.delete_cookie(self.name(request, base), path="/", httponly=True, secure=self.secure(request),
                                   samesite="lax")

    # -- pages ----------------------------------------------------------------------------

    def message(self, status: int, title: str, text: str, kind: str, *, rd: str = "") -> Response:
        """A gate page with a way back to the gate's sign-in (keeping ``rd`` where ``_back`` allows)."""
        return self.pages.render("gate_message.html", status, title=title, text=text, kind=kind, back=_back(rd))

    def unavailable(self, rd: str = "") -> Response:
        return self.message(503, strings.UNAVAILABLE_TITLE, strings.GATE_UNAVAILABLE, "unavailable", rd=rd)

    async def auth(self, request: Request) -> Response:
        """nginx's auth subrequest: 204 + identity, 401, 403 or 502; never a body, never a cookie."""
        headers = request.headers
        fields: dict[str, object] = {
            "op": "gate_check", "token": self.cookie(request, SESSION), "client": self.pages.client(request),
            "host": headers.get("x-original-host", headers.get("host", ""))[:300],
            "uri": headers.get("x-original-uri", "/")[:8192]}
        try:
            reply = await self.pages.call(fields)
        except Unreachable:
            return Response(status_code=502)
        if reply["ok"]:
            user, method = str(reply.get("user", "")), str(reply.get("method", ""))
            if not _header_safe(user) or not _header_safe(method):
                return Response(status_code=502)
            cookies = upstream_cookies(headers.getlist("cookie"))
            return Response(status_code=204, headers={USER_HEADER: user, METHOD_HEADER: method,
                                                      COOKIE_HEADER: cookies})
        word = reply.get("error")
        if word == "forbidden":
            return Response(status_code=403)
        if word in ("expired", "bad-request", "denied"):
            return Response(status_code=401, headers={SIGN_IN_HEADER: sign_in_url(str(fields["uri"]))})
        return Response(status_code=502)

    async def sign_in_form(self, request: Request, error: str | None = None, status: int = 200,
                           ext: str = "") -> Response:
        pre = secrets.token_urlsafe(24)
        rd = request.query_params.get("rd", "")[:MAX_RD]
        if error is None and request.query_params.get("wrong") == "code":
            error = strings.WRONG_SIGN_IN_CODE
        notice = strings.GATE_SIGNED_OUT if request.query_params.get("out") else None
        response = self.pages.render("gate_sign_in.html", status, csrf=pre, error=error, notice=notice,
                                     ext=ext[:64], rd=rd)
        self.set(request, response, PRE, pre)
        return response

    async def sign_in(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.pages.form(request, "ext", "password", "csrf", "rd")
            request.state.gate_rd = f.get("rd", "")
            self._check_form_token(request, f.get("csrf", ""))
            ext, rd = f.get("ext", "").strip(), f.get("rd", "")[:MAX_RD]
            reply = await self.pages.call({"op": "gate_sign_in", "ext": ext, "password": f.get("password", ""),
                                           "client": self.pages.client(request), "rd": rd})
            if not reply["ok"]:
                word = reply.get("error")
                if word in ("denied", "bad-request"):
                    request.scope["query_string"] = b"rd=" + _quote(rd).encode()
                    return await self.sign_in_form(request, strings.WRONG_SIGN_IN, 401, ext=ext)
                if word == "not-enrolled":
                    return self._not_enrolled(request, reply, rd)
                return self._error(reply, rd)
            if reply.get("state") == "in":
                return self._signed_in(request, str(reply["token"]), str(reply["return"]))
            infos = [str(i) for i in reply.get("info", []) if isinstance(i, str)][:4]
            response = self.pages.render("gate_code.html", csrf=str(reply["csrf"]), error=None, infos=infos,
                                         rd=rd)
            self.set(request, response, STEP, str(reply["session"]))
            self.set(request, response, CODE_CSRF, str(reply["csrf"]))
            self.clear(request, response, PRE)
            return response

        return await self.guarded(request, run)

    async def code_form(self, request: Request) -> Response:
        csrf = self.cookie(request, CODE_CSRF)
        if not self.cookie(request, STEP) or not csrf:
            return self.pages.redirect(PREFIX + "/sign-in")
        rd = request.query_params.get("rd", "")[:MAX_RD]
        return self.pages.render("gate_code.html", csrf=csrf, error=None, infos=[], rd=rd)

    async def code(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.pages.form(request, "code", "csrf", "rd")
            request.state.gate_rd = f.get("rd", "")
            step, rd = self.cookie(request, STEP), f.get("rd", "")[:MAX_RD]
            if not step:
                return self.pages.redirect(PREFIX + "/sign-in?rd=" + _quote(rd))
            reply = await self.pages.call({"op": "gate_code", "session": step, "csrf": f.get("csrf", ""),
                                           "code": f.get("code", ""), "client": self.pages.client(request),
                                           "rd": rd})
            if not reply["ok"]:
                if reply.get("error") in ("denied", "expired"):
                    # a wrong code ended this sign-in: start again (the lockout counts it, as at a PAM login)
                    response = self.pages.redirect(PREFIX + "/sign-in?wrong=code&rd=" + _quote(rd))
                    self.clear(request, response, STEP, CODE_CSRF)
                    return response
                return self._error(reply, rd)
            response = self._signed_in(request, str(reply["token"]), str(reply["return"]))
            self.clear(request, response, STEP, CODE_CSRF)
            return response

        return await self.guarded(request, run)

    async def sign_out_form(self, request: Request) -> Response:
        pre = secrets.token_urlsafe(24)
        response = self.pages.render("gate_sign_out.html", csrf=pre)
        self.set(request, response, PRE, pre)
        return response

    async def sign_out(self, request: Request) -> Response:
        async def run() -> Response:
            f = await self.pages.form(request, "csrf")
            self._check_form_token(request, f.get("csrf", ""))
            token = self.cookie(request, SESSION)
            response: Response
            try:
                if token:
                    await self.pages.call({"op": "gate_sign_out", "token": token,
                                           "client": self.pages.client(request)})
                response = self.message(200, strings.GATE_SIGNED_OUT_TITLE, strings.GATE_SIGNED_OUT, "signed-out")
            except Unreachable:
                response = self.message(503, strings.UNAVAILABLE_TITLE, strings.GATE_NOT_SIGNED_OUT, "unavailable")
            self.clear(request, response, SESSION, PRE, STEP, CODE_CSRF)
            return response

        return await self.guarded(request, run)

    async def forbidden(self, request: Request) -> Response:
        return self.message(403, strings.GATE_FORBIDDEN_TITLE, strings.GATE_FORBIDDEN, "forbidden")

    async def unavailable_page(self, request: Request) -> Response:
        return self.unavailable()

    # -- helpers ----------------------------------------------------------------------------

    async def guarded(self, request: Request, run: Any) -> Response:
        """``run``'s page; an outage or a refusal (a stale form token: 400) as a gate page whose way
        back keeps the form's ``rd`` (``request.state.gate_rd``, set once the form is read)."""
        try:
            response: Response = await run()
            return response
        except Unreachable:
            rd = str(getattr(request.state, "gate_rd", ""))
            return self.unavailable(rd)
        except Refused as refused:
            rd = str(getattr(request.state, "gate_rd", ""))
            return self._error({"error": refused.word}, rd)

    def _check_form_token(self, request: Request, given: str) -> None:
        expected = self.cookie(request, PRE)
        if not expected or not secrets.compare_digest(expected.encode(), given.encode()):
            raise Refused("bad-request")

    def _signed_in(self, request: Request, token: str, back: str) -> Response:
        # ``back`` was checked by linkusd (return_hosts / default_return)
        response = RedirectResponse(back, status_code=303)
        self.set(request, response, SESSION, token, strict=False)
        self.clear(request, response, PRE)
        return response

    def _not_enrolled(self, request: Request, reply: dict[str, Any], rd: str) -> Response:
        if reply.get("enroll") and isinstance(reply.get("session"), str):
            # the password was right: straight into Security Settings to turn 2FA on
            response = self.pages.redirect(ACCOUNT_PREFIX + "/settings")
            self.pages.set_cookie(response, self.settings_cookie, str(reply["session"]))
            self.clear(request, response, PRE)
            return response
        return self.message(403, strings.GATE_FORBIDDEN_TITLE, strings.GATE_REFUSED, "not-enrolled", rd=rd)

    def _error(self, reply: dict[str, Any], rd: str = "") -> Response:
        """The gate's page for an error that ends this step: the Security Settings page's texts, in
        the gate's template, whose way back is the gate's sign-in (never Security Settings)."""
        word = reply.get("error")
        if word in ("locked", "throttled", "bad-request"):
            return self.pages.error_page(reply, "gate_message.html", back=_back(rd))
        if word == "step":
            return self.message(409, strings.TITLE, strings.STEP, "step", rd=rd)
        return self.unavailable(rd)


def _back(rd: str) -> str:
    """The gate's sign-in, with ``rd`` kept when it can be: at most MAX_RD printable ASCII characters,
    percent-encoded whole into the query (never a link of its own); linkusd checks it at the sign-in
    (return_hosts / default_return), as any ``rd``."""
    if rd and len(rd) <= MAX_RD and all(32 < ord(c) < 127 for c in rd):
        return PREFIX + "/sign-in?rd=" + _quote(rd)
    return PREFIX + "/sign-in"


def sign_in_url(uri: str) -> str:
    """The sign-in page that comes back to ``uri`` (X-Original-URI, nginx's $request_uri): all of it,
    percent-encoded into one ``rd`` value. Only a local path is kept (linkusd checks ``rd`` again at the
    sign-in); one longer than the form keeps (MAX_RD) or not a path gives the bare sign-in page, which
    returns to gate.default_return. Header values reach us as latin-1, i.e. nginx's raw bytes."""
    if not uri.startswith("/") or uri.startswith("//"):
        return PREFIX + "/sign-in"
    raw = uri.encode("latin-1", "replace")
    rd = urllib.parse.quote(raw, safe="/")
    if len(rd) > MAX_RD:
        return PREFIX + "/sign-in"
    return PREFIX + "/sign-in?rd=" + rd


def upstream_cookies(headers: list[str]) -> str:
    """The Cookie header the GUI gets: the client's own cookies (``headers``, the request's Cookie
    header lines) minus every cookie of linkus-web's (``OWN_COOKIE_PREFIXES``, any letter case, any
    spacing, every copy), in the client's order, joined by "; ", at most MAX_COOKIE characters.

    One pass over the cookies, however many there are (a fixed number of regex passes in nginx is
    not enough: any page on this host name can plant more ``linkus_gate*`` dummies). Nothing but
    the client's own cookie pairs is ever written; a pair with a control character is dropped.
    """
    kept: list[str] = []
    size = 0
    for line in headers:
        for piece in line.split(";"):
            pair = piece.strip(" \t")
            if not pair or any(ord(c) < 32 or ord(c) == 127 for c in pair):
                continue
            # the name as linkus-web's own cookie parser reads it (Starlette: str.strip(), so a
            # no-break space or \x85 before a name is no disguise): what the check read is never handed on
            name = pair.partition("=")[0].strip().lower()
            if name.startswith(OWN_COOKIE_PREFIXES):
                continue
            size += len(pair) + (2 if kept else 0)
            if size > MAX_COOKIE:
                return "; ".join(kept)
            kept.append(pair)
    return "; ".join(kept)


def _header_safe(value: str) -> bool:
    return len(value) <= 256 and all(32 <= ord(c) < 127 for c in value)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")
