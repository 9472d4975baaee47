"""An independent, slow, obviously-correct reference of the reconciliation semantics (DESIGN.md and
docs/reconciliation.md).

It reads a bundle folder of CSV files with the standard library (Parquet usage with pyarrow), walks every event in
Python and classifies every (account, product, period) by the first-that-applies table. Only `core.pricing` and
`core.money.round_money` (tested on their own) are shared with the engine; nothing of `core.reconcile`, `core.usage`
or `core.bundle` is used, so a disagreement between the two points at one of them.

The readings taken where the text leaves room (each one written down so a disagreement can be judged):
- periods: every subscription row is a period; usage (actual or reported) of an account and product that no
  subscription period covers is grouped by UTC calendar month; that month is a period too, and so is the month of
  an invoice line that no subscription period covers (money billed for nothing is a credit risk to show);
- an event belongs to the period containing its UTC timestamp, half-open; an uncovered event to its calendar month;
- duplicate `event_id`s in actual usage count once: the earliest delivery (the generator gives equal-instant
  redeliveries equal content, so which of those wins does not matter);
- `sum` products add units, `max` products take the largest event; a period without events has 0 units;
- expected price: the latest contract with `effective_from <= period_start`, else the subscription's price, else
  the list price: the price of the account's latest subscription period of the product that started before the
  month's first uncovered event, else the product's `default_price_id`, else its first price in prices.csv;
- billed: invoice lines of the account and product whose `period_start` lies in the period (for a calendar month:
  in the month and outside every subscription period); a period with a line in a currency other than the
  expected price's is not compared at all (tests/test_reconcile_scenarios.py: an EUR invoice for a USD price
  raises nothing, with a "not compared" warning); each line's amount is rounded to the currency's minor unit;
- "R matches A" is the negation of under-reporting (A - R <= rel_tolerance x A);
- renewal_drift: a subscription period under a contract whose price differs from the subscription's and is
  dearer at R: billing priced R under the subscription's price (the drill-down shows "R under the price billing
  used"); with R > A and a volume price, more units can cost less, so comparing at A would blame the price for
  what over-reporting did;
- missed_overage: a subscription period (the allowance is the subscription's; an unsubscribed month with no actual
  usage owes no first-tier fee) where billed < price(R) under the expected price;
- a leak type is raised when leak_amount >= min_leak_amount; its rule holding with nothing leaked (billed >=
  expected) is no leak, so such a period can still be over_billing (e.g. unsubscribed usage billed by hand at more
  than the list price) -- over_billing needs leak_amount = 0, so no leak is ever hidden by it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from core.money import round_money
from core.pricing import Price, Tier, price_amount

REL_TOLERANCE = Decimal("0.005")
MIN_LEAK_AMOUNT = Decimal("1.00")
OVER_BILLING_MIN = Decimal("1.00")
LEAK_TYPES = ("unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage")


@dataclass(frozen=True)
class RefAnomaly:
    account_id: str
    product_key: str
    period_start: datetime
    period_end: datetime
    type: str
    actual_units: Decimal
    reported_units: Decimal
    leak_units: Decimal
    expected_amount: Decimal
    billed_amount: Decimal
    leak_amount: Decimal
    overbilled_amount: Decimal
    currency: str
    price_id: str
    severity: str


@dataclass(frozen=True)
class _Period:
    account_id: str
    product_key: str
    start: datetime
    end: datetime
    subscription_price_id: str | None  # None: an unsubscribed calendar month


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    path = folder / name
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _usage_rows(folder: Path, stem: str) -> list[dict[str, str]]:
    """A usage table as text rows, from `<stem>.csv` or `<stem>.parquet` (naive Parquet timestamps are UTC)."""
    parquet = folder / f"{stem}.parquet"
    if not parquet.exists():
        return _rows(folder, f"{stem}.csv")
    import pyarrow.parquet as pq

    rows = pq.read_table(parquet).to_pylist()
    for row in rows:
        ts = row["ts"]
        row["ts"] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
        row["units"] = str(row["units"])
    return rows


def _instant(raw: str) -> datetime:
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    assert value.tzinfo is not None, raw
    return value.astimezone(UTC)


def _month(instant: datetime) -> tuple[datetime, datetime]:
    start = datetime(instant.year, instant.month, 1, tzinfo=UTC)
    end = datetime(instant.year + instant.month // 12, instant.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _price(row: dict[str, str]) -> Price:
    tiers: tuple[Tier, ...] = ()
    if row["tiers"]:
        tiers = tuple(Tier(None if t["up_to"] is None else Decimal(t["up_to"]), Decimal(t.get("unit_amount") or "0"),
                           Decimal(t.get("flat_amount") or "0")) for t in json.loads(row["tiers"]))
    return Price(row["price_id"], row["product_key"], row["currency"].lower(), row["model"],  # type: ignore[arg-type]
                 Decimal(row["unit_amount"]) if row["unit_amount"] else None,
                 int(row["package_size"]) if row["package_size"] else None, tiers)


def severity(amount: Decimal, billed: Decimal, currency: str) -> str:
    """docs/reconciliation.md "Severity": the amount scaled to USD-like major units, and its share of billed."""
    scale = {"jpy": Decimal("0.01"), "krw": Decimal("0.01"), "kwd": Decimal(10), "bhd": Decimal(10)}
    scaled = amount * scale.get(currency, Decimal(1))
    share = Decimal(1) if billed <= 0 else amount / billed
    if scaled >= 10_000 or (scaled >= 1_000 and share >= Decimal("0.5")):
        return "critical"
    if scaled >= 1_000 or (scaled >= 100 and share >= Decimal("0.25")):
        return "high"
    if scaled >= 100 or share >= Decimal("0.10"):
        return "medium"
    return "low"


def reference_reconcile(folder: Path | str, *, rel_tolerance: Decimal = REL_TOLERANCE,
                        min_leak_amount: Decimal = MIN_LEAK_AMOUNT,
                        over_billing_min: Decimal = OVER_BILLING_MIN) -> list[RefAnomaly]:
    folder = Path(folder)
    products = {r["product_key"]: r for r in _rows(folder, "products.csv")}
    price_rows = _rows(folder, "prices.csv")
    prices = {r["price_id"]: _price(r) for r in price_rows}
    subs = [_Period(r["account_id"], r["product_key"], _instant(r["period_start"]), _instant(r["period_end"]),
                    r["price_id"]) for r in _rows(folder, "subscriptions.csv")]
    contracts = [(r["account_id"], r["product_key"], _instant(r["effective_from"]), r["price_id"])
                 for r in _rows(folder, "contracts.csv")]
    lines = [(r["account_id"], r["product_key"], _instant(r["period_start"]), Decimal(r["amount"]),
              r["currency"].lower()) for r in _rows(folder, "invoice_lines.csv")]

    def covering(account: str, product: str, ts: datetime) -> _Period | None:
        found = [p for p in subs if (p.account_id, p.product_key) == (account, product) and p.start <= ts < p.end]
        assert len(found) <= 1
        return found[0] if found else None

    def period_of(account: str, product: str, ts: datetime) -> _Period:
        sub = covering(account, product, ts)
        if sub is not None:
            return sub
        start, end = _month(ts)
        return _Period(account, product, start, end, None)

    # Actual usage: one count per event_id, the earliest delivery.
    actual_rows = _usage_rows(folder, "actual_usage")
    by_event: dict[str, dict[str, str]] = {}
    plain: list[dict[str, str]] = []
    for r in actual_rows:
        event_id = r.get("event_id") or ""
        if not event_id:
            plain.append(r)
        elif event_id not in by_event or (_instant(r["ts"]), r["units"]) < (_instant(by_event[event_id]["ts"]),
                                                                            by_event[event_id]["units"]):
            by_event[event_id] = r
    actual_events = [(r["account_id"], r["product_key"], _instant(r["ts"]), Decimal(r["units"]))
                     for r in [*plain, *by_event.values()]]
    reported_events = [(r["account_id"], r["product_key"], _instant(r["ts"]), Decimal(r["units"]))
                       for r in _usage_rows(folder, "reported_usage")]

    periods: set[_Period] = set(subs)
    first_uncovered: dict[_Period, datetime] = {}
    for account, product, ts, _units in [*actual_events, *reported_events]:
        period = period_of(account, product, ts)
        periods.add(period)
        if period.subscription_price_id is None:
            first_uncovered[period] = min(first_uncovered.get(period, ts), ts)
    for account, product, start, _amount, _currency in lines:  # billed with nothing covering it: a month too
        period = period_of(account, product, start)
        if period.subscription_price_id is None:
            periods.add(period)
            first_uncovered[period] = min(first_uncovered.get(period, start), start)

    def units(events: list[tuple[str, str, datetime, Decimal]], period: _Period) -> Decimal:
        values = [u for a, p, ts, u in events if period_of(a, p, ts) == period]
        if not values:
            return Decimal(0)
        return max(values) if products[period.product_key]["aggregation"] == "max" else sum(values, Decimal(0))

    def list_price(period: _Period) -> str:
        earlier = [p for p in subs if (p.account_id, p.product_key) == (period.account_id, period.product_key)
                   and p.start < first_uncovered[period]]
        if earlier:
            return max(earlier, key=lambda p: p.start).subscription_price_id  # type: ignore[return-value]
        default = products[period.product_key].get("default_price_id") or ""
        if default:
            return default
        return next(r["price_id"] for r in price_rows if r["product_key"] == period.product_key)

    out: list[RefAnomaly] = []
    for period in sorted(periods, key=lambda p: (p.account_id, p.product_key, p.start)):
        a = units(actual_events, period)
        r = units(reported_events, period)
        in_force = [c for c in contracts if (c[0], c[1]) == (period.account_id, period.product_key)
                    and c[2] <= period.start]
        contract_price_id = max(in_force, key=lambda c: c[2])[3] if in_force else None
        price_id = contract_price_id or period.subscription_price_id or list_price(period)
        price = prices[price_id]
        currency = price.currency

        def line_counts(start: datetime, period: _Period = period) -> bool:
            if not period.start <= start < period.end:
                return False
            return period.subscription_price_id is not None or covering(
                period.account_id, period.product_key, start) is None

        counted = [(amount, cur) for acct, prod, start, amount, cur in lines
                   if (acct, prod) == (period.account_id, period.product_key) and line_counts(start)]
        if any(cur != currency for _, cur in counted):
            continue  # billed in another currency: not compared (a warning), never summed across currencies
        billed = sum((round_money(amount, currency) for amount, _ in counted), Decimal(0))
        expected = price_amount(price, a)
        leak_amount = max(expected - billed, Decimal(0))
        leak_units = max(a - r, Decimal(0))
        under_reported = a - r > rel_tolerance * a

        kind: str | None = None
        if a > 0 and period.subscription_price_id is None:
            kind = "unbilled_usage"
        elif under_reported:
            kind = "under_reported_usage"
        elif (period.subscription_price_id is not None and contract_price_id is not None
              and contract_price_id != period.subscription_price_id
              and price_amount(prices[period.subscription_price_id], r) < price_amount(price, r)):
            kind = "renewal_drift"
        elif period.subscription_price_id is not None and billed < price_amount(price, r):
            kind = "missed_overage"

        overbilled = max(billed - expected, Decimal(0))
        if kind is not None and leak_amount > 0:  # a leak rule with nothing leaked is no gap of that type
            if leak_amount < min_leak_amount:
                continue
            amount = leak_amount
        elif billed - expected >= over_billing_min:
            kind, amount = "over_billing", overbilled
        else:
            continue
        out.append(RefAnomaly(period.account_id, period.product_key, period.start, period.end, kind, a, r,
                              leak_units, expected, billed, leak_amount, overbilled, currency, price_id,
                              severity(amount, billed, currency)))
    return out
