"""Usage tables -> validated buckets, inside DuckDB.

One scan per usage table aggregates events into buckets of (account, product, bucket start) with
the sum (and, for seat-like products, max) of units; unreadable timestamps and unknown accounts
or products are then answered from those few buckets, bad units by a filter that the statistics
of an integer or decimal Parquet column answer without reading the file. Only when something is
wrong is the raw table scanned again, to name the rows.

A bucket is a calendar month (UTC), cut at the billing-period boundaries of that account and
product that fall inside the month (table `month_cuts`). No boundary ever lies inside a bucket,
so assigning buckets to periods is exact (an event belongs to the period containing its UTC
timestamp), and there are about as many buckets as periods whatever the precision of the
boundaries (Stripe's anniversary billing starts periods at the second the subscription was
created). There every event looks up the boundaries of its month by one number, in an array
(MonthSlots) when the bundle allows, and is grouped by codes of its account and product, not by
their text. The few periods the engine raises get a second, filtered pass with buckets of a UTC
day, cut the same way (`aggregate_days`): their drill-down series and day-level statistics.
Day buckets for everything would cost twice the time: the scan is cheap, it is grouping 30
times more buckets that is not.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa

from core.duck import epoch_micros, floor_div_sql, register_columns
from core.errors import BundleError, Problem
from core.model import (
    EARLIEST,
    ID_EXPECTED,
    LATEST,
    MAX_ID_LENGTH,
    MAX_USAGE_UNITS,
    TIME_RANGE_EXPECTED,
    SubscriptionPeriod,
    UsageSource,
    shortened,
)

UNITS_SQL_TYPE = "DECIMAL(38, 9)"
UNITS_SCALE = 9  # units are counted to 9 decimal places; a Parquet decimal with more is converted to UNITS_SQL_TYPE
# Units of one row are >= 0 and below MAX_UNITS (core.model.MAX_USAGE_UNITS, 10^18: no meter reports that many in
# one event, nor in a day of events each below the ingest API's 10^15). The bound keeps every sum exact: units are
# summed as DECIMAL(38, 9) (< 10^29), HUGEINT (integer Parquet) or DECIMAL(38, s <= 9) (decimal Parquet), and a
# sum of N rows stays below N * 10^18: 10^26 for 100M rows, and within DECIMAL(38, 9) up to 10^11 rows. Checked
# before anything is summed.
MAX_UNITS = int(MAX_USAGE_UNITS)
# The one definition of readable, allowed units: the check of a table and the naming of its bad rows
# (_units_problem says which rule a row breaks) both use it.
BAD_UNITS_SQL = f"units IS NULL OR units < 0 OR units >= {MAX_UNITS}"
UNITS_BOUND_EXPECTED = f"units below {MAX_UNITS:,} (10^18) in one row"
# A CSV timestamp is read only with an offset or Z (hours 00-23, minutes 00-59, as Python reads them
# in the other tables; DuckDB would take +25:00 or +99:99), or as a date (midnight UTC).
OFFSET_PATTERN = r"([Zz]|[+-]([01]\d|2[0-3])(:?[0-5]\d)?|^\d{4}-\d{2}-\d{2})$"
MAX_ROWS_NAMED = 20
DAY_US = 86_400_000_000
# Usage must fall where a calendar month and the month after it exist as Python datetimes
# (core.model.EARLIEST, LATEST: [0001-01-01, 9999-12-01)), in epoch µs.
FIRST_US, END_US = epoch_micros(EARLIEST), epoch_micros(LATEST)
Unit = Literal["day", "month"]
# Anniversary billing: every event looks up the period boundaries inside its month of its account
# and product. Up to this many (account, product, month) keys and SLOTS_MAX boundaries in a month,
# they are in a table of plain columns with a row for every key (16 MB per column at most), which
# DuckDB joins by array lookup (a perfect hash join; it makes none for a list column or an outer
# join): the month buckets of a table of 10M events then cost ~0.45 s instead of ~0.7 s with a
# hash join on account, product and month. Weekly billing puts up to 5 boundaries in a month.
DENSE_KEYS_MAX = 1 << 21
SLOTS_MAX = 6
NO_CUT = 2**63 - 1  # an empty slot: no instant is at or after it


def unit_start_sql(unit: Unit, column: str) -> str:
    """SQL: start of the UTC day or month (epoch µs) containing `column` (epoch µs). Days use
    integer arithmetic, far cheaper than calendar functions; months truncate a plain TIMESTAMP,
    which is UTC here and, unlike TIMESTAMPTZ, needs no time-zone library."""
    if unit == "day":
        return f"{floor_div_sql(column, DAY_US)} * {DAY_US}"
    return f"epoch_us(date_trunc('month', make_timestamp({column})))"


def register_periods(con: duckdb.DuckDBPyConnection, subscriptions: Sequence[SubscriptionPeriod]) -> None:
    """Table `periods(pid, account_id, product_key, start_us, end_us)`, pid indexing
    `subscriptions`: where the usage buckets are cut, and what the engine assigns them to."""
    # Billing periods share boundaries (calendar billing: a few). A dict, not lru_cache: its key for a
    # datetime is a list, and 160k of those wake the cyclic GC (~0.1 s with a bundle loaded).
    known: dict[datetime, int] = {}

    def epoch_us(instant: datetime) -> int:
        micros = known.get(instant)
        if micros is None:
            micros = known[instant] = epoch_micros(instant)
        return micros

    register_columns(con, "periods", {
        "pid": ("BIGINT", range(len(subscriptions))),
        "account_id": ("VARCHAR", [s.account_id for s in subscriptions]),
        "product_key": ("VARCHAR", [s.product_key for s in subscriptions]),
        "start_us": ("BIGINT", [epoch_us(s.period_start) for s in subscriptions]),
        "end_us": ("BIGINT", [epoch_us(s.period_end) for s in subscriptions]),
    })


def register_cuts(con: duckdb.DuckDBPyConnection, unit: Unit) -> bool:
    """Fill temp table `<unit>_cuts(account_id, product_key, unit_us, cuts)` from table
    `periods(account_id, product_key, start_us, end_us)`: per account, product and UTC day or
    month, the sorted period boundaries strictly inside it. Returns whether there is any (calendar
    billing has none, and its aggregation skips the join)."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {unit}_cuts AS
        SELECT account_id, product_key, unit_us, min(cut) AS first_cut, count(*) AS n, list(cut ORDER BY cut) AS cuts
        FROM (SELECT DISTINCT account_id, product_key, cut, {unit_start_sql(unit, 'cut')} AS unit_us
              FROM (SELECT account_id, product_key, start_us AS cut FROM periods
                    UNION ALL SELECT account_id, product_key, end_us FROM periods))
        WHERE cut <> unit_us
        GROUP BY ALL""")
    (cuts,) = con.execute(f"SELECT count(*) FROM {unit}_cuts").fetchall()[0]
    return bool(cuts)


def _month_sql(column: str) -> str:
    """SQL: the UTC month of `column` (epoch µs) as months since January of year 0. Two date parts
    cost a quarter of truncating to the month start; the start is computed per bucket instead."""
    return f"year(make_timestamp({column})) * 12 + month(make_timestamp({column})) - 1"


@dataclass(frozen=True)
class MonthSlots:
    """Table `month_cut_slots(key, cut_1 .. cut_<slots>)`: the boundaries of `month_cuts` (sorted,
    NO_CUT where a month has fewer) with a row for every key. A key is a number: the codes of the
    account and product in ENUM types `account_code` and `product_code`, times the months from
    `first_month` on; -1 stands for unknown accounts and products and for every month outside
    those (none has a boundary)."""

    products: int
    first_month: int
    months: int
    slots: int

    def key_sql(self, account: str, product: str, month: str) -> str:
        last = self.first_month + self.months - 1
        pair = f"CAST(enum_code({account}) AS BIGINT) * {self.products} + enum_code({product})"
        return (f"coalesce(CASE WHEN {month} BETWEEN {self.first_month} AND {last} "
                f"THEN ({pair}) * {self.months} + {month} - {self.first_month} END, -1)")


def register_month_slots(con: duckdb.DuckDBPyConnection) -> MonthSlots | None:
    """Fill table `month_cut_slots` (see MonthSlots) and create the ENUM types of its key, from
    tables `month_cuts` (register_cuts), `known_accounts` and `known_products`. Returns None when
    there would be more than DENSE_KEYS_MAX keys or a month has more than SLOTS_MAX boundaries:
    events then join `month_cuts` itself."""
    accounts, products, first, last, most = con.execute(f"""
        SELECT (SELECT count(*) FROM known_accounts), (SELECT count(*) FROM known_products),
               min({_month_sql('unit_us')}), max({_month_sql('unit_us')}), max(n)
        FROM month_cuts""").fetchall()[0]
    months = last - first + 1
    keys = accounts * products * months
    if keys > DENSE_KEYS_MAX or most > SLOTS_MAX:
        return None
    con.execute("CREATE TYPE account_code AS ENUM (SELECT account_id FROM known_accounts)")
    con.execute("CREATE TYPE product_code AS ENUM (SELECT product_key FROM known_products)")
    slots = MonthSlots(products, first, months, most)
    key = slots.key_sql("CAST(account_id AS account_code)", "CAST(product_key AS product_code)",
                        _month_sql("unit_us"))
    columns = ", ".join(f"coalesce(c.cuts[{i}], {NO_CUT}) AS cut_{i}" for i in range(1, most + 1))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE month_cut_slots AS
        SELECT r.key, {columns}
        FROM range(-1, {keys}) r(key) LEFT JOIN (SELECT {key} AS key, cuts FROM month_cuts) c ON c.key = r.key""")
    return slots


