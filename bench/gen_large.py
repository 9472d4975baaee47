"""Seeded large Parquet bundle for the benchmark: N usage events over 10k accounts, 3 monthly periods.

Written in row-group chunks (numpy, pyarrow), so 100M events fit in a few hundred MB of memory.
Billing follows reported usage; 5% of accounts lose 10% of their reported events (the leaks the
engine must find). `--billing calendar` (default) bills calendar months from midnight UTC;
`--billing anniversary` bills like Stripe's default: each account's periods start on its own day
of the month at the second its subscription was created (4 periods, the first from December).
"""

from __future__ import annotations

import argparse
import csv
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MONTHS = [datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4)]  # the events span MONTHS[0]..MONTHS[-1]
PRODUCTS = (("api_calls", "API calls", "sum", "call", "price_api", "0.0010"),
            ("storage_gb", "Storage GB", "sum", "GB", "price_storage", "0.0200"))
CHUNK = 5_000_000


def _anchors(accounts: int, billing: str, seed: int) -> tuple[list[datetime], np.ndarray]:
    """Month starts the periods are anchored on, and each account's offset from them in seconds.
    A generator of its own, so the events of a calendar bundle do not depend on the option."""
    if billing == "calendar":
        return MONTHS, np.zeros(accounts, dtype=np.int64)
    rng = np.random.default_rng(seed + 1)
    return [datetime(2025, 12, 1, tzinfo=UTC), *MONTHS], rng.integers(0, 28, accounts) * 86_400 + rng.integers(
        0, 86_400, accounts)


def generate(out: Path, events: int, accounts: int, seed: int, billing: str = "calendar") -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    account_ids = np.array([f"acct_{i:06d}" for i in range(accounts)])
    leaky = rng.random(accounts) < 0.05
    start_s, span = int(MONTHS[0].timestamp()), int(MONTHS[-1].timestamp() - MONTHS[0].timestamp())
    bounds = np.array([int(m.timestamp()) for m in MONTHS])
    anchors, offsets = _anchors(accounts, billing, seed)
    periods = len(anchors) - 1
    actual_units = np.zeros((accounts, len(PRODUCTS), periods), dtype=np.int64)
    reported_units = np.zeros_like(actual_units)
    schema = pa.schema([("account_id", pa.string()), ("product_key", pa.string()),
                        ("ts", pa.timestamp("us", tz="UTC")), ("units", pa.int64())])
    product_keys = np.array([p[0] for p in PRODUCTS])
    with pq.ParquetWriter(out / "actual_usage.parquet", schema) as actual_w, \
         pq.ParquetWriter(out / "reported_usage.parquet", schema) as reported_w:
        for done in range(0, events, CHUNK):
            n = min(CHUNK, events - done)
            acc = rng.integers(0, accounts, n)
            prod = rng.integers(0, len(PRODUCTS), n)
            ts = start_s + rng.integers(0, span, n)
            units = rng.integers(1, 20, n)
            month = np.searchsorted(bounds, ts, side="right") - 1
            if billing == "anniversary":  # before the account's anchor in its month: the previous period
                month = month + (ts >= bounds[month] + offsets[acc])
            keep = ~(leaky[acc] & (rng.random(n) < 0.10))
            np.add.at(actual_units, (acc, prod, month), units)
            np.add.at(reported_units, (acc[keep], prod[keep], month[keep]), units[keep])
            table = pa.table({"account_id": account_ids[acc], "product_key": product_keys[prod],
                              "ts": pa.array(ts * 1_000_000, pa.timestamp("us", tz="UTC")), "units": units},
                             schema=schema)
            actual_w.write_table(table, row_group_size=1 << 20)
            reported_w.write_table(table.filter(pa.array(keep)), row_group_size=1 << 20)
    _small_tables(out, account_ids, reported_units, anchors, offsets)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _small_tables(out: Path, account_ids: np.ndarray, reported: np.ndarray, anchors: list[datetime],
                  offsets: np.ndarray) -> None:
    _write(out / "accounts.csv", ["account_id", "name", "stripe_customer_id", "crm_id"],
           [[a, f"Customer {a[5:]}", f"cus_{a[5:]}", ""] for a in account_ids])
    _write(out / "products.csv", ["product_key", "name", "aggregation", "unit"], [list(p[:4]) for p in PRODUCTS])
    _write(out / "prices.csv", ["price_id", "product_key", "currency", "model", "unit_amount", "package_size",
                                "tiers"], [[p[4], p[0], "usd", "per_unit", p[5], "", ""] for p in PRODUCTS])
    _write(out / "contracts.csv", ["account_id", "product_key", "effective_from", "price_id"], [])
    subs, lines = [], []
    for i, account in enumerate(account_ids):
        for j, product in enumerate(PRODUCTS):
            for m in range(len(anchors) - 1):
                start, end = ((anchors[k] + timedelta(seconds=int(offsets[i]))).strftime("%Y-%m-%dT%H:%M:%SZ")
                              for k in (m, m + 1))
                subs.append([f"sub_{account}_{product[0]}", account, product[0], product[4], "active", start, end])
                quantity = int(reported[i, j, m])
                amount = (Decimal(quantity) * Decimal(product[5])).quantize(Decimal("0.01"))
                lines.append([f"in_{account}_{m}", account, product[0], start, end, str(quantity), str(amount), "usd"])
    _write(out / "subscriptions.csv", ["subscription_id", "account_id", "product_key", "price_id", "status",
                                       "period_start", "period_end"], subs)
    _write(out / "invoice_lines.csv", ["invoice_id", "account_id", "product_key", "period_start", "period_end",
                                       "quantity", "amount", "currency"], lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--billing", choices=("calendar", "anniversary"), default="calendar")
    args = parser.parse_args()
    generate(args.out, args.events, args.accounts, args.seed, args.billing)
