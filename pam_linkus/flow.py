"""The decision of one login: settings -> policy -> challenge -> verify -> record.

This module never touches ``pamh``. The PAM face (or the CLI, or a test) hands in
a ``Context`` holding the config, a Prompter for the conversation, a clock, a
Mailer for email codes (built from ``smtp`` only when a code is mailed), and
factories for the settings chain and the state store, which are opened only when
a login needs them (a user without 2FA under ``enforce: enrolled`` never opens
the state store).

``authenticate`` returns a Decision for success or skip and raises a LinkusError
for everything else; the face maps both to a PAM code in one place.
"""

from __future__ import annotations

from pam_linkus import policy
from pam_linkus.errors import CodeRejected, Locked, NotEnrolled
from pam_linkus.outcome import Decision, Outcome

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, Protocol

    from nss_config.base import ExtensionSettings
    from nss_config.chain import SourceChain
    from pam_linkus.config import Config
    from pam_linkus.single_field import SingleField
    from pam_linkus.state.base import StateStore

    class Prompter(Protocol):
        """The conversation with the person logging in."""

        def ask(self, prompt: str, *, echo: bool = False) -> str:
            """Ask and return the answer; raise ConversationFailed if there is none."""
            ...

        def info(self, text: str) -> None:
            """Show a line of information (never raises)."""
            ...

    class Mailer(Protocol):
        """Hands one message to a mail server (pam_linkus.mail.SmtpMailer)."""

        def send(self, to: str, subject: str, body: str, *, now: float) -> None:
            """Send or raise MailUnavailable (or ConfigError); never leaves a half-sent state."""
            ...


class LoginRequest:
    """Who is logging in, from where, through which service (PAM items)."""

    __slots__ = ("user", "service", "rhost", "tty")

    def __init__(self, user: str, service: str = "-", rhost: str | None = None, tty: str | None = None):
        self.user = user
        self.service = service
        self.rhost = rhost
        self.tty = tty


class Context:
    """Everything a login decision needs, injected.

    ``single_field`` is set in single-field mode (PAM option ``forward_pass``):
    the code then comes from the combined answer, not from its own prompt.
    ``method`` is filled in as soon as the extension's settings are known, so the
    log line can name it even when the login ends in an exception.
    """

    def __init__(
        self,
        config: Config,
        prompter: Prompter,
        *,
        clock: Callable[[], float],
        open_chain: Callable[[Context], SourceChain] | None = None,
        open_store: Callable[[Context], StateStore] | None = None,
        mailer: Mailer | None = None,
        totp_prompt: str | None = None,
        echo_code: bool = False,
        single_field: SingleField | None = None,
    ):
        self.config = config
        self.prompter = prompter
        self.clock = clock
        self._open_chain = open_chain or _default_chain
        self._open_store = open_store or _default_store
        self._store: StateStore | None = None
        self._mailer = mailer
        self.totp_prompt = totp_prompt or config.prompts.totp
        self.echo_code = echo_code
        self.single_field = single_field
        self.method = "-"
        #: Which source answered ("ldap-cache" when the LDAP offline cache did), for the log line.
        self.source = "-"

    def store(self) -> StateStore:
        if self._store is None:
            self._store = self._open_store(self)
        return self._store

    def mailer(self) -> Mailer:
        if self._mailer is None:
            from pam_linkus.mail import SmtpMailer

            self._mailer = SmtpMailer(self.config.smtp)
        return self._mailer

    def chain(self) -> SourceChain:
        return self._open_chain(self)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def _default_chain(ctx: Context) -> SourceChain:
    from nss_config.chain import build_chain

    return build_chain(ctx.config, state=ctx.store, clock=ctx.clock)


def _default_store(ctx: Context) -> StateStore:
    from pam_linkus.state import open_store

    return open_store(ctx.config.state)


def authenticate(req: LoginRequest, ctx: Context) -> Decision:
    """Decide one login. Success and skip return; every other outcome raises."""
    single = ctx.single_field
    # Exempt networks need no I/O and keep working while sources or the store are
    # down; single-field mode never skips an enrolled extension (pam_linkus.single_field).
    decision = policy.exempt_network(req.rhost, ctx.config) if single is None else None
    if decision is None:
        decision = _decide(req, ctx)
    if single is not None and decision.outcome == Outcome.SKIP:
        single.forward_whole()
    return decision


