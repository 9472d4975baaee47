"""sync: fake Stripe + SQL + S3 Parquet (moto) -> the org's bundle -> reconciliation, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from core.bundle import load_bundle
from core.reconcile import ReconcileParams, reconcile
from db.models import Account, Anomaly, AuditEntry
from db.session import org_session
from services import anomalies, audit, integrations, reconciliation, recovery, settings, sync
from services.actions_common import ActionFailed
from services.anomalies import AnomalyFilters
from services.context import Actor
from services.errors import InvalidInput, NotFound, PermissionDenied
from tests.bundles import FEB, JAN, MAR, Scenario
from tests.fakes.serving import wait_for
from tests.fakes.stripe_server import DEFAULT_KEY, FakeStripe, serve
from tests.test_s3_parquet import KEYS, SERVER_KEYS, s3_client, start_moto

pytestmark = pytest.mark.slow  # a fresh migrated database, a fake Stripe and moto per test (~2-4 s)
AS_OF = datetime(2026, 4, 15, tzinfo=UTC)  # window: January 1 to April 16, 2026
COLUMNS = {"account_id": "account", "product_key": "product", "ts": "ts", "units": "units", "event_id": "id"}
# Actual usage: acme under-reported in January (1500 used, 1000 reported), beta used the API in March
# without any subscription, gamma is not a Stripe customer at all.
SQL_EVENTS = [
    ("e1", "acme", "api", datetime(2026, 1, 10, 10), D("1000")),
    ("e2", "acme", "api", datetime(2026, 1, 20, 10), D("500")),
    ("e3", "acme", "api", datetime(2026, 2, 10, 10), D("2000")),
    ("e4", "gamma", "api", datetime(2026, 3, 2, 10), D("15")),
    ("e0", "acme", "api", datetime(2025, 12, 31, 23), D("999")),  # before the window: not read
]
S3_EVENTS = [("s1", "beta", "api", datetime(2026, 3, 5, 10, tzinfo=UTC), D("300"))]


def _scenario() -> Scenario:
    scenario = Scenario()
    scenario.sub("acme", "api", "p_api", JAN, FEB).sub("acme", "api", "p_api", FEB, MAR)
    scenario.invoice("acme", "api", "1000", "100.00", JAN, FEB).invoice("acme", "api", "2000", "200.00", FEB, MAR)
    scenario.use("acme", "api", "2026-01-10T10:00:00Z", "1000")
    scenario.use("acme", "api", "2026-02-10T10:00:00Z", "2000")
    return scenario


@pytest.fixture(autouse=True)
def product_files_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The product databases synced here are SQLite files under tmp_path: allow that folder, as an operator
    does with RRC_SQL_SOURCE_FILE_DIRS (the app's data folder, tmp_path/data, stays refused all the same)."""
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(tmp_path))


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "recording.jsonl")
    yield endpoint
    server.stop()


@pytest.fixture
def fake_stripe(tmp_path: Path) -> Iterator[tuple[FakeStripe, str, Path]]:
    folder = _scenario().write(tmp_path / "scenario")
    fake = FakeStripe()
    fake.seed_from_bundle(load_bundle(folder))
    with serve(fake) as url:
        yield fake, url, folder


def _product_db(path: Path, events: list[tuple[Any, ...]]) -> str:
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    table = sa.Table("events", sa.MetaData(), sa.Column("id", sa.String), sa.Column("account", sa.String),
                     sa.Column("product", sa.String), sa.Column("ts", sa.DateTime), sa.Column("units", sa.Numeric))
    with engine.begin() as conn:
        table.create(conn, checkfirst=True)
        conn.execute(table.insert(), [dict(zip(("id", "account", "product", "ts", "units"), e, strict=True))
                                      for e in events])
    engine.dispose()
    return url


