"""What an org's integrations may reach: only public addresses unless the operator allows more, never the app's
own database, files only where the operator says, and S3 only with the org's own keys.

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
  counts as the app's. Query parameters that would move the target past this comparison or the
  endpoint rule below (`?host=`, `?dbname=`, `?service=`, `?odbc_connect=`...) are refused outright,
  on every server URL.
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
(`check_s3_credentials`, which runs the connector's own `require_keys`: one rule, one wording),
unless the operator sets RRC_S3_ALLOW_SERVER_CREDENTIALS=1 (a single-tenant install whose role
only reaches that tenant's buckets). Applied where S3 settings are saved and checked (above),
synced (`sync`) and exported to (`exports._target`); the connector is told the same verdict
(`connector_options`), and never builds a keyless client without it. The operator's own export
bucket (RRC_EXPORT_BUCKET) is not an org's setting and keeps the server's credentials.

Endpoints (server-side request forgery): an org admin also types addresses this server connects to:
Stripe's `api_base`, HubSpot's `host`, Salesforce's `instance_url`, the S3 source's `endpoint_url`
and the SQL source's database host. Aimed at this machine, the private network or the cloud
metadata service (169.254.169.254), they would turn the server into a tenant's way into the
operator's network, and "Test connection" would tell what answers there. So `check_integration`
refuses an endpoint whose host is, or resolves to, an address that is not public: loopback,
private, shared (100.64.0.0/10), link-local, unique- or site-local, multicast, reserved,
unspecified, documentation, or any address of this machine (an IPv4 address inside an IPv6 one,
mapped or 6to4, is judged as well). Every address a name resolves to must pass. The operator
allows more with RRC_PRIVATE_ENDPOINTS (`private_endpoints`): IP addresses, CIDR networks and
host names (a listed name is allowed without a lookup), comma-separated, or `any` alone for a
single-tenant or development install. The check connects to nothing, so its refusal reads the
same whether anything answers there or not. Names are resolved with a timeout (DNS_TIMEOUT: a
stuck resolver must not hold a request or a sync); a name without answer is refused as
unresolvable. An http(s) endpoint must be one unambiguous URL (no user part, backslash or blank,
on which HTTP clients and urlsplit disagree about the host). A SQL server URL without host (a
local socket, or libpq's environment) is refused unless the setting is `any`. Applied like the
rules above: when saved, checked and used (`sync` of Stripe and usage sources, draft invoices,
CRM tasks, the audit-export destination).

Plain http: the HTTP endpoints must use https://, except to a host the operator lists by name or
whose addresses are all non-public and allowed (the operator's own network, the tests' local
fakes): an API key, token or password sent over plain http to a public host would cross the
internet in clear. This is the only rule on scheme: the connectors take http:// or https:// and leave
the verdict to this module, applied before any of their calls. A SQL URL's transport security is the
driver's (e.g. `sslmode`), not judged here.

Limits: DNS rebinding (above). HTTP redirects need no judging: the connectors never follow one (a
redirect answer is their error), and the Salesforce connector accepts, as the instance a login names
for the later calls, only `instance_url` itself or Salesforce's own domains.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import psutil
from sqlalchemy import URL, make_url

from config import ConfigError
from connectors import s3_parquet, sql_source
from core.endpoints import (
    ANY_ENDPOINT,
    PRIVATE_ENDPOINTS_ENV,
    IPAddress,
    PrivateEndpoints,
    normal_host,
    parse_private_endpoints,
)
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
                           "unix_socket", "read_default_file", "dsn", "odbc_connect"})
THIS_MACHINE = "this machine"
# Warehouses whose URL "host" names an account or project, not a machine: their drivers only ever connect to
# the vendor's public service (<account>.snowflakecomputing.com, Google's APIs), and `host` in the query is refused.
VENDOR_SERVICES = frozenset({"snowflake", "bigquery"})
HTTP_ENDPOINTS = {"stripe": "api_base", "hubspot": "host", "salesforce": "instance_url", "s3_parquet": "endpoint_url"}
DNS_TIMEOUT = 5.0  # seconds for one name's answer
UNCLEAR_URL = re.compile(r"[\s\\\x00-\x1f\x7f]")
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rrc-dns")  # bounded: stuck lookups queue


def check_integration(kind: str, config: dict[str, Any]) -> None:
    """The whole policy for an organization's integration settings, run wherever they are saved, checked or used:
    where they point (InvalidInput naming the field) and, for usage sources, what they read and with whose keys.
    ConfigError when RRC_PRIVATE_ENDPOINTS cannot be read (the operator's mistake, not the tenant's)."""
    field = HTTP_ENDPOINTS.get(kind)
    if field is not None and config.get(field) not in (None, ""):
        check_http_endpoint(field, config[field])
    check_usage_source(kind, config)


def check_http_endpoint(field: str, url: object) -> None:
    """An http(s) address a tenant typed: https to a public host or an allowed one; plain http only to an allowed
    non-public host (see the module docstring)."""
    parts = _http_url(url)
    if parts is None:
        raise InvalidInput(f"{field}: expected an https:// URL such as https://host.example (no user part)")
    allowed = private_endpoints()
    if parts.scheme == "https" and allowed.anything:
        return
    if _check_host(field, parts.hostname, allowed, _Lookups()) and parts.scheme == "http":
        raise InvalidInput(f"{field}: must use https:// (plain http only to a private host the operator allows "
                           f"in {PRIVATE_ENDPOINTS_ENV})")


def _http_url(url: object) -> SplitResult | None:
    """The URL when it reads one way only: http(s), a host, a valid port, and no user part, backslash or blank,
    which HTTP clients split differently from urlsplit (the host judged must be the host connected to)."""
    if not isinstance(url, str) or UNCLEAR_URL.search(url.strip()):
        return None
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:  # also a bracketed host that is not an IPv6 address ([127.0.0.1], [x)
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc:
        return None
    return parts


def private_endpoints() -> PrivateEndpoints:
    """RRC_PRIVATE_ENDPOINTS, read on every check (tests and operators change it without a restart)."""
    try:
        return parse_private_endpoints(os.environ.get(PRIVATE_ENDPOINTS_ENV, ""))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_host(field: str, host: str, allowed: PrivateEndpoints, lookups: _Lookups) -> bool:
    """Refuse a host that is, or resolves to, a non-public address the operator does not allow; True when some
    address of it is public (plain http is then refused). A host the operator lists by name is not looked up.
    Nothing is connected to, so the answer never depends on what listens there."""
    name = normal_host(host)
    if name in allowed.names:
        return False
    addresses = lookups.addresses(name)
    if not addresses:
        raise InvalidInput(f"{field}: the host name {name} could not be resolved (unknown, or no DNS answer within "
                           f"{DNS_TIMEOUT:g} seconds); check the name")
    private = {ip for ip in addresses if not _is_public(ip, lookups.local)}
    if private and not allowed.allows(private):
        raise InvalidInput(f"{field}: {name} is not a public internet address (it is, or resolves to, a loopback, "
                           "private, link-local, reserved or this server's own address); this server connects "
                           f"to such addresses only where the operator allows them ({PRIVATE_ENDPOINTS_ENV})")
    return len(private) < len(addresses)


def _is_public(ip: IPAddress, local: set[IPAddress]) -> bool:
    """Routable on the internet and not this machine, including any IPv4 address a 6to4 one carries."""
    inner = [ip.sixtofour] if isinstance(ip, ipaddress.IPv6Address) and ip.sixtofour else []
    return ip not in local and all(
        a.is_global and not (a.is_multicast or a.is_reserved or getattr(a, "is_site_local", False))
        for a in (ip, *inner))


def check_usage_source(kind: str, config: dict[str, Any]) -> None:
    """Raise InvalidInput (naming the field, never quoting a secret) for a usage source this server must not read
    (for the SQL source, this includes its database host: see `check_integration`); kinds other than the SQL and
    S3 sources pass."""
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
    key_id, secret = (config.get(field) for field in S3_KEY_FIELDS)
    keyless = not (s3_parquet.key_given(key_id) or s3_parquet.key_given(secret))  # only then ask the operator
    try:
        s3_parquet.require_keys(key_id, secret, server_credentials=keyless and s3_server_credentials_allowed())
    except s3_parquet.S3SourceError as exc:
        raise InvalidInput(str(exc)) from None


def connector_options(kind: str) -> dict[str, Any]:
    """Keyword arguments the policy gives a usage connector's check/fetch (the S3 connector builds a keyless
    client only when told `server_credentials=True`)."""
    if kind == "s3_parquet":
        return {"server_credentials": s3_server_credentials_allowed()}
    return {}


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
    moved = sorted(TARGET_PARAMS & {name.lower() for name in url.query})
    if moved:
        raise InvalidInput("url: give host, port and database in the URL itself, not as query parameters "
                           f"({', '.join(moved)})")
    lookups = _Lookups()
    if _is_app_database(url, lookups):
        raise InvalidInput("url: this is the app's own database, not your product's: it cannot be a usage source")
    allowed = private_endpoints()
    if allowed.anything or _family(url) in VENDOR_SERVICES:
        return
    if not url.host:
        raise InvalidInput("url: name the database server's host (without one the driver connects to this machine, "
                           f"which the operator allows only with {PRIVATE_ENDPOINTS_ENV}={ANY_ENDPOINT})")
    _check_host("url", url.host, allowed, lookups)


def _is_app_database(url: URL, lookups: _Lookups) -> bool:
    app = make_url(database_url())
    family = _family(url)
    if family != _family(app):
        return False
    if url.database and url.database != app.database:
        return False
    if (url.port or DEFAULT_PORTS.get(family)) != (app.port or DEFAULT_PORTS.get(family)):
        return False
    return not url.host or bool(_stands_for(url.host, lookups) & _stands_for(app.host, lookups))


class _Lookups:
    """What one check learns from DNS and from this machine's interfaces, each asked once and only when needed:
    a SQL source check judges the same host twice (is it the app's database? is it a public address?)."""

    def __init__(self) -> None:
        self._answers: dict[str, set[IPAddress]] = {}

    def addresses(self, name: str) -> set[IPAddress]:
        if name not in self._answers:
            self._answers[name] = _resolve(name)
        return self._answers[name]

    @cached_property
    def local(self) -> set[IPAddress]:
        return _local_addresses()


def _stands_for(host: str | None, lookups: _Lookups) -> set[str]:
    """What a host stands for: its name and IP addresses, with every address of this machine as one token."""
    if not host:
        return {THIS_MACHINE}  # a Unix socket
    name = normal_host(host)
    return {name} | {THIS_MACHINE if ip.is_loopback or ip.is_unspecified or ip in lookups.local else str(ip)
                     for ip in lookups.addresses(name)}


def _resolve(name: str) -> set[IPAddress]:
    """The addresses a normalised host stands for (IPv4-mapped IPv6 as IPv4); empty when it does not resolve.

    An address literal needs no DNS. A name is looked up in a worker thread, waited for at most DNS_TIMEOUT
    seconds: getaddrinfo itself has no timeout, and a slow resolver must not hold a request or a sync."""
    literal = _ip(name)
    if literal is not None:
        return {literal}
    lookup = _RESOLVER.submit(socket.getaddrinfo, name, None, proto=socket.IPPROTO_TCP)
    try:
        answers = lookup.result(timeout=DNS_TIMEOUT)
    except (OSError, UnicodeError, TimeoutError):  # TimeoutError: no answer in time (the lookup runs on, unawaited)
        lookup.cancel()
        return set()
    return {ip for ip in (_ip(str(info[4][0])) for info in answers) if ip is not None}


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _local_addresses() -> set[IPAddress]:
    """This machine's interface addresses: a database on a local interface is the local database, and no
    organization may point the server at itself."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                found.add(ipaddress.ip_address(address.address.split("%")[0]))
    return found
