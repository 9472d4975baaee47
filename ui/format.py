"""How amounts, units and times look on every page: exact decimals, currency always shown."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from core.money import format_money
from services.anomalies import TYPE_LABELS

STATUS_LABELS = {"open": "Open", "dismissed": "Dismissed", "actioned": "Actioned", "recovered": "Recovered",
                 "resolved": "Resolved"}


def money(amount: Decimal | None, currency: str | None) -> str:
    if amount is None or not currency:
        return "—"
    return format_money(Decimal(amount), currency)


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


def type_label(anomaly_type: str) -> str:
    return TYPE_LABELS.get(anomaly_type, anomaly_type)


def confidence(value: Decimal | float) -> str:
    return f"{float(value):.0%}"
