"""Stripe, through the official SDK: read what was billed, write one draft invoice.

Reader (`read_billing`): customers -> accounts, products and prices -> the bundle's catalog,
subscription items (current period from the item, past periods from the invoice lines that
billed them) -> subscription periods, invoices that reached the customer (open, paid,
uncollectible; never drafts or voided ones) -> invoice lines, Billing Meter event summaries
(daily, per customer) and legacy usage-record summaries (one per billing period, stamped at
the period's start) -> reported usage buckets. Amounts arrive in minor units and leave as
Decimal major units with the currency's exponent. Incremental: with `since` (the previous
run's `cursor`) only objects created after it are listed; see `read_billing` for what that
implies.

Writer (`create_draft_invoice`): checks the customer and prices first (so a bad mapping or an
archived price fails before anything is written), then one draft invoice (auto_advance off,
never finalized or sent) and one invoice item per line, each request with an Idempotency-Key
derived from the caller's key: repeating the call after a timeout or a crash returns the same
invoice instead of a second one.

Retries: the SDK retries connection errors, 409 and 5xx (`max_network_retries`); 429 rate
limits are retried here with backoff that honours Retry-After. A redirect is never followed (see
`_http_client`): it fails, unretried, as a `config` error. No business rules live here, and no
message this module produces contains the API key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import pyarrow as pa
import requests
import stripe
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from connectors.base import CheckResult, redirect_refused
from core.model import Account, InvoiceLine, Product, SubscriptionPeriod
from core.money import from_minor_units, to_minor_units
from core.pricing import Price, Tier

BUCKET_SCHEMA = pa.schema([
    pa.field("account_id", pa.string()),
    pa.field("product_key", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("units", pa.decimal128(38, 12)),
])
BILLED_STATUSES = ("open", "paid", "uncollectible")
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 30.0
DEFAULT_LOOKBACK_DAYS = 7
DEFAULT_USAGE_DAYS = 120
DAY = 86_400
UNITS_QUANTUM = Decimal("1e-12")
Obj = dict[str, Any]


class StripeConnectorError(Exception):
    """A Stripe call failed; `kind` says how (auth, permission, not_found, invalid, rate_limited,
    unavailable, config) so a service can pick the right message and error class."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class StripeBilling:
    """Everything billing-side of the bundle that Stripe knows, plus where the next sync resumes."""

    accounts: list[Account]
    products: list[Product]
    prices: list[Price]
    subscriptions: list[SubscriptionPeriod]
    invoice_lines: list[InvoiceLine]
    reported_usage: pa.Table
    cursor: int
    reported_usage_start: datetime  # reported_usage is complete for UTC days from here on
    meter_products: dict[str, str] = field(default_factory=dict)  # billing meter id -> product_key
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DraftLine:
    """One invoice item of a draft invoice, in major units."""

    description: str
    amount: Decimal
    period_start: datetime | None = None
    period_end: datetime | None = None
    price_id: str | None = None  # only checked to be active (named in metadata), never charged by
    metadata: Mapping[str, str] = field(default_factory=dict)


# ---- client and calls -----------------------------------------------------------------------------
def _config_error(message: str) -> StripeConnectorError:
    return StripeConnectorError("config", message)


def _client(config: Mapping[str, Any]) -> tuple[stripe.StripeClient, int]:
    api_key = config.get("api_key")
    if not isinstance(api_key, str) or not api_key.strip():
        raise _config_error("api_key: a Stripe secret or restricted key (sk_… or rk_…) is required")
    retries = config.get("max_network_retries", DEFAULT_RETRIES)
    timeout = config.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise _config_error("max_network_retries: expected a whole number from 0 to 10")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise _config_error("timeout: expected a number of seconds > 0")
    base = config.get("api_base")
    if base is not None and (not isinstance(base, str) or not base.startswith(("http://", "https://"))):
        raise _config_error("api_base: expected an http(s) URL such as https://api.stripe.com")
    client = stripe.StripeClient(
        api_key.strip(),
        base_addresses={"api": base.rstrip("/")} if base else None,
        max_network_retries=retries,
        http_client=_http_client(float(timeout)),
    )
    return client, retries


