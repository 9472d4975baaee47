"""The scheduler's cross-org view of schedules and connected sources (system session only)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Integration, Organization, OrgSettings


@dataclass(frozen=True)
class OrgSchedule:
    org_id: int
    kind: str  # cron | interval | off
    expr: str | None
    timezone: str

    @property
    def signature(self) -> str:
        """Changes exactly when the admin changed the schedule: the scheduler replaces the job only then."""
        return f"{self.kind}|{self.expr or ''}|{self.timezone}"


def schedules_all_orgs(session: Session) -> list[OrgSchedule]:
    """Every organization's schedule ("off" for an org without a settings row). Cross-tenant."""
    rows = session.execute(
        select(Organization.id, OrgSettings.schedule_kind, OrgSettings.schedule_expr, OrgSettings.schedule_timezone)
        .outerjoin(OrgSettings, OrgSettings.org_id == Organization.id).order_by(Organization.id))
    return [OrgSchedule(org_id, kind or "off", expr, tz or "UTC") for org_id, kind, expr, tz in rows]


def orgs_with_integrations(session: Session) -> list[int]:
    """Organizations with at least one connected system (the daily sync visits only those). Cross-tenant."""
    return list(session.scalars(select(Integration.org_id).distinct().order_by(Integration.org_id)))
