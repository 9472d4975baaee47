"""Migrations on SQLite and PostgreSQL, SQLite pragmas, row-level security, secrets at rest."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from db import crypto
from db.models import TENANT_TABLES, ReconRun, User
from db.session import downgrade, get_engine, is_current, org_session, system_session, upgrade
from services import dashboard, users
from services.context import Actor


def tables(url: str) -> set[str]:
    return set(sa.inspect(get_engine(url)).get_table_names())


def test_migrations_up_down_up(app_db: str) -> None:
    assert is_current(app_db)
    assert {"organizations", "sign_in_throttle", *TENANT_TABLES} <= tables(app_db)
    downgrade(app_db, "base")
    get_engine(app_db).dispose()
    assert tables(app_db) <= {"alembic_version"}
    assert not is_current(app_db)
    upgrade(app_db)
    assert is_current(app_db)


def _run_indexes(url: str) -> set[str]:
    return {index["name"] for index in sa.inspect(get_engine(url)).get_indexes("recon_runs")}


def test_one_queued_run_migration_collapses_duplicates_and_downgrades(org: tuple[Actor, Actor], app_db: str) -> None:
    """0008 keeps each org's oldest queued run and deletes the younger ones (they never started) before it
    adds the index, so none of them shows as the last run; its downgrade drops the index and nothing else."""
    org_id = org[0].org_id
    downgrade(app_db, "0007")
    assert "ux_recon_runs_one_queued" not in _run_indexes(app_db)
    engine = get_engine(app_db)
    with engine.begin() as conn:  # what two racing requests could leave before 0008
        for status in ("succeeded", "queued", "queued", "queued"):
            conn.execute(sa.text("INSERT INTO recon_runs (org_id, status, trigger, progress, queued_at) "
                                 "VALUES (:org, :status, 'manual', 0, CURRENT_TIMESTAMP)"),
                         {"org": org_id, "status": status})
    upgrade(app_db)
    assert "ux_recon_runs_one_queued" in _run_indexes(app_db)
    with org_session(org_id) as session:
        runs = session.scalars(sa.select(ReconRun).order_by(ReconRun.id)).all()
    assert [run.status for run in runs] == ["succeeded", "queued"]
    assert dashboard.summary(org[1]).last_run.id == runs[0].id  # type: ignore[union-attr]
    downgrade(app_db, "0007")
    assert "ux_recon_runs_one_queued" not in _run_indexes(app_db)
    assert {"ix_recon_runs_org_status", "ux_recon_runs_one_running"} <= _run_indexes(app_db)


def _user_columns(url: str) -> set[str]:
    return {column["name"] for column in sa.inspect(get_engine(url)).get_columns("users")}


def test_sessions_valid_after_migration_revokes_inactive_users_and_downgrades(org: tuple[Actor, Actor],
                                                                              app_db: str) -> None:
    """0012 adds `users.sessions_valid_after`; users inactive at the upgrade get its time (their tokens and cookies
    predate it, and a reactivation must not bring them back), the others none. The downgrade drops the column."""
    admin, analyst = org
    downgrade(app_db, "0011")
    assert "sessions_valid_after" not in _user_columns(app_db)
    with get_engine(app_db).begin() as conn:  # deactivated under 0011: no cut-off could be recorded then
        conn.execute(sa.text("UPDATE users SET active = :no WHERE id = :id"), {"no": False, "id": analyst.user_id})
    before = datetime.now(UTC)
    upgrade(app_db)
    after = datetime.now(UTC)
    assert is_current(app_db)
    with system_session() as session:
        cutoffs = dict(session.execute(sa.select(User.id, User.sessions_valid_after)).tuples().all())
    assert cutoffs[admin.user_id] is None
    assert before <= cutoffs[analyst.user_id] <= after  # type: ignore[operator]
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    assert not users.session_still_valid("analyst@acme.example", before - timedelta(seconds=1))
    downgrade(app_db, "0011")
    assert "sessions_valid_after" not in _user_columns(app_db)
    with get_engine(app_db).connect() as conn:  # nothing else lost
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar_one() == 2
    upgrade(app_db)
    assert "sessions_valid_after" in _user_columns(app_db) and is_current(app_db)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    with get_engine(url).connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("INSERT INTO accounts (org_id, account_id, name) VALUES (999, 'a', 'A')"))


def two_orgs() -> tuple[int, int]:
    a, _ = users.create_organization("Org A", "org-a", "a@a.example", "A", "password-a1")
    b, _ = users.create_organization("Org B", "org-b", "b@b.example", "B", "password-b1")
    for org in (a, b):
        with org_session(org.id) as session:
            session.execute(sa.text("INSERT INTO accounts (org_id, account_id, name) VALUES (:o, :a, :n)"),
                            {"o": org.id, "a": f"acct-{org.slug}", "n": org.name})
    return a.id, b.id


@pytest.mark.postgres
def test_row_level_security_isolates_tenants(fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_pg_url)
    monkeypatch.setenv("RRC_SECRET_KEYS", Fernet.generate_key().decode())
    upgrade(fresh_pg_url)
    org_a, org_b = two_orgs()
    with org_session(org_a) as session:  # raw SQL, no WHERE: RLS alone filters
        assert session.execute(sa.text("SELECT account_id FROM accounts")).scalars().all() == ["acct-org-a"]
        assert session.execute(sa.text("SELECT count(*) FROM users")).scalar() == 1
        assert session.execute(sa.text("SELECT slug FROM organizations")).scalars().all() == ["org-a"]
        with pytest.raises(sa.exc.ProgrammingError, match="row-level security"):
            session.execute(sa.text("INSERT INTO accounts (org_id, account_id, name) VALUES (:o, 'x', 'X')"),
                            {"o": org_b})
    with org_session(org_b) as session:
        updated = session.execute(sa.text("UPDATE accounts SET name = 'hijacked' WHERE org_id = :o"), {"o": org_a})
        assert updated.rowcount == 0
    with get_engine(fresh_pg_url).connect() as conn:  # the app role without the org setting sees nothing
        conn.execute(sa.text("SET ROLE rrc_app"))
        assert conn.execute(sa.text("SELECT count(*) FROM accounts")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM audit_heads")).scalar() == 0
    with system_session() as session:
        assert session.execute(sa.text("SELECT count(*) FROM accounts")).scalar() == 2
        assert session.execute(sa.text("SELECT count(*) FROM audit_heads")).scalar() == 2


@pytest.mark.postgres
def test_audit_heads_are_tenant_rows_that_only_move_forward(fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_pg_url)
    monkeypatch.setenv("RRC_SECRET_KEYS", Fernet.generate_key().decode())
    upgrade(fresh_pg_url)
    org_a, org_b = two_orgs()
    with org_session(org_a) as session:
        assert session.execute(sa.text("SELECT org_id FROM audit_heads")).scalars().all() == [org_a]
    with org_session(org_b) as session:
        moved = session.execute(sa.text("UPDATE audit_heads SET seq = 99 WHERE org_id = :o"), {"o": org_a})
        assert moved.rowcount == 0
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), org_session(org_a) as session:
        session.execute(sa.text("DELETE FROM audit_heads"))
    for statement, refusal in (("UPDATE audit_heads SET seq = seq - 1", "only moves forward"),
                               ("DELETE FROM audit_heads", "never deleted")):
        with pytest.raises(sa.exc.DBAPIError, match=refusal), system_session() as session:
            session.execute(sa.text(statement))


def test_secrets_roundtrip_rotation_and_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.delenv("RRC_SECRET_KEYS", raising=False)
    token = crypto.encrypt_json({"api_key": "sk_test_abcdefgh1234"})
    assert "sk_test" not in token and crypto.decrypt_json(token) == {"api_key": "sk_test_abcdefgh1234"}
    key_file = tmp_path / "secret.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    old_key = key_file.read_text().strip()
    new_key = Fernet.generate_key().decode()
    monkeypatch.setenv("RRC_SECRET_KEYS", f"{new_key},{old_key}")
    assert crypto.decrypt_json(token)["api_key"] == "sk_test_abcdefgh1234"  # old tokens still readable
    rotated = crypto.rotate(token)
    monkeypatch.setenv("RRC_SECRET_KEYS", new_key)
    assert crypto.decrypt_json(rotated)["api_key"] == "sk_test_abcdefgh1234"
    with pytest.raises(crypto.SecretKeyMissing):
        crypto.decrypt_json(token)  # the retired key is gone


def test_production_requires_a_configured_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.delenv("RRC_SECRET_KEYS", raising=False)
    with pytest.raises(crypto.SecretKeyMissing, match="RRC_SECRET_KEYS"):
        crypto.encrypt_json({"x": 1})


def test_mask_secret() -> None:
    assert crypto.mask_secret("sk_test_51Habcdefgh1234") == "sk_test_…1234"
    assert crypto.mask_secret("pat-na1-0123456789abcdef") == "pat-…cdef"
    assert crypto.mask_secret("short") == "…"
    assert crypto.mask_secret(None) == ""