def _http_client(timeout: float) -> stripe.RequestsClient:
    """The SDK's requests transport, except that it never follows a redirect: `api_base` is judged by
    services/source_policy.py, where the redirect would lead is not, and what answered there would come
    back inside an error message. requests raises TooManyRedirects before sending the redirected request;
    the SDK makes it an APIConnectionError it does not retry, and `_translate` names it."""
    session = requests.Session()
    session.max_redirects = 0
    return stripe.RequestsClient(timeout=timeout, session=session)


def _retry_after(state: RetryCallState) -> float:
    """Wait what Stripe asks (Retry-After), else back off exponentially (0.25 s doubling, max 8 s)."""
    exc = state.outcome.exception() if state.outcome else None
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    try:
        if value is not None:
            return min(float(value), 30.0)
    except ValueError:
        pass
    return min(0.25 * 2 ** (state.attempt_number - 1), 8.0)


def _translate(exc: stripe.StripeError, what: str) -> StripeConnectorError:
    """Stripe's error -> one message fit for an admin; never echoes the key Stripe may quote."""
    if isinstance(exc, stripe.AuthenticationError):
        return StripeConnectorError("auth", "Stripe rejected the API key (401): check or replace the key in "
                                            "Settings")
    if isinstance(exc, stripe.PermissionError):
        return StripeConnectorError("permission", f"The Stripe key is not allowed to {what} (403): use a "
                                                  "restricted key with that permission")
    if isinstance(exc, stripe.RateLimitError):
        return StripeConnectorError("rate_limited", f"Stripe kept rate-limiting requests to {what} (429); "
                                                    "try again in a minute")
    if isinstance(exc, stripe.IdempotencyError):
        return StripeConnectorError("invalid", f"Stripe refused to {what}: its idempotency key was already used "
                                               "with different parameters")
    if isinstance(exc, stripe.APIConnectionError) and isinstance(exc.__cause__, requests.TooManyRedirects):
        status = exc.__cause__.response.status_code  # requests always attaches the redirect it refused to follow
        return StripeConnectorError("config", redirect_refused("Stripe", status, "api_base", f"trying to {what}"))
    if isinstance(exc, stripe.APIConnectionError):
        return StripeConnectorError("unavailable", f"Could not reach Stripe to {what} (network error or timeout)")
    if isinstance(exc, stripe.InvalidRequestError):
        kind = "not_found" if exc.http_status == 404 or exc.code == "resource_missing" else "invalid"
        detail = (exc.user_message or "invalid request").strip()
        return StripeConnectorError(kind, f"Stripe refused to {what}: {detail}")
    status = getattr(exc, "http_status", None)
    return StripeConnectorError("unavailable", f"Stripe failed to {what} (HTTP {status or 'error'}); "
                                               "it may be down, try again later")


