"""What the connectors share: the health-check result, usage column mapping, loopback and request-limit checks."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

USAGE_COLUMNS = ("account_id", "product_key", "ts", "units")
DEFAULT_TIMEOUT = 30.0  # seconds per CRM request
DEFAULT_ATTEMPTS = 4  # tries per CRM request, retrying rate limits and outages
OPTIONAL_USAGE_COLUMNS = ("event_id",)


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check(config)`: reachable, authenticated and permitted, or why not."""

    ok: bool
    message: str  # one sentence fit to show an admin; never contains a secret
    details: dict[str, str] | None = None


def usage_column_mapping(columns: object, error: type[Exception], holder: str) -> dict[str, str]:
    """Validate an admin's mapping of the usage fields to the source's column names.

    `holder` names what a column is in this source ("column", "Parquet column") for the message;
    `error` is the connector's own error type, so callers keep catching what they already catch.
    """
    names = USAGE_COLUMNS + OPTIONAL_USAGE_COLUMNS
    if not isinstance(columns, dict):
        raise error(f"columns: expected a mapping of {', '.join(USAGE_COLUMNS)} (and optional event_id) "
                    f"to {holder} names")
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise error(f"columns: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(names)}")
    mapping: dict[str, str] = {}
    for key in names:
        value = columns.get(key)
        if value in (None, "") and key in OPTIONAL_USAGE_COLUMNS:
            continue
        if not isinstance(value, str) or not value.strip():
            raise error(f"columns.{key}: required, the name of the {holder} holding {key}")
        mapping[key] = value
    return mapping


def is_loopback(host: str) -> bool:
    """True for this machine: the only place a connector may talk plain http (the local fakes)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_limits(config: dict, error: type[Exception], system: str) -> tuple[float, int]:
    """A CRM integration's optional `timeout` (seconds) and `max_attempts`, checked; `error` is the
    connector's own error type, so its callers keep catching what they already catch."""
    try:
        timeout = float(config.get("timeout") or DEFAULT_TIMEOUT)
        attempts = int(config.get("max_attempts") or DEFAULT_ATTEMPTS)
    except (TypeError, ValueError):
        raise error(f"{system} timeout / max_attempts: expected numbers") from None
    if timeout <= 0 or attempts < 1:
        raise error(f"{system} timeout / max_attempts: must be positive")
    return timeout, attempts
