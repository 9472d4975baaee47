"""Audit export on SQLite and PostgreSQL: direct download or S3 (moto server) with a presigned URL."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal as D
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from db.models import Action, Anomaly, AuditEntry
from db.session import org_session
from services import exports, integrations, users
from services.context import Actor
from services.errors import InvalidInput, PermissionDenied
from tests.test_s3_parquet import COLUMNS, KEYS, SERVER_KEYS, s3_client, start_moto

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
pytestmark = pytest.mark.slow  # each test migrates a fresh database and hashes three passwords (~2 s)


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "recording.jsonl")
    yield endpoint
    server.stop()


def _anomaly(org_id: int, n: int, period: tuple[datetime, datetime], leak: D) -> Anomaly:
    return Anomaly(
        org_id=org_id, fingerprint=f"fp-{org_id}-{n}", account_id=f"acct-{org_id}-{n}", product_key="api_calls",
        period_start=period[0], period_end=period[1], type="under_reported_usage", severity="high",
        actual_units=D("1500.5"), reported_units=D("1000"), leak_units=D("500.5"), expected_amount=D("150.05"),
        billed_amount=D("100"), leak_amount=leak, overbilled_amount=D(0), currency="usd", confidence=D("0.875"),
        confidence_factors={"mapping": 1.0}, evidence={"days": [1, 2]}, price_id="price_1", price_source="subscription",
        subscription_id="sub_1", explanation="usage never reached billing", status="open", notes=[],
    )


def _seed(admin: Actor) -> dict[str, Any]:
    """Two anomalies in the export period, one before it; one action in it, one before it."""
    march = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    december = (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))  # ends at START: out
    straddling = (datetime(2025, 12, 15, tzinfo=UTC), datetime(2026, 1, 15, tzinfo=UTC))  # overlaps: in
    with org_session(admin.org_id) as session:
        rows = [_anomaly(admin.org_id, 1, march, D("50.05")), _anomaly(admin.org_id, 2, december, D("7.10")),
                _anomaly(admin.org_id, 3, straddling, D("1234567.891234"))]
        session.add_all(rows)
        session.flush()
        session.add(Action(org_id=admin.org_id, anomaly_id=rows[0].id, kind="draft_invoice", status="succeeded",
                           idempotency_key=f"key-{admin.org_id}-in", external_id="in_123", amount=D("50.05"),
                           currency="usd", request={"lines": 1}, response={"id": "in_123"}))
        session.add(Action(org_id=admin.org_id, anomaly_id=rows[1].id, kind="hubspot_task", status="failed",
                           idempotency_key=f"key-{admin.org_id}-old", amount=D("7.10"), currency="usd",
                           error="declined", created_at=datetime(2025, 6, 1, tzinfo=UTC)))
        return {"in_period": sorted([rows[0].id, rows[2].id]), "fingerprints": {r.fingerprint for r in rows}}


@pytest.fixture
def orgs(app_db: str) -> dict[str, Any]:
    """Org A (admin + analyst) and org B, each with its own anomalies, actions and audit entries."""
    org_a, admin_a = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin = Actor.user(org_a.id, admin_a.id, "admin")
    analyst_user = users.create_user(admin, "analyst@acme.example", "Al", "analyst", "password-2")
    org_b, admin_b = users.create_organization("Globex", "globex", "admin@globex.example", "Bob", "password-3")
    other = Actor.user(org_b.id, admin_b.id, "admin")
    return {"admin": admin, "analyst": Actor.user(org_a.id, analyst_user.id, "analyst"), "other": other,
            "a": _seed(admin), "b": _seed(other)}


@pytest.fixture
def no_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RRC_EXPORT_BUCKET", "RRC_EXPORT_ENDPOINT_URL", "RRC_EXPORT_URL_TTL", "RRC_EXPORT_PREFIX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def export_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """The operator's export bucket, reached with the server's own credentials (AWS_* variables); organizations
    are not allowed those (RRC_S3_ALLOW_SERVER_CREDENTIALS unset), which does not concern the operator's bucket."""
    bucket = f"exports-{abs(hash(request.node.name)) % 10**8}"
    s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("RRC_EXPORT_BUCKET", bucket)
    monkeypatch.setenv("RRC_EXPORT_ENDPOINT_URL", moto_endpoint)
    # The server's keys are SERVER_KEYS wherever a test sets them: Arrow's AWS SDK resolves the server's
    # credential chain once per process, so another value here would be what a later test sees.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SERVER_KEYS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SERVER_KEYS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("RRC_EXPORT_URL_TTL", raising=False)
    monkeypatch.delenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", raising=False)
    return bucket


