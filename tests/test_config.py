"""Strict YAML and the main config: every bad input is a ConfigError naming file:line:col."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from conftest import cut_points

from nss_config.yaml_reader import load_yaml, open_secure, read_secret_file
from nss_config.yaml_source import read_extensions
from pam_linkus.config import Config, load_config
from pam_linkus.errors import ConfigError
from pam_linkus.totp import decode_secret

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def write_ext(path: Path, text: str, mode: int = 0o600) -> Path:
    """An extensions file: ``text`` and the end marker a complete one ends with."""
    return write(path, text + "...\n", mode)


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    """A main config: ``text`` and the end marker a complete one ends with."""
    return write(path, text + "...\n", mode)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("a: 1\na: 2\n", "duplicate key$", ":2:1"),
        ("1001: {method: none}\n", "a key is not a string; quote it", ":1:1"),
        ("yes: 1\n", "is not a string", ":1:1"),
        ("? [a]\n: 1\n", "is not a string", ":1:3"),
        ("a: &x {b: 1}\nc: *x\n", "anchors", ":1:4"),
        ("a: &x 1\n", "anchors", ":1:4"),
        ("a: {b: 1}\nc:\n  <<: {b: 2}\n", "merge keys", ":3:3"),
        ("a: [1, 2\n", "expected", ":"),
        ("a: !!python/object:os.system {}\n", "tags other than the core ones", ":1:4"),
        ("a: !!python/name:os.system x\n", "tags other than the core ones", ":1:4"),
        ("a: !custom x\n", "tags other than the core ones", ":1:4"),
        ("a: !!binary aGVsbG8=\n", "tags other than the core ones", ":1:4"),
        ("a: 2001-12-14\n", "date", ":1:4"),
        ("a: !!int abc\n", "not a valid int", ":1:4"),
        ("a: 1\n---\nb: 2\n", "more than one YAML document", ":2:1"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32", ":1:"),
        (b"a: \xff\xfe\n".decode("latin-1"), "not valid YAML", ""),
    ],
)
def test_strict_yaml_refuses(text: str, message: str, where: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml(text.encode("latin-1") if "\xff" in text else text.encode(), "f.yaml")
    assert str(info.value).startswith("f.yaml" + where)


def test_strict_yaml_builds_plain_data_with_marks() -> None:
    text = ('a: 1\nb: "1001"\nc: [yes, no, ~, 1.5, 0x10, !!str 7, \'q\']\nd:\n  e: {f: null}\n'
            "g: !!int '12'\nh: ''\n\"1002\": x\n")
    data = load_yaml(text.encode(), "f.yaml")
    assert data == {"a": 1, "b": "1001", "c": [True, False, None, 1.5, 16, "7", "q"], "d": {"e": {"f": None}},
                    "g": 12, "h": "", "1002": "x"}
    assert data.marks["d"] == (4, 1) and data["d"].marks["e"] == (5, 3) and data["d"]["e"].start == (5, 6)
    assert load_yaml(b"", "f.yaml") is None and load_yaml(b"- 1\n", "f.yaml") == [1]


def test_duplicate_keys_are_named_only_when_known() -> None:
    with pytest.raises(ConfigError, match=r"duplicate key 'secret'$"):
        load_yaml(b"secret: a\nsecret: b\n", "f.yaml", known_keys=frozenset({"secret"}))
    with pytest.raises(ConfigError) as info:
        load_yaml(f"{SECRET}: 1\n{SECRET}: 2\n".encode(), "f.yaml", known_keys=frozenset({"secret"}))
    assert SECRET not in str(info.value) and str(info.value).startswith("f.yaml:2:1: duplicate key")


def test_non_string_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml(b"123456789012345: x\n", "f.yaml")
    assert "123456789012345" not in str(info.value)


def test_strict_yaml_error_never_echoes_a_secret_anywhere_in_the_file() -> None:
    for text in (f"a: !!int {SECRET}\n", f"a: &{SECRET} 1\n", f"? [{SECRET}]\n: 1\n", f"a: [{SECRET}\n",
                 f"{SECRET}: 1\n{SECRET}: 1\n", f"a: !{SECRET} x\n"):
        with pytest.raises(ConfigError) as info:
            load_yaml(text.encode(), "f.yaml")
        assert SECRET not in str(info.value), text


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
    )
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(bomb.encode(), "bomb.yaml")


def test_error_messages_never_echo_values(private_dir: Path) -> None:
    path = write_ext(private_dir / "ext.yaml", f'extensions:\n  "1001":\n    method: totp\n    secret: {SECRET}\n'
                 f"    secret: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        read_extensions(str(path))
    assert SECRET not in str(info.value) and "duplicate key" in str(info.value)
    assert f"{path}:5:5" in str(info.value)


def test_symlink_is_not_followed(private_dir: Path) -> None:
    target = write_ext(private_dir / "real.yaml", "extensions: {}\n")
    link = private_dir / "link.yaml"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_extensions(str(link))


@pytest.mark.parametrize(
    ("mode", "message"),
    [(0o620, "writable by group"), (0o602, "writable by group or others"), (0o604, "readable by group or others"),
     (0o640, "readable by group"), (0o000, "must be 0600 or 0400"), (0o200, "must be 0600 or 0400"),
     (0o700, "must be 0600 or 0400"), (0o4600, "must be 0600 or 0400"), (0o1600, "must be 0600 or 0400")],
)
def test_modes_other_than_0600_and_0400_are_refused(private_dir: Path, mode: int, message: str) -> None:
    path = write_ext(private_dir / "ext.yaml", "extensions: {}\n", mode)
    with pytest.raises(ConfigError, match=message):
        open_secure(str(path), secret=False, max_bytes=1000)
    with pytest.raises(ConfigError, match=message):
        read_secret_file(str(path), "a password")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_0600_and_0400_are_accepted(private_dir: Path, mode: int) -> None:
    path = write(private_dir / "pw", "hunter2\n", mode)
    assert read_secret_file(str(path), "a password") == "hunter2"


def test_group_readable_secret_with_foreign_group_is_refused(private_dir: Path) -> None:
    path = write(private_dir / "pw", "hunter2\n", 0o640)
    os.chown(path, 0, 65534)
    with pytest.raises(ConfigError, match="readable by group"):
        read_secret_file(str(path), "a password")


def test_foreign_owner_is_refused(private_dir: Path) -> None:
    path = write_ext(private_dir / "ext.yaml", "extensions: {}\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 0"):
        read_extensions(str(path))


@pytest.mark.parametrize(("mode", "uid"), [(0o777, 0), (0o1777, 0), (0o1770, 0), (0o770, 0), (0o757, 0),
                                           (0o700, 65534)])
def test_unsafe_directory_is_refused(private_dir: Path, mode: int, uid: int) -> None:
    sub = private_dir / "conf"
    sub.mkdir()
    os.chmod(sub, mode)
    os.chown(sub, uid, 0)
    path = write_ext(sub / "ext.yaml", "extensions: {}\n")
    with pytest.raises(ConfigError, match=f"directory {sub}"):
        load_config(str(path))


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_unsafe_grandparent_is_refused(private_dir: Path, mode: int) -> None:
    """A 0700 config dir inside a directory others can write is swappable: refused (OpenSSH safe_path)."""
    outer = private_dir / "outer"
    outer.mkdir()
    os.chmod(outer, mode)
    inner = outer / "pam_linkus"
    inner.mkdir(mode=0o700)
    path = write_config(inner / "pam_linkus.yaml", "enforce: all\n")
    with pytest.raises(ConfigError, match=f"directory {outer} is writable by group or others"):
        load_config(str(path))


def test_tmp_is_refused_as_a_parent() -> None:
    """/tmp is 1777: a config under it is refused, however private its own directory."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        path = write_config(Path(tmp) / "pam_linkus.yaml", "enforce: all\n")
        with pytest.raises(ConfigError, match="is writable by group or others"):
            load_config(str(path))


