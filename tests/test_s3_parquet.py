"""S3 Parquet usage source against moto in server mode: buckets, partition pruning proven by S3 requests."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from connectors import s3_parquet
from connectors.s3_parquet import S3SourceError
from tests.fakes.serving import free_port

START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)
KEYS = {"aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "moto-secret-value"}
COLUMNS = {"account_id": "acct", "product_key": "product", "ts": "occurred_at", "units": "qty", "event_id": "evt"}
# (event id, account, product, UTC timestamp, units)
EVENTS = [
    ("e0", "acme", "api_calls", datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), D("99")),  # before start
    ("e1", "acme", "api_calls", datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC), D("10.5")),
    ("e2", "acme", "api_calls", datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC), D("0.125")),
    ("e3", "acme", "api_calls", datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC), D("7")),
    ("e4", "acme", "seats", datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC), D("3")),
    ("e5", "globex", "api_calls", datetime(2026, 3, 3, 8, 30, 0, tzinfo=UTC), D("1000000.000001")),
    ("e5", "globex", "api_calls", datetime(2026, 3, 3, 8, 30, 0, tzinfo=UTC), D("1000000.000001")),  # replay
    ("e6", "globex", "api_calls", datetime(2026, 3, 3, 9, 0, 0, tzinfo=UTC), D("2")),
    ("e7", "acme", "api_calls", datetime(2026, 3, 4, 0, 0, 0, tzinfo=UTC), D("99")),  # at end: excluded
    ("e8", "acme", "api_calls", datetime(2026, 3, 5, 10, 0, 0, tzinfo=UTC), D("99")),
]
EXPECTED = [
    ("acme", "api_calls", datetime(2026, 3, 1, tzinfo=UTC), D("10.625")),
    ("acme", "api_calls", datetime(2026, 3, 2, tzinfo=UTC), D("7")),
    ("acme", "seats", datetime(2026, 3, 2, tzinfo=UTC), D("3")),
    ("globex", "api_calls", datetime(2026, 3, 3, tzinfo=UTC), D("1000002.000001")),
]



def start_moto(recording_file: Path) -> tuple[ThreadedMotoServer, str]:
    """moto in server mode on a free port; its request recorder writes to `recording_file`."""
    import moto.moto_api

    os.environ["MOTO_RECORDER_FILEPATH"] = str(recording_file)
    moto.moto_api.recorder._location = str(recording_file)  # the recorder read the env at import
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "recording.jsonl")
    yield endpoint
    server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **KEYS)


class Recording:
    """The S3 requests moto received between start() and objects_read()."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def start(self) -> None:
        httpx.post(f"{self.endpoint}/moto-api/recorder/reset-recording")
        httpx.post(f"{self.endpoint}/moto-api/recorder/start-recording")

    def requests(self) -> list[tuple[str, str]]:
        httpx.post(f"{self.endpoint}/moto-api/recorder/stop-recording")
        text = httpx.get(f"{self.endpoint}/moto-api/recorder/download-recording").text
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [(e["method"], unquote(urlparse(e["url"]).path)) for e in entries]

    def objects_read(self) -> set[str]:
        return {path for method, path in self.requests() if method == "GET" and path.endswith(".parquet")}

    def signers(self, bucket: str) -> set[str]:
        """The access key ids that signed the recorded requests to `bucket` (SigV4 `Credential=<key id>/...`).
        Only that bucket's: moto's recorder is one per process, shared with other modules' servers."""
        httpx.post(f"{self.endpoint}/moto-api/recorder/stop-recording")
        text = httpx.get(f"{self.endpoint}/moto-api/recorder/download-recording").text
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        headers = [e.get("headers") or {} for e in entries
                   if unquote(urlparse(e["url"]).path).strip("/").split("/")[0] == bucket]
        assert headers, f"no request to {bucket} was recorded"
        found = {re.search(r"Credential=([^/]+)/", h.get("Authorization", "")) for h in headers}
        return {match.group(1) if match else "unsigned" for match in found}


