"""connectors/stripe.py through the real `stripe` SDK against the local fake Stripe (tests/fakes)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal as D
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors import stripe as sc
from core.bundle import load_bundle
from core.demo import generate_demo_bundle
from core.pricing import Price, Tier
from core.reconcile import ReconcileParams, reconcile
from tests.fakes.redirect_target import SECRET, redirect_target
from tests.fakes.serving import free_port
from tests.fakes.stripe_server import DEFAULT_KEY, FakeStripe, at, serve

JAN, FEB, MAR = at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z")


@pytest.fixture
def fake() -> Iterator[tuple[FakeStripe, dict]]:
    stripe_fake = FakeStripe()
    with serve(stripe_fake) as url:
        yield stripe_fake, {"api_key": DEFAULT_KEY, "api_base": url, "usage_start": "2026-01-01"}


def write_bundle(billing: sc.StripeBilling, source: Path, out: Path) -> Path:
    """The billing side from Stripe + the usage and contracts of the original bundle."""
    out.mkdir(parents=True)

    def write(name: str, header: list[str], rows: list[list[str]]) -> None:
        with (out / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    write("accounts.csv", ["account_id", "name", "stripe_customer_id", "crm_id"],
          [[a.account_id, a.name, a.stripe_customer_id or "", a.crm_id or ""] for a in billing.accounts])
    write("products.csv", ["product_key", "name", "aggregation", "unit", "default_price_id"],
          [[p.product_key, p.name, p.aggregation, p.unit, p.default_price_id or ""] for p in billing.products])
    write("prices.csv", ["price_id", "product_key", "currency", "model", "unit_amount", "package_size", "tiers"],
          [[p.price_id, p.product_key, p.currency, p.model, "" if p.unit_amount is None else str(p.unit_amount),
            str(p.package_size or ""),
            json.dumps([{"up_to": None if t.up_to is None else int(t.up_to), "unit_amount": str(t.unit_amount),
                         "flat_amount": str(t.flat_amount)} for t in p.tiers]) if p.tiers else ""]
           for p in billing.prices])
    write("subscriptions.csv", ["subscription_id", "account_id", "product_key", "price_id", "status", "period_start",
                                "period_end"],
          [[s.subscription_id, s.account_id, s.product_key, s.price_id, s.status, s.period_start.isoformat(),
            s.period_end.isoformat()] for s in billing.subscriptions])
    write("invoice_lines.csv", ["invoice_id", "account_id", "product_key", "period_start", "period_end", "quantity",
                                "amount", "currency"],
          [[line.invoice_id, line.account_id, line.product_key, line.period_start.isoformat(),
            line.period_end.isoformat(), str(line.quantity), str(line.amount), line.currency]
           for line in billing.invoice_lines])
    shutil.copy(source / "contracts.csv", out / "contracts.csv")
    for name in ("actual_usage.csv", "actual_usage.parquet"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    pq.write_table(billing.reported_usage, out / "reported_usage.parquet")
    return out


@pytest.mark.slow
def test_read_billing_reproduces_the_demo_bundle_so_reconciliation_finds_the_same_leaks(
        fake: tuple[FakeStripe, dict], tmp_path: Path) -> None:
    stripe_fake, config = fake
    generate_demo_bundle(tmp_path / "orig", accounts=40, as_of=date(2026, 6, 1))
    original = load_bundle(tmp_path / "orig")
    stripe_fake.seed_from_bundle(original)
    billing = sc.read_billing({**config, "usage_start": None})
    assert billing.warnings == []
    assert {a.account_id: (a.stripe_customer_id, a.crm_id) for a in billing.accounts} == {
        a.account_id: (a.stripe_customer_id, a.crm_id) for a in original.accounts.values()}
    assert {p.price_id: p for p in billing.prices} == original.prices  # tiers, package, minor units, exponent
    assert {p.product_key: (p.aggregation, p.unit) for p in billing.products} == {
        k: (p.aggregation, p.unit) for k, p in original.products.items()}
    assert sorted(billing.subscriptions, key=repr) == sorted(original.subscriptions, key=repr)
    assert sorted(billing.invoice_lines, key=repr) == sorted(original.invoice_lines, key=repr)
    assert billing.reported_usage.schema == sc.BUCKET_SCHEMA
    assert billing.cursor == max(int(o["created"]) for store in (
        stripe_fake.customers, stripe_fake.products, stripe_fake.prices, stripe_fake.subscriptions,
        stripe_fake.invoices) for o in store.values())
    params = ReconcileParams(as_of=datetime(2026, 6, 1, tzinfo=UTC))
    rebuilt = load_bundle(write_bundle(billing, tmp_path / "orig", tmp_path / "from_stripe"))

    def key(a):  # type: ignore[no-untyped-def]
        return a.account_id, a.product_key, a.period_start, a.type, a.expected_amount, a.billed_amount, a.leak_amount

    expected = sorted(map(key, reconcile(original, params).anomalies))
    assert expected and sorted(map(key, reconcile(rebuilt, params).anomalies)) == expected


def test_prices_become_core_prices_with_each_currencys_exponent(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    stripe_fake.add_product("prod_api", name="API", metadata={"product_key": "api"}, created=JAN)
    stripe_fake.add_price("price_usd", product="prod_api", currency="usd", unit_amount_decimal="0.25", created=JAN)
    stripe_fake.add_price("price_jpy", product="prod_api", currency="jpy", unit_amount_decimal="35", created=JAN)
    stripe_fake.add_price("price_kwd", product="prod_api", currency="kwd", unit_amount_decimal="1500", created=JAN)
    stripe_fake.add_price("price_pkg", product="prod_api", currency="usd", unit_amount_decimal="500", created=JAN,
                          transform_quantity={"divide_by": 1000, "round": "up"})
    stripe_fake.add_price("price_grad", product="prod_api", currency="usd", billing_scheme="tiered",
                          tiers_mode="graduated", created=JAN,
                          tiers=[{"up_to": 10, "unit_amount_decimal": "1200", "flat_amount_decimal": "4900"},
                                 {"up_to": None, "unit_amount_decimal": "950.5"}])
    stripe_fake.add_price("price_vol", product="prod_api", currency="eur", billing_scheme="tiered",
                          tiers_mode="volume", created=JAN,
                          tiers=[{"up_to": 100, "unit_amount_decimal": "25"},
                                 {"up_to": None, "unit_amount_decimal": "15", "flat_amount_decimal": "1000"}])
    stripe_fake.add_price("price_down", product="prod_api", currency="usd", unit_amount_decimal="100", created=JAN,
                          transform_quantity={"divide_by": 10, "round": "down"})
    stripe_fake.add_price("price_custom", product="prod_api", currency="usd", created=JAN)
    billing = sc.read_billing(config)
    prices = {p.price_id: p for p in billing.prices}
    assert prices == {
        "price_usd": Price("price_usd", "api", "usd", "per_unit", D("0.0025")),
        "price_jpy": Price("price_jpy", "api", "jpy", "per_unit", D("35")),
        "price_kwd": Price("price_kwd", "api", "kwd", "per_unit", D("1.5")),
        "price_pkg": Price("price_pkg", "api", "usd", "package", D("5"), package_size=1000),
        "price_grad": Price("price_grad", "api", "usd", "graduated", tiers=(
            Tier(D(10), D("12"), D("49")), Tier(None, D("9.505"), D(0)))),
        "price_vol": Price("price_vol", "api", "eur", "volume", tiers=(
            Tier(D(100), D("0.25"), D(0)), Tier(None, D("0.15"), D("10"))))}
    assert any("price_down" in w and "round" in w for w in billing.warnings)
    assert any("price_custom" in w and "unit amount" in w for w in billing.warnings)
    assert [(p.product_key, p.name) for p in billing.products] == [("api", "API")]


def test_invoice_lines_count_only_billed_invoices_and_follow_long_line_lists(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    stripe_fake.add_customer("cus_jp", name="Nihon KK", metadata={"account_id": "nihon"}, created=JAN)
    stripe_fake.add_product("prod_api", name="API", metadata={"product_key": "api"}, created=JAN)
    stripe_fake.add_price("price_jpy", product="prod_api", currency="jpy", unit_amount_decimal="35", created=JAN)
    period = {"start": JAN, "end": FEB}
    many = [{"amount": 3500 + n, "quantity": 100, "price": "price_jpy", "period": period} for n in range(15)]
    stripe_fake.add_invoice("in_paid", customer="cus_jp", currency="jpy", lines=many, created=FEB)
    stripe_fake.add_invoice("in_open", customer="cus_jp", currency="jpy", status="open", created=FEB + 1,
                            lines=[{"amount": 700, "quantity": D("20.5"), "price": "price_jpy", "period": period}])
    for status in ("draft", "void"):
        stripe_fake.add_invoice(f"in_{status}", customer="cus_jp", currency="jpy", status=status, created=FEB + 2,
                                lines=[{"amount": 99999, "quantity": 1, "price": "price_jpy", "period": period}])
    billing = sc.read_billing(config)
    by_invoice: dict[str, list] = {}
    for line in billing.invoice_lines:
        by_invoice.setdefault(line.invoice_id, []).append(line)
    assert set(by_invoice) == {"in_paid", "in_open"}
    assert len(by_invoice["in_paid"]) == 15 and stripe_fake.count("GET", "/v1/invoices/in_paid/lines") == 1
    assert sum(line.amount for line in by_invoice["in_paid"]) == D(3500 * 15 + sum(range(15)))  # JPY: no decimals
    (open_line,) = by_invoice["in_open"]
    assert (open_line.account_id, open_line.product_key, open_line.quantity, open_line.amount, open_line.currency,
            open_line.period_start, open_line.period_end) == (
        "nihon", "api", D("20.5"), D(700), "jpy", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))


def _small_account(stripe_fake: FakeStripe) -> None:
    stripe_fake.add_customer("cus_a", name="A Corp", metadata={"account_id": "a"}, created=JAN)
    stripe_fake.add_product("prod_api", name="API", metadata={"product_key": "api"}, created=JAN)
    stripe_fake.add_meter("mtr_api", event_name="api", created=JAN)
    stripe_fake.add_price("price_api", product="prod_api", currency="usd", unit_amount_decimal="10", meter="mtr_api",
                          created=JAN)
    stripe_fake.add_subscription("sub_a", customer="cus_a", created=JAN, items=[
        {"id": "si_a", "price": "price_api", "current_period_start": FEB, "current_period_end": MAR}])
    stripe_fake.add_invoice("in_jan", customer="cus_a", currency="usd", subscription="sub_a", created=FEB,
                            lines=[{"amount": 1000, "quantity": 100, "price": "price_api", "subscription_item": "si_a",
                                    "period": {"start": JAN, "end": FEB}}])
    for day in range(3):
        stripe_fake.add_meter_event("mtr_api", "cus_a", JAN + day * 86_400 + 3600, 40)
        stripe_fake.add_meter_event("mtr_api", "cus_a", JAN + day * 86_400 + 7200, D("2.5"))


def test_subscription_periods_come_from_items_and_the_invoices_that_billed_them(
        fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _small_account(stripe_fake)
    billing = sc.read_billing(config)
    assert [(s.subscription_id, s.account_id, s.product_key, s.price_id, s.period_start.month, s.period_end.month)
            for s in billing.subscriptions] == [("sub_a", "a", "api", "price_api", 1, 2), ("sub_a", "a", "api",
                                                                                          "price_api", 2, 3)]
    usage = billing.reported_usage.sort_by("ts").to_pylist()
    assert [(row["account_id"], row["product_key"], row["ts"].day, row["units"]) for row in usage] == [
        ("a", "api", day, D("42.5")) for day in (1, 2, 3)]
    assert billing.reported_usage_start == datetime(2026, 1, 1, tzinfo=UTC)


def test_incremental_sync_fetches_only_objects_created_after_the_cursor(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _small_account(stripe_fake)
    first = sc.read_billing(config)
    assert first.cursor == FEB
    mark = len(stripe_fake.requests)
    stripe_fake.add_customer("cus_b", name="B Corp", metadata={"account_id": "b"}, created=MAR)
    stripe_fake.add_invoice("in_feb", customer="cus_a", currency="usd", subscription="sub_a", created=MAR + 5,
                            lines=[{"amount": 1200, "quantity": 120, "price": "price_api", "subscription_item": "si_a",
                                    "period": {"start": FEB, "end": MAR}}])
    assert first.meter_products == {"mtr_api": "api"}
    second = sc.read_billing(config, since=first.cursor, customers={"cus_a": "a"}, meter_products=first.meter_products)
    assert second.cursor == MAR + 5
    assert [a.account_id for a in second.accounts] == ["b"]
    assert [line.invoice_id for line in second.invoice_lines] == ["in_feb"]
    assert second.products == [] and second.prices == [] and second.subscriptions == []
    lists = [r for r in stripe_fake.requests[mark:] if r.path in ("/v1/customers", "/v1/products", "/v1/prices",
                                                                  "/v1/subscriptions", "/v1/invoices")]
    assert lists and all(r.params.get("created") == {"gt": str(FEB)} for r in lists)
    assert sum(r.returned for r in lists) == 2  # the new customer and the new invoice, nothing re-read
    assert second.reported_usage_start.date() == date(2026, 1, 25)  # cursor's day minus the 7-day lookback
    summaries = [r for r in stripe_fake.requests[mark:] if r.path.endswith("/event_summaries")]
    assert sorted(r.params["customer"] for r in summaries) == ["cus_a", "cus_b"]


def test_rate_limits_are_retried_with_backoff_then_reported(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _small_account(stripe_fake)
    stripe_fake.fail_next(2, 429, path_contains="/v1/customers")
    billing = sc.read_billing(config)
    assert [a.account_id for a in billing.accounts] == ["a"]
    assert [r.status for r in stripe_fake.requests if r.path == "/v1/customers"][:3] == [429, 429, 200]
    stripe_fake.fail_next(10, 429, path_contains="/v1/customers")
    with pytest.raises(sc.StripeConnectorError, match="rate-limiting") as info:
        sc.read_billing({**config, "max_network_retries": 1})
    assert info.value.kind == "rate_limited"
    stripe_fake.faults.clear()


@pytest.mark.slow
def test_server_errors_are_retried_by_the_sdk(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _small_account(stripe_fake)
    stripe_fake.fail_next(1, 500, path_contains="/v1/products")
    assert [p.product_key for p in sc.read_billing(config).products] == ["api"]
    assert [r.status for r in stripe_fake.requests if r.path == "/v1/products"] == [500, 200]


def test_check_says_what_is_wrong_without_showing_the_key(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    ok = sc.check(config)
    assert ok.ok and "test mode" in ok.message and "invoices" in ok.message
    wrong = sc.check({**config, "api_key": "sk_test_wrongwrongwrong9876"})
    assert not wrong.ok and "rejected the API key" in wrong.message and "9876" not in wrong.message
    stripe_fake.add_restricted_key("rk_test_only_customers_5555", "/v1/customers")
    limited = sc.check({**config, "api_key": "rk_test_only_customers_5555"})
    assert not limited.ok and "read products" in limited.message and "403" in limited.message
    assert limited.details == {"readable": "customers", "failed_at": "products"}
    down = sc.check({**config, "api_base": f"http://127.0.0.1:{free_port()}", "max_network_retries": 0})
    assert not down.ok and "Could not reach Stripe" in down.message
    assert not sc.check({"api_base": config["api_base"]}).ok
    assert "api_key" in sc.check({"api_key": ""}).message
    assert "api_base" in sc.check({"api_key": DEFAULT_KEY, "api_base": "ftp://x"}).message


def test_a_redirect_is_refused_without_contacting_where_it_points(fake: tuple[FakeStripe, dict]) -> None:
    """api_base is judged by services/source_policy.py, where it redirects to is not: the SDK must not go there."""
    stripe_fake, config = fake
    lines = _draft_customer(stripe_fake)
    with redirect_target() as target:
        stripe_fake.redirect_next(target.url, path_contains="/v1/customers")
        checked = sc.check(config)
        stripe_fake.redirect_next(target.url, status=301, path_contains="/v1/products")
        with pytest.raises(sc.StripeConnectorError, match=r"redirect \(301\) while trying to list products") as reading:
            sc.read_billing(config)  # the SDK's default retries: a redirect is not retried
        stripe_fake.redirect_next(target.url, status=307, path_contains="/v1/invoices", method="POST")
        with pytest.raises(sc.StripeConnectorError, match=r"redirect \(307\) while trying to create the draft invoice"):
            sc.create_draft_invoice(config, "cus_a", "usd", lines, "rrc-redirect-0001")
    assert not checked.ok and checked.details == {"failed_at": "customers"}
    assert checked.message == ("Stripe answered with a redirect (302) while trying to read customers; redirects are "
                               "refused: set api_base to the address that answers")
    assert reading.value.kind == "config" and SECRET not in checked.message + str(reading.value)
    assert target.requests == []
    assert [r.status for r in stripe_fake.requests if r.path == "/v1/products"] == [301]
    assert stripe_fake.draft_invoices() == []


def _draft_customer(stripe_fake: FakeStripe) -> list[sc.DraftLine]:
    _small_account(stripe_fake)
    return [sc.DraftLine("api: 250 units used 2026-01-01 to 2026-01-31 that never reached billing — anomaly #7",
                         D("25.00"), datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), "price_api",
                         {"product_key": "api", "anomaly_id": "7"})]


def test_create_draft_invoice_makes_one_draft_and_replays_it(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    lines = _draft_customer(stripe_fake)
    first = sc.create_draft_invoice(config, "cus_a", "USD", lines, "rrc-abc123456", {"rrc_anomaly_id": "7"})
    again = sc.create_draft_invoice(config, "cus_a", "USD", lines, "rrc-abc123456", {"rrc_anomaly_id": "7"})
    assert first == again
    (invoice,) = stripe_fake.draft_invoices()
    assert invoice["id"] == first and invoice["auto_advance"] is False and invoice["status"] == "draft"
    assert invoice["total"] == 2500 and invoice["currency"] == "usd"
    assert invoice["metadata"] == {"rrc_anomaly_id": "7", "rrc_key": "rrc-abc123456"}
    (line,) = invoice["lines"]["data"]
    assert line["description"].startswith("api: 250 units") and line["period"] == {"start": JAN, "end": FEB}
    assert line["metadata"]["price_id"] == "price_api" and len(stripe_fake.invoiceitems) == 1
    keys = [r.idempotency_key for r in stripe_fake.requests if r.method == "POST"]
    assert keys == ["rrc-abc123456-invoice", "rrc-abc123456-item-0"] * 2
    shown = sc.get_invoice(config, first)
    assert shown["status"] == "draft" and shown["total"] == 2500


def test_create_draft_invoice_refuses_before_writing_anything(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    lines = _draft_customer(stripe_fake)
    with pytest.raises(sc.StripeConnectorError, match="No such customer") as missing:
        sc.create_draft_invoice(config, "cus_nobody", "usd", lines, "rrc-key-000001")
    assert missing.value.kind == "not_found"
    stripe_fake.prices["price_api"]["active"] = False
    with pytest.raises(sc.StripeConnectorError, match="price_api is archived"):
        sc.create_draft_invoice(config, "cus_a", "usd", lines, "rrc-key-000002")
    with pytest.raises(sc.StripeConnectorError, match="rejected the API key") as declined:
        sc.create_draft_invoice({**config, "api_key": "sk_test_declined_00001111"}, "cus_a", "usd", lines,
                                "rrc-key-000003")
    assert declined.value.kind == "auth" and "00001111" not in str(declined.value)
    bad = [(dict(customer_id="acme"), "customer_id"), (dict(currency="dollars"), "currency"),
           (dict(lines=[]), "lines"), (dict(lines=[sc.DraftLine("x", D("0.004"))]), r"lines\[0\].amount"),
           (dict(lines=[sc.DraftLine("x", D("-1"))]), r"lines\[0\].amount"),
           (dict(lines=[sc.DraftLine(" ", D("1"))]), r"lines\[0\].description"),
           (dict(idempotency_key="short"), "idempotency_key")]
    for change, field in bad:
        args = {"customer_id": "cus_a", "currency": "usd", "lines": lines, "idempotency_key": "rrc-key-000004"}
        with pytest.raises(sc.StripeConnectorError, match=field):
            sc.create_draft_invoice(config, **{**args, **change})
    assert stripe_fake.count("POST") == 0 and stripe_fake.draft_invoices() == [] and stripe_fake.invoiceitems == {}


@pytest.mark.slow
def test_a_timeout_after_stripe_created_the_invoice_is_retried_into_the_same_invoice(
        fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    lines = _draft_customer(stripe_fake)
    stripe_fake.delay_next(1, 1.5, path_contains="/v1/invoices", method="POST")
    invoice_id = sc.create_draft_invoice({**config, "timeout": 0.5, "max_network_retries": 2}, "cus_a", "usd",
                                         lines, "rrc-timeout-0001")
    posts = [r for r in stripe_fake.requests if r.method == "POST" and r.path == "/v1/invoices"]
    assert len(posts) == 2 and posts[0].idempotency_key == posts[1].idempotency_key
    assert [i["id"] for i in stripe_fake.draft_invoices()] == [invoice_id]
    assert len(stripe_fake.invoiceitems) == 1


def test_reported_usage_is_empty_but_well_typed_without_meters(fake: tuple[FakeStripe, dict]) -> None:
    _, config = fake
    billing = sc.read_billing(config)
    assert billing.reported_usage.num_rows == 0 and billing.reported_usage.schema == sc.BUCKET_SCHEMA
    assert billing.accounts == [] and billing.cursor == 0
    assert pa.types.is_decimal(billing.reported_usage.schema.field("units").type)
    with pytest.raises(sc.StripeConnectorError, match="since"):
        sc.read_billing(config, since=-1)


def _legacy_item(stripe_fake: FakeStripe, current_start: int, current_end: int) -> None:
    """Customer `old` subscribed to `si_old`, a metered price from before Billing Meters."""
    stripe_fake.add_customer("cus_old", name="Old Co", metadata={"account_id": "old"}, created=JAN)
    stripe_fake.add_product("prod_api", name="API", metadata={"product_key": "api"}, created=JAN)
    stripe_fake.add_price("price_legacy", product="prod_api", currency="usd", unit_amount_decimal="10",
                          usage_type="metered", created=JAN)
    stripe_fake.add_subscription("sub_old", customer="cus_old", created=JAN, items=[
        {"id": "si_old", "price": "price_legacy", "current_period_start": current_start,
         "current_period_end": current_end}])


def test_legacy_usage_record_summaries_count_as_reported_usage_per_period(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _legacy_item(stripe_fake, FEB, MAR)
    stripe_fake.add_invoice("in_old", customer="cus_old", currency="usd", subscription="sub_old", created=FEB,
                            lines=[{"amount": 700, "quantity": 70, "price": "price_legacy",
                                    "subscription_item": "si_old", "period": {"start": JAN, "end": FEB}}])
    for ts, quantity in ((JAN + 10, 30), (JAN + 86_400 * 9, 40), (FEB + 5, 11)):
        stripe_fake.add_usage_record("si_old", ts, quantity)
    billing = sc.read_billing(config)
    rows = billing.reported_usage.sort_by("ts").to_pylist()
    assert [(r["account_id"], r["product_key"], r["ts"].date(), r["units"]) for r in rows] == [
        ("old", "api", date(2026, 1, 1), D(70)), ("old", "api", date(2026, 2, 1), D(11))]
    assert stripe_fake.count("GET", "/v1/subscription_items/si_old/usage_record_summaries") == 1


def test_a_legacy_summary_of_an_anniversary_period_lands_in_that_period(fake: tuple[FakeStripe, dict]) -> None:
    """Periods that start mid-day (anniversary billing): the total is stamped at the period's start,
    not at its day's midnight, which belongs to the previous period."""
    stripe_fake, config = fake
    start = at("2026-01-14T09:30:15Z")
    _legacy_item(stripe_fake, start, at("2026-02-14T09:30:15Z"))
    stripe_fake.add_usage_record("si_old", start + 60, 25)
    billing = sc.read_billing(config)
    [row] = billing.reported_usage.to_pylist()
    [period] = billing.subscriptions
    assert row["ts"] == period.period_start == datetime(2026, 1, 14, 9, 30, 15, tzinfo=UTC) and row["units"] == D(25)


