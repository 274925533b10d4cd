"""The YAML source against the shared source contract (tests/source_contract.py)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import write_yaml
from source_contract import MakeSource, SourceContract

from nss_config.yaml_source import YamlSource


class TestYamlSource(SourceContract):
    source_name = "yaml"

    @pytest.fixture
    def make_source(self, private_dir: Path) -> MakeSource:
        def make(entries: dict[str, dict[str, Any]]) -> YamlSource:
            path = private_dir / f"extensions-{secrets.token_hex(3)}.yaml"
            write_yaml(path, {"extensions": entries})
            return YamlSource(str(path))

        return make
