"""Source policy: a SQL usage source never reaches the app's own database, nor a server file outside allowed folders;
an S3 source never borrows the server's AWS credentials unless the operator allows it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest

from services import source_policy
from services.errors import InvalidInput

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
    monkeypatch.setenv("DATABASE_URL", APP_PG)
    for url in ("postgresql+psycopg://tenant:pw@127.0.0.1:5432/product",  # same server, another database
                "postgresql+psycopg://tenant:pw@127.0.0.1:5433/rrc",  # another server on this machine
                "postgresql+psycopg://tenant:pw@192.0.2.10/rrc",  # another machine, same database name
                "postgresql+psycopg://tenant:pw@db.internal/prod?password=x&sslmode=require",
                "snowflake://tenant@acct/rrc"):
        _check(url)
    source_policy.check_usage_source("stripe", {"api_key": "sk_test_x"})  # other kinds: nothing to judge


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
