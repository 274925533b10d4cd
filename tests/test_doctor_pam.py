"""doctor reads /etc/pam.d as libpam does: every spelling of a bypass is found, good stacks pass."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pam_linkus.doctor import check_pam_text, check_time_sync
from pam_linkus.pamconf import parse_rules, render_arg

GOOD = "auth [success=ok ignore=ignore default=die] pam_linkus.so"

#: What `pam-auth-update --enable linkus` writes to common-auth on Debian 12 (tabs included).
COMMON_AUTH = """#
# /etc/pam.d/common-auth - authentication settings common to all services
#
# here are the per-package modules (the "Primary" block)
auth\t[success=1 default=ignore]\tpam_unix.so nullok
# here's the fallback if no module succeeds
auth\trequisite\t\t\tpam_deny.so
# prime the stack with a positive return value if there isn't one already;
auth\trequired\t\t\tpam_permit.so
# and here are more per-package modules (the "Additional" block)
auth\t[success=ok ignore=ignore default=die]\tpam_linkus.so
auth\toptional\t\t\tpam_cap.so
# end of pam-auth-update config
"""


def levels(text: str) -> list[tuple[int, str]]:
    return [(line, level) for line, level, _ in check_pam_text(text)]


def messages(text: str) -> str:
    return "\n".join(f"{line} {level} {message}" for line, level, message in check_pam_text(text))


def test_parser_follows_libpam() -> None:
    rules = parse_rules("AUTH\tRequisite  pam_unix.so  nullok # comment\n"
                        "-auth [success=ok\tdefault=die] /lib/security/pam_linkus.so \\\n"
                        "   [prompt=Code: ] debug\n"
                        "@INCLUDE common-auth\n"
                        "account required\n"
                        "# auth sufficient pam_linkus.so\n"
                        "session optional pam_x.so [a\\]b c]\n")
    assert [(r.first_line, r.last_line, r.kind, r.dash, r.control, r.module_name, r.args) for r in rules] == [
        (1, 1, "auth", False, "requisite", "pam_unix", ["nullok"]),
        (2, 3, "auth", True, "[success=ok\tdefault=die]", "pam_linkus", ["prompt=Code: ", "debug"]),
        (4, 4, "", False, "include", "", []),
        (7, 7, "session", False, "optional", "pam_x", ["a]b c"]),
    ]
    assert rules[1].actions() == {"success": "ok", "default": "die"}
    assert rules[2].include == "common-auth"
    assert render_arg("prompt=Code: ") == "[prompt=Code: ]" and render_arg("debug") == "debug"
    assert render_arg("a]b") == "[a\\]b]"


def test_common_auth_from_pam_auth_update_is_recognised_and_ok() -> None:
    assert levels(COMMON_AUTH) == [(11, "ok")]


@pytest.mark.parametrize("text", [
    "auth required pam_unix.so\nauth\tsufficient\tpam_linkus.so\n",
    "auth required pam_unix.so\nAUTH SUFFICIENT pam_linkus.so\n",
    "auth required pam_unix.so\nAuth Optional /usr/lib/x86_64-linux-gnu/security/pam_linkus.so\n",
    "auth required pam_unix.so\nauth [success=ok default=ignore] pam_linkus.so\n",
    "auth required pam_unix.so\nauth [success=ok AUTH_ERR=ignore default=die] pam_linkus.so\n",
    "auth required pam_unix.so\nauth [success=ok \\\n default=ignore] pam_linkus.so\n",
    "auth required pam_unix.so\n-auth [default=ignore] pam_linkus.so\n",
    "auth [success=done default=die] pam_linkus.so\nauth required pam_unix.so\n",
    "auth [success=2 default=die] pam_linkus.so\nauth required pam_unix.so\n",
    "auth required pam_linkus.so\nauth required pam_unix.so\n",
])
def test_controls_that_let_a_failure_through_or_skip_the_password_fail(text: str) -> None:
    assert any(level == "FAIL" for _, level in levels(text)), messages(text)


@pytest.mark.parametrize(("args", "needle"), [
    ("config=/etc/pam_linkus/pam_linkus.yaml", "config= belongs to the old pam_python module"),
    ("cache_dir=/var/cache/pam_linkus", "cache_dir= belongs to the old"),
    ("colour=red", "unknown option"),
    ("Debug", "unknown option"),
    ("debug=1", "debug takes no value"),
    ("profile", "profile needs a value"),
])
def test_unknown_and_old_options_fail(args: str, needle: str) -> None:
    text = f"auth required pam_unix.so\n{GOOD} {args}\n"
    out = messages(text)
    assert "FAIL" in out and needle in out, out


def test_known_options_pass() -> None:
    text = (f"auth required pam_unix.so\n{GOOD} socket=/run/linkusd/pam.sock timeout=5 [prompt=Your code: ] "
            "profile=sshd log_socket=/dev/log echo_code debug\n")
    assert levels(text) == [(2, "ok")], messages(text)


@pytest.mark.parametrize("line", [
    "auth [success=ok ignore=ignore default=die] pam_python.so pam_linkus.py",
    "auth\trequired\tpam_python.so /usr/lib/pam-linkus/pam_linkus.py config=/x",
    "-AUTH requisite /lib/security/pam_python.so \\\n  pam_linkus.py",
    "account required pam_python.so pam_linkus.py",
])
def test_pam_python_lines_fail_with_the_migration_hint(line: str) -> None:
    out = messages(f"auth required pam_unix.so\n{line}\n")
    assert "FAIL" in out and "pam_python" in out and "linkus-2fa migrate-pam" in out, out


def test_single_field_stack_of_the_protocol_passes_and_a_broken_one_fails() -> None:
    good = f"{GOOD} forward_pass\nauth requisite pam_unix.so use_first_pass\n{GOOD}\n"
    assert levels(good) == [(1, "ok"), (3, "ok")], messages(good)
    lonely = f"{GOOD} forward_pass\nauth requisite pam_unix.so use_first_pass\n"
    assert "no later pam_linkus.so line" in messages(lonely)


def test_dash_auth_fails_open_and_is_flagged() -> None:
    out = messages(f"auth required pam_unix.so\n-{GOOD}\n")
    assert "FAIL" in out and "'-auth'" in out


def test_code_before_password_fails() -> None:
    out = messages(f"{GOOD}\nauth required pam_unix.so\n")
    assert "FAIL" in out and "no password module" in out


def test_unrelated_files_have_no_findings() -> None:
    assert check_pam_text("auth sufficient pam_rootok.so\n@include common-auth\n") == []


def fake_tool(directory: Path, name: str, output: str, status: int = 0) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {status}\n")
    os.chmod(path, stat.S_IRWXU)


@pytest.mark.parametrize(("tool", "output", "level"), [
    ("timedatectl", "yes", "ok"),
    ("timedatectl", "no", "FAIL"),
    ("chronyc", "Reference ID    : 7F000001 ()\nLeap status     : Normal", "ok"),
    ("chronyc", "Reference ID    : 00000000 ()\nLeap status     : Not synchronised", "FAIL"),
    ("ntpq", "     remote  refid st\n=====\n*10.0.0.1 .GPS. 1", "ok"),
    ("ntpq", "     remote  refid st\n=====\n 10.0.0.1 .INIT. 16", "FAIL"),
])
def test_time_sync_is_asked_of_the_tool_present(tmp_path: Path, tool: str, output: str, level: str) -> None:
    fake_tool(tmp_path, tool, output)
    [finding] = check_time_sync(search_path=str(tmp_path))
    assert finding.level == level and tool in finding.detail


def test_time_sync_falls_through_to_the_next_tool_and_says_when_it_cannot_tell(tmp_path: Path) -> None:
    fake_tool(tmp_path, "timedatectl", "System has not been booted with systemd", status=1)
    [finding] = check_time_sync(search_path=str(tmp_path))
    assert finding.level == "WARN" and "cannot tell" in finding.detail
    fake_tool(tmp_path, "chronyc", "Leap status     : Normal")
    [finding] = check_time_sync(search_path=str(tmp_path))
    assert finding.level == "ok" and "chronyc" in finding.detail