def _parquet(rows: list[tuple[Any, ...]], *, ts_type: pa.DataType, units_type: pa.DataType = pa.decimal128(20, 6),
             row_group_size: int | None = None) -> bytes:
    table = pa.table({
        "evt": pa.array([r[0] for r in rows], pa.string()),
        "acct": pa.array([r[1] for r in rows], pa.string()),
        "product": pa.array([r[2] for r in rows], pa.string()),
        "occurred_at": pa.array([r[3] if ts_type.tz else r[3].replace(tzinfo=None) for r in rows], ts_type),
        "qty": pa.array([r[4] if pa.types.is_decimal(units_type) else int(r[4]) if pa.types.is_integer(units_type)
                         else float(r[4]) for r in rows], units_type),
        "payload": pa.array(["x" * 100] * len(rows), pa.string()),  # never needed: projected away
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def _rows(table: pa.Table) -> list[tuple[str, str, datetime, D]]:
    assert table.schema == s3_parquet.BUCKET_SCHEMA
    return sorted((r["account_id"], r["product_key"], r["ts"], r["units"].normalize()) for r in table.to_pylist())


def _expected() -> list[tuple[str, str, datetime, D]]:
    return [(a, p, t, u.normalize()) for a, p, t, u in EXPECTED]


def _config(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {"bucket": bucket, "prefix": "usage/events", "region": "us-east-1", "access_key_id": KEYS[
        "aws_access_key_id"], "secret_access_key": KEYS["aws_secret_access_key"], "endpoint_url": endpoint,
        "hive_partitioned": False, "columns": dict(COLUMNS), **extra}


@pytest.fixture
def hive_bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> str:
    """One file per UTC day under dt=YYYY-MM-DD/, including days outside the test period."""
    bucket = f"hive-{abs(hash(request.node.name)) % 10**8}"
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket=bucket)
    by_day: dict[str, list[tuple[Any, ...]]] = {}
    for event in EVENTS:
        by_day.setdefault(event[3].date().isoformat(), []).append(event)
    for day, rows in by_day.items():
        client.put_object(Bucket=bucket, Key=f"usage/events/dt={day}/part-0.parquet",
                          Body=_parquet(rows, ts_type=pa.timestamp("us", tz="UTC")))
    client.put_object(Bucket=bucket, Key="usage/events/_SUCCESS", Body=b"")
    return bucket


def test_hive_partitions_outside_the_period_are_never_fetched(moto_endpoint: str, hive_bucket: str) -> None:
    recording = Recording(moto_endpoint)
    recording.start()
    table = s3_parquet.fetch_daily_buckets(_config(moto_endpoint, hive_bucket, hive_partitioned=True), START, END)
    read = recording.objects_read()
    assert _rows(table) == _expected()
    assert {path.split("/")[-2] for path in read} == {"dt=2026-03-01", "dt=2026-03-02", "dt=2026-03-03"}
    assert not any(day in path for path in read for day in ("2026-02-28", "2026-03-04", "2026-03-05"))


def test_seat_like_products_take_the_daily_maximum(moto_endpoint: str, hive_bucket: str) -> None:
    config = _config(moto_endpoint, hive_bucket, hive_partitioned=True)
    table = s3_parquet.fetch_daily_buckets(config, START, END, max_products={"api_calls"})
    expected = {(a, p, t): u for a, p, t, u in _expected()}
    expected[("acme", "api_calls", datetime(2026, 3, 1, tzinfo=UTC))] = D("10.5")
    expected[("globex", "api_calls", datetime(2026, 3, 3, tzinfo=UTC))] = D("1000000.000001")
    assert _rows(table) == sorted((*k, v) for k, v in expected.items())


def test_plan_files_prunes_by_partition(moto_endpoint: str, hive_bucket: str) -> None:
    cfg = s3_parquet.parse_config(_config(moto_endpoint, hive_bucket, hive_partitioned=True))
    mid_day = datetime(2026, 3, 2, 12, tzinfo=UTC)
    planned = s3_parquet.plan_files(cfg, s3_parquet.filesystem(cfg), mid_day, datetime(2026, 3, 3, 0, 0, 1, tzinfo=UTC))
    assert [p.split("/")[-2] for p in planned] == ["dt=2026-03-02", "dt=2026-03-03"]


def test_flat_layout_filters_on_ts_across_row_groups(moto_endpoint: str) -> None:
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="flat-usage")
    client.put_object(Bucket="flat-usage", Key="usage/events/all.parquet",
                      Body=_parquet(EVENTS, ts_type=pa.timestamp("ms", tz="Europe/Paris"), row_group_size=2))
    table = s3_parquet.fetch_daily_buckets(_config(moto_endpoint, "flat-usage"), START, END)
    assert _rows(table) == _expected()


def test_naive_timestamps_are_read_as_utc_and_float_units_become_decimals(moto_endpoint: str) -> None:
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="naive-usage")
    client.put_object(Bucket="naive-usage", Key="usage/events/a.parquet",
                      Body=_parquet(EVENTS[:5], ts_type=pa.timestamp("ns"), units_type=pa.float64()))
    client.put_object(Bucket="naive-usage", Key="usage/events/b.parquet",
                      Body=_parquet(EVENTS[5:], ts_type=pa.timestamp("ns"), units_type=pa.float64()))
    table = s3_parquet.fetch_daily_buckets(_config(moto_endpoint, "naive-usage"), START, END)
    assert _rows(table) == _expected()


