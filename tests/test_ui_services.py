"""What the app's pages need from the services, on SQLite and PostgreSQL against the demo organization:
the Overview's confidence chart told apart by type group, the queue's sort within each currency, an
anomaly's history in people's names, the queue's export for people, a schedule switched off, and the
draft invoice's customer-facing line (the same text in the preview and in Stripe)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from core.bundle import load_bundle
from db.models import Action, Anomaly, AuditEntry
from db.session import org_session
from services import anomalies, dashboard, demo, integrations, recovery, settings, users
from services.anomalies import LEAK_TYPES, AnomalyFilters
from services.context import Actor
from tests.fakes.stripe_server import FakeStripe, serve

pytestmark = pytest.mark.slow  # each test seeds the demo organization (a reconciliation) first


@pytest.fixture
def demo_org(app_db: str, tmp_path: Path) -> tuple[Actor, Actor, Path]:
    bundle = tmp_path / "bundle"
    org = demo.seed_demo(bundle)  # what a first start seeds: 60 accounts, USD and EUR
    analyst = users.get_user_by_email(demo.DEMO_ANALYST[0])
    admin = users.get_user_by_email(demo.DEMO_ADMIN[0])
    assert analyst is not None and admin is not None
    return Actor.user(org.id, admin.id, "admin"), Actor.user(org.id, analyst.id, "analyst"), bundle


def everything(actor: Actor, filters: AnomalyFilters = AnomalyFilters(),
               **options: object) -> list[anomalies.AnomalyRow]:
    page = anomalies.list_anomalies(actor, filters, page_size=500, **options)  # type: ignore[arg-type]
    assert page.total == len(page.rows)
    return page.rows


def test_the_confidence_chart_tells_leaks_from_over_billing(demo_org: tuple[Actor, Actor, Path]) -> None:
    _, analyst, _ = demo_org
    default = AnomalyFilters(statuses=("open", "actioned"))
    shown = everything(analyst, default)
    summary = dashboard.summary(analyst, default)
    leaks = sum(1 for row in shown if row.type in LEAK_TYPES)
    assert 0 < leaks < len(shown)  # the demo has both
    assert sum(bucket["leak"] for bucket in summary.confidence) == leaks
    assert sum(bucket["over_billing"] for bucket in summary.confidence) == len(shown) - leaks
    assert all(bucket["count"] == bucket["leak"] + bucket["over_billing"] for bucket in summary.confidence)
    # the leak part counts what the leak charts count
    assert sum(bucket["leak"] for bucket in summary.confidence) == sum(row["count"] for row in summary.by_type)


def test_sorting_by_amount_within_each_currency(demo_org: tuple[Actor, Actor, Path]) -> None:
    _, analyst, _ = demo_org
    rows = everything(analyst, sort="amount_in_currency")
    assert len({row.currency for row in rows}) > 1  # the demo has USD and EUR
    assert [(row.currency, -row.amount) for row in rows] == sorted((row.currency, -row.amount) for row in rows)
    ascending = everything(analyst, sort="amount_in_currency", descending=False)
    assert [(row.currency, row.amount) for row in ascending] == sorted((row.currency, row.amount) for row in ascending)
    paged = [row.id for number in (1, 2, 3, 4) for row in anomalies.list_anomalies(
        analyst, AnomalyFilters(), page=number, page_size=len(rows) // 3 + 1, sort="amount_in_currency").rows]
    assert paged == [row.id for row in rows]


def test_history_names_people_says_what_happened_and_when_it_was_found(demo_org: tuple[Actor, Actor, Path]) -> None:
    admin, analyst, _ = demo_org
    first, second = everything(analyst, AnomalyFilters(types=LEAK_TYPES, statuses=("open",)))[:2]
    fresh = anomalies.get_anomaly(analyst, second.id)
    assert fresh.history == [] and fresh.found_at is not None and fresh.found_by_run is not None
    anomalies.set_status(analyst, first.id, "dismissed", "Free pilot until December")
    anomalies.set_status(admin, first.id, "open")
    detail = anomalies.add_note(analyst, first.id, "Called their finance team")
    analyst_name = f"{demo.DEMO_ANALYST[1]} ({demo.DEMO_ANALYST[0]})"
    assert [(h["who"], h["action"]) for h in detail.history] == [
        (analyst_name, "anomaly.dismissed"), (f"{demo.DEMO_ADMIN[1]} ({demo.DEMO_ADMIN[0]})", "anomaly.open"),
        (analyst_name, "anomaly.note_added")]
    assert detail.history[0]["details"]["reason"] == "Free pilot until December"
    assert detail.history[0]["actor"] == f"user:{analyst.user_id}"  # the stored label stays as it is
    assert detail.notes[-1]["who"] == analyst_name and detail.notes[-1]["by"] == f"user:{analyst.user_id}"


def test_the_queue_export_for_people_matches_the_screen(demo_org: tuple[Actor, Actor, Path]) -> None:
    _, analyst, _ = demo_org
    rows = {row.id: row for row in everything(analyst)}
    data, name = anomalies.export_anomalies(analyst, AnomalyFilters(), "csv", for_people=True)
    exported = list(csv.DictReader(io.StringIO(data.decode())))
    assert name == "anomalies.csv" and len(exported) == len(rows)
    assert "period_end" not in exported[0] and "period_last_day" in exported[0]
    for line in exported:
        row = rows[int(line["id"])]
        places = 0 if row.currency == "jpy" else 2
        for column in ("amount", "expected_amount", "billed_amount"):
            assert Decimal(line[column]) == getattr(row, column)
            assert len(line[column].partition(".")[2]) >= places, line[column]
        assert line["period_start"] == f"{row.period_start:%Y-%m-%d}"
        assert line["period_last_day"] == f"{row.period_end - timedelta(days=1):%Y-%m-%d}"  # as the queue shows
    raw = list(csv.DictReader(io.StringIO(anomalies.export_anomalies(analyst, AnomalyFilters())[0].decode())))
    assert raw[0]["period_end"].endswith("+00:00")  # the machine's convention is unchanged: half-open instants


def test_a_schedule_switched_off_keeps_no_expression(demo_org: tuple[Actor, Actor, Path]) -> None:
    admin, _, _ = demo_org
    settings.update_schedule(admin, "cron", "0 6 * * *", "UTC")
    saved = settings.update_schedule(admin, "off", "* * * * *", "UTC")  # refused when on; ignored when off
    assert (saved.schedule_kind, saved.schedule_expr) == ("off", None)
    with org_session(admin.org_id) as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "settings.schedule_changed")
                                .order_by(AuditEntry.seq.desc())).first()
        assert entry is not None and entry.details == {"kind": "off", "expr": None, "timezone": "UTC"}


def test_the_invoice_line_names_the_product_and_stripe_gets_the_same_text(
        demo_org: tuple[Actor, Actor, Path]) -> None:
    admin, analyst, bundle = demo_org
    products = load_bundle(bundle).products
    unbilled = everything(analyst, AnomalyFilters(types=("unbilled_usage",), statuses=("open",)))
    leak = max((row for row in unbilled if row.leak_units == 0), key=lambda row: row.actual_units)
    preview = recovery.preview_invoice(analyst, leak.id)
    (line,) = preview.lines
    used = f"{leak.actual_units.normalize():,f}"
    last_day = (leak.period_end - timedelta(days=1)).date()
    name = products[leak.product_key].name
    assert name.casefold() == leak.product_key.replace("_", " ")  # "Data export": no "(data_export)" after it
    assert line.description == f"{name}: {used} units used {leak.period_start:%Y-%m-%d} to {last_day}"
    assert "," in used and used in line.description  # thousands separators, as in the Quantity column
    fake = FakeStripe()
    fake.seed_from_bundle(load_bundle(bundle))
    with serve(fake) as base:
        integrations.connect(admin, "stripe", {"api_key": next(iter(fake.api_keys)), "api_base": base})
        result = recovery.draft_invoice(analyst, leak.id)
        items = [item for item in fake.invoiceitems.values() if item.get("invoice") == result.external_id]
    assert [item["description"] for item in items] == [line.description]


def test_a_retry_sends_stripe_the_line_it_sent_before(demo_org: tuple[Actor, Actor, Path]) -> None:
    """Under one Idempotency-Key Stripe must get the same request: a product renamed between a failed attempt and
    its retry must not change the line's text."""
    _, analyst, _ = demo_org
    leak = everything(analyst, AnomalyFilters(types=("unbilled_usage",), statuses=("open",)))[0]
    with org_session(analyst.org_id) as session:
        anomaly = session.get(Anomaly, leak.id)
        assert anomaly is not None
        key = recovery.idempotency_key(analyst.org_id, anomaly.fingerprint, Decimal(anomaly.leak_amount),
                                       anomaly.currency)
        session.add(Action(org_id=analyst.org_id, anomaly_id=leak.id, kind="draft_invoice", status="failed",
                           idempotency_key=key, amount=leak.amount, currency=leak.currency,
                           request={"lines": [{"description": "Old name: 1 unit used", "quantity": "1"}]},
                           created_by=analyst.user_id))
    assert [line.description for line in recovery.preview_invoice(analyst, leak.id).lines] == ["Old name: 1 unit used"]


@pytest.mark.parametrize(("name", "shown"), [("API calls", "API calls (api)"), ("Api", "Api"), (" ", "api"),
                                             (None, "api")])
def test_the_line_names_the_product_and_its_key_when_the_name_does_not_say_it(name: str | None, shown: str) -> None:
    gap = Anomaly(type="under_reported_usage", product_key="api", actual_units=Decimal(12500),
                  leak_units=Decimal("2500.5"), period_start=datetime(2026, 1, 1, tzinfo=UTC),
                  period_end=datetime(2026, 2, 1, tzinfo=UTC))
    text, quantity = recovery._line_text(gap, name)
    assert text == (f"{shown}: 2,500.5 additional units used 2026-01-01 to 2026-01-31, not included in earlier "
                    "invoices") and quantity == Decimal("2500.5")
