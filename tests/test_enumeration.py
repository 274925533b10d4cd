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
from conftest import PASSWORD, PamStack

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


MAX_FAILURES = 3


@pytest.mark.parametrize("before", ["code", "password"])
def test_under_enforce_all_every_name_counts_and_locks_alike(pam_stack: PamStack, make_user: object,
                                                             before: str) -> None:
    """Issue 17, tester 2: pam_linkus.so before (or after) the password module, ``enforce: all``,
    wrong codes: an enrolled name, one without 2FA and one that does not exist (typed in two
    cases: one record) go through the same (PAM code, prompts, messages) for max_failures+2
    logins -- counted, then locked with the lock message, then refused without a prompt."""
    enrolled, plain = make_user(), make_user()  # type: ignore[operator]
    ghost = f"lkx{secrets.token_hex(4)}"
    pam_stack.write_config(enforce="all", lockout={"max_failures": MAX_FAILURES, "duration": 900})
    pam_stack.enroll_totp(enrolled)
    code_line = f"auth [success=ok ignore=ignore default=die] {pam_stack.module_line}\n"
    password_line = "auth requisite pam_unix.so nodelay\n"
    lines = (code_line + password_line) if before == "code" else (password_line + code_line)
    pam_stack.set_pam(auth_lines=lines + "auth required pam_permit.so\n")
    # Before the password module an attacker needs no password; after it, the real one is typed.
    password = "wrong-password" if before == "code" else PASSWORD
    seen: dict[str, list[tuple[str, list[str], list[str]]]] = {}
    names = (enrolled, plain, ghost) if before == "code" else (enrolled, plain)
    for name in names:
        typed = [name.upper() if n % 2 and name == ghost else name for n in range(MAX_FAILURES + 2)]
        results = [pam_stack.login(variant, "000000", password=password) for variant in typed]
        seen[name] = [(r.auth, r.prompts, r.messages) for r in results]
    first = seen[enrolled]
    assert [auth for auth, _, _ in first] == ["PAM_AUTH_ERR"] * (MAX_FAILURES - 1) + ["PAM_MAXTRIES"] * 3, first
    assert first[MAX_FAILURES - 1][2] == ["Too many failed attempts; contact your administrator."], first
    assert "Authentication code: " not in first[-1][1], first  # locked: no code prompt at all
    for name in names:
        assert seen[name] == first, (name, seen[name], first)
