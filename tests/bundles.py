"""A small builder that states a reconciliation scenario in a few lines and writes it as a bundle."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.bundle import load_bundle
from core.reconcile import ReconcileParams, ReconcileResult, reconcile

JAN, FEB, MAR, APR = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"
AS_OF = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass
class Scenario:
    accounts: list[list[str]] = field(default_factory=lambda: [["acme", "Acme", "cus_acme", "001A"],
                                                               ["beta", "Beta", "cus_beta", "001B"]])
    products: list[list[str]] = field(default_factory=lambda: [["api", "API calls", "sum", "call", ""],
                                                               ["seats", "Seats", "max", "seat", ""]])
    prices: list[list[str]] = field(default_factory=lambda: [
        ["p_api", "api", "usd", "per_unit", "0.10", "", ""],
        ["p_seats", "seats", "usd", "per_unit", "10.00", "", ""],
    ])
    subscriptions: list[list[str]] = field(default_factory=list)
    contracts: list[list[str]] = field(default_factory=list)
    invoice_lines: list[list[str]] = field(default_factory=list)
    actual: list[list[str]] = field(default_factory=list)
    reported: list[list[str]] = field(default_factory=list)

    def price(self, price_id: str, product: str, model: str, unit_amount: str = "", package_size: str = "",
              tiers: list[dict] | None = None, currency: str = "usd") -> Scenario:
        self.prices.append([price_id, product, currency, model, unit_amount, package_size,
                            json.dumps(tiers) if tiers else ""])
        return self

    def sub(self, account: str, product: str, price: str, start: str = JAN, end: str = FEB,
            status: str = "active") -> Scenario:
        self.subscriptions.append([f"sub_{account}_{product}", account, product, price, status, start, end])
        return self

    def invoice(self, account: str, product: str, quantity: str, amount: str, start: str = JAN, end: str = FEB,
                currency: str = "usd") -> Scenario:
        self.invoice_lines.append([f"in_{len(self.invoice_lines)}", account, product, start, end, quantity, amount,
                                   currency])
        return self

    def use(self, account: str, product: str, ts: str, units: str, reported: str | None = None,
            reported_ts: str | None = None) -> Scenario:
        """Actual usage, and (unless reported == "") the same usage reported to billing."""
        self.actual.append([account, product, ts, units, f"e{len(self.actual)}"])
        if reported != "":
            self.reported.append([account, product, reported_ts or ts, reported if reported is not None else units])
        return self

    def write(self, folder: Path, usage_format: str = "csv") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tables = {
            "accounts.csv": (["account_id", "name", "stripe_customer_id", "crm_id"], self.accounts),
            "products.csv": (["product_key", "name", "aggregation", "unit", "default_price_id"], self.products),
            "prices.csv": (["price_id", "product_key", "currency", "model", "unit_amount", "package_size", "tiers"],
                           self.prices),
            "subscriptions.csv": (["subscription_id", "account_id", "product_key", "price_id", "status",
                                   "period_start", "period_end"], self.subscriptions),
            "contracts.csv": (["account_id", "product_key", "effective_from", "price_id"], self.contracts),
            "invoice_lines.csv": (["invoice_id", "account_id", "product_key", "period_start", "period_end",
                                   "quantity", "amount", "currency"], self.invoice_lines),
        }
        usage = {"actual_usage": (["account_id", "product_key", "ts", "units", "event_id"], self.actual),
                 "reported_usage": (["account_id", "product_key", "ts", "units"], self.reported)}
        for name, (header, rows) in tables.items():
            write_csv(folder / name, header, rows)
        for stem, (header, rows) in usage.items():
            if usage_format == "parquet":
                columns = list(zip(*rows, strict=True)) if rows else [[] for _ in header]
                data = dict(zip(header, columns, strict=True))
                data["ts"] = [datetime.fromisoformat(t) for t in data["ts"]]
                data["units"] = [float(u) for u in data["units"]]
                table = pa.table(data, schema=pa.schema([
                    (h, pa.timestamp("us", tz="UTC") if h == "ts" else pa.float64() if h == "units" else pa.string())
                    for h in header]))
                pq.write_table(table, folder / f"{stem}.parquet")
            else:
                write_csv(folder / f"{stem}.csv", header, rows)
        return folder

    def run(self, tmp_path: Path, usage_format: str = "csv", **params: object) -> ReconcileResult:
        folder = self.write(tmp_path / "bundle", usage_format)
        return reconcile(load_bundle(folder), ReconcileParams(as_of=AS_OF, **params))  # type: ignore[arg-type]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def only(result: ReconcileResult):  # type: ignore[no-untyped-def]
    assert len(result.anomalies) == 1, [(a.type, a.account_id, a.leak_amount) for a in result.anomalies]
    return result.anomalies[0]