@pytest.mark.slow
def test_a_connection_dropped_after_stripe_did_the_work_is_retried_into_the_same_invoice() -> None:
    stripe_fake = FakeStripe()
    lines = _draft_customer(stripe_fake)
    with serve(stripe_fake, drop_proxy=True) as url:
        config = {"api_key": DEFAULT_KEY, "api_base": url, "max_network_retries": 2}
        stripe_fake.drop_next(1, path_contains="/v1/invoices", method="POST")
        stripe_fake.drop_next(1, path_contains="/v1/invoiceitems", method="POST")
        invoice_id = sc.create_draft_invoice(config, "cus_a", "usd", lines, "rrc-dropped-0001")
        assert sc.check(config).ok  # the relay passes ordinary traffic through
    for path in ("/v1/invoices", "/v1/invoiceitems"):
        posts = [r for r in stripe_fake.requests if r.method == "POST" and r.path == path]
        assert len(posts) == 2 and len({r.idempotency_key for r in posts}) == 1
    assert [i["id"] for i in stripe_fake.draft_invoices()] == [invoice_id] and len(stripe_fake.invoiceitems) == 1
    assert stripe_fake.invoices[invoice_id]["total"] == 2500


def test_a_subscription_ended_mid_period_covers_usage_only_until_it_ended(fake: tuple[FakeStripe, dict]) -> None:
    stripe_fake, config = fake
    _small_account(stripe_fake)
    mid_feb = at("2026-02-15T00:00:00Z")
    stripe_fake.subscriptions["sub_a"].update(status="canceled", ended_at=mid_feb, canceled_at=mid_feb)
    periods = sc.read_billing(config).subscriptions
    assert [(p.period_start.date(), p.period_end.date(), p.status) for p in periods] == [
        (date(2026, 1, 1), date(2026, 2, 1), "canceled"), (date(2026, 2, 1), date(2026, 2, 15), "canceled")]
    stripe_fake.subscriptions["sub_a"]["ended_at"] = FEB  # ended when January closed: February is not covered
    periods = sc.read_billing(config).subscriptions
    assert [(p.period_start.date(), p.period_end.date()) for p in periods] == [(date(2026, 1, 1), date(2026, 2, 1))]
