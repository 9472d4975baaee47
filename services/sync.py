"""`sync`: pull every connected system into the org's bundle folder, so reconciliation runs on live data.

Billing (accounts, catalog, subscriptions, invoice lines, reported usage) comes from Stripe through
`connectors.stripe.read_billing`; actual usage from the SQL and S3 Parquet sources (daily buckets
computed where the data lives) and from events pushed to the ingest API. The result is written as
a bundle (DESIGN.md: CSV dimension tables, Parquet usage tables) to
`<data dir>/orgs/<org id>/bundle` and the org's data source is pointed at it.

Decisions worth knowing:
- Window: the last `months` whole calendar months plus the current one, up to the end of today
  (UTC). It is widened back to the start of any billing period that straddles its start, and
  periods/invoice lines outside it are left out, so no period is compared with half its usage.
- Sources: a usage source with `side: "reported"` replaces Stripe's meter summaries as reported
  usage (both would count the same usage twice); several `actual` sources (SQL, S3, ingest API)
  are added together. Usage of a product Stripe does not know is refused (the admin must give the
  Stripe product the `product_key` metadata); usage of an account Stripe does not know is kept,
  with a warning, under an account without a Stripe customer: it is exactly the usage that
  never reached billing.
- Daily buckets are sums, except for seats-like products (aggregation `max`), whose daily value
  is the day's largest reading, so that several snapshots a day do not multiply the seats.
- Without Stripe, `base_bundle` (a folder in the bundle format) supplies the billing side; its
  actual usage is used only when no actual-usage source is connected. Contracts (Stripe has none)
  come from `base_bundle`, else are carried over from the previous synced bundle.
- Incremental: the Stripe cursor and customer map are kept in the bundle's `sync_state.json`;
  the next sync asks Stripe only for what was created since and merges it into the previous
  bundle (invoice lines are replaced per invoice). `full=True` rereads everything.
- Atomic: the new bundle is written to a temporary folder next to the live one and validated by
  `core.bundle.load_bundle` plus checks on every usage bucket; only then is it swapped in by
  renames. Any bad data leaves the previous bundle untouched and fails with a message naming
  the source and the field.
- Audit: one `sync.completed` entry with counts and duration per source (or `sync.failed` with
  the reason); nothing secret is ever in it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.bundle import load_bundle
from core.errors import BundleError
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
from core.money import plain_decimal
from core.pricing import Price
from core.usage import bucketed_events_sql, register_cuts, register_periods
from services import audit, integrations
from services.context import Actor, require_role
from services.errors import Conflict, InvalidInput, ServiceError
from services.org_files import org_folder, own_bundle

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory file locks, rely on the scheduler's lock
    fcntl = None  # type: ignore[assignment]

BUCKET_SCHEMA = pa.schema([
    pa.field("account_id", pa.string()),
    pa.field("product_key", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("units", pa.decimal128(38, 12)),
])
USAGE_KINDS = ("sql_source", "s3_parquet")
STATE_FILE = "sync_state.json"
MAX_MONTHS = 36
MAX_NAMED = 5


class SyncFailed(ServiceError):
    """A source could not be read or gave data that cannot be reconciled; the previous bundle is kept."""


@dataclass(frozen=True)
class SourceReport:
    source: str  # stripe | sql_source | s3_parquet | ingest | base_bundle
    role: str  # billing | actual | reported
    counts: dict[str, int]
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class SyncReport:
    bundle_path: str
    window_start: datetime
    window_end: datetime
    incremental: bool
    sources: list[SourceReport]
    counts: dict[str, int]  # rows written per bundle table
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Billing:
    accounts: dict[str, Account]
    products: dict[str, Product]
    prices: dict[str, Price]
    subscriptions: list[SubscriptionPeriod]
    contracts: list[Contract]
    invoice_lines: list[InvoiceLine]
    reported: pa.Table
    actual: pa.Table | None = None  # a base bundle's actual usage
    state: dict[str, Any] = field(default_factory=dict)


def bundle_dir(org_id: int) -> Path:
    return org_folder(org_id) / "bundle"


# ---- the window -------------------------------------------------------------------------------------------------

def _window(as_of: datetime, months: int) -> tuple[datetime, datetime]:
    """[first day of the month `months` before as_of's month, next UTC midnight after as_of)."""
    as_of = as_of.astimezone(UTC)
    index = as_of.year * 12 + as_of.month - 1 - months
    start = datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)
    end = as_of.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    return start, end


