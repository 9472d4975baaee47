"""Severity and confidence of an anomaly: how much it matters, how sure we are.

Severity bands (amount in major units of a two-decimal currency; zero-decimal currencies are
scaled by 100 and three-decimal ones by 1/10 so 10,000 JPY ranks like 100 USD); `share` is the
amount over what was billed (nothing billed = 100%):
- critical: amount >= 10,000, or amount >= 1,000 with share >= 50%
- high:     amount >= 1,000, or amount >= 100 with share >= 25%
- medium:   amount >= 100, or share >= 10%
- low:      anything else.

Confidence is a weighted mean of five named factors in [0, 1], kept so the UI can show why:
- mapping (0.25): 1.0 when the price comes from a subscription or contract, 0.6 when inferred
  (list price for unsubscribed usage);
- completeness (0.15): share of the period's elapsed days that have actual usage data;
- persistence (0.25): for unit gaps, share of days with usage where actual exceeded reported
  (a gap on one day is likelier a late event than a broken pipeline); 1.0 for price gaps;
- period_closed (0.15): 1.0 when the period has ended, 0.5 while it is still open;
- signal_to_noise (0.20): for unit gaps, 1 - exp(-z) where z is the gap over the daily standard
  deviation of actual usage scaled to the period; 1.0 for price gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from core.money import currency_exponent

SEVERITIES = ("low", "medium", "high", "critical")
WEIGHTS = {
    "mapping": 0.25,
    "completeness": 0.15,
    "persistence": 0.25,
    "period_closed": 0.15,
    "signal_to_noise": 0.20,
}
UNIT_GAP_TYPES = frozenset({"under_reported_usage", "unbilled_usage"})


def severity(amount: Decimal, billed: Decimal, currency: str) -> str:
    scale = Decimal(10) ** (2 - currency_exponent(currency))
    scaled = amount / scale
    share = Decimal(1) if billed <= 0 else amount / billed
    if scaled >= 10_000 or (scaled >= 1_000 and share >= Decimal("0.5")):
        return "critical"
    if scaled >= 1_000 or (scaled >= 100 and share >= Decimal("0.25")):
        return "high"
    if scaled >= 100 or share >= Decimal("0.1"):
        return "medium"
    return "low"


@dataclass(frozen=True)
class ConfidenceInputs:
    anomaly_type: str
    price_inferred: bool
    days_with_actual: int
    elapsed_days: int
    gap_days: int
    period_closed: bool
    leak_units: Decimal
    daily_stddev: float


def confidence(inputs: ConfidenceInputs) -> tuple[float, dict[str, float]]:
    """Return (confidence, factors), both rounded to 3 decimals."""
    unit_gap = inputs.anomaly_type in UNIT_GAP_TYPES
    completeness = min(1.0, inputs.days_with_actual / inputs.elapsed_days) if inputs.elapsed_days else 1.0
    persistence = min(1.0, inputs.gap_days / inputs.days_with_actual) if unit_gap and inputs.days_with_actual else 1.0
    if unit_gap and inputs.leak_units > 0:
        spread = inputs.daily_stddev * math.sqrt(max(inputs.days_with_actual, 1))
        z = float(inputs.leak_units) / spread if spread > 0 else math.inf
        signal = 1.0 - math.exp(-z)
    else:
        signal = 1.0
    factors = {
        "mapping": 0.6 if inputs.price_inferred else 1.0,
        "completeness": completeness,
        "persistence": persistence,
        "period_closed": 1.0 if inputs.period_closed else 0.5,
        "signal_to_noise": signal,
    }
    factors = {name: round(value, 3) for name, value in factors.items()}
    score = sum(WEIGHTS[name] * value for name, value in factors.items())
    return round(score, 3), factors
