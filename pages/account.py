"""Account drill-down: one customer's periods, usage against billing over time, anomalies, actions."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from services import accounts
from ui.charts import expected_vs_billed
from ui.format import STATUS_LABELS, confidence, money, period, plural, type_label, units, when
from ui.links import ACCOUNT_FOCUS, open_anomaly
from ui.session import actor, attempt

me = actor()
st.title("Account")

# A link (?id=acct_0003) opens that account; so do the Overview's top accounts and the queue's "Open account".
if st.query_params.get("id"):
    st.session_state[ACCOUNT_FOCUS] = st.query_params.pop("id")  # once: a later pick in the box wins
focus = st.session_state.get(ACCOUNT_FOCUS)

query = st.text_input("Find an account", placeholder="name, account id or Stripe customer id", key="account_search")
found = attempt(accounts.search_accounts, me, query) or []
if focus and not query.strip() and focus not in {a.account_id for a in found}:
    focused = attempt(accounts.get_account, me, focus)  # beyond the first results: still shown
    found = [focused, *found] if focused else found
if not found:
    st.info("No account matches. Accounts appear here after the first reconciliation run." if not query.strip()
            else f"No account matches “{query.strip()}”. Search by name, account id or Stripe customer id.")
    st.stop()


def label(brief: accounts.AccountBrief) -> str:
    count = plural(brief.anomaly_count, "anomaly", "anomalies") if brief.anomaly_count else "no anomalies"
    return f"{brief.name} ({brief.account_id}) · {count}"


labels = {a.account_id: label(a) for a in found}
if query.strip():
    with_anomalies = sum(1 for a in found if a.anomaly_count)
    st.caption(f"{plural(len(found), 'account')} {'matches' if len(found) == 1 else 'match'} “{query.strip()}”"
               + (f", {with_anomalies:,} with anomalies (listed first)" if len(found) > 1 else "")
               + (" — showing the first ones, narrow the search" if len(found) >= accounts.SEARCH_LIMIT else ""))
options = list(labels)
# The key carries the focus: an account opened from another page is shown even if this box had a choice.
chosen = st.selectbox("Account", options, format_func=labels.get, key=f"account_pick_{focus}",
                      index=options.index(focus) if focus in options else 0)
st.session_state[ACCOUNT_FOCUS] = chosen  # the menu brings this account back
view = attempt(accounts.account_view, me, chosen)
if view is None:
    st.stop()

info = st.columns(3)
info[0].metric("Stripe customer", view.account.stripe_customer_id or "not mapped")
info[1].metric("CRM id", view.account.crm_id or "not mapped")
info[2].metric("Anomalies", f"{view.anomaly_total:,}")

if view.periods:
    st.subheader("Expected and billed by period")
    # money, not units: for unbilled usage or a missed overage every unit reached billing and a units chart
    # shows no gap at all beside an anomaly of 160.00 USD
    bars = [{"label": f"{p['period_start']:%Y-%m} {p['product_key']}", "currency": p["currency"],
             "expected": p["expected_amount"], "billed": p["billed_amount"]} for p in view.periods]
    st.plotly_chart(expected_vs_billed(bars, "Period and product"), width="stretch", key="account_money")
    st.dataframe(pd.DataFrame([{
        "Period": period(p["period_start"], p["period_end"]),
        "Product": p["product_key"],
        "Expected": money(p["expected_amount"], p["currency"]), "Billed": money(p["billed_amount"], p["currency"]),
        "Not billed": money(p["expected_amount"] - p["billed_amount"], p["currency"]),
        "Actual units": units(p["actual_units"]), "Reported units": units(p["reported_units"]),
        "Units not reported": units(max(p["actual_units"] - p["reported_units"], 0)),
    } for p in view.periods]), hide_index=True, width="stretch", column_config={
        name: st.column_config.TextColumn(alignment="right")
        for name in ("Expected", "Billed", "Not billed", "Actual units", "Reported units", "Units not reported")})
    st.caption("Periods shown are those where reconciliation found a gap; clean periods are not stored. "
               "A negative “Not billed” is over-billing. Where no unit is missing, the gap is in what was billed.")
else:
    st.success("No gaps found for this account: every period reconciles.")

st.subheader("Anomalies")
if view.anomalies:
    st.dataframe(pd.DataFrame([{
        "Id": a.id, "Product": a.product_key, "Period": period(a.period_start, a.period_end),
        "Type": type_label(a.type), "Amount": money(a.amount, a.currency), "Confidence": confidence(a.confidence),
        "Status": STATUS_LABELS.get(a.status, a.status)} for a in view.anomalies]), hide_index=True, width="stretch",
        column_config={name: st.column_config.TextColumn(alignment="right") for name in ("Amount", "Confidence")})
    target = st.selectbox("Open in the queue", [a.id for a in view.anomalies], key="account_open_id",
                          format_func=lambda i: f"#{i}")
    if st.button("Open anomaly", key="account_open"):
        open_anomaly(target)
else:
    st.caption("No anomalies for this account.")

st.subheader("Actions taken")
if view.actions:
    st.dataframe(pd.DataFrame([{
        "When": when(a["created_at"]), "Kind": a["kind"], "Status": a["status"], "External id": a["external_id"],
        "Amount": money(a["amount"], a["currency"]), "Product": a["product_key"]} for a in view.actions]),
        hide_index=True, width="stretch")
else:
    st.caption("No recovery action yet.")
