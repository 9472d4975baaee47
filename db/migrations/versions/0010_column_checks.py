"""CHECK constraints on enumerated and bounded columns: the database refuses what the app cannot show.

Until now any text fitted `users.role` or `anomalies.status`, and any number `leak_amount`: a
script, another version of the app or an edited `import-org` archive could store a user with role
"owner", an anomaly with status "paid", a negative leak or a confidence of 7, which the app then
mis-renders or mis-counts. Each such column gets a constraint `ck_<table>_<column>` (db/models.py
builds the same ones from its vocabularies): the enumerated ones (roles, integration kinds and
statuses, schedule kinds, run statuses and triggers, anomaly types, severities and statuses,
action kinds and statuses) and the numbers that are never negative (leak and over-billed amounts,
units, action amounts, failed sign-in counts), with confidence and run progress at most 1.
Expected and billed amounts stay free (invoice lines may be credits), and so do the thresholds of
org_settings, which a run checks before it uses them.

The conditions are written out here as they are at this revision, not imported: a migration is
history, and changing a vocabulary later takes a migration of its own (tests/test_db_constraints.py
fails while the models and the migrated database disagree).

Rows that break a rule are not altered: the upgrade first counts them and, if there are any,
fails naming table, column, how many rows and some of their values, having changed nothing.
Fix or delete them, then upgrade again.

- PostgreSQL: the tables are locked (ACCESS EXCLUSIVE, which adding a constraint takes anyway, so
  nothing is written between the count and the constraint, and no lock is upgraded mid-way), then
  one ALTER TABLE per table adds all its constraints in a single scan. NOT VALID + VALIDATE would
  only shorten the strong lock if the two ran in separate transactions; the upgrade runs in one.
  Row-level security, policies, grants and triggers are untouched (no table is rebuilt).
- SQLite cannot add a constraint to a table: batch mode rebuilds each table with its columns,
  indexes (the partial unique indexes of 0004 and 0008 included) and foreign keys.

The downgrade drops the constraints.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

EXAMPLES = 5  # values named per column when existing rows break a rule


def _one_of(column: str, *values: str) -> str:
    listed = ", ".join(f"'{value}'" for value in values)
    return f'"{column}" IN ({listed})'


def _at_least_zero(column: str, at_most: str = "") -> str:
    return f'"{column}" >= 0' + (f' AND "{column}" <= {at_most}' if at_most else "")


CHECKS: dict[str, dict[str, str]] = {  # table -> column -> condition
    "users": {"role": _one_of("role", "admin", "analyst"), "failed_logins": _at_least_zero("failed_logins")},
    "sign_in_throttle": {"failed_logins": _at_least_zero("failed_logins")},
    "integrations": {
        "kind": _one_of("kind", "stripe", "salesforce", "hubspot", "sql_source", "s3_parquet"),
        "status": _one_of("status", "unchecked", "ok", "error"),
    },
    "org_settings": {"schedule_kind": _one_of("schedule_kind", "off", "cron", "interval")},
    "recon_runs": {
        "status": _one_of("status", "queued", "running", "succeeded", "failed", "interrupted"),
        "trigger": _one_of("trigger", "manual", "schedule", "api", "cli"),
        "progress": _at_least_zero("progress", "1"),
    },
    "anomalies": {
        "type": _one_of("type", "unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage",
                        "over_billing"),
        "severity": _one_of("severity", "low", "medium", "high", "critical"),
        "status": _one_of("status", "open", "dismissed", "actioned", "recovered", "resolved"),
        "confidence": _at_least_zero("confidence", "1"),
        "actual_units": _at_least_zero("actual_units"),
        "reported_units": _at_least_zero("reported_units"),
        "leak_units": _at_least_zero("leak_units"),
        "leak_amount": _at_least_zero("leak_amount"),
        "overbilled_amount": _at_least_zero("overbilled_amount"),
    },
    "actions": {
        "kind": _one_of("kind", "draft_invoice", "salesforce_task", "hubspot_task"),
        "status": _one_of("status", "pending", "succeeded", "failed"),
        "amount": _at_least_zero("amount"),
    },
    "usage_events": {"units": _at_least_zero("units")},
}


def _name(table: str, column: str) -> str:
    """The full name, marked final (op.f) so the models' naming convention does not prefix it again."""
    return op.f(f"ck_{table}_{column}")


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _violations() -> list[str]:
    """One line per column whose existing rows break its rule: table.column, count, some values."""
    bind = op.get_bind()
    problems = []
    for table, conditions in CHECKS.items():  # one scan per table counts the breaches of each of its rules
        counted = ", ".join(f"count(*) FILTER (WHERE NOT ({condition}))" for condition in conditions.values())
        counts = bind.execute(sa.text(f"SELECT {counted} FROM {table}")).one()
        for (column, condition), count in zip(conditions.items(), counts, strict=True):
            if not count:
                continue
            values = bind.execute(sa.text(f'SELECT DISTINCT "{column}" FROM {table} WHERE NOT ({condition}) '
                                          f'ORDER BY "{column}" LIMIT {EXAMPLES}')).scalars()
            problems.append(f"{table}.{column}: {count} row(s) with {', '.join(_shown(v) for v in values)} "
                            f"(expected {condition})")
    return problems


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(f"LOCK TABLE {', '.join(CHECKS)} IN ACCESS EXCLUSIVE MODE")
    problems = _violations()
    if problems:
        raise RuntimeError("migration 0010 adds CHECK constraints, but existing rows break them; nothing was "
                           "changed. Correct or delete these rows, then upgrade again:\n- " + "\n- ".join(problems))
    for table, conditions in CHECKS.items():
        if postgres:  # one statement, so one scan validates all of the table's constraints
            added = ", ".join(f"ADD CONSTRAINT {_name(table, column)} CHECK ({condition})"
                              for column, condition in conditions.items())
            op.execute(f"ALTER TABLE {table} {added}")
            continue
        with op.batch_alter_table(table) as batch:
            for column, condition in conditions.items():
                batch.create_check_constraint(_name(table, column), sa.text(condition))


def downgrade() -> None:
    for table, conditions in CHECKS.items():
        with op.batch_alter_table(table) as batch:  # PostgreSQL: plain ALTER TABLE ... DROP CONSTRAINT
            for column in conditions:
                batch.drop_constraint(_name(table, column), type_="check")
