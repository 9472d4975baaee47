"""Reconciliation runs: the history, one run, and queueing a new one for the scheduler."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from routes.deps import UserActor
from routes.schemas import ERRORS, Id, json_response
from services import dashboard, reconciliation
from services.errors import NotFound

router = APIRouter(tags=["runs"], responses=ERRORS)


@router.get("/api/runs")
def list_runs(actor: UserActor, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Any:
    return json_response({"runs": dashboard.list_runs(actor, limit=limit)})


@router.post("/api/runs", status_code=202)
def queue_run(actor: UserActor) -> Any:
    """Queue a reconciliation run; the scheduler process picks it up."""
    run = reconciliation.queue_run(actor, trigger="api")
    return json_response({"id": run.id, "status": run.status, "trigger": run.trigger, "queued_at": run.queued_at},
                         202)


@router.get("/api/runs/{run_id}")
def get_run(actor: UserActor, run_id: Id) -> Any:
    run = dashboard.get_run(actor, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return json_response(run)
