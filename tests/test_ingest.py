"""services.ingest and services.api_keys on SQLite and PostgreSQL: all-or-nothing, idempotent, scoped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pyarrow as pa
import pytest

from core.model import MAX_ID_LENGTH
from db.models import AuditEntry
from db.session import org_session
from services import api_keys, audit, ingest, users
from services.context import Actor
from services.errors import InvalidInput, NotFound, PermissionDenied
from services.ingest import InvalidBatch, UsageEventIn

T0 = datetime(2026, 10, 1, tzinfo=UTC)


@pytest.fixture
def orgs(app_db: str) -> tuple[Actor, Actor, Actor]:
    """Org A's admin and analyst, and org B's admin."""
    org_a, admin_a = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin = Actor.user(org_a.id, admin_a.id, "admin")
    analyst = users.create_user(admin, "analyst@acme.example", "Al", "analyst", "password-2")
    org_b, admin_b = users.create_organization("Beta", "beta", "admin@beta.example", "Bea", "password-3")
    return admin, Actor.user(org_a.id, analyst.id, "analyst"), Actor.user(org_b.id, admin_b.id, "admin")


def event(i: int, *, account: str = "acc_1", product: str = "api_calls", units: str = "1.5",
          ts: datetime | None = None) -> UsageEventIn:
    return UsageEventIn(event_id=f"evt_{i}", account_id=account, product_key=product,
                        ts=ts or T0 + timedelta(hours=i), units=D(units))


def ingest_actor(admin: Actor) -> Actor:
    created = api_keys.create_api_key(admin, "pipeline")
    return api_keys.authenticate_key(created.plaintext)


def test_batch_is_stored_and_a_replay_adds_nothing(orgs: tuple[Actor, Actor, Actor]) -> None:
    admin, analyst, _ = orgs
    actor = ingest_actor(admin)
    batch = [event(i) for i in range(50)]
    assert ingest.ingest(actor, batch) == ingest.IngestResult(accepted=50, duplicates=0)
    assert ingest.ingest(actor, batch) == ingest.IngestResult(accepted=0, duplicates=50)
    overlapping = [event(i) for i in range(40, 60)]
    assert ingest.ingest(actor, overlapping) == ingest.IngestResult(accepted=10, duplicates=10)
    assert ingest.count_events(analyst) == 60
    with org_session(admin.org_id) as session:
        entries = [e for e in audit.list_entries(session, admin.org_id) if e.action == "usage.ingested"]
        assert len(entries) == 3 and entries[0].actor.startswith("api_key:")
        assert audit.verify(session, admin.org_id).ok


def test_repeats_inside_a_batch_count_once_and_conflicting_repeats_are_refused(
        orgs: tuple[Actor, Actor, Actor]) -> None:
    admin, analyst, _ = orgs
    assert ingest.ingest(admin, [event(1), event(1), event(2)]) == ingest.IngestResult(2, 1)
    with pytest.raises(InvalidBatch) as caught:
        ingest.ingest(admin, [event(3), event(3, units="2")])
    assert caught.value.errors == [ingest.EventError(1, "event_id", "also used by event 0 with different content")]
    assert ingest.count_events(analyst) == 2  # nothing of the refused batch


def test_events_are_scoped_to_the_key_org(orgs: tuple[Actor, Actor, Actor]) -> None:
    admin_a, analyst_a, admin_b = orgs
    ingest.ingest(ingest_actor(admin_a), [event(i) for i in range(5)])
    # the same event ids in another org are that org's own events, not duplicates
    assert ingest.ingest(ingest_actor(admin_b), [event(i) for i in range(5)]) == ingest.IngestResult(5, 0)
    assert ingest.count_events(analyst_a) == 5 and ingest.count_events(admin_b) == 5
    table = ingest.export_usage_table(admin_b, T0, T0 + timedelta(days=1))
    assert table.num_rows == 1 and table.column("units").to_pylist() == [D("7.5")]


def test_parse_events_names_every_bad_event_and_field() -> None:
    raw = [
        {"event_id": "e1", "account_id": "a", "product_key": "p", "ts": "2026-10-01T00:00:00Z", "units": "1"},
        {"event_id": "e2", "account_id": "a", "product_key": "p", "ts": "2026-10-01T00:00:00", "units": "1"},
        {"event_id": "e3", "account_id": "", "product_key": "p", "ts": "2026-10-01T00:00:00Z", "units": "-1"},
        {"event_id": "e4", "account_id": "a", "product_key": "p", "ts": "2026-10-01T00:00:00Z", "units": "NaN"},
        {"event_id": "e5", "account_id": "a", "product_key": "p", "ts": "2026-10-01T00:00:00Z", "units": "1",
         "colour": "red"},
        {"event_id": "e6", "account_id": "a", "product_key": "p", "ts": "9999-12-31T23:59:59-14:00", "units": "1"},
        {"event_id": "e7", "account_id": "a\x00", "product_key": "p", "ts": "1969-12-31T23:59:59Z",
         "units": "1e15"},  # the bound of a usage table's units (core.model.MAX_QUANTITY)
        {"event_id": "e8", "account_id": "a", "product_key": "p", "ts": "2026-10-01T00:00:00Z",
         "units": "0.0000000001"},
    ]
    with pytest.raises(InvalidBatch) as caught:
        ingest.parse_events(raw)
    found = {(e.index, e.field) for e in caught.value.errors}
    assert found == {(1, "ts"), (2, "account_id"), (2, "units"), (3, "units"), (4, "colour"), (5, "ts"),
                     (6, "account_id"), (6, "ts"), (6, "units"), (7, "units")}
    assert "timezone" in next(e.reason for e in caught.value.errors if e.field == "ts")
    parsed = ingest.parse_events([{**raw[0], "ts": "2026-10-01T02:00:00+02:00"}])[0]
    assert parsed.units == D("1") and parsed.ts == T0 and parsed.ts.utcoffset() == timedelta(0)
    with pytest.raises(InvalidBatch, match="empty"):
        ingest.parse_events([])
    with pytest.raises(InvalidBatch, match="at most 10000"):
        ingest.parse_events([raw[0]] * (ingest.MAX_BATCH + 1))
    with pytest.raises(InvalidBatch, match="list"):
        ingest.parse_events({"events": []})


def test_ids_are_stored_up_to_the_database_column_and_longer_ones_are_refused_naming_the_field(
        orgs: tuple[Actor, Actor, Actor]) -> None:
    admin, analyst, _ = orgs
    longest = "x" * MAX_ID_LENGTH
    raw = {"event_id": longest, "account_id": longest, "product_key": longest, "ts": "2026-10-01T00:00:00Z",
           "units": "1"}
    assert ingest.ingest(admin, ingest.parse_events([raw])) == ingest.IngestResult(1, 0)
    table = ingest.export_usage_table(analyst, T0, T0 + timedelta(days=1))
    assert table.column("account_id").to_pylist() == [longest] and table.column("product_key").to_pylist() == [longest]
    for field in ("event_id", "account_id", "product_key"):
        with pytest.raises(InvalidBatch) as caught:
            ingest.parse_events([{**raw, "event_id": "e2", field: "y" * (MAX_ID_LENGTH + 1)}])
        assert caught.value.errors == [ingest.EventError(0, field, "String should have at most 200 characters")]
    assert ingest.count_events(analyst) == 1


def test_units_keep_their_precision_and_buckets_are_utc_days(orgs: tuple[Actor, Actor, Actor], app_db: str) -> None:
    admin, analyst, _ = orgs
    # SQLite keeps NUMERIC as a binary float (15 significant digits); PostgreSQL keeps all 38
    big, total = (("123456.123456789", "123456.123456790") if app_db.startswith("sqlite")
                  else ("123456789.123456789", "123456789.123456790"))
    paris_midnight = datetime.fromisoformat("2026-10-02T00:30:00+02:00")  # 2026-10-01 22:30 UTC
    ingest.ingest(admin, [
        event(1, units="0.000000001", ts=T0),
        event(2, units=big, ts=T0 + timedelta(hours=5)),
        event(3, units="2", ts=paris_midnight),
        event(4, units="10", ts=T0 + timedelta(days=1)),
        event(5, units="3", product="seats", ts=T0 + timedelta(days=1, hours=1)),
        event(6, units="99", ts=T0 + timedelta(days=2)),  # outside [start, end)
        event(7, units="5", account="acc_0", ts=T0 - timedelta(seconds=1)),  # before start
    ])
    table = ingest.export_usage_table(analyst, T0, T0 + timedelta(days=2))
    assert table.schema == ingest.BUCKET_SCHEMA
    assert table.to_pylist() == [
        {"account_id": "acc_1", "product_key": "api_calls", "ts": T0, "units": D(total) + 2},
        {"account_id": "acc_1", "product_key": "api_calls", "ts": T0 + timedelta(days=1), "units": D("10")},
        {"account_id": "acc_1", "product_key": "seats", "ts": T0 + timedelta(days=1), "units": D("3")},
    ]
    empty = ingest.export_usage_table(analyst, T0 + timedelta(days=30), T0 + timedelta(days=31))
    assert empty.num_rows == 0 and empty.schema == ingest.BUCKET_SCHEMA
    with pytest.raises(InvalidInput, match="start"):
        ingest.export_usage_table(analyst, datetime(2026, 10, 1), T0)
    with pytest.raises(InvalidInput, match="end"):
        ingest.export_usage_table(analyst, T0, T0)
    assert isinstance(table, pa.Table)


def test_roles_for_ingest(orgs: tuple[Actor, Actor, Actor]) -> None:
    admin, analyst, _ = orgs
    with pytest.raises(PermissionDenied):
        ingest.ingest(analyst, [event(1)])
    key_actor = ingest_actor(admin)
    with pytest.raises(PermissionDenied):
        ingest.export_usage_table(key_actor, T0, T0 + timedelta(days=1))  # an ingest key cannot read usage
    with pytest.raises(InvalidInput, match="UsageEventIn"):
        ingest.ingest(admin, [{"event_id": "x"}])  # type: ignore[list-item]


@pytest.mark.slow
def test_api_keys_are_hashed_shown_once_masked_and_revocable(orgs: tuple[Actor, Actor, Actor], app_db: str) -> None:
    admin, analyst, admin_b = orgs
    created = api_keys.create_api_key(admin, " warehouse ")
    assert created.plaintext.startswith(f"rrc_{created.prefix}_") and created.name == "warehouse"
    listed = api_keys.list_api_keys(admin)
    assert [(k.id, k.masked, k.active) for k in listed] == [(created.id, f"rrc_{created.prefix}_…", True)]
    with org_session(admin.org_id) as session:
        from db.models import ApiKey

        row = session.get(ApiKey, created.id)
        assert row is not None and created.plaintext not in (row.key_hash, row.prefix)
        logged = " ".join(str(e.details) for e in session.query(AuditEntry).all())
        assert created.plaintext not in logged
    actor = api_keys.authenticate_key(created.plaintext)
    assert (actor.org_id, actor.role, actor.label) == (admin.org_id, "ingest", f"api_key:{created.id}")
    assert api_keys.list_api_keys(admin)[0].last_used_at is not None
    for bad in ("", "rrc_", created.plaintext + "x", created.plaintext.replace("rrc_", "rrk_"), "rrc_abcdefgh_x"):
        with pytest.raises(api_keys.InvalidCredentials):
            api_keys.authenticate_key(bad)
    with pytest.raises(PermissionDenied):
        api_keys.create_api_key(analyst, "nope")
    with pytest.raises(PermissionDenied):
        api_keys.list_api_keys(analyst)
    with pytest.raises(NotFound):
        api_keys.revoke_api_key(admin_b, created.id)  # another org's key does not exist for them
    with pytest.raises(InvalidInput, match="name"):
        api_keys.create_api_key(admin, "  ")
    assert not api_keys.revoke_api_key(admin, created.id).active
    with pytest.raises(api_keys.InvalidCredentials):
        api_keys.authenticate_key(created.plaintext)


@pytest.mark.slow
def test_user_tokens(orgs: tuple[Actor, Actor, Actor], monkeypatch: pytest.MonkeyPatch) -> None:
    admin, analyst, _ = orgs
    issued = api_keys.issue_user_token("analyst@acme.example", "password-2")
    assert api_keys.authenticate_user_token(issued.access_token) == analyst
    payload, _, signature = issued.access_token.partition(".")
    for bad in ("", "x", f"{payload}.", f"{payload}.{signature[:-2]}AA", f"e30.{signature}"):
        with pytest.raises(api_keys.InvalidCredentials):
            api_keys.authenticate_user_token(bad)
    with pytest.raises(api_keys.InvalidCredentials, match="wrong email or password"):
        api_keys.issue_user_token("analyst@acme.example", "wrong-password")
    users.set_role(admin, analyst.user_id, "admin")  # role changes apply to existing tokens at once
    assert api_keys.authenticate_user_token(issued.access_token).role == "admin"
    users.set_active(admin, analyst.user_id, False)
    with pytest.raises(api_keys.InvalidCredentials):
        api_keys.authenticate_user_token(issued.access_token)
    monkeypatch.setenv("RRC_API_TOKEN_TTL", "1")
    short = api_keys.issue_user_token("admin@acme.example", "password-1")
    monkeypatch.setattr(api_keys.time, "time", lambda: short.expires_at.timestamp() + 5)
    with pytest.raises(api_keys.InvalidCredentials, match="expired"):
        api_keys.authenticate_user_token(short.access_token)


def test_text_that_copy_would_have_to_escape_is_stored_verbatim(orgs: tuple[Actor, Actor, Actor]) -> None:
    admin, analyst, _ = orgs
    odd = ["back\\slash", "quote'\"", "unicodé ✓", "comma,semi;", r"\N", "pipe|percent%"]
    ingest.ingest(admin, [event(i, account=name) for i, name in enumerate(odd)])
    table = ingest.export_usage_table(analyst, T0, T0 + timedelta(days=1))
    assert sorted(table.column("account_id").to_pylist()) == sorted(odd)
