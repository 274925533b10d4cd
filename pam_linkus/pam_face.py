"""The pam_python face: PAM entry points, the conversation, and the ONE place
where an outcome or an exception becomes a PAM return code (``to_pam_code``).

Fail closed: only a Decision of Outcome.SUCCESS returns PAM_SUCCESS; a skip is
PAM_IGNORE; every LinkusError maps by its outcome; any other exception is an
internal error and returns PAM_AUTH_ERR. Nothing here raises into pam_python
(which would turn it into PAM_SERVICE_ERR): we return the code ourselves.
"""

from __future__ import annotations

import time

from pam_linkus.errors import ConversationFailed, Denied, LinkusError
from pam_linkus.logline import LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, SyslogSink
from pam_linkus.outcome import PAM_CODE_NAMES, Outcome

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from pam_linkus.outcome import Decision

_SEVERITY = {
    Outcome.SUCCESS: LOG_INFO,
    Outcome.SKIP: LOG_INFO,
    Outcome.DENIED: LOG_NOTICE,
    Outcome.LOCKED: LOG_WARNING,
    Outcome.UNAVAILABLE: LOG_ERR,
    Outcome.CONVERSATION: LOG_NOTICE,
}


class PamPrompter:
    """Prompter over pam_python's conversation function."""

    def __init__(self, pamh: Any, *, silent: bool = False):
        self._pamh = pamh
        self._silent = silent

    def ask(self, prompt: str, *, echo: bool = False) -> str:
        pamh = self._pamh
        style = pamh.PAM_PROMPT_ECHO_ON if echo else pamh.PAM_PROMPT_ECHO_OFF
        try:
            response = pamh.conversation(pamh.Message(style, prompt))
        except pamh.exception as exc:
            raise ConversationFailed(f"conversation failed ({getattr(exc, 'pam_result', '?')})") from None
        answer = getattr(response, "resp", None)
        if answer is None:
            raise ConversationFailed("no answer to the code prompt")
        return str(answer)

    def info(self, text: str) -> None:
        if self._silent:
            return
        pamh = self._pamh
        try:
            pamh.conversation(pamh.Message(pamh.PAM_TEXT_INFO, text))
        except pamh.exception:
            pass  # an informational line that could not be shown changes nothing


class PamAuthTok:
    """PAM_AUTHTOK of the handle, for single-field mode (pam_linkus.single_field)."""

    __slots__ = ("_pamh",)

    def __init__(self, pamh: Any):
        self._pamh = pamh

    def get(self) -> str | None:
        value = _item(self._pamh, "authtok")
        return value if value else None

    def set(self, value: str) -> None:
        try:
            self._pamh.authtok = value
        except self._pamh.exception:
            raise ConversationFailed("could not hand the password on (PAM_AUTHTOK)") from None


class Attempt:
    """What the log line of this attempt will say; filled in as the login proceeds."""

    __slots__ = ("service", "user", "rhost", "tty", "method", "source", "started")

    def __init__(self, pamh: Any):
        self.service = _item(pamh, "service")
        self.user = _item(pamh, "user")
        self.rhost = _item(pamh, "rhost")
        self.tty = _item(pamh, "tty")
        self.method = "-"
        self.source = "-"
        self.started = time.monotonic()

    def fields(self, outcome: str, reason: str) -> dict[str, object]:
        return {
            "service": self.service or "-",
            "user": self.user or "-",
            "rhost": self.rhost or "-",
            "tty": self.tty or "-",
            "method": self.method,
            "source": self.source,
            "outcome": outcome,
            "reason": reason,
            "ms": int((time.monotonic() - self.started) * 1000),
        }


def _item(pamh: Any, name: str) -> str | None:
    try:
        value = getattr(pamh, name)
    except Exception:  # noqa: BLE001 - pam_python raises its own exception for unset items
        return None
    return value if isinstance(value, str) else None


