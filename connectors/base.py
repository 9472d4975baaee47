"""What every connector shares: the health-check result the settings page shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check(config)`: reachable, authenticated and permitted, or why not."""

    ok: bool
    message: str  # one sentence fit to show an admin; never contains a secret
    details: dict[str, str] | None = None
