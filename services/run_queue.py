"""What the scheduler process does to runs, schedules and syncs, as use cases of its own.

The scheduler serves every organization, so the listings here (`schedules`, `orgs_to_sync`,
`queued`, `interrupt_stale`) read across tenants through the system session; everything that acts
does so on one org, as the system actor "scheduler", inside that org's scoped session.

Two per-org locks keep the processes sharing a database out of each other's way (db/locks.py):
RUN_LOCK is held for a whole run or sync (never two of one org at once, even across machines on
PostgreSQL), ENQUEUE_LOCK serializes queuing, so two schedulers firing one job queue one run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from db.locks import org_lock
from db.models import ReconRun
from db.repositories import runs as runs_repo
from db.repositories.schedules import OrgSchedule, orgs_with_integrations, schedules_all_orgs
from db.session import org_session, system_session
from services import reconciliation, sync
from services.context import Actor

RUN_LOCK = 0x52520001  # advisory lock namespaces (int4)
ENQUEUE_LOCK = 0x52520002
ACTOR_NAME = "scheduler"


def _actor(org_id: int) -> Actor:
    return Actor.system(org_id, ACTOR_NAME)


def schedules() -> list[OrgSchedule]:
    """Every organization's reconciliation schedule ("off" where none was set)."""
    with system_session() as session:
        return schedules_all_orgs(session)


def orgs_to_sync() -> list[int]:
    """Organizations with a connected system: the daily sync visits only those."""
    with system_session() as session:
        return orgs_with_integrations(session)


def enqueue_scheduled(org_id: int, dedup_seconds: float) -> int | None:
    """The org's schedule fired: queue a run, unless a scheduled one was queued within `dedup_seconds`.

    APScheduler 3 does not coordinate processes sharing a job store, so two schedulers may both fire
    one job; the lock makes the second one see the first one's run."""
    with org_lock(ENQUEUE_LOCK, org_id, wait=True):
        since = datetime.now(UTC) - timedelta(seconds=dedup_seconds)
        with org_session(org_id) as session:
            if runs_repo.recent_schedule_run_exists(session, org_id, since):
                return None
        return reconciliation.queue_run(_actor(org_id), trigger="schedule").id


def sync_org(org_id: int) -> sync.SyncReport:
    """Sync one org's connected systems, holding its run lock: a sync rewrites the bundle a
    reconciliation of the same org would be reading."""
    with org_lock(RUN_LOCK, org_id, wait=True):
        return sync.sync(_actor(org_id))


def queued() -> list[tuple[int, int]]:
    """(org id, run id) of the queued runs of every org, oldest first."""
    with system_session() as session:
        return runs_repo.queued_runs_all_orgs(session)


@contextmanager
def claimed(org_id: int, run_id: int, worker_id: str) -> Iterator[bool]:
    """Hold the org's run lock and claim the queued run for `worker_id` for the whole block.

    Yields False, holding nothing, when another process runs this org or the run was taken; the
    claim also requires no other running run of the org (a partial unique index backs it)."""
    with org_lock(RUN_LOCK, org_id, wait=False) as got:
        if got:
            with org_session(org_id) as session:
                got = runs_repo.claim_run_exclusive(session, org_id, run_id, worker_id)
        yield got


def execute(org_id: int, run_id: int) -> ReconRun:
    """Run a claimed run to its end (succeeded or failed, recorded either way)."""
    return reconciliation.run_reconciliation(_actor(org_id), run_id=run_id, trigger="schedule")


def heartbeat(org_id: int, run_id: int, worker_id: str) -> None:
    """The worker is alive: a run whose heartbeat stops is taken as interrupted (`interrupt_stale`)."""
    with org_session(org_id) as session:
        runs_repo.worker_heartbeat(session, org_id, run_id, worker_id)


def interrupt(org_id: int, run_id: int, worker_id: str, reason: str) -> None:
    """The worker gives the run up (it is stopping); another scheduler will retry it."""
    with org_session(org_id) as session:
        runs_repo.mark_interrupted(session, org_id, run_id, worker_id, reason)


def interrupt_stale(stale_before: datetime) -> list[tuple[int, int]]:
    """Mark every running run whose last heartbeat is older than `stale_before` as interrupted."""
    with system_session() as session:
        return runs_repo.interrupt_stale_runs_all_orgs(session, stale_before)


@dataclass(frozen=True)
class Retry:
    run_id: int | None  # the run queued again, None when not retried
    interrupted_in_a_row: int
    other_run_waiting: bool


def retry(org_id: int, run_id: int, max_retries: int) -> Retry:
    """Queue an interrupted run again, unless the org has a run waiting already or its runs were
    interrupted more than `max_retries` times in a row (a run that kills its process must not loop)."""
    with org_lock(ENQUEUE_LOCK, org_id, wait=True):
        with org_session(org_id) as session:
            streak = runs_repo.interrupted_streak(session, org_id)
            waiting = runs_repo.has_waiting_run(session, org_id)
            run = runs_repo.get_run(session, org_id, run_id)
        if run is None or waiting or streak > max_retries:
            return Retry(None, streak, waiting)
        return Retry(reconciliation.queue_run(_actor(org_id), trigger=run.trigger).id, streak, waiting)
