"""The audit chain's sealed head, on SQLite and PostgreSQL: deleting the newest entries is caught,
the head cannot be edited without the key, appends never cover a mismatch up, key rotation, and
migration 0007's backfill of existing chains."""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from typer.testing import CliRunner

import cli
from db.models import AuditEntry, AuditHead, Organization
from db.session import data_dir, downgrade, get_engine, org_session, system_session, upgrade
from services import audit
from services.context import Actor


def _as_owner(app_db: str, *statements: tuple[str, dict[str, object]]) -> None:
    """Someone with direct database access (the app's own guards do not stop them): on PostgreSQL a
    superuser switches the append-only triggers off for the statements."""
    engine = get_engine(app_db)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if postgres:
            conn.execute(sa.text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
            conn.execute(sa.text("ALTER TABLE audit_heads DISABLE TRIGGER USER"))
        for sql, params in statements:
            conn.execute(sa.text(sql), params)
        if postgres:
            conn.execute(sa.text("ALTER TABLE audit_log ENABLE TRIGGER USER"))
            conn.execute(sa.text("ALTER TABLE audit_heads ENABLE TRIGGER USER"))


def _events(actor: Actor, count: int) -> None:
    with org_session(actor.org_id) as session:
        for i in range(count):
            audit.append(session, actor, "test.event", "thing", i, {"i": i})


def _verify(org_id: int) -> audit.VerifyResult:
    with org_session(org_id) as session:
        return audit.verify(session, org_id)


def _newest(org_id: int, limit: int = 1) -> list[AuditEntry]:
    with org_session(org_id) as session:
        return audit.list_entries(session, org_id, limit=limit)


def test_the_head_follows_every_append_and_a_normal_log_verifies(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    for actor in (admin, analyst, admin):
        _events(actor, 2)
        (newest,) = _newest(admin.org_id)
        with org_session(admin.org_id) as session:
            assert audit.read_head(session, admin.org_id) == (newest.seq, newest.hash)
    assert _verify(admin.org_id) == audit.VerifyResult(True, 9)  # org + 2 users + 6 events


@pytest.mark.parametrize("cut", [1, 3])
def test_deleting_the_newest_entries_is_detected_and_stays_detected(org: tuple[Actor, Actor], app_db: str,
                                                                    cut: int) -> None:
    admin, _ = org
    _events(admin, 5)  # entries 1..8
    assert _verify(admin.org_id).ok
    _as_owner(app_db, ("DELETE FROM audit_log WHERE org_id = :o AND seq > :s", {"o": admin.org_id, "s": 8 - cut}))
    missing = "entry 8 is" if cut == 1 else f"entries {9 - cut}..8 are"
    assert _verify(admin.org_id) == audit.VerifyResult(False, 8 - cut, 9 - cut,
                                                       f"{missing} missing: the log's head says 8")
    _events(admin, 1)  # the next append does not cover it up: it records what it found, after the gap
    assert _verify(admin.org_id) == audit.VerifyResult(False, 8 - cut, 9 - cut, f"{missing} missing")
    event, marker = _newest(admin.org_id, 2)
    assert (event.action, event.seq, marker.action, marker.seq) == ("test.event", 10, audit.HEAD_MISMATCH, 9)
    assert marker.details["head"]["seq"] == 8 and marker.details["last_entry"]["seq"] == 8 - cut
    assert marker.details["problem"] == f"{missing} missing: the log's head says 8"


def test_deleting_every_entry_is_detected(org: tuple[Actor, Actor], app_db: str) -> None:
    admin, _ = org
    _as_owner(app_db, ("DELETE FROM audit_log WHERE org_id = :o", {"o": admin.org_id}))
    assert _verify(admin.org_id) == audit.VerifyResult(False, 0, 1, "entries 1..3 are missing: the log's head says 3")


def _forged_mac(org_id: int, seq: int, hash_: str) -> str:
    """What someone who knows the format but not the key can compute."""
    return hmac.new(os.urandom(32), audit._head_message(org_id, seq, hash_), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("edit", ["roll back", "seq", "hash", "forged seal"])
def test_editing_the_head_without_the_key_is_detected(org: tuple[Actor, Actor], app_db: str, edit: str) -> None:
    admin, _ = org
    _events(admin, 2)  # entries 1..5
    fourth = _newest(admin.org_id, 2)[1]
    org_id = admin.org_id
    statements = {
        # drop the newest entry and point the head at the one before, keeping the old seal
        "roll back": [("DELETE FROM audit_log WHERE org_id = :o AND seq = 5", {"o": org_id}),
                      ("UPDATE audit_heads SET seq = 4, hash = :h WHERE org_id = :o", {"o": org_id, "h": fourth.hash})],
        "seq": [("UPDATE audit_heads SET seq = 4 WHERE org_id = :o", {"o": org_id})],
        "hash": [("UPDATE audit_heads SET hash = :h WHERE org_id = :o", {"o": org_id, "h": fourth.hash})],
        "forged seal": [("DELETE FROM audit_log WHERE org_id = :o AND seq = 5", {"o": org_id}),
                        ("UPDATE audit_heads SET seq = 4, hash = :h, mac = :m WHERE org_id = :o",
                         {"o": org_id, "h": fourth.hash, "m": _forged_mac(org_id, 4, fourth.hash)})],
    }[edit]
    _as_owner(app_db, *statements)
    result = _verify(org_id)
    assert not result.ok and result.reason.startswith("the chain head was altered"), result
    assert result.first_broken_seq == result.checked + 1
    _events(admin, 1)  # an append never re-seals an altered head silently
    later = _verify(org_id)
    assert not later.ok and later.first_broken_seq == result.checked + 1
    assert "the chain head was altered" in later.reason and later.reason.startswith(f"entry {later.first_broken_seq} "
                                                                                     "records that the log")


@pytest.mark.parametrize("forgery", ["appended", "replaced"])
def test_entries_forged_at_the_end_are_detected(org: tuple[Actor, Actor], app_db: str, forgery: str) -> None:
    """Someone without the key writes a well-formed entry (the chain hash needs no key) at the end."""
    admin, _ = org
    org_id = admin.org_id
    entries = list(reversed(_newest(org_id, 3)))  # 1..3
    seq, previous = (4, entries[2].hash) if forgery == "appended" else (3, entries[1].hash)
    ts = datetime.now(UTC).replace(microsecond=0)
    details = {"email": "mallory@evil.example", "role": "admin"}
    digest = audit._digest(org_id, seq, ts, "system:test", "user.created", "user", "99", details, previous)
    statements = [("DELETE FROM audit_log WHERE org_id = :o AND seq >= :s", {"o": org_id, "s": seq})]
    _as_owner(app_db, *statements)
    with get_engine(app_db).begin() as conn:
        conn.execute(sa.insert(AuditEntry.__table__).values(
            org_id=org_id, seq=seq, ts=ts, actor="system:test", action="user.created", target_type="user",
            target_id="99", details=details, prev_hash=previous, hash=digest))
    expected = {"appended": audit.VerifyResult(False, 4, 4, "entry 4 is after the log's head (3): written outside "
                                                             "the app, or the head was rolled back"),
                "replaced": audit.VerifyResult(False, 3, 3, "entry 3 is not the entry the log's head records: it "
                                                             "was replaced")}[forgery]
    assert _verify(org_id) == expected


def test_entries_without_a_head_are_reported_not_a_crash(org: tuple[Actor, Actor], app_db: str) -> None:
    admin, _ = org
    _as_owner(app_db, ("DELETE FROM audit_heads WHERE org_id = :o", {"o": admin.org_id}))
    result = _verify(admin.org_id)
    assert (result.ok, result.checked, result.first_broken_seq) == (False, 3, 4) and "no chain head" in result.reason
    _events(admin, 1)
    assert _newest(admin.org_id, 2)[1].action == audit.HEAD_MISMATCH and not _verify(admin.org_id).ok


def test_head_seals_follow_key_rotation(org: tuple[Actor, Actor], app_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = org
    old = os.environ.get("RRC_SECRET_KEYS") or (data_dir() / "secret.key").read_text().strip()
    new = Fernet.generate_key().decode()
    monkeypatch.setenv("RRC_SECRET_KEYS", f"{new},{old}")
    assert _verify(admin.org_id).ok, "a head sealed with the old key is accepted"
    monkeypatch.setenv("RRC_SECRET_KEYS", new)
    assert _verify(admin.org_id).reason.startswith("the chain head was altered"), "the old key was dropped too early"
    monkeypatch.setenv("RRC_SECRET_KEYS", f"{new},{old}")
    result = CliRunner().invoke(cli.app, ["db", "reseal-audit-heads"])
    assert result.exit_code == 0 and "re-sealed 1 audit chain head" in result.output, result.output
    monkeypatch.setenv("RRC_SECRET_KEYS", new)
    assert _verify(admin.org_id).ok
    _as_owner(app_db, ("UPDATE audit_heads SET mac = :m WHERE org_id = :o", {"o": admin.org_id, "m": "0" * 64}))
    result = CliRunner().invoke(cli.app, ["db", "reseal-audit-heads"])
    assert result.exit_code == 1 and f"organization id(s) {admin.org_id}" in result.output, "never re-seals a forgery"
    assert not _verify(admin.org_id).ok


def test_migration_0007_backfills_heads_from_existing_chains(app_db: str) -> None:
    downgrade(app_db, "0006")
    engine = get_engine(app_db)
    engine.dispose()
    assert "audit_heads" not in sa.inspect(engine).get_table_names()
    start = datetime(2026, 1, 5, tzinfo=UTC)
    heads: dict[int, tuple[int, str]] = {}
    with engine.begin() as conn:  # two chains written by the app before 0007, and an org with no entry
        for org_id, count in ((1, 4), (2, 1), (3, 0)):
            conn.execute(sa.insert(Organization.__table__).values(
                id=org_id, slug=f"org-{org_id}", name=f"Org {org_id}", is_demo=False, created_at=start))
            previous = audit.GENESIS
            for seq in range(1, count + 1):
                ts = start + timedelta(minutes=seq)
                details = {"n": seq}
                digest = audit._digest(org_id, seq, ts, "system:test", "test.event", "thing", str(seq), details,
                                       previous)
                conn.execute(sa.insert(AuditEntry.__table__).values(
                    org_id=org_id, seq=seq, ts=ts, actor="system:test", action="test.event", target_type="thing",
                    target_id=str(seq), details=details, prev_hash=previous, hash=digest))
                previous, heads[org_id] = digest, (seq, digest)
    upgrade(app_db)
    with system_session() as session:
        stored = {h.org_id: (h.seq, h.hash) for h in session.scalars(sa.select(AuditHead))}
    assert stored == heads
    assert [_verify(org_id) for org_id in (1, 2, 3)] == [audit.VerifyResult(True, 4), audit.VerifyResult(True, 1),
                                                         audit.VerifyResult(True, 0)]
    _events(Actor.system(1, "test"), 1)  # the app carries on from the backfilled head
    assert _verify(1) == audit.VerifyResult(True, 5)
    _as_owner(app_db, ("DELETE FROM audit_log WHERE org_id = 2", {}))
    assert _verify(2).reason == "entry 1 is missing: the log's head says 1"
