"""Source policy: a SQL usage source never reaches the app's own database, nor a server file outside allowed folders;
an S3 source never borrows the server's AWS credentials unless the operator allows it; no integration aims this
server at a non-public address (loopback, private network, cloud metadata...) unless the operator allows it."""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

import config
from connectors import s3_parquet
from db.models import Action, Anomaly, AuditEntry
from db.session import org_session
from services import crm_tasks, exports, integrations, reconciliation, recovery, source_policy, sync
from services.context import Actor
from services.errors import InvalidInput
from tests.bundles import Scenario

COLUMNS = {"account_id": "a", "product_key": "p", "ts": "t", "units": "u"}
APP_PG = "postgresql://rrc:app-pw@127.0.0.1:5432/rrc"  # as a hosting provider hands it out


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app's data folder with its embedded database; no folder allowed for database files yet."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rrc.db").write_bytes(b"")
    monkeypatch.setenv("RRC_DATA_DIR", str(folder))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{folder / 'rrc.db'}")
    monkeypatch.delenv("RRC_SQL_SOURCE_FILE_DIRS", raising=False)
    return folder


def _check(url: str) -> None:
    source_policy.check_usage_source("sql_source", {"url": url, "table": "events", "columns": COLUMNS})


def _refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        _check(url)
    assert str(info.value).startswith("url: ")
    assert "app-pw" not in str(info.value)


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_database_files_are_refused_unless_their_folder_is_allowed(data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    usage = _file(tmp_path / "usage" / "events.db")
    nested = _file(tmp_path / "usage" / "2026" / "events.duckdb")
    lookalike = _file(tmp_path / "usage-other" / "events.db")
    for url in (f"sqlite:///{usage}", f"duckdb:///{nested}"):
        _refused(url, r"read only from folders the operator allows \(RRC_SQL_SOURCE_FILE_DIRS\)")
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", os.pathsep.join([str(tmp_path / "elsewhere"), str(usage.parent)]))
    _check(f"sqlite:///{usage}")
    _check(f"duckdb:///{nested}")
    _check(f"sqlite:///{tmp_path / 'usage' / 'not-yet.db'}")  # the connector reports a missing file itself
    _refused(f"sqlite:///{lookalike}", "RRC_SQL_SOURCE_FILE_DIRS")  # a folder name prefix is not containment
    _refused(f"sqlite:///{usage.parent / '..' / 'usage-other' / 'events.db'}", "RRC_SQL_SOURCE_FILE_DIRS")


def test_symlinks_are_followed_before_the_folder_is_judged(data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = tmp_path / "usage"
    allowed.mkdir()
    outside = _file(tmp_path / "private" / "secret.db")
    (allowed / "outside.db").symlink_to(outside)
    (allowed / "app.db").symlink_to(data / "rrc.db")
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(allowed))
    _refused(f"sqlite:///{allowed / 'outside.db'}", "RRC_SQL_SOURCE_FILE_DIRS")
    _refused(f"sqlite:///{allowed / 'app.db'}", "belongs to this app")


def test_the_app_database_and_data_folder_are_refused_even_when_allowed(data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _file(data / "orgs" / "2" / "bundle" / "usage.duckdb")
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(data))
    for url in (f"sqlite:///{data / 'rrc.db'}", f"duckdb:///{data / 'rrc.db'}", f"sqlite:///{bundle}"):
        _refused(url, "belongs to this app")
    # DATABASE_URL outside the data folder, its folder allowed: the file itself (or a hard link to it) is refused
    shared = tmp_path / "shared"
    app_db = _file(shared / "app.db")
    os.link(app_db, shared / "copy.db")
    neighbour = _file(shared / "usage.db")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{app_db}")
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(shared))
    _refused(f"sqlite:///{app_db}", "belongs to this app")
    _refused(f"sqlite:///{shared / 'copy.db'}", "belongs to this app")
    _check(f"sqlite:///{neighbour}")


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite://", "absolute path"),
    ("sqlite:///:memory:", "absolute path"),
    ("duckdb:///:memory:", "absolute path"),
    ("sqlite:///usage/events.db", "absolute path"),
    ("duckdb:///md:my_db", "absolute path"),
    ("sqlite:///{allowed}/events.db?uri=true&mode=ro", "takes no query parameters"),
    ("duckdb:///{allowed}/events.duckdb?enable_external_access=true", "takes no query parameters"),
    ("", "url: required"),
    ("postgresql://h:port/db", "not a valid SQLAlchemy URL"),
])
def test_file_urls_are_plain_absolute_paths(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            url: str, message: str) -> None:
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # relative paths would land in the allowed folder: still refused
    _refused(url.format(allowed=tmp_path), message)


