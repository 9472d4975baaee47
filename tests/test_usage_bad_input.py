"""Usage tables as a review fed them: Parquet timestamps of every precision, CSV offsets out of range, units
too large to sum. Each bad value is refused by file, row, column, value and what was expected."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.bundle import load_bundle
from core.errors import BundleError, Problem
from core.reconcile import ReconcileParams, reconcile
from core.usage import MAX_UNITS, UNITS_SQL_TYPE, _create_buckets
from tests.bundles import AS_OF, Scenario

# 2026-01-31T23:59:59.999999999Z: the last nanosecond of January, which rounding to the µs would move to February
LAST_NS_OF_JAN = int(datetime(2026, 2, 1, tzinfo=UTC).timestamp()) * 10**9 - 1
FEB_1_NS = int(datetime(2026, 2, 1, tzinfo=UTC).timestamp()) * 10**9


def problems(folder: Path) -> list[Problem]:
    with pytest.raises(BundleError) as caught:
        reconcile(load_bundle(folder), ReconcileParams(as_of=AS_OF))
    return caught.value.problems


def billed_january() -> Scenario:
    """acme subscribed to api for January and billed for 40 units; the usage is the test's."""
    return Scenario().sub("acme", "api", "p_api").invoice("acme", "api", "40", "4.00")


def write_actual_parquet(folder: Path, ts: pa.Array, units: pa.Array) -> None:
    (folder / "actual_usage.csv").unlink()
    pq.write_table(pa.table({"account_id": ["acme"] * len(ts), "product_key": ["api"] * len(ts), "ts": ts,
                             "units": units}), folder / "actual_usage.parquet")


@pytest.mark.parametrize(("unit", "tz"), [
    ("ns", "UTC"), ("ns", "America/New_York"), ("ns", None), ("us", "+05:45"), ("us", None),
    ("ms", "UTC"), ("ms", None), ("s", "America/New_York"), ("s", None),
])
def test_parquet_timestamps_of_any_precision_count_in_the_period_of_their_instant(tmp_path: Path, unit: str,
                                                                                     tz: str | None) -> None:
    """The last instant of January that the precision holds counts in January (sub-µs parts are floored, never
    rounded into February), the first of February in February (no subscription: unbilled usage)."""
    folder = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", "40").write(tmp_path / "b")
    per_ns = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit]
    last_of_jan = (LAST_NS_OF_JAN + 1) // per_ns - 1
    write_actual_parquet(folder, pa.array([last_of_jan, FEB_1_NS // per_ns], pa.timestamp(unit, tz=tz)),
                         pa.array([100, 50], pa.int64()))
    result = reconcile(load_bundle(folder), ReconcileParams(as_of=AS_OF))
    found = {(a.type, a.period_start.month): (a.actual_units, a.reported_units) for a in result.anomalies}
    assert found == {("under_reported_usage", 1): (100, 40), ("unbilled_usage", 2): (50, 0)}
    jan = next(a for a in result.anomalies if a.period_start.month == 1)
    assert [d["day"] for d in jan.evidence["daily"] if Decimal(d["actual"])] == ["2026-01-31"]


@pytest.mark.parametrize("ts", [
    "2026-01-06T10:00:00+25:00", "2026-01-06T10:00:00+99:99", "2026-01-06T10:00:00-24:00",
    "2026-01-06T10:00:00+05:60", "2026-01-06T10:00:00+2500", "2026-01-06T10:00:00+24",
])
def test_csv_usage_offsets_out_of_range_are_refused(tmp_path: Path, ts: str) -> None:
    s = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", "40").use("acme", "api", ts, "5")
    (p,) = problems(s.write(tmp_path))
    assert (p.file, p.row, p.column, p.value) == ("actual_usage.csv", 3, "ts", ts)
    assert "offset" in p.expected


@pytest.mark.parametrize(("ts", "day"), [
    ("2026-01-06T01:00:00+23:59", "2026-01-05"), ("2026-01-06T20:00:00-05", "2026-01-07"),
    ("2026-01-06T05:45:00+0545", "2026-01-06"), ("2026-01-25", "2026-01-25"),  # a date: midnight UTC
])
def test_csv_usage_offsets_in_range_and_dates_are_read(tmp_path: Path, ts: str, day: str) -> None:
    s = billed_january().use("acme", "api", ts, "100", reported="40")
    result = reconcile(load_bundle(s.write(tmp_path)), ReconcileParams(as_of=AS_OF))
    (a,) = result.anomalies
    assert [d["day"] for d in a.evidence["daily"] if Decimal(d["actual"])] == [day]


@pytest.mark.parametrize("units", ["1e18", "1000000000000000000", "9e28", "1e27", "1e30", "1e400"])
def test_csv_units_of_10_to_the_18_or_more_are_refused(tmp_path: Path, units: str) -> None:
    s = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", units, reported="40").use(
        "acme", "api", "2026-01-06T10:00:00Z", units, reported="")
    found = problems(s.write(tmp_path))
    assert [(p.file, p.row, p.column, p.value) for p in found] == [
        ("actual_usage.csv", 2, "units", units), ("actual_usage.csv", 3, "units", units)]
    assert all("1,000,000,000,000,000,000" in p.expected for p in found), found


def test_csv_units_just_below_the_bound_are_summed_exactly(tmp_path: Path) -> None:
    most = "999999999999999999.999999999"
    s = Scenario().price("p_tiny", "api", "per_unit", "0.000001").sub("acme", "api", "p_tiny")
    for day in (5, 6, 7):
        s.use("acme", "api", f"2026-01-0{day}T10:00:00Z", most, reported="1")
    result = reconcile(load_bundle(s.write(tmp_path)), ReconcileParams(as_of=AS_OF))
    (a,) = result.anomalies
    assert a.actual_units == Decimal(most) * 3 == Decimal("2999999999999999999.999999997")


@pytest.mark.parametrize(("units", "shown"), [
    (pa.array([5, MAX_UNITS], pa.int64()), str(MAX_UNITS)),
    (pa.array([5, 2**64 - 1], pa.uint64()), str(2**64 - 1)),
    (pa.array([5.0, 1e27], pa.float64()), "1e+27"),
    (pa.array([5.0, 1e30], pa.float64()), "1e+30"),  # beyond DECIMAL(38, 9)
    (pa.array([Decimal(5), Decimal(MAX_UNITS)], pa.decimal128(38, 18)), f"{MAX_UNITS}.000000000000000000"),
    (pa.array([Decimal(5), Decimal(10**30)], pa.decimal128(38, 0)), str(10**30)),
])
def test_parquet_units_of_10_to_the_18_or_more_are_refused(tmp_path: Path, units: pa.Array, shown: str) -> None:
    folder = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", "40").write(tmp_path / "b")
    ts = pa.array([datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 6, tzinfo=UTC)], pa.timestamp("us", "UTC"))
    write_actual_parquet(folder, ts, units)
    (p,) = problems(folder)
    assert (p.file, p.row, p.column, p.value) == ("actual_usage.parquet", 2, "units", shown)
    assert "1,000,000,000,000,000,000" in p.expected


