"""Email codes without SMTP: the flow with an injected clock and mailer, the
SQLite store's email operations, address checks, templates and the key file."""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest
from fakes import Clock, Prompter
from state_steps import fail

from nss_config.base import ExtensionSettings
from nss_config.chain import SourceChain
from pam_linkus import emailcode, mailtext
from pam_linkus.codes import normalize_code
from pam_linkus.config import Config
from pam_linkus.errors import CodeRejected, ConfigError, Denied, Locked, MailUnavailable
from pam_linkus.flow import Context, LoginRequest, authenticate
from pam_linkus.outcome import Outcome
from pam_linkus.recovery import normalize_recovery_code
from pam_linkus.state.base import EmailCheck, EmailLimits, email_retry_after
from pam_linkus.state.sqlite_store import SqliteStore

T0 = 1_800_000_000.0
ADDRESS = "alice@example.com"


class FakeMailer:
    """Records messages; ``fail`` makes the next sends raise like an SMTP outage."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = False

    def send(self, to: str, subject: str, body: str, *, now: float) -> None:
        if self.fail:
            raise MailUnavailable("SMTP server 127.0.0.1:1: Connection refused")
        self.sent.append((to, subject, body))

    def last_code(self) -> str:
        match = re.search(r"^    (\d{6})$", self.sent[-1][2], re.M)
        assert match is not None, self.sent[-1][2]
        return match.group(1)


class Source:
    name = "test"

    def __init__(self, entries: dict[str, ExtensionSettings]):
        self.entries = entries

    def lookup(self, user: str) -> ExtensionSettings | None:
        return self.entries.get(user)


class Harness:
    """One host: a config, a SQLite store, a fake mailer and a clock, shared by its logins."""

    def __init__(self, root: Path, **email: Any):
        os.chmod(root, 0o700)
        self.root = root
        self.config = Config.from_mapping({
            "state": {"path": str(root / "state.db")},
            "email": {"key_file": str(root / "email.key"), **email},
            "lockout": {"max_failures": 5, "duration": 900},
        })
        self.clock = Clock(T0)
        self.mailer = FakeMailer()
        self.store = SqliteStore(str(root / "state.db"))
        self.entries: dict[str, ExtensionSettings] = {}

    def add(self, user: str, address: str = ADDRESS) -> None:
        self.entries[user] = ExtensionSettings(user, "email", email=address, source="test")

    def login(self, user: str, answer: Any, rhost: str | None = "192.0.2.9") -> tuple[str, str, Prompter]:
        prompter = Prompter(answer)
        ctx = Context(self.config, self.clock, SourceChain([Source(self.entries)]), self.store,
                      mailer_factory=lambda: self.mailer)
        try:
            decision = authenticate(LoginRequest(user, "sshd", rhost), ctx, prompter)
            return decision.outcome, decision.reason, prompter
        except (Denied, Locked, MailUnavailable, ConfigError) as exc:
            return exc.outcome, exc.reason, prompter

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def host(private_dir: Path) -> Any:
    harness = Harness(private_dir)
    harness.add("1002")
    yield harness
    harness.close()


def make_host(private_dir: Path, name: str, **email: Any) -> Harness:
    root = private_dir / name
    root.mkdir()
    harness = Harness(root, **email)
    harness.add("1002")
    return harness


# -- the flow ------------------------------------------------------------------


def test_code_arrives_and_logs_in_once(host: Harness) -> None:
    outcome, reason, prompter = host.login("1002", lambda: host.mailer.last_code())
    assert (outcome, reason) == (Outcome.SUCCESS, "code accepted")
    assert prompter.prompts == ["Email code: "]
    assert prompter.infos == ["A verification code was sent to a***@example.com."]
    to, subject, body = host.mailer.sent[0]
    code = host.mailer.last_code()
    assert to == ADDRESS and code not in subject and "1002" in subject
    assert "192.0.2.9" in body and "sshd" in body and "5 minutes" in body


def test_reused_code_is_refused(private_dir: Path) -> None:
    host = make_host(private_dir, "h", send_interval=0)
    assert host.login("1002", lambda: host.mailer.last_code())[0] == Outcome.SUCCESS
    used = host.mailer.last_code()
    host.clock.now += 1
    outcome, reason, _ = host.login("1002", used)
    assert len(host.mailer.sent) == 2
    if used != host.mailer.last_code():  # one in a million: the new code equals the old one
        assert (outcome, reason) == (Outcome.DENIED, "wrong code (1 consecutive failures)")


def test_expired_code_is_refused(host: Harness) -> None:
    def late() -> str:
        host.clock.now += 300  # the code lives exactly 300 s: at +300 it is gone
        return host.mailer.last_code()

    outcome, reason, _ = host.login("1002", late)
    assert (outcome, reason) == (Outcome.DENIED, "expired code (1 consecutive failures)")


def test_code_just_before_expiry_is_accepted(host: Harness) -> None:
    def in_time() -> str:
        host.clock.now += 299
        return host.mailer.last_code()

    assert host.login("1002", in_time)[0] == Outcome.SUCCESS


def test_expiry_is_configurable(private_dir: Path) -> None:
    host = make_host(private_dir, "h", code_lifetime=60)

    def late() -> str:
        host.clock.now += 61
        return host.mailer.last_code()

    assert host.login("1002", late)[1].startswith("expired code")
    assert "1 minutes" in host.mailer.sent[0][2]


def test_code_of_another_extension_is_refused(host: Harness) -> None:
    host.add("1003", "bob@example.org")
    assert host.login("1002", "000000")[0] == Outcome.DENIED  # 1002 now has a pending code
    code_for_1002 = host.mailer.last_code()
    outcome, reason, prompter = host.login("1003", code_for_1002)
    assert prompter.infos == ["A verification code was sent to b***@example.org."]
    if code_for_1002 != host.mailer.last_code():
        assert (outcome, reason) == (Outcome.DENIED, "wrong code (1 consecutive failures)")


def test_too_many_attempts_kill_the_code(private_dir: Path) -> None:
    host = make_host(private_dir, "h", max_attempts=3)
    results = [host.login("1002", "abc") for _ in range(3)]
    assert [r[1] for r in results] == [
        "malformed code (1 consecutive failures)",
        "malformed code (2 consecutive failures)",
        "malformed code, no attempts left on this code (3 consecutive failures)",
    ]
    assert len(host.mailer.sent) == 1  # the 2nd and 3rd login were throttled and used the pending code
    assert results[1][2].infos == [
        "The code sent to a***@example.com a moment ago is still valid; no new code was sent."
    ]
    outcome, reason, prompter = host.login("1002", "123456")
    assert (outcome, reason) == (Outcome.DENIED, "email code throttled, next send in 60 s")
    assert prompter.prompts == [] and prompter.infos == ["No new code can be sent yet; try again in 60 s."]


def test_failures_count_toward_the_lockout_and_a_new_code_does_not_reset_them(private_dir: Path) -> None:
    host = make_host(private_dir, "h", send_interval=0, max_per_hour=100)
    for i in range(1, 5):
        assert host.login("1002", "x")[1].endswith(
            f"({i} consecutive failures)"
        )
        host.clock.now += 1
    assert len(host.mailer.sent) == 4  # each login sent a new code, and the count went on
    outcome, reason, _ = host.login("1002", "bad")
    assert outcome == Outcome.LOCKED and "locked after 5" in reason
    assert host.login("1002", lambda: host.mailer.last_code())[0] == Outcome.LOCKED
    assert len(host.mailer.sent) == 5  # a locked extension gets no mail


def test_success_clears_the_failure_count(host: Harness) -> None:
    fail(host.store, "1002", T0, max_failures=5, duration=900, permanent_after=100)
    assert host.login("1002", lambda: host.mailer.last_code())[0] == Outcome.SUCCESS
    assert host.store.lock_status("1002", T0).failures == 0


def test_throttled_login_still_accepts_the_last_unexpired_code(host: Harness) -> None:
    assert host.login("1002", "000000x")[0] == Outcome.DENIED
    first = host.mailer.last_code()
    host.clock.now += 30
    outcome, _, prompter = host.login("1002", first)
    assert outcome == Outcome.SUCCESS and len(host.mailer.sent) == 1
    assert "still valid" in prompter.infos[0]


def test_send_interval_and_hourly_limit(private_dir: Path) -> None:
    host = make_host(private_dir, "h", send_interval=60, max_per_hour=3)
    sends = []
    for _ in range(12):
        host.login("1002", lambda: host.mailer.last_code())
        sends.append(len(host.mailer.sent))
        host.clock.now += 30
    # a send at 0, 60, 120 s, then nothing until an hour after the first
    assert sends == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    host.clock.now = T0 + 3600
    host.login("1002", "1")
    assert len(host.mailer.sent) == 4


def test_global_throttle(private_dir: Path) -> None:
    host = make_host(private_dir, "h", global_max_per_minute=2)
    for user in ("2001", "2002", "2003"):
        host.add(user)
    results = [host.login(user, "x")[1] for user in ("2001", "2002", "2003")]
    assert results[:2] == ["malformed code (1 consecutive failures)"] * 2
    assert results[2] == "email code throttled, next send in 60 s"
    host.clock.now += 60
    assert host.login("2003", lambda: host.mailer.last_code())[0] == Outcome.SUCCESS


def test_smtp_down_is_unavailable_and_leaves_no_code(host: Harness) -> None:
    host.mailer.fail = True
    outcome, reason, prompter = host.login("1002", "123456")
    assert (outcome, reason) == (Outcome.UNAVAILABLE, "SMTP server 127.0.0.1:1: Connection refused")
    assert prompter.prompts == []
    assert host.store.verify_email_code("1002", "x", host.clock()) == EmailCheck.MISSING
    # the failed send does not count toward the throttle: the next login sends at once
    host.mailer.fail = False
    assert host.login("1002", lambda: host.mailer.last_code())[0] == Outcome.SUCCESS


def test_header_injection_address_sends_nothing(host: Harness) -> None:
    for bad in ("a@example.com\r\nBcc: x@evil.test", "a@example.com,x@evil.test", "A <a@example.com>",
                "a@example.com x@evil.test", "a@@example.com", "@example.com", "a@", "a@exa mple.com",
                "ä@example.com", "a..b@example.com", "a@-example.com", "a@example..com"):
        host.add("1009", bad)
        outcome, reason, prompter = host.login("1009", "123456")
        assert outcome == Outcome.UNAVAILABLE and reason.startswith("extension '1009': email address"), bad
        assert bad not in reason and prompter.prompts == []
    assert host.mailer.sent == []


def test_lookalike_digits_and_spaces(host: Harness) -> None:
    def fancy() -> str:
        return host.mailer.last_code().translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))

    assert host.login("1002", fancy)[1] == "malformed code (1 consecutive failures)"
    code = host.mailer.last_code()
    assert host.login("1002", f"{code[:3]} {code[3:]}")[0] == Outcome.SUCCESS


def test_store_empty_hash_never_matches(host: Harness) -> None:
    host.store.issue_email_code("u", "", T0, EmailLimits())  # even a (bogus) empty stored hash
    assert host.store.verify_email_code("u", "", T0) == EmailCheck.WRONG


def test_retry_after_rule() -> None:
    limits = EmailLimits(send_interval=60, max_per_hour=2, global_max_per_minute=3)
    assert email_retry_after([], [], T0, limits) == T0
    assert email_retry_after([T0 - 10], [T0 - 10], T0, limits) == T0 + 50
    assert email_retry_after([T0 - 1000, T0 - 500], [], T0, limits) == T0 - 1000 + 3600
    assert email_retry_after([], [T0 - 50, T0 - 20, T0 - 10], T0, limits) == T0 + 10


# -- addresses, templates, key ---------------------------------------------------


def test_mask_address() -> None:
    assert mailtext.mask_address("alice@example.com") == "a***@example.com"
    assert mailtext.mask_address("x@y.example") == "x***@y.example"


def test_good_addresses_pass() -> None:
    for good in ("alice@example.com", "a.b+tag@sub.example.org", "o'brien@example.ie", "x@localhost"):
        assert mailtext.check_address(good) == good


def test_new_codes_are_six_digits_and_vary() -> None:
    codes = {emailcode.new_code() for _ in range(50)}
    assert all(len(c) == 6 and c.isascii() and c.isdigit() for c in codes) and len(codes) > 40


def test_hash_binds_the_extension_and_the_address() -> None:
    key = secrets.token_bytes(32)
    a, b = "a@example.com", "b@example.com"
    assert emailcode.code_hash(key, "1002", "123456", a) != emailcode.code_hash(key, "1003", "123456", a)
    assert emailcode.code_hash(key, "1002", "123456", a) != emailcode.code_hash(b"k" * 32, "1002", "123456", a)
    assert emailcode.code_hash(key, "1002", "123456", a) != emailcode.code_hash(key, "1002", "123456", b)


def test_a_code_is_wrong_for_another_address(private_dir: Path) -> None:
    """Issue 17/1: a code mailed to one address never proves another one."""
    host = make_host(private_dir, "h")
    key = emailcode.load_key(host.config.email.key_file)
    emailcode.deliver(host.store, key, host.mailer, host.config.email, user="1002", address="typo@example.com",
                      service="linkus-web", rhost=None, now=T0)
    with pytest.raises(CodeRejected):
        emailcode.verify(host.store, key, "1002", host.mailer.last_code(), T0 + 1, address="real@example.com")
    emailcode.verify(host.store, key, "1002", host.mailer.last_code(), T0 + 2, address="typo@example.com")


def test_fill_template() -> None:
    assert mailtext.fill("{{x}} {code} }", {"code": "1"}) == "{x} 1 }"
    with pytest.raises(KeyError):
        mailtext.fill("{code.__class__}", {"code": "1"})


def test_subject_must_not_hold_the_code() -> None:
    with pytest.raises(ConfigError, match=r"email\.subject: must not contain \{code\}"):
        Config.from_mapping({"email": {"subject": "Your code {code}"}})
    with pytest.raises(ConfigError, match=r"unknown placeholder \{nope\}"):
        Config.from_mapping({"email": {"subject": "Hi {nope}"}})
    assert Config.from_mapping({"email": {"subject": "Login at {host} for {user}"}}).email.subject


def test_smtp_config_refuses_plaintext_off_loopback() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.security"):
        Config.from_mapping({"smtp": {"host": "mail.example.com", "security": "none"}})
    with pytest.raises(ConfigError, match=r"smtp\.username"):
        Config.from_mapping({"smtp": {"security": "none", "username": "u", "password_file": "/x"}})
    with pytest.raises(ConfigError, match=r"smtp\.from"):
        Config.from_mapping({"smtp": {"from": "PBX <pbx@example.com>"}})
    assert Config.from_mapping({"smtp": {"security": "none"}}).smtp.port == 25


def test_template_file(private_dir: Path) -> None:
    os.chmod(private_dir, 0o700)
    template = private_dir / "mail.txt"
    template.write_text("Code {code} for {user} from {rhost} at {time} on {host}, {minutes} min, to {address}\n")
    os.chmod(template, 0o600)  # config files: root-only, 0600 or 0400
    host = Harness(private_dir, template_file=str(template))
    host.add("1002")
    assert host.login("1002", "1", rhost=None)[0] == Outcome.DENIED
    body = host.mailer.sent[0][2]
    assert body.startswith("Code ") and "from an unknown address" in body and "to alice@example.com" in body
    template.write_text("no code here\n")
    host.add("1004")
    outcome, reason, _ = host.login("1004", "1")
    assert outcome == Outcome.UNAVAILABLE and "must contain {code}" in reason
    host.close()


def test_key_file_is_created_once_root_only(private_dir: Path) -> None:
    os.chmod(private_dir, 0o700)
    path = str(private_dir / "email.key")
    key = emailcode.load_key(path)
    assert len(key) == 32 and emailcode.load_key(path) == key
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert [p.name for p in private_dir.iterdir()] == ["email.key"]  # no temporary file left


def test_key_file_readable_by_others_is_refused(private_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("open_secure wants root-owned files")
    os.chmod(private_dir, 0o700)
    path = private_dir / "email.key"
    path.write_text(secrets.token_hex(32))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        emailcode.load_key(str(path))


@pytest.mark.parametrize("answer", [
    b"\xff\xfe", "\udcff\udcfe", b"12345\xff", "\uff11\uff12\uff13\uff14\uff15\uff16", "12345\x00", b"abcdef",
], ids=repr)
def test_invalid_utf8_and_non_digits_are_a_wrong_code_that_uses_an_attempt(private_dir: Path, answer: Any) -> None:
    """Issue 12 item 3: never an internal error, always counted."""
    assert normalize_code(answer, 6) is None
    store = SqliteStore(str(private_dir / "state.db"))
    try:
        key = b"k" * 32
        to = "a@example.com"
        store.issue_email_code("1001", emailcode.code_hash(key, "1001", "123456", to), 100.0,
                               EmailLimits(max_attempts=2))
        with pytest.raises(CodeRejected) as caught:
            emailcode.verify(store, key, "1001", answer, 101.0, address=to)
        assert "malformed" in caught.value.reason
        with pytest.raises(CodeRejected):  # the malformed answer used the first of two attempts
            emailcode.verify(store, key, "1001", "000000", 102.0, address=to)
        with pytest.raises(CodeRejected):
            emailcode.verify(store, key, "1001", "123456", 103.0, address=to)  # gone: attempts exhausted
    finally:
        store.close()


@pytest.mark.parametrize("raw", [b"\xff\xfeabcdefgh", "abcd\udcffefgh", "\u212aabcdefgh"], ids=repr)
def test_recovery_codes_refuse_non_ascii_before_lowercasing(raw: Any) -> None:
    assert normalize_recovery_code(raw) is None
    assert normalize_recovery_code("kabc-defgh") == "kabcdefgh"


def test_deliver_takes_explicit_inputs_and_says_what_it_did(private_dir: Path) -> None:
    """Issue 19.2: no flow Context, no prompter -- the caller gets a Delivery and tells the person."""
    host = make_host(private_dir, "h", send_interval=60)
    key = emailcode.load_key(host.config.email.key_file)

    def deliver(now: float) -> emailcode.Delivery:
        return emailcode.deliver(host.store, key, host.mailer, host.config.email, user="1002", address=ADDRESS,
                                 service="sshd", rhost="192.0.2.7", now=now)

    sent = deliver(T0)
    assert (sent.state, sent.masked) == (emailcode.Delivery.SENT, "a***@example.com")
    assert sent.notice(host.config.prompts) == "A verification code was sent to a***@example.com."
    assert len(host.mailer.sent) == 1 and "192.0.2.7 (sshd)" in host.mailer.sent[0][2]
    assert deliver(T0 + 1).state == emailcode.Delivery.PENDING
    emailcode.verify(host.store, key, "1002", host.mailer.last_code(), T0 + 2, address=ADDRESS)  # used up
    throttled = deliver(T0 + 3)
    assert (throttled.state, throttled.retry_after) == (emailcode.Delivery.THROTTLED, 57)
    assert str(throttled.refusal()) == "email code throttled, next send in 57 s"
    assert len(host.mailer.sent) == 1
