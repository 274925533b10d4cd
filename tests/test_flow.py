"""The login decision without PAM: injected clock, scripted prompter, real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import Clock, Prompter

from nss_config.base import ExtensionSettings
from nss_config.chain import SourceChain
from pam_linkus.config import Config
from pam_linkus.errors import CodeRejected, ConversationFailed, Locked, NotEnrolled, SourceUnavailable
from pam_linkus.flow import Context, LoginRequest, authenticate
from pam_linkus.outcome import Outcome
from pam_linkus.state.sqlite_store import SqliteStore
from pam_linkus.totp import decode_secret, totp

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
T0 = 1_800_000_000.0


class StaticSource:
    name = "static"
    waits_for_servers = False  # memory only, like YamlSource

    def __init__(self, entries: dict[str, ExtensionSettings], *, down: bool = False):
        self.entries = entries
        self.down = down

    def lookup(self, user: str) -> ExtensionSettings | None:
        if self.down:
            raise SourceUnavailable("static source is down")
        return self.entries.get(user)


@pytest.fixture
def store(private_dir: Path) -> SqliteStore:
    return SqliteStore(str(private_dir / "state.db"))


def code(when: float, secret: str = SECRET) -> str:
    return totp(decode_secret(secret), when)


def run(
    store: SqliteStore,
    clock: Clock,
    *answers: str | None,
    entries: dict[str, ExtensionSettings] | None = None,
    config: dict[str, object] | None = None,
    user: str = "1001",
) -> tuple[str, Prompter]:
    if entries is None:
        entries = {"1001": ExtensionSettings("1001", "totp", secret=SECRET)}
    prompter = Prompter(*answers)
    ctx = Context(Config.from_mapping(config or {}), clock, SourceChain([StaticSource(entries)]), store)
    return authenticate(LoginRequest(user), ctx, prompter).outcome, prompter


def test_right_code_succeeds_once(store: SqliteStore) -> None:
    clock = Clock(T0)
    assert run(store, clock, code(T0))[0] == Outcome.SUCCESS
    with pytest.raises(CodeRejected, match="replayed"):
        run(store, clock, code(T0))


def test_older_step_after_newer_is_a_replay(store: SqliteStore) -> None:
    clock = Clock(T0)
    assert run(store, clock, code(T0 + 30))[0] == Outcome.SUCCESS
    with pytest.raises(CodeRejected, match="replayed"):
        run(store, clock, code(T0))


def test_previous_and_next_step_within_window(store: SqliteStore) -> None:
    clock = Clock(T0)
    assert run(store, clock, code(T0 - 30))[0] == Outcome.SUCCESS
    assert run(store, clock, code(T0 + 30))[0] == Outcome.SUCCESS
    with pytest.raises(CodeRejected, match="wrong code"):
        run(store, clock, code(T0 + 60))


def test_lockout_after_max_failures_then_expiry(store: SqliteStore) -> None:
    clock = Clock(T0)
    config = {"lockout": {"max_failures": 3, "duration": 60}}
    for _ in range(2):
        with pytest.raises(CodeRejected):
            run(store, clock, "000000", config=config)
    with pytest.raises(Locked):
        run(store, clock, "000000", config=config)
    # Locked: even the right code is not asked for.
    prompter = Prompter(code(T0))
    chain = SourceChain([StaticSource({"1001": ExtensionSettings("1001", "totp", secret=SECRET)})])
    ctx = Context(Config.from_mapping(config), clock, chain, store)
    with pytest.raises(Locked):
        authenticate(LoginRequest("1001"), ctx, prompter)
    assert prompter.prompts == [] and prompter.infos
    clock.now += 61
    assert run(store, clock, code(clock.now), config=config)[0] == Outcome.SUCCESS
    assert store.lock_status("1001", clock.now).failures == 0


def test_each_failure_after_expiry_locks_again_and_permanent_after(store: SqliteStore) -> None:
    clock = Clock(T0)
    config = {"lockout": {"max_failures": 2, "duration": 10, "permanent_after": 4}}
    outcomes = []
    for _ in range(4):
        try:
            run(store, clock, "000000", config=config)
        except (CodeRejected, Locked) as exc:
            outcomes.append(type(exc).__name__)
        clock.now += 11
    assert outcomes == ["CodeRejected", "Locked", "Locked", "Locked"]
    assert store.lock_status("1001", clock.now + 10**6).locked(clock.now + 10**6)
    store.unlock("1001")
    assert run(store, clock, code(clock.now), config=config)[0] == Outcome.SUCCESS


def test_not_enrolled_skips_or_is_denied_by_policy(store: SqliteStore) -> None:
    clock = Clock(T0)
    entries = {"1002": ExtensionSettings("1002", "totp", secret=SECRET, enabled=False),
               "1003": ExtensionSettings("1003", "none")}
    for user in ("1002", "1003", "nobody"):
        assert run(store, clock, entries=entries, user=user)[0] == Outcome.SKIP
        with pytest.raises(NotEnrolled):
            run(store, clock, code(T0), entries=entries, user=user, config={"enforce": "all"})


def test_enforce_all_asks_every_name_for_a_code_before_refusing(store: SqliteStore) -> None:
    """Issue 17.11: an enrolled name, a name without 2FA, an unknown name and one whose method
    the policy does not allow get the same prompt before the refusal (pam_linkus.so may run
    before the password module); no answer is a conversation failure for all of them alike."""
    entries = {"1001": ExtensionSettings("1001", "totp", secret=SECRET),
               "1002": ExtensionSettings("1002", "none"),
               "1004": ExtensionSettings("1004", "email", email="a@example.com")}
    config = Config.from_mapping({"profiles": {"strict": {"enforce": "all", "methods": ["totp"]}}})
    for user in ("1001", "1002", "nobody", "1004"):
        for answer in ("000000", None):
            prompter = Prompter(answer)
            ctx = Context(config, Clock(T0), SourceChain([StaticSource(entries)]), store)
            expected = ConversationFailed if answer is None else (NotEnrolled, CodeRejected)
            with pytest.raises(expected):
                authenticate(LoginRequest(user, profile="strict"), ctx, prompter)
            assert prompter.prompts == ["Authentication code: "], user
    # Each wrong answer counted one failure for every name alike (issue 17, tester 2); no answer none.
    assert [store.lock_status(user, T0).failures for user in ("1001", "1002", "nobody", "1004")] == [1, 1, 1, 1]


def test_enforce_all_locks_an_unknown_name_as_typed_in_any_case(store: SqliteStore) -> None:
    """An unknown name's failures are kept under the name casefolded, as sources compare names, and
    lock it after max_failures like an enrolled extension's: the lock message, then no prompt."""
    config = Config.from_mapping({"enforce": "all", "lockout": {"max_failures": 2}})
    seen = []
    for typed in ("Ghost", "GHOST", "ghost"):
        prompter = Prompter("000000")
        ctx = Context(config, Clock(T0), SourceChain([StaticSource({})]), store)
        with pytest.raises((NotEnrolled, Locked)) as caught:
            authenticate(LoginRequest(typed), ctx, prompter)
        seen.append((type(caught.value).__name__, prompter.prompts, prompter.infos))
    locked = "Too many failed attempts; contact your administrator."
    assert seen == [("NotEnrolled", ["Authentication code: "], []),
                    ("Locked", ["Authentication code: "], [locked]),
                    ("Locked", [], [locked])]
    assert store.lock_status("ghost", T0).failures == 2 and store.lock_status("Ghost", T0).failures == 0


