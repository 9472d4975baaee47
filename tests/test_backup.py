"""export-org / import-org round trips on SQLite and PostgreSQL, with the audit chain intact."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import cli
from core.demo import generate_demo_bundle
from db.models import TENANT_TABLES, Account, Action, Anomaly, AuditEntry, Organization, ReconRun
from db.session import get_engine, org_session, system_session, upgrade
from services import api_keys, audit, ingest, integrations, orgs_backup, reconciliation, settings, users
from services.anomalies import set_status
from services.context import Actor
from services.errors import Conflict, InvalidInput, PermissionDenied
from tests.bundles import Scenario

STRIPE = {"api_key": "sk_test_abcdefghijklmnop1234"}


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo bundle (every anomaly type) shared by the module's tests."""
    folder = tmp_path_factory.mktemp("bundle") / "demo"
    generate_demo_bundle(folder, accounts=6, seed=3)
    return folder


@dataclass
class Populated:
    admin: Actor
    analyst: Actor
    api_key: str


def populate(slug: str, bundle: Path) -> Populated:
    """An organization with something in every table an export covers."""
    org, admin_user = users.create_organization(slug.title(), slug, f"admin@{slug}.example", "Ann", "password-1")
    admin = Actor.user(org.id, admin_user.id, "admin")
    analyst_user = users.create_user(admin, f"analyst@{slug}.example", "Al", "analyst", "password-2")
    analyst = Actor.user(org.id, analyst_user.id, "analyst")
    integrations.connect(admin, "stripe", STRIPE)
    key = api_keys.create_api_key(admin, "warehouse")
    events = ingest.parse_events([{"event_id": f"e{i}", "account_id": "acct-1", "product_key": "api_calls",
                                   "ts": "2026-10-01T10:00:00Z", "units": "12.5"} for i in range(3)])
    ingest.ingest(api_keys.authenticate_key(key.plaintext), events)
    settings.set_data_source(admin, {"kind": "bundle", "path": str(bundle)})
    settings.update_schedule(admin, "cron", "0 6 * * 1", "Europe/Paris")
    reconciliation.run_reconciliation(analyst)
    with org_session(org.id) as session:
        anomaly_ids = list(session.scalars(sa.select(Anomaly.id).order_by(Anomaly.id)))
    set_status(analyst, anomaly_ids[0], "dismissed", "known contract exception")
    with org_session(org.id) as session:
        session.add(Action(org_id=org.id, anomaly_id=anomaly_ids[1], kind="draft_invoice", status="succeeded",
                           idempotency_key=f"{slug}-{uuid.uuid4().hex}", external_id="in_123",
                           amount=Decimal("120.50"), currency="usd", request={"lines": 1}, response={"id": "in_123"},
                           created_by=analyst.user_id))
        audit.append(session, analyst, "action.draft_invoice", "anomaly", anomaly_ids[1], {"amount": "120.50"})
    return Populated(admin, analyst, key.plaintext)


