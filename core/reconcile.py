"""The reconciliation engine: one entry point, `reconcile(bundle, params)`.

Heavy work (every usage event) happens in DuckDB: events -> month buckets cut at period
boundaries (core.usage) -> per period, through one range join of both sides' buckets to the
billing periods. Python then sees one row per (account, product, period): it prices A and R with
the one pricing function, attributes invoice lines and classifies the gap. Only for the periods
raised does DuckDB then sum their accounts' usage per UTC day: the drill-down series and the
day-level confidence factors.

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

from core.duck import EPOCH, epoch_micros, floor_div_sql, register_columns
from core.explain import AnomalyFacts, explain
from core.gcpause import paused_gc
from core.model import Bundle, Contract, InvoiceLine, SubscriptionPeriod
from core.money import ZERO, plain_decimal, round_money
from core.pricing import Price, price_amount, price_lines
from core.scoring import ConfidenceInputs, confidence, severity
from core.usage import DAY_US, aggregate_days, aggregate_usage, register_cuts, register_month_slots, register_periods

ANOMALY_TYPES = ("unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage", "over_billing")
LEAK_TYPES = ANOMALY_TYPES[:4]
Progress = Callable[[float, str], None]


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


Coverage = dict[tuple[str, str], tuple[datetime, datetime]]


@dataclass
class ReconcileResult:
    anomalies: list[Anomaly]
    periods_checked: int
    events: dict[str, int]
    warnings: list[str]
    notes: list[str]
    # Per (account, product): from the earliest start to the latest end of the periods checked.
    # A stored anomaly outside it was not looked at by this run, so its absence proves nothing.
    coverage: Coverage = field(default_factory=dict)


@dataclass(slots=True)
class _Period:
    """Everything known about one (account, product, period) before classification."""

    account_id: str
    product_key: str
    start: datetime
    end: datetime
    subscription: SubscriptionPeriod | None
    uncovered_from: datetime | None = None  # unsubscribed months: the first usage bucket or invoice line in them
    actual: Decimal = ZERO
    reported: Decimal = ZERO
    lines: list[InvoiceLine] = field(default_factory=list)


@dataclass(frozen=True)
class _DailyEvidence:
    """A raised period's usage per UTC day: the drill-down's series and the confidence inputs."""

    days_with_actual: int = 0
    gap_days: int = 0  # days where actual exceeded reported
    stddev: float = 0.0  # of actual per day, over days with actual events
    series: list[dict[str, str]] = field(default_factory=list)


def fingerprint(account_id: str, product_key: str, start: datetime, end: datetime, kind: str) -> str:
    """Stable identity of an anomaly across re-runs: same account, product, period and type."""
    raw = "|".join((account_id, product_key, start.isoformat(), end.isoformat(), kind))
    return hashlib.sha256(raw.encode()).hexdigest()


def _has_max_products(bundle: Bundle) -> bool:
    """Whether any product is seat-like: only then do the buckets keep a max (~5% of a scan)."""
    return any(p.aggregation == "max" for p in bundle.products.values())


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


def _register_union(con: duckdb.DuckDBPyConnection, view: str, actual: str, reported: str) -> None:
    """View `view`: both sides' buckets one under the other (a_* or r_* set), which is cheaper than
    joining them bucket by bucket."""
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW {view} AS
        SELECT account_id, product_key, bucket_us, units_sum AS a_sum, units_max AS a_max, TRUE AS a_seen
        FROM {actual}
        UNION ALL BY NAME
        SELECT account_id, product_key, bucket_us, units_sum AS r_sum, units_max AS r_max
        FROM {reported}""")


