"""The scheduler on SQLite and PostgreSQL: claims, locks, schedules, and real processes.

The process tests start `python scheduler.py` as subprocesses against the test database. A run
is made to block on purpose by turning the org's `accounts.csv` into a named pipe (FIFO): the
reconciliation's open() waits until the test writes the file, so "a run is in progress" is a
state the test controls instead of a race against the clock.
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

import config
import scheduler
from core.demo import generate_demo_bundle
from db.locks import org_lock
from db.models import AuditEntry, OrgSettings, ReconRun
from db.repositories import runs as runs_repo
from db.session import get_engine, org_session, system_session
from services import integrations, reconciliation, run_queue, settings, users
from services.context import Actor
from services.errors import InvalidInput

ROOT = Path(__file__).resolve().parent.parent
FAST = {
    "RRC_SCHEDULER_POLL_SECONDS": "0.2",
    "RRC_SCHEDULER_SETTINGS_POLL_SECONDS": "0.5",
    "RRC_SCHEDULER_HEARTBEAT_SECONDS": "0.3",
    "RRC_SCHEDULER_STALE_AFTER_SECONDS": "3",
    "RRC_SCHEDULER_SHUTDOWN_GRACE_SECONDS": "20",
    "RRC_SYNC_CRON": "off",
    "RRC_SCHEDULER_MIN_INTERVAL_SECONDS": "1",  # lets the real-process tests use 2-second schedules
}


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "demo"
    generate_demo_bundle(folder, accounts=6, seed=3)
    return folder


def make_org(slug: str, bundle: Path, target: Path) -> Actor:
    """An organization whose data source is a private copy of the demo bundle."""
    shutil.copytree(bundle, target)
    org, admin = users.create_organization(slug.title(), slug, f"admin@{slug}.example", "Admin", "password-1")
    actor = Actor.user(org.id, admin.id, "admin")
    settings.set_data_source(actor, {"kind": "bundle", "path": str(target)})
    return actor


class BlockedBundle:
    """Makes every reconciliation of a bundle wait in open() until `release()`."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "accounts.csv"
        self.content = self.path.read_bytes()
        self.path.unlink()
        os.mkfifo(self.path)

    def release(self) -> None:
        """Put the real file back, then feed the reader already waiting on the pipe (if any)."""
        pipe = self.path.with_name("accounts.fifo")
        os.rename(self.path, pipe)
        self.path.write_bytes(self.content)
        try:
            fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is reading (the reader was killed)
            pipe.unlink()
            return
        with os.fdopen(fd, "wb") as handle:
            handle.write(self.content)
        pipe.unlink()


