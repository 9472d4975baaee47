"""The REST API: usage ingestion for pipelines, and an HTTP mirror of the services for integrations.

Two kinds of credentials, both `Authorization: Bearer ...` (see services/api_keys.py):
- an org API key (`rrc_...`) may only call `POST /api/usage/ingest`;
- a user token from `POST /api/auth/token` calls the mirror with that user's role.

Every route goes through the same services as the app, so roles and org scoping are enforced
there; this layer only maps their errors to HTTP (another org's id is simply not found: 404).
Money leaves as decimal strings, never JSON floats. Each request gets a correlation id
(`X-Request-ID`, echoed back) bound to the log context, so service log lines carry it too.
Limits (body size, requests per API key and per client IP) are config.Settings' `RRC_API_*`
fields, checked with the whole configuration when the app is built: a bad one stops the process.

This module builds the app; the pieces are in routes/ (schemas, deps, middleware, errors, and one
router per group of endpoints).

Run: `python api.py` (uvicorn, JSON logs) or `uvicorn api:app`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from config import Settings, load_settings, settings_or_exit
from core.logging import configure_logging, ensure_logging
from routes import actions, anomalies, api_keys, audit, auth, dashboard, health, ingest, integrations, runs
from routes.errors import add_exception_handlers
from routes.middleware import BodySizeLimitMiddleware, IpRateLimitMiddleware, RequestContextMiddleware, TokenBucket

# In this order in the OpenAPI document.
ROUTERS = (health, ingest, auth, dashboard, runs, anomalies, api_keys, actions, audit, integrations)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app with the limits of `settings` (default: read from the environment now, `config.ConfigError`
    naming the variable when one is bad)."""
    if settings is None:
        settings = load_settings()
    app = FastAPI(title="Revenue Recovery Copilot API", version="1", docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None)
    app.state.settings = settings
    ensure_logging(settings.api_log_level)
    app.state.key_limiter = TokenBucket(settings.api_key_rate, settings.api_key_burst)
    app.state.ip_limiter = TokenBucket(settings.api_ip_rate, settings.api_ip_burst)
    add_exception_handlers(app)

    # Added innermost first: the request passes context -> size limit -> IP limit -> (CORS) -> routes.
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])
    app.add_middleware(IpRateLimitMiddleware, limiter=app.state.ip_limiter,
                       trust_forwarded_for=settings.api_trust_forwarded_for)
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.api_max_body_bytes)
    app.add_middleware(RequestContextMiddleware)

    for module in ROUTERS:
        app.include_router(module.router)
    return app


app = create_app(settings_or_exit())  # a bad variable ends the process here (exit 2)


def main() -> None:
    """`python api.py [--host H] [--port P]`: uvicorn with our JSON logs (uvicorn's own loggers included)."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="Revenue Recovery Copilot REST API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    configure_logging(app.state.settings.api_log_level)
    uvicorn.run("api:app", host=args.host, port=args.port, workers=args.workers, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
