"""A local fake of the Stripe API, spoken over real HTTP so the official SDK can be pointed at it.

Why a fake and not mocks: the connector and the draft-invoice action must be proven through the
real `stripe` SDK (form encoding, pagination, retries, Idempotency-Key headers, error mapping),
and the demo needs a Stripe to talk to without network. Objects have the shapes of Stripe's
2026 fixtures (`/work/shared/stripe/fixtures3.json`, the SDK v16's API version); tests/test_stripe_fake.py
checks every emitted object against those fixtures and the published OpenAPI schemas.

Covered: customers, products, prices (`expand[]=data.tiers`), subscriptions with items,
invoices (+ lines, create/retrieve/delete drafts), invoice items, billing meters and meter event
summaries (daily windows; only windows with events are returned). List envelopes paginate with
`limit`/`starting_after`/`ending_before`, `created` filters (int or gt/gte/lt/lte), Stripe error
envelopes (400, 401, 404, 429), `Idempotency-Key` replay (same key + same params -> the stored
response with `Idempotent-Replayed: true`; same key + other params -> 400 idempotency_error).
Fault injection: `fail_next` (429/500 before or after the request is processed),
`delay_next` (answer only after a pause, once the request was processed: a client timeout
that hides a success) and `redirect_next` (a 3xx pointing elsewhere, e.g. at
tests/fakes/redirect_target.py). Every request is recorded in `requests` so tests can count them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from core.model import Bundle
from core.money import currency_exponent
from core.pricing import Price
from tests.fakes.serving import serve_app

DEFAULT_KEY = "sk_test_fake_4242424242424242"
DROP_HEADER = "X-Fake-Drop-Connection"
DAY = 86_400
Obj = dict[str, Any]


_LIST = {"limit", "starting_after", "ending_before", "expand"}
# What each endpoint accepts: Stripe's OpenAPI spec (2022-03-29) for the endpoint, plus the few parameters
# added since (tests/test_stripe_fake.py checks every name against the spec and the list of additions).
ALLOWED_PARAMS: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/customers"): _LIST | {"created", "email", "test_clock"},
    ("POST", "/v1/customers"): {"address", "balance", "description", "email", "expand", "invoice_prefix",
                                "invoice_settings", "metadata", "name", "phone", "preferred_locales", "shipping",
                                "tax_exempt"},
    ("GET", "/v1/customers/{customer}"): {"expand"},
    ("GET", "/v1/products"): _LIST | {"active", "created", "ids", "shippable", "url"},
    ("GET", "/v1/products/{id}"): {"expand"},
    ("GET", "/v1/prices"): _LIST | {"active", "created", "currency", "lookup_keys", "product", "recurring", "type"},
    ("GET", "/v1/prices/{price}"): {"expand"},
    ("GET", "/v1/subscriptions"): _LIST | {"collection_method", "created", "customer", "price", "status",
                                           "test_clock"},
    ("GET", "/v1/subscriptions/{subscription_exposed_id}"): {"expand"},
    ("GET", "/v1/invoices"): _LIST | {"collection_method", "created", "customer", "due_date", "status",
                                      "subscription"},
    ("POST", "/v1/invoices"): {"auto_advance", "collection_method", "currency", "customer", "days_until_due",
                               "description", "due_date", "expand", "footer", "metadata",
                               "pending_invoice_items_behavior", "statement_descriptor"},
    ("GET", "/v1/invoices/{invoice}"): {"expand"},
    ("DELETE", "/v1/invoices/{invoice}"): set(),
    ("GET", "/v1/invoices/{invoice}/lines"): _LIST,
    ("GET", "/v1/invoiceitems"): _LIST | {"created", "customer", "invoice", "pending"},
    ("POST", "/v1/invoiceitems"): {"amount", "currency", "customer", "description", "discountable", "expand",
                                   "invoice", "metadata", "period", "pricing", "quantity"},
    ("GET", "/v1/billing/meters"): _LIST | {"status"},
    ("GET", "/v1/billing/meters/{id}/event_summaries"): _LIST | {"customer", "start_time", "end_time",
                                                                 "value_grouping_window"},
    ("GET", "/v1/subscription_items/{subscription_item}/usage_record_summaries"): _LIST,
}
ADDED_SINCE_SPEC = {  # parameters Stripe added after the 2022-03-29 spec (the SDK v16 sends them)
    ("POST", "/v1/invoices"): {"currency"},
    ("POST", "/v1/invoiceitems"): {"pricing"},
}
NEWER_THAN_SPEC = {("GET", "/v1/billing/meters"), ("GET", "/v1/billing/meters/{id}/event_summaries")}


class StripeError(Exception):
    """Raised inside handlers; becomes Stripe's error envelope."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> Obj:
        error: Obj = {"message": self.message, "type": self.type}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        return {"error": error}


@dataclass
class Fault:
    status: int = 429
    after_processing: bool = False
    delay: float = 0.0
    path_contains: str = ""
    method: str | None = None
    drop: bool = False  # processed, then the connection is cut before any byte of the answer (needs the proxy)
    redirect_to: str | None = None  # unprocessed: `status` (a 3xx) with Location: this base URL + the path


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: Obj
    idempotency_key: str | None
    status: int = 0
    returned: int = 0  # objects in a list response's `data`


@dataclass
class _MeterDay:
    total: Decimal = Decimal(0)
    count: int = 0
    last_ts: int = -1
    last: Decimal = Decimal(0)


def _minor(amount: Decimal, currency: str) -> Decimal:
    return (amount * (Decimal(10) ** currency_exponent(currency))).normalize()


def _int_or_none(value: Decimal) -> int | None:
    return int(value) if value == value.to_integral_value() else None


def _decimal_text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


def parse_form(pairs: list[tuple[str, str]]) -> Obj:
    """Stripe's bracket encoding (`a[b][0]=x`, `expand[]=y`) -> nested dicts and lists."""
    root: Obj = {}
    for key, value in pairs:
        head, *rest = re.findall(r"^[^\[]+|\[[^\]]*\]", key)
        tokens = [head] + [token[1:-1] for token in rest]
        node: Any = root
        for index, token in enumerate(tokens):
            last = index == len(tokens) - 1
            nxt = None if last else tokens[index + 1]
            if isinstance(node, list):
                if token == "" or int(token) >= len(node):
                    node.append(value if last else ([] if nxt == "" or (nxt or "x").isdigit() else {}))
                    node = node[-1]
                    continue
                if last:
                    node[int(token)] = value
                node = node[int(token)]
                continue
            if last:
                node[token] = value
            else:
                node = node.setdefault(token, [] if nxt == "" or (nxt or "x").isdigit() else {})
    return root


