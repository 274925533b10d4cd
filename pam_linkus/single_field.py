"""Single-field mode (PAM option ``forward_pass``) for front ends with one password box.

The user types the password with the code appended (``password123456``).
pam_linkus comes FIRST in the stack, asks once ("Password & verification code: ")
or takes an existing PAM_AUTHTOK, and hands the password part on as PAM_AUTHTOK to
the password module that follows with ``use_first_pass``, as
google-authenticator's ``forward_pass`` does.

Which part is the password depends only on the extension's enrolment, never on
anything the user cannot see:

- enrolled (TOTP): the last ``digits`` characters are the code, the rest is the
  password. Exempt networks and grace periods do not apply in this mode, because
  the user cannot know whether to append a code; the code is always checked.
- no 2FA (skip under ``enforce: enrolled``): the whole answer is the password.

The code is checked before the password here (the password module runs after
us), so a wrong code counts towards the lockout even when the password was also
wrong; README "SSH, console and web logins" says so.
"""

from __future__ import annotations

TYPE_CHECKING = False  # ``typing`` costs milliseconds per login; mypy reads this name as True
if TYPE_CHECKING:
    from typing import Protocol

    from pam_linkus.flow import Prompter

    class AuthTok(Protocol):
        """The PAM_AUTHTOK item (pam_face wraps pamh.authtok)."""

        def get(self) -> str | None:
            ...

        def set(self, value: str) -> None:
            ...


class SingleField:
    """One login's combined answer; asked at most once."""

    __slots__ = ("_prompter", "_authtok", "_prompt", "_answer")

    def __init__(self, prompter: Prompter, authtok: AuthTok, prompt: str):
        self._prompter = prompter
        self._authtok = authtok
        self._prompt = prompt
        self._answer: str | None = None

    def answer(self) -> str:
        """The combined answer: an earlier module's PAM_AUTHTOK, or one prompt."""
        if self._answer is None:
            existing = self._authtok.get()
            self._answer = existing if existing is not None else self._prompter.ask(self._prompt)
        return self._answer

    def forward_whole(self) -> None:
        """No code expected: the whole answer is the password."""
        self._authtok.set(self.answer())

    def split(self, digits: int) -> str:
        """Forward the password part and return the code part (the last ``digits``
        characters; a shorter answer is handed to the verifier whole and rejected there)."""
        answer = self.answer()
        self._authtok.set(answer[:-digits] if len(answer) > digits else "")
        return answer[-digits:]
