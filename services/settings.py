"""Per-organization settings: thresholds, schedule, data source. Changing them is admin-only."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.orm import Session

from core.reconcile import ReconcileParams
from db.models import SCHEDULE_KINDS, OrgSettings  # SCHEDULE_KINDS: org_settings.schedule_kind's vocabulary
from db.session import org_session
from services import audit
from services.context import Actor, require_role
from services.errors import InvalidInput
from services.org_files import own_bundle

# A minimum amount of a billion major units already disables detection; and up to 15 significant digits
# (9 + 6 decimals) a value survives SQLite, which stores Numeric as a binary float, unchanged.
MAX_AMOUNT = Decimal(10) ** 9
MIN_INTERVAL_ENV = "RRC_SCHEDULER_MIN_INTERVAL_SECONDS"
DEFAULT_MIN_INTERVAL = 300  # 5 minutes: a reconciliation re-reads every source, more often only loads the workers
MAX_INTERVAL = 366 * 24 * 3600  # a schedule rarer than yearly is a mistake; also far below APScheduler's C-int limit
CRON_SAMPLE = 24  # next fires inspected for the minimum gap (catches `* * * * *`, `0-4 6 * * *`, ...)


def settings_row(session: Session, org_id: int) -> OrgSettings:
    """The org's settings row in `session`, created with the defaults on first use."""
    settings = session.get(OrgSettings, org_id)
    if settings is None:
        settings = OrgSettings(org_id=org_id)
        session.add(settings)
        session.flush()
    return settings


def get_settings(actor: Actor) -> OrgSettings:
    with org_session(actor.org_id) as session:
        return settings_row(session, actor.org_id)


def reconcile_params(settings: OrgSettings) -> ReconcileParams:
    """The org's thresholds as engine parameters, checked again: a row stored before the bounds
    (Infinity on SQLite switched detection off) fails the run with the reason, never silently."""
    try:
        rel_tolerance, min_leak_amount, over_billing_min = _checked_thresholds(
            settings.rel_tolerance, settings.min_leak_amount, settings.over_billing_min)
    except InvalidInput as exc:
        raise InvalidInput(f"stored thresholds: {exc} — save valid thresholds in Settings") from None
    return ReconcileParams(rel_tolerance=rel_tolerance, min_leak_amount=min_leak_amount,
                           over_billing_min=over_billing_min)


def _checked_thresholds(rel_tolerance: Any, min_leak_amount: Any, over_billing_min: Any) -> tuple[Decimal, ...]:
    return (_threshold("rel_tolerance", rel_tolerance, "a share", Decimal(1), "0.005"),
            _threshold("min_leak_amount", min_leak_amount, "an amount", MAX_AMOUNT, "1.00"),
            _threshold("over_billing_min", over_billing_min, "an amount", MAX_AMOUNT, "1.00"))


def _threshold(name: str, value: Decimal, what: str, below: Decimal, example: str) -> Decimal:
    """`value` if finite, >= 0, below `below` and exact at its column's scale; else InvalidInput naming the field.

    NaN cannot be compared (a raw decimal.InvalidOperation), Infinity stored on SQLite silently stops
    every anomaly, and PostgreSQL refuses it, or more digits than Numeric(p, s) holds, with a raw DataError.
    """
    column = OrgSettings.__table__.c[name].type
    below = min(below, Decimal(10) ** (column.precision - column.scale))
    try:
        number = Decimal(value)
        if number.is_finite() and 0 <= number < below and number == number.quantize(Decimal(1).scaleb(-column.scale)):
            return number
    except (InvalidOperation, TypeError, ValueError):
        pass
    raise InvalidInput(f"{name}: expected {what} >= 0 and < {below} with at most {column.scale} decimal places, "
                       f"e.g. {example}; got {str(value)[:40]!r}")


def update_thresholds(actor: Actor, *, rel_tolerance: Decimal, min_leak_amount: Decimal,
                      over_billing_min: Decimal) -> OrgSettings:
    """Save the three thresholds together; all are checked before anything is written."""
    require_role(actor, "admin")
    rel_tolerance, min_leak_amount, over_billing_min = _checked_thresholds(rel_tolerance, min_leak_amount,
                                                                           over_billing_min)
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        settings.rel_tolerance, settings.min_leak_amount = rel_tolerance, min_leak_amount
        settings.over_billing_min = over_billing_min
        audit.append(session, actor, "settings.thresholds_changed", "org_settings", actor.org_id,
                     {"rel_tolerance": rel_tolerance, "min_leak_amount": min_leak_amount,
                      "over_billing_min": over_billing_min})
        return settings


