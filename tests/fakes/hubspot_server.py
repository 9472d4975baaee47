"""A local HubSpot speaking the CRM v3 API that `hubspot-api-client` 12 calls, for contract tests and the demo.

Implemented: `POST /crm/v3/objects/tasks` (properties + associations, validated like HubSpot: unknown
properties, bad hs_timestamp, bad status/priority, association to a missing company),
`POST /crm/v3/objects/tasks/search` (filterGroups of EQ / HAS_PROPERTY filters), `GET
/crm/v3/objects/tasks/{id}`, `GET /crm/v3/objects/companies[/{id}]`, and `GET/POST
/crm/v3/properties/tasks[/{name}]` (so a custom task property can be checked and created). Every call
needs `Authorization: Bearer <token>`. Errors use HubSpot's envelope `{"status": "error", "message",
"correlationId", "category"}` (401 INVALID_AUTHENTICATION, 404 OBJECT_NOT_FOUND, 400 VALIDATION_ERROR,
429 RATE_LIMITS with errorType RATE_LIMIT and Retry-After).

Fault injection (`FakeHubSpot.fail_next`): answer 429/5xx without processing, or process and then
either hold the answer longer than the client's timeout or cut the connection mid-answer (both: a
response lost after the work was done). `redirect_next` answers with a redirect elsewhere (e.g. to
tests/fakes/redirect_target.py).
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fakes.faults import FaultQueue, fault_middleware
from tests.fakes.serving import serve_app

TASK_TO_COMPANY = 192  # HUBSPOT_DEFINED association type id, task -> company
STANDARD_TASK_PROPERTIES = {"hs_task_subject", "hs_task_body", "hs_timestamp", "hs_task_status", "hs_task_priority",
                            "hs_task_type", "hubspot_owner_id", "hs_createdate", "hs_lastmodifieddate",
                            "hs_object_id"}
TASK_STATUSES = {"NOT_STARTED", "IN_PROGRESS", "WAITING", "COMPLETED", "DEFERRED"}
TASK_PRIORITIES = {"LOW", "MEDIUM", "HIGH", "NONE"}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class FakeHubSpot(FaultQueue):
    token: str = "pat-na1-fake-0000-1111-2222"
    companies: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    custom_task_properties: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    base_url: str = ""
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(90_000_001))

    def add_company(self, company_id: str, name: str) -> None:
        self.companies[company_id] = {"id": company_id, "properties": {"name": name, "hs_object_id": company_id},
                                      "createdAt": _now(), "updatedAt": _now(), "archived": False}

    def add_task_property(self, name: str) -> None:
        self.custom_task_properties[name] = _property(name, name.replace("_", " ").title())



def _property(name: str, label: str, *, description: str = "", group: str = "taskinformation") -> dict[str, Any]:
    return {"name": name, "label": label, "type": "string", "fieldType": "text", "description": description,
            "groupName": group, "options": [], "hidden": False, "formField": False, "hasUniqueValue": False,
            "calculated": False, "externalOptions": False, "createdAt": _now(), "updatedAt": _now()}


def _error(status: int, category: str, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


def _task_view(task: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
    props = task["properties"]
    names = wanted or ["hs_task_subject", "hs_timestamp", "hs_createdate", "hs_lastmodifieddate", "hs_object_id"]
    return {"id": task["id"], "properties": {name: props.get(name) for name in names},
            "createdAt": task["createdAt"], "updatedAt": task["updatedAt"], "archived": False}


def create_app(fake: FakeHubSpot) -> FastAPI:
    app = FastAPI()

    def fault_error(status: int, headers: dict[str, str] | None) -> Response:
        if status == 429:
            return _error(429, "RATE_LIMITS", "You have reached your secondly limit.", headers,
                          errorType="RATE_LIMIT", policyName="SECONDLY")
        return _error(status, "INTERNAL_ERROR", "internal error", headers)

    def authorize(request: Request) -> Response | None:
        fake.requests.append((request.method, request.url.path))
        if request.headers.get("authorization") != f"Bearer {fake.token}":
            return _error(401, "INVALID_AUTHENTICATION", "Authentication credentials not found. This API supports "
                          "OAuth 2.0 authentication and you can find more details at "
                          "https://developers.hubspot.com/docs/methods/auth/oauth-overview")
        return None

    app.middleware("http")(fault_middleware(fake, fault_error, authorize))

    @app.get("/crm/v3/objects/companies")
    async def companies_page(limit: int = 10) -> dict[str, Any]:
        return {"results": list(fake.companies.values())[:limit]}

    @app.get("/crm/v3/objects/companies/{company_id}")
    async def company(company_id: str) -> Response:
        if company_id not in fake.companies:
            return _error(404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric.")
        return JSONResponse(fake.companies[company_id])

    @app.get("/crm/v3/properties/tasks/{name}")
    async def task_property(name: str) -> Response:
        if name in fake.custom_task_properties:
            return JSONResponse(fake.custom_task_properties[name])
        if name in STANDARD_TASK_PROPERTIES:
            return JSONResponse(_property(name, name, group="task"))
        return _error(404, "OBJECT_NOT_FOUND", f"Unable to find property {name} for object type tasks")

    @app.post("/crm/v3/properties/tasks")
    async def create_property(request: Request) -> Response:
        data = await request.json()
        name = data.get("name") or ""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not data.get("label") or not data.get("type"):
            return _error(400, "VALIDATION_ERROR", "Property name, label, type and fieldType are required; the name "
                          "must be lowercase letters, digits and underscores")
        if name in fake.custom_task_properties or name in STANDARD_TASK_PROPERTIES:
            return _error(409, "OBJECT_ALREADY_EXISTS", f"A property named '{name}' already exists.")
        prop = {**_property(name, data["label"], description=data.get("description", ""),
                            group=data.get("groupName", "taskinformation")), "type": data["type"],
                "fieldType": data.get("fieldType", "text")}
        fake.custom_task_properties[name] = prop
        return JSONResponse(prop, status_code=201)

    @app.post("/crm/v3/objects/tasks")
    async def create_task(request: Request) -> Response:
        try:
            data = await request.json()
        except ValueError:
            return _error(400, "VALIDATION_ERROR", "Invalid input JSON on line 1")
        props = data.get("properties")
        if not isinstance(props, dict):
            return _error(400, "VALIDATION_ERROR", "properties: required")
        unknown = [name for name in props if name not in STANDARD_TASK_PROPERTIES
                   and name not in fake.custom_task_properties]
        if unknown:
            return _error(400, "VALIDATION_ERROR", f"Property values were not valid: [{{\"isValid\":false,\"message\":"
                          f"\"Property \\\"{unknown[0]}\\\" does not exist\",\"error\":\"PROPERTY_DOESNT_EXIST\","
                          f"\"name\":\"{unknown[0]}\"}}]")
        timestamp = str(props.get("hs_timestamp") or "")
        if not timestamp:
            return _error(400, "VALIDATION_ERROR", "Property values were not valid: hs_timestamp is required")
        try:
            datetime.fromisoformat(timestamp.replace("Z", "+00:00")) if not timestamp.isdigit() else None
        except ValueError:
            return _error(400, "VALIDATION_ERROR", f"Property values were not valid: hs_timestamp {timestamp!r} is "
                          "not a valid date")
        if props.get("hs_task_status", "NOT_STARTED") not in TASK_STATUSES:
            return _error(400, "VALIDATION_ERROR", "Property values were not valid: hs_task_status")
        if props.get("hs_task_priority", "NONE") not in TASK_PRIORITIES:
            return _error(400, "VALIDATION_ERROR", "Property values were not valid: hs_task_priority")
        associated = []
        for assoc in data.get("associations") or []:
            target = str((assoc.get("to") or {}).get("id"))
            types = assoc.get("types") or []
            if not any(t.get("associationTypeId") == TASK_TO_COMPANY for t in types):
                return _error(400, "VALIDATION_ERROR", "association type is not valid for task to company")
            if target not in fake.companies:
                return _error(400, "VALIDATION_ERROR", f"One or more associations are invalid: company {target} "
                              "does not exist")
            associated.append(target)
        with fake.lock:
            task_id = str(next(fake._ids))
            now = _now()
            fake.tasks[task_id] = {"id": task_id, "createdAt": now, "updatedAt": now, "companies": associated,
                                   "properties": {"hs_task_status": "NOT_STARTED", **{k: str(v) for k, v in
                                                                                       props.items()},
                                                  "hs_object_id": task_id, "hs_createdate": now,
                                                  "hs_lastmodifieddate": now}}
        return JSONResponse(_task_view(fake.tasks[task_id], None), status_code=201)

    @app.post("/crm/v3/objects/tasks/search")
    async def search_tasks(request: Request) -> Response:
        data = await request.json()
        groups = data.get("filterGroups") or []
        known = STANDARD_TASK_PROPERTIES | set(fake.custom_task_properties)
        for group in groups:
            for flt in group.get("filters") or []:
                if flt.get("propertyName") not in known:
                    return _error(400, "VALIDATION_ERROR", f"There was a problem with the request: property "
                                  f"{flt.get('propertyName')} does not exist")
                if flt.get("operator") not in ("EQ", "HAS_PROPERTY"):
                    return _error(400, "VALIDATION_ERROR", f"operator {flt.get('operator')} is not supported here")

        def matches(task: dict[str, Any]) -> bool:
            if not groups:
                return True
            return any(all(task["properties"].get(f["propertyName"]) is not None if f["operator"] == "HAS_PROPERTY"
                           else task["properties"].get(f["propertyName"]) == str(f.get("value"))
                           for f in group.get("filters") or []) for group in groups)

        found = [task for task in fake.tasks.values() if matches(task)]
        limit = int(data.get("limit") or 10)
        return JSONResponse({"total": len(found),
                             "results": [_task_view(t, data.get("properties")) for t in found[:limit]]})

    @app.get("/crm/v3/objects/tasks/{task_id}")
    async def read_task(task_id: str, request: Request) -> Response:
        task = fake.tasks.get(task_id)
        if task is None:
            return _error(404, "OBJECT_NOT_FOUND", "resource not found")
        wanted = request.query_params.get("properties")
        view = _task_view(task, wanted.split(",") if wanted else None)
        if "companies" in (request.query_params.get("associations") or ""):
            view["associations"] = {"companies": {"results": [{"id": c, "type": "task_to_company"}
                                                              for c in task["companies"]]}}
        return JSONResponse(view)

    return app


@contextmanager
def running(fake: FakeHubSpot | None = None) -> Iterator[FakeHubSpot]:
    """Serve `fake` with uvicorn on a free loopback port in a thread; `fake.base_url` says where."""
    fake = fake or FakeHubSpot()
    with serve_app(create_app(fake), "fake HubSpot") as port:
        fake.base_url = f"http://127.0.0.1:{port}"
        yield fake
