"""How the pages show amounts, prices, thresholds, explanations and audit details (pure helpers)."""

from __future__ import annotations

from decimal import Decimal

from ui.format import audit_details, decimal_text, explanation, plural, price


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


def test_explanations_read_as_sentences_without_touching_ids_or_dates() -> None:
    stored = ("unbilled usage with no subscription covering the product in this period: actual 31369 vs "
              "reported 0 units; expected 2490.03 USD under price_export_usd (list:default), billed 0.00 USD")
    assert explanation(stored) == (
        "Unbilled usage with no subscription covering the product in this period: actual 31,369 vs reported 0 "
        "units; expected 2,490.03 USD under price_export_usd (default list price), billed 0.00 USD")
    assert explanation("billed at price_2026 instead of acct_10000 on 2026-10-01") == \
        "Billed at price_2026 instead of acct_10000 on 2026-10-01"
    assert explanation("") == ""


def test_audit_details_show_money_with_its_currency() -> None:
    shown = audit_details({"action_id": 3, "kind": "draft_invoice", "external_id": "in_1",
                           "amount": "145.000000", "currency": "usd"})
    assert shown == "action_id: 3 · kind: draft_invoice · external_id: in_1 · amount: 145.00 USD"
    assert audit_details({"rel_tolerance": "0.005000", "min_leak_amount": "1.000000"}) == \
        "rel_tolerance: 0.005 · min_leak_amount: 1.00"
    assert audit_details({"counts": {"new": 3}, "error": None}) == 'counts: {"new": 3} · error: —'
