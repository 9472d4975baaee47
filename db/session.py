"""Engines and sessions: the embedded SQLite default, PostgreSQL in production, tenant scoping.

`org_session(org_id)` is how services touch tenant data. Every one of its transactions is scoped
to that org twice: in Python (db/tenancy.py adds `org_id = :org` to every ORM query and refuses
to flush another org's rows) and, on PostgreSQL, in the database (`app.current_org` is set and the
transaction switches to the unprivileged role `rrc_app`, so the row-level security policies of
the migrations apply even to raw SQL). `system_session()` is for the few cross-tenant jobs (login
lookup by email, the scheduler listing organizations, creating an organization): it runs as the
connecting role, which the policies let through (superuser in tests, member of `rrc_system` in
production; see docs/database.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import tenancy

APP_ROLE = tenancy.APP_ROLE
MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def data_dir() -> Path:
    """Where the embedded defaults live (SQLite file, generated keys, demo bundle): `RRC_DATA_DIR` or ./data."""
    path = Path(os.environ.get("RRC_DATA_DIR") or "data")  # empty means the default, as in config.Settings
    path.mkdir(parents=True, exist_ok=True)
    return path


def normalize_url(url: str) -> str:
    """Send every PostgreSQL URL through psycopg 3 (the only PostgreSQL driver we ship).

    Hosting providers hand out `postgres://` and `postgresql://` URLs; SQLAlchemy would map both
    to psycopg2, which is not installed.
    """
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def database_url() -> str:
    """`DATABASE_URL`, else the embedded SQLite file under ./data/ (created on first use)."""
    url = os.environ.get("DATABASE_URL")
    return normalize_url(url) if url else f"sqlite:///{data_dir() / 'rrc.db'}"


def is_embedded(url: str | None = None) -> bool:
    """True for SQLite: no server, no RLS, secrets key may live next to the database file."""
    return (url or database_url()).startswith("sqlite")


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    """WAL lets the app read while the scheduler writes; SQLite leaves foreign keys off unless asked."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


@cache
def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL for the whole process (the URL is resolved first, so env changes are seen)."""
    return _engine(normalize_url(url) if url else database_url())


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _ensure_sqlite_folder(url: str) -> None:
    """SQLite creates the file but not its folder: make `DATABASE_URL=sqlite:///new/dir/x.db` just work."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Run the Alembic migrations (the app on start, CLI `db upgrade` and tests all come through here)."""
    url = normalize_url(url) if url else database_url()
    _ensure_sqlite_folder(url)
    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Undo migrations down to `revision` (tests, and a way back from a bad deploy)."""
    command.downgrade(_alembic_config(normalize_url(url) if url else database_url()), revision)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at (None when never migrated)."""
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest migration shipped with this code."""
    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def is_current(url: str | None = None) -> bool:
    """True when the database is reachable and at the newest migration (the API's /ready check)."""
    try:
        return current_revision(url) == head_revision()
    except OperationalError:
        return False


@cache
def _session_factory(url: str, tenant: bool) -> sessionmaker[Session]:
    factory = sessionmaker(_engine(url), expire_on_commit=False)
    if tenant:
        tenancy.install(factory)
    return factory


@contextmanager
def _transaction(session: Session) -> Iterator[Session]:
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def org_session(org_id: int, url: str | None = None) -> Iterator[Session]:
    """A session whose every transaction sees and writes only `org_id`'s rows; commits on success."""
    if isinstance(org_id, bool) or not isinstance(org_id, int) or org_id <= 0:
        raise ValueError(f"org_session needs a positive integer org id, got {org_id!r}")
    session = _session_factory(normalize_url(url) if url else database_url(), True)(info={tenancy.ORG_KEY: org_id})
    with _transaction(session) as scoped:
        yield scoped


@contextmanager
def system_session(url: str | None = None) -> Iterator[Session]:
    """Cross-tenant session (not scoped, not subject to RLS): keep its uses few and obvious."""
    session = _session_factory(normalize_url(url) if url else database_url(), False)()
    with _transaction(session) as unscoped:
        yield unscoped


def serialize_per_org(session: Session, name: str, org_id: int) -> None:
    """Make concurrent transactions doing `name` for `org_id` run one after the other.

    PostgreSQL: a transaction-scoped advisory lock keyed by (name, org). SQLite: take the
    database's single write lock now (a write that touches no row), so what the caller reads
    next is the latest committed state and no other writer can interleave before commit.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name), :org)"), {"name": name, "org": org_id})
    else:
        session.execute(text("UPDATE organizations SET id = id WHERE 0 = 1"))

