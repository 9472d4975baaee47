"""The audit log: append-only, hash-chained per organization, with a sealed head.

Each entry's hash covers its content and the previous entry's hash, so editing, deleting or
reordering a row breaks the chain from that row on. A chain alone cannot show that its *newest*
entries were deleted (what is left is still a consistent chain), so each organization also has
a head (`audit_heads`: seq and hash of its newest entry), written in the transaction of every
append and sealed with an HMAC-SHA256 of (org_id, seq, hash) under a key derived with HKDF from
RRC_SECRET_KEYS (`db.crypto.mac_keys`; the first key seals, any configured key verifies, so key
rotation works like the integration secrets' and `reseal_heads` moves every head to the new key).

`verify` walks the chain and compares its end with the head (one more query). It reports the
first of:
- an entry edited, moved or removed in the middle ("content was changed", "entries 4..5 are
  missing", ...);
- an entry that records an earlier head mismatch (see below);
- the newest entries deleted: "entries N+1..M are missing: the log's head says M";
- a head whose seal does not check ("the chain head was altered"), a head that names another
  last entry, entries after the head, or entries with no head at all.

`append` never papers over such a problem by re-sealing: when the head does not match the log it
first appends an `audit.head_mismatch` entry saying what it found, numbered after the highest seq
either of them knows, then the caller's entry. The gap and the record stay in the chain, so the
app keeps working and `verify` keeps reporting the tampering.

Not detected: someone holding both the database and the secret key can rewrite everything
(recompute the hashes, re-seal the head). Someone who kept a copy of an older head row can roll
the log back to that point (a seal has no notion of time). On PostgreSQL, triggers refuse UPDATE
and DELETE on audit_log and moving a head backwards or deleting it, so both take the table
owner; what is left there is someone with the owner's or a superuser's access. On the embedded
SQLite default without RRC_SECRET_KEYS, the generated key file sits in the data folder next to
the database, so whoever has the whole folder has both. Exports are the external copy: the audit
export's manifest names the head (seq and hash) at export time, and a later log must still
contain that entry.

Only services append; nothing updates or deletes entries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from db import crypto
from db.models import AuditEntry, AuditHead
from services.context import Actor

GENESIS = "0" * 64
HEAD_MISMATCH = "audit.head_mismatch"  # the action of the entry append writes when the head does not match
HEAD_MISMATCH_ACTOR = "system:audit"
MAC_PURPOSE = "audit-head-v1"


def _digest(org_id: int, seq: int, ts: datetime, actor: str, action: str, target_type: str | None,
            target_id: str | None, details: dict[str, Any], prev_hash: str) -> str:
    canonical = json.dumps(
        [org_id, seq, ts.astimezone(UTC).isoformat(), actor, action, target_type, target_id, details, prev_hash],
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the head's seal -----------------------------------------------------------------------------

def _head_message(org_id: int, seq: int, hash_: str) -> bytes:
    return json.dumps(["rrc-audit-head", org_id, seq, hash_], separators=(",", ":")).encode()


def seal(org_id: int, seq: int, hash_: str) -> str:
    """The MAC of the head (org_id, seq, hash) under the primary key: what `audit_heads.mac` holds."""
    return hmac.new(crypto.mac_keys(MAC_PURPOSE)[0], _head_message(org_id, seq, hash_), hashlib.sha256).hexdigest()


def seal_ok(org_id: int, seq: int, hash_: str, mac: str | None) -> bool:
    """True when `mac` is the seal of (org_id, seq, hash) under any configured key."""
    message = _head_message(org_id, seq, hash_)
    given = (mac or "").encode()
    return any(hmac.compare_digest(hmac.new(key, message, hashlib.sha256).hexdigest().encode(), given)
               for key in crypto.mac_keys(MAC_PURPOSE))


def _read_head(session: Session, org_id: int) -> AuditHead | None:
    return session.execute(select(AuditHead).where(AuditHead.org_id == org_id)).scalar_one_or_none()


def _write_head(session: Session, org_id: int, head: AuditHead | None, seq: int, hash_: str) -> None:
    mac = seal(org_id, seq, hash_)
    if head is None:
        session.add(AuditHead(org_id=org_id, seq=seq, hash=hash_, mac=mac))
    else:
        head.seq, head.hash, head.mac = seq, hash_, mac


def read_head(session: Session, org_id: int) -> tuple[int, str] | None:
    """(seq, hash) the org's head names, as stored (whether its seal checks is `verify`'s business)."""
    head = _read_head(session, org_id)
    return None if head is None else (head.seq, head.hash)


def set_head(session: Session, org_id: int, seq: int, hash_: str) -> None:
    """Point the org's head at entry `seq` with hash `hash_`, sealed with the primary key.

    `append` keeps the head itself. This is for code that inserted a whole chain it verified
    (import-org) and must anchor it before the next append; never use it to quiet `verify`.
    """
    _write_head(session, org_id, _read_head(session, org_id), seq, hash_)
    session.flush()


def _entries(first: int, last: int) -> str:
    return f"entry {first} is" if first == last else f"entries {first}..{last} are"


def _head_problem(org_id: int, head: AuditHead | None, last_seq: int, last_hash: str) -> tuple[int, str] | None:
    """What is wrong between the chain's last entry (`last_seq` 0: no entry) and the head, as
    (first entry it concerns, reason); None when they agree."""
    if head is None:
        if last_seq == 0:
            return None
        return last_seq + 1, f"the log has no chain head, so deleted entries after {last_seq} would go unnoticed"
    if not seal_ok(org_id, head.seq, head.hash, head.mac):
        return last_seq + 1, "the chain head was altered: its seal does not check with the configured secret keys"
    return chain_gap(head.seq, head.hash, last_seq, last_hash)


def chain_gap(head_seq: int, head_hash: str, last_seq: int, last_hash: str,
              head: str = "the log's head") -> tuple[int, str] | None:
    """Whether a chain whose last entry is (`last_seq`, `last_hash`) ends where its head says, as
    (first entry concerned, reason naming the head as `head`); None when it does. The seal is the
    caller's to judge."""
    if head_seq > last_seq:
        return last_seq + 1, f"{_entries(last_seq + 1, head_seq)} missing: {head} says {head_seq}"
    if head_seq < last_seq:
        return head_seq + 1, (f"{_entries(head_seq + 1, last_seq)} after {head} ({head_seq}): "
                              "written outside the app, or the head was rolled back")
    if head_hash != last_hash:
        return last_seq, f"entry {last_seq} is not the entry {head} records: it was replaced"
    return None


