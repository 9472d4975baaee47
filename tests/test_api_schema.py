"""Schemathesis against the API's own OpenAPI schema: whatever a client sends, never a 500.

Every operation is exercised with generated valid and invalid requests, authenticated (a user
token, or an API key for ingestion) so the requests reach the services and the database, on
SQLite and PostgreSQL (PostgreSQL refuses things SQLite accepts, such as NUL characters and
out-of-range integers).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from api import create_app
from config import Settings
from services import api_keys, reconciliation, users
from services.context import Actor
from tests.test_api_routes import leaky

pytestmark = pytest.mark.slow
EXAMPLES = 25


def fuzz(operation: Any, headers: dict[str, str], statuses: Counter[int]) -> None:
    """Valid and invalid requests for one operation; every answer must be below 500."""
    strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                         operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def call(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        statuses[response.status_code // 100 * 100] += 1
        assert response.status_code < 500, (case.method, case.formatted_path, case.query, case.body,
                                            response.status_code, response.text[:500])

    call()


@pytest.mark.timeout(900)
def test_no_operation_answers_500(app_db: str, tmp_path: Path) -> None:
    org, user = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin = Actor.user(org.id, user.id, "admin")
    reconciliation.run_reconciliation(admin, bundle_dir=leaky("1000").write(tmp_path / "bundle"))
    token = api_keys.issue_user_token("admin@acme.example", "password-1").access_token
    key = api_keys.create_api_key(admin, "fuzz").plaintext
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_app(Settings(api_key_rate=0, api_ip_rate=0)))

    checked, statuses = [], Counter[int]()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/api/auth/token":
            continue  # random sign-ins would only lock accounts; covered in test_api_routes
        credentials = key if operation.path == "/api/usage/ingest" else token
        fuzz(operation, {"Authorization": f"Bearer {credentials}"}, statuses)
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert len(checked) >= 18, checked
    assert statuses[200] and statuses[400], statuses  # requests got through to the services, and were refused
