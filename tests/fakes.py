"""The test fakes the flow is driven with (DESIGN.md: "a Prompter (ask, info) is injected ... a Clock
gives the time"): one copy each, for every test module that needs them (issue 19 item 9).
"""

from __future__ import annotations

from collections.abc import Callable

from pam_linkus.errors import ConversationFailed


class Clock:
    """The time a test says it is: call it for ``now``; move it with ``clock.now += seconds``."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


#: What a Prompter answers a prompt with: the text; a callable, asked for the text at that moment
#: (e.g. the code of the mail the flow has just sent); or None, no answer (the person hung up).
Answer = str | Callable[[], object] | None


class Prompter:
    """A person at the prompt: answers the flow's prompts from a list, in order, and records what the
    flow asked and showed. A prompt after the last answer, or a None answer, fails the conversation
    as a hang-up does (ConversationFailed), so a test sees an unexpected prompt as a failed login."""

    def __init__(self, *answers: Answer):
        self.answers = list(answers)
        self.prompts: list[str] = []
        self.infos: list[str] = []

    def ask(self, prompt: str, *, echo: bool = False) -> str:
        self.prompts.append(prompt)
        if not self.answers:
            raise ConversationFailed("no answer")
        answer = self.answers.pop(0)
        if answer is None:
            raise ConversationFailed("no answer")
        return str(answer()) if callable(answer) else answer

    def info(self, text: str) -> None:
        self.infos.append(text)