def _a_local_interface_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://rrc:app-pw@127.0.0.1:5432/rrc",  # the very URL
    "postgresql+psycopg://tenant:guess@localhost/rrc",  # another login, loopback name, default port
    "postgresql+psycopg://tenant@[::1]:5432/rrc",
    "postgresql+psycopg://tenant@0.0.0.0/rrc",
    "postgresql+psycopg://tenant@LOCALHOST./rrc",
    "postgresql+psycopg:///rrc",  # no host: a local socket
    "postgresql+psycopg://rrc@127.0.0.1",  # no database: libpq picks one (the user name)
    "postgresql+psycopg://tenant@127.0.0.1/rrc?sslmode=disable",
    "{local}/rrc",  # this machine's own network address
])
def test_the_app_postgres_database_is_refused_under_any_spelling(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", APP_PG)
    if "{local}" in url:
        address = _a_local_interface_address()
        if address is None:
            if os.environ.get("CI"):
                pytest.fail("CI machines have a network interface; this one has no non-loopback IPv4 address")
            pytest.skip("no non-loopback IPv4 interface on this machine")
        url = url.format(local=f"postgresql+psycopg://tenant@{address}")
    _refused(url, "this is the app's own database")


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql+psycopg://tenant@192.0.2.10/prod?host=127.0.0.1", r"not as query parameters \(host\)"),
    ("postgresql+psycopg://tenant@192.0.2.10/prod?dbname=rrc&port=5432", r"\(dbname, port\)"),
    ("postgresql+psycopg://tenant@192.0.2.10/prod?service=app", r"\(service\)"),
])
def test_query_parameters_cannot_move_the_target(data: Path, monkeypatch: pytest.MonkeyPatch, url: str,
                                                 message: str) -> None:
    monkeypatch.setenv("DATABASE_URL", APP_PG)
    _refused(url, message)


def test_other_databases_of_the_same_kind_are_accepted(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By the app-database rule; the endpoint rule (private addresses, unknown names) is set aside with `any`."""
    monkeypatch.setenv("DATABASE_URL", APP_PG)
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, "any")
    for url in ("postgresql+psycopg://tenant:pw@127.0.0.1:5432/product",  # same server, another database
                "postgresql+psycopg://tenant:pw@127.0.0.1:5433/rrc",  # another server on this machine
                "postgresql+psycopg://tenant:pw@192.0.2.10/rrc",  # another machine, same database name
                "postgresql+psycopg://tenant:pw@db.internal/prod?password=x&sslmode=require",
                "snowflake://tenant@acct/rrc"):
        _check(url)
    source_policy.check_usage_source("stripe", {"api_key": "sk_test_x"})  # other kinds: nothing to judge



def test_a_sql_source_check_looks_its_host_up_once(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app-database rule and the endpoint rule judge the same host from one DNS answer and one read of this
    machine's interfaces (the real lookups, counted)."""
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://rrc@192.0.2.10:5432/rrc")  # a literal: no lookup
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, "127.0.0.0/8")
    lookups: list[str] = []
    interface_reads: list[bool] = []
    real_getaddrinfo, real_net_if_addrs = socket.getaddrinfo, psutil.net_if_addrs

    def counted_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def counted_net_if_addrs() -> object:
        interface_reads.append(True)
        return real_net_if_addrs()

    monkeypatch.setattr(socket, "getaddrinfo", counted_getaddrinfo)
    monkeypatch.setattr(psutil, "net_if_addrs", counted_net_if_addrs)
    _check("postgresql+psycopg://tenant@localhost:5432/rrc")  # the app's port and database on an allowed host
    assert lookups == ["localhost"] and len(interface_reads) == 1

# ---- S3: an org's settings carry their own keys ------------------------------------------------------------------

S3_SOURCE = {"bucket": "usage", "prefix": "events", "columns": COLUMNS}
TENANT_KEYS = {"access_key_id": "AKIATENANT", "secret_access_key": "tenant-secret-value"}


def _s3(config: dict[str, object]) -> None:
    source_policy.check_usage_source("s3_parquet", {**S3_SOURCE, **config})


