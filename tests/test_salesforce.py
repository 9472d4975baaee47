"""connectors/salesforce.py through the real simple-salesforce SDK against the local fake Salesforce."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
import requests
from simple_salesforce import Salesforce, SalesforceLogin
from simple_salesforce.exceptions import SalesforceMalformedRequest

from connectors import salesforce
from connectors.salesforce import SalesforceFailure, task_marker
from tests.fakes.redirect_target import SECRET, redirect_target
from tests.fakes.salesforce_server import FakeSalesforce, running
from tests.fakes.serving import free_port

ACME = "001ACME00000001"
TASK_POST = r"/sobjects/Task/?$"


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with running() as server:
        server.add_account(ACME, "Acme Corp")
        yield server


def config_for(fake: FakeSalesforce, **overrides: Any) -> dict[str, Any]:
    return {"username": fake.username, "password": fake.password, "security_token": fake.security_token,
            "domain": "login", "instance_url": fake.base_url, "timeout": 5, **overrides}


def make_task(config: dict[str, Any], key: str = "key-1", record_id: str = ACME) -> str:
    return salesforce.create_task(config, record_id=record_id, subject="Recover 40.00 USD from Acme Corp",
                                  description="Evidence: 1000 used, 600 reported\nhttp://app/anomalies?id=1",
                                  due_date=date(2026, 12, 4), idempotency_key=key)



def test_check_reports_login_quota_and_task_permission(fake: FakeSalesforce) -> None:
    result = salesforce.check(config_for(fake))
    assert result.ok, result.message
    assert result.message == f"Connected to Salesforce as {fake.username}"
    assert result.details is not None and result.details["task_createable"] == "yes"
    assert int(result.details["api_requests_remaining"]) > 0
    fake.task_createable = False
    denied = salesforce.check(config_for(fake))
    assert not denied.ok and "cannot create Tasks" in denied.message


def test_check_never_raises_and_never_leaks_a_secret(fake: FakeSalesforce) -> None:
    wrong = salesforce.check(config_for(fake, password="not-the-password"))
    assert not wrong.ok and "INVALID_LOGIN" in wrong.message
    assert "not-the-password" not in wrong.message and fake.security_token not in wrong.message
    unreachable = salesforce.check(config_for(fake, instance_url=f"http://127.0.0.1:{free_port()}", max_attempts=1))
    assert not unreachable.ok and "could not be reached" in unreachable.message
    missing = salesforce.check({"username": "ops@example.com"})
    assert not missing.ok and missing.message == "Salesforce password: required"
    sandbox = salesforce.check(config_for(fake, domain="staging"))
    assert not sandbox.ok and "domain" in sandbox.message


@pytest.mark.parametrize("url", ["ftp://acme.my.salesforce.com", "https://", "acme.my.salesforce.com"])
def test_an_instance_url_that_is_not_an_http_url_is_named(url: str) -> None:
    result = salesforce.check({"username": "ops@example.com", "password": "pw", "instance_url": url})
    assert not result.ok and result.message == f"Salesforce instance_url: expected https://<your domain>, got {url!r}"


def test_plain_http_is_the_source_policys_call_not_the_connectors() -> None:
    """services/source_policy.py allows http to a private host the operator lists (tests/test_source_policy.py
    refuses it to a public one): the connector takes that verdict, for any host, not only this machine."""
    for url in ("http://10.1.2.3:8080", "http://crm.internal", "https://acme.my.salesforce.com"):
        settings = salesforce._settings({"username": "ops@example.com", "password": "pw", "instance_url": url + "/x"})
        assert settings.instance_url == url


@pytest.fixture
def sent(fake: FakeSalesforce, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL a request went to, recorded at the transport; only the fake's are sent on, any other host is
    refused as unreachable (so a test shows where the session id would have gone, without it going there)."""
    urls: list[str] = []
    send = requests.adapters.HTTPAdapter.send

    def recording_send(adapter: requests.adapters.HTTPAdapter, request: requests.PreparedRequest,
                       *args: Any, **kwargs: Any) -> requests.Response:
        urls.append(str(request.url))
        if not str(request.url).startswith(f"{fake.base_url}/"):
            raise requests.ConnectionError("this test reaches no host but the fake")
        return send(adapter, request, *args, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", recording_send)
    return urls


@pytest.mark.parametrize("login", ["password", "client credentials"])
def test_only_instance_urls_own_host_is_spoken_to_over_plain_http(fake: FakeSalesforce, login: str,
                                                                  sent: list[str]) -> None:
    """instance_url is http to the fake. When its login names a Salesforce domain, the session id goes there over
    https (simple-salesforce's URLs, unrewritten); when it names instance_url itself, over http. Every request is
    recorded at the transport, and none leaves for a host other than the fake."""
    config = config_for(fake, max_attempts=1) if login == "password" else {
        "consumer_key": fake.consumer_key, "client_secret": fake.client_secret, "instance_url": fake.base_url,
        "timeout": 5, "max_attempts": 1}
    fake.instance_url = "https://acme.my.salesforce.com"
    elsewhere = salesforce.check(config)
    assert not elsewhere.ok and "could not be reached" in elsewhere.message
    assert sent[0].startswith(f"{fake.base_url}/services/")  # the login, to instance_url as given
    assert sent[1:] == [f"https://acme.my.salesforce.com/services/data/v{salesforce.API_VERSION}/limits/"]
    sent.clear()
    fake.instance_url = None
    itself = salesforce.check(config)
    assert itself.ok, itself.message
    assert f"{fake.base_url}/services/data/v{salesforce.API_VERSION}/limits/" in sent
    assert all(url.startswith(f"{fake.base_url}/") for url in sent)


def test_a_redirect_is_refused_without_contacting_where_it_points(fake: FakeSalesforce) -> None:
    """instance_url is judged by services/source_policy.py, where it redirects to is not: never go there."""
    with redirect_target() as target:
        fake.redirect_next("POST", r"^/services/Soap/", target.url, status=307)
        login = salesforce.check(config_for(fake))
        fake.redirect_next("POST", r"/oauth2/token$", target.url)
        token = salesforce.check({"consumer_key": fake.consumer_key, "client_secret": fake.client_secret,
                                  "instance_url": fake.base_url})
        fake.redirect_next("GET", r"/query", target.url, status=301)
        with pytest.raises(SalesforceFailure, match=r"redirect \(301\)") as query:
            make_task(config_for(fake))
        fake.redirect_next("POST", TASK_POST, target.url, status=308)
        with pytest.raises(SalesforceFailure, match=r"redirect \(308\)") as create:
            make_task(config_for(fake))
    assert login.message == ("Salesforce answered with a redirect (307); redirects are refused: set instance_url to "
                             "the address that answers")
    assert not login.ok and not token.ok and "redirect (302)" in token.message
    assert not query.value.retryable and not create.value.retryable
    assert SECRET not in login.message + token.message + str(query.value) + str(create.value)
    assert target.requests == [] and not fake.tasks


def test_a_login_cannot_send_the_session_to_another_host(fake: FakeSalesforce) -> None:
    """A login server answers with the instance every later call (and the session id) goes to: it must be
    Salesforce's own domain or instance_url itself, whatever the login server says."""
    oauth = {"consumer_key": fake.consumer_key, "client_secret": fake.client_secret, "instance_url": fake.base_url}
    with redirect_target() as target:
        fake.instance_url = target.url
        outcomes = [salesforce.check(config_for(fake)), salesforce.check(oauth)]
        with pytest.raises(SalesforceFailure, match="outside Salesforce's domains") as task:
            make_task(config_for(fake))
    for outcome in outcomes:
        assert not outcome.ok and outcome.message.startswith("Salesforce login named an instance outside")
    assert not task.value.retryable and target.requests == [] and not fake.tasks
    fake.instance_url = None
    assert salesforce.check(config_for(fake)).ok  # back to itself: the configured instance_url



@pytest.mark.parametrize("instance", [
    "127.0.0.2\\@na1.salesforce.com",  # urlsplit: na1.salesforce.com; requests: 127.0.0.2
    "169.254.169.254#.salesforce.com", "169.254.169.254?.salesforce.com", "169.254.169.254/.salesforce.com",
    "user@na1.salesforce.com", "na1.salesforce.com:8443", "na1.salesforce.com.evil.example",
    "\u212aevil.salesforce.com", "-.salesforce.com",  # a Kelvin sign lower-cases to an ASCII k; no such label
])
def test_an_instance_that_reads_two_ways_is_refused(fake: FakeSalesforce, instance: str, sent: list[str]) -> None:
    """The instance a login names is judged as the text the calls are built from, not as urlsplit reads it:
    nothing but the login itself leaves, whichever login flow."""
    fake.instance_url = f"https://{instance}"
    oauth = {"consumer_key": fake.consumer_key, "client_secret": fake.client_secret, "instance_url": fake.base_url,
             "max_attempts": 1}
    for outcome in (salesforce.check(config_for(fake, max_attempts=1)), salesforce.check(oauth)):
        assert not outcome.ok and outcome.message.startswith("Salesforce login named an instance outside")
    assert sent and all(url.startswith(f"{fake.base_url}/services/") for url in sent)  # the logins only


@pytest.mark.parametrize("instance", ["na1.salesforce.com", "NA1.Salesforce.COM", "acme.my.salesforce.com.",
                                      "acme--sandbox.sandbox.my.salesforce.com", "acme.lightning.force.com",
                                      "acme.my.salesforce.mil", "acme.my.sfcrmproducts.cn"])
def test_salesforce_instances_are_accepted(instance: str) -> None:
    settings = salesforce._settings({"username": "u@acme.example", "password": "pw"})
    salesforce._check_instance(settings, instance)  # no refusal


def test_create_task_sets_fields_and_is_idempotent_per_key(fake: FakeSalesforce) -> None:
    config = config_for(fake)
    first = make_task(config)
    assert make_task(config) == first  # same key: found, not created again
    assert len(fake.tasks) == 1
    task = fake.tasks[first]
    assert task["WhatId"] == ACME and task["ActivityDate"] == "2026-12-04"
    assert task["Status"] == "Not Started" and task["Priority"] == "High"
    assert task["Subject"] == f"Recover 40.00 USD from Acme Corp {task_marker('key-1')}"
    assert "http://app/anomalies?id=1" in task["Description"]
    second = make_task(config, key="key-2")
    assert second != first and len(fake.tasks) == 2
    assert salesforce.task_url(config, first) == f"{fake.base_url}/lightning/r/Task/{first}/view"


def test_long_subject_keeps_its_marker(fake: FakeSalesforce) -> None:
    task_id = salesforce.create_task(config_for(fake), record_id=ACME, subject="x" * 400, description="d",
                                     due_date=date(2026, 12, 4), idempotency_key="long")
    subject = fake.tasks[task_id]["Subject"]
    assert len(subject) <= 255 and subject.endswith(task_marker("long"))


def test_unknown_or_malformed_record_id_is_a_clear_error(fake: FakeSalesforce) -> None:
    with pytest.raises(SalesforceFailure, match=r"no record 001ACME00000099 .*INVALID_CROSS_REFERENCE_KEY"):
        make_task(config_for(fake), record_id="001ACME00000099")
    calls = len(fake.requests)
    with pytest.raises(SalesforceFailure, match="not a 15 or 18 character Salesforce Id"):
        make_task(config_for(fake), record_id="001' OR Id != '")
    assert len(fake.requests) == calls and not fake.tasks  # refused before any call


def test_rate_limit_is_retried_honouring_retry_after(fake: FakeSalesforce) -> None:
    fake.fail_next("GET", r"/query", status=429, retry_after=0, times=2)
    fake.fail_next("POST", TASK_POST, status=503, retry_after=0)
    task_id = make_task(config_for(fake))
    assert list(fake.tasks) == [task_id]
    fake.fail_next("GET", r"/query", status=500, times=3)
    with pytest.raises(SalesforceFailure, match="unavailable") as failure:
        make_task(config_for(fake, max_attempts=3), key="key-3")
    assert failure.value.retryable and len(fake.tasks) == 1


def test_answer_lost_after_create_is_found_not_repeated(fake: FakeSalesforce) -> None:
    """The fake stores the task, then answers after the client gave up; the retry finds it by its marker."""
    fake.fail_next("POST", TASK_POST, delay_after=1.5)
    task_id = make_task(config_for(fake, timeout=0.5))
    assert list(fake.tasks) == [task_id]
    posts = [r for r in fake.requests if r[0] == "POST"]
    assert len(posts) == 1


def test_fake_speaks_salesforce_error_envelopes(fake: FakeSalesforce) -> None:
    base = f"{fake.base_url}/services/data/v{salesforce.API_VERSION}"
    expired = requests.get(f"{base}/limits/", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert expired.status_code == 401
    assert expired.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
    session_id, instance = SalesforceLogin(username=fake.username, password=fake.password,
                                           security_token=fake.security_token, scratch_url=fake.base_url)
    assert instance == fake.base_url[len("http://"):]
    sdk = Salesforce(session_id=session_id, instance=instance, session=salesforce._Session(5, instance))
    with pytest.raises(SalesforceMalformedRequest) as bad_field:
        sdk.Task.create({"Subject": "x", "Amount__c": 5})
    assert bad_field.value.content[0]["errorCode"] == "INVALID_FIELD"
    with pytest.raises(SalesforceMalformedRequest) as bad_query:
        sdk.query("SELECT Nope FROM Account")
    assert bad_query.value.content[0]["errorCode"] == "INVALID_FIELD"
    found = sdk.query(f"SELECT Id, Name FROM Account WHERE Id = '{ACME}'")
    assert found["totalSize"] == 1 and found["records"][0]["Name"] == "Acme Corp"


def test_connection_dropped_after_create_is_found_not_repeated(fake: FakeSalesforce) -> None:
    fake.fail_next("POST", TASK_POST, drop=True)
    task_id = make_task(config_for(fake))
    assert list(fake.tasks) == [task_id]
    fake.fail_next("POST", TASK_POST, drop=True)
    with pytest.raises(SalesforceFailure, match="connection to Salesforce broke") as failure:
        make_task(config_for(fake, max_attempts=1), key="key-2")
    assert failure.value.retryable and len(fake.tasks) == 2
    assert make_task(config_for(fake), key="key-2") in fake.tasks and len(fake.tasks) == 2


def test_oauth_client_credentials_login(fake: FakeSalesforce) -> None:
    oauth = {"consumer_key": fake.consumer_key, "client_secret": fake.client_secret, "instance_url": fake.base_url,
             "timeout": 5}
    result = salesforce.check(oauth)
    assert result.ok and result.message == "Connected to Salesforce as the connected app"
    task_id = make_task(oauth)
    assert list(fake.tasks) == [task_id]
    wrong = salesforce.check({**oauth, "client_secret": "nope-nope"})
    assert not wrong.ok and "invalid_client" in wrong.message and "nope-nope" not in wrong.message
    half = salesforce.check({"consumer_key": fake.consumer_key, "instance_url": fake.base_url})
    assert not half.ok and "give both" in half.message
    no_url = salesforce.check({"consumer_key": fake.consumer_key, "client_secret": fake.client_secret})
    assert not no_url.ok and no_url.message.startswith("Salesforce instance_url: required")