def _widen(start: datetime, end: datetime, billing: _Billing) -> datetime:
    """Move the start back to the beginning of any billing period that straddles it."""
    straddling = [p.period_start for p in billing.subscriptions if p.period_start < start < p.period_end]
    straddling += [line.period_start for line in billing.invoice_lines if line.period_start < start < line.period_end]
    return min([start, *straddling])


def _clip(billing: _Billing, start: datetime, end: datetime) -> None:
    billing.subscriptions = [p for p in billing.subscriptions if p.period_end > start and p.period_start < end]
    billing.invoice_lines = [x for x in billing.invoice_lines if x.period_end > start and x.period_start < end]
    billing.reported = _between(billing.reported, start, end)
    if billing.actual is not None:
        billing.actual = _between(billing.actual, start, end)


def _between(table: pa.Table, start: datetime, end: datetime) -> pa.Table:
    ts = table.column("ts")
    mask = pc.and_(pc.greater_equal(ts, pa.scalar(start, BUCKET_SCHEMA.field("ts").type)),
                   pc.less(ts, pa.scalar(end, BUCKET_SCHEMA.field("ts").type)))
    return table.filter(mask)


# ---- reading ---------------------------------------------------------------------------------------------------

def _buckets_of(source: UsageSource, subscriptions: Sequence[SubscriptionPeriod],
                max_products: frozenset[str] = frozenset()) -> pa.Table:
    """Usage buckets of a bundle's usage table (CSV text or Parquet), computed in DuckDB.

    Buckets are the engine's: UTC days cut at the boundaries of `subscriptions` inside them, so
    usage of a day split by a period boundary (anniversary billing) stays on its side of it, and a
    bucket already stamped at a boundary (a legacy usage-record summary) keeps its stamp. Summed,
    except seats-like products (aggregation `max`): their largest reading.
    """
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        if source.table is not None:
            con.register("usage", source.table)
            relation = "usage"
        else:
            relation = "read_parquet('" + str(source.path).replace("'", "''") + "')"
        register_periods(con, subscriptions)
        split_days = register_cuts(con, "day")
        con.execute(f"""
            CREATE TEMP VIEW events AS
            SELECT CAST(account_id AS VARCHAR) AS account_id, CAST(product_key AS VARCHAR) AS product_key,
                   epoch_us(CAST(ts AS TIMESTAMPTZ)) AS ts_us, CAST(units AS DECIMAL(38, 12)) AS units
            FROM {relation}""")
        result = con.sql(f"""
            SELECT account_id, product_key, bucket_us, sum(units) AS units, max(units) AS units_max
            FROM ({bucketed_events_sql("events", "day", split_days)}) GROUP BY ALL ORDER BY ALL""").to_arrow_table()
    except duckdb.Error as exc:
        raise SyncFailed(f"base bundle: {source.name} could not be read ({str(exc).splitlines()[0]})") from None
    finally:
        con.close()
    if max_products:
        seat_like = pc.is_in(result.column("product_key"), value_set=pa.array(sorted(max_products), pa.string()))
        result = result.set_column(result.schema.get_field_index("units"), "units",
                                   pc.if_else(seat_like, result.column("units_max"), result.column("units")))
    return _conform(result, "bucket_us")


