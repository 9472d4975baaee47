"""`users.sessions_valid_after`: a deactivation or a password change ends every session of the user for good.

Until now a REST API token (services/api_keys.py) and the app's remember-me cookie were refused only
while their user was inactive: reactivating the user brought back every token and cookie issued
before the deactivation, and a password change ended none of them. The new column (timestamptz,
NULL: nothing revoked) is set to now on deactivation and on a password change (services/users.py),
and a token or cookie issued before it is refused, whatever happens to the user later.

Users who are inactive at this upgrade get the upgrade's time: their tokens and cookies predate it,
so a later reactivation does not bring them back either. Everyone else keeps NULL.

- PostgreSQL: one ALTER TABLE ... ADD COLUMN of a nullable column without a default, which neither
  rewrites nor re-indexes the table; row-level security, policies and grants (table-wide, 0002/0003)
  cover the new column as they stand. No CHECK constraint: any instant is a valid cut-off.
- SQLite: batch mode adds the column with ALTER TABLE ... ADD COLUMN as well (no rebuild).

The downgrade drops the column: from then on a reactivation brings old tokens and cookies back again.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COLUMN = "sessions_valid_after"


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column(COLUMN, sa.DateTime(timezone=True), nullable=True))
    bind = op.get_bind()
    now = datetime.now(UTC)
    if bind.dialect.name == "sqlite":  # stored without an offset, as db.models.UTCDateTime writes it
        now = now.replace(tzinfo=None)
    users = sa.table("users", sa.column("active", sa.Boolean()), sa.column(COLUMN, sa.DateTime(timezone=True)))
    bind.execute(users.update().where(users.c.active == sa.false()).values({COLUMN: now}))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column(COLUMN)
