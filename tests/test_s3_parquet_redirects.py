"""connectors/s3_parquet.py never follows a redirect from an organization's `endpoint_url`, neither through
boto3 nor through the Arrow file system it reads Parquet with (Arrow's own S3 client follows them)."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from connectors import s3_parquet
from connectors.s3_parquet import S3SourceError
from tests.fakes.redirect_target import SECRET, redirect_target, redirecting_to

REFUSED = "S3 answered with a redirect (307); redirects are refused: set endpoint_url to the address that answers"


def test_a_redirecting_endpoint_is_refused_without_contacting_where_it_points() -> None:
    with redirect_target() as target, redirecting_to(target, status=307) as endpoint:
        config = {"bucket": "usage-bucket", "prefix": "usage/events", "access_key_id": "AKIAORGKEY",
                  "secret_access_key": "org-secret-value", "endpoint_url": endpoint,
                  "columns": {"account_id": "acct", "product_key": "product", "ts": "occurred_at", "units": "qty"}}
        checked = s3_parquet.check(config)
        with pytest.raises(S3SourceError) as listing:
            s3_parquet.fetch_daily_buckets(config, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC))
        with pytest.raises(OSError) as reading:
            pq.read_schema("usage-bucket/usage/events/part-0.parquet",
                           filesystem=s3_parquet.filesystem(s3_parquet.parse_config(config)))
    assert not checked.ok and checked.message == f"cannot reach S3 for s3://usage-bucket/usage/events/: {REFUSED}"
    assert str(listing.value) == f"cannot list s3://usage-bucket/usage/events/: {REFUSED}"
    assert REFUSED in str(reading.value)
    assert SECRET not in checked.message + str(listing.value) + str(reading.value)
    assert target.requests == []
