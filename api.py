"""The REST API: usage ingestion for pipelines, and an HTTP mirror of the services for integrations.

Two kinds of credentials, both `Authorization: Bearer ...` (see services/api_keys.py):
- an org API key (`rrc_...`) may only call `POST /api/usage/ingest`;
- a user token from `POST /api/auth/token` calls the mirror with that user's role.

Every route goes through the same services as the app, so roles and org scoping are enforced
there; this layer only maps their errors to HTTP (another org's id is simply not found: 404).
Money leaves as decimal strings, never JSON floats. Each request gets a correlation id
(`X-Request-ID`, echoed back) bound to the log context, so service log lines carry it too.
Limits (body size, requests per API key and per client IP) come from `RRC_API_*` variables, checked
with the whole configuration when the app is built: a bad one stops the process (config.py).

Run: `python api.py` (uvicorn, JSON logs) or `uvicorn api:app`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import clear_contextvars

from config import Settings, settings_or_exit
from core.logging import bind_correlation_id, configure_logging, ensure_logging, get_logger
from db.session import is_current
from services import (
    anomalies,
    api_keys,
    crm_tasks,
    dashboard,
    exports,
    ingest,
    integrations,
    reconciliation,
    recovery,
)
from services.actions_common import ActionFailed
from services.context import Actor
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied, ServiceError

log = get_logger("rrc.api")
MAX_ID = 2_147_483_647  # ids are 32-bit integers in the database; larger ones cannot exist

Text = Annotated[str, StringConstraints(max_length=4000, pattern=r"^[^\x00]*$")]
ShortText = Annotated[str, StringConstraints(max_length=200, pattern=r"^[^\x00]*$")]
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
SORT_PATTERN = f"^({'|'.join(anomalies.SORTS)})$"


class ApiSettings(BaseSettings):
    """Operational limits; every field is an `RRC_API_<NAME>` environment variable."""

    model_config = SettingsConfigDict(env_prefix="RRC_API_", extra="ignore")

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above)")
    key_rate: float = Field(20.0, ge=0, description="sustained requests per second per API key (0 = no limit)")
    key_burst: int = Field(40, ge=1, description="requests an API key may send at once")
    ip_rate: float = Field(50.0, ge=0, description="sustained requests per second per client IP (0 = no limit)")
    ip_burst: int = Field(100, ge=1, description="requests one client IP may send at once")
    cors_origins: str = Field("", description="comma-separated allowed origins; empty keeps CORS off")
    trust_forwarded_for: bool = Field(False, description="take the client IP from X-Forwarded-For (behind a proxy)")
    log_level: str = "INFO"


def api_settings(checked: Settings) -> ApiSettings:
    """The API's limits taken from the checked configuration (config.Settings holds the same
    `RRC_API_*` fields), so a bad value is refused once, at start, naming its variable."""
    return ApiSettings(**{name: getattr(checked, f"api_{name}") for name in ApiSettings.model_fields})


class TokenBucket:
    """In-memory token buckets per key (one process; each API instance limits on its own).

    `take` returns 0 when the request may go, else the seconds until a token is back (Retry-After).
    The table is bounded: when it grows past `max_keys`, buckets that have refilled are dropped,
    since a full bucket is the same as no bucket.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, stamp = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > self.max_keys:
                    self._prune(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, stamp) in self._buckets.items() if tokens + (now - stamp) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]


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


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


