"""The audit export: anomalies, actions and audit log of a period in one zip."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from routes.deps import UserActor
from routes.schemas import ERRORS, ErrorResponse, json_response
from services import exports

router = APIRouter(tags=["audit"], responses=ERRORS)


@router.get("/api/audit/export",
            responses={200: {"description": "JSON with a presigned URL, or the zip itself",
                             "content": {"application/json": {}, "application/zip": {}}},
                       502: {"model": ErrorResponse, "description": "the export bucket refused the upload"}})
def audit_export(actor: UserActor, start: datetime, end: datetime,
                 fmt: Annotated[Literal["csv", "parquet"], Query()] = "csv") -> Any:
    """Anomalies, actions and audit log of [start, end) in one zip: a presigned URL when S3 is set up,
    else the file itself."""
    result = exports.export_audit(actor, start, end, fmt)
    if result.content is not None:
        return Response(result.content, media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{result.filename}"', "X-Content-SHA256": result.sha256})
    return json_response({name: getattr(result, name) for name in
                          ("filename", "fmt", "start", "end", "counts", "sha256", "size", "url", "expires_at",
                           "location")})
