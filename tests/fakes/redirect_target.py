"""Where the fakes' injected redirects point: a server standing for an address no connector may reach.

Why: services/source_policy.py judges the endpoint an organization configures, not where that endpoint
redirects to (the cloud metadata service, the private network), so the connectors must not follow
redirects. This server records every request it receives and answers each one with SECRET inside the
error envelopes of Stripe (`error.message`), HubSpot and Salesforce (`message`) and S3 (XML
`<Message>`): a client that followed a redirect here would reach it, and would show SECRET in its error.
The fakes redirect here one request at a time (`redirect_next`); `redirecting_to` is an endpoint that
redirects every request (for S3, whose fake, moto, takes no injected faults).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fakes.serving import serve_app

SECRET = "metadata-secret-AKIAREDIRECTED"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


@dataclass
class RedirectTarget:
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every request received


def _secret_answer(request: Request) -> Response:
    if request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):  # an S3 client
        xml = f"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>{SECRET}</Message></Error>"
        return Response(xml, status_code=403, media_type="application/xml")
    return JSONResponse({"error": {"message": SECRET, "type": "invalid_request_error"}, "message": SECRET,
                         "category": "VALIDATION_ERROR", "status": "error"}, status_code=400)


@contextmanager
def redirect_target() -> Iterator[RedirectTarget]:
    """Serve the target on a free loopback port; `target.url` says where, `target.requests` what reached it."""
    target = RedirectTarget()
    app = FastAPI()

    @app.api_route("/{path:path}", methods=METHODS)
    async def anything(request: Request, path: str) -> Response:
        target.requests.append((request.method, "/" + path))
        return _secret_answer(request)

    with serve_app(app, "redirect target") as port:
        target.url = f"http://127.0.0.1:{port}"
        yield target


@contextmanager
def redirecting_to(target: RedirectTarget, status: int = 302) -> Iterator[str]:
    """Serve an endpoint answering every request with `status` and Location: the same path at `target`; yield
    its URL."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=METHODS)
    async def redirect(request: Request, path: str) -> Response:
        return Response(status_code=status, headers={"Location": f"{target.url}/{path}?{request.url.query}"})

    with serve_app(app, "redirecting endpoint") as port:
        yield f"http://127.0.0.1:{port}"
