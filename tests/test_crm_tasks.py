"""services/crm_tasks.py on SQLite and PostgreSQL, through the real CRM SDKs against the local fakes.

Exactly once: a double click, a retry after a lost answer and 20 concurrent requests each leave one
task in the CRM and one row in `actions`; refusals leave nothing behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from core.money import round_money
from db.models import Account, Action, Anomaly, AuditEntry, User
from db.session import org_session, system_session
from services import audit, integrations, reconciliation, users
from services.actions_common import ActionFailed, ActionResult
from services.context import Actor
from services.crm_tasks import create_crm_task
from services.demo import seed_demo
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from tests.bundles import Scenario
from tests.fakes import hubspot_server, salesforce_server
from tests.fakes.hubspot_server import FakeHubSpot
from tests.fakes.salesforce_server import FakeSalesforce
from tests.fakes.serving import wait_for

SF_ACME = "001ACME00000001"
HS_BETA = "5001"
APP_URL = "https://rrc.example.com"
pytestmark = pytest.mark.slow  # each test migrates a fresh database, hashes two passwords and reconciles (~2 s)


@pytest.fixture
def org(org: tuple[Actor, Actor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Actor, Actor]:
    """The conftest organization with one 40.00 USD under-reporting leak per account."""
    monkeypatch.setenv("RRC_APP_BASE_URL", APP_URL + "/")
    admin_actor, _ = org
    scenario = Scenario(accounts=[["acme", "Acme Corp", "cus_acme", SF_ACME],
                                  ["beta", "Beta GmbH", "cus_beta", HS_BETA],
                                  ["gamma", "Gamma Ltd", "cus_gamma", ""]])
    for account in ("acme", "beta", "gamma"):
        scenario.sub(account, "api", "p_api").use(account, "api", "2026-01-05T10:00:00Z", "1000", reported="600")
        scenario.invoice(account, "api", "600", "60.00")
    reconciliation.run_reconciliation(admin_actor, bundle_dir=scenario.write(tmp_path / "bundle"))
    return org


@pytest.fixture
def sf() -> Iterator[FakeSalesforce]:
    with salesforce_server.running() as fake:
        fake.add_account(SF_ACME, "Acme Corp")
        yield fake


@pytest.fixture
def hs() -> Iterator[FakeHubSpot]:
    with hubspot_server.running() as fake:
        fake.add_company(HS_BETA, "Beta GmbH")
        yield fake


def connect_salesforce(admin: Actor, fake: FakeSalesforce, **extra: object) -> None:
    integrations.connect(admin, "salesforce", {
        "username": fake.username, "password": fake.password, "security_token": fake.security_token,
        "domain": "login", "instance_url": fake.base_url, "timeout": 5, **extra})


def connect_hubspot(admin: Actor, fake: FakeHubSpot, **extra: object) -> None:
    integrations.connect(admin, "hubspot", {"access_token": fake.token, "host": fake.base_url, "timeout": 5, **extra})


def anomaly_of(actor: Actor, account_id: str) -> Anomaly:
    with org_session(actor.org_id) as session:
        return session.scalars(select(Anomaly).where(Anomaly.account_id == account_id)).one()


def action_rows(actor: Actor) -> list[Action]:
    with org_session(actor.org_id) as session:
        return list(session.scalars(select(Action).order_by(Action.id)))


def audit_actions(actor: Actor) -> list[str]:
    with org_session(actor.org_id) as session:
        return list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.seq)))


def test_salesforce_task_once_on_double_click(org: tuple[Actor, Actor], sf: FakeSalesforce) -> None:
    admin, analyst = org
    connect_salesforce(admin, sf)
    anomaly = anomaly_of(admin, "acme")
    first = create_crm_task(analyst, anomaly.id, "salesforce", due_in_days=3)
    second = create_crm_task(analyst, anomaly.id, "salesforce", due_in_days=3)
    assert (first.replayed, second.replayed) == (False, True)
    assert first == ActionResult(first.action_id, "salesforce_task", "succeeded", first.external_id, Decimal("40.00"),
                                 "usd", False, f"{sf.base_url}/lightning/r/Task/{first.external_id}/view")
    assert second.external_id == first.external_id and second.action_id == first.action_id
    assert str(first.amount) == "40.00"
    assert list(sf.tasks) == [first.external_id]
    task = sf.tasks[first.external_id]
    assert task["WhatId"] == SF_ACME
    assert task["ActivityDate"] == (datetime.now(UTC).date() + timedelta(days=3)).isoformat()
    assert task["Subject"].startswith("Recover 40.00 USD from Acme Corp: under-reported usage on api [RRC-")
    assert "Actual units: 1000; reported to billing: 600; gap: 400." in task["Description"]
    assert f"{APP_URL}/anomalies?id={anomaly.id}" in task["Description"]
    assert len(action_rows(admin)) == 1
    after = anomaly_of(admin, "acme")
    assert after.status == "actioned" and first.external_id in (after.status_reason or "")
    assert audit_actions(admin).count("crm_task.created") == 1
    with org_session(admin.org_id) as session:
        assert audit.verify(session, admin.org_id).ok


def test_hubspot_task_once_with_company_association(org: tuple[Actor, Actor], hs: FakeHubSpot) -> None:
    admin, _ = org
    connect_hubspot(admin, hs, portal_id="4242")
    anomaly = anomaly_of(admin, "beta")
    first = create_crm_task(admin, anomaly.id, "hubspot")
    again = create_crm_task(admin, anomaly.id, "hubspot")
    assert not first.replayed and again.replayed and again.external_id == first.external_id
    assert first.url == f"https://app.hubspot.com/contacts/4242/record/0-27/{first.external_id}"
    assert list(hs.tasks) == [first.external_id]
    task = hs.tasks[first.external_id]
    assert task["companies"] == [HS_BETA]
    props = task["properties"]
    assert props["hs_timestamp"] == f"{datetime.now(UTC).date() + timedelta(days=7)}T12:00:00.000Z"
    assert props["hs_task_subject"].startswith("Recover 40.00 USD from Beta GmbH")
    assert f"{APP_URL}/anomalies?id={anomaly.id}" in props["hs_task_body"]
    assert [(a.kind, a.status, a.external_id) for a in action_rows(admin)] == [
        ("hubspot_task", "succeeded", first.external_id)]
    assert anomaly_of(admin, "beta").status == "actioned"


@pytest.mark.parametrize("system", ["salesforce", "hubspot"])
def test_twenty_concurrent_requests_make_one_task(org: tuple[Actor, Actor], sf: FakeSalesforce, hs: FakeHubSpot,
                                                  system: str) -> None:
    admin, analyst = org
    if system == "salesforce":
        connect_salesforce(admin, sf)
        anomaly, fake_tasks = anomaly_of(admin, "acme"), sf.tasks
    else:
        connect_hubspot(admin, hs)
        anomaly, fake_tasks = anomaly_of(admin, "beta"), hs.tasks
    results: list[ActionResult] = []
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def click() -> None:
        start.wait()
        try:
            results.append(create_crm_task(analyst, anomaly.id, system))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=click) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == 20 and len(fake_tasks) == 1
    assert {r.external_id for r in results} == set(fake_tasks)
    assert sum(1 for r in results if not r.replayed) == 1
    assert len(action_rows(admin)) == 1
    assert audit_actions(admin).count("crm_task.created") == 1


@pytest.mark.parametrize("system", ["salesforce", "hubspot"])
def test_retry_after_a_lost_answer_finds_the_task(org: tuple[Actor, Actor], sf: FakeSalesforce, hs: FakeHubSpot,
                                                  system: str) -> None:
    """The CRM stored the task but the answer never came: the action fails; the retry finds, not repeats."""
    admin, analyst = org
    if system == "salesforce":
        connect_salesforce(admin, sf, timeout=0.5, max_attempts=1)
        anomaly, fake = anomaly_of(admin, "acme"), sf
        sf.fail_next("POST", r"/sobjects/Task/?$", delay_after=1.5)
    else:
        connect_hubspot(admin, hs, timeout=0.5, max_attempts=1)
        anomaly, fake = anomaly_of(admin, "beta"), hs  # type: ignore[assignment]
        hs.fail_next("POST", r"/crm/v3/objects/tasks$", delay_after=1.5)
    with pytest.raises(ActionFailed, match="did not answer in time") as lost:
        create_crm_task(analyst, anomaly.id, system)
    assert lost.value.retryable
    wait_for(lambda: fake.tasks)  # under load the CRM may store the task after our client gave up
    assert len(fake.tasks) == 1
    [failed] = action_rows(admin)
    assert failed.status == "failed" and "did not answer in time" in (failed.error or "")
    assert anomaly_of(admin, "acme" if system == "salesforce" else "beta").status == "open"
    retried = create_crm_task(analyst, anomaly.id, system)
    assert not retried.replayed and retried.action_id == failed.id
    assert list(fake.tasks) == [retried.external_id]
    assert [a.status for a in action_rows(admin)] == ["succeeded"]
    assert audit_actions(admin)[-2:] == ["crm_task.failed", "crm_task.created"]


def test_bad_token_fails_cleanly_and_a_fixed_token_succeeds(org: tuple[Actor, Actor], hs: FakeHubSpot) -> None:
    admin, analyst = org
    connect_hubspot(admin, hs, access_token="pat-na1-revoked-0000-0000")
    anomaly = anomaly_of(admin, "beta")
    with pytest.raises(ActionFailed, match="rejected the access token") as failure:
        create_crm_task(analyst, anomaly.id, "hubspot")
    assert not failure.value.retryable and "revoked" not in str(failure.value)
    assert not hs.tasks and anomaly_of(admin, "beta").status == "open"
    assert [a.status for a in action_rows(admin)] == ["failed"]
    connect_hubspot(admin, hs)
    result = create_crm_task(analyst, anomaly.id, "hubspot")
    assert list(hs.tasks) == [result.external_id] and len(action_rows(admin)) == 1


def test_refusals_write_nothing(org: tuple[Actor, Actor], sf: FakeSalesforce) -> None:
    admin, analyst = org
    acme, gamma = anomaly_of(admin, "acme"), anomaly_of(admin, "gamma")
    with pytest.raises(NotFound, match="connect Salesforce in Settings"):
        create_crm_task(analyst, acme.id, "salesforce")
    connect_salesforce(admin, sf)
    before = audit_actions(admin)
    with pytest.raises(InvalidInput, match=r"gamma .* has no crm_id"):
        create_crm_task(analyst, gamma.id, "salesforce")
    with pytest.raises(InvalidInput, match="system: expected 'salesforce' or 'hubspot'"):
        create_crm_task(analyst, acme.id, "zendesk")
    with pytest.raises(InvalidInput, match="due_in_days"):
        create_crm_task(analyst, acme.id, "salesforce", due_in_days=-1)
    with pytest.raises(InvalidInput, match="due_in_days"):
        create_crm_task(analyst, acme.id, "salesforce", due_in_days=True)
    with pytest.raises(NotFound, match="anomaly 999999 not found"):
        create_crm_task(analyst, 999999, "salesforce")
    with pytest.raises(PermissionDenied):
        create_crm_task(Actor(admin.org_id, "viewer", None, "user:0"), acme.id, "salesforce")
    with org_session(admin.org_id) as session:
        session.execute(update(Anomaly).where(Anomaly.id == acme.id).values(status="dismissed"))
    with pytest.raises(Conflict, match="is dismissed: reopen it"):
        create_crm_task(analyst, acme.id, "salesforce")
    assert not action_rows(admin) and not sf.tasks and audit_actions(admin) == before


def test_another_orgs_anomaly_is_not_found(org: tuple[Actor, Actor], sf: FakeSalesforce) -> None:
    admin, _ = org
    connect_salesforce(admin, sf)
    other_org, other_admin = users.create_organization("Other", "other", "a@other.example", "O", "password-3")
    other = Actor.user(other_org.id, other_admin.id, "admin")
    connect_salesforce(other, sf)
    with pytest.raises(NotFound):
        create_crm_task(other, anomaly_of(admin, "acme").id, "salesforce")
    assert not sf.tasks and not action_rows(admin) and not action_rows(other)


def test_abandoned_pending_action_is_taken_over(org: tuple[Actor, Actor], sf: FakeSalesforce) -> None:
    """A process that died between claiming and finishing leaves `pending`; after the lease it is retried."""
    admin, analyst = org
    connect_salesforce(admin, sf)
    anomaly = anomaly_of(admin, "acme")
    first = create_crm_task(analyst, anomaly.id, "salesforce")
    with org_session(admin.org_id) as session:
        session.execute(update(Action).values(status="pending", updated_at=datetime.now(UTC) - timedelta(hours=1)))
    again = create_crm_task(analyst, anomaly.id, "salesforce")
    assert again.action_id == first.action_id and again.external_id == first.external_id
    assert len(sf.tasks) == 1 and [a.status for a in action_rows(admin)] == ["succeeded"]


def test_demo_org_accounts_reach_salesforce(app_db: str, tmp_path: Path, sf: FakeSalesforce) -> None:
    org = seed_demo(tmp_path / "demo-bundle", accounts=12)
    with system_session() as session:
        admin_id = session.scalars(select(User.id).where(User.org_id == org.id, User.role == "admin")).first()
    admin = Actor.user(org.id, admin_id, "admin")
    with org_session(org.id) as session:
        anomaly = session.scalars(select(Anomaly).where(Anomaly.type != "over_billing", Anomaly.status == "open")
                                  .order_by(Anomaly.leak_amount.desc())).first()
        assert anomaly is not None
        crm_id = session.scalars(select(Account.crm_id).where(Account.account_id == anomaly.account_id)).one()
        assert crm_id
    sf.add_account(crm_id, "Demo account")
    connect_salesforce(admin, sf)
    result = create_crm_task(admin, anomaly.id, "salesforce", due_in_days=14)
    assert sf.tasks[result.external_id]["WhatId"] == crm_id
    assert result.amount == round_money(Decimal(anomaly.leak_amount), anomaly.currency)
    with org_session(org.id) as session:
        assert session.scalar(select(func.count()).select_from(Action)) == 1
    assert date.fromisoformat(sf.tasks[result.external_id]["ActivityDate"]) > datetime.now(UTC).date()


def test_no_secret_reaches_logs_actions_or_audit(org: tuple[Actor, Actor], sf: FakeSalesforce, hs: FakeHubSpot,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    admin, analyst = org
    caplog.set_level(logging.DEBUG)
    connect_salesforce(admin, sf)
    connect_hubspot(admin, hs, access_token="pat-na1-revoked-9999-8888")
    create_crm_task(analyst, anomaly_of(admin, "acme").id, "salesforce")
    with pytest.raises(ActionFailed):
        create_crm_task(analyst, anomaly_of(admin, "beta").id, "hubspot")
    with org_session(admin.org_id) as session:
        stored = repr([(a.request, a.response, a.error) for a in session.scalars(select(Action))])
        stored += repr([e.details for e in session.scalars(select(AuditEntry))])
    for secret in (sf.password, sf.security_token, "pat-na1-revoked-9999-8888", *sf.sessions):
        assert secret not in caplog.text and secret not in stored
