"""Sign-in lockout for emails without an account: `sign_in_throttle`; failures are forgotten after a day.

Until now only a real account was locked after 5 failed sign-ins, so "too many failed sign-ins"
told an attacker which emails have an account. `sign_in_throttle` counts the failures of an email
with no account by the same rule (services/users.py). It is keyed by the SHA-256 of the normalised
email, never the email itself, and is not a tenant table: emails are unique across organizations
(users.email), and only system sessions (the connecting role, which owns the table) read or write
it. So, like 0004's `apscheduler_jobs`, no row-level security and no grant to `rrc_app`: a tenant
session has no business with it.

Rows are pruned as failures are written once their last failure is a day old and their lock is
over. For that not to be a difference an attacker could time, an account forgets its failures by
the same rule: `users.last_failed_at` records its latest failure, and the count starts again when
that is a day old (NULL, as for every user at this migration, counts as old: at most four stale
failures are forgotten once).

The downgrade drops the table and the column.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLE = "sign_in_throttle"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("email_sha256", sa.String(length=64), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("email_sha256"),
    )
    op.create_index(f"ix_{TABLE}_last_failed_at", TABLE, ["last_failed_at"])
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("last_failed_at")
    op.drop_index(f"ix_{TABLE}_last_failed_at", table_name=TABLE)
    op.drop_table(TABLE)
