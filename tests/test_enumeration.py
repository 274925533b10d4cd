"""Issue 12.4: unknown and known users look the same in every supported stack.

For each stack (two-step, single-field with forward_pass; enforce enrolled and
all), a wrong password for an enrolled extension, for one without 2FA and for a
name that does not exist gives the same prompts, the same messages and a refusal:
nothing pam-linkus says tells them apart, and no code is asked before the password
was right.
"""

from __future__ import annotations

import secrets

import pam_client
import pytest
from conftest import PamStack

pytestmark = pytest.mark.pam


@pytest.mark.parametrize("enforce", ["enrolled", "all"])
@pytest.mark.parametrize("mode", ["two-step", "single-field"])
def test_wrong_password_looks_the_same_for_every_name(pam_stack: PamStack, make_user: object, enforce: str,
                                                      mode: str) -> None:
    enrolled, plain = make_user(), make_user()  # type: ignore[operator]
    ghost = f"lkx{secrets.token_hex(4)}"
    pam_stack.write_config(enforce=enforce)
    pam_stack.enroll_totp(enrolled)
    single = mode == "single-field"
    if single:
        pam_stack.set_single_field()
    seen = []
    for name in (enrolled, plain, ghost):
        result = pam_client.authenticate(pam_stack.service, name, "wrong-password", "123456",
                                         single_field=single)
        assert result.auth != "PAM_SUCCESS"
        seen.append((result.prompts, result.messages))
    assert seen[0] == seen[1] == seen[2], seen
    assert all("code" not in prompt.lower() or single for prompts, _ in seen for prompt in prompts)
    assert not [line for line in pam_stack.log.lines if "consecutive failures" in line]