def _conform(table: pa.Table, ts_column: str = "ts") -> pa.Table:
    ts = table.column(ts_column)
    if not pa.types.is_timestamp(ts.type):
        ts = pc.cast(ts, pa.int64()).cast(BUCKET_SCHEMA.field("ts").type)
    return pa.table([table.column("account_id").cast(pa.string()), table.column("product_key").cast(pa.string()),
                     ts.cast(BUCKET_SCHEMA.field("ts").type), table.column("units").cast(pa.decimal128(38, 12))],
                    schema=BUCKET_SCHEMA)


def _max_products(products: dict[str, Product]) -> frozenset[str]:
    return frozenset(key for key, product in products.items() if product.aggregation == "max")


def _from_bundle(bundle: Bundle) -> _Billing:
    seats = _max_products(bundle.products)
    return _Billing(dict(bundle.accounts), dict(bundle.products), dict(bundle.prices), list(bundle.subscriptions),
                    list(bundle.contracts), list(bundle.invoice_lines),
                    _buckets_of(bundle.reported_usage, bundle.subscriptions, seats),
                    _buckets_of(bundle.actual_usage, bundle.subscriptions, seats))


def _previous(org_id: int) -> tuple[Bundle | None, dict[str, Any]]:
    folder = bundle_dir(org_id)
    if not folder.is_dir():
        return None, {}
    try:
        bundle = load_bundle(folder)
    except BundleError:
        return None, {}
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    return bundle, state if isinstance(state, dict) else {}


def _merge(previous: Bundle, new: _Billing, reported_from: datetime) -> _Billing:
    """Incremental Stripe result on top of the previous bundle (newer objects win)."""
    accounts = {**previous.accounts, **new.accounts}
    products = {**previous.products, **new.products}
    prices = {**previous.prices, **new.prices}
    subs = {(p.subscription_id, p.product_key, p.period_start): p for p in previous.subscriptions}
    subs.update({(p.subscription_id, p.product_key, p.period_start): p for p in new.subscriptions})
    reread = {line.invoice_id for line in new.invoice_lines}
    lines = [line for line in previous.invoice_lines if line.invoice_id not in reread] + new.invoice_lines
    old = _buckets_of(previous.reported_usage, list(subs.values()), _max_products(previous.products))
    old = old.filter(pc.less(old.column("ts"), pa.scalar(reported_from, BUCKET_SCHEMA.field("ts").type)))
    reported = pa.concat_tables([old, new.reported.cast(BUCKET_SCHEMA)])
    return _Billing(accounts, products, prices, list(subs.values()), list(previous.contracts), lines, reported,
                    state=new.state)


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    value = call()
    return value, round(time.monotonic() - started, 3)


def _stripe(actor: Actor, previous: Bundle | None, state: dict[str, Any], full: bool) -> tuple[_Billing, SourceReport,
                                                                                                bool, list[str]]:
    from connectors import stripe as stripe_connector

    try:
        config = integrations.checked_config(actor, "stripe")  # also settings saved before the policy existed
    except InvalidInput as exc:
        raise SyncFailed(str(exc)) from None
    cursor = state.get("stripe_cursor")
    incremental = not full and previous is not None and isinstance(cursor, int)
    since = cursor if incremental else None
    customers = state.get("stripe_customers") if incremental else None
    try:
        result, seconds = _timed(lambda: stripe_connector.read_billing(config, since, customers=customers))
    except stripe_connector.StripeConnectorError as exc:
        raise SyncFailed(f"Stripe: {exc.message}") from None
    billing = _Billing({a.account_id: a for a in result.accounts}, {p.product_key: p for p in result.products},
                       {p.price_id: p for p in result.prices}, list(result.subscriptions), [],
                       list(result.invoice_lines), _conform(result.reported_usage))
    known = dict(customers or {})
    known.update({a.stripe_customer_id: a.account_id for a in result.accounts if a.stripe_customer_id})
    billing.state = {"stripe_cursor": result.cursor, "stripe_customers": known}
    if incremental and previous is not None:
        billing = _merge(previous, billing, result.reported_usage_start)
    elif previous is not None:
        billing.contracts = list(previous.contracts)
    counts = {"accounts": len(result.accounts), "products": len(result.products), "prices": len(result.prices),
              "subscriptions": len(result.subscriptions), "invoice_lines": len(result.invoice_lines),
              "reported_buckets": result.reported_usage.num_rows}
    note = f"incremental since cursor {since}" if incremental else "full read"
    return billing, SourceReport("stripe", "billing", counts, seconds, note), incremental, list(result.warnings)


