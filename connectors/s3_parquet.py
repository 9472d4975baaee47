"""Usage from Parquet files on S3 (or any S3-compatible store): only the period's files are read.

Layout: every `*.parquet` object under `s3://bucket/prefix/`, either flat or hive-partitioned by
UTC date (`prefix/dt=YYYY-MM-DD/part-0.parquet`). With `hive_partitioned`, the object listing is
pruned by the `dt=` folder before any file is opened, so files outside [start, end) are never
fetched; without it every file's footer is read and Arrow skips the row groups whose `ts`
statistics lie outside the period. Only the mapped columns are read (column projection) and rows
are filtered on `ts` in the scan; DuckDB then sums the stream into daily UTC buckets, exactly
(units are cast to DECIMAL(38, 12)).

Time: a `ts` column with a time zone is converted to UTC; a naive one is taken to hold UTC.
Credentials: `access_key_id` + `secret_access_key`, given to the boto3 client explicitly (it then
uses only them: no environment variable, profile or instance role is consulted; Arrow reads through
that client, see `filesystem`). Without keys
nothing connects (S3SourceError naming `access_key_id`) unless the caller passes
`server_credentials=True`, which hands the request to the standard AWS chain of *this server*
(environment, profile, instance role). `require_keys` is that one check, with one wording, run on
every config parsed and every client built, and by services/source_policy.py. Callers decide who
may use the server's chain: the operator's own export bucket does; an organization's settings only
when the operator allows it (RRC_S3_ALLOW_SERVER_CREDENTIALS). `endpoint_url` points at
S3-compatible stores (MinIO, the moto server of the tests); which addresses an organization may
point it at is also services/source_policy.py's rule; a redirect from it is never followed
(`filesystem`, `s3_client`). Nothing here logs, and messages never carry a secret.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import boto3
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from connectors.base import OPTIONAL_USAGE_COLUMNS, USAGE_COLUMNS, CheckResult, redirect_refused, usage_column_mapping

BUCKET_SCHEMA = pa.schema([
    pa.field("account_id", pa.string()),
    pa.field("product_key", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("units", pa.decimal128(38, 12)),
])
REQUIRED_COLUMNS, OPTIONAL_COLUMNS = USAGE_COLUMNS, OPTIONAL_USAGE_COLUMNS
PARTITION_KEY = "dt"
PARTITION = re.compile(rf"(?:^|/){PARTITION_KEY}=([^/]*)/")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
CLIENT_ERRORS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access denied to s3://{bucket}/{prefix} (the key needs s3:ListBucket and s3:GetObject)",
    "InvalidAccessKeyId": "access_key_id: not recognised by S3",
    "SignatureDoesNotMatch": "secret_access_key: does not match the access key id",
    "AllAccessDisabled": "access to bucket {bucket!r} is disabled",
}


class S3SourceError(ValueError):
    """A configuration or data problem, with a message naming the field; never contains a secret."""


class RedirectRefused(BotoCoreError):
    """An `endpoint_url` answered with a redirect. A BotoCoreError, so whoever handles boto3's failures handles it;
    its `message` is `redirect_refused`'s."""

    fmt = "{message}"


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str
    region: str
    access_key_id: str | None
    secret_access_key: str | None
    endpoint_url: str | None
    hive_partitioned: bool
    columns: dict[str, str]
    server_credentials: bool = False  # keyless: may this server's own AWS credential chain be used?

    @property
    def base(self) -> str:
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def location(self) -> str:
        return f"s3://{self.base}/"


def _text(config: dict[str, Any], key: str, *, required: bool, default: str | None = None) -> str | None:
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise S3SourceError(f"{key}: expected text")
    value = (value or "").strip()
    if not value:  # blank counts as absent (a key of spaces must not mean "no key")
        if required:
            raise S3SourceError(f"{key}: required")
        return default
    return value


