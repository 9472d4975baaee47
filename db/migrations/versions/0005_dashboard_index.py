"""A covering index for the dashboard and the anomaly queue's counts.

The Overview groups anomalies by type, status, currency, month, product, confidence and account.
Anomaly rows carry their daily evidence (kilobytes of JSON), so a scan of the table reads far
more than it needs; with every grouped and filtered column in one index, SQLite and PostgreSQL
answer those queries from the index alone (measured in docs/performance.md).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ["org_id", "status", "type", "currency", "period_start", "product_key", "account_id", "confidence",
           "leak_amount", "overbilled_amount"]


def upgrade() -> None:
    op.create_index("ix_anomalies_dashboard", "anomalies", COLUMNS)


def downgrade() -> None:
    op.drop_index("ix_anomalies_dashboard", table_name="anomalies")