def _s3_usage(endpoint: str, bucket: str) -> dict[str, Any]:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    table = pa.table({"id": [e[0] for e in S3_EVENTS], "account": [e[1] for e in S3_EVENTS],
                      "product": [e[2] for e in S3_EVENTS],
                      "ts": pa.array([e[3] for e in S3_EVENTS], pa.timestamp("us", tz="UTC")),
                      "units": pa.array([e[4] for e in S3_EVENTS], pa.decimal128(18, 6))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    client.put_object(Bucket=bucket, Key="usage/dt=2026-03-05/part-0.parquet", Body=sink.getvalue())
    return {"bucket": bucket, "prefix": "usage", "region": "us-east-1", "endpoint_url": endpoint,
            "access_key_id": KEYS["aws_access_key_id"], "secret_access_key": KEYS["aws_secret_access_key"],
            "hive_partitioned": True, "columns": COLUMNS}



@pytest.fixture
def connected(org: tuple[Actor, Actor], fake_stripe: tuple[FakeStripe, str, Path], moto_endpoint: str,
              tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Stripe, a SQL source and an S3 Parquet source connected for the org."""
    admin, analyst = org
    _, url, folder = fake_stripe
    integrations.connect(admin, "stripe", {"api_key": DEFAULT_KEY, "api_base": url})
    db_url = _product_db(tmp_path / "product.db", SQL_EVENTS)
    integrations.connect(admin, "sql_source", {"url": db_url, "table": "events", "columns": COLUMNS})
    bucket = f"sync-{abs(hash(request.node.name)) % 10**8}"
    integrations.connect(admin, "s3_parquet", _s3_usage(moto_endpoint, bucket))
    return {"admin": admin, "analyst": analyst, "db_url": db_url, "scenario": folder, "fake": fake_stripe[0]}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _last_audit(actor: Actor) -> AuditEntry:
    with org_session(actor.org_id) as session:
        entry = session.query(AuditEntry).where(AuditEntry.org_id == actor.org_id) \
            .order_by(AuditEntry.seq.desc()).first()
    assert entry is not None
    return entry


def test_sync_then_reconcile_finds_the_leaks(connected: dict[str, Any]) -> None:
    analyst: Actor = connected["analyst"]
    report = sync.sync(analyst, as_of=AS_OF)  # an analyst may sync
    assert report.window_start == datetime(2026, 1, 1, tzinfo=UTC)
    assert report.window_end == datetime(2026, 4, 16, tzinfo=UTC)
    by_source = {s.source: s for s in report.sources}
    assert set(by_source) == {"stripe", "sql_source", "s3_parquet"}
    assert by_source["sql_source"].counts == {"buckets": 4, "accounts": 2, "days": 4}
    assert by_source["s3_parquet"].counts["buckets"] == 1 and by_source["s3_parquet"].role == "actual"
    assert by_source["stripe"].counts["invoice_lines"] == 2
    assert all(s.seconds >= 0 for s in report.sources)
    assert any("'gamma'" in w for w in report.warnings)

    folder = Path(report.bundle_path)
    assert folder == sync.bundle_dir(analyst.org_id) and (folder / "actual_usage.parquet").exists()
    bundle = load_bundle(folder)
    assert set(bundle.accounts) == {"acme", "beta", "gamma"}
    assert bundle.accounts["gamma"].stripe_customer_id is None
    assert report.counts["actual_buckets"] == 5 and report.counts["invoice_lines"] == 2
    assert settings.get_settings(analyst).data_source == {"kind": "bundle", "path": str(folder)}
    entry = _last_audit(analyst)
    assert entry.action == "sync.completed" and entry.actor == analyst.label
    assert {s["source"] for s in entry.details["sources"]} == {"stripe", "sql_source", "s3_parquet"}
    assert DEFAULT_KEY not in str(entry.details) and KEYS["aws_secret_access_key"] not in str(entry.details)
    assert all(view.last_synced_at is not None for view in integrations.list_integrations(analyst))

    run = reconciliation.run_reconciliation(analyst)
    assert run.status == "succeeded", run.error
    with org_session(analyst.org_id) as session:
        found = {(a.account_id, a.type, a.period_start.month): a.leak_amount
                 for a in session.query(Anomaly).where(Anomaly.org_id == analyst.org_id)}
    assert found[("acme", "under_reported_usage", 1)] == D("50.00")
    assert found[("beta", "unbilled_usage", 3)] == D("30.00")
    assert ("acme", "under_reported_usage", 2) not in found


def test_bad_source_data_leaves_the_previous_bundle_intact(connected: dict[str, Any]) -> None:
    admin: Actor = connected["admin"]
    first = sync.sync(admin, as_of=AS_OF)
    before = _fingerprint(Path(first.bundle_path))
    _product_db(Path(sa.make_url(connected["db_url"]).database or ""),
                [("e9", "acme", "api", datetime(2026, 2, 11, 9), D("-40"))])
    with pytest.raises(sync.SyncFailed, match=r"SQL usage source: negative units \(-40\).*'acme'.*2026-02-11"):
        sync.sync(admin, as_of=AS_OF)
    assert _fingerprint(Path(first.bundle_path)) == before
    assert not [p for p in Path(first.bundle_path).parent.iterdir() if p.name.startswith(".bundle")]
    entry = _last_audit(admin)
    assert entry.action == "sync.failed" and "negative units" in entry.details["error"]


def test_unknown_product_is_refused_with_the_product_named(connected: dict[str, Any], tmp_path: Path) -> None:
    admin: Actor = connected["admin"]
    _product_db(Path(sa.make_url(connected["db_url"]).database or ""),
                [("e9", "acme", "storage_gb", datetime(2026, 2, 11, 9), D("4"))])
    with pytest.raises(sync.SyncFailed, match="product_key 'storage_gb' that Stripe does not know"):
        sync.sync(admin, as_of=AS_OF)
    assert not sync.bundle_dir(admin.org_id).exists()


@pytest.mark.parametrize("column", ["account_id", "product_key"])
def test_a_usage_id_longer_than_the_database_holds_is_refused_naming_the_source(connected: dict[str, Any],
                                                                                column: str) -> None:
    admin: Actor = connected["admin"]
    event = {"account_id": "acme", "product_key": "api", column: "x" * 201}
    _product_db(Path(sa.make_url(connected["db_url"]).database or ""),
                [("e9", event["account_id"], event["product_key"], datetime(2026, 2, 11, 9), D("4"))])
    shown = "x" * 40 + "… (201 characters)"
    with pytest.raises(sync.SyncFailed) as refused:
        sync.sync(admin, as_of=AS_OF)
    assert str(refused.value) == (f"SQL usage source: 1 daily bucket(s) whose {column} is not an identifier of at "
                                  f"most 200 characters (e.g. {shown!r}): check the column mapped as columns.{column}")
    assert not sync.bundle_dir(admin.org_id).exists()


def test_a_long_stripe_customer_name_is_kept_whole_and_a_long_metadata_id_is_refused(
        org: tuple[Actor, Actor], fake_stripe: tuple[FakeStripe, str, Path]) -> None:
    admin, _ = org
    fake, url, _ = fake_stripe
    integrations.connect(admin, "stripe", {"api_key": DEFAULT_KEY, "api_base": url})
    name = "Delta" + " Worldwide Holdings" * 16  # 309 characters: more than accounts.name held before 0011
    fake.add_customer("cus_delta", name=name, metadata={"account_id": "delta"})
    first = sync.sync(admin, as_of=AS_OF)
    assert load_bundle(first.bundle_path).accounts["delta"].name == name
    run = reconciliation.run_reconciliation(admin)
    assert run.status == "succeeded", run.error
    with org_session(admin.org_id) as session:
        assert session.scalars(sa.select(Account.name).where(Account.account_id == "delta")).one() == name

    before = _fingerprint(Path(first.bundle_path))
    fake.add_customer("cus_long", name="Long", metadata={"account_id": "x" * 201}, created=fake.now() + 60)
    shown = "x" * 40 + "… (201 characters)"
    with pytest.raises(sync.SyncFailed, match=re.escape(f"column 'account_id': got {shown!r}; expected an identifier "
                                                        "of at most 200 characters")):
        sync.sync(admin, as_of=AS_OF)
    assert _fingerprint(Path(first.bundle_path)) == before


def test_second_sync_is_incremental_and_keeps_earlier_data(connected: dict[str, Any]) -> None:
    admin: Actor = connected["admin"]
    first = sync.sync(admin, as_of=AS_OF)
    assert not first.incremental
    fake: FakeStripe = connected["fake"]
    fake.add_customer("cus_delta", name="Delta", metadata={"account_id": "delta"}, created=fake.now() + 60)
    second = sync.sync(admin, as_of=AS_OF)
    assert second.incremental
    stripe_counts = next(s for s in second.sources if s.source == "stripe").counts
    assert stripe_counts["accounts"] == 1 and stripe_counts["invoice_lines"] == 0  # only what is new
    bundle = load_bundle(second.bundle_path)
    assert {"acme", "beta", "delta"} <= set(bundle.accounts) and len(bundle.invoice_lines) == 2
    assert second.counts["reported_buckets"] == first.counts["reported_buckets"]
    full = sync.sync(admin, as_of=AS_OF, full=True)
    assert not full.incremental and full.counts == second.counts


def test_without_stripe_a_base_bundle_supplies_billing(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    admin, _ = org
    with pytest.raises(NotFound, match="No Stripe integration — connect Stripe in Settings"):
        sync.sync(admin, as_of=AS_OF)
    folder = _scenario().write(tmp_path / "base")
    seat_readings = [("s1", "acme", "seats", datetime(2026, 2, 3, 9), D("5")),
                     ("s2", "acme", "seats", datetime(2026, 2, 3, 15), D("7"))]  # two snapshots of one day
    integrations.connect(admin, "sql_source", {"url": _product_db(tmp_path / "p.db", SQL_EVENTS[:3] + seat_readings),
                                               "table": "events", "columns": COLUMNS})
    report = sync.sync(admin, as_of=AS_OF, base_bundle=folder)
    assert [s.source for s in report.sources] == ["base_bundle", "sql_source"]
    bundle = load_bundle(report.bundle_path)
    assert set(bundle.accounts) == {"acme", "beta"} and len(bundle.subscriptions) == 2
    assert report.counts["actual_buckets"] == 4 and report.counts["reported_buckets"] == 2
    seats = [r for r in pq.read_table(Path(report.bundle_path) / "actual_usage.parquet").to_pylist()
             if r["product_key"] == "seats"]
    assert [(r["ts"].day, r["units"].normalize()) for r in seats] == [(3, D(7))]  # the day's maximum, not 12


def test_a_day_split_by_an_anniversary_boundary_keeps_each_side_in_its_period(org: tuple[Actor, Actor],
                                                                            tmp_path: Path) -> None:
    """Periods from the 14th at 09:30:15 (anniversary billing): the 14th's usage before and after
    the boundary stays in two buckets, so the synced bundle reconciles like the base bundle (all
    billed right: no anomaly). One daily bucket would have put both in the earlier period: a
    missed overage there and an over-billing in the next one."""
    admin, _ = org
    jan14, feb14, mar14 = "2026-01-14T09:30:15Z", "2026-02-14T09:30:15Z", "2026-03-14T09:30:15Z"
    scenario = Scenario().sub("acme", "api", "p_api", jan14, feb14).sub("acme", "api", "p_api", feb14, mar14)
    scenario.use("acme", "api", "2026-01-20T10:00:00Z", "1000").use("acme", "api", "2026-02-14T08:00:00Z", "100")
    scenario.use("acme", "api", "2026-02-14T11:00:00Z", "50").use("acme", "api", "2026-02-20T10:00:00Z", "1000")
    scenario.invoice("acme", "api", "1100", "110.00", jan14, feb14).invoice("acme", "api", "1050", "105.00", feb14,
                                                                             mar14)
    assert scenario.run(tmp_path).anomalies == []
    report = sync.sync(admin, as_of=AS_OF, base_bundle=scenario.write(tmp_path / "base"))
    synced = reconcile(load_bundle(report.bundle_path), ReconcileParams(as_of=AS_OF))
    assert synced.anomalies == []
    buckets = pq.read_table(Path(report.bundle_path) / "actual_usage.parquet").sort_by("ts").to_pylist()
    assert [(r["ts"].isoformat(), r["units"].normalize()) for r in buckets] == [
        ("2026-01-20T00:00:00+00:00", D(1000)), ("2026-02-14T00:00:00+00:00", D(100)),
        ("2026-02-14T09:30:15+00:00", D(50)), ("2026-02-20T00:00:00+00:00", D(1000))]


def test_bad_arguments_and_roles(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    admin, _ = org
    for kwargs, field in (({"months": 0}, "months"), ({"months": "3"}, "months"),
                          ({"as_of": datetime(2026, 4, 1)}, "as_of"), ({"base_bundle": tmp_path / "nope"},
                                                                       "base_bundle")):
        with pytest.raises(InvalidInput, match=f"^{field}"):
            sync.sync(admin, **kwargs)
    with pytest.raises(PermissionDenied):
        sync.sync(Actor(admin.org_id, "viewer", None, "user:x"))


def test_reported_side_source_replaces_stripe_usage_and_ingested_events_count(org: tuple[Actor, Actor],
                                                                              tmp_path: Path) -> None:
    from services import ingest

    admin, _ = org
    folder = _scenario().write(tmp_path / "base")
    integrations.connect(admin, "sql_source", {"url": _product_db(tmp_path / "p.db", SQL_EVENTS[:3]),
                                               "table": "events", "columns": COLUMNS, "side": "reported"})
    ingest.ingest(Actor.system(admin.org_id, "api"), ingest.parse_events([
        {"event_id": "i1", "account_id": "acme", "product_key": "api", "ts": "2026-01-10T10:00:00Z", "units": "1500"},
        {"event_id": "i2", "account_id": "beta", "product_key": "api", "ts": "2026-03-05T10:00:00Z", "units": "7"},
    ]))
    report = sync.sync(admin, as_of=AS_OF, base_bundle=folder)
    roles = {s.source: s.role for s in report.sources}
    assert roles == {"base_bundle": "billing", "sql_source": "reported", "ingest": "actual"}
    assert any("side=reported" in w for w in report.warnings)
    assert report.counts["actual_buckets"] == 2 and report.counts["reported_buckets"] == 3


def test_a_source_saved_before_the_policy_is_refused_at_sync(org: tuple[Actor, Actor], app_db: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQL source pointing at the app's own database (saved before the policy existed) is never read:
    the sync fails naming the url field, and no other org's usage reaches this org's bundle."""
    admin, _ = org
    with monkeypatch.context() as before_the_policy:
        before_the_policy.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(admin, "sql_source", {"url": app_db, "table": "usage_events", "columns": {
            "account_id": "account_id", "product_key": "product_key", "ts": "ts", "units": "units"}})
    with pytest.raises(sync.SyncFailed, match=r"^SQL usage source: url: .*cannot be a usage source"):
        sync.sync(admin, as_of=AS_OF, base_bundle=_scenario().write(tmp_path / "base"))
    assert not sync.bundle_dir(admin.org_id).exists()
    assert _last_audit(admin).action == "sync.failed"


def _keyless_s3_usage(endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An S3 source without keys, on a server whose own AWS credentials (the environment) reach the bucket."""
    config = _s3_usage(endpoint, bucket)
    del config["access_key_id"], config["secret_access_key"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SERVER_KEYS["AWS_ACCESS_KEY_ID"])  # see tests/test_exports.py
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SERVER_KEYS["AWS_SECRET_ACCESS_KEY"])
    return config


def test_a_keyless_s3_source_saved_before_the_rule_is_refused_at_sync(org: tuple[Actor, Actor], moto_endpoint: str,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's credentials could read the bucket, but an org's S3 source never borrows them: the sync fails
    naming access_key_id, and nothing read through them reaches the org's bundle."""
    admin, _ = org
    monkeypatch.delenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", raising=False)
    config = _keyless_s3_usage(moto_endpoint, "keyless-before-the-rule", monkeypatch)
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(admin, "s3_parquet", config)
    with pytest.raises(sync.SyncFailed, match=r"^S3 Parquet usage source: access_key_id: required"):
        sync.sync(admin, as_of=AS_OF, base_bundle=_scenario().write(tmp_path / "base"))
    assert not sync.bundle_dir(admin.org_id).exists()
    assert _last_audit(admin).action == "sync.failed"


def test_a_keyless_s3_source_syncs_when_the_operator_allows_server_credentials(
        org: tuple[Actor, Actor], moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = org
    monkeypatch.setenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", "1")
    integrations.connect(admin, "s3_parquet", _keyless_s3_usage(moto_endpoint, "keyless-allowed", monkeypatch))
    report = sync.sync(admin, as_of=AS_OF, base_bundle=_scenario().write(tmp_path / "base"))
    by_source = {s.source: s for s in report.sources}
    assert by_source["s3_parquet"].counts["buckets"] == 1 and by_source["s3_parquet"].role == "actual"


def test_one_sync_per_org_at_a_time(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    from services.errors import Conflict

    admin, _ = org
    with sync._sync_lock(admin.org_id), pytest.raises(Conflict, match="already running"):
        sync.sync(admin, base_bundle=_scenario().write(tmp_path / "base"))


def test_end_to_end_sync_reconcile_and_one_draft_invoice(connected: dict[str, Any]) -> None:
    """Fake Stripe + SQL source -> sync -> reconcile -> draft invoice: one draft with the right line
    and amount after a timeout and a double submit; the audit chain verifies."""
    admin: Actor = connected["admin"]
    analyst: Actor = connected["analyst"]
    fake: FakeStripe = connected["fake"]
    sync.sync(analyst, as_of=AS_OF)
    assert reconciliation.run_reconciliation(analyst).status == "succeeded"
    leak = next(row for row in anomalies.list_anomalies(analyst, AnomalyFilters(types=("under_reported_usage",))).rows
                if row.account_id == "acme")
    assert leak.amount == D("50.00")

    integrations.connect(admin, "stripe", {"api_key": DEFAULT_KEY, "api_base": integrations.get_config(
        admin, "stripe")["api_base"], "timeout": 0.5, "max_network_retries": 0})
    fake.delay_next(1, 1.5, path_contains="/v1/invoices", method="POST")  # Stripe works, the answer is late
    with pytest.raises(ActionFailed):
        recovery.draft_invoice(analyst, leak.id)
    wait_for(fake.draft_invoices)  # Stripe finishes the late request
    first = recovery.draft_invoice(analyst, leak.id)  # the retry
    second = recovery.draft_invoice(analyst, leak.id)  # a double submit
    assert first.status == "succeeded" and second.replayed and second.external_id == first.external_id

    (invoice,) = fake.draft_invoices()
    items = [item for item in fake.invoiceitems.values() if item.get("invoice") == invoice["id"]]
    assert invoice["id"] == first.external_id and invoice["currency"] == "usd" and invoice["total"] == 5000
    assert len(items) == 1 and items[0]["amount"] == 5000
    assert leak.product_key in items[0]["description"] and items[0]["metadata"]["anomaly_id"] == str(leak.id)
    assert anomalies.get_anomaly(analyst, leak.id).row.status == "actioned"
    with org_session(analyst.org_id) as session:
        assert audit.verify(session, analyst.org_id).ok
