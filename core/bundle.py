"""Load and validate a bundle folder into a `Bundle`.

All problems are collected (not just the first) so a user fixes a file in one go; nothing
downstream runs when there is any. The small tables are parsed row by row here; the usage tables
are only checked for shape here and validated value by value inside DuckDB by `core.usage`
while they are aggregated, so a 100M-event file is never turned into Python objects.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.errors import BundleError, Problem
from core.gcpause import paused_gc
from core.model import (
    ID_EXPECTED,
    MAX_ID_LENGTH,
    Account,
    Bundle,
    Contract,
    InvoiceLine,
    Product,
    SubscriptionPeriod,
    UsageSource,
    shortened,
)
from core.pricing import PRICING_MODELS, Price, Tier

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts.csv": ("account_id", "name", "stripe_customer_id", "crm_id"),
    "products.csv": ("product_key", "name", "aggregation", "unit"),
    "prices.csv": ("price_id", "product_key", "currency", "model", "unit_amount", "package_size", "tiers"),
    "subscriptions.csv": (
        "subscription_id", "account_id", "product_key", "price_id", "status", "period_start", "period_end",
    ),
    "contracts.csv": ("account_id", "product_key", "effective_from", "price_id"),
    "invoice_lines.csv": (
        "invoice_id", "account_id", "product_key", "period_start", "period_end", "quantity", "amount", "currency",
    ),
}
USAGE_COLUMNS: tuple[str, ...] = ("account_id", "product_key", "ts", "units")
TS_EXPECTED = "an ISO 8601 timestamp with an offset or Z (e.g. 2026-01-31T23:59:00Z)"
MAX_PROBLEMS = 200


class _Collector:
    """Gathers problems while parsing; parse helpers return None on a bad value."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def decimal(self, file: str, row: int, column: str, raw: str, *, allow_empty: bool = False,
                non_negative: bool = False) -> Decimal | None:
        if raw == "" and allow_empty:
            return None
        try:
            value = Decimal(raw)
            if not value.is_finite():
                raise InvalidOperation
        except InvalidOperation:
            self.add(Problem(file, "a decimal number such as 12.50", row, column, raw))
            return None
        if non_negative and value < 0:
            self.add(Problem(file, "a number >= 0", row, column, raw))
            return None
        return value

    def instant(self, file: str, row: int, column: str, raw: str) -> datetime | None:
        """A timestamp with offset, or a date (midnight UTC): both are unambiguous."""
        value = _utc_instant(raw)
        if value is None:
            self.add(Problem(file, f"{TS_EXPECTED} or a date YYYY-MM-DD", row, column, raw))
        return value

    def choice(self, file: str, row: int, column: str, raw: str, allowed: tuple[str, ...]) -> str | None:
        if raw not in allowed:
            self.add(Problem(file, f"one of {', '.join(allowed)}", row, column, raw))
            return None
        return raw

    def identifier(self, file: str, row: int, column: str, raw: str) -> bool:
        """False (with a problem) when `raw` is longer than the app database stores an identifier."""
        if len(raw) > MAX_ID_LENGTH:
            self.add(Problem(file, ID_EXPECTED, row, column, shortened(raw)))
            return False
        return True

    def reference(self, file: str, row: int, column: str, raw: str, known: dict[str, Any], what: str) -> bool:
        """A too-long reference is named as such: it could never be defined, so "not defined" would mislead."""
        if not self.identifier(file, row, column, raw):
            return False
        if raw not in known:
            self.add(Problem(file, f"a {what} defined in the bundle", row, column, raw))
            return False
        return True


@lru_cache(maxsize=65_536)
def _utc_instant(raw: str) -> datetime | None:
    """Parse once per distinct text: billing tables repeat the same few period boundaries."""
    try:
        if len(raw) == 10:
            return datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
        value = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return value.astimezone(UTC) if value.tzinfo is not None else None


