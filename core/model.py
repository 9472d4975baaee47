"""The normalized tables ("the bundle") as typed rows.

Small tables (accounts, products, prices, subscriptions, contracts, invoice lines) are held as
Python rows; the two usage tables can hold tens of millions of events and stay columnar
(`UsageSource`: a Parquet/CSV path or an Arrow table) so DuckDB aggregates them in place.
Every connector produces a `Bundle`; the engine consumes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

import pyarrow as pa

from core.pricing import Price

Aggregation = Literal["sum", "max"]

# The longest identifier the app takes (account_id, product_key, price_id, subscription_id, a Stripe customer or
# CRM id, an ingested event_id): the app database's id columns hold this many characters (db/models.py), so a
# longer one is refused where it enters (the bundle, a sync, the ingest API), never cut. Stripe's own ids are far
# shorter; a customer-chosen id this long is an input error. Display names have no limit.
MAX_ID_LENGTH = 200
ID_EXPECTED = f"an identifier of at most {MAX_ID_LENGTH} characters"
SHOWN_ID_START = 40  # characters of a too-long identifier quoted back


# The largest values the app takes where they enter (a bundle, a sync, the ingest API). Far beyond any real price,
# invoice line or meter reading (a value near them is a unit mix-up), and small enough that every amount the engine
# computes from them is exact (core.money.EXACT) and every count fits the app database's columns.
MAX_AMOUNT = Decimal(10) ** 12  # a price, a tier's amounts, an invoice line's amount, in major units
MAX_QUANTITY = Decimal(10) ** 15  # an ingested event's units, an invoice line's quantity, a tier's up_to, a package
# A row of a usage table: an event, or a synced source's daily bucket of events each below MAX_QUANTITY (the sync
# adds a day's ingested events into one row, so a row's bound must leave room for a day of them).
MAX_USAGE_UNITS = Decimal(10) ** 18
AMOUNT_PLACES = 15  # decimals of a price: Stripe's unit_amount_decimal takes 12 in the minor unit (a KWD fils is 10^-3)
BILLED_PLACES = 6  # decimals of an invoice line's amount (the app database keeps 6)
QUANTITY_PLACES = 9  # decimals of a quantity (the app database keeps 9)
# Times the app takes, in UTC: a calendar month and the month after it must exist as Python datetimes.
EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 1, tzinfo=UTC)
TIME_RANGE_EXPECTED = "a time from year 1 to November 9999 (UTC)"


def shortened(value: str) -> str:
    """A too-long identifier as an error quotes it: its start and its length, not hundreds of characters."""
    return f"{value[:SHOWN_ID_START]}… ({len(value)} characters)"


@dataclass(frozen=True)
class Account:
    account_id: str
    name: str
    stripe_customer_id: str | None = None
    crm_id: str | None = None


@dataclass(frozen=True)
class Product:
    product_key: str
    name: str
    aggregation: Aggregation = "sum"
    unit: str = "unit"
    default_price_id: str | None = None


@dataclass(frozen=True)
class SubscriptionPeriod:
    """One billing period of one subscription item: [period_start, period_end) in UTC."""

    subscription_id: str
    account_id: str
    product_key: str
    price_id: str
    status: str
    period_start: datetime
    period_end: datetime


@dataclass(frozen=True)
class Contract:
    """The signed price of a product for an account, in force from `effective_from` on."""

    account_id: str
    product_key: str
    effective_from: datetime
    price_id: str


@dataclass(frozen=True)
class InvoiceLine:
    invoice_id: str
    account_id: str
    product_key: str
    period_start: datetime
    period_end: datetime
    quantity: Decimal
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class UsageSource:
    """Where usage events live, columnar: account_id, product_key, ts, units (+ event_id).

    Exactly one of `path` (Parquet file or glob) and `table` (Arrow, e.g. a parsed CSV) is set.
    `ts_naive` marks a Parquet timestamp column without time zone, read as UTC; integer and
    decimal unit columns are summed natively, text and floats are converted to DECIMAL first.
    """

    name: str
    path: Path | str | None = None
    table: pa.Table | None = None
    has_event_id: bool = False
    ts_naive: bool = False
    units_type: str = "text"  # Parquet: integer | decimal | float; a CSV's columns are text


@dataclass
class Bundle:
    accounts: dict[str, Account]
    products: dict[str, Product]
    prices: dict[str, Price]
    subscriptions: list[SubscriptionPeriod]
    contracts: list[Contract]
    invoice_lines: list[InvoiceLine]
    actual_usage: UsageSource
    reported_usage: UsageSource
    notes: list[str] = field(default_factory=list)  # informational (e.g. naive Parquet ts as UTC)