def client_ip(scope: Scope, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        for name, value in scope.get("headers", []):
            if name == b"x-forwarded-for":
                return value.decode("latin-1").split(",")[0].strip()
    client = scope.get("client")
    return client[0] if client else "unknown"


class RequestContextMiddleware:
    """Correlation id in and out, one structured line per request, and no bare 500s.

    The id comes from `X-Request-ID` when the caller sent a plain one (so a pipeline can follow
    its own id through our logs), else a new one; it is bound to the contextvars before anything
    else runs, so every log line of the request's work carries it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clear_contextvars()
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        request_id = bind_correlation_id(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        started_at, status, started = time.perf_counter(), [500], [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request.failed", method=scope["method"], path=scope["path"])
            if started[0]:
                raise  # the response is already on its way: nothing clean can be sent any more
            await _send_json(send_with_id, 500, {"detail": "internal error; quote this request id to support",
                                                 "request_id": request_id})
        finally:
            state = scope.get("state", {})
            log.info("request.finished", method=scope["method"], path=scope["path"], status=status[0],
                     duration_ms=round((time.perf_counter() - started_at) * 1000, 1), actor=state.get("actor"),
                     org_id=state.get("org_id"))
            clear_contextvars()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes; send smaller batches")


class BodySizeLimitMiddleware:
    """413 before reading when Content-Length is too big, and while reading when the stream is."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_json(send, 413, {"detail": BodyTooLarge(self.limit).detail})
            return
        seen = [0]

        async def limited() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class IpRateLimitMiddleware:
    """Per-client-IP token bucket on /api routes (before any credential is checked: slows guessing)."""

    def __init__(self, app: ASGIApp, limiter: TokenBucket, trust_forwarded_for: bool) -> None:
        self.app, self.limiter, self.trust = app, limiter, trust_forwarded_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and not scope["path"].startswith("/api/docs"):
            wait = self.limiter.take(client_ip(scope, self.trust))
            if wait:
                await _send_json(send, 429, {"detail": "too many requests from this address; retry later"},
                                 {"Retry-After": str(max(1, math.ceil(wait)))})
                return
        await self.app(scope, receive, send)


# --- request and response bodies ----------------------------------------------------------------


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


# --- credentials --------------------------------------------------------------------------------


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise api_keys.InvalidCredentials("send 'Authorization: Bearer <token or API key>'")
    return credentials.strip()


def ingest_actor(request: Request) -> Actor:
    """An org API key, within its own rate limit."""
    token = _bearer(request)
    if api_keys.key_prefix(token) is None:
        raise api_keys.InvalidCredentials("usage ingestion needs an org API key (rrc_...), not a user token")
    actor = api_keys.authenticate_key(token)
    request.state.actor, request.state.org_id = actor.label, actor.org_id
    wait = request.app.state.key_limiter.take(actor.label)
    if wait:
        raise RateLimited(wait, "too many requests for this API key; retry later")
    return actor


def user_actor(request: Request) -> Actor:
    token = _bearer(request)
    if api_keys.key_prefix(token) is not None:
        raise api_keys.InvalidCredentials("API keys may only ingest usage; get a user token from /api/auth/token")
    actor = api_keys.authenticate_user_token(token)
    request.state.actor, request.state.org_id = actor.label, actor.org_id
    return actor


UserActor = Annotated[Actor, Depends(user_actor)]


class RateLimited(Exception):
    def __init__(self, wait: float, message: str) -> None:
        super().__init__(message)
        self.wait = wait


# --- error mapping ------------------------------------------------------------------------------


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


def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    status = next((code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls)), 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    extra: dict[str, Any] = {}
    if isinstance(exc, ingest.InvalidBatch):
        extra["errors"] = [dataclasses.asdict(e) for e in exc.errors]
    if isinstance(exc, ActionFailed):
        extra["retryable"] = bool(getattr(exc, "retryable", False))
        headers = {"Retry-After": "60"} if extra["retryable"] else None
    return _error(status, str(exc), headers, **extra)


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
    return _error(422, detail, errors=shown)


def _rate_limited(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimited)
    return _error(429, str(exc), {"Retry-After": str(max(1, math.ceil(exc.wait)))})


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    """A value the database cannot store (validation should have caught it): the caller's fault, not a 500."""
    log.warning("request.data_error", error=type(exc).__name__)
    return _error(400, "a value in the request cannot be stored (out of range or invalid characters)")


# --- the app ------------------------------------------------------------------------------------


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(to_jsonable(value), status_code=status)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    app = FastAPI(title="Revenue Recovery Copilot API", version="1", docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None)
    app.state.settings = settings
    ensure_logging(settings.log_level)
    app.state.key_limiter = TokenBucket(settings.key_rate, settings.key_burst)
    app.state.ip_limiter = TokenBucket(settings.ip_rate, settings.ip_burst)

    for error_type, handler in ((ServiceError, _service_error), (RequestValidationError, _validation_error),
                                (RateLimited, _rate_limited), (HTTPException, _http_error),
                                (DataError, _data_error)):
        app.add_exception_handler(error_type, handler)

    # Added innermost first: the request passes context -> size limit -> IP limit -> (CORS) -> routes.
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    app.add_middleware(IpRateLimitMiddleware, limiter=app.state.ip_limiter,
                       trust_forwarded_for=settings.trust_forwarded_for)
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)

    _routes(app)
    return app