class _Api:
    """One client plus the retry policy; every call goes through `call`."""

    def __init__(self, config: Mapping[str, Any]):
        self.client, self.retries = _client(config)
        self.calls = 0

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        retrying = Retrying(retry=retry_if_exception_type(stripe.RateLimitError),
                            stop=stop_after_attempt(self.retries + 1), wait=_retry_after, reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    self.calls += 1
                    return fn(*args, **kwargs)
        except stripe.StripeError as exc:
            raise _translate(exc, what) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def list_all(self, what: str, fn: Callable[..., Any], *args: Any, params: Obj | None = None) -> Iterator[Obj]:
        """Every object of a list endpoint, 100 a page, following `starting_after`."""
        query: Obj = {**(params or {}), "limit": 100}
        while True:
            page = self.call(what, fn, *args, params=query)
            data = [obj.to_dict() for obj in page.data]
            yield from data
            if not page.has_more or not data:
                return
            query = {**query, "starting_after": data[-1]["id"]}


# ---- health check ---------------------------------------------------------------------------------
def check(config: dict[str, Any]) -> CheckResult:
    """Reachable, key accepted, and every object the reader needs readable (one tiny request each)."""
    try:
        api = _Api({**config, "max_network_retries": min(int(config.get("max_network_retries", 1) or 0), 1)})
    except (StripeConnectorError, TypeError, ValueError) as exc:
        return CheckResult(False, str(exc))
    v1 = api.client.v1
    probes = (("customers", v1.customers.list), ("products", v1.products.list), ("prices", v1.prices.list),
              ("subscriptions", v1.subscriptions.list), ("invoices", v1.invoices.list),
              ("billing meters", v1.billing.meters.list))
    readable = []
    for name, fn in probes:
        try:
            api.call(f"read {name}", fn, params={"limit": 1})
        except StripeConnectorError as exc:
            if exc.kind in ("auth", "unavailable", "config"):
                return CheckResult(False, exc.message, {"failed_at": name})
            return CheckResult(False, exc.message, {"readable": ", ".join(readable) or "none", "failed_at": name})
        readable.append(name)
    key = str(config.get("api_key", ""))
    mode = "live" if "_live_" in key else "test"
    return CheckResult(True, f"Connected to Stripe ({mode} mode): {', '.join(readable)} are readable.",
                       {"mode": mode, "readable": ", ".join(readable)})


# ---- reader ---------------------------------------------------------------------------------------
def _ts(epoch: int) -> datetime:
    return datetime.fromtimestamp(int(epoch), UTC)


def _minor_decimal(decimal_text: Any, integer: Any) -> Decimal | None:
    """Stripe gives amounts as `*_decimal` strings (sub-cent precision) and/or integers."""
    if decimal_text not in (None, ""):
        return Decimal(str(decimal_text))
    if integer is not None:
        return Decimal(int(integer))
    return None


class _Reader:
    def __init__(self, config: Mapping[str, Any], since: int | None, customers: Mapping[str, str] | None,
                 meter_products: Mapping[str, str] | None):
        self.known_meters = dict(meter_products or {})
        self.api = _Api(config)
        self.v1 = self.api.client.v1
        self.config = config
        self.since = since
        self.known_customers = dict(customers or {})
        self.cursor = since or 0
        self.warnings: list[str] = []
        self.account_of: dict[str, str] = {}  # stripe customer id -> account_id
        self.products: dict[str, Obj] = {}  # stripe product id -> product object
        self.prices: dict[str, Obj] = {}
        self.meter_formula: dict[str, str] = {}
        self.usable: dict[str, bool] = {}
        self.legacy_items: list[tuple[str, str, str]] = []  # (subscription item, account_id, product_key)

    def _listed(self, what: str, fn: Callable[..., Any], params: Obj | None = None, *args: Any) -> Iterator[Obj]:
        query = dict(params or {})
        if self.since is not None:
            query["created"] = {"gt": self.since}
        for obj in self.api.list_all(what, fn, *args, params=query):
            self.cursor = max(self.cursor, int(obj.get("created") or 0))
            yield obj

    # catalog -----------------------------------------------------------------------------------
    def product_key(self, product_id: str) -> str:
        product = self.products.get(product_id)
        if product is None:  # referenced by a newer object but created before the cursor
            product = self.api.call(f"read product {product_id}", self.v1.products.retrieve, product_id).to_dict()
            self.products[product_id] = product
        return str((product.get("metadata") or {}).get("product_key") or product_id)

    def account_id(self, customer_id: str) -> str:
        if customer_id not in self.account_of:
            if customer_id in self.known_customers:
                self.account_of[customer_id] = self.known_customers[customer_id]
            else:
                customer = self.api.call(f"read customer {customer_id}", self.v1.customers.retrieve,
                                         customer_id).to_dict()
                self.account_of[customer_id] = _account(customer).account_id
        return self.account_of[customer_id]

    def core_price(self, price: Obj) -> Price | None:
        """A Stripe price in the bundle's terms, or None (with a warning) when it cannot be one."""
        pid, currency = price["id"], str(price["currency"]).lower()
        try:
            product_key = self.product_key(price["product"])
            if price.get("billing_scheme") == "tiered":
                mode = price.get("tiers_mode")
                if mode not in ("graduated", "volume"):
                    raise ValueError(f"tiers_mode {mode!r} is not graduated or volume")
                tiers = tuple(
                    Tier(None if t.get("up_to") in (None, "inf") else Decimal(str(t["up_to"])),
                         from_minor_units(_minor_decimal(t.get("unit_amount_decimal"), t.get("unit_amount"))
                                          or Decimal(0), currency),
                         from_minor_units(_minor_decimal(t.get("flat_amount_decimal"), t.get("flat_amount"))
                                          or Decimal(0), currency))
                    for t in price.get("tiers") or [])
                return Price(pid, product_key, currency, mode, tiers=tiers)
            unit = _minor_decimal(price.get("unit_amount_decimal"), price.get("unit_amount"))
            if unit is None:
                raise ValueError("it has no unit amount (customer-chosen amounts are not supported)")
            transform = price.get("transform_quantity")
            if transform:
                if transform.get("round") != "up":
                    raise ValueError("transform_quantity rounds down; only round=up (packages) is supported")
                return Price(pid, product_key, currency, "package", from_minor_units(unit, currency),
                             package_size=int(transform["divide_by"]))
            return Price(pid, product_key, currency, "per_unit", from_minor_units(unit, currency))
        except (ValueError, InvalidOperation, KeyError, TypeError) as exc:
            self.warnings.append(f"price {pid}: skipped, {exc}")
            return None

    # sections ----------------------------------------------------------------------------------
    def read_accounts(self) -> list[Account]:
        accounts = []
        for customer in self._listed("list customers", self.v1.customers.list):
            account = _account(customer)
            self.account_of[customer["id"]] = account.account_id
            accounts.append(account)
        return accounts

    def read_catalog(self) -> tuple[list[Product], list[Price], dict[str, str]]:
        """Products, supported prices, and which product each billing meter measures."""
        for product in self._listed("list products", self.v1.products.list):
            self.products[product["id"]] = product
        prices: list[Price] = []
        meter_product: dict[str, str] = {}
        for price in self._listed("list prices", self.v1.prices.list, {"expand": ["data.tiers"]}):
            self.prices[price["id"]] = price
            converted = self.core_price(price)
            if converted is not None:
                prices.append(converted)
            meter = (price.get("recurring") or {}).get("meter")
            if meter:
                meter_product[meter] = self.product_key(price["product"])
        meters = list(self.api.list_all("list billing meters", self.v1.billing.meters.list))
        meter_product = {**self.known_meters, **meter_product}
        if self.since is not None and any(m["id"] not in meter_product for m in meters):
            # a meter we cannot place yet: its price may predate the cursor, so look at every price once
            for price in self.api.list_all("list prices", self.v1.prices.list):
                meter = (price.get("recurring") or {}).get("meter")
                if meter and meter not in meter_product:
                    meter_product[meter] = self.product_key(price["product"])
        for meter in meters:
            self.meter_formula[meter["id"]] = (meter.get("default_aggregation") or {}).get("formula", "sum")
            keys = {self.product_key(pid) for pid in self.products}
            if meter["id"] not in meter_product and meter.get("event_name") in keys:
                meter_product[meter["id"]] = meter["event_name"]
        meter_product.update(self.config.get("meters") or {})
        price_ids = {p.price_id for p in prices}
        products = []
        for product in self.products.values():
            if self.since is not None and int(product.get("created") or 0) <= self.since:
                continue  # fetched only to resolve a reference
            meta = product.get("metadata") or {}
            aggregation = meta.get("aggregation")
            if aggregation not in ("sum", "max"):
                formulas = {self.meter_formula.get(m) for m, key in meter_product.items()
                            if key == self.product_key(product["id"])}
                aggregation = "max" if formulas == {"last"} else "sum"
            default = product.get("default_price")
            products.append(Product(self.product_key(product["id"]), str(product.get("name") or product["id"]),
                                    aggregation, str(product.get("unit_label") or "unit"),
                                    default if default in price_ids else None))
        return products, prices, meter_product

    def read_invoices(self) -> tuple[list[InvoiceLine], dict[str, set[tuple[int, int, str]]]]:
        """Billed lines, and per subscription item the (start, end, price) periods they billed."""
        lines: list[InvoiceLine] = []
        item_periods: dict[str, set[tuple[int, int, str]]] = {}
        for invoice in self._listed("list invoices", self.v1.invoices.list):
            if invoice.get("status") not in BILLED_STATUSES:
                continue
            embedded = invoice.get("lines") or {}
            raw_lines = list(embedded.get("data") or [])
            if embedded.get("has_more"):
                raw_lines = list(self.api.list_all(f"list lines of invoice {invoice['id']}",
                                                   self.v1.invoices.line_items.list, invoice["id"]))
            account = self.account_id(invoice["customer"])
            for line in raw_lines:
                converted = self._line(invoice, account, line, item_periods)
                if converted is not None:
                    lines.append(converted)
        return lines, item_periods

    def _line(self, invoice: Obj, account: str, line: Obj,
              item_periods: dict[str, set[tuple[int, int, str]]]) -> InvoiceLine | None:
        currency = str(line.get("currency") or invoice["currency"]).lower()
        details = ((line.get("pricing") or {}).get("price_details")) or {}
        price_id = details.get("price")
        if isinstance(price_id, dict):
            price_id = price_id.get("id")
        product_id = details.get("product")
        metadata = line.get("metadata") or {}
        if metadata.get("product_key"):
            product_key = str(metadata["product_key"])
        elif product_id:
            product_key = self.product_key(product_id)
        else:
            self.warnings.append(f"invoice {invoice['id']} line {line.get('id')}: no product, not counted")
            return None
        period = line.get("period") or {}
        start, end = int(period.get("start") or invoice["created"]), int(period.get("end") or invoice["created"])
        if end <= start:
            end = start + 1
        quantity = Decimal(str(line.get("quantity_decimal") or line.get("quantity") or 0))
        item = ((line.get("parent") or {}).get("subscription_item_details") or {}).get("subscription_item")
        if item and price_id:
            item_periods.setdefault(item, set()).add((start, end, price_id))
        return InvoiceLine(invoice["id"], account, product_key, _ts(start), _ts(end), quantity,
                           from_minor_units(int(line.get("amount") or 0), currency), currency)

    def price_usable(self, price_id: str) -> bool:
        """Whether periods billed at this price can be reconciled (prices older than the cursor are fetched)."""
        if price_id not in self.usable:
            price = self.prices.get(price_id)
            if price is None:
                price = self.api.call(f"read price {price_id}", self.v1.prices.retrieve, price_id,
                                      params={"expand": ["tiers"]}).to_dict()
                self.prices[price_id] = price
                self.usable[price_id] = self.core_price(price) is not None
            else:
                self.usable[price_id] = False
        return self.usable[price_id]

    def read_subscriptions(self, item_periods: dict[str, set[tuple[int, int, str]]]) -> list[SubscriptionPeriod]:
        periods: dict[tuple[str, str, int], SubscriptionPeriod] = {}
        for sub in self._listed("list subscriptions", self.v1.subscriptions.list, {"status": "all"}):
            account = self.account_id(sub["customer"])
            ended = sub.get("ended_at")
            for item in (sub.get("items") or {}).get("data") or []:
                price = item.get("price") or {}
                product_key = self.product_key(price.get("product"))
                recurring = price.get("recurring") or {}
                if recurring.get("usage_type") == "metered" and not recurring.get("meter"):
                    self.legacy_items.append((item["id"], account, product_key))
                spans = set(item_periods.pop(item["id"], set()))
                if item.get("current_period_start") and item.get("current_period_end"):
                    spans.add((int(item["current_period_start"]), int(item["current_period_end"]), price["id"]))
                for start, end, price_id in spans:
                    if ended and int(ended) <= start:
                        continue  # the item's "current" period began after the subscription ended
                    if ended and int(ended) < end:
                        end = int(ended)
                    if not self.price_usable(price_id):
                        self.warnings.append(f"subscription {sub['id']}: price {price_id} is not usable, "
                                             "period skipped")
                        continue
                    periods[(account, product_key, start)] = SubscriptionPeriod(
                        sub["id"], account, product_key, price_id, str(sub.get("status")), _ts(start), _ts(end))
        return self._without_overlaps(list(periods.values()))

    def _without_overlaps(self, periods: list[SubscriptionPeriod]) -> list[SubscriptionPeriod]:
        """The bundle allows one price per account, product and instant; keep the earlier period."""
        kept: list[SubscriptionPeriod] = []
        for period in sorted(periods, key=lambda p: (p.account_id, p.product_key, p.period_start)):
            prev = kept[-1] if kept else None
            if prev and (prev.account_id, prev.product_key) == (period.account_id, period.product_key) \
                    and period.period_start < prev.period_end:
                self.warnings.append(f"subscription {period.subscription_id}: period from "
                                     f"{period.period_start.isoformat()} overlaps {prev.subscription_id}; skipped")
                continue
            kept.append(period)
        return kept

    def usage_window(self, subscriptions: list[SubscriptionPeriod], lines: list[InvoiceLine]) -> tuple[int, int]:
        now = int(time.time())
        end = now - now % DAY + DAY
        if self.since is not None:
            lookback = int(self.config.get("usage_lookback_days", DEFAULT_LOOKBACK_DAYS))
            start = max(0, self.since - self.since % DAY - lookback * DAY)
        elif self.config.get("usage_start"):
            try:
                start = int(datetime.fromisoformat(str(self.config["usage_start"])).replace(tzinfo=UTC).timestamp())
            except ValueError:
                raise _config_error("usage_start: expected a date YYYY-MM-DD") from None
        else:
            starts = [int(p.period_start.timestamp()) for p in subscriptions] + \
                     [int(line.period_start.timestamp()) for line in lines]
            start = min(starts) if starts else end - DEFAULT_USAGE_DAYS * DAY
        start -= start % DAY
        end = max([end, *(int(p.period_end.timestamp()) for p in subscriptions)])
        end += -end % DAY
        return min(start, end - DAY), end

    def read_reported_usage(self, meter_product: dict[str, str], start: int, end: int) -> pa.Table:
        customers = dict(self.account_of)
        if self.since is not None:
            customers.update(self.known_customers)
            if not self.known_customers:  # nobody told us who exists: everyone needs their usage refreshed
                for customer in self.api.list_all("list customers", self.v1.customers.list):
                    customers.setdefault(customer["id"], _account(customer).account_id)
        rows: dict[str, list[Any]] = {"account_id": [], "product_key": [], "ts": [], "units": []}
        for meter_id, product_key in sorted(meter_product.items()):
            for customer_id, account_id in sorted(customers.items()):
                params = {"customer": customer_id, "start_time": start, "end_time": end,
                          "value_grouping_window": "day"}
                for summary in self.api.list_all(f"read meter {meter_id} usage",
                                                 self.v1.billing.meters.event_summaries.list, meter_id,
                                                 params=params):
                    rows["account_id"].append(account_id)
                    rows["product_key"].append(product_key)
                    rows["ts"].append(_ts(summary["start_time"]))
                    rows["units"].append(Decimal(str(summary["aggregated_value"])).quantize(UNITS_QUANTUM))
        for item_id, account_id, product_key in self.legacy_items:
            for summary in self._legacy_summaries(item_id):
                period_start = int(summary["period"]["start"])
                if start <= period_start < end:
                    rows["account_id"].append(account_id)
                    rows["product_key"].append(product_key)
                    # stamped at the period's own start: its midnight may belong to the previous
                    # period (anniversary billing starts periods at any second of the day)
                    rows["ts"].append(_ts(period_start))
                    rows["units"].append(Decimal(int(summary["total_usage"])).quantize(UNITS_QUANTUM))
        return pa.table(rows, schema=BUCKET_SCHEMA)

    def _legacy_summaries(self, item_id: str) -> Iterator[Obj]:
        """Usage-record summaries of pre-Billing-Meters metered prices: one total per billing period.

        SDK v16 dropped the typed method (Stripe removed the endpoint from new API versions), so the
        SDK's raw request is used; accounts still on legacy metering keep answering it.
        """
        path = f"/v1/subscription_items/{item_id}/usage_record_summaries"
        query: Obj = {"limit": 100}
        while True:
            response = self.api.call(f"read usage records of {item_id}", self.api.client.raw_request, "get", path,
                                     **query)
            page = self.api.client.deserialize(response, api_mode="V1").to_dict()
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            query = {**query, "starting_after": data[-1]["id"]}


def _account(customer: Obj) -> Account:
    meta = customer.get("metadata") or {}
    return Account(str(meta.get("account_id") or customer["id"]),
                   str(customer.get("name") or customer.get("email") or customer["id"]),
                   customer["id"], meta.get("crm_id") or None)


def read_billing(config: dict[str, Any], since: int | None = None, *,
                 customers: Mapping[str, str] | None = None,
                 meter_products: Mapping[str, str] | None = None) -> StripeBilling:
    """Read the billing side of the bundle from Stripe.

    `since` (a previous result's `cursor`): only customers, products, prices, subscriptions and
    invoices created after it are returned, so the caller merges them into what it already has;
    subscription periods that started later are found through the invoices that billed them.
    Reported usage is re-read from `reported_usage_start` (the cursor's day minus
    `usage_lookback_days`, default 7, for late meter events) for every customer: pass
    `customers` ({stripe customer id: account_id}) from the previous sync to avoid listing them
    all again, and `meter_products` (the previous result's) so meters need no price listing.
    Config: api_key, api_base, max_network_retries, timeout, usage_start (first day of a full
    read, default the earliest period seen), meters ({meter id: product_key} overrides),
    days_until_due (drafts, default 30).
    """
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise _config_error("since: expected the integer cursor of a previous sync")
    reader = _Reader(config, since, customers, meter_products)
    accounts = reader.read_accounts()
    products, prices, meter_product = reader.read_catalog()
    lines, item_periods = reader.read_invoices()
    reader.usable = {p.price_id: True for p in prices}
    subscriptions = reader.read_subscriptions(item_periods)
    start, end = reader.usage_window(subscriptions, lines)
    usage = reader.read_reported_usage(meter_product, start, end)
    return StripeBilling(accounts, products, prices, subscriptions, lines, usage, reader.cursor, _ts(start),
                         meter_product, reader.warnings)


# ---- writer ---------------------------------------------------------------------------------------
def _check_draft_input(customer_id: str, currency: str, lines: list[DraftLine], idempotency_key: str) -> None:
    if not isinstance(customer_id, str) or not customer_id.startswith("cus_"):
        raise StripeConnectorError("invalid", f"customer_id: expected a Stripe customer id (cus_…), got "
                                              f"{customer_id!r}")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise StripeConnectorError("invalid", f"currency: expected a 3-letter ISO code, got {currency!r}")
    if not lines:
        raise StripeConnectorError("invalid", "lines: a draft invoice needs at least one line")
    for index, line in enumerate(lines):
        if not isinstance(line.amount, Decimal) or not line.amount.is_finite() or line.amount <= 0:
            raise StripeConnectorError("invalid", f"lines[{index}].amount: expected a Decimal > 0, got "
                                                  f"{line.amount!r}")
        if to_minor_units(line.amount, currency) <= 0:
            raise StripeConnectorError("invalid", f"lines[{index}].amount: {line.amount} rounds to zero in "
                                                  f"{currency.upper()}")
        if not line.description.strip():
            raise StripeConnectorError("invalid", f"lines[{index}].description: must not be empty")
    if not isinstance(idempotency_key, str) or not 8 <= len(idempotency_key) <= 200:
        raise StripeConnectorError("invalid", "idempotency_key: expected 8 to 200 characters")


def create_draft_invoice(config: dict[str, Any], customer_id: str, currency: str, lines: list[DraftLine],
                         idempotency_key: str, metadata: Mapping[str, str] | None = None,
                         description: str | None = None, resume: str | None = None) -> str:
    """Create (or, with the same key, find again) a draft invoice holding `lines`; return its id.

    `resume`: the id of a draft an earlier attempt created before its answer was lost; its missing
    lines are added (a line already there carries `rrc_line` = its index in its metadata), so
    finishing it does not depend on Stripe still remembering the idempotency keys (24 hours)."""
    currency = (currency or "").lower()
    _check_draft_input(customer_id, currency, lines, idempotency_key)
    api = _Api(config)
    v1 = api.client.v1
    customer = api.call(f"read customer {customer_id}", v1.customers.retrieve, customer_id).to_dict()
    if customer.get("deleted"):
        raise StripeConnectorError("not_found", f"Stripe customer {customer_id} was deleted")
    for price_id in sorted({line.price_id for line in lines if line.price_id}):
        price = api.call(f"read price {price_id}", v1.prices.retrieve, price_id).to_dict()
        if not price.get("active"):
            raise StripeConnectorError("invalid", f"Stripe price {price_id} is archived: reactivate it or map the "
                                                  "product to an active price before invoicing")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} | {"rrc_key": idempotency_key}
    params: Obj = {"customer": customer_id, "currency": currency, "auto_advance": False,
                   "collection_method": "send_invoice", "days_until_due": int(config.get("days_until_due", 30)),
                   "pending_invoice_items_behavior": "exclude", "metadata": meta}
    if description:
        params["description"] = description[:500]
    if resume:
        invoice = api.call(f"read invoice {resume}", v1.invoices.retrieve, resume)
    else:
        invoice = api.call("create the draft invoice", v1.invoices.create, params=params,
                           options={"idempotency_key": f"{idempotency_key}-invoice"})
    if invoice.status != "draft":
        raise StripeConnectorError("invalid", f"Stripe invoice {invoice.id} is {invoice.status}, not a draft; "
                                              "nothing was added to it")
    present = {item.get("metadata", {}).get("rrc_line") for item in api.list_all(
        f"list the lines of {invoice.id}", v1.invoice_items.list, params={"invoice": invoice.id})} if resume else set()
    for index, line in enumerate(lines):
        if str(index) in present:
            continue
        item: Obj = {"customer": customer_id, "invoice": invoice.id, "currency": currency,
                     "amount": to_minor_units(line.amount, currency), "description": line.description[:500],
                     "metadata": {**meta, **{str(k): str(v) for k, v in line.metadata.items()},
                                  **({"price_id": line.price_id} if line.price_id else {}), "rrc_line": str(index)}}
        if line.period_start and line.period_end:
            item["period"] = {"start": int(line.period_start.timestamp()), "end": int(line.period_end.timestamp())}
        api.call(f"add line {index + 1} to draft invoice {invoice.id}", v1.invoice_items.create, params=item,
                 options={"idempotency_key": f"{idempotency_key}-item-{index}"})
    return str(invoice.id)


def find_invoice(config: dict[str, Any], customer_id: str, metadata: Mapping[str, str],
                 created_since: datetime) -> Obj | None:
    """The newest invoice of `customer_id` created since `created_since` whose metadata holds every
    pair of `metadata` (voided ones excepted): how an attempt whose answer was lost is found again
    once Stripe's idempotency keys no longer apply (another amount, or after their 24 hours)."""
    api = _Api(config)
    params: Obj = {"customer": customer_id, "created": {"gte": int(created_since.timestamp())}}
    for invoice in api.list_all(f"list invoices of {customer_id}", api.client.v1.invoices.list, params=params):
        held = invoice.get("metadata") or {}
        if invoice.get("status") != "void" and all(held.get(k) == v for k, v in metadata.items()):
            return invoice  # Stripe lists newest first
    return None


def get_invoice(config: dict[str, Any], invoice_id: str) -> Obj:
    """The invoice as Stripe holds it now (status, total, lines), for showing what an action created."""
    api = _Api(config)
    return api.call(f"read invoice {invoice_id}", api.client.v1.invoices.retrieve, invoice_id).to_dict()
