"""Fault injection shared by the CRM fakes: what to do to the next matching request."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

Middleware = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


@dataclass
class Fault:
    """What to do to the next request whose method and path match (`path_pattern`, a regex searched in the path)."""

    method: str
    path_pattern: str
    status: int | None = None  # answer this status without processing
    retry_after: int | None = None
    delay_after: float = 0.0  # process, then hold the answer this long (client times out)
    drop: bool = False  # process, then cut the connection in the middle of the answer
    redirect_to: str | None = None  # answer `status` (a 3xx) with Location: this base URL + the request's path


@dataclass
class FaultQueue:
    """Mixed into a fake: tests queue faults with `fail_next`, handlers take them with `take_fault`."""

    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, method: str, path_pattern: str, *, status: int | None = None, retry_after: int | None = None,
                  delay_after: float = 0.0, drop: bool = False, times: int = 1) -> None:
        for _ in range(times):
            self.faults.append(Fault(method, path_pattern, status, retry_after, delay_after, drop))

    def redirect_next(self, method: str, path_pattern: str, base_url: str, *, status: int = 302) -> None:
        """The next matching request is answered with a redirect to the same path at `base_url`, unprocessed."""
        self.faults.append(Fault(method, path_pattern, status, redirect_to=base_url))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.path_pattern, path):
                    self.faults.remove(fault)
                    return fault
        return None


def fault_middleware(queue: FaultQueue, error: Callable[[int, dict[str, str] | None], Response],
                     authorize: Callable[[Request], Response | None]) -> Middleware:
    """HTTP middleware playing the queued faults around a fake's handlers.

    `error(status, headers)` is the fake's own error body for a faulted status (each API words its
    429 and 5xx differently); `authorize(request)` returns the refusal of an unauthenticated
    request, or None. A delay or a drop happens after the handler ran: the work is done, the
    answer is late or lost, which is what idempotent clients must survive. A redirect is answered
    before authorization, like a front proxy would.
    """

    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        fault = queue.take_fault(request.method, request.url.path)
        if fault is not None and fault.redirect_to is not None:
            return Response(status_code=fault.status or 302, headers={"Location": fault.redirect_to + request.url.path})
        if fault is not None and fault.status is not None:
            return error(fault.status, {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None
                         else None)
        refused = authorize(request)
        if refused is not None:
            return refused
        response = await call_next(request)
        if fault is not None and fault.delay_after:
            await asyncio.sleep(fault.delay_after)
        if fault is not None and fault.drop:  # fewer bytes than Content-Length: the server closes mid-answer
            return Response(b'{"', status_code=response.status_code, media_type="application/json",
                            headers={"content-length": "512"})
        return response

    return middleware
