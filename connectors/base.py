"""What the connectors share: the health-check result, usage column mapping, request limits and the message for
a refused redirect."""

from __future__ import annotations

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


def redirect_refused(system: str, status: int, field: str, doing: str | None = None) -> str:
    """The message for a 3xx answer, which no connector follows: services/source_policy.py judged the address in
    `field` (api_base, host, instance_url, endpoint_url), not where a redirect leads, so the admin must set
    `field` to the address that answers itself. `doing` completes "while ..." (e.g. "creating the task") when
    the connector knows what it was doing."""
    during = f" while {doing}" if doing else ""
    return (f"{system} answered with a redirect ({status}){during}; redirects are refused: set {field} to the "
            "address that answers")


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