def _usage_source(actor: Actor, kind: str, start: datetime, end: datetime,
                  seats: frozenset[str]) -> tuple[str, pa.Table, SourceReport]:
    from connectors import s3_parquet, sql_source

    config = integrations.get_config(actor, kind)
    side = config.get("side") or "actual"
    if side not in ("actual", "reported"):
        raise InvalidInput(f"{integrations.LABELS[kind]}: side must be 'actual' or 'reported', got {side!r}")
    try:
        options = integrations.policy_options(kind, config)  # also a source saved before the policy existed
    except InvalidInput as exc:
        raise SyncFailed(str(exc)) from None
    connector = sql_source if kind == "sql_source" else s3_parquet
    try:
        table, seconds = _timed(lambda: connector.fetch_daily_buckets(config, start, end, max_products=seats,
                                                                      **options))
    except (sql_source.SqlSourceError, s3_parquet.S3SourceError) as exc:
        raise SyncFailed(f"{integrations.LABELS[kind]}: {exc}") from None
    table = _conform(table)
    counts = {"buckets": table.num_rows, "accounts": len(pc.unique(table.column("account_id"))),
              "days": len(pc.unique(table.column("ts")))}
    return side, table, SourceReport(kind, side, counts, seconds, f"units {_units_total(table)}")


def _units_total(table: pa.Table) -> str:
    total = pc.sum(table.column("units")).as_py() if table.num_rows else Decimal(0)
    return plain_decimal(total or 0)


def _ingested(actor: Actor, start: datetime, end: datetime) -> tuple[pa.Table, SourceReport] | None:
    from services import ingest

    if ingest.count_events(actor) == 0:
        return None
    table, seconds = _timed(lambda: ingest.export_usage_table(actor, start, end))
    table = _conform(table)
    counts = {"buckets": table.num_rows, "accounts": len(pc.unique(table.column("account_id")))}
    return table, SourceReport("ingest", "actual", counts, seconds, f"units {_units_total(table)}")


# ---- checking the usage ----------------------------------------------------------------------------------------

def _named(values: list[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:MAX_NAMED])
    return shown + (f" and {len(values) - MAX_NAMED} more" if len(values) > MAX_NAMED else "")


def _check_usage(label: str, table: pa.Table, billing: _Billing, warnings: list[str]) -> None:
    """Refuse buckets the engine cannot use; keep unknown accounts (unbilled usage) with a warning."""
    for column, what in (("account_id", "an empty account"), ("product_key", "an empty product"),
                         ("ts", "no timestamp"), ("units", "no units (not a number)")):
        values = table.column(column)
        empty = values.null_count
        if pa.types.is_string(values.type):
            empty += pc.sum(pc.equal(values, "")).as_py() or 0
        if empty:
            raise SyncFailed(f"{label}: {empty} daily bucket(s) with {what}: check the column mapped as "
                             f"columns.{column}")
    # refused here, naming the source: an unknown account would otherwise be reported as a row of the accounts.csv
    # the sync writes
    for column in ("account_id", "product_key"):
        too_long = table.filter(pc.greater(pc.utf8_length(table.column(column)), MAX_ID_LENGTH)).column(column)
        if len(too_long):
            raise SyncFailed(f"{label}: {len(too_long)} daily bucket(s) whose {column} is not {ID_EXPECTED} "
                             f"(e.g. {shortened(too_long[0].as_py())!r}): check the column mapped as columns.{column}")
    negative = table.filter(pc.less(table.column("units"), pa.scalar(Decimal(0), table.schema.field("units").type)))
    if negative.num_rows:
        row = negative.slice(0, 1).to_pylist()[0]
        units = plain_decimal(row["units"])
        raise SyncFailed(f"{label}: negative units ({units}) for account {row['account_id']!r}, "
                         f"product {row['product_key']!r} on {row['ts']:%Y-%m-%d}: check columns.units")
    products = sorted(set(pc.unique(table.column("product_key")).to_pylist()) - set(billing.products))
    if products:
        raise SyncFailed(f"{label}: usage of product_key {_named(products)} that Stripe does not know: give the "
                         "Stripe product a metadata product_key with that value, or fix columns.product_key")
    accounts = sorted(set(pc.unique(table.column("account_id")).to_pylist()) - set(billing.accounts))
    if accounts:
        for account_id in accounts:
            billing.accounts[account_id] = Account(account_id, account_id)
        warnings.append(f"{label}: usage of account(s) {_named(accounts)} with no Stripe customer: kept as "
                        "possible unbilled usage")


