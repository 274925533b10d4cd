"""The YAML source against the shared source contract (tests/source_contract.py)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import cut_points, write_yaml
from source_contract import MakeSource, SourceContract

from nss_config.yaml_source import YamlSource
from pam_linkus.errors import ConfigError, SourceUnavailable


class TestYamlSource(SourceContract):
    source_name = "yaml"

    @pytest.fixture
    def make_source(self, private_dir: Path) -> MakeSource:
        def make(entries: dict[str, dict[str, Any]]) -> YamlSource:
            path = private_dir / f"extensions-{secrets.token_hex(3)}.yaml"
            write_yaml(path, {"extensions": entries}, end=True)
            return YamlSource(str(path))

        return make


def test_two_keys_differing_only_by_case_refuse_the_file_with_its_position(private_dir: Path) -> None:
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {"h1a": {"method": "none"}, "H1A": {"method": "none"}}}, end=True)
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path))
    assert f"{path}:4:3" in caught.value.reason and "case" in caught.value.reason


def test_a_key_with_surrounding_spaces_refuses_the_file(private_dir: Path) -> None:
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {" 1001": {"method": "none"}}}, end=True)
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path))
    assert f"{path}:2:3" in caught.value.reason


def test_a_loaded_source_does_not_see_later_edits(private_dir: Path) -> None:
    """linkusd builds a new snapshot aside; the old one answers unchanged meanwhile."""
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {"1001": {"method": "none"}}}, end=True)
    old = YamlSource.load(str(path))
    write_yaml(path, {"extensions": {"1002": {"method": "none"}}}, end=True)
    new = YamlSource.load(str(path))
    assert old.lookup("1001") is not None and old.lookup("1002") is None
    assert new.lookup("1002") is not None and new.lookup("1001") is None


def test_a_child_process_loads_the_same_settings(private_dir: Path) -> None:
    """Large files are parsed in a child (YamlSource.load picks it by size): same result."""
    secret = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    path = private_dir / "ext.yaml"
    write_yaml(path, {"extensions": {
        "Alice": {"method": "totp", "secret": secret, "digits": 8, "period": 60, "algorithm": "SHA256"},
        "1002": {"method": "email", "email": "bob@example.com", "enabled": False},
        "old": {"method": "totp", "secret": "JBSWY3DPEHPK3PXP", "legacy_short_secret": True},
    }}, end=True)
    here, there = YamlSource.load(str(path), in_child=False), YamlSource.load(str(path), in_child=True)
    for name in ("alice", "ALICE", "1002", "old", "nobody"):
        a, b = here.lookup(name), there.lookup(name)
        assert (a.to_dict() if a else None) == (b.to_dict() if b else None), name
    assert there.lookup("alice").account == "Alice"  # type: ignore[union-attr]


def test_a_child_reports_a_broken_file_with_its_position_and_no_value(private_dir: Path) -> None:
    path = private_dir / "ext.yaml"
    write_yaml(path, 'extensions:\n  "1001": {method: totp, secret: "QZ7MSECRETVALUE"}\n'
                     '  "1002": {method: carrier}\n...\n')
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path), in_child=True)
    assert f"{path}:" in str(caught.value) and "QZ7M" not in str(caught.value)


def test_a_large_file_goes_to_a_child(private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nss_config.yaml_source as ys

    path = private_dir / "ext.yaml"
    write_yaml(path, {"extensions": {f"e{i}": {"method": "none"} for i in range(50)}}, end=True)
    calls: list[str] = []
    monkeypatch.setattr(ys, "CHILD_THRESHOLD", 10)
    monkeypatch.setattr(ys, "load_in_child", lambda p: calls.append(p) or {})
    YamlSource.load(str(path))
    assert calls == [str(path)]


def test_a_child_names_the_line_and_column_of_a_refused_entry(private_dir: Path) -> None:
    """The position is worked out only for a refused entry: still the entry's own."""
    path = private_dir / "ext.yaml"
    write_yaml(path, 'extensions:\n  "1001": {method: none}\n  "1002": {method: totp}\n...\n')
    for in_child in (False, True):
        with pytest.raises(ConfigError, match="needs a secret") as caught:
            YamlSource.load(str(path), in_child=in_child)
        assert f"{path}:3:3" in str(caught.value), in_child