@pytest.mark.parametrize(("keys", "field"), [
    ({}, "access_key_id"),
    ({"access_key_id": "", "secret_access_key": None}, "access_key_id"),
    ({"access_key_id": "   ", "secret_access_key": "\t"}, "access_key_id"),
    ({"access_key_id": "AKIATENANT"}, "secret_access_key"),
    ({"secret_access_key": "tenant-secret-value"}, "access_key_id"),
])
def test_s3_settings_must_carry_their_own_keys(monkeypatch: pytest.MonkeyPatch, keys: dict[str, object],
                                               field: str) -> None:
    monkeypatch.delenv(source_policy.S3_SERVER_CREDENTIALS_ENV, raising=False)
    with pytest.raises(InvalidInput, match=f"^{field}: required") as info:
        _s3(keys)
    assert "tenant-secret-value" not in str(info.value)
    _s3(TENANT_KEYS)
    assert source_policy.connector_options("s3_parquet") == {"server_credentials": False}
    assert source_policy.connector_options("sql_source") == {}


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_the_operator_may_let_keyless_s3_settings_use_the_server_credentials(monkeypatch: pytest.MonkeyPatch,
                                                                             value: str) -> None:
    monkeypatch.setenv(source_policy.S3_SERVER_CREDENTIALS_ENV, value)
    _s3({})
    _s3(TENANT_KEYS)
    assert source_policy.connector_options("s3_parquet") == {"server_credentials": True}
    with pytest.raises(InvalidInput, match=r"^secret_access_key: required"):  # half a key is still a mistake
        _s3({"access_key_id": "AKIATENANT"})


@pytest.mark.parametrize("value", ["", "0", "off", "False", "no"])
def test_server_credentials_are_off_unless_said_yes(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(source_policy.S3_SERVER_CREDENTIALS_ENV, value)
    with pytest.raises(InvalidInput, match=r"^access_key_id: required"):
        _s3({})


def test_an_unreadable_setting_is_an_error_not_a_yes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(source_policy.S3_SERVER_CREDENTIALS_ENV, "sometimes")
    with pytest.raises(InvalidInput, match=r"^RRC_S3_ALLOW_SERVER_CREDENTIALS: expected 0 or 1"):
        _s3({})
    with pytest.raises(InvalidInput, match=r"^RRC_S3_ALLOW_SERVER_CREDENTIALS"):
        source_policy.connector_options("s3_parquet")
    _s3(TENANT_KEYS)  # settings with keys never need the operator's word


def test_s3_keys_are_judged_by_one_rule_with_one_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy runs the connector's own check: saving, syncing and building a client say the same thing."""
    monkeypatch.delenv(source_policy.S3_SERVER_CREDENTIALS_ENV, raising=False)
    said: list[str] = []
    for keys in ({}, {"access_key_id": "AKIATENANT"}, {"access_key_id": " ", "secret_access_key": "tenant-secret"}):
        with pytest.raises(InvalidInput) as policy:
            _s3(keys)
        with pytest.raises(s3_parquet.S3SourceError) as connector:
            s3_parquet.parse_config({**S3_SOURCE, **keys})
        assert str(policy.value) == str(connector.value)
        said.append(str(policy.value))
    with pytest.raises(s3_parquet.S3SourceError) as client:
        s3_parquet.s3_client("us-east-1")
    assert str(client.value) == said[0]


# ---- endpoints: an org's settings never aim this server at a non-public address --------------------------------

ENDPOINT_FIELDS = {"stripe": "api_base", "hubspot": "host", "salesforce": "instance_url", "s3_parquet": "endpoint_url",
                   "sql_source": "url"}
PRIVATE_HOSTS = ["127.0.0.1", "169.254.169.254", "10.0.0.1", "[::1]", "localhost"]
MORE_PRIVATE_HOSTS = ["0.0.0.0", "127.1", "2130706433", "172.16.5.4", "192.168.1.1", "100.64.0.1", "224.0.0.251",
                      "[fd00::1]", "[fe80::1]", "[::ffff:169.254.169.254]", "[2002:a9fe:a9fe::1]", "[ff02::1]",
                      "255.255.255.255", "localhost."]
PUBLIC = "93.184.216.34"  # a public address literal: judged without DNS, and never connected to


def _endpoint(kind: str, host: str, scheme: str = "https") -> dict[str, object]:
    """A complete config of `kind` aimed at `host` (short timeouts: a config let through by mistake fails fast)."""
    url = f"{scheme}://{host}"
    return {
        "stripe": {"api_key": "sk_test_x", "api_base": url, "max_network_retries": 0, "timeout": 1},
        "hubspot": {"access_token": "pat-na1-0000", "host": url, "timeout": 1, "max_attempts": 1},
        "salesforce": {"consumer_key": "3MVG9", "client_secret": "s3cret-value", "instance_url": url, "timeout": 1,
                       "max_attempts": 1},
        "s3_parquet": {**S3_SOURCE, **TENANT_KEYS, "endpoint_url": url, "export_prefix": "audit"},
        "sql_source": {"url": f"postgresql+psycopg://tenant:pw@{host}/product", "table": "events", "columns": COLUMNS},
    }[kind]


def _refused_endpoint(kind: str, host: str, message: str, scheme: str = "https") -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        source_policy.check_integration(kind, _endpoint(kind, host, scheme))
    assert str(info.value).startswith(f"{ENDPOINT_FIELDS[kind]}: ")
    assert "tenant-secret-value" not in str(info.value) and ":pw@" not in str(info.value)


@pytest.fixture
def default_policy(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No RRC_PRIVATE_ENDPOINTS: what an install that never set it runs with."""
    monkeypatch.delenv(source_policy.PRIVATE_ENDPOINTS_ENV, raising=False)


@pytest.mark.parametrize("kind", ENDPOINT_FIELDS)
@pytest.mark.parametrize("host", PRIVATE_HOSTS + MORE_PRIVATE_HOSTS)
def test_non_public_endpoints_are_refused_by_default(default_policy: None, kind: str, host: str) -> None:
    _refused_endpoint(kind, host, r"is not a public internet address .*\(RRC_PRIVATE_ENDPOINTS\)$")


@pytest.mark.parametrize("kind", ENDPOINT_FIELDS)
def test_public_addresses_pass_without_dns(default_policy: None, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("an address literal needs no DNS lookup")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for host in (PUBLIC, f"{PUBLIC}:8443", "[2606:4700:4700::1111]"):
        source_policy.check_integration(kind, _endpoint(kind, host))


@pytest.mark.parametrize("kind", ["stripe", "hubspot", "salesforce", "s3_parquet"])
def test_plain_http_only_to_a_private_host_the_operator_allows(default_policy: None, kind: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A key or token sent over http to a public host would cross the internet in clear, whatever the setting."""
    _refused_endpoint(kind, PUBLIC, r"must use https://", scheme="http")
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, "any")
    _refused_endpoint(kind, PUBLIC, r"must use https://", scheme="http")
    source_policy.check_integration(kind, _endpoint(kind, "10.1.2.3:9000", scheme="http"))
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, "minio.internal")
    source_policy.check_integration(kind, _endpoint(kind, "minio.internal", scheme="http"))


