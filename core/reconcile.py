"""The reconciliation engine: one entry point, `reconcile(bundle, params)`.

Heavy work (every usage event) happens in DuckDB: events -> buckets (core.usage) -> per period
and UTC day -> per period. Python then sees one row per (account, product, period): it prices
A and R with the one pricing function, attributes invoice lines, classifies the gap and scores
it. Daily evidence is fetched from DuckDB only for the periods that were raised.

Decisions where DESIGN.md is silent (also in docs/reconciliation.md):
- the contract in force for a period is the latest one whose effective_from <= period_start;
- an invoice line belongs to the period containing its period_start; lines outside every
  subscription period join the calendar month of their period_start, like unsubscribed usage;
- a period whose invoice lines are in another currency than its price is not classified and a
  warning names it (amounts are never summed or compared across currencies).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa

from core.model import Bundle, Contract, InvoiceLine, SubscriptionPeriod
from core.money import ZERO, round_money
from core.pricing import Price, price_amount, price_lines
from core.scoring import ConfidenceInputs, confidence, severity
from core.usage import aggregate_usage, bucket_granularity

ANOMALY_TYPES = ("unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage", "over_billing")
LEAK_TYPES = ANOMALY_TYPES[:4]
Progress = Callable[[float, str], None]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000


@dataclass(frozen=True)
class ReconcileParams:
    rel_tolerance: Decimal = Decimal("0.005")
    min_leak_amount: Decimal = Decimal("1.00")
    over_billing_min: Decimal = Decimal("1.00")
    as_of: datetime | None = None  # "now" for deciding whether a period is closed
    threads: int | None = None


@dataclass(frozen=True)
class Anomaly:
    fingerprint: str
    account_id: str
    product_key: str
    period_start: datetime
    period_end: datetime
    type: str
    severity: str
    actual_units: Decimal
    reported_units: Decimal
    leak_units: Decimal
    expected_amount: Decimal
    billed_amount: Decimal
    leak_amount: Decimal
    overbilled_amount: Decimal
    currency: str
    confidence: float
    confidence_factors: dict[str, float]
    price_id: str
    price_source: str  # contract | subscription | list:previous_subscription | list:default | list:first
    subscription_id: str | None
    explanation: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReconcileResult:
    anomalies: list[Anomaly]
    periods_checked: int
    events: dict[str, int]
    warnings: list[str]
    notes: list[str]


@dataclass(slots=True)
class _Period:
    """Everything known about one (account, product, period) before classification."""

    account_id: str
    product_key: str
    start: datetime
    end: datetime
    subscription: SubscriptionPeriod | None
    actual: Decimal = ZERO
    reported: Decimal = ZERO
    days_with_actual: int = 0
    gap_days: int = 0
    daily_stddev: float = 0.0
    lines: list[InvoiceLine] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, datetime]:
        return self.account_id, self.product_key, self.start


def fingerprint(account_id: str, product_key: str, start: datetime, end: datetime, kind: str) -> str:
    """Stable identity of an anomaly across re-runs: same account, product, period and type."""
    raw = "|".join((account_id, product_key, start.isoformat(), end.isoformat(), kind))
    return hashlib.sha256(raw.encode()).hexdigest()


def _epoch_us(instant: datetime) -> int:
    delta = instant - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _month_bounds(instant: datetime) -> tuple[datetime, datetime]:
    start = instant.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


class _PriceBook:
    """Which price applies to a period, and where that choice came from."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.contracts: dict[tuple[str, str], list[Contract]] = defaultdict(list)
        for contract in sorted(bundle.contracts, key=lambda c: c.effective_from):
            self.contracts[(contract.account_id, contract.product_key)].append(contract)
        self.subscriptions: dict[tuple[str, str], list[SubscriptionPeriod]] = defaultdict(list)
        for sub in sorted(bundle.subscriptions, key=lambda s: s.period_start):
            self.subscriptions[(sub.account_id, sub.product_key)].append(sub)
        self.first_price: dict[str, Price] = {}
        for price in bundle.prices.values():
            self.first_price.setdefault(price.product_key, price)

    def contract_price(self, account_id: str, product_key: str, at: datetime) -> Price | None:
        contracts = self.contracts.get((account_id, product_key))
        if not contracts:
            return None
        index = bisect.bisect_right(contracts, at, key=lambda c: c.effective_from) - 1
        return self.bundle.prices[contracts[index].price_id] if index >= 0 else None

    def list_price(self, account_id: str, product_key: str, at: datetime) -> tuple[Price | None, str]:
        subs = self.subscriptions.get((account_id, product_key), [])
        index = bisect.bisect_left(subs, at, key=lambda s: s.period_start) - 1
        if index >= 0:
            return self.bundle.prices[subs[index].price_id], "list:previous_subscription"
        default_id = self.bundle.products[product_key].default_price_id
        if default_id:
            return self.bundle.prices[default_id], "list:default"
        return self.first_price.get(product_key), "list:first"

    def covering(self, account_id: str, product_key: str, at: datetime) -> SubscriptionPeriod | None:
        subs = self.subscriptions.get((account_id, product_key), [])
        index = bisect.bisect_right(subs, at, key=lambda s: s.period_start) - 1
        if index >= 0 and at < subs[index].period_end:
            return subs[index]
        return None