def test_symlinked_directory_is_checked_where_it_points(private_dir: Path) -> None:
    outer = private_dir / "open"
    outer.mkdir()
    os.chmod(outer, 0o777)
    real = outer / "real"
    real.mkdir(mode=0o700)
    path = write_config(real / "pam_linkus.yaml", "enforce: all\n")
    link = private_dir / "etc"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=f"directory {outer}"):
        load_config(str(link / "pam_linkus.yaml"))
    os.chmod(outer, 0o755)
    assert load_config(str(link / "pam_linkus.yaml")).enforce == "all"
    assert load_config(str(path)).enforce == "all"


def test_writable_directory_is_refused(private_dir: Path) -> None:
    sub = private_dir / "open"
    sub.mkdir()
    os.chmod(sub, 0o777)
    path = write_ext(sub / "ext.yaml", "extensions: {}\n")
    with pytest.raises(ConfigError, match="directory"):
        read_extensions(str(path))


def test_size_cap(private_dir: Path) -> None:
    path = write(private_dir / "big.yaml", "a: " + "x" * 2000 + "\n")
    with pytest.raises(ConfigError, match="larger than the limit"):
        open_secure(str(path), secret=False, max_bytes=1000)


def test_missing_file_is_an_error(private_dir: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        load_config(str(private_dir / "absent.yaml"))


def test_config_defaults() -> None:
    config = Config.from_mapping({})
    assert config.enforce == "enrolled" and config.sources == ["yaml"]
    assert config.lockout.max_failures == 5 and config.lockout.duration == 900
    assert config.totp.window == 1 and config.state.backend == "sqlite"


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("enforce: sometimes\n", "enforce: must be one of: enrolled, all", ":1:1"),
        ("enforced: all\n", r"unknown key in top level \(known: .*enforce,", ":1:1"),
        ("lockout:\n  max_failure: 3\n", r"unknown key in lockout \(known: duration, max_failures", ":2:3"),
        ("lockout:\n  max_failures: 0\n", "lockout.max_failures: must be between 1 and 100", ":2:3"),
        ("lockout:\n  max_failures: five\n", "lockout.max_failures: must be an integer", ":2:3"),
        ("lockout:\n  max_failures: true\n", "must be an integer", ":2:3"),
        ("sources: [yaml, nis]\n", "sources: entry 2 is unknown; known: yaml, ldap", ":1:1"),
        ("exempt_networks: [10.0.0.0/8, 10.1.2.3/8]\n", "exempt_networks: entry 2 is not a CIDR network", ":1:1"),
        ("exempt_networks: ['::ffff:10.0.0.0/104']\n", "entry 1 is an IPv4-mapped IPv6 network: write it in IPv4",
         ":1:1"),
        ("daemon:\n  workers: 0\n", "daemon.workers: must be between 1 and 256", ":2:3"),
        ("daemon:\n  pam_socket: pam.sock\n", "daemon.pam_socket: must be an absolute path", ":2:3"),
        ("daemon:\n  allowed_groups: [wheel, 'bad group']\n", "daemon.allowed_groups: entry 2 is not a group",
         ":2:3"),
        ("daemon:\n  max_connections: 10\n", "daemon.max_per_caller: must not be larger than max_connections",
         ":2:3"),
        ("daemon:\n  answer_timeout: 1\n", "daemon.answer_timeout: must be between 10", ":2:3"),
        ("profiles:\n  sshd:\n    enforce: maybe\n", "profiles.sshd.enforce: must be one of", ":3:5"),
        ("profiles:\n  sshd:\n    methods: [sms]\n", "profiles.sshd.methods: entry 1 is unknown", ":3:5"),
        ("profiles:\n  sshd:\n    methods: []\n", "profiles.sshd.methods: must name at least one", ":3:5"),
        ("profiles:\n  'a b':\n    enforce: all\n", "a profile name must be", ":2:3"),
        ("profiles:\n  sshd:\n    grace: 5\n", r"unknown key in profiles.sshd \(known:", ":3:5"),
        ("sources: []\n", "at least one source", ":1:1"),
        ("sources: [ldap]\n", "ldap.uris is empty", ""),
        ("ldap:\n  cache_ttl: 10\n  negative_cache_ttl: 11\n",
         r"ldap.negative_cache_ttl: must not be longer than cache_ttl \(10\)", ":3:3"),
        ("state:\n  path: relative.db\n", "state.path: must be an absolute path", ":2:3"),
        ("totp: 5\n", "totp: must be a mapping", ":1:1"),
        ("- a\n- b\n", "must be a mapping", ""),
    ],
)
def test_config_errors_name_key_and_place(private_dir: Path, text: str, message: str, where: str) -> None:
    path = write_config(private_dir / "pam_linkus.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert str(info.value).startswith(str(path) + where)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{method: sms}", "method must be one of"),
        ("{method: totp}", "needs a secret"),
        ("{method: totp, secret: 'abc!'}", "not base32"),
        ("{method: totp, secret: JBSWY3DP}", "shorter than 80 bits"),
        (f"{{method: totp, secret: {SECRET}, digits: 7}}", "digits must be 6 or 8"),
        (f"{{method: totp, secret: {SECRET}, algorithm: MD5}}", "algorithm must be one of"),
        (f"{{method: totp, secret: {SECRET}, period: 5}}", "period must be"),
        (f"{{method: totp, secret: {SECRET}, enabled: 'no'}}", "enabled must be true or false"),
        ("{method: email}", "needs an email address"),
        (f"{{method: totp, secret: {SECRET}, colour: red}}", r"unknown key \(known: method, "),
        ("{method: totp, secret: JBSWY3DPEHPK3PXP}", "shorter than 128 bits"),
        ("{method: totp, secret: JBSWY3DPEHPK3PXPJBSWY3A}", "shorter than 128 bits"),
        ("{method: totp, secret: JBSWY3DPEHPK3PXP, legacy_short_secret: 'yes'}", "must be true or false"),
        ("{method: totp, secret: JBSWY3DP, legacy_short_secret: true}", "shorter than 80 bits"),
        (f"{{method: totp, secret: {'A' * 207}}}", "longer than 1024 bits"),
        ("{method: totp, secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPA}", "impossible length"),
        ("{method: totp, secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPABC}", "impossible length"),
        (f"{{method: totp, secret: '{'ABCD ' * 52}'}}", "longer than 1024 bits"),
        ("{method: email, email: 'a@example.com\\r\\nBcc: x@evil.test'}", "email (has|is not one plain)"),
        ("{method: email, email: 'a@example.com, b@example.com'}", "email (has|is not one plain)"),
        ("{method: email, email: 'Alice <a@example.com>'}", "email has characters"),
        ("{method: email, email: 'a b@example.com'}", "email has characters"),
        ("{method: email, email: 'a@b@example.com'}", "email (has|is not one plain)"),
        ("{method: email, email: 'a@localhost'}", "email has a domain"),
        ("{method: email, email: 'a@-x.example.com'}", "email has a domain"),
        (f"{{method: email, email: '{'a' * 65}@example.com'}}", "email is not one plain address"),
        (f"{{method: email, email: 'a@{'b' * 250}.com'}}", "email is not one plain address .length"),
        ("{method: none, email: 'not-an-address'}", "email is not one plain address"),
    ],
)
def test_bad_extension_entries(private_dir: Path, entry: str, message: str) -> None:
    path = write_ext(private_dir / "ext.yaml", f'extensions:\n  "1001": {entry}\n')
    with pytest.raises(ConfigError, match=message) as info:
        read_extensions(str(path))
    assert f"{path}:2:3" in str(info.value)