def runs_of(org_id: int) -> list[ReconRun]:
    with system_session() as session:
        return list(session.scalars(sa.select(ReconRun).where(ReconRun.org_id == org_id).order_by(ReconRun.id)))


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Process:
    """A `python scheduler.py` subprocess with its log kept for failure messages."""

    def __init__(self, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        environment = {**os.environ, **FAST, **env}
        self.handle = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen([sys.executable, "scheduler.py"], cwd=ROOT, env=environment,
                                     stdout=self.handle, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.handle.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.handle.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(name: str = "s", **env: str) -> Process:
        process = Process(tmp_path / f"{name}.log", **env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.kill()


# --- in-process: the building blocks ------------------------------------------------------------

def test_claim_is_exclusive_per_org(app_db: str, demo_bundle: Path, tmp_path: Path) -> None:
    a = make_org("org-a", demo_bundle, tmp_path / "a")
    b = make_org("org-b", demo_bundle, tmp_path / "b")
    first = reconciliation.queue_run(a)
    assert reconciliation.queue_run(a).id == first.id  # one run waits per org, however often one asks
    other = reconciliation.queue_run(b)
    with org_session(a.org_id) as session:
        assert runs_repo.claim_run_exclusive(session, a.org_id, first.id, "w1")
    second = reconciliation.queue_run(a)  # the claim freed the org's queued slot: the next run waits
    assert second.id != first.id
    with org_session(a.org_id) as session:
        assert not runs_repo.claim_run_exclusive(session, a.org_id, first.id, "w2"), "claimed twice"
        assert not runs_repo.claim_run_exclusive(session, a.org_id, second.id, "w2"), "org ran twice at once"
    with org_session(b.org_id) as session:
        assert runs_repo.claim_run_exclusive(session, b.org_id, other.id, "w2"), "another org must not wait"
    # the database itself refuses a second running row, whoever writes it
    with pytest.raises(sa.exc.IntegrityError), org_session(a.org_id) as session:
        runs_repo.create_run(session, a.org_id, trigger="cli", status="running")
    with org_session(a.org_id) as session:
        runs_repo.update_run(session, a.org_id, first.id, status="succeeded", finished_at=datetime.now(UTC))
    with org_session(a.org_id) as session:
        assert runs_repo.claim_run_exclusive(session, a.org_id, second.id, "w2")


def test_org_lock_excludes_a_second_holder(app_db: str) -> None:
    with org_lock(run_queue.RUN_LOCK, 1, wait=False) as got:
        assert got
        with org_lock(run_queue.RUN_LOCK, 1, wait=False) as again:
            assert not again
        with org_lock(run_queue.RUN_LOCK, 2, wait=False) as other_org:
            assert other_org
    with org_lock(run_queue.RUN_LOCK, 1, wait=False) as after:
        assert after


def test_schedules_follow_settings_and_keep_their_next_fire_time(
        app_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_SYNC_CRON", "off")
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    opts = config.load_settings()
    sched = scheduler.build_scheduler(opts)
    sched.start(paused=True)
    try:
        job_id = f"{scheduler.JOB_PREFIX}{actor.org_id}"
        assert not scheduler.sync_schedules(sched, opts) and sched.get_job(job_id) is None  # "off" by default
        settings.update_schedule(actor, "interval", "3600", "UTC")
        assert scheduler.sync_schedules(sched, opts) == {"added": 1}
        first = sched.get_job(job_id).next_run_time
        assert timedelta(seconds=3500) < first - datetime.now(UTC) <= timedelta(seconds=3600)
        time.sleep(0.05)
        assert not scheduler.sync_schedules(sched, opts), "an unchanged schedule must not be touched"
        assert sched.get_job(job_id).next_run_time == first
        settings.update_schedule(actor, "cron", "30 6 * * 1", "Europe/Paris")
        assert scheduler.sync_schedules(sched, opts) == {"replaced": 1}
        job = sched.get_job(job_id)
        fire = job.next_run_time.astimezone(ZoneInfo("Europe/Paris"))
        assert (fire.weekday(), fire.hour, fire.minute) == (0, 6, 30), "crontab's 1 is Monday"
        settings.update_schedule(actor, "off", None, "UTC")
        assert scheduler.sync_schedules(sched, opts) == {"removed": 1}
        assert sched.get_job(job_id) is None
        monkeypatch.setenv("RRC_SYNC_CRON", "15 2 * * *")
        assert scheduler.sync_schedules(sched, config.load_settings()) == {"sync": 1}
        assert sched.get_job(scheduler.SYNC_JOB) is not None
    finally:
        sched.shutdown(wait=False)


@pytest.mark.parametrize(("expr", "days"), [
    ("0 6 * * 1", "mon"), ("0 6 * * 0", "sun"), ("0 6 * * 7", "sun"), ("0 6 * * 1-5", "mon,tue,wed,thu,fri"),
    ("0 6 * * */2", "sun,tue,thu,sat"), ("0 6 * * 5,6", "fri,sat"), ("0 6 * * mon-fri", "mon-fri"), ("0 6 * * *", "*"),
    ("0 6 * * sun,1", "sun,mon"), ("0 6 * * 6-7", "sun,sat"),
])
def test_crontab_days_mean_what_crontab_means(expr: str, days: str) -> None:
    trigger = scheduler.crontab_trigger(expr, "UTC")
    assert str(next(f for f in trigger.fields if f.name == "day_of_week")) == days
    settings.validate_schedule("cron", expr, "UTC")  # what the scheduler runs, the Settings page accepts


@pytest.mark.parametrize("days", ["8", "5-1"])
def test_a_day_of_week_crontab_cannot_read_is_refused_naming_it(days: str) -> None:
    with pytest.raises(InvalidInput, match=f"cron expression '0 6 \\* \\* {days}'") as refused:
        settings.validate_schedule("cron", f"0 6 * * {days}", "UTC")
    assert "number of fields" not in str(refused.value)


def test_scheduled_enqueue_is_audited_and_coalesced(app_db: str, demo_bundle: Path, tmp_path: Path) -> None:
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    run_id = scheduler.enqueue_scheduled_run(actor.org_id, "interval|60|UTC", 30)
    assert run_id is not None
    assert scheduler.enqueue_scheduled_run(actor.org_id, "interval|60|UTC", 30) is None, "second fire coalesced"
    assert [(r.trigger, r.status) for r in runs_of(actor.org_id)] == [("schedule", "queued")]
    with org_session(actor.org_id) as session:
        entry = session.scalars(sa.select(AuditEntry).where(AuditEntry.action == "run.queued")).one()
        assert entry.actor == "system:scheduler" and entry.details == {"trigger": "schedule"}


def test_worker_runs_queued_runs_and_recovers_stale_ones(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    worker = scheduler.Worker(config.load_settings(), worker_id="test-worker")
    queued = reconciliation.queue_run(actor)
    assert worker.run_pending() and not worker.run_pending()
    run = runs_of(actor.org_id)[-1]
    assert (run.id, run.status, run.worker_id) == (queued.id, "succeeded", "test-worker")
    assert run.counts and run.counts["anomalies"] > 0
    # a worker that died mid-run: its row says running, its heartbeat is old
    old = datetime.now(UTC) - timedelta(minutes=10)
    with org_session(actor.org_id) as session:
        dead = runs_repo.create_run(session, actor.org_id, trigger="manual", status="running")
        runs_repo.update_run(session, actor.org_id, dead.id, heartbeat_at=old, worker_id="dead")
    assert worker.recover_stale() == [(actor.org_id, dead.id)]
    history = runs_of(actor.org_id)
    assert history[-2].status == "interrupted" and "heartbeat" in (history[-2].error or "")
    retry = history[-1]
    assert (retry.status, retry.trigger) == ("queued", "manual")
    # the retry dies too: a crash loop is not retried forever (RRC_SCHEDULER_MAX_RETRIES=1)
    with org_session(actor.org_id) as session:
        assert runs_repo.claim_run_exclusive(session, actor.org_id, retry.id, "dead")
        runs_repo.update_run(session, actor.org_id, retry.id, heartbeat_at=old)
    assert worker.recover_stale() == [(actor.org_id, retry.id)]
    assert [r.status for r in runs_of(actor.org_id)][-2:] == ["interrupted", "interrupted"]


def _store_schedule(org_id: int, kind: str, expr: str) -> None:
    """Write a schedule past the service's validation, as a row saved before it or edited by hand would be."""
    with org_session(org_id) as session:
        row = session.get(OrgSettings, org_id)
        assert row is not None
        row.schedule_kind, row.schedule_expr = kind, expr


def _dead_run(org_id: int) -> int:
    """A run whose worker died: it says running, its heartbeat is old."""
    with org_session(org_id) as session:
        dead = runs_repo.create_run(session, org_id, trigger="manual", status="running")
        runs_repo.update_run(session, org_id, dead.id, heartbeat_at=datetime.now(UTC) - timedelta(minutes=10),
                             worker_id="dead")
        return dead.id


def test_a_bad_stored_schedule_is_skipped_and_never_stops_other_orgs(
        app_db: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS")  # the production bounds
    bad = make_org("org-bad", demo_bundle, tmp_path / "bad")
    good = make_org("org-good", demo_bundle, tmp_path / "good")
    edited = make_org("org-edited", demo_bundle, tmp_path / "edited")
    settings.update_schedule(good, "interval", "3600", "UTC")
    settings.update_schedule(edited, "cron", "0 6 * * *", "UTC")
    _store_schedule(bad.org_id, "interval", "99999999999999999999")  # IntervalTrigger: OverflowError

    def job_ids() -> set[str]:
        assert worker.scheduler is not None
        return {job.id for job in worker.scheduler.get_jobs()}

    worker = scheduler.Worker(config.load_settings(), worker_id="test-worker")
    try:
        with capture_logs() as logs:
            worker.start_scheduler()  # used to crash here, for every org
        assert job_ids() == {f"{scheduler.JOB_PREFIX}{good.org_id}", f"{scheduler.JOB_PREFIX}{edited.org_id}"}
        (invalid,) = [entry for entry in logs if entry["event"] == "schedule.invalid"]
        assert invalid["org_id"] == bad.org_id and "interval: " in invalid["error"]
        # an org's valid schedule edited into one firing every second loses its job at the next refresh,
        # and the same tick still recovers another org's stale run and runs the retry
        _store_schedule(edited.org_id, "interval", "0")
        dead = _dead_run(good.org_id)
        worker.tick(refresh_schedules=True)
        assert job_ids() == {f"{scheduler.JOB_PREFIX}{good.org_id}"}
        assert [(r.id == dead, r.status) for r in runs_of(good.org_id)] == [(True, "interrupted"), (False, "succeeded")]
        # even when reading the schedules fails altogether, stale runs are still recovered
        monkeypatch.setattr(run_queue, "schedules", lambda: 1 / 0)
        dead = _dead_run(good.org_id)
        with capture_logs() as logs:
            worker.tick(refresh_schedules=True)
        assert runs_of(good.org_id)[-2].id == dead and runs_of(good.org_id)[-2].status == "interrupted"
        assert any(entry["event"] == "schedule.refresh_failed" and "ZeroDivisionError" in entry["error"]
                   for entry in logs)
    finally:
        if worker.scheduler is not None and worker.scheduler.running:
            worker.scheduler.shutdown(wait=False)


def test_daily_sync_visits_connected_orgs_and_survives_their_failures(app_db: str, demo_bundle: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_SQL_SOURCE_FILE_DIRS", str(tmp_path))  # the SQLite usage source below lives there
    connected = make_org("org-a", demo_bundle, tmp_path / "a")
    idle = make_org("org-b", demo_bundle, tmp_path / "b")
    integrations.connect(connected, "sql_source", {
        "url": f"sqlite:///{tmp_path / 'usage.db'}", "table": "usage",
        "columns": {"account_id": "account", "product_key": "product", "ts": "ts", "units": "units"}})
    outcome = scheduler.sync_all_orgs("0 3 * * *")
    assert set(outcome) == {connected.org_id}, "orgs without integrations are not synced"
    assert outcome[connected.org_id] != "ok" and "Stripe" in outcome[connected.org_id]  # reported, not raised
    with org_session(connected.org_id) as session:
        failure = session.scalars(sa.select(AuditEntry).where(AuditEntry.action == "sync.failed")).one()
        assert failure.actor == "system:scheduler"
    assert idle.org_id not in outcome


def test_bad_configuration_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_SCHEDULER_POLL_SECONDS", "soon")
    with pytest.raises(config.ConfigError, match="RRC_SCHEDULER_POLL_SECONDS"):
        config.load_settings()
    monkeypatch.setenv("RRC_SCHEDULER_POLL_SECONDS", "1")
    monkeypatch.setenv("RRC_SCHEDULER_HEARTBEAT_SECONDS", "10")
    monkeypatch.setenv("RRC_SCHEDULER_STALE_AFTER_SECONDS", "15")
    with pytest.raises(config.ConfigError, match="RRC_SCHEDULER_STALE_AFTER_SECONDS"):
        config.load_settings()
    monkeypatch.setenv("RRC_SCHEDULER_STALE_AFTER_SECONDS", "60")
    monkeypatch.setenv("RRC_SYNC_CRON", "every day")
    with pytest.raises(config.ConfigError, match="RRC_SYNC_CRON"):
        config.load_settings()
    result = subprocess.run([sys.executable, "scheduler.py"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ})
    assert result.returncode == 2 and "RRC_SYNC_CRON" in result.stderr


# --- real processes ----------------------------------------------------------------------------

@pytest.mark.slow
def test_schedule_fires_in_a_real_process_and_sigterm_exits_0(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                              processes: Callable[..., Process],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", FAST["RRC_SCHEDULER_MIN_INTERVAL_SECONDS"])
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    settings.update_schedule(actor, "interval", "2", "UTC")
    proc = processes()
    wait_for(lambda: any(r.trigger == "schedule" and r.status == "succeeded" for r in runs_of(actor.org_id)),
             what=f"a scheduled run to succeed; log:\n{proc.log()}")
    run = next(r for r in runs_of(actor.org_id) if r.status == "succeeded")
    assert run.worker_id and run.counts and run.counts["anomalies"] > 0
    assert proc.stop() == 0, proc.log()
    assert "scheduler.stopped" in proc.log()


@pytest.mark.slow
def test_two_schedulers_never_run_one_org_at_once(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                 processes: Callable[..., Process]) -> None:
    a = make_org("org-a", demo_bundle, tmp_path / "a")
    b = make_org("org-b", demo_bundle, tmp_path / "b")
    blocked = BlockedBundle(tmp_path / "a")
    runs_a = [reconciliation.queue_run(a).id]
    run_b = reconciliation.queue_run(b).id
    first, second = processes("one"), processes("two")
    try:
        wait_for(lambda: any(r.status == "running" for r in runs_of(a.org_id)), what="org A's run to start")
        runs_a.append(reconciliation.queue_run(a).id)  # waits behind the running one (one queued run per org)
        # the other process is free, so it runs org B meanwhile, but never a second run of org A
        wait_for(lambda: runs_of(b.org_id)[-1].status == "succeeded", what="org B's run")
        time.sleep(1.5)
        statuses = [r.status for r in runs_of(a.org_id)]
        assert statuses == ["running", "queued"], statuses
    finally:
        blocked.release()
    wait_for(lambda: all(r.status == "succeeded" for r in runs_of(a.org_id)), what="all runs of org A")
    done = runs_of(a.org_id)
    assert [r.id for r in done] == runs_a
    spans = sorted((r.started_at, r.finished_at) for r in done)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"runs overlapped: {spans}"
    workers = {r.worker_id for r in [*done, *runs_of(b.org_id)]}
    assert run_b and len(workers) == 2, "both processes did work"
    assert first.stop() == 0 and second.stop() == 0


def _rewind_job(url: str, job_id: str, seconds: float) -> None:
    """Pretend the scheduler was down: move the stored job's next fire time into the past."""
    engine = get_engine(url)
    with engine.begin() as conn:
        state = pickle.loads(conn.execute(sa.text("SELECT job_state FROM apscheduler_jobs WHERE id = :id"),
                                          {"id": job_id}).scalar_one())
        state["next_run_time"] = datetime.now(UTC) - timedelta(seconds=seconds)
        conn.execute(sa.text("UPDATE apscheduler_jobs SET job_state = :s, next_run_time = :t WHERE id = :id"),
                     {"s": pickle.dumps(state), "t": state["next_run_time"].timestamp(), "id": job_id})


def _stored_next_run(url: str, job_id: str) -> float | None:
    with get_engine(url).connect() as conn:
        return conn.execute(sa.text("SELECT next_run_time FROM apscheduler_jobs WHERE id = :id"),
                            {"id": job_id}).scalar()


@pytest.mark.slow
def test_restart_keeps_schedules_and_runs_missed_fires_once(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                            processes: Callable[..., Process]) -> None:
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    settings.update_schedule(actor, "interval", "600", "UTC")
    job_id = f"{scheduler.JOB_PREFIX}{actor.org_id}"
    first = processes("first")
    stored = wait_for(lambda: _stored_next_run(app_db, job_id), what=f"the job to be stored; log:\n{first.log()}")
    assert first.stop() == 0
    second = processes("second")
    wait_for(lambda: "scheduler.started" in second.log(), what=f"second start; log:\n{second.log()}")
    time.sleep(1.5)  # several settings polls
    assert _stored_next_run(app_db, job_id) == stored, "a restart must keep the stored next fire time"
    assert second.stop() == 0
    assert runs_of(actor.org_id) == []
    _rewind_job(app_db, job_id, 3000)  # down for 50 minutes: 5 fires of a 10-minute schedule were missed
    third = processes("third")
    wait_for(lambda: any(r.status == "succeeded" for r in runs_of(actor.org_id)),
             what=f"the missed run; log:\n{third.log()}")
    time.sleep(1.5)
    assert [(r.trigger, r.status) for r in runs_of(actor.org_id)] == [("schedule", "succeeded")], "fires coalesced"
    assert _stored_next_run(app_db, job_id) > time.time() + 500, "the next fire is back on the schedule"
    assert third.stop() == 0


@pytest.mark.slow
def test_a_run_killed_mid_way_is_interrupted_and_retried(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                        processes: Callable[..., Process]) -> None:
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    blocked = BlockedBundle(tmp_path / "a")
    run_id = reconciliation.queue_run(actor).id
    victim = processes("victim")
    wait_for(lambda: runs_of(actor.org_id)[0].status == "running", what=f"the run to start; log:\n{victim.log()}")
    victim.kill()  # SIGKILL: no cleanup at all
    assert runs_of(actor.org_id)[0].status == "running"
    blocked.release()
    rescuer = processes("rescuer")
    wait_for(lambda: len(runs_of(actor.org_id)) == 2 and runs_of(actor.org_id)[1].status == "succeeded",
             what=f"the retry to succeed; log:\n{rescuer.log()}")
    crashed, retry = runs_of(actor.org_id)
    assert (crashed.id, crashed.status) == (run_id, "interrupted") and "heartbeat" in (crashed.error or "")
    assert retry.trigger == crashed.trigger and retry.worker_id != crashed.worker_id
    assert rescuer.stop() == 0


@pytest.mark.slow
def test_sigterm_during_a_run_marks_it_interrupted_after_the_grace(app_db: str, demo_bundle: Path, tmp_path: Path,
                                                                   processes: Callable[..., Process]) -> None:
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    blocked = BlockedBundle(tmp_path / "a")
    reconciliation.queue_run(actor)
    proc = processes(RRC_SCHEDULER_SHUTDOWN_GRACE_SECONDS="1")
    wait_for(lambda: runs_of(actor.org_id)[0].status == "running", what=f"the run to start; log:\n{proc.log()}")
    started = time.monotonic()
    assert proc.stop() == 0, proc.log()
    assert time.monotonic() - started < 10
    run = runs_of(actor.org_id)[0]
    assert run.status == "interrupted" and "SIGTERM" in (run.error or "")
    blocked.release()


@pytest.mark.slow
def test_sigterm_lets_a_short_run_finish(app_db: str, demo_bundle: Path, tmp_path: Path,
                                         processes: Callable[..., Process]) -> None:
    actor = make_org("org-a", demo_bundle, tmp_path / "a")
    blocked = BlockedBundle(tmp_path / "a")
    reconciliation.queue_run(actor)
    proc = processes()
    wait_for(lambda: runs_of(actor.org_id)[0].status == "running", what=f"the run to start; log:\n{proc.log()}")
    proc.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "shutdown.waiting_for_run" in proc.log(), what="the scheduler to wait for its run")
    blocked.release()
    assert proc.stop() == 0
    assert runs_of(actor.org_id)[0].status == "succeeded"
