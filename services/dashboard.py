"""What finance leaders see first: SQL aggregates over anomalies, never every row in Python.

Every figure is per currency (amounts are never summed across currencies). "Open leak" is the
money of leak-type anomalies still to recover (open or actioned); "recovered" what analysts
marked recovered; over-billing is a credit risk and kept apart from leaks.

The status filter narrows every figure except "recovered": the Overview's default filter is open
and actioned anomalies, and finance must still see what was recovered within the other filters
(period, currency, type, ...).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, case, cast, func, select
from sqlalchemy.orm import Session

from db.models import Account, Anomaly, ReconRun
from db.session import org_session
from services.anomalies import LEAK_TYPES, AnomalyFilters, amount_column, apply_filters
from services.context import Actor, require_role

TO_RECOVER = ("open", "actioned")
TOP_ACCOUNTS = 10


@dataclass(frozen=True)
class RunBrief:
    id: int
    status: str
    trigger: str
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float | None
    progress_message: str | None
    error: str | None
    counts: dict[str, Any] | None


@dataclass
class DashboardSummary:
    open_leak: dict[str, Decimal] = field(default_factory=dict)  # currency -> amount
    recovered: dict[str, Decimal] = field(default_factory=dict)
    over_billing: dict[str, Decimal] = field(default_factory=dict)
    accounts_affected: int = 0
    open_count: int = 0
    last_run: RunBrief | None = None
    active_run: RunBrief | None = None
    by_period: list[dict[str, Any]] = field(default_factory=list)  # month, currency, amount
    by_type: list[dict[str, Any]] = field(default_factory=list)  # type, currency, amount, count
    by_product: list[dict[str, Any]] = field(default_factory=list)  # product_key, currency, amount
    top_accounts: list[dict[str, Any]] = field(default_factory=list)  # account_id, name, currency, amount
    confidence: list[dict[str, Any]] = field(default_factory=list)  # bucket (0.0..0.9), count
    currencies: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.currencies


def _month(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(Anomaly.period_start, "YYYY-MM")
    return func.strftime("%Y-%m", Anomaly.period_start)


def _by_currency(session: Session, query: Any) -> dict[str, Decimal]:
    return {currency: Decimal(amount) for currency, amount in session.execute(query) if amount}


def _brief(run: ReconRun | None) -> RunBrief | None:
    if run is None:
        return None
    return RunBrief(run.id, run.status, run.trigger, run.queued_at, run.started_at, run.finished_at, run.progress,
                    run.progress_message, run.error, run.counts)


def _runs(session: Session, org_id: int) -> tuple[RunBrief | None, RunBrief | None]:
    base = select(ReconRun).where(ReconRun.org_id == org_id).order_by(ReconRun.id.desc()).limit(1)
    last = session.scalars(base.where(ReconRun.status.in_(("succeeded", "failed", "interrupted")))).first()
    active = session.scalars(base.where(ReconRun.status.in_(("queued", "running")))).first()
    return _brief(last), _brief(active)


def _bucket(session: Session) -> Any:
    """Confidence decile 0..9 (1.0 falls in the top one)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.least(cast(func.floor(Anomaly.confidence * 10), Integer), 9)
    return func.min(cast(Anomaly.confidence * 10, Integer), 9)


def _add(totals: dict[Any, Decimal], key: Any, amount: Decimal) -> None:
    totals[key] = totals.get(key, Decimal(0)) + amount


