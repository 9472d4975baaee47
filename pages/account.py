"""Account drill-down: one customer's periods, usage against billing over time, anomalies, actions."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from services import accounts
from ui.format import STATUS_LABELS, confidence, money, period, type_label, units, when
from ui.session import actor, attempt

me = actor()
st.title("Account")

query = st.text_input("Find an account", placeholder="name, account id or Stripe customer id", key="account_search")
found = attempt(accounts.search_accounts, me, query)
if not found:
    st.info("No account matches. Accounts appear here after the first reconciliation run.")
    st.stop()
labels = {a.account_id: f"{a.name} ({a.account_id})" for a in found}
preselected = st.session_state.get("account_focus")
chosen = st.selectbox("Account", list(labels), format_func=labels.get, key="account_pick",
                      index=list(labels).index(preselected) if preselected in labels else 0)
view = attempt(accounts.account_view, me, chosen)
if view is None:
    st.stop()

info = st.columns(3)
info[0].metric("Stripe customer", view.account.stripe_customer_id or "not mapped")
info[1].metric("CRM id", view.account.crm_id or "not mapped")
info[2].metric("Anomalies", f"{view.anomaly_total:,}")

if view.periods:
    st.subheader("Usage and billing by period")
    frame = pd.DataFrame([{
        "Period": f"{p['period_start']:%Y-%m} {p['product_key']}", "Product": p["product_key"],
        "Actual units": float(p["actual_units"]), "Reported units": float(p["reported_units"]),
        "Expected": money(p["expected_amount"], p["currency"]), "Billed": money(p["billed_amount"], p["currency"]),
    } for p in view.periods])
    chart = px.bar(frame.melt(id_vars=["Period", "Product"], value_vars=["Actual units", "Reported units"],
                              var_name="Series", value_name="Units"),
                   x="Period", y="Units", color="Series", barmode="group")
    st.plotly_chart(chart, width="stretch", key="account_usage")
    st.dataframe(frame.drop(columns=["Actual units", "Reported units"]).assign(
        **{"Actual units": [units(p["actual_units"]) for p in view.periods],
           "Reported units": [units(p["reported_units"]) for p in view.periods]}), hide_index=True, width="stretch")
    st.caption("Periods shown are those where reconciliation found a gap; clean periods are not stored.")
else:
    st.success("No gaps found for this account: every period reconciles.")

st.subheader("Anomalies")
if view.anomalies:
    st.dataframe(pd.DataFrame([{
        "Id": a.id, "Product": a.product_key, "Period": period(a.period_start, a.period_end),
        "Type": type_label(a.type), "Amount": money(a.amount, a.currency), "Confidence": confidence(a.confidence),
        "Status": STATUS_LABELS.get(a.status, a.status)} for a in view.anomalies]), hide_index=True, width="stretch")
    target = st.selectbox("Open in the queue", [a.id for a in view.anomalies], key="account_open_id",
                          format_func=lambda i: f"#{i}")
    if st.button("Open anomaly", key="account_open"):
        st.session_state["anomaly_focus"] = target
        st.switch_page("pages/anomalies.py")

st.subheader("Actions taken")
if view.actions:
    st.dataframe(pd.DataFrame([{
        "When": when(a["created_at"]), "Kind": a["kind"], "Status": a["status"], "External id": a["external_id"],
        "Amount": money(a["amount"], a["currency"]), "Product": a["product_key"]} for a in view.actions]),
        hide_index=True, width="stretch")
else:
    st.caption("No recovery action yet.")
