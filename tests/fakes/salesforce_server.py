"""A local Salesforce that speaks the HTTP API `simple-salesforce` uses, for contract tests and the demo.

Implemented: the SOAP partner `login` (sessionId + serverUrl pointing back here, SOAP faults for bad
credentials), the OAuth 2.0 client credentials token endpoint, REST `limits`, `sobjects/<type>/describe`,
`sobjects/<type>` create, `sobjects/<type>/<id>` read, and `query` for the small SOQL subset the
connector sends (`SELECT f, ... FROM T [WHERE a = 'x' [AND b LIKE '%y']] [LIMIT n]`). Errors use
Salesforce's envelope: a JSON list of `{"message", "errorCode"}` (401 INVALID_SESSION_ID, 400
INVALID_FIELD / MALFORMED_QUERY / INVALID_CROSS_REFERENCE_KEY, 404 NOT_FOUND).

Fault injection (`FakeSalesforce.fail_next`): the next matching requests answer 429/5xx (with
Retry-After), or are processed and then either answered only after a delay longer than the client's
timeout or cut off mid-answer — what a connection lost after the server did the work looks like.
`redirect_next` answers with a redirect elsewhere (e.g. to tests/fakes/redirect_target.py).
"""

from __future__ import annotations

import base64
import itertools
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fakes.faults import FaultQueue, fault_middleware
from tests.fakes.serving import serve_app

ORG_ID = "00DFAKE0000000001"
TASK_FIELDS = {"Id", "Subject", "Description", "ActivityDate", "Status", "Priority", "WhatId", "WhoId", "OwnerId",
               "Type", "CreatedDate", "IsClosed"}
ACCOUNT_FIELDS = {"Id", "Name", "Type", "Industry", "OwnerId", "CreatedDate"}
FIELDS = {"Task": TASK_FIELDS, "Account": ACCOUNT_FIELDS}
READ_ONLY = {"Id", "CreatedDate", "IsClosed"}
TASK_STATUSES = {"Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"}
TASK_PRIORITIES = {"High", "Normal", "Low"}


@dataclass
class FakeSalesforce(FaultQueue):
    username: str = "ops@example.com"
    password: str = "s3cret-pass"
    security_token: str = "TOKEN123"
    consumer_key: str = "3MVG9fake.consumer.key"
    client_secret: str = "fake-client-secret-0042"
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every API call
    task_createable: bool = True
    base_url: str = ""
    instance_url: str | None = None  # where login sends the REST calls (None: back here, as Salesforce does)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def add_account(self, account_id: str, name: str) -> None:
        self.accounts[account_id] = {"Id": account_id, "Name": name, "Type": "Customer"}


    def new_id(self, prefix: str) -> str:
        return f"{prefix}FAKE{next(self._ids):011d}"[:18]


