"""What finance leaders see first: SQL aggregates over anomalies, never every row in Python.

Every figure is per currency (amounts are never summed across currencies). "Open leak" is the
money of leak-type anomalies still to recover (open or actioned); "recovered" what analysts
marked recovered; over-billing is a credit risk and kept apart from leaks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, cast, func, select
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


def summary(actor: Actor, filters: AnomalyFilters = AnomalyFilters()) -> DashboardSummary:
    """The Overview in a handful of GROUP BY queries; `filters` are the page's filters."""
    require_role(actor, "admin", "analyst")
    org = actor.org_id
    amount = func.sum(amount_column())

    def grouped(*columns: Any) -> Any:
        return apply_filters(select(*columns, amount, func.count(Anomaly.id)), org, filters).group_by(*columns)

    leaks = Anomaly.type.in_(LEAK_TYPES)
    with org_session(org) as session:
        out = DashboardSummary()
        out.last_run, out.active_run = _runs(session, org)
        out.currencies = sorted(c for (c,) in session.execute(
            apply_filters(select(Anomaly.currency).distinct(), org, filters)))
        out.open_leak = _by_currency(session, apply_filters(select(Anomaly.currency, amount), org, filters)
                                     .where(leaks, Anomaly.status.in_(TO_RECOVER)).group_by(Anomaly.currency))
        out.recovered = _by_currency(session, apply_filters(select(Anomaly.currency, amount), org, filters)
                                     .where(leaks, Anomaly.status == "recovered").group_by(Anomaly.currency))
        out.over_billing = _by_currency(session, apply_filters(select(Anomaly.currency, amount), org, filters)
                                        .where(Anomaly.type == "over_billing", Anomaly.status == "open")
                                        .group_by(Anomaly.currency))
        to_recover = apply_filters(select(func.count(func.distinct(Anomaly.account_id)), func.count(Anomaly.id)),
                                   org, filters).where(leaks, Anomaly.status.in_(TO_RECOVER))
        out.accounts_affected, out.open_count = session.execute(to_recover).one()
        month = _month(session).label("month")
        out.by_period = [{"month": m, "currency": c, "amount": Decimal(a), "count": n}
                         for m, c, a, n in session.execute(grouped(month, Anomaly.currency).where(leaks)
                                                           .order_by(month))]
        out.by_type = [{"type": t, "currency": c, "amount": Decimal(a), "count": n}
                       for t, c, a, n in session.execute(grouped(Anomaly.type, Anomaly.currency))]
        out.by_product = [{"product_key": p, "currency": c, "amount": Decimal(a), "count": n}
                          for p, c, a, n in session.execute(grouped(Anomaly.product_key, Anomaly.currency)
                                                            .where(leaks))]
        top = (grouped(Anomaly.account_id, Anomaly.currency).where(leaks)
               .order_by(amount.desc()).limit(TOP_ACCOUNTS))
        rows = session.execute(top).all()
        names = dict(session.execute(select(Account.account_id, Account.name).where(
            Account.org_id == org, Account.account_id.in_([r[0] for r in rows]))).all())
        out.top_accounts = [{"account_id": acc, "name": names.get(acc, acc), "currency": c, "amount": Decimal(a),
                             "count": n} for acc, c, a, n in rows]
        bucket = func.min(cast(Anomaly.confidence * 10, Integer), 9).label("bucket")
        if session.get_bind().dialect.name == "postgresql":
            bucket = func.least(cast(func.floor(Anomaly.confidence * 10), Integer), 9).label("bucket")
        counts = defaultdict(int, {b: n for b, n in session.execute(
            apply_filters(select(bucket, func.count(Anomaly.id)), org, filters).group_by(bucket))})
        out.confidence = [{"bucket": f"{b / 10:.1f}–{(b + 1) / 10:.1f}", "count": counts[b]} for b in range(10)]
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
