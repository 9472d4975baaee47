"""POST /api/usage/ingest through the real app and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import create_app
from config import Settings
from routes import middleware
from services import api_keys, ingest, users
from services.context import Actor

T0 = datetime(2026, 10, 1, tzinfo=UTC)
URL = "/api/usage/ingest"


@pytest.fixture
def admin(app_db: str) -> Actor:
    org, user = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    return Actor.user(org.id, user.id, "admin")


@pytest.fixture
def key(admin: Actor) -> str:
    return api_keys.create_api_key(admin, "pipeline").plaintext


def client_for(**limits: Any) -> TestClient:
    """The app with rate limits off, but for `limits` (config.Settings' `api_*` fields)."""
    settings = Settings(**{"api_key_rate": 0, "api_ip_rate": 0, **limits})
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with client_for() as c:
        yield c


def events(n: int, start: int = 0, **overrides: Any) -> list[dict[str, Any]]:
    return [{"event_id": f"evt_{i}", "account_id": f"acc_{i % 3}", "product_key": "api_calls",
             "ts": (T0 + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"), "units": "0.25", **overrides}
            for i in range(start, start + n)]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_happy_path_and_replay(client: TestClient, key: str, admin: Actor) -> None:
    response = client.post(URL, json={"events": events(500)}, headers={**auth(key), "X-Request-ID": "batch-42"})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 500, "duplicates": 0, "request_id": "batch-42"}
    assert response.headers["x-request-id"] == "batch-42"
    replay = client.post(URL, json={"events": events(500)}, headers=auth(key))
    assert replay.status_code == 200 and replay.json()["accepted"] == 0 and replay.json()["duplicates"] == 500
    assert len(replay.headers["x-request-id"]) == 32  # a fresh id when the client sent none
    partly = client.post(URL, json={"events": events(10, start=495)}, headers=auth(key))
    assert partly.json()["accepted"] == 5 and partly.json()["duplicates"] == 5
    assert ingest.count_events(admin) == 505
    table = ingest.export_usage_table(admin, T0, T0 + timedelta(days=1))
    assert sum(table.column("units").to_pylist()) == D("0.25") * 505


@pytest.mark.slow
def test_malformed_batch_names_each_bad_event_and_stores_nothing(client: TestClient, key: str, admin: Actor) -> None:
    batch = events(5)
    batch[1]["ts"] = "2026-10-01T10:00:00"  # naive
    batch[2]["units"] = "-3"
    batch[3].pop("account_id")
    batch[4]["units"] = "1e400"
    response = client.post(URL, json={"events": batch}, headers=auth(key))
    assert response.status_code == 422
    body = response.json()
    assert {(e["index"], e["field"]) for e in body["errors"]} == {(1, "ts"), (2, "units"), (3, "account_id"),
                                                                  (4, "units")}
    assert "nothing was stored" in body["detail"] and "event 1 ts" in body["detail"]
    assert ingest.count_events(admin) == 0
    conflicting = events(2)
    conflicting[1]["event_id"] = "evt_0"
    response = client.post(URL, json={"events": conflicting}, headers=auth(key))
    assert response.status_code == 422 and response.json()["errors"][0]["index"] == 1
    for bad in ({"events": []}, {"events": "nope"}, {}, [], {"events": [{}]},
                {"events": events(1), "extra": 1}):
        assert client.post(URL, json=bad, headers=auth(key)).status_code == 422
    not_json = client.post(URL, content=b"{not json", headers={**auth(key), "Content-Type": "application/json"})
    assert not_json.status_code == 422
    assert ingest.count_events(admin) == 0


def test_batch_and_body_size_limits(key: str, admin: Actor) -> None:
    with client_for() as client:
        too_many = client.post(URL, json={"events": events(ingest.MAX_BATCH + 1)}, headers=auth(key))
        assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "events"
    with client_for(api_max_body_bytes=4096) as client:
        big = json.dumps({"events": events(100)}).encode()
        assert len(big) > 4096
        response = client.post(URL, content=big, headers={**auth(key), "Content-Type": "application/json"})
        assert response.status_code == 413 and "4096" in response.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]

        streamed = client.post(URL, content=chunks(), headers={**auth(key), "Content-Type": "application/json"})
        assert streamed.status_code == 413
        small = client.post(URL, json={"events": events(3)}, headers=auth(key))
        assert small.status_code == 200
    assert ingest.count_events(admin) == 3


def test_ingest_authentication(client: TestClient, key: str, admin: Actor) -> None:
    body = {"events": events(2)}
    missing = client.post(URL, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post(URL, json=body, headers={"Authorization": f"Basic {key}"}).status_code == 401
    assert client.post(URL, json=body, headers=auth(key[:-1] + ("x" if key[-1] != "x" else "y"))).status_code == 401
    token = api_keys.issue_user_token("admin@acme.example", "password-1").access_token
    as_user = client.post(URL, json=body, headers=auth(token))
    assert as_user.status_code == 401 and "API key" in as_user.json()["detail"]
    key_on_reads = client.get("/api/anomalies", headers=auth(key))
    assert key_on_reads.status_code == 401 and "only ingest" in key_on_reads.json()["detail"]
    created = api_keys.create_api_key(admin, "old")
    api_keys.revoke_api_key(admin, created.id)
    assert client.post(URL, json=body, headers=auth(created.plaintext)).status_code == 401
    assert ingest.count_events(admin) == 0


def test_rate_limits_answer_429_with_retry_after(key: str, admin: Actor) -> None:
    with client_for(api_key_rate=0.01, api_key_burst=2) as client:
        statuses = [client.post(URL, json={"events": events(1, start=i)}, headers=auth(key)).status_code
                    for i in range(3)]
        assert statuses == [200, 200, 429]
        limited = client.post(URL, json={"events": events(1, start=9)}, headers=auth(key))
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        other_key = api_keys.create_api_key(admin, "other").plaintext  # buckets are per key
        assert client.post(URL, json={"events": events(1, start=7)}, headers=auth(other_key)).status_code == 200
    with client_for(api_ip_rate=0.01, api_ip_burst=3) as client:
        statuses = [client.post(URL, json={"events": events(1)}).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]  # guessing credentials is slowed down too
        assert int(client.get("/api/runs").headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200  # probes are never limited
    assert ingest.count_events(admin) == 3


def test_token_bucket_refills_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(middleware.time, "monotonic", lambda: now[0])
    bucket = middleware.TokenBucket(rate=2, burst=3, max_keys=10)
    assert [bucket.take("k") for _ in range(3)] == [0, 0, 0]
    assert bucket.take("k") == pytest.approx(0.5)  # one token back after half a second at 2/s
    now[0] += 0.5
    assert bucket.take("k") == 0 and bucket.take("k") > 0
    for i in range(20):  # many one-off clients: refilled buckets are dropped, the table stays small
        now[0] += 10
        bucket.take(f"ip{i}")
    assert len(bucket._buckets) <= 11
    assert middleware.TokenBucket(rate=0, burst=1).take("k") == 0  # 0 = no limit
    scope = {"client": ("10.0.0.9", 1234), "headers": [(b"x-forwarded-for", b"203.0.113.7, 10.0.0.1")]}
    assert middleware.client_ip(scope, trust_forwarded_for=False) == "10.0.0.9"
    assert middleware.client_ip(scope, trust_forwarded_for=True) == "203.0.113.7"
