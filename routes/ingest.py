"""Usage ingestion for pipelines, authenticated by an org API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from routes.deps import ingest_actor
from routes.schemas import ERRORS, ErrorResponse, IngestRequest, IngestResponse
from services import ingest
from services.context import Actor

router = APIRouter(tags=["usage"], responses=ERRORS)


@router.post("/api/usage/ingest", response_model=IngestResponse,
             responses={413: {"model": ErrorResponse, "description": "body too large"},
                        422: {"model": ErrorResponse, "description": "invalid events; nothing was stored"}})
def ingest_usage(body: IngestRequest, request: Request,
                 actor: Annotated[Actor, Depends(ingest_actor)]) -> IngestResponse:
    """Store a batch of usage events (all or nothing; replayed event ids are skipped).

    Authenticate with an org API key: `Authorization: Bearer rrc_...`.
    """
    result = ingest.ingest(actor, body.events)
    return IngestResponse(accepted=result.accepted, duplicates=result.duplicates,
                          request_id=request.state.request_id)
