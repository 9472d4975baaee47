"""Currency-aware Decimal money helpers.

Stripe stores amounts in the currency's minor unit; most currencies have two decimals, but some
have none (JPY, KRW, ...) and a few have three (KWD, BHD, ...). Every amount the product shows or
compares is rounded with these rules, once per line, half up.
"""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_UP, Context, Decimal, DivisionByZero, InvalidOperation, Overflow

# Stripe's zero-decimal currencies (https://docs.stripe.com/currencies#zero-decimal).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg",
        "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf",
    }
)
# Stripe's three-decimal currencies.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

ZERO = Decimal(0)
# Arithmetic on money that never rounds by itself: with the input bounds of core.model, a quantity times a price
# (at most 10^26 units to 9 decimals: 100M usage rows at their bound) times a price (below 10^12, 15 decimals) has at
# most 35 + 27 significant digits, so `round_money` is the one rounding step, as Stripe rounds.
EXACT = Context(prec=80, traps=[InvalidOperation, DivisionByZero, Overflow])


def currency_exponent(currency: str) -> int:
    """Number of decimals of the currency's minor unit (0, 2 or 3)."""
    code = currency.lower()
    if code in ZERO_DECIMAL_CURRENCIES:
        return 0
    if code in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


@functools.cache
def _minor_unit(currency: str) -> Decimal:
    return Decimal(1).scaleb(-currency_exponent(currency))


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Round to the currency's minor unit, half up (the one rounding step of a line)."""
    return amount.quantize(_minor_unit(currency), ROUND_HALF_UP, context=EXACT)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """Major units -> integer minor units, as Stripe's API expects them."""
    return int(round_money(amount, currency).scaleb(currency_exponent(currency)))


def from_minor_units(minor: int | str | Decimal, currency: str) -> Decimal:
    """Integer (or decimal-string) minor units from Stripe -> Decimal major units."""
    return Decimal(minor).scaleb(-currency_exponent(currency))


def plain_decimal(value: Decimal | int) -> str:
    """A quantity as plain text, exact, without exponent or trailing zeros: 1500, 0.5, 12.25."""
    return f"{Decimal(value).normalize():f}"


def format_money(amount: Decimal, currency: str) -> str:
    """`1,234.50 USD` with exactly the currency's decimals, never a float artefact."""
    exp = currency_exponent(currency)
    return f"{round_money(amount, currency):,.{exp}f} {currency.upper()}"