def test_a_secret_of_1024_bits_is_the_longest_accepted(private_dir: Path) -> None:
    """Issue 17.12: a 10 MB secret made one login hash it for 1.4 s on linkusd's event loop."""
    path = write_ext(private_dir / "ext.yaml", f'extensions:\n  "1001": {{method: totp, secret: {"A" * 205}}}\n')
    assert len(decode_secret(read_extensions(str(path))["1001"].secret or "")) == 128


def test_entry_errors_never_name_the_extension_or_an_unknown_key(private_dir: Path) -> None:
    path = write_ext(private_dir / "ext.yaml", f"extensions:\n  {SECRET}: {SECRET}\n  x:\n    {SECRET}: 1\n")
    with pytest.raises(ConfigError) as info:
        read_extensions(str(path))
    assert SECRET not in str(info.value) and f"{path}:2:" in str(info.value)
    write_ext(path, f"extensions:\n  x:\n    method: totp\n    secret: {SECRET}\n    {SECRET}: 1\n")
    with pytest.raises(ConfigError) as info:
        read_extensions(str(path))
    assert SECRET not in str(info.value) and f"{path}:" in str(info.value)


def test_short_secret_needs_the_migration_flag(private_dir: Path) -> None:
    short = "JBSWY3DPEHPK3PXP"  # 80 bits, as google-authenticator writes them
    path = write_ext(private_dir / "ext.yaml", f'extensions:\n  "1001": {{method: totp, secret: {short}}}\n')
    with pytest.raises(ConfigError, match="shorter than 128 bits"):
        read_extensions(str(path))
    write_ext(path, f'extensions:\n  "1001": {{method: totp, secret: {short}, legacy_short_secret: true}}\n')
    found = read_extensions(str(path))["1001"]
    assert found.secret == short and found.legacy_short_secret
    write_ext(path, f'extensions:\n  "1001": {{method: totp, secret: {SECRET}}}\n')
    assert not read_extensions(str(path))["1001"].legacy_short_secret


