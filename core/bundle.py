"""Load and validate a bundle folder into a `Bundle`.

All problems are collected (not just the first) so a user fixes a file in one go; nothing
downstream runs when there is any. The small tables are parsed row by row here; the usage tables
are only checked for shape here and validated value by value inside DuckDB by `core.usage`
while they are aggregated, so a 100M-event file is never turned into Python objects.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from core.errors import BundleError, Problem
from core.gcpause import paused_gc
from core.model import (
    AMOUNT_PLACES,
    BILLED_PLACES,
    EARLIEST,
    ID_EXPECTED,
    LATEST,
    MAX_AMOUNT,
    MAX_ID_LENGTH,
    MAX_QUANTITY,
    QUANTITY_PLACES,
    TIME_RANGE_EXPECTED,
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
FIELD_SIZE_LIMIT = 1 << 30  # Python's csv module stops at 131,072 characters a field; Arrow has no such limit


class _Collector:
    """Gathers problems while parsing; parse helpers return None on a bad value."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def decimal(self, file: str, row: int, column: str, raw: str, *, below: Decimal, places: int,
                allow_empty: bool = False, non_negative: bool = False) -> Decimal | None:
        """A plain decimal (ASCII digits: `Decimal` also takes other scripts' digits, which no export writes)
        of magnitude below `below` with at most `places` decimals; None, with a problem, otherwise."""
        if raw == "" and allow_empty:
            return None
        value = _decimal(raw)
        if value is None:
            self.add(Problem(file, "a decimal number such as 12.50", row, column, raw))
        elif non_negative and value < 0:
            self.add(Problem(file, "a number >= 0", row, column, raw))
        elif value.adjusted() >= below.adjusted() or _places(raw, value) > places:  # `below` is a power of ten
            self.add(Problem(file, f"a number below {below:,f} with at most {places} decimals", row, column, raw))
        else:
            return value
        return None

    def instant(self, file: str, row: int, column: str, raw: str) -> datetime | None:
        """A timestamp with offset, or a date (midnight UTC): both are unambiguous."""
        value = _utc_instant(raw)
        if value is None:
            self.add(Problem(file, TIME_RANGE_EXPECTED if _well_formed(raw) else f"{TS_EXPECTED} or a date YYYY-MM-DD",
                             row, column, raw))
        return value

    def currency(self, file: str, row: int, raw: str) -> str | None:
        code = _currency_code(raw)
        if code is None:
            self.add(Problem(file, "a 3-letter ISO currency code", row, "currency", raw))
            return None
        return code

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


@lru_cache(maxsize=1024)
def _currency_code(raw: str) -> str | None:
    code = raw.lower()
    return code if len(code) == 3 and code.isascii() and code.isalpha() else None


def _decimal(raw: str) -> Decimal | None:
    """A number as exports write it. `Decimal` alone also takes `1_000`, `NaN` and other scripts' digits."""
    if not raw.isascii() or "_" in raw:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _places(raw: str, value: Decimal) -> int:
    """Decimals that matter (`49.5800000` from a database export has 2), by a string search: `Decimal.normalize`
    and `as_tuple` cost more, row after row."""
    if "e" in raw or "E" in raw:
        return max(-value.normalize().as_tuple().exponent, 0)  # type: ignore[operator]
    point = raw.find(".")
    return 0 if point < 0 else len(raw.rstrip("0")) - point - 1


@lru_cache(maxsize=65_536)
def _utc_instant(raw: str) -> datetime | None:
    """Parse once per distinct text: billing tables repeat the same few period boundaries. None when the text is
    not a date or a timestamp with an offset, or its time is out of range."""
    try:
        if len(raw) == 10:
            value = datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
        else:
            value = datetime.fromisoformat(raw)
            if value.tzinfo is None:
                return None
            value = value.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 with a positive offset is before year 1 in UTC
        return None
    return value if EARLIEST <= value < LATEST else None


def _well_formed(raw: str) -> bool:
    """A date, or a timestamp with an offset: then its time, not its form, is what is wrong."""
    try:
        return (len(raw) == 10 and bool(date.fromisoformat(raw))) or datetime.fromisoformat(raw).tzinfo is not None
    except ValueError:
        return False


class _Unreadable(ValueError):
    """A CSV line that is not UTF-8 or not a row of the header's width."""

    def __init__(self, line: int, expected: str, value: str | None = None) -> None:
        super().__init__(expected)
        self.line, self.expected, self.value = line, expected, value


