"""Integrations: encrypted at rest, masked when shown, admin-only, audited without values."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from connectors.base import CheckResult
from services import integrations, users
from services.context import Actor
from services.errors import InvalidInput, NotFound, PermissionDenied
from tests.fakes import hubspot_server, salesforce_server

KEY = "sk_test_51Hxyzabcdefghijklmnop1234"
COLUMNS = {"account_id": "acct", "product_key": "product", "ts": "at", "units": "qty"}


@pytest.fixture
def actors(app_db: str) -> tuple[Actor, Actor]:
    org, admin = users.create_organization("Acme", "acme", "a@acme.example", "Ann", "correct-horse-1")
    analyst = users.create_user(Actor.user(org.id, admin.id, "admin"), "b@acme.example", "Bob", "analyst",
                                "correct-horse-2")
    return Actor.user(org.id, admin.id, "admin"), Actor.user(org.id, analyst.id, "analyst")


def test_secret_is_encrypted_at_rest_and_masked(app_db: str, actors: tuple[Actor, Actor]) -> None:
    admin, analyst = actors
    view = integrations.connect(admin, "stripe", {"api_key": KEY})
    assert view.config["api_key"] == "sk_test_…1234"
    assert view.status == "unchecked"
    with sa.create_engine(app_db).connect() as conn:
        stored = conn.execute(sa.text("select config_encrypted from integrations")).scalar_one()
        details = conn.execute(sa.text("select details from audit_log where action = 'integration.connected'"))
        audit_text = " ".join(str(row[0]) for row in details)
    assert KEY not in stored and "1234" not in stored
    assert KEY not in audit_text and "api_key" in audit_text
    assert integrations.get_config(analyst, "stripe") == {"api_key": KEY}
    assert [v.kind for v in integrations.list_integrations(analyst)] == ["stripe"]


def test_masked_value_sent_back_keeps_the_stored_secret(app_db: str, actors: tuple[Actor, Actor]) -> None:
    admin, _ = actors
    integrations.connect(admin, "stripe", {"api_key": KEY})
    integrations.connect(admin, "stripe", {"api_key": "sk_test_…1234", "api_base": "http://127.0.0.1:1"})
    assert integrations.get_config(admin, "stripe") == {"api_key": KEY, "api_base": "http://127.0.0.1:1"}


def test_salesforce_accepts_password_login_or_client_credentials(app_db: str, actors: tuple[Actor, Actor],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = actors
    monkeypatch.setenv("RRC_PRIVATE_ENDPOINTS", "any")  # no DNS lookup of the instance: see test_source_policy.py
    integrations.connect(admin, "salesforce", {"username": "ops@acme.example", "password": "pw-123456789"})
    view = integrations.connect(admin, "salesforce", {"consumer_key": "3MVG9", "client_secret": "s3cret-value-123",
                                                      "instance_url": "https://acme.my.salesforce.com"})
    assert view.config["client_secret"] == "…-123"
    assert integrations.get_config(admin, "salesforce")["client_secret"] == "s3cret-value-123"


def test_a_password_shows_none_of_its_characters(app_db: str, actors: tuple[Actor, Actor],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A person's password or security token may be reused elsewhere: unlike a key, not even its end is shown."""
    admin, analyst = actors
    monkeypatch.setenv("RRC_PRIVATE_ENDPOINTS", "any")
    config = {"username": "ops@acme.example", "password": "pw-123456789", "security_token": "tok-abcdefgh"}
    view = integrations.connect(admin, "salesforce", config)
    assert (view.config["password"], view.config["security_token"]) == ("…", "…")
    (listed,) = integrations.list_integrations(analyst)
    assert (listed.config["password"], listed.config["security_token"]) == ("…", "…")
    integrations.connect(admin, "salesforce", {**view.config, "username": "ops2@acme.example"})  # sent back as shown
    assert integrations.get_config(admin, "salesforce") == {**config, "username": "ops2@acme.example"}


PRIVATE_CRM = "crm.internal"  # a host of the operator's network: not loopback by name, listed by the operator