def parse_config(config: dict[str, Any], *, server_credentials: bool = False) -> S3Config:
    """Check the shape of the admin's settings before anything connects.

    Keys are required unless `server_credentials` (then a config without keys uses this server's
    AWS credential chain).
    """
    if not isinstance(config, dict):
        raise S3SourceError("s3_parquet config: expected an object")
    bucket = _text(config, "bucket", required=True) or ""
    if not BUCKET_NAME.match(bucket):
        raise S3SourceError(f"bucket: {bucket!r} is not a valid S3 bucket name")
    prefix = (_text(config, "prefix", required=False, default="") or "").strip("/")
    region = _text(config, "region", required=False, default="us-east-1") or "us-east-1"
    key_id = _text(config, "access_key_id", required=False)
    secret = _text(config, "secret_access_key", required=False)
    require_keys(key_id, secret, server_credentials=server_credentials)
    endpoint = _text(config, "endpoint_url", required=False)
    if endpoint and urlparse(endpoint).scheme not in ("http", "https"):
        raise S3SourceError(f"endpoint_url: expected an http(s) URL, got {endpoint!r}")
    hive = config.get("hive_partitioned", False)
    if not isinstance(hive, bool):
        raise S3SourceError("hive_partitioned: expected true or false")
    mapping = usage_column_mapping(config.get("columns"), S3SourceError, "Parquet column")
    return S3Config(bucket, prefix, region, key_id, secret, endpoint, hive, mapping,
                    server_credentials=server_credentials)


def key_given(value: object) -> bool:
    """Present for the key rule: anything but None or blank text (a key of spaces is no key; `parse_config`
    rejects non-text)."""
    return value is not None and not (isinstance(value, str) and not value.strip())


def require_keys(access_key_id: object, secret_access_key: object, *, server_credentials: bool) -> None:
    """The one rule on S3 keys, wherever settings are judged (here, services/source_policy.py) or a client is
    built: both keys or neither, and neither only when the caller lets this server's own AWS credentials be used,
    so no client ever falls back to them unasked. S3SourceError names the missing field, never a value."""
    key_id, secret = key_given(access_key_id), key_given(secret_access_key)
    if key_id != secret:
        missing = "secret_access_key" if key_id else "access_key_id"
        raise S3SourceError(f"{missing}: required; access_key_id and secret_access_key are given together")
    if not key_id and not server_credentials:
        raise S3SourceError("access_key_id: required, with secret_access_key (an access key of your own AWS "
                            "account or S3 store: this server does not lend its own AWS credentials)")


def filesystem(cfg: S3Config) -> pafs.FileSystem:
    """The bucket as an Arrow file system (listing, ranged reads) whose every request is made by boto3
    (`boto_client`: the same keys rule).

    Why not Arrow's own S3FileSystem: its AWS SDK follows a redirect to any host, and shows what answered
    there in its errors; services/source_policy.py judges `endpoint_url`, not where it redirects to.
    botocore never follows one (see `s3_client`).
    """
    return pafs.PyFileSystem(_BotoFileSystem(boto_client(cfg)))


