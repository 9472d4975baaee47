"""The anomaly queue: filter, sort, select; drill into the evidence; recover, dismiss, export.

Dialogs open from a session-state flag (not from the button's return value), so their own buttons
keep working on the rerun they cause — and so they can be driven by AppTest.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import pandas as pd
import streamlit as st

from services import anomalies, crm_tasks, dashboard, integrations, recovery
from services.anomalies import LEAK_TYPES, AnomalyDetail
from ui import filters
from ui.charts import daily_units, expected_vs_billed
from ui.format import (
    STATUS_LABELS,
    confidence,
    confidence_lines,
    event_text,
    explanation,
    money,
    period,
    person,
    plain,
    plural,
    price,
    type_label,
    units,
    when,
)
from ui.links import ANOMALY_FOCUS, open_account
from ui.session import actor, attempt, attempt_labelled

PAGE_SIZE = 25
SORT_LABELS = {  # amounts of different currencies are never compared: "amount_in_currency" sorts by currency first
    "amount_in_currency": "Amount (within each currency)", "confidence": "Confidence", "period": "Period",
    "account": "Account", "severity": "Severity", "type": "Type", "status": "Status", "updated": "Last change"}
RIGHT = st.column_config.TextColumn(alignment="right")  # amounts and shares line up on their last digit
DIALOG = "anomaly_dialog"  # (kind, anomaly_id) of the dialog to show on this run
CHANGES = "queue_changes"  # status changes made from this page: each one starts a fresh selection

me = actor()
st.title("Anomalies")

# A link from an invoice or a CRM task (?id=123) opens that anomaly directly.
if "id" in st.query_params and st.query_params["id"].isdigit():
    st.session_state[ANOMALY_FOCUS] = int(st.query_params["id"])

filters.filter_bar("queue", [c.upper() for c in dashboard.currencies(me)], with_account=True)
controls = st.columns([2, 1, 1, 3])
sort = controls[0].selectbox("Sort by", list(SORT_LABELS), format_func=SORT_LABELS.get, key="queue_sort")
descending = controls[1].toggle("Descending", value=True, key="queue_desc")
# Keys carry what a widget's state refers to, so that state never outlives it: the page number
# starts again at 1 when the filters or the order change, and a table selection (kept by row
# position) is dropped when the rows shown change or after a status change, instead of landing
# on other anomalies that moved into the selected positions.
view = f"{filters.current()}|{sort}|{descending}"
page_number = controls[2].number_input("Page", min_value=1, value=1, step=1,
                                       key=f"queue_page_{hashlib.sha1(view.encode()).hexdigest()[:10]}")

def queue_page(number: int) -> anomalies.Page:
    found = attempt(anomalies.list_anomalies, me, filters.current(), page=number, page_size=PAGE_SIZE, sort=sort,
                    descending=descending)
    if found is None:
        st.stop()
    return found


page = queue_page(int(page_number))
if not page.rows and page.total:  # past the last page (rows left the view meanwhile): show the last one
    page = queue_page(page.pages)
controls[3].caption(f"{plural(page.total, 'anomaly', 'anomalies')} · page {page.page} of {page.pages}"
                    + (f" · sorted by currency (A–Z), then amount {'high to low' if descending else 'low to high'}"
                       if sort == "amount_in_currency" else ""))

if not page.rows:
    st.info("No anomalies match these filters. Widen them, or run a reconciliation on the Runs page.")
    st.stop()

table = pd.DataFrame([{
    "Account": row.account_name or row.account_id, "Product": row.product_key,
    "Period": period(row.period_start, row.period_end), "Type": type_label(row.type), "Severity": row.severity,
    "Amount": money(row.amount, row.currency), "Confidence": confidence(row.confidence),
    "Status": STATUS_LABELS.get(row.status, row.status), "Id": row.id,
} for row in page.rows])
shown = f"{st.session_state.get(CHANGES, 0)}|{[row.id for row in page.rows]}"
event = st.dataframe(table, hide_index=True, width="stretch", on_select="rerun", selection_mode="multi-row",
                     key=f"queue_table_{hashlib.sha1(shown.encode()).hexdigest()[:10]}",
                     column_config={"Id": st.column_config.NumberColumn(format="%d", width="small"),
                                    "Amount": RIGHT, "Confidence": RIGHT})
selected_ids = [page.rows[i].id for i in event.selection.rows] if event and event.selection else []


def open_dialog(kind: str, anomaly_id: int) -> None:
    st.session_state[DIALOG] = (kind, anomaly_id)


def close_dialog() -> None:
    st.session_state.pop(DIALOG, None)


def close_button(where: Any, label: str, key: str) -> None:
    """A dialog closes only when the script reruns from inside it; clearing the flag keeps it closed."""
    if where.button(label, key=key):
        close_dialog()
        st.rerun()


@st.dialog("Draft invoice in Stripe", width="large", on_dismiss=close_dialog)
def invoice_dialog(anomaly_id: int) -> None:
    preview = attempt(recovery.preview_invoice, me, anomaly_id)
    if preview is None:
        close_button(st, "Close", "invoice_close_error")
        return
    stripe_connected = integrations.is_connected(me, "stripe")
    if not stripe_connected:
        st.warning("Stripe is not connected, so no invoice can be drafted yet — an admin can connect Stripe in "
                   "Settings. The preview below shows what the invoice would hold.")
    st.write(f"Customer **{preview.account_name}** (Stripe `{preview.customer}`) · "
             f"currency **{preview.currency.upper()}**")
    st.dataframe(pd.DataFrame([{"Description": line.description, "Quantity": units(line.quantity),
                                "Amount": money(line.amount, preview.currency)} for line in preview.lines]),
                 hide_index=True, width="stretch", column_config={"Quantity": RIGHT, "Amount": RIGHT})
    st.markdown(f"**Total: {money(preview.total, preview.currency)}** — the invoice stays a draft in Stripe: "
                "nothing is finalized or sent to the customer.")
    done = st.session_state.get("invoice_result")
    if done and done.get("anomaly_id") == anomaly_id:
        st.success(f"Draft invoice {done['external_id']} created" + (" (already existed)" if done["replayed"] else ""))
        close_button(st, "Close", "invoice_close")
        return
    left, right = st.columns(2)
    if left.button("Create draft invoice", type="primary", key="invoice_confirm", disabled=not stripe_connected):
        result = attempt(recovery.draft_invoice, me, anomaly_id)
        if result is not None:
            st.session_state["invoice_result"] = {"anomaly_id": anomaly_id, "external_id": result.external_id,
                                                  "replayed": result.replayed}
            st.rerun()
    close_button(right, "Cancel", "invoice_cancel")


@st.dialog("Create CRM task", on_dismiss=close_dialog)
def crm_dialog(anomaly_id: int) -> None:
    connected = [kind for kind in ("salesforce", "hubspot") if integrations.is_connected(me, kind)]
    if not connected:
        st.warning("No CRM is connected — an admin can connect Salesforce or HubSpot in Settings.")
        close_button(st, "Close", "crm_close_empty")
        return
    system = st.radio("CRM", connected, format_func=integrations.LABELS.get, horizontal=True, key="crm_system")
    due = st.number_input("Due in (days)", min_value=1, max_value=90, value=7, key="crm_due")
    left, right = st.columns(2)
    if left.button("Create task", type="primary", key="crm_confirm"):
        result = attempt(crm_tasks.create_crm_task, me, anomaly_id, system, due_in_days=int(due))
        if result is not None:
            st.success(f"Task {result.external_id} created in {integrations.LABELS[system]}")
    close_button(right, "Close", "crm_cancel")


@st.dialog("Dismiss", on_dismiss=close_dialog)
def dismiss_dialog(anomaly_ids: tuple[int, ...]) -> None:
    st.write(f"Dismiss {len(anomaly_ids)} anomal{'y' if len(anomaly_ids) == 1 else 'ies'}. "
             "The reason goes into the audit log.")
    reason = st.text_area("Reason (required)", key="dismiss_reason")
    left, right = st.columns(2)
    confirmed = left.button("Dismiss", type="primary", key="dismiss_confirm")
    if confirmed and attempt_labelled({"reason": "Reason"}, anomalies.bulk_set_status, me, list(anomaly_ids),
                                      "dismissed", reason) is not None:
        changed(anomaly_ids)
        close_dialog()
        st.rerun()
    close_button(right, "Cancel", "dismiss_cancel")


def changed(anomaly_ids: Any) -> None:
    """After a status change: a fresh selection; the panel stays on the anomaly when it was one."""
    st.session_state[CHANGES] = st.session_state.get(CHANGES, 0) + 1
    st.session_state[ANOMALY_FOCUS] = anomaly_ids[0] if len(anomaly_ids) == 1 else None


def set_status(anomaly_ids: list[int], status: str) -> None:
    if attempt(anomalies.bulk_set_status, me, anomaly_ids, status) is not None:
        changed(anomaly_ids)
        st.toast(f"{plural(len(anomaly_ids), 'anomaly', 'anomalies')} marked {STATUS_LABELS[status].lower()}")


# Bulk actions on the selected rows, and the export of the whole filtered view.
bulk = st.columns([1.2, 1.2, 1.2, 3])
bulk[0].button("Dismiss selected", disabled=not selected_ids, key="bulk_dismiss",
               on_click=open_dialog, args=("dismiss", tuple(selected_ids)))
if bulk[1].button("Mark recovered", disabled=not selected_ids, key="bulk_recovered",
                  help="Mark the selected anomalies recovered"):
    set_status(selected_ids, "recovered")
    st.rerun()
with bulk[2].popover("Export view"):
    for fmt in ("csv", "parquet"):
        if st.button(f"Prepare {fmt.upper()}", key=f"export_{fmt}"):
            exported = attempt(anomalies.export_anomalies, me, filters.current(), fmt, for_people=True)
            if exported:
                st.download_button(f"Download {exported[1]}", exported[0], file_name=exported[1],
                                   key=f"download_{fmt}")
    st.caption("Money with its currency's decimals; each period as its first and last day, as on screen.")


def evidence_chart(detail: AnomalyDetail) -> None:
    daily = detail.evidence.get("daily") or []
    if not daily:
        st.caption("No daily usage was kept for this period.")
        return
    st.markdown("**Daily units, UTC**")
    st.plotly_chart(daily_units([day["day"] for day in daily], [float(day["actual"]) for day in daily],
                                [float(day["reported"]) for day in daily]), width="stretch", key="evidence_chart")


def units_gap(row: anomalies.AnomalyRow) -> bool:
    """The gap is in units (usage that never reached billing): else every unit was reported and the gap is in
    the money billed for them (unbilled usage billed to nobody, missed overage, renewal drift, over-billing)."""
    return row.leak_units > 0


def pricing_table(breakdown: dict[str, Any] | None, currency: str) -> None:
    if not breakdown:
        st.caption("No subscription price: nothing was billed under a price for this period.")
        return
    st.caption(f"{breakdown['price_id']} ({breakdown['model']}) on {units(Decimal(breakdown['quantity']))} units")
    st.dataframe(pd.DataFrame([{"Tier": line["tier"], "Units": units(Decimal(line["units"])),
                                "Unit price": price(line["unit_amount"], currency),
                                "Flat fee": money(Decimal(line["flat_amount"]), currency),
                                "Subtotal": money(Decimal(line["subtotal"]), currency)}
                               for line in breakdown["lines"]]),
                 hide_index=True, width="stretch")
    st.markdown(f"Total **{money(Decimal(breakdown['total']), currency)}**")


def detail_panel(anomaly_id: int) -> None:
    detail = attempt(anomalies.get_anomaly, me, anomaly_id)
    if detail is None:
        return
    row = detail.row
    span = period(row.period_start, row.period_end)
    head = st.columns([5, 1], vertical_alignment="bottom")
    head[0].subheader(f"{row.account_name or row.account_id} · {row.product_key} · {span}")
    if head[1].button("Open account", key="act_account", icon=":material/person_search:",
                      help="Everything about this account: periods, anomalies, actions"):
        open_account(row.account_id)
    st.caption(f"{type_label(row.type)} · severity {row.severity} · {STATUS_LABELS[row.status]}"
               + (f" ({detail.status_reason})" if detail.status_reason else "") + f" · anomaly #{row.id}")
    st.write(explanation(detail))
    figures = st.columns(5)
    figures[0].metric("Amount", money(row.amount, row.currency))
    figures[1].metric("Expected", money(row.expected_amount, row.currency))
    figures[2].metric("Billed", money(row.billed_amount, row.currency))
    if units_gap(row):
        figures[3].metric("Units not reported", units(row.leak_units),
                          help=f"{units(row.actual_units)} used, {units(row.reported_units)} reported to billing")
    else:  # no unit gap to headline: the money is the gap
        figures[3].metric("Units used", units(row.actual_units),
                          help="All reported to billing: the gap is in what was billed for them (expected vs billed), "
                               "not in the units.")
    figures[4].metric("Confidence", confidence(row.confidence))

    actions = st.columns(5)
    can_invoice = row.type in LEAK_TYPES and row.status in ("open", "actioned")
    actions[0].button("Draft invoice", type="primary", disabled=not can_invoice, key="act_invoice",
                      on_click=open_dialog, args=("invoice", row.id))
    actions[1].button("Create CRM task", disabled=row.status not in ("open", "actioned"), key="act_crm",
                      on_click=open_dialog, args=("crm", row.id))
    actions[2].button("Dismiss", disabled=row.status not in ("open", "actioned"), key="act_dismiss",
                      on_click=open_dialog, args=("dismiss", (row.id,)))
    if actions[3].button("Mark recovered", disabled=not can_invoice, key="act_recovered",
                         help=None if row.type in LEAK_TYPES else "Over-billing is a credit risk: nothing to recover"):
        set_status([row.id], "recovered")
        st.rerun()
    if actions[4].button("Reopen", disabled=row.status not in ("dismissed", "recovered"), key="act_reopen"):
        set_status([row.id], "open")
        st.rerun()

    tab_evidence, tab_pricing, tab_confidence, tab_history = st.tabs(
        ["Evidence", "Pricing", "Confidence", "History & notes"])
    with tab_evidence:
        if not units_gap(row):
            gap = row.expected_amount - row.billed_amount
            st.markdown(f"**Expected vs billed** — {money(row.expected_amount, row.currency)} expected, "
                        f"{money(row.billed_amount, row.currency)} billed: "
                        + (f"{money(gap, row.currency)} not billed" if gap >= 0
                           else f"{money(-gap, row.currency)} billed too much"))
            money_rows = [{"label": span, "currency": row.currency, "expected": row.expected_amount,
                           "billed": row.billed_amount}]
            st.plotly_chart(expected_vs_billed(money_rows, "Billing period"), width="stretch", key="evidence_money")
            st.caption(f"No unit is missing from billing's usage records ({units(row.reported_units)} reported for "
                       f"{units(row.actual_units)} used): the gap is in what was billed for them.")
        evidence_chart(detail)
        lines = detail.evidence.get("invoice_lines") or []
        st.caption(f"Invoice lines for this period: {len(lines)}" if lines else "No invoice line for this period.")
        if lines:
            st.dataframe(pd.DataFrame([{
                "Invoice": line.get("invoice_id"),
                "Quantity": units(Decimal(line["quantity"])) if line.get("quantity") is not None else "—",
                "Amount": money(Decimal(line["amount"]), row.currency) if line.get("amount") is not None else "—",
            } for line in lines]), hide_index=True)
    with tab_pricing:
        pricing = detail.evidence.get("pricing") or {}
        left, right = st.columns(2)
        with left:
            st.markdown("**What actual usage costs** (what should have been billed)")
            pricing_table(pricing.get("expected"), row.currency)
        with right:
            st.markdown("**What reported usage costs** under the billing price")
            pricing_table(pricing.get("billing"), row.currency)
    with tab_confidence:
        st.markdown(f"**Overall {confidence(row.confidence)}**: how sure we are that this gap is real, the weighted "
                    "mean of five factors, each from 0% to 100%:")
        st.markdown("\n".join(f"- {line}" for line in confidence_lines(detail.confidence_factors)))
    with tab_history:
        history_tab(detail)
        with st.form("note_form", clear_on_submit=True):
            text = st.text_area("Add a note")
            if st.form_submit_button("Save note") and attempt(anomalies.add_note, me, row.id, text):
                st.rerun()


def history_tab(detail: AnomalyDetail) -> None:
    """What happened to the anomaly, oldest first, from the audit log: who (by name and email), what in words
    (with a dismissal's reason), and the notes."""
    found = (f"Found {when(detail.found_at)}" + (f" by run #{detail.found_by_run}" if detail.found_by_run else "")
             if detail.found_at else "Found by a reconciliation run")
    if not detail.history:
        st.caption(f"No history yet: {found[0].lower() + found[1:]}; nobody has acted on it or written a note.")
    else:
        st.caption(found + ".")
        st.markdown("\n".join(f"- **{when(entry['ts'])}** · {plain(person(entry.get('who') or entry['actor']))} · "
                               f"{plain(event_text(entry['action'], entry.get('details') or {}))}"
                               for entry in detail.history))
    for note in detail.notes:
        by = person(note.get("who") or note.get("by") or "")
        st.info(f"{plain(str(note.get('text', '')))}\n\n— {plain(by)}, {when(note.get('at'))}",
                icon=":material/sticky_note_2:")


focus = selected_ids[0] if selected_ids else st.session_state.get(ANOMALY_FOCUS)
if focus:
    st.divider()
    detail_panel(focus)
else:
    st.caption("Select a row to see its evidence and act on it.")

pending = st.session_state.get(DIALOG)
if pending:
    kind, target = pending
    {"invoice": invoice_dialog, "crm": crm_dialog, "dismiss": dismiss_dialog}[kind](target)
