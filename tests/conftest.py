"""Shared pytest fixtures: the PostgreSQL URL and the rule that CI never skips PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a reachable PostgreSQL; skips locally when absent, fails when REQUIRE_POSTGRES=1."""
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_PG_URL)
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (REQUIRE_POSTGRES=1) but unreachable at {url}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {url} (set REQUIRE_POSTGRES=1 to fail instead)")
    return url


@pytest.fixture
def fresh_pg_url(pg_url: str) -> Iterator[str]:
    """A brand-new PostgreSQL database for one test, dropped afterwards."""
    name = f"rrc_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    yield url
    from db.session import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The app database migrated to head, on the embedded SQLite default and on PostgreSQL."""
    from db.session import upgrade

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("RRC_DATA_DIR", str(tmp_path / "data"))
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'rrc.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
        monkeypatch.setenv("RRC_SECRET_KEYS", Fernet.generate_key().decode())
    monkeypatch.setenv("DATABASE_URL", url)
    upgrade(url)
    return url
