"""SQL usage source: identical daily buckets from SQLite, DuckDB, PostgreSQL and MariaDB; hostile names refused."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import sqlglot
from sqlalchemy.engine.default import DefaultDialect

from connectors import sql_source
from connectors.sql_source import SqlSourceError

MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)
COLUMNS = {"account_id": "acct", "product_key": "product", "ts": "occurred_at", "units": "qty", "event_id": "evt"}
# (event id, account, product, naive UTC timestamp, units)
EVENTS = [
    ("e1", "acme", "api_calls", datetime(2026, 3, 1, 0, 0, 0), D("10.5")),  # exactly at start: counted
    ("e2", "acme", "api_calls", datetime(2026, 3, 1, 23, 59, 59), D("0.125")),
    ("e3", "acme", "api_calls", datetime(2026, 3, 2, 0, 0, 0), D("7")),
    ("e4", "acme", "seats", datetime(2026, 3, 2, 12, 0, 0), D("3")),
    ("e5", "globex", "api_calls", datetime(2026, 3, 3, 8, 30, 0), D("1000000.000001")),
    ("e6", "globex", "api_calls", datetime(2026, 3, 3, 9, 0, 0), D("2")),
    ("e5", "globex", "api_calls", datetime(2026, 3, 3, 8, 30, 0), D("1000000.000001")),  # replayed event
    ("e7", "acme", "api_calls", datetime(2026, 3, 4, 0, 0, 0), D("99")),  # at end: excluded
    ("e8", "acme", "api_calls", datetime(2026, 2, 28, 23, 59, 59), D("99")),  # before start: excluded
]
EXPECTED = [
    ("acme", "api_calls", datetime(2026, 3, 1, tzinfo=UTC), D("10.625")),
    ("acme", "api_calls", datetime(2026, 3, 2, tzinfo=UTC), D("7")),
    ("acme", "seats", datetime(2026, 3, 2, tzinfo=UTC), D("3")),
    ("globex", "api_calls", datetime(2026, 3, 3, tzinfo=UTC), D("1000002.000001")),
]


def _rows(table: Any) -> list[tuple[str, str, datetime, D]]:
    assert table.schema == sql_source.BUCKET_SCHEMA
    return sorted((r["account_id"], r["product_key"], r["ts"], r["units"].normalize()) for r in table.to_pylist())


def _expected() -> list[tuple[str, str, datetime, D]]:
    return [(a, p, t, u.normalize()) for a, p, t, u in EXPECTED]


def _seed(url: str, name: str, ts_type: Any = None) -> sa.Engine:
    engine = sa.create_engine(url)
    table = sa.Table(name, sa.MetaData(), sa.Column("evt", sa.String(50)), sa.Column("acct", sa.String(50)),
                     sa.Column("product", sa.String(50)), sa.Column("occurred_at", ts_type or sa.DateTime()),
                     sa.Column("qty", sa.Numeric(20, 6)))
    with engine.begin() as conn:
        table.drop(conn, checkfirst=True)
        table.create(conn)
        conn.execute(table.insert(), [dict(zip(("evt", "acct", "product", "occurred_at", "qty"), e, strict=True))
                                      for e in EVENTS])
    return engine


def _drop(engine: sa.Engine, name: str) -> None:
    with engine.begin() as conn:
        sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
    engine.dispose()


@pytest.fixture(params=["sqlite", "duckdb", pytest.param("postgres", marks=pytest.mark.postgres), "mariadb"])
def seeded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The same events in a table with a unique name on each backend; dropped afterwards."""
    name = f"usage_{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'product.db'}"
    elif request.param == "duckdb":
        url = f"duckdb:///{tmp_path / 'product.duckdb'}"
    elif request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = MARIADB_URL
        try:
            sa.create_engine(url).connect().close()
        except sa.exc.OperationalError as exc:  # pragma: no cover - depends on the machine
            if os.environ.get("CI") or os.environ.get("REQUIRE_POSTGRES") == "1":
                pytest.fail(f"MariaDB required in CI but unreachable at {url}: {exc}")
            pytest.skip(f"MariaDB not reachable at {url}: {exc}")
    engine = _seed(url, name)
    yield {"url": url, "table": name, "columns": dict(COLUMNS)}
    _drop(engine, name)


