"""Overview: how much leaked, where, how sure we are, how much was recovered."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
import plotly.express as px
import streamlit as st

from services import dashboard
from ui import filters
from ui.format import money, money_by_currency, plural, type_label, when
from ui.links import open_account
from ui.session import actor, attempt

REFRESH_WHILE_RUNNING = timedelta(seconds=3)
TILES_PER_ROW = 3  # one currency's figures per row; four did not fit "2,490.03 USD" at 1400 px

st.title("Overview")
me = actor()


@st.fragment(run_every=REFRESH_WHILE_RUNNING)
def live_run_status() -> None:
    """Shown while a run is active: re-checks it every few seconds, reruns the page when it is over."""
    run = dashboard.active_run(me)
    if run is None:
        st.rerun()
    st.info(f"Reconciliation run #{run.id} is {run.status}: {run.progress_message or 'waiting for a worker'} "
            f"({(run.progress or 0):.0%}). This page refreshes itself.")


org_currencies = dashboard.currencies(me)
filters.filter_bar("overview", [c.upper() for c in org_currencies])
chosen = filters.current()
summary = attempt(dashboard.summary, me, chosen)
if summary is None:
    st.stop()
if summary.active_run:
    live_run_status()

last = summary.last_run
EVERY_STATUS = " Whatever the Status filter shows; every other filter applies."
NO_PART: dict[str, Decimal] = {}
FIGURE_TILES = (  # label, figure, its part shown "in recovery", help; what each counts: services.dashboard.FIGURES
    ("Open leak", summary.open_leak, summary.in_recovery,
     "Leaks still to recover: found (open) or with a draft invoice or CRM task out (actioned, shown below the "
     "amount as in recovery)."),
    ("Recovered", summary.recovered, NO_PART, "Leaks analysts marked recovered."),
    ("Over-billing risk", summary.over_billing, NO_PART,
     "Billed more than usage warrants and not handled yet: a credit risk, kept apart from the leaks."),
)


def currency_rows() -> list[str]:
    """One row of tiles per currency (never a mixed sum): every currency with money in a figure or in view, else
    the chosen or the org's, so each row has all three figures and an empty one still reads "0.00 USD"."""
    with_money = {currency for _, amounts, _, _ in FIGURE_TILES for currency in amounts}
    return sorted(with_money | set(summary.currencies)) or ([chosen.currency] if chosen.currency else org_currencies)


for currency in currency_rows():
    for column, (label, amounts, part, hint) in zip(st.columns(TILES_PER_ROW), FIGURE_TILES, strict=True):
        recovering = part.get(currency)
        column.metric(f"{label} · {currency.upper()}", money(amounts.get(currency, Decimal(0)), currency),
                      f"{money(recovering, currency)} in recovery" if recovering else None,
                      delta_color="off", delta_arrow="off", help=hint + EVERY_STATUS, border=True)
run_tiles = st.columns(TILES_PER_ROW)
run_tiles[0].metric("Accounts affected", f"{summary.accounts_affected:,}", border=True,
                    help=f"Accounts behind Open leak: {plural(summary.open_count, 'anomaly', 'anomalies')}."
                         f"{EVERY_STATUS}")
run_tiles[1].metric("Last run", last.status.title() if last else "Never", border=True,
                    help=f"Finished {when(last.finished_at)}" if last else "No reconciliation has run yet")


def over_billing_note() -> str:
    """The Over-billing risk tiles' companion: how many anomalies they count, and how many more are being handled."""
    unhandled, handled = summary.counts["over_billing"], summary.counts["over_billing_handled"]
    if not unhandled and not handled:
        return ""
    more = (f"{handled:,} more ({money_by_currency(summary.over_billing_handled)}) already being handled"
            if handled else "none already being handled")
    return (f"Over-billing risk: {plural(unhandled, 'anomaly', 'anomalies')} not handled yet, {more}. "
            "A credit risk, kept out of the leak figures and charts.")


if note := over_billing_note():
    st.caption(note)
if last and last.status == "failed":
    st.error(f"The last run failed: {last.error}. See Runs for details.")

if summary.empty:
    st.info("No anomalies match these filters. With no data yet, connect Stripe and a usage source in "
            "Settings (admins), or start a run on the Runs page.")
    st.stop()

if st.button("Open these in the anomaly queue →", help="The queue keeps the filters set here"):
    st.switch_page("pages/anomalies.py")


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows for plotly: amounts become floats here only to be drawn; every total shown is a Decimal."""
    data = pd.DataFrame(rows)
    if "amount" in data:
        data["amount"] = data["amount"].map(float)
        data["currency"] = data["currency"].str.upper()
    return data


def count_step(largest: int) -> int:
    """A whole-number tick step giving at most about six ticks (never 0.5 of an anomaly)."""
    steps = (1, 2, 5)
    scale = 1
    while True:
        for step in steps:
            if largest <= 6 * step * scale:
                return step * scale
        scale *= 10


def leak_chart(where: Any, title: str, rows: list[dict[str, Any]], x: str, x_label: str, key: str) -> None:
    """Leak amounts per `x`, one bar per currency side by side (currencies are never stacked)."""
    where.subheader(title)
    chart = px.bar(frame(rows), x=x, y="amount", color="currency", barmode="group",
                   labels={"amount": "Leak", x: x_label, "currency": "Currency"})
    where.plotly_chart(chart, width="stretch", key=key)


def confidence_chart(where: Any) -> None:
    where.subheader("Confidence")
    chart = px.bar(frame(summary.confidence), x="bucket", y="count",
                   labels={"bucket": "Confidence", "count": "Anomalies"})
    largest = max((row["count"] for row in summary.confidence), default=0)
    chart.update_yaxes(tick0=0, dtick=count_step(largest), tickformat=",d", rangemode="tozero")
    where.plotly_chart(chart, width="stretch", key="confidence")


if not summary.by_type:
    where = f" in {chosen.currency.upper()}" if chosen.currency else ""
    st.info(f"No leaks{where} for these filters.", icon=":material/check_circle:")
    confidence_chart(st.columns(2)[0])
    st.stop()

by_type = frame(summary.by_type)
by_type["type"] = by_type["type"].map(type_label)
charts = [st.columns(2), st.columns(2)]
leak_chart(charts[0][0], "Leak by period", summary.by_period, "month", "Billing period", "by_period")
charts[0][1].subheader("Leak by type")
charts[0][1].plotly_chart(px.bar(by_type, x="amount", y="type", color="currency", orientation="h",
                                 labels={"amount": "Leak", "type": "", "currency": "Currency"}),
                          width="stretch", key="by_type")
leak_chart(charts[1][0], "Leak by product", summary.by_product, "product_key", "Product", "by_product")
confidence_chart(charts[1][1])

st.subheader("Top accounts")
top = summary.top_accounts
picked = st.dataframe(
    [{"Account": row["name"], "Id": row["account_id"], "Leak": money_by_currency({row["currency"]: row["amount"]}),
      "Anomalies": row["count"]} for row in top],
    hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row", key="top_accounts",
)
st.caption("Select an account to open it on the Account page.")
rows = picked.selection.rows if picked and picked.selection else []
if rows and rows[0] < len(top):
    open_account(top[rows[0]]["account_id"])
