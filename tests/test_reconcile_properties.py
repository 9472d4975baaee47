"""Engine invariants under generated scenarios (hypothesis)."""

from __future__ import annotations

import random
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.reconcile import ReconcileResult
from tests.bundles import FEB, JAN, MAR, Scenario

event = st.tuples(st.sampled_from(["acme", "beta"]), st.sampled_from(["api", "seats"]),
                  st.integers(min_value=0, max_value=59 * 24 - 1), st.integers(min_value=0, max_value=500),
                  st.integers(min_value=0, max_value=500))
scenario = st.lists(event, min_size=1, max_size=25)
billing = st.lists(st.integers(min_value=0, max_value=20_000), min_size=4, max_size=4)
START = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def build(events: list[tuple[str, str, int, int, int]], amounts: list[int], *, reported_equals_actual: bool = False,
          shuffle: int | None = None) -> Scenario:
    s = Scenario()
    for account in ("acme", "beta"):
        s.sub(account, "api", "p_api", JAN, FEB)
        s.sub(account, "seats", "p_seats", FEB, MAR)
    for i, (account, product, hour, actual, reported) in enumerate(events):
        ts = (START + timedelta(hours=hour)).strftime("%Y-%m-%dT%H:%M:%SZ")
        s.actual.append([account, product, ts, str(actual), f"e{i}"])
        s.reported.append([account, product, ts, str(actual if reported_equals_actual else reported)])
    for (account, product, start, end), cents in zip(
            [("acme", "api", JAN, FEB), ("beta", "api", JAN, FEB), ("acme", "seats", FEB, MAR),
             ("beta", "seats", FEB, MAR)], amounts, strict=True):
        s.invoice(account, product, "0", str(D(cents) / 100), start, end)
    if shuffle is not None:
        rng = random.Random(shuffle)
        for rows in (s.accounts, s.prices, s.subscriptions, s.invoice_lines, s.actual, s.reported):
            rng.shuffle(rows)
    return s


def run(s: Scenario) -> ReconcileResult:
    with tempfile.TemporaryDirectory() as folder:
        return s.run(Path(folder))


@SETTINGS
@given(scenario, billing)
def test_leak_is_never_negative(events: list, amounts: list[int]) -> None:
    for a in run(build(events, amounts)).anomalies:
        assert a.leak_amount >= 0 and a.leak_units >= 0 and a.overbilled_amount >= 0
        assert (a.leak_amount > 0) == (a.type != "over_billing")


@SETTINGS
@given(scenario, billing, st.integers(min_value=0, max_value=10**6))
def test_row_order_changes_nothing(events: list, amounts: list[int], seed: int) -> None:
    def key(result: ReconcileResult) -> list:
        return [(a.fingerprint, a.leak_amount, a.confidence, a.evidence["daily"]) for a in result.anomalies]
    assert key(run(build(events, amounts))) == key(run(build(events, amounts, shuffle=seed)))


@SETTINGS
@given(scenario, billing)
def test_reported_equal_to_actual_clears_under_reporting(events: list, amounts: list[int]) -> None:
    types = {a.type for a in run(build(events, amounts, reported_equals_actual=True)).anomalies}
    assert "under_reported_usage" not in types