def test_extension_entries_parse(private_dir: Path) -> None:
    path = write_ext(
        private_dir / "ext.yaml",
        f'extensions:\n  "1001": {{method: totp, secret: "{SECRET[:16].lower()} {SECRET[16:]}", digits: 8,'
        f' algorithm: sha256}}\n  "1002": {{method: email, email: a@example.com}}\n  "1003": {{method: none}}\n'
        f'  "1004": {{method: totp, enabled: false}}\n',
    )
    found = read_extensions(str(path))
    assert found["1001"].secret == SECRET and found["1001"].digits == 8 and found["1001"].algorithm == "SHA256"
    assert found["1001"].enrolled and found["1002"].enrolled
    assert not found["1003"].enrolled and not found["1004"].enrolled
    assert SECRET not in repr(found["1001"])


def test_unknown_key_holding_a_secret_is_not_echoed(private_dir: Path) -> None:
    path = write_config(private_dir / "pam_linkus.yaml", f"smtp:\n  {SECRET}: x\nprofiles:\n  {SECRET.lower()}: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert SECRET not in str(info.value) and str(info.value).startswith(f"{path}:2:3: unknown key in smtp")


def test_daemon_defaults_and_values() -> None:
    config = Config.from_mapping({})
    d = config.daemon
    assert (d.pam_socket, d.web_socket, d.web_group) == ("/run/linkusd/pam.sock", "/run/linkusd/web.sock",
                                                         "linkus-web")
    assert d.allowed_groups == [] and d.trusted_groups == []
    assert (d.work_timeout, d.answer_timeout, d.workers, d.web_workers) == (10.0, 180.0, 8, 2)
    assert (d.max_connections, d.max_per_caller, d.max_per_caller_root, d.max_per_account) == (512, 16, 256, 8)
    config = Config.from_mapping({"daemon": {"allowed_groups": ["root"], "trusted_groups": ["root"],
                                             "work_timeout": 2, "max_per_account": 3}})
    assert config.daemon.allowed_groups == ["root"] and config.daemon.work_timeout == 2.0
    assert config.daemon.group_ids(config.daemon.allowed_groups) == frozenset({0})
    with pytest.raises(ConfigError, match="does not exist"):
        config.daemon.group_ids(["linkus-no-such-group-x"])


def test_profiles_inherit_the_top_level_policy() -> None:
    config = Config.from_mapping({
        "enforce": "enrolled", "exempt_networks": ["10.0.0.0/8"], "grace_period": 60,
        "profiles": {"sshd": {"enforce": "all", "methods": ["totp"]},
                     "web": {"exempt_networks": [], "grace_period": 0}},
    })
    sshd = config.profile("sshd", explicit=False)
    assert sshd.enforce == "all" and sshd.methods == ["totp"] and sshd.grace_period == 60
    assert [str(n) for n in sshd.exempt_networks] == ["10.0.0.0/8"]
    web = config.profile("web", explicit=True)
    assert web.enforce == "enrolled" and web.exempt_networks == [] and web.grace_period == 0
    assert web.methods == ["totp", "email"]
    top = config.profile("login", explicit=False)
    assert top is config.default_profile and top.enforce == "enrolled" and top.grace_period == 60
    with pytest.raises(ConfigError, match=r"profile 'login'.* is not defined"):
        config.profile("login", explicit=True)


def test_shipped_config_loads_and_documents_every_section(private_dir: Path) -> None:
    shipped = Path(__file__).resolve().parent.parent / "packaging" / "pam_linkus.yaml"
    path = write(private_dir / "pam_linkus.yaml", shipped.read_text())
    config = load_config(str(path))
    assert config.daemon.pam_socket == "/run/linkusd/pam.sock"
    text = shipped.read_text()
    for key in ("daemon:", "pam_socket:", "web_socket:", "allowed_groups:", "trusted_groups:", "web_group:",
                "work_timeout:", "answer_timeout:", "workers:", "web_workers:", "max_connections:",
                "max_per_caller:", "max_per_caller_root:", "max_per_account:", "profiles:", "methods:"):
        assert key in text, key


# -- a cut or empty main config is refused (the extensions file's rule, issue 17.6) --------------


SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "pam_linkus.yaml"
#: What an admin adds to the shipped file: per-service profiles, the last one the tester's.
PROFILES = """\
profiles:
  sshd:
    enforce: all
    methods: [totp]
  linkus-attack-pc:
    enforce: all
"""


def realistic_config() -> str:
    """The shipped template with profiles added before its end marker, and a comment after it."""
    text = SHIPPED.read_text()
    assert text.endswith("\n...\n"), "the shipped template ends with the end marker"
    return text[: -len("...\n")] + PROFILES + "...\n# edited by the admin, 2026-01-02\n"


def _policy(config: Config) -> tuple[object, ...]:
    """What a cut file could change without anyone noticing: policy, sources and where state goes."""
    return (config.enforce, config.sources, config.yaml.path, config.state.backend, config.state.path,
            config.lockout.max_failures, {name: repr(p) for name, p in config.profiles.items()},
            config.daemon.pam_socket)


def test_the_shipped_config_ends_with_the_end_marker(private_dir: Path) -> None:
    assert SHIPPED.read_text().splitlines()[-1] == "..."
    assert load_config(str(write(private_dir / "pam_linkus.yaml", realistic_config()))).enforce == "enrolled"


def test_no_prefix_of_the_main_config_loads(private_dir: Path) -> None:
    """Every prefix of a realistic pam_linkus.yaml -- cut at every line and at random bytes -- is
    refused, except cuts after the end marker, which load exactly as the whole file does."""
    data = realistic_config().encode()
    path = write(private_dir / "pam_linkus.yaml", data.decode())
    whole = _policy(load_config(str(path)))
    assert whole[0] == "enrolled" and set(whole[6]) == {"sshd", "linkus-attack-pc"}  # type: ignore[arg-type]
    marker_end = data.index(b"\n...\n") + len(b"\n...")
    lines = data.splitlines(keepends=True)
    refused = 0
    for cut in cut_points(data, 1706):
        path.write_bytes(data[:cut])
        try:
            config = load_config(str(path))
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}:"), (cut, str(exc))
            refused += 1
            continue
        assert cut >= marker_end, (cut, data[:cut][-40:])
        assert _policy(config) == whole, cut
    assert refused >= len(lines) - 1


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "enforce: all\n",
                                  "profiles:\n  linkus-attack-pc:\n    enforce: all\n"])
