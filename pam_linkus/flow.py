"""The decision of one login: settings -> policy -> challenge -> verify -> record.

The flow is a generator: it yields ``Ask`` when it needs the person's answer and
``Info`` for a line to show, and returns a ``Decision`` (success or skip) or
raises a LinkusError for every other outcome. Whoever drives it owns the
conversation: linkusd relays each step over the PAM client's socket and runs the
work between two steps in its worker pool, so a login waiting for a person holds
no worker (docs/guide.md, "Capacity and caps of linkusd"); the web self-service keeps a suspended
generator in its session; the CLI and tests drive it with ``authenticate`` and
a Prompter. The flow never touches a socket or a PAM handle.

Every state key is the account's canonical name as its source returned it
(``ExtensionSettings.account``), so name variants share one record.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn, Protocol

from nss_config.answer_cache import NotCached
from nss_config.base import check_user_name
from pam_linkus import emailcode, groups, policy
from pam_linkus.errors import (
    CodeRejected,
    ConversationFailed,
    Denied,
    LinkusError,
    Locked,
    NotEnrolled,
    SourceUnavailable,
)
from pam_linkus.mail import Mailer, SmtpMailer
from pam_linkus.outcome import Decision, Outcome
from pam_linkus.recovery import DUMMY_SALT, digest, normalize_recovery_code
from pam_linkus.state.base import TotpAttempt
from pam_linkus.totp import clock_skew_steps, decode_secret, match_totp

if TYPE_CHECKING:
    from nss_config.base import ExtensionSettings
    from nss_config.chain import SourceChain
    from pam_linkus.config import Config, Profile
    from pam_linkus.state.base import LockStatus, StateStore


@dataclass(frozen=True)
class Ask:
    """The flow needs an answer: the driver sends back the text, or None when there is none."""

    prompt: str
    echo: bool = False


@dataclass(frozen=True)
class Info:
    """A line to show the person; ``error`` shows it as an error message."""

    text: str
    error: bool = False


class Offload:
    """The flow is about to wait for a server (LDAP, SMTP) or to burn CPU (scrypt of a recovery code).

    linkusd runs the steps of a login with SQLite state on its event loop and moves
    the rest of that step to its worker pool when it sees this; every other
    driver just goes on (``send(None)``).
    """

    __slots__ = ()


#: The one Offload step.
OFFLOAD = Offload()

Steps = Generator["Ask | Info | Offload", "str | None", Decision]


class Prompter(Protocol):
    """A conversation the CLI and tests drive the flow with (``authenticate``)."""

    def ask(self, prompt: str, *, echo: bool = False) -> str:
        """Return the answer; raise ConversationFailed when there is none."""
        ...

    def info(self, text: str) -> None:
        """Show a line (never raises)."""
        ...


@dataclass(frozen=True)
class LoginRequest:
    """Who is logging in, from where, through which service (the PAM items).

    ``kept`` is set on the second line of single-field mode: the code the first
    line split off the password (possibly empty); the flow then asks nothing.
    ``rhost_trusted`` is False when the PAM items come from a caller whose
    rhost must not grant an exemption or a grace period (DESIGN.md).
    """

    user: str
    service: str = "-"
    rhost: str | None = None
    tty: str | None = None
    ruser: str | None = None
    profile: str | None = None
    kept: str | None = None
    rhost_trusted: bool = True

    def for_account(self, account: str) -> LoginRequest:
        return replace(self, user=account)


@dataclass
class Context:
    """Everything a login decision needs, injected (one per login).

    ``method``, ``source`` and ``account`` are filled in as the login goes, so the
    log line can name them even when it ends in an exception.
    """

    config: Config
    clock: Callable[[], float]
    chain: SourceChain
    store: StateStore
    mailer_factory: Callable[[], Mailer] | None = None
    totp_prompt: str | None = None
    echo_code: bool = False
    method: str = "-"
    source: str = "-"
    account: str = "-"

    def mailer(self) -> Mailer:
        if self.mailer_factory is None:
            return SmtpMailer(self.config.smtp)
        return self.mailer_factory()


def profile_for(req: LoginRequest, config: Config) -> Profile:
    """The policy for this login: the PAM line's ``profile=``, else the service's profile if one
    is configured, else the top-level policy. An unknown explicit profile is a ConfigError."""
    if req.profile is not None:
        return config.profile(req.profile, explicit=True)
    return config.profile(req.service, explicit=False)


def _check_name(user: str) -> None:
    try:
        check_user_name(user)
    except ValueError:
        raise Denied("invalid user name") from None


def _lookup(req: LoginRequest, ctx: Context) -> ExtensionSettings | None:
    settings = ctx.chain.lookup(req.user)
    ctx.source = settings.source if settings is not None else "-"
    return settings


def _lookup_account(req: LoginRequest, ctx: Context) -> tuple[ExtensionSettings | None, frozenset[str] | None]:
    """The settings and, when a group rule names an LDAP group, the account's directory groups."""
    if not ctx.config.group_policy:
        return _lookup(req, ctx), None  # no rule needs the groups
    want = any(rule.ldap_groups for rule in ctx.config.group_policy)
    settings, directory_groups = ctx.chain.lookup_account(req.user, want_groups=want)
    ctx.source = settings.source if settings is not None else "-"
    return settings, directory_groups


