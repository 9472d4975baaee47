"""CHECK constraints on enumerated and bounded columns (migration 0010), and account names as text (0011), on
SQLite and PostgreSQL.

Rows are written with plain INSERTs past the services, as a script, another app version or an
edited archive would: the database itself must refuse a role "owner" or a negative leak.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db import models
from db.models import AtLeastZero, Base, OneOf, Organization, UTCDateTime, column_rules
from db.repositories import runs
from db.session import current_revision, downgrade, get_engine, is_current, upgrade
from services import actions_common, anomalies, context, crm_tasks, integrations, recovery, settings

RULED_TABLES = [table for table in Base.metadata.sorted_tables if column_rules(table)]
# the columns the brief of migration 0010 names; every other ruled column is tested the same way
MUST_BE_RULED = {
    ("users", "role"), ("users", "failed_logins"), ("integrations", "kind"), ("integrations", "status"),
    ("org_settings", "schedule_kind"), ("recon_runs", "status"), ("recon_runs", "trigger"), ("anomalies", "type"),
    ("anomalies", "severity"), ("anomalies", "status"), ("anomalies", "confidence"), ("anomalies", "leak_amount"),
    ("actions", "kind"), ("actions", "status"), ("actions", "amount"), ("usage_events", "units"),
}


def _new_org(conn: sa.Connection) -> int:
    slug = f"o-{uuid.uuid4().hex[:12]}"
    table = Organization.__table__
    return conn.execute(sa.insert(table).values(slug=slug, name=slug).returning(table.c.id)).scalar_one()


def _number(column: sa.Column[Any], value: Decimal) -> Any:
    if isinstance(column.type, sa.Integer):
        return int(value)
    return float(value) if isinstance(column.type, sa.Float) else value


def _filler(column: sa.Column[Any]) -> Any:
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return models.utcnow()
    if isinstance(kind, sa.JSON):
        return {}
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.Numeric | sa.Integer):
        return _number(column, Decimal(0))
    return uuid.uuid4().hex[:getattr(kind, "length", None) or 32]  # unique where a column must be


def _valid_row(table: sa.Table, org_id: int) -> dict[str, Any]:
    """A row the database accepts: every required column filled, each ruled column at an allowed value."""
    row: dict[str, Any] = {}
    for column in table.columns:
        if column.name == "org_id":
            row["org_id"] = org_id
        elif not (column.nullable or column.default is not None
                  or (column.primary_key and isinstance(column.type, sa.Integer))):  # the id: generated
            row[column.name] = _filler(column)
    for name, rule in column_rules(table).items():
        row[name] = rule.values[0] if isinstance(rule, OneOf) else _number(table.c[name], Decimal(0))
    return row


def _insert(url: str, table: sa.Table, **values: Any) -> None:
    """One row of `table` (for a new organization, so per-org unique rules never interfere), committed."""
    with get_engine(url).begin() as conn:
        conn.execute(sa.insert(table).values({**_valid_row(table, _new_org(conn)), **values}))


def _cases(table: sa.Table, name: str, rule: OneOf | AtLeastZero) -> tuple[list[Any], list[Any]]:
    """Values the rule accepts (the whole vocabulary, the bounds) and values it refuses."""
    if isinstance(rule, OneOf):
        return list(rule.values), ["nope", rule.values[0].upper()]
    good, bad = [Decimal(0), Decimal(1000)], [Decimal(-1)]
    if rule.upper is not None:
        good, bad = [Decimal(0), rule.upper], [Decimal(-1), rule.upper + Decimal("0.5")]
    return [_number(table.c[name], v) for v in good], [_number(table.c[name], v) for v in bad]


def test_the_database_refuses_values_outside_each_rule(app_db: str) -> None:
    ruled = {(table.name, name) for table in RULED_TABLES for name in column_rules(table)}
    assert ruled >= MUST_BE_RULED
    for table in RULED_TABLES:
        for name, rule in column_rules(table).items():
            good, bad = _cases(table, name, rule)
            for value in good:
                assert rule.problem(value) is None, (table.name, name, value)
                _insert(app_db, table, **{name: value})
            for value in bad:
                assert rule.problem(value), (table.name, name, value)
                with pytest.raises(sa.exc.IntegrityError, match=f"ck_{table.name}_{name}"):
                    _insert(app_db, table, **{name: value})


def test_the_python_checks_name_what_was_expected() -> None:
    assert OneOf("role", ("admin", "analyst")).problem("owner") == "is not one of admin, analyst"
    assert OneOf("role", ("admin", "analyst")).problem(1) == "is not one of admin, analyst"
    confidence = AtLeastZero("confidence", Decimal(1))
    for refused in (Decimal(7), Decimal("-0.001"), float("inf"), -0.5):  # types: the import's column checks
        assert confidence.problem(refused) == "is not a number >= 0 and <= 1", refused
    assert AtLeastZero("units").problem(None) is None and AtLeastZero("units").problem(10**30) is None


def _schema(url: str) -> dict[str, Any]:
    """What a migration must not lose: columns, keys, indexes (partial ones with their WHERE), uniques,
    CHECK names; on PostgreSQL also row-level security, policies, grants and triggers."""
    engine = get_engine(url)
    inspector = sa.inspect(engine)
    where = f"{engine.dialect.name}_where"
    schema: dict[str, Any] = {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "pk": inspector.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]),
                           fk["options"].get("ondelete")) for fk in inspector.get_foreign_keys(table)),
            "indexes": sorted((ix["name"], tuple(ix["column_names"]), bool(ix["unique"]),
                               str(ix.get("dialect_options", {}).get(where))) for ix in inspector.get_indexes(table)),
            "uniques": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            "checks": sorted(c["name"] for c in inspector.get_check_constraints(table)),
        }
        for table in inspector.get_table_names() if table != "alembic_version"
    }
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            schema["security"] = [tuple(row) for query in (
                "SELECT tablename, policyname, roles::text, cmd, qual, with_check FROM pg_policies ORDER BY 1, 2",
                "SELECT relname, relrowsecurity, relforcerowsecurity, relacl::text FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace ORDER BY 1",
                "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
                "ORDER BY 1, 2",
            ) for row in conn.execute(sa.text(query))]
    return schema


def _without_checks(schema: dict[str, Any]) -> dict[str, Any]:
    return {table: {k: v for k, v in parts.items() if k != "checks"} if table != "security" else parts
            for table, parts in schema.items()}


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row, as the database's own tables hold them (a migrated-down database lacks later columns)."""
    with get_engine(url).connect() as conn:
        tables = [sa.Table(table.name, sa.MetaData(), autoload_with=conn) for table in Base.metadata.sorted_tables]
        return {table.name: [tuple(row) for row in conn.execute(
            sa.select(table).order_by(*table.primary_key.columns))] for table in tables}