def test_a_config_without_the_end_marker_is_refused_naming_its_last_line(private_dir: Path, text: str) -> None:
    path = write(private_dir / "pam_linkus.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}:{text.count(chr(10)) + 1}: has no end marker: its last line "
                                        "must be '...'")


@pytest.mark.parametrize(("text", "message"), [
    ("...\n", ":1:1: did not find expected node content"),  # libyaml: a lone marker is no document
    ("# nothing yet\n...\n", ":2:1: did not find expected node content"),
    ("---\n...\n", ": is empty: it holds no settings (write {} for every default)"),
    ("null\n...\n", ": is empty: it holds no settings (write {} for every default)"),
    ("# nothing yet\n~\n...\n", ": is empty: it holds no settings (write {} for every default)"),
])
def test_an_empty_config_is_refused(private_dir: Path, text: str, message: str) -> None:
    path = write(private_dir / "pam_linkus.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}{message}"


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("profiles:\n  linkus-attack-pc:\n", "profiles.linkus-attack-pc: has no value", ":2:3"),
        ("enforce: all\nprofiles:\n  sshd:\n    enforce: all\n  web:\n", "profiles.web: has no value", ":5:3"),
        ("profiles:\n", "profiles: has no value", ":1:1"),
        ("state:\n", "state: has no value", ":1:1"),
        ("yaml:\n", "yaml: has no value", ":1:1"),
        ("lockout: ~\n", "lockout: has no value", ":1:1"),
        ("ldap:\n  attributes:\n", "ldap.attributes: has no value", ":2:3"),
        ("daemon: null\n", "daemon: has no value", ":1:1"),
        # tester 2: a key with no value where a scalar or list belongs was "the default"
        ("enforce:\n", "enforce: has no value", ":1:1"),
        ("enforce: ~\n", "enforce: has no value", ":1:1"),
        ("enforce: null\n", "enforce: has no value", ":1:1"),
        ("enforce: all\nprofiles:\n  sshd:\n    enforce:\n", "profiles.sshd.enforce: has no value", ":4:5"),
        ("profiles:\n  sshd:\n    enforce: ~\n", "profiles.sshd.enforce: has no value", ":3:5"),
        ("profiles:\n  sshd:\n    methods:\n", "profiles.sshd.methods: has no value", ":3:5"),
        ("profiles:\n  sshd:\n    exempt_networks: null\n", "profiles.sshd.exempt_networks: has no value",
         ":3:5"),
        ("state:\n  path:\n", "state.path: has no value", ":2:3"),
        ("yaml:\n  path:\n", "yaml.path: has no value", ":2:3"),
        ("totp:\n  issuer: ~\n", "totp.issuer: has no value", ":2:3"),
        ("lockout:\n  max_failures:\n", "lockout.max_failures: has no value", ":2:3"),
        ("sources: null\n", "sources: has no value", ":1:1"),
        ("exempt_networks:\n", "exempt_networks: has no value", ":1:1"),
        ("smtp:\n  security: ~\n", "smtp.security: has no value", ":2:3"),
        ("daemon:\n  allowed_groups:\n", "daemon.allowed_groups: has no value", ":2:3"),
    ],
)
def test_a_key_without_a_value_where_a_mapping_belongs_is_refused(private_dir: Path, text: str, message: str,
                                                                   where: str) -> None:
    path = write_config(private_dir / "pam_linkus.yaml", text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}{where}: {message}; ")