def group_profile(req: LoginRequest, ctx: Context, profile: Profile,
                  directory_groups: frozenset[str] | None) -> Profile:
    """``profile`` made stricter by the group rules the account matches (``policy.combine``).

    Unix groups are those of the login name (what the password module checked); LDAP groups
    come from the directory entry. A rule that names an LDAP group while the directory's
    answer is unknown (not asked, or down under ``on_source_unavailable: next``) makes the
    login unavailable: a guess could pick a weaker policy.
    """
    rules = ctx.config.group_policy
    if not rules:
        return profile
    member = groups.membership(req.user, directory_groups)
    try:
        matching = policy.matching_rules(rules, member)
    except groups.MembershipUnknown:
        check = getattr(ctx.chain, "group_attribute_problem", None)
        problem = check(ask=False) if check is not None else None
        raise SourceUnavailable("group_policy: the account's LDAP groups are not known "
                                f"({problem or 'the directory was not asked or did not answer'})") from None
    return policy.combine(profile, matching)


def _lookup_or_offload(req: LoginRequest, ctx: Context) -> Generator[Offload, str | None,
                                                                    ExtensionSettings | None]:
    """The settings from memory when the chain has them (YAML, LDAP's recent answers: on
    linkusd's event loop), else announce the wait for the directory and ask it."""
    if not ctx.chain.waits_for_servers:
        return _lookup(req, ctx)
    recalled = ctx.chain.recall(req.user)
    if isinstance(recalled, NotCached):
        yield OFFLOAD  # the directory is next
        return _lookup(req, ctx)
    ctx.source = recalled.source if recalled is not None else "-"
    return recalled


def split_digits(req: LoginRequest, ctx: Context) -> int:
    """Single-field mode, first line: how many trailing characters of the answer are the code.

    An enrolled TOTP extension has its digits; a name that is unknown or not enrolled
    has 0 under ``enforce: enrolled`` (the whole answer is the password) and the usual
    6 under ``enforce: all``, where the login is refused later anyway. So the answer
    depends on nothing an outsider could not already see from the login's result.
    ``enforce`` is the one the login will get: the profile made stricter by the group rules
    (the groups come from the same lookup; linkusd runs this in a worker when there are rules,
    NSS may be remote), so an unenrolled member of an ``enforce: all`` group gets 6 too.
    """
    _check_name(req.user)
    profile = profile_for(req, ctx.config)
    settings, directory_groups = _lookup_account(req, ctx)
    if ctx.config.group_policy:
        profile = group_profile(req, ctx, profile, directory_groups)
    if settings is not None and settings.enrolled and settings.method == "totp":
        ctx.account = settings.account
        ctx.method = settings.method
        return int(settings.digits)
    return 6 if profile.enforce == "all" else 0


