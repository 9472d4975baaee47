"""The anomaly queue: a filtered, sorted page of it, one anomaly, and its status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from routes.deps import QueueFilters, UserActor
from routes.schemas import ERRORS, Id, StatusChange, json_response
from services import anomalies

SORT_PATTERN = f"^({'|'.join(anomalies.SORTS)})$"

router = APIRouter(tags=["anomalies"], responses=ERRORS)


@router.get("/api/anomalies")
def list_anomalies(actor: UserActor, filters: QueueFilters,
                   page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                   page_size: Annotated[int, Query(ge=1, le=anomalies.MAX_PAGE_SIZE)] = 50,
                   sort: Annotated[str, Query(pattern=SORT_PATTERN)] = "amount",
                   descending: bool = True) -> Any:
    result = anomalies.list_anomalies(actor, filters, page=page, page_size=page_size, sort=sort,
                                      descending=descending)
    return json_response({"rows": result.rows, "total": result.total, "page": result.page,
                          "page_size": result.page_size, "pages": result.pages})


@router.get("/api/anomalies/{anomaly_id}")
def get_anomaly(actor: UserActor, anomaly_id: Id) -> Any:
    return json_response(anomalies.get_anomaly(actor, anomaly_id))


@router.post("/api/anomalies/{anomaly_id}/status")
def set_status(actor: UserActor, anomaly_id: Id, body: StatusChange) -> Any:
    return json_response(anomalies.set_status(actor, anomaly_id, body.status, body.reason))