def _aggregate_periods(con: duckdb.DuckDBPyConnection, bundle: Bundle, granularity: str) -> None:
    """Create `daily` (per period and UTC day) and `period_stats` (per period) in DuckDB."""
    periods = bundle.subscriptions
    con.register("periods", pa.table({
        "pid": pa.array(range(len(periods)), pa.int64()),
        "account_id": pa.array([p.account_id for p in periods], pa.string()),
        "product_key": pa.array([p.product_key for p in periods], pa.string()),
        "start_us": pa.array([_epoch_us(p.period_start) for p in periods], pa.int64()),
        "end_us": pa.array([_epoch_us(p.period_end) for p in periods], pa.int64()),
    }))
    con.register("product_aggregation", pa.table({
        "product_key": list(bundle.products),
        "is_max": [p.aggregation == "max" for p in bundle.products.values()],
    }))
    # At day granularity a bucket already is a UTC day; finer buckets are rolled up to days.
    per_day = "assigned" if granularity == "day" else """(
        SELECT account_id, product_key, pid, day, sum(a_sum) AS a_sum, max(a_max) AS a_max,
               sum(a_events) AS a_events, sum(r_sum) AS r_sum, max(r_max) AS r_max
        FROM assigned GROUP BY ALL)"""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE daily AS
        WITH joined AS (
            SELECT account_id, product_key, bucket_us,
                   a.units_sum AS a_sum, a.units_max AS a_max, coalesce(a.events, 0) AS a_events,
                   r.units_sum AS r_sum, r.units_max AS r_max
            FROM buckets_actual a FULL JOIN buckets_reported r USING (account_id, product_key, bucket_us)
        ), assigned AS (
            SELECT j.*, p.pid, j.bucket_us // {DAY_US} AS day FROM joined j LEFT JOIN periods p
              ON j.account_id = p.account_id AND j.product_key = p.product_key
             AND j.bucket_us >= p.start_us AND j.bucket_us < p.end_us
        )
        SELECT d.account_id, d.product_key, d.pid, d.day, pa.is_max, d.a_events,
               CASE WHEN d.pid IS NULL THEN date_trunc('month', make_timestamp(d.day * {DAY_US})) END AS month_start,
               coalesce(CASE WHEN pa.is_max THEN d.a_max ELSE d.a_sum END, 0) AS a_day,
               coalesce(CASE WHEN pa.is_max THEN d.r_max ELSE d.r_sum END, 0) AS r_day
        FROM {per_day} d JOIN product_aggregation pa USING (product_key)""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE period_stats AS
        SELECT account_id, product_key, pid, month_start,
               CASE WHEN any_value(is_max) THEN max(a_day) ELSE sum(a_day) END AS actual,
               CASE WHEN any_value(is_max) THEN max(r_day) ELSE sum(r_day) END AS reported,
               count(*) FILTER (WHERE a_events > 0) AS days_with_actual,
               count(*) FILTER (WHERE a_day > r_day) AS gap_days,
               coalesce(stddev_pop(a_day) FILTER (WHERE a_events > 0), 0) AS daily_stddev
        FROM daily GROUP BY ALL""")


def _collect_periods(con: duckdb.DuckDBPyConnection, bundle: Bundle, book: _PriceBook) -> list[_Period]:
    periods = [_Period(s.account_id, s.product_key, s.period_start, s.period_end, s) for s in bundle.subscriptions]
    by_key: dict[tuple[str, str, datetime], _Period] = {p.key: p for p in periods}
    months: dict[tuple[str, str, datetime], _Period] = {}  # unsubscribed usage, by calendar month

    def month_period(account_id: str, product_key: str, instant: datetime) -> _Period:
        start, end = _month_bounds(instant)
        period = months.get((account_id, product_key, start))
        if period is None:
            period = months[(account_id, product_key, start)] = _Period(account_id, product_key, start, end, None)
            periods.append(period)
        return period

    rows = con.execute("SELECT account_id, product_key, pid, month_start, actual, reported, days_with_actual, "
                       "gap_days, daily_stddev FROM period_stats").fetchall()
    for account_id, product_key, pid, month_start, actual, reported, days, gaps, stddev in rows:
        if pid is not None:
            period = periods[pid]
        else:
            period = month_period(account_id, product_key, month_start.replace(tzinfo=UTC))
        period.actual, period.reported = Decimal(actual), Decimal(reported)
        period.days_with_actual, period.gap_days = days, gaps
        period.daily_stddev = stddev
    for line in bundle.invoice_lines:
        sub = book.covering(line.account_id, line.product_key, line.period_start)
        if sub is not None:
            by_key[(sub.account_id, sub.product_key, sub.period_start)].lines.append(line)
        else:
            month_period(line.account_id, line.product_key, line.period_start).lines.append(line)
    return periods


@dataclass(frozen=True)
class _Verdict:
    kind: str
    expected: Decimal
    billed: Decimal
    leak: Decimal
    overbilled: Decimal
    price: Price
    price_source: str
    billing_price: Price | None


def _classify(period: _Period, book: _PriceBook, params: ReconcileParams) -> _Verdict | str | None:
    """The first type that applies, a warning string, or None when the period is clean."""
    sub = period.subscription
    billing_price = book.bundle.prices[sub.price_id] if sub else None
    contract = book.contract_price(period.account_id, period.product_key, period.start)
    if contract is not None:
        price, source = contract, "contract"
    elif billing_price is not None:
        price, source = billing_price, "subscription"
    else:
        listed, source = book.list_price(period.account_id, period.product_key, period.start)
        if listed is None:
            return f"{period.account_id}/{period.product_key} {period.start:%Y-%m-%d}: no price for the product"
        price = listed
    foreign = sorted({line.currency for line in period.lines} - {price.currency})
    if foreign:
        return (f"{period.account_id}/{period.product_key} {period.start:%Y-%m-%d}: invoiced in "
                f"{', '.join(foreign).upper()} but priced in {price.currency.upper()}; not compared")
    a, r = period.actual, period.reported
    expected = price_amount(price, a)
    billed = round_money(sum((line.amount for line in period.lines), ZERO), price.currency)
    leak = max(expected - billed, ZERO)
    kind = None
    if leak >= params.min_leak_amount:
        if sub is None:
            kind = "unbilled_usage" if a > 0 else None
        elif a - r > params.rel_tolerance * a:
            kind = "under_reported_usage"
        elif contract is not None and contract.price_id != sub.price_id and (
            price_amount(billing_price, r) < price_amount(contract, r)  # type: ignore[arg-type]
        ):
            kind = "renewal_drift"
        elif billed < price_amount(billing_price, r):  # type: ignore[arg-type]
            kind = "missed_overage"
    if kind is None and billed - expected >= params.over_billing_min:
        kind = "over_billing"
    if kind is None:
        return None
    overbilled = max(billed - expected, ZERO)
    return _Verdict(kind, expected, billed, leak if kind != "over_billing" else ZERO, overbilled,
                    price, source, billing_price)


def _explain(period: _Period, v: _Verdict) -> str:
    cur = v.price.currency.upper()
    facts = f"actual {period.actual.normalize():f} vs reported {period.reported.normalize():f} units; " \
            f"expected {v.expected} {cur} under {v.price.price_id} ({v.price_source}), billed {v.billed} {cur}"
    reasons = {
        "unbilled_usage": "usage with no subscription covering the product in this period",
        "under_reported_usage": "usage never reached billing",
        "renewal_drift": f"billed at {v.billing_price.price_id if v.billing_price else '?'} instead of "
                         f"the contract price {v.price.price_id}",
        "missed_overage": "reported usage above the allowance was not charged",
        "over_billing": f"billed {v.overbilled} {cur} more than the usage warrants (credit risk)",
    }
    return f"{reasons[v.kind]}: {facts}"


def _anomaly(period: _Period, v: _Verdict, as_of: datetime) -> Anomaly:
    elapsed_end = min(period.end, max(as_of, period.start))
    elapsed_days = max(1, (elapsed_end - period.start + timedelta(hours=23, minutes=59)).days)
    leak_units = max(period.actual - period.reported, ZERO)
    score, factors = confidence(ConfidenceInputs(
        anomaly_type=v.kind, price_inferred=v.price_source.startswith("list"),
        days_with_actual=period.days_with_actual, elapsed_days=elapsed_days, gap_days=period.gap_days,
        period_closed=period.end <= as_of, leak_units=leak_units, daily_stddev=period.daily_stddev,
    ))
    amount = v.leak if v.kind != "over_billing" else v.overbilled
    return Anomaly(
        fingerprint=fingerprint(period.account_id, period.product_key, period.start, period.end, v.kind),
        account_id=period.account_id, product_key=period.product_key,
        period_start=period.start, period_end=period.end, type=v.kind,
        severity=severity(amount, v.billed, v.price.currency),
        actual_units=period.actual, reported_units=period.reported, leak_units=leak_units,
        expected_amount=v.expected, billed_amount=v.billed, leak_amount=v.leak, overbilled_amount=v.overbilled,
        currency=v.price.currency, confidence=score, confidence_factors=factors,
        price_id=v.price.price_id, price_source=v.price_source,
        subscription_id=period.subscription.subscription_id if period.subscription else None,
        explanation=_explain(period, v),
        evidence={
            "billing_price_id": v.billing_price.price_id if v.billing_price else None,
            "invoice_lines": [{"invoice_id": line.invoice_id, "quantity": str(line.quantity),
                               "amount": str(line.amount)} for line in period.lines],
            "days_with_actual": period.days_with_actual, "gap_days": period.gap_days,
            "elapsed_days": elapsed_days,
            "pricing": _pricing_evidence(period, v),
        },
    )


def _plain(value: Decimal) -> str:
    return f"{value.normalize():f}"


def _pricing_evidence(period: _Period, v: _Verdict) -> dict[str, Any]:
    """Which tiers applied to actual usage (what should have been billed) and to reported usage
    under the price billing used: the drill-down shows both side by side."""

    def breakdown(price: Price, quantity: Decimal) -> dict[str, Any]:
        lines = [{"tier": line.description, "units": _plain(line.units),
                  "unit_amount": _plain(line.unit_amount), "flat_amount": _plain(line.flat_amount),
                  "subtotal": _plain(line.subtotal)} for line in price_lines(price, quantity)]
        return {"price_id": price.price_id, "model": price.model, "quantity": _plain(quantity),
                "lines": lines, "total": str(price_amount(price, quantity))}

    billing = breakdown(v.billing_price, period.reported) if v.billing_price else None
    return {"expected": breakdown(v.price, period.actual), "billing": billing}


def _plain_number_sql(column: str) -> str:
    """`1500.000000000` -> `1500`, `0.500000000` -> `0.5`: a decimal as text without trailing zeros."""
    text = f"CAST({column} AS VARCHAR)"
    return f"CASE WHEN contains({text}, '.') THEN rtrim(rtrim({text}, '0'), '.') ELSE {text} END"


def _attach_daily_series(con: duckdb.DuckDBPyConnection, raised: list[tuple[_Period, Anomaly]],
                         pids: dict[int, int]) -> list[Anomaly]:
    """Fetch the per-day actual/reported series for raised periods only."""
    if not raised:
        return []
    con.register("raised", pa.table({
        "idx": list(range(len(raised))),
        "account_id": [p.account_id for p, _ in raised],
        "product_key": [p.product_key for p, _ in raised],
        "pid": pa.array([pids.get(id(p)) for p, _ in raised], pa.int64()),
        "month_start": pa.array([None if p.subscription else p.start.replace(tzinfo=None) for p, _ in raised],
                                pa.timestamp("us")),
    }))
    series: dict[int, list[dict[str, str]]] = defaultdict(list)
    # Formatted in SQL: building millions of Python Decimals would cost more than the whole scan.
    rows = con.execute(f"""
        WITH hit AS (
            SELECT r.idx, d.day, d.a_day, d.r_day FROM raised r JOIN daily d USING (pid)
            UNION ALL
            SELECT r.idx, d.day, d.a_day, d.r_day FROM raised r JOIN daily d
              USING (account_id, product_key, month_start) WHERE r.pid IS NULL AND d.pid IS NULL
        )
        SELECT idx, CAST(CAST(make_timestamp(day * {DAY_US}) AS DATE) AS VARCHAR),
               {_plain_number_sql("a_day")}, {_plain_number_sql("r_day")}
        FROM hit ORDER BY idx, day""").fetchall()
    for idx, day, a_day, r_day in rows:
        series[idx].append({"day": day, "actual": a_day, "reported": r_day})
    out = []
    for idx, (_, anomaly) in enumerate(raised):
        anomaly.evidence["daily"] = series.get(idx, [])
        out.append(anomaly)
    return out


def reconcile(bundle: Bundle, params: ReconcileParams | None = None,
              progress: Progress | None = None) -> ReconcileResult:
    """Reconcile a validated bundle. Raises core.errors.BundleError on bad usage rows."""
    params = params or ReconcileParams()
    as_of = params.as_of or datetime.now(UTC)
    report = progress or (lambda fraction, message: None)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_progress_bar = false")
        if params.threads:
            con.execute(f"SET threads = {int(params.threads)}")
        con.register("known_accounts", pa.table({"account_id": list(bundle.accounts)}))
        con.register("known_products", pa.table({"product_key": list(bundle.products)}))
        granularity = bucket_granularity(
            instant for s in bundle.subscriptions for instant in (s.period_start, s.period_end)
        )
        report(0.05, "aggregating actual usage")
        need_max = any(p.aggregation == "max" for p in bundle.products.values())
        actual_stats, warnings = aggregate_usage(con, bundle.actual_usage, "actual", granularity, need_max)
        report(0.45, "aggregating reported usage")
        reported_stats, more = aggregate_usage(con, bundle.reported_usage, "reported", granularity, need_max)
        warnings += more
        report(0.8, "joining usage to billing periods")
        _aggregate_periods(con, bundle, granularity)
        book = _PriceBook(bundle)
        periods = _collect_periods(con, bundle, book)
        report(0.9, f"classifying {len(periods)} periods")
        pids = {id(p): i for i, p in enumerate(periods[: len(bundle.subscriptions)])}
        raised: list[tuple[_Period, Anomaly]] = []
        for period in periods:
            verdict = _classify(period, book, params)
            if isinstance(verdict, str):
                warnings.append(verdict)
            elif verdict is not None:
                raised.append((period, _anomaly(period, verdict, as_of)))
        anomalies = _attach_daily_series(con, raised, pids)
        report(1.0, f"{len(anomalies)} anomalies")
        anomalies.sort(key=lambda a: (a.account_id, a.product_key, a.period_start, a.type))
        return ReconcileResult(
            anomalies=anomalies, periods_checked=len(periods),
            events={"actual": actual_stats.events, "reported": reported_stats.events},
            warnings=warnings, notes=list(bundle.notes),
        )
    finally:
        con.close()
