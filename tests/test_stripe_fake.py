"""The fake Stripe must not drift from the real one: shapes, lists, errors, idempotency, faults.

Every object the fake serves is held to three references: the 2026 fixtures (every fixture field
present, nothing beyond the fixture and the SDK v16 resource class, same JSON types), and Stripe's
published OpenAPI schemas (each field the spec knows validates against its schema; the spec is
from API 2020-08-27, so only the `required` lists — fields Stripe removed since — are relaxed).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from jsonschema import Draft7Validator

from core.bundle import load_bundle
from core.demo import generate_demo_bundle
from tests.fakes.stripe_server import (
    ADDED_SINCE_SPEC,
    ALLOWED_PARAMS,
    DEFAULT_KEY,
    NEWER_THAN_SPEC,
    FakeStripe,
    parse_form,
    serve,
)

REFERENCE = Path("/work/shared/stripe")
FIXTURES = json.loads((REFERENCE / "fixtures3.json").read_text())["resources"]
SDK_CLASSES = {
    "customer": stripe.Customer, "product": stripe.Product, "price": stripe.Price,
    "subscription": stripe.Subscription, "subscription_item": stripe.SubscriptionItem, "invoice": stripe.Invoice,
    "line_item": stripe.InvoiceLineItem, "invoiceitem": stripe.InvoiceItem, "billing.meter": stripe.billing.Meter,
    "billing.meter_event_summary": stripe.billing.MeterEventSummary,
}
SPEC_SCHEMAS = {"customer": "customer", "product": "product", "price": "price", "subscription": "subscription",
                "subscription_item": "subscription_item", "invoice": "invoice", "line_item": "line_item",
                "invoiceitem": "invoiceitem"}
# Fields whose meaning Stripe changed after the 2020-08-27 spec (the fixtures and SDK v16 are newer):
# validated against the fixtures only.
CHANGED_SINCE_SPEC = {
    "subscription": {"items"},  # items embed the 2026 subscription_item (checked on its own below)
    "invoice": {"lines"},  # lines embed the 2026 line_item (checked on its own below)
    "line_item": {"subscription"},
}


def _relax(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: `nullable` becomes "or null"; `required` lists are dropped."""
    if isinstance(node, list):
        return [_relax(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _relax(v) for k, v in node.items() if k not in ("required", "nullable")}
    if node.get("nullable"):
        return {"anyOf": [{"type": "null"}, out]}
    return out


@pytest.fixture(scope="module")
def spec_components() -> dict[str, Any]:
    spec = json.loads((REFERENCE / "spec3.2022-03-29.json").read_text())
    return _relax(spec["components"])


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", dict: "object", list: "array", type(None): "null"}[type(value)]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _annotated(cls: Any) -> set[str]:
    names: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):
        names |= set(getattr(klass, "__annotations__", {}))
    return names - {"OBJECT_NAME"}


def assert_like_fixture(obj: dict[str, Any], fixture: dict[str, Any], sdk_class: Any, where: str) -> None:
    """Every fixture field present; no field unknown to both the fixture and the SDK; same JSON types."""
    allowed = set(fixture) | _annotated(sdk_class)
    assert not set(fixture) - set(obj), f"{where}: missing fields {sorted(set(fixture) - set(obj))}"
    assert not set(obj) - allowed, f"{where}: invented fields {sorted(set(obj) - allowed)}"
    for key, value in obj.items():
        expected = fixture.get(key)
        if value is None or expected is None:
            continue
        if key in ("items", "lines", "tiers", "metadata"):
            continue  # embedded resources are checked on their own; metadata is free-form
        assert _json_type(value) == _json_type(expected), f"{where}.{key}: {value!r} is not like {expected!r}"
        if isinstance(value, dict) and isinstance(expected, dict) and value.get("object") is None:
            assert_like_fixture(value, expected, getattr(sdk_class, _camel(key), None), f"{where}.{key}")


