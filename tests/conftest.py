"""Shared pytest fixtures: PostgreSQL URL (CI never skips it), the migrated app database, an organization."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

if TYPE_CHECKING:
    from services.context import Actor

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# bcrypt's cheapest cost for every hash the tests make, here and in the servers they start (the
# production default of 12 spends a quarter of a second per user; the cost is a setting, not a code path).
os.environ.setdefault("RRC_BCRYPT_ROUNDS", "4")
os.environ.setdefault("RRC_PRIVATE_ENDPOINTS", "127.0.0.1")  # the fake servers and PostgreSQL of the tests


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
    _create_cluster_roles_once(url)
    return url


def _create_cluster_roles_once(pg_url: str) -> None:
    """Migrate one scratch database while holding a lock file, so the roles the migrations create are there
    before parallel test workers (pytest-xdist) migrate their own databases at the same time.

    Roles are shared by every database of a cluster; two workers creating them at once on a new cluster
    would collide in the catalogue. Once they exist this costs one query.
    """
    if _cluster_roles_exist(pg_url):
        return
    from db.session import upgrade

    lock = Path(tempfile.gettempdir()) / "rrc-test-pg-roles.lock"
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _cluster_roles_exist(pg_url):  # another worker made them while this one waited
            return
        scratch = _create_database(pg_url, f"rrc_roles_{uuid.uuid4().hex[:12]}")
        try:
            upgrade(scratch)
        finally:
            _drop_database(pg_url, scratch)


def _cluster_roles_exist(pg_url: str) -> bool:
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT count(*) FROM pg_roles WHERE rolname IN ('rrc_app', 'rrc_system')"))
        exist = found.scalar() == 2
    engine.dispose()
    return exist


def _create_database(pg_url: str, name: str, template: str | None = None) -> str:
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    admin.dispose()
    return sa.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(pg_url: str, url: str) -> None:
    from db.session import get_engine

    get_engine(url).dispose()
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def fresh_pg_url(pg_url: str) -> Iterator[str]:
    """A brand-new, empty PostgreSQL database for one test, dropped afterwards."""
    url = _create_database(pg_url, f"rrc_test_{uuid.uuid4().hex[:12]}")
    yield url
    _drop_database(pg_url, url)


@pytest.fixture(scope="session")
def migrated_pg_template(pg_url: str) -> Iterator[str]:
    """A PostgreSQL database migrated to head once per test session, cloned for each test.

    CREATE DATABASE ... TEMPLATE copies it in a fraction of the time the migrations take; the
    migrations themselves are still run from scratch by tests/test_db.py.
    """
    from db.session import upgrade

    url = _create_database(pg_url, f"rrc_template_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    from db.session import get_engine

    get_engine(url).dispose()
    yield sa.engine.make_url(url).database or ""
    _drop_database(pg_url, url)


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded database migrated to head once per test session; each test copies the file."""
    from db.session import get_engine, upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "rrc.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    get_engine(url).dispose()  # checkpoints the WAL into the file
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app database migrated to head, on the embedded SQLite default and on PostgreSQL."""
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("RRC_DATA_DIR", str(tmp_path / "data"))
    if request.param == "sqlite":
        path = tmp_path / "data" / "rrc.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite_template"), path)
        url = f"sqlite:///{path}"
        monkeypatch.setenv("DATABASE_URL", url)
        yield url
        return
    pg = request.getfixturevalue("pg_url")
    url = _create_database(pg, f"rrc_test_{uuid.uuid4().hex[:12]}", request.getfixturevalue("migrated_pg_template"))
    monkeypatch.setenv("RRC_SECRET_KEYS", Fernet.generate_key().decode())
    monkeypatch.setenv("DATABASE_URL", url)
    yield url
    _drop_database(pg, url)


@pytest.fixture
def org(app_db: str) -> tuple[Actor, Actor]:
    """An organization "acme" with an admin and an analyst: (admin, analyst)."""
    from services import users
    from services.context import Actor

    organization, admin = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin_actor = Actor.user(organization.id, admin.id, "admin")
    analyst = users.create_user(admin_actor, "analyst@acme.example", "Al", "analyst", "password-2")
    return admin_actor, Actor.user(organization.id, analyst.id, "analyst")
