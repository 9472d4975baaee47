"""The dashboard's summary of the anomaly queue, with the queue's filters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routes.deps import QueueFilters, UserActor
from routes.schemas import ERRORS, json_response
from services import dashboard

router = APIRouter(tags=["dashboard"], responses=ERRORS)


@router.get("/api/dashboard/summary")
def dashboard_summary(actor: UserActor, filters: QueueFilters) -> Any:
    return json_response(dashboard.summary(actor, filters))