class NoStore:
    """A state store that must not be used."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"state store used for a skip ({name})")


def test_skip_never_touches_the_state_store() -> None:
    ctx = Context(Config.from_mapping({}), Clock(T0), SourceChain([StaticSource({})]), NoStore())  # type: ignore[arg-type]
    assert authenticate(LoginRequest("x"), ctx, Prompter()).outcome == Outcome.SKIP


def test_hang_up_is_a_conversation_failure_and_not_counted(store: SqliteStore) -> None:
    with pytest.raises(ConversationFailed):
        run(store, Clock(T0), None)
    assert store.lock_status("1001", T0).failures == 0


def test_unavailable_source_is_never_a_skip(store: SqliteStore) -> None:
    ctx = Context(Config.from_mapping({}), Clock(T0), SourceChain([StaticSource({}, down=True)]), store)
    with pytest.raises(SourceUnavailable):
        authenticate(LoginRequest("1001"), ctx, Prompter())


def test_chain_next_on_unavailable_still_refuses_unknown_users() -> None:
    settings = ExtensionSettings("1001", "totp", secret=SECRET)
    down, up = StaticSource({}, down=True), StaticSource({"1001": settings})
    assert SourceChain([down, up], skip_unavailable=True).lookup("1001") is settings
    with pytest.raises(SourceUnavailable):
        SourceChain([down, up], skip_unavailable=True).lookup("nobody")
    with pytest.raises(SourceUnavailable):
        SourceChain([down, up]).lookup("1001")
    assert SourceChain([StaticSource({}), up]).lookup("1001") is settings


def test_a_code_from_a_clock_a_few_steps_off_is_denied_with_a_hint(store: SqliteStore) -> None:
    """Issue 12.15: a phone (or host) whose clock is off locks everyone out without a hint otherwise."""
    with pytest.raises(CodeRejected, match="clock off by about 3 steps"):
        run(store, Clock(T0), code(T0 + 90))
    with pytest.raises(CodeRejected) as far:
        run(store, Clock(T0), code(T0 + 30 * 400))
    assert "clock off" not in far.value.reason


def test_a_totp_login_is_one_durable_write(store: SqliteStore) -> None:
    """Issue 11: reserve, check and record in one transaction (one fsync), success or failure."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    clock = Clock(T0)
    assert run(store, clock, code(T0))[0] == Outcome.SUCCESS
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert len(statements) <= 6  # the lock read before the prompt, then the transaction's five
    for answer in ("000000", code(T0)):  # wrong, then replayed
        statements.clear()
        with pytest.raises(CodeRejected):
            run(store, clock, answer)
        assert statements.count("BEGIN IMMEDIATE") == 1


