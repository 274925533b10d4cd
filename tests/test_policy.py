"""Exempt networks, grace periods and single-field mode, decided by the flow without PAM.

A real SqliteStore in a private directory, a fake settings chain and prompter, and
an injected clock (no global time patching). The same features go through real
PAM in test_pam_policy.py and test_ssh.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, code_at
from fakes import Clock, Prompter

from nss_config.base import ExtensionSettings
from pam_linkus import policy
from pam_linkus.config import Config
from pam_linkus.errors import CodeRejected, ConfigError, ConversationFailed, Locked, NotEnrolled, SourceUnavailable
from pam_linkus.flow import Context, LoginRequest, authenticate, split_digits
from pam_linkus.outcome import Outcome
from pam_linkus.state.sqlite_store import SqliteStore

T0 = 1_700_000_000.0
USER = "1001"


class Chain:
    waits_for_servers = False  # memory only (SourceChain.waits_for_servers)

    def __init__(self, settings: ExtensionSettings | None = None, *, down: bool = False):
        self.settings = settings
        self.down = down
        self.lookups = 0

    def lookup(self, user: str) -> ExtensionSettings | None:
        self.lookups += 1
        if self.down:
            raise SourceUnavailable("ldap://192.0.2.1: timed out")
        return self.settings


TOTP = ExtensionSettings(USER, "totp", secret=SECRET, source="test")
NONE = ExtensionSettings(USER, "none", source="test")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SqliteStore(str(tmp_path / "state.db"))
    yield s
    s.close()


def make_config(**keys: Any) -> Config:
    return Config.from_mapping({"sources": ["yaml"], **keys})


def login(config: Config, store: SqliteStore, clock: Clock, prompter: Prompter, *, rhost: str | None = None,
          chain: Chain | None = None, kept: str | None = None) -> Any:
    chain = chain or Chain(TOTP)
    ctx = Context(config, clock, chain, store)  # type: ignore[arg-type]
    return authenticate(LoginRequest(USER, "test", rhost, kept=kept), ctx, prompter)


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


# -- config ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "10.1.2.3/8", "not-a-net", "0.0.0.0/0", "::/0", "fe80::/129", ""])
def test_a_bad_exempt_network_is_a_config_error_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match="exempt_networks"):
        make_config(exempt_networks=["192.0.2.0/24", bad])


def test_exempt_networks_are_parsed_at_load() -> None:
    config = make_config(exempt_networks=["192.0.2.0/24", "2001:db8::/32", "198.51.100.9"])
    assert [str(n) for n in config.exempt_networks] == ["192.0.2.0/24", "2001:db8::/32", "198.51.100.9/32"]
    assert make_config().exempt_networks == []


def test_grace_period_must_be_a_non_negative_integer() -> None:
    with pytest.raises(ConfigError, match="grace_period"):
        make_config(grace_period=-1)
    with pytest.raises(ConfigError, match="grace_period"):
        make_config(grace_period="1h")


# -- exempt networks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("rhost", "exempt"),
    [
        ("192.0.2.7", True),
        ("::ffff:192.0.2.7", True),      # dual-stack socket spelling of the same client
        ("2001:db8::5", True),
        ("192.0.3.7", False),
        ("2001:db9::5", False),
        (None, False),
        ("", False),
        ("192.0.2.7.attacker.example", False),
        ("host.example", False),
        (" 192.0.2.7", False),
        ("192.0.2.7:22", False),
    ],
)
def test_exempt_network_matches_ip_addresses_only(rhost: str | None, exempt: bool) -> None:
    config = make_config(exempt_networks=["192.0.2.0/24", "2001:db8::/32"])
    decision = policy.exempt_network(rhost, config)
    if exempt:
        assert decision is not None and decision.outcome == Outcome.SKIP and "exempt network" in decision.reason
    else:
        assert decision is None


def test_exempt_network_skips_without_reading_settings_or_state(store: SqliteStore) -> None:
    config = make_config(exempt_networks=["192.0.2.0/24"])
    chain = Chain(down=True)  # even an LDAP outage does not matter: break-glass from the LAN
    prompter = Prompter()
    decision = login(config, store, Clock(T0), prompter, rhost="192.0.2.7", chain=chain)
    assert decision.outcome == Outcome.SKIP and chain.lookups == 0 and prompter.prompts == []


def test_outside_the_exempt_network_the_code_is_asked(store: SqliteStore) -> None:
    config = make_config(exempt_networks=["192.0.2.0/24"])
    clock = Clock(T0)
    for rhost in ("198.51.100.1", None, ""):
        prompter = Prompter(wrong(code_at(SECRET, clock.now)))
        with pytest.raises(CodeRejected):
            login(config, store, clock, prompter, rhost=rhost)
        assert prompter.prompts == ["Authentication code: "]


def test_exempt_network_is_a_skip_even_under_enforce_all(store: SqliteStore) -> None:
    config = make_config(exempt_networks=["192.0.2.0/24"], enforce="all")
    assert login(config, store, Clock(T0), Prompter(), rhost="192.0.2.9", chain=Chain(NONE)).outcome == Outcome.SKIP
    with pytest.raises(NotEnrolled):
        login(config, store, Clock(T0), Prompter("000000"), rhost="198.51.100.1", chain=Chain(NONE))


# -- grace periods -----------------------------------------------------------------


def test_grace_period_is_off_by_default(store: SqliteStore) -> None:
    config, clock = make_config(), Clock(T0)
    assert login(config, store, clock, Prompter(code_at(SECRET, clock.now)), rhost="192.0.2.7").outcome == "success"
    clock.now += 60
    prompter = Prompter()
    with pytest.raises(ConversationFailed):
        login(config, store, clock, prompter, rhost="192.0.2.7")
    assert prompter.prompts == ["Authentication code: "]


def test_grace_starts_after_a_right_code_for_that_extension_and_host_only(store: SqliteStore) -> None:
    config, clock = make_config(grace_period=300), Clock(T0)
    assert login(config, store, clock, Prompter(code_at(SECRET, clock.now)), rhost="192.0.2.7").outcome == "success"
    clock.now += 60
    prompter = Prompter()
    decision = login(config, store, clock, prompter, rhost="192.0.2.7")
    assert decision.outcome == Outcome.SKIP and decision.reason == "grace period" and prompter.prompts == []
    # the same client through a dual-stack socket is the same host
    assert login(config, store, clock, Prompter(), rhost="::ffff:192.0.2.7").outcome == Outcome.SKIP
    for other in ("192.0.2.8", None, "", "host.example"):
        prompter = Prompter()
        with pytest.raises(ConversationFailed):
            login(config, store, clock, prompter, rhost=other)
        assert prompter.prompts == ["Authentication code: "], other


def test_grace_ends_and_a_skip_does_not_extend_it(store: SqliteStore) -> None:
    config, clock = make_config(grace_period=300), Clock(T0)
    login(config, store, clock, Prompter(code_at(SECRET, clock.now)), rhost="192.0.2.7")
    clock.now += 299
    assert login(config, store, clock, Prompter(), rhost="192.0.2.7").outcome == Outcome.SKIP
    clock.now += 1
    with pytest.raises(ConversationFailed):
        login(config, store, clock, Prompter(), rhost="192.0.2.7")


def test_no_grace_without_rhost_or_after_a_wrong_code(store: SqliteStore) -> None:
    config, clock = make_config(grace_period=300), Clock(T0)
    assert login(config, store, clock, Prompter(code_at(SECRET, clock.now))).outcome == "success"
    with pytest.raises(CodeRejected):
        login(config, store, clock, Prompter(wrong(code_at(SECRET, clock.now + 60))), rhost="192.0.2.7")
    clock.now += 60
    for rhost in (None, "192.0.2.7"):
        with pytest.raises(ConversationFailed):
            login(config, store, clock, Prompter(), rhost=rhost)


def test_a_lock_wins_over_a_grace_period(store: SqliteStore) -> None:
    config, clock = make_config(grace_period=3600, lockout={"max_failures": 2}), Clock(T0)
    login(config, store, clock, Prompter(code_at(SECRET, clock.now)), rhost="192.0.2.7")
    for _ in range(2):
        clock.now += 31
        with pytest.raises((CodeRejected, Locked)):
            login(config, store, clock, Prompter("000000"), rhost="198.51.100.1")
    with pytest.raises(Locked):
        login(config, store, clock, Prompter(), rhost="192.0.2.7")


# -- single-field mode -------------------------------------------------------------


def test_split_tells_the_module_how_many_characters_are_the_code(store: SqliteStore) -> None:
    config = make_config()
    assert split_digits(LoginRequest(USER, "test"), Context(config, Clock(T0), Chain(TOTP), store)) == 6  # type: ignore[arg-type]
    assert split_digits(LoginRequest(USER, "test"), Context(config, Clock(T0), Chain(NONE), store)) == 0  # type: ignore[arg-type]
    assert split_digits(LoginRequest(USER, "test"), Context(config, Clock(T0), Chain(None), store)) == 0  # type: ignore[arg-type]
    # under enforce: all an unknown name gets the same answer as an enrolled one
    strict = make_config(enforce="all")
    assert split_digits(LoginRequest(USER, "test"), Context(strict, Clock(T0), Chain(None), store)) == 6  # type: ignore[arg-type]


def test_kept_code_is_checked_without_asking(store: SqliteStore) -> None:
    prompter = Prompter()
    decision = login(make_config(), store, Clock(T0), prompter, kept=code_at(SECRET, T0))
    assert decision.outcome == Outcome.SUCCESS and prompter.prompts == []


def test_kept_wrong_short_or_empty_code_is_rejected_and_counted(store: SqliteStore) -> None:
    clock = Clock(T0)
    for kept in (wrong(code_at(SECRET, T0)), "12345", ""):
        with pytest.raises(CodeRejected):
            login(make_config(), store, clock, Prompter(), kept=kept)
    assert store.lock_status(USER, clock.now).failures == 3


def test_kept_code_ignores_exempt_networks_and_grace_for_enrolled(store: SqliteStore) -> None:
    """The user cannot know whether to append a code, so an enrolled extension always gives one."""
    config, clock = make_config(exempt_networks=["192.0.2.0/24"], grace_period=300), Clock(T0)
    assert login(config, store, clock, Prompter(), rhost="192.0.2.7",
                 kept=code_at(SECRET, T0)).outcome == Outcome.SUCCESS
    assert store.grace_active(USER, "192.0.2.7", clock.now + 1, 300) is False
    clock.now += 30
    with pytest.raises(CodeRejected):
        login(config, store, clock, Prompter(), rhost="192.0.2.7", kept=wrong(code_at(SECRET, clock.now)))


def test_kept_code_for_an_email_extension_is_refused_without_sending(store: SqliteStore) -> None:
    """An email code must be mailed before it can be typed: two-step mode only."""
    email = ExtensionSettings(USER, "email", email="alice@example.com", source="test")
    prompter = Prompter()
    with pytest.raises(NotEnrolled, match="single-field"):
        login(make_config(), store, Clock(T0), prompter, chain=Chain(email), kept="123456")
    assert prompter.prompts == [] and prompter.infos == []
