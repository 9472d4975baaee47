"""Reconciliation runs: queue, claim, progress, finish; and the scheduler's cross-org view.

A run moves queued -> running -> succeeded | failed, or to interrupted when its worker stopped
sending heartbeats. Claiming is a conditional UPDATE so two scheduler processes never start the
same run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.models import RUN_STATUSES, RUN_TRIGGERS, ReconRun

FINISHED = ("succeeded", "failed", "interrupted")
UPDATABLE = frozenset({"status", "params", "counts", "error", "progress", "progress_message", "started_at",
                       "finished_at", "heartbeat_at", "worker_id"})


def create_run(session: Session, org_id: int, *, trigger: str, created_by: int | None = None,
               params: dict[str, Any] | None = None, status: str = "queued") -> ReconRun:
    if trigger not in RUN_TRIGGERS:
        raise ValueError(f"run trigger must be one of {RUN_TRIGGERS}, got {trigger!r}")
    if status not in ("queued", "running"):
        raise ValueError(f"a run starts queued or running, not {status!r}")
    now = datetime.now(UTC)
    run = ReconRun(org_id=org_id, trigger=trigger, status=status, created_by=created_by, params=params,
                   queued_at=now, started_at=now if status == "running" else None,
                   heartbeat_at=now if status == "running" else None)
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, org_id: int, run_id: int) -> ReconRun | None:
    return session.scalar(select(ReconRun).where(ReconRun.org_id == org_id, ReconRun.id == run_id))


def list_runs(session: Session, org_id: int, *, status: str | None = None, limit: int = 50,
              offset: int = 0) -> list[ReconRun]:
    """Newest first (the Runs page and the API's run history)."""
    query = select(ReconRun).where(ReconRun.org_id == org_id)
    if status is not None:
        query = query.where(ReconRun.status == status)
    return list(session.scalars(query.order_by(ReconRun.id.desc()).limit(limit).offset(offset)))


def latest_run(session: Session, org_id: int, *, status: str | None = None) -> ReconRun | None:
    runs = list_runs(session, org_id, status=status, limit=1)
    return runs[0] if runs else None


def update_run(session: Session, org_id: int, run_id: int, **fields: Any) -> ReconRun:
    """Set some of a run's columns; unknown names and bad statuses are programming errors."""
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"cannot update run columns {sorted(unknown)}")
    if "status" in fields and fields["status"] not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {RUN_STATUSES}, got {fields['status']!r}")
    if "progress" in fields and not 0.0 <= float(fields["progress"]) <= 1.0:
        raise ValueError("run progress is a fraction between 0 and 1")
    run = get_run(session, org_id, run_id)
    if run is None:
        raise LookupError(f"run {run_id} not found")
    for name, value in fields.items():
        setattr(run, name, value)
    session.flush()
    return run