@pytest.fixture
def other_db(app_db: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second, migrated, empty app database next to `app_db` (same secret keys: same installation)."""
    if app_db.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'data' / 'other.db'}"
        upgrade(url)
        yield url
        return
    base = request.getfixturevalue("pg_url")
    name = f"rrc_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def jsonl(path: Path, table: str) -> list[dict]:
    with zipfile.ZipFile(path) as archive:
        return [json.loads(line) for line in archive.read(f"{table}.jsonl").splitlines()]


def edited(archive: Path, out: Path, item: str, edit: Callable[[bytes], bytes], fix_checksum: bool = True) -> Path:
    """A copy of `archive` with file `item` edited; with `fix_checksum` its manifest is rewritten to match, as
    whoever edits an archive on purpose would do (`item` may be the manifest itself)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        for name in src.namelist():
            if name == "manifest.json":
                continue
            data = src.read(name)
            if name == item:
                data = edit(data)
                if fix_checksum:
                    manifest["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
                    manifest["files"][name]["rows"] = len(data.splitlines())
            dst.writestr(name, data)
        data = json.dumps(manifest).encode()
        dst.writestr("manifest.json", edit(data) if item == "manifest.json" else data)
    return out


def line_edited(number: int, **changes: object) -> Callable[[bytes], bytes]:
    """An edit of a JSON-lines file: line `number` (from 1) gets `changes`."""
    def edit(data: bytes) -> bytes:
        lines = data.splitlines(keepends=True)
        lines[number - 1] = (json.dumps({**json.loads(lines[number - 1]), **changes}) + "\n").encode()
        return b"".join(lines)
    return edit


def line_added(**changes: object) -> Callable[[bytes], bytes]:
    """An edit of a JSON-lines file: a copy of its last line, with `changes`, is appended."""
    def edit(data: bytes) -> bytes:
        last = json.loads(data.splitlines()[-1])
        return data + (json.dumps({**last, **changes}) + "\n").encode()
    return edit


def source_edited(**changes: object) -> Callable[[bytes], bytes]:
    """An edit of manifest.json: its `source` gets `changes`."""
    def edit(data: bytes) -> bytes:
        manifest = json.loads(data)
        return json.dumps({**manifest, "source": {**manifest["source"], **changes}}).encode()
    return edit


def many_events(count: int) -> Callable[[bytes], bytes]:
    """An edit of usage_events.jsonl: `count` events, copies of its first with ids and event ids of their own."""
    def edit(data: bytes) -> bytes:
        first = json.loads(data.splitlines()[0])
        return b"".join((json.dumps({**first, "id": first["id"] + i, "event_id": f"evt-{i:09d}"}) + "\n").encode()
                        for i in range(count))
    return edit


def chained(*edits: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """The edits one after the other."""
    def edit(data: bytes) -> bytes:
        for step in edits:
            data = step(data)
        return data
    return edit


def chain_ok(org_id: int) -> audit.VerifyResult:
    with org_session(org_id) as session:
        return audit.verify(session, org_id)


@pytest.mark.slow
def test_round_trip_into_an_empty_database_keeps_everything(app_db: str, other_db: str, demo_bundle: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = populate("acme", demo_bundle)
    archive = tmp_path / "acme.zip"
    exported = orgs_backup.export_org(source.admin, archive)
    assert exported.rows["users"] == 2 and exported.rows["usage_events"] == 3 and exported.rows["anomalies"] > 2
    assert all(exported.rows[t] >= 1 for t, _ in orgs_backup.TABLES)
    assert "password-1" not in archive.read_bytes().decode("latin-1")
    assert STRIPE["api_key"] not in json.dumps(jsonl(archive, "integrations")), "secrets stay encrypted"
    assert source.api_key not in json.dumps(jsonl(archive, "api_keys")), "only key hashes"

    monkeypatch.setenv("DATABASE_URL", other_db)
    result = orgs_backup.import_org(archive)
    assert result.ids_kept and result.org_id == source.admin.org_id and result.slug == "acme"
    assert result.rows == exported.rows and result.undecryptable_integrations == 0
    assert chain_ok(result.org_id).ok
    again = orgs_backup.export_org(Actor.system(result.org_id, "test"), tmp_path / "again.zip")
    for table, _model in orgs_backup.TABLES:
        if table not in ("audit_log", "audit_heads"):
            assert jsonl(again.path, table) == jsonl(archive, table), table
    before, after = jsonl(archive, "audit_log"), jsonl(again.path, "audit_log")
    assert after[:len(before)] == before, "the chain is the same, hash for hash"
    for path, entries in ((archive, before), (again.path, after)):  # the head moves with the log
        (head,) = jsonl(path, "audit_heads")
        assert (head["seq"], head["hash"]) == (entries[-1]["seq"], entries[-1]["hash"])
    assert [e["action"] for e in after[len(before):]] == ["organization.imported", "organization.exported"]
    assert after[len(before)]["details"]["source_audit_head"] == before[-1]["hash"]
    # the restored organization works: sign-in, API key, decrypted integration, new audit entries, new rows
    assert users.authenticate("analyst@acme.example", "password-2").org_id == result.org_id
    assert api_keys.authenticate_key(source.api_key).org_id == result.org_id
    assert integrations.get_config(source.admin, "stripe") == STRIPE
    run = reconciliation.run_reconciliation(source.admin)
    assert run.status == "succeeded" and run.id > max(r["id"] for r in jsonl(archive, "recon_runs"))
    assert chain_ok(result.org_id).ok


@pytest.mark.slow
def test_import_next_to_other_organizations_shifts_ids_and_reseals_the_chain(
        app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = populate("acme", demo_bundle)
    archive = orgs_backup.export_org(source.admin, tmp_path / "acme.zip").path
    monkeypatch.setenv("DATABASE_URL", other_db)
    other = populate("other", demo_bundle)  # takes the same ids the archive uses
    near_limit = edited(archive, tmp_path / "near.zip", "api_keys.jsonl", line_added(id=2 ** 31 - 1, key_hash="f" * 64))
    with pytest.raises(InvalidInput, match=r"^api_keys\.jsonl: ids up to 2147483647 would move by \d+ to come after "
                       r"this database's ids, past 2147483647, the highest id the column holds"):
        orgs_backup.import_org(near_limit, new_slug="acme-restored")  # PostgreSQL: "integer out of range"
    result = orgs_backup.import_org(archive, new_slug="acme-restored", new_name="Acme (restored)")
    assert not result.ids_kept and result.org_id != source.admin.org_id and result.notes
    assert chain_ok(result.org_id).ok and chain_ok(other.admin.org_id).ok
    with system_session() as session:
        org = session.get(Organization, result.org_id)
        assert (org.slug, org.name) == ("acme-restored", "Acme (restored)")
        runs = {r.id for r in session.scalars(sa.select(ReconRun).where(ReconRun.org_id == result.org_id))}
        anomalies = list(session.scalars(sa.select(Anomaly).where(Anomaly.org_id == result.org_id)))
        assert anomalies and all(a.first_run_id in runs and a.last_run_id in runs for a in anomalies)
        action = session.scalars(sa.select(Action).where(Action.org_id == result.org_id)).one()
        assert action.anomaly_id in {a.id for a in anomalies}
        dismissed = next(a for a in anomalies if a.status == "dismissed")
        analyst = users.get_user_by_email("analyst@acme.example")
        assert analyst is not None and analyst.org_id == result.org_id
        assert dismissed.status_changed_by == analyst.id
        entries = list(session.scalars(sa.select(AuditEntry).where(AuditEntry.org_id == result.org_id)
                                       .order_by(AuditEntry.seq)))
    dismissal = next(e for e in entries if e.action == "anomaly.dismissed")
    assert (dismissal.target_id, dismissal.actor) == (str(dismissed.id), f"user:{analyst.id}"), "references follow"
    imported = entries[-1]
    assert imported.action == "organization.imported" and imported.details["ids_kept"] is False
    assert imported.details["source_audit_head"] == jsonl(archive, "audit_log")[-1]["hash"]
    assert users.authenticate("admin@acme.example", "password-1").org_id == result.org_id


def test_a_conflicting_or_altered_archive_is_refused_and_nothing_is_written(
        app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = populate("acme", demo_bundle)
    archive = orgs_backup.export_org(source.admin, tmp_path / "acme.zip").path
    with pytest.raises(Conflict, match="slug"):
        orgs_backup.import_org(archive)
    with pytest.raises(Conflict, match=r"users: email already in use.*admin@acme\.example"):
        orgs_backup.import_org(archive, new_slug="acme-copy")
    with pytest.raises(InvalidInput, match="slug"):
        orgs_backup.import_org(archive, new_slug="Not A Slug")

    def altered(name: str, edit: Callable[[bytes], bytes], fix_checksum: bool) -> Path:
        return edited(archive, tmp_path / f"{name}.zip", "audit_log.jsonl", edit, fix_checksum)

    tamper = line_edited(3, details={"email": "mallory@evil.example", "role": "admin"})

    monkeypatch.setenv("DATABASE_URL", other_db)
    with pytest.raises(InvalidInput, match="checksum"):
        orgs_backup.import_org(altered("damaged", tamper, fix_checksum=False))
    with pytest.raises(InvalidInput, match="entry 3 was changed"):
        orgs_backup.import_org(altered("forged", tamper, fix_checksum=True))
    with pytest.raises(InvalidInput, match="broken at entry 2"):
        orgs_backup.import_org(altered("cut", lambda d: b"".join(d.splitlines(keepends=True)[0:1] +
                                                                    d.splitlines(keepends=True)[2:]), True))
    newest = jsonl(archive, "audit_heads")[0]["seq"]
    with pytest.raises(InvalidInput, match=f"entry {newest} is missing: the archive's audit head says {newest}"):
        orgs_backup.import_org(altered("newest cut", lambda d: b"".join(d.splitlines(keepends=True)[:-1]), True))
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    with pytest.raises(InvalidInput, match="not a zip file"):
        orgs_backup.import_org(not_zip)
    with system_session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Organization)) == 0


def test_an_edited_row_is_refused_naming_line_column_and_value_even_with_rewritten_checksums(
        app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's checksums are the archive's own word: each value is checked against what the database would
    refuse (a raw database error) or silently change (1.5 stored as 2), and nothing is written."""
    source = populate("acme", demo_bundle)
    archive = orgs_backup.export_org(source.admin, tmp_path / "acme.zip").path
    assert [user["role"] for user in jsonl(archive, "users")] == ["admin", "analyst"]
    user_id, org_id = jsonl(archive, "users")[0]["id"], source.admin.org_id
    (run,) = jsonl(archive, "recon_runs")
    event = jsonl(archive, "usage_events")[0]["event_id"]
    whole = "a whole number from -2147483648 to 2147483647"
    money = "a decimal number of at most 14 digits before the point and 6 after"

    def two_runs(status: str) -> Callable[[bytes], bytes]:
        return chained(line_edited(1, status=status), line_added(id=run["id"] + 1, status=status))

    refusals: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
        # the CHECK constraints' rules
        "role": ("users", line_edited(2, role="owner"),
                 'users.jsonl line 2: column role: "owner" is not one of admin, analyst'),
        "negative": ("users", line_edited(1, failed_logins=-1),
                     "users.jsonl line 1: column failed_logins: -1 is not a number >= 0"),
        "status": ("anomalies", line_edited(3, status="paid"), 'anomalies.jsonl line 3: column status: "paid" is not '
                   "one of open, dismissed, actioned, recovered, resolved"),
        "confidence": ("anomalies", line_edited(1, confidence="7"),
                       'anomalies.jsonl line 1: column confidence: "7" is not a number >= 0 and <= 1'),
        "leak": ("anomalies", line_edited(2, leak_amount="-5.00"),
                 'anomalies.jsonl line 2: column leak_amount: "-5.00" is not a number >= 0'),
        "kind": ("actions", line_edited(1, kind="refund"), 'actions.jsonl line 1: column kind: "refund" is not one of '
                 "draft_invoice, salesforce_task, hubspot_task"),
        # the column types
        "long name": ("users", line_edited(1, name="N" * 300), 'users.jsonl line 1: column name: "' + "N" * 49 +
                      "… is not text of at most 200 characters (it has 300)"),
        "no name": ("users", line_edited(2, name=None),
                    "users.jsonl line 2: column name: null is not text of at most 200 characters"),
        "no status": ("anomalies", line_edited(1, status=None),
                      "anomalies.jsonl line 1: column status: null is not text of at most 16 characters"),
        "no evidence": ("anomalies", line_edited(2, evidence=None),
                        "anomalies.jsonl line 2: column evidence: null is not a JSON value other than null"),
        "NaN": ("anomalies", line_edited(1, evidence={"units": float("nan")}),
                'anomalies.jsonl line 1: column evidence: {"units": NaN} is not a JSON value other than null'),
        "NUL": ("users", line_edited(1, name="Ann\x00"), 'users.jsonl line 1: column name: "Ann\\u0000" is '
                "not text of at most 200 characters (PostgreSQL stores no NUL character)"),
        "fraction": ("users", line_edited(1, failed_logins=1.5),
                     f"users.jsonl line 1: column failed_logins: 1.5 is not {whole}"),
        "true count": ("users", line_edited(1, failed_logins=True),
                       f"users.jsonl line 1: column failed_logins: true is not {whole}"),
        "huge count": ("users", line_edited(1, failed_logins=2 ** 31),
                       f"users.jsonl line 1: column failed_logins: 2147483648 is not {whole}"),
        "text boolean": ("users", line_edited(2, active="yes"),
                         'users.jsonl line 2: column active: "yes" is not true or false'),
        "number boolean": ("users", line_edited(2, active=1),
                           "users.jsonl line 2: column active: 1 is not true or false"),
        "rounded money": ("anomalies", line_edited(2, leak_amount="1.0000001"), 'anomalies.jsonl line 2: column '
                          f'leak_amount: "1.0000001" is not {money} (the database would round it)'),
        "big money": ("actions", line_edited(1, amount=123456789012345.5),
                      f"actions.jsonl line 1: column amount: 123456789012345.5 is not {money} (too large)"),
        "rounded units": ("usage_events", line_edited(3, units="12.5000000001"), 'usage_events.jsonl line 3: column '
                          'units: "12.5000000001" is not a decimal number of at most 29 digits before the point and 9 '
                          "after (the database would round it)"),
        "no offset": ("users", line_edited(1, created_at="2026-01-01T10:00:00"), 'users.jsonl line 1: column '
                      'created_at: "2026-01-01T10:00:00" is not an ISO 8601 timestamp with a UTC offset'),
        "text progress": ("recon_runs", line_edited(1, progress="1"),
                          'recon_runs.jsonl line 1: column progress: "1" is not a finite number'),
        # the unique constraints and indexes among the archive's rows; the references between its files
        "two running": ("recon_runs", two_runs("running"), 'recon_runs.jsonl lines 1 and 2: both have status '
                        '"running": expected at most one such row per organization (ux_recon_runs_one_running)'),
        "two queued": ("recon_runs", two_runs("queued"), 'recon_runs.jsonl lines 1 and 2: both have status '
                       '"queued": expected at most one such row per organization (ux_recon_runs_one_queued)'),
        "same id": ("users", line_edited(2, id=user_id),
                    f"users.jsonl lines 1 and 2: both have id {user_id}: expected each id once"),
        "same event": ("usage_events", line_edited(2, event_id=event), f'usage_events.jsonl lines 1 and 2: both have '
                       f'event_id "{event}": expected each event_id once per organization'),
        "two organizations": ("organizations", line_added(slug="acme-2"),
                              "organizations.jsonl lines 1 and 2: expected at most one row per organization"),
        "no organization": ("organizations", lambda data: b"",
                            "organizations.jsonl: expected the organization's row, found none"),
        "dangling": ("recon_runs", line_edited(1, created_by=user_id + 1000),
                     f"recon_runs.jsonl line 1: column created_by: {user_id + 1000} is not the id of a row in "
                     "users.jsonl"),
        "two heads": ("audit_heads", line_added(),
                      "audit_heads.jsonl lines 1 and 2: expected at most one row per organization"),
        "org settings": ("org_settings", line_edited(1, schedule_kind="hourly"), 'org_settings.jsonl line 1: column '
                         'schedule_kind: "hourly" is not one of off, cron, interval'),
        # a type the rule's column refuses is the column's refusal: the rule compares numbers only
        "true confidence": ("anomalies", line_edited(1, confidence=True), "anomalies.jsonl line 1: column confidence: "
                            "true is not a decimal number of at most 1 digit before the point and 3 after"),
        # the organization: every row's, the manifest's (else ids kept or shifted by it would collide), its name
        "org id": ("organizations", line_edited(1, id=org_id + 1000), f"organizations.jsonl line 1: column id: "
                   f"{org_id + 1000} is not {org_id}, the exported organization's id (manifest.json source.org_id)"),
        "manifest org id": ("manifest", source_edited(org_id=org_id + 1000), f"organizations.jsonl line 1: column id: "
                            f"{org_id} is not {org_id + 1000}, the exported organization's id (manifest.json "
                            "source.org_id)"),
        "row of another org": ("users", line_edited(2, org_id=org_id + 1000), f"users.jsonl line 2: column org_id: "
                               f"{org_id + 1000} is not {org_id}, the exported organization's id (manifest.json "
                               "source.org_id)"),
        "text org id": ("manifest", source_edited(org_id="1"), f"archive {tmp_path / 'text org id.zip'}: manifest"
                        '.json: source.org_id: "1" is not an organization id (a whole number from 1 to 2147483647)'),
        "blank org name": ("organizations", line_edited(1, name="   "),
                           "organizations.jsonl line 1: column name: required"),
    }
    monkeypatch.setenv("DATABASE_URL", other_db)
    for name, (table, edit, message) in refusals.items():
        item = "manifest.json" if table == "manifest" else f"{table}.jsonl"
        forged = edited(archive, tmp_path / f"{name}.zip", item, edit)
        with pytest.raises(InvalidInput) as refused:
            orgs_backup.import_org(forged)
        assert str(refused.value) == message, name
    with pytest.raises(InvalidInput) as refused:
        orgs_backup.import_org(archive, new_name="N" * 201)
    assert str(refused.value) == 'name: "' + "N" * 49 + "… is not text of at most 200 characters (it has 201)"
    for blank in ("", "   "):  # as users.create_organization refuses it
        with pytest.raises(InvalidInput, match=r"^name: required$"):
            orgs_backup.import_org(archive, new_name=blank)
    result = CliRunner().invoke(cli.app, ["import-org", str(tmp_path / "long name.zip")])
    assert result.exit_code == 2 and refusals["long name"][2] in " ".join(result.output.split())
    with get_engine(other_db).connect() as conn:
        assert {table: conn.execute(sa.select(sa.func.count()).select_from(model.__table__)).scalar_one()
                for table, model in orgs_backup.TABLES} == {table: 0 for table, _ in orgs_backup.TABLES}


def test_export_reads_one_snapshot_while_a_run_is_stored(app_db: str, other_db: str, demo_bundle: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduled run that starts and stores its findings while an export reads (as reconciliation does: no audit
    entry, so nothing the export locks keeps it out) is wholly out of the archive, not half in it."""
    source = populate("acme", demo_bundle)
    read_rows = orgs_backup._rows_of
    stored: list[int] = []

    def rows_of(session: sa.orm.Session, table: str, org_id: int) -> Iterator[dict]:
        yield from read_rows(session, table, org_id)
        if table == "recon_runs":  # committed between the reads of the runs and of the anomalies that point at them
            with system_session() as other:
                run = ReconRun(org_id=org_id, trigger="schedule", status="running")
                other.add(run)
                other.flush()
                other.execute(sa.update(Anomaly).where(Anomaly.org_id == org_id).values(last_run_id=run.id))
                stored.append(run.id)

    monkeypatch.setattr(orgs_backup, "_rows_of", rows_of)
    exported = orgs_backup.export_org(source.admin, tmp_path / "acme.zip")
    with system_session() as session:
        assert set(session.scalars(sa.select(Anomaly.last_run_id))) == set(stored) != set(), "the write happened"
    runs = {run["id"] for run in jsonl(exported.path, "recon_runs")}
    assert stored[0] not in runs and {a["last_run_id"] for a in jsonl(exported.path, "anomalies")} <= runs
    assert jsonl(exported.path, "audit_log")[-1]["action"] == "organization.exported", "the entry is in the snapshot"
    monkeypatch.setenv("DATABASE_URL", other_db)
    assert orgs_backup.import_org(exported.path).rows == exported.rows


def test_an_import_reads_each_file_in_one_checking_pass_with_little_memory_per_row(
        app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids, spans, references and unique keys come from one pass before the insert's (the checksum's is the
    third); unique keys cost 8 bytes per row and key, not a dict entry of the values (was ~400 bytes per event)."""
    archive = orgs_backup.export_org(populate("acme", demo_bundle).admin, tmp_path / "acme.zip").path
    opened: Counter[str] = Counter()
    open_member = zipfile.ZipFile.open

    def counting(self: zipfile.ZipFile, name: str, *args: object, **kwargs: object) -> object:
        opened[name] += 1
        return open_member(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting)
    monkeypatch.setenv("DATABASE_URL", other_db)
    orgs_backup.import_org(archive)
    assert {name: count for name, count in opened.items() if name != "manifest.json"} == {
        f"{table}.jsonl": 2 if table in orgs_backup.KEPT else 3 for table, _ in orgs_backup.TABLES}

    def peak(events: int) -> int:
        """Peak bytes allocated by the checking pass over `events` usage events."""
        forged = orgs_backup._Archive(edited(archive, tmp_path / f"{events}.zip", "usage_events.jsonl",
                                             many_events(events)))
        tracemalloc.start()
        try:
            facts = orgs_backup._check_file(forged, "usage_events", {})
            assert facts.span is not None and facts.span[1] - facts.span[0] == events - 1
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    per_event = (peak(40_000) - peak(20_000)) / 20_000
    assert per_event < 40, f"{per_event:.0f} bytes per event"


def test_a_digest_collision_costs_a_second_reading_never_a_wrong_refusal(
        app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = orgs_backup.export_org(populate("acme", demo_bundle).admin, tmp_path / "acme.zip").path
    event = jsonl(archive, "usage_events")[0]["event_id"]
    compact, second_readings = orgs_backup._compact, Counter[str]()

    def colliding(key: orgs_backup._UniqueKey, row: dict) -> int | None:
        value = compact(key, row)
        return value if value is None or key.exact else 7  # every text key's digest is the same

    reread = orgs_backup._refuse_duplicate

    def counting(archive: orgs_backup._Archive, table: str, repeated: list[set[int]]) -> None:
        second_readings[table] += 1
        reread(archive, table, repeated)

    monkeypatch.setattr(orgs_backup, "_compact", colliding)
    monkeypatch.setattr(orgs_backup, "_refuse_duplicate", counting)
    monkeypatch.setenv("DATABASE_URL", other_db)
    forged = edited(archive, tmp_path / "same.zip", "usage_events.jsonl", line_edited(3, event_id=event))
    with pytest.raises(InvalidInput) as refused:
        orgs_backup.import_org(forged)
    assert str(refused.value) == (f'usage_events.jsonl lines 1 and 3: both have event_id "{event}": expected each '
                                  "event_id once per organization")
    result = orgs_backup.import_org(archive)
    assert result.rows["usage_events"] == 3 and second_readings["users"] == 2 and second_readings["usage_events"] == 2


def test_values_the_database_stores_unchanged_pass_the_checks_up_to_their_bounds() -> None:
    """The checks are no stricter than the columns: what fits exactly passes, one step beyond is refused."""
    def value(table: str, column: str, raw: object) -> object:
        return orgs_backup._from_json(table, 1, column, raw)

    accepted = [
        ("anomalies", "leak_amount", "99999999999999.999999", Decimal("99999999999999.999999")),
        ("anomalies", "leak_amount", "1.50000000", Decimal("1.5")),  # zeros past the scale: nothing is rounded
        ("anomalies", "leak_amount", 120.5, Decimal("120.5")),
        ("usage_events", "units", "0E-9", Decimal(0)),  # how str() writes a stored zero of scale 9
        ("usage_events", "units", "1" * 29 + "." + "1" * 9, Decimal("1" * 29 + "." + "1" * 9)),  # 38 digits
        ("usage_events", "id", 2 ** 63 - 1, 2 ** 63 - 1),
        ("users", "failed_logins", 2 ** 31 - 1, 2 ** 31 - 1),
        ("users", "name", "Zoë " * 50, "Zoë " * 50),
        ("users", "locked_until", None, None),
        ("users", "sessions_valid_after", "2026-03-02T09:41:07.123456+00:00",
         datetime(2026, 3, 2, 9, 41, 7, 123456, tzinfo=UTC)),
        ("recon_runs", "progress", 1, 1.0),
    ]
    for table, column, raw, expected in accepted:
        assert value(table, column, raw) == expected, (table, column, raw)
    refused = [("anomalies", "leak_amount", "100000000000000"), ("anomalies", "leak_amount", "0.0000001"),
               ("anomalies", "leak_amount", "1_000"), ("anomalies", "leak_amount", "NaN"),
               ("anomalies", "leak_amount", " 1"), ("anomalies", "leak_amount", float("inf")),
               ("usage_events", "id", 2 ** 63), ("users", "failed_logins", -2 ** 31 - 1), ("users", "name", "N" * 201),
               ("users", "id", None), ("recon_runs", "progress", float("nan"))]
    for table, column, raw in refused:
        with pytest.raises(InvalidInput, match=f"^{table}.jsonl line 1: column {column}: "):
            value(table, column, raw)


def test_only_admins_export_and_output_must_be_a_zip(app_db: str, demo_bundle: Path, tmp_path: Path) -> None:
    source = populate("acme", demo_bundle)
    with pytest.raises(PermissionDenied):
        orgs_backup.export_org(source.analyst, tmp_path / "a.zip")
    with pytest.raises(InvalidInput, match="zip"):
        orgs_backup.export_org(source.admin, tmp_path / "a.tar")
    assert list(tmp_path.glob("*.zip")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_cli_export_and_import(app_db: str, other_db: str, demo_bundle: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    populate("acme", demo_bundle)
    runner = CliRunner()
    out = tmp_path / "acme.zip"
    result = runner.invoke(cli.app, ["export-org", "--org", "acme", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.exists()
    assert runner.invoke(cli.app, ["export-org", "--org", "nope", str(out)]).exit_code == 2
    monkeypatch.setenv("DATABASE_URL", other_db)
    result = runner.invoke(cli.app, ["import-org", str(out)])
    assert result.exit_code == 0, result.output
    assert "imported organization 'acme'" in result.output and "verifies" in result.output
    again = runner.invoke(cli.app, ["import-org", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_every_tenant_table_is_in_the_archive() -> None:
    """A new tenant table must be added to the backup, or restores would silently lose it."""
    assert {table for table, _ in orgs_backup.TABLES} == {"organizations", *TENANT_TABLES}


def test_a_log_that_recorded_a_head_mismatch_is_restored_as_it_is(app_db: str, other_db: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    org, admin_user = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    with get_engine(app_db).begin() as conn:  # entries 1..2; a head seal edited by hand
        conn.execute(sa.text("UPDATE audit_heads SET mac = :m WHERE org_id = :o"), {"m": "0" * 64, "o": org.id})
    archive = orgs_backup.export_org(Actor.user(org.id, admin_user.id, "admin"), tmp_path / "acme.zip").path
    assert [e["action"] for e in jsonl(archive, "audit_log")][2:] == [audit.HEAD_MISMATCH, "organization.exported"]
    monkeypatch.setenv("DATABASE_URL", other_db)
    result = orgs_backup.import_org(archive)
    assert any("records at entry 3 that its head did not match" in note for note in result.notes), result.notes
    verdict = chain_ok(result.org_id)
    assert (verdict.ok, verdict.first_broken_seq) == (False, 3) and "the chain head was altered" in verdict.reason


def test_a_revoked_session_stays_revoked_in_the_restored_organization(app_db: str, other_db: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`users.sessions_valid_after` travels with the users: a token issued before a deactivation is refused after
    the reactivation in the database the organization was restored into too (same installation, same token key)."""
    org, admin_user = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin = Actor.user(org.id, admin_user.id, "admin")
    analyst = users.create_user(admin, "analyst@acme.example", "Al", "analyst", "password-2")
    old = api_keys.issue_user_token("analyst@acme.example", "password-2").access_token
    users.set_active(admin, analyst.id, False)
    users.set_active(admin, analyst.id, True)
    revoked_at = users.get_user_by_email("analyst@acme.example").sessions_valid_after  # type: ignore[union-attr]
    assert revoked_at is not None
    archive = orgs_backup.export_org(admin, tmp_path / "acme.zip").path
    exported = {row["email"]: row["sessions_valid_after"] for row in jsonl(archive, "users")}
    assert exported == {"admin@acme.example": None, "analyst@acme.example": revoked_at.isoformat()}

    monkeypatch.setenv("DATABASE_URL", other_db)
    result = orgs_backup.import_org(archive)
    assert result.ids_kept
    restored = users.get_user_by_email("analyst@acme.example")
    assert restored is not None and restored.sessions_valid_after == revoked_at
    with pytest.raises(api_keys.InvalidCredentials, match=r"^invalid token$"):
        api_keys.authenticate_user_token(old)
    new = api_keys.issue_user_token("analyst@acme.example", "password-2").access_token
    assert api_keys.authenticate_user_token(new).user_id == analyst.id


def test_a_long_account_name_is_reconciled_exported_and_imported_whole(app_db: str, other_db: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A display name longer than the 300 characters `accounts.name` held until migration 0011: PostgreSQL
    refused it mid-run, SQLite kept it and then `import-org` refused the installation's own archive."""
    name = "Acme" + " Worldwide Holdings" * 16  # 308 characters
    scenario = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "100", reported="40")
    scenario.accounts[0][1] = name
    org, admin_user = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
    admin = Actor.user(org.id, admin_user.id, "admin")
    run = reconciliation.run_reconciliation(admin, bundle_dir=scenario.write(tmp_path / "bundle"))
    assert run.status == "succeeded", run.error
    archive = orgs_backup.export_org(admin, tmp_path / "acme.zip").path
    assert {row["account_id"]: row["name"] for row in jsonl(archive, "accounts")} == {"acme": name, "beta": "Beta"}

    monkeypatch.setenv("DATABASE_URL", other_db)
    result = orgs_backup.import_org(archive)
    with org_session(result.org_id) as session:
        stored = dict(session.execute(sa.select(Account.account_id, Account.name)).tuples().all())
        assert stored == {"acme": name, "beta": "Beta"}
        assert session.scalars(sa.select(Anomaly.account_id)).all() == ["acme"]
