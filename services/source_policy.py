"""What an org's usage source may reach: never the app's own database, files only where the operator says,
and S3 only with the org's own keys.

Why: the SQL usage source connects, from the app's servers, to whatever SQLAlchemy URL an org
admin types. Pointed at the app's own database it would read every organization's data (on
PostgreSQL as the app's login role, a member of rrc_system, so row-level security does not stop
it); a sqlite or duckdb URL is a read of a server-side file chosen by a tenant. Connectors have no
business rules, so the rule lives here and is applied wherever a source URL is used: when it is
saved (`integrations.connect`: nothing is stored when refused), checked
(`integrations.test_connection`) and read (`sync`), so an integration saved before the rule
existed is refused as well.

- The app's database (`db.session.database_url()`: DATABASE_URL, else <RRC_DATA_DIR>/rrc.db). A
  server URL is refused when backend family, database name, port (the dialect's default when
  absent) and host are the app's; hosts are compared by what they resolve to, and every name or
  address of this machine (localhost, 127.0.0.1, ::1, 0.0.0.0, its interfaces) counts as one. A part
  the URL leaves out (no host: a local socket or libpq's PGHOST; no database: libpq's default)
  counts as the app's. For the app's backend family, query parameters that would move the target
  past this comparison (`?host=`, `?dbname=`, `?service=`...) are refused outright.
- Database files (sqlite, duckdb): refused unless RRC_SQL_SOURCE_FILE_DIRS lists a folder that
  holds the file, given by its absolute path and compared with symlinks resolved. The app's data
  folder (RRC_DATA_DIR) and its database file never count, even when listed. Such URLs take no
  query parameters (duckdb-engine turns them into DuckDB settings, SQLite into URI options).

Limit: a host name is judged by its DNS answer at check time, so a name whose answer changes before
the connection (DNS rebinding) is not caught; the app's PostgreSQL role must therefore also require
a password no tenant has (docs/deploy.md).

S3 (the `s3_parquet` usage source, which is also the org's audit-export destination when it has an
`export_prefix`): without keys, boto3 and Arrow would sign with *this server's* AWS credentials
(AWS_* variables, ~/.aws, instance or task role), so any org admin could list and read, or write
exports into, every bucket the server's role reaches (other orgs' data, the operator's export
bucket). An org's S3 settings must therefore carry `access_key_id` and `secret_access_key`
(`check_s3_credentials`), unless the operator sets RRC_S3_ALLOW_SERVER_CREDENTIALS=1 (a
single-tenant install whose role only reaches that tenant's buckets). Applied where S3 settings
are saved and checked (above), synced (`sync`) and exported to (`exports._target`); the connector
is told the same verdict (`connector_options`), and never builds a keyless client without it. The
operator's own export bucket (RRC_EXPORT_BUCKET) is not an org's setting and keeps the server's
credentials.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import URL, make_url

from connectors import sql_source
from db.session import data_dir, database_url
from services.errors import InvalidInput

FILE_DIRS_ENV = "RRC_SQL_SOURCE_FILE_DIRS"
S3_SERVER_CREDENTIALS_ENV = "RRC_S3_ALLOW_SERVER_CREDENTIALS"
S3_KEY_FIELDS = ("access_key_id", "secret_access_key")
TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})  # what pydantic (config.Settings) reads as a bool
FALSE_WORDS = frozenset({"", "0", "false", "f", "no", "n", "off"})
FILE_BACKENDS = frozenset({"sqlite", "duckdb"})
FAMILIES = {"postgres": "postgresql", "redshift": "postgresql", "cockroachdb": "postgresql", "mariadb": "mysql"}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "oracle": 1521}
TARGET_PARAMS = frozenset({"host", "hostaddr", "port", "dbname", "database", "db", "service", "servicefile",
                           "unix_socket", "read_default_file"})
THIS_MACHINE = "this machine"


def check_usage_source(kind: str, config: dict[str, Any]) -> None:
    """Raise InvalidInput (naming the field, never quoting a secret) for a source this server must not read;
    kinds other than the SQL and S3 sources pass."""
    if kind == "s3_parquet":
        check_s3_credentials(config)
        return
    if kind != "sql_source":
        return
    try:
        url = sql_source.parse_url(config.get("url"))
    except sql_source.SqlSourceError as exc:
        raise InvalidInput(str(exc)) from None
    if url.get_backend_name() in FILE_BACKENDS:
        _check_file(url)
    else:
        _check_server(url)


def s3_server_credentials_allowed() -> bool:
    """RRC_S3_ALLOW_SERVER_CREDENTIALS: may an org's keyless S3 settings use this server's AWS credentials?
    Off by default; a value that is not a yes/no word is an error (never taken as yes)."""
    raw = os.environ.get(S3_SERVER_CREDENTIALS_ENV, "").strip().lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise InvalidInput(f"{S3_SERVER_CREDENTIALS_ENV}: expected 0 or 1, got {raw!r}")


def check_s3_credentials(config: dict[str, Any]) -> None:
    """An org's S3 settings (usage source or export destination) carry their own access key, unless the
    operator lets keyless ones use the server's credentials. InvalidInput names the missing field."""
    given = {field: _given(config.get(field)) for field in S3_KEY_FIELDS}
    if all(given.values()):
        return
    if not any(given.values()):
        if s3_server_credentials_allowed():
            return
        raise InvalidInput("access_key_id: required, with secret_access_key: S3 settings of an organization "
                           "must carry their own access key (this server does not lend its AWS credentials; "
                           f"operator setting {S3_SERVER_CREDENTIALS_ENV})")
    missing = next(field for field, present in given.items() if not present)
    raise InvalidInput(f"{missing}: required; access_key_id and secret_access_key are given together")