def summary(actor: Actor, filters: AnomalyFilters = AnomalyFilters()) -> DashboardSummary:
    """The Overview from two grouped scans (index-only on the dashboard index), folded in Python.

    The first groups by every dimension the charts use (type, status, currency, month, product,
    confidence decile: a few thousand groups at most); the second by account, for the top list
    and the count of affected accounts. The first scan ignores the status filter, which is applied
    while folding, so the recovered total comes from the same scan whatever statuses are shown.
    """
    require_role(actor, "admin", "analyst")
    org = actor.org_id
    amount, count = func.sum(amount_column()), func.count(Anomaly.id)
    with org_session(org) as session:
        out = DashboardSummary()
        out.last_run, out.active_run = _runs(session, org)
        dims = (Anomaly.type, Anomaly.status, Anomaly.currency, _month(session), Anomaly.product_key,
                _bucket(session))
        any_status = replace(filters, statuses=())
        groups = session.execute(apply_filters(select(*dims, amount, count), org, any_status).group_by(*dims)).all()
        by_period: dict[tuple[str, str], Decimal] = {}
        by_type: dict[tuple[str, str], Decimal] = {}
        by_product: dict[tuple[str, str], Decimal] = {}
        counts: dict[tuple[str, ...], int] = defaultdict(int)
        deciles: dict[int, int] = defaultdict(int)
        currencies = set()
        for kind, status, currency, month, product, decile, total, n in groups:
            total = Decimal(total)
            if kind in LEAK_TYPES and status == "recovered":
                _add(out.recovered, currency, total)
            if filters.statuses and status not in filters.statuses:
                continue
            currencies.add(currency)
            deciles[int(decile)] += n
            _add(by_type, (kind, currency), total)
            counts[("type", kind, currency)] += n
            if kind == "over_billing":
                if status == "open":
                    _add(out.over_billing, currency, total)
                continue
            _add(by_period, (month, currency), total)
            counts[("month", month, currency)] += n
            _add(by_product, (product, currency), total)
            counts[("product", product, currency)] += n
            if status in TO_RECOVER:
                _add(out.open_leak, currency, total)
                out.open_count += n
        out.currencies = sorted(currencies)
        out.by_period = [{"month": m, "currency": c, "amount": a, "count": counts[("month", m, c)]}
                         for (m, c), a in sorted(by_period.items())]
        out.by_type = [{"type": t, "currency": c, "amount": a, "count": counts[("type", t, c)]}
                       for (t, c), a in sorted(by_type.items())]
        out.by_product = [{"product_key": p, "currency": c, "amount": a, "count": counts[("product", p, c)]}
                          for (p, c), a in sorted(by_product.items())]
        out.confidence = [{"bucket": f"{b / 10:.1f}–{(b + 1) / 10:.1f}", "count": deciles[b]} for b in range(10)]

        leaks = Anomaly.type.in_(LEAK_TYPES)
        to_recover = func.max(case((Anomaly.status.in_(TO_RECOVER), 1), else_=0))
        per_account = session.execute(
            apply_filters(select(Anomaly.account_id, Anomaly.currency, amount, count, to_recover), org, filters)
            .where(leaks).group_by(Anomaly.account_id, Anomaly.currency)).all()
        out.accounts_affected = len({acc for acc, _, _, _, recovering in per_account if recovering})
        top = sorted(per_account, key=lambda row: Decimal(row[2]), reverse=True)[:TOP_ACCOUNTS]
        names = dict(session.execute(select(Account.account_id, Account.name).where(
            Account.org_id == org, Account.account_id.in_([row[0] for row in top]))).all())
        out.top_accounts = [{"account_id": acc, "name": names.get(acc, acc), "currency": c, "amount": Decimal(a),
                             "count": n} for acc, c, a, n, _ in top]
    return out


def currencies(actor: Actor) -> list[str]:
    """Every currency the org has anomalies in (the filter's choices, whatever is filtered now)."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return sorted(c for (c,) in session.execute(select(Anomaly.currency).distinct()
                                                    .where(Anomaly.org_id == actor.org_id)))


def active_run(actor: Actor) -> RunBrief | None:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return _runs(session, actor.org_id)[1]


def list_runs(actor: Actor, *, limit: int = 50) -> list[RunBrief]:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        runs = session.scalars(select(ReconRun).where(ReconRun.org_id == actor.org_id)
                               .order_by(ReconRun.id.desc()).limit(limit)).all()
        return [brief for run in runs if (brief := _brief(run)) is not None]


def get_run(actor: Actor, run_id: int) -> RunBrief | None:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return _brief(session.scalars(select(ReconRun).where(ReconRun.org_id == actor.org_id,
                                                             ReconRun.id == run_id)).first())