def assert_matches_spec(obj: dict[str, Any], schema_name: str, components: dict[str, Any], where: str) -> None:
    schema = components["schemas"][schema_name]
    skip = CHANGED_SINCE_SPEC.get(schema_name, set())
    known = {k: v for k, v in obj.items() if k in schema.get("properties", {}) and k not in skip}
    validator = Draft7Validator({"$ref": f"#/components/schemas/{schema_name}", "components": components})
    errors = sorted(validator.iter_errors(known), key=lambda e: list(e.path))
    assert not errors, f"{where}: " + "; ".join(f"{list(e.path)}: {e.message[:160]}" for e in errors[:5])


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeStripe, str]]:
    folder = tmp_path_factory.mktemp("demo")
    generate_demo_bundle(folder, accounts=12, as_of=date(2026, 6, 1))
    fake = FakeStripe()
    fake.seed_from_bundle(load_bundle(folder))
    with serve(fake) as url:
        yield fake, url


def _get(url: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {DEFAULT_KEY}"})


def test_every_served_object_matches_the_fixtures_and_the_spec(seeded: tuple[FakeStripe, str],
                                                               spec_components: dict[str, Any]) -> None:
    fake, url = seeded
    client = stripe.StripeClient(DEFAULT_KEY, base_addresses={"api": url})
    customer = next(iter(fake.customers))
    draft = client.v1.invoices.create(params={"customer": customer, "currency": "usd", "auto_advance": False,
                                              "collection_method": "send_invoice", "days_until_due": 30})
    client.v1.invoice_items.create(params={"customer": customer, "invoice": draft.id, "currency": "usd",
                                           "amount": 1250, "description": "x", "pricing": {"price": "price_api_usd"}})
    seen: dict[str, list[dict[str, Any]]] = {}

    def collect(obj: dict[str, Any]) -> None:
        seen.setdefault(obj["object"], []).append(obj)
        for item in (obj.get("items") or {}).get("data", []) if obj["object"] == "subscription" else []:
            seen.setdefault("subscription_item", []).append(item)
        for line in (obj.get("lines") or {}).get("data", []) if obj["object"] == "invoice" else []:
            seen.setdefault("line_item", []).append(line)

    meter = next(iter(fake.meters))
    for path, params in (("/v1/customers", {}), ("/v1/products", {}), ("/v1/prices", {"expand[]": "data.tiers"}),
                         ("/v1/subscriptions", {"status": "all"}), ("/v1/invoices", {}), ("/v1/invoiceitems", {}),
                         ("/v1/billing/meters", {}),
                         (f"/v1/billing/meters/{meter}/event_summaries",
                          {"customer": customer, "start_time": 0, "end_time": 86400 * 30000,
                           "value_grouping_window": "day"})):
        response = _get(url, path, limit=100, **params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"object", "data", "has_more", "url"} and page["object"] == "list"
        assert page["url"] == path and page["data"], path
        for obj in page["data"]:
            collect(obj)
    assert set(seen) == set(SDK_CLASSES), sorted(seen)
    for kind, objects in seen.items():
        for obj in objects:
            fixture = FIXTURES[kind]
            if kind == "price" and obj.get("tiers"):
                for tier in obj["tiers"]:
                    assert_matches_spec_tier(tier, spec_components)
            assert_like_fixture(obj, fixture, SDK_CLASSES[kind], f"{kind} {obj['id']}")
            if kind in SPEC_SCHEMAS:
                assert_matches_spec(obj, SPEC_SCHEMAS[kind], spec_components, f"{kind} {obj['id']}")


def assert_matches_spec_tier(tier: dict[str, Any], components: dict[str, Any]) -> None:
    assert set(tier) == set(components["schemas"]["price_tier"]["properties"])
    validator = Draft7Validator({"$ref": "#/components/schemas/price_tier", "components": components})
    assert not list(validator.iter_errors(tier))


def test_errors_use_stripes_envelope(seeded: tuple[FakeStripe, str], spec_components: dict[str, Any]) -> None:
    _, url = seeded
    validator = Draft7Validator({"$ref": "#/components/schemas/error", "components": spec_components})
    unauthorized = httpx.get(url + "/v1/customers", headers={"Authorization": "Bearer sk_test_wrong_000000"})
    missing = _get(url, "/v1/customers/cus_missing")
    bad_limit = _get(url, "/v1/customers", limit=1000)
    unknown = _get(url, "/v1/nothing_here")
    for response, status in ((unauthorized, 401), (missing, 404), (bad_limit, 400), (unknown, 404)):
        assert response.status_code == status
        body = response.json()
        assert set(body) == {"error"} and not list(validator.iter_errors(body)), body
        assert set(body["error"]) <= set(FIXTURES.get("error", {}).get("error", {})) | {
            "type", "message", "code", "param", "doc_url"}
    assert "sk_test_wrong_000000" not in unauthorized.text
    assert missing.json()["error"]["code"] == "resource_missing"
    assert bad_limit.json()["error"]["param"] == "limit"


def test_pagination_created_filters_and_expansion(seeded: tuple[FakeStripe, str]) -> None:
    fake, url = seeded
    everyone = [c["id"] for c in _get(url, "/v1/customers", limit=100).json()["data"]]
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 5} | ({"starting_after": after} if after else {})
        page = _get(url, "/v1/customers", **params).json()
        pages.append([c["id"] for c in page["data"]])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [cid for page in pages for cid in page] == everyone and len(pages) == 3
    newest = fake.add_customer(name="Newest", created=fake.now() + 100)
    later = _get(url, "/v1/customers", **{"created[gt]": fake.now() + 50}).json()["data"]
    assert [c["id"] for c in later] == [newest["id"]]
    del fake.customers[newest["id"]]
    plain = _get(url, "/v1/prices/price_seats_usd").json()
    expanded = _get(url, "/v1/prices/price_seats_usd", **{"expand[]": "tiers"}).json()
    assert "tiers" not in plain and len(expanded["tiers"]) == 3 and expanded["tiers"][0]["flat_amount"] == 4900
    with_product = _get(url, "/v1/prices/price_seats_usd", **{"expand[]": "product"}).json()
    assert with_product["product"]["object"] == "product"
    assert _get(url, "/v1/prices/price_seats_usd", **{"expand[]": "nickname"}).status_code == 400


