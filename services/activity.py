"""Who did what: the actions taken on anomalies and the audit log, for the Actions and Audit pages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from db.models import Action, Anomaly, User
from db.session import org_session
from services import audit
from services.context import Actor, require_role


@dataclass(frozen=True)
class ActionRow:
    id: int
    created_at: datetime
    kind: str
    status: str
    external_id: str | None
    amount: Decimal | None
    currency: str | None
    anomaly_id: int | None
    account_id: str | None
    by: str | None
    error: str | None


@dataclass(frozen=True)
class AuditRow:
    seq: int
    ts: datetime
    actor: str  # as stored (and hashed): user:3, system:scheduler, api_key:7
    action: str
    target: str
    details: dict[str, Any]
    who: str = ""  # for people: the user's email, else the stored label


def people(session: Any, org_id: int, labels: set[str]) -> dict[str, tuple[str, str]]:
    """`user:3` -> that user's (name, email), for users of this org only; other labels are left out."""
    ids = {int(label.split(":", 1)[1]) for label in labels
           if label.startswith("user:") and label.split(":", 1)[1].isdigit()}
    if not ids:
        return {}
    found = session.execute(select(User.id, User.name, User.email).where(User.org_id == org_id, User.id.in_(ids)))
    return {f"user:{user_id}": (name, email) for user_id, name, email in found}


def _who(session: Any, org_id: int, labels: set[str]) -> dict[str, str]:
    """`user:3` -> that user's email (users of this org only); other labels stay as they are."""
    return {label: email for label, (_, email) in people(session, org_id, labels).items()}


def list_actions(actor: Actor, *, limit: int = 100, offset: int = 0) -> tuple[list[ActionRow], int]:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        total = session.scalar(select(func.count(Action.id)).where(Action.org_id == actor.org_id)) or 0
        rows = session.execute(
            select(Action, Anomaly.account_id, User.email)
            .outerjoin(Anomaly, Action.anomaly_id == Anomaly.id).outerjoin(User, Action.created_by == User.id)
            .where(Action.org_id == actor.org_id).order_by(Action.id.desc()).limit(limit).offset(offset)).all()
        return [ActionRow(a.id, a.created_at, a.kind, a.status, a.external_id, a.amount, a.currency, a.anomaly_id,
                          account, email, a.error) for a, account, email in rows], total


def list_audit(actor: Actor, *, limit: int = 100, offset: int = 0) -> tuple[list[AuditRow], int]:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        entries = audit.list_entries(session, actor.org_id, limit=limit, offset=offset)
        total = audit.count_entries(session, actor.org_id)
        names = _who(session, actor.org_id, {e.actor for e in entries})
        return [AuditRow(e.seq, e.ts, e.actor, e.action, f"{e.target_type or ''} {e.target_id or ''}".strip(),
                         dict(e.details), names.get(e.actor, e.actor)) for e in entries], total


def verify_audit(actor: Actor) -> audit.VerifyResult:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return audit.verify(session, actor.org_id)