def _physical_lines(handle: BinaryIO) -> Iterator[bytes]:
    """A file's lines as an editor counts them: ended by \\n, \\r\\n or a lone \\r (old Mac exports)."""
    rest = b""
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        lines = (rest + chunk).splitlines(keepends=True)
        rest = lines.pop()  # maybe unfinished, or a \\r whose \\n is in the next chunk
        yield from lines
    if rest:
        yield rest


def _decoded_lines(lines: Iterable[bytes]) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _Unreadable(number, "UTF-8 text (in a spreadsheet: save as \"CSV UTF-8\")",
                              repr(line[max(exc.start - 10, 0):exc.end + 10])) from None


def _records(lines: Iterable[bytes]) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of every non-blank record, header included, as Python's csv module reads
    them: the line numbers a user sees in an editor, across blank lines and quoted line breaks."""
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))  # names have no length limit
    reader = csv.reader(_decoded_lines(lines))
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        if fields:
            yield start, fields


def _header(name: str, handle: BinaryIO, c: _Collector) -> list[str] | None:
    """The header row as written (names may have spaces around them), or None (with problems) when it cannot
    be used. Reads only as far as the header."""
    try:
        header = next((fields for _, fields in _records(_physical_lines(handle))), [])
    except _Unreadable as exc:
        c.add(Problem(name, exc.expected, exc.line, None, exc.value))
        return None
    names = [column.strip() for column in header]
    twice = sorted({column for column in names if names.count(column) > 1 and column})
    for column in twice:
        c.add(Problem(name, "each column once in the header row", 1, column))
    return None if twice else header


def _malformed(name: str, handle: BinaryIO, width: int, arrow_error: Exception) -> Problem:
    """Arrow names no line when it refuses a CSV: find the first bad one (the error path only)."""
    try:
        for line, fields in _records(_physical_lines(handle)):
            if len(fields) != width:
                raise _Unreadable(line, f"{width} fields, as in the header row", f"{len(fields)} fields")
    except _Unreadable as exc:
        return Problem(name, exc.expected, exc.line, None, exc.value)
    except csv.Error as exc:
        return Problem(name, f"a well-formed CSV file ({exc})")
    return Problem(name, f"a well-formed CSV file ({arrow_error})")


def _rows(folder: Path, name: str, collector: _Collector, *, optional: bool = False,
          extra_columns: tuple[str, ...] = ()) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yield (line number, values) of a CSV after checking its header.

    Values come in the order of REQUIRED_COLUMNS[name] then `extra_columns` (an absent extra
    column reads as ""), so loaders unpack them by name. Parsed by Arrow's CSV reader (every column
    as text, whitespace trimmed); a row's line number is its index + 2 unless the file has blank
    lines or quoted line breaks, when Python's csv module numbers the rows instead. Tuples, not
    dicts: the billing tables have a row per account, product and period.
    """
    path = folder / name
    if not path.exists():
        if not optional:
            collector.add(Problem(name, "the file to exist in the bundle folder"))
        return
    if path.is_dir():
        collector.add(Problem(name, "a file (this is a folder)"))
        return
    raw = path.read_bytes()  # once: the file may be a pipe
    header = _header(name, io.BytesIO(raw), collector)
    if header is None:
        return
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in {column.strip() for column in header}]
    for column in missing:
        collector.add(Problem(name, "this column in the header row", 1, column))
    if missing:
        return
    if (nul := raw.find(b"\0")) >= 0:  # no database stores it in text; an export never writes it
        collector.add(Problem(name, "text without NUL characters", len(raw[:nul].splitlines()) or 1, None,
                              raw[raw.rfind(b"\n", 0, nul) + 1:nul + 1].decode("utf-8", "replace")))
        return
    if not raw.endswith((b"\n", b"\r")):
        raw += b"\n"  # Arrow reads a header-only file without a final line break as no file at all
    try:
        table = pacsv.read_csv(pa.BufferReader(raw), convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        collector.add(_malformed(name, io.BytesIO(raw), len(header), exc))
        return
    index = {column.strip(): i for i, column in enumerate(table.column_names)}
    blank = [""] * table.num_rows
    columns = [pc.utf8_trim_whitespace(table.column(index[column])).to_pylist() if column in index else blank
               for column in (*REQUIRED_COLUMNS[name], *extra_columns)]
    lines: Iterable[int] = range(2, table.num_rows + 2)
    if raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") != table.num_rows + 1:
        lines = [line for line, _ in _records(raw.splitlines(keepends=True))][1:]
    yield from zip(lines, zip(*columns, strict=True), strict=True)


TIERS_EXPECTED = ('a JSON list of {"up_to": whole number >= 1 or null, "unit_amount": "dec", "flat_amount": "dec"}, '
                  f"numbers >= 0 below {MAX_QUANTITY:,f} (up_to) and {MAX_AMOUNT:,f} with at most {AMOUNT_PLACES} "
                  "decimals (amounts)")


def _tier_bound(value: Any) -> Decimal | None:
    """A tier's `up_to`: Stripe takes a positive integer (or "inf", here null for the last tier)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError
    bound = _decimal(str(value))  # 1000 or "1000", also 1000.0 as some JSON writers put a whole number
    if bound is None or bound != bound.to_integral_value() or not 1 <= bound < MAX_QUANTITY:
        raise ValueError
    return Decimal(int(bound))


def _tier_amount(value: Any) -> Decimal:
    if value is None or value == "":
        return Decimal(0)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError
    text = str(value)
    amount = _decimal(text)
    if amount is None or not 0 <= amount < MAX_AMOUNT or _places(text, amount) > AMOUNT_PLACES:
        raise ValueError
    return amount


def _parse_tiers(collector: _Collector, row: int, raw: str) -> tuple[Tier, ...] | None:
    try:
        items = json.loads(raw, parse_float=str)  # 0.001 as written, never a binary float
        if not isinstance(items, list) or not items:
            raise ValueError
        return tuple(Tier(up_to=None if item["up_to"] is None else _tier_bound(item["up_to"]),
                          unit_amount=_tier_amount(item.get("unit_amount")),
                          flat_amount=_tier_amount(item.get("flat_amount"))) for item in items)
    except (ValueError, TypeError, KeyError):
        collector.add(Problem("prices.csv", TIERS_EXPECTED, row, "tiers", raw))
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


def _load_products(folder: Path, c: _Collector) -> tuple[dict[str, Product], dict[str, int]]:
    """The products, and the line of each one that names a default price (checked once prices are read)."""
    products: dict[str, Product] = {}
    default_lines: dict[str, int] = {}
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
            if default_price_id:
                default_lines[product_key] = line
    return products, default_lines


def _check_default_prices(c: _Collector, products: dict[str, Product], default_lines: dict[str, int],
                          prices: dict[str, Price]) -> None:
    """A product's default price (Stripe's product.default_price) must be one of its own prices."""
    for key, line in default_lines.items():
        price_id = products[key].default_price_id
        if price_id not in prices:
            c.add(Problem("products.csv", "a price_id from prices.csv", line, "default_price_id", price_id))
        elif prices[price_id].product_key != key:
            c.add(Problem("products.csv", f"a price of product {key!r} (price {price_id} belongs to "
                                          f"{prices[price_id].product_key!r})", line, "default_price_id", price_id))


def _load_prices(folder: Path, c: _Collector, products: dict[str, Product]) -> dict[str, Price]:
    prices: dict[str, Price] = {}
    name = "prices.csv"
    for line, (price_id, product_key, raw_currency, raw_model, raw_unit_amount, raw_package_size,
               raw_tiers) in _rows(folder, name, c):
        ok = c.identifier(name, line, "price_id", price_id)
        if price_id in prices or not price_id:
            c.add(Problem(name, "a unique, non-empty price_id", line, "price_id", price_id))
            ok = False
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        model = c.choice(name, line, "model", raw_model, PRICING_MODELS)
        currency = c.currency(name, line, raw_currency)
        unit_amount = c.decimal(name, line, "unit_amount", raw_unit_amount, below=MAX_AMOUNT, places=AMOUNT_PLACES,
                                allow_empty=True, non_negative=True)
        package_size = None
        if raw_package_size:
            if raw_package_size.isascii() and raw_package_size.isdigit() and 1 <= int(raw_package_size) < MAX_QUANTITY:
                package_size = int(raw_package_size)
            else:
                c.add(Problem(name, f"a whole number from 1 to below {MAX_QUANTITY:,f}", line, "package_size",
                              raw_package_size))
                ok = False
        tiers: tuple[Tier, ...] | None = ()
        if model in ("graduated", "volume"):
            tiers = _parse_tiers(c, line, raw_tiers)
        elif model == "package" and package_size is None and not raw_package_size:
            c.add(Problem(name, "a package size: a package price bills ceil(units / package_size) x unit_amount",
                          line, "package_size", ""))
            ok = False
        if not (ok and model and currency and tiers is not None):
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
    """One account may not be billed twice for one product at the same instant. Each period is compared with the
    one reaching furthest among those before it, so a long period overlapping several later ones is caught."""
    ordered = sorted(periods, key=lambda lp: (lp[1].account_id, lp[1].product_key, lp[1].period_start))
    furthest: tuple[int, SubscriptionPeriod] | None = None
    for line_b, b in ordered:
        if furthest is None or (furthest[1].account_id, furthest[1].product_key) != (b.account_id, b.product_key):
            furthest = (line_b, b)
            continue
        line_a, a = furthest
        if b.period_end > a.period_end:
            furthest = (line_b, b)
        if b.period_start < a.period_end:
            c.add(Problem("subscriptions.csv",
                          f"no overlap with row {line_a} ({a.subscription_id}, {a.period_start.isoformat()} to "
                          f"{a.period_end.isoformat()}) for account {a.account_id} and product {a.product_key}",
                          line_b, "period_start", b.period_start.isoformat()))


def _load_contracts(folder: Path, c: _Collector, accounts: dict[str, Account],
                    products: dict[str, Product], prices: dict[str, Price]) -> list[Contract]:
    contracts: list[Contract] = []
    seen: dict[tuple[str, str, datetime], int] = {}
    name = "contracts.csv"
    for line, (account_id, product_key, raw_effective, price_id) in _rows(folder, name, c, optional=True):
        ok = c.reference(name, line, "account_id", account_id, accounts, "account_id")
        ok &= c.reference(name, line, "product_key", product_key, products, "product_key")
        ok &= _check_price_product(c, name, line, price_id, product_key, prices, products)
        effective = c.instant(name, line, "effective_from", raw_effective)
        if effective and (account_id, product_key, effective) in seen:
            c.add(Problem(name, f"one contract price per account, product and date (row "
                                f"{seen[account_id, product_key, effective]} has one from the same instant)",
                          line, "effective_from", raw_effective))
            continue
        if ok and effective:
            seen[account_id, product_key, effective] = line
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
        if start and end and end <= start:
            c.add(Problem(name, "period_end after period_start (periods are [start, end))", line, "period_end",
                          raw_end))
            ok = False
        quantity = c.decimal(name, line, "quantity", raw_quantity, below=MAX_QUANTITY, places=QUANTITY_PLACES,
                             non_negative=True)
        amount = c.decimal(name, line, "amount", raw_amount, below=MAX_AMOUNT, places=BILLED_PLACES)
        currency = c.currency(name, line, raw_currency)
        if ok and start and end and quantity is not None and amount is not None and currency:
            lines.append(InvoiceLine(invoice_id, account_id, product_key, start, end, quantity, amount, currency))
    return lines


def _usage_source(folder: Path, stem: str, c: _Collector, notes: list[str]) -> UsageSource | None:
    """Find `<stem>.parquet` or `<stem>.csv`, check its columns; values are checked in DuckDB."""
    present = [path for path in (folder / f"{stem}.parquet", folder / f"{stem}.csv") if path.exists()]
    if not present:
        c.add(Problem(f"{stem}.csv", f"the file {stem}.csv or {stem}.parquet in the bundle folder"))
    elif len(present) == 2:
        c.add(Problem(f"{stem}.parquet", f"one of {stem}.csv and {stem}.parquet, not both: which holds the usage?"))
    elif present[0].is_dir():
        c.add(Problem(present[0].name, "a file (this is a folder)"))
    elif present[0].suffix == ".parquet":
        return _parquet_source(present[0], c, notes)
    else:
        return _csv_source(present[0], c)
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
    with path.open("rb") as handle:
        header = _header(path.name, handle, c)
    if header is None:
        return None
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys((*USAGE_COLUMNS, "event_id"), pa.string()), strings_can_be_null=False,
                auto_dict_encode=False),
        )
    except pa.ArrowInvalid as exc:
        with path.open("rb") as handle:
            c.add(_malformed(path.name, handle, len(header), exc))
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
    products, default_lines = _load_products(folder, c)
    prices = _load_prices(folder, c, products)
    _check_default_prices(c, products, default_lines, prices)
    subscriptions = _load_subscriptions(folder, c, accounts, products, prices)
    contracts = _load_contracts(folder, c, accounts, products, prices)
    invoice_lines = _load_invoice_lines(folder, c, accounts, products)
    actual = _usage_source(folder, "actual_usage", c, notes)
    reported = _usage_source(folder, "reported_usage", c, notes)
    _check(c)
    assert actual is not None and reported is not None
    return Bundle(accounts, products, prices, subscriptions, contracts, invoice_lines, actual, reported, notes)


def load_product_names(folder: Path | str) -> dict[str, str]:
    """Product key -> name, from the folder's products.csv alone: what an invoice line calls a product, without
    reading the whole bundle. BundleError when the file has a problem."""
    c = _Collector()
    products, _ = _load_products(Path(folder), c)
    _check(c)
    return {key: product.name for key, product in products.items()}


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
