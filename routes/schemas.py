"""What goes over the wire: request and response models, and service results as JSON.

Money leaves as decimal strings, never JSON floats.
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services import ingest

MAX_ID = 2_147_483_647  # ids are 32-bit integers in the database; larger ones cannot exist

Text = Annotated[str, StringConstraints(max_length=4000, pattern=r"^[^\x00]*$")]
ShortText = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[ingest.UsageEventIn] = Field(min_length=1, max_length=ingest.MAX_BATCH)


class IngestResponse(BaseModel):
    accepted: int = Field(description="events stored by this request")
    duplicates: int = Field(description="events whose event_id was already stored (or repeated in the batch)")
    request_id: str


class EventErrorOut(BaseModel):
    index: int | None
    field: str
    reason: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[EventErrorOut] | None = None


class TokenRequest(BaseModel):
    email: Annotated[str, StringConstraints(min_length=1, max_length=254, pattern=r"^[^\x00]*$")]
    password: Annotated[str, StringConstraints(min_length=1, max_length=1000)]


class TokenResponse(BaseModel):
    access_token: str
    token_type: str
    expires_at: datetime
    role: str


class StatusChange(BaseModel):
    status: Literal["dismissed", "recovered", "open"]
    reason: Text | None = None


class CrmTaskRequest(BaseModel):
    system: Literal["salesforce", "hubspot"]
    due_in_days: int = Field(7, ge=0, le=365)


class ApiKeyCreate(BaseModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00]*$")]


class Health(BaseModel):
    status: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing, invalid or expired credentials"},
    403: {"model": ErrorResponse, "description": "your role may not do this"},
    404: {"model": ErrorResponse, "description": "not found in your organization"},
    429: {"model": ErrorResponse, "description": "rate limited; see Retry-After"},
}


def decimal_text(value: Decimal) -> str:
    """Exact decimal string; the database's padding zeros beyond two places are dropped (40.000000 -> 40.00)."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2:
        places = max(2, -int(value.normalize().as_tuple().exponent))
        value = value.quantize(Decimal(1).scaleb(-places))
    return format(value, "f")


def to_jsonable(value: Any) -> Any:
    """Service results -> JSON: dataclasses as objects, Decimal as exact strings, datetimes ISO 8601."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    return value


def json_response(value: Any, status: int = 200) -> JSONResponse:
    """A service result as the response body (see `to_jsonable`)."""
    return JSONResponse(to_jsonable(value), status_code=status)
