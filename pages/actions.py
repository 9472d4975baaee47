"""Actions: every draft invoice and CRM task, who asked for it and what the outside system answered."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.spreadsheet import safe_cell
from services import activity
from ui.format import money, plural, when
from ui.session import actor, attempt

PAGE_SIZE = 100
me = actor()
st.title("Actions")

page = st.columns([1, 5])[0].number_input("Page", min_value=1, value=1, key="actions_page")
listed = attempt(activity.list_actions, me, limit=PAGE_SIZE, offset=(int(page) - 1) * PAGE_SIZE)
if listed is None:
    st.stop()
rows, total = listed
if not total:
    st.info("No action yet. Open an anomaly and click “Draft invoice” or “Create CRM task”.")
    st.stop()
latest = rows[0]
st.caption(f"{plural(total, 'action')} · latest: {latest.kind.replace('_', ' ')} {latest.external_id or latest.status} "
           f"for {latest.account_id} ({money(latest.amount, latest.currency)}), {when(latest.created_at)}")
frame = pd.DataFrame([{
    "When": when(r.created_at), "Kind": r.kind.replace("_", " "), "Status": r.status, "External id": r.external_id,
    "Amount": money(r.amount, r.currency), "Account": r.account_id, "Anomaly": r.anomaly_id, "By": r.by,
    "Error": r.error or "",
} for r in rows])
st.dataframe(frame, hide_index=True, width="stretch")
st.download_button("Download CSV", frame.map(safe_cell).to_csv(index=False).encode(), file_name="actions.csv",
                   key="actions_csv")
