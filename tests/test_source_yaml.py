"""The YAML source against the shared source contract (tests/source_contract.py)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import write_yaml
from source_contract import MakeSource, SourceContract

from nss_config.yaml_source import YamlSource
from pam_linkus.errors import ConfigError


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