def test_no_file_in_the_period_gives_an_empty_table(moto_endpoint: str, hive_bucket: str) -> None:
    config = _config(moto_endpoint, hive_bucket, hive_partitioned=True)
    table = s3_parquet.fetch_daily_buckets(config, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC))
    assert table.num_rows == 0 and table.schema == s3_parquet.BUCKET_SCHEMA


def test_check_ok_and_clear_failures(moto_endpoint: str, hive_bucket: str) -> None:
    ok = s3_parquet.check(_config(moto_endpoint, hive_bucket, hive_partitioned=True))
    assert ok.ok, ok.message
    assert "Parquet file" in ok.message
    missing = s3_parquet.check(_config(moto_endpoint, "no-such-bucket"))
    assert not missing.ok and "does not exist" in missing.message
    empty = s3_parquet.check(_config(moto_endpoint, hive_bucket, prefix="nothing/here"))
    assert not empty.ok and "no Parquet files" in empty.message
    column = s3_parquet.check(_config(moto_endpoint, hive_bucket, columns={**COLUMNS, "units": "quantity"}))
    assert not column.ok and "columns.units" in column.message and "'quantity'" in column.message
    for result in (ok, missing, empty, column):
        assert KEYS["aws_secret_access_key"] not in result.message + str(result.details)


def test_unreachable_endpoint_is_a_failed_check_not_an_exception() -> None:
    config = _config(f"http://127.0.0.1:{free_port()}", "some-bucket")
    result = s3_parquet.check(config)
    assert not result.ok and "cannot reach S3" in result.message
    assert KEYS["aws_secret_access_key"] not in result.message


def test_bad_layout_and_data_are_clear_errors(moto_endpoint: str) -> None:
    client = s3_client(moto_endpoint)
    client.create_bucket(Bucket="bad-usage")
    client.put_object(Bucket="bad-usage", Key="usage/events/dt=yesterday/a.parquet",
                      Body=_parquet(EVENTS[:2], ts_type=pa.timestamp("us", tz="UTC")))
    with pytest.raises(S3SourceError, match="dt='yesterday'"):
        s3_parquet.fetch_daily_buckets(_config(moto_endpoint, "bad-usage", hive_partitioned=True), START, END)
    with pytest.raises(S3SourceError, match=r"columns\.ts: 'qty'"):
        s3_parquet.fetch_daily_buckets(_config(moto_endpoint, "bad-usage", columns={**COLUMNS, "ts": "qty"}),
                                       START, END)
    with pytest.raises(S3SourceError, match=r"columns\.event_id: 'nope'"):
        s3_parquet.fetch_daily_buckets(_config(moto_endpoint, "bad-usage", columns={**COLUMNS, "event_id": "nope"}),
                                       START, END)


@pytest.mark.parametrize(("change", "field"), [
    ({"bucket": ""}, "bucket"),
    ({"bucket": "Not_A_Bucket"}, "bucket"),
    ({"secret_access_key": ""}, "secret_access_key"),
    ({"endpoint_url": "ftp://x"}, "endpoint_url"),
    ({"hive_partitioned": "yes"}, "hive_partitioned"),
    ({"columns": {**COLUMNS, "units": None}}, r"columns\.units"),
    ({"columns": {**COLUMNS, "extra": "x"}}, "extra"),
])
def test_bad_config_names_the_field(change: dict[str, Any], field: str) -> None:
    config = {**_config("http://127.0.0.1:1", "usage-bucket"), **change}
    with pytest.raises(S3SourceError, match=field):
        s3_parquet.fetch_daily_buckets(config, START, END)
    result = s3_parquet.check(config)
    assert not result.ok and field.replace("\\", "") in result.message


# ---- credentials: an org's settings never borrow this server's AWS credentials --------------------------------

