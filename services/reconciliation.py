"""`run_reconciliation`: the one way a reconciliation reaches the app database.

A run is recorded before it starts and finished whatever happens (succeeded with counts, or
failed with the reason). Anomalies are upserted by fingerprint: the numbers are refreshed, what
analysts did (status, reason, notes) is kept; an anomaly whose gap vanished becomes `resolved`
(open and actioned ones — dismissed and recovered are the analyst's final word) and one that
comes back after being resolved is reopened. "Vanished" needs the run to have looked: only an
anomaly whose period lies inside the span this run reconciled for its account and product is
resolved, so an old leak outside a synced window (or of an account missing from this run's data)
stays open until someone acts on it — money never leaves the open total silently.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.bundle import load_bundle, with_list_prices
from core.errors import BundleError
from core.model import Bundle
from core.reconcile import Anomaly as Finding
from core.reconcile import Coverage, ReconcileParams, reconcile
from db.models import MONEY, Account, Anomaly, ReconRun
from db.session import org_session, serialize_per_org
from services import audit
from services.context import Actor, require_role
from services.errors import Conflict, InvalidInput, NotFound
from services.org_files import own_bundle
from services.settings import get_settings, reconcile_params

RESOLVABLE = ("open", "actioned")
MAX_STORED_AMOUNT = 10 ** (MONEY.precision - MONEY.scale)
FINDING_FIELDS = (
    "account_id", "product_key", "period_start", "period_end", "type", "severity", "actual_units",
    "reported_units", "leak_units", "expected_amount", "billed_amount", "leak_amount", "overbilled_amount",
    "currency", "confidence_factors", "evidence", "price_id", "price_source", "subscription_id", "explanation",
)
Progress = Callable[[float, str], None]


def queue_run(actor: Actor, trigger: str = "manual") -> ReconRun:
    """Record a run for the scheduler to pick up ("Run now" in the app, POST in the API).

    An org has at most one run waiting: asking again while one is queued returns that run, so
    repeated clicks or a script posting in a loop cannot fill the queue every org shares (the
    worker takes the oldest queued run of any org). A run queued while another is running does
    wait: it will see data that arrived meanwhile. Concurrent requests take turns (the per-org
    lock), so the second one finds the first one's run; the partial unique index
    `ux_recon_runs_one_queued` (migration 0008) keeps the rule should any other writer forget it."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        serialize_per_org(session, "queue_run", actor.org_id)
        waiting = session.scalars(select(ReconRun).where(ReconRun.org_id == actor.org_id, ReconRun.status == "queued")
                                  .order_by(ReconRun.id).limit(1)).first()
        if waiting is not None:
            return waiting
        run = ReconRun(org_id=actor.org_id, trigger=trigger, status="queued", created_by=actor.user_id)
        session.add(run)
        session.flush()
        audit.append(session, actor, "run.queued", "recon_run", run.id, {"trigger": trigger})
        return run


def _start(actor: Actor, trigger: str, run_id: int | None, params: ReconcileParams | None) -> int:
    """Mark the run running (creating it unless queued) with the parameters it uses (None: it will
    not reconcile, so it records none)."""
    with org_session(actor.org_id) as session:
        if run_id is None:
            run = ReconRun(org_id=actor.org_id, trigger=trigger, created_by=actor.user_id)
            session.add(run)
        else:
            run = session.execute(select(ReconRun).where(ReconRun.org_id == actor.org_id, ReconRun.id == run_id)
                                  ).scalar_one_or_none()
            if run is None:
                raise NotFound(f"run {run_id} not found")
        now = datetime.now(UTC)
        run.status, run.started_at, run.heartbeat_at = "running", now, now
        run.params = {k: str(v) for k, v in asdict(params).items() if v is not None} if params else {}
        try:
            session.flush()
        except IntegrityError:  # ux_recon_runs_one_running: another worker is reconciling this org
            raise Conflict("a reconciliation is already running for this organization; "
                           "it shows on the Runs page — start another when it has finished") from None
        return run.id


def _progress_writer(org_id: int, run_id: int, extra: Progress | None) -> Progress:
    """Persist progress (throttled) so the app's Runs page and other processes can follow it."""
    last = [0.0]

    def write(fraction: float, message: str) -> None:
        if extra:
            extra(fraction, message)
        if time.monotonic() - last[0] < 0.5 and fraction < 1.0:
            return
        last[0] = time.monotonic()
        with org_session(org_id) as session:
            run = session.get(ReconRun, run_id)
            if run is not None:
                run.progress, run.progress_message = fraction, message[:200]
                run.heartbeat_at = datetime.now(UTC)

    return write


def _bundle_for(actor: Actor, bundle_dir: Path | None) -> Bundle:
    """The org's data source (or `bundle_dir`) with the admins' product-to-price mapping applied."""
    org_settings = get_settings(actor)
    if bundle_dir is None:
        source = org_settings.data_source or {}
        if source.get("kind") != "bundle":
            raise InvalidInput("no data source yet: connect Stripe and a usage source in Settings, or load the demo")
        bundle_dir = Path(source["path"])
    bundle = load_bundle(own_bundle(actor.org_id, bundle_dir, "data source path"))
    return with_list_prices(bundle, org_settings.price_map or {})


