"""Services on SQLite and PostgreSQL: audit chain, users and roles, run_reconciliation idempotence."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal as D
from pathlib import Path

import bcrypt
import pytest
import sqlalchemy as sa

from config import ConfigError
from db.models import Anomaly, AuditEntry, OrgSettings, ReconRun
from db.session import get_engine, org_session
from services import audit, catalog, reconciliation, settings, sync, users
from services.context import Actor
from services.errors import Conflict, InvalidInput, PermissionDenied, TooManySignIns
from services.org_files import org_folder
from tests.bundles import APR, FEB, JAN, MAR, Scenario


def test_audit_chain_verifies_and_detects_tampering(org: tuple[Actor, Actor], app_db: str) -> None:
    admin, _ = org
    with org_session(admin.org_id) as session:
        for i in range(3):
            audit.append(session, admin, "test.event", "thing", i, {"amount": D("12.50"), "i": i})
    with org_session(admin.org_id) as session:
        result = audit.verify(session, admin.org_id)
        assert result.ok and result.checked == 6  # org + 2 users + 3 events
    engine = get_engine(app_db)
    if engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(sa.text("UPDATE audit_log SET details = '{}' WHERE seq = 4"))
        with engine.begin() as conn:  # a superuser can switch the guard off: the chain still tells
            conn.execute(sa.text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET details = :d WHERE seq = 4 AND org_id = :o"),
                     {"d": '{"amount": "1250.00", "i": 0}', "o": admin.org_id})
    with org_session(admin.org_id) as session:
        result = audit.verify(session, admin.org_id)
        assert (result.ok, result.first_broken_seq) == (False, 4) and "changed" in result.reason
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE seq IN (4, 5) AND org_id = :o"), {"o": admin.org_id})
    with org_session(admin.org_id) as session:
        result = audit.verify(session, admin.org_id)
        assert (result.ok, result.first_broken_seq) == (False, 4) and "missing" in result.reason


def test_roles_are_enforced_in_services(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    with pytest.raises(PermissionDenied):
        users.create_user(analyst, "x@acme.example", "X", "admin", "password-3")
    with pytest.raises(PermissionDenied):
        settings.update_thresholds(analyst, rel_tolerance=D("0.01"), min_leak_amount=D(5), over_billing_min=D(5))
    with pytest.raises(PermissionDenied):
        users.list_users(analyst)
    updated = settings.update_thresholds(admin, rel_tolerance=D("0.01"), min_leak_amount=D(5), over_billing_min=D(5))
    assert updated.min_leak_amount == D(5)
    with pytest.raises(InvalidInput, match="cron"):
        settings.update_schedule(admin, "cron", "every day", "UTC")
    with pytest.raises(InvalidInput, match="time zone"):
        settings.update_schedule(admin, "cron", "0 6 * * *", "Mars/Olympus")
    assert settings.update_schedule(admin, "cron", "0 6 * * *", "Europe/Paris").schedule_kind == "cron"


def _settings_state(admin: Actor, action: str) -> tuple[object, ...]:
    """The stored settings row and how many `action` audit entries exist: unchanged when a save is refused."""
    stored = settings.get_settings(admin)
    with org_session(admin.org_id) as session:
        entries = session.scalar(sa.select(sa.func.count()).select_from(AuditEntry).where(AuditEntry.action == action))
    return (stored.rel_tolerance, stored.min_leak_amount, stored.over_billing_min, stored.schedule_kind,
            stored.schedule_expr, stored.schedule_timezone, entries)


def test_thresholds_refuse_non_finite_and_oversized_values_naming_the_field(org: tuple[Actor, Actor]) -> None:
    admin, _ = org
    good = {"rel_tolerance": D("0.01"), "min_leak_amount": D(5), "over_billing_min": D(5)}
    settings.update_thresholds(admin, **good)
    before = _settings_state(admin, "settings.thresholds_changed")
    bad = [("rel_tolerance", "NaN"), ("rel_tolerance", "sNaN"), ("rel_tolerance", "Infinity"), ("rel_tolerance", "1"),
           ("rel_tolerance", "-0.1"), ("rel_tolerance", "0.0000001"), ("min_leak_amount", "Infinity"),
           ("min_leak_amount", "-Infinity"), ("min_leak_amount", "1e15"), ("min_leak_amount", "1e9"),
           ("min_leak_amount", "-1"), ("min_leak_amount", "1.0000001"), ("over_billing_min", "NaN"),
           ("over_billing_min", "1e15")]
    for field, value in bad:
        with pytest.raises(InvalidInput, match=f"^{field}: ") as refused:
            settings.update_thresholds(admin, **{**good, field: D(value)})
        assert repr(str(D(value))) in str(refused.value)
        assert _settings_state(admin, "settings.thresholds_changed") == before, f"{field}={value} wrote something"
    edges = {"rel_tolerance": D("0.999999"), "min_leak_amount": D("999999999.999999"), "over_billing_min": D(0)}
    settings.update_thresholds(admin, **edges)  # the largest values allowed are stored exactly, SQLite included
    stored = settings.get_settings(admin)
    assert (stored.rel_tolerance, stored.min_leak_amount, stored.over_billing_min) == tuple(edges.values())
    assert settings.reconcile_params(stored).min_leak_amount == edges["min_leak_amount"]


def test_schedule_settings_refuse_out_of_bounds_values_naming_the_field(org: tuple[Actor, Actor],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = org
    monkeypatch.delenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", raising=False)
    settings.update_schedule(admin, "cron", "0 6 * * *", "Europe/Paris")
    before = _settings_state(admin, "settings.schedule_changed")
    bad = [("interval", "99999999999999999999", "UTC", "interval"), ("interval", "0", "UTC", "interval"),
           ("interval", "299", "UTC", "interval"), ("interval", str(366 * 86400 + 1), "UTC", "interval"),
           ("interval", "-600", "UTC", "interval"), ("interval", "60\u00b2", "UTC", "interval"),
           ("interval", None, "UTC", "interval"), ("interval", "3" * 101, "UTC", "interval"),
           ("cron", "* * * * *", "UTC", "cron expression"), ("cron", "0-4 6 * * *", "UTC", "cron expression"),
           ("cron", "0 0 30 2 *", "UTC", "cron expression"), ("cron", "0 6 * * * *", "UTC", "cron expression"),
           ("cron", "0 6 * * 1-99999999999", "UTC", "cron expression"), ("cron", "0 6 * * *", "X" * 65, "time zone"),
           ("weekly", "0 6 * * *", "UTC", "schedule kind")]
    for kind, expr, zone, field in bad:
        with pytest.raises(InvalidInput, match=f"^{field}"):
            settings.update_schedule(admin, kind, expr, zone)
        assert _settings_state(admin, "settings.schedule_changed") == before, f"{kind} {expr!r} wrote something"
    for kind, expr in [("interval", "300"), ("interval", str(366 * 86400)), ("cron", "*/5 * * * *")]:
        assert settings.update_schedule(admin, kind, expr, "UTC").schedule_expr == expr
    monkeypatch.setenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "60")  # an operator may allow more frequent runs
    assert settings.update_schedule(admin, "interval", "60", "UTC").schedule_expr == "60"
    monkeypatch.setenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "soon")
    with pytest.raises(InvalidInput, match="RRC_SCHEDULER_MIN_INTERVAL_SECONDS"):
        settings.update_schedule(admin, "interval", "3600", "UTC")


def test_sign_in_and_lockout(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    assert users.authenticate("Admin@Acme.example ", "password-1").id == admin.user_id
    for _ in range(users.MAX_FAILED_LOGINS - 1):
        with pytest.raises(PermissionDenied, match="wrong email or password"):
            users.authenticate("analyst@acme.example", "nope")
    with pytest.raises(TooManySignIns, match="too many failed"):  # the last failure allowed says so
        users.authenticate("analyst@acme.example", "nope")
    with pytest.raises(TooManySignIns, match="too many failed"):
        users.authenticate("analyst@acme.example", "password-2")  # locked even with the right password
    users.set_active(admin, analyst.user_id, False)
    creds = users.credentials_for_authenticator()["usernames"]
    assert set(creds) == {"admin@acme.example"}
    assert creds["admin@acme.example"] == {"email": "admin@acme.example", "name": "Ann", "roles": ["admin"]}
    with pytest.raises(Conflict):
        users.set_active(admin, admin.user_id, False)
    with pytest.raises(Conflict):
        users.set_role(admin, admin.user_id, "analyst")  # the last admin stays admin
    with pytest.raises(Conflict):
        users.create_organization("Other", "acme", "o@o.example", "O", "password-4")


def test_password_hashes_use_the_configured_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RRC_BCRYPT_ROUNDS", raising=False)
    assert users.hash_password("password-1").startswith("$2b$12$")  # the production default
    monkeypatch.setenv("RRC_BCRYPT_ROUNDS", "5")
    hashed = users.hash_password("password-1")
    assert hashed.startswith("$2b$05$") and bcrypt.checkpw(b"password-1", hashed.encode())
    monkeypatch.setenv("RRC_BCRYPT_ROUNDS", "3")
    with pytest.raises(ConfigError, match="RRC_BCRYPT_ROUNDS"):
        users.hash_password("password-1")


def under_reported(leak: bool = True) -> Scenario:
    s = Scenario().sub("acme", "api", "p_api").sub("beta", "api", "p_api")
    s.use("acme", "api", "2026-01-05T10:00:00Z", "1000", reported="600" if leak else None)
    s.use("beta", "api", "2026-01-05T10:00:00Z", "1000", reported="600")
    s.invoice("acme", "api", "600" if leak else "1000", "60.00" if leak else "100.00")
    return s.invoice("beta", "api", "600", "60.00")


def anomalies(org_id: int) -> dict[str, tuple[int, str]]:
    with org_session(org_id) as session:
        rows = session.execute(sa.select(Anomaly).where(Anomaly.org_id == org_id)).scalars()
        return {a.account_id: (a.id, a.status) for a in rows}


def test_rerun_keeps_ids_and_analyst_work_and_resolves_vanished_gaps(org: tuple[Actor, Actor],
                                                                     tmp_path: Path) -> None:
    admin, analyst = org
    bundle = under_reported().write(tmp_path / "b1")
    first = reconciliation.run_reconciliation(analyst, bundle_dir=bundle)
    assert first.status == "succeeded" and first.counts["new"] == 2
    before = anomalies(admin.org_id)
    assert {k: v[1] for k, v in before.items()} == {"acme": "open", "beta": "open"}
    with org_session(admin.org_id) as session:
        session.execute(sa.update(Anomaly).where(Anomaly.account_id == "beta").values(status="dismissed",
                                                                                      status_reason="known"))
    second = reconciliation.run_reconciliation(admin, bundle_dir=bundle)
    assert second.counts["new"] == 0 and second.counts["updated"] == 2
    assert anomalies(admin.org_id) == {"acme": (before["acme"][0], "open"), "beta": (before["beta"][0], "dismissed")}
    fixed = under_reported(leak=False).write(tmp_path / "b2")  # acme's usage now billed in full
    third = reconciliation.run_reconciliation(admin, bundle_dir=fixed)
    assert third.counts["resolved"] == 1
    assert anomalies(admin.org_id)["acme"] == (before["acme"][0], "resolved")
    fourth = reconciliation.run_reconciliation(admin, bundle_dir=bundle)
    assert fourth.counts["reopened"] == 1 and anomalies(admin.org_id)["acme"] == (before["acme"][0], "open")
    with org_session(admin.org_id) as session:
        row = session.execute(sa.select(Anomaly).where(Anomaly.account_id == "acme")).scalar_one()
        assert (row.leak_amount, row.currency, row.type) == (D("40.00"), "usd", "under_reported_usage")
        assert row.evidence["daily"][0]["actual"] == "1000" and set(row.confidence_factors) >= {"mapping"}
        assert row.period_start.tzinfo is not None
        assert audit.verify(session, admin.org_id).ok


def test_a_run_resolves_only_what_it_looked_at(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    """A synced window moves on: a January leak must stay open when the next run's data starts in
    March (nothing was billed), and so must a leak of an account absent from the run's data."""
    admin, _ = org
    first = Scenario().sub("acme", "api", "p_api", JAN, FEB).invoice("acme", "api", "500", "50.00", JAN, FEB)
    first.use("acme", "api", "2026-01-10T10:00:00Z", "1000", reported="500")
    first.sub("beta", "api", "p_api", JAN, FEB).invoice("beta", "api", "500", "50.00", JAN, FEB)
    first.use("beta", "api", "2026-01-10T10:00:00Z", "1000", reported="500")
    first.sub("acme", "api", "p_api", MAR, APR).invoice("acme", "api", "50", "5.00", MAR, APR)
    first.use("acme", "api", "2026-03-10T10:00:00Z", "100", reported="50")
    assert reconciliation.run_reconciliation(admin, bundle_dir=first.write(tmp_path / "b1")).counts["new"] == 3
    later = Scenario().sub("acme", "api", "p_api", MAR, APR).invoice("acme", "api", "100", "10.00", MAR, APR)
    later.use("acme", "api", "2026-03-10T10:00:00Z", "100")  # March now fully reported and billed
    run = reconciliation.run_reconciliation(admin, bundle_dir=later.write(tmp_path / "b2"))
    assert run.counts["resolved"] == 1
    with org_session(admin.org_id) as session:
        rows = session.execute(sa.select(Anomaly.account_id, Anomaly.period_start, Anomaly.status)).all()
    assert sorted((a, p.month, s) for a, p, s in rows) == [
        ("acme", 1, "open"), ("acme", 3, "resolved"), ("beta", 1, "open")]


