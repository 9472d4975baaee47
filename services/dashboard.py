"""What finance leaders see first: SQL aggregates over anomalies, never every row in Python.

The Overview's headline figures follow one rule, `FIGURES`: each counts one group of types (leaks:
money owed to us; over-billing: money we may owe back) in given statuses, so every figure equals the
sum the anomaly queue lists for that type group and those statuses under the same other filters.
They are computed here and only drawn by the page, so a tile and a caption on one screen cannot
disagree. "Open leak" is everything still to recover (open or actioned: a draft invoice is not yet
money in); "in recovery" is the part of it with an action out.

Every figure is per currency (amounts are never summed across currencies). The figures ignore the
Status filter (their statuses are their point: the Overview's default filter is open and actioned
anomalies, and finance must still see what was recovered) but keep every other filter (period,
currency, type, ...). The charts and the top accounts show the statuses the filter selects. The leak
charts count leaks only; the confidence chart counts every anomaly in view, each bucket split into
its leaks and its over-billing so the page can tell them apart (`count` is their sum).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, and_, case, cast, func, select, true
from sqlalchemy.orm import Session

from db.models import Account, Anomaly, ReconRun
from db.session import org_session
from services.anomalies import LEAK_TYPES, TYPES, AnomalyFilters, amount_column, apply_filters
from services.context import Actor, require_role

OVER_BILLING_TYPES = tuple(kind for kind in TYPES if kind not in LEAK_TYPES)  # a credit risk, never a leak
TOP_ACCOUNTS = 10


@dataclass(frozen=True)
class FigureRule:
    """Which anomalies one headline figure counts: a group of types in some statuses."""

    types: tuple[str, ...]
    statuses: tuple[str, ...]


FIGURES = {  # DashboardSummary field -> what it counts
    "open_leak": FigureRule(LEAK_TYPES, ("open", "actioned")),  # still to recover
    "in_recovery": FigureRule(LEAK_TYPES, ("actioned",)),  # the part of it with a draft invoice or CRM task out
    "recovered": FigureRule(LEAK_TYPES, ("recovered",)),  # an analyst marked the money back in
    "over_billing": FigureRule(OVER_BILLING_TYPES, ("open",)),  # credit risk nobody has handled yet
    "over_billing_handled": FigureRule(OVER_BILLING_TYPES, ("actioned",)),  # a CRM task is out
}
ACCOUNTS_AFFECTED = "open_leak"  # the figure whose accounts "accounts affected" counts


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
    """The Overview, per currency. The five money figures and `counts` follow `FIGURES`."""

    open_leak: dict[str, Decimal] = field(default_factory=dict)  # currency -> amount
    in_recovery: dict[str, Decimal] = field(default_factory=dict)
    recovered: dict[str, Decimal] = field(default_factory=dict)
    over_billing: dict[str, Decimal] = field(default_factory=dict)
    over_billing_handled: dict[str, Decimal] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIGURES, 0))  # figure -> anomalies
    accounts_affected: int = 0  # accounts with a leak still to recover
    last_run: RunBrief | None = None
    active_run: RunBrief | None = None
    # The charts: leak types only, in the statuses the filter selects
    by_period: list[dict[str, Any]] = field(default_factory=list)  # month, currency, amount, count
    by_type: list[dict[str, Any]] = field(default_factory=list)  # type, currency, amount, count
    by_product: list[dict[str, Any]] = field(default_factory=list)  # product_key, currency, amount, count
    top_accounts: list[dict[str, Any]] = field(default_factory=list)  # account_id, name, currency, amount, count
    # bucket ("0.9–1.0"), count (every type), and its parts: leak (the leak types), over_billing (the credit risk)
    confidence: list[dict[str, Any]] = field(default_factory=list)
    currencies: list[str] = field(default_factory=list)  # of the anomalies the filters select

    @property
    def empty(self) -> bool:
        return not self.currencies

    @property
    def open_count(self) -> int:
        """Anomalies behind "Open leak" and "accounts affected"."""
        return self.counts[ACCOUNTS_AFFECTED]


def _month(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(Anomaly.period_start, "YYYY-MM")
    return func.strftime("%Y-%m", Anomaly.period_start)


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


def _counted_by(name: str) -> Any:
    """SQL: the anomaly is one that figure `name` counts."""
    return and_(Anomaly.type.in_(FIGURES[name].types), Anomaly.status.in_(FIGURES[name].statuses))


def _chart_rows(cells: dict[tuple[str, str], list[Any]], key: str) -> list[dict[str, Any]]:
    return [{key: value, "currency": currency, "amount": amount, "count": n}
            for (value, currency), (amount, n) in sorted(cells.items())]


def _fold_groups(session: Session, org: int, filters: AnomalyFilters, out: DashboardSummary) -> None:
    """The figures (every status) and the charts (the statuses in view) from one grouped scan."""
    dims = (Anomaly.type, Anomaly.status, Anomaly.currency, _month(session), Anomaly.product_key, _bucket(session))
    query = select(*dims, func.sum(amount_column()), func.count(Anomaly.id)).group_by(*dims)
    groups = session.execute(apply_filters(query, org, replace(filters, statuses=()))).all()
    charts: dict[str, dict[tuple[str, str], list[Any]]] = {"month": {}, "type": {}, "product_key": {}}
    deciles: dict[tuple[int, str], int] = defaultdict(int)  # (decile, type group) -> anomalies
    currencies = set()
    for kind, status, currency, month, product, decile, total, n in groups:
        total = Decimal(total)
        for figure, rule in FIGURES.items():
            if kind in rule.types and status in rule.statuses:
                _add(getattr(out, figure), currency, total)
                out.counts[figure] += n
        if filters.statuses and status not in filters.statuses:
            continue
        currencies.add(currency)
        deciles[int(decile), "leak" if kind in LEAK_TYPES else "over_billing"] += n
        if kind not in LEAK_TYPES:
            continue
        for key, value in (("month", month), ("type", kind), ("product_key", product)):
            cell = charts[key].setdefault((value, currency), [Decimal(0), 0])
            cell[0] += total
            cell[1] += n
    out.currencies = sorted(currencies)
    out.by_period, out.by_type, out.by_product = (_chart_rows(cells, key) for key, cells in charts.items())
    out.confidence = [{"bucket": f"{b / 10:.1f}–{(b + 1) / 10:.1f}",
                       "count": deciles[b, "leak"] + deciles[b, "over_billing"],
                       "leak": deciles[b, "leak"], "over_billing": deciles[b, "over_billing"]} for b in range(10)]


def _fold_accounts(session: Session, org: int, filters: AnomalyFilters, out: DashboardSummary) -> None:
    """Accounts affected (every status, like the figures) and the top accounts (the statuses in view)."""
    shown = Anomaly.status.in_(filters.statuses) if filters.statuses else true()
    query = (select(Anomaly.account_id, Anomaly.currency, func.sum(case((shown, amount_column()), else_=0)),
                    func.sum(case((shown, 1), else_=0)), func.max(case((_counted_by(ACCOUNTS_AFFECTED), 1), else_=0)))
             .where(Anomaly.type.in_(LEAK_TYPES)).group_by(Anomaly.account_id, Anomaly.currency))
    per_account = session.execute(apply_filters(query, org, replace(filters, statuses=()))).all()
    out.accounts_affected = len({account for account, _, _, _, owed in per_account if owed})
    in_view = [row for row in per_account if row[3]]
    top = sorted(in_view, key=lambda row: Decimal(row[2]), reverse=True)[:TOP_ACCOUNTS]
    names = dict(session.execute(select(Account.account_id, Account.name).where(
        Account.org_id == org, Account.account_id.in_([row[0] for row in top]))).all())
    out.top_accounts = [{"account_id": account, "name": names.get(account, account), "currency": currency,
                         "amount": Decimal(amount), "count": n} for account, currency, amount, n, _ in top]


def summary(actor: Actor, filters: AnomalyFilters = AnomalyFilters()) -> DashboardSummary:
    """The Overview from two grouped scans (index-only on the dashboard index), folded in Python.

    The first groups by every dimension the charts use (type, status, currency, month, product,
    confidence decile: a few thousand groups at most); the second by account, for the top list
    and the count of affected accounts. Neither applies the status filter in SQL: the figures
    ignore it and the charts apply it while folding, so both come from the same two scans.
    """
    require_role(actor, "admin", "analyst")
    filters.validate()  # both scans drop the status filter, so its values are checked here
    with org_session(actor.org_id) as session:
        out = DashboardSummary()
        out.last_run, out.active_run = _runs(session, actor.org_id)
        _fold_groups(session, actor.org_id, filters, out)
        _fold_accounts(session, actor.org_id, filters, out)
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
