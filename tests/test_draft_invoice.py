"""services/recovery.py on SQLite and PostgreSQL, through the real SDK against the fake Stripe.

The promise under test: one leak -> at most one Stripe draft invoice, whatever the clicking,
concurrency, timeouts and failures; and a refused or failed attempt leaves nothing half-done.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal as D
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy import update as sa_update

from core.bundle import load_bundle
from db.models import Action, Anomaly, AuditEntry
from db.session import org_session
from services import audit, integrations, reconciliation, recovery, users
from services.actions_common import ActionFailed
from services.anomalies import set_status
from services.context import Actor
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from tests.bundles import Scenario
from tests.fakes.serving import wait_for
from tests.fakes.stripe_server import DEFAULT_KEY, FakeStripe, serve

pytestmark = pytest.mark.slow  # each test migrates a fresh database and reconciles a bundle first (~2-3 s)


@dataclass
class World:
    admin: Actor
    analyst: Actor
    fake: FakeStripe
    config: dict[str, object]
    leak: int  # under-reported usage of acme (50.00 USD)
    over: int  # over-billing of beta
    unmapped: int  # unbilled usage of gamma, which has no Stripe customer


def _scenario() -> Scenario:
    scenario = Scenario()
    scenario.accounts.append(["gamma", "Gamma", "", "001G"])
    scenario.sub("acme", "api", "p_api").invoice("acme", "api", "500", "50.00")
    scenario.use("acme", "api", "2026-01-10T10:00:00Z", "1000", reported="500")
    scenario.sub("beta", "api", "p_api").invoice("beta", "api", "100", "60.00")
    scenario.use("beta", "api", "2026-01-11T10:00:00Z", "100")
    scenario.use("gamma", "api", "2026-01-12T10:00:00Z", "300", reported="")
    return scenario


def _anomaly_id(actor: Actor, account: str) -> int:
    with org_session(actor.org_id) as session:
        return session.scalars(select(Anomaly.id).where(Anomaly.account_id == account)).one()


@pytest.fixture
def world(app_db: str, tmp_path: Path) -> Iterator[World]:
    org, admin_user = users.create_organization("Acme Billing", "acme-billing", "ann@acme.example", "Ann",
                                                "password-1")
    admin = Actor.user(org.id, admin_user.id, "admin")
    analyst_user = users.create_user(admin, "al@acme.example", "Al", "analyst", "password-2")
    folder = _scenario().write(tmp_path / "bundle")
    run = reconciliation.run_reconciliation(admin, bundle_dir=folder)
    assert run.status == "succeeded", run.error
    fake = FakeStripe()
    fake.seed_from_bundle(load_bundle(folder))
    with serve(fake) as url:
        config: dict[str, object] = {"api_key": DEFAULT_KEY, "api_base": url, "max_network_retries": 0,
                                     "timeout": 5}
        integrations.connect(admin, "stripe", config)
        yield World(admin, Actor.user(org.id, analyst_user.id, "analyst"), fake, config,
                    _anomaly_id(admin, "acme"), _anomaly_id(admin, "beta"), _anomaly_id(admin, "gamma"))


def _actions(actor: Actor) -> list[Action]:
    with org_session(actor.org_id) as session:
        return list(session.scalars(select(Action).order_by(Action.id)))


def _status(actor: Actor, anomaly_id: int) -> str:
    with org_session(actor.org_id) as session:
        return session.get(Anomaly, anomaly_id).status  # type: ignore[union-attr]


def _audit(actor: Actor, action: str) -> list[AuditEntry]:
    with org_session(actor.org_id) as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.action == action)))


def test_preview_names_customer_lines_and_total_without_calling_stripe(world: World) -> None:
    preview = recovery.preview_invoice(world.analyst, world.leak)
    assert (preview.customer, preview.account_id, preview.currency, preview.total) == (
        "cus_acme", "acme", "usd", D("50.00"))
    (line,) = preview.lines
    assert line.quantity == D(500) and line.amount == D("50.00")
    assert line.description == "api: 500 additional units used 2026-01-01 to 2026-01-31, not included in earlier " \
                               "invoices"  # what the customer reads: no internal ids (they are in the metadata)
    assert world.fake.requests == [] and _actions(world.admin) == []


def test_double_click_makes_one_draft_invoice_and_one_audit_entry(world: World) -> None:
    first = recovery.draft_invoice(world.analyst, world.leak)
    second = recovery.draft_invoice(world.analyst, world.leak)
    assert (first.status, first.kind, first.amount, first.currency, first.replayed) == (
        "succeeded", "draft_invoice", D("50.00"), "usd", False)
    assert second.replayed and (second.action_id, second.external_id) == (first.action_id, first.external_id)
    assert first.url and first.url.endswith(f"/test/invoices/{first.external_id}")
    (invoice,) = world.fake.draft_invoices()
    assert invoice["id"] == first.external_id and invoice["customer"] == "cus_acme"
    assert invoice["total"] == 5000 and invoice["auto_advance"] is False
    assert invoice["metadata"]["rrc_anomaly_id"] == str(world.leak)
    assert [line["amount"] for line in invoice["lines"]["data"]] == [5000]
    assert world.fake.count("POST", "/v1/invoices") == 1
    assert _status(world.admin, world.leak) == "actioned"
    (action,) = _actions(world.admin)
    assert (action.status, action.external_id, action.kind) == ("succeeded", first.external_id, "draft_invoice")
    (entry,) = _audit(world.admin, "draft_invoice.created")
    assert entry.actor == world.analyst.label
    assert entry.details["external_id"] == first.external_id and D(entry.details["amount"]) == D("50.00")
    assert entry.details["currency"] == "usd" and entry.details["customer"] == "cus_acme"
    with org_session(world.admin.org_id) as session:
        assert audit.verify(session, world.admin.org_id).ok


def test_twenty_concurrent_requests_make_one_invoice_and_one_action(world: World) -> None:
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: recovery.draft_invoice(world.analyst, world.leak), range(20)))
    assert len({r.external_id for r in results}) == 1 and len({r.action_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert len(world.fake.draft_invoices()) == 1 and world.fake.count("POST", "/v1/invoices") == 1
    assert len(world.fake.invoiceitems) == 1 and len(_actions(world.admin)) == 1
    assert len(_audit(world.admin, "draft_invoice.created")) == 1


@pytest.mark.slow
def test_retry_after_a_timeout_finds_the_invoice_stripe_already_created(world: World) -> None:
    integrations.connect(world.admin, "stripe", {**world.config, "timeout": 0.5})
    world.fake.delay_next(1, 1.5, path_contains="/v1/invoices", method="POST")
    with pytest.raises(ActionFailed, match="Could not reach Stripe") as info:
        recovery.draft_invoice(world.analyst, world.leak)
    assert info.value.retryable
    (failed,) = _actions(world.admin)
    assert failed.status == "failed" and _status(world.admin, world.leak) == "open"
    wait_for(world.fake.draft_invoices)  # Stripe did it (perhaps after we gave up); we never heard back
    assert len(world.fake.draft_invoices()) == 1
    result = recovery.draft_invoice(world.analyst, world.leak)
    assert result.status == "succeeded" and result.action_id == failed.id
    (invoice,) = world.fake.draft_invoices()
    assert invoice["id"] == result.external_id and invoice["total"] == 5000 and len(world.fake.invoiceitems) == 1
    assert len(_actions(world.admin)) == 1 and _status(world.admin, world.leak) == "actioned"


def test_a_retry_after_stripe_forgot_the_keys_finishes_the_lost_draft(world: World) -> None:
    """Stripe keeps idempotency keys for 24 hours: a retry the next day must finish the draft the
    lost attempt created (no line yet), not create a second invoice."""
    integrations.connect(world.admin, "stripe", {**world.config, "timeout": 0.5})
    world.fake.delay_next(1, 1.5, path_contains="/v1/invoices", method="POST")
    with pytest.raises(ActionFailed, match="Could not reach Stripe"):
        recovery.draft_invoice(world.analyst, world.leak)
    wait_for(world.fake.draft_invoices)
    integrations.connect(world.admin, "stripe", world.config)
    world.fake.idempotency.clear()  # a day later
    result = recovery.draft_invoice(world.analyst, world.leak)
    (invoice,) = world.fake.draft_invoices()
    assert result.status == "succeeded" and result.external_id == invoice["id"]
    assert invoice["total"] == 5000 and len(world.fake.invoiceitems) == 1
    world.fake.idempotency.clear()
    with org_session(world.admin.org_id) as session:  # and a lost answer after the line was added
        session.execute(sa_update(Action).values(status="failed", external_id=None))
    again = recovery.draft_invoice(world.analyst, world.leak)
    assert again.external_id == invoice["id"] and len(world.fake.invoiceitems) == 1
    assert world.fake.invoices[invoice["id"]]["total"] == 5000


def test_refusals_before_stripe_write_nothing_anywhere(world: World) -> None:
    with pytest.raises(InvalidInput, match="over_billing"):
        recovery.draft_invoice(world.analyst, world.over)
    with pytest.raises(InvalidInput, match="no stripe_customer_id"):
        recovery.draft_invoice(world.analyst, world.unmapped)
    with pytest.raises(NotFound):
        recovery.draft_invoice(world.analyst, 999_999)
    with pytest.raises(InvalidInput, match="anomaly_id"):
        recovery.draft_invoice(world.analyst, "1")  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        recovery.draft_invoice(Actor(world.admin.org_id, "viewer", None, "user:99"), world.leak)
    other_org, other_admin = users.create_organization("Other", "other-org", "o@other.example", "O", "password-3")
    with pytest.raises(NotFound):
        recovery.draft_invoice(Actor.user(other_org.id, other_admin.id, "admin"), world.leak)
    set_status(world.analyst, world.leak, "dismissed", "customer churned, not worth chasing")
    with pytest.raises(Conflict, match="dismissed"):
        recovery.draft_invoice(world.analyst, world.leak)
    set_status(world.analyst, world.leak, "open", "worth chasing after all")
    set_status(world.analyst, world.leak, "recovered", "paid by wire transfer")
    with pytest.raises(Conflict, match="recovered"):
        recovery.draft_invoice(world.analyst, world.leak)
    assert world.fake.requests == [] and _actions(world.admin) == []
    assert _audit(world.admin, "draft_invoice.failed") == []


def test_settings_check_of_the_stripe_integration_uses_the_connector(world: World) -> None:
    assert integrations.test_connection(world.admin, "stripe").ok
    integrations.connect(world.admin, "stripe", {**world.config, "api_key": "sk_test_revoked_key_00009999"})
    result = integrations.test_connection(world.admin, "stripe")
    assert not result.ok and "rejected the API key" in result.message and "9999" not in result.message
    (view,) = integrations.list_integrations(world.analyst)
    assert view.status == "error" and view.status_message == result.message


def test_no_stripe_integration_is_a_clear_not_found(world: World) -> None:
    integrations.disconnect(world.admin, "stripe")
    with pytest.raises(NotFound, match="connect Stripe in Settings"):
        recovery.draft_invoice(world.analyst, world.leak)
    assert _actions(world.admin) == [] and world.fake.requests == []


@pytest.mark.parametrize("failure", ["declined_key", "archived_price", "stripe_down", "deleted_customer"])
def test_stripe_failures_leave_no_invoice_and_a_retry_reuses_the_action(world: World, failure: str) -> None:
    expected = {"declined_key": "rejected the API key", "archived_price": "p_api is archived",
                "stripe_down": "Stripe failed", "deleted_customer": "No such customer"}[failure]
    if failure == "declined_key":
        integrations.connect(world.admin, "stripe", {**world.config, "api_key": "sk_test_revoked_key_00009999"})
    elif failure == "archived_price":
        world.fake.prices["p_api"]["active"] = False
    elif failure == "stripe_down":
        world.fake.fail_next(3, 503)
    else:
        customer = world.fake.customers.pop("cus_acme")
    with pytest.raises(ActionFailed, match=expected) as info:
        recovery.draft_invoice(world.analyst, world.leak)
    assert info.value.retryable == (failure == "stripe_down")
    assert "00009999" not in str(info.value)
    assert world.fake.draft_invoices() == [] and world.fake.invoiceitems == {}
    (failed,) = _actions(world.admin)
    assert failed.status == "failed" and expected in (failed.error or "")
    assert _status(world.admin, world.leak) == "open" and _audit(world.admin, "draft_invoice.created") == []
    assert len(_audit(world.admin, "draft_invoice.failed")) == 1
    integrations.connect(world.admin, "stripe", world.config)  # fix whatever was wrong, then retry
    world.fake.prices["p_api"]["active"] = True
    world.fake.faults.clear()
    if failure == "deleted_customer":
        world.fake.customers["cus_acme"] = customer
    result = recovery.draft_invoice(world.analyst, world.leak)
    assert result.status == "succeeded" and result.action_id == failed.id and not result.replayed
    assert len(world.fake.draft_invoices()) == 1 and len(_actions(world.admin)) == 1


def test_a_changed_amount_never_drafts_a_second_invoice_for_the_same_gap(world: World) -> None:
    first = recovery.draft_invoice(world.admin, world.leak)
    with org_session(world.admin.org_id) as session:
        session.get(Anomaly, world.leak).leak_amount = D("75.00")  # type: ignore[union-attr]
    with pytest.raises(Conflict, match=first.external_id or "?"):
        recovery.draft_invoice(world.admin, world.leak)
    with pytest.raises(Conflict, match="adjust that draft"):
        recovery.preview_invoice(world.admin, world.leak)
    assert len(world.fake.draft_invoices()) == 1 and len(_actions(world.admin)) == 1


def test_a_lost_answer_then_a_changed_amount_still_makes_one_invoice(world: World) -> None:
    """Stripe created the draft but the answer never came back; a re-run then changed the gap, so
    the retry's idempotency keys differ: the draft must be found in Stripe, not made again."""
    integrations.connect(world.admin, "stripe", {**world.config, "timeout": 0.5})
    world.fake.delay_next(1, 1.5, path_contains="/v1/invoices", method="POST")
    with pytest.raises(ActionFailed, match="Could not reach Stripe"):
        recovery.draft_invoice(world.analyst, world.leak)
    wait_for(world.fake.draft_invoices)
    (lost,) = world.fake.draft_invoices()
    integrations.connect(world.admin, "stripe", world.config)
    with org_session(world.admin.org_id) as session:
        session.get(Anomaly, world.leak).leak_amount = D("55.00")  # type: ignore[union-attr]
    with pytest.raises(Conflict, match=f"already has draft invoice {lost['id']} for 50.00 USD.*now 55.00 USD"):
        recovery.draft_invoice(world.analyst, world.leak)
    assert len(world.fake.draft_invoices()) == 1
    (action,) = _actions(world.admin)
    assert (action.status, action.external_id, action.amount) == ("succeeded", lost["id"], D("50.00"))
    assert _status(world.admin, world.leak) == "actioned" and len(_audit(world.admin, "draft_invoice.found")) == 1
    with pytest.raises(Conflict, match=lost["id"]):  # and so on, every time
        recovery.draft_invoice(world.analyst, world.leak)
    assert len(world.fake.draft_invoices()) == 1


def test_idempotency_key_depends_on_org_gap_and_amount() -> None:
    base = recovery.idempotency_key(1, "f" * 64, D("50.00"), "usd")
    assert base == recovery.idempotency_key(1, "f" * 64, D("50.000"), "USD")
    assert len({base, recovery.idempotency_key(2, "f" * 64, D("50.00"), "usd"),
                recovery.idempotency_key(1, "e" * 64, D("50.00"), "usd"),
                recovery.idempotency_key(1, "f" * 64, D("50.01"), "usd")}) == 4
