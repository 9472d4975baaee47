"""Dependencies of the routes: who is calling (bearer credentials), the per-key rate limit, query filters.

Two kinds of credentials, both `Authorization: Bearer ...` (see services/api_keys.py):
- an org API key (`rrc_...`) may only call `POST /api/usage/ingest`;
- a user token from `POST /api/auth/token` calls the mirror with that user's role.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Query, Request

from routes.schemas import ShortText
from services import anomalies, api_keys
from services.context import Actor


class RateLimited(Exception):
    def __init__(self, wait: float, message: str) -> None:
        super().__init__(message)
        self.wait = wait


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


QueueFilters = Annotated[anomalies.AnomalyFilters, Depends(anomaly_filters)]