def test_empty_mappings_written_out_are_settings(private_dir: Path) -> None:
    """``{}`` is a deliberate "every default"; only a key with nothing after it is refused."""
    path = write_config(private_dir / "pam_linkus.yaml", "state: {}\nprofiles:\n  sshd: {}\n")
    config = load_config(str(path))
    assert config.profile("sshd", explicit=True).enforce == "enrolled" and config.state.backend == "sqlite"
    assert load_config(str(write_config(path, "{}\n"))).enforce == "enrolled"


def test_every_key_of_the_main_config_with_no_value_is_refused(private_dir: Path) -> None:
    """Tester 2: each ``key: value`` line of a realistic config, with its value removed (nothing,
    ``~`` or ``null``), is refused naming that line; an omitted key still means the default."""
    import re

    text = realistic_config()
    body, _, tail = text.partition("...\n")
    lines = body.splitlines(keepends=True)
    pattern = re.compile(r"^(\s*)([a-z_]+):(\s+[^#\s][^#]*?)?(\s*#.*)?$")
    tried = 0
    path = private_dir / "pam_linkus.yaml"
    for number, line in enumerate(lines):
        match = pattern.match(line.rstrip("\n"))
        if match is None or match.group(3) is None:
            continue  # a comment, a blank line, or a section header whose value follows
        for empty in ("", " ~", " null"):
            edited = "".join(lines[:number]) + f"{match.group(1)}{match.group(2)}:{empty}\n" + \
                "".join(lines[number + 1:]) + "...\n" + tail
            write(path, edited)
            with pytest.raises(ConfigError, match="has no value") as caught:
                load_config(str(path))
            assert str(caught.value).startswith(f"{path}:{number + 1}:{len(match.group(1)) + 1}: "), \
                (number, str(caught.value))
            tried += 1
    assert tried >= 3 * 25  # every scalar and list key of the template (27) and the profiles


