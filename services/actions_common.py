"""What every recovery action (Stripe draft invoice, Salesforce/HubSpot task) shares.

`ActionResult` is the one shape the app, the API and the CLI render, so a replayed request (double
click, retry after a timeout) is visibly the same action as the first one (`replayed=True`).

Exactly once, in three steps around the remote call:

1. `claim_action` records the action as `pending` under its unique `idempotency_key` *before*
   anything is sent. The unique constraint decides between concurrent callers: one wins and calls
   the outside system; the others wait for its outcome and get it back as a replay. A `failed`
   action, or a `pending` one whose owner vanished (older than the lease), is taken over by a
   single caller (compare-and-set on its status), so a retry reuses the same row.
2. The caller makes the remote call, itself idempotent (the outside system's idempotency key, or a
   find-before-create marker), so an attempt whose answer was lost is found, not repeated.
3. `succeed_action` / `fail_action` record the outcome, the anomaly status and the audit entry in
   one transaction.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.money import round_money
from db.models import Account, Action, Anomaly
from db.session import org_session
from services import audit
from services.context import Actor
from services.errors import Conflict, InvalidInput, NotFound, ServiceError

DEFAULT_APP_BASE_URL = "http://localhost:8501"
LEASE = timedelta(minutes=3)  # longer than any remote call with its retries may take
WAIT_FOR_OTHER = 20.0  # seconds a concurrent caller waits for the one doing the work
FINAL_ANOMALY_STATUSES = ("recovered",)  # an action never moves an anomaly out of these


@dataclass(frozen=True)
class ActionResult:
    action_id: int
    kind: str  # draft_invoice | salesforce_task | hubspot_task
    status: str  # pending | succeeded | failed
    external_id: str | None
    amount: Decimal | None
    currency: str | None
    replayed: bool
    url: str | None = None  # where to open the created object (Stripe dashboard, CRM record), when known


class ActionFailed(ServiceError):
    """The outside system refused or could not be reached; the action is recorded as failed.

    `retryable`: trying again later may work (rate limit, outage, timeout); otherwise someone must
    fix something first (credentials, a missing mapping) — the message says what.
    """

    def __init__(self, message: str, *, retryable: bool = False, action_id: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.action_id = action_id


def app_base_url() -> str:
    """Where the app is served, for links back to an anomaly from Stripe or a CRM (`RRC_APP_BASE_URL`)."""
    return (os.environ.get("RRC_APP_BASE_URL") or DEFAULT_APP_BASE_URL).rstrip("/")


def anomaly_link(anomaly_id: int) -> str:
    """The app page showing one anomaly: what a CRM task or invoice description points back to."""
    return f"{app_base_url()}/anomalies?id={anomaly_id}"


def load_anomaly(session: Session, actor: Actor, anomaly_id: Any) -> Anomaly:
    """The org's anomaly `anomaly_id`, checked to be an integer id; NotFound otherwise."""
    if isinstance(anomaly_id, bool) or not isinstance(anomaly_id, int):
        raise InvalidInput(f"anomaly_id: expected an integer id, got {anomaly_id!r}")
    anomaly = session.scalars(select(Anomaly).where(Anomaly.org_id == actor.org_id,
                                                    Anomaly.id == anomaly_id)).one_or_none()
    if anomaly is None:
        raise NotFound(f"anomaly {anomaly_id} not found")
    return anomaly


def load_account(session: Session, actor: Actor, anomaly: Anomaly) -> Account:
    """The account an action on `anomaly` addresses; refused when the org does not know it yet."""
    account = session.scalars(select(Account).where(Account.org_id == actor.org_id,
                                                    Account.account_id == anomaly.account_id)).one_or_none()
    if account is None:
        raise InvalidInput(f"account {anomaly.account_id} is unknown: run a reconciliation or sync first")
    return account


def result_of(action: Action, *, replayed: bool) -> ActionResult:
    """The row as an ActionResult; the amount with the currency's decimals (the column keeps six)."""
    url = (action.response or {}).get("url") if isinstance(action.response, dict) else None
    amount = None if action.amount is None else Decimal(action.amount)
    if amount is not None and action.currency:
        amount = round_money(amount, action.currency)
    return ActionResult(action.id, action.kind, action.status, action.external_id, amount, action.currency,
                        replayed, url)