class FakeStripe:
    """In-memory Stripe account state plus the HTTP app serving it."""

    def __init__(self, api_keys: tuple[str, ...] = (DEFAULT_KEY,)) -> None:
        self.lock = threading.RLock()
        self.api_keys = set(api_keys)
        self.restricted: dict[str, tuple[str, ...]] = {}  # restricted key -> path prefixes it may use
        self.customers: dict[str, Obj] = {}
        self.products: dict[str, Obj] = {}
        self.prices: dict[str, Obj] = {}
        self.subscriptions: dict[str, Obj] = {}
        self.invoices: dict[str, Obj] = {}
        self.invoiceitems: dict[str, Obj] = {}
        self.meters: dict[str, Obj] = {}
        self.meter_days: dict[tuple[str, str], dict[int, _MeterDay]] = {}
        self.usage_records: dict[str, list[tuple[int, int]]] = {}  # legacy: subscription item -> (ts, quantity)
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.idempotency: dict[tuple[str, str], tuple[str, int, Obj]] = {}
        self.clock: int | None = None
        self._seq = 0
        self.app = self._build_app()

    # ---- state helpers ---------------------------------------------------------------------------
    def now(self) -> int:
        return self.clock if self.clock is not None else int(time.time())

    def new_id(self, prefix: str) -> str:
        self._seq += 1
        digest = hashlib.sha256(f"{prefix}{self._seq}{id(self)}".encode()).hexdigest()[:14]
        return f"{prefix}_{self._seq:04d}{digest}"

    def add_restricted_key(self, key: str, *path_prefixes: str) -> None:
        """A restricted key (rk_…) that may only call paths starting with one of `path_prefixes`."""
        self.api_keys.add(key)
        self.restricted[key] = tuple(path_prefixes)

    def fail_next(self, n: int = 1, status: int = 429, *, after_processing: bool = False,
                  path_contains: str = "", method: str | None = None) -> None:
        """The next `n` matching requests fail with `status` (after doing their work if asked)."""
        with self.lock:
            self.faults.extend(Fault(status, after_processing, 0.0, path_contains, method) for _ in range(n))

    def delay_next(self, n: int = 1, seconds: float = 2.0, *, path_contains: str = "",
                   method: str | None = None) -> None:
        """The next `n` matching requests are processed, then answered only after `seconds`."""
        with self.lock:
            self.faults.extend(Fault(200, True, seconds, path_contains, method) for _ in range(n))

    def drop_next(self, n: int = 1, *, path_contains: str = "", method: str | None = None) -> None:
        """The next `n` matching requests are processed, then the connection drops without an answer.

        Only through `serve(fake, drop_proxy=True)`: the proxy in front of the fake cuts the client off.
        """
        with self.lock:
            self.faults.extend(Fault(200, True, 0.0, path_contains, method, drop=True) for _ in range(n))

    def redirect_next(self, base_url: str, *, status: int = 302, path_contains: str = "",
                      method: str | None = None) -> None:
        """The next matching request is answered, unprocessed, with a redirect to its path at `base_url`."""
        with self.lock:
            self.faults.append(Fault(status, False, 0.0, path_contains, method, redirect_to=base_url))

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        return sum(1 for r in self.requests
                   if (method is None or r.method == method) and r.path.startswith(path_prefix))

    def draft_invoices(self) -> list[Obj]:
        return [inv for inv in self.invoices.values() if inv["status"] == "draft"]

    # ---- seeding API -----------------------------------------------------------------------------
    def add_customer(self, id: str | None = None, *, name: str | None = None, email: str | None = None,
                     metadata: dict[str, str] | None = None, created: int | None = None,
                     currency: str | None = None) -> Obj:
        cid = id or self.new_id("cus")
        customer = {
            "address": None, "balance": 0, "created": created or self.now(), "currency": currency,
            "default_source": None, "delinquent": False, "description": None, "discount": None, "email": email,
            "id": cid, "invoice_prefix": hashlib.sha256(cid.encode()).hexdigest()[:8].upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                                 "rendering_options": None},
            "livemode": False, "metadata": dict(metadata or {}), "name": name, "next_invoice_sequence": 1,
            "object": "customer", "phone": None, "preferred_locales": [], "shipping": None, "tax_exempt": "none",
            "test_clock": None,
        }
        self.customers[cid] = customer
        return customer

    def add_product(self, id: str | None = None, *, name: str, unit_label: str | None = None,
                    metadata: dict[str, str] | None = None, created: int | None = None,
                    default_price: str | None = None) -> Obj:
        pid = id or self.new_id("prod")
        created = created or self.now()
        product = {
            "active": True, "created": created, "default_price": default_price, "description": None, "id": pid,
            "images": [], "livemode": False, "marketing_features": [], "metadata": dict(metadata or {}),
            "name": name, "object": "product", "package_dimensions": None, "shippable": None,
            "statement_descriptor": None, "tax_code": None, "unit_label": unit_label, "updated": created,
            "url": None, "type": "service",
        }
        self.products[pid] = product
        return product

    def add_price(self, id: str | None = None, *, product: str, currency: str,
                  unit_amount_decimal: str | None = None, billing_scheme: str = "per_unit",
                  tiers_mode: str | None = None, tiers: list[Obj] | None = None,
                  transform_quantity: Obj | None = None, meter: str | None = None, active: bool = True,
                  created: int | None = None, metadata: dict[str, str] | None = None,
                  lookup_key: str | None = None, usage_type: str | None = None) -> Obj:
        """`tiers`: [{"up_to": int | None, "unit_amount_decimal": "…", "flat_amount_decimal": "…"}] in minor units."""
        pid = id or self.new_id("price")
        unit_amount = None if unit_amount_decimal is None else _int_or_none(Decimal(unit_amount_decimal))
        full_tiers = None
        if tiers is not None:
            full_tiers = []
            for tier in tiers:
                unit = Decimal(str(tier.get("unit_amount_decimal") or "0"))
                flat = Decimal(str(tier.get("flat_amount_decimal") or "0"))
                full_tiers.append({"flat_amount": _int_or_none(flat), "flat_amount_decimal": _decimal_text(flat),
                                   "unit_amount": _int_or_none(unit), "unit_amount_decimal": _decimal_text(unit),
                                   "up_to": tier.get("up_to")})
        price = {
            "active": active, "billing_scheme": billing_scheme, "created": created or self.now(),
            "currency": currency, "custom_unit_amount": None, "id": pid, "livemode": False,
            "lookup_key": lookup_key, "metadata": dict(metadata or {}), "nickname": None, "object": "price",
            "product": product,
            "recurring": {"interval": "month", "interval_count": 1, "meter": meter,
                          "usage_type": usage_type or ("metered" if meter else "licensed"),
                          "trial_period_days": None},
            "tax_behavior": "unspecified", "tiers_mode": tiers_mode, "transform_quantity": transform_quantity,
            "type": "recurring", "unit_amount": unit_amount,
            "unit_amount_decimal": None if unit_amount_decimal is None else _decimal_text(Decimal(unit_amount_decimal)),
            "_tiers": full_tiers,
        }
        self.prices[pid] = price
        return price

    def add_price_from_core(self, price: Price, *, product: str, meter: str | None = None,
                            created: int | None = None) -> Obj:
        """A core Price (major units) as the Stripe price a billing team would have set up."""
        cur = price.currency
        kwargs: Obj = {}
        if price.model in ("per_unit", "package"):
            kwargs["unit_amount_decimal"] = _decimal_text(_minor(price.unit_amount or Decimal(0), cur))
            if price.model == "package":
                kwargs["transform_quantity"] = {"divide_by": price.package_size, "round": "up"}
        else:
            kwargs["billing_scheme"], kwargs["tiers_mode"] = "tiered", price.model
            kwargs["tiers"] = [{"up_to": None if t.up_to is None else int(t.up_to),
                                "unit_amount_decimal": _decimal_text(_minor(t.unit_amount, cur)),
                                "flat_amount_decimal": _decimal_text(_minor(t.flat_amount, cur))}
                               for t in price.tiers]
        return self.add_price(price.price_id, product=product, currency=cur, meter=meter, created=created, **kwargs)

    def add_meter(self, id: str | None = None, *, event_name: str, display_name: str | None = None,
                  formula: str = "sum", created: int | None = None) -> Obj:
        mid = id or self.new_id("mtr")
        created = created or self.now()
        meter = {
            "created": created, "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "default_aggregation": {"formula": formula}, "display_name": display_name or event_name,
            "event_name": event_name, "event_time_window": None, "id": mid, "livemode": False,
            "object": "billing.meter", "status": "active", "status_transitions": {"deactivated_at": None},
            "updated": created, "value_settings": {"event_payload_key": "value"},
        }
        self.meters[mid] = meter
        return meter

    def add_meter_event(self, meter: str, customer: str, ts: int, value: Decimal | int | str) -> None:
        day = self.meter_days.setdefault((meter, customer), {}).setdefault(ts - ts % DAY, _MeterDay())
        amount = Decimal(str(value))
        day.total += amount
        day.count += 1
        if ts >= day.last_ts:
            day.last_ts, day.last = ts, amount

    def add_usage_record(self, subscription_item: str, ts: int, quantity: int) -> None:
        """Legacy metered billing (before Billing Meters): usage reported on a subscription item."""
        self.usage_records.setdefault(subscription_item, []).append((int(ts), int(quantity)))

    def add_subscription(self, id: str | None = None, *, customer: str, items: list[Obj], status: str = "active",
                         created: int | None = None, canceled_at: int | None = None) -> Obj:
        """`items`: [{"id"?, "price": id, "current_period_start": int, "current_period_end": int, "quantity"?}]."""
        sid = id or self.new_id("sub")
        created = created or self.now()
        sub_items = []
        for item in items:
            price = self.prices[item["price"]]
            sub_items.append({
                "billing_thresholds": None, "created": created, "current_period_end": item["current_period_end"],
                "current_period_start": item["current_period_start"], "discounts": [],
                "id": item.get("id") or self.new_id("si"), "metadata": {}, "object": "subscription_item",
                "plan": self._plan(price, created), "price": {k: v for k, v in price.items() if k != "_tiers"},
                "quantity": item.get("quantity", 1), "subscription": sid, "tax_rates": [],
            })
        currency = self.prices[items[0]["price"]]["currency"] if items else "usd"
        sub = {
            "application": None, "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": items[0]["current_period_start"] if items else created,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic"}, "billing_schedules": [], "billing_thresholds": None,
            "cancel_at": None, "cancel_at_period_end": False, "canceled_at": canceled_at,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically", "created": created, "currency": currency,
            "customer": customer, "customer_account": None, "days_until_due": None, "default_payment_method": None,
            "default_source": None, "default_tax_rates": [], "description": None, "discounts": [],
            "ended_at": canceled_at if status == "canceled" else None, "id": sid,
            "invoice_settings": {"account_tax_ids": None, "custom_fields": None, "description": None, "footer": None,
                                 "issuer": {"type": "self"}},
            "items": {"data": sub_items, "has_more": False, "object": "list",
                      "url": f"/v1/subscription_items?subscription={sid}"},
            "latest_invoice": None, "livemode": False, "managed_payments": None, "metadata": {},
            "next_pending_invoice_item_invoice": None, "object": "subscription", "on_behalf_of": None,
            "pause_collection": None, "payment_settings": None, "pending_invoice_item_interval": None,
            "pending_setup_intent": None, "pending_update": None, "schedule": None, "start_date": created,
            "status": status, "test_clock": None, "transfer_data": None, "trial_end": None,
            "trial_settings": None, "trial_start": None,
        }
        self.subscriptions[sid] = sub
        return sub

    def _plan(self, price: Obj, created: int) -> Obj:
        return {
            "active": price["active"], "amount": price["unit_amount"], "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"], "created": price["created"], "currency": price["currency"],
            "id": price["id"], "interval": "month", "interval_count": 1, "livemode": False, "metadata": {},
            "meter": price["recurring"]["meter"], "nickname": None, "object": "plan", "product": price["product"],
            "tiers_mode": price["tiers_mode"], "transform_usage": price["transform_quantity"],
            "trial_period_days": None, "usage_type": price["recurring"]["usage_type"],
        }

    def add_invoice(self, id: str | None = None, *, customer: str, currency: str, lines: list[Obj],
                    status: str = "paid", created: int | None = None, subscription: str | None = None) -> Obj:
        """`lines`: [{"amount": minor int, "quantity": Decimal|int, "price": id, "period": {"start","end"},
        "subscription_item"?: id, "description"?}] — subscription usage lines as Stripe bills them."""
        iid = id or self.new_id("in")
        created = created or self.now()
        invoice = self._invoice_shell(iid, customer, currency, created, status, subscription, "subscription_cycle")
        for line in lines:
            price = self.prices.get(line["price"]) if line.get("price") else None
            quantity = Decimal(str(line.get("quantity", 1)))
            invoice["lines"]["data"].append(self._line(
                iid, amount=int(line["amount"]), currency=currency, description=line.get("description"),
                period=line["period"], quantity=quantity, price=price, subscription=subscription,
                subscription_item=line.get("subscription_item"), invoice_item=None))
        self._total(invoice)
        if status == "paid":
            invoice["amount_paid"], invoice["amount_remaining"] = invoice["amount_due"], 0
            invoice["status_transitions"]["paid_at"] = created
            invoice["status_transitions"]["finalized_at"] = created
        self.invoices[iid] = invoice
        return invoice

    def _invoice_shell(self, iid: str, customer: str, currency: str, created: int, status: str,
                       subscription: str | None, reason: str) -> Obj:
        cust = self.customers.get(customer, {})
        return {
            "account_country": "US", "account_name": "Fake Stripe account", "account_tax_ids": None,
            "amount_due": 0, "amount_overpaid": 0, "amount_paid": 0, "amount_remaining": 0, "amount_shipping": 0,
            "application": None, "attempt_count": 0, "attempted": False, "auto_advance": False,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                              "status": None},
            "automatically_finalizes_at": None, "billing_reason": reason, "collection_method": "send_invoice",
            "created": created, "currency": currency, "custom_fields": None, "customer": customer,
            "customer_account": None, "customer_address": None, "customer_email": cust.get("email"),
            "customer_name": cust.get("name"), "customer_phone": None, "customer_shipping": None,
            "customer_tax_exempt": "none", "customer_tax_ids": [], "default_payment_method": None,
            "default_source": None, "default_tax_rates": [], "description": None, "discounts": [],
            "due_date": None, "effective_at": None if status == "draft" else created, "ending_balance": None,
            "footer": None, "from_invoice": None, "hosted_invoice_url": None, "id": iid, "invoice_pdf": None,
            "issuer": {"type": "self"}, "last_finalization_error": None, "latest_revision": None,
            "lines": {"data": [], "has_more": False, "object": "list", "url": f"/v1/invoices/{iid}/lines"},
            "livemode": False, "metadata": {}, "next_payment_attempt": None, "number": None, "object": "invoice",
            "on_behalf_of": None,
            "parent": {"quote_details": None,
                       "subscription_details": {"metadata": None, "subscription": subscription},
                       "type": "subscription_details"} if subscription else None,
            "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                 "payment_method_types": None},
            "period_end": created, "period_start": created, "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0, "receipt_number": None, "rendering": None,
            "shipping_cost": None, "shipping_details": None, "starting_balance": 0, "statement_descriptor": None,
            "status": status,
            "status_transitions": {"finalized_at": None, "marked_uncollectible_at": None, "paid_at": None,
                                   "voided_at": None},
            "subscription": subscription, "subtotal": 0, "subtotal_excluding_tax": 0, "test_clock": None,
            "total": 0, "total_discount_amounts": [], "total_excluding_tax": 0, "total_pretax_credit_amounts": [],
            "total_taxes": [], "webhooks_delivered_at": None if status == "draft" else created,
        }

    def _line(self, invoice_id: str, *, amount: int, currency: str, description: str | None, period: Obj,
              quantity: Decimal, price: Obj | None, subscription: str | None, subscription_item: str | None,
              invoice_item: str | None) -> Obj:
        if subscription_item:
            parent = {"invoice_item_details": None, "subscription_item_details": {
                "invoice_item": None, "proration": False, "proration_details": {"credited_items": None},
                "subscription": subscription, "subscription_item": subscription_item},
                "type": "subscription_item_details"}
        else:
            parent = {"invoice_item_details": {"invoice_item": invoice_item, "proration": False,
                                               "proration_details": {"credited_items": None},
                                               "subscription": subscription},
                      "subscription_item_details": None, "type": "invoice_item_details"}
        pricing = None
        if price is not None:
            pricing = {"price_details": {"price": price["id"], "product": price["product"]}, "type": "price_details",
                       "unit_amount_decimal": price["unit_amount_decimal"]}
        return {
            "amount": amount, "currency": currency, "description": description, "discount_amounts": [],
            "discountable": True, "discounts": [], "id": self.new_id("il"), "invoice": invoice_id,
            "livemode": False, "metadata": {}, "object": "line_item", "parent": parent,
            "period": {"end": int(period["end"]), "start": int(period["start"])},
            "pretax_credit_amounts": [], "pricing": pricing, "quantity": _int_or_none(quantity),
            "quantity_decimal": _decimal_text(quantity), "subscription": subscription, "subtotal": amount,
            "taxes": [],
        }

    @staticmethod
    def _total(invoice: Obj) -> None:
        total = sum(line["amount"] for line in invoice["lines"]["data"])
        for key in ("amount_due", "amount_remaining", "subtotal", "subtotal_excluding_tax", "total",
                    "total_excluding_tax"):
            invoice[key] = total

    def seed_from_bundle(self, bundle: Bundle, *, created: int | None = None) -> None:
        """What a company billing `bundle` through Stripe would hold: customers, catalog, meters with the
        reported usage as meter events, subscriptions (latest period current) and paid invoices."""
        created = created or self.now()
        with self.lock:
            for account in bundle.accounts.values():
                if account.stripe_customer_id:
                    meta = {"account_id": account.account_id}
                    if account.crm_id:
                        meta["crm_id"] = account.crm_id
                    self.add_customer(account.stripe_customer_id, name=account.name, metadata=meta, created=created)
            meter_of: dict[str, str] = {}
            for key, product in bundle.products.items():
                meter = self.add_meter(f"mtr_{key}", event_name=key, display_name=product.name,
                                       formula="last" if product.aggregation == "max" else "sum", created=created)
                meter_of[key] = meter["id"]
                self.add_product(f"prod_{key}", name=product.name, unit_label=product.unit,
                                 metadata={"product_key": key, "aggregation": product.aggregation},
                                 default_price=product.default_price_id, created=created)
            for price in bundle.prices.values():
                self.add_price_from_core(price, product=f"prod_{price.product_key}",
                                         meter=meter_of[price.product_key], created=created)
            customer_of = {a.account_id: a.stripe_customer_id for a in bundle.accounts.values()}
            self._seed_subscriptions(bundle, customer_of, created)
            self._seed_usage(bundle, customer_of, meter_of)

    def _seed_subscriptions(self, bundle: Bundle, customer_of: dict[str, str | None], created: int) -> None:
        by_sub: dict[str, list[Any]] = {}
        for period in bundle.subscriptions:
            by_sub.setdefault(period.subscription_id, []).append(period)
        item_of: dict[tuple[str, str, datetime], tuple[str, str, str]] = {}
        for sub_id, periods in by_sub.items():
            periods.sort(key=lambda p: p.period_start)
            customer = customer_of.get(periods[0].account_id)
            if not customer:
                continue
            current = periods[-1]
            item_id = f"si_{sub_id.removeprefix('sub_')}"
            self.add_subscription(sub_id, customer=customer, status=current.status,
                                  created=int(periods[0].period_start.timestamp()),
                                  canceled_at=int(current.period_end.timestamp())
                                  if current.status == "canceled" else None,
                                  items=[{"id": item_id, "price": current.price_id,
                                          "current_period_start": int(current.period_start.timestamp()),
                                          "current_period_end": int(current.period_end.timestamp())}])
            for period in periods:
                item_of[(period.account_id, period.product_key, period.period_start)] = (
                    sub_id, item_id, period.price_id)
        by_invoice: dict[str, list[Any]] = {}
        for line in bundle.invoice_lines:
            by_invoice.setdefault(line.invoice_id, []).append(line)
        for invoice_id, lines in by_invoice.items():
            customer = customer_of.get(lines[0].account_id)
            if not customer:
                continue
            stripe_lines, subscription = [], None
            for line in lines:
                sub_id, item_id, price_id = item_of.get(
                    (line.account_id, line.product_key, line.period_start),
                    (None, None, bundle.products[line.product_key].default_price_id))
                subscription = subscription or sub_id
                stripe_lines.append({"amount": int(_minor(line.amount, line.currency)), "quantity": line.quantity,
                                     "price": price_id, "subscription_item": item_id,
                                     "period": {"start": int(line.period_start.timestamp()),
                                                "end": int(line.period_end.timestamp())},
                                     "description": f"{line.quantity} × {line.product_key}"})
            self.add_invoice(invoice_id, customer=customer, currency=lines[0].currency, lines=stripe_lines,
                             status="paid", subscription=subscription,
                             created=int(max(line.period_end for line in lines).timestamp()))

    def _seed_usage(self, bundle: Bundle, customer_of: dict[str, str | None], meter_of: dict[str, str]) -> None:
        import duckdb

        source = bundle.reported_usage
        con = duckdb.connect()
        if source.table is not None:
            con.register("reported", source.table)
            relation = "reported"
        else:
            relation = f"read_parquet('{source.path}')"
        rows = con.execute(
            f"SELECT account_id, product_key, epoch(CAST(ts AS TIMESTAMPTZ))::BIGINT, CAST(units AS VARCHAR) "
            f"FROM {relation}").fetchall()
        con.close()
        for account_id, product_key, ts, units in rows:
            customer = customer_of.get(account_id)
            if customer and product_key in meter_of:
                self.add_meter_event(meter_of[product_key], customer, int(ts), Decimal(units))

    # ---- HTTP ------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="Fake Stripe", docs_url=None, redoc_url=None, openapi_url=None)
        handlers = {
            ("GET", "/v1/customers"): self._list_customers,
            ("POST", "/v1/customers"): self._create_customer,
            ("GET", "/v1/customers/{customer}"): self._retrieve_customer,
            ("GET", "/v1/products"): self._list_products,
            ("GET", "/v1/products/{id}"): self._retrieve_product,
            ("GET", "/v1/prices"): self._list_prices,
            ("GET", "/v1/prices/{price}"): self._retrieve_price,
            ("GET", "/v1/subscriptions"): self._list_subscriptions,
            ("GET", "/v1/subscriptions/{subscription_exposed_id}"): self._retrieve_subscription,
            ("GET", "/v1/invoices"): self._list_invoices,
            ("POST", "/v1/invoices"): self._create_invoice,
            ("GET", "/v1/invoices/{invoice}"): self._retrieve_invoice,
            ("DELETE", "/v1/invoices/{invoice}"): self._delete_invoice,
            ("GET", "/v1/invoices/{invoice}/lines"): self._list_invoice_lines,
            ("GET", "/v1/invoiceitems"): self._list_invoiceitems,
            ("POST", "/v1/invoiceitems"): self._create_invoiceitem,
            ("GET", "/v1/billing/meters"): self._list_meters,
            ("GET", "/v1/billing/meters/{id}/event_summaries"): self._list_summaries,
            ("GET", "/v1/subscription_items/{subscription_item}/usage_record_summaries"):
                self._list_usage_record_summaries,
        }
        routes = [(method, re.compile(re.sub(r"\{[^}]+\}", "(?P<id>[^/]+)", template)), handler, template)
                  for (method, template), handler in handlers.items()]

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def dispatch(request: Request, path: str) -> Response:
            body = (await request.body()).decode()
            return await _run_in_thread(self._handle, request.method, "/" + path, request.url.query, body,
                                        dict(request.headers), routes)

        return app

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.path_contains in path and (fault.method is None or fault.method == method):
                return self.faults.pop(index)
        return None

    def _handle(self, method: str, path: str, query: str, body: str, headers: dict[str, str],
                routes: list[Any]) -> Response:
        pairs = parse_qsl(query, keep_blank_values=True) + parse_qsl(body, keep_blank_values=True)
        params = parse_form(pairs)
        key = headers.get("idempotency-key")
        record = RecordedRequest(method, path, params, key)
        with self.lock:
            self.requests.append(record)
            fault = self._take_fault(method, path)
        if fault and fault.redirect_to:
            record.status = fault.status
            return Response(status_code=fault.status, headers={"Location": fault.redirect_to + path})
        if fault and not fault.after_processing:
            record.status = fault.status
            return self._error(StripeError(fault.status, "Too many requests hit the API too quickly."
                                           if fault.status == 429 else "An unknown error occurred (injected).",
                                           type_="invalid_request_error" if fault.status == 429 else "api_error",
                                           code="rate_limit" if fault.status == 429 else None,
                                           headers={"Retry-After": "0"} if fault.status == 429 else None))
        response = self._process(method, path, params, key, headers, routes, record)
        if fault and fault.drop:
            response.headers[DROP_HEADER] = "1"
            return response
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.after_processing and not fault.delay:
            record.status = fault.status
            return self._error(StripeError(fault.status, "An unknown error occurred (injected after processing).",
                                           type_="api_error"))
        return response

    def _process(self, method: str, path: str, params: Obj, key: str | None, headers: dict[str, str],
                 routes: list[Any], record: RecordedRequest) -> Response:
        api_key, fingerprint = "", ""
        try:
            api_key = self._authenticate(headers)
            allowed = self.restricted.get(api_key)
            if allowed is not None and not path.startswith(allowed):
                raise StripeError(403, f"The provided key '{api_key[:8]}***{api_key[-4:]}' does not have the "
                                       f"required permissions for this endpoint on account 'acct_fake'.")
            with self.lock:
                if key and method == "POST":
                    fingerprint = hashlib.sha256(json.dumps([method, path, params], sort_keys=True).encode()
                                                 ).hexdigest()
                    stored = self.idempotency.get((api_key, key))
                    if stored is not None:
                        if stored[0] != fingerprint:
                            raise StripeError(400, "Keys for idempotent requests can only be used with the same "
                                                   "parameters they were first used with. Try using a key other "
                                                   f"than '{key}' if you meant to execute a different request.",
                                              type_="idempotency_error")
                        record.status = stored[1]
                        return JSONResponse(stored[2], stored[1], headers={"Idempotent-Replayed": "true",
                                                                            "Idempotency-Key": key})
                status, payload = self._route(method, path, params, routes)
                if key and method == "POST":
                    self.idempotency[(api_key, key)] = (fingerprint, status, payload)
        except StripeError as exc:
            record.status = exc.status
            if key and method == "POST" and exc.status == 400 and exc.type != "idempotency_error":
                with self.lock:
                    self.idempotency.setdefault((api_key, key), (fingerprint, exc.status, exc.body()))
            return self._error(exc)
        record.status = status
        if payload.get("object") == "list":
            record.returned = len(payload["data"])
        return JSONResponse(payload, status, headers={"Request-Id": f"req_{len(self.requests):06d}"})

    def _authenticate(self, headers: dict[str, str]) -> str:
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if not token:
            raise StripeError(401, "You did not provide an API key. You need to provide your API key in the "
                                   "Authorization header, using Bearer auth.")
        if token not in self.api_keys:
            raise StripeError(401, f"Invalid API Key provided: {token[:8]}{'*' * 12}{token[-4:]}",
                              code="api_key_expired" if "expired" in token else None)
        return token

    @staticmethod
    def _error(exc: StripeError) -> Response:
        headers = {"Stripe-Should-Retry": "false"} if exc.status in (400, 401, 404) else {}
        headers.update(exc.headers)
        return JSONResponse(exc.body(), exc.status, headers=headers)

    def _route(self, method: str, path: str, params: Obj, routes: list[Any]) -> tuple[int, Obj]:
        for verb, pattern, handler, template in routes:
            match = pattern.fullmatch(path)
            if match and verb == method:
                unknown = sorted(set(params) - ALLOWED_PARAMS[(method, template)])
                if unknown:
                    raise StripeError(400, f"Received unknown parameter: {unknown[0]}", code="parameter_unknown",
                                      param=unknown[0])
                return 200, handler(params, **match.groupdict())
        raise StripeError(404, f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs.")

    # ---- list machinery --------------------------------------------------------------------------
    def _page(self, objects: list[Obj], params: Obj, url: str, *, created_filter: bool = True) -> Obj:
        if created_filter and "created" in params:
            objects = [o for o in objects if _matches_range(o["created"], params["created"], "created")]
        ordered = sorted(objects, key=lambda o: (o.get("created", o.get("_created", 0)), o["id"]), reverse=True)
        try:
            limit = int(params.get("limit", 10))
        except ValueError:
            raise StripeError(400, "Invalid integer: limit", param="limit") from None
        if not 1 <= limit <= 100:
            raise StripeError(400, "This value must be between 1 and 100 (it currently is "
                                   f"{limit}).", param="limit")
        ids = [o["id"] for o in ordered]
        if params.get("starting_after"):
            if params["starting_after"] not in ids:
                raise StripeError(400, f"No such object: '{params['starting_after']}'", code="resource_missing",
                                  param="starting_after")
            start = ids.index(params["starting_after"]) + 1
            window = ordered[start:start + limit]
            has_more = start + limit < len(ordered)
        elif params.get("ending_before"):
            if params["ending_before"] not in ids:
                raise StripeError(400, f"No such object: '{params['ending_before']}'", code="resource_missing",
                                  param="ending_before")
            end = ids.index(params["ending_before"])
            window = ordered[max(0, end - limit):end]
            has_more = end - limit > 0
        else:
            window, has_more = ordered[:limit], len(ordered) > limit
        expand = _expand_list(params)
        data = [self._render(o, [e.removeprefix("data.") for e in expand if e.startswith("data.")])
                for o in window]
        bad = [e for e in expand if not e.startswith("data.")]
        if bad:
            raise StripeError(400, f"This property cannot be expanded ({bad[0]}).", param="expand")
        return {"object": "list", "data": data, "has_more": has_more, "url": url}

    def _render(self, obj: Obj, expand: list[str]) -> Obj:
        out = json.loads(json.dumps({k: v for k, v in obj.items() if not k.startswith("_")}))
        if out.get("object") == "invoice" and len(out["lines"]["data"]) > 10:  # Stripe embeds the first 10
            out["lines"]["data"], out["lines"]["has_more"] = out["lines"]["data"][:10], True
        for path in expand:
            if path == "tiers" and obj.get("object") == "price":
                out["tiers"] = obj["_tiers"] or []
                continue
            head, _, rest = path.partition(".")
            value = out.get(head)
            target = self._lookup(value) if isinstance(value, str) else None
            if target is None:
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
            out[head] = self._render(target, [rest] if rest else [])
        return out

    def _lookup(self, ident: str) -> Obj | None:
        for store in (self.customers, self.products, self.prices, self.subscriptions, self.invoices,
                      self.invoiceitems):
            if ident in store:
                return store[ident]
        return None

    def _get(self, store: dict[str, Obj], ident: str, what: str, params: Obj) -> Obj:
        if ident not in store:
            raise StripeError(404, f"No such {what}: '{ident}'", code="resource_missing", param="id")
        return self._render(store[ident], _expand_list(params))

    # ---- handlers --------------------------------------------------------------------------------
    def _list_customers(self, params: Obj) -> Obj:
        customers = list(self.customers.values())
        if params.get("email"):
            customers = [c for c in customers if c["email"] == params["email"]]
        return self._page(customers, params, "/v1/customers")

    def _create_customer(self, params: Obj) -> Obj:
        customer = self.add_customer(name=params.get("name"), email=params.get("email"),
                                     metadata=params.get("metadata") or {})
        return self._render(customer, [])

    def _retrieve_customer(self, params: Obj, id: str) -> Obj:
        return self._get(self.customers, id, "customer", params)

    def _list_products(self, params: Obj) -> Obj:
        products = list(self.products.values())
        if "active" in params:
            products = [p for p in products if p["active"] == (params["active"] == "true")]
        return self._page(products, params, "/v1/products")

    def _retrieve_product(self, params: Obj, id: str) -> Obj:
        return self._get(self.products, id, "product", params)

    def _list_prices(self, params: Obj) -> Obj:
        prices = list(self.prices.values())
        if "active" in params:
            prices = [p for p in prices if p["active"] == (params["active"] == "true")]
        if params.get("product"):
            prices = [p for p in prices if p["product"] == params["product"]]
        return self._page(prices, params, "/v1/prices")

    def _retrieve_price(self, params: Obj, id: str) -> Obj:
        return self._get(self.prices, id, "price", params)

    def _list_subscriptions(self, params: Obj) -> Obj:
        status = params.get("status")
        subs = list(self.subscriptions.values())
        if status != "all":
            subs = [s for s in subs if s["status"] == status] if status else \
                [s for s in subs if s["status"] != "canceled"]
        if params.get("customer"):
            subs = [s for s in subs if s["customer"] == params["customer"]]
        return self._page(subs, params, "/v1/subscriptions")

    def _retrieve_subscription(self, params: Obj, id: str) -> Obj:
        return self._get(self.subscriptions, id, "subscription", params)

    def _list_invoices(self, params: Obj) -> Obj:
        invoices = list(self.invoices.values())
        if params.get("customer"):
            invoices = [i for i in invoices if i["customer"] == params["customer"]]
        if params.get("status"):
            invoices = [i for i in invoices if i["status"] == params["status"]]
        return self._page(invoices, params, "/v1/invoices")

    def _retrieve_invoice(self, params: Obj, id: str) -> Obj:
        return self._get(self.invoices, id, "invoice", params)

    def _list_invoice_lines(self, params: Obj, id: str) -> Obj:
        if id not in self.invoices:
            raise StripeError(404, f"No such invoice: '{id}'", code="resource_missing", param="invoice")
        lines = [dict(line, _created=n) for n, line in enumerate(reversed(self.invoices[id]["lines"]["data"]))]
        return self._page(lines, params, f"/v1/invoices/{id}/lines", created_filter=False)

    def _create_invoice(self, params: Obj) -> Obj:
        customer = params.get("customer")
        if not customer:
            raise StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        if customer not in self.customers:
            raise StripeError(400, f"No such customer: '{customer}'", code="resource_missing", param="customer")
        collection = params.get("collection_method", "charge_automatically")
        if collection == "send_invoice" and "days_until_due" not in params and "due_date" not in params:
            raise StripeError(400, "Invoices with `collection_method=send_invoice` must have a `days_until_due` or "
                                   "`due_date`.", param="days_until_due")
        currency = (params.get("currency") or self.customers[customer].get("currency") or "usd").lower()
        iid = self.new_id("in")
        now = self.now()
        invoice = self._invoice_shell(iid, customer, currency, now, "draft", None, "manual")
        invoice["auto_advance"] = params.get("auto_advance", "true") == "true"
        invoice["collection_method"] = collection
        invoice["description"] = params.get("description")
        invoice["metadata"] = dict(params.get("metadata") or {})
        if "days_until_due" in params:
            invoice["due_date"] = now + int(params["days_until_due"]) * DAY
        if params.get("pending_invoice_items_behavior", "exclude") == "include":
            for item in self.invoiceitems.values():
                if item["customer"] == customer and item["invoice"] is None and item["currency"] == currency:
                    self._attach(invoice, item)
        self.invoices[iid] = invoice
        return self._render(invoice, _expand_list(params))

    def _delete_invoice(self, params: Obj, id: str) -> Obj:
        invoice = self.invoices.get(id)
        if invoice is None:
            raise StripeError(404, f"No such invoice: '{id}'", code="resource_missing", param="id")
        if invoice["status"] != "draft":
            raise StripeError(400, "You can only delete draft invoices.", code="invoice_not_editable")
        del self.invoices[id]
        for item in [i for i in self.invoiceitems.values() if i["invoice"] == id]:
            del self.invoiceitems[item["id"]]
        return {"deleted": True, "id": id, "object": "invoice"}

    def _attach(self, invoice: Obj, item: Obj) -> None:
        item["invoice"] = invoice["id"]
        price = self.prices.get(item["pricing"]["price_details"]["price"]) if item["pricing"] else None
        invoice["lines"]["data"].append(self._line(
            invoice["id"], amount=item["amount"], currency=item["currency"], description=item["description"],
            period=item["period"], quantity=Decimal(item["quantity_decimal"]), price=price, subscription=None,
            subscription_item=None, invoice_item=item["id"]))
        invoice["lines"]["data"][-1]["metadata"] = dict(item["metadata"])
        self._total(invoice)

    def _create_invoiceitem(self, params: Obj) -> Obj:
        customer = params.get("customer")
        if not customer:
            raise StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        if customer not in self.customers:
            raise StripeError(400, f"No such customer: '{customer}'", code="resource_missing", param="customer")
        invoice = None
        if params.get("invoice"):
            invoice = self.invoices.get(params["invoice"])
            if invoice is None:
                raise StripeError(400, f"No such invoice: '{params['invoice']}'", code="resource_missing",
                                  param="invoice")
            if invoice["status"] != "draft":
                raise StripeError(400, "You can only add invoice items to draft invoices.",
                                  code="invoice_not_editable", param="invoice")
        price_id = (params.get("pricing") or {}).get("price")
        price = None
        if price_id:
            price = self.prices.get(price_id)
            if price is None:
                raise StripeError(400, f"No such price: '{price_id}'", code="resource_missing", param="pricing[price]")
            if not price["active"]:
                raise StripeError(400, f"The price specified ({price_id}) is inactive. This field only accepts "
                                       "active prices.", param="pricing[price]")
        currency = (params.get("currency") or (price or {}).get("currency") or "").lower()
        if not currency:
            raise StripeError(400, "Missing required param: currency.", code="parameter_missing", param="currency")
        if invoice is not None and invoice["currency"] != currency:
            raise StripeError(400, "The currency of an invoice item must match its invoice's currency.",
                              param="currency")
        if "amount" not in params:
            raise StripeError(400, "Missing required param: amount.", code="parameter_missing", param="amount")
        try:
            amount = int(params["amount"])
        except ValueError:
            raise StripeError(400, "Invalid integer: amount", param="amount") from None
        quantity = Decimal(str(params.get("quantity", 1)))
        now = self.now()
        period = params.get("period") or {"start": now, "end": now}
        item = {
            "amount": amount, "currency": currency, "customer": customer, "customer_account": None, "date": now,
            "description": params.get("description"), "discountable": True, "discounts": [],
            "id": self.new_id("ii"), "invoice": None, "livemode": False, "metadata": dict(params.get("metadata") or {}),
            "net_amount": amount, "object": "invoiceitem", "parent": None,
            "period": {"end": int(period["end"]), "start": int(period["start"])},
            "pricing": {"price_details": {"price": price["id"], "product": price["product"]},
                        "type": "price_details", "unit_amount_decimal": price["unit_amount_decimal"]}
            if price else None,
            "proration": False, "quantity": _int_or_none(quantity), "quantity_decimal": _decimal_text(quantity),
            "tax_rates": [], "test_clock": None, "_created": now,
        }
        self.invoiceitems[item["id"]] = item
        if invoice is not None:
            self._attach(invoice, item)
        return self._render(item, _expand_list(params))

    def _list_invoiceitems(self, params: Obj) -> Obj:
        items = list(self.invoiceitems.values())
        if params.get("invoice"):
            items = [i for i in items if i["invoice"] == params["invoice"]]
        if params.get("customer"):
            items = [i for i in items if i["customer"] == params["customer"]]
        if "created" in params:
            items = [i for i in items if _matches_range(i["_created"], params["created"], "created")]
        return self._page(items, params, "/v1/invoiceitems", created_filter=False)

    def _list_usage_record_summaries(self, params: Obj, id: str) -> Obj:
        """One summary per billing period of the item: the periods its invoices billed, then the current one."""
        item = next((i for sub in self.subscriptions.values() for i in sub["items"]["data"] if i["id"] == id), None)
        if item is None:
            raise StripeError(404, f"No such subscription item: '{id}'", code="resource_missing",
                              param="subscription_item")
        periods: dict[tuple[int, int], str | None] = {}
        for invoice in self.invoices.values():
            for line in invoice["lines"]["data"]:
                details = (line.get("parent") or {}).get("subscription_item_details") or {}
                if details.get("subscription_item") == id:
                    periods[(line["period"]["start"], line["period"]["end"])] = invoice["id"]
        periods.setdefault((item["current_period_start"], item["current_period_end"]), None)
        records = self.usage_records.get(id, [])
        summaries = [{"id": f"sis_{id}_{start}", "invoice": invoice, "livemode": False,
                      "object": "usage_record_summary", "period": {"end": end, "start": start},
                      "subscription_item": id, "total_usage": sum(q for ts, q in records if start <= ts < end),
                      "_created": start}
                     for (start, end), invoice in periods.items()]
        return self._page(summaries, params, f"/v1/subscription_items/{id}/usage_record_summaries",
                          created_filter=False)

    def _list_meters(self, params: Obj) -> Obj:
        meters = list(self.meters.values())
        if params.get("status"):
            meters = [m for m in meters if m["status"] == params["status"]]
        return self._page(meters, params, "/v1/billing/meters", created_filter=False)

    def _list_summaries(self, params: Obj, id: str) -> Obj:
        if id not in self.meters:
            raise StripeError(404, f"No such billing meter: '{id}'", code="resource_missing", param="id")
        for name in ("customer", "start_time", "end_time"):
            if not params.get(name):
                raise StripeError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)
        try:
            start, end = int(params["start_time"]), int(params["end_time"])
        except ValueError:
            raise StripeError(400, "Invalid integer: start_time/end_time", param="start_time") from None
        window = params.get("value_grouping_window")
        if window not in (None, "day"):
            raise StripeError(400, "Invalid value_grouping_window: must be one of day or hour (fake: day only).",
                              param="value_grouping_window")
        if window == "day" and (start % DAY or end % DAY):
            raise StripeError(400, "start_time and end_time must be aligned to the value_grouping_window (UTC day).",
                              param="start_time")
        formula = self.meters[id]["default_aggregation"]["formula"]
        days = self.meter_days.get((id, params["customer"]), {})

        def value(day: _MeterDay) -> Any:
            raw = {"sum": day.total, "count": Decimal(day.count), "last": day.last}[formula]
            return int(raw) if raw == raw.to_integral_value() else float(raw)

        summaries = []
        if window == "day":
            for day_start in sorted(d for d in days if start <= d < end):
                summaries.append({"aggregated_value": value(days[day_start]), "end_time": day_start + DAY,
                                  "id": f"mtrusg_{id}_{params['customer']}_{day_start}", "livemode": False,
                                  "meter": id, "object": "billing.meter_event_summary", "start_time": day_start,
                                  "_created": day_start})
        else:
            inside = [days[d] for d in days if start <= d < end]
            if inside:
                merged = _MeterDay(sum((d.total for d in inside), Decimal(0)), sum(d.count for d in inside))
                last = max(inside, key=lambda d: d.last_ts)
                merged.last_ts, merged.last = last.last_ts, last.last
                summaries.append({"aggregated_value": value(merged), "end_time": end,
                                  "id": f"mtrusg_{id}_{params['customer']}_{start}", "livemode": False, "meter": id,
                                  "object": "billing.meter_event_summary", "start_time": start, "_created": start})
        return self._page(summaries, params, f"/v1/billing/meters/{id}/event_summaries", created_filter=False)