@pytest.mark.parametrize("value", ["", " ~", " null"])
@pytest.mark.parametrize("key", ["enabled", "secret", "email", "digits", "algorithm", "period",
                                 "legacy_short_secret", "method"])
def test_an_extension_key_with_no_value_is_refused(private_dir: Path, key: str, value: str) -> None:
    """Tester 2, extensions.yaml: a key present with a null value is an error, never the default."""
    entry = {"method": "totp", "secret": SECRET}
    lines = [f"    {k}: {v}\n" for k, v in entry.items() if k != key] + [f"    {key}:{value}\n"]
    path = write_ext(private_dir / "ext.yaml", 'extensions:\n  "1001":\n' + "".join(lines))
    with pytest.raises(ConfigError, match=f"extension: {key} has no value") as caught:
        read_extensions(str(path))
    assert str(caught.value).startswith(f"{path}:2:3: ")


@pytest.mark.parametrize(("text", "where"), [
    ("exempt_networks: [0.0.0.0/1, 128.0.0.0/1]\n", ":1:1"),
    ("exempt_networks: ['::/1', '8000::/1']\n", ":1:1"),
    ("exempt_networks: [10.0.0.0/8, 0.0.0.0/2, 64.0.0.0/2, 128.0.0.0/2, 192.0.0.0/2]\n", ":1:1"),
    ("profiles:\n  sshd:\n    exempt_networks: [0.0.0.0/1, 128.0.0.0/1]\n", ":3:5"),
    ("exempt_networks: [0.0.0.0/0]\n", ":1:1"),
    ("exempt_networks: ['::/0']\n", ":1:1"),
])
def test_exempt_networks_that_together_cover_everything_are_refused(private_dir: Path, text: str,
                                                                   where: str) -> None:
    """Tester 11: the check looked at one entry at a time, so two halves exempted every address."""
    path = write_config(private_dir / "pam_linkus.yaml", text)
    with pytest.raises(ConfigError, match="would exempt every address") as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{path}{where}: ")


def test_exempt_networks_that_leave_an_address_out_still_load(private_dir: Path) -> None:
    path = write_config(private_dir / "pam_linkus.yaml",
                        "exempt_networks: [0.0.0.0/1, 128.0.0.0/2, '::/1']\n")
    assert len(load_config(str(path)).exempt_networks) == 3