def _storable(findings: list[Finding]) -> None:
    """Refuse, by name, an amount the app database cannot hold (Numeric(20, 6)): PostgreSQL would fail the run
    with a raw error and SQLite keep a value the org's backup refuses. Only a unit mix-up gets there (e.g.
    bytes metered under a price per GB), which is worth saying so."""
    for finding in findings:
        for name in ("expected_amount", "billed_amount", "leak_amount", "overbilled_amount"):
            amount = getattr(finding, name)
            if abs(amount) >= MAX_STORED_AMOUNT:
                raise InvalidInput(
                    f"account {finding.account_id}, product {finding.product_key}, period from "
                    f"{finding.period_start:%Y-%m-%d %H:%M} UTC: {name.replace('_', ' ')} {amount:,f} "
                    f"{finding.currency.upper()} is beyond what the app stores (below {MAX_STORED_AMOUNT:,}): check "
                    f"the units of the usage ({finding.actual_units.normalize():,f} units) and the price "
                    f"{finding.price_id}")


def _columns(finding: Finding) -> dict[str, Any]:
    values = {name: getattr(finding, name) for name in FINDING_FIELDS}
    values["confidence"] = Decimal(str(finding.confidence))
    return values


def _looked_at(row: Anomaly, coverage: Coverage) -> bool:
    span = coverage.get((row.account_id, row.product_key))
    return span is not None and span[0] <= row.period_start and row.period_end <= span[1]


def _store(actor: Actor, run_id: int, bundle: Bundle, findings: list[Finding], coverage: Coverage) -> dict[str, int]:
    counts = Counter[str](new=0, updated=0, reopened=0, resolved=0)
    with org_session(actor.org_id) as session:
        existing = {a.fingerprint: a for a in session.execute(
            select(Anomaly).where(Anomaly.org_id == actor.org_id)).scalars()}
        seen = set()
        for finding in findings:
            seen.add(finding.fingerprint)
            row = existing.get(finding.fingerprint)
            if row is None:
                session.add(Anomaly(org_id=actor.org_id, fingerprint=finding.fingerprint, first_run_id=run_id,
                                    last_run_id=run_id, status="open", notes=[], **_columns(finding)))
                counts["new"] += 1
                continue
            for name, value in _columns(finding).items():
                setattr(row, name, value)
            row.last_run_id = run_id
            counts["updated"] += 1
            if row.status == "resolved":
                row.status, row.status_reason = "open", "the gap came back in a later run"
                row.status_changed_at, row.status_changed_by = datetime.now(UTC), None
                counts["reopened"] += 1
        for fingerprint, row in existing.items():
            if fingerprint not in seen and row.status in RESOLVABLE and _looked_at(row, coverage):
                row.status, row.status_reason = "resolved", f"gap no longer found by run {run_id}"
                row.status_changed_at, row.status_changed_by = datetime.now(UTC), None
                counts["resolved"] += 1
        known = {a.account_id: a for a in session.execute(
            select(Account).where(Account.org_id == actor.org_id)).scalars()}
        for account in bundle.accounts.values():
            row = known.get(account.account_id) or Account(org_id=actor.org_id, account_id=account.account_id)
            row.name, row.stripe_customer_id, row.crm_id = account.name, account.stripe_customer_id, account.crm_id
            session.add(row)
    return dict(counts)


def _finish(actor: Actor, run_id: int, status: str, counts: dict[str, Any] | None, error: str | None) -> ReconRun:
    with org_session(actor.org_id) as session:
        run = session.get(ReconRun, run_id)
        assert run is not None
        run.status, run.counts, run.error = status, counts, error
        run.finished_at = datetime.now(UTC)
        if status == "succeeded":
            run.progress, run.progress_message = 1.0, "done"
        audit.append(session, actor, f"run.{status}", "recon_run", run_id, {"counts": counts, "error": error})
        return run


def run_reconciliation(actor: Actor, *, trigger: str = "manual", bundle_dir: Path | None = None,
                       run_id: int | None = None, params: ReconcileParams | None = None,
                       progress: Progress | None = None) -> ReconRun:
    """Create (or take a queued) run, reconcile the org's data, store anomalies, finish the run."""
    require_role(actor, "admin", "analyst")
    try:
        params = params or reconcile_params(get_settings(actor))
    except InvalidInput as exc:  # the run is recorded as failed with the reason, not left queued
        return _finish(actor, _start(actor, trigger, run_id, None), "failed", None, str(exc))
    run_id = _start(actor, trigger, run_id, params)
    started = time.monotonic()
    try:
        bundle = _bundle_for(actor, bundle_dir)
        result = reconcile(bundle, params, progress=_progress_writer(actor.org_id, run_id, progress))
        _storable(result.anomalies)
        counts: dict[str, Any] = _store(actor, run_id, bundle, result.anomalies, result.coverage)
    except (BundleError, InvalidInput) as exc:
        return _finish(actor, run_id, "failed", None, str(exc))
    except Exception as exc:
        _finish(actor, run_id, "failed", None, f"{type(exc).__name__}: {exc}")
        raise
    counts.update(
        anomalies=len(result.anomalies), periods=result.periods_checked, events_actual=result.events["actual"],
        events_reported=result.events["reported"], seconds=round(time.monotonic() - started, 3),
        by_type=dict(Counter(a.type for a in result.anomalies)), warnings=result.warnings[:50] + result.notes,
    )
    return _finish(actor, run_id, "succeeded", counts, None)