def login(req: LoginRequest, ctx: Context) -> Steps:
    """Decide one login. Success and skip return a Decision; every other outcome raises."""
    _check_name(req.user)
    profile = profile_for(req, ctx.config)
    single = req.kept is not None
    rhost = req.rhost if req.rhost_trusted else None
    # Exempt networks need no I/O and keep working while sources or the store are
    # down; single-field mode never skips an enrolled extension: the user could not
    # know whether to append a code.
    rules = ctx.config.group_policy
    exempt = None
    if not single:
        exempt = policy.exempt_network(rhost, profile)
        if exempt is not None:
            # Group rules can take an exemption away only by setting exempt_networks without
            # this address; with none such, break-glass needs no I/O as before. With only Unix
            # groups in them, NSS decides (no directory); else the lookup below does.
            revoking = policy.rules_that_may_revoke(rhost, rules)
            if not revoking:
                return exempt
            if not any(rule.ldap_groups for rule in revoking):
                yield OFFLOAD  # NSS may be remote (sssd)
                if not policy.matching_rules(revoking, groups.Membership(groups.unix_groups(req.user), None)):
                    return exempt
    if rules:
        yield OFFLOAD  # NSS for the Unix groups (and maybe the directory) is next
        settings, directory_groups = _lookup_account(req, ctx)
        profile = group_profile(req, ctx, profile, directory_groups)
        if not profile.methods:
            ctx.method = settings.method if settings is not None else "-"
            key = settings.account if settings is not None else req.user.casefold()
            yield from _no_factor(req, ctx, key, f"policy {profile.name} allows no second factor "
                                  "(the methods of the profile and the group rules have none in common)")
        if exempt is not None:
            exempt = policy.exempt_network(rhost, profile)
            if exempt is not None:
                return exempt
    else:
        settings = yield from _lookup_or_offload(req, ctx)
    if settings is None or not settings.enrolled:
        ctx.method = settings.method if settings is not None else "-"
        if profile.enforce == "all":
            key = settings.account if settings is not None else req.user.casefold()
            yield from _no_factor(req, ctx, key, "no second factor enrolled and policy is enforce: all")
        if single and req.kept:
            # The first line split a code off for an extension that has none now
            # (enrollment changed in between): the password it forwarded was cut short.
            raise Denied("single-field code given for an extension without 2FA")
        return Decision(Outcome.SKIP, "not enrolled", ctx.method)
    ctx.method = settings.method
    ctx.account = settings.account
    req = req.for_account(settings.account)
    if settings.method not in profile.methods:
        yield from _no_factor(req, ctx, req.user, f"method {settings.method} is not allowed for this service")

    store = ctx.store
    now = ctx.clock()
    status = store.lock_status(req.user, now)
    if status.locked(now):
        yield Info(ctx.config.prompts.locked, error=True)
        raise Locked(f"locked after {status.failures} consecutive failures", locked_until=status.locked_until)
    if not single:
        grace = policy.in_grace(req.user, rhost, profile, store, now, settings.method)
        if grace is not None:
            return grace

    if settings.method == "totp":
        decision = yield from _verify_totp(req, ctx, settings)
    elif settings.method == "email" and not single:
        decision = yield from _verify_email(req, ctx, settings)
    elif settings.method == "email":
        raise NotEnrolled("email codes are not available in single-field mode (forward_pass)")
    else:
        raise NotEnrolled(f"method {settings.method} is not available on this host")
    if not single:
        policy.start_grace(req.user, rhost, profile, store, ctx.clock())
    return decision


def _no_factor(req: LoginRequest, ctx: Context, key: str,
               reason: str) -> Generator[Ask | Info | Offload, str | None, NoReturn]:
    """Refuse a name that cannot give a second factor under ``enforce: all`` (unknown, without
    2FA, or enrolled with a method this service refuses) exactly as an enrolled TOTP
    extension whose code never matches is refused.

    With pam_linkus.so before the password module, anyone can try names: an unknown one
    refused at once told which names exist (issue 17.11), and so did one that got the code
    prompt but never locked while enrolled names lock after ``max_failures`` (issue 17,
    tester 2). So such a name takes the same state steps -- lock check, the TOTP prompt,
    one counted failure, the lock with its message, then no prompt while locked -- keyed by
    ``key``: the account's canonical name when a source knows it, else the name as typed,
    casefolded as the sources compare names. The answer is looked at only for its shape: one
    that could be a recovery code costs the same Offload and scrypt hash (fixed dummy salt) as
    for an enrolled name with codes (tester 3). What remains is timing (docs/security.md).
    """
    now = ctx.clock()
    status = ctx.store.lock_status(key, now)
    if status.locked(now):
        yield Info(ctx.config.prompts.locked, error=True)
        raise Locked(f"{reason}; locked after {status.failures} consecutive failures", status.locked_until)
    answer = yield from _answer(req, ctx.totp_prompt or ctx.config.prompts.totp, ctx.echo_code)
    now = ctx.clock()
    attempt = ctx.store.totp_attempt(key, now, check=lambda: None, keep_reserved=False, **_lockout(ctx))
    status = attempt.status
    if attempt.verdict == TotpAttempt.LOCKED:
        yield Info(ctx.config.prompts.locked, error=True)
        raise Locked(f"{reason}; locked after {status.failures} consecutive failures", status.locked_until)
    code = normalize_recovery_code(answer)
    if code is not None:
        yield OFFLOAD  # as _recover: the same hash, in the same pool
        digest(code, DUMMY_SALT)
    failure = yield from _failure(ctx, reason, status, now)
    if isinstance(failure, Locked):
        raise failure
    raise NotEnrolled(f"{reason} ({status.failures} consecutive failures)")