def test_idempotency_key_replays_and_refuses_other_parameters(seeded: tuple[FakeStripe, str]) -> None:
    fake, url = seeded
    client = stripe.StripeClient(DEFAULT_KEY, base_addresses={"api": url})
    customer = next(iter(fake.customers))
    params = {"customer": customer, "currency": "usd", "auto_advance": False,
              "collection_method": "send_invoice", "days_until_due": 14}
    before = len(fake.invoices)
    first = client.v1.invoices.create(params=params, options={"idempotency_key": "idem-test-1"})
    again = client.v1.invoices.create(params=params, options={"idempotency_key": "idem-test-1"})
    assert first.id == again.id and len(fake.invoices) == before + 1
    raw = httpx.post(url + "/v1/invoices", data={k: str(v).lower() if isinstance(v, bool) else str(v)
                                                 for k, v in params.items()},
                     headers={"Authorization": f"Bearer {DEFAULT_KEY}", "Idempotency-Key": "idem-test-1"})
    assert raw.headers["Idempotent-Replayed"] == "true" and raw.json()["id"] == first.id
    with pytest.raises(stripe.IdempotencyError, match="same parameters"):
        client.v1.invoices.create(params={**params, "days_until_due": 15}, options={"idempotency_key": "idem-test-1"})
    assert len(fake.invoices) == before + 1


def test_fault_injection_rate_limit_server_error_and_slow_answer(seeded: tuple[FakeStripe, str]) -> None:
    fake, url = seeded
    fake.fail_next(2, 429, path_contains="/v1/products")
    assert _get(url, "/v1/products").status_code == 429
    limited = _get(url, "/v1/products")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "0"
    assert limited.json()["error"]["code"] == "rate_limit"
    assert _get(url, "/v1/products").status_code == 200
    customer = next(iter(fake.customers))
    fake.fail_next(1, 500, after_processing=True, path_contains="/v1/invoiceitems", method="POST")
    before = len(fake.invoiceitems)
    lost = httpx.post(url + "/v1/invoiceitems", data={"customer": customer, "currency": "usd", "amount": "100"},
                      headers={"Authorization": f"Bearer {DEFAULT_KEY}", "Idempotency-Key": "lost-answer"})
    assert lost.status_code == 500 and len(fake.invoiceitems) == before + 1  # done, but the client never knew
    retry = httpx.post(url + "/v1/invoiceitems", data={"customer": customer, "currency": "usd", "amount": "100"},
                       headers={"Authorization": f"Bearer {DEFAULT_KEY}", "Idempotency-Key": "lost-answer"})
    assert retry.status_code == 200 and len(fake.invoiceitems) == before + 1
    fake.delay_next(1, 1.0, path_contains="/v1/customers")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url + "/v1/customers", headers={"Authorization": f"Bearer {DEFAULT_KEY}"}, timeout=0.3)


