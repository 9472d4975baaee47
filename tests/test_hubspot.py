"""connectors/hubspot.py through the real hubspot-api-client SDK against the local fake HubSpot."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
import requests
from hubspot import HubSpot
from hubspot.crm.companies.exceptions import NotFoundException

from connectors import hubspot
from connectors.hubspot import IDEMPOTENCY_PROPERTY, HubSpotFailure
from tests.fakes.hubspot_server import TASK_TO_COMPANY, FakeHubSpot, running
from tests.fakes.redirect_target import SECRET, redirect_target
from tests.fakes.serving import free_port

COMPANY = "5001"
TASK_POST = r"/crm/v3/objects/tasks$"
SEARCH = r"/crm/v3/objects/tasks/search$"


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    with running() as server:
        server.add_company(COMPANY, "Acme Corp")
        yield server


def config_for(fake: FakeHubSpot, **overrides: Any) -> dict[str, Any]:
    return {"access_token": fake.token, "host": fake.base_url, "timeout": 5, **overrides}


def make_task(config: dict[str, Any], key: str = "key-1", company_id: str = COMPANY) -> str:
    return hubspot.create_task(config, company_id=company_id, subject="Recover 40.00 USD from Acme Corp",
                               body="Used 1000, reported 600 <b>\nhttp://app/anomalies?id=1",
                               due_date=date(2026, 12, 4), idempotency_key=key)



def test_check_reports_token_and_idempotency_property(fake: FakeHubSpot) -> None:
    result = hubspot.check(config_for(fake))
    assert result.ok and result.message == "Connected to HubSpot"
    assert result.details is not None and result.details["idempotency_property"].startswith("missing")
    fake.add_task_property(IDEMPOTENCY_PROPERTY)
    again = hubspot.check(config_for(fake))
    assert again.details is not None and again.details["idempotency_property"] == "present"


def test_check_never_raises_and_never_leaks_the_token(fake: FakeHubSpot) -> None:
    wrong = hubspot.check(config_for(fake, access_token="pat-na1-wrong-token-123456"))
    assert not wrong.ok and "rejected the access token" in wrong.message
    assert "wrong-token" not in wrong.message
    unreachable = hubspot.check(config_for(fake, host=f"http://127.0.0.1:{free_port()}", max_attempts=1))
    assert not unreachable.ok and "could not be reached" in unreachable.message
    assert hubspot.check({}).message == "HubSpot access_token: required (a private app token)"


@pytest.mark.parametrize("host", ["ftp://api.hubapi.com", "http://:8080", "api.hubapi.com"])
def test_a_host_that_is_not_an_http_url_is_named(host: str) -> None:
    result = hubspot.check({"access_token": "pat-na1-0000", "host": host})
    assert not result.ok
    assert result.message == f"HubSpot host: expected https://api.hubapi.com or another https URL, got {host!r}"


def test_plain_http_is_the_source_policys_call_not_the_connectors() -> None:
    """services/source_policy.py allows http to a private host the operator lists (tests/test_source_policy.py
    refuses it to a public one): the connector takes that verdict, for any host, not only this machine."""
    for host in ("http://10.1.2.3:8080", "http://crm.internal", "https://api.hubapi.com"):
        assert hubspot._settings({"access_token": "pat-na1-0000", "host": host}).host == host


def test_a_redirect_is_refused_without_contacting_where_it_points(fake: FakeHubSpot) -> None:
    """host is judged by services/source_policy.py, where it redirects to is not: never go there."""
    with redirect_target() as target:
        fake.redirect_next("GET", r"/companies$", target.url)
        checked = hubspot.check(config_for(fake))
        fake.redirect_next("POST", TASK_POST, target.url, status=307)
        with pytest.raises(HubSpotFailure, match=r"redirect \(307\) while creating the task; ") as create:
            make_task(config_for(fake))
    assert checked.message == ("HubSpot answered with a redirect (302) while checking the connection; redirects are "
                               "refused: set host to the address that answers")
    assert not checked.ok and not create.value.retryable
    assert SECRET not in checked.message + str(create.value)
    assert target.requests == [] and not fake.tasks


def test_create_task_sets_properties_association_and_is_idempotent(fake: FakeHubSpot) -> None:
    config = config_for(fake)
    first = make_task(config)
    assert make_task(config) == first  # same key: found by search, not created again
    assert len(fake.tasks) == 1 and IDEMPOTENCY_PROPERTY in fake.custom_task_properties
    task = fake.tasks[first]
    props = task["properties"]
    assert task["companies"] == [COMPANY]
    assert props["hs_task_subject"] == "Recover 40.00 USD from Acme Corp"
    assert props["hs_timestamp"] == "2026-12-04T12:00:00.000Z"
    assert props["hs_task_status"] == "NOT_STARTED" and props["hs_task_priority"] == "HIGH"
    assert props["hs_task_body"] == "Used 1000, reported 600 &lt;b&gt;<br>http://app/anomalies?id=1"
    assert props[IDEMPOTENCY_PROPERTY] == "key-1"
    assert make_task(config, key="key-2") != first and len(fake.tasks) == 2
    assert hubspot.task_url(config, first) is None
    assert hubspot.task_url({**config, "portal_id": "123"}, first).endswith(f"/123/record/0-27/{first}")


def test_unknown_or_malformed_company_is_a_clear_error(fake: FakeHubSpot) -> None:
    with pytest.raises(HubSpotFailure, match="no company 5009"):
        make_task(config_for(fake), company_id="5009")
    calls = len(fake.requests)
    with pytest.raises(HubSpotFailure, match="digits only"):
        make_task(config_for(fake), company_id="001ACME00000001")
    assert len(fake.requests) == calls and not fake.tasks


def test_rate_limit_is_retried_honouring_retry_after(fake: FakeHubSpot) -> None:
    fake.fail_next("POST", SEARCH, status=429, retry_after=0, times=2)
    fake.fail_next("POST", TASK_POST, status=502)
    task_id = make_task(config_for(fake))
    assert list(fake.tasks) == [task_id]
    fake.fail_next("POST", SEARCH, status=500, times=3)
    with pytest.raises(HubSpotFailure, match="unavailable or rate-limited") as failure:
        make_task(config_for(fake, max_attempts=3), key="key-3")
    assert failure.value.retryable and len(fake.tasks) == 1


def test_answer_lost_after_create_is_found_not_repeated(fake: FakeHubSpot) -> None:
    """The fake stores the task, then answers after the client gave up; the retry finds it by search."""
    fake.fail_next("POST", TASK_POST, delay_after=1.5)
    task_id = make_task(config_for(fake, timeout=0.5))
    assert list(fake.tasks) == [task_id]
    assert sum(1 for method, path in fake.requests if (method, path) == ("POST", "/crm/v3/objects/tasks")) == 1


def test_fake_speaks_hubspot_envelopes(fake: FakeHubSpot) -> None:
    unauthorized = requests.get(f"{fake.base_url}/crm/v3/objects/companies", timeout=5)
    assert unauthorized.status_code == 401
    body = unauthorized.json()
    assert body["status"] == "error" and body["category"] == "INVALID_AUTHENTICATION" and body["correlationId"]
    fake.fail_next("GET", r"/companies$", status=429, retry_after=7)
    limited = requests.get(f"{fake.base_url}/crm/v3/objects/companies", timeout=5,
                           headers={"Authorization": f"Bearer {fake.token}"})
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.json()["errorType"] == "RATE_LIMIT"
    client = HubSpot(access_token=fake.token, host=fake.base_url)
    company = client.crm.companies.basic_api.get_by_id(COMPANY)
    assert company.properties["name"] == "Acme Corp"
    with pytest.raises(NotFoundException):
        client.crm.companies.basic_api.get_by_id("404")
    task_id = make_task(config_for(fake))
    task = client.crm.objects.tasks.basic_api.get_by_id(task_id, associations=["companies"])
    assert task.associations["companies"].results[0].id == COMPANY
    assert TASK_TO_COMPANY == hubspot.TASK_TO_COMPANY


def test_connection_dropped_after_create_is_found_not_repeated(fake: FakeHubSpot) -> None:
    fake.fail_next("POST", TASK_POST, drop=True)
    task_id = make_task(config_for(fake))
    assert list(fake.tasks) == [task_id]
    fake.fail_next("POST", TASK_POST, drop=True)
    with pytest.raises(HubSpotFailure, match="connection to HubSpot broke") as failure:
        make_task(config_for(fake, max_attempts=1), key="key-2")
    assert failure.value.retryable and len(fake.tasks) == 2
    assert make_task(config_for(fake), key="key-2") in fake.tasks and len(fake.tasks) == 2