def _answer(req: LoginRequest, prompt: str, echo: bool) -> Generator[Ask | Info | Offload, str | None, str]:
    if req.kept is not None:
        return req.kept
    answer = yield Ask(prompt, echo)
    if answer is None:
        raise ConversationFailed("no answer to the code prompt")
    return answer


def _reserve(req: LoginRequest, ctx: Context) -> Generator[Ask | Info | Offload, str | None, None]:
    """Count this attempt as a failure before any code is checked (atomic in the store), so
    parallel guesses can never check more than ``max_failures`` codes before the lock."""
    now = ctx.clock()
    status = ctx.store.reserve_attempt(req.user, now, **_lockout(ctx))
    if status.locked(now):
        yield Info(ctx.config.prompts.locked, error=True)
        raise Locked(f"locked after {status.failures} consecutive failures", status.locked_until)


def _lockout(ctx: Context) -> dict[str, int]:
    lockout = ctx.config.lockout
    return {"max_failures": lockout.max_failures, "duration": lockout.duration,
            "permanent_after": lockout.permanent_after}


def _verify_totp(req: LoginRequest, ctx: Context, settings: ExtensionSettings) -> Steps:
    """Reserve, check and record in ONE store step (``totp_attempt``: one durable write).

    Only an answer that may be a recovery code and is no TOTP code leaves its attempt
    reserved: the scrypt hash then runs outside the store's transaction, and the
    attempt is settled as the email path settles it.
    """
    answer = yield from _answer(req, ctx.totp_prompt or ctx.config.prompts.totp, ctx.echo_code)
    now = ctx.clock()
    assert settings.secret is not None  # settings_from_mapping guarantees it for enrolled totp
    secret = decode_secret(settings.secret)
    rejected = ["wrong code"]

    def check() -> int | None:
        try:
            return match_totp(
                secret, answer, now,
                window=ctx.config.totp.window, period=settings.period,
                digits=settings.digits, algorithm=settings.algorithm,
            )
        except CodeRejected as exc:
            rejected[0] = exc.reason
            return None

    attempt = ctx.store.totp_attempt(req.user, now, check=check,
                                     keep_reserved=normalize_recovery_code(answer) is not None, **_lockout(ctx))
    status = attempt.status
    if attempt.verdict == TotpAttempt.ACCEPTED:
        return Decision(Outcome.SUCCESS, "code accepted", "totp")
    if attempt.verdict == TotpAttempt.LOCKED:
        yield Info(ctx.config.prompts.locked, error=True)
        raise Locked(f"locked after {status.failures} consecutive failures", status.locked_until)
    if attempt.verdict == TotpAttempt.REPLAYED:
        raise (yield from _failure(ctx, "replayed code", status, now))
    if attempt.verdict == TotpAttempt.RESERVED:
        recovered = yield from _recover(req, ctx, answer)
        if recovered is not None:
            return recovered
        yield from _settle_failure(req, ctx, rejected[0] + _skew_note(secret, answer, now, ctx, settings))
    raise (yield from _failure(ctx, rejected[0] + _skew_note(secret, answer, now, ctx, settings), status, now))


def _skew_note(secret: bytes, answer: str, now: float, ctx: Context, settings: ExtensionSettings) -> str:
    """', clock off by about N steps' when the code belongs to a step just outside the window
    (a host or phone with a wrong clock locks everyone out otherwise without a hint)."""
    steps = clock_skew_steps(secret, answer, now, window=ctx.config.totp.window, period=settings.period,
                 digits=settings.digits, algorithm=settings.algorithm)
    return "" if steps is None else f", clock off by about {steps} steps"


