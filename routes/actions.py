"""Recovery actions on one anomaly: the draft invoice (preview, then Stripe) and the CRM follow-up task."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routes.deps import UserActor
from routes.schemas import ERRORS, CrmTaskRequest, ErrorResponse, Id, json_response
from services import crm_tasks, recovery

router = APIRouter(tags=["actions"], responses=ERRORS)


@router.get("/api/anomalies/{anomaly_id}/invoice-preview")
def invoice_preview(actor: UserActor, anomaly_id: Id) -> Any:
    """The draft invoice that draft-invoice would create (customer, lines, total), without calling Stripe."""
    return json_response(recovery.preview_invoice(actor, anomaly_id))


@router.post("/api/anomalies/{anomaly_id}/draft-invoice",
             responses={409: {"model": ErrorResponse, "description": "already invoiced or closed"},
                        502: {"model": ErrorResponse, "description": "Stripe refused or is unreachable"}})
def draft_invoice(actor: UserActor, anomaly_id: Id) -> Any:
    """Create a Stripe draft invoice for the leak (never finalized); repeating it returns the same invoice."""
    return json_response(recovery.draft_invoice(actor, anomaly_id))


@router.post("/api/anomalies/{anomaly_id}/crm-task",
             responses={502: {"model": ErrorResponse, "description": "the CRM refused or is unreachable"}})
def create_crm_task(actor: UserActor, anomaly_id: Id, body: CrmTaskRequest) -> Any:
    """Create the follow-up task in Salesforce or HubSpot; repeating the request returns the same task."""
    return json_response(crm_tasks.create_crm_task(actor, anomaly_id, body.system, body.due_in_days))