def test_failed_runs_record_why(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    admin, _ = org
    run = reconciliation.run_reconciliation(admin)
    assert run.status == "failed" and "no data source" in run.error
    s = under_reported()
    s.actual[0][3] = "-5"
    run = reconciliation.run_reconciliation(admin, bundle_dir=s.write(tmp_path / "bad"))
    assert run.status == "failed" and "actual_usage.csv, row 2, column 'units'" in run.error
    with org_session(admin.org_id) as session:
        statuses = session.execute(sa.select(ReconRun.status).order_by(ReconRun.id)).scalars().all()
        assert statuses == ["failed", "failed"]
        assert session.execute(sa.select(sa.func.count()).select_from(Anomaly)).scalar() == 0
        actions = session.execute(sa.select(AuditEntry.action).order_by(AuditEntry.seq)).scalars().all()
        assert actions.count("run.failed") == 2


def test_thresholds_stored_before_the_bounds_fail_the_run_with_the_reason(org: tuple[Actor, Actor],
                                                                         tmp_path: Path) -> None:
    """A row saved before the bounds existed (SQLite kept Infinity, which switched detection off)
    must fail the run loudly, never reconcile with it; a queued run is not left waiting."""
    admin, _ = org
    settings.get_settings(admin)  # the row exists
    with org_session(admin.org_id) as session:
        session.execute(sa.update(OrgSettings).where(OrgSettings.org_id == admin.org_id).values(min_leak_amount=-5))
    queued = reconciliation.queue_run(admin)
    run = reconciliation.run_reconciliation(admin, run_id=queued.id, bundle_dir=under_reported().write(tmp_path / "b"))
    assert (run.id, run.status, run.params) == (queued.id, "failed", {})  # it used no thresholds
    assert "stored thresholds: min_leak_amount" in run.error and "save valid thresholds in Settings" in run.error
    with org_session(admin.org_id) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Anomaly)).scalar() == 0


