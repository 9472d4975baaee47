"""The scheduler process (`python scheduler.py`): scheduled reconciliations, daily syncs, queued runs.

What it guarantees, and how:

- **Schedules survive restarts.** Each organization's schedule (Settings: cron or interval, with a
  time zone) is an APScheduler job in the app database (`apscheduler_jobs`, migration 0004). The
  job is replaced only when the admin changed the schedule (its signature differs), so a restart
  keeps the stored next fire time; fires missed while no scheduler ran are coalesced into one
  (`coalesce`, `misfire_grace_time`). Admins' edits are picked up by re-reading the settings every
  RRC_SCHEDULER_SETTINGS_POLL_SECONDS.
- **One org cannot stop the others.** Stored schedules are validated again with the Settings bounds
  (a row may predate them or be edited by hand); a bad one is logged (`schedule.invalid`) and gets no
  job, and a failure while re-reading schedules is logged while stale-run recovery and the queue go on.
- **A schedule only queues a run.** The job records a queued run (through
  `services.reconciliation.queue_run`, so it is audited) and the worker loop runs queued runs,
  whoever queued them (the schedule, the app's "Run now", the API). APScheduler 3 does not
  coordinate processes sharing a job store, so two schedulers may both fire one job: the enqueue
  is serialized per org and skipped when a scheduled run is already waiting or was just queued.
- **Never two runs of one org at once**, even across processes: the worker holds a per-org lock
  for the whole run (PostgreSQL: a session advisory lock, released by the server if the process
  dies; SQLite: an flock on a file next to the database, released by the kernel), and claims the
  run with one conditional UPDATE that also requires no other running run of the org, backed by a
  partial unique index (one `running` row per org, migration 0004).
- **No run is lost.** The worker heartbeats while a run executes (the run itself is in a thread so
  the main thread stays free for heartbeats and signals). A run whose worker stopped
  heartbeating for RRC_SCHEDULER_STALE_AFTER_SECONDS is marked interrupted by any scheduler and
  queued again (up to RRC_SCHEDULER_MAX_RETRIES times in a row, so a run that kills its process
  does not loop forever).
- **SIGTERM/SIGINT**: no new run starts; the current one may finish within
  RRC_SCHEDULER_SHUTDOWN_GRACE_SECONDS, else it is marked interrupted (and retried by the next
  scheduler); the process exits 0.

What the process does to runs, schedules and syncs is services/run_queue.py; the per-org locks
are db/locks.py. This module is the process: APScheduler jobs, the worker loop, signals.

Configuration: `config.Settings` (RRC_SCHEDULER_*, RRC_SYNC_CRON, DATABASE_URL). The database must
be migrated first (`python cli.py db upgrade`); the scheduler waits until it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from config import Settings, settings_or_exit
from core.logging import correlation, ensure_logging, get_logger
from db.session import get_engine, is_current
from services import run_queue
from services.run_queue import OrgSchedule
from services.settings import crontab_trigger, validate_schedule

log = get_logger("scheduler")

JOBS_TABLE = "apscheduler_jobs"
JOB_PREFIX = "reconcile-org-"
SYNC_JOB = "sync-daily"
ENQUEUE_FUNC = "scheduler:enqueue_scheduled_run"  # textual references: stored jobs outlive this process
SYNC_FUNC = "scheduler:sync_all_orgs"
DEDUP_SECONDS = 30.0

_WAKE = threading.Event()  # set when there may be work now (a job queued a run, a signal arrived)


# --- jobs (module-level so the job store can reference them by name) ------------------------------

def enqueue_scheduled_run(org_id: int, signature: str = "", dedup_seconds: float = DEDUP_SECONDS) -> int | None:
    """The schedule fired: queue one run for the worker loop, unless one is waiting or was just queued."""
    with correlation(f"schedule-{org_id}-{uuid.uuid4().hex[:8]}", org_id=org_id, job=f"{JOB_PREFIX}{org_id}"):
        try:
            run_id = run_queue.enqueue_scheduled(org_id, dedup_seconds)
        except Exception as exc:  # a job must not take the scheduler down (e.g. the org was just deleted)
            log.error("schedule.enqueue_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        if run_id is None:
            log.info("schedule.coalesced", schedule=signature)
            return None
        log.info("schedule.queued", run_id=run_id, schedule=signature)
        _WAKE.set()
        return run_id


def sync_all_orgs(signature: str = "") -> dict[int, str]:
    """Daily sync of every org with connected systems; one org's failure is logged and the others go on.

    `signature` is the crontab the job was created with, so a changed RRC_SYNC_CRON replaces it.
    """
    outcome: dict[int, str] = {}
    for org_id in run_queue.orgs_to_sync():
        with correlation(f"sync-{org_id}-{uuid.uuid4().hex[:8]}", org_id=org_id, job=SYNC_JOB):
            try:
                result = run_queue.sync_org(org_id)
                outcome[org_id] = "ok"
                log.info("sync.done", result=str(result)[:500])
            except Exception as exc:
                outcome[org_id] = f"{type(exc).__name__}: {exc}"
                log.error("sync.failed", error=outcome[org_id][:500])
    return outcome


# --- schedules ---------------------------------------------------------------------------------

def trigger_for(schedule: OrgSchedule) -> BaseTrigger | None:
    """The APScheduler trigger of an org's schedule; None when off; ServiceError when invalid.

    Stored rows are validated again with the service's bounds: they may predate them or be edited by hand.
    """
    if schedule.kind == "off":
        return None
    validate_schedule(schedule.kind, schedule.expr, schedule.timezone)
    if schedule.kind == "cron":
        return crontab_trigger(schedule.expr or "", schedule.timezone)
    return IntervalTrigger(seconds=int(schedule.expr or "0"), timezone=schedule.timezone)


def build_scheduler(settings: Settings) -> BackgroundScheduler:
    store = SQLAlchemyJobStore(engine=get_engine(), tablename=JOBS_TABLE)
    return BackgroundScheduler(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": settings.scheduler_misfire_grace_seconds},
        timezone=UTC,
    )


def sync_schedules(scheduler: BackgroundScheduler, settings: Settings) -> Counter[str]:
    """Make the stored jobs match the orgs' settings; unchanged schedules keep their next fire time.

    Each org is handled on its own: a schedule that cannot be built (stored before validation
    tightened, or edited in the database) is logged and its job removed, and an unexpected error on
    one org keeps that org's current job; neither stops the other orgs' schedules.
    """
    wanted = run_queue.schedules()
    jobs = {job.id: job for job in scheduler.get_jobs()}
    changes: Counter[str] = Counter()
    keep: set[str] = set()
    for schedule in wanted:
        job_id = f"{JOB_PREFIX}{schedule.org_id}"
        try:
            trigger = trigger_for(schedule)
        except Exception as exc:  # ServiceError for a bad stored schedule; anything else must not spread either
            log.error("schedule.invalid", org_id=schedule.org_id, kind=schedule.kind,
                      error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        if trigger is None:
            continue
        keep.add(job_id)
        job = jobs.get(job_id)
        if job is not None and job.kwargs.get("signature") == schedule.signature:
            continue
        dedup = min(DEDUP_SECONDS, int(schedule.expr or "0") / 2) if schedule.kind == "interval" else DEDUP_SECONDS
        try:
            scheduler.add_job(ENQUEUE_FUNC, trigger, id=job_id, name=f"reconcile org {schedule.org_id}",
                              kwargs={"org_id": schedule.org_id, "signature": schedule.signature,
                                      "dedup_seconds": dedup},
                              replace_existing=True)
        except Exception as exc:  # the next settings poll tries again; other orgs go on
            log.error("schedule.set_failed", org_id=schedule.org_id, error=f"{type(exc).__name__}: {exc}"[:500])
            continue
        changes["replaced" if job else "added"] += 1
        log.info("schedule.set", org_id=schedule.org_id, schedule=schedule.signature)
    for job_id in jobs:
        if job_id.startswith(JOB_PREFIX) and job_id not in keep:
            with contextlib.suppress(JobLookupError):  # another scheduler removed it first
                scheduler.remove_job(job_id)
            changes["removed"] += 1
            log.info("schedule.removed", job=job_id)
    sync_job = jobs.get(SYNC_JOB)
    if settings.sync_enabled:
        if sync_job is None or sync_job.kwargs.get("signature") != settings.sync_cron:
            scheduler.add_job(SYNC_FUNC, crontab_trigger(settings.sync_cron, "UTC"), id=SYNC_JOB,
                              name="daily sync of connected sources", kwargs={"signature": settings.sync_cron},
                              replace_existing=True)
            changes["sync"] += 1
    elif sync_job is not None:
        with contextlib.suppress(JobLookupError):
            scheduler.remove_job(SYNC_JOB)
        changes["sync"] += 1
    if changes:
        scheduler.wakeup()
    return changes


# --- the worker --------------------------------------------------------------------------------

class Worker:
    """One scheduler process: the APScheduler thread plus a main loop that runs queued runs one at a time."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = (worker_id or settings.scheduler_worker_id
                          or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")[:100]
        self.stop = threading.Event()
        self.abandoned = False
        self.scheduler: BackgroundScheduler | None = None

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: no new run starts; the main loop decides about the current one."""
        self.stop.set()
        _WAKE.set()

    def wait_for_database(self) -> bool:
        """Wait until the database answers and is migrated (the API and the migration may start together)."""
        waited = False
        while not self.stop.is_set():
            try:
                if is_current():
                    return True
            except Exception as exc:
                log.warning("database.unavailable", error=type(exc).__name__)
            if not waited:
                log.info("database.waiting", hint="run `python cli.py db upgrade`")
                waited = True
            self.stop.wait(min(self.settings.scheduler_poll_seconds, 2.0))
        return False

    def start_scheduler(self) -> None:
        self.scheduler = build_scheduler(self.settings)
        self.scheduler.start()
        self.refresh_schedules()

    def refresh_schedules(self) -> None:
        """Re-read the schedules; a failure is logged and retried at the next poll, never ending the process."""
        if self.scheduler is None:
            return
        try:
            sync_schedules(self.scheduler, self.settings)
        except Exception as exc:  # stale-run recovery and queued runs must go on regardless
            log.error("schedule.refresh_failed", error=f"{type(exc).__name__}: {exc}"[:1000])

    def recover_stale(self) -> list[tuple[int, int]]:
        """Mark runs whose worker went silent as interrupted, and queue them again."""
        stale = run_queue.interrupt_stale(
            datetime.now(UTC) - timedelta(seconds=self.settings.scheduler_stale_after_seconds))
        for org_id, run_id in stale:
            log.warning("run.interrupted", org_id=org_id, run_id=run_id, reason="no heartbeat")
            retry = run_queue.retry(org_id, run_id, self.settings.scheduler_max_retries)
            if retry.run_id is None:
                log.info("run.not_retried", org_id=org_id, run_id=run_id,
                         interrupted_in_a_row=retry.interrupted_in_a_row, other_run_waiting=retry.other_run_waiting)
            else:
                log.info("run.retry_queued", org_id=org_id, run_id=run_id, retry_run_id=retry.run_id)
        return stale

    def run_pending(self) -> bool:
        """Claim and run one queued run (oldest first, skipping orgs busy elsewhere); False when none could be."""
        for org_id, run_id in run_queue.queued():
            if self.stop.is_set():
                return False
            with run_queue.claimed(org_id, run_id, self.worker_id) as claimed:
                if claimed:
                    self._execute(org_id, run_id)
                    return True
        return False

    def _execute(self, org_id: int, run_id: int) -> None:
        def target() -> None:
            with correlation(f"run-{run_id}", org_id=org_id, run_id=run_id):
                log.info("run.started", worker=self.worker_id)
                try:
                    run = run_queue.execute(org_id, run_id)
                    log.info("run.finished", status=run.status, error=run.error)
                except Exception as exc:  # run_reconciliation marked it failed already
                    log.error("run.crashed", error=f"{type(exc).__name__}: {exc}"[:1000])

        thread = threading.Thread(target=target, name=f"run-{run_id}", daemon=True)
        thread.start()
        beat = self.settings.scheduler_heartbeat_seconds
        next_beat = time.monotonic() + beat
        deadline: float | None = None
        while thread.is_alive():
            thread.join(0.1)
            now = time.monotonic()
            if now >= next_beat and thread.is_alive():
                next_beat = now + beat
                try:
                    run_queue.heartbeat(org_id, run_id, self.worker_id)
                except Exception as exc:  # the next beat will try again; the stale timeout is the backstop
                    log.warning("run.heartbeat_failed", run_id=run_id, error=type(exc).__name__)
            if self.stop.is_set() and thread.is_alive():
                if deadline is None:
                    deadline = now + self.settings.scheduler_shutdown_grace_seconds
                    log.info("shutdown.waiting_for_run", run_id=run_id,
                             grace_seconds=self.settings.scheduler_shutdown_grace_seconds)
                elif now >= deadline:
                    self._abandon(org_id, run_id)
                    return

    def _abandon(self, org_id: int, run_id: int) -> None:
        reason = "the scheduler was stopped (SIGTERM) before the run finished; it will be retried"
        try:
            run_queue.interrupt(org_id, run_id, self.worker_id, reason)
            log.warning("run.interrupted", org_id=org_id, run_id=run_id, reason="shutdown")
        except Exception as exc:  # the stale timeout will catch it instead
            log.error("run.interrupt_failed", run_id=run_id, error=type(exc).__name__)
        self.abandoned = True

    def tick(self, refresh_schedules: bool) -> None:
        if refresh_schedules:
            self.refresh_schedules()
        self.recover_stale()
        while not self.stop.is_set() and self.run_pending():
            pass

    def serve(self) -> int:
        """The main loop; returns the exit code (0 after a requested stop)."""
        if not self.wait_for_database():
            return 0
        self.start_scheduler()
        log.info("scheduler.started", worker=self.worker_id)
        next_refresh = time.monotonic() + self.settings.scheduler_settings_poll_seconds
        try:
            while not self.stop.is_set():
                refresh = time.monotonic() >= next_refresh
                if refresh:
                    next_refresh = time.monotonic() + self.settings.scheduler_settings_poll_seconds
                try:
                    self.tick(refresh)
                except Exception as exc:  # database gone for a moment: log, wait, try again
                    log.error("scheduler.tick_failed", error=f"{type(exc).__name__}: {exc}"[:1000])
                if self.abandoned:
                    break
                _WAKE.wait(self.settings.scheduler_poll_seconds)
                _WAKE.clear()
        finally:
            if self.scheduler is not None and self.scheduler.running:
                self.scheduler.shutdown(wait=False)
        log.info("scheduler.stopped", worker=self.worker_id)
        return 0


def main() -> int:
    settings = settings_or_exit()  # a bad variable ends the process here (exit 2), before any run starts
    ensure_logging(settings.log_level)
    worker = Worker(settings)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    return worker.serve()


if __name__ == "__main__":
    import scheduler as _self  # run as the `scheduler` module, the name stored jobs refer to

    code = _self.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a run thread or a sync may still be inside C code; both are safe to drop (see above)
