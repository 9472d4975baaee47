"""Processes that start together (app, API, `db prepare`) may prepare one PostgreSQL database at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from db.session import is_current

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[1]


def run_together(script: str, url: str, tmp_path: Path, processes: int = 3) -> list[str]:
    """Start `processes` interpreters on `script` at once (each with its own data folder); their stderr if they fail."""
    env = {**os.environ, "DATABASE_URL": url, "RRC_SECRET_KEYS": Fernet.generate_key().decode()}
    started = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                env={**env, "RRC_DATA_DIR": str(tmp_path / f"data-{n}")}) for n in range(processes)]
    outcomes = [(p.communicate(timeout=180)[1], p.returncode) for p in started]
    return [err for err, code in outcomes if code != 0]


def test_concurrent_upgrades_of_one_database_all_succeed(fresh_pg_url: str, tmp_path: Path) -> None:
    """Without the advisory lock in db/migrations/env.py the later upgrades fail on what the first created."""
    assert run_together("from db.session import upgrade; upgrade()", fresh_pg_url, tmp_path) == []
    assert is_current(fresh_pg_url)


def test_concurrent_first_starts_seed_one_demo(fresh_pg_url: str, tmp_path: Path) -> None:
    """The loser of the race for the demo's slug finds the winner's organization instead of failing its start."""
    script = "from services.demo import prepare_first_start; prepare_first_start()"
    assert run_together(script, fresh_pg_url, tmp_path) == []
    engine = sa.create_engine(fresh_pg_url)  # the cluster's superuser: row-level security does not apply
    with engine.connect() as conn:
        orgs = conn.execute(sa.text("SELECT slug FROM organizations")).scalars().all()
        emails = conn.execute(sa.text("SELECT email FROM users ORDER BY email")).scalars().all()
    engine.dispose()
    assert orgs == ["demo"] and emails == ["admin@demo.example", "analyst@demo.example"]