def min_interval_seconds() -> int:
    """The shortest gap allowed between scheduled runs (RRC_SCHEDULER_MIN_INTERVAL_SECONDS, default 5 minutes)."""
    raw = os.environ.get(MIN_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_INTERVAL
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_INTERVAL:
        raise InvalidInput(f"{MIN_INTERVAL_ENV}: expected whole seconds between 1 and {MAX_INTERVAL}, got {raw!r}")
    return int(raw)


CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_days(item: str) -> list[int]:
    """The standard-cron days (0 or 7 = Sunday) one numeric day-of-week item selects: 5, 1-5, */2, 1-5/2."""
    base, _, step = item.partition("/")
    first, last = (0, 6) if base == "*" else (int(base.split("-")[0]), int(base.split("-")[-1]))
    if not (0 <= first <= last <= 7):  # 5-1 wraps round: left as typed, for APScheduler to explain
        raise ValueError(item)
    days = range(first, last + 1, int(step) if step else 1)
    return sorted({day % 7 for day in days})


def crontab_trigger(expr: str, timezone: str) -> CronTrigger:
    """A CronTrigger that reads day-of-week numbers as crontab does (1 = Monday, 0 and 7 = Sunday).

    APScheduler 3 counts day-of-week from Monday = 0, so `from_crontab("0 6 * * 1")` would fire on
    Tuesdays; numeric day items are translated to day names, which mean the same to both (items
    that are names already, `sun` or `mon-fri`, stay as they are, also in a mix like `sun,1`). An
    item that is neither is left for APScheduler to refuse.
    """
    fields = expr.split()
    if len(fields) == 5 and fields[4] != "*":
        try:
            items = [item if any(ch.isalpha() for ch in item) else ",".join(CRON_DAYS[d] for d in _cron_days(item))
                     for item in fields[4].split(",")]
        except (ValueError, IndexError):
            items = []
        if items:
            fields[4] = ",".join(items)
    return CronTrigger.from_crontab(" ".join(fields), timezone=timezone)


def validate_schedule(kind: str, expr: str | None, timezone: str) -> None:
    """InvalidInput naming the field unless the scheduler can build this schedule and it fires within bounds.

    The scheduler calls this for every stored schedule on every settings poll, so the result is cached.
    """
    problem = _schedule_problem(kind, expr, timezone, min_interval_seconds())
    if problem:
        raise InvalidInput(problem)


@lru_cache(maxsize=4096)
def _schedule_problem(kind: str, expr: str | None, timezone: str, floor: int) -> str | None:
    if kind not in SCHEDULE_KINDS:
        return f"schedule kind: expected one of {', '.join(SCHEDULE_KINDS)}"
    if len(timezone) > 64:
        return "time zone: at most 64 characters"
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"time zone: unknown {timezone!r} (e.g. UTC, Europe/Paris)"
    if kind == "off":
        return None
    if len(expr or "") > 100:
        return f"{kind} expression: at most 100 characters"
    if kind == "interval":
        if not (expr and expr.isascii() and expr.isdigit()):
            return f"interval: expected a whole number of seconds, e.g. 3600; got {expr!r}"
        if not floor <= int(expr) <= MAX_INTERVAL:
            return f"interval: {int(expr)} s is out of bounds; the minimum is {floor} s, the maximum {MAX_INTERVAL} s"
        return None
    try:
        trigger = crontab_trigger(expr or "", timezone)
    except ValueError as exc:
        return f"cron expression {expr!r}: {exc}"
    fires: list[datetime] = []
    now = datetime.now(zone)
    while len(fires) < CRON_SAMPLE and (fire := trigger.get_next_fire_time(None, now)):
        fires.append(fire)
        now = fire + timedelta(seconds=1)  # crontab's resolution is a minute
    if not fires:
        return f"cron expression {expr!r}: never fires (e.g. February 30)"
    gap = min((later - earlier for earlier, later in pairwise(fires)), default=None)
    if gap is not None and gap.total_seconds() < floor:
        return f"cron expression {expr!r}: fires {int(gap.total_seconds())} s apart; the minimum is {floor} s"
    return None


def update_schedule(actor: Actor, kind: str, expr: str | None, timezone: str = "UTC") -> OrgSettings:
    """Save the schedule. "off" keeps no expression: whatever was typed is dropped, not checked, stored or audited."""
    require_role(actor, "admin")
    if kind == "off":
        expr = None
    validate_schedule(kind, expr, timezone)
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        settings.schedule_kind, settings.schedule_expr, settings.schedule_timezone = kind, expr, timezone
        audit.append(session, actor, "settings.schedule_changed", "org_settings", actor.org_id,
                     {"kind": kind, "expr": expr, "timezone": timezone})
        return settings


def set_data_source(actor: Actor, source: dict[str, Any]) -> OrgSettings:
    """Where reconciliation reads the normalized tables from, e.g. {"kind": "bundle", "path": ...}."""
    require_role(actor, "admin")
    if source.get("kind") != "bundle" or not source.get("path"):
        raise InvalidInput('data source: expected {"kind": "bundle", "path": "<folder>"}')
    own_bundle(actor.org_id, source["path"], "data source path")
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        settings.data_source = dict(source)
        audit.append(session, actor, "settings.data_source_changed", "org_settings", actor.org_id, source)
        return settings
