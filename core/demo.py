"""A realistic demo bundle: clean accounts, every anomaly type, and noise that must not be flagged.

Deterministic for a (seed, as_of): the same call writes the same files. Besides the bundle it
writes `manifest.json`, the planted truth (one entry per planted gap with its expected amounts),
so tests can hold the engine to it and the demo can say what it planted.

Plants (on roughly a third of the accounts): under-reported usage (events never sent to
billing), usage of a product never subscribed to, usage after a cancellation, a contract uplift
that billing ignored (renewal drift), seats above the included tier never charged (missed
overage), and an invoice above what was used (over-billing). Noise on clean accounts: an event
in the last minute of a period whose reported twin lands minutes after the cut-off, and a
reported total a hair (< 0.5%) below actual.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.files import replacing
from core.money import round_money
from core.pricing import Price, Tier, price_amount

FIRST = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne", "Wonka", "Tyrell",
         "Cyberdyne", "Soylent", "Aperture", "Massive", "Pied Piper", "Dunder", "Gringotts", "Oscorp",
         "Monarch", "Nakatomi", "Virtucon", "Zorg", "Buy n Large", "Blue Sun")
SECOND = ("Analytics", "Labs", "Systems", "Logistics", "Health", "Robotics", "Media", "Foods", "Energy",
          "Finance", "Retail", "Cloud")
PRODUCTS = (  # product_key, name, aggregation, unit
    ("api_calls", "API calls", "sum", "call"),
    ("seats", "Seats", "max", "seat"),
    ("storage_gb", "Storage GB-month", "sum", "GB"),
    ("data_export", "Data export", "sum", "row"),
)


def _tiers(*rows: tuple[int | None, str, str]) -> tuple[Tier, ...]:
    return tuple(Tier(None if up is None else Decimal(up), Decimal(unit), Decimal(flat)) for up, unit, flat in rows)


PRICES = (
    Price("price_api_usd", "api_calls", "usd", "per_unit", Decimal("0.0025")),
    Price("price_api_usd_2026", "api_calls", "usd", "per_unit", Decimal("0.0030")),
    Price("price_api_eur", "api_calls", "eur", "per_unit", Decimal("0.0023")),
    Price("price_api_jpy", "api_calls", "jpy", "per_unit", Decimal("0.35")),
    Price("price_seats_usd", "seats", "usd", "graduated",
          tiers=_tiers((10, "12.00", "49.00"), (50, "10.00", "0"), (None, "8.00", "0"))),
    Price("price_seats_usd_2026", "seats", "usd", "graduated",
          tiers=_tiers((10, "14.00", "49.00"), (50, "12.00", "0"), (None, "9.50", "0"))),
    Price("price_storage_usd", "storage_gb", "usd", "volume",
          tiers=_tiers((100, "0.25", "0"), (1000, "0.20", "5.00"), (None, "0.15", "10.00"))),
    Price("price_export_usd", "data_export", "usd", "package", Decimal("5.00"), package_size=1000),
)
PRICE = {p.price_id: p for p in PRICES}
DEFAULT_PRICE = {"api_calls": "price_api_usd", "seats": "price_seats_usd", "storage_gb": "price_storage_usd",
                 "data_export": "price_export_usd"}
UPLIFT = {"price_api_usd": "price_api_usd_2026", "price_seats_usd": "price_seats_usd_2026"}
SCENARIOS = ("under_reported_usage", "unbilled_usage", "usage_after_cancel", "renewal_drift", "missed_overage",
             "over_billing")
MIN_ACCOUNTS = len(SCENARIOS)  # every anomaly type planted at least once


@dataclass
class DemoManifest:
    seed: int
    accounts: int
    periods: list[tuple[str, str]]
    planted: list[dict[str, str]] = field(default_factory=list)
    noise: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _Writer:
    """Collects the bundle's rows; usage stays columnar (numpy) until it is written."""

    subscriptions: list[list[str]] = field(default_factory=list)
    contracts: list[list[str]] = field(default_factory=list)
    invoice_lines: list[list[str]] = field(default_factory=list)
    actual: list[dict[str, np.ndarray]] = field(default_factory=list)
    reported: list[dict[str, np.ndarray]] = field(default_factory=list)


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month_starts(as_of: date, months: int) -> list[datetime]:
    first = datetime(as_of.year, as_of.month, 1, tzinfo=UTC)
    starts = [first]
    for _ in range(months):
        previous = starts[-1] - timedelta(days=1)
        starts.append(datetime(previous.year, previous.month, 1, tzinfo=UTC))
    return sorted(starts)  # months full periods, then the start of as_of's month as the last end


