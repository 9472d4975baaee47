"""Prices and the one pricing function, with Stripe's semantics.

`price_lines` is the only place a quantity becomes money; `price_amount` is its total. Keeping
the per-tier lines lets the drill-down show exactly which tiers applied.

Semantics (docs.stripe.com/products-prices/pricing-models):
- per_unit: q x unit_amount.
- package: ceil(q / package_size) x unit_amount (Stripe's transform_quantity, round up).
- graduated: each unit priced by the tier it falls in; every tier entered adds its flat_amount.
- volume: every unit at the tier that q reaches, plus that tier's flat_amount.
Tiers' `up_to` is inclusive; a tier covers (previous up_to, up_to]. Fractional quantities are
priced exactly. Quantity 0 enters the first tier (Stripe bills a first-tier flat fee even for
zero usage). The total is rounded once, to the currency's minor unit, half up.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from core.money import EXACT, ZERO, round_money

PricingModel = Literal["per_unit", "graduated", "volume", "package"]
PRICING_MODELS: tuple[str, ...] = ("per_unit", "graduated", "volume", "package")


@dataclass(frozen=True)
class Tier:
    up_to: Decimal | None  # inclusive upper bound; None = infinity
    unit_amount: Decimal = ZERO
    flat_amount: Decimal = ZERO


@dataclass(frozen=True)
class Price:
    price_id: str
    product_key: str
    currency: str
    model: PricingModel
    unit_amount: Decimal | None = None
    package_size: int | None = None
    tiers: tuple[Tier, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model not in PRICING_MODELS:
            raise ValueError(f"unknown pricing model {self.model!r}; expected one of {PRICING_MODELS}")
        if self.model in ("per_unit", "package") and self.unit_amount is None:
            raise ValueError(f"price {self.price_id}: model {self.model} needs unit_amount")
        if self.model == "package" and (self.package_size is None or self.package_size < 1):
            raise ValueError(f"price {self.price_id}: package needs package_size >= 1")
        if self.model in ("graduated", "volume"):
            if not self.tiers:
                raise ValueError(f"price {self.price_id}: model {self.model} needs tiers")
            bounds = [t.up_to for t in self.tiers]
            if bounds[-1] is not None or any(b is None for b in bounds[:-1]):
                raise ValueError(f"price {self.price_id}: only the last tier may be unbounded")
            if any(a >= b for a, b in itertools.pairwise(bounds[:-1])):
                raise ValueError(f"price {self.price_id}: tiers' up_to must increase")


@dataclass(frozen=True)
class PriceLine:
    """One line of a price's breakdown: units charged at one rate, plus a flat fee."""

    description: str
    units: Decimal
    unit_amount: Decimal
    flat_amount: Decimal

    @property
    def subtotal(self) -> Decimal:
        return EXACT.add(EXACT.multiply(self.units, self.unit_amount), self.flat_amount)


def _tier_label(lower: Decimal, up_to: Decimal | None) -> str:
    return f"tier {lower}+" if up_to is None else f"tier {lower}-{up_to}"


def price_lines(price: Price, quantity: Decimal) -> list[PriceLine]:
    """Break the price of `quantity` into lines (unrounded)."""
    if quantity < 0:
        raise ValueError(f"quantity must not be negative, got {quantity}")
    if price.model == "per_unit":
        return [PriceLine("per unit", quantity, price.unit_amount or ZERO, ZERO)]
    if price.model == "package":
        size = price.package_size or 1
        whole, rest = divmod(quantity, size)  # exact: no rounded quotient to take the ceiling of
        packages = whole + (1 if rest else 0)
        return [PriceLine(f"packages of {size}", packages, price.unit_amount or ZERO, ZERO)]
    if price.model == "volume":
        lower = ZERO
        for tier in price.tiers:
            if tier.up_to is None or quantity <= tier.up_to:
                label = _tier_label(lower, tier.up_to)
                return [PriceLine(f"all units at {label}", quantity, tier.unit_amount, tier.flat_amount)]
            lower = tier.up_to
    lines: list[PriceLine] = []
    lower = ZERO
    for tier in price.tiers:  # graduated
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        lines.append(PriceLine(_tier_label(lower, tier.up_to), upper - lower, tier.unit_amount, tier.flat_amount))
        if tier.up_to is None or quantity <= tier.up_to:
            break
        lower = tier.up_to
    return lines


def price_amount(price: Price, quantity: Decimal) -> Decimal:
    """The amount Stripe would bill for `quantity` under `price`, in major units."""
    total = ZERO
    for line in price_lines(price, quantity):
        total = EXACT.add(total, line.subtotal)
    return round_money(total, price.currency)