@pytest.fixture
def private_crm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The operator allows PRIVATE_CRM (RRC_PRIVATE_ENDPOINTS), which this machine resolves to the fakes' 127.0.0.1;
    yields the list of lookups of it, so a test sees the connectors connected through that name."""
    lookups: list[str] = []
    resolve = socket.getaddrinfo

    def private_dns(host: object, *args: object, **kwargs: object) -> object:
        if host == PRIVATE_CRM:
            lookups.append(host)
            host = "127.0.0.1"
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", private_dns)
    monkeypatch.setenv("RRC_PRIVATE_ENDPOINTS", PRIVATE_CRM)
    return lookups


def test_crms_on_a_private_http_host_the_operator_allows_are_connected(app_db: str, actors: tuple[Actor, Actor],
                                                                       private_crm: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain http to a private host is the source policy's verdict alone: allowed, HubSpot and Salesforce connect
    over it; not allowed, nothing is connected to."""
    admin, _ = actors
    with hubspot_server.running() as hs, salesforce_server.running() as sf:
        hs_host = f"http://{PRIVATE_CRM}:{urlsplit(hs.base_url).port}"
        sf.instance_url = f"http://{PRIVATE_CRM}:{urlsplit(sf.base_url).port}"  # its login names itself
        integrations.connect(admin, "hubspot", {"access_token": hs.token, "host": hs_host, "timeout": 5})
        integrations.connect(admin, "salesforce", {"username": sf.username, "password": sf.password,
                                                   "security_token": sf.security_token, "instance_url": sf.instance_url,
                                                   "timeout": 5})
        hubspot, salesforce = (integrations.test_connection(admin, kind) for kind in ("hubspot", "salesforce"))
        assert hubspot.ok and salesforce.ok, (hubspot.message, salesforce.message)
        assert salesforce.details is not None and salesforce.details["instance"] == sf.instance_url[len("http://"):]
        assert hs.requests and any(path.endswith("/limits/") for _, path in sf.requests) and private_crm
        monkeypatch.delenv("RRC_PRIVATE_ENDPOINTS")  # withdrawn: the stored settings are refused before any call
        calls = len(hs.requests) + len(sf.requests)
        for kind in ("hubspot", "salesforce"):
            refused = integrations.test_connection(admin, kind)
            assert not refused.ok and "is not a public internet address" in refused.message
        assert len(hs.requests) + len(sf.requests) == calls


