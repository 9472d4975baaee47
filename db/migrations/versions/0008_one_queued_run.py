"""One queued run per organization, guaranteed by the database: `ux_recon_runs_one_queued`.

`services.reconciliation.queue_run` returns the run an org already has waiting instead of queuing
another, and takes the per-org lock before it looks, so concurrent requests take turns. The
partial unique index on `recon_runs(org_id) WHERE status = 'queued'` (SQLite and PostgreSQL both
have partial indexes, as 0004's `ux_recon_runs_one_running`) is the backstop: any writer that
skips the lock (a script, another version of the app) gets an error instead of a second queued
run. Moving a run on (queued -> running -> finished) only frees the slot, so the worker's claim
never conflicts with it.

Existing duplicates are collapsed first, or the index could not be built: per org the oldest queued
run stays (the one `queue_run` has been returning, so the one the app and API callers were shown)
and the younger ones are deleted. They never started, so nothing refers to them and they carry no
result; kept as "failed" they would have shown as the organization's last run on the Overview. A
run waiting twice would only have reconciled the same data again; their "run.queued" audit entries
stay. On PostgreSQL the table is locked against writes first, so a process of the previous version
cannot queue a duplicate between the clean-up and the index. The downgrade drops the index.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEX = "ux_recon_runs_one_queued"
QUEUED = sa.text("status = 'queued'")


def _collapse_duplicates() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("LOCK TABLE recon_runs IN SHARE ROW EXCLUSIVE MODE")
    runs = sa.table("recon_runs", sa.column("id"), sa.column("org_id"), sa.column("status"))
    older = runs.alias("older")
    has_older = sa.exists().where(older.c.org_id == runs.c.org_id, older.c.status == "queued",
                                  older.c.id < runs.c.id)
    op.execute(runs.delete().where(runs.c.status == "queued", has_older))


def upgrade() -> None:
    _collapse_duplicates()
    op.create_index(INDEX, "recon_runs", ["org_id"], unique=True, sqlite_where=QUEUED, postgresql_where=QUEUED)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="recon_runs")
