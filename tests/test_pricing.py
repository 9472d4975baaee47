"""Pricing with Stripe's semantics: exact amounts, boundaries, currencies, properties."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.money import currency_exponent, format_money, from_minor_units, plain_decimal, to_minor_units
from core.pricing import Price, Tier, price_amount, price_lines

TIERS = (Tier(D(5), D("7.00")), Tier(D(10), D("6.50")), Tier(None, D("6.00")))
GRADUATED = Price("g", "p", "usd", "graduated", tiers=TIERS)
VOLUME = Price("v", "p", "usd", "volume", tiers=TIERS)
WITH_FLAT = Price("f", "p", "usd", "graduated",
                  tiers=(Tier(D(10), D("1.00"), D("20.00")), Tier(None, D("0.50"), D("5.00"))))


@pytest.mark.parametrize(("price", "quantity", "amount"), [
    (Price("u", "p", "usd", "per_unit", D("0.10")), D(1500), D("150.00")),
    (GRADUATED, D(15), D("97.50")),  # 5 x 7 + 5 x 6.50 + 5 x 6 (Stripe's docs example)
    (VOLUME, D(15), D("90.00")),  # all 15 at the third tier
    (GRADUATED, D(5), D("35.00")),  # up_to is inclusive: unit 5 is still tier 1
    (GRADUATED, D(6), D("41.50")),
    (VOLUME, D(5), D("35.00")),
    (VOLUME, D(6), D("39.00")),
    (WITH_FLAT, D(10), D("30.00")),  # first tier's flat fee once
    (WITH_FLAT, D(11), D("35.50")),  # entering tier 2 adds its flat fee
    (WITH_FLAT, D(0), D("20.00")),  # q = 0 enters the first tier
    (Price("pk", "p", "usd", "package", D("5.00"), package_size=1000), D(1001), D("10.00")),
    (Price("pk", "p", "usd", "package", D("5.00"), package_size=1000), D(1000), D("5.00")),
    (Price("pk", "p", "usd", "package", D("5.00"), package_size=1000), D(0), D("0.00")),
    (Price("u", "p", "usd", "per_unit", D("0.10")), D("0.5"), D("0.05")),
    (GRADUATED, D("5.5"), D("38.25")),  # fractional units straddling a tier
])
def test_exact_amounts(price: Price, quantity: D, amount: D) -> None:
    assert price_amount(price, quantity) == amount


def test_rounds_once_per_line_half_up() -> None:
    price = Price("u", "p", "usd", "per_unit", D("0.335"))
    assert price_amount(price, D(3)) == D("1.01")  # 1.005 -> 1.01; per-unit rounding would give 1.02
    assert price_amount(Price("u", "p", "usd", "per_unit", D("0.0025")), D(1)) == D("0.00")
    assert price_amount(Price("u", "p", "usd", "per_unit", D("0.005")), D(1)) == D("0.01")


def test_zero_and_three_decimal_currencies() -> None:
    assert price_amount(Price("j", "p", "jpy", "per_unit", D("0.35")), D(1001)) == D("350")
    assert price_amount(Price("j", "p", "JPY", "per_unit", D("0.35")), D(1001)).as_tuple().exponent == 0
    assert price_amount(Price("k", "p", "kwd", "per_unit", D("0.0015")), D(3)) == D("0.005")
    assert currency_exponent("KRW") == 0 and currency_exponent("BHD") == 3 and currency_exponent("eur") == 2
    assert to_minor_units(D("12.345"), "kwd") == 12345 and from_minor_units(1234, "usd") == D("12.34")
    assert format_money(D("1234.5"), "usd") == "1,234.50 USD"
    assert [plain_decimal(v) for v in (D("1500.000000000"), D("0.500"), D("1E+3"), D("0E-9"), 7)] == [
        "1500", "0.5", "1000", "0", "7"]


def test_breakdown_sums_to_the_amount() -> None:
    lines = price_lines(WITH_FLAT, D(12))
    assert [line.units for line in lines] == [D(10), D(2)]
    assert sum(line.subtotal for line in lines) == price_amount(WITH_FLAT, D(12)) == D("36.00")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "stairstep"}, "unknown pricing model"),
    ({"model": "per_unit"}, "needs unit_amount"),
    ({"model": "package", "unit_amount": D(1), "package_size": 0}, "package_size"),
    ({"model": "graduated", "tiers": (Tier(None, D(1)), Tier(D(5), D(1)))}, "last tier"),
    ({"model": "volume", "tiers": (Tier(D(5), D(1)), Tier(D(5), D(1)), Tier(None, D(1)))}, "increase"),
    ({"model": "graduated"}, "needs tiers"),
])
def test_invalid_prices_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Price("x", "p", "usd", **kwargs)


def test_negative_quantity_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        price_amount(GRADUATED, D(-1))


quantities = st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False)
prices = st.sampled_from([GRADUATED, WITH_FLAT, Price("u", "p", "usd", "per_unit", D("0.0125")),
                          Price("pk", "p", "jpy", "package", D("500"), package_size=100)])


@given(prices, quantities, quantities)
def test_non_negative_and_monotonic(price: Price, a: D, b: D) -> None:
    low, high = sorted((a, b))
    assert D(0) <= price_amount(price, low) <= price_amount(price, high)


@given(prices, quantities)
def test_amount_has_the_currency_exponent(price: Price, q: D) -> None:
    assert price_amount(price, q).as_tuple().exponent == -currency_exponent(price.currency)


@given(st.integers(min_value=0, max_value=10_000))
def test_graduated_equals_sum_of_tier_slices(q: int) -> None:
    slices = min(q, 5) * D("7.00") + max(min(q, 10) - 5, 0) * D("6.50") + max(q - 10, 0) * D("6.00")
    assert price_amount(GRADUATED, D(q)) == slices


def test_volume_can_decrease_when_crossing_a_tier() -> None:
    steep = Price("s", "p", "usd", "volume", tiers=(Tier(D(10), D("10.00")), Tier(None, D("5.00"))))
    assert price_amount(steep, D(10)) == D("100.00")
    assert price_amount(steep, D(11)) == D("55.00")