def test_parquet_decimals_of_18_places_at_the_bound_sum_without_overflow(tmp_path: Path) -> None:
    """DECIMAL(38, 18) (Spark's default) holds < 10^20 units, so DuckDB's native sum of 200,001 events just
    below the bound overflowed; such a column is counted to 9 places instead, like text."""
    folder = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", "40").write(tmp_path / "b")
    events, most = 200_001, Decimal(MAX_UNITS - 1) + Decimal("0.5")
    ts = pa.array([datetime(2026, 1, 5, tzinfo=UTC)] * events, pa.timestamp("us", "UTC"))
    write_actual_parquet(folder, ts, pa.array([most] * events, pa.decimal128(38, 18)))
    result = reconcile(load_bundle(folder), ReconcileParams(as_of=AS_OF))
    (a,) = result.anomalies
    assert a.actual_units == most * events


@pytest.mark.slow
def test_100m_events_at_the_bound_sum_exactly_in_the_engine_types() -> None:
    """The engine's month buckets (then summed over the period, as reconcile does) of 100M events just below
    MAX_UNITS, in DECIMAL(38, 9), the type with the least room (< 10^29) of those units are summed in."""
    con = duckdb.connect()
    most = f"{MAX_UNITS - 1}.999999999"
    scan = (f"(SELECT 'acme' AS account_id, 'api' AS product_key, i AS ts_us, CAST('{most}' AS {UNITS_SQL_TYPE}) "
            f"AS units FROM range(100000000) r(i))")
    _create_buckets(con, "buckets", scan, "month", False, need_max=True)
    (total,) = con.execute("SELECT CAST(sum(units_sum) AS VARCHAR) FROM buckets").fetchall()[0]
    assert Decimal(total) == Decimal(most) * 100_000_000


def test_units_as_the_cli_reports_them(tmp_path: Path) -> None:
    """Two rows of 9e28 used to overflow DuckDB's sum (exit 1); now each is named (exit 2)."""
    from tests.run_cli import run_cli

    s = billed_january().use("acme", "api", "2026-01-05T10:00:00Z", "9e28").use(
        "acme", "api", "2026-01-06T10:00:00Z", "9e28", reported="40")
    folder = s.write(tmp_path / "b")
    done = run_cli("reconcile", str(folder), "--output", str(tmp_path / "out.csv"))
    assert done.returncode == 2
    err = " ".join(done.stderr.split())
    assert "actual_usage.csv, row 2, column 'units': got '9e28'; expected units below 1,000,000,000,000,000,000" in err
    assert "actual_usage.csv, row 3, column 'units'" in err and not (tmp_path / "out.csv").exists()
