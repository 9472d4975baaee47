"""The audit log: append-only, hash-chained per organization.

Each entry's hash covers its content and the previous entry's hash, so editing, deleting or
reordering any row breaks the chain from that row on, and `verify` names the first broken one.
Only services append; nothing updates or deletes (on PostgreSQL a trigger refuses it too).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from db.models import AuditEntry
from services.context import Actor

GENESIS = "0" * 64


def _digest(org_id: int, seq: int, ts: datetime, actor: str, action: str, target_type: str | None,
            target_id: str | None, details: dict[str, Any], prev_hash: str) -> str:
    canonical = json.dumps(
        [org_id, seq, ts.astimezone(UTC).isoformat(), actor, action, target_type, target_id, details, prev_hash],
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def append(session: Session, actor: Actor, action: str, target_type: str | None = None,
           target_id: str | int | None = None, details: dict[str, Any] | None = None) -> AuditEntry:
    """Add one entry in the caller's transaction (it commits or rolls back with the change itself)."""
    org_id = actor.org_id
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": 7_000_000 + org_id})
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).where(AuditEntry.org_id == org_id)
        .order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
    ts = datetime.now(UTC).replace(microsecond=0)
    clean = json.loads(json.dumps(details or {}, default=str))
    target = None if target_id is None else str(target_id)
    entry = AuditEntry(
        org_id=org_id, seq=seq, ts=ts, actor=actor.label, action=action, target_type=target_type,
        target_id=target, details=clean, prev_hash=prev_hash,
        hash=_digest(org_id, seq, ts, actor.label, action, target_type, target, clean, prev_hash),
    )
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_broken_seq: int | None = None
    reason: str = ""


def verify(session: Session, org_id: int) -> VerifyResult:
    """Walk the org's chain in order; report the first row that was edited, removed or moved."""
    expected_prev, expected_seq, checked = GENESIS, 1, 0
    rows = session.execute(
        select(AuditEntry).where(AuditEntry.org_id == org_id).order_by(AuditEntry.seq)
    ).scalars()
    for entry in rows:
        if entry.seq != expected_seq:
            return VerifyResult(False, checked, expected_seq, f"entry {expected_seq} is missing")
        if entry.prev_hash != expected_prev:
            return VerifyResult(False, checked, entry.seq, "does not follow the previous entry")
        digest = _digest(org_id, entry.seq, entry.ts, entry.actor, entry.action, entry.target_type,
                         entry.target_id, entry.details, entry.prev_hash)
        if digest != entry.hash:
            return VerifyResult(False, checked, entry.seq, "content was changed after it was written")
        expected_prev, expected_seq, checked = entry.hash, entry.seq + 1, checked + 1
    return VerifyResult(True, checked)


def list_entries(session: Session, org_id: int, *, limit: int = 100, offset: int = 0,
                 since: datetime | None = None, until: datetime | None = None) -> list[AuditEntry]:
    query = select(AuditEntry).where(AuditEntry.org_id == org_id)
    if since:
        query = query.where(AuditEntry.ts >= since)
    if until:
        query = query.where(AuditEntry.ts < until)
    return list(session.execute(query.order_by(AuditEntry.seq.desc()).limit(limit).offset(offset)).scalars())


def count_entries(session: Session, org_id: int) -> int:
    return session.execute(select(func.count()).where(AuditEntry.org_id == org_id)).scalar_one()
