"""Probes for the orchestrator: liveness and readiness (neither needs credentials nor is rate limited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from core.logging import get_logger
from db.session import is_current
from routes.errors import error_response
from routes.schemas import ErrorResponse, Health

log = get_logger("rrc.api")
router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: the process answers (no database call)."""
    return Health(status="ok")


@router.get("/ready", response_model=Health,
            responses={503: {"model": ErrorResponse, "description": "database unreachable or not migrated"}})
def ready() -> Any:
    """Readiness: the database answers and is at the newest migration."""
    try:
        current = is_current()
    except Exception as exc:  # any driver error means "not ready", never a 500
        log.warning("ready.failed", error=type(exc).__name__)
        current = False
    if not current:
        return error_response(503, "database unreachable or migrations not current")
    return Health(status="ready")