def _verify_email(req: LoginRequest, ctx: Context, settings: ExtensionSettings) -> Steps:
    """Mail a code (only reached after the password step: the PAM line comes after it), ask, verify."""
    key = emailcode.load_key(ctx.config.email.key_file)
    yield OFFLOAD  # the mail server is next
    delivery = emailcode.deliver(ctx.store, key, ctx.mailer(), ctx.config.email, user=req.user,
                                 address=settings.email, service=req.service, rhost=req.rhost, now=ctx.clock())
    if delivery.state == emailcode.Delivery.THROTTLED:
        # a denial that says when to try again, not "unavailable": a login right after
        # another one (the code spent, the next send a minute away) is no outage
        yield Info(delivery.notice(ctx.config.prompts), error=True)
        raise delivery.refusal()
    yield Info(delivery.notice(ctx.config.prompts))
    answer = yield from _answer(req, ctx.config.prompts.email, ctx.echo_code)
    yield from _reserve(req, ctx)
    try:
        emailcode.verify(ctx.store, key, req.user, answer, ctx.clock(), address=settings.email)
    except CodeRejected as exc:
        recovered = yield from _recover(req, ctx, answer)
        if recovered is not None:
            return recovered
        yield from _settle_failure(req, ctx, exc.reason)
    ctx.store.settle_success(req.user, ctx.clock())
    return Decision(Outcome.SUCCESS, "code accepted", "email")


def _recover(req: LoginRequest, ctx: Context, answer: str) -> Generator[Ask | Info | Offload, str | None,
                                                                       Decision | None]:
    """``_try_recovery_code``, announced as an Offload when it is going to hash (scrypt)."""
    if normalize_recovery_code(answer) is None:
        return None
    yield OFFLOAD
    return _try_recovery_code(req, ctx, answer)


def _try_recovery_code(req: LoginRequest, ctx: Context, answer: str) -> Decision | None:
    """Accept a single-use recovery code typed in place of the TOTP/email code.

    None when the answer cannot be a recovery code or the extension has none left
    (the caller settles its failure). A recovery code never has 6 characters, so a
    mistyped 6-digit code costs no scrypt hash; a recovery-shaped one costs one hash
    whether or not the extension has codes.
    """
    code = normalize_recovery_code(answer)
    if code is None:
        return None
    store = ctx.store
    salt = store.recovery_salt(req.user)
    if salt is None:
        # No codes: spend the hash anyway, so the time does not say so (tester 3).
        digest(code, DUMMY_SALT)
        return None
    # use_recovery_code settles the reserved attempt itself (failures cleared, in its one write)
    if not store.use_recovery_code(req.user, digest(code, salt), ctx.clock()):
        return None
    return Decision(Outcome.SUCCESS, "recovery code accepted", ctx.method)


def _settle_failure(req: LoginRequest, ctx: Context,
                    reason: str) -> Generator[Ask | Info | Offload, str | None, NoReturn]:
    """The reserved attempt failed: raise Locked if it was one too many, else CodeRejected."""
    now = ctx.clock()
    status = ctx.store.settle_failure(req.user, now, **_lockout(ctx))
    raise (yield from _failure(ctx, reason, status, now))


def _failure(ctx: Context, reason: str, status: LockStatus, now: float) -> Generator[Ask | Info, str | None,
                                                                                    LinkusError]:
    """What a counted failure raises: Locked (after telling the person) if it was one too many,
    else CodeRejected."""
    if status.locked(now):
        yield Info(ctx.config.prompts.locked, error=True)
        return Locked(f"{reason}; locked after {status.failures} consecutive failures", status.locked_until,
                      newly=True)
    return CodeRejected(f"{reason} ({status.failures} consecutive failures)")


def authenticate(req: LoginRequest, ctx: Context, prompter: Prompter, *,
                 on_offload: Callable[[], None] | None = None) -> Decision:
    """Drive ``login`` with a Prompter (the CLI, tests): the synchronous way to decide a login.

    Offload steps need nothing here (this caller has no event loop to keep free); ``on_offload``
    is told of each one, so tests see where linkusd would hand the login to a worker.
    """
    steps = login(req, ctx)
    reply: str | None = None
    try:
        while True:
            step = steps.send(reply)
            reply = None
            if isinstance(step, Offload):
                if on_offload is not None:
                    on_offload()
                continue
            if isinstance(step, Ask):
                reply = prompter.ask(step.prompt, echo=step.echo)
            else:
                prompter.info(step.text)
    except StopIteration as done:
        decision: Decision = done.value
        return decision
    finally:
        steps.close()
