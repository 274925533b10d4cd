"""linkusd's side of the web gate: sign-in, code, sign-out and the auth check (docs/protocol.md,
"Gate messages"; docs/gate.md).

The gate puts the second factor in front of a PBX's own web GUIs through nginx's
``auth_request``: linkus-web (untrusted, decides nothing) turns pages and auth
subrequests into the ops below; everything is decided here.

Sign-in reuses the Security Settings sign-in (``SelfService``) step for step: the
same name checks, per-extension and per-address throttles reserved before the
password check, the fixed-deadline failure answer (an unknown name and a wrong
password look alike), then the login flow with service ``linkus-gate`` -- the same
replay, lockout and email throttles as a PAM login, in the one state store. Only
what happens after a right code differs: a gate session is written to the STATE
STORE (both back ends), keyed by HMAC(gate key, token), so a copy of the store gives
no usable cookie and every host sharing Redis sees the session and its revocation.

The auth check (``gate_check``) is the hot path: one per proxied request. It never
uses a PAM or web worker and never runs PAM, scrypt or LDAP inline:

- the site is matched and exempt networks compared in memory;
- the session is ONE store read (SQLite: one SELECT joined with the account's lock;
  Redis: one script), in a small pool of its own (``linkusd-gate``) under
  ``gate.check_timeout``, so a slow store costs that deadline, never the event loop
  or a login's worker; ``seen`` is written at most every ``gate.touch_interval`` s;
- sessions, revocations and locks are therefore seen on the very next request;
  what the settings say about the account (found, 2FA on, groups, extension list)
  is asked at most every ``gate.account_check_interval`` s per (account, site) and
  kept in memory meanwhile -- those change rarely and an LDAP lookup per request
  would put the directory's latency on every click. An edit that removes access
  (2FA off under ``enforce: all``, removed from a group or the settings) takes
  effect within that interval; ``linkus-2fa gate-revoke`` takes effect at once.

Answers of ``gate_check``: ok with ``user`` and ``method`` (pass), ``expired``
(no valid session: nginx sends the browser to sign in), ``forbidden`` (signed in
but not allowed on this site, or a path no site covers), ``unavailable``.
Refused checks are counted and summarised in one log line per
``REFUSAL_SUMMARY`` seconds, never one line per request.

The gate's HMAC key is derived from ``email.key_file`` (one file to copy to every
host sharing Redis state, as for email codes).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import hmac
import math
import posixpath
import secrets
import time
import unicodedata
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pam_linkus import emailcode, groups, policy
from pam_linkus.daemon.selfservice import (
    _OPS,
    _TEXT_LIMITS,
    GATE_SERVICE,
    SelfService,
    WebError,
    _advance,
    _check_name,
    _limits,
    _outcome_of,
    _who,
)
from pam_linkus.errors import Denied, LinkusError, Locked, Unavailable
from pam_linkus.logline import LOG_INFO, LOG_NOTICE, LOG_WARNING
from pam_linkus.outcome import Outcome

if TYPE_CHECKING:
    from collections.abc import Generator

    from nss_config.base import ExtensionSettings
    from pam_linkus.config import Config, GateConfig, GateSite, GroupRule
    from pam_linkus.daemon.engine import Engine
    from pam_linkus.daemon.selfservice import _Session
    from pam_linkus.state.base import GateSession

T = TypeVar("T")

SERVICE = GATE_SERVICE
#: The web socket peer's uid for the login lines (caller_uid), set per call.
_PEER_UID: contextvars.ContextVar[int] = contextvars.ContextVar("gate_peer_uid", default=0)
#: Threads for the auth check's store reads (not the PAM or web pools).
CHECK_THREADS = 2
#: Seconds between two summary lines of refused auth checks.
REFUSAL_SUMMARY = 60.0
#: Account verdicts kept in memory (account x site x method); cleared whole when full.
MAX_VERDICTS = 20000
#: Longest return URL accepted (longer goes to default_return).
MAX_RETURN = 2048

_GATE_OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "gate_sign_in": (frozenset({"ext", "password", "client"}), frozenset({"rd"})),
    "gate_code": (frozenset({"session", "csrf", "code", "client"}), frozenset({"rd"})),
    "gate_sign_out": (frozenset({"token"}), frozenset({"client"})),
    "gate_check": (frozenset({"token", "client", "host", "uri"}), frozenset()),
}
_GATE_LIMITS = {"token": 64, "host": 300, "uri": 8192, "rd": 8192}


# -- return URLs and paths ----------------------------------------------------------------


def check_return(rd: str, hosts: list[str], default: str) -> str:
    """``rd`` if it is a safe place to send the browser back to, else ``default``.

    Safe: a local path starting with exactly one "/" (not "//", not "/\\"), or an http(s)
    URL whose host (with its port, if any) is listed in ``hosts``, exact and
    case-insensitive -- no user info, no backslash, no control or non-ASCII characters,
    no percent-encoded "/" or "\\" (browsers and servers disagree on them), at most
    MAX_RETURN characters. Everything else -- other hosts, ``//evil``, ``https:/\\evil``,
    ``javascript:``, ``https://pbx@evil`` -- is ``default``.
    """
    if not rd or len(rd) > MAX_RETURN or not rd.isascii():
        return default
    if any(ord(c) < 33 or ord(c) == 127 or c == "\\" for c in rd):
        return default
    lowered = rd.lower()
    if any(bad in lowered for bad in ("%2f", "%5c", "%00", "%0a", "%0d", "%09")):
        return default
    if rd.startswith("/"):
        if rd.startswith("//"):
            return default
        return rd
    try:
        url = urllib.parse.urlsplit(rd)
        port = url.port  # raises on a bad port
    except ValueError:
        return default
    if url.scheme not in ("http", "https") or not lowered.startswith(url.scheme + "://"):
        return default
    netloc = url.netloc
    if not netloc or "@" in netloc or url.hostname is None:
        return default
    host = netloc.lower()
    if host.endswith(":"):
        return default
    if host not in hosts and (port is None or f"{url.hostname}:{port}" not in hosts):
        return default
    return rd


def normal_path(uri: str) -> str | None:
    """The path of a request URI as the upstream will see it, or None (refused: no site matches).

    nginx gives ``$request_uri`` as the client sent it; the upstream decodes it. A site is
    matched on the decoded path with "." and ".." resolved and repeated "/" merged, so
    ``/%61dmin/`` or ``/x/../admin/`` cannot slip past the rules of ``/admin/``.

    Refused (None, so 403) is every form some common upstream reads differently than this
    match does -- a browser never sends any of them (it percent-encodes and resolves first):

    - ``;`` anywhere in the path, also encoded (Tomcat/Jetty/Spring drop ``;params`` from a
      segment, so ``/ucp/..;/admin/`` is ``/admin/`` to them but under ``/ucp/`` here);
    - a ``%`` left after one decoding (``%25``, ``%u002e``): an upstream that decodes twice
      sees ``/ucp/%252e%252e/admin/`` as ``/admin/``;
    - a raw ``#`` anywhere, and an encoded ``#`` or ``?``: an upstream may end the path there;
    - an encoded dot segment (``%2e%2e``, ``.%2e``): an upstream that resolves before it
      decodes keeps it as a name, one that decodes first resolves it;
    - encoded "/" or "\\", backslashes, control characters, raw non-ASCII, invalid UTF-8,
      characters that Unicode compatibility normalisation (NFKC) changes (a fullwidth
      ``\uff0e`` is "." to some), and ".." above the root.

    The letter case is kept; ``match_site`` matches lower-cased and refuses a path whose site
    would depend on case.
    """
    if "#" in uri:
        return None
    path = uri.split("?", 1)[0]
    if not path.startswith("/") or len(path) > 8192 or not path.isascii() or ";" in path:
        return None
    lowered = path.lower()
    if any(bad in lowered for bad in ("%2f", "%5c", "%25", "%3b", "%23", "%3f")):
        return None
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 or ord(c) == 127 or c in "\\%;#?" for c in decoded):
        return None
    if unicodedata.normalize("NFKC", decoded) != decoded:
        return None
    depth = 0
    for raw, part in zip(path.split("/"), decoded.split("/"), strict=True):
        if part in (".", "..") and raw != part:
            return None  # an encoded dot segment
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part not in ("", "."):
            depth += 1
    trailing = decoded.endswith(("/", "/.", "/.."))
    normal = posixpath.normpath(decoded)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if trailing and normal != "/":
        normal += "/"
    return normal


def path_matches(prefix: str, path: str) -> bool:
    """Whether site path ``prefix`` covers ``path``: equal, or below it ("/admin/" also covers "/admin")."""
    base = prefix.rstrip("/")
    return path == base or path == prefix or path.startswith(base + "/") or not base


def match_site(gate: GateConfig, host: str, path: str) -> GateSite | None:
    """The site for ``host`` and ``path`` (a ``normal_path``), or None (refused).

    Among the sites whose host matches (a site without ``host`` matches the hosts of
    ``return_hosts``, any port), the one with the longest path prefix wins, whatever the order
    of the list; at equal paths (one with ``host``, one without: two with the same host and path
    are a config error) the site naming the host wins. An upstream may ignore letter case or not,
    so the path is matched both as sent and lower-cased (site paths are lower case: config), and
    both must give the same site, else None: ``/ADMIN/`` must not escape ``/admin/`` into ``/``,
    and ``/admin/PUBLIC/x`` (sites ``/admin/`` and ``/admin/public/``) is ``/admin/`` to a
    case-sensitive upstream but ``/admin/public/`` to one that ignores case.
    """
    folded = _longest_site(gate, host, path.lower())
    return folded if folded is _longest_site(gate, host, path) else None


def _longest_site(gate: GateConfig, host: str, path: str) -> GateSite | None:
    host = host.lower()
    bare = _bare_host(host)
    best: GateSite | None = None
    best_rank = (-1, False)
    for site in gate.sites:
        if site.host is not None:
            if site.host not in (host, bare) and _bare_host(site.host) != host:
                continue
        elif host not in gate.return_hosts and bare not in {_bare_host(h) for h in gate.return_hosts}:
            continue
        rank = (len(site.path.rstrip("/")), site.host is not None)
        if path_matches(site.path, path) and rank > best_rank:
            best, best_rank = site, rank
    return best


def _bare_host(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _in_networks(client: str, site: GateSite) -> bool:
    if not site.exempt_networks:
        return False
    address = policy.client_address(client.split("%", 1)[0])
    if address is None:
        return False
    return any(address.version == network.version and address in network for network in site.exempt_networks)


def client_vouched(client: str) -> bool:
    """Whether the ``client`` linkus-web reported is an address fail2ban may ban (``rhost_trusted``).

    Only linkus-web (root or ``daemon.web_group``: the web socket's mode) can send gate ops, and it
    reports either its TCP peer's address -- the connection really came from there -- or, only from
    the proxy it was told to trust (``--trust-proxy``), that proxy's X-Forwarded-For, always written
    as Python's ipaddress writes it; anything it cannot vouch for it reports as the peer ("unix",
    the proxy's loopback address). So an address counts exactly when it is an IP address in that
    canonical form (no scope, no IPv4-mapped form, no leading zeros, lower case): "unix", "-", a
    host name or any other spelling is never trusted, as a PAM login's unclean rhost is not.
    """
    return policy.canonical_address(client) == client


def _locked_reason(exc: Locked) -> str:
    """The reason of a gate login's ``outcome="locked"`` line, as a PAM login's: the code's own
    failure ("wrong code; locked after ...") only when this login's code set the lock
    (``exc.newly``, as selfservice._lock_result); a try while locked never names a code failure."""
    if exc.newly or not exc.reason.startswith(("wrong code", "malformed code", "expired code")):
        return exc.reason
    return "extension is locked"


def gate_key(config: Config) -> bytes:
    """The HMAC key for session tokens, derived from the email key file (one file for all hosts)."""
    base = emailcode.load_key(config.email.key_file)
    return hmac.new(base, b"pam-linkus gate session v1", hashlib.sha256).digest()


def allowed(site: GateSite, account: str, directory_groups: frozenset[str] | None) -> bool:
    """Whether ``account`` may pass ``site``: any one of its allow lists admits; all empty: anyone.

    Groups as pam_linkus.groups answers them (Unix: NSS; LDAP: the entry's group DNs from the
    settings search, ``directory_groups``). An LDAP rule that cannot be decided (the directory's
    answer unknown) is "unavailable" (nobody passes), never a guess.
    """
    if not (site.allow_groups or site.allow_ldap_groups or site.allow_extensions):
        return True
    if account in site.allow_extensions:
        return True
    if not (site.allow_groups or site.allow_ldap_groups):
        return False
    member = groups.membership(account, directory_groups)
    try:
        return groups.matches(site.allow_groups, site.allow_ldap_groups, member)
    except groups.MembershipUnknown:
        raise Unavailable("the account's LDAP groups are not known (site allow_ldap_groups)") from None


def group_rules(config: Config, account: str, directory_groups: frozenset[str] | None) -> list[GroupRule]:
    """The ``group_policy`` rules ``account`` matches (``policy.matching_rules``), as a PAM login
    of that account would use them (flow.group_profile). A rule naming an LDAP group while the
    directory's answer is unknown is "unavailable" (nobody passes): a guess could pick a weaker
    policy."""
    rules = config.group_policy
    if not rules:
        return []
    member = groups.membership(account, directory_groups)
    try:
        return policy.matching_rules(rules, member)
    except groups.MembershipUnknown:
        raise Unavailable("group_policy: the account's LDAP groups are not known") from None


def strictest_enforce(gate: GateConfig, site: GateSite | None, rules: list[GroupRule]) -> str:
    """The enforce of a gate sign-in: ``all`` when the gate, the site or any of the account's
    group rules says so (as policy.combine makes a PAM login's); ``enrolled`` only when all agree."""
    if gate.enforce == "all" or (site is not None and site.enforce == "all"):
        return "all"
    return "all" if any(rule.enforce == "all" for rule in rules) else "enrolled"


def methods_allowed(method: str, rules: list[GroupRule]) -> bool:
    """Whether a session's ``method`` (totp, email, recovery code, ...) is one every matching group
    rule that sets ``methods`` allows -- the restriction a PAM login of the account gets. A
    password-only session is judged by ``strictest_enforce``, not here."""
    if method == "password":
        return True
    return all(rule.methods is None or method in rule.methods for rule in rules)


class _Verdict:
    __slots__ = ("at", "ok", "reason", "generation")

    def __init__(self, at: float, ok: bool, reason: str, generation: int):
        self.at = at
        self.ok = ok
        self.reason = reason
        self.generation = generation


class GateService(SelfService):
    """The Security Settings ops plus the gate's (``gate_*``); one instance per linkusd."""

    OPS = {**_OPS, **_GATE_OPS}
    TEXT_LIMITS = {**_TEXT_LIMITS, **_GATE_LIMITS}

    def __init__(self, engine: Engine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._check_pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="linkusd-gate")
        self._verdicts: dict[tuple[str, str, str], _Verdict] = {}
        self._refused: collections.Counter[str] = collections.Counter()
        self._refused_since = time.monotonic()
        self._key: tuple[int, bytes] | None = None

    async def call(self, request: dict[str, object], peer_uid: int) -> dict[str, object]:
        _PEER_UID.set(peer_uid)  # this task's own context: parallel calls never see each other's
        return await super().call(request, peer_uid)

    # -- plumbing ---------------------------------------------------------------------

    async def _quick(self, fn: Callable[[], T], timeout: float) -> T:
        """``fn`` in the gate's own pool under ``timeout``: Unavailable when late."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(self._check_pool, fn)
        except TimeoutError:
            raise Unavailable(f"gate check took longer than {timeout:g} s") from None

    async def _token_key(self, token: str) -> str:
        snapshot = self.engine.snapshot()
        cached = self._key
        if cached is None or cached[0] != id(snapshot.config):
            config = snapshot.config
            key = await self._quick(lambda: gate_key(config), snapshot.config.daemon.work_timeout)
            cached = self._key = (id(config), key)
        return hmac.new(cached[1], token.encode(), hashlib.sha256).hexdigest()

    def _login_line(self, outcome: str, user: str, account: str, client: str, method: str, reason: str,
                    started: float) -> None:
        """The gate sign-in's one line, in the format of a PAM login's (service ``linkus-gate``).

        The same fields in the same order as server.py's ``_field_map``, ending ``rhost_trusted``,
        so fail2ban counts a gate login by exactly the rules of a PAM login (docs/fail2ban.md):
        the address counts only when it is one linkus-web vouches for (``client_vouched``), and an
        ``outcome="locked"`` only with the reason of the code that set the lock ("wrong code; locked
        ..."), never "locked after ..." of a try while locked (see ``_locked_reason``).
        """
        severity = {Outcome.SUCCESS: LOG_INFO, Outcome.SKIP: LOG_INFO, Outcome.DENIED: LOG_NOTICE}.get(
            outcome, LOG_WARNING)
        self.engine.sink.attempt(severity, {
            "service": SERVICE, "user": user, "account": account, "rhost": client or "-", "tty": "-",
            "ruser": "-", "caller_uid": _PEER_UID.get(), "method": method, "source": "-", "outcome": outcome,
            "reason": reason, "ms": int((time.monotonic() - started) * 1000),
            "rhost_trusted": client_vouched(client)})

    def _refusal(self, why: str) -> None:
        """Count a refused auth check; one summary line per REFUSAL_SUMMARY s at most."""
        self._refused[why] += 1
        now = time.monotonic()
        if now - self._refused_since >= REFUSAL_SUMMARY:
            counts = " ".join(f"{k}={v}" for k, v in sorted(self._refused.items()))
            self._log(LOG_NOTICE, "gate-refused", seconds=int(now - self._refused_since), counts=counts)
            self._refused.clear()
            self._refused_since = now

    def _site_for_return(self, gate: GateConfig, url: str) -> GateSite | None:
        if url.startswith("/"):
            hosts = gate.return_hosts
            host = hosts[0] if hosts else ""
            path = normal_path(url)
        else:
            parts = urllib.parse.urlsplit(url)
            host, path = parts.netloc.lower(), normal_path(parts.path or "/")
        return match_site(gate, host, path) if path is not None else None

    # -- sign-in ----------------------------------------------------------------------

    async def _op_gate_sign_in(self, f: dict[str, str]) -> dict[str, object]:
        started = time.monotonic()
        deadline = self._deadline()
        client, name = f["client"], f["ext"]
        gate = self.engine.snapshot().config.gate
        back = check_return(f.get("rd", ""), gate.return_hosts, gate.default_return)
        site = self._site_for_return(gate, back)
        _check_name(name)
        self._refuse_if_full(_limits(None, client), name, client, "gate-sign-in")
        settings, directory_groups = await self._lookup_groups(name)
        ext, key, refusal = _who(name, settings)
        reservation = self._reserve(_limits(key, client), ext, client, "gate-sign-in")
        if refusal is not None:
            # the page's own line (via=gate) is what fail2ban counts for a name or password failure
            self._login_line(Outcome.DENIED, name, "-", client, "-", refusal.replace("-", " "), started)
            await self._fail("denied", name, client, "web-refused", deadline, via="gate", result=refusal)
        assert settings is not None
        try:
            await self._password(ext, f["password"], client, "gate-sign-in", deadline=deadline,
                                 reservation=reservation, via="gate")
        except WebError:
            self._login_line(Outcome.DENIED, name, ext, client, "-", "wrong password", started)
            raise
        now = self.engine.clock()
        if not settings.enrolled:
            # the strictest of gate, site and the account's group rules (fail closed: groups unknown)
            enforce = strictest_enforce(gate, site, group_rules(self.engine.snapshot().config, ext,
                                                                directory_groups))
            return await self._not_enrolled(gate, enforce, name, ext, client, back, now, started)
        token, sess = self._new_session(ext, now, "code")
        sess.purpose = "gate"
        sess.site = site.name if site is not None else None
        sess.method = settings.method
        gen = self._start_login(ext, SERVICE)
        try:
            kind, payload, infos = await self.engine.run(lambda: _advance(gen, None), pool="web")
        except (Denied, Locked, Unavailable) as exc:
            # every end of the second factor has its login line (service linkus-gate), its one count
            self._forget_session(token)
            self._login_line(_outcome_of(exc) or Outcome.UNAVAILABLE, name, ext, client, settings.method,
                             _locked_reason(exc) if isinstance(exc, Locked) else exc.reason, started)
            raise
        except BaseException:
            self._forget_session(token)
            raise
        return await self._gate_step(token, sess, gen, kind, payload, infos, client, back, name, started)

    async def _not_enrolled(self, gate: GateConfig, enforce: str, name: str, ext: str, client: str, back: str,
                            now: float, started: float) -> dict[str, object]:
        """An account without 2FA: passes on its password only where enforce is ``enrolled``
        (the gate's, the site's and the account's group rules': ``strictest_enforce``); else sent to
        enroll (a Security Settings session) or refused."""
        if enforce == "enrolled":
            token = await self._create_logged(ext, "password", client, now, name, "-", started)
            self._login_line(Outcome.SKIP, name, ext, client, "-", "not enrolled, enforce: enrolled", started)
            return {"state": "in", "token": token, "return": back}
        self._login_line(Outcome.DENIED, name, ext, client, "-", "not enrolled (enforce: all, "
                         f"not_enrolled: {gate.not_enrolled})", started)
        if gate.not_enrolled == "enroll":
            web_token, web = self._new_session(ext, now, "in")
            web.factor = "password"  # it proved the password only: ends once a second factor exists
            self._audit("web-sign-in", ext, client, factor="password", via_gate="enroll")
            raise WebError("not-enrolled", enroll=True, session=web_token, csrf=web.csrf)
        raise WebError("not-enrolled", enroll=False)

    async def _lookup_groups(self, name: str) -> tuple[ExtensionSettings | None, frozenset[str] | None]:
        """The settings of a checked name and, when a group rule names an LDAP group, its directory
        groups (as flow._lookup_account asks them)."""
        snapshot = self.engine.snapshot()
        rules = snapshot.config.group_policy
        if not rules:
            return await self._lookup(name), None
        want = any(rule.ldap_groups for rule in rules)
        found: tuple[ExtensionSettings | None, frozenset[str] | None] = await self.engine.run(
            lambda: snapshot.chain.lookup_account(name, want_groups=want), pool="web")
        return found

    async def _create(self, account: str, method: str, client: str, now: float) -> str:
        """A new gate session in the store; its token (shown once, to the browser)."""
        snapshot = self.engine.snapshot()
        gate, store = snapshot.config.gate, snapshot.store
        token = secrets.token_urlsafe(32)
        key = await self._token_key(token)
        made = await self.engine.run(lambda: store.gate_create(
            key, account, method, client, "", now, lifetime=gate.session_lifetime, idle=gate.idle_timeout,
            max_per_account=gate.max_sessions_per_account, max_total=gate.max_sessions), pool="web")
        if not made:
            self._log(LOG_WARNING, "gate-full", ext=account, max_sessions=gate.max_sessions)
            raise WebError("throttled", "too many gate sessions", retry_after=60)
        return token

    async def _create_logged(self, account: str, method: str, client: str, now: float, name: str,
                             line_method: str, started: float) -> str:
        """``_create``, and when it refuses (too many gate sessions) or the store fails, the login's
        line (and so its one count): the factors were right but nobody gets in. ``denied`` for the
        limit (its reason names no code, so fail2ban never counts it), ``unavailable`` for an outage."""
        try:
            return await self._create(account, method, client, now)
        except WebError as exc:
            self._login_line(Outcome.DENIED, name, account, client, line_method,
                             f"too many gate sessions ({exc.word})", started)
            raise
        except Unavailable as exc:
            self._login_line(Outcome.UNAVAILABLE, name, account, client, line_method, exc.reason, started)
            raise

    async def _gate_step(self, token: str, sess: _Session, gen: Generator[Any, str | None, Any], kind: str,
                         payload: Any, infos: list[str], client: str, back: str, name: str,
                         started: float) -> dict[str, object]:
        if kind == "ask":
            sess.login = gen
            return {"state": "code", "session": token, "csrf": sess.csrf, "prompt": payload, "info": infos,
                    "return": back}
        self._forget_session(token)
        method = str(getattr(payload, "method", "-") or "-")
        if getattr(payload, "outcome", None) != Outcome.SUCCESS:
            # a policy skip (exempt network, grace) is no proof of a second factor here
            self._login_line(Outcome.DENIED, name, sess.ext, client, method, "no second factor given", started)
            raise WebError("denied")
        # a recovery code reaches the GUI as X-Linkus-Method: recovery; the login line keeps the
        # account's method (as a PAM login's: the metrics' method label) and says so in its reason
        reason = str(getattr(payload, "reason", "") or "code accepted")
        session_method = "recovery" if reason.startswith("recovery code") else method
        gate_token = await self._create_logged(sess.ext, session_method, client, self.engine.clock(), name, method,
                                               started)
        self._login_line(Outcome.SUCCESS, name, sess.ext, client, method, reason, started)
        return {"state": "in", "token": gate_token, "return": back}

    async def _op_gate_code(self, f: dict[str, str]) -> dict[str, object]:
        started = time.monotonic()
        gate = self.engine.snapshot().config.gate
        back = check_return(f.get("rd", ""), gate.return_hosts, gate.default_return)

        def failed(sess: _Session, exc: LinkusError) -> None:
            # the account's method, known since the sign-in (as a PAM login's line gives it)
            if isinstance(exc, Locked):
                self._login_line(Outcome.LOCKED, sess.ext, sess.ext, f["client"], sess.method, _locked_reason(exc),
                                 started)
            else:
                self._login_line(_outcome_of(exc) or Outcome.DENIED, sess.ext, sess.ext, f["client"], sess.method,
                                 exc.reason, started)

        sess, gen, kind, payload, infos = await self._code_step(f, "gate", on_fail=failed)
        return await self._gate_step(f["session"], sess, gen, kind, payload, infos, f["client"], back, sess.ext,
                                     started)

    async def _op_gate_sign_out(self, f: dict[str, str]) -> dict[str, object]:
        if not f["token"]:
            return {"ended": 0}
        store = self.engine.snapshot().store
        key = await self._token_key(f["token"])
        ended = await self.engine.run(lambda: store.gate_revoke(key=key), pool="web")
        if ended:
            self._log(LOG_INFO, "gate-sign-out", client=f.get("client"))
        return {"ended": ended}

    # -- the auth check ---------------------------------------------------------------

    async def _op_gate_check(self, f: dict[str, str]) -> dict[str, object]:
        try:
            return await self._check(f)
        except LinkusError:
            # a store or config outage must not write a line per proxied request: summarised
            self._refusal("unavailable")
            raise WebError("unavailable") from None

    async def _check(self, f: dict[str, str]) -> dict[str, object]:
        snapshot = self.engine.snapshot()
        gate = snapshot.config.gate
        path = normal_path(f["uri"])
        site = match_site(gate, f["host"], path) if path is not None else None
        if site is None:
            self._refusal("no-site")
            raise WebError("forbidden")
        if _in_networks(f["client"], site):
            return {"user": "", "method": "exempt", "site": site.name}
        if not f["token"]:
            self._refusal("no-session")
            raise WebError("expired")
        key = await self._token_key(f["token"])
        now = self.engine.clock()
        store = snapshot.store
        sess = await self._read_session(snapshot.inline, store, key, now, site, gate)
        if sess is None:
            self._refusal("no-session")
            raise WebError("expired")
        if sess.locked_until > now:
            self._refusal("locked")
            raise WebError("expired")
        verdict = await self._account_verdict(snapshot.config, site, sess, now)
        if not verdict.ok:
            self._refusal(verdict.reason)
            raise WebError("forbidden" if verdict.reason == "not-allowed" else "expired")
        return {"user": sess.account, "method": sess.method, "site": site.name}

    async def _read_session(self, inline: bool, store: Any, key: str, now: float, site: GateSite,
                            gate: GateConfig) -> GateSession | None:
        """The session, read the cheapest way that never stalls the event loop for long.

        SQLite (``inline``, as linkusd runs local logins' steps): one WAL read on the event loop
        itself -- a reader never waits for a writer, and the loop's connection waits at most
        LOOP_BUSY_TIMEOUT for anything -- and the rare write of ``seen`` (once per
        ``touch_interval`` per session) in the gate pool. Redis: the one script in the gate pool
        under ``gate.check_timeout``.
        """
        def check(touch_after: float) -> GateSession | None:
            found: GateSession | None = store.gate_check(key, now, lifetime=site.session_lifetime,
                                                         idle=site.idle_timeout, touch_after=touch_after)
            return found

        if not inline:
            return await self._quick(lambda: check(gate.touch_interval), gate.check_timeout)
        sess = check(math.inf)
        if sess is not None and now - sess.seen >= gate.touch_interval:
            # at most once per touch_interval per session: the write (which may wait for the lock) off the loop
            await self._quick(lambda: check(gate.touch_interval), gate.check_timeout)
        return sess

    async def _account_verdict(self, config: Config, site: GateSite, sess: GateSession, now: float) -> _Verdict:
        """May the session's account pass ``site`` (settings, 2FA, allow lists)? Kept for
        ``account_check_interval`` s per (account, site, method) and per loaded config."""
        gate = config.gate
        generation = id(config)
        cache_key = (sess.account, site.name, sess.method)
        cached = self._verdicts.get(cache_key)
        if cached is not None and cached.generation == generation and now - cached.at < gate.account_check_interval:
            return cached
        snapshot = self.engine.snapshot()

        def decide() -> tuple[bool, str]:
            settings: ExtensionSettings | None
            want = bool(site.allow_ldap_groups) or any(rule.ldap_groups for rule in config.group_policy)
            settings, directory_groups = snapshot.chain.lookup_account(sess.account, want_groups=want)
            if settings is None:
                return False, "not-an-extension"
            if settings.enrolled and sess.method == "password":
                return False, "enrolled-since"  # signed in on the password alone: now the code is due
            rules = group_rules(config, sess.account, directory_groups)
            if not settings.enrolled and strictest_enforce(gate, site, rules) == "all":
                return False, "not-enrolled"
            # a recovery code stands in for the account's method (as at a PAM login)
            if not methods_allowed(settings.method if sess.method == "recovery" else sess.method, rules):
                return False, "method-not-allowed"  # a group rule now restricts the methods
            if not allowed(site, sess.account, directory_groups):
                return False, "not-allowed"
            return True, "ok"

        ok, reason = await self._quick(decide, config.daemon.work_timeout)
        verdict = _Verdict(now, ok, reason, generation)
        if len(self._verdicts) >= MAX_VERDICTS:
            self._verdicts.clear()
        self._verdicts[cache_key] = verdict
        return verdict