def _rows(folder: Path, name: str, collector: _Collector, *, optional: bool = False,
          extra_columns: tuple[str, ...] = ()) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yield (line number, values) of a CSV after checking its header.

    Values come in the order of REQUIRED_COLUMNS[name] then `extra_columns` (an absent extra
    column reads as ""), so loaders unpack them by name. Parsed by Arrow's CSV reader (every column
    as text, whitespace trimmed): a line number is the row's index + 2, which holds because bundle
    values never contain line breaks. Tuples, not dicts: the billing tables have a row per
    account, product and period.
    """
    path = folder / name
    if not path.exists():
        if not optional:
            collector.add(Problem(name, "the file to exist in the bundle folder"))
        return
    with path.open(newline="", encoding="utf-8") as handle:
        raw_header = next(csv.reader(handle), [])
    header = [column.strip() for column in raw_header]
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in header]
    for column in missing:
        collector.add(Problem(name, "this column in the header row", 1, column))
    if missing:
        return
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(raw_header, pa.string()), strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        collector.add(Problem(name, f"a well-formed CSV file with {len(header)} fields per row ({exc})"))
        return
    index = {column.strip(): i for i, column in enumerate(table.column_names)}
    blank = [""] * table.num_rows
    columns = [pc.utf8_trim_whitespace(table.column(index[column])).to_pylist() if column in index else blank
               for column in (*REQUIRED_COLUMNS[name], *extra_columns)]
    yield from enumerate(zip(*columns, strict=True), start=2)


def _parse_tiers(collector: _Collector, row: int, raw: str) -> tuple[Tier, ...] | None:
    expected = 'a JSON list of {"up_to": int or null, "unit_amount": "dec", "flat_amount": "dec"}'
    try:
        items = json.loads(raw)
        if not isinstance(items, list) or not items:
            raise ValueError
        tiers = []
        for item in items:
            up_to = item["up_to"]
            if up_to is not None and (isinstance(up_to, bool) or not isinstance(up_to, int | str)):
                raise ValueError
            tiers.append(Tier(
                up_to=None if up_to is None else Decimal(str(up_to)),
                unit_amount=Decimal(str(item.get("unit_amount") or "0")),
                flat_amount=Decimal(str(item.get("flat_amount") or "0")),
            ))
        return tuple(tiers)
    except (ValueError, TypeError, KeyError, InvalidOperation):
        collector.add(Problem("prices.csv", expected, row, "tiers", raw))
        return None


def _load_accounts(folder: Path, c: _Collector) -> dict[str, Account]:
    accounts: dict[str, Account] = {}
    for line, (account_id, name, stripe_customer_id, crm_id) in _rows(folder, "accounts.csv", c):
        # a bad Stripe or CRM id does not undefine the account: its references are fine and stay quiet
        c.identifier("accounts.csv", line, "stripe_customer_id", stripe_customer_id)
        c.identifier("accounts.csv", line, "crm_id", crm_id)
        if not account_id:
            c.add(Problem("accounts.csv", "a non-empty account_id", line, "account_id", ""))
        elif account_id in accounts:
            c.add(Problem("accounts.csv", "a unique account_id", line, "account_id", account_id))
        elif c.identifier("accounts.csv", line, "account_id", account_id):
            accounts[account_id] = Account(account_id, name, stripe_customer_id or None, crm_id or None)
    return accounts


def _load_products(folder: Path, c: _Collector) -> dict[str, Product]:
    products: dict[str, Product] = {}
    rows = _rows(folder, "products.csv", c, extra_columns=("default_price_id",))
    for line, (product_key, name, raw_aggregation, unit, default_price_id) in rows:
        aggregation = c.choice("products.csv", line, "aggregation", raw_aggregation, ("sum", "max"))
        if not c.identifier("products.csv", line, "default_price_id", default_price_id):
            default_price_id = ""  # reported; not looked up in prices.csv as well
        if product_key in products or not product_key:
            c.add(Problem("products.csv", "a unique, non-empty product_key", line, "product_key", product_key))
        elif c.identifier("products.csv", line, "product_key", product_key) and aggregation:
            products[product_key] = Product(product_key, name, aggregation, unit or "unit",  # type: ignore[arg-type]
                                            default_price_id or None)
    return products


def _load_prices(folder: Path, c: _Collector, products: dict[str, Product]) -> dict[str, Price]:
    prices: dict[str, Price] = {}
    name = "prices.csv"
    for line, (price_id, product_key, raw_currency, raw_model, raw_unit_amount, raw_package_size,
               raw_tiers) in _rows(folder, name, c):
        ok = c.identifier(name, line, "price_id", price_id)
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        model = c.choice(name, line, "model", raw_model, PRICING_MODELS)
        currency = raw_currency.lower()
        if len(currency) != 3 or not currency.isalpha():
            c.add(Problem(name, "a 3-letter ISO currency code", line, "currency", raw_currency))
            ok = False
        unit_amount = c.decimal(name, line, "unit_amount", raw_unit_amount, allow_empty=True, non_negative=True)
        package_size = None
        if raw_package_size:
            if raw_package_size.isdigit() and int(raw_package_size) >= 1:
                package_size = int(raw_package_size)
            else:
                c.add(Problem(name, "a whole number >= 1", line, "package_size", raw_package_size))
                ok = False
        tiers: tuple[Tier, ...] | None = ()
        if model in ("graduated", "volume"):
            tiers = _parse_tiers(c, line, raw_tiers)
        if not (ok and model and tiers is not None):
            continue
        try:
            prices[price_id] = Price(price_id, product_key, currency, model,  # type: ignore[arg-type]
                                     unit_amount, package_size, tiers)
        except ValueError as exc:
            column, raw = ("tiers", raw_tiers) if model in ("graduated", "volume") else ("unit_amount",
                                                                                        raw_unit_amount)
            c.add(Problem(name, f"a complete {model} price ({exc})", line, column, raw))
    return prices


def _check_price_product(c: _Collector, file: str, line: int, price_id: str, product_key: str,
                         prices: dict[str, Price], products: dict[str, Product]) -> bool:
    """The row's price must exist and be one of the row's product; the product is compared only when it is
    defined (an unknown one is already reported, and no price could be of it)."""
    if not c.reference(file, line, "price_id", price_id, prices, "price_id"):
        return False
    if product_key in products and prices[price_id].product_key != product_key:
        c.add(Problem(file, f"a price of product {product_key!r} (price {price_id} belongs to "
                            f"{prices[price_id].product_key!r})", line, "price_id", price_id))
        return False
    return True


def _load_subscriptions(folder: Path, c: _Collector, accounts: dict[str, Account],
                        products: dict[str, Product], prices: dict[str, Price]) -> list[SubscriptionPeriod]:
    periods: list[tuple[int, SubscriptionPeriod]] = []
    name = "subscriptions.csv"
    for line, (subscription_id, account_id, product_key, price_id, status, raw_start,
               raw_end) in _rows(folder, name, c):
        ok = c.identifier(name, line, "subscription_id", subscription_id)
        ok &= c.reference(name, line, "account_id", account_id, accounts, "account_id")
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        ok &= _check_price_product(c, name, line, price_id, product_key, prices, products)
        start = c.instant(name, line, "period_start", raw_start)
        end = c.instant(name, line, "period_end", raw_end)
        if start and end and end <= start:
            c.add(Problem(name, "period_end after period_start (periods are [start, end))", line,
                          "period_end", raw_end))
            continue
        if ok and start and end:
            periods.append((line, SubscriptionPeriod(subscription_id, account_id, product_key, price_id, status,
                                                     start, end)))
    _check_overlaps(c, periods)
    return [p for _, p in periods]


def _check_overlaps(c: _Collector, periods: list[tuple[int, SubscriptionPeriod]]) -> None:
    """One account may not be billed twice for one product at the same instant."""
    ordered = sorted(periods, key=lambda lp: (lp[1].account_id, lp[1].product_key, lp[1].period_start))
    for (line_a, a), (line_b, b) in itertools.pairwise(ordered):
        if (a.account_id, a.product_key) == (b.account_id, b.product_key) and b.period_start < a.period_end:
            c.add(Problem("subscriptions.csv",
                          f"no overlap with row {line_a} ({a.subscription_id}, {a.period_start.isoformat()} to "
                          f"{a.period_end.isoformat()}) for account {a.account_id} and product {a.product_key}",
                          line_b, "period_start", b.period_start.isoformat()))


def _load_contracts(folder: Path, c: _Collector, accounts: dict[str, Account],
                    products: dict[str, Product], prices: dict[str, Price]) -> list[Contract]:
    contracts: list[Contract] = []
    name = "contracts.csv"
    for line, (account_id, product_key, raw_effective, price_id) in _rows(folder, name, c, optional=True):
        ok = c.reference(name, line, "account_id", account_id, accounts, "account_id")
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        ok &= _check_price_product(c, name, line, price_id, product_key, prices, products)
        effective = c.instant(name, line, "effective_from", raw_effective)
        if ok and effective:
            contracts.append(Contract(account_id, product_key, effective, price_id))
    return contracts


def _load_invoice_lines(folder: Path, c: _Collector, accounts: dict[str, Account],
                        products: dict[str, Product]) -> list[InvoiceLine]:
    lines: list[InvoiceLine] = []
    name = "invoice_lines.csv"
    for line, (invoice_id, account_id, product_key, raw_start, raw_end, raw_quantity, raw_amount,
               raw_currency) in _rows(folder, name, c):
        ok = c.reference(name, line, "account_id", account_id, accounts, "account_id")
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        start = c.instant(name, line, "period_start", raw_start)
        end = c.instant(name, line, "period_end", raw_end)
        quantity = c.decimal(name, line, "quantity", raw_quantity, non_negative=True)
        amount = c.decimal(name, line, "amount", raw_amount)
        currency = raw_currency.lower()
        if len(currency) != 3 or not currency.isalpha():
            c.add(Problem(name, "a 3-letter ISO currency code", line, "currency", raw_currency))
            ok = False
        if ok and start and end and quantity is not None and amount is not None:
            lines.append(InvoiceLine(invoice_id, account_id, product_key, start, end, quantity, amount, currency))
    return lines


def _usage_source(folder: Path, stem: str, c: _Collector, notes: list[str]) -> UsageSource | None:
    """Find `<stem>.parquet` or `<stem>.csv`, check its columns; values are checked in DuckDB."""
    parquet, csv_path = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    if parquet.exists():
        return _parquet_source(parquet, c, notes)
    if csv_path.exists():
        return _csv_source(csv_path, c)
    c.add(Problem(f"{stem}.csv", f"the file {stem}.csv or {stem}.parquet in the bundle folder"))
    return None


def _parquet_source(path: Path, c: _Collector, notes: list[str]) -> UsageSource | None:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        c.add(Problem(path.name, f"a readable Parquet file ({exc})"))
        return None
    missing = [col for col in USAGE_COLUMNS if col not in schema.names]
    for col in missing:
        c.add(Problem(path.name, "this column in the Parquet schema", None, col))
    if missing:
        return None
    ts_type = schema.field("ts").type
    units_type = schema.field("units").type
    if not pa.types.is_timestamp(ts_type):
        c.add(Problem(path.name, "a timestamp column", None, "ts", str(ts_type)))
    if not (pa.types.is_integer(units_type) or pa.types.is_decimal(units_type) or pa.types.is_floating(units_type)):
        c.add(Problem(path.name, "a numeric column", None, "units", str(units_type)))
    ts_naive = pa.types.is_timestamp(ts_type) and ts_type.tz is None
    if ts_naive:
        notes.append(f"{path.name}: column ts has no time zone; its timestamps were read as UTC")
    units_kind = "float"
    if pa.types.is_integer(units_type) or pa.types.is_decimal(units_type):
        units_kind = "integer" if pa.types.is_integer(units_type) else "decimal"
    return UsageSource(path.name, path=path, has_event_id="event_id" in schema.names, ts_naive=ts_naive,
                       units_type=units_kind)


def _csv_source(path: Path, c: _Collector) -> UsageSource | None:
    """Parse with Arrow's multithreaded reader, every column as text: DuckDB checks the values, and
    an error quotes the value as written (Arrow's type guessing would reformat a timestamp)."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys((*USAGE_COLUMNS, "event_id"), pa.string()), strings_can_be_null=False,
                auto_dict_encode=False),
        )
    except pa.ArrowInvalid as exc:
        c.add(Problem(path.name, f"a well-formed CSV file ({exc})"))
        return None
    missing = [col for col in USAGE_COLUMNS if col not in table.column_names]
    for col in missing:
        c.add(Problem(path.name, "this column in the header row", 1, col))
    if missing:
        return None
    keep = [col for col in (*USAGE_COLUMNS, "event_id") if col in table.column_names]
    table = table.select(keep).cast(pa.schema([pa.field(col, pa.string()) for col in keep]))
    return UsageSource(path.name, table=table, has_event_id="event_id" in keep)


