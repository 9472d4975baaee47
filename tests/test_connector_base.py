"""The request limits both CRM connectors accept, checked once for both."""

from __future__ import annotations

import pytest

from connectors.base import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, request_limits


class Refused(Exception):
    pass


def test_defaults_and_given_values() -> None:
    assert request_limits({}, Refused, "HubSpot") == (DEFAULT_TIMEOUT, DEFAULT_ATTEMPTS)
    assert request_limits({"timeout": "2.5", "max_attempts": 2}, Refused, "HubSpot") == (2.5, 2)


@pytest.mark.parametrize(("config", "reason"), [
    ({"timeout": "soon"}, "expected numbers"),
    ({"max_attempts": "x"}, "expected numbers"),
    ({"timeout": -1}, "must be positive"),
    ({"max_attempts": -2}, "must be positive"),
])
def test_bad_limits_name_the_system_in_its_own_error(config: dict, reason: str) -> None:
    with pytest.raises(Refused, match=f"^Salesforce timeout / max_attempts: {reason}$"):
        request_limits(config, Refused, "Salesforce")
