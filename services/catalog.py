"""The product-to-price mapping admins keep: what unsubscribed usage of a product is valued at.

The catalog (products and their prices) comes from the org's data source — the demo bundle or
what sync wrote from Stripe; the mapping is stored in the org's settings and applied to every
reconciliation (`core.bundle.with_list_prices`).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.bundle import load_bundle, load_product_names, with_list_prices
from core.errors import BundleError
from core.model import Bundle
from db.session import org_session
from services import audit
from services.context import Actor, require_role
from services.errors import InvalidInput
from services.org_files import own_bundle
from services.settings import get_settings, settings_row


@dataclass(frozen=True)
class PriceChoice:
    price_id: str
    label: str  # "price_api_usd · USD · per_unit 0.0025"


@dataclass(frozen=True)
class ProductPrices:
    product_key: str
    name: str
    prices: list[PriceChoice]
    mapped_price_id: str | None  # the admin's choice
    default_price_id: str | None  # the data source's own default


def _source_bundle(actor: Actor) -> Bundle | None:
    source = get_settings(actor).data_source or {}
    if source.get("kind") != "bundle":
        return None
    try:
        return load_bundle(own_bundle(actor.org_id, source["path"], "data source path"))
    except BundleError as exc:
        raise InvalidInput(f"the data source cannot be read: {exc}") from None


def product_names(actor: Actor) -> dict[str, str]:
    """Product key -> name in the org's data source (Stripe's product names after a sync); empty without a data
    source, when it is not the org's (a run names that) or when its products.csv cannot be read. Reads that one
    small file, not the bundle."""
    require_role(actor, "admin", "analyst")
    source = get_settings(actor).data_source or {}
    if source.get("kind") != "bundle":
        return {}
    try:
        return load_product_names(own_bundle(actor.org_id, source["path"], "data source path"))
    except (BundleError, InvalidInput):
        return {}


def _label(bundle: Bundle, price_id: str) -> str:
    price = bundle.prices[price_id]
    amount = f" {price.unit_amount.normalize():f}" if price.unit_amount is not None else ""
    return f"{price_id} · {price.currency.upper()} · {price.model}{amount}"


def price_catalog(actor: Actor) -> list[ProductPrices]:
    """Every product of the data source with its prices and the current mapping (empty without data)."""
    require_role(actor, "admin", "analyst")
    bundle = _source_bundle(actor)
    if bundle is None:
        return []
    mapping = get_settings(actor).price_map or {}
    return [ProductPrices(key, product.name,
                          [PriceChoice(p.price_id, _label(bundle, p.price_id)) for p in bundle.prices.values()
                           if p.product_key == key],
                          mapping.get(key), product.default_price_id)
            for key, product in sorted(bundle.products.items())]


def set_price_map(actor: Actor, mapping: dict[str, str | None]) -> dict[str, str]:
    """Replace the mapping (None or "" removes a product's entry); checked against the data source."""
    require_role(actor, "admin")
    cleaned = {key: value for key, value in mapping.items() if value}
    bundle = _source_bundle(actor)
    if bundle is None:
        raise InvalidInput("no data source yet: connect Stripe and a usage source, or load the demo")
    try:
        with_list_prices(bundle, cleaned)
    except BundleError as exc:
        raise InvalidInput(str(exc)) from None
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        previous = settings.price_map or {}
        settings.price_map = cleaned
        audit.append(session, actor, "settings.price_map_changed", "org_settings", actor.org_id,
                     {"before": previous, "after": cleaned})
    return cleaned
