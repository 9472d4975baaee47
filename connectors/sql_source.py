"""Usage from the customer's own SQL database: one GROUP BY query per sync, only daily buckets travel.

Security: the admin types a table name and column names, and none of them is ever pasted into
SQL. The connector first asks the database which schemas, tables/views and columns exist
(`sqlalchemy.inspect`), refuses any name that is not exactly one of those, and builds the query
with SQLAlchemy Core from the reflected objects, so identifiers are quoted by the dialect and the
period bounds are bound parameters.

Time: buckets are UTC days, half-open [start, end). A time-zone-aware column (PostgreSQL
timestamptz, DuckDB TIMESTAMPTZ, Snowflake TIMESTAMP_TZ...) is converted to UTC before
truncation. A naive column (no time zone: PostgreSQL `timestamp`, MySQL/MariaDB DATETIME, SQLite
text) is taken to already hold UTC, which is how almost every product database stores event
times; MySQL/MariaDB TIMESTAMP columns are read with the session time zone set to UTC.

Portability: the day truncation is the one dialect-specific piece, a small SQLAlchemy compiler
extension (`utc_day`) rendered per dialect: PostgreSQL/DuckDB/Trino `date_trunc`, MySQL/MariaDB
`DATE()`, SQLite `date()`, Snowflake `DATE_TRUNC` after `CONVERT_TIMEZONE`, BigQuery
`TIMESTAMP_TRUNC`/`DATETIME_TRUNC`, ClickHouse `toStartOfDay(..., 'UTC')`, anything else
`CAST(... AS DATE)`.

Secrets: a URL carries its password in `user:pw@` or in query parameters (`?password=`, `?token=`...).
`mask_url` is the one rendering of a URL anyone sees (here and in services/integrations.py) and
`_scrub` removes the same values from database error texts.

Which databases a tenant may point this at (not the app's own, files only from allowed folders) is a
business rule and lives in services/source_policy.py; this module connects to whatever it is given.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from connectors.base import OPTIONAL_USAGE_COLUMNS, USAGE_COLUMNS, CheckResult, usage_column_mapping

BUCKET_SCHEMA = pa.schema([
    pa.field("account_id", pa.string()),
    pa.field("product_key", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("units", pa.decimal128(38, 12)),
])
UNITS_SCALE = Decimal(1).scaleb(-12)
REQUIRED_COLUMNS, OPTIONAL_COLUMNS = USAGE_COLUMNS, OPTIONAL_USAGE_COLUMNS
FETCH_BATCH = 50_000


class SqlSourceError(ValueError):
    """A configuration or data problem, with a message naming the field; never contains a secret."""


@dataclass(frozen=True)
class SqlSourceConfig:
    url: sa.URL
    table: str
    schema: str | None
    columns: dict[str, str]


def parse_config(config: dict[str, Any]) -> SqlSourceConfig:
    """Check the shape of the admin's mapping before anything connects."""
    if not isinstance(config, dict):
        raise SqlSourceError("sql_source config: expected an object")
    url = parse_url(config.get("url"))
    table = config.get("table")
    if not isinstance(table, str) or not table.strip():
        raise SqlSourceError("table: required, the table or view holding usage events")
    schema = config.get("schema") or None
    if schema is not None and not isinstance(schema, str):
        raise SqlSourceError("schema: expected a schema name or nothing")
    mapping = usage_column_mapping(config.get("columns"), SqlSourceError, "column")
    return SqlSourceConfig(url, table, schema, mapping)


