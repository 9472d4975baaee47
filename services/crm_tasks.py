"""`create_crm_task`: hand an anomaly to the account owner as a Salesforce or HubSpot task, exactly once.

The task says what to recover and why (subject with the amount; a body with the evidence summary
and a link back to the anomaly in the app), is due in `due_in_days`, and hangs off the account's
CRM record (`accounts.crm_id`: the Salesforce Account Id / the HubSpot company id).

Exactly once per (org, anomaly fingerprint, CRM): the `actions` row is claimed before the remote call
(see services/actions_common.py), and the connector finds a task it already created before
creating one. Everything that can be checked locally (role, anomaly, CRM mapping, integration and the
address it points at: services/source_policy.py) is checked before anything is written, so a refused
request leaves nothing behind; a refusal by the CRM itself leaves the action `failed` with the
reason, the anomaly unchanged, and the next attempt reuses the same row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from connectors import hubspot, salesforce
from core.money import format_money, plain_decimal, round_money
from db.models import Account, Action, Anomaly
from db.session import org_session
from services import integrations
from services.actions_common import (
    ActionFailed,
    ActionResult,
    anomaly_link,
    claim_action,
    fail_action,
    load_account,
    load_anomaly,
    result_of,
    succeed_action,
)
from services.anomalies import TYPE_LABELS
from services.context import Actor, require_role
from services.errors import Conflict, InvalidInput

SYSTEMS = {"salesforce": "Salesforce", "hubspot": "HubSpot"}
MAX_DUE_DAYS = 365
CLOSED_STATUSES = ("dismissed", "resolved")


@dataclass(frozen=True)
class _Plan:
    """Everything the task needs, read in one transaction before anything is written."""

    anomaly_id: int
    key: str
    kind: str
    crm_id: str
    subject: str
    body: str
    due: date
    amount: Decimal
    currency: str


def _validate(system: Any, due_in_days: Any) -> None:
    if system not in SYSTEMS:
        raise InvalidInput(f"system: expected 'salesforce' or 'hubspot', got {system!r}")
    if isinstance(due_in_days, bool) or not isinstance(due_in_days, int) or not 0 <= due_in_days <= MAX_DUE_DAYS:
        raise InvalidInput(f"due_in_days: expected a whole number of days from 0 to {MAX_DUE_DAYS}, "
                           f"got {due_in_days!r}")


def _describe(anomaly: Anomaly, account: Account) -> tuple[str, str, Decimal]:
    """Subject and body: what a salesperson needs to act without opening the app (but with a link to it)."""
    is_credit = anomaly.type == "over_billing"
    amount = round_money(Decimal(anomaly.overbilled_amount if is_credit else anomaly.leak_amount), anomaly.currency)
    money = format_money(amount, anomaly.currency)
    label = TYPE_LABELS.get(anomaly.type, anomaly.type)
    last_day = (anomaly.period_end - timedelta(days=1)).date()
    period = f"{anomaly.period_start.date().isoformat()} to {last_day.isoformat()}"
    verb = "Review possible credit of" if is_credit else "Recover"
    subject = f"{verb} {money} from {account.name}: {label.lower()} on {anomaly.product_key}"
    lines = [
        f"Revenue Recovery Copilot found {label.lower()} for {account.name} ({account.account_id}).",
        "",
        f"Product: {anomaly.product_key}; billing period {period} (UTC).",
        f"Actual units: {plain_decimal(anomaly.actual_units)}; "
        f"reported to billing: {plain_decimal(anomaly.reported_units)}; gap: {plain_decimal(anomaly.leak_units)}.",
        f"Expected: {format_money(Decimal(anomaly.expected_amount), anomaly.currency)}; billed: "
        f"{format_money(Decimal(anomaly.billed_amount), anomaly.currency)}; "
        f"{'over-billed' if is_credit else 'to recover'}: {money}.",
        f"Severity: {anomaly.severity}; confidence: {Decimal(anomaly.confidence):.0%}.",
    ]
    if anomaly.explanation:
        lines += ["", f"Why: {anomaly.explanation}"]
    lines += ["", f"Evidence and history: {anomaly_link(anomaly.id)}"]
    return subject, "\n".join(lines), amount


def _plan(actor: Actor, anomaly_id: int, system: str, due_in_days: int) -> _Plan | ActionResult:
    """Read and check everything locally; refuse (writing nothing) what cannot work.

    When the task was already created for this anomaly, that action comes back as a replay.
    """
    with org_session(actor.org_id) as session:
        anomaly = load_anomaly(session, actor, anomaly_id)
        key = f"crm:{system}:{actor.org_id}:{anomaly.fingerprint}"
        done = session.scalars(select(Action).where(Action.org_id == actor.org_id, Action.idempotency_key == key,
                                                    Action.status == "succeeded")).one_or_none()
        if done is not None:
            return result_of(done, replayed=True)
        if anomaly.status in CLOSED_STATUSES:
            raise Conflict(f"anomaly {anomaly_id} is {anomaly.status}: reopen it before creating a task")
        account = load_account(session, actor, anomaly)
        if not account.crm_id:
            raise InvalidInput(f"account {account.account_id} ({account.name}) has no crm_id: map it to its "
                               f"{SYSTEMS[system]} record before creating a task")
        subject, body, amount = _describe(anomaly, account)
        return _Plan(anomaly.id, key, f"{system}_task", account.crm_id, subject, body,
                     datetime.now(UTC).date() + timedelta(days=due_in_days), amount, anomaly.currency)


def _remote(system: str, config: dict[str, Any], plan: _Plan) -> tuple[str, str | None]:
    """Create (or find) the task; returns its id and, when it can be known, a link to open it."""
    if system == "salesforce":
        task_id = salesforce.create_task(config, record_id=plan.crm_id, subject=plan.subject,
                                         description=plan.body, due_date=plan.due, idempotency_key=plan.key)
        return task_id, salesforce.task_url(config, task_id)
    task_id = hubspot.create_task(config, company_id=plan.crm_id, subject=plan.subject, body=plan.body,
                                  due_date=plan.due, idempotency_key=plan.key)
    return task_id, hubspot.task_url(config, task_id)


def create_crm_task(actor: Actor, anomaly_id: int, system: str, due_in_days: int = 7) -> ActionResult:
    """Create the follow-up task in the org's CRM; a repeat of the same request returns the same task."""
    require_role(actor, "admin", "analyst")
    _validate(system, due_in_days)
    plan = _plan(actor, anomaly_id, system, due_in_days)
    if isinstance(plan, ActionResult):
        return plan
    config = integrations.checked_config(actor, system)  # where it points: services/source_policy.py
    request = {"system": system, "crm_id": plan.crm_id, "subject": plan.subject, "due_date": plan.due.isoformat()}
    claim = claim_action(actor, key=plan.key, kind=plan.kind, anomaly_id=plan.anomaly_id, amount=plan.amount,
                         currency=plan.currency, request=request)
    if claim.replay is not None:
        return claim.replay
    assert claim.action_id is not None
    try:
        task_id, url = _remote(system, config, plan)
    except (salesforce.SalesforceFailure, hubspot.HubSpotFailure) as exc:
        fail_action(actor, claim.action_id, error=exc.message, audit_action="crm_task.failed",
                    details={"system": system, "retryable": exc.retryable})
        raise ActionFailed(exc.message, retryable=exc.retryable, action_id=claim.action_id) from None
    except Exception as exc:
        fail_action(actor, claim.action_id, error=f"{type(exc).__name__}", audit_action="crm_task.failed",
                    details={"system": system})
        raise
    return succeed_action(actor, claim.action_id, external_id=task_id,
                          response={"task_id": task_id, "url": url, "due_date": plan.due.isoformat()},
                          audit_action="crm_task.created",
                          details={"system": system, "crm_id": plan.crm_id, "due_date": plan.due.isoformat()})