# ---- writing ---------------------------------------------------------------------------------------------------

def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _dec(value: Decimal | None) -> str:
    return "" if value is None else format(value, "f")


def _tiers(price: Price) -> str:
    if not price.tiers:
        return ""
    return json.dumps([{"up_to": None if t.up_to is None else int(t.up_to) if t.up_to == int(t.up_to)
                        else str(t.up_to), "unit_amount": _dec(t.unit_amount), "flat_amount": _dec(t.flat_amount)}
                       for t in price.tiers])


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_bundle(folder: Path, billing: _Billing, actual: pa.Table, reported: pa.Table) -> dict[str, int]:
    _write_csv(folder / "accounts.csv", ["account_id", "name", "stripe_customer_id", "crm_id"],
               [[a.account_id, a.name, a.stripe_customer_id or "", a.crm_id or ""]
                for a in sorted(billing.accounts.values(), key=lambda a: a.account_id)])
    _write_csv(folder / "products.csv", ["product_key", "name", "aggregation", "unit", "default_price_id"],
               [[p.product_key, p.name, p.aggregation, p.unit, p.default_price_id or ""]
                for p in sorted(billing.products.values(), key=lambda p: p.product_key)])
    _write_csv(folder / "prices.csv",
               ["price_id", "product_key", "currency", "model", "unit_amount", "package_size", "tiers"],
               [[p.price_id, p.product_key, p.currency, p.model, _dec(p.unit_amount),
                 "" if p.package_size is None else str(p.package_size), _tiers(p)]
                for p in sorted(billing.prices.values(), key=lambda p: p.price_id)])
    subscriptions = sorted(billing.subscriptions, key=lambda s: (s.account_id, s.product_key, s.period_start))
    _write_csv(folder / "subscriptions.csv",
               ["subscription_id", "account_id", "product_key", "price_id", "status", "period_start", "period_end"],
               [[s.subscription_id, s.account_id, s.product_key, s.price_id, s.status, _iso(s.period_start),
                 _iso(s.period_end)] for s in subscriptions])
    _write_csv(folder / "contracts.csv", ["account_id", "product_key", "effective_from", "price_id"],
               [[c.account_id, c.product_key, _iso(c.effective_from), c.price_id] for c in billing.contracts])
    lines = sorted(billing.invoice_lines, key=lambda x: (x.invoice_id, x.account_id, x.product_key, x.period_start))
    _write_csv(folder / "invoice_lines.csv",
               ["invoice_id", "account_id", "product_key", "period_start", "period_end", "quantity", "amount",
                "currency"],
               [[x.invoice_id, x.account_id, x.product_key, _iso(x.period_start), _iso(x.period_end),
                 _dec(x.quantity), _dec(x.amount), x.currency] for x in lines])
    pq.write_table(actual, folder / "actual_usage.parquet")
    pq.write_table(reported, folder / "reported_usage.parquet")
    return {"accounts": len(billing.accounts), "products": len(billing.products), "prices": len(billing.prices),
            "subscriptions": len(subscriptions), "contracts": len(billing.contracts), "invoice_lines": len(lines),
            "actual_buckets": actual.num_rows, "reported_buckets": reported.num_rows}


