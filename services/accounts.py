"""The account drill-down: find an account, then everything known about it in one view."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import func, or_, select

from db.models import Account, Action, Anomaly
from db.session import org_session
from services.anomalies import AnomalyFilters, AnomalyRow, list_anomalies
from services.context import Actor, require_role
from services.errors import NotFound

SEARCH_LIMIT = 50


@dataclass(frozen=True)
class AccountBrief:
    account_id: str
    name: str
    stripe_customer_id: str | None
    crm_id: str | None
    anomaly_count: int = 0  # every anomaly of the account, whatever its status (the search ranks by it)


@dataclass
class AccountView:
    account: AccountBrief
    anomalies: list[AnomalyRow]
    anomaly_total: int
    periods: list[dict[str, Any]] = field(default_factory=list)  # one row per product and period
    actions: list[dict[str, Any]] = field(default_factory=list)


def search_accounts(actor: Actor, text: str = "", limit: int = SEARCH_LIMIT) -> list[AccountBrief]:
    """Accounts whose id, name or Stripe customer id contains `text` (all when empty): those with the
    most anomalies first (an account without any has nothing to drill into), then by name."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        counts = (select(Anomaly.account_id, func.count(Anomaly.id).label("n"))
                  .where(Anomaly.org_id == actor.org_id).group_by(Anomaly.account_id).subquery())
        n = func.coalesce(counts.c.n, 0)
        query = (select(Account, n).outerjoin(counts, counts.c.account_id == Account.account_id)
                 .where(Account.org_id == actor.org_id))
        if text.strip():
            needle = f"%{text.strip().lower()}%"
            query = query.where(or_(func.lower(Account.account_id).like(needle), func.lower(Account.name).like(needle),
                                    func.lower(Account.stripe_customer_id).like(needle)))
        rows = session.execute(query.order_by(n.desc(), Account.name, Account.account_id).limit(limit)).all()
        return [AccountBrief(r.account_id, r.name, r.stripe_customer_id, r.crm_id, int(count)) for r, count in rows]


def get_account(actor: Actor, account_id: str) -> AccountBrief | None:
    """One account by its exact id (the page focused from the Overview or an anomaly), None if unknown."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        row = session.scalars(select(Account).where(Account.org_id == actor.org_id,
                                                    Account.account_id == account_id)).one_or_none()
        if row is None:
            return None
        count = session.scalar(select(func.count(Anomaly.id)).where(Anomaly.org_id == actor.org_id,
                                                                    Anomaly.account_id == account_id)) or 0
        return AccountBrief(row.account_id, row.name, row.stripe_customer_id, row.crm_id, int(count))


def account_view(actor: Actor, account_id: str) -> AccountView:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        account = session.scalars(select(Account).where(Account.org_id == actor.org_id,
                                                        Account.account_id == account_id)).one_or_none()
        if account is None:
            raise NotFound(f"account {account_id} not found")
        brief = AccountBrief(account.account_id, account.name, account.stripe_customer_id, account.crm_id)
        periods = session.execute(
            select(Anomaly.product_key, Anomaly.period_start, Anomaly.period_end, Anomaly.currency,
                   func.max(Anomaly.actual_units), func.max(Anomaly.reported_units),
                   func.max(Anomaly.expected_amount), func.max(Anomaly.billed_amount))
            .where(Anomaly.org_id == actor.org_id, Anomaly.account_id == account_id)
            .group_by(Anomaly.product_key, Anomaly.period_start, Anomaly.period_end, Anomaly.currency)
            .order_by(Anomaly.period_start, Anomaly.product_key)).all()
        actions = session.execute(
            select(Action, Anomaly.product_key, Anomaly.period_start).join(Anomaly, Action.anomaly_id == Anomaly.id)
            .where(Action.org_id == actor.org_id, Anomaly.account_id == account_id)
            .order_by(Action.created_at.desc())).all()
    page = list_anomalies(actor, AnomalyFilters(account_id=account_id), page_size=200, sort="period")
    return AccountView(
        account=brief, anomalies=page.rows, anomaly_total=page.total,
        periods=[{"product_key": p, "period_start": s, "period_end": e, "currency": c, "actual_units": Decimal(a),
                  "reported_units": Decimal(r), "expected_amount": Decimal(x), "billed_amount": Decimal(b)}
                 for p, s, e, c, a, r, x, b in periods],
        actions=[{"id": a.id, "kind": a.kind, "status": a.status, "external_id": a.external_id, "amount": a.amount,
                  "currency": a.currency, "created_at": a.created_at, "product_key": product, "period_start": start}
                 for a, product, start in actions],
    )