@pytest.mark.parametrize("kind", ["stripe", "hubspot", "salesforce", "s3_parquet"])
@pytest.mark.parametrize("url", [
    "ftp://93.184.216.34", "https://", "93.184.216.34", "https://127.0.0.1\\@93.184.216.34",
    "https://user@93.184.216.34", "https://93.184.216.34:99999", "https://93.184.216.34/\nHost: 127.0.0.1", 42,
    "https://[127.0.0.1]/", "https://[x/",
])
def test_an_endpoint_is_one_unambiguous_https_url(default_policy: None, kind: str, url: object) -> None:
    """A user part or backslash is split differently by HTTP clients than by urlsplit: the host judged could
    differ from the host connected to (https://127.0.0.1\\@93.184.216.34 reaches 127.0.0.1 through urllib3)."""
    config = {**_endpoint(kind, PUBLIC), ENDPOINT_FIELDS[kind]: url}
    with pytest.raises(InvalidInput, match=rf"^{ENDPOINT_FIELDS[kind]}: expected an https:// URL"):
        source_policy.check_integration(kind, config)


@pytest.mark.parametrize(("setting", "allowed", "refused"), [
    ("10.0.0.0/8", ["10.0.0.1", "10.200.3.4:9000"], ["169.254.169.254", "127.0.0.1", "192.168.1.1"]),
    ("127.0.0.1, ::1", ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"], ["127.0.0.2", "10.0.0.1"]),
    ("MinIO.Internal.", ["minio.internal", "MINIO.internal."], ["minio2.internal", "10.0.0.1"]),
    ("any", ["169.254.169.254", "db.internal", "[::1]"], []),
])
@pytest.mark.parametrize("kind", ENDPOINT_FIELDS)
def test_the_operator_allows_listed_private_hosts(default_policy: None, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                  setting: str, allowed: list[str], refused: list[str]) -> None:
    """Addresses and networks, or host names (not looked up: db.internal and minio.internal resolve nowhere)."""
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, setting)
    for host in allowed:
        source_policy.check_integration(kind, _endpoint(kind, host))
    for host in refused:
        _refused_endpoint(kind, host, r"is not a public internet address|could not be resolved")


