"""One scenario per anomaly type with exact amounts, and the noise that must not be flagged."""

from __future__ import annotations

from datetime import date
from decimal import Decimal as D
from pathlib import Path

import pytest

from core.bundle import load_bundle
from core.demo import generate_demo_bundle
from core.explain import AnomalyFacts, explain
from core.reconcile import Anomaly, ReconcileParams, reconcile
from tests.bundles import AS_OF, FEB, JAN, MAR, Scenario, only

GRADUATED = [{"up_to": 100, "unit_amount": "1.00", "flat_amount": "0"},
             {"up_to": None, "unit_amount": "0.50", "flat_amount": "10.00"}]


def explained_from_fields(a: Anomaly) -> str:
    """The sentence `core.explain` builds from what an anomaly stores: what the app shows must match the
    engine's stored text, so every fact it states has to be among the stored fields."""
    return explain(AnomalyFacts(
        kind=a.type, actual_units=a.actual_units, reported_units=a.reported_units, expected_amount=a.expected_amount,
        billed_amount=a.billed_amount, overbilled_amount=a.overbilled_amount, currency=a.currency,
        price_id=a.price_id, price_source=a.price_source, billing_price_id=a.evidence["billing_price_id"]))


def test_under_reported_usage(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api")
    s.use("acme", "api", "2026-01-05T10:00:00Z", "1000").use("acme", "api", "2026-01-06T10:00:00Z", "500", reported="")
    s.invoice("acme", "api", "1000", "100.00")
    a = only(s.run(tmp_path))
    assert (a.type, a.actual_units, a.reported_units, a.leak_units) == ("under_reported_usage", 1500, 1000, 500)
    assert (a.expected_amount, a.billed_amount, a.leak_amount) == (D("150.00"), D("100.00"), D("50.00"))
    assert a.price_source == "subscription" and a.subscription_id == "sub_acme_api"
    assert [d["day"] for d in a.evidence["daily"]] == ["2026-01-05", "2026-01-06"]
    assert a.evidence["daily"][1] == {"day": "2026-01-06", "actual": "500", "reported": "0"}
    assert set(a.confidence_factors) == {"mapping", "completeness", "persistence", "period_closed", "signal_to_noise"}
    assert 0 <= a.confidence <= 1 and a.severity in ("low", "medium", "high", "critical")
    assert a.explanation == explained_from_fields(a) == (
        "usage never reached billing: actual 1500 vs reported 1000 units; expected 150.00 USD under p_api "
        "(subscription), billed 100.00 USD")


def test_unbilled_usage_list_price_precedence(tmp_path: Path) -> None:
    s = Scenario()
    s.prices.append(["p_api_default", "api", "usd", "per_unit", "0.20", "", ""])
    s.use("beta", "api", "2026-01-10T00:00:00Z", "100")
    a = only(s.run(tmp_path / "first"))
    assert (a.type, a.expected_amount, a.price_source) == ("unbilled_usage", D("10.00"), "list:first")
    assert (a.period_start.isoformat(), a.period_end.isoformat()) == ("2026-01-01T00:00:00+00:00",
                                                                      "2026-02-01T00:00:00+00:00")
    s.products[0][4] = "p_api_default"
    a = only(s.run(tmp_path / "default"))
    assert (a.expected_amount, a.price_source) == (D("20.00"), "list:default")
    assert a.explanation == explained_from_fields(a) == (
        "usage with no subscription covering the product in this period: actual 100 vs reported 100 units; "
        "expected 20.00 USD under p_api_default (list:default), billed 0.00 USD")


def test_usage_after_cancellation_uses_the_previous_subscription_price(tmp_path: Path) -> None:
    s = Scenario()
    s.prices.append(["p_api_special", "api", "usd", "per_unit", "0.05", "", ""])
    s.sub("acme", "api", "p_api_special", JAN, FEB, status="canceled").invoice("acme", "api", "100", "5.00")
    s.use("acme", "api", "2026-01-15T00:00:00Z", "100")
    s.use("acme", "api", "2026-02-15T00:00:00Z", "300", reported="")
    a = only(s.run(tmp_path))
    assert (a.type, a.period_start.month, a.price_id, a.price_source) == (
        "unbilled_usage", 2, "p_api_special", "list:previous_subscription")
    assert (a.expected_amount, a.billed_amount, a.leak_amount) == (D("15.00"), D("0.00"), D("15.00"))


def test_a_contract_in_another_currency_than_the_subscription_is_renewal_drift(tmp_path: Path) -> None:
    """Nothing invoiced yet (an invoice in USD would not be compared with a EUR price): the subscription bills in
    USD what the contract prices in EUR. Comparing 100.00 USD with 90.00 EUR as numbers would call it a missed
    overage."""
    s = Scenario().price("p_api_eur", "api", "per_unit", "0.09", currency="eur")
    s.contracts.append(["acme", "api", JAN, "p_api_eur"])
    s.sub("acme", "api", "p_api").use("acme", "api", "2026-01-10T00:00:00Z", "1000")
    a = only(s.run(tmp_path))
    assert (a.type, a.currency, a.expected_amount, a.leak_amount) == ("renewal_drift", "eur", D("90.00"), D("90.00"))


def test_renewal_drift(tmp_path: Path) -> None:
    s = Scenario()
    s.prices.append(["p_api_2026", "api", "usd", "per_unit", "0.12", "", ""])
    s.contracts.append(["acme", "api", "2026-02-01T00:00:00Z", "p_api_2026"])
    s.sub("acme", "api", "p_api", JAN, FEB).sub("acme", "api", "p_api", FEB, MAR)
    s.subscriptions[1][0] = "sub_acme_api_2"
    s.use("acme", "api", "2026-01-10T00:00:00Z", "1000").use("acme", "api", "2026-02-10T00:00:00Z", "1000")
    s.invoice("acme", "api", "1000", "100.00").invoice("acme", "api", "1000", "100.00", FEB, MAR)
    a = only(s.run(tmp_path))  # January is before the uplift: clean
    assert (a.type, a.period_start.month, a.price_id, a.price_source) == ("renewal_drift", 2, "p_api_2026", "contract")
    assert (a.expected_amount, a.billed_amount, a.leak_amount) == (D("120.00"), D("100.00"), D("20.00"))
    assert a.evidence["billing_price_id"] == "p_api"
    assert a.explanation == explained_from_fields(a) == (
        "billed at p_api instead of the contract price p_api_2026: actual 1000 vs reported 1000 units; "
        "expected 120.00 USD under p_api_2026 (contract), billed 100.00 USD")


def test_missed_overage_graduated(tmp_path: Path) -> None:
    s = Scenario().price("p_grad", "api", "graduated", tiers=GRADUATED).sub("acme", "api", "p_grad")
    s.use("acme", "api", "2026-01-03T00:00:00Z", "150").invoice("acme", "api", "100", "100.00")
    a = only(s.run(tmp_path))  # 100 x 1.00 + 50 x 0.50 + 10.00 flat = 135.00
    assert (a.type, a.expected_amount, a.billed_amount, a.leak_amount) == (
        "missed_overage", D("135.00"), D("100.00"), D("35.00"))
    assert a.explanation == explained_from_fields(a) == (
        "reported usage above the allowance was not charged: actual 150 vs reported 150 units; "
        "expected 135.00 USD under p_grad (subscription), billed 100.00 USD")


def test_over_billing_and_its_threshold(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-03T00:00:00Z", "100")
    s.invoice("acme", "api", "100", "11.00")
    a = only(s.run(tmp_path / "a"))
    assert (a.type, a.leak_amount, a.overbilled_amount) == ("over_billing", D("0.00"), D("1.00"))
    assert a.explanation == explained_from_fields(a) == (
        "billed 1.00 USD more than the usage warrants (credit risk): actual 100 vs reported 100 units; "
        "expected 10.00 USD under p_api (subscription), billed 11.00 USD")
    s.invoice_lines[0][6] = "10.99"
    assert s.run(tmp_path / "b").anomalies == []


def test_seats_use_max_not_sum(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "seats", "p_seats")
    for day, seats in ((3, "10"), (4, "12"), (5, "11")):
        s.use("acme", "seats", f"2026-01-0{day}T09:00:00Z", seats, reported="10")
    s.invoice("acme", "seats", "10", "100.00")
    a = only(s.run(tmp_path))
    assert (a.type, a.actual_units, a.reported_units, a.leak_amount) == ("under_reported_usage", 12, 10, D("20.00"))


@pytest.mark.parametrize(("model", "extra", "quantity", "expected"), [
    ("volume", {"tiers": GRADUATED}, "150", D("85.00")),  # 150 x 0.50 + 10 flat
    ("package", {"unit_amount": "5.00", "package_size": "100"}, "150", D("10.00")),
])
def test_volume_and_package_prices(tmp_path: Path, model: str, extra: dict, quantity: str, expected: D) -> None:
    s = Scenario().price("p_x", "api", model, **extra).sub("acme", "api", "p_x")
    s.use("acme", "api", "2026-01-03T00:00:00Z", quantity, reported="")
    a = only(s.run(tmp_path))
    assert (a.type, a.expected_amount, a.leak_amount) == ("under_reported_usage", expected, expected)


@pytest.mark.parametrize(("currency", "unit", "expected"), [("jpy", "0.35", D("350")), ("kwd", "0.0015", D("1.500"))])
def test_minor_unit_currencies(tmp_path: Path, currency: str, unit: str, expected: D) -> None:
    s = Scenario().price("p_c", "api", "per_unit", unit, currency=currency).sub("acme", "api", "p_c")
    s.use("acme", "api", "2026-01-03T00:00:00Z", "1000", reported="")
    a = only(s.run(tmp_path))
    assert (a.currency, a.expected_amount, a.leak_amount) == (currency, expected, expected)
    assert a.explanation == explained_from_fields(a)
    assert f"expected {expected} {currency.upper()} under p_c" in a.explanation  # the currency's decimals


def test_invoice_in_another_currency_is_not_compared(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-03T00:00:00Z", "1000")
    s.invoice("acme", "api", "1000", "90.00", currency="eur")
    result = s.run(tmp_path)
    assert result.anomalies == []
    assert any("EUR" in w and "not compared" in w for w in result.warnings)


def test_noise_is_not_flagged(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api", JAN, FEB).sub("acme", "api", "p_api", FEB, MAR)
    s.subscriptions[1][0] = "sub_2"
    for day in range(1, 29):
        s.use("acme", "api", f"2026-01-{day:02d}T12:00:00Z", "100")
        s.use("acme", "api", f"2026-02-{day:02d}T12:00:00Z", "100")
    # last minute of January, reported 3 minutes after the cut-off; billing followed the reports
    s.use("acme", "api", "2026-01-31T23:59:30Z", "5", reported_ts="2026-02-01T00:02:30Z")
    s.use("acme", "api", "2026-02-20T08:00:00Z", "7", reported="")  # within 0.5%: a late event
    s.invoice("acme", "api", "2800", "280.00").invoice("acme", "api", "2805", "280.50", FEB, MAR)
    assert s.run(tmp_path).anomalies == []


def test_sub_cent_rounding_and_minimum_leak(tmp_path: Path) -> None:
    s = Scenario().price("p_fine", "api", "per_unit", "0.0025").sub("acme", "api", "p_fine")
    s.use("acme", "api", "2026-01-03T00:00:00Z", "1001").invoice("acme", "api", "1001", "2.50")  # 2.5025 -> 2.50
    s.use("beta", "api", "2026-01-03T00:00:00Z", "9")  # unbilled 0.90 < 1.00: not raised
    assert s.run(tmp_path).anomalies == []


def test_half_open_periods_at_non_midnight_boundaries(tmp_path: Path) -> None:
    mid = "2026-01-15T13:45:00Z"
    s = Scenario().sub("acme", "api", "p_api", "2025-12-15T13:45:00Z", mid)
    s.sub("acme", "api", "p_api", mid, "2026-02-15T13:45:00Z")
    s.subscriptions[1][0] = "sub_2"
    s.use("acme", "api", "2026-01-15T13:44:59Z", "100", reported="")
    s.use("acme", "api", mid, "200", reported="")
    result = s.run(tmp_path)
    by_start = {a.period_start.isoformat(): a.actual_units for a in result.anomalies}
    assert by_start == {"2025-12-15T13:45:00+00:00": 100, "2026-01-15T13:45:00+00:00": 200}


def test_offsets_are_read_as_utc(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api", JAN, FEB)
    s.use("acme", "api", "2026-02-01T01:00:00+02:00", "100", reported="")  # 2026-01-31T23:00Z
    a = only(s.run(tmp_path))
    assert (a.type, a.period_start.month, a.evidence["daily"][0]["day"]) == ("under_reported_usage", 1, "2026-01-31")


def test_parquet_usage_gives_the_same_result(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "1000", reported="400")
    s.invoice("acme", "api", "400", "40.00")
    from_csv, from_parquet = s.run(tmp_path / "csv"), s.run(tmp_path / "pq", usage_format="parquet")
    assert [(a.fingerprint, a.leak_amount) for a in from_csv.anomalies] == [
        (a.fingerprint, a.leak_amount) for a in from_parquet.anomalies]


def test_fingerprint_is_stable_and_specific(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "1000", reported="")
    first, second = only(s.run(tmp_path / "a")), only(s.run(tmp_path / "b"))
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    s.invoice("acme", "api", "1000", "500.00")
    assert only(s.run(tmp_path / "c")).fingerprint != first.fingerprint  # now over_billing


def test_rel_tolerance_and_min_amount_are_parameters(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "1000", reported="995")
    s.invoice("acme", "api", "995", "99.50")
    assert s.run(tmp_path / "a").anomalies == []  # 0.5% is within tolerance (and 0.50 < 1.00)
    a = only(s.run(tmp_path / "b", rel_tolerance=D("0.001"), min_leak_amount=D("0.10")))
    assert (a.type, a.leak_amount) == ("under_reported_usage", D("0.50"))


def test_open_period_lowers_confidence(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "1000", reported="")
    closed = only(s.run(tmp_path / "a"))
    folder = s.write(tmp_path / "b")
    from datetime import UTC, datetime
    open_ = only(reconcile(load_bundle(folder), ReconcileParams(as_of=datetime(2026, 1, 20, tzinfo=UTC))))
    assert closed.confidence_factors["period_closed"] == 1.0 and open_.confidence_factors["period_closed"] == 0.5
    assert open_.confidence < closed.confidence


@pytest.mark.parametrize("usage_format", ["csv", "parquet"])
def test_demo_bundle_matches_its_planted_truth(tmp_path: Path, usage_format: str) -> None:
    manifest = generate_demo_bundle(tmp_path, accounts=40, seed=3, as_of=date(2026, 6, 10), usage_format=usage_format)
    result = reconcile(load_bundle(tmp_path), ReconcileParams(as_of=AS_OF))
    got = {(a.account_id, a.product_key, a.period_start.strftime("%Y-%m-%dT%H:%M:%SZ"), a.type):
           (str(a.expected_amount), str(a.billed_amount), str(a.leak_amount)) for a in result.anomalies}
    want = {(p["account_id"], p["product_key"], p["period_start"], p["type"]):
            (p["expected_amount"], p["billed_amount"], p["leak_amount"]) for p in manifest.planted}
    assert got == want
    assert all(a.explanation == explained_from_fields(a) for a in result.anomalies)
    assert {k[3] for k in want} == {"unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage",
                                    "over_billing"}
    assert manifest.noise  # late events were planted and, per the equality above, not flagged


def test_usage_after_a_mid_month_cancellation_keeps_both_periods_apart(tmp_path: Path) -> None:
    s = Scenario().sub("acme", "api", "p_api", FEB, "2026-02-15T00:00:00Z", status="canceled")
    s.use("acme", "api", "2026-02-03T00:00:00Z", "100").invoice("acme", "api", "100", "10.00", FEB,
                                                                "2026-02-15T00:00:00Z")
    s.use("acme", "api", "2026-02-20T00:00:00Z", "300", reported="")
    a = only(s.run(tmp_path))  # the subscribed half is clean; the rest is unbilled, by calendar month
    assert (a.type, a.period_start.day, a.period_end.month, a.actual_units, a.leak_amount) == (
        "unbilled_usage", 1, 3, 300, D("30.00"))


def test_daily_evidence_of_an_unsubscribed_month_leaves_out_what_a_subscription_covered(tmp_path: Path) -> None:
    """Days come from the raised period only: a day split by an hourly period boundary shows just
    the unsubscribed part, and days billed under the subscription are not in the month's series."""
    s = Scenario().sub("acme", "api", "p_api", JAN, "2026-01-15T12:00:00Z")
    s.use("acme", "api", "2026-01-10T09:00:00Z", "50").use("acme", "api", "2026-01-15T10:00:00Z", "70")
    s.invoice("acme", "api", "120", "12.00", JAN, "2026-01-15T12:00:00Z")
    s.use("acme", "api", "2026-01-15T14:00:00Z", "100", reported="").use("acme", "api", "2026-01-20T08:00:00Z", "300",
                                                                          reported="")
    a = only(s.run(tmp_path))
    assert (a.type, a.subscription_id, a.actual_units, a.leak_amount) == ("unbilled_usage", None, 400, D("40.00"))
    assert a.evidence["daily"] == [{"day": "2026-01-15", "actual": "100", "reported": "0"},
                                   {"day": "2026-01-20", "actual": "300", "reported": "0"}]
    assert (a.evidence["days_with_actual"], a.evidence["gap_days"]) == (2, 2)


def test_usage_before_1970_lands_in_its_own_day_and_period(tmp_path: Path) -> None:
    """Buckets floor toward the past: DuckDB's integer division alone would round 1969 up."""
    s = Scenario().sub("acme", "api", "p_api", "1969-12-01T00:00:00Z", "1969-12-31T12:00:00Z")
    s.use("acme", "api", "1969-12-31T11:30:00Z", "100", reported="")
    s.use("acme", "api", "1969-12-31T13:30:00Z", "50", reported="")
    result = s.run(tmp_path)
    by_type = {a.type: a for a in result.anomalies}
    assert set(by_type) == {"under_reported_usage", "unbilled_usage"}
    subscribed, unsubscribed = by_type["under_reported_usage"], by_type["unbilled_usage"]
    assert (subscribed.actual_units, subscribed.evidence["daily"][0]["day"]) == (100, "1969-12-31")
    assert (unsubscribed.actual_units, unsubscribed.period_start.isoformat()) == (50, "1969-12-01T00:00:00+00:00")
    assert [d["day"] for d in unsubscribed.evidence["daily"]] == ["1969-12-31"]