def slotted_month_buckets_sql(scan: str, slots: MonthSlots, need_max: bool) -> str:
    """SQL of the month buckets of the events of `scan`, cut at `month_cut_slots`: account_id,
    product_key, bucket_us, units_sum, units_max (NULL unless `need_max`). Events are grouped by
    account and product codes, month and how many cuts of the month lie at or before them; names
    and bucket starts are looked up per bucket. An unknown account or product gives a NULL name, an
    unreadable timestamp or one outside FIRST_US..END_US a NULL bucket."""
    numbers = range(1, slots.slots + 1)
    return f"""
        WITH events AS (
            SELECT account, product, month, ts_us, units, {slots.key_sql('account', 'product', 'month')} AS key
            FROM (SELECT TRY_CAST(account_id AS account_code) AS account,
                         TRY_CAST(product_key AS product_code) AS product,
                         CASE WHEN ts_us >= {FIRST_US} AND ts_us < {END_US} THEN {_month_sql('ts_us')} END AS month,
                         ts_us, units
                  FROM {scan})),
        grouped AS (
            SELECT e.account, e.product, e.month,
                   {" + ".join(f"CAST(e.ts_us >= c.cut_{i} AS INTEGER)" for i in numbers)} AS cuts_before,
                   sum(e.units) AS units_sum, {"max(e.units)" if need_max else "NULL"} AS units_max
            FROM events e JOIN month_cut_slots c ON c.key = e.key
            GROUP BY ALL)
        SELECT CAST(g.account AS VARCHAR) AS account_id, CAST(g.product AS VARCHAR) AS product_key,
               CASE WHEN g.cuts_before = 0 THEN epoch_us(make_timestamp(g.month // 12, g.month % 12 + 1, 1, 0, 0, 0))
                    ELSE [{", ".join(f"c.cut_{i}" for i in numbers)}][g.cuts_before]
               END AS bucket_us, g.units_sum, g.units_max
        FROM grouped g JOIN month_cut_slots c ON c.key = {slots.key_sql('g.account', 'g.product', 'g.month')}"""