def connector_options(kind: str) -> dict[str, Any]:
    """Keyword arguments the policy gives a usage connector's check/fetch (the S3 connector builds a keyless
    client only when told `server_credentials=True`)."""
    if kind == "s3_parquet":
        return {"server_credentials": s3_server_credentials_allowed()}
    return {}


def _given(value: Any) -> bool:
    """Present for the credential rule: anything but None or blank text (the connector rejects non-text)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def allowed_file_dirs() -> list[Path]:
    """The folders RRC_SQL_SOURCE_FILE_DIRS allows (os.pathsep-separated), resolved; none by default."""
    raw = os.environ.get(FILE_DIRS_ENV, "")
    return [Path(part.strip()).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip()]


def _check_file(url: URL) -> None:
    backend, database = url.get_backend_name(), url.database or ""
    if url.query:
        raise InvalidInput(f"url: a {backend} URL takes no query parameters")
    if database in ("", ":memory:") or not Path(database).is_absolute():
        raise InvalidInput(f"url: a {backend} source is a database file given by its absolute path "
                           f"(e.g. {backend}:////srv/usage/events.db)")
    path = Path(database).resolve()
    if _is_app_file(path):
        raise InvalidInput(f"url: {database} belongs to this app (its database or data folder), not to your "
                           "product: it cannot be a usage source")
    if not any(path.is_relative_to(folder) for folder in allowed_file_dirs()):
        raise InvalidInput(f"url: {backend} files are read only from folders the operator allows "
                           f"(RRC_SQL_SOURCE_FILE_DIRS); {database} is not in one")


def _is_app_file(path: Path) -> bool:
    """Inside the data folder, or the app's SQLite file itself (also through a hard link)."""
    if path.is_relative_to(data_dir().resolve()):
        return True
    app = make_url(database_url())
    if app.get_backend_name() not in FILE_BACKENDS or app.database in (None, "", ":memory:"):
        return False
    own = Path(app.database).resolve()
    return path == own or (path.exists() and own.exists() and os.path.samefile(path, own))


def _family(url: URL) -> str:
    return FAMILIES.get(url.get_backend_name(), url.get_backend_name())


def _check_server(url: URL) -> None:
    app = make_url(database_url())
    family = _family(url)
    if family != _family(app):
        return
    moved = sorted(TARGET_PARAMS & {name.lower() for name in url.query})
    if moved:
        raise InvalidInput("url: give host, port and database in the URL itself, not as query parameters "
                           f"({', '.join(moved)})")
    if url.database and url.database != app.database:
        return
    if (url.port or DEFAULT_PORTS.get(family)) != (app.port or DEFAULT_PORTS.get(family)):
        return
    if url.host and not (_addresses(url.host) & _addresses(app.host)):
        return
    raise InvalidInput("url: this is the app's own database, not your product's: it cannot be a usage source")


def _addresses(host: str | None) -> set[str]:
    """What a host stands for: its name and IP addresses, with every address of this machine as one token."""
    if not host:
        return {THIS_MACHINE}  # a Unix socket
    name = host.strip("[]").rstrip(".").lower()
    try:
        resolved = {str(info[4][0]) for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        resolved = set()
    found, local_addresses = {name}, _local_addresses()
    for text in resolved | {name}:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        ip = getattr(ip, "ipv4_mapped", None) or ip
        local = ip.is_loopback or ip.is_unspecified or ip in local_addresses
        found.add(THIS_MACHINE if local else str(ip))
    return found


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This machine's interface addresses: a database on a local interface is the local database."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(address.address.split("%")[0]))
    return found
