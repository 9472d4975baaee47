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
from ui.format import money, money_by_currency, type_label, when
from ui.session import actor, attempt

REFRESH_WHILE_RUNNING = timedelta(seconds=3)

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
# An empty money tile still names its currencies ("0.00 USD"): those in view, else the org's
in_view = summary.currencies or ([chosen.currency] if chosen.currency else org_currencies)
nothing = " · ".join(money(Decimal(0), currency) for currency in sorted(in_view)) or "0"
tiles: list[tuple[str, str, str]] = []  # label, value, help: one money tile per currency, never a mixed sum
for label, amounts, hint in (
    ("Open leak", summary.open_leak, "Leaks still to recover (open or actioned)"),
    ("Recovered", summary.recovered, "Leaks analysts marked recovered (whatever the Status filter shows)"),
    ("Over-billing risk", summary.over_billing, "Billed more than usage warrants: a credit risk, kept apart"),
):
    tiles += [(f"{label} · {currency.upper()}", money(amount, currency), hint)
              for currency, amount in sorted(amounts.items())] or [(label, nothing, hint)]
tiles.append(("Accounts affected", f"{summary.accounts_affected:,}", f"{summary.open_count:,} open anomalies"))
tiles.append(("Last run", last.status.title() if last else "Never",
              f"Finished {when(last.finished_at)}" if last else "No reconciliation has run yet"))
for start in range(0, len(tiles), 4):
    for column, (label, value, hint) in zip(st.columns(4), tiles[start:start + 4], strict=False):
        column.metric(label, value, help=hint, border=True)
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


def leak_chart(where: Any, title: str, rows: list[dict[str, Any]], x: str, x_label: str, key: str) -> None:
    """Leak amounts per `x`, one bar per currency side by side (currencies are never stacked)."""
    where.subheader(title)
    if rows:
        chart = px.bar(frame(rows), x=x, y="amount", color="currency", barmode="group",
                       labels={"amount": "Leak", x: x_label})
        where.plotly_chart(chart, width="stretch", key=key)


by_type = frame(summary.by_type)
by_type["type"] = by_type["type"].map(type_label)
charts = [st.columns(2), st.columns(2)]
leak_chart(charts[0][0], "Leak by period", summary.by_period, "month", "Billing period", "by_period")
charts[0][1].subheader("By type")
charts[0][1].plotly_chart(px.bar(by_type, x="amount", y="type", color="currency", orientation="h",
                                 labels={"amount": "Amount", "type": ""}), width="stretch", key="by_type")
leak_chart(charts[1][0], "By product", summary.by_product, "product_key", "Product", "by_product")
charts[1][1].subheader("Confidence")
charts[1][1].plotly_chart(px.bar(frame(summary.confidence), x="bucket", y="count",
                                 labels={"bucket": "Confidence", "count": "Anomalies"}),
                          width="stretch", key="confidence")

st.subheader("Top accounts")
st.dataframe(
    [{"Account": row["name"], "Id": row["account_id"], "Leak": money_by_currency({row["currency"]: row["amount"]}),
      "Anomalies": row["count"]} for row in summary.top_accounts],
    hide_index=True, width="stretch",
)