@dataclass(frozen=True)
class UsageStats:
    name: str
    events: int
    duplicates: int


def _units_expression(source: UsageSource, column_type: str = "") -> str:
    """Keep integer and decimal Parquet columns native (exact, fast sums); text, floats and decimals
    of more than UNITS_SCALE places -> DECIMAL(38, 9) (a sum of DECIMAL(38, 18) would overflow at
    10^20 units). `column_type`: DuckDB's type of the Parquet column."""
    if source.table is not None:
        return f"TRY_CAST(units AS {UNITS_SQL_TYPE})"
    scale = re.fullmatch(r"DECIMAL\(\d+,\s*(\d+)\)", column_type)
    if source.units_type == "integer" or (source.units_type == "decimal" and scale and int(scale[1]) <= UNITS_SCALE):
        return "units"
    return f"TRY_CAST(units AS {UNITS_SQL_TYPE})"


def _epoch_us_sql(ts_type: str) -> str:
    """SQL: epoch µs of a Parquet `ts` column of DuckDB type `ts_type`, naive ones read as UTC.
    Seconds, milliseconds and microseconds arrive as TIMESTAMP(TZ); nanoseconds (TIMESTAMP_NS,
    TIMESTAMPTZ_NS, which epoch_us does not take or would round) are floored to the microsecond,
    which never moves an event across a period or day: every boundary is a whole microsecond."""
    if ts_type.endswith("_NS"):
        return floor_div_sql("epoch_ns(ts)", 1000)
    return "epoch_us(ts)"


