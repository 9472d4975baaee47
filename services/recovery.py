"""Turn a confirmed leak into a Stripe draft invoice, exactly once.

Exactly once, in two layers. Locally: the action's idempotency key is a hash of (org, anomaly
fingerprint, leak amount), unique in `actions`, and the row is claimed (status pending) before
Stripe is called, so a double click or 20 concurrent requests make one caller do the work while
the others wait for its result (services/actions_common.py). Remotely: Stripe gets Idempotency-Keys
derived from the same hash, so a retry after a timeout, a crash or an outage finds the invoice
the first attempt created instead of creating a second one. Stripe's keys only replay the same
request within 24 hours, and the amount is part of ours: when an earlier attempt failed or was
abandoned, Stripe is first searched for an invoice carrying the gap's fingerprint (metadata
`rrc_fingerprint`), and one found is recorded as that attempt's outcome — so a gap whose amount
changed after a lost answer gets the usual "adjust that draft" refusal, never a second invoice.

Everything that can be checked here (role, anomaly type and status, the account's Stripe
customer, the Stripe integration and the address it points at: services/source_policy.py) is
checked before anything is written: a refused request leaves no action row and sends nothing to
Stripe. The connector then checks the customer and the price in Stripe before its first write. A
failure after the claim marks the action failed (the retry reuses the row and the keys); the
invoice stays a draft whatever happens — this product never finalizes or sends one, finance does
that in Stripe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from connectors import stripe as stripe_connector
from core.money import format_money, from_minor_units, round_money
from db.models import Action, Anomaly
from db.session import org_session
from services import catalog, integrations
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
from services.anomalies import LEAK_TYPES
from services.context import Actor, require_role
from services.errors import Conflict, InvalidInput

KIND = "draft_invoice"
CLOSED_STATUSES = ("dismissed", "resolved", "recovered")  # nothing (left) to invoice
RETRYABLE = ("rate_limited", "unavailable")


@dataclass(frozen=True)
class PreviewLine:
    description: str
    quantity: Decimal
    amount: Decimal


@dataclass(frozen=True)
class InvoicePreview:
    """What "Draft invoice" will put in Stripe, shown before the analyst confirms."""

    anomaly_id: int
    account_id: str
    account_name: str
    customer: str  # Stripe customer id
    currency: str
    lines: tuple[PreviewLine, ...]
    total: Decimal
    already_drafted: str | None = None  # invoice id when this exact draft exists already


@dataclass(frozen=True)
class _Plan:
    anomaly_id: int
    key: str
    stripe_key: str
    preview: InvoicePreview
    lines: tuple[stripe_connector.DraftLine, ...]
    metadata: dict[str, str]
    description: str


def idempotency_key(org_id: int, fingerprint: str, leak_amount: Decimal, currency: str) -> str:
    """Same org, same gap, same amount -> same key; a changed amount is a different invoice."""
    amount = round_money(Decimal(leak_amount), currency)
    digest = hashlib.sha256(f"{org_id}|{fingerprint}|{amount}|{currency.lower()}".encode()).hexdigest()
    return f"{KIND}:{digest[:48]}"


def _stripe_key(key: str) -> str:
    """The Idempotency-Key prefix sent to Stripe for the action keyed `key` (also kept in the draft's metadata)."""
    return "rrc-" + key.split(":", 1)[1]


def _period_text(anomaly: Anomaly) -> str:
    """The billing period as its first and last day (the end is exclusive)."""
    last_day = (anomaly.period_end - timedelta(days=1)).date().isoformat()
    return f"{anomaly.period_start.date().isoformat()} to {last_day}"


def _units_text(quantity: Decimal) -> str:
    """A quantity as the preview's Quantity column shows it: 31909 -> `31,909`, 2.5 -> `2.5`."""
    return f"{Decimal(quantity).normalize():,f}"


def _plain_words(name: str) -> str:
    """`data_export`, `Data export` and `DATA-EXPORT` say the same thing."""
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def _line_text(anomaly: Anomaly, product_name: str | None = None) -> tuple[str, Decimal]:
    """The invoice line as the customer will read it, and its quantity. Written for the customer:
    the product's name (with its key, the reference in usage exports, unless the name only spells the key
    out: `Data export`, not `Data export (data_export)`), quantities with thousands
    separators as in the preview's Quantity column, no anomaly ids or internal wording (the item's
    metadata links it back to the anomaly), and a missed overage says it is the part above the
    allowance, not the same units billed twice."""
    period = _period_text(anomaly)
    actual, leak = Decimal(anomaly.actual_units), Decimal(anomaly.leak_units)
    product = product_name.strip() if product_name and product_name.strip() else anomaly.product_key
    if _plain_words(product) != _plain_words(anomaly.product_key):  # "API calls (api)", but "Data export"
        product = f"{product} ({anomaly.product_key})"
    used, missing = _units_text(actual), _units_text(leak)
    return {
        "unbilled_usage": (f"{product}: {used} units used {period}", actual),
        "under_reported_usage": (f"{product}: {missing} additional units used {period}, not included in earlier "
                                 "invoices", leak),
        "renewal_drift": (f"{product}: {used} units used {period}, adjusted to the contracted price", actual),
        "missed_overage": (f"{product}: usage above the included allowance, {period} ({used} units used in "
                           "total)", actual),
    }[anomaly.type]


def _plan(actor: Actor, anomaly_id: Any, *, for_preview: bool = False) -> _Plan | ActionResult:
    """Read and check everything locally; an existing identical draft comes back as a replay."""
    names = catalog.product_names(actor)  # a product missing from it is named by its key
    with org_session(actor.org_id) as session:
        anomaly = load_anomaly(session, actor, anomaly_id)
        if anomaly.type not in LEAK_TYPES:
            raise InvalidInput(f"anomaly {anomaly_id} is {anomaly.type}: only unbilled revenue can be invoiced "
                               "(over-billing is a credit risk; handle it with a credit note in Stripe)")
        leak = Decimal(anomaly.leak_amount)
        if leak <= 0:
            raise InvalidInput(f"anomaly {anomaly_id} has no amount to invoice (leak_amount {leak})")
        key = idempotency_key(actor.org_id, anomaly.fingerprint, leak, anomaly.currency)
        done = session.scalars(select(Action).where(Action.org_id == actor.org_id, Action.anomaly_id == anomaly.id,
                                                    Action.kind == KIND, Action.status == "succeeded")
                              .order_by(Action.id)).all()
        same = next((a for a in done if a.idempotency_key == key), None)
        if same is not None and not for_preview:
            return result_of(same, replayed=True)
        if done and same is None:
            earlier = done[-1]
            raise Conflict(f"anomaly {anomaly_id} already has draft invoice {earlier.external_id} for "
                           f"{format_money(Decimal(earlier.amount or 0), anomaly.currency)}; the gap is now "
                           f"{format_money(leak, anomaly.currency)}: adjust that draft in Stripe instead")
        if anomaly.status in CLOSED_STATUSES and same is None:
            raise Conflict(f"anomaly {anomaly_id} is {anomaly.status}: reopen it before drafting an invoice "
                           "(a recovered gap was already paid)")
        account = load_account(session, actor, anomaly)
        if not account.stripe_customer_id:
            raise InvalidInput(f"account {account.account_id} ({account.name}) has no stripe_customer_id: map it to "
                               "its Stripe customer before drafting an invoice")
        description, quantity = _line_text(anomaly, names.get(anomaly.product_key))
        # A retry sends Stripe the request it sent before under the same Idempotency-Key, word for word
        # (a product renamed since, or a data source unreadable now, must not change the line's text).
        earlier_request = session.scalars(select(Action.request).where(
            Action.org_id == actor.org_id, Action.idempotency_key == key)).first() or {}
        earlier_lines = earlier_request.get("lines") or [{}]
        description = earlier_lines[0].get("description") or description
        amount = round_money(leak, anomaly.currency)
        preview = InvoicePreview(anomaly.id, account.account_id, account.name, account.stripe_customer_id,
                                 anomaly.currency, (PreviewLine(description, quantity, amount),), amount,
                                 same.external_id if same is not None else None)
        line = stripe_connector.DraftLine(
            description, amount, anomaly.period_start, anomaly.period_end, anomaly.price_id or None,
            {"product_key": anomaly.product_key, "anomaly_id": str(anomaly.id), "rrc_type": anomaly.type})
        metadata = {"rrc_anomaly_id": str(anomaly.id), "rrc_fingerprint": anomaly.fingerprint,
                    "rrc_account_id": account.account_id, "rrc_link": anomaly_link(anomaly.id)}
        invoice_text = f"Usage of {_period_text(anomaly)} not included in earlier invoices"
        return _Plan(anomaly.id, key, _stripe_key(key), preview, (line,), metadata, invoice_text)


def preview_invoice(actor: Actor, anomaly_id: int) -> InvoicePreview:
    """The draft invoice "Draft invoice" would create, without calling Stripe."""
    require_role(actor, "admin", "analyst")
    plan = _plan(actor, anomaly_id, for_preview=True)
    assert isinstance(plan, _Plan)
    return plan.preview


def _dashboard_url(config: dict[str, Any], invoice_id: str) -> str:
    mode = "" if "_live_" in str(config.get("api_key", "")) else "test/"
    return f"https://dashboard.stripe.com/{mode}invoices/{invoice_id}"


def _lost_draft(actor: Actor, plan: _Plan, config: dict[str, Any]) -> dict[str, Any] | None:
    """The draft in Stripe that an unfinished earlier attempt for this gap created, if any."""
    with org_session(actor.org_id) as session:
        unfinished = session.scalars(select(Action.created_at).where(
            Action.org_id == actor.org_id, Action.anomaly_id == plan.anomaly_id, Action.kind == KIND,
            Action.status != "succeeded")).all()
    if not unfinished:
        return None
    since = min(unfinished) - timedelta(hours=1)  # the two clocks may disagree
    try:
        return stripe_connector.find_invoice(config, plan.preview.customer,
                                             {"rrc_fingerprint": plan.metadata["rrc_fingerprint"]}, since)
    except stripe_connector.StripeConnectorError as exc:  # never create blind: it may be a duplicate
        raise ActionFailed(exc.message, retryable=exc.kind in RETRYABLE) from None


def _record_found(actor: Actor, plan: _Plan, config: dict[str, Any], invoice: dict[str, Any]) -> None:
    """Record a draft made for another amount (the gap changed since) as the outcome of the attempt
    that made it (its Stripe key is in the draft's metadata; older drafts are matched by amount)."""
    total = from_minor_units(invoice["total"], invoice["currency"])
    with org_session(actor.org_id) as session:
        attempts = session.scalars(select(Action).where(
            Action.org_id == actor.org_id, Action.anomaly_id == plan.anomaly_id, Action.kind == KIND,
            Action.status != "succeeded").order_by(Action.id.desc())).all()
        if not attempts:  # another request recorded it meanwhile: _plan now replays or refuses
            return
        maker = next((a for a in attempts if _stripe_key(a.idempotency_key) == invoice["metadata"].get("rrc_key")),
                     next((a for a in attempts if a.amount is not None and Decimal(a.amount) == total), attempts[0]))
        key, amount, request = maker.idempotency_key, maker.amount, maker.request
    claim = claim_action(actor, key=key, kind=KIND, anomaly_id=plan.anomaly_id, amount=amount,
                         currency=plan.preview.currency, request=request or {})
    if claim.action_id is not None:
        invoice_id = str(invoice["id"])
        succeed_action(actor, claim.action_id, external_id=invoice_id,
                       response={"invoice_id": invoice_id, "url": _dashboard_url(config, invoice_id),
                                 "status": invoice["status"], "total": str(total)},
                       audit_action="draft_invoice.found",
                       details={"customer": plan.preview.customer,
                                "note": "created by an attempt whose answer was lost"})


def draft_invoice(actor: Actor, anomaly_id: int) -> ActionResult:
    """Create the draft invoice for a leak; repeating the request returns the same invoice."""
    require_role(actor, "admin", "analyst")
    plan = _plan(actor, anomaly_id)
    if isinstance(plan, ActionResult):
        return plan
    config = integrations.checked_config(actor, "stripe")  # before anything is written or sent
    lost = _lost_draft(actor, plan, config)
    if lost is not None and lost["metadata"].get("rrc_key") != plan.stripe_key:
        _record_found(actor, plan, config, lost)
        plan = _plan(actor, anomaly_id)  # now the refusal to draft another (or a replay of the same amount)
        if isinstance(plan, ActionResult):
            return plan
        lost = None
    preview = plan.preview
    request = {"customer": preview.customer, "currency": preview.currency, "total": str(preview.total),
               "lines": [{"description": line.description, "quantity": str(line.quantity),
                          "amount": str(line.amount)} for line in preview.lines]}
    claim = claim_action(actor, key=plan.key, kind=KIND, anomaly_id=plan.anomaly_id, amount=preview.total,
                         currency=preview.currency, request=request)
    if claim.replay is not None:
        return claim.replay
    assert claim.action_id is not None
    try:
        invoice_id = stripe_connector.create_draft_invoice(
            config, preview.customer, preview.currency, list(plan.lines), plan.stripe_key, plan.metadata,
            description=plan.description, resume=lost["id"] if lost is not None else None)
    except stripe_connector.StripeConnectorError as exc:
        retryable = exc.kind in RETRYABLE
        fail_action(actor, claim.action_id, error=exc.message, audit_action="draft_invoice.failed",
                    details={"customer": preview.customer, "amount": preview.total, "currency": preview.currency,
                             "retryable": retryable})
        raise ActionFailed(exc.message, retryable=retryable, action_id=claim.action_id) from None
    except Exception as exc:
        fail_action(actor, claim.action_id, error=type(exc).__name__, audit_action="draft_invoice.failed",
                    details={"customer": preview.customer})
        raise
    url = _dashboard_url(config, invoice_id)
    return succeed_action(actor, claim.action_id, external_id=invoice_id,
                          response={"invoice_id": invoice_id, "url": url, "status": "draft",
                                    "total": str(preview.total)},
                          audit_action="draft_invoice.created",
                          details={"customer": preview.customer, "account_id": preview.account_id,
                                   "lines": len(preview.lines)})
