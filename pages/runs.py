"""Reconciliation runs: history, why a run failed, and "Run now" with live progress."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from services import dashboard, reconciliation
from ui.format import run_status, when
from ui.session import actor, attempt

me = actor()
st.title("Runs")

if st.button("Run now", type="primary", key="run_now"):
    with st.status("Reconciling…", expanded=True) as status:
        bar = st.progress(0.0)

        def show(fraction: float, message: str) -> None:
            bar.progress(min(max(fraction, 0.0), 1.0), text=message)

        run = attempt(reconciliation.run_reconciliation, me, trigger="manual", progress=show)
        if run is None:
            status.update(label="Run refused", state="error")
        elif run.status == "succeeded":
            counts = run.counts or {}
            status.update(label=f"Run #{run.id} finished: {counts.get('anomalies', 0)} anomalies "
                                f"({counts.get('new', 0)} new, {counts.get('resolved', 0)} resolved)",
                          state="complete", expanded=False)
        else:
            status.update(label=f"Run #{run.id} failed", state="error")
            st.error(run.error)

runs = attempt(dashboard.list_runs, me, limit=100)
if not runs:
    st.info("No run yet. Start one with “Run now” — it reconciles the organization's data source "
            "(the demo bundle, or what Stripe and the usage sources synced).")
    st.stop()


def duration(run: dashboard.RunBrief) -> str:
    if run.started_at and run.finished_at:
        return f"{(run.finished_at - run.started_at).total_seconds():.1f} s"
    return "—"


st.dataframe(pd.DataFrame([{
    "Run": r.id, "Status": run_status(r.status), "Trigger": r.trigger.capitalize(), "Queued": when(r.queued_at),
    "Finished": when(r.finished_at),
    "Duration": duration(r), "Anomalies": (r.counts or {}).get("anomalies"), "New": (r.counts or {}).get("new"),
    "Resolved": (r.counts or {}).get("resolved"), "Error": r.error or "",
} for r in runs]), hide_index=True, width="stretch")

failed = [r for r in runs if r.status in ("failed", "interrupted")]
if failed:
    with st.expander(f"Why runs failed ({len(failed)})"):
        for run in failed[:20]:
            st.error(f"Run #{run.id} ({when(run.queued_at)}): {run.error}")
warnings = (runs[0].counts or {}).get("warnings") if runs[0].status == "succeeded" else None
if warnings:
    with st.expander(f"Notes from the last run ({len(warnings)})"):
        for line in warnings:
            st.write(f"- {line}")
