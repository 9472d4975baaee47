"""Cross-tenant access for system sessions without superuser or BYPASSRLS; roles for the login user.

0002 made every tenant table FORCE ROW LEVEL SECURITY, which also binds the table owner. A
superuser (tests, the embedded demo) bypasses that, but a production login role should not be a
superuser, and BYPASSRLS can only be granted by one. So system sessions get their own door: a
NOLOGIN role `rrc_system` and, on every tenant table, a policy that lets members of it through.
The login role is made a member of `rrc_system` (system sessions run as it) and of `rrc_app`
(tenant sessions `SET LOCAL ROLE rrc_app`, which is not a member of `rrc_system`, so only the
per-org policy applies to them). Sequences created by later migrations are granted to `rrc_app`
automatically; tables are not, on purpose: a new tenant table must enable RLS before the app
role may read it.

Roles are cluster-wide, so the downgrade keeps them and drops only what lives in this database.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

APP_ROLE = "rrc_app"
SYSTEM_ROLE = "rrc_system"
TABLES = (
    "organizations", "users", "integrations", "org_settings", "accounts", "recon_runs", "anomalies", "actions",
    "audit_log", "api_keys", "usage_events",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""DO $$ BEGIN
        CREATE ROLE {SYSTEM_ROLE} NOLOGIN;
    EXCEPTION WHEN duplicate_object THEN NULL;
    END $$""")
    for role in (APP_ROLE, SYSTEM_ROLE):
        op.execute(f"""DO $$ BEGIN
            IF NOT pg_has_role(current_user, '{role}', 'MEMBER') THEN
                EXECUTE format('GRANT {role} TO %I', current_user);
            END IF;
        END $$""")
    for table in TABLES:
        op.execute(f"CREATE POLICY system_access ON {table} TO {SYSTEM_ROLE} USING (true) WITH CHECK (true)")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE USAGE, SELECT ON SEQUENCES FROM {APP_ROLE}")
    for table in TABLES:
        op.execute(f"DROP POLICY IF EXISTS system_access ON {table}")
