"""How amounts, units and times look on every page: exact decimals, currency always shown."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from core.explain import AnomalyFacts, explain
from core.money import currency_exponent, format_money
from services.anomalies import TYPE_LABELS, AnomalyDetail

STATUS_LABELS = {"open": "Open", "dismissed": "Dismissed", "actioned": "Actioned", "recovered": "Recovered",
                 "resolved": "Resolved"}


def money(amount: Decimal | None, currency: str | None) -> str:
    if amount is None or not currency:
        return "—"
    return format_money(Decimal(amount), currency)


def price(amount: Decimal | str | None, currency: str | None) -> str:
    """A unit price: the currency's decimals, more when the price has them (`0.002 USD`, never `0.00 USD`)."""
    if amount is None or not currency:
        return "—"
    value = Decimal(amount)
    places = max(currency_exponent(currency), -value.normalize().as_tuple().exponent)  # type: ignore[operator]
    return f"{value:,.{places}f} {currency.upper()}"


def decimal_text(value: Decimal | str | None, min_places: int = 0) -> str:
    """A stored decimal as a person would type it: `0.005000` -> `0.005`; `1.000000` -> `1.00` with 2 places."""
    if value is None:
        return ""
    normalized = Decimal(value).normalize()
    places = max(min_places, -normalized.as_tuple().exponent)  # type: ignore[operator]
    return f"{normalized:.{places}f}"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`1 anomaly`, `2 anomalies`, `1,204 actions`."""
    word = singular if count == 1 else plural_form or f"{singular}s"
    return f"{count:,} {word}"


def money_by_currency(amounts: dict[str, Decimal]) -> str:
    """`2,490.03 USD · 631.00 EUR` — amounts in different currencies are never added up."""
    if not amounts:
        return "0"
    return " · ".join(money(amount, currency) for currency, amount in sorted(amounts.items()))


def units(value: Decimal | None) -> str:
    if value is None:
        return "—"
    return f"{Decimal(value).normalize():,f}"


def period(start: datetime, end: datetime) -> str:
    """Half-open periods shown as the days they cover: [Oct 1, Nov 1) -> 2026-10-01 – 2026-10-31."""
    last = end - timedelta(microseconds=1)
    return f"{start:%Y-%m-%d} – {last:%Y-%m-%d}"


def when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else "—"


PRICE_SOURCES = {
    "contract": "contract price",
    "subscription": "subscription price",
    "list:previous_subscription": "list price of an earlier subscription",
    "list:default": "default list price",
    "list:first": "first listed price",
}


def explanation(detail: AnomalyDetail) -> str:
    """Why the anomaly was raised, as a sentence: core's wording rebuilt from the anomaly's fields,
    capitalised, with thousands separators, money in its currency's decimals and price sources in words.

    `Usage never reached billing: actual 31,369 vs reported 0 units; expected 2,490.03 USD under
    price_api_usd (subscription price), billed 0.00 USD`. Built from fields, never by parsing the stored
    text, so ids such as `price_20261001` stay as they are and an anomaly stored under an older wording reads
    like a new one. The stored text (and exports) stay as the engine wrote them.
    """
    row = detail.row
    sentence = explain(
        AnomalyFacts(kind=row.type, actual_units=row.actual_units, reported_units=row.reported_units,
                     expected_amount=row.expected_amount, billed_amount=row.billed_amount,
                     overbilled_amount=detail.overbilled_amount, currency=row.currency, price_id=detail.price_id,
                     price_source=detail.price_source, billing_price_id=detail.evidence.get("billing_price_id")),
        units=units, money=money, source=lambda key: PRICE_SOURCES.get(key, key))
    return sentence[:1].upper() + sentence[1:]


AMOUNT_KEYS = ("amount", "total", "leak_amount", "overbilled_amount", "expected_amount", "billed_amount")
THRESHOLD_PLACES = {"rel_tolerance": 0, "min_leak_amount": 2, "over_billing_min": 2}


def audit_details(details: dict[str, Any]) -> str:
    """An audit entry's details for people: `amount: 145.00 USD · kind: draft_invoice`, not raw JSON
    with `"145.000000"`. The stored entry (and its hash chain) is untouched."""
    currency = details.get("currency") if isinstance(details.get("currency"), str) else None
    parts = []
    for key, value in details.items():
        if key == "currency" and currency and any(k in details for k in AMOUNT_KEYS):
            continue  # shown with the amount
        if key in AMOUNT_KEYS and currency and value is not None:
            try:
                shown = money(Decimal(str(value)), currency)
            except InvalidOperation:
                shown = str(value)
        elif key in THRESHOLD_PLACES and value is not None:
            try:
                shown = decimal_text(Decimal(str(value)), THRESHOLD_PLACES[key])
            except InvalidOperation:
                shown = str(value)
        elif isinstance(value, dict | list):
            shown = json.dumps(value, default=str)
        else:
            shown = "—" if value is None else str(value)
        parts.append(f"{key}: {shown}")
    return " · ".join(parts)


def type_label(anomaly_type: str) -> str:
    return TYPE_LABELS.get(anomaly_type, anomaly_type)


def confidence(value: Decimal | float) -> str:
    return f"{float(value):.0%}"
