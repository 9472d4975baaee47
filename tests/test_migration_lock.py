"""Processes that start together (app, API, `db prepare`) may migrate one PostgreSQL database at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from db.session import is_current

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]


def test_concurrent_upgrades_of_one_database_all_succeed(fresh_pg_url: str) -> None:
    """Without the advisory lock in db/migrations/env.py the later upgrades fail on what the first created."""
    script = "import sys; from db.session import upgrade; upgrade(sys.argv[1])"
    processes = [subprocess.Popen([sys.executable, "-c", script, fresh_pg_url], cwd=ROOT, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    outcomes = [(p.communicate(timeout=120)[1], p.returncode) for p in processes]
    assert [err for err, code in outcomes if code != 0] == []
    assert is_current(fresh_pg_url)
