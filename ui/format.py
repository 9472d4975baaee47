"""How amounts, units and times look on every page: exact decimals, currency always shown."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from core.explain import AnomalyFacts, explain
from core.money import currency_exponent, format_money
from core.scoring import WEIGHTS
from services.anomalies import TYPE_LABELS, AnomalyDetail

STATUS_LABELS = {"open": "Open", "dismissed": "Dismissed", "actioned": "Actioned", "recovered": "Recovered",
                 "resolved": "Resolved"}
RUN_STATUS_LABELS = {"queued": "Queued", "running": "Running", "succeeded": "Succeeded", "failed": "Failed",
                     "interrupted": "Interrupted"}


def run_status(status: str) -> str:
    """A run's status as every page shows it: `Succeeded`, `Failed`, ..."""
    return RUN_STATUS_LABELS.get(status, status.capitalize())


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


def when(value: datetime | str | None) -> str:
    """`2026-11-26 05:41 UTC` (times are stored in UTC; an ISO string, as notes keep it, is read first)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if value and value.tzinfo is not None:
        value = value.astimezone(UTC)
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


def audit_parts(details: dict[str, Any]) -> list[tuple[str, str]]:
    """An audit entry's details for people, one (field, value) pair each: money in its currency
    (`145.00 USD`, not `"145.000000"`), times in UTC like the rest of the app, a run's counts in words,
    empty values left out. The stored entry (and its hash chain) is untouched."""
    currency = details.get("currency") if isinstance(details.get("currency"), str) else None
    parts = []
    for key, value in details.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if key == "currency" and currency and any(k in details for k in AMOUNT_KEYS):
            continue  # shown with the amount
        if key in AMOUNT_KEYS and currency:
            try:
                shown = money(Decimal(str(value)), currency)
            except InvalidOperation:
                shown = str(value)
        elif key in THRESHOLD_PLACES:
            try:
                shown = decimal_text(Decimal(str(value)), THRESHOLD_PLACES[key])
            except InvalidOperation:
                shown = str(value)
        elif key == "counts" and isinstance(value, dict):
            shown = counts_text(value)
        else:
            shown = _detail_value(value)
        parts.append((key, shown))  # the field as stored: the audit log's vocabulary
    return parts


def audit_details(details: dict[str, Any]) -> str:
    """`amount: 145.00 USD · kind: draft_invoice` — the whole entry on one line (see `audit_parts`)."""
    return " · ".join(f"{key}: {value}" for key, value in audit_parts(details))


def _detail_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float | Decimal):
        return f"{value:,}" if isinstance(value, int) else str(value)
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            return value
        return when(stamp) if "T" in value else value
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_detail_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_detail_value(item) for item in value)
    return json.dumps(value, default=str)


RUN_CHANGES = ("new", "updated", "reopened", "resolved")


def counts_text(counts: dict[str, Any]) -> str:
    """A run's (or an export's) counts in words: `34 anomalies (0 new, 34 updated, 0 reopened, 0 resolved);
    411 periods; 109,697 actual and 109,390 reported usage events; took 1.3 s; by type: Unbilled usage 18, ...`."""
    rest = dict(counts)
    parts = []
    if isinstance(rest.get("anomalies"), int):
        changes = [f"{rest.pop(key):,} {key}" for key in RUN_CHANGES if isinstance(rest.get(key), int)]
        parts.append(plural(rest.pop("anomalies"), "anomaly", "anomalies") + (f" ({', '.join(changes)})" if changes
                                                                              else ""))
    actual, reported = rest.pop("events_actual", None), rest.pop("events_reported", None)
    seconds, by_type, warnings = rest.pop("seconds", None), rest.pop("by_type", None), rest.pop("warnings", None)
    for key, value in rest.items():
        if isinstance(value, int) and key.endswith("s"):
            parts.append(plural(value, key.replace("_", " ").removesuffix("s")))
        elif value not in (None, "", [], {}):
            parts.append(f"{key.replace('_', ' ')} {_detail_value(value)}")
    events = [f"{n:,} {side}" for n, side in ((actual, "actual"), (reported, "reported")) if isinstance(n, int)]
    if events:
        parts.append(" and ".join(events) + " usage events")
    if isinstance(seconds, int | float):
        parts.append(f"took {seconds:.1f} s")
    if isinstance(by_type, dict) and by_type:
        parts.append("by type: " + ", ".join(f"{type_label(kind)} {_detail_value(n)}" for kind, n in by_type.items()))
    if warnings:
        parts.append(plural(len(warnings), "warning") if isinstance(warnings, list) else f"warnings: {warnings}")
    return "; ".join(parts)


EVENT_WORDS = {  # audit action on an anomaly -> what happened, for its history
    "anomaly.dismissed": "Dismissed",
    "anomaly.recovered": "Marked recovered",
    "anomaly.open": "Reopened",
    "anomaly.note_added": "Added a note",
    "draft_invoice.created": "Drafted a Stripe invoice",
    "draft_invoice.found": "Found the Stripe draft invoice an earlier attempt made",
    "draft_invoice.failed": "Tried to draft a Stripe invoice, which failed",
    "crm_task.created": "Created a CRM task",
    "crm_task.failed": "Tried to create a CRM task, which failed",
}


def event_text(action: str, details: dict[str, Any]) -> str:
    """One history line's event in words: `Dismissed — “Customer on a free pilot”`, `Reopened (was dismissed)`,
    `Drafted a Stripe invoice in_123 for 160.00 USD`, `Tried to create a CRM task, which failed: timeout`."""
    words = EVENT_WORDS.get(action) or action.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    currency = details.get("currency") if isinstance(details.get("currency"), str) else None
    if details.get("external_id"):
        words += f" {details['external_id']}"
    if details.get("amount") is not None and currency and action.startswith(("draft_invoice.", "crm_task.")):
        with contextlib.suppress(InvalidOperation):
            words += f" for {money(Decimal(str(details['amount'])), currency)}"
    if action == "anomaly.open" and details.get("from"):
        words += f" (was {STATUS_LABELS.get(details['from'], details['from']).lower()})"
    if details.get("error"):
        words += f": {details['error']}"
    if details.get("reason"):
        words += f" — “{details['reason']}”"
    return words


def person(who: str) -> str:
    """Who did it: a user as `Name (email)` (resolved by the service); `system:scheduler` -> `Scheduler`."""
    kind, _, name = who.partition(":")
    if kind == "system" and name:
        return name.replace("_", " ").capitalize()
    if kind == "api_key" and name:
        return f"API key #{name}"
    return who


def type_label(anomaly_type: str) -> str:
    return TYPE_LABELS.get(anomaly_type, anomaly_type)


def confidence(value: Decimal | float) -> str:
    return f"{float(value):.0%}"


CONFIDENCE_FACTORS = {  # engine factor -> (name, what it measures, one line); weights: core.scoring.WEIGHTS
    "mapping": ("Price source", "100% when the price is the customer's own (subscription or contract); 60% when it "
                                "is inferred from a list price, for usage no subscription covers."),
    "completeness": ("Usage data", "share of the period's days so far that have usage data: missing days make the "
                                   "gap less certain."),
    "persistence": ("Persistence", "share of the days with usage on which more was used than reported (a gap on a "
                                   "single day is likelier a late event than a broken feed). 0% means no day shows "
                                   "more usage than was reported: the units reached billing's usage records and the "
                                   "gap is in what was billed. 100% for price gaps."),
    "period_closed": ("Period closed", "100% once the period has ended; 50% while it runs and more usage may still "
                                       "be reported."),
    "signal_to_noise": ("Signal vs noise", "how large the unit gap is next to the usual day-to-day swing of usage "
                                           "(100% = far beyond it). 100% for price gaps."),
}


def confidence_lines(factors: dict[str, Any]) -> list[str]:
    """One line per factor: `**Persistence 0%** (weight 25%) — share of the days ...`, in the engine's order."""
    lines = []
    for key, value in factors.items():
        name, meaning = CONFIDENCE_FACTORS.get(key, (key.replace("_", " ").capitalize(), ""))
        weight = f" (weight {WEIGHTS[key]:.0%})" if key in WEIGHTS else ""
        lines.append(f"**{name} {confidence(value)}**{weight} — {meaning}".rstrip(" —"))
    return lines


def labelled(message: str, labels: dict[str, str]) -> str:
    """A service's refusal in the words of the form that caused it: the field it names (`rel_tolerance: expected
    ...`, `cron expression '* * * * *': ...`) becomes the field's label on screen (`Relative tolerance: ...`)."""
    for field in sorted(labels, key=len, reverse=True):
        if message.startswith(field) and message[len(field):len(field) + 1] in (":", " "):
            return labels[field] + message[len(field):]
    return message


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def plain(text: str) -> str:
    """Text typed by someone (a dismissal reason, a note) shown through Markdown as written: no formatting,
    links, LaTeX or emoji shortcodes of its own."""
    return _MARKDOWN.sub(r"\\\1", text)