def _errors(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse([{"message": message, "errorCode": code}], status_code=status, headers=headers)


def _soap_fault(code: str, message: str) -> Response:
    body = f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><soapenv:Fault><faultcode>sf:{code}</faultcode><faultstring>{code}: {escape(message)}</faultstring>
<detail><sf:LoginFault xsi:type="sf:LoginFault"><sf:exceptionCode>{code}</sf:exceptionCode>
<sf:exceptionMessage>{escape(message)}</sf:exceptionMessage></sf:LoginFault></detail>
</soapenv:Fault></soapenv:Body></soapenv:Envelope>"""
    return Response(body, status_code=500, media_type="text/xml")


def _xml_value(body: str, tag: str) -> str | None:
    match = re.search(rf"<(?:\w+:)?{tag}>(.*?)</(?:\w+:)?{tag}>", body, re.S)
    if match is None:
        return None
    return (match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&#x27;", "'").replace("&amp;", "&"))


SOQL = re.compile(r"^\s*SELECT\s+(?P<fields>[\w\s,]+?)\s+FROM\s+(?P<sobject>\w+)"
                  r"(?:\s+WHERE\s+(?P<where>.+?))?(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$", re.I | re.S)
CONDITION = re.compile(r"^\s*(?P<field>\w+)\s*(?P<op>=|LIKE)\s*'(?P<value>(?:[^'\\]|\\.)*)'\s*$", re.I)


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _like(pattern: str, value: str) -> bool:
    """SOQL LIKE: `%` and `_` are wildcards unless escaped with a backslash; case-insensitive."""
    parts = re.findall(r"\\.|.", pattern, re.S)
    regex = "".join(re.escape(p[1]) if len(p) == 2 else ".*" if p == "%" else "." if p == "_" else re.escape(p)
                    for p in parts)
    return re.fullmatch(regex, value or "", re.S | re.I) is not None


def run_soql(fake: FakeSalesforce, soql: str) -> list[dict[str, Any]]:
    match = SOQL.match(soql)
    if match is None:
        raise SoqlError("MALFORMED_QUERY", f"unexpected token in query: {soql[:80]}")
    sobject = match["sobject"]
    if sobject not in FIELDS:
        raise SoqlError("INVALID_TYPE", f"sObject type '{sobject}' is not supported.")
    wanted = [name.strip() for name in match["fields"].split(",")]
    conditions = []
    if match["where"]:
        for part in re.split(r"\s+AND\s+", match["where"], flags=re.I):
            cond = CONDITION.match(part)
            if cond is None:
                raise SoqlError("MALFORMED_QUERY", f"unexpected condition: {part[:80]}")
            value = cond["value"] if cond["op"].upper() == "LIKE" else re.sub(r"\\(.)", r"\1", cond["value"])
            conditions.append((cond["field"], cond["op"].upper(), value))
    for name in wanted + [c[0] for c in conditions]:
        if name not in FIELDS[sobject]:
            raise SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{sobject}'.")
    table = fake.tasks if sobject == "Task" else fake.accounts
    rows = []
    for record in table.values():
        if all(_like(v, str(record.get(f) or "")) if op == "LIKE" else str(record.get(f) or "") == v
               for f, op, v in conditions):
            rows.append({"attributes": {"type": sobject, "url": f"/services/data/v59.0/sobjects/{sobject}/"
                                        f"{record['Id']}"}, **{name: record.get(name) for name in wanted}})
    return rows[: int(match["limit"])] if match["limit"] else rows


def create_app(fake: FakeSalesforce) -> FastAPI:
    app = FastAPI()

    def fault_error(status: int, headers: dict[str, str] | None) -> Response:
        if status == 429:
            return _errors(429, "REQUEST_LIMIT_EXCEEDED", "Too many requests", headers)
        return _errors(status, "SERVER_UNAVAILABLE", "The server is temporarily unavailable", headers)

    def authorize(request: Request) -> Response | None:
        if not request.url.path.startswith("/services/data/"):
            return None  # login and token endpoints authenticate with what they are sent
        fake.requests.append((request.method, request.url.path))
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in fake.sessions:
            return _errors(401, "INVALID_SESSION_ID", "Session expired or invalid")
        return None

    app.middleware("http")(fault_middleware(fake, fault_error, authorize))

    @app.post("/services/Soap/u/{version}")
    async def login(version: str, request: Request) -> Response:
        body = (await request.body()).decode()
        username, password = _xml_value(body, "username"), _xml_value(body, "password")
        if username != fake.username or password != fake.password + fake.security_token:
            return _soap_fault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
        session_id = f"{ORG_ID}!{secrets.token_hex(16)}"
        fake.sessions.add(session_id)
        server_url = f"{fake.instance_url or fake.base_url}/services/Soap/u/{version}/{ORG_ID}"
        return Response(f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com">
<soapenv:Body><loginResponse><result><metadataServerUrl>{fake.base_url}/services/Soap/m/{version}/{ORG_ID}
</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false</sandbox>
<serverUrl>{server_url}</serverUrl><sessionId>{session_id}</sessionId><userId>005FAKE0000000001</userId>
<userInfo><organizationId>{ORG_ID}</organizationId><userName>{escape(username)}</userName></userInfo>
</result></loginResponse></soapenv:Body></soapenv:Envelope>""", media_type="text/xml")

    @app.post("/services/oauth2/token")
    async def oauth_token(request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        expected = base64.b64encode(f"{fake.consumer_key}:{fake.client_secret}".encode()).decode()
        if form.get("grant_type") != ["client_credentials"]:
            return JSONResponse({"error": "unsupported_grant_type", "error_description": "grant type not supported"},
                                status_code=400)
        if request.headers.get("authorization") != f"Basic {expected}":
            return JSONResponse({"error": "invalid_client", "error_description": "invalid client credentials"},
                                status_code=400)
        session_id = f"{ORG_ID}!{secrets.token_hex(16)}"
        fake.sessions.add(session_id)
        return JSONResponse({"access_token": session_id, "instance_url": fake.instance_url or fake.base_url,
                             "token_type": "Bearer",
                             "id": f"{fake.base_url}/id/{ORG_ID}/005FAKE0000000001", "scope": "api",
                             "issued_at": str(int(time.time() * 1000)), "signature": "fake"})

    @app.get("/services/data/v{version}/limits")
    @app.get("/services/data/v{version}/limits/")
    async def limits(version: str) -> dict[str, Any]:
        used = len(fake.requests)
        return {"DailyApiRequests": {"Max": 15000, "Remaining": 15000 - used},
                "DataStorageMB": {"Max": 5, "Remaining": 5}}

    @app.get("/services/data/v{version}/sobjects/{sobject}/describe")
    async def describe(version: str, sobject: str) -> Response:
        if sobject not in FIELDS:
            return _errors(404, "NOT_FOUND", f"The requested resource does not exist: {sobject}")
        createable = fake.task_createable if sobject == "Task" else True
        return JSONResponse({"name": sobject, "createable": createable, "queryable": True,
                             "fields": [{"name": name, "createable": name not in READ_ONLY, "type": "string"}
                                        for name in sorted(FIELDS[sobject])]})

    @app.get("/services/data/v{version}/query")
    @app.get("/services/data/v{version}/query/")
    async def query(version: str, q: str = "") -> Response:
        try:
            records = run_soql(fake, q)
        except SoqlError as exc:
            return _errors(400, exc.code, str(exc))
        return JSONResponse({"totalSize": len(records), "done": True, "records": records})

    @app.post("/services/data/v{version}/sobjects/{sobject}")
    @app.post("/services/data/v{version}/sobjects/{sobject}/")
    async def create(version: str, sobject: str, request: Request) -> Response:
        if sobject != "Task":
            return _errors(404, "NOT_FOUND", f"The requested resource does not exist: {sobject}")
        if not fake.task_createable:
            return _errors(403, "INSUFFICIENT_ACCESS_OR_READONLY", "insufficient access rights on object Task")
        try:
            data = await request.json()
        except ValueError:
            return _errors(400, "JSON_PARSER_ERROR", "The request body is not valid JSON")
        if not isinstance(data, dict):
            return _errors(400, "JSON_PARSER_ERROR", "Expected a JSON object")
        for name in data:
            if name not in TASK_FIELDS or name in READ_ONLY:
                return _errors(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type Task")
        what_id = data.get("WhatId")
        if what_id is not None and what_id not in fake.accounts:
            return _errors(400, "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
        if data.get("ActivityDate") and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(data["ActivityDate"])):
            return _errors(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of date from VALUE_STRING value "
                                                     f"{data['ActivityDate']}")
        if data.get("Status", "Not Started") not in TASK_STATUSES:
            return _errors(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "Status: bad value for restricted picklist")
        if data.get("Priority", "Normal") not in TASK_PRIORITIES:
            return _errors(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                           "Priority: bad value for restricted picklist")
        if not data.get("Subject"):
            return _errors(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [Subject]")
        with fake.lock:
            task_id = fake.new_id("00T")
            fake.tasks[task_id] = {"Status": "Not Started", "Priority": "Normal", **data, "Id": task_id,
                                   "CreatedDate": time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime()),
                                   "IsClosed": False}
        return JSONResponse({"id": task_id, "success": True, "errors": []}, status_code=201)

    @app.get("/services/data/v{version}/sobjects/{sobject}/{record_id}")
    async def read(version: str, sobject: str, record_id: str) -> Response:
        table = fake.tasks if sobject == "Task" else fake.accounts if sobject == "Account" else None
        if table is None or record_id not in table:
            return _errors(404, "NOT_FOUND", "The requested resource does not exist")
        return JSONResponse({"attributes": {"type": sobject}, **table[record_id]})

    return app


@contextmanager
def running(fake: FakeSalesforce | None = None) -> Iterator[FakeSalesforce]:
    """Serve `fake` with uvicorn on a free loopback port in a thread; `fake.base_url` says where."""
    fake = fake or FakeSalesforce()
    with serve_app(create_app(fake), "fake Salesforce") as port:
        fake.base_url = f"http://127.0.0.1:{port}"
        yield fake
