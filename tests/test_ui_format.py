"""How the pages show amounts, prices, thresholds, explanations and audit details (pure helpers)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from services.anomalies import AnomalyDetail, AnomalyRow, money_text
from ui.charts import count_bars, expected_vs_billed, money_bars
from ui.format import (
    CONFIDENCE_FACTORS,
    PRICE_SOURCES,
    audit_details,
    audit_parts,
    confidence_lines,
    decimal_text,
    event_text,
    explanation,
    labelled,
    person,
    plain,
    plural,
    price,
    run_status,
    when,
)


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
    # a run's counts in words, not JSON; empty values left out; times in UTC like the rest of the app
    assert audit_details({"counts": {"new": 3}, "error": None}) == "counts: new 3"
    run = {"counts": {"new": 0, "updated": 34, "reopened": 0, "resolved": 0, "anomalies": 34, "periods": 411,
                      "events_actual": 109697, "events_reported": 109390, "seconds": 1.317,
                      "by_type": {"unbilled_usage": 18, "over_billing": 5}, "warnings": []}, "error": None}
    assert audit_details(run) == (
        "counts: 34 anomalies (0 new, 34 updated, 0 reopened, 0 resolved); 411 periods; 109,697 actual and "
        "109,390 reported usage events; took 1.3 s; by type: Unbilled usage 18, Over-billing (credit risk) 5")
    assert audit_details({"start": "2026-11-01T00:00:00+00:00", "fmt": "csv", "size": 2153}) == \
        "start: 2026-11-01 00:00 UTC · fmt: csv · size: 2,153"
    assert audit_parts({"from": "open", "reason": "a long reason", "amount": "1", "currency": "jpy"}) == [
        ("from", "open"), ("reason", "a long reason"), ("amount", "1 JPY")]


def test_history_events_read_as_words_with_the_reason() -> None:
    dismissed = {"from": "open", "reason": "Free pilot until December", "amount": "160.000000", "currency": "usd"}
    assert event_text("anomaly.dismissed", dismissed) == "Dismissed — “Free pilot until December”"
    assert event_text("anomaly.open", {"from": "dismissed", "reason": None}) == "Reopened (was dismissed)"
    assert event_text("anomaly.recovered", {"from": "open", "reason": None}) == "Marked recovered"
    drafted = {"external_id": "in_1", "amount": "160.00", "currency": "usd", "kind": "draft_invoice"}
    drafted = {"external_id": "in_1", "amount": "160.00", "currency": "usd", "kind": "draft_invoice"}
    assert event_text("draft_invoice.created", drafted) == "Drafted a Stripe invoice in_1 for 160.00 USD"
    assert event_text("crm_task.failed", {"error": "timeout", "system": "hubspot"}) == \
        "Tried to create a CRM task, which failed: timeout"
    assert event_text("anomaly.something_new", {}) == "Something new"
    assert person("Alex Analyst (analyst@demo.example)") == "Alex Analyst (analyst@demo.example)"
    assert person("system:scheduler") == "Scheduler" and person("api_key:7") == "API key #7"


def test_times_are_utc_and_run_statuses_capitalised_the_same_everywhere() -> None:
    assert when(datetime(2026, 11, 26, 5, 41, tzinfo=UTC)) == "2026-11-26 05:41 UTC"
    assert when("2026-11-26T06:41:00+01:00") == "2026-11-26 05:41 UTC"  # a note keeps its time as ISO text
    assert when(None) == "—"
    assert [run_status(s) for s in ("succeeded", "failed", "queued", "running", "interrupted")] == [
        "Succeeded", "Failed", "Queued", "Running", "Interrupted"]


def test_every_confidence_factor_is_explained_in_one_line_with_its_weight() -> None:
    factors = {"mapping": 0.6, "completeness": 1.0, "persistence": 0.0, "period_closed": 1.0, "signal_to_noise": 1.0}
    lines = confidence_lines(factors)
    assert len(lines) == 5 and set(factors) == set(CONFIDENCE_FACTORS)
    assert all("docs/" not in line and "\n" not in line for line in lines)
    assert lines[0].startswith("**Price source 60%** (weight 25%) — ")
    persistence = lines[2]
    assert persistence.startswith("**Persistence 0%** (weight 25%)") and "0% means" in persistence


def test_refusals_name_the_forms_labels() -> None:
    labels = {"rel_tolerance": "Relative tolerance", "cron expression": "Expression", "interval": "Expression",
              "reason": "Reason"}
    assert labelled("rel_tolerance: expected a share", labels) == "Relative tolerance: expected a share"
    assert labelled("cron expression '* * * * *': fires 60 s apart", labels) == \
        "Expression '* * * * *': fires 60 s apart"
    assert labelled("reason: say why this anomaly is dismissed", labels) == "Reason: say why this anomaly is dismissed"
    assert labelled("intervalx: other", labels) == "intervalx: other"  # a field's name, not any prefix
    assert labelled("anomaly 3 is open; it cannot become open", labels) == "anomaly 3 is open; it cannot become open"


def test_typed_text_is_shown_as_written() -> None:
    assert plain("**bold** [link](http://x) $x$ 1.") == r"\*\*bold\*\* \[link\]\(http\://x\) \$x\$ 1\."


def test_exported_money_has_its_currencys_decimals_and_loses_none() -> None:
    assert money_text(Decimal("361"), "eur") == "361.00"
    assert money_text(Decimal("44.800000"), "usd") == "44.80"
    assert money_text(Decimal("5.000000"), "jpy") == "5"
    assert money_text(Decimal("0.125"), "usd") == "0.125"
    assert money_text(Decimal("-12.5"), "kwd") == "-12.500"


def test_money_charts_never_share_an_axis_across_currencies_and_start_at_zero() -> None:
    rows = [{"month": "2026-09", "currency": "usd", "amount": Decimal("333")},
            {"month": "2026-10", "currency": "eur", "amount": Decimal("361")}]
    layout = money_bars(rows, "month", "Billing period").to_plotly_json()["layout"]
    assert {layout["yaxis"]["title"]["text"], layout["yaxis2"]["title"]["text"]} == {"Leak (EUR)", "Leak (USD)"}
    assert layout["yaxis"]["rangemode"] == layout["yaxis2"]["rangemode"] == "tozero"
    assert layout["xaxis"]["title"]["text"] == "Billing period"
    horizontal = money_bars(rows[:1], "month", "", horizontal=True).to_plotly_json()["layout"]
    assert horizontal["xaxis"]["title"]["text"] == "Leak (USD)" and "yaxis2" not in horizontal
    money = expected_vs_billed([{"label": "2026-09", "currency": "usd", "expected": Decimal("160"),
                                 "billed": Decimal("0")}], "Billing period").to_plotly_json()
    assert money["layout"]["yaxis"]["title"]["text"] == "Amount (USD)"
    assert [trace["text"] for trace in money["data"]] == [["160.00 USD"], ["0.00 USD"]]
    counts = count_bars(["0.0–0.1", "0.1–0.2"], [("Leaks", [1, 0]), ("Over-billing", [0, 3])], "Confidence",
                        "Anomalies").to_plotly_json()["layout"]
    assert counts["yaxis"]["rangemode"] == "tozero" and counts["yaxis"]["dtick"] == 1 and counts["barmode"] == "stack"