def _open(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _expected_audit(actor: Actor) -> list[int]:
    with org_session(actor.org_id) as session:
        return sorted(e.seq for e in session.query(AuditEntry).where(AuditEntry.org_id == actor.org_id))


def test_csv_download_when_no_s3(orgs: dict[str, Any], no_s3: None) -> None:
    analyst: Actor = orgs["analyst"]
    audit_before = _expected_audit(analyst)
    result = exports.export_audit(analyst, START, END, "csv")
    assert result.url is None and result.content is not None and result.filename.endswith(".zip")
    assert hashlib.sha256(result.content).hexdigest() == result.sha256
    files = _open(result.content)
    assert set(files) == {"anomalies.csv", "actions.csv", "audit_log.csv", "manifest.json"}
    anomalies = _csv_rows(files["anomalies.csv"])
    assert sorted(int(r["id"]) for r in anomalies) == orgs["a"]["in_period"]
    by_fp = {r["fingerprint"]: r for r in anomalies}
    org = analyst.org_id
    assert by_fp[f"fp-{org}-3"]["leak_amount"] == "1234567.891234"
    assert by_fp[f"fp-{org}-1"]["leak_amount"] == "50.05" and by_fp[f"fp-{org}-1"]["billed_amount"] == "100.00"
    assert by_fp[f"fp-{org}-1"]["leak_units"] == "500.5" and by_fp[f"fp-{org}-1"]["period_start"] == \
        "2026-03-01T00:00:00Z"
    assert json.loads(by_fp[f"fp-{org}-1"]["evidence"]) == {"days": [1, 2]}
    actions = _csv_rows(files["actions.csv"])
    assert [(a["external_id"], a["amount"]) for a in actions] == [("in_123", "50.05")]  # the 2025 one is out
    assert sorted(int(r["seq"]) for r in _csv_rows(files["audit_log.csv"])) == audit_before
    manifest = json.loads(files["manifest.json"])
    assert manifest["counts"] == {"anomalies": 2, "actions": 1, "audit_log": len(audit_before)}
    assert manifest["audit_chain"]["ok"] is True and manifest["org_id"] == org
    with org_session(org) as session:  # the log's newest entry when the export was made
        newest = session.query(AuditEntry).where(AuditEntry.org_id == org, AuditEntry.seq == audit_before[-1]).one()
    assert manifest["audit_chain"]["head"] == {"seq": newest.seq, "hash": newest.hash}
    for name in ("anomalies.csv", "actions.csv", "audit_log.csv"):
        assert manifest["sha256"][name] == hashlib.sha256(files[name]).hexdigest()
    with org_session(org) as session:
        last = session.query(AuditEntry).where(AuditEntry.org_id == org).order_by(AuditEntry.seq.desc()).first()
    assert last is not None and last.action == "audit.exported" and last.actor == analyst.label
    assert last.details["destination"] == "download" and last.details["sha256"] == result.sha256


def test_other_orgs_rows_never_appear(orgs: dict[str, Any], no_s3: None) -> None:
    for fmt in ("csv", "parquet"):
        result = exports.export_audit(orgs["admin"], START, END, fmt)
        assert result.content is not None
        blob = b"".join(_open(result.content).values())
        for fingerprint in orgs["b"]["fingerprints"]:
            assert fingerprint.encode() not in blob
        assert f"key-{orgs['other'].org_id}-in".encode() not in blob
        assert b"admin@globex.example" not in blob and b"Globex" not in blob


def test_parquet_round_trip_through_a_presigned_url(orgs: dict[str, Any], export_bucket: str) -> None:
    analyst: Actor = orgs["analyst"]
    result = exports.export_audit(analyst, START, END, "parquet")
    assert result.content is None and result.url and result.location
    assert result.location.startswith(f"s3://{export_bucket}/exports/org-{analyst.org_id}/")
    query = parse_qs(urlparse(result.url).query)
    assert query["X-Amz-Expires"] == ["900"]
    assert result.expires_at is not None and 890 <= (result.expires_at - datetime.now(UTC)).total_seconds() <= 900
    response = httpx.get(result.url)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == result.sha256
    files = _open(response.content)
    anomalies = pq.read_table(io.BytesIO(files["anomalies.parquet"]))
    assert anomalies.schema.field("leak_amount").type == pa.string()
    assert anomalies.schema.field("period_start").type == pa.timestamp("us", tz="UTC")
    assert sorted(anomalies.column("id").to_pylist()) == orgs["a"]["in_period"]
    assert sorted(anomalies.column("leak_amount").to_pylist()) == ["1234567.891234", "50.05"]
    actions = pq.read_table(io.BytesIO(files["actions.parquet"])).to_pylist()
    assert [(a["external_id"], a["amount"]) for a in actions] == [("in_123", "50.05")]
    log = pq.read_table(io.BytesIO(files["audit_log.parquet"])).to_pylist()
    assert log and all(isinstance(json.loads(e["details"]), dict) for e in log)
    with org_session(analyst.org_id) as session:
        last = session.query(AuditEntry).where(AuditEntry.org_id == analyst.org_id) \
            .order_by(AuditEntry.seq.desc()).first()
    assert last is not None and last.action == "audit.exported" and last.details["destination"] == result.location


def test_url_ttl_comes_from_the_environment(orgs: dict[str, Any], export_bucket: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_EXPORT_URL_TTL", "60")
    result = exports.export_audit(orgs["admin"], START, END)
    assert result.url and parse_qs(urlparse(result.url).query)["X-Amz-Expires"] == ["60"]
    monkeypatch.setenv("RRC_EXPORT_URL_TTL", "forever")
    with pytest.raises(InvalidInput, match="RRC_EXPORT_URL_TTL"):
        exports.export_audit(orgs["admin"], START, END)


def test_s3_integration_with_export_prefix_is_used(orgs: dict[str, Any], moto_endpoint: str, no_s3: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    s3_client(moto_endpoint).create_bucket(Bucket="usage-and-exports")
    integrations.connect(orgs["admin"], "s3_parquet", {
        "bucket": "usage-and-exports", "prefix": "usage", "region": "us-east-1", "endpoint_url": moto_endpoint,
        "access_key_id": KEYS["aws_access_key_id"], "secret_access_key": KEYS["aws_secret_access_key"],
        "columns": COLUMNS, "export_prefix": "audit-exports"})
    result = exports.export_audit(orgs["analyst"], START, END, "csv")
    assert result.location and result.location.startswith(
        f"s3://usage-and-exports/audit-exports/org-{orgs['analyst'].org_id}/")
    assert httpx.get(result.url or "").status_code == 200


def _objects(endpoint: str, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_an_org_export_destination_without_keys_is_refused(orgs: dict[str, Any], moto_endpoint: str, no_s3: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           request: pytest.FixtureRequest) -> None:
    """An org's S3 integration saved without keys (before the rule) must not write with the server's credentials,
    which here could write the bucket; allowed only when the operator says so."""
    bucket = f"server-role-{abs(hash(request.node.name)) % 10**8}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SERVER_KEYS["AWS_ACCESS_KEY_ID"])  # the server's own credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SERVER_KEYS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.delenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", raising=False)
    s3_client(moto_endpoint).create_bucket(Bucket=bucket)
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(orgs["admin"], "s3_parquet", {
            "bucket": bucket, "prefix": "usage", "region": "us-east-1", "endpoint_url": moto_endpoint,
            "columns": COLUMNS, "export_prefix": "audit-exports"})
    before = _expected_audit(orgs["admin"])
    with pytest.raises(InvalidInput, match=r"^S3 Parquet usage source: access_key_id: required"):
        exports.export_audit(orgs["analyst"], START, END, "csv")
    assert _objects(moto_endpoint, bucket) == []
    assert _expected_audit(orgs["admin"]) == before

    monkeypatch.setenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", "1")  # a single-tenant operator's choice
    result = exports.export_audit(orgs["analyst"], START, END, "csv")
    assert result.location and result.location.startswith(f"s3://{bucket}/audit-exports/")
    assert len(_objects(moto_endpoint, bucket)) == 1


def test_the_operator_bucket_wins_over_a_keyless_org_integration(orgs: dict[str, Any], export_bucket: str,
                                                                 moto_endpoint: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(orgs["admin"], "s3_parquet", {
            "bucket": "usage-without-keys", "region": "us-east-1", "endpoint_url": moto_endpoint,
            "columns": COLUMNS, "export_prefix": "audit-exports"})
    result = exports.export_audit(orgs["admin"], START, END, "parquet")
    assert result.location and result.location.startswith(f"s3://{export_bucket}/exports/org-")
    assert httpx.get(result.url or "").status_code == 200


def test_a_failed_upload_is_a_clear_error_and_audited(orgs: dict[str, Any], export_bucket: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_EXPORT_BUCKET", "bucket-that-does-not-exist")
    with pytest.raises(exports.ExportFailed, match="NoSuchBucket"):
        exports.export_audit(orgs["admin"], START, END)
    with org_session(orgs["admin"].org_id) as session:
        last = session.query(AuditEntry).where(AuditEntry.org_id == orgs["admin"].org_id) \
            .order_by(AuditEntry.seq.desc()).first()
    assert last is not None and last.action == "audit.export_failed"


def test_bad_input_names_the_field_and_changes_nothing(orgs: dict[str, Any], no_s3: None) -> None:
    before = _expected_audit(orgs["admin"])
    for start, end, fmt, field in [(datetime(2026, 1, 1), END, "csv", "start"),
                                   (START, datetime(2027, 1, 1), "csv", "end"),
                                   (END, START, "csv", "end"), (START, END, "xlsx", "fmt")]:
        with pytest.raises(InvalidInput, match=f"^{field}"):
            exports.export_audit(orgs["admin"], start, end, fmt)
    assert _expected_audit(orgs["admin"]) == before


def test_dates_are_utc_midnights(orgs: dict[str, Any], no_s3: None) -> None:
    result = exports.export_audit(orgs["admin"], date(2026, 1, 1), date(2027, 1, 1))
    assert (result.start, result.end) == (START, END) and result.data == result.content
    assert result.counts["anomalies"] == 2


def test_roles(orgs: dict[str, Any], no_s3: None) -> None:
    with pytest.raises(PermissionDenied):
        exports.export_audit(Actor(orgs["admin"].org_id, "viewer", None, "user:x"), START, END)
    assert exports.export_audit(Actor.system(orgs["admin"].org_id, "cli"), START, END).content