def test_a_second_run_of_one_org_is_refused_while_one_is_running(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    admin, analyst = org
    folder = Scenario().use("acme", "api", "2026-01-10T00:00:00Z", "100", reported="").write(tmp_path / "b")
    with org_session(admin.org_id) as session:
        session.add(ReconRun(org_id=admin.org_id, trigger="schedule", status="running"))
    with pytest.raises(Conflict, match="already running"):
        reconciliation.run_reconciliation(analyst, bundle_dir=folder)
    with org_session(admin.org_id) as session:
        assert [r.status for r in session.query(ReconRun).where(ReconRun.org_id == admin.org_id)] == ["running"]


def _insert_queued_run(url: str, org_id: int) -> None:
    """A queued run written with raw SQL, past the services (as a script or a second app version might)."""
    with get_engine(url).begin() as conn:
        conn.execute(sa.text("INSERT INTO recon_runs (org_id, status, trigger, progress, queued_at) "
                             "VALUES (:org, 'queued', 'api', 0, CURRENT_TIMESTAMP)"), {"org": org_id})


def test_the_database_keeps_one_queued_run_per_org(org: tuple[Actor, Actor], app_db: str) -> None:
    admin, _ = org
    other, _ = users.create_organization("Globex", "globex", "admin@globex.example", "Gus", "password-1")
    _insert_queued_run(app_db, admin.org_id)
    _insert_queued_run(app_db, other.id)  # another org waits in the same queue
    with pytest.raises(sa.exc.IntegrityError):
        _insert_queued_run(app_db, admin.org_id)
    with get_engine(app_db).begin() as conn:  # the worker's claim moves the run on and frees the slot
        conn.execute(sa.text("UPDATE recon_runs SET status = 'running' WHERE org_id = :org"), {"org": admin.org_id})
    _insert_queued_run(app_db, admin.org_id)
    with get_engine(app_db).connect() as conn:
        rows = conn.execute(sa.text("SELECT org_id, status FROM recon_runs ORDER BY id")).all()
    assert [tuple(row) for row in rows] == [(admin.org_id, "running"), (other.id, "queued"),
                                            (admin.org_id, "queued")]


def test_two_requests_queuing_at_once_get_the_same_single_run(org: tuple[Actor, Actor],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The second request arrives while the first has inserted its run but not committed: it waits its turn
    (the per-org lock) and returns the first one's run, without an insert or an audit entry of its own."""
    admin, analyst = org
    inserted, append = threading.Event(), audit.append

    def append_slowly(*args: object, **kwargs: object) -> object:
        if not inserted.is_set():
            inserted.set()
            time.sleep(1.0)  # the first request holds its transaction open here
        return append(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reconciliation.audit, "append", append_slowly)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(reconciliation.queue_run, admin)
        assert inserted.wait(30)
        second = pool.submit(reconciliation.queue_run, analyst)
        ids = [first.result(60).id, second.result(60).id]
    with org_session(admin.org_id) as session:
        queued = session.scalars(sa.select(ReconRun.id).where(ReconRun.status == "queued")).all()
        logged = session.scalars(sa.select(AuditEntry.target_id).where(AuditEntry.action == "run.queued")).all()
    assert ids[0] == ids[1] and queued == [ids[0]]
    assert logged == [str(ids[0])]


def test_a_queued_run_is_stored_only_with_its_audit_entry(org: tuple[Actor, Actor],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = org

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("audit log unavailable")

    monkeypatch.setattr(reconciliation.audit, "append", refuse)
    with pytest.raises(RuntimeError, match="audit log unavailable"):
        reconciliation.queue_run(admin)
    with org_session(admin.org_id) as session:
        assert session.scalars(sa.select(ReconRun.status)).all() == []


def test_names_and_emails_longer_than_their_columns_are_refused_by_name(org: tuple[Actor, Actor]) -> None:
    """PostgreSQL would refuse them with a raw error; SQLite would keep them, and the org's backup would then not
    import. Nothing is stored."""
    admin, _ = org
    long_email = "a" * 243 + "@acme.example"  # 256 characters
    with pytest.raises(InvalidInput, match=r"^name: at most 200 characters$"):
        users.create_user(admin, "ok@acme.example", "n" * 201, "analyst", "password-9")
    with pytest.raises(InvalidInput, match=r"^email: at most 254 characters$"):
        users.create_user(admin, long_email, "Ok", "analyst", "password-9")
    with pytest.raises(InvalidInput, match=r"^name: at most 200 characters$"):
        users.create_organization("o" * 201, "other", "other@acme.example", "Oli", "password-9")
    with pytest.raises(InvalidInput, match=r"^your name: at most 200 characters$"):
        users.create_organization("Other", "other", "other@acme.example", "n" * 201, "password-9")
    assert users.find_organization("other") is None
    assert {u.email for u in users.list_users(admin)} == {"admin@acme.example", "analyst@acme.example"}
    assert users.create_user(admin, "ok@acme.example", "n" * 200, "analyst", "password-9").name == "n" * 200
    unnamed = "b" * 230 + "@acme.example"  # no name typed: the email stands in, cut to the name's column
    assert users.create_user(admin, unnamed, "  ", "analyst", "password-9").name == unnamed[:200]
    _, first_admin = users.create_organization("Other", "other", unnamed.replace("b", "c"), " ", "password-9")
    assert first_admin.name == unnamed.replace("b", "c")[:200] and first_admin.email == unnamed.replace("b", "c")


def test_an_org_reads_no_bundle_from_another_orgs_folder(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    admin, analyst = org
    other, _ = users.create_organization("Beta", "beta", "admin@beta.example", "Bea", "password-9")
    theirs = under_reported().write(org_folder(other.id) / "bundle")
    ours = under_reported(leak=False).write(org_folder(admin.org_id) / "bundle")
    (tmp_path / "link").symlink_to(theirs)
    (tmp_path / "links").mkdir()
    for table in theirs.iterdir():  # a folder of its own, its files links into theirs
        (tmp_path / "links" / table.name).symlink_to(table)
    for path in (theirs, org_folder(admin.org_id) / ".." / str(other.id) / "bundle", tmp_path / "link",
                 org_folder(admin.org_id).parent, tmp_path / "links"):
        with pytest.raises(InvalidInput, match=r"^data source path: .* (is not this organization's|links to files)"):
            settings.set_data_source(admin, {"kind": "bundle", "path": str(path)})
        run = reconciliation.run_reconciliation(analyst, bundle_dir=path)
        assert run.status == "failed" and run.error.startswith("data source path: ")
        with pytest.raises(InvalidInput, match=r"^base_bundle: "):
            sync.sync(analyst, base_bundle=path)
    assert anomalies(admin.org_id) == {}
    # a data source stored before the rule is refused where it is read
    with org_session(admin.org_id) as session:
        session.execute(sa.update(OrgSettings).where(OrgSettings.org_id == admin.org_id)
                        .values(data_source={"kind": "bundle", "path": str(theirs)}))
    assert reconciliation.run_reconciliation(analyst).error.startswith("data source path: ")
    with pytest.raises(InvalidInput, match=r"^data source path: "):
        catalog.price_catalog(analyst)
    settings.set_data_source(admin, {"kind": "bundle", "path": str(ours)})  # its own folder is its own
    assert reconciliation.run_reconciliation(analyst).status == "succeeded"
    assert set(anomalies(admin.org_id)) == {"beta"}  # ours: only beta under-reported
