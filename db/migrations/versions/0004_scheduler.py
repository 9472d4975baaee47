"""Scheduler: APScheduler's job store table; at most one running reconciliation per organization.

- `apscheduler_jobs` is the table APScheduler's SQLAlchemyJobStore expects (same columns, so the
  store's own `create(checkfirst=True)` finds it and does nothing). It lives in the app database
  so schedules and their next fire times survive a restart. It holds no tenant data (job ids and
  pickled triggers keyed by org id) and only the scheduler's system connection uses it, so no
  row-level security and no grant to `rrc_app`.
- `ux_recon_runs_one_running`: a partial unique index on `recon_runs(org_id) WHERE status =
  'running'`. This is the database's own guarantee that two workers (two scheduler processes, or
  the scheduler and the CLI) never run one organization at once: the second claim fails instead
  of overlapping. A run whose worker died keeps the slot until the scheduler marks it
  interrupted after the heartbeat timeout. Both SQLite and PostgreSQL support partial indexes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JOBS_TABLE = "apscheduler_jobs"


def upgrade() -> None:
    op.create_table(
        JOBS_TABLE,
        sa.Column("id", sa.Unicode(191), primary_key=True),
        sa.Column("next_run_time", sa.Float(25), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
    )
    op.create_index(f"ix_{JOBS_TABLE}_next_run_time", JOBS_TABLE, ["next_run_time"])
    op.create_index("ux_recon_runs_one_running", "recon_runs", ["org_id"], unique=True,
                    sqlite_where=sa.text("status = 'running'"), postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_index("ux_recon_runs_one_running", table_name="recon_runs")
    op.drop_index(f"ix_{JOBS_TABLE}_next_run_time", table_name=JOBS_TABLE)
    op.drop_table(JOBS_TABLE)