@contextmanager
def _as_os_error() -> Iterator[None]:
    """boto3 failures inside Arrow as the OSError Arrow's callers catch (404: FileNotFoundError)."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = f"S3 {error.get('Code') or 'error'}: {error.get('Message') or 'request refused'}"
        raise (FileNotFoundError if error.get("Code") in ("404", "NoSuchKey") else OSError)(message) from None
    except BotoCoreError as exc:
        raise OSError(str(exc)) from None


class _BotoFileSystem(pafs.FileSystemHandler):
    """What the reader asks of the bucket (list, stat, open for reading), over boto3; nothing is written."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get_type_name(self) -> str:
        return "s3-boto3"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            bucket, _, key = path.strip("/").partition("/")
            try:
                with _as_os_error():
                    head = self.client.head_object(Bucket=bucket, Key=key)
            except FileNotFoundError:
                infos.append(pafs.FileInfo(path, pafs.FileType.NotFound))
                continue
            infos.append(pafs.FileInfo(path, pafs.FileType.File, size=head["ContentLength"],
                                       mtime=head["LastModified"]))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        """The objects under `selector.base_dir`: all of them when recursive (the reader's listing, files only),
        else the first level, with its sub-folders."""
        bucket, _, key = selector.base_dir.strip("/").partition("/")
        params = {"Bucket": bucket, "Prefix": f"{key}/" if key else "", **({} if selector.recursive
                                                                             else {"Delimiter": "/"})}
        infos = []
        with _as_os_error():
            for page in self.client.get_paginator("list_objects_v2").paginate(**params):
                infos += [pafs.FileInfo(f"{bucket}/{folder['Prefix'].rstrip('/')}", pafs.FileType.Directory)
                          for folder in page.get("CommonPrefixes", [])]
                infos += [pafs.FileInfo(f"{bucket}/{obj['Key']}", pafs.FileType.File, size=obj["Size"],
                                        mtime=obj["LastModified"]) for obj in page.get("Contents", [])]
        if not infos and not selector.allow_not_found:
            raise FileNotFoundError(f"nothing under s3://{selector.base_dir.strip('/')}/")
        return infos

    def open_input_file(self, path: str) -> pa.PythonFile:
        bucket, _, key = path.strip("/").partition("/")
        with _as_os_error():
            size = self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        return pa.PythonFile(_S3Object(self.client, bucket, key, size), mode="r")

    open_input_stream = open_input_file

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("the S3 usage source is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = \
        open_output_stream = open_append_stream = _read_only


class _S3Object(io.RawIOBase):
    """One object read by ranged GETs: Arrow reads a Parquet footer, then only the column chunks it needs."""

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        super().__init__()
        self.client, self.bucket, self.key, self.size, self.position = client, bucket, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def readinto(self, buffer: Any) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        with _as_os_error():
            data = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                          Range=f"bytes={self.position}-{end - 1}")["Body"].read()
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def s3_client(region: str, endpoint_url: str | None = None, access_key_id: str | None = None,
              secret_access_key: str | None = None, *, server_credentials: bool = False) -> Any:
    """boto3 S3 client signing with the keys given (explicit keys: boto3 consults no AWS_* variable,
    profile or role). Without keys it uses this server's credential chain, and only when the caller
    says so with `server_credentials` (the operator's own export bucket); otherwise S3SourceError.

    SigV4 always, so presigned URLs carry X-Amz-Expires and work in every region.
    """
    require_keys(access_key_id, secret_access_key, server_credentials=server_credentials)
    client = boto3.client(
        "s3", region_name=region, endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=BotoConfig(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                          signature_version="s3v4"),
    )
    if endpoint_url:
        client.meta.events.register("before-parse.s3", _refuse_redirect)
    return client


def _refuse_redirect(response_dict: dict[str, Any], **_: Any) -> None:
    """A 3xx from an `endpoint_url` fails at once. botocore never follows a Location, but its fix for a bucket
    in another region re-sends to the same custom endpoint, which redirects again, until Python's recursion
    limit. (Without endpoint_url, AWS's own 301s still steer botocore to the bucket's region.)"""
    if 300 <= response_dict["status_code"] < 400:
        raise RedirectRefused(message=redirect_refused("S3", response_dict["status_code"], "endpoint_url"))


def boto_client(cfg: S3Config) -> Any:
    """boto3 S3 client for the same settings (health check, exports)."""
    return s3_client(cfg.region, cfg.endpoint_url, cfg.access_key_id, cfg.secret_access_key,
                     server_credentials=cfg.server_credentials)


def _scrub(message: str, cfg: S3Config) -> str:
    if cfg.secret_access_key:
        message = message.replace(cfg.secret_access_key, "***")
    return message.splitlines()[0] if message else message


def partition_day(path: str) -> date | None:
    """The `dt=YYYY-MM-DD` folder of an object path (None when the path has none)."""
    match = PARTITION.search(path)
    if match is None:
        return None
    try:
        return date.fromisoformat(match.group(1))
    except ValueError:
        raise S3SourceError(f"hive_partitioned: {path} has {PARTITION_KEY}={match.group(1)!r}, expected "
                            f"{PARTITION_KEY}=YYYY-MM-DD") from None


