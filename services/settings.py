"""Per-organization settings: thresholds, schedule, data source. Changing them is admin-only."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.orm import Session

from core.reconcile import ReconcileParams
from db.models import OrgSettings
from db.session import org_session
from services import audit
from services.context import Actor, require_role
from services.errors import InvalidInput

SCHEDULE_KINDS = ("off", "cron", "interval")


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
    return ReconcileParams(rel_tolerance=Decimal(settings.rel_tolerance),
                           min_leak_amount=Decimal(settings.min_leak_amount),
                           over_billing_min=Decimal(settings.over_billing_min))


def update_thresholds(actor: Actor, *, rel_tolerance: Decimal, min_leak_amount: Decimal,
                      over_billing_min: Decimal) -> OrgSettings:
    require_role(actor, "admin")
    if not Decimal(0) <= rel_tolerance < Decimal(1):
        raise InvalidInput("rel_tolerance: expected a share between 0 and 1, e.g. 0.005")
    for name, value in (("min_leak_amount", min_leak_amount), ("over_billing_min", over_billing_min)):
        if value < 0:
            raise InvalidInput(f"{name}: expected an amount >= 0")
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        settings.rel_tolerance, settings.min_leak_amount = rel_tolerance, min_leak_amount
        settings.over_billing_min = over_billing_min
        audit.append(session, actor, "settings.thresholds_changed", "org_settings", actor.org_id,
                     {"rel_tolerance": rel_tolerance, "min_leak_amount": min_leak_amount,
                      "over_billing_min": over_billing_min})
        return settings


def validate_schedule(kind: str, expr: str | None, timezone: str) -> None:
    if kind not in SCHEDULE_KINDS:
        raise InvalidInput(f"schedule kind: expected one of {', '.join(SCHEDULE_KINDS)}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"time zone: unknown {timezone!r} (e.g. UTC, Europe/Paris)") from None
    if kind == "cron":
        try:
            CronTrigger.from_crontab(expr or "", timezone=timezone)
        except ValueError as exc:
            raise InvalidInput(f"cron expression {expr!r}: {exc}") from None
    if kind == "interval" and not (expr or "").isdigit():
        raise InvalidInput("interval: expected a whole number of seconds, e.g. 3600")


def update_schedule(actor: Actor, kind: str, expr: str | None, timezone: str = "UTC") -> OrgSettings:
    require_role(actor, "admin")
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
    with org_session(actor.org_id) as session:
        settings = settings_row(session, actor.org_id)
        settings.data_source = dict(source)
        audit.append(session, actor, "settings.data_source_changed", "org_settings", actor.org_id, source)
        return settings