def claim_run(session: Session, org_id: int, run_id: int, worker_id: str) -> bool:
    """queued -> running for this worker; False when another worker (or a cancel) got there first."""
    now = datetime.now(UTC)
    result = session.execute(
        update(ReconRun)
        .where(ReconRun.org_id == org_id, ReconRun.id == run_id, ReconRun.status == "queued")
        .values(status="running", worker_id=worker_id, started_at=now, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    claimed = bool(result.rowcount)  # type: ignore[attr-defined]
    if claimed:
        session.expire_all()  # a run object loaded before the UPDATE must not show the stale status
    return claimed


def claim_run_exclusive(session: Session, org_id: int, run_id: int, worker_id: str) -> bool:
    """queued -> running only if no other run of the org is running: one statement, so it is atomic.

    On SQLite the statement holds the database's write lock; on PostgreSQL two concurrent claims
    can both pass the NOT EXISTS, but the partial unique index `ux_recon_runs_one_running`
    (migration 0004) makes the second fail, which is reported here as "not claimed". The UPDATE
    runs in a savepoint so a lost race leaves the caller's transaction usable.
    """
    now = datetime.now(UTC)
    other = aliased(ReconRun)
    busy = exists().where(other.org_id == org_id, other.status == "running")
    try:
        with session.begin_nested():
            result = session.execute(
                update(ReconRun)
                .where(ReconRun.org_id == org_id, ReconRun.id == run_id, ReconRun.status == "queued", ~busy)
                .values(status="running", worker_id=worker_id, started_at=now, heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )
    except IntegrityError:
        return False
    claimed = bool(result.rowcount)  # type: ignore[attr-defined]
    if claimed:
        session.expire_all()
    return claimed


def worker_heartbeat(session: Session, org_id: int, run_id: int, worker_id: str) -> bool:
    """Heartbeat only while the run is still ours and running; False means someone took it from us."""
    result = session.execute(
        update(ReconRun).where(ReconRun.org_id == org_id, ReconRun.id == run_id, ReconRun.status == "running",
                               ReconRun.worker_id == worker_id)
        .values(heartbeat_at=datetime.now(UTC)).execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_interrupted(session: Session, org_id: int, run_id: int, worker_id: str, reason: str) -> bool:
    """running -> interrupted for a run this worker owns (graceful shutdown that could not wait)."""
    result = session.execute(
        update(ReconRun).where(ReconRun.org_id == org_id, ReconRun.id == run_id, ReconRun.status == "running",
                               ReconRun.worker_id == worker_id)
        .values(status="interrupted", finished_at=datetime.now(UTC), error=reason[:2000])
        .execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def recent_schedule_run_exists(session: Session, org_id: int, since: datetime) -> bool:
    """A scheduled run is already waiting, or one was queued after `since` (another scheduler fired too)."""
    query = select(ReconRun.id).where(
        ReconRun.org_id == org_id, ReconRun.trigger == "schedule",
        (ReconRun.status == "queued") | (ReconRun.queued_at >= since)).limit(1)
    return session.execute(query).first() is not None


def interrupted_streak(session: Session, org_id: int, limit: int = 20) -> int:
    """How many of the org's newest runs in a row were interrupted (a crash loop stops auto-retrying)."""
    statuses = session.scalars(select(ReconRun.status).where(ReconRun.org_id == org_id)
                               .order_by(ReconRun.id.desc()).limit(limit))
    streak = 0
    for status in statuses:
        if status != "interrupted":
            break
        streak += 1
    return streak


def has_waiting_run(session: Session, org_id: int) -> bool:
    return session.execute(select(ReconRun.id).where(
        ReconRun.org_id == org_id, ReconRun.status.in_(("queued", "running"))).limit(1)).first() is not None


def heartbeat(session: Session, org_id: int, run_id: int, progress: float | None = None,
              message: str | None = None) -> None:
    """Record that the worker is alive (and how far it got): stale heartbeats mean interrupted."""
    values: dict[str, Any] = {"heartbeat_at": datetime.now(UTC)}
    if progress is not None:
        values["progress"] = min(max(float(progress), 0.0), 1.0)
    if message is not None:
        values["progress_message"] = message[:200]
    session.execute(update(ReconRun).where(ReconRun.org_id == org_id, ReconRun.id == run_id)
                    .values(**values).execution_options(synchronize_session=False))


def queued_runs_all_orgs(session: Session, *, limit: int = 100) -> list[tuple[int, int]]:
    """(org_id, run_id) of queued runs in every org, oldest first. Cross-tenant: system session only."""
    rows = session.execute(select(ReconRun.org_id, ReconRun.id).where(ReconRun.status == "queued")
                           .order_by(ReconRun.queued_at, ReconRun.id).limit(limit))
    return [(org_id, run_id) for org_id, run_id in rows]


def interrupt_stale_runs_all_orgs(session: Session, stale_before: datetime) -> list[tuple[int, int]]:
    """Mark running runs whose last heartbeat is older than `stale_before` as interrupted.

    Cross-tenant (system session): the scheduler calls it on start and periodically, so a run
    whose process died does not show "running" forever. Returns the (org_id, run_id) changed.
    """
    last_sign = func.coalesce(ReconRun.heartbeat_at, ReconRun.started_at, ReconRun.queued_at)
    stale = list(session.execute(select(ReconRun.org_id, ReconRun.id).where(
        and_(ReconRun.status == "running", last_sign < stale_before))))
    for org_id, run_id in stale:
        session.execute(
            update(ReconRun).where(ReconRun.org_id == org_id, ReconRun.id == run_id, ReconRun.status == "running")
            .values(status="interrupted", finished_at=datetime.now(UTC),
                    error="the worker stopped sending heartbeats (process ended or machine restarted)")
            .execution_options(synchronize_session=False))
    return [(org_id, run_id) for org_id, run_id in stale]