def test_a_released_large_source_is_unavailable_never_not_here(private_dir: Path) -> None:
    """A retired snapshot frees its entries (``close``); a lookup that still reached it must
    not read "not here" (the chain would go on, a policy could skip the second factor)."""
    path = private_dir / "ext.yaml"
    write_yaml(path, {"extensions": {"1001": {"method": "totp", "secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}}},
               end=True)
    source = YamlSource.load(str(path), in_child=True)
    assert source.lookup("1001") is not None and source.lookup("1002") is None and len(source) == 1
    source.close()
    with pytest.raises(SourceUnavailable):
        source.lookup("1001")


def test_check_user_name_refuses_exactly_controls_separators_and_surrogates() -> None:
    """Every code point, against the rule as written (the check is a regex now)."""
    from nss_config.base import check_user_name

    def refused(c: int) -> bool:
        return c < 32 or 127 <= c < 160 or c in (0x2028, 0x2029) or 0xD800 <= c <= 0xDFFF

    wrong = []
    for c in range(0x110000):
        try:
            check_user_name(f"a{chr(c)}b")
        except ValueError:
            if not refused(c):
                wrong.append(c)
        else:
            if refused(c):
                wrong.append(c)
    assert wrong == []


# -- issue 17.6: a truncated or half-written file never switches a second factor off -----------

#: A realistic extensions file: comments, TOTP with and without options, email, switched off, none.
REALISTIC = """\
# Per-extension 2FA settings. Root only, mode 0600.
# Prefer `linkus-2fa enroll` to editing by hand.
version: 1
extensions:
  "1001":                       # reception
    method: totp
    secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP
  "1002":
    method: email
    email: alice@example.com
  # the sales team
  "1003":
    method: totp
    secret: "KRSX G5CT MVRX EZLU KRSX G5CT MVRX EZLU"
    digits: 8
    period: 60
    algorithm: SHA256
  "1004":
    method: totp
    enabled: false              # lost phone
  "1005":
    method: none
  "H2A":
    method: email
    email: bob@example.com
  "1006": {method: totp, secret: GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ}
...
# written by hand, 2025-11-02
"""


def _enrolled(source: YamlSource, names: list[str]) -> dict[str, object]:
    found = {name: source.lookup(name) for name in names}
    return {name: settings.to_dict() for name, settings in found.items() if settings is not None
            and settings.enrolled}


def test_no_prefix_of_a_file_loads_with_fewer_enrolled_extensions(private_dir: Path) -> None:
    """Every prefix of a valid file -- cut at every line and at random bytes -- is refused or
    loads every extension enrolled in the whole file exactly as the whole file does."""
    data = REALISTIC.encode()
    path = private_dir / "extensions.yaml"
    write_yaml(path, REALISTIC)
    names = ["1001", "1002", "1003", "1004", "1005", "h2a", "1006", "1007"]
    whole = _enrolled(YamlSource.load(str(path)), names)
    assert sorted(whole) == ["1001", "1002", "1003", "1006", "h2a"]
    loaded = 0
    for cut in cut_points(data, 176):
        path.write_bytes(data[:cut])
        try:
            source = YamlSource.load(str(path))
        except ConfigError as exc:
            assert "end marker" in exc.reason or f"{path}:" in exc.reason, (cut, exc.reason)
            continue
        loaded += 1
        assert _enrolled(source, names) == whole, cut
    # Only cuts after the end marker load (the whole file less some of its last comment).
    assert 1 <= loaded <= len(b"# written by hand, 2025-11-02\n") + 1


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "extensions:\n", 'extensions:\n  "1001":\n'
                                  "    method: totp\n    secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP\n"])
@pytest.mark.parametrize("in_child", [False, True])
def test_a_file_without_the_end_marker_is_refused_naming_its_last_line(private_dir: Path, text: str,
                                                                       in_child: bool) -> None:
    path = private_dir / "extensions.yaml"
    write_yaml(path, text)
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path), in_child=in_child)
    assert f"{path}:{text.count(chr(10)) + 1}: has no end marker: its last line must be '...'" in caught.value.reason


def test_an_explicit_empty_mapping_is_a_complete_file_with_no_extensions(private_dir: Path) -> None:
    path = private_dir / "extensions.yaml"
    for text in ("extensions: {}\n...\n", "# none yet\nversion: 1\nextensions: {}\n...\n"):
        write_yaml(path, text)
        assert len(YamlSource.load(str(path))) == 0


@pytest.mark.parametrize(("text", "message"), [
    ("---\n...\n", ": is empty: write 'extensions: {}' for a file with no extensions"),
    ("null\n...\n", ": is empty: write 'extensions: {}' for a file with no extensions"),
    ("# none yet\n~\n...\n", ": is empty: write 'extensions: {}' for a file with no extensions"),
    ("version: 1\n...\n", ": has no 'extensions' key: write 'extensions: {}' for a file with no extensions"),
    ("extensions:\n...\n", ":1:1: extensions has no value: write 'extensions: {}' for a file with no extensions"),
    ("version: 1\nextensions: null\n...\n",
     ":2:1: extensions has no value: write 'extensions: {}' for a file with no extensions"),
])
@pytest.mark.parametrize("in_child", [False, True])
def test_a_file_with_the_end_marker_but_no_extensions_mapping_is_refused(private_dir: Path, text: str, message: str,
                                                                         in_child: bool) -> None:
    """Issue 17, tester 3: such a file loaded as "0 extensions", and every wrong code then got PAM_IGNORE."""
    path = private_dir / "extensions.yaml"
    write_yaml(path, text)
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path), in_child=in_child)
    assert caught.value.reason == f"{path}{message}"


@pytest.mark.parametrize("in_child", [False, True])
def test_the_source_counts_its_extensions_and_the_enrolled_ones(private_dir: Path, in_child: bool) -> None:
    """What linkusd's "configuration loaded" line reports, so a drop of enrolled extensions shows."""
    path = private_dir / "extensions.yaml"
    write_yaml(path, REALISTIC)
    source = YamlSource.load(str(path), in_child=in_child)
    assert (len(source), source.enrolled) == (7, 5)


def test_the_chain_summarises_counts_and_flags_a_drop_of_enrolled_extensions(private_dir: Path) -> None:
    from nss_config.chain import SourceChain

    path = private_dir / "extensions.yaml"
    write_yaml(path, REALISTIC)
    full = SourceChain([YamlSource.load(str(path))])
    write_yaml(path, 'extensions:\n  "1001": {method: none}\n...\n')
    fewer = SourceChain([YamlSource.load(str(path))])
    assert full.load_summary(None) == ("extensions=7 enrolled=5", False)
    assert fewer.load_summary(full) == ("extensions=1 enrolled=0 (enrolled dropped from 5)", True)
    assert full.load_summary(fewer) == ("extensions=7 enrolled=5", False)
    assert SourceChain([]).load_summary(full) == ("", False)
