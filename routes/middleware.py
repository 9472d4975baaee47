"""ASGI middleware of the API: correlation id and request log, body-size limit, per-IP rate limit.

Each request gets a correlation id (`X-Request-ID`, echoed back) bound to the log context, so
service log lines carry it too. The rate limits are in-memory token buckets (`TokenBucket`).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import clear_contextvars

from core.logging import bind_correlation_id, get_logger

log = get_logger("rrc.api")


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


def retry_after(wait: float) -> dict[str, str]:
    """The Retry-After header for a `TokenBucket.take` wait: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(wait)))}


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
                                 retry_after(wait))
                return
        await self.app(scope, receive, send)
