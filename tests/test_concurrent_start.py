"""Processes that start together (app, API, `db prepare`) may prepare one PostgreSQL database at once."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

import core.demo as demo_module
from core.demo import generate_demo_bundle
from db.session import is_current

ROOT = Path(__file__).resolve().parents[1]


def run_together(script: str, url: str, data: Path, processes: int = 3) -> list[str]:
    """Start `processes` interpreters on `script` at once, sharing one data folder as the app and the API of one
    install do; the stderr of those that fail."""
    env = {**os.environ, "DATABASE_URL": url, "RRC_SECRET_KEYS": Fernet.generate_key().decode(),
           "RRC_DATA_DIR": str(data)}
    started = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                env=env) for _ in range(processes)]
    outcomes = [(p.communicate(timeout=180)[1], p.returncode) for p in started]
    return [err for err, code in outcomes if code != 0]


@pytest.mark.postgres
def test_concurrent_upgrades_of_one_database_all_succeed(fresh_pg_url: str, tmp_path: Path) -> None:
    """Without the advisory lock in db/migrations/env.py the later upgrades fail on what the first created."""
    assert run_together("from db.session import upgrade; upgrade()", fresh_pg_url, tmp_path) == []
    assert is_current(fresh_pg_url)


@pytest.mark.postgres
def test_concurrent_first_starts_seed_one_demo(fresh_pg_url: str, tmp_path: Path) -> None:
    """The loser of the race for the demo's slug finds the winner's organization instead of failing its start (the
    processes share the data folder and its demo bundle; test_demo_files_are_replaced_whole covers the files)."""
    script = "from services.demo import prepare_first_start; prepare_first_start()"
    assert run_together(script, fresh_pg_url, tmp_path) == []
    engine = sa.create_engine(fresh_pg_url)  # the cluster's superuser: row-level security does not apply
    with engine.connect() as conn:
        orgs = conn.execute(sa.text("SELECT slug FROM organizations")).scalars().all()
        emails = conn.execute(sa.text("SELECT email FROM users ORDER BY email")).scalars().all()
    engine.dispose()
    assert orgs == ["demo"] and emails == ["admin@demo.example", "analyst@demo.example"]


def test_demo_files_are_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle being rewritten (another process seeding) keeps its previous files complete until each new one is
    whole: a write that stops half-way leaves the old file and no scratch file behind."""
    generate_demo_bundle(tmp_path, accounts=12, seed=3)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    real_writer = csv.writer

    def failing_writer(handle: Any, *args: Any, **kwargs: Any) -> Any:
        writer = real_writer(handle, *args, **kwargs)

        class HalfWay:
            def writerow(self, row: Any) -> Any:
                return writer.writerow(row)

            def writerows(self, rows: Any) -> None:
                handle.write("acct_0001,half a line")
                raise OSError("disk full")

        return HalfWay()

    monkeypatch.setattr(demo_module.csv, "writer", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        generate_demo_bundle(tmp_path, accounts=12, seed=3)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