def test_restricted_key_gets_403_outside_its_permissions(seeded: tuple[FakeStripe, str]) -> None:
    fake, url = seeded
    fake.add_restricted_key("rk_test_customers_only_0001", "/v1/customers")
    headers = {"Authorization": "Bearer rk_test_customers_only_0001"}
    assert httpx.get(url + "/v1/customers", headers=headers).status_code == 200
    denied = httpx.get(url + "/v1/invoices", headers=headers)
    assert denied.status_code == 403 and "permissions" in denied.json()["error"]["message"]


def test_form_decoding_follows_stripes_bracket_encoding() -> None:
    parsed = parse_form([("customer", "cus_1"), ("metadata[a]", "1"), ("expand[0]", "data.tiers"),
                         ("expand[1]", "data.product"), ("created[gt]", "5"), ("period[start]", "1"),
                         ("tiers[0][up_to]", "10"), ("tiers[1][up_to]", "inf"), ("ids[]", "x"), ("ids[]", "y")])
    assert parsed == {"customer": "cus_1", "metadata": {"a": "1"}, "expand": ["data.tiers", "data.product"],
                      "created": {"gt": "5"}, "period": {"start": "1"},
                      "tiers": [{"up_to": "10"}, {"up_to": "inf"}], "ids": ["x", "y"]}


def test_seeded_fake_is_independent_per_instance() -> None:
    first, second = FakeStripe(), FakeStripe()
    first.add_customer("cus_only_here", name="A")
    assert "cus_only_here" not in second.customers
    assert copy.deepcopy(first.customers["cus_only_here"])["object"] == "customer"


def test_legacy_usage_record_summaries_match_the_spec(spec_components: dict[str, Any]) -> None:
    fake = FakeStripe()
    fake.add_customer("cus_1", name="One")
    fake.add_product("prod_1", name="API")
    fake.add_price("price_1", product="prod_1", currency="usd", unit_amount_decimal="10", usage_type="metered")
    fake.add_subscription("sub_1", customer="cus_1", items=[
        {"id": "si_1", "price": "price_1", "current_period_start": 0, "current_period_end": 86_400}])
    fake.add_usage_record("si_1", 10, 5)
    fake.add_usage_record("si_1", 86_400, 7)  # next period: not in this one
    with serve(fake) as url:
        page = _get(url, "/v1/subscription_items/si_1/usage_record_summaries").json()
        assert _get(url, "/v1/subscription_items/si_nope/usage_record_summaries").status_code == 404
    (summary,) = page["data"]
    schema = spec_components["schemas"]["usage_record_summary"]
    assert set(summary) == set(schema["properties"]) and summary["total_usage"] == 5
    validator = Draft7Validator({"$ref": "#/components/schemas/usage_record_summary", "components": spec_components})
    assert not list(validator.iter_errors(summary))


def test_request_parameters_are_the_specs_and_unknown_ones_are_refused(seeded: tuple[FakeStripe, str]) -> None:
    spec = json.loads((REFERENCE / "spec3.2022-03-29.json").read_text())
    for (method, template), allowed in ALLOWED_PARAMS.items():
        if (method, template) in NEWER_THAN_SPEC:
            continue
        operation = spec["paths"][template][method.lower()]
        known = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        form = operation.get("requestBody", {}).get("content", {}).get("application/x-www-form-urlencoded", {})
        known |= set(form.get("schema", {}).get("properties", {}))
        extra = allowed - known - ADDED_SINCE_SPEC.get((method, template), set())
        assert not extra, f"{method} {template}: {sorted(extra)} are not Stripe parameters"
    fake, url = seeded
    refused = _get(url, "/v1/customers", limit=3, colour="blue")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "colour"
    client = stripe.StripeClient(DEFAULT_KEY, base_addresses={"api": url})
    with pytest.raises(stripe.InvalidRequestError, match="unknown parameter: price"):  # pricing[price] since 2025
        client.v1.invoice_items.create(params={"customer": next(iter(fake.customers)), "currency": "usd",
                                               "amount": 100, "price": "price_api_usd"})  # type: ignore[typeddict-unknown-key]
