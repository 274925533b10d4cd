"""The YAML source against the shared source contract (tests/source_contract.py)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import write_yaml
from source_contract import MakeSource, SourceContract

from nss_config.yaml_source import YamlSource
from pam_linkus.errors import ConfigError, SourceUnavailable


class TestYamlSource(SourceContract):
    source_name = "yaml"

    @pytest.fixture
    def make_source(self, private_dir: Path) -> MakeSource:
        def make(entries: dict[str, dict[str, Any]]) -> YamlSource:
            path = private_dir / f"extensions-{secrets.token_hex(3)}.yaml"
            write_yaml(path, {"extensions": entries})
            return YamlSource(str(path))

        return make


def test_two_keys_differing_only_by_case_refuse_the_file_with_its_position(private_dir: Path) -> None:
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {"h1a": {"method": "none"}, "H1A": {"method": "none"}}})
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path))
    assert f"{path}:4:3" in caught.value.reason and "case" in caught.value.reason


def test_a_key_with_surrounding_spaces_refuses_the_file(private_dir: Path) -> None:
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {" 1001": {"method": "none"}}})
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path))
    assert f"{path}:2:3" in caught.value.reason


def test_a_loaded_source_does_not_see_later_edits(private_dir: Path) -> None:
    """linkusd builds a new snapshot aside; the old one answers unchanged meanwhile."""
    path = private_dir / "extensions.yaml"
    write_yaml(path, {"extensions": {"1001": {"method": "none"}}})
    old = YamlSource.load(str(path))
    write_yaml(path, {"extensions": {"1002": {"method": "none"}}})
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
    }})
    here, there = YamlSource.load(str(path), in_child=False), YamlSource.load(str(path), in_child=True)
    for name in ("alice", "ALICE", "1002", "old", "nobody"):
        a, b = here.lookup(name), there.lookup(name)
        assert (a.to_dict() if a else None) == (b.to_dict() if b else None), name
    assert there.lookup("alice").account == "Alice"  # type: ignore[union-attr]


def test_a_child_reports_a_broken_file_with_its_position_and_no_value(private_dir: Path) -> None:
    path = private_dir / "ext.yaml"
    write_yaml(path, 'extensions:\n  "1001": {method: totp, secret: "QZ7MSECRETVALUE"}\n  "1002": {method: carrier}\n')
    with pytest.raises(ConfigError) as caught:
        YamlSource.load(str(path), in_child=True)
    assert f"{path}:" in str(caught.value) and "QZ7M" not in str(caught.value)


def test_a_large_file_goes_to_a_child(private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nss_config.yaml_source as ys

    path = private_dir / "ext.yaml"
    write_yaml(path, {"extensions": {f"e{i}": {"method": "none"} for i in range(50)}})
    calls: list[str] = []
    monkeypatch.setattr(ys, "CHILD_THRESHOLD", 10)
    monkeypatch.setattr(ys, "load_in_child", lambda p: calls.append(p) or {})
    YamlSource.load(str(path))
    assert calls == [str(path)]


def test_a_child_names_the_line_and_column_of_a_refused_entry(private_dir: Path) -> None:
    """The position is worked out only for a refused entry: still the entry's own."""
    path = private_dir / "ext.yaml"
    write_yaml(path, 'extensions:\n  "1001": {method: none}\n  "1002": {method: totp}\n')
    for in_child in (False, True):
        with pytest.raises(ConfigError, match="needs a secret") as caught:
            YamlSource.load(str(path), in_child=in_child)
        assert f"{path}:3:3" in str(caught.value), in_child


def test_a_released_large_source_is_unavailable_never_not_here(private_dir: Path) -> None:
    """A retired snapshot frees its entries (``close``); a lookup that still reached it must
    not read "not here" (the chain would go on, a policy could skip the second factor)."""
    path = private_dir / "ext.yaml"
    write_yaml(path, {"extensions": {"1001": {"method": "totp", "secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}}})
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
