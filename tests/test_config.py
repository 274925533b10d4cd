"""Strict YAML and the main config: every bad input is a ConfigError naming file:line:col."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nss_config.yaml_source import read_extensions
from pam_linkus.config import Config, load_config
from pam_linkus.errors import ConfigError
from pam_linkus.strictyaml import load_yaml, open_secure

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'", ":2:1"),
        ("1001: {method: none}\n", "key 1001 is not a string", ":1:1"),
        ("yes: 1\n", "is not a string", ":1:1"),
        ("a: &x {b: 1}\nc: *x\n", "aliases", ""),
        ("a: {b: 1}\nc:\n  <<: {b: 2}\n", "merge keys", ":3:3"),
        ("a: [1, 2\n", "expected", ":"),
        ("a: !!python/object:os.system {}\n", "could not determine a constructor", ":1:4"),
    ],
)
def test_strict_yaml_refuses(text: str, message: str, where: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml(text.encode(), "f.yaml")
    assert str(info.value).startswith("f.yaml" + where)


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)
    )
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(bomb.encode(), "bomb.yaml")


def test_error_messages_never_echo_values(private_dir: Path) -> None:
    path = write(private_dir / "ext.yaml", f'extensions:\n  "1001":\n    method: totp\n    secret: {SECRET}\n'
                 f"    secret: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        read_extensions(str(path))
    assert SECRET not in str(info.value) and "duplicate key 'secret'" in str(info.value)
    assert f"{path}:5:5" in str(info.value)


def test_symlink_is_not_followed(private_dir: Path) -> None:
    target = write(private_dir / "real.yaml", "extensions: {}\n")
    link = private_dir / "link.yaml"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_extensions(str(link))


@pytest.mark.parametrize(("mode", "message"), [(0o620, "writable"), (0o602, "writable"), (0o604, "readable by others")])
def test_insecure_modes_are_refused(private_dir: Path, mode: int, message: str) -> None:
    path = write(private_dir / "ext.yaml", "extensions: {}\n", mode)
    with pytest.raises(ConfigError, match=message):
        read_extensions(str(path))


def test_foreign_owner_is_refused(private_dir: Path) -> None:
    path = write(private_dir / "ext.yaml", "extensions: {}\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 0"):
        read_extensions(str(path))


def test_writable_directory_is_refused(private_dir: Path) -> None:
    sub = private_dir / "open"
    sub.mkdir()
    os.chmod(sub, 0o777)
    path = write(sub / "ext.yaml", "extensions: {}\n")
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
    config = Config.from_mapping(None)
    assert config.enforce == "enrolled" and config.sources == ["yaml"]
    assert config.lockout.max_failures == 5 and config.lockout.duration == 900
    assert config.totp.window == 1 and config.state.backend == "sqlite"


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        ("enforce: sometimes\n", "enforce: must be one of: enrolled, all", ":1:1"),
        ("enforced: all\n", "enforced: unknown key", ":1:1"),
        ("lockout:\n  max_failures: 0\n", "lockout.max_failures: must be between 1 and 100", ":2:3"),
        ("lockout:\n  max_failures: five\n", "lockout.max_failures: must be an integer", ":2:3"),
        ("lockout:\n  max_failures: true\n", "must be an integer", ":2:3"),
        ("sources: [yaml, nis]\n", "unknown entry 'nis'", ":1:1"),
        ("sources: []\n", "at least one source", ":1:1"),
        ("sources: [ldap]\n", "ldap.uris is empty", ""),
        ("state:\n  path: relative.db\n", "state.path: must be an absolute path", ":2:3"),
        ("totp: 5\n", "totp: must be a mapping", ":1:1"),
        ("- a\n- b\n", "must be a mapping", ""),
    ],
)
def test_config_errors_name_key_and_place(private_dir: Path, text: str, message: str, where: str) -> None:
    path = write(private_dir / "pam_linkus.yaml", text)
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
        (f"{{method: totp, secret: {SECRET}, colour: red}}", "unknown key 'colour'"),
    ],
)
def test_bad_extension_entries(private_dir: Path, entry: str, message: str) -> None:
    path = write(private_dir / "ext.yaml", f'extensions:\n  "1001": {entry}\n')
    with pytest.raises(ConfigError, match=message) as info:
        read_extensions(str(path))
    assert f"{path}:2:3" in str(info.value)


def test_extension_entries_parse(private_dir: Path) -> None:
    path = write(
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
