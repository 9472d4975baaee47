"""Audit chain heads: one sealed (org_id, seq, hash) per organization, backfilled from the log.

A hash chain cannot show that its newest entries were deleted; `audit_heads` records the newest
entry of each org's chain, written by every append, and `mac` seals it with a key derived from
RRC_SECRET_KEYS (services/audit.py). The backfill anchors each existing chain at its newest entry
*as it is now*: entries deleted before this migration ran cannot be noticed later.

Sealing needs the secret keys, as the app does: RRC_SECRET_KEYS on PostgreSQL, the generated key
file of the data folder on the embedded SQLite default. A database without audit entries (a new
install) needs no key here.

On PostgreSQL the table gets the tenant treatment of 0002/0003 (RLS forced, the per-org policy,
the rrc_system policy) and, like audit_log, a guard: `rrc_app` may insert and update but not
delete, and a trigger refuses deleting a head, moving it to another org or moving it backwards,
whoever asks (an owner must disable the trigger first).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

APP_ROLE = "rrc_app"
SYSTEM_ROLE = "rrc_system"
CURRENT_ORG = "nullif(current_setting('app.current_org', true), '')::int"


def _backfill() -> None:
    bind = op.get_bind()
    newest = bind.execute(sa.text(
        "SELECT a.org_id, a.seq, a.hash FROM audit_log a JOIN "
        "(SELECT org_id, max(seq) AS seq FROM audit_log GROUP BY org_id) m ON a.org_id = m.org_id AND a.seq = m.seq "
        "ORDER BY a.org_id")).all()
    if not newest:
        return
    from services.audit import seal  # only when there is something to seal: it needs the secret keys

    bind.execute(sa.text("INSERT INTO audit_heads (org_id, seq, hash, mac) VALUES (:org_id, :seq, :hash, :mac)"),
                 [{"org_id": org_id, "seq": seq, "hash": hash_, "mac": seal(org_id, seq, hash_)}
                  for org_id, seq, hash_ in newest])


def upgrade() -> None:
    op.create_table(
        "audit_heads",
        sa.Column("org_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("mac", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("org_id"),
    )
    _backfill()
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON audit_heads TO {APP_ROLE}")
    op.execute("ALTER TABLE audit_heads ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE audit_heads FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON audit_heads "
               f"USING (org_id = {CURRENT_ORG}) WITH CHECK (org_id = {CURRENT_ORG})")
    op.execute(f"CREATE POLICY system_access ON audit_heads TO {SYSTEM_ROLE} USING (true) WITH CHECK (true)")
    op.execute("""CREATE OR REPLACE FUNCTION rrc_audit_heads_forward_only() RETURNS trigger AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN RAISE EXCEPTION 'audit_heads: a chain head is never deleted'; END IF;
            IF NEW.org_id <> OLD.org_id OR NEW.seq < OLD.seq THEN
                RAISE EXCEPTION 'audit_heads: a chain head only moves forward';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""")
    op.execute("""CREATE TRIGGER audit_heads_forward_only BEFORE UPDATE OR DELETE ON audit_heads
        FOR EACH ROW EXECUTE FUNCTION rrc_audit_heads_forward_only()""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_heads_forward_only ON audit_heads")
        op.execute("DROP FUNCTION IF EXISTS rrc_audit_heads_forward_only()")
        op.execute("DROP POLICY IF EXISTS system_access ON audit_heads")
        op.execute("DROP POLICY IF EXISTS tenant_isolation ON audit_heads")
        op.execute(f"REVOKE ALL ON audit_heads FROM {APP_ROLE}")
    op.drop_table("audit_heads")