def _routes(app: FastAPI) -> None:
    @app.get("/health", response_model=Health, tags=["operations"])
    def health() -> Health:
        """Liveness: the process answers (no database call)."""
        return Health(status="ok")

    @app.get("/ready", response_model=Health, tags=["operations"],
             responses={503: {"model": ErrorResponse, "description": "database unreachable or not migrated"}})
    def ready() -> Any:
        """Readiness: the database answers and is at the newest migration."""
        try:
            current = is_current()
        except Exception as exc:  # any driver error means "not ready", never a 500
            log.warning("ready.failed", error=type(exc).__name__)
            current = False
        if not current:
            return _error(503, "database unreachable or migrations not current")
        return Health(status="ready")

    @app.post("/api/usage/ingest", response_model=IngestResponse, tags=["usage"],
              responses={**ERRORS, 413: {"model": ErrorResponse, "description": "body too large"},
                         422: {"model": ErrorResponse, "description": "invalid events; nothing was stored"}})
    def ingest_usage(body: IngestRequest, request: Request,
                     actor: Annotated[Actor, Depends(ingest_actor)]) -> IngestResponse:
        """Store a batch of usage events (all or nothing; replayed event ids are skipped).

        Authenticate with an org API key: `Authorization: Bearer rrc_...`.
        """
        result = ingest.ingest(actor, body.events)
        return IngestResponse(accepted=result.accepted, duplicates=result.duplicates,
                              request_id=request.state.request_id)

    @app.post("/api/auth/token", response_model=TokenResponse, tags=["auth"], responses=ERRORS)
    def token(body: TokenRequest) -> TokenResponse:
        """Exchange a user's email and password for a bearer token (same lockout as the app)."""
        issued = api_keys.issue_user_token(body.email, body.password)
        return TokenResponse(access_token=issued.access_token, token_type=issued.token_type,
                             expires_at=issued.expires_at, role=issued.role)

    @app.get("/api/dashboard/summary", tags=["dashboard"], responses=ERRORS)
    def dashboard_summary(actor: UserActor, filters: Annotated[anomalies.AnomalyFilters,
                                                               Depends(anomaly_filters)]) -> Any:
        return _json(dashboard.summary(actor, filters))

    @app.get("/api/runs", tags=["runs"], responses=ERRORS)
    def list_runs(actor: UserActor, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Any:
        return _json({"runs": dashboard.list_runs(actor, limit=limit)})

    @app.post("/api/runs", status_code=202, tags=["runs"], responses=ERRORS)
    def queue_run(actor: UserActor) -> Any:
        """Queue a reconciliation run; the scheduler process picks it up."""
        run = reconciliation.queue_run(actor, trigger="api")
        return _json({"id": run.id, "status": run.status, "trigger": run.trigger, "queued_at": run.queued_at}, 202)

    @app.get("/api/runs/{run_id}", tags=["runs"], responses=ERRORS)
    def get_run(actor: UserActor, run_id: Id) -> Any:
        run = dashboard.get_run(actor, run_id)
        if run is None:
            raise NotFound(f"run {run_id} not found")
        return _json(run)

    @app.get("/api/anomalies", tags=["anomalies"], responses=ERRORS)
    def list_anomalies(actor: UserActor, filters: Annotated[anomalies.AnomalyFilters, Depends(anomaly_filters)],
                       page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                       page_size: Annotated[int, Query(ge=1, le=anomalies.MAX_PAGE_SIZE)] = 50,
                       sort: Annotated[str, Query(pattern=SORT_PATTERN)] = "amount",
                       descending: bool = True) -> Any:
        result = anomalies.list_anomalies(actor, filters, page=page, page_size=page_size, sort=sort,
                                          descending=descending)
        return _json({"rows": result.rows, "total": result.total, "page": result.page,
                      "page_size": result.page_size, "pages": result.pages})

    @app.get("/api/anomalies/{anomaly_id}", tags=["anomalies"], responses=ERRORS)
    def get_anomaly(actor: UserActor, anomaly_id: Id) -> Any:
        return _json(anomalies.get_anomaly(actor, anomaly_id))

    @app.post("/api/anomalies/{anomaly_id}/status", tags=["anomalies"], responses=ERRORS)
    def set_status(actor: UserActor, anomaly_id: Id, body: StatusChange) -> Any:
        return _json(anomalies.set_status(actor, anomaly_id, body.status, body.reason))

    @app.post("/api/api-keys", status_code=201, tags=["api keys"], responses=ERRORS)
    def create_api_key(actor: UserActor, body: ApiKeyCreate) -> Any:
        """Create an ingest key (admin). `api_key` is shown in this response only; store it now."""
        created = api_keys.create_api_key(actor, body.name)
        return _json({"id": created.id, "name": created.name, "prefix": created.prefix,
                      "api_key": created.plaintext, "created_at": created.created_at}, 201)

    @app.get("/api/api-keys", tags=["api keys"], responses=ERRORS)
    def list_api_keys(actor: UserActor) -> Any:
        return _json({"api_keys": [{**to_jsonable(k), "active": k.active} for k in api_keys.list_api_keys(actor)]})

    @app.post("/api/api-keys/{key_id}/revoke", tags=["api keys"], responses=ERRORS)
    def revoke_api_key(actor: UserActor, key_id: Id) -> Any:
        key = api_keys.revoke_api_key(actor, key_id)
        return _json({**to_jsonable(key), "active": key.active})

    @app.get("/api/anomalies/{anomaly_id}/invoice-preview", tags=["actions"], responses=ERRORS)
    def invoice_preview(actor: UserActor, anomaly_id: Id) -> Any:
        """The draft invoice that draft-invoice would create (customer, lines, total), without calling Stripe."""
        return _json(recovery.preview_invoice(actor, anomaly_id))

    @app.post("/api/anomalies/{anomaly_id}/draft-invoice", tags=["actions"],
              responses={**ERRORS, 409: {"model": ErrorResponse, "description": "already invoiced or closed"},
                         502: {"model": ErrorResponse, "description": "Stripe refused or is unreachable"}})
    def draft_invoice(actor: UserActor, anomaly_id: Id) -> Any:
        """Create a Stripe draft invoice for the leak (never finalized); repeating it returns the same invoice."""
        return _json(recovery.draft_invoice(actor, anomaly_id))

    @app.post("/api/anomalies/{anomaly_id}/crm-task", tags=["actions"],
              responses={**ERRORS, 502: {"model": ErrorResponse, "description": "the CRM refused or is unreachable"}})
    def create_crm_task(actor: UserActor, anomaly_id: Id, body: CrmTaskRequest) -> Any:
        """Create the follow-up task in Salesforce or HubSpot; repeating the request returns the same task."""
        return _json(crm_tasks.create_crm_task(actor, anomaly_id, body.system, body.due_in_days))

    @app.get("/api/audit/export", tags=["audit"],
             responses={**ERRORS, 200: {"description": "JSON with a presigned URL, or the zip itself",
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
        return _json({name: getattr(result, name) for name in
                      ("filename", "fmt", "start", "end", "counts", "sha256", "size", "url", "expires_at", "location")})

    @app.get("/api/integrations", tags=["integrations"], responses=ERRORS)
    def list_integrations(actor: UserActor) -> Any:
        """Connected systems and their last check; secrets are masked by the service."""
        return _json({"integrations": integrations.list_integrations(actor)})


Csv = Annotated[str | None, Query(max_length=500, pattern=r"^[a-z_,]*$")]


def anomaly_filters(
    period_from: date | None = None, period_to: date | None = None,
    currency: Annotated[str | None, Query(min_length=3, max_length=3, pattern=r"^[A-Za-z]{3}$")] = None,
    types: Csv = None, statuses: Csv = None, severities: Csv = None,
    min_confidence: Annotated[Decimal | None, Query(ge=0, le=1)] = None,
    account: Annotated[ShortText | None, Query()] = None,
    product_key: Annotated[ShortText | None, Query()] = None,
    account_id: Annotated[ShortText | None, Query()] = None,
) -> anomalies.AnomalyFilters:
    """The queue's filters as query parameters; lists are comma-separated (`types=missed_overage,renewal_drift`)."""

    def split(value: str | None) -> tuple[str, ...]:
        return tuple(v for v in (value or "").split(",") if v)

    filters = anomalies.AnomalyFilters(period_from=period_from, period_to=period_to, currency=currency,
                                       types=split(types), statuses=split(statuses), severities=split(severities),
                                       min_confidence=min_confidence, account=account, product_key=product_key,
                                       account_id=account_id)
    filters.validate()
    return filters


app = create_app(api_settings(settings_or_exit()))  # a bad variable ends the process here (exit 2)


def main() -> None:
    """`python api.py [--host H] [--port P]`: uvicorn with our JSON logs (uvicorn's own loggers included)."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="Revenue Recovery Copilot REST API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    configure_logging(app.state.settings.log_level)
    uvicorn.run("api:app", host=args.host, port=args.port, workers=args.workers, log_config=None, access_log=False)


if __name__ == "__main__":
    main()

