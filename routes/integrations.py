"""The organization's connected systems, as the services show them (secrets masked)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routes.deps import UserActor
from routes.schemas import ERRORS, json_response
from services import integrations

router = APIRouter(tags=["integrations"], responses=ERRORS)


@router.get("/api/integrations")
def list_integrations(actor: UserActor) -> Any:
    """Connected systems and their last check; secrets are masked by the service."""
    return json_response({"integrations": integrations.list_integrations(actor)})