def test_a_recovery_code_at_the_totp_prompt_is_hashed_outside_the_transaction(store: SqliteStore) -> None:
    from pam_linkus.recovery import digest, new_salt

    salt = new_salt()
    store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
    clock = Clock(T0)
    with pytest.raises(CodeRejected, match=r"^malformed code \(1 consecutive failures\)$"):
        run(store, clock, "zzzzz-zzzzz")  # could be a recovery code, is none: one failure, not two
    assert store.lock_status("1001", T0).failures == 1
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert run(store, clock, "abcde-fghij")[0] == Outcome.SUCCESS
    # the TOTP attempt's transaction ended before the recovery code's began
    begins = [i for i, s in enumerate(statements) if s == "BEGIN IMMEDIATE"]
    commits = [i for i, s in enumerate(statements) if s == "COMMIT"]
    assert len(begins) == 2 and commits[0] < begins[1]  # the attempt, then spending the code
    assert store.lock_status("1001", T0).failures == 0 and store.recovery_codes_left("1001") == 0
    with pytest.raises(CodeRejected, match=r"^malformed code \(1 consecutive failures\)$"):
        run(store, clock, "abcde-fghij")  # spent


def test_wrong_replayed_and_locking_reasons_of_a_totp_login(store: SqliteStore) -> None:
    clock = Clock(T0)
    config = {"lockout": {"max_failures": 3, "duration": 60}}
    assert run(store, clock, code(T0), config=config)[0] == Outcome.SUCCESS
    with pytest.raises(CodeRejected, match=r"^replayed code \(1 consecutive failures\)$"):
        run(store, clock, code(T0), config=config)
    with pytest.raises(CodeRejected, match=r"^malformed code \(2 consecutive failures\)$"):
        run(store, clock, "12a", config=config)
    with pytest.raises(Locked, match=r"^wrong code; locked after 3 consecutive failures$"):
        run(store, clock, "000000", config=config)


@pytest.mark.parametrize("method", ["totp", "email"])
def test_the_flow_announces_scrypt_and_smtp_before_it_starts_them(store: SqliteStore, method: str) -> None:
    """linkusd runs a local login's steps on its event loop and moves the rest of the login to a
    worker when the flow yields Offload: before the mail is sent and before a recovery code is
    hashed; a 6-digit code costs neither, so it yields none."""
    from pam_linkus.recovery import digest, new_salt

    salt = new_salt()
    store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
    entries = {"1001": ExtensionSettings("1001", "totp", secret=SECRET) if method == "totp"
               else ExtensionSettings("1001", "email", email="a@example.com")}

    trace: list[str] = []

    class Mailer:
        def send(self, to: str, subject: str, body: str, *, now: float) -> None:
            assert trace[-1] == "offload", "mail sent before the flow said so"
            trace.append("mail")

    for hour, (answer, hashed) in enumerate((("123456", False), ("abcde-fghij", True))):
        trace.clear()

        def asked(answer: str = answer) -> str:
            trace.append("ask")
            return answer

        ctx = Context(Config.from_mapping({"email": {"key_file": str(Path(store.path).parent / "email.key")}}),
                      Clock(T0 + 3600 * hour), SourceChain([StaticSource(entries)]), store, mailer_factory=Mailer)
        outcome: str
        try:
            outcome = authenticate(LoginRequest("1001"), ctx, Prompter(asked),
                                   on_offload=lambda: trace.append("offload")).outcome
        except CodeRejected:
            outcome = "denied"
        mail = ["offload", "mail"] if method == "email" else []
        assert trace == mail + ["ask"] + (["offload"] if hashed else []), (answer, trace)
        assert outcome == (Outcome.SUCCESS if hashed else "denied")


