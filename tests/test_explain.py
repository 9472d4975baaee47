"""core.explain on its own: the formats a caller passes reach every number, and a bad kind is named."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from core.explain import AnomalyFacts, explain

FACTS = AnomalyFacts(kind="renewal_drift", actual_units=Decimal("1500.000"), reported_units=Decimal("0"),
                     expected_amount=Decimal("180"), billed_amount=Decimal("0.5"), overbilled_amount=Decimal(0),
                     currency="eur", price_id="p_2026", price_source="contract", billing_price_id=None)


def test_defaults_state_units_plainly_and_money_in_the_currency_decimals() -> None:
    assert explain(FACTS) == ("billed at ? instead of the contract price p_2026: actual 1500 vs reported 0 units; "
                              "expected 180.00 EUR under p_2026 (contract), billed 0.50 EUR")


def test_a_caller_chooses_how_units_money_and_price_sources_read() -> None:
    shown = explain(FACTS, units=lambda value: f"<{value}>", money=lambda value, currency: f"[{value} {currency}]",
                    source=str.upper)
    assert shown == ("billed at ? instead of the contract price p_2026: actual <1500.000> vs reported <0> units; "
                     "expected [180 eur] under p_2026 (CONTRACT), billed [0.5 eur]")


def test_an_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match="kind: unknown anomaly type 'late_fee'"):
        explain(replace(FACTS, kind="late_fee"))