def _swap(staged: Path, live: Path) -> None:
    """Replace `live` by `staged` with renames; on failure the previous bundle is put back."""
    retired = live.with_name(f".{live.name}-old-{uuid.uuid4().hex[:8]}")
    if live.exists():
        os.rename(live, retired)
    try:
        os.rename(staged, live)
    except OSError:
        if retired.exists():
            os.rename(retired, live)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _sum_tables(tables: list[pa.Table]) -> pa.Table:
    """Several actual-usage sources: add their buckets together (same account, product and day)."""
    if not tables:
        return BUCKET_SCHEMA.empty_table()
    if len(tables) == 1:
        return tables[0]
    summed = pa.concat_tables(tables).group_by(["account_id", "product_key", "ts"]).aggregate([("units", "sum")])
    return _conform(pa.table({"account_id": summed.column("account_id"), "product_key": summed.column("product_key"),
                              "ts": summed.column("ts"), "units": summed.column("units_sum")}))


# ---- the use case ----------------------------------------------------------------------------------------------

def sync(actor: Actor, *, months: int = 3, as_of: datetime | None = None, base_bundle: Path | str | None = None,
         full: bool = False) -> SyncReport:
    """Pull billing and usage from every connected system into the org's bundle, atomically."""
    require_role(actor, "admin", "analyst")
    if isinstance(months, bool) or not isinstance(months, int) or not 1 <= months <= MAX_MONTHS:
        raise InvalidInput(f"months: expected a whole number from 1 to {MAX_MONTHS}, got {months!r}")
    if as_of is not None and (not isinstance(as_of, datetime) or as_of.tzinfo is None):
        raise InvalidInput(f"as_of: expected a timezone-aware datetime, got {as_of!r}")
    if base_bundle is not None and not own_bundle(actor.org_id, base_bundle, "base_bundle").is_dir():
        raise InvalidInput(f"base_bundle: {base_bundle} is not a folder")
    started = time.monotonic()
    with _sync_lock(actor.org_id):
        return _guarded(actor, months, as_of, base_bundle, full, started)


@contextlib.contextmanager
def _sync_lock(org_id: int) -> Iterator[None]:
    """One sync per org at a time on this machine (the scheduler also holds its per-org run lock)."""
    folder = bundle_dir(org_id).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".sync.lock", "w") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict("a sync of this organization is already running; try again when it is done") from None
        yield


def _guarded(actor: Actor, months: int, as_of: datetime | None, base_bundle: Path | str | None, full: bool,
             started: float) -> SyncReport:
    try:
        report = _sync(actor, months, as_of or datetime.now(UTC), Path(base_bundle) if base_bundle else None, full,
                       started)
    except (ServiceError, BundleError) as exc:
        _audit_failure(actor, str(exc), started)
        if isinstance(exc, BundleError):
            raise SyncFailed(f"the synced data does not form a valid bundle: {exc}") from None
        raise
    except Exception as exc:
        _audit_failure(actor, type(exc).__name__, started)
        raise
    return report


def _audit_failure(actor: Actor, reason: str, started: float) -> None:
    from db.session import org_session

    with org_session(actor.org_id) as session:
        audit.append(session, actor, "sync.failed", "bundle", actor.org_id,
                     {"error": reason[:1000], "seconds": round(time.monotonic() - started, 3)})