def plan_files(cfg: S3Config, fs: pafs.FileSystem, start: datetime, end: datetime) -> list[str]:
    """The Parquet objects to read for [start, end): a listing, pruned by partition when hive."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(cfg.base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise S3SourceError(f"cannot list {cfg.location}: {_scrub(str(exc), cfg)}") from None
    files = sorted(info.path for info in infos if info.type == pafs.FileType.File
                   and info.path.endswith(".parquet") and not info.base_name.startswith(("_", ".")))
    if not cfg.hive_partitioned:
        return files
    first, last = start.astimezone(UTC).date(), (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    kept = []
    for path in files:
        day = partition_day(path[len(cfg.base):])
        if day is None:
            raise S3SourceError(f"hive_partitioned: {path} is not inside a {PARTITION_KEY}=YYYY-MM-DD folder")
        if first <= day <= last:
            kept.append(path)
    return kept


def _validate_schema(schema: pa.Schema, cfg: S3Config) -> pa.DataType:
    for key, column in cfg.columns.items():
        if column not in schema.names:
            raise S3SourceError(f"columns.{key}: {column!r} is not a column of the Parquet files in "
                                f"{cfg.location} (they have {', '.join(schema.names)})")
    ts_type = schema.field(cfg.columns["ts"]).type
    if not pa.types.is_timestamp(ts_type):
        raise S3SourceError(f"columns.ts: {cfg.columns['ts']!r} is {ts_type}; expected a timestamp column")
    return ts_type


def _bound(instant: datetime, ts_type: pa.TimestampType) -> pa.Scalar:
    if instant.tzinfo is None:
        raise S3SourceError(f"period bound {instant!r} must be timezone-aware (UTC)")
    utc = instant.astimezone(UTC)
    return pa.scalar(utc if ts_type.tz else utc.replace(tzinfo=None), type=ts_type)


def _empty() -> pa.Table:
    return BUCKET_SCHEMA.empty_table()


def fetch_daily_buckets(config: dict[str, Any], start: datetime, end: datetime, *,
                        max_products: frozenset[str] | set[str] = frozenset(),
                        server_credentials: bool = False) -> pa.Table:
    """Daily usage buckets of [start, end) from the period's Parquet files (projection + pruning).

    Units are summed per day, except for the product keys in `max_products` (seats-like daily
    snapshots), whose daily value is the largest reading. `server_credentials`: see parse_config.
    """
    cfg = parse_config(config, server_credentials=server_credentials)
    if end <= start:
        raise S3SourceError("period: end must be after start")
    fs = filesystem(cfg)
    files = plan_files(cfg, fs, start, end)
    if not files:
        return _empty()
    try:
        dataset = ds.dataset(files, filesystem=fs, format="parquet")
        ts_type = _validate_schema(dataset.schema, cfg)
        ts = ds.field(cfg.columns["ts"])
        scanner = dataset.scanner(
            columns={key: ds.field(column) for key, column in cfg.columns.items()},
            filter=(ts >= _bound(start, ts_type)) & (ts < _bound(end, ts_type)),
        )
        units_float = pa.types.is_floating(dataset.schema.field(cfg.columns["units"]).type)
        return _aggregate(scanner.to_reader(), aware=ts_type.tz is not None, event_id="event_id" in cfg.columns,
                          units_float=units_float, max_products=frozenset(max_products))
    except S3SourceError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise S3SourceError(f"cannot read the Parquet files in {cfg.location}: {_scrub(str(exc), cfg)}") from None
    except duckdb.Error as exc:
        raise S3SourceError(f"columns: the Parquet data in {cfg.location} could not be summed "
                            f"({_scrub(str(exc), cfg)}); check that columns.units is numeric") from None


def _aggregate(reader: pa.RecordBatchReader, *, aware: bool, event_id: bool, units_float: bool,
               max_products: frozenset[str] = frozenset()) -> pa.Table:
    """Sum (and max) the filtered stream per account, product and UTC day in DuckDB (streamed, not loaded).

    Float units are taken at their shortest decimal representation (0.1 is 0.1, not the binary
    0.1000000000000000055...), as a person reading the file would; integers and decimals are exact.
    """
    units = "CAST(CAST(units AS VARCHAR) AS DECIMAL(38, 12))" if units_float else "CAST(units AS DECIMAL(38, 12))"
    day = "date_trunc('day', timezone('UTC', ts))" if aware else "date_trunc('day', ts)"
    source = "(SELECT DISTINCT event_id, account_id, product_key, ts, units FROM events)" if event_id else "events"
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("events", reader)
        # Sum and max in one pass; the per-product choice is made below, outside SQL.
        result = con.sql(f"""
            SELECT CAST(account_id AS VARCHAR) AS account_id, CAST(product_key AS VARCHAR) AS product_key,
                   epoch_us({day}) AS day_us, sum({units}) AS units_sum, max({units}) AS units_max
            FROM {source} WHERE ts IS NOT NULL GROUP BY ALL ORDER BY ALL""").to_arrow_table()
    finally:
        con.close()
    products = result.column("product_key").cast(pa.string())
    units_total = result.column("units_sum").cast(pa.decimal128(38, 12))
    if max_products:
        seat_like = pc.is_in(products, value_set=pa.array(sorted(max_products), pa.string()))
        units_total = pc.if_else(seat_like, result.column("units_max").cast(pa.decimal128(38, 12)), units_total)
    return pa.table([
        result.column("account_id").cast(pa.string()),
        products,
        pc.cast(result.column("day_us"), pa.int64()).cast(BUCKET_SCHEMA.field("ts").type),
        units_total,
    ], schema=BUCKET_SCHEMA)


def check(config: dict[str, Any], *, server_credentials: bool = False) -> CheckResult:
    """Bucket reachable, credentials accepted, Parquet files listed and readable, columns mapped."""
    try:
        cfg = parse_config(config, server_credentials=server_credentials)
    except S3SourceError as exc:
        return CheckResult(False, str(exc))
    details = {"location": cfg.location}
    try:
        listing = boto_client(cfg).list_objects_v2(Bucket=cfg.bucket, Prefix=f"{cfg.prefix}/" if cfg.prefix else "",
                                                   MaxKeys=1000)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        template = CLIENT_ERRORS.get(code, "S3 refused the request ({code})")
        return CheckResult(False, template.format(bucket=cfg.bucket, prefix=cfg.prefix, code=code), details)
    except BotoCoreError as exc:
        return CheckResult(False, f"cannot reach S3 for {cfg.location}: {_scrub(str(exc), cfg)}", details)
    keys = [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".parquet")]
    if not keys:
        return CheckResult(False, f"no Parquet files under {cfg.location}", details)
    sample = keys[0]
    if cfg.hive_partitioned:
        try:
            if partition_day(sample[len(cfg.prefix):]) is None:
                return CheckResult(False, f"hive_partitioned: {sample} is not inside a {PARTITION_KEY}=YYYY-MM-DD "
                                          "folder", details)
        except S3SourceError as exc:
            return CheckResult(False, str(exc), details)
    try:
        _validate_schema(pq.read_schema(f"{cfg.bucket}/{sample}", filesystem=filesystem(cfg)), cfg)
    except S3SourceError as exc:
        return CheckResult(False, str(exc), details)
    except (pa.ArrowException, OSError) as exc:
        return CheckResult(False, f"cannot read s3://{cfg.bucket}/{sample}: {_scrub(str(exc), cfg)}", details)
    more = "+" if listing.get("IsTruncated") else ""
    return CheckResult(True, f"connected; {len(keys)}{more} Parquet file(s) under {cfg.location} with the mapped "
                             "columns", {**details, "files": f"{len(keys)}{more}"})