def _register_source(con: duckdb.DuckDBPyConnection, source: UsageSource, view: str, *, locate: bool = False) -> None:
    """Create view `view`: account_id, product_key, ts (TIMESTAMPTZ or TIMESTAMPTZ_NS), ts_us (epoch µs), units.

    `locate` adds the raw values and a row locator `__row` (Parquet: 1-based row in the file) for
    naming bad rows; the fast path leaves it out so the scan reads only the needed columns.
    """
    event_id = ", CAST(event_id AS VARCHAR) AS event_id" if source.has_event_id else ""
    if source.table is not None:
        table = source.table.append_column("__row", pa.array(np.arange(2, source.table.num_rows + 2)))
        con.register(f"{view}_raw", table)
        ts = f"CASE WHEN regexp_matches(ts, '{OFFSET_PATTERN}') THEN TRY_CAST(ts AS TIMESTAMPTZ) END"
        con.execute(f"""
            CREATE OR REPLACE TEMP VIEW {view} AS
            SELECT account_id, product_key, ts, epoch_us(ts) AS ts_us, units, ts_raw, units_raw, __row{event_id}
            FROM (SELECT account_id, product_key, {ts} AS ts, {_units_expression(source)} AS units,
                         ts AS ts_raw, units AS units_raw, __row{event_id} FROM {view}_raw)""")
        return
    path = str(source.path).replace("'", "''")
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT ts, units "
                             f"FROM read_parquet('{path}'))").fetchall())
    ts = "timezone('UTC', ts)" if source.ts_naive else "ts"
    extra = ", CAST(ts AS VARCHAR) AS ts_raw, CAST(units AS VARCHAR) AS units_raw, file_row_number + 1 AS __row"
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW {view} AS SELECT
          CAST(account_id AS VARCHAR) AS account_id, CAST(product_key AS VARCHAR) AS product_key,
          {ts} AS ts, {_epoch_us_sql(types["ts"])} AS ts_us,
          {_units_expression(source, types["units"])} AS units{extra if locate else ""}{event_id}
        FROM read_parquet('{path}'{", file_row_number = true" if locate else ""})""")


def _duplicates(con: duckdb.DuckDBPyConnection, source: UsageSource, view: str) -> tuple[str, int, list[str]]:
    """Return the view to aggregate (deduplicated when needed), the duplicate count and examples.

    The first delivery of an event_id wins (earliest timestamp; equal timestamps are decided by
    the row's content, so the choice never depends on file order). Only the duplicated ids go
    through the window: the deduplicated view is the events whose id is not duplicated, plus one
    materialized row per duplicated id, so scanning it again (checks, daily evidence) costs an
    anti-join, not a sort of every event.
    """
    if not source.has_event_id:
        return view, 0, []
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {view}_dup_ids AS
        SELECT event_id, count(*) - 1 AS extra, min(ts_us) AS first_us FROM {view}
        WHERE event_id IS NOT NULL GROUP BY event_id HAVING count(*) > 1""")
    (dups,) = con.execute(f"SELECT coalesce(sum(extra), 0) FROM {view}_dup_ids").fetchall()[0]
    if not dups:
        return view, 0, []
    examples = [row[0] for row in con.execute(
        f"SELECT event_id FROM {view}_dup_ids ORDER BY first_us, event_id LIMIT 3").fetchall()]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {view}_firsts AS
        SELECT * FROM {view} WHERE event_id IN (SELECT event_id FROM {view}_dup_ids)
        QUALIFY row_number() OVER (PARTITION BY event_id
                                   ORDER BY ts_us, account_id, product_key, units) = 1""")
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW {view}_dedup AS
        SELECT * FROM {view}
        WHERE event_id IS NULL OR event_id NOT IN (SELECT event_id FROM {view}_dup_ids)
        UNION ALL BY NAME SELECT * FROM {view}_firsts""")
    return f"{view}_dedup", int(dups), examples