def parse_url(raw_url: object) -> sa.URL:
    """The admin's URL as SQLAlchemy reads it (shared with the services' source policy), or why not."""
    if not isinstance(raw_url, str) or not raw_url.strip():
        raise SqlSourceError("url: required, a SQLAlchemy URL such as postgresql+psycopg://user@host/db")
    try:
        return sa.make_url(raw_url.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise SqlSourceError("url: not a valid SQLAlchemy URL (expected dialect+driver://user@host/db)") from None


# Query parameters whose value is a secret, matched on the lower-cased name without `_`/`-`: drivers take a
# password (or a token, a key...) as `?password=` as readily as in `user:pw@`. Over-masking costs nothing.
SECRET_PARAM_WORDS = ("password", "passwd", "pwd", "secret", "token", "credential", "passphrase", "privatekey",
                      "accesskey", "apikey")
SECRET_IN_VALUE = re.compile(r"(password|pwd)\s*=", re.IGNORECASE)  # e.g. mssql's odbc_connect=...;PWD=...;
MASK = "***"


def _is_secret_param(name: str, values: tuple[str, ...]) -> bool:
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(word in flat for word in SECRET_PARAM_WORDS) or any(SECRET_IN_VALUE.search(v) for v in values)


def _query_values(url: sa.URL) -> dict[str, tuple[str, ...]]:
    return {name: (value,) if isinstance(value, str) else tuple(value) for name, value in url.query.items()}


def url_secrets(url: sa.URL) -> list[str]:
    """Every secret the URL carries: the password and the values of secret-like query parameters."""
    found = [str(url.password)] if url.password else []
    for name, values in _query_values(url).items():
        if _is_secret_param(name, values):
            found += [value for value in values if value]
    return found


def mask_url(url: str | sa.URL) -> str:
    """The one way a source URL is shown (settings, API, check and error messages): dialect, host, database
    and harmless parameters stay recognisable; the password and secret-like query values become ***.
    A string SQLAlchemy cannot parse is shown as *** entirely, since its secret cannot be located."""
    if isinstance(url, str):
        try:
            url = sa.make_url(url.strip())
        except (ArgumentError, ValueError):
            return MASK
    query = {name: MASK if _is_secret_param(name, values) else values
             for name, values in _query_values(url).items()}
    rendered = url.set(query=query).render_as_string(hide_password=True)
    return rendered.replace(quote_plus(MASK), MASK)  # query values are percent-encoded: keep *** readable


def _scrub(message: str, config: SqlSourceConfig) -> str:
    """Database error texts sometimes echo the DSN or its options: never let a secret of the URL through."""
    for secret in url_secrets(config.url):
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            message = message.replace(form, MASK)
    return message.splitlines()[0] if message else message


CONNECT_TIMEOUT = 10  # seconds: an unreachable database fails the check quickly instead of hanging


def _engine(config: SqlSourceConfig) -> Engine:
    backend, database = config.url.get_backend_name(), config.url.database
    if backend in ("sqlite", "duckdb") and database and database != ":memory:" and not Path(database).is_file():
        # Both would silently create an empty database file where the admin mistyped a path.
        raise SqlSourceError(f"url: the {backend} database file {database} does not exist")
    connect_args: dict[str, Any] = {}
    if backend in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    try:
        return sa.create_engine(config.url, connect_args=connect_args)
    except (NoSuchModuleError, ImportError) as exc:
        raise SqlSourceError(f"url: no SQLAlchemy dialect installed for {config.url.drivername!r} ({exc})") from None


# --- the one dialect-specific piece: UTC day of a timestamp column ---------------------------------------------

class utc_day(FunctionElement[Any]):
    """The UTC day start of a timestamp; `aware` says whether the column carries a time zone."""

    inherit_cache = True
    name = "utc_day"

    def __init__(self, column: ColumnElement[Any], aware: bool) -> None:
        super().__init__(column)
        self.aware = aware

    @property
    def column(self) -> ColumnElement[Any]:
        return next(iter(self.clauses))


def _arg(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(utc_day)
def _utc_day_default(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({_arg(element, compiler, **kw)} AS DATE)"


@compiles(utc_day, "postgresql")
@compiles(utc_day, "trino")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    column = _arg(element, compiler, **kw)
    return f"date_trunc('day', {column} AT TIME ZONE 'UTC')" if element.aware else f"date_trunc('day', {column})"


@compiles(utc_day, "duckdb")
def _utc_day_duckdb(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    column = _arg(element, compiler, **kw)
    return f"date_trunc('day', timezone('UTC', {column}))" if element.aware else f"date_trunc('day', {column})"


@compiles(utc_day, "mysql")
@compiles(utc_day, "mariadb")
def _utc_day_mysql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"DATE({_arg(element, compiler, **kw)})"


@compiles(utc_day, "sqlite")
def _utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"date({_arg(element, compiler, **kw)})"  # text with an offset is converted to UTC by date()


@compiles(utc_day, "snowflake")
def _utc_day_snowflake(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    column = _arg(element, compiler, **kw)
    if element.aware:
        column = f"CONVERT_TIMEZONE('UTC', {column})"
    return f"DATE_TRUNC('DAY', {column})"


@compiles(utc_day, "bigquery")
def _utc_day_bigquery(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    column = _arg(element, compiler, **kw)
    return f"TIMESTAMP_TRUNC({column}, DAY, 'UTC')" if element.aware else f"DATETIME_TRUNC({column}, DAY)"


@compiles(utc_day, "clickhouse")
def _utc_day_clickhouse(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"toStartOfDay({_arg(element, compiler, **kw)}, 'UTC')"


# --- reflection: the only names that ever reach SQL are the database's own ----------------------------------------

def reflect_table(conn: Connection, config: SqlSourceConfig) -> sa.Table:
    """The mapped table as the database describes it; refuse any name the database does not list."""
    inspector = sa.inspect(conn)
    if config.schema is not None and config.schema not in inspector.get_schema_names():
        raise SqlSourceError(f"schema: {config.schema!r} does not exist in this database")
    names = set(inspector.get_table_names(schema=config.schema)) | set(inspector.get_view_names(schema=config.schema))
    if config.table not in names:
        where = f" in schema {config.schema!r}" if config.schema else ""
        raise SqlSourceError(f"table: {config.table!r} is not a table or view{where} of this database")
    reflected = _reflect_columns(conn, inspector, config)
    table = sa.Table(config.table, sa.MetaData(), *(sa.Column(name, type_) for name, type_ in reflected),
                     schema=config.schema)
    for key, column in config.columns.items():
        if column not in table.c:
            raise SqlSourceError(f"columns.{key}: {column!r} is not a column of table {config.table!r} "
                                 f"(it has {', '.join(c.name for c in table.c)})")
    ts_type = table.c[config.columns["ts"]].type
    if not _is_temporal(ts_type, conn.dialect.name):
        raise SqlSourceError(f"columns.ts: {config.columns['ts']!r} is a {ts_type} column; expected a timestamp")
    return table


DUCKDB_TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "TIMESTAMP WITH TIME ZONE": sa.DateTime(timezone=True), "TIMESTAMP": sa.DateTime(), "DATE": sa.Date(),
    "TIMESTAMP_NS": sa.DateTime(), "TIMESTAMP_MS": sa.DateTime(), "TIMESTAMP_S": sa.DateTime(),
}


def _reflect_columns(conn: Connection, inspector: sa.Inspector,
                     config: SqlSourceConfig) -> list[tuple[str, sa.types.TypeEngine[Any]]]:
    """Column names and types. duckdb-engine's column reflection does not work with SQLAlchemy 2.1
    (it queries pg_catalog tables DuckDB lacks), so DuckDB is asked through information_schema,
    with the already-validated table name as a bound parameter."""
    if conn.dialect.name != "duckdb":
        return [(c["name"], c["type"]) for c in inspector.get_columns(config.table, schema=config.schema)]
    query = sa.text("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = :table"
                    + (" AND table_schema = :schema" if config.schema else "") + " ORDER BY ordinal_position")
    params = {"table": config.table, **({"schema": config.schema.split(".")[-1]} if config.schema else {})}
    rows = conn.execute(query, params).all()
    return [(name, DUCKDB_TYPES.get(str(kind).upper(), sa.types.NullType())) for name, kind in rows]


def _is_temporal(type_: sa.types.TypeEngine[Any], dialect: str) -> bool:
    if isinstance(type_, sa.DateTime | sa.Date):
        return True
    # SQLite has no timestamp type: ISO 8601 text is how timestamps are stored there.
    return dialect == "sqlite" and isinstance(type_, sa.String | sa.types.NullType)


def _is_aware(type_: sa.types.TypeEngine[Any]) -> bool:
    return bool(getattr(type_, "timezone", False))


def build_query(table: sa.Table, columns: dict[str, str], dialect: str, start: datetime, end: datetime,
                max_products: frozenset[str] = frozenset()) -> sa.Select:
    """The one GROUP BY query: units per account, product and UTC day, over [start, end).

    Units are summed, except for the products in `max_products` (seats-like: a daily snapshot,
    where adding up several readings of one day would multiply the seats) whose daily value is
    the largest reading; both live in the same query, the product keys as bound parameters.
    """
    ts = table.c[columns["ts"]]
    aware = _is_aware(ts.type)
    low, high = _bound(start, aware, dialect), _bound(end, aware, dialect)
    source: sa.FromClause = table
    if "event_id" in columns:
        # A replayed event (same id, same values) is counted once; still the same single query.
        picked = [table.c[columns[k]].label(k) for k in ("event_id", "account_id", "product_key", "ts", "units")]
        source = sa.select(*picked).distinct().where(*_period(ts, low, high, dialect)).subquery("events")
        account, product, ts, units = (source.c[k] for k in ("account_id", "product_key", "ts", "units"))
        where: list[ColumnElement[bool]] = []
    else:
        account, product, units = (table.c[columns[k]] for k in ("account_id", "product_key", "units"))
        where = _period(ts, low, high, dialect)
    day = utc_day(ts, aware).label("day")
    # SQLite has no decimal type: its numbers are floats, summed as floats and read back by their
    # shortest representation; every other database sums exact decimals.
    exact = sa.cast(units, sa.Float if dialect == "sqlite" else sa.Numeric(38, 12))
    aggregate: ColumnElement[Any] = sa.func.sum(exact)
    if max_products:
        chosen = sa.bindparam("max_products", sorted(max_products), expanding=True)
        aggregate = sa.case((sa.cast(product, sa.String).in_(chosen), sa.func.max(exact)), else_=aggregate)
    # The raw driver value is kept (NullType): some dialects' Numeric processing goes through float.
    total = sa.type_coerce(aggregate, sa.types.NullType())
    return (
        sa.select(
            sa.cast(account, sa.String).label("account_id"),
            sa.cast(product, sa.String).label("product_key"),
            day,
            total.label("units"),
        )
        .select_from(source)
        .where(*where)
        .group_by(account, product, day)
        .order_by(account, product, day)
    )


def _bound(instant: datetime, aware: bool, dialect: str) -> datetime | str:
    if instant.tzinfo is None:
        raise SqlSourceError(f"period bound {instant!r} must be timezone-aware (UTC)")
    utc = instant.astimezone(UTC)
    if dialect == "sqlite":
        return utc.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]  # what SQLite's strftime('%H:%M:%f') gives
    return utc if aware else utc.replace(tzinfo=None)


def _period(ts: ColumnElement[Any], low: Any, high: Any, dialect: str) -> list[ColumnElement[bool]]:
    if dialect == "sqlite":
        # Normalise whatever ISO text is stored ('T' or ' ', with or without offset) to UTC text.
        normalized = sa.func.strftime("%Y-%m-%d %H:%M:%f", ts)
        return [normalized >= sa.bindparam("period_start", low), normalized < sa.bindparam("period_end", high)]
    return [ts >= sa.bindparam("period_start", low), ts < sa.bindparam("period_end", high)]


def _prepare(conn: Connection) -> None:
    """MySQL/MariaDB TIMESTAMP values follow the session time zone: make it UTC for this connection."""
    if conn.dialect.name in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET time_zone = '+00:00'")


def _as_day(value: Any, column: str) -> datetime:
    if isinstance(value, datetime):
        day = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return day.replace(hour=0, minute=0, second=0, microsecond=0)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            return datetime.combine(date.fromisoformat(value[:10]), datetime.min.time(), UTC)
        except ValueError:
            pass
    raise SqlSourceError(f"columns.ts: {column!r} holds a value that is not a timestamp ({str(value)[:40]!r})")


def _decimal(total: Any, column: str) -> Decimal | None:
    if total is None:
        return None
    if isinstance(total, float):
        total = repr(total)
    try:
        return Decimal(total).quantize(UNITS_SCALE)
    except ArithmeticError:
        raise SqlSourceError(f"columns.units: {column!r} sums to {total!r}, not a finite number") from None


def _rows_to_table(rows: Iterator[Any], columns: dict[str, str]) -> pa.Table:
    batches = []
    accounts: list[str | None] = []
    products: list[str | None] = []
    days: list[datetime] = []
    units: list[Decimal | None] = []

    def flush() -> None:
        if days:
            batches.append(pa.record_batch([pa.array(accounts, pa.string()), pa.array(products, pa.string()),
                                            pa.array(days, BUCKET_SCHEMA.field("ts").type),
                                            pa.array(units, pa.decimal128(38, 12))], schema=BUCKET_SCHEMA))
            for chunk in (accounts, products, days, units):
                chunk.clear()

    for account, product, day, total in rows:
        if day is None:
            raise SqlSourceError(f"columns.ts: {columns['ts']!r} holds values that are not timestamps")
        accounts.append(account)
        products.append(product)
        days.append(_as_day(day, columns["ts"]))
        units.append(_decimal(total, columns["units"]))
        if len(days) >= FETCH_BATCH:
            flush()
    flush()
    return pa.Table.from_batches(batches, schema=BUCKET_SCHEMA)


def fetch_daily_buckets(config: dict[str, Any], start: datetime, end: datetime, *,
                        max_products: frozenset[str] | set[str] = frozenset()) -> pa.Table:
    """Daily usage buckets of [start, end) computed by the source database (one GROUP BY query).

    Units are summed per day, or maxed for the product keys in `max_products` (see build_query).
    """
    parsed = parse_config(config)
    if end <= start:
        raise SqlSourceError("period: end must be after start")
    engine = _engine(parsed)
    try:
        with engine.connect() as conn:
            table = reflect_table(conn, parsed)
            query = build_query(table, parsed.columns, conn.dialect.name, start, end, frozenset(max_products))
            _prepare(conn)
            result = conn.execution_options(stream_results=True).execute(query)
            return _rows_to_table(iter(result), parsed.columns)
    except SqlSourceError:
        raise
    except SQLAlchemyError as exc:
        raise SqlSourceError(f"sql source {mask_url(parsed.url)}: query failed: "
                             f"{_scrub(str(getattr(exc, 'orig', None) or exc), parsed)}") from None
    finally:
        engine.dispose()


def render_query(config: dict[str, Any], dialect: sa.engine.Dialect, table: sa.Table, start: datetime,
                 end: datetime, max_products: frozenset[str] = frozenset()) -> str:
    """The SQL a warehouse would receive (for dialects not installed here; docs and tests)."""
    parsed = parse_config(config)
    query = build_query(table, parsed.columns, dialect.name, start, end, max_products)
    return str(query.compile(dialect=dialect))


def check(config: dict[str, Any]) -> CheckResult:
    """Reachable, the mapped table and columns exist, and we may SELECT from it."""
    try:
        parsed = parse_config(config)
    except SqlSourceError as exc:
        return CheckResult(False, str(exc))
    try:
        engine = _engine(parsed)
    except SqlSourceError as exc:
        return CheckResult(False, str(exc))
    where = mask_url(parsed.url)
    try:
        with engine.connect() as conn:
            try:
                table = reflect_table(conn, parsed)
            except SqlSourceError as exc:
                return CheckResult(False, str(exc), {"database": where})
            mapped = [table.c[name] for name in parsed.columns.values()]
            conn.execute(sa.select(*mapped).where(sa.false()).limit(1)).all()  # SELECT permission
    except SQLAlchemyError as exc:
        reason = _scrub(str(getattr(exc, "orig", None) or exc), parsed)
        return CheckResult(False, f"cannot read usage from {where}: {reason}", {"database": where})
    finally:
        engine.dispose()
    return CheckResult(True, f"connected; table {parsed.table!r} and its {len(parsed.columns)} mapped columns are "
                             "readable", {"database": where, "table": parsed.table})