def test_sql_url_password_is_masked(app_db: str, actors: tuple[Actor, Actor], monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = actors
    monkeypatch.setenv("RRC_PRIVATE_ENDPOINTS", "any")  # db.internal is a name no DNS knows: see test_source_policy.py
    config = {"url": "postgresql+psycopg://reader:s3cret-pw@db.internal/prod", "table": "events",
              "columns": {"account_id": "acct", "product_key": "product", "ts": "at", "units": "qty"}}
    view = integrations.connect(admin, "sql_source", config)
    assert view.config["url"] == "postgresql+psycopg://reader:***@db.internal/prod"


def test_sql_url_query_secrets_are_masked_in_views_checks_and_audit(app_db: str, actors: tuple[Actor, Actor]) -> None:
    admin, analyst = actors
    url = "postgresql+psycopg://reader@127.0.0.1:1/prod?password=s3cret-pw&sslmode=disable&token=t0k3n-value"
    integrations.connect(admin, "sql_source", {"url": url, "table": "events", "columns": COLUMNS})
    result = integrations.test_connection(admin, "sql_source")
    (view,) = integrations.list_integrations(analyst)
    assert view.config["url"] == "postgresql+psycopg://reader@127.0.0.1:1/prod?password=***&sslmode=disable&token=***"
    assert not result.ok and view.status == "error"
    with sa.create_engine(app_db).connect() as conn:
        audit_text = " ".join(str(row[0]) for row in conn.execute(sa.text("select details from audit_log")))
    shown = " ".join([view.config["url"], str(view.status_message), result.message, str(result.details), audit_text])
    assert "s3cret-pw" not in shown and "t0k3n-value" not in shown
    # the masked URL sent back unchanged keeps the stored one
    integrations.connect(admin, "sql_source", {"url": view.config["url"], "table": "usage", "columns": COLUMNS})
    assert integrations.get_config(admin, "sql_source")["url"] == url


def _audited_actions(app_db: str) -> list[str]:
    with sa.create_engine(app_db).connect() as conn:
        return [row[0] for row in conn.execute(sa.text("select action from audit_log order by seq"))]


def test_the_app_database_is_refused_as_a_source_and_nothing_stored(app_db: str, actors: tuple[Actor, Actor],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Org A's admin must not read every org's users or usage through the app's own database, on SQLite
    (even with its folder allowed for database files) and on PostgreSQL."""
    admin, _ = actors
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", os.pathsep.join([str(tmp_path), str(tmp_path / "data")]))
    before = _audited_actions(app_db)
    for table in ("users", "usage_events"):
        with pytest.raises(InvalidInput, match=r"^url: .*cannot be a usage source"):
            integrations.connect(admin, "sql_source", {"url": app_db, "table": table, "columns": COLUMNS})
    assert integrations.list_integrations(admin) == []
    assert _audited_actions(app_db) == before


def test_database_files_need_a_folder_the_operator_allows(app_db: str, actors: tuple[Actor, Actor], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = actors
    product = tmp_path / "product" / "usage.db"
    product.parent.mkdir()
    product.write_bytes(b"")
    config = {"url": f"sqlite:///{product}", "table": "events", "columns": COLUMNS}
    monkeypatch.delenv("RRC_SQL_SOURCE_FILE_DIRS", raising=False)
    with pytest.raises(InvalidInput, match=r"^url: sqlite files are read only from folders the operator allows "
                                           r"\(RRC_SQL_SOURCE_FILE_DIRS\)"):
        integrations.connect(admin, "sql_source", config)
    assert integrations.list_integrations(admin) == []
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(product.parent))
    assert integrations.connect(admin, "sql_source", config).status == "unchecked"


def test_a_source_saved_before_the_policy_fails_its_check(app_db: str, actors: tuple[Actor, Actor],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = actors
    users_as_usage = {"account_id": "email", "product_key": "password_hash", "ts": "created_at",
                      "units": "failed_logins"}
    with monkeypatch.context() as before_the_policy:
        before_the_policy.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(admin, "sql_source", {"url": app_db, "table": "users", "columns": users_as_usage})
    result = integrations.test_connection(admin, "sql_source")
    assert not result.ok and result.message.startswith("SQL usage source: url: ") and "usage source" in result.message
    (view,) = integrations.list_integrations(admin)
    assert (view.status, view.status_message) == ("error", result.message)


@pytest.mark.parametrize(("kind", "config", "message"), [
    ("stripe", {}, "missing api_key"),
    ("zapier", {"x": 1}, "kind: expected one of"),
    ("sql_source", {"url": "sqlite://", "table": "t", "columns": {"account_id": "a"}}, "map product_key, ts, units"),
    ("salesforce", {"username": "ops@acme.example"}, "missing password"),
    ("salesforce", {"consumer_key": "3MVG9", "client_secret": "s3cret"}, "missing instance_url"),
])
def test_bad_config_is_refused_and_nothing_stored(app_db: str, actors: tuple[Actor, Actor], kind: str,
                                                  config: dict[str, object], message: str) -> None:
    admin, _ = actors
    with pytest.raises(InvalidInput, match=message):
        integrations.connect(admin, kind, config)
    assert integrations.list_integrations(admin) == []


def test_analyst_cannot_connect_check_or_disconnect(app_db: str, actors: tuple[Actor, Actor]) -> None:
    admin, analyst = actors
    integrations.connect(admin, "stripe", {"api_key": KEY})
    with pytest.raises(PermissionDenied):
        integrations.connect(analyst, "stripe", {"api_key": KEY})
    with pytest.raises(PermissionDenied):
        integrations.test_connection(analyst, "stripe")
    with pytest.raises(PermissionDenied):
        integrations.disconnect(analyst, "stripe")


def test_check_verdict_is_kept_and_disconnect_removes(app_db: str, actors: tuple[Actor, Actor],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    admin, _ = actors
    integrations.connect(admin, "hubspot", {"access_token": "pat-na1-0000000000000000"})
    fake = type("FakeConnector", (), {"check": staticmethod(lambda config: CheckResult(False, "token rejected"))})
    monkeypatch.setattr(integrations.importlib, "import_module", lambda name: fake)
    result = integrations.test_connection(admin, "hubspot")
    assert result == CheckResult(False, "token rejected")
    (view,) = integrations.list_integrations(admin)
    assert (view.status, view.status_message) == ("error", "token rejected")
    integrations.disconnect(admin, "hubspot")
    with pytest.raises(NotFound, match="connect HubSpot in Settings"):
        integrations.get_config(admin, "hubspot")


S3_COLUMNS = {"account_id": "acct", "product_key": "product", "ts": "at", "units": "qty"}
S3_KEYLESS = {"bucket": "operator-exports", "prefix": "", "region": "us-east-1", "endpoint_url": "http://127.0.0.1:1",
              "columns": S3_COLUMNS, "export_prefix": "x"}


@pytest.fixture
def server_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server holds AWS credentials of its own; the operator has not let organizations use them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASERVERROLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-secret-value")
    monkeypatch.delenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", raising=False)


@pytest.mark.parametrize(("keys", "message"), [
    ({}, r"^access_key_id: required, with secret_access_key"),
    ({"access_key_id": "  ", "secret_access_key": ""}, r"^access_key_id: required"),
    ({"access_key_id": "AKIATENANT"}, r"^secret_access_key: required"),
    ({"secret_access_key": "tenant-secret-value"}, r"^access_key_id: required"),
])
def test_s3_source_without_its_own_keys_is_refused_and_nothing_stored(
        app_db: str, actors: tuple[Actor, Actor], server_aws_credentials: None, keys: dict[str, str],
        message: str) -> None:
    admin, _ = actors
    before = _audited_actions(app_db)
    with pytest.raises(InvalidInput, match=message) as info:
        integrations.connect(admin, "s3_parquet", {**S3_KEYLESS, **keys})
    assert "tenant-secret-value" not in str(info.value)
    assert integrations.list_integrations(admin) == []
    assert _audited_actions(app_db) == before


def test_a_keyless_s3_source_saved_before_the_rule_fails_its_check(app_db: str, actors: tuple[Actor, Actor],
                                                                   server_aws_credentials: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No connector call, so no request signed with the server's credentials; the verdict names the field."""
    from connectors import s3_parquet

    admin, _ = actors
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setattr(integrations.source_policy, "check_usage_source", lambda kind, config: None)
        integrations.connect(admin, "s3_parquet", dict(S3_KEYLESS))
    calls: list[object] = []
    monkeypatch.setattr(s3_parquet, "check", lambda config, **options: calls.append(options) or CheckResult(True, ""))
    result = integrations.test_connection(admin, "s3_parquet")
    assert not result.ok and calls == []
    assert result.message.startswith("S3 Parquet usage source: access_key_id: required")
    (view,) = integrations.list_integrations(admin)
    assert (view.status, view.status_message) == ("error", result.message)


def test_the_operator_may_let_keyless_s3_sources_use_the_server_credentials(
        app_db: str, actors: tuple[Actor, Actor], server_aws_credentials: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors import s3_parquet

    admin, _ = actors
    monkeypatch.setenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", "1")
    assert integrations.connect(admin, "s3_parquet", dict(S3_KEYLESS)).status == "unchecked"
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(s3_parquet, "check",
                        lambda config, **options: calls.append(options) or CheckResult(True, "connected"))
    assert integrations.test_connection(admin, "s3_parquet").ok
    assert calls == [{"server_credentials": True}]
    monkeypatch.setenv("RRC_S3_ALLOW_SERVER_CREDENTIALS", "0")  # withdrawn: the stored source is refused again
    result = integrations.test_connection(admin, "s3_parquet")
    assert not result.ok and len(calls) == 1
    assert result.message.startswith("S3 Parquet usage source: access_key_id: required")


def test_s3_source_with_its_own_keys_is_checked_with_them_only(app_db: str, actors: tuple[Actor, Actor],
                                                              server_aws_credentials: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors import s3_parquet

    admin, _ = actors
    view = integrations.connect(admin, "s3_parquet", {**S3_KEYLESS, "access_key_id": "AKIATENANT",
                                                      "secret_access_key": "tenant-secret-value"})
    assert view.config["secret_access_key"] != "tenant-secret-value"
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(s3_parquet, "check", lambda config, **options: calls.append(options) or CheckResult(True, ""))
    integrations.test_connection(admin, "s3_parquet")
    assert calls == [{"server_credentials": False}]