def _expand_list(params: Obj) -> list[str]:
    expand = params.get("expand") or []
    return [expand] if isinstance(expand, str) else list(expand)


def _matches_range(value: int, condition: Any, name: str) -> bool:
    try:
        if isinstance(condition, dict):
            checks = {"gt": value.__gt__, "gte": value.__ge__, "lt": value.__lt__, "lte": value.__le__}
            unknown = [k for k in condition if k not in checks]
            if unknown:
                raise StripeError(400, f"Received unknown parameter: {name}[{unknown[0]}]", param=name)
            return all(checks[k](int(v)) for k, v in condition.items())
        return value == int(condition)
    except ValueError:
        raise StripeError(400, f"Invalid integer: {name}", param=name) from None


async def _run_in_thread(fn: Any, *args: Any) -> Any:
    """Handlers block (lock, injected delays): keep uvicorn's event loop free for other clients."""
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))



class _DropProxy:
    """A TCP relay in front of the fake that can cut a client off after the fake answered.

    That is the nastiest network failure for an exactly-once action: the server did the work, the
    client saw only a dropped connection. The fake marks such answers with DROP_HEADER; the relay
    swallows them and closes the client's socket without sending a byte.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"fake-stripe-proxy-{self.port}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    @staticmethod
    def _read_request(stream: Any) -> bytes | None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            chunk = stream.readline()
            if not chunk:
                return None
            head += chunk
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = stream.read(length) if length else b""
        lines = [line for line in head.split(b"\r\n")[:-2] if not line.lower().startswith(b"connection:")]
        return b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body

    def _relay(self, client: socket.socket) -> None:
        with client, client.makefile("rb") as stream:
            while True:
                request = self._read_request(stream)
                if request is None:
                    return
                with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                    upstream.sendall(request)
                    response = b""
                    while chunk := upstream.recv(65536):
                        response += chunk
                head = response.split(b"\r\n\r\n", 1)[0].lower()
                if DROP_HEADER.lower().encode() + b":" in head:
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(response)
                if b"connection: close" in head:
                    return

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@contextlib.contextmanager
def serve(fake: FakeStripe, *, drop_proxy: bool = False) -> Iterator[str]:
    """Run the fake with uvicorn in a thread on a free port; yield its base URL.

    With `drop_proxy`, the URL is a relay's that can drop connections (see `FakeStripe.drop_next`).
    """
    with serve_app(fake.app, "fake Stripe", access_log=False, limit_concurrency=200) as port:
        proxy = _DropProxy(port) if drop_proxy else None
        try:
            yield f"http://127.0.0.1:{proxy.port if proxy else port}"
        finally:
            if proxy:
                proxy.close()


def at(text: str) -> int:
    """Epoch seconds of an ISO timestamp (tests state dates readably)."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp())


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.fakes.stripe_server --bundle data/demo-bundle --port 12111`: a Stripe for the demo."""
    import argparse

    from core.bundle import load_bundle

    parser = argparse.ArgumentParser(description="Serve a fake Stripe API seeded from a bundle folder.")
    parser.add_argument("--bundle", help="bundle folder to seed customers, catalog, subscriptions and invoices from")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    args = parser.parse_args(argv)
    fake = FakeStripe(api_keys=(args.api_key,))
    if args.bundle:
        fake.seed_from_bundle(load_bundle(args.bundle))
    print(f"fake Stripe on http://127.0.0.1:{args.port} (api key {args.api_key})", flush=True)
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