def test_same_buckets_on_every_backend(seeded: dict[str, Any]) -> None:
    table = sql_source.fetch_daily_buckets(seeded, START, END)
    assert _rows(table) == _expected()


def test_seat_like_products_take_the_daily_maximum(seeded: dict[str, Any]) -> None:
    table = sql_source.fetch_daily_buckets(seeded, START, END, max_products={"api_calls"})
    expected = {(a, p, t): u for a, p, t, u in _expected()}
    expected[("acme", "api_calls", datetime(2026, 3, 1, tzinfo=UTC))] = D("10.5")
    expected[("globex", "api_calls", datetime(2026, 3, 3, tzinfo=UTC))] = D("1000000.000001")
    assert _rows(table) == sorted((*k, v) for k, v in expected.items())


def test_one_group_by_query_per_fetch(seeded: dict[str, Any]) -> None:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        sql_source.fetch_daily_buckets(seeded, START, END)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    grouped = [s for s in statements if "GROUP BY" in s.upper()]
    assert len(grouped) == 1
    assert seeded["table"] in grouped[0] and "2026" not in grouped[0]  # bounds are bound parameters


def test_check_reports_ok_and_missing_pieces(seeded: dict[str, Any]) -> None:
    result = sql_source.check(seeded)
    assert result.ok, result.message
    missing = sql_source.check({**seeded, "columns": {**COLUMNS, "units": "quantity"}})
    assert not missing.ok and "columns.units" in missing.message and "'quantity'" in missing.message
    absent = sql_source.check({**seeded, "table": "no_such_table"})
    assert not absent.ok and "table" in absent.message and "no_such_table" in absent.message


def test_without_event_id_every_row_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    _seed(url, "events")
    columns = {k: v for k, v in COLUMNS.items() if k != "event_id"}
    rows = _rows(sql_source.fetch_daily_buckets({"url": url, "table": "events", "columns": columns}, START, END))
    globex = [r for r in rows if r[0] == "globex"]
    assert globex == [("globex", "api_calls", datetime(2026, 3, 3, tzinfo=UTC), D("2000002.000002"))]


