"""Alembic environment: migrations run against the URL db.session passes, else DATABASE_URL.

`db.session.upgrade()` (app start, CLI `db upgrade`, tests) sets the URL explicitly; the bare
`alembic` command line (e.g. `alembic revision --autogenerate`) falls back to `DATABASE_URL` or
the embedded SQLite default, so both always agree on which database they migrate.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from db.models import Base
from db.session import database_url

config = context.config
if config.config_file_name is not None:  # the `alembic` command line: use alembic.ini's logging
    fileConfig(config.config_file_name)
target_metadata = Base.metadata


# pg_advisory_xact_lock key ("rrc-migr" in ASCII): the app, the API and `cli.py db prepare` all migrate on
# start, so two processes may upgrade one database at once; the second waits here, then reads the
# version the first one committed and has nothing left to do.
MIGRATION_LOCK = 0x7272632D6D696772


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or database_url()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        # Own engine without db.session's pragmas: SQLite foreign keys stay off while batch mode
        # recreates tables, so a table copy never cascades deletes into its children.
        connectable = create_engine(_url(), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          compare_type=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