def test_the_flow_announces_a_lookup_that_may_wait_for_a_server(store: SqliteStore) -> None:
    """A source that may wait for a server (LDAP: ``waits_for_servers``) is asked only after an
    Offload step; a memory-only source (YAML) without one."""
    trace: list[str] = []

    class Memory(StaticSource):
        def lookup(self, user: str) -> ExtensionSettings | None:
            trace.append("lookup")
            return super().lookup(user)

    class Directory(Memory):
        waits_for_servers = True

    def asked() -> str:
        trace.append("ask")
        return "000000"

    for source, expected in ((Directory, ["offload", "lookup"]), (Memory, ["lookup"])):
        trace.clear()
        chain = SourceChain([source({"1001": ExtensionSettings("1001", "totp", secret=SECRET)})])
        with pytest.raises(CodeRejected):
            authenticate(LoginRequest("1001"), Context(Config.from_mapping({}), Clock(T0), chain, store),
                         Prompter(asked), on_offload=lambda: trace.append("offload"))
        assert trace == [*expected, "ask"]  # one Offload at most, and only before the lookup


def test_a_recovery_shaped_answer_costs_one_scrypt_hash_for_every_name(store: SqliteStore,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tester 3: under enforce: all (pam_linkus.so before the password), ``aaaaa-bbbbb`` cost an
    enrolled name with recovery codes a scrypt hash (~40 ms) and any other name nothing, so the
    time told names apart. Now every name takes the same steps -- the prompt, an Offload to the
    pool, one hash with the same parameters -- before the refusal; a 6-digit answer hashes for none."""
    from pam_linkus import flow
    from pam_linkus.recovery import digest, new_salt

    salt = new_salt()
    store.set_recovery_codes("1001", salt, [digest("abcdefghij", salt)])
    entries = {"1001": ExtensionSettings("1001", "totp", secret=SECRET),
               "1003": ExtensionSettings("1003", "totp", secret=SECRET),  # enrolled, no recovery codes
               "1002": ExtensionSettings("1002", "none"),
               "1004": ExtensionSettings("1004", "email", email="a@example.com")}
    config = Config.from_mapping({"profiles": {"strict": {"enforce": "all", "methods": ["totp"]}}})
    trace: list[str] = []

    def hashed(code: str, salt: str) -> str:
        trace.append("hash")
        return digest(code, salt)

    monkeypatch.setattr(flow, "digest", hashed)
    for answer, expected in (("aaaaa-bbbbb", ["ask", "offload", "hash"]), ("000000", ["ask"])):
        for user in ("1001", "1003", "1002", "nobody", "1004"):
            trace.clear()

            def asked(answer: str = answer) -> str:
                trace.append("ask")
                return answer

            ctx = Context(config, Clock(T0), SourceChain([StaticSource(entries)]), store)
            with pytest.raises((NotEnrolled, CodeRejected)):
                authenticate(LoginRequest(user, profile="strict"), ctx, Prompter(asked),
                             on_offload=lambda: trace.append("offload"))
            assert trace == expected, (user, answer, trace)
    assert [store.lock_status(u, T0).failures for u in ("1001", "1003", "1002", "nobody", "1004")] == [2] * 5
    assert store.recovery_codes_left("1001") == 1


def test_an_answer_the_directory_source_keeps_in_memory_needs_no_offload(store: SqliteStore) -> None:
    """LDAP's recent answers (ldap.cache_ttl) are read on linkusd's event loop: no Offload, no
    lookup; only when the source has none kept does the flow announce the wait and ask."""
    from nss_config.answer_cache import NOT_CACHED

    trace: list[str] = []
    kept: dict[str, ExtensionSettings] = {}

    class Directory(StaticSource):
        waits_for_servers = True

        def recall(self, user: str) -> object:
            trace.append("recall")
            return kept.get(user, NOT_CACHED)

        def lookup(self, user: str) -> ExtensionSettings | None:
            trace.append("lookup")
            return super().lookup(user)

    settings = ExtensionSettings("1001", "totp", secret=SECRET)
    chain = SourceChain([Directory({"1001": settings})])
    for expected in (["recall", "offload", "lookup"], ["recall"]):
        trace.clear()
        with pytest.raises(CodeRejected):
            authenticate(LoginRequest("1001"), Context(Config.from_mapping({}), Clock(T0), chain, store),
                         Prompter(lambda: "000000"), on_offload=lambda: trace.append("offload"))
        assert trace == expected
        kept["1001"] = settings