@pytest.fixture
def sqlite_with_victim(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = _seed(url, "events")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE x (id INTEGER)")
    yield url
    engine.dispose()


@pytest.mark.parametrize(("field", "config_change"), [
    ("table", {"table": "events; DROP TABLE x"}),
    ("table", {"table": 'events" ; DROP TABLE x; --'}),
    ("columns.units", {"columns": {**COLUMNS, "units": "qty) FROM events; DROP TABLE x --"}}),
    ("columns.account_id", {"columns": {**COLUMNS, "account_id": "units) --"}}),
    ("schema", {"schema": "main; DROP TABLE x"}),
])
def test_hostile_names_are_refused_and_nothing_runs(sqlite_with_victim: str, field: str,
                                                    config_change: dict[str, Any]) -> None:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    config = {"url": sqlite_with_victim, "table": "events", "columns": dict(COLUMNS), **config_change}
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        with pytest.raises(SqlSourceError, match=field.replace(".", r"\.")):
            sql_source.fetch_daily_buckets(config, START, END)
        assert not sql_source.check(config).ok
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert not any("DROP" in s.upper() or "--" in s for s in statements)
    assert not any("GROUP BY" in s.upper() for s in statements)
    engine = sa.create_engine(sqlite_with_victim)
    assert "x" in sa.inspect(engine).get_table_names()
    engine.dispose()


@pytest.mark.parametrize(("config", "field"), [
    ({"table": "events", "columns": COLUMNS}, "url"),
    ({"url": "not a url", "table": "events", "columns": COLUMNS}, "url"),
    ({"url": "sqlite://", "columns": COLUMNS}, "table"),
    ({"url": "sqlite://", "table": "events", "columns": ["acct"]}, "columns"),
    ({"url": "sqlite://", "table": "events", "columns": {**COLUMNS, "ts": ""}}, r"columns\.ts"),
    ({"url": "sqlite://", "table": "events", "columns": {**COLUMNS, "colour": "x"}}, "colour"),
    ({"url": "nosuchdb://h/db", "table": "events", "columns": COLUMNS}, "url"),
])
def test_bad_config_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(SqlSourceError, match=field):
        sql_source.fetch_daily_buckets(config, START, END)
    result = sql_source.check(config)
    assert not result.ok and field.replace("\\", "") in result.message


def test_a_mistyped_database_file_is_refused_not_created(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'typo.db'}", f"duckdb:///{tmp_path / 'typo.duckdb'}"):
        result = sql_source.check({"url": url, "table": "events", "columns": COLUMNS})
        assert not result.ok and "does not exist" in result.message
    assert list(tmp_path.iterdir()) == []


def test_a_non_timestamp_ts_column_is_refused(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'p.duckdb'}"
    _seed(url, "events").dispose()
    with pytest.raises(SqlSourceError, match=r"columns\.ts: 'qty'.*expected a timestamp"):
        sql_source.fetch_daily_buckets({"url": url, "table": "events", "columns": {**COLUMNS, "ts": "qty"}},
                                       START, END)


def test_unreachable_database_is_a_clear_failed_check_without_the_password() -> None:
    config = {"url": "postgresql+psycopg://bob:s3cret-pw@127.0.0.1:1/db", "table": "events", "columns": COLUMNS}
    result = sql_source.check(config)
    assert not result.ok and "cannot read usage" in result.message
    assert "s3cret-pw" not in result.message and "s3cret-pw" not in str(result.details)
    with pytest.raises(SqlSourceError) as info:
        sql_source.fetch_daily_buckets(config, START, END)
    assert "s3cret-pw" not in str(info.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://bob:pw-1@db.internal:5432/prod", "postgresql+psycopg://bob:***@db.internal:5432/prod"),
    ("postgresql+psycopg://bob@db.internal/prod?password=pw-1&sslmode=require",
     "postgresql+psycopg://bob@db.internal/prod?password=***&sslmode=require"),
    ("postgresql+psycopg://bob@db.internal/prod?sslpassword=pw-1&PWD=pw-1&passwd=pw-1",
     "postgresql+psycopg://bob@db.internal/prod?PWD=***&passwd=***&sslpassword=***"),
    ("snowflake://bob@acct/db?private_key_passphrase=pw-1&warehouse=wh&private-key=pw-1",
     "snowflake://bob@acct/db?private-key=***&private_key_passphrase=***&warehouse=wh"),
    ("trino://bob@host:443/hive?access_token=pw-1&client_secret=pw-1&secret_access_key=pw-1&api_key=pw-1",
     "trino://bob@host:443/hive?access_token=***&api_key=***&client_secret=***&secret_access_key=***"),
    ("mssql+pyodbc://?odbc_connect=DRIVER%3DX%3BSERVER%3Dh%3BPWD%3Dpw-1", "mssql+pyodbc://?odbc_connect=***"),
    ("not a url, pw-1", "***"),
])
def test_mask_url_hides_the_password_and_secret_query_parameters(url: str, shown: str) -> None:
    assert sql_source.mask_url(url) == shown
    assert sql_source.mask_url(sa.make_url(url) if "://" in url else url) == shown