@pytest.mark.parametrize("value", ["10.0.0.1/8", "http://10.0.0.1", "10.0.0.300", "minio.internal:9000",
                                   "*.internal", "any, 10.0.0.1", "10.0.0.0/8;192.168.0.0/16"])
def test_an_unreadable_private_endpoints_setting_is_a_config_error(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   value: str) -> None:
    """At start-up (config.load_settings) and at every check, never taken as "allow" or as "nothing"."""
    monkeypatch.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, value)
    with pytest.raises(config.ConfigError, match=r"^RRC_PRIVATE_ENDPOINTS: .* is not an IP address"):
        config.load_settings()
    with pytest.raises(config.ConfigError, match=r"^RRC_PRIVATE_ENDPOINTS: "):
        source_policy.check_integration("hubspot", _endpoint("hubspot", "10.0.0.1"))
    source_policy.check_integration("hubspot", {"access_token": "pat"})  # no endpoint typed: nothing to judge


def test_a_name_that_does_not_resolve_is_refused(default_policy: None) -> None:
    for kind in ENDPOINT_FIELDS:
        _refused_endpoint(kind, "no-such-host.invalid", r"the host name no-such-host\.invalid could not be resolved")


def test_a_slow_dns_answer_is_not_waited_for(default_policy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo has no timeout of its own: a resolver that hangs must not hold the request."""
    def hanging_resolver(*args: object, **kwargs: object) -> list[object]:
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, 0))]

    monkeypatch.setattr(source_policy, "DNS_TIMEOUT", 0.2)
    monkeypatch.setattr(socket, "getaddrinfo", hanging_resolver)
    started = time.monotonic()
    _refused_endpoint("stripe", "api.example.com", r"could not be resolved \(unknown, or no DNS answer within 0\.2 ")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql+psycopg://tenant@/product", "name the database server's host"),
    ("postgresql+psycopg:///product?host=/var/run/postgresql", r"not as query parameters \(host\)"),
    (f"postgresql+psycopg://tenant@{PUBLIC}/product?host=10.0.0.1", r"not as query parameters \(host\)"),
    (f"mysql+pymysql://tenant@{PUBLIC}/product?unix_socket=/run/mysqld/mysqld.sock", r"\(unix_socket\)"),
    (f"mssql+pyodbc://tenant@{PUBLIC}/product?odbc_connect=SERVER%3D10.0.0.1", r"\(odbc_connect\)"),
    ("snowflake://tenant@xy12345/db?host=10.0.0.1", r"not as query parameters \(host\)"),
])
def test_a_sql_source_names_its_server_in_the_url_itself(default_policy: None, url: str, message: str) -> None:
    """Without a host the driver reaches this machine; a target moved by query parameters would slip past the check
    (on any backend, not only the app's: here the app database is SQLite)."""
    _refused(url, message)


def test_warehouse_urls_name_an_account_not_a_machine(default_policy: None) -> None:
    """Snowflake's and BigQuery's drivers reach only the vendor's public service; their "host" is an account or
    project id that resolves to nothing, and is not judged as an address."""
    for url in ("snowflake://tenant:pw@xy12345.eu-west-1/db/public", "bigquery://my-project/dataset"):
        _check(url)


# ---- endpoints, through the services: saved, checked and used ----------------------------------------------------

def _stored_integrations(admin: Actor) -> list[str]:
    return [view.kind for view in integrations.list_integrations(admin)]


def _audit_actions(admin: Actor) -> list[str]:
    with org_session(admin.org_id) as session:
        return list(session.scalars(select(AuditEntry.action).order_by(AuditEntry.seq)))


def _actions(admin: Actor) -> list[Action]:
    with org_session(admin.org_id) as session:
        return list(session.scalars(select(Action)))


@pytest.mark.parametrize("kind", ENDPOINT_FIELDS)
def test_saving_a_private_endpoint_is_refused_and_stores_nothing(org: tuple[Actor, Actor],
                                                                 monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    admin, _ = org
    monkeypatch.delenv(source_policy.PRIVATE_ENDPOINTS_ENV, raising=False)
    before = _audit_actions(admin)
    for host in PRIVATE_HOSTS:
        with pytest.raises(InvalidInput, match=rf"^{ENDPOINT_FIELDS[kind]}: .* is not a public internet address"):
            integrations.connect(admin, kind, _endpoint(kind, host))
    assert _stored_integrations(admin) == [] and _audit_actions(admin) == before
    integrations.connect(admin, kind, _endpoint(kind, PUBLIC))  # the same settings aimed at a public address
    assert _stored_integrations(admin) == [kind]


@pytest.fixture
def stored_before(org: tuple[Actor, Actor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """An org with a leak (acme, Stripe customer cus_acme, CRM id 001A) whose five integrations were saved aimed
    at the private network before the rule existed (`any` then), and the operator's default since. Returns
    {"leak": anomaly id}."""
    admin, _ = org
    monkeypatch.delenv("RRC_EXPORT_BUCKET", raising=False)
    scenario = Scenario().sub("acme", "api", "p_api").invoice("acme", "api", "500", "50.00")
    scenario.use("acme", "api", "2026-01-10T10:00:00Z", "1000", reported="500")
    run = reconciliation.run_reconciliation(admin, bundle_dir=scenario.write(tmp_path / "bundle"))
    assert run.status == "succeeded", run.error
    with monkeypatch.context() as before_the_rule:
        before_the_rule.setenv(source_policy.PRIVATE_ENDPOINTS_ENV, "any")
        for number, kind in enumerate(ENDPOINT_FIELDS, start=1):
            integrations.connect(admin, kind, _endpoint(kind, f"10.0.0.{number}", "http"))
    monkeypatch.delenv(source_policy.PRIVATE_ENDPOINTS_ENV, raising=False)
    with org_session(admin.org_id) as session:
        return {"leak": session.scalars(select(Anomaly.id).where(Anomaly.account_id == "acme")).one()}


def test_a_stored_private_endpoint_fails_its_check(org: tuple[Actor, Actor], stored_before: dict[str, int]) -> None:
    """The verdict names the field; no connector is called (10.0.0.x would time out, with another message)."""
    admin, _ = org
    for kind, field in ENDPOINT_FIELDS.items():
        result = integrations.test_connection(admin, kind)
        assert not result.ok and result.message.startswith(f"{integrations.LABELS[kind]}: {field}: 10.0.0.")
        assert "is not a public internet address" in result.message
    assert {view.kind: view.status for view in integrations.list_integrations(admin)} == dict.fromkeys(
        ENDPOINT_FIELDS, "error")


def test_a_stored_private_endpoint_is_refused_before_any_action_is_written(org: tuple[Actor, Actor],
                                                                          stored_before: dict[str, int]) -> None:
    admin, analyst = org
    before = _audit_actions(admin)
    with pytest.raises(InvalidInput, match=r"^Stripe: api_base: 10\.0\.0\.1 is not a public internet address"):
        recovery.draft_invoice(analyst, stored_before["leak"])
    with pytest.raises(InvalidInput, match=r"^HubSpot: host: 10\.0\.0\.2 is not a public"):
        crm_tasks.create_crm_task(analyst, stored_before["leak"], "hubspot")
    with pytest.raises(InvalidInput, match=r"^Salesforce: instance_url: 10\.0\.0\.3 is not a public"):
        crm_tasks.create_crm_task(analyst, stored_before["leak"], "salesforce")
    assert _actions(admin) == [] and _audit_actions(admin) == before


def test_a_stored_private_endpoint_is_refused_by_sync_and_export(org: tuple[Actor, Actor], tmp_path: Path,
                                                                 stored_before: dict[str, int]) -> None:
    admin, analyst = org
    before = _audit_actions(admin)
    with pytest.raises(InvalidInput, match=r"^S3 Parquet usage source: endpoint_url: 10\.0\.0\.4 is not a public"):
        exports.export_audit(analyst, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))
    assert _audit_actions(admin) == before
    base = Scenario().write(tmp_path / "base")
    for kind, message in (("stripe", r"^Stripe: api_base: 10\.0\.0\.1"),
                          ("sql_source", r"^SQL usage source: url: 10\.0\.0\.5"),
                          ("s3_parquet", r"^S3 Parquet usage source: endpoint_url: 10\.0\.0\.4")):
        with pytest.raises(sync.SyncFailed, match=message):
            sync.sync(admin, base_bundle=base)
        assert _audit_actions(admin)[-1] == "sync.failed"
        integrations.disconnect(admin, kind)  # the next source in sync's order
    assert not sync.bundle_dir(admin.org_id).exists()