def _name_bad_rows(con: duckdb.DuckDBPyConnection, source: UsageSource, view: str) -> list[Problem]:
    """Second scan, only on failure: locate the offending rows."""
    _register_source(con, source, view, locate=True)
    rows = con.execute(f"""
        SELECT __row, account_id, product_key, ts IS NOT NULL, ts_us >= {FIRST_US} AND ts_us < {END_US}, ts_raw,
               units, units_raw, {BAD_UNITS_SQL} AS units_bad,
               account_id IN (SELECT account_id FROM known_accounts) AS account_ok,
               product_key IN (SELECT product_key FROM known_products) AS product_ok
        FROM {view}
        WHERE ts IS NULL OR ts_us < {FIRST_US} OR ts_us >= {END_US} OR {BAD_UNITS_SQL}
           OR account_id IS NULL OR account_id NOT IN (SELECT account_id FROM known_accounts)
           OR product_key IS NULL OR product_key NOT IN (SELECT product_key FROM known_products)
        ORDER BY __row LIMIT {MAX_ROWS_NAMED}""").fetchall()
    problems = []
    for row, account, product, ts_ok, ts_in_range, ts_raw, units, units_raw, units_bad, account_ok, product_ok in rows:
        if not account_ok:
            problems.append(_unknown(source, row, "account_id", account, "an account_id from accounts.csv"))
        if not product_ok:
            problems.append(_unknown(source, row, "product_key", product, "a product_key from products.csv"))
        if not ts_ok:
            problems.append(Problem(source.name, "an ISO 8601 timestamp with an offset or Z", row, "ts", ts_raw))
        elif not ts_in_range:
            problems.append(Problem(source.name, TIME_RANGE_EXPECTED, row, "ts", ts_raw))
        if units_bad:
            problems.append(Problem(source.name, _units_problem(units, units_raw), row, "units", units_raw))
    return problems


def _units_problem(units: Decimal | int | None, raw: str | None) -> str:
    """The rule of BAD_UNITS_SQL that a row's units break, as expected text. `units` as counted (None:
    unreadable, or beyond DECIMAL(38, 9)), `raw` as written."""
    if units is None and raw is not None:
        with contextlib.suppress(InvalidOperation):
            if (number := Decimal(raw.strip())).is_finite() and abs(number) >= MAX_UNITS:
                units = number  # a number too large for DECIMAL(38, 9): say what is wrong with it
    if units is None:
        return "a decimal number of units"
    if units < 0:
        return "units >= 0"
    return UNITS_BOUND_EXPECTED


def _unknown(source: UsageSource, row: int, column: str, value: str | None, expected: str) -> Problem:
    """An id that is in no dimension table. One longer than an identifier may be is named as such: the
    dimension tables refuse those, so the happy path needs no check of its own (and no extra scan)."""
    if value is not None and len(value) > MAX_ID_LENGTH:
        return Problem(source.name, ID_EXPECTED, row, column, shortened(value))
    return Problem(source.name, expected, row, column, value)


def bucketed_events_sql(scan: str, unit: Unit, split: bool) -> str:
    """SQL of the events of `scan` (account_id, product_key, ts_us, units) with their bucket:
    account_id, product_key, bucket_us, units. When `split`, the events join `<unit>_cuts` and the
    bucket starts at the last cut at or before the event (the list is only read when a unit holds
    several cuts); a NULL timestamp gives a NULL bucket. This join on account, product and month
    is ~40% of the month-bucket scan, so the engine's month buckets take `slotted_month_buckets_sql`
    where they can (cut days instead would join only the few events of a boundary day, but group
    30 times more buckets: 8% faster at 100M events, no faster at 10M, and twice the memory)."""
    if not split:
        return f"SELECT account_id, product_key, {unit_start_sql(unit, 'ts_us')} AS bucket_us, units FROM {scan}"
    return f"""
        SELECT e.account_id, e.product_key, e.units,
               CASE WHEN c.cuts IS NULL OR e.ts_us < c.first_cut THEN e.unit_us
                    WHEN c.n = 1 THEN c.first_cut
                    ELSE list_last(list_filter(c.cuts, lambda cut: cut <= e.ts_us))
               END AS bucket_us
        FROM (SELECT *, {unit_start_sql(unit, 'ts_us')} AS unit_us FROM {scan}) e LEFT JOIN {unit}_cuts c
          ON e.account_id = c.account_id AND e.product_key = c.product_key AND e.unit_us = c.unit_us"""