def _period_totals(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    """A and R of every (account, product, period) that has usage: both sides' buckets assigned to
    the subscription period containing them in one range join, else to their calendar month.

    Rows: pid, then account_id, product_key and month start (epoch µs) only when pid is None
    (unsubscribed usage), the first bucket's start (epoch µs), then sum and max of actual, sum and
    max of reported, as text. Grouping
    by pid alone where there is one, and fetching text rather than HUGEINT or DECIMAL, halve the
    cost of this step. Sums of buckets equal sums of days, and maxima of buckets maxima of days,
    so no per-day table is needed for the totals.
    """
    return con.execute("""
        SELECT p.pid,
               CASE WHEN p.pid IS NULL THEN u.account_id END,
               CASE WHEN p.pid IS NULL THEN u.product_key END,
               CASE WHEN p.pid IS NULL THEN epoch_us(date_trunc('month', make_timestamp(u.bucket_us))) END,
               min(u.bucket_us),
               CAST(sum(u.a_sum) AS VARCHAR), CAST(max(u.a_max) AS VARCHAR),
               CAST(sum(u.r_sum) AS VARCHAR), CAST(max(u.r_max) AS VARCHAR)
        FROM usage_buckets u LEFT JOIN periods p
          ON u.account_id = p.account_id AND u.product_key = p.product_key
         AND u.bucket_us >= p.start_us AND u.bucket_us < p.end_us
        GROUP BY ALL""").fetchall()


def _collect_periods(con: duckdb.DuckDBPyConnection, bundle: Bundle, book: _PriceBook) -> list[_Period]:
    """Every subscription period, plus one calendar-month period per unsubscribed usage or invoice
    line, with its usage totals and invoice lines attached. Subscription periods come first, in
    bundle order (their index is the `pid` of SQL)."""
    periods = [_Period(s.account_id, s.product_key, s.period_start, s.period_end, s) for s in bundle.subscriptions]
    months: dict[tuple[str, str, datetime], _Period] = {}  # unsubscribed usage, by calendar month

    def month_period(account_id: str, product_key: str, instant: datetime) -> _Period:
        """The calendar month of `instant`, uncovered from `instant` on at the latest."""
        start, end = _month_bounds(instant)
        period = months.get((account_id, product_key, start))
        if period is None:
            period = months[(account_id, product_key, start)] = _Period(account_id, product_key, start, end, None,
                                                                        instant)
            periods.append(period)
        elif period.uncovered_from is None or instant < period.uncovered_from:
            period.uncovered_from = instant
        return period

    is_max = {key: product.aggregation == "max" for key, product in bundle.products.items()}
    for pid, account_id, product_key, _month_us, first_us, a_sum, a_max, r_sum, r_max in _period_totals(con):
        if pid is not None:
            period = periods[pid]
        else:  # buckets are cut at period boundaries, so the first one starts where the first uncovered usage is
            period = month_period(account_id, product_key, EPOCH + timedelta(microseconds=first_us))
        actual, reported = (a_max, r_max) if is_max[period.product_key] else (a_sum, r_sum)
        period.actual = ZERO if actual is None else Decimal(actual)
        period.reported = ZERO if reported is None else Decimal(reported)
    starts = {(s.account_id, s.product_key, s.period_start): pid for pid, s in enumerate(bundle.subscriptions)}
    for line in bundle.invoice_lines:
        pid = starts.get((line.account_id, line.product_key, line.period_start))
        if pid is not None:  # the usual case: a line for exactly the subscription period
            periods[pid].lines.append(line)
        elif (sub := book.covering(line.account_id, line.product_key, line.period_start)) is not None:
            periods[starts[(sub.account_id, sub.product_key, sub.period_start)]].lines.append(line)
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
        listed, source = book.list_price(period.account_id, period.product_key, period.uncovered_from or period.start)
        if listed is None:
            return f"{period.account_id}/{period.product_key} {period.start:%Y-%m-%d}: no price for the product"
        price = listed
    if any(line.currency != price.currency for line in period.lines):
        foreign = sorted({line.currency for line in period.lines} - {price.currency})
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
            # billed in another currency than the contract's: not on the contract's terms, whatever the numbers
            contract.currency != billing_price.currency  # type: ignore[union-attr]
            or price_amount(billing_price, r) < price_amount(contract, r)  # type: ignore[arg-type]
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
    return explain(AnomalyFacts(
        kind=v.kind, actual_units=period.actual, reported_units=period.reported, expected_amount=v.expected,
        billed_amount=v.billed, overbilled_amount=v.overbilled, currency=v.price.currency,
        price_id=v.price.price_id, price_source=v.price_source,
        billing_price_id=v.billing_price.price_id if v.billing_price else None,
    ))


def _anomaly(period: _Period, v: _Verdict, daily: _DailyEvidence, as_of: datetime) -> Anomaly:
    elapsed_end = min(period.end, max(as_of, period.start))
    elapsed_days = max(1, (elapsed_end - period.start + timedelta(hours=23, minutes=59)).days)
    leak_units = max(period.actual - period.reported, ZERO)
    score, factors = confidence(ConfidenceInputs(
        anomaly_type=v.kind, price_inferred=v.price_source.startswith("list"),
        days_with_actual=daily.days_with_actual, elapsed_days=elapsed_days, gap_days=daily.gap_days,
        period_closed=period.end <= as_of, leak_units=leak_units, daily_stddev=daily.stddev,
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
            "days_with_actual": daily.days_with_actual, "gap_days": daily.gap_days,
            "elapsed_days": elapsed_days,
            "pricing": _pricing_evidence(period, v),
            "daily": daily.series,
        },
    )


def _pricing_evidence(period: _Period, v: _Verdict) -> dict[str, Any]:
    """Which tiers applied to actual usage (what should have been billed) and to reported usage
    under the price billing used: the drill-down shows both side by side."""

    def breakdown(price: Price, quantity: Decimal) -> dict[str, Any]:
        lines = [{"tier": line.description, "units": plain_decimal(line.units),
                  "unit_amount": plain_decimal(line.unit_amount), "flat_amount": plain_decimal(line.flat_amount),
                  "subtotal": plain_decimal(line.subtotal)} for line in price_lines(price, quantity)]
        return {"price_id": price.price_id, "model": price.model, "quantity": plain_decimal(quantity),
                "lines": lines, "total": str(price_amount(price, quantity))}

    billing = breakdown(v.billing_price, period.reported) if v.billing_price else None
    return {"expected": breakdown(v.price, period.actual), "billing": billing}


def _plain_number_sql(column: str) -> str:
    """`1500.000000000` -> `1500`, `0.500000000` -> `0.5`: a decimal as text without trailing zeros."""
    text = f"CAST({column} AS VARCHAR)"
    return f"CASE WHEN contains({text}, '.') THEN rtrim(rtrim({text}, '0'), '.') ELSE {text} END"


def _daily_evidence(con: duckdb.DuckDBPyConnection, bundle: Bundle,
                    raised: list[tuple[_Period, _Verdict]]) -> list[_DailyEvidence]:
    """Per-day actual and reported usage of the raised periods only (a few percent of all), from a
    second pass over the usage of their accounts and products in day buckets."""
    if not raised:
        return []
    periods = [period for period, _ in raised]
    register_columns(con, "raised", {
        "idx": ("BIGINT", range(len(periods))),
        "account_id": ("VARCHAR", [p.account_id for p in periods]),
        "product_key": ("VARCHAR", [p.product_key for p in periods]),
        "start_us": ("BIGINT", [epoch_micros(p.start) for p in periods]),
        "end_us": ("BIGINT", [epoch_micros(p.end) for p in periods]),
        "subscribed": ("BOOLEAN", [p.subscription is not None for p in periods]),
        "is_max": ("BOOLEAN", [bundle.products[p.product_key].aggregation == "max" for p in periods]),
    })
    con.execute("CREATE OR REPLACE TEMP TABLE raised_pairs AS SELECT DISTINCT account_id, product_key FROM raised")
    split = register_cuts(con, "day")
    need_max = _has_max_products(bundle)
    for side in ("actual", "reported"):
        aggregate_days(con, side, "raised_pairs", split, need_max)
    _register_union(con, "raised_buckets", "days_actual", "days_reported")
    # An unsubscribed month holds only the buckets no subscription period of the product covers.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE raised_days AS
        WITH hit AS (
            SELECT r.idx, r.is_max, u.* FROM raised r JOIN raised_buckets u
              ON u.account_id = r.account_id AND u.product_key = r.product_key
             AND u.bucket_us >= r.start_us AND u.bucket_us < r.end_us
            WHERE r.subscribed OR NOT EXISTS (
                SELECT 1 FROM periods p WHERE p.account_id = u.account_id AND p.product_key = u.product_key
                   AND u.bucket_us >= p.start_us AND u.bucket_us < p.end_us)
        )
        SELECT idx, {floor_div_sql('bucket_us', DAY_US)} AS day, coalesce(bool_or(a_seen), FALSE) AS a_seen,
               coalesce(CASE WHEN any_value(is_max) THEN max(a_max) ELSE sum(a_sum) END, 0) AS a_day,
               coalesce(CASE WHEN any_value(is_max) THEN max(r_max) ELSE sum(r_sum) END, 0) AS r_day
        FROM hit GROUP BY idx, day""")
    stats = {idx: (days, gaps, stddev) for idx, days, gaps, stddev in con.execute("""
        SELECT idx, count(*) FILTER (WHERE a_seen), count(*) FILTER (WHERE a_day > r_day),
               coalesce(stddev_pop(a_day) FILTER (WHERE a_seen), 0)
        FROM raised_days GROUP BY idx""").fetchall()}
    series: dict[int, list[dict[str, str]]] = defaultdict(list)
    # Formatted in SQL: building a Python Decimal per day would cost more than the whole query.
    for idx, day, a_day, r_day in con.execute(f"""
            SELECT idx, CAST(CAST(make_timestamp(day * {DAY_US}) AS DATE) AS VARCHAR),
                   {_plain_number_sql("a_day")}, {_plain_number_sql("r_day")}
            FROM raised_days ORDER BY idx, day""").fetchall():
        series[idx].append({"day": day, "actual": a_day, "reported": r_day})
    return [_DailyEvidence(*stats.get(idx, (0, 0, 0.0)), series=series.get(idx, [])) for idx in range(len(raised))]


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
        register_columns(con, "known_accounts", {"account_id": ("VARCHAR", list(bundle.accounts))})
        register_columns(con, "known_products", {"product_key": ("VARCHAR", list(bundle.products))})
        register_periods(con, bundle.subscriptions)
        split = register_cuts(con, "month")
        slots = register_month_slots(con) if split else None
        report(0.05, "aggregating actual usage")
        need_max = _has_max_products(bundle)
        actual_stats, warnings = aggregate_usage(con, bundle.actual_usage, "actual", split, need_max, slots)
        report(0.45, "aggregating reported usage")
        reported_stats, more = aggregate_usage(con, bundle.reported_usage, "reported", split, need_max, slots)
        warnings += more
        report(0.8, "joining usage to billing periods")
        anomalies, coverage, periods_checked = _find_anomalies(con, bundle, params, as_of, warnings, report)
        report(1.0, f"{len(anomalies)} anomalies")
        return ReconcileResult(
            anomalies=anomalies, periods_checked=periods_checked,
            events={"actual": actual_stats.events, "reported": reported_stats.events},
            warnings=warnings, notes=list(bundle.notes), coverage=coverage,
        )
    finally:
        con.close()


@paused_gc()  # the Python-heavy part: a Python object per period, per invoice line, per Decimal
def _find_anomalies(con: duckdb.DuckDBPyConnection, bundle: Bundle, params: ReconcileParams, as_of: datetime,
                    warnings: list[str], report: Progress) -> tuple[list[Anomaly], Coverage, int]:
    """Usage buckets -> periods -> verdicts -> anomalies (sorted), and the coverage of the periods
    checked; warnings are appended to."""
    _register_union(con, "usage_buckets", "buckets_actual", "buckets_reported")
    book = _PriceBook(bundle)
    periods = _collect_periods(con, bundle, book)
    report(0.9, f"classifying {len(periods)} periods")
    raised: list[tuple[_Period, _Verdict]] = []
    for period in periods:
        verdict = _classify(period, book, params)
        if isinstance(verdict, str):
            warnings.append(verdict)
        elif verdict is not None:
            raised.append((period, verdict))
    dailies = _daily_evidence(con, bundle, raised)
    anomalies = [_anomaly(period, verdict, daily, as_of)
                 for (period, verdict), daily in zip(raised, dailies, strict=True)]
    anomalies.sort(key=lambda a: (a.account_id, a.product_key, a.period_start, a.type))
    return anomalies, _coverage(periods), len(periods)


def _coverage(periods: list[_Period]) -> Coverage:
    coverage: Coverage = {}
    for period in periods:
        key = (period.account_id, period.product_key)
        start, end = coverage.get(key, (period.start, period.end))
        coverage[key] = (min(start, period.start), max(end, period.end))
    return coverage
