"""The audit log: who did what and when, with a check that no entry was edited or removed."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import streamlit as st

from services import activity, exports
from ui.format import audit_details, audit_parts, plain, plural, when
from ui.session import actor, attempt

PAGE_SIZE = 100
me = actor()
st.title("Audit log")

left, right = st.columns([1, 3])
if left.button("Verify the chain", key="audit_verify"):
    result = attempt(activity.verify_audit, me)
    if result is not None and result.ok:
        right.success(f"Chain intact: {result.checked:,} entries verified.")
    elif result is not None:
        right.error(f"Chain broken at entry {result.first_broken_seq}: {result.reason}.")

page = st.columns([1, 5])[0].number_input("Page", min_value=1, value=1, key="audit_page")
listed = attempt(activity.list_audit, me, limit=PAGE_SIZE, offset=(int(page) - 1) * PAGE_SIZE)
if listed is None:
    st.stop()
rows, total = listed
st.caption(f"{plural(total, 'entry', 'entries')}, newest first · times in UTC · select an entry to read all "
           "its details")
picked = st.dataframe(pd.DataFrame([{
    "#": r.seq, "When": when(r.ts), "Who": r.who or r.actor, "What": r.action, "Target": r.target,
    "Details": audit_details(r.details)} for r in rows]), hide_index=True, width="stretch", on_select="rerun",
    selection_mode="single-row", key=f"audit_table_{int(page)}_{rows[0].seq if rows else 0}",
    column_config={"#": st.column_config.NumberColumn(format="%d", width="small"),
                   "Details": st.column_config.TextColumn(width="large")})
chosen = picked.selection.rows if picked and picked.selection else []
if chosen and chosen[0] < len(rows):
    entry = rows[chosen[0]]
    with st.container(border=True, key="audit_entry"):
        st.markdown(f"**Entry #{entry.seq}** · {when(entry.ts)} · {plain(entry.who or entry.actor)} · "
                    f"`{entry.action}` · {plain(entry.target)}")
        parts = audit_parts(entry.details)
        st.markdown("\n".join(f"- **{plain(key)}**: {plain(value)}" for key, value in parts) if parts
                    else "No details.")

with st.expander("Export anomalies, actions and audit log of a period"):
    span = st.date_input("Period", value=(date.today().replace(day=1), date.today()), key="audit_export_span")
    fmt = st.radio("Format", ["csv", "parquet"], horizontal=True, key="audit_export_fmt")
    if st.button("Prepare export", key="audit_export") and isinstance(span, tuple) and len(span) == 2:
        result = attempt(exports.export_audit, me, span[0], span[1] + timedelta(days=1), fmt)
        if result is not None and result.url:
            st.success(f"Uploaded. The link below expires at {when(result.expires_at)}.")
            st.link_button("Download export", result.url)
        elif result is not None:
            st.download_button("Download export", result.data, file_name=result.filename, key="audit_download")
