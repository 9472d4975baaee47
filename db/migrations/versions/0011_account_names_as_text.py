"""`accounts.name` becomes unbounded text: a customer's display name is never refused or cut.

Until now it was VARCHAR(300), and nothing upstream limited what reached it: a Stripe customer or
a bundle account with a longer name failed the whole reconciliation that stored it on PostgreSQL
(a DataError), and on SQLite, which does not enforce the length, it was stored and made the
installation's own `export-org` archive one that `import-org` refused. Identifiers keep their
bound (core/model.py MAX_ID_LENGTH) and are refused where they enter, before they reach a table.

- PostgreSQL: one ALTER COLUMN ... TYPE text. VARCHAR to TEXT is binary-coercible, so the table is
  neither rewritten nor re-indexed; row-level security, policies, grants and triggers are untouched.
- SQLite cannot change a column's type: batch mode rebuilds `accounts` with its columns, index,
  unique constraint and foreign key. Migrations run with SQLite foreign keys off
  (db/migrations/env.py), so dropping the old table cascades nothing.

The downgrade restores VARCHAR(300). A longer name would not fit it (PostgreSQL refuses it, and the
earlier `import-org` refuses it on SQLite), so the downgrade first counts them and, if there are
any, fails naming some of their accounts, having changed nothing: shorten those names (or
upgrade again), then downgrade.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

OLD_LENGTH = 300
EXAMPLES = 5  # accounts named when names are too long to downgrade


def _alter_name(new: sa.types.TypeEngine[str], old: sa.types.TypeEngine[str]) -> None:
    with op.batch_alter_table("accounts") as batch:  # PostgreSQL: a plain ALTER TABLE ... ALTER COLUMN
        batch.alter_column("name", type_=new, existing_type=old, existing_nullable=False)


def upgrade() -> None:
    _alter_name(sa.Text(), sa.String(length=OLD_LENGTH))


def downgrade() -> None:
    too_long = f"length(name) > {OLD_LENGTH}"  # characters on both databases
    bind = op.get_bind()
    count = bind.execute(sa.text(f"SELECT count(*) FROM accounts WHERE {too_long}")).scalar_one()
    if count:
        accounts = bind.execute(sa.text(f"SELECT org_id, account_id FROM accounts WHERE {too_long} "
                                        f"ORDER BY org_id, account_id LIMIT {EXAMPLES}")).all()
        named = ", ".join(f"{account_id!r} (org {org_id})" for org_id, account_id in accounts)
        raise RuntimeError(f"the downgrade from migration 0011 makes accounts.name VARCHAR({OLD_LENGTH}) again, "
                           f"but {count} account name(s) are longer; nothing was changed. Shorten the names of "
                           f"{named}{' and others' if count > EXAMPLES else ''}, then downgrade again.")
    _alter_name(sa.String(length=OLD_LENGTH), sa.Text())