@dataclass(frozen=True)
class Claim:
    """Either this caller owns the action now (`action_id`) or it already succeeded (`replay`)."""

    action_id: int | None = None
    replay: ActionResult | None = None


def _take_over(actor: Actor, action: Action, values: dict[str, Any]) -> bool:
    """Compare-and-set a failed or abandoned action back to pending; True for the one caller that won.

    The row gets this attempt's request and amount (a re-run may have changed the anomaly meanwhile).
    """
    now = datetime.now(UTC)
    condition = (Action.status == "failed") if action.status == "failed" else (
        (Action.status == "pending") & (Action.updated_at < now - LEASE))
    with org_session(actor.org_id) as session:
        changed = session.execute(
            update(Action).where(Action.org_id == actor.org_id, Action.id == action.id, condition)
            .values(status="pending", error=None, updated_at=now, created_by=actor.user_id, **values)
            .execution_options(synchronize_session=False)).rowcount
    return changed == 1


def claim_action(actor: Actor, *, key: str, kind: str, anomaly_id: int, amount: Decimal | None,
                 currency: str | None, request: dict[str, Any], wait: float = WAIT_FOR_OTHER) -> Claim:
    """Record the action as pending before any remote call, or hand back the one already done."""
    deadline = time.monotonic() + wait
    while True:
        with org_session(actor.org_id) as session:
            existing = session.scalars(select(Action).where(Action.org_id == actor.org_id,
                                                            Action.idempotency_key == key)).one_or_none()
        if existing is None:
            try:
                with org_session(actor.org_id) as session:
                    action = Action(org_id=actor.org_id, anomaly_id=anomaly_id, kind=kind, status="pending",
                                    idempotency_key=key, amount=amount, currency=currency, request=request,
                                    created_by=actor.user_id)
                    session.add(action)
                    session.flush()
                    return Claim(action_id=action.id)
            except IntegrityError:
                continue  # another caller inserted it first: look again
        if existing.status == "succeeded":
            return Claim(replay=result_of(existing, replayed=True))
        stale = existing.updated_at < datetime.now(UTC) - LEASE
        if (existing.status == "failed" or stale) and _take_over(
                actor, existing, {"amount": amount, "currency": currency, "request": request}):
            return Claim(action_id=existing.id)
        if time.monotonic() > deadline:
            raise Conflict("this action is being carried out by another request right now; refresh in a moment")
        time.sleep(0.1)


def succeed_action(actor: Actor, action_id: int, *, external_id: str, response: dict[str, Any],
                   audit_action: str, details: dict[str, Any]) -> ActionResult:
    """Record success, mark the anomaly actioned (unless recovered) and audit it — one transaction."""
    with org_session(actor.org_id) as session:
        action = session.get(Action, action_id)
        if action is None:
            raise NotFound(f"action {action_id} not found")
        action.status, action.external_id, action.response, action.error = "succeeded", external_id, response, None
        action.updated_at = datetime.now(UTC)
        anomaly = session.get(Anomaly, action.anomaly_id) if action.anomaly_id is not None else None
        if anomaly is not None and anomaly.status not in FINAL_ANOMALY_STATUSES and anomaly.status != "actioned":
            anomaly.status, anomaly.status_reason = "actioned", f"{action.kind.replace('_', ' ')} {external_id}"
            anomaly.status_changed_at, anomaly.status_changed_by = datetime.now(UTC), actor.user_id
        audit.append(session, actor, audit_action, "anomaly", action.anomaly_id,
                     {"action_id": action.id, "kind": action.kind, "external_id": external_id,
                      "amount": action.amount, "currency": action.currency, **details})
        session.flush()
        return result_of(action, replayed=False)


def fail_action(actor: Actor, action_id: int, *, error: str, audit_action: str, details: dict[str, Any]) -> None:
    """Record the failure (the row stays, so a retry reuses the same key) and audit who tried what."""
    with org_session(actor.org_id) as session:
        action = session.get(Action, action_id)
        if action is None:
            return
        action.status, action.error, action.updated_at = "failed", error[:2000], datetime.now(UTC)
        audit.append(session, actor, audit_action, "anomaly", action.anomaly_id,
                     {"action_id": action.id, "kind": action.kind, "error": error[:500], **details})
