"""Errors -> HTTP: services' errors by type, validation errors per event and field, never a bare 500.

Another org's id is simply not found (404): the services scope every read to the caller's org.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException

from core.logging import get_logger
from routes.deps import RateLimited
from routes.middleware import retry_after
from services import api_keys, exports, ingest
from services.actions_common import ActionFailed
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied, ServiceError

log = get_logger("rrc.api")

STATUS_BY_ERROR: tuple[tuple[type[ServiceError], int], ...] = (
    (api_keys.InvalidCredentials, 401),
    (ActionFailed, 502),
    (exports.ExportFailed, 502),
    (PermissionDenied, 403),
    (NotFound, 404),
    (ingest.InvalidBatch, 422),
    (InvalidInput, 400),
    (Conflict, 409),
)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The one error body of the API: `detail`, plus `errors` or `retryable` where they apply."""
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    status = next((code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    extra: dict[str, Any] = {}
    if isinstance(exc, ingest.InvalidBatch):
        extra["errors"] = [dataclasses.asdict(e) for e in exc.errors]
    if isinstance(exc, ActionFailed):
        extra["retryable"] = bool(getattr(exc, "retryable", False))
        headers = {"Retry-After": "60"} if extra["retryable"] else None
    return error_response(status, str(exc), headers, **extra)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's errors as (index, field, reason): the index of the bad event, the field inside it."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        index = None
        if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
            index, loc = loc[1], loc[2:]
        errors.append({"index": index, "field": ".".join(str(p) for p in loc) or "body", "reason": err.get("msg", "")})
    shown = errors[: ingest.MAX_ERRORS_REPORTED]
    where = f"event {shown[0]['index']} " if shown and shown[0]["index"] is not None else ""
    detail = f"{len(errors)} problem(s) in the request, nothing was stored"
    if shown:
        detail += f"; first: {where}{shown[0]['field']}: {shown[0]['reason']}"
    return error_response(422, detail, errors=shown)


def _rate_limited(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimited)
    return error_response(429, str(exc), retry_after(exc.wait))


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    """A value the database cannot store (validation should have caught it): the caller's fault, not a 500."""
    log.warning("request.data_error", error=type(exc).__name__)
    return error_response(400, "a value in the request cannot be stored (out of range or invalid characters)")


def add_exception_handlers(app: FastAPI) -> None:
    for error_type, handler in ((ServiceError, _service_error), (RequestValidationError, _validation_error),
                                (RateLimited, _rate_limited), (HTTPException, _http_error),
                                (DataError, _data_error)):
        app.add_exception_handler(error_type, handler)
