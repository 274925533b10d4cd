"""Options on the /etc/pam.d line: typed, and an unknown option is an error."""

from __future__ import annotations

import pytest

from pam_linkus.errors import ConfigError
from pam_linkus.options import parse_options

MODULE = "/lib/security/pam_linkus.py"


def test_defaults() -> None:
    opts = parse_options([MODULE])
    assert opts.config == "/etc/pam_linkus/pam_linkus.yaml"
    assert opts.prompt is None and not opts.debug and not opts.echo_code and not opts.forward_pass


def test_values_and_flags() -> None:
    opts = parse_options([MODULE, "config=/etc/x.yaml", "prompt=Code from your app:", "debug", "echo_code"])
    assert opts.config == "/etc/x.yaml" and opts.prompt == "Code from your app:"
    assert opts.debug and opts.echo_code


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["confg=/etc/x"], "unknown option 'confg'"),
        (["secret"], "unknown option 'secret'"),
        (["debug=yes"], "flag and takes no value"),
        (["config"], "needs a value"),
        (["config="], "needs a value"),
        (["config=relative.yaml"], "absolute path"),
        (["config=/a", "config=/b"], "given twice"),
        (["prompt=a\nb"], "control characters"),
        (["prompt=" + "x" * 201], "longer than 200"),
    ],
)
def test_bad_options_are_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options([MODULE, *argv])


def test_argv0_is_never_an_option() -> None:
    assert parse_options(["debug"]).debug is False
