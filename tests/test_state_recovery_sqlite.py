"""The enrolment/recovery-code contract on the SQLite store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from state_recovery_contract import EnrolmentRecoveryContract

from pam_linkus.state.sqlite_store import SqliteStore


class TestSqliteEnrolmentRecovery(EnrolmentRecoveryContract):
    @pytest.fixture
    def opener(self, private_dir: Path) -> Callable[[], Any]:
        path = str(private_dir / "state.db")
        return lambda: SqliteStore(path)
