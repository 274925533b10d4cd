"""The SQLite store passes the StateStore contract (tests/state_contract.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from state_contract import Opener, StateContract

from pam_linkus.state.sqlite_store import SqliteStore


class TestSqliteState(StateContract):
    @pytest.fixture
    def opener(self, private_dir: Path) -> Opener:
        path = str(private_dir / "state.db")
        return lambda: SqliteStore(path)

    @pytest.fixture
    def unavailable_opener(self, private_dir: Path) -> Opener:
        # A state directory others may write to: the store refuses it rather than trust it.
        shared = private_dir / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        path = str(shared / "state.db")
        return lambda: SqliteStore(path)
