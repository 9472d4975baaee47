"""Audit export: what an auditor asks for about a period, in one archive, with a proof of integrity.

`export_audit(actor, start, end, fmt)` writes one zip holding `anomalies`, `actions` and
`audit_log` of one organization as CSV or Parquet, plus `manifest.json` (org, period, row
counts, SHA-256 of every file, the verdict of the audit hash chain and the log's head: seq and
hash of its newest entry at export time). One archive whatever the format, so a single presigned
URL or download hands over everything.

What "of the period" [start, end) (UTC, half-open) means, per table:
- anomalies whose billing period overlaps it (period_start < end and period_end > start): the
  leaks *about* that period, whenever they were found;
- actions created in it, and audit log entries written in it: what was *done* in that period.

Money and units are decimal strings in both formats (never floats: an auditor's sum must match
to the cent); JSON columns (evidence, details...) are JSON text; timestamps are ISO 8601 UTC in
CSV and timestamp[us, UTC] in Parquet. CSV text that a spreadsheet would run as a formula (a
reason typed as `=HYPERLINK(...)`) gets a leading apostrophe (core/spreadsheet.py); Parquet
keeps every value as stored.

Where it goes: with an export bucket configured it is uploaded with boto3 and handed out as a
presigned GET URL that expires after `RRC_EXPORT_URL_TTL` seconds (default 900); otherwise the
bytes are returned for a direct download. The bucket comes from `RRC_EXPORT_BUCKET` (with
`RRC_EXPORT_PREFIX`, `RRC_EXPORT_ENDPOINT_URL` and the standard `AWS_*` variables), else from the
org's S3 Parquet integration when it has an `export_prefix` (same bucket and credentials). Objects
are keyed `<prefix>/org-<id>/...` so one bucket can serve every tenant. Every export, and every
failed upload, is written to the audit log.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import select

from core.money import plain_decimal
from core.spreadsheet import safe_cell
from db.models import Action, Anomaly, AuditEntry
from db.session import org_session
from services import audit
from services.context import Actor, require_role
from services.errors import InvalidInput, NotFound, ServiceError

FORMATS = ("csv", "parquet")
DEFAULT_TTL = 900
MAX_TTL = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
TS = pa.timestamp("us", tz="UTC")


class ExportFailed(ServiceError):
    """The archive was built but could not be stored (bucket missing, access denied, unreachable)."""


@dataclass(frozen=True)
class ExportResult:
    filename: str
    fmt: str
    start: datetime
    end: datetime
    counts: dict[str, int]
    sha256: str  # of the zip
    size: int
    url: str | None = None  # presigned GET URL when uploaded
    expires_at: datetime | None = None
    location: str | None = None  # s3://bucket/key when uploaded
    content: bytes | None = field(default=None, repr=False)  # the zip itself when there is no S3

    @property
    def data(self) -> bytes | None:
        """Alias of `content` (what a download button wants)."""
        return self.content


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text | int | money (>= 2 decimals) | decimal | ts | json
    get: Callable[[Any], Any]


def _attr(name: str) -> Callable[[Any], Any]:
    return lambda row: getattr(row, name)


def _columns(spec: Sequence[tuple[str, str]]) -> list[Column]:
    return [Column(name, kind, _attr(name)) for name, kind in spec]


ANOMALY_COLUMNS = _columns([
    ("id", "int"), ("fingerprint", "text"), ("account_id", "text"), ("product_key", "text"),
    ("period_start", "ts"), ("period_end", "ts"), ("type", "text"), ("severity", "text"), ("status", "text"),
    ("status_reason", "text"), ("status_changed_by", "int"), ("status_changed_at", "ts"),
    ("actual_units", "decimal"), ("reported_units", "decimal"), ("leak_units", "decimal"),
    ("expected_amount", "money"), ("billed_amount", "money"), ("leak_amount", "money"),
    ("overbilled_amount", "money"), ("currency", "text"), ("confidence", "decimal"),
    ("confidence_factors", "json"), ("evidence", "json"), ("price_id", "text"), ("price_source", "text"),
    ("subscription_id", "text"), ("explanation", "text"), ("notes", "json"), ("first_run_id", "int"),
    ("last_run_id", "int"), ("created_at", "ts"), ("updated_at", "ts"),
])
ACTION_COLUMNS = _columns([
    ("id", "int"), ("anomaly_id", "int"), ("kind", "text"), ("status", "text"), ("idempotency_key", "text"),
    ("external_id", "text"), ("amount", "money"), ("currency", "text"), ("request", "json"), ("response", "json"),
    ("error", "text"), ("created_by", "int"), ("created_at", "ts"), ("updated_at", "ts"),
])
AUDIT_COLUMNS = _columns([
    ("seq", "int"), ("ts", "ts"), ("actor", "text"), ("action", "text"), ("target_type", "text"),
    ("target_id", "text"), ("details", "json"), ("prev_hash", "text"), ("hash", "text"),
])
ARROW_TYPES = {"text": pa.string(), "int": pa.int64(), "money": pa.string(), "decimal": pa.string(), "ts": TS,
               "json": pa.string()}


def _decimal(value: Decimal, min_places: int) -> str:
    """Exact decimal text without trailing zeros beyond `min_places` (12.500000 -> 12.50, 3 -> 3)."""
    text = plain_decimal(value)
    places = len(text.partition(".")[2])
    if places < min_places:
        text = format(value.quantize(Decimal(1).scaleb(-min_places)), "f")
    return text


def _cell(column: Column, row: Any, fmt: str) -> Any:
    value = column.get(row)
    if value is None:
        return None
    if column.kind in ("money", "decimal"):
        return _decimal(Decimal(value), 2 if column.kind == "money" else 0)
    if column.kind == "json":
        return json.dumps(value, sort_keys=True, default=str)
    if column.kind == "ts":
        value = value.astimezone(UTC)
        return value.isoformat().replace("+00:00", "Z") if fmt == "csv" else value
    return value


def _csv(columns: list[Column], rows: Sequence[Any]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.name for c in columns])
    for row in rows:
        writer.writerow(["" if (v := _cell(c, row, "csv")) is None else safe_cell(v) for c in columns])
    return buffer.getvalue().encode("utf-8")


def _parquet(columns: list[Column], rows: Sequence[Any]) -> bytes:
    schema = pa.schema([pa.field(c.name, ARROW_TYPES[c.kind]) for c in columns])
    arrays = [pa.array([_cell(c, row, "parquet") for row in rows], ARROW_TYPES[c.kind]) for c in columns]
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays, schema=schema), sink)
    return sink.getvalue()


def _check_period(start: datetime | date, end: datetime | date, fmt: str) -> tuple[datetime, datetime]:
    if fmt not in FORMATS:
        raise InvalidInput(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    bounds = []
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime.combine(value, time.min, UTC)  # a calendar day starts at midnight UTC
        if not isinstance(value, datetime):
            raise InvalidInput(f"{name}: expected a date or a date and time")
        if value.tzinfo is None:
            raise InvalidInput(f"{name}: expected a timezone-aware timestamp (UTC), got {value.isoformat()}")
        bounds.append(value.astimezone(UTC))
    start, end = bounds
    if end <= start:
        raise InvalidInput("end: must be after start (periods are half-open [start, end))")
    return start, end


def _ttl() -> int:
    raw = os.environ.get("RRC_EXPORT_URL_TTL", "").strip()
    if not raw:
        return DEFAULT_TTL
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TTL:
        raise InvalidInput(f"RRC_EXPORT_URL_TTL: expected whole seconds between 1 and {MAX_TTL}, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class _Target:
    bucket: str
    prefix: str
    client: Any
    source: str  # env | s3_parquet integration


def _target(actor: Actor) -> _Target | None:
    """Where exports go: the environment's export bucket, else the S3 integration's export_prefix.

    The environment's bucket is the operator's: its client uses this server's AWS credential chain.
    The integration is an org's setting: it must carry its own keys and point at an address the policy allows
    (services/source_policy.py, also for one saved before those rules), and its client signs with those keys only.
    """
    from connectors import s3_parquet
    from services import integrations

    bucket = os.environ.get("RRC_EXPORT_BUCKET", "").strip()
    if bucket:
        if not s3_parquet.BUCKET_NAME.match(bucket):
            raise InvalidInput(f"RRC_EXPORT_BUCKET: {bucket!r} is not a valid S3 bucket name")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = os.environ.get("RRC_EXPORT_ENDPOINT_URL", "").strip() or None
        prefix = (os.environ.get("RRC_EXPORT_PREFIX") or "exports").strip("/")
        return _Target(bucket, prefix, s3_parquet.s3_client(region, endpoint, server_credentials=True),
                       "RRC_EXPORT_BUCKET")
    try:
        config = integrations.get_config(actor, "s3_parquet")
    except NotFound:
        return None
    if not config.get("export_prefix"):
        return None
    options = integrations.policy_options("s3_parquet", config)
    try:
        cfg = s3_parquet.parse_config(config, **options)
        client = s3_parquet.boto_client(cfg)
    except s3_parquet.S3SourceError as exc:
        raise InvalidInput(f"{integrations.LABELS['s3_parquet']}: {exc}") from None
    return _Target(cfg.bucket, str(config["export_prefix"]).strip("/"), client, "s3_parquet integration")


def _query(actor: Actor, start: datetime, end: datetime) -> tuple[list[Any], list[Any], list[Any], dict[str, Any]]:
    with org_session(actor.org_id) as session:
        anomalies = list(session.scalars(
            select(Anomaly).where(Anomaly.org_id == actor.org_id, Anomaly.period_start < end,
                                  Anomaly.period_end > start).order_by(Anomaly.period_start, Anomaly.id)))
        actions = list(session.scalars(
            select(Action).where(Action.org_id == actor.org_id, Action.created_at >= start, Action.created_at < end)
            .order_by(Action.created_at, Action.id)))
        entries = list(session.scalars(
            select(AuditEntry).where(AuditEntry.org_id == actor.org_id, AuditEntry.ts >= start, AuditEntry.ts < end)
            .order_by(AuditEntry.seq)))
        verdict = audit.verify(session, actor.org_id)
        head = audit.read_head(session, actor.org_id)
    # head: the newest entry of the whole log when the export was made (not only of the period), so
    # an auditor holding this file can tell a later copy of the log lost entries if it lacks that one
    chain = {"ok": verdict.ok, "checked": verdict.checked, "first_broken_seq": verdict.first_broken_seq,
             "reason": verdict.reason, "head": {"seq": head[0], "hash": head[1]} if head else None}
    return anomalies, actions, entries, chain


def _archive(actor: Actor, start: datetime, end: datetime, fmt: str) -> tuple[bytes, dict[str, int]]:
    anomalies, actions, entries, chain = _query(actor, start, end)
    write = _csv if fmt == "csv" else _parquet
    files = {
        f"anomalies.{fmt}": write(ANOMALY_COLUMNS, anomalies),
        f"actions.{fmt}": write(ACTION_COLUMNS, actions),
        f"audit_log.{fmt}": write(AUDIT_COLUMNS, entries),
    }
    counts = {"anomalies": len(anomalies), "actions": len(actions), "audit_log": len(entries)}
    manifest = {
        "org_id": actor.org_id, "period_start": start.isoformat(), "period_end": end.isoformat(),
        "generated_at": datetime.now(UTC).isoformat(), "generated_by": actor.label, "format": fmt,
        "counts": counts, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        "audit_chain": chain,
        "semantics": "anomalies whose billing period overlaps [start, end); actions and audit entries created "
                     "in [start, end); money and units as decimal strings",
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return buffer.getvalue(), counts


def export_audit(actor: Actor, start: datetime | date, end: datetime | date, fmt: str = "csv") -> ExportResult:
    """Build the period's audit archive; upload it and presign a URL, or return it for download.

    `start`/`end` are aware datetimes, or dates (midnight UTC): [start, end) is half-open.
    """
    require_role(actor, "admin", "analyst")
    start, end = _check_period(start, end, fmt)
    ttl = _ttl()
    target = _target(actor)
    data, counts = _archive(actor, start, end, fmt)
    digest = hashlib.sha256(data).hexdigest()
    filename = f"audit-export-org{actor.org_id}-{start:%Y%m%d}-{end:%Y%m%d}-{fmt}.zip"
    details: dict[str, Any] = {"start": start.isoformat(), "end": end.isoformat(), "fmt": fmt, "counts": counts,
                               "sha256": digest, "size": len(data)}
    if target is None:
        with org_session(actor.org_id) as session:
            audit.append(session, actor, "audit.exported", "export", filename, {**details, "destination": "download"})
        return ExportResult(filename, fmt, start, end, counts, digest, len(data), content=data)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    key = "/".join(p for p in (target.prefix, f"org-{actor.org_id}", f"{stamp}-{uuid.uuid4().hex[:8]}-{filename}")
                   if p)
    location = f"s3://{target.bucket}/{key}"
    try:
        target.client.put_object(Bucket=target.bucket, Key=key, Body=data, ContentType="application/zip",
                                 ContentDisposition=f'attachment; filename="{filename}"',
                                 Metadata={"sha256": digest, "org-id": str(actor.org_id)})
        url = target.client.generate_presigned_url("get_object", Params={"Bucket": target.bucket, "Key": key},
                                                   ExpiresIn=ttl)
    except (ClientError, BotoCoreError) as exc:
        code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else type(exc).__name__
        with org_session(actor.org_id) as session:
            audit.append(session, actor, "audit.export_failed", "export", filename,
                         {**details, "destination": location, "error": code})
        raise ExportFailed(f"the export could not be stored in s3://{target.bucket}/ ({code}); check the export "
                           f"bucket settings ({target.source})") from None
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
    with org_session(actor.org_id) as session:
        audit.append(session, actor, "audit.exported", "export", filename,
                     {**details, "destination": location, "url_expires_at": expires_at.isoformat()})
    return ExportResult(filename, fmt, start, end, counts, digest, len(data), url=url, expires_at=expires_at,
                        location=location)
