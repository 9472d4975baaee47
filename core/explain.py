"""The sentence that says why an anomaly was raised, built from the facts it states.

The engine stores it with plain numbers (exports, the database and CRM tasks carry that text as is);
the app rebuilds it from an anomaly's stored fields with its own number and price-source wording, so
no page ever parses the stored text and a change of wording here reaches both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from core.money import plain_decimal, round_money


@dataclass(frozen=True)
class AnomalyFacts:
    """What the sentence states; every field is one an anomaly stores."""

    kind: str  # the anomaly type
    actual_units: Decimal
    reported_units: Decimal
    expected_amount: Decimal
    billed_amount: Decimal
    overbilled_amount: Decimal
    currency: str
    price_id: str  # the price the expected amount was computed under
    price_source: str  # contract | subscription | list:previous_subscription | list:default | list:first
    billing_price_id: str | None  # the subscription's price, None without a subscription


def plain_money(amount: Decimal, currency: str) -> str:
    """`2490.03 USD`: the currency's decimals and no separators, as the stored sentence has it."""
    return f"{round_money(amount, currency)} {currency.upper()}"


def explain(facts: AnomalyFacts, *, units: Callable[[Decimal], str] = plain_decimal,
            money: Callable[[Decimal, str], str] = plain_money, source: Callable[[str], str] = str) -> str:
    """`usage never reached billing: actual 1500 vs reported 1000 units; expected 150.00 USD under p_api
    (subscription), billed 100.00 USD`. The defaults give the text the engine stores; a page passes its
    own `units`, `money` (amount, currency) and `source` (price source) formats."""

    def amount(value: Decimal) -> str:
        return money(value, facts.currency)

    reasons = {
        "unbilled_usage": "usage with no subscription covering the product in this period",
        "under_reported_usage": "usage never reached billing",
        "renewal_drift": f"billed at {facts.billing_price_id or '?'} instead of the contract price {facts.price_id}",
        "missed_overage": "reported usage above the allowance was not charged",
        "over_billing": f"billed {amount(facts.overbilled_amount)} more than the usage warrants (credit risk)",
    }
    if facts.kind not in reasons:
        raise ValueError(f"kind: unknown anomaly type {facts.kind!r}; expected {', '.join(reasons)}")
    return (f"{reasons[facts.kind]}: actual {units(facts.actual_units)} vs reported {units(facts.reported_units)} "
            f"units; expected {amount(facts.expected_amount)} under {facts.price_id} ({source(facts.price_source)}), "
            f"billed {amount(facts.billed_amount)}")
