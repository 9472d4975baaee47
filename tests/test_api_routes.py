"""The REST mirror through the real app and database: auth, roles, tenancy, probes, CORS and logs."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import create_app
from config import Settings
from core.logging import configure_logging, correlation, get_logger
from routes.schemas import decimal_text, to_jsonable
from services import api_keys, integrations, reconciliation, users
from services.context import Actor
from tests.bundles import Scenario


@dataclass
class Tenant:
    admin: Actor
    analyst: Actor
    admin_token: str
    analyst_token: str
    anomaly_ids: list[int]
    run_id: int
    key_id: int
    key: str


def leaky(acme_units: str) -> Scenario:
    s = Scenario(accounts=[["acme", "Acme", "cus_acme", "1001"], ["beta", "Beta", "cus_beta", "1002"]])
    s.sub("acme", "api", "p_api").sub("beta", "api", "p_api")
    s.use("acme", "api", "2026-01-05T10:00:00Z", acme_units, reported="600")
    s.use("beta", "api", "2026-01-05T10:00:00Z", "1000", reported="600")
    return s.invoice("acme", "api", "600", "60.00").invoice("beta", "api", "600", "60.00")


def make_tenant(slug: str, acme_units: str, tmp_path: Path) -> Tenant:
    org, user = users.create_organization(slug.title(), slug, f"admin@{slug}.example", "Admin", "password-1")
    admin = Actor.user(org.id, user.id, "admin")
    analyst_user = users.create_user(admin, f"analyst@{slug}.example", "Analyst", "analyst", "password-2")
    analyst = Actor.user(org.id, analyst_user.id, "analyst")
    run = reconciliation.run_reconciliation(admin, bundle_dir=leaky(acme_units).write(tmp_path / slug))
    assert run.status == "succeeded", run.error
    from services import anomalies

    ids = [row.id for row in anomalies.list_anomalies(admin).rows]
    key = api_keys.create_api_key(admin, "pipeline")
    return Tenant(admin, analyst, api_keys.issue_user_token(f"admin@{slug}.example", "password-1").access_token,
                  api_keys.issue_user_token(f"analyst@{slug}.example", "password-2").access_token, ids, run.id,
                  key.id, key.plaintext)


@pytest.fixture
def tenants(app_db: str, tmp_path: Path) -> tuple[Tenant, Tenant]:
    a = make_tenant("acme", "1000", tmp_path)
    b = make_tenant("beta", "5000", tmp_path)
    integrations.connect(a.admin, "hubspot", {"access_token": "pat-na1-0123456789abcdef0123"})
    return a, b


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(api_key_rate=0, api_ip_rate=0)), raise_server_exceptions=False) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_token_sign_in(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    ok = client.post("/api/auth/token", json={"email": "analyst@acme.example", "password": "password-2"})
    assert ok.status_code == 200 and ok.json()["role"] == "analyst" and ok.json()["token_type"] == "bearer"
    assert client.get("/api/anomalies", headers=auth(ok.json()["access_token"])).status_code == 200
    wrong = client.post("/api/auth/token", json={"email": "analyst@acme.example", "password": "password-x"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong email or password"
    assert client.post("/api/auth/token", json={"email": "x"}).status_code == 422
    for email in ("analyst@acme.example", "nobody@acme.example"):  # longer than bcrypt reads: a wrong password
        long = client.post("/api/auth/token", json={"email": email, "password": "p" * 80})
        assert long.status_code == 401 and long.json()["detail"] == "wrong email or password"
    for headers in ({}, auth("garbage"), auth(a.admin_token + "x"), {"Authorization": a.admin_token}):
        response = client.get("/api/runs", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_mirror_routes_for_an_analyst(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    headers = auth(a.analyst_token)
    listed = client.get("/api/anomalies", params={"types": "under_reported_usage", "currency": "USD"},
                        headers=headers).json()
    assert listed["total"] == 2 and {r["id"] for r in listed["rows"]} == set(a.anomaly_ids)
    assert {r["amount"] for r in listed["rows"]} == {"40.00"}  # money as exact strings, never floats
    assert client.get("/api/anomalies", params={"types": "bogus"}, headers=headers).status_code == 400
    assert client.get("/api/anomalies", params={"sort": "nope"}, headers=headers).status_code == 422
    paged = client.get("/api/anomalies", params={"page_size": 1, "sort": "account", "descending": False},
                       headers=headers).json()
    assert paged["pages"] == 2 and paged["rows"][0]["account_id"] == "acme"

    anomaly_id = a.anomaly_ids[0]
    detail = client.get(f"/api/anomalies/{anomaly_id}", headers=headers).json()
    assert detail["row"]["id"] == anomaly_id and detail["fingerprint"] and detail["evidence"]
    no_reason = client.post(f"/api/anomalies/{anomaly_id}/status", json={"status": "dismissed"}, headers=headers)
    assert no_reason.status_code == 400 and "reason" in no_reason.json()["detail"]
    assert client.post(f"/api/anomalies/{anomaly_id}/status", json={"status": "actioned"},
                       headers=headers).status_code == 422
    dismissed = client.post(f"/api/anomalies/{anomaly_id}/status",
                            json={"status": "dismissed", "reason": "credited by hand"}, headers=headers)
    assert dismissed.status_code == 200 and dismissed.json()["row"]["status"] == "dismissed"

    summary = client.get("/api/dashboard/summary", headers=headers).json()
    assert summary["open_leak"] == {"usd": "40.00"}  # the other one was dismissed

    queued = client.post("/api/runs", headers=headers)
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    again = client.post("/api/runs", headers=headers)  # a loop posting runs cannot fill the shared queue
    assert again.status_code == 202 and again.json()["id"] == queued.json()["id"]
    runs = client.get("/api/runs", headers=headers).json()["runs"]
    assert [r["id"] for r in runs] == [queued.json()["id"], a.run_id]
    assert client.get(f"/api/runs/{a.run_id}", headers=headers).json()["status"] == "succeeded"

    shown = client.get("/api/integrations", headers=headers)
    assert shown.status_code == 200 and "0123456789abcdef0123" not in shown.text
    assert shown.json()["integrations"][0]["config"]["access_token"] == "pat-…0123"

    for method, path in (("post", "/api/api-keys"), ("get", "/api/api-keys"),
                         ("post", f"/api/api-keys/{a.key_id}/revoke")):
        response = client.request(method, path, json={"name": "x"}, headers=headers)
        assert response.status_code == 403 and "admin" in response.json()["detail"]


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_api_keys_over_the_api(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    created = client.post("/api/api-keys", json={"name": "warehouse"}, headers=auth(a.admin_token))
    assert created.status_code == 201 and created.json()["api_key"].startswith("rrc_")
    listed = client.get("/api/api-keys", headers=auth(a.admin_token))
    assert created.json()["api_key"] not in listed.text and a.key not in listed.text
    assert [k["name"] for k in listed.json()["api_keys"]] == ["pipeline", "warehouse"]
    event = {"event_id": "e1", "account_id": "acme", "product_key": "api", "ts": "2026-01-06T00:00:00Z", "units": "1"}
    key = created.json()["api_key"]
    assert client.post("/api/usage/ingest", json={"events": [event]}, headers=auth(key)).status_code == 200
    revoked = client.post(f"/api/api-keys/{created.json()['id']}/revoke", headers=auth(a.admin_token))
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    assert client.post("/api/usage/ingest", json={"events": [event]}, headers=auth(key)).status_code == 401


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_another_orgs_ids_are_not_found_and_nothing_leaks(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    as_b = auth(b.admin_token)
    for method, path, body in (
        ("get", f"/api/anomalies/{a.anomaly_ids[0]}", None),
        ("post", f"/api/anomalies/{a.anomaly_ids[0]}/status", {"status": "dismissed", "reason": "not mine"}),
        ("get", f"/api/runs/{a.run_id}", None),
        ("post", f"/api/api-keys/{a.key_id}/revoke", None),
    ):
        response = client.request(method, path, json=body, headers=as_b)
        assert response.status_code == 404, (path, response.text)
        assert "acme" not in response.text.lower()
    listed = client.get("/api/anomalies", headers=as_b).json()
    assert {r["id"] for r in listed["rows"]} == set(b.anomaly_ids)
    assert not set(b.anomaly_ids) & set(a.anomaly_ids)
    assert [r["id"] for r in client.get("/api/runs", headers=as_b).json()["runs"]] == [b.run_id]
    assert client.get("/api/integrations", headers=as_b).json() == {"integrations": []}
    assert a.key not in client.get("/api/api-keys", headers=as_b).text
    assert [k["id"] for k in client.get("/api/api-keys", headers=as_b).json()["api_keys"]] == [b.key_id]
    summary = client.get("/api/dashboard/summary", headers=as_b).json()
    assert summary["open_leak"] == {"usd": "480.00"}  # beta org's own: 440 + 40
    # A's rows are untouched by B's attempts
    as_a = auth(a.analyst_token)
    assert {r["status"] for r in client.get("/api/anomalies", headers=as_a).json()["rows"]} == {"open"}
    event = {"event_id": "e1", "account_id": "acme", "product_key": "api", "ts": "2026-01-06T00:00:00Z", "units": "1"}
    assert client.post("/api/usage/ingest", json={"events": [event]}, headers=auth(a.key)).status_code == 200


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_health_ready_and_docs(client: TestClient, tenants: tuple[Tenant, Tenant], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    schema = client.get("/api/openapi.json").json()
    assert {"/api/usage/ingest", "/api/auth/token", "/api/anomalies/{anomaly_id}", "/ready"} <= set(schema["paths"])
    assert client.get("/api/docs").status_code == 200
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'never-migrated.db'}")
    not_ready = client.get("/ready")
    assert not_ready.status_code == 503 and "migrations" in not_ready.json()["detail"]
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert client.get("/ready").status_code == 503


def test_cors_is_off_unless_configured(app_db: str) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app()) as client:
        response = client.options("/api/anomalies", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with TestClient(create_app(Settings(api_cors_origins="https://app.example"))) as client:
        allowed = client.options("/api/anomalies", headers={**preflight, "Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.options("/api/anomalies", headers=preflight)
        assert "access-control-allow-origin" not in refused.headers


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_json_logs_carry_the_request_id_and_never_a_secret(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    buffer = io.StringIO()
    configure_logging("INFO", stream=buffer)
    try:
        signed_in = client.post("/api/auth/token", json={"email": "admin@acme.example", "password": "password-1"},
                                headers={"X-Request-ID": "trace-login"})
        token = signed_in.json()["access_token"]
        client.post("/api/auth/token", json={"email": "admin@acme.example", "password": "bad-password-9"})
        created = client.post("/api/api-keys", json={"name": "logged"}, headers=auth(token)).json()["api_key"]
        event = {"event_id": "e1", "account_id": "acme", "product_key": "api", "ts": "2026-01-06T00:00:00Z",
                 "units": "2"}
        ok = client.post("/api/usage/ingest", json={"events": [event]},
                         headers={**auth(created), "X-Request-ID": "trace-123"})
        assert ok.status_code == 200
        client.post("/api/usage/ingest", json={"events": [event]}, headers=auth(created[:-2] + "zz"))
        client.get("/api/runs", headers={"X-Request-ID": "bad id with spaces\n{}"})
        # a careless log call is still scrubbed: by field name and by value shape
        get_logger("test").info("careless", password="password-1", note=f"got Bearer {token} and {created}",
                                config={"api_key": "sk_test_abcdef123456", "region": "eu"})
    finally:
        configure_logging("INFO", stream=sys.stderr)
    text = buffer.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    for secret in ("password-1", "bad-password-9", token, created, created[:-2] + "zz", a.key, "sk_test_abcdef123456"):
        assert secret not in text
    ingested = next(line for line in lines if line["event"] == "usage.ingested")
    assert ingested["request_id"] == "trace-123" and ingested["accepted"] == 1 and ingested["level"] == "info"
    finished = [line for line in lines if line["event"] == "request.finished"]
    assert {"trace-login", "trace-123"} <= {line["request_id"] for line in finished}
    assert any(line["status"] == 401 for line in finished)
    assert all("\n" not in line["request_id"] and " " not in line["request_id"] for line in finished)
    careless = next(line for line in lines if line["event"] == "careless")
    assert careless["password"] == "[redacted]" and careless["config"] == {"api_key": "[redacted]", "region": "eu"}
    with correlation("job-7") as cid:
        assert cid == "job-7"


def test_to_jsonable_keeps_money_exact() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    @dataclass
    class Row:
        amount: Decimal
        at: datetime
        tags: tuple[str, ...]
        extra: dict[str, Any]

    assert to_jsonable(Row(Decimal("0.10"), datetime(2026, 1, 1, tzinfo=UTC), ("a",), {"n": Decimal("1E+2")})) == {
        "amount": "0.10", "at": "2026-01-01T00:00:00+00:00", "tags": ["a"], "extra": {"n": "100"}}
    assert [decimal_text(Decimal(v)) for v in ("40.00", "0.850", "0.125000", "1000", "0.000000001", "-3.5000")] \
        == ["40.00", "0.85", "0.125", "1000", "0.000000001", "-3.50"]


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_crm_task_and_audit_export(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    import zipfile

    from tests.fakes.hubspot_server import running

    a, b = tenants
    as_a, as_b = auth(a.analyst_token), auth(b.admin_token)
    acme = client.get("/api/anomalies", params={"account_id": "acme"}, headers=as_a).json()["rows"][0]["id"]
    with running() as fake:
        fake.add_company("1001", "Acme")
        integrations.connect(a.admin, "hubspot", {"access_token": fake.token, "host": fake.base_url})
        path = f"/api/anomalies/{acme}/crm-task"
        assert client.post(path, json={"system": "hubspot"}, headers=as_b).status_code == 404  # not B's anomaly
        first = client.post(path, json={"system": "hubspot", "due_in_days": 3}, headers=as_a)
        assert first.status_code == 200, first.text
        again = client.post(path, json={"system": "hubspot", "due_in_days": 3}, headers=as_a)
        assert first.json()["kind"] == "hubspot_task" and first.json()["replayed"] is False
        assert again.json()["replayed"] is True and again.json()["action_id"] == first.json()["action_id"]
        assert first.json()["amount"] == "40.00"
        assert len(fake.tasks) == 1
        assert client.post(path, json={"system": "zoho"}, headers=as_a).status_code == 422
    assert client.get(f"/api/anomalies/{acme}", headers=as_a).json()["row"]["status"] == "actioned"

    period = {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    export = client.get("/api/audit/export", params=period, headers=as_a)
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(export.content)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["counts"]["anomalies"] == 2 and manifest["counts"]["actions"] == 1
    b_export = client.get("/api/audit/export", params={**period, "fmt": "parquet"}, headers=as_b)
    with zipfile.ZipFile(io.BytesIO(b_export.content)) as archive:
        assert json.loads(archive.read("manifest.json"))["counts"]["actions"] == 0  # A's task is not B's
    naive = client.get("/api/audit/export", params={**period, "start": "2026-01-01T00:00:00"}, headers=as_a)
    assert naive.status_code == 400 and "start" in naive.json()["detail"]


@pytest.mark.slow  # two organizations, two reconciliations, bcrypt sign-ins
def test_draft_invoice_preview_and_exactly_once(client: TestClient, tenants: tuple[Tenant, Tenant]) -> None:
    from tests.fakes.stripe_server import DEFAULT_KEY, FakeStripe, serve

    a, b = tenants
    as_a, as_b = auth(a.analyst_token), auth(b.admin_token)
    acme = client.get("/api/anomalies", params={"account_id": "acme"}, headers=as_a).json()["rows"][0]["id"]
    fake = FakeStripe()
    fake.add_customer("cus_acme", name="Acme")
    fake.add_product("api", name="API calls")
    fake.add_price("p_api", product="api", currency="usd", unit_amount_decimal="10")  # 0.10 in cents
    with serve(fake) as base_url:
        integrations.connect(a.admin, "stripe", {"api_key": DEFAULT_KEY, "api_base": base_url})
        preview = client.get(f"/api/anomalies/{acme}/invoice-preview", headers=as_a)
        assert preview.status_code == 200, preview.text
        assert preview.json()["customer"] == "cus_acme" and preview.json()["total"] == "40.00"
        path = f"/api/anomalies/{acme}/draft-invoice"
        assert client.get(f"/api/anomalies/{acme}/invoice-preview", headers=as_b).status_code == 404
        assert client.post(path, headers=as_b).status_code == 404
        first = client.post(path, headers=as_a)
        assert first.status_code == 200, first.text
        second = client.post(path, headers=as_a)
        assert (first.json()["kind"], first.json()["replayed"], first.json()["amount"]) == ("draft_invoice", False,
                                                                                             "40.00")
        assert second.json()["replayed"] is True and second.json()["external_id"] == first.json()["external_id"]
        assert len(fake.draft_invoices()) == 1
    assert client.get(f"/api/anomalies/{acme}", headers=as_a).json()["row"]["status"] == "actioned"
    assert DEFAULT_KEY not in client.get("/api/integrations", headers=as_a).text


def test_an_unexpected_error_is_a_json_500_with_the_request_id_and_a_scrubbed_log(app_db: str) -> None:
    app = create_app()

    @app.get("/api/boom")
    def boom() -> None:
        raise RuntimeError("driver said: password rejected for key rrc_abcd1234_SECRETSECRET")

    buffer = io.StringIO()
    configure_logging("INFO", stream=buffer)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            response = client.get("/api/boom", headers={"X-Request-ID": "trace-boom"})
    finally:
        configure_logging("INFO", stream=sys.stderr)
    assert response.status_code == 500 and response.json()["request_id"] == "trace-boom"
    assert "SECRET" not in response.text and "SECRETSECRET" not in buffer.getvalue()
    failed = next(json.loads(line) for line in buffer.getvalue().splitlines() if '"request.failed"' in line)
    assert failed["request_id"] == "trace-boom" and "RuntimeError" in failed["exception"]