def _sync(actor: Actor, months: int, as_of: datetime, base_bundle: Path | None, full: bool,
          started: float) -> SyncReport:
    connected = {view.kind for view in integrations.list_integrations(actor)}
    previous, state = _previous(actor.org_id)
    sources: list[SourceReport] = []
    warnings: list[str] = []
    incremental = False
    if "stripe" in connected or base_bundle is None:
        billing, report, incremental, stripe_warnings = _stripe(actor, previous, state, full)
        sources.append(report)
        warnings += stripe_warnings
    else:
        base, seconds = _timed(lambda: load_bundle(base_bundle))
        billing = _from_bundle(base)
        sources.append(SourceReport("base_bundle", "billing", {
            "accounts": len(base.accounts), "subscriptions": len(base.subscriptions),
            "invoice_lines": len(base.invoice_lines), "reported_buckets": billing.reported.num_rows}, seconds,
            str(base_bundle)))
    if base_bundle is not None and "stripe" in connected:
        billing.contracts = list(load_bundle(base_bundle).contracts)

    window_start, window_end = _window(as_of, months)
    start = _widen(window_start, window_end, billing)
    actual_tables: list[pa.Table] = []
    reported_tables: list[pa.Table] = []
    for kind in USAGE_KINDS:
        if kind in connected:
            side, table, report = _usage_source(actor, kind, start, window_end, _max_products(billing.products))
            _check_usage(integrations.LABELS[kind], table, billing, warnings)
            (actual_tables if side == "actual" else reported_tables).append(table)
            sources.append(report)
    ingested = _ingested(actor, start, window_end)
    if ingested is not None:
        _check_usage("ingest API", ingested[0], billing, warnings)
        actual_tables.append(ingested[0])
        sources.append(ingested[1])
    _clip(billing, start, window_end)
    if not actual_tables and billing.actual is not None:
        _check_usage("base bundle actual usage", billing.actual, billing, warnings)
        actual_tables.append(billing.actual)
    if not actual_tables:
        warnings.append("no actual-usage source is connected (SQL, S3 or the ingest API): nothing to compare "
                        "billing against")
    if reported_tables:
        warnings.append("reported usage taken from the usage source(s) marked side=reported instead of Stripe")
        reported = _sum_tables(reported_tables)
    else:
        reported = billing.reported
    _check_usage("reported usage", reported, billing, warnings)
    actual = _sum_tables(actual_tables)

    live = bundle_dir(actor.org_id)
    live.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".bundle-new-", dir=live.parent))
    try:
        counts = _write_bundle(staged, billing, actual, reported)
        (staged / STATE_FILE).write_text(json.dumps({
            **billing.state, "synced_at": _iso(datetime.now(UTC)), "window_start": _iso(start),
            "window_end": _iso(window_end)}, indent=2, sort_keys=True))
        load_bundle(staged)  # the engine must be able to read what we are about to publish
        _swap(staged, live)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return _publish(actor, live, connected, SyncReport(
        str(live), start, window_end, incremental, sources, counts, round(time.monotonic() - started, 3), warnings))


def _publish(actor: Actor, live: Path, connected: set[str], report: SyncReport) -> SyncReport:
    from db.session import org_session
    from services import settings

    current = settings.get_settings(actor).data_source or {}
    if current.get("kind") != "bundle" or Path(str(current.get("path"))) != live:
        # Pointing reconciliation at the synced bundle is part of the sync an analyst may run.
        settings.set_data_source(replace(actor, role="system"), {"kind": "bundle", "path": str(live)})
    now = datetime.now(UTC)
    for kind in connected & {"stripe", *USAGE_KINDS}:
        integrations.mark_synced(actor, kind, now)
    with org_session(actor.org_id) as session:
        audit.append(session, actor, "sync.completed", "bundle", actor.org_id, {
            "window_start": _iso(report.window_start), "window_end": _iso(report.window_end),
            "incremental": report.incremental, "counts": report.counts, "seconds": report.seconds,
            "sources": [{"source": s.source, "role": s.role, "counts": s.counts, "seconds": s.seconds,
                         "note": s.note} for s in report.sources],
            "warnings": report.warnings[:20]})
    return report