def _other_database(app_db: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the same kind as `app_db`, not migrated."""
    if app_db.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'other.db'}"
    return request.getfixturevalue("fresh_pg_url")


def test_0010_keeps_everything_else_and_the_rows_and_its_downgrade_drops_only_the_checks(
        org: Any, app_db: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    downgrade(app_db, "0010")
    for table in RULED_TABLES:  # good rows in every table the migration rebuilds (SQLite) or scans
        _insert(app_db, table)
    head, rows = _schema(app_db), _rows(app_db)
    assert {name for table in RULED_TABLES for name in head[table.name]["checks"]} == {
        f"ck_{table.name}_{name}" for table in RULED_TABLES for name in column_rules(table)}
    original = _other_database(app_db, request, tmp_path)  # 0009 as its own migrations built it
    upgrade(original, "0009")
    assert not any(parts["checks"] for table, parts in _schema(original).items() if table != "security")
    assert _without_checks(head) == _without_checks(_schema(original)), "batch mode lost or changed something"
    assert {"ux_recon_runs_one_queued", "ux_recon_runs_one_running"} <= {ix[0] for ix in head["recon_runs"]["indexes"]}

    downgrade(app_db, "0009")
    assert _schema(app_db) == _schema(original)
    assert _rows(app_db) == rows
    upgrade(app_db, "0010")
    assert _schema(app_db) == head
    assert _rows(app_db) == rows


def _with_name_type(schema: dict[str, Any], kind: str) -> dict[str, Any]:
    """`schema` with accounts.name of type `kind`: what 0011 changes, to compare everything else."""
    columns = [(name, kind if name == "name" else type_, nullable)
               for name, type_, nullable in schema["accounts"]["columns"]]
    return {**schema, "accounts": {**schema["accounts"], "columns": columns}}


def test_0011_makes_account_names_text_keeping_everything_else_and_the_rows(
        app_db: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    downgrade(app_db, "0011")  # the revision under test, whatever came after it
    accounts = models.Account.__table__
    long_name = "Ünïcode Holdings " * 30  # 510 characters: more than VARCHAR(300) held
    _insert(app_db, accounts, account_id="acme", name="Acme")
    _insert(app_db, accounts, account_id="long-name", name=long_name)  # stored whole by the new column
    head, rows = _schema(app_db), _rows(app_db)
    original = _other_database(app_db, request, tmp_path)  # 0010 as its own migrations built it
    upgrade(original, "0010")
    before = _schema(original)
    assert [c[1] for s in (head, before) for c in s["accounts"]["columns"] if c[0] == "name"] == ["TEXT",
                                                                                                  "VARCHAR(300)"]
    assert _with_name_type(head, "") == _with_name_type(before, ""), "batch mode lost or changed something"

    with pytest.raises(RuntimeError, match=r"but 1 account name\(s\) are longer; nothing was changed\. Shorten the "
                                           r"names of 'long-name' \(org \d+\), then downgrade again"):
        downgrade(app_db, "0010")
    assert current_revision(app_db) == "0011"
    assert _schema(app_db) == head and _rows(app_db) == rows

    with get_engine(app_db).begin() as conn:  # shortened by hand, as the message asks
        conn.execute(sa.text("UPDATE accounts SET name = substr(name, 1, 300) WHERE account_id = 'long-name'"))
    rows = _rows(app_db)
    downgrade(app_db, "0010")
    assert _schema(app_db) == before
    assert _rows(app_db) == rows
    upgrade(app_db, "0011")
    assert _schema(app_db) == head
    assert _rows(app_db) == rows


def test_0010_refuses_existing_rows_that_break_a_rule_and_changes_nothing(org: Any, app_db: str) -> None:
    downgrade(app_db, "0009")
    _insert(app_db, models.User.__table__, role="owner")
    _insert(app_db, models.Anomaly.__table__, status="paid", confidence=Decimal(7), leak_amount=Decimal(-5))
    before, rows = _schema(app_db), _rows(app_db)
    with pytest.raises(RuntimeError, match="existing rows break them; nothing was changed") as refused:
        upgrade(app_db)
    message = str(refused.value)
    assert "- users.role: 1 row(s) with 'owner' (expected \"role\" IN ('admin', 'analyst'))" in message
    assert "- anomalies.status: 1 row(s) with 'paid' (expected" in message
    assert re.search(r"- anomalies\.confidence: 1 row\(s\) with 7(\.000)? \(expected \"confidence\" >= 0 AND", message)
    assert re.search(r"- anomalies\.leak_amount: 1 row\(s\) with -5(\.0+)? \(expected \"leak_amount\" >= 0\)", message)
    assert "anomalies.type" not in message and "users.failed_logins" not in message
    assert current_revision(app_db) == "0009"
    assert _schema(app_db) == before and _rows(app_db) == rows

    with get_engine(app_db).begin() as conn:  # corrected by hand, as the message asks
        conn.execute(sa.text("UPDATE users SET role = 'analyst' WHERE role = 'owner'"))
        conn.execute(sa.text("UPDATE anomalies SET status = 'open', confidence = 0.5, leak_amount = 5 "
                             "WHERE status = 'paid'"))
    upgrade(app_db)
    assert is_current(app_db)


def _checks_by_table(url: str) -> dict[str, list[tuple[str, str]]]:
    inspector = sa.inspect(get_engine(url))
    return {table.name: sorted((c["name"], c["sqltext"]) for c in inspector.get_check_constraints(table.name))
            for table in Base.metadata.sorted_tables}


def test_the_migrated_database_has_the_models_checks(app_db: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """Migrations write their conditions out; a vocabulary changed in the models without a migration fails here.
    The autogenerate diff shows nothing else either, beyond the two objects the models leave out on purpose."""
    from_models = _other_database(app_db, request, tmp_path)
    Base.metadata.create_all(get_engine(from_models))
    assert _checks_by_table(app_db) == _checks_by_table(from_models)
    with get_engine(app_db).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    known = {("remove_table", "apscheduler_jobs"),  # the scheduler's job store (APScheduler's own table)
             ("remove_index", "ix_apscheduler_jobs_next_run_time")}
    assert {(change[0], change[1].name) for change in diff} == known, diff


def test_the_services_write_only_the_databases_vocabularies() -> None:
    """Writers that spell a value themselves stay inside the vocabulary the database checks."""
    assert context.ROLES is models.ROLES and settings.SCHEDULE_KINDS is models.SCHEDULE_KINDS
    assert anomalies.STATUSES is models.ANOMALY_STATUSES and integrations.KINDS is models.INTEGRATION_KINDS
    assert runs.RUN_STATUSES is models.RUN_STATUSES and runs.RUN_TRIGGERS is models.RUN_TRIGGERS
    assert set(integrations.LABELS) == set(integrations.REQUIRED) == set(integrations.SECRETS) == set(
        models.INTEGRATION_KINDS)
    assert {recovery.KIND, *(f"{system}_task" for system in crm_tasks.SYSTEMS)} == set(models.ACTION_KINDS)
    assert set(runs.FINISHED) <= set(models.RUN_STATUSES)
    for statuses in (recovery.CLOSED_STATUSES, crm_tasks.CLOSED_STATUSES, actions_common.FINAL_ANOMALY_STATUSES,
                     *anomalies.MANUAL_TRANSITIONS.values(), anomalies.MANUAL_TRANSITIONS):
        assert set(statuses) <= set(models.ANOMALY_STATUSES), statuses
