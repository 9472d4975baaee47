"""How the pages show amounts, prices, thresholds, explanations and audit details (pure helpers)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from services.anomalies import AnomalyDetail, AnomalyRow
from ui.format import PRICE_SOURCES, audit_details, decimal_text, explanation, plural, price


def test_prices_keep_the_currency_and_its_decimals_and_never_lose_sub_cent_precision() -> None:
    assert price("12", "usd") == "12.00 USD"
    assert price(Decimal("1249.5"), "eur") == "1,249.50 EUR"
    assert price("0.002", "usd") == "0.002 USD"  # a per-call price is not rounded to 0.00
    assert price("500", "jpy") == "500 JPY"
    assert price(None, "usd") == "—"


def test_thresholds_show_as_typed() -> None:
    assert decimal_text(Decimal("0.005000")) == "0.005"
    assert decimal_text(Decimal("1.000000"), 2) == "1.00"
    assert decimal_text(Decimal("1000"), 2) == "1000.00"  # no exponent (1E+3) and no separator in an input
    assert decimal_text(Decimal("0.123456"), 2) == "0.123456"


def test_plural() -> None:
    assert plural(1, "anomaly", "anomalies") == "1 anomaly"
    assert plural(0, "anomaly", "anomalies") == "0 anomalies"
    assert plural(1234, "action") == "1,234 actions"


def anomaly(kind: str, **fields: Any) -> AnomalyDetail:
    """An anomaly as the queue reads it back from the database (amounts with the column's six decimals);
    `fields` override row or detail fields by name."""
    row = AnomalyRow(
        id=1, account_id="acct_10000", account_name="Acme", product_key="api",
        period_start=datetime(2026, 10, 1, tzinfo=UTC), period_end=datetime(2026, 11, 1, tzinfo=UTC), type=kind,
        severity="high", status="open", amount=Decimal("2490.030000"), currency="usd", confidence=Decimal("0.9"),
        actual_units=Decimal("31369.000000"), reported_units=Decimal("0E-6"), leak_units=Decimal("31369.000000"),
        expected_amount=Decimal("2490.030000"), billed_amount=Decimal("0.000000"))
    row = replace(row, **{k: v for k, v in fields.items() if hasattr(row, k)})
    detail = AnomalyDetail(
        row=row, fingerprint="f", price_id="price_20261001", price_source="subscription", subscription_id="sub_1",
        explanation="stored text the page never reads", confidence_factors={},
        evidence={"billing_price_id": "price_10000"}, status_reason=None, notes=[], stripe_customer_id=None,
        crm_id=None, overbilled_amount=Decimal("1234.500000"))
    return replace(detail, **{k: v for k, v in fields.items() if not hasattr(row, k)})


FACTS = ("actual 31,369 vs reported 0 units; expected 2,490.03 USD under price_20261001 (subscription price), "
         "billed 0.00 USD")


@pytest.mark.parametrize(("kind", "reason"), [
    ("unbilled_usage", "Usage with no subscription covering the product in this period"),
    ("under_reported_usage", "Usage never reached billing"),
    ("renewal_drift", "Billed at price_10000 instead of the contract price price_20261001"),
    ("missed_overage", "Reported usage above the allowance was not charged"),
    ("over_billing", "Billed 1,234.50 USD more than the usage warrants (credit risk)"),
])
def test_explanations_are_rebuilt_from_the_anomaly_fields(kind: str, reason: str) -> None:
    # ids with many digits are never reformatted (no id goes through a number format) and the stored text is
    # not read, so an anomaly stored under another wording reads like a new one
    assert explanation(anomaly(kind)) == f"{reason}: {FACTS}"


def test_explanation_numbers_get_separators_and_money_its_currency_decimals() -> None:
    shown = explanation(anomaly("over_billing", currency="kwd", actual_units=Decimal("1234567.500000"),
                                reported_units=Decimal("999.000000"), expected_amount=Decimal("1000.000000"),
                                billed_amount=Decimal("2234.500000")))
    assert shown == ("Billed 1,234.500 KWD more than the usage warrants (credit risk): actual 1,234,567.5 vs "
                     "reported 999 units; expected 1,000.000 KWD under price_20261001 (subscription price), "
                     "billed 2,234.500 KWD")
    assert "expected 350,000 JPY" in explanation(anomaly("under_reported_usage", currency="jpy",
                                                         expected_amount=Decimal("350000.000000")))


@pytest.mark.parametrize(("source", "words"), sorted(PRICE_SOURCES.items()))
def test_explanations_name_each_price_source_in_words(source: str, words: str) -> None:
    assert f"under price_20261001 ({words}), billed" in explanation(anomaly("unbilled_usage", price_source=source))


def test_audit_details_show_money_with_its_currency() -> None:
    shown = audit_details({"action_id": 3, "kind": "draft_invoice", "external_id": "in_1",
                           "amount": "145.000000", "currency": "usd"})
    assert shown == "action_id: 3 · kind: draft_invoice · external_id: in_1 · amount: 145.00 USD"
    assert audit_details({"rel_tolerance": "0.005000", "min_leak_amount": "1.000000"}) == \
        "rel_tolerance: 0.005 · min_leak_amount: 1.00"
    assert audit_details({"counts": {"new": 3}, "error": None}) == 'counts: {"new": 3} · error: —'