SERVER_KEYS = {"AWS_ACCESS_KEY_ID": "AKIASERVERROLE", "AWS_SECRET_ACCESS_KEY": "server-secret-value",
               "AWS_SESSION_TOKEN": "server-session-token"}


@pytest.fixture
def server_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """This server has AWS credentials of its own in the environment, as on an instance with a role."""
    for name, value in SERVER_KEYS.items():
        monkeypatch.setenv(name, value)


def _keyless(endpoint: str, bucket: str, **extra: Any) -> dict[str, Any]:
    config = _config(endpoint, bucket, **extra)
    del config["access_key_id"], config["secret_access_key"]
    return config


@pytest.mark.parametrize("blank", [{}, {"access_key_id": "", "secret_access_key": ""},
                                   {"access_key_id": "  ", "secret_access_key": " "}])
def test_keyless_config_never_builds_a_client(server_credentials: None, monkeypatch: pytest.MonkeyPatch,
                                              blank: dict[str, str]) -> None:
    """Without keys (and without server_credentials) boto3 is never asked for a client (Arrow reads through it)."""
    built: list[str] = []
    monkeypatch.setattr(s3_parquet.boto3, "client", lambda *a, **k: built.append("boto3"))
    config = {**_keyless("http://127.0.0.1:1", "usage-bucket"), **blank}
    with pytest.raises(S3SourceError, match=r"^access_key_id: required"):
        s3_parquet.parse_config(config)
    with pytest.raises(S3SourceError, match=r"^access_key_id: required"):
        s3_parquet.fetch_daily_buckets(config, START, END)
    result = s3_parquet.check(config)
    assert not result.ok and result.message.startswith("access_key_id: required")
    cfg = s3_parquet.parse_config(config, server_credentials=True)
    unlicensed = s3_parquet.S3Config(**{**cfg.__dict__, "server_credentials": False})  # built by hand
    for build in (lambda: s3_parquet.s3_client("us-east-1"), lambda: s3_parquet.boto_client(unlicensed),
                  lambda: s3_parquet.filesystem(unlicensed)):
        with pytest.raises(S3SourceError, match=r"^access_key_id: required"):
            build()
    assert built == []


def test_half_a_key_names_the_missing_field_without_quoting_the_secret() -> None:
    config = _config("http://127.0.0.1:1", "usage-bucket")
    with pytest.raises(S3SourceError, match=r"^secret_access_key: required") as missing_secret:
        s3_parquet.parse_config({**config, "secret_access_key": None}, server_credentials=True)
    with pytest.raises(S3SourceError, match=r"^access_key_id: required") as missing_id:
        s3_parquet.parse_config({**config, "access_key_id": " "}, server_credentials=True)
    assert KEYS["aws_secret_access_key"] not in str(missing_secret.value) + str(missing_id.value)


def test_explicit_keys_are_the_only_credentials_used(server_credentials: None, moto_endpoint: str,
                                                     hive_bucket: str) -> None:
    """With the org's keys, no request is signed with the server's (environment) key, nor carries its token."""
    config = _config(moto_endpoint, hive_bucket, hive_partitioned=True)
    recording = Recording(moto_endpoint)
    recording.start()
    assert s3_parquet.check(config).ok
    assert _rows(s3_parquet.fetch_daily_buckets(config, START, END)) == _expected()
    assert recording.signers(hive_bucket) == {KEYS["aws_access_key_id"]}
    url = s3_parquet.boto_client(s3_parquet.parse_config(config)).generate_presigned_url(
        "get_object", Params={"Bucket": hive_bucket, "Key": "k"})
    query = url.split("?", 1)[1]
    assert f"X-Amz-Credential={KEYS['aws_access_key_id']}%2F" in query and "X-Amz-Security-Token" not in query


def test_server_credentials_only_when_the_caller_allows_them(server_credentials: None, moto_endpoint: str,
                                                             hive_bucket: str) -> None:
    config = _keyless(moto_endpoint, hive_bucket, hive_partitioned=True)
    recording = Recording(moto_endpoint)
    recording.start()
    table = s3_parquet.fetch_daily_buckets(config, START, END, server_credentials=True)
    assert s3_parquet.check(config, server_credentials=True).ok
    assert _rows(table) == _expected()
    assert recording.signers(hive_bucket) == {SERVER_KEYS["AWS_ACCESS_KEY_ID"]}

