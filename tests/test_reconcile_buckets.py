"""Period assignment against a per-event reference, at any boundary precision.

The engine never looks at single events: it sums them into month buckets cut at the
billing-period boundaries inside each, and the raised periods' days in a second pass. This
checks that shortcut against the definition (an event belongs to the period containing its UTC
timestamp, half-open; else to its calendar month) with boundaries at arbitrary microseconds,
several in one day, and events exactly at or a microsecond before them.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.usage
from core.bundle import load_bundle
from core.duck import register_columns
from core.errors import BundleError
from core.reconcile import reconcile
from core.usage import SLOTS_MAX, register_cuts, register_month_slots, register_periods
from tests.bundles import FEB, JAN, Scenario

START = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
PAIRS = [("acme", "api"), ("acme", "seats"), ("beta", "api")]

# An instant within Jan-Mar 2026: a day, and either midnight or an arbitrary microsecond of it.
instant = st.builds(lambda day, micro: START + timedelta(days=day, microseconds=micro),
                    st.integers(min_value=0, max_value=80),
                    st.one_of(st.just(0), st.integers(min_value=1, max_value=86_400 * 10**6 - 1)))
# Per pair: the boundaries of consecutive periods, and which of those periods exist (gaps are
# unsubscribed usage).
pair_periods = st.tuples(st.lists(instant, min_size=2, max_size=6, unique=True),
                         st.lists(st.booleans(), min_size=5, max_size=5))
# An event: pair, then either near a boundary (index, offset 0 or -1 µs) or anywhere; units.
event = st.tuples(st.integers(min_value=0, max_value=len(PAIRS) - 1),
                  st.one_of(st.tuples(st.integers(min_value=0, max_value=5), st.sampled_from([0, -1])), instant),
                  st.integers(min_value=1, max_value=50))


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def month_of(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pair_periods, min_size=len(PAIRS), max_size=len(PAIRS)), st.lists(event, min_size=1, max_size=40),
       st.sampled_from(["csv", "parquet"]))
def test_period_and_day_totals_match_a_per_event_reference(layout: list, events: list, usage_format: str) -> None:
    s = Scenario()
    periods: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
    for (account, product), (bounds, keep) in zip(PAIRS, layout, strict=True):
        bounds = sorted(bounds)
        spans = zip(bounds, bounds[1:], keep, strict=False)
        periods[(account, product)] = [(start, end) for start, end, kept in spans if kept]
        for start, end in periods[(account, product)]:
            s.sub(account, product, f"p_{product}", iso(start), iso(end))
    # reference: per period (subscription, else calendar month) the sum / max of units, and per day the same
    totals: dict[tuple, list[int]] = defaultdict(list)
    days: dict[tuple, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for pair_index, where, units in events:
        account, product = PAIRS[pair_index]
        if isinstance(where, tuple):
            bounds = sorted(layout[pair_index][0])
            moment = bounds[min(where[0], len(bounds) - 1)] + timedelta(microseconds=where[1])
        else:
            moment = where
        s.use(account, product, iso(moment), str(units), reported="")
        period = next(((a, b) for a, b in periods[(account, product)] if a <= moment < b), None) or month_of(moment)
        totals[(account, product, *period)].append(units)
        days[(account, product, *period)][moment.date().isoformat()].append(units)

    with tempfile.TemporaryDirectory() as folder:
        result = s.run(Path(folder), usage_format, min_leak_amount=D("0.01"))

    def combine(units: list[int], product: str) -> int:
        return max(units) if product == "seats" else sum(units)

    expected = {key: combine(units, key[1]) for key, units in totals.items()}
    got = {(a.account_id, a.product_key, a.period_start, a.period_end): a.actual_units for a in result.anomalies}
    assert got == expected
    for a in result.anomalies:
        key = (a.account_id, a.product_key, a.period_start, a.period_end)
        assert {d["day"]: D(d["actual"]) for d in a.evidence["daily"]} == {
            day: combine(units, a.product_key) for day, units in days[key].items()}


def test_the_general_month_path_matches_the_reference_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DENSE_KEYS_MAX keys (or SLOTS_MAX boundaries in a month) events join `month_cuts` on
    account, product and month instead of the dense slots; the reference above only meets the slots."""
    monkeypatch.setattr(core.usage, "DENSE_KEYS_MAX", 0)
    test_period_and_day_totals_match_a_per_event_reference()


