"""Admins' product-to-price mapping: it values unsubscribed usage, is checked, audited, admin-only."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import pytest

from services import anomalies, catalog, reconciliation, settings
from services.context import Actor
from services.errors import InvalidInput, PermissionDenied
from tests.bundles import Scenario


@pytest.fixture
def org(org: tuple[Actor, Actor], tmp_path: Path) -> tuple[Actor, Actor]:
    """The conftest organization, its data source a bundle with unsubscribed usage."""
    admin_actor, _ = org
    folder = (Scenario().price("p_api_list", "api", "per_unit", "0.25")
              .use("acme", "api", "2026-01-10T00:00:00Z", "100", reported="")  # never subscribed: unbilled
              .write(tmp_path / "bundle"))
    settings.set_data_source(admin_actor, {"kind": "bundle", "path": str(folder)})
    return org


def unbilled_amount(actor: Actor) -> D:
    reconciliation.run_reconciliation(actor)
    (row,) = anomalies.list_anomalies(actor, anomalies.AnomalyFilters(types=("unbilled_usage",),
                                                                      statuses=("open",))).rows
    return row.amount


def test_mapping_values_unsubscribed_usage(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    products = {p.product_key: p for p in catalog.price_catalog(analyst)}
    assert [c.price_id for c in products["api"].prices] == ["p_api", "p_api_list"]
    assert products["api"].mapped_price_id is None
    assert unbilled_amount(admin) == D("10.00")  # first listed price: 100 x 0.10
    catalog.set_price_map(admin, {"api": "p_api_list"})
    assert catalog.price_catalog(analyst)[0].mapped_price_id == "p_api_list"
    assert unbilled_amount(admin) == D("25.00")  # the admin's choice: 100 x 0.25, same anomaly updated
    catalog.set_price_map(admin, {"api": None})
    assert unbilled_amount(admin) == D("10.00")


def test_bad_mappings_and_analysts_are_refused(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    with pytest.raises(InvalidInput, match="a price of product api"):
        catalog.set_price_map(admin, {"api": "p_seats"})
    with pytest.raises(InvalidInput, match="a product of the data source"):
        catalog.set_price_map(admin, {"nope": "p_api"})
    with pytest.raises(PermissionDenied):
        catalog.set_price_map(analyst, {"api": "p_api_list"})
    assert settings.get_settings(admin).price_map is None
