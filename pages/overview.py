"""Overview: how much leaked, where, how sure we are, how much was recovered."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import streamlit as st

from services import dashboard
from ui import filters
from ui.charts import count_bars, money_bars
from ui.format import money, money_by_currency, plural, run_status, type_label, when
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
    st.info(f"Reconciliation run #{run.id} is {run_status(run.status).lower()}: "
            f"{run.progress_message or 'waiting for a worker'} "
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
run_tiles[1].metric("Last run", run_status(last.status) if last else "Never",
                    f"{'finished' if last.status == 'succeeded' else 'ended'} {when(last.finished_at)}"
                    if last and last.finished_at else None, delta_color="off", delta_arrow="off", border=True,
                    help=f"Run #{last.id}, queued {when(last.queued_at)}. Every run is on the Runs page." if last
                    else "No reconciliation has run yet")


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


def leak_chart(where: Any, title: str, rows: list[dict[str, Any]], x: str, x_label: str, key: str,
               **options: Any) -> None:
    """Leak amounts per `x`: one panel per currency, its axis titled with it (currencies never share a scale)."""
    where.subheader(title)
    where.plotly_chart(money_bars(rows, x, x_label, **options), width="stretch", key=key)


def percent_span(bucket: str) -> str:
    """A confidence bucket as the rest of the app writes confidence: "0.9–1.0" -> "90–100%"."""
    low, high = bucket.split("–")
    return f"{float(low):.0%}".removesuffix("%") + f"–{float(high):.0%}"


def confidence_chart(where: Any) -> None:
    """How sure we are, over every anomaly in view: leaks and over-billing told apart (services.dashboard)."""
    where.subheader("Confidence: leaks and over-billing")
    buckets = [percent_span(row["bucket"]) for row in summary.confidence]
    chart = count_bars(buckets, [("Leaks", [row["leak"] for row in summary.confidence]),
                                 ("Over-billing", [row["over_billing"] for row in summary.confidence])],
                       "Confidence", "Anomalies")
    where.plotly_chart(chart, width="stretch", key="confidence")
    where.caption("Every anomaly the filters select, by confidence: leaks, and over-billing (a credit risk, kept "
                  "out of the leak figures and charts).")


if not summary.by_type:
    where = f" in {chosen.currency.upper()}" if chosen.currency else ""
    st.info(f"No leaks{where} for these filters.", icon=":material/check_circle:")
    confidence_chart(st.columns(2)[0])
    st.stop()

charts = [st.columns(2), st.columns(2)]
leak_chart(charts[0][0], "Leak by period", summary.by_period, "month", "Billing period", "by_period")
leak_chart(charts[0][1], "Leak by type", summary.by_type, "type", "", "by_type", horizontal=True, label=type_label)
leak_chart(charts[1][0], "Leak by product", summary.by_product, "product_key", "Product", "by_product")
confidence_chart(charts[1][1])

st.subheader("Top accounts")
top = summary.top_accounts
picked = st.dataframe(
    [{"Account": row["name"], "Id": row["account_id"], "Leak": money_by_currency({row["currency"]: row["amount"]}),
      "Anomalies": row["count"]} for row in top],
    hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row", key="top_accounts",
    column_config={"Leak": st.column_config.TextColumn(alignment="right")},
)
st.caption("Select an account to open it on the Account page.")
rows = picked.selection.rows if picked and picked.selection else []
if rows and rows[0] < len(top):
    open_account(top[rows[0]]["account_id"])