def month_slots_of(bounds: list[datetime]) -> core.usage.MonthSlots | None:
    """What register_month_slots makes of consecutive periods of one account and product."""
    s = Scenario()
    for start, end in itertools.pairwise(bounds):
        s.sub("acme", "api", "p_api", iso(start), iso(end))
    with tempfile.TemporaryDirectory() as folder:
        bundle = load_bundle(s.write(Path(folder)))
    con = duckdb.connect()
    try:
        register_columns(con, "known_accounts", {"account_id": ("VARCHAR", list(bundle.accounts))})
        register_columns(con, "known_products", {"product_key": ("VARCHAR", list(bundle.products))})
        register_periods(con, bundle.subscriptions)
        assert register_cuts(con, "month")
        return register_month_slots(con)
    finally:
        con.close()


@pytest.mark.parametrize(("boundaries_in_january", "slots"), [(1, 1), (3, 3), (SLOTS_MAX, SLOTS_MAX),
                                                               (SLOTS_MAX + 1, None)])
def test_a_month_holds_up_to_slots_max_boundaries_in_slots(boundaries_in_january: int, slots: int | None) -> None:
    inside = [START + timedelta(days=3 * i + 1, seconds=37) for i in range(boundaries_in_january)]
    found = month_slots_of([START, *inside, START + 59 * DAY])  # to March 1st
    assert (found.slots if found else None) == slots


def test_too_many_keys_for_a_dense_table_take_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds = [START, START + timedelta(days=14, seconds=37), START + 40 * DAY]
    keys = 2 * 2 * 2  # accounts x products x months from the first boundary inside one to the last
    monkeypatch.setattr(core.usage, "DENSE_KEYS_MAX", keys)
    assert month_slots_of(bounds) == core.usage.MonthSlots(products=2, first_month=2026 * 12, months=2, slots=1)
    monkeypatch.setattr(core.usage, "DENSE_KEYS_MAX", keys - 1)
    assert month_slots_of(bounds) is None


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize(("column", "value"), [
    ("account_id", "ghost"), ("product_key", "ghost"), ("ts", "yesterday"),
    ("ts", "-0100-03-15T00:00:00Z"), ("ts", "0000-12-31T23:59:59Z"), ("ts", "9999-12-31T23:59:59Z"),
    ("ts", "10000-01-01T00:00:00Z"),
])
def test_bad_usage_rows_are_named_when_a_boundary_cuts_their_month(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   general: bool, column: str, value: str) -> None:
    """The month buckets cut at boundaries find unknown accounts and products and unreadable or
    out-of-range timestamps like calendar buckets do."""
    if general:
        monkeypatch.setattr(core.usage, "DENSE_KEYS_MAX", 0)
    mid = "2026-01-15T08:30:07.250000Z"
    s = Scenario().sub("acme", "api", "p_api", JAN, mid).sub("acme", "api", "p_api", mid, FEB)
    s.use("acme", "api", "2026-01-05T10:00:00Z", "100").use("acme", "api", "2026-01-20T10:00:00Z", "5")
    s.actual[1][["account_id", "product_key", "ts"].index(column)] = value
    with pytest.raises(BundleError) as caught:
        reconcile(load_bundle(s.write(tmp_path)))
    assert [(p.file, p.row, p.column, p.value) for p in caught.value.problems] == [
        ("actual_usage.csv", 3, column, value)]