# --- writing -------------------------------------------------------------------------------------

def _add(session: Session, org_id: int, seq: int, actor: str, action: str, target_type: str | None,
         target_id: str | None, details: dict[str, Any], prev_hash: str) -> AuditEntry:
    ts = datetime.now(UTC).replace(microsecond=0)
    entry = AuditEntry(
        org_id=org_id, seq=seq, ts=ts, actor=actor, action=action, target_type=target_type, target_id=target_id,
        details=details, prev_hash=prev_hash,
        hash=_digest(org_id, seq, ts, actor, action, target_type, target_id, details, prev_hash),
    )
    session.add(entry)
    return entry


def append(session: Session, actor: Actor, action: str, target_type: str | None = None,
           target_id: str | int | None = None, details: dict[str, Any] | None = None) -> AuditEntry:
    """Add one entry and move the head to it, in the caller's transaction (it commits or rolls
    back with the change itself). A head that does not match the log is recorded first, never
    silently re-sealed."""
    org_id = actor.org_id
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": 7_000_000 + org_id})
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).where(AuditEntry.org_id == org_id)
        .order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    last_seq, last_hash = (last[0], last[1]) if last else (0, GENESIS)
    head = _read_head(session, org_id)
    problem = _head_problem(org_id, head, last_seq, last_hash)
    if problem is not None:
        found = {"problem": problem[1], "last_entry": {"seq": last_seq, "hash": last_hash} if last else None,
                 "head": {"seq": head.seq, "hash": head.hash} if head is not None else None}
        marker = _add(session, org_id, max(last_seq, head.seq if head is not None else 0) + 1, HEAD_MISMATCH_ACTOR,
                      HEAD_MISMATCH, "audit_log", None, json.loads(json.dumps(found, default=str)), last_hash)
        last_seq, last_hash = marker.seq, marker.hash
    clean = json.loads(json.dumps(details or {}, default=str))
    target = None if target_id is None else str(target_id)
    entry = _add(session, org_id, last_seq + 1, actor.label, action, target_type, target, clean, last_hash)
    _write_head(session, org_id, head, entry.seq, entry.hash)
    session.flush()
    return entry


def reseal_heads(session: Session) -> tuple[int, list[int]]:
    """Re-seal every head with the primary key (after a new key was put first in RRC_SECRET_KEYS,
    so the old one can be dropped). Only heads whose seal checks with a configured key are
    re-sealed; the org ids of the others are returned untouched: they are what `verify` reports.
    Needs a system session (every organization)."""
    resealed, refused = 0, []
    for head in session.execute(select(AuditHead).order_by(AuditHead.org_id)).scalars():
        if seal_ok(head.org_id, head.seq, head.hash, head.mac):
            head.mac = seal(head.org_id, head.seq, head.hash)
            resealed += 1
        else:
            refused.append(head.org_id)
    session.flush()
    return resealed, refused


# --- checking ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_broken_seq: int | None = None  # for a head problem: the first entry the head no longer vouches for
    reason: str = ""


def verify(session: Session, org_id: int) -> VerifyResult:
    """Walk the org's chain in order, then check its end against the sealed head; report the first
    entry that was edited, removed or moved, or the newest entries that are gone."""
    head = _read_head(session, org_id)
    expected_prev, expected_seq, checked = GENESIS, 1, 0
    rows = session.execute(
        select(AuditEntry).where(AuditEntry.org_id == org_id).order_by(AuditEntry.seq)
    ).scalars()
    for entry in rows:
        if entry.seq > expected_seq:
            return VerifyResult(False, checked, expected_seq, f"{_entries(expected_seq, entry.seq - 1)} missing")
        if entry.seq != expected_seq:
            return VerifyResult(False, checked, entry.seq, f"entry {entry.seq} is out of sequence")
        if entry.prev_hash != expected_prev:
            return VerifyResult(False, checked, entry.seq, "does not follow the previous entry")
        digest = _digest(org_id, entry.seq, entry.ts, entry.actor, entry.action, entry.target_type,
                         entry.target_id, entry.details, entry.prev_hash)
        if digest != entry.hash:
            return VerifyResult(False, checked, entry.seq, "content was changed after it was written")
        if entry.action == HEAD_MISMATCH:
            found = entry.details.get("problem") if isinstance(entry.details, dict) else None
            return VerifyResult(False, checked, entry.seq, f"entry {entry.seq} records that the log did not match "
                                                           f"its head when it was written: {found}")
        expected_prev, expected_seq, checked = entry.hash, entry.seq + 1, checked + 1
    problem = _head_problem(org_id, head, expected_seq - 1, expected_prev)
    if problem is not None:
        return VerifyResult(False, checked, *problem)
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