def to_pam_code(pamh: Any, run: Callable[[], Decision], attempt: Attempt, sink: SyslogSink) -> int:
    """Run one login and map its end to a PAM code; the only such mapping."""
    raised = True
    try:
        decision = run()
        outcome, reason = decision.outcome, decision.reason
        raised = False
    except LinkusError as exc:
        outcome, reason = exc.outcome, exc.reason
    except Exception as exc:  # noqa: BLE001 - the one broad except: an internal error is a refusal
        outcome, reason = Outcome.DENIED, f"internal error: {type(exc).__name__}"
        sink.send(LOG_ERR, f"internal error in pam_linkus: {type(exc).__name__} (login refused)")
    if outcome not in PAM_CODE_NAMES:  # defence in depth: an unknown outcome is a refusal
        outcome, reason = Outcome.DENIED, f"unknown outcome {outcome!r}"
    sink.attempt(_SEVERITY[outcome], attempt.fields(outcome, reason))
    if raised:
        # An exception's traceback can sit in a reference cycle with frames that
        # hold pamh (ldap3 and redis-py both made such cycles). Collected later --
        # after pam_end has unloaded pam_python -- it crashes the host process
        # (seen: exit -11). Collect now, while pam_python is alive; success and
        # skip do not raise, so only refusals pay for it.
        import gc

        gc.collect()
    return int(getattr(pamh, PAM_CODE_NAMES[outcome]))


def authenticate(pamh: Any, flags: int, argv: Sequence[str], *, clock: Callable[[], float] = time.time) -> int:
    """pam_sm_authenticate's body: options, config, then the flow."""
    from pam_linkus.options import DEFAULT_LOG_SOCKET, parse_options

    attempt = Attempt(pamh)
    sink = SyslogSink(_log_socket_hint(argv) or DEFAULT_LOG_SOCKET)

    def run() -> Decision:
        from pam_linkus.config import load_config
        from pam_linkus.flow import Context, LoginRequest
        from pam_linkus.flow import authenticate as decide

        options = parse_options(argv)
        user = _user(pamh)
        attempt.user = user
        config = load_config(options.config, cache_dir=options.cache_dir)
        silent = bool(flags & getattr(pamh, "PAM_SILENT", 0x8000))
        prompter = PamPrompter(pamh, silent=silent)
        single_field = None
        if options.forward_pass:
            from pam_linkus.single_field import SingleField

            single_field = SingleField(
                prompter, PamAuthTok(pamh), options.prompt or config.prompts.password_and_code
            )
        ctx = Context(
            config,
            prompter,
            clock=clock,
            totp_prompt=options.prompt,
            echo_code=options.echo_code,
            single_field=single_field,
        )
        try:
            return decide(LoginRequest(user, attempt.service or "-", attempt.rhost, attempt.tty), ctx)
        finally:
            attempt.method = ctx.method
            attempt.source = ctx.source
            ctx.close()
            if options.debug:
                _debug_line(sink, attempt, config, options.cache_dir)

    return to_pam_code(pamh, run, attempt, sink)


def _debug_line(sink: SyslogSink, attempt: Attempt, config: Any, cache_dir: str) -> None:
    """With ``debug`` on the PAM line: one more line saying which settings decided.

    Names files, policy and the answering source -- the questions an admin has
    when a login ends unexpectedly -- and, like every line, no code or secret.
    """
    from pam_linkus.logline import LOG_DEBUG, format_fields

    sink.send(LOG_DEBUG, "debug " + format_fields({
        "user": attempt.user or "-",
        "config": config.path,
        "cache_dir": cache_dir,
        "enforce": config.enforce,
        "sources": ",".join(config.sources),
        "answered_by": attempt.source,
        "method": attempt.method,
        "state": config.state.backend,
        "totp_window": config.totp.window,
        "max_failures": config.lockout.max_failures,
    }))


def _log_socket_hint(argv: Sequence[str]) -> str | None:
    """The log_socket= option, read before full parsing so even a bad line is logged there."""
    for arg in argv[1:]:
        if arg.startswith("log_socket=/"):
            return arg.partition("=")[2]
    return None


def _user(pamh: Any) -> str:
    from nss_config.base import check_user_name

    try:
        user = pamh.get_user(None)
    except pamh.exception:
        raise ConversationFailed("could not get the user name") from None
    if not isinstance(user, str):
        raise ConversationFailed("no user name")
    try:
        check_user_name(user)
    except ValueError:
        raise Denied("invalid user name") from None
    return user


# -- the entry points pam_python looks up ----------------------------------------


def pam_sm_authenticate(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    return authenticate(pamh, flags, argv)


def pam_sm_setcred(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    # We establish no credentials, so we have no say: PAM_SUCCESS comes only from
    # to_pam_code. The password module before us (pam_unix) answers setcred.
    return int(pamh.PAM_IGNORE)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    return int(pamh.PAM_IGNORE)


def pam_sm_open_session(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    return int(pamh.PAM_IGNORE)


def pam_sm_close_session(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    return int(pamh.PAM_IGNORE)


def pam_sm_chauthtok(pamh: Any, flags: int, argv: Sequence[str]) -> int:
    return int(pamh.PAM_IGNORE)