def test_a_password_in_the_query_is_scrubbed_from_check_and_errors() -> None:
    config = {"url": "postgresql+psycopg://bob@127.0.0.1:1/db?password=s3cret-pw&sslmode=disable&token=t0k3n-val",
              "table": "events", "columns": COLUMNS}
    result = sql_source.check(config)
    assert not result.ok and "cannot read usage from postgresql+psycopg://bob@127.0.0.1:1/db?" in result.message
    for secret in ("s3cret-pw", "t0k3n-val"):
        assert secret not in result.message and secret not in str(result.details)
    with pytest.raises(SqlSourceError) as info:
        sql_source.fetch_daily_buckets(config, START, END)
    assert "password=***" in str(info.value) and "s3cret-pw" not in str(info.value)
    parsed = sql_source.parse_config(config)
    echoed = "invalid dsn: password=s3cret-pw token=t0k3n-val%2B host=x\nsecond line"
    assert sql_source._scrub(echoed, parsed) == "invalid dsn: password=*** token=***%2B host=x"


@pytest.mark.postgres
def test_postgres_timestamptz_is_bucketed_in_utc_whatever_the_session_zone(pg_url: str) -> None:
    """Aware columns are converted to UTC; naive ones (the other tests) are read as UTC already."""
    name = f"usage_{uuid.uuid4().hex[:10]}"
    engine = _seed(pg_url, name, sa.DateTime(timezone=True))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {name} ALTER COLUMN occurred_at TYPE timestamptz "
                             "USING occurred_at AT TIME ZONE 'UTC'")
    tokyo = sa.make_url(pg_url).set(query={"options": "-c timezone=Asia/Tokyo"}).render_as_string(False)
    try:
        rows = _rows(sql_source.fetch_daily_buckets({"url": tokyo, "table": name, "columns": COLUMNS}, START, END))
        assert rows == _expected()
    finally:
        _drop(engine, name)


def test_sqlite_text_with_offsets_is_read_in_utc(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE ev (acct TEXT, product TEXT, occurred_at TEXT, qty NUMERIC)")
        conn.exec_driver_sql("INSERT INTO ev VALUES ('a', 'p', '2026-03-02T01:30:00+02:00', 1), "
                             "('a', 'p', '2026-03-01T22:00:00Z', 2), ('a', 'p', '2026-03-01 05:00:00', 4)")
    engine.dispose()
    columns = {k: v for k, v in COLUMNS.items() if k != "event_id"}
    rows = _rows(sql_source.fetch_daily_buckets({"url": url, "table": "ev", "columns": columns}, START, END))
    assert rows == [("a", "p", datetime(2026, 3, 1, tzinfo=UTC), D(7))]


class _Warehouse(DefaultDialect):
    paramstyle = "qmark"
    positional = True


@pytest.mark.parametrize(("dialect", "aware", "expected"), [
    ("snowflake", True, "DATE_TRUNC('DAY', CONVERT_TIMEZONE('UTC', "),
    ("bigquery", True, "TIMESTAMP_TRUNC("),
    ("bigquery", False, "DATETIME_TRUNC("),
    ("trino", True, "AT TIME ZONE 'UTC'"),
    ("clickhouse", False, "toStartOfDay("),
])
def test_warehouse_dialects_render_valid_sql(dialect: str, aware: bool, expected: str) -> None:
    """Render-only: the same query for warehouses whose drivers are not installed, parsed by sqlglot."""
    table = sa.Table("usage", sa.MetaData(), sa.Column("acct", sa.String), sa.Column("product", sa.String),
                     sa.Column("occurred_at", sa.DateTime(timezone=aware)), sa.Column("qty", sa.Numeric),
                     sa.Column("evt", sa.String))
    warehouse = type(f"{dialect}_dialect", (_Warehouse,), {"name": dialect})()
    sql = sql_source.render_query({"url": "sqlite://", "table": "usage", "columns": COLUMNS}, warehouse, table,
                                  START, END)
    assert expected in sql and "GROUP BY" in sql and "2026" not in sql
    with_max = sql_source.render_query({"url": "sqlite://", "table": "usage", "columns": COLUMNS}, warehouse, table,
                                       START, END, frozenset({"seats"}))
    assert "CASE WHEN" in with_max and "seats" not in with_max  # product keys are bound parameters too
    sqlglot.parse_one(with_max, read=dialect)
    parsed = sqlglot.parse_one(sql, read=dialect)
    assert parsed.find(sqlglot.exp.Group) is not None