def _check(c: _Collector) -> None:
    if c.problems:
        raise BundleError(c.problems)


@paused_gc()
def load_bundle(folder: Path | str) -> Bundle:
    """Read every table of the bundle folder; raise BundleError listing every problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError([Problem(str(folder), "a bundle folder")])
    c = _Collector()
    notes: list[str] = []
    accounts = _load_accounts(folder, c)
    products = _load_products(folder, c)
    prices = _load_prices(folder, c, products)
    for key, product in products.items():
        if product.default_price_id and product.default_price_id not in prices:
            c.add(Problem("products.csv", "a price_id from prices.csv", None, "default_price_id",
                          f"{product.default_price_id} (product {key})"))
    subscriptions = _load_subscriptions(folder, c, accounts, products, prices)
    contracts = _load_contracts(folder, c, accounts, products, prices)
    invoice_lines = _load_invoice_lines(folder, c, accounts, products)
    actual = _usage_source(folder, "actual_usage", c, notes)
    reported = _usage_source(folder, "reported_usage", c, notes)
    _check(c)
    assert actual is not None and reported is not None
    return Bundle(accounts, products, prices, subscriptions, contracts, invoice_lines, actual, reported, notes)


def with_list_prices(bundle: Bundle, price_map: dict[str, str]) -> Bundle:
    """The bundle with an admin's product-to-price mapping applied as the products' default prices.

    The mapping decides what usage with no subscription is valued at (it outranks the product's own
    default price; an account's earlier subscription price still comes first, see
    docs/reconciliation.md). Every problem is reported; nothing is applied when one exists.
    """
    problems = []
    for product_key, price_id in sorted(price_map.items()):
        if product_key not in bundle.products:
            problems.append(Problem("price map", "a product of the data source", None, "product_key", product_key))
        elif price_id not in bundle.prices or bundle.prices[price_id].product_key != product_key:
            problems.append(Problem("price map", f"a price of product {product_key}", None, "price_id", price_id))
    if problems:
        raise BundleError(problems)
    products = {key: replace(product, default_price_id=price_map.get(key, product.default_price_id))
                for key, product in bundle.products.items()}
    return replace(bundle, products=products)