def _create_buckets(con: duckdb.DuckDBPyConnection, table: str, scan: str, unit: Unit, split: bool,
                    need_max: bool) -> None:
    """Only the aggregates the engine needs (max only for seat-like products): each extra one
    costs ~5% of the scan."""
    units_max = "max(units)" if need_max else "NULL"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT account_id, product_key, bucket_us, sum(units) AS units_sum, {units_max} AS units_max
        FROM ({bucketed_events_sql(scan, unit, split)}) GROUP BY ALL""")


def aggregate_days(con: duckdb.DuckDBPyConnection, side: str, pairs: str, split: bool, need_max: bool) -> None:
    """Fill temp table `days_<side>`: day buckets of the events (as aggregate_usage counted them) of
    the account and product pairs in table `pairs`; when `split`, cut at `day_cuts`."""
    scan = f"""(SELECT e.* FROM events_{side} e SEMI JOIN {pairs} p
                ON e.account_id = p.account_id AND e.product_key = p.product_key)"""
    _create_buckets(con, f"days_{side}", scan, "day", split, need_max)


def aggregate_usage(con: duckdb.DuckDBPyConnection, source: UsageSource, side: str, split: bool,
                    need_max: bool = True, slots: MonthSlots | None = None) -> tuple[UsageStats, list[str]]:
    """Fill temp table `buckets_<side>` (months, cut at `month_cuts` when `split`, through
    `month_cut_slots` when there are `slots`) and view `events_<side>` (the events counted); raise
    BundleError naming bad rows. Returns stats and warnings. Expects tables
    `known_accounts(account_id)` and `known_products(product_key)`.
    """
    view = f"usage_{side}"
    _register_source(con, source, view)
    scan, duplicates, examples = _duplicates(con, source, view)
    # Bad units are counted first, by a filter of their own, which the row-group statistics of an
    # integer or decimal Parquet column answer without reading the data when the file is clean (text
    # and float units are converted, so there it is a second pass over units): units beyond
    # MAX_UNITS could overflow the sums. Like the buckets, the checks see what is counted: a
    # duplicate event_id that is dropped is not checked.
    (bad_units,) = con.execute(f"SELECT count(*) FROM {scan} WHERE {BAD_UNITS_SQL}").fetchall()[0]
    if bad_units:
        raise BundleError(_name_bad_rows(con, source, view))
    con.execute(f"CREATE OR REPLACE TEMP VIEW events_{side} AS SELECT * FROM {scan}")
    if slots is None:
        _create_buckets(con, f"buckets_{side}", scan, "month", split, need_max)
    else:
        sql = slotted_month_buckets_sql(scan, slots, need_max)
        con.execute(f"CREATE OR REPLACE TEMP TABLE buckets_{side} AS {sql}")
    # A NULL bucket is an unreadable timestamp, one outside FIRST_US..END_US a timestamp out of range.
    (bad_ts, unknown) = con.execute(f"""
        SELECT count(*) FILTER (WHERE bucket_us IS NULL OR bucket_us < {FIRST_US} OR bucket_us >= {END_US}),
               count(*) FILTER (WHERE account_id IS NULL OR product_key IS NULL
                   OR account_id NOT IN (SELECT account_id FROM known_accounts)
                   OR product_key NOT IN (SELECT product_key FROM known_products))
        FROM buckets_{side}""").fetchall()[0]
    # Counted on the raw table, which Parquet metadata answers without a scan (a count per bucket
    # would cost ~10% of the aggregation); the dropped duplicates are known.
    (events,) = con.execute(f"SELECT count(*) FROM {view}").fetchall()[0]
    if bad_ts or unknown:
        raise BundleError(_name_bad_rows(con, source, view))
    warnings = []
    if duplicates:
        warnings.append(f"{source.name}: {duplicates} duplicate event_id(s) counted once "
                        f"(e.g. {', '.join(examples)})")
    return UsageStats(source.name, int(events) - duplicates, duplicates), warnings