def _decide(req: LoginRequest, ctx: Context) -> Decision:
    settings = ctx.chain().lookup(req.user)
    ctx.source = settings.source if settings is not None else "-"
    if settings is None or not settings.enrolled:
        ctx.method = settings.method if settings is not None else "-"
        if ctx.config.enforce == "all":
            raise NotEnrolled("no second factor enrolled and policy is enforce: all")
        return Decision(Outcome.SKIP, "not enrolled", ctx.method)
    ctx.method = settings.method

    store = ctx.store()
    now = ctx.clock()
    status = store.lock_status(req.user, now)
    if status.locked(now):
        ctx.prompter.info(ctx.config.prompts.locked)
        raise Locked(f"locked after {status.failures} consecutive failures", locked_until=status.locked_until)
    if ctx.single_field is None:
        grace = policy.in_grace(req.user, req.rhost, ctx.config, store, now, settings.method)
        if grace is not None:
            return grace

    if settings.method == "totp":
        decision = _verify_totp(req, ctx, settings, store)
    elif settings.method == "email" and ctx.single_field is None:
        decision = _verify_email(req, ctx, settings, store)
    elif settings.method == "email":
        # the code must be mailed before it can be typed: email needs the two-step mode
        raise NotEnrolled("email codes are not available in single-field mode (forward_pass)")
    else:
        raise NotEnrolled(f"method {settings.method} is not available on this host")
    if ctx.single_field is None:
        # In single-field mode the password is checked after us: this login is not
        # known to succeed, so it must not start a grace period.
        policy.start_grace(req.user, req.rhost, ctx.config, store, ctx.clock())
    return decision


def _verify_totp(req: LoginRequest, ctx: Context, settings: ExtensionSettings, store: StateStore) -> Decision:
    from pam_linkus.totp import decode_secret, match_totp

    if ctx.single_field is not None:
        answer = ctx.single_field.split(settings.digits)
    else:
        answer = ctx.prompter.ask(ctx.totp_prompt, echo=ctx.echo_code)
    now = ctx.clock()
    assert settings.secret is not None  # settings_from_mapping guarantees it for enrolled totp
    try:
        step = match_totp(
            decode_secret(settings.secret),
            answer,
            now,
            window=ctx.config.totp.window,
            period=settings.period,
            digits=settings.digits,
            algorithm=settings.algorithm,
        )
    except CodeRejected as exc:
        recovered = _try_recovery_code(req, ctx, store, answer)
        if recovered is not None:
            return recovered
        _count_failure(req, ctx, store, exc.reason)
    if not store.accept_totp_step(req.user, step, now):
        _count_failure(req, ctx, store, "replayed code")
    return Decision(Outcome.SUCCESS, "code accepted", "totp")


def _verify_email(req: LoginRequest, ctx: Context, settings: ExtensionSettings, store: StateStore) -> Decision:
    """Mail a code (only reached after the password step: see README, "Email codes"), ask, verify."""
    from pam_linkus import emailcode

    key = emailcode.load_key(ctx.config.email.key_file)
    ctx.prompter.info(emailcode.deliver(req, ctx, settings.email, store, key))
    answer = ctx.prompter.ask(ctx.config.prompts.email, echo=ctx.echo_code)
    try:
        emailcode.verify(store, key, req.user, answer, ctx.clock())
    except CodeRejected as exc:
        recovered = _try_recovery_code(req, ctx, store, answer)
        if recovered is not None:
            return recovered
        _count_failure(req, ctx, store, exc.reason)
    return Decision(Outcome.SUCCESS, "code accepted", "email")


def _try_recovery_code(req: LoginRequest, ctx: Context, store: StateStore, answer: str) -> Decision | None:
    """Accept a single-use recovery code typed in place of the TOTP/email code.

    None when the answer cannot be a recovery code or the extension has none left
    (the caller counts its own failure); a wrong recovery code counts one failure
    here. A recovery code never has 6 characters, so a mistyped 6-digit code costs
    no scrypt hash.
    """
    from pam_linkus.recovery import digest, normalize_recovery_code

    code = normalize_recovery_code(answer)
    if code is None:
        return None
    salt = store.recovery_salt(req.user)
    if salt is None:
        return None
    if not store.use_recovery_code(req.user, digest(code, salt), ctx.clock()):
        _count_failure(req, ctx, store, "wrong recovery code")
    return Decision(Outcome.SUCCESS, "recovery code accepted", ctx.method)


def _count_failure(req: LoginRequest, ctx: Context, store: StateStore, reason: str) -> NoReturn:
    """Count a failed attempt; raise Locked if it was one too many, else CodeRejected."""
    lockout = ctx.config.lockout
    now = ctx.clock()
    status = store.record_failure(
        req.user,
        now,
        max_failures=lockout.max_failures,
        duration=lockout.duration,
        permanent_after=lockout.permanent_after,
    )
    if status.locked(now):
        ctx.prompter.info(ctx.config.prompts.locked)
        raise Locked(f"{reason}; locked after {status.failures} consecutive failures", status.locked_until)
    raise CodeRejected(f"{reason} ({status.failures} consecutive failures)")