def _events(rng: np.random.Generator, account: str, product: str, start: datetime, end: datetime,
            aggregation: str, scale: int) -> dict[str, np.ndarray]:
    """Events spread over every day of [start, end): counts for sums, daily seat counts for max."""
    days = (end - start).days
    start_s = int(start.timestamp())
    if aggregation == "max":
        base = scale
        seats = np.clip(base + rng.integers(-2, 3, days), 1, None)
        ts = start_s + np.arange(days) * 86_400 + rng.integers(3_600, 80_000, days)
        units = seats
    else:
        per_day = rng.poisson(12, days) + 1
        n = int(per_day.sum())
        day_index = np.repeat(np.arange(days), per_day)
        ts = start_s + day_index * 86_400 + rng.integers(0, 86_340, n)
        units = rng.integers(max(1, scale // 2), scale * 2, n)
    return {"account_id": np.full(len(ts), account), "product_key": np.full(len(ts), product),
            "ts": ts.astype("int64"), "units": units.astype("int64")}


def _total(events: dict[str, np.ndarray], aggregation: str) -> Decimal:
    if len(events["units"]) == 0:
        return Decimal(0)
    return Decimal(int(events["units"].max() if aggregation == "max" else events["units"].sum()))


def _take(events: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in events.items()}


def generate_demo_bundle(out_dir: Path | str, accounts: int = 60, seed: int = 7, months: int = 3,
                         as_of: date | None = None, usage_format: str = "csv") -> DemoManifest:
    """Write a demo bundle into `out_dir` and return what was planted."""
    if accounts < MIN_ACCOUNTS:
        raise ValueError(f"accounts: at least {MIN_ACCOUNTS} (one per planted scenario), got {accounts}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    starts = _month_starts(as_of or datetime.now(UTC).date(), months)
    periods = list(itertools.pairwise(starts))
    manifest = DemoManifest(seed, accounts, [(_iso(s), _iso(e)) for s, e in periods])
    writer = _Writer()
    account_rows = []
    scenario_of = {i: SCENARIOS[k % len(SCENARIOS)] for k, i in
                   enumerate(rng.choice(accounts, size=max(len(SCENARIOS), accounts // 3), replace=False))}
    for i in range(accounts):
        account_id = f"acct_{i + 1:04d}"
        name = f"{FIRST[i % len(FIRST)]} {SECOND[(i // len(FIRST) + i) % len(SECOND)]}"
        account_rows.append([account_id, name, f"cus_demo{i + 1:05d}", f"001DEMO{i + 1:08d}"])
        currency = "jpy" if i % 17 == 16 else "eur" if i % 7 == 6 else "usd"
        products = ["api_calls"] + (["seats"] if currency == "usd" else [])
        if currency == "usd" and i % 3 == 0:
            products.append("storage_gb")
        if currency == "usd" and i % 5 == 0:
            products.append("data_export")
        scenario = scenario_of.get(i)
        _account(rng, writer, manifest, account_id, currency, products, periods, scenario, noise=i % 4 == 1)
    _write_csv(out / "accounts.csv", ["account_id", "name", "stripe_customer_id", "crm_id"], account_rows)
    _write_csv(out / "products.csv", ["product_key", "name", "aggregation", "unit", "default_price_id"],
               [[*p, DEFAULT_PRICE[p[0]]] for p in PRODUCTS])
    _write_csv(out / "prices.csv", ["price_id", "product_key", "currency", "model", "unit_amount", "package_size",
                                    "tiers"], [_price_row(p) for p in PRICES])
    _write_csv(out / "subscriptions.csv", ["subscription_id", "account_id", "product_key", "price_id", "status",
                                           "period_start", "period_end"], writer.subscriptions)
    _write_csv(out / "contracts.csv", ["account_id", "product_key", "effective_from", "price_id"], writer.contracts)
    _write_csv(out / "invoice_lines.csv", ["invoice_id", "account_id", "product_key", "period_start", "period_end",
                                           "quantity", "amount", "currency"], writer.invoice_lines)
    _write_usage(out, "actual_usage", writer.actual, usage_format, with_event_id=True)
    _write_usage(out, "reported_usage", writer.reported, usage_format, with_event_id=False)
    with replacing(out / "manifest.json") as path:
        path.write_text(json.dumps({"seed": seed, "accounts": accounts, "periods": manifest.periods,
                                    "planted": manifest.planted, "noise": manifest.noise}, indent=2))
    return manifest


def _account(rng: np.random.Generator, w: _Writer, manifest: DemoManifest, account_id: str, currency: str,
             products: list[str], periods: list[tuple[datetime, datetime]], scenario: str | None,
             noise: bool) -> None:
    aggregation = {p[0]: p[2] for p in PRODUCTS}
    target = {"under_reported_usage": "api_calls", "unbilled_usage": "data_export", "usage_after_cancel": "api_calls",
              "renewal_drift": "api_calls", "missed_overage": "seats", "over_billing": "api_calls"}.get(scenario or "")
    if scenario == "missed_overage" and "seats" not in products:
        scenario, target = "over_billing", "api_calls"
    if scenario == "renewal_drift" and currency != "usd":
        scenario = "under_reported_usage"
    if scenario == "unbilled_usage" and "data_export" in products:
        products.remove("data_export")
    planted_period = len(periods) - 1 if scenario in ("under_reported_usage", "over_billing", "missed_overage") else 1
    for product in products + (["data_export"] if scenario == "unbilled_usage" else []):
        agg = aggregation[product]
        price_id = {"eur": "price_api_eur", "jpy": "price_api_jpy"}.get(currency, DEFAULT_PRICE[product]) \
            if product == "api_calls" else DEFAULT_PRICE[product]
        scale = {"api_calls": 40, "seats": int(rng.integers(12, 40)) if scenario == "missed_overage" else
                 int(rng.integers(3, 30)), "storage_gb": 8, "data_export": 60}[product]
        contract_price = None
        if scenario == "renewal_drift" and product == target:
            contract_price = UPLIFT[price_id]
            w.contracts.append([account_id, product, _iso(periods[1][0]), contract_price])
        sub_id = f"sub_{account_id}_{product}"
        for k, (start, end) in enumerate(periods):
            actual = _events(rng, account_id, product, start, end, agg, scale)
            reported = actual
            subscribed = not (scenario == "unbilled_usage" and product == target)
            if scenario == "usage_after_cancel" and product == target and k >= 1:
                subscribed = k < 1
            planted_here = product == target and (k == planted_period or (scenario == "renewal_drift" and k >= 1)
                                                  or (scenario == "usage_after_cancel" and k >= 1))
            if planted_here and scenario == "under_reported_usage":
                reported = _take(actual, rng.random(len(actual["ts"])) > 0.2)
            late = noise and product == "api_calls" and k == 0 and not planted_here
            if late:
                actual, reported = _late_event(actual, reported, end, account_id, manifest)
            if subscribed:
                status = "canceled" if scenario == "usage_after_cancel" and product == target else "active"
                w.subscriptions.append([sub_id, account_id, product, price_id, status, _iso(start), _iso(end)])
            w.actual.append(actual)
            w.reported.append(reported)
            if not subscribed:
                list_price = price_id
                _plant(manifest, account_id, product, start, end, "unbilled_usage", PRICE[list_price],
                       _total(actual, agg), Decimal(0))
                continue
            r_total = _total(reported, agg)
            billed = price_amount(PRICE[price_id], r_total)
            if planted_here and scenario == "missed_overage":
                billed = price_amount(PRICE[price_id], min(r_total, Decimal(10)))
            if planted_here and scenario == "over_billing":
                billed = billed + Decimal(int(rng.integers(40, 400)))
            w.invoice_lines.append([f"in_{account_id}_{start:%Y%m}", account_id, product, _iso(start), _iso(end),
                                    str(r_total), str(billed), PRICE[price_id].currency])
            if planted_here and scenario in ("under_reported_usage", "missed_overage", "over_billing", "renewal_drift"):
                expected_price = PRICE[contract_price or price_id]
                _plant(manifest, account_id, product, start, end, scenario, expected_price,
                       _total(actual, agg), billed)


def _late_event(actual: dict[str, np.ndarray], reported: dict[str, np.ndarray], end: datetime, account_id: str,
                manifest: DemoManifest) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An event at 23:59:30 on the period's last day, reported 3 minutes after the cut-off."""
    stamp = int(end.timestamp()) - 30
    extra = {k: v[:1].copy() for k, v in actual.items()}
    extra["ts"][0], extra["units"][0] = stamp, 5
    late = {k: v.copy() for k, v in extra.items()}
    late["ts"][0] = stamp + 210
    manifest.noise.append({"account_id": account_id, "kind": "late_reported_event", "actual_ts": _iso(
        datetime.fromtimestamp(stamp, UTC)), "reported_ts": _iso(datetime.fromtimestamp(stamp + 210, UTC))})
    joined = {k: np.concatenate([actual[k], extra[k]]) for k in actual}
    return joined, {k: np.concatenate([reported[k], late[k]]) for k in reported}


def _plant(manifest: DemoManifest, account_id: str, product: str, start: datetime, end: datetime, kind: str,
           price: Price, actual: Decimal, billed: Decimal) -> None:
    expected = price_amount(price, actual)
    billed = round_money(billed, price.currency)
    manifest.planted.append({
        "account_id": account_id, "product_key": product, "period_start": _iso(start), "period_end": _iso(end),
        "type": kind, "expected_amount": str(expected), "billed_amount": str(billed),
        "leak_amount": str(max(expected - billed, Decimal(0))), "currency": price.currency,
    })


def _price_row(price: Price) -> list[str]:
    tiers = json.dumps([{"up_to": None if t.up_to is None else int(t.up_to), "unit_amount": str(t.unit_amount),
                         "flat_amount": str(t.flat_amount)} for t in price.tiers]) if price.tiers else ""
    return [price.price_id, price.product_key, price.currency, price.model,
            "" if price.unit_amount is None else str(price.unit_amount),
            "" if price.package_size is None else str(price.package_size), tiers]


def _write_csv(path: Path, header: list[str], rows: Iterable[Iterable[object]]) -> None:
    with replacing(path) as scratch, scratch.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_usage(out: Path, stem: str, chunks: list[dict[str, np.ndarray]], usage_format: str,
                 with_event_id: bool) -> None:
    columns = {k: np.concatenate([c[k] for c in chunks]) for k in ("account_id", "product_key", "ts", "units")}
    order = np.lexsort((columns["ts"], columns["account_id"]))
    columns = {k: v[order] for k, v in columns.items()}
    table = pa.table({
        "account_id": pa.array(columns["account_id"].astype(str)),
        "product_key": pa.array(columns["product_key"].astype(str)),
        "ts": pa.array(columns["ts"] * 1_000_000, pa.timestamp("us", tz="UTC")),
        "units": pa.array(columns["units"], pa.int64()),
    })
    if with_event_id:
        table = table.append_column("event_id", pa.array([f"evt_{n:08d}" for n in range(table.num_rows)]))
    (out / f"{stem}.{'csv' if usage_format == 'parquet' else 'parquet'}").unlink(missing_ok=True)  # the other one
    if usage_format == "parquet":
        with replacing(out / f"{stem}.parquet") as scratch:
            pq.write_table(table, scratch)
        return
    ts_text = np.char.add(np.datetime_as_string(columns["ts"].astype("datetime64[s]"), unit="s"), "Z")
    csv_table = table.set_column(2, "ts", pa.array(ts_text))
    _write_csv(out / f"{stem}.csv", csv_table.column_names,
               zip(*(csv_table.column(i).to_pylist() for i in range(csv_table.num_columns)), strict=True))
