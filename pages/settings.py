"""Settings (admins): integrations, thresholds and schedule, users, API keys.

The menu hides this page from analysts; every service called here refuses them as well.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation

import pandas as pd
import streamlit as st

from services import api_keys, catalog, integrations, settings, users
from ui.format import decimal_text, when
from ui.session import actor, attempt, attempt_labelled, flash, show_flash

me = actor()
st.title("Settings")
if me.role != "admin":
    st.error("Settings are for admins. Ask an admin of your organization for changes.")
    st.stop()
show_flash()

FIELDS: dict[str, list[tuple[str, str, bool]]] = {  # kind -> (field, label, secret)
    "stripe": [("api_key", "Restricted API key (rk_… or sk_…)", True), ("api_base", "API base URL (optional)", False)],
    "salesforce": [("username", "Username", False), ("password", "Password", True),
                   ("security_token", "Security token", True), ("domain", "Domain: login or test (sandbox)", False),
                   ("instance_url", "Instance URL (optional)", False)],
    "hubspot": [("access_token", "Private app token", True), ("host", "API host (optional)", False)],
    "sql_source": [("url", "SQLAlchemy URL", True), ("table", "Table or view", False), ("schema", "Schema", False)],
    "s3_parquet": [("bucket", "Bucket", False), ("prefix", "Prefix", False), ("region", "Region", False),
                   ("access_key_id", "Access key id", False), ("secret_access_key", "Secret access key", True),
                   ("endpoint_url", "Endpoint URL (optional)", False),
                   ("export_prefix", "Prefix for audit exports (optional)", False)],
}
USAGE_SOURCES = ("sql_source", "s3_parquet")
TOLERANCE = "Relative tolerance (share of actual usage)"
MIN_LEAK = "Minimum leak amount (in each currency's major unit)"
MIN_OVER_BILLING = "Minimum over-billing amount (in each currency's major unit)"
PER_CURRENCY = ("Applies to each anomaly in its own currency, with no conversion: 1.00 means 1.00 USD for anomalies in "
                "USD and 1.00 EUR for those in EUR (1 for yen, which has no minor unit).")
SCHEDULE_KINDS = {"off": "Off", "cron": "Cron expression", "interval": "Every N seconds"}
FORM_LABELS = {  # the service's field names -> this page's labels, for its refusals
    "rel_tolerance": TOLERANCE, "min_leak_amount": MIN_LEAK, "over_billing_min": MIN_OVER_BILLING,
    "schedule kind": "Schedule", "interval expression": "Expression", "cron expression": "Expression",
    "interval": "Expression", "time zone": "Time zone",
}

tab_integrations, tab_pricing, tab_thresholds, tab_users, tab_keys = st.tabs(
    ["Integrations", "Pricing", "Thresholds & schedule", "Users", "API keys"])


def integration_form(kind: str, current: integrations.IntegrationView | None) -> None:
    stored = current.config if current else {}
    with st.form(f"integration_{kind}"):
        config: dict[str, object] = {}
        for field, label, secret in FIELDS[kind]:
            value = st.text_input(label, value=str(stored.get(field) or ""), key=f"{kind}_{field}",
                                  type="password" if secret and not stored.get(field) else "default")
            if value.strip():
                config[field] = value.strip()
        if kind in USAGE_SOURCES:
            columns = st.text_input("Column mapping (JSON)", key=f"{kind}_columns",
                                    value=json.dumps(stored.get("columns") or {
                                        "account_id": "account_id", "product_key": "product_key", "ts": "ts",
                                        "units": "units"}))
            config["side"] = st.selectbox("These events are", ["actual", "reported"], key=f"{kind}_side",
                                          index=1 if stored.get("side") == "reported" else 0)
            try:
                config["columns"] = json.loads(columns)
            except json.JSONDecodeError as exc:
                config["columns"] = None
                st.caption(f"Column mapping is not valid JSON: {exc.msg}")
        saved = st.form_submit_button("Save" if current else "Connect")
        if saved and attempt(integrations.connect, me, kind, config) is not None:
            flash(f"{integrations.LABELS[kind]} saved. Test the connection to check it.")
            st.rerun()


with tab_integrations:
    connected = {view.kind: view for view in attempt(integrations.list_integrations, me) or []}
    if not connected:
        st.info("No integrations yet — connect Stripe below, then a usage source. The demo organization "
                "reconciles its bundled files without any.")
    for kind, label in integrations.LABELS.items():
        view = connected.get(kind)
        badge = {"ok": "🟢 connected", "error": "🔴 failing", "unchecked": "⚪ not checked"}.get(
            view.status, view.status) if view else "not connected"
        with st.expander(f"{label} — {badge}", expanded=False):
            if view:
                st.caption(f"Last check {when(view.last_checked_at)}: {view.status_message or 'never checked'} · "
                           f"last sync {when(view.last_synced_at)}")
                left, right = st.columns(2)
                if left.button("Test connection", key=f"test_{kind}"):
                    result = attempt(integrations.test_connection, me, kind)
                    if result is not None:
                        (st.success if result.ok else st.error)(result.message)
                if right.button("Disconnect", key=f"disconnect_{kind}"):
                    attempt(integrations.disconnect, me, kind)
                    st.rerun()
            integration_form(kind, view)

with tab_pricing:
    st.caption("Which price values usage of a product that no subscription covers (unbilled usage). "
               "An account's own earlier subscription price still comes first.")
    products = attempt(catalog.price_catalog, me)
    if not products:
        st.info("No products yet — they come from the data source (Stripe after a sync, or the demo bundle).")
    else:
        with st.form("price_map"):
            choices: dict[str, str | None] = {}
            for product in products:
                options = [None, *(choice.price_id for choice in product.prices)]
                labels = {choice.price_id: choice.label for choice in product.prices}
                automatic = f"Automatic ({product.default_price_id or 'first listed price'})"
                choices[product.product_key] = st.selectbox(
                    f"{product.name} ({product.product_key})", options, key=f"price_{product.product_key}",
                    index=options.index(product.mapped_price_id) if product.mapped_price_id in options else 0,
                    format_func=lambda value, labels=labels, automatic=automatic: labels[value] if value else automatic)
            if st.form_submit_button("Save mapping") and attempt(catalog.set_price_map, me, choices) is not None:
                st.success("Mapping saved; it applies from the next run.")

with tab_thresholds:
    current = attempt(settings.get_settings, me)
    if current is not None:
        with st.form("thresholds"):
            st.markdown("**Thresholds** — keep rounding and late events from raising anomalies")
            tolerance = st.text_input(TOLERANCE, value=decimal_text(current.rel_tolerance),
                                      help="A gap smaller than this share of the period's actual usage is ignored, "
                                           "e.g. 0.005 = 0.5%.")
            minimum = st.text_input(MIN_LEAK, value=decimal_text(current.min_leak_amount, 2), help=PER_CURRENCY)
            over = st.text_input(MIN_OVER_BILLING, value=decimal_text(current.over_billing_min, 2), help=PER_CURRENCY)
            if st.form_submit_button("Save thresholds"):
                try:
                    values = Decimal(tolerance), Decimal(minimum), Decimal(over)
                except InvalidOperation:
                    st.error("Thresholds must be decimal numbers, e.g. 0.005 and 1.00")
                else:
                    if attempt_labelled(FORM_LABELS, settings.update_thresholds, me, rel_tolerance=values[0],
                                        min_leak_amount=values[1], over_billing_min=values[2]) is not None:
                        st.success("Thresholds saved; they apply from the next run.")
        # Not a form: choosing "Off" disables the expression at once (with schedule Off no expression is kept).
        with st.container(border=True, key="schedule"):
            st.markdown("**Reconciliation schedule** — run by the scheduler process")
            kinds = list(settings.SCHEDULE_KINDS)
            kind = st.selectbox("Schedule", kinds, index=kinds.index(current.schedule_kind),
                                format_func=lambda value: SCHEDULE_KINDS.get(value, value), key="schedule_kind")
            off = kind == "off"
            expr = st.text_input(  # one box per kind: a cron expression is no interval
                "Expression", value=(current.schedule_expr or "") if kind == current.schedule_kind and not off else "",
                disabled=off, key=f"schedule_expr_{kind}",
                placeholder="not used when the schedule is Off" if off else "0 6 * * *" if kind == "cron" else "3600",
                help="Cron: `0 6 * * *` (daily at 06:00); every N seconds: e.g. 3600. Not used when Off.")
            zone = st.text_input("Time zone", value=current.schedule_timezone, key="schedule_zone",
                                 help="For cron expressions, e.g. UTC or Europe/Paris")
            if st.button("Save schedule", key="schedule_save") and attempt_labelled(
                    FORM_LABELS, settings.update_schedule, me, kind, None if off else expr.strip() or None,
                    zone.strip()) is not None:
                st.success("Schedule saved: off, no scheduled runs." if off
                           else f"Schedule saved: {SCHEDULE_KINDS[kind].lower()} {expr.strip()} ({zone.strip()}).")

with tab_users:
    people = attempt(users.list_users, me) or []
    st.dataframe(pd.DataFrame([{"Email": u.email, "Name": u.name, "Role": u.role,
                                "Active": "yes" if u.active else "no"} for u in people]),
                 hide_index=True, width="stretch")
    with st.form("invite", clear_on_submit=True):
        st.markdown("**Invite a user** — share the first password with them privately")
        cols = st.columns(4)
        email = cols[0].text_input("Email")
        name = cols[1].text_input("Name")
        role = cols[2].selectbox("Role", ["analyst", "admin"])
        password = cols[3].text_input("First password", type="password")
        if st.form_submit_button("Add user") and attempt(users.create_user, me, email, name, role, password):
            flash(f"{email.strip().lower()} can sign in now.")
            st.rerun()
    if people:
        by_email = {u.email: u for u in people}
        cols = st.columns([3, 1, 1, 1], vertical_alignment="bottom")  # the buttons line up with the boxes
        chosen = by_email[cols[0].selectbox("User", list(by_email), key="user_pick")]
        new_role = cols[1].selectbox("Role", ["analyst", "admin"], index=0 if chosen.role == "analyst" else 1,
                                     key="user_role")
        if cols[2].button("Change role", key="user_set_role") and attempt(users.set_role, me, chosen.id, new_role):
            flash(f"{chosen.email} is now {new_role}.")
            st.rerun()
        label = "Deactivate" if chosen.active else "Reactivate"
        if cols[3].button(label, key="user_toggle") and attempt(users.set_active, me, chosen.id, not chosen.active):
            flash(f"{chosen.email} {'deactivated' if chosen.active else 'reactivated'}.")
            st.rerun()

with tab_keys:
    st.caption("API keys let your systems send usage to `POST /api/usage/ingest`. A key is shown once.")
    fresh = st.session_state.pop("new_api_key", None)
    if fresh:
        st.success("Copy this key now — it will not be shown again.")
        st.code(fresh)
    with st.form("new_key", clear_on_submit=True):
        key_name = st.text_input("Key name", placeholder="e.g. product-db ingest")
        if st.form_submit_button("Create key"):
            created = attempt(api_keys.create_api_key, me, key_name)
            if created is not None:
                st.session_state["new_api_key"] = created.plaintext
                st.rerun()
    keys = attempt(api_keys.list_api_keys, me) or []
    for key in keys:
        cols = st.columns([3, 2, 2, 1])
        cols[0].write(f"**{key.name}** `{key.masked}`")
        cols[1].caption(f"created {when(key.created_at)}")
        cols[2].caption(f"revoked {when(key.revoked_at)}" if key.revoked_at else f"last used {when(key.last_used_at)}")
        if not key.revoked_at and cols[3].button("Revoke", key=f"revoke_{key.id}"):
            attempt(api_keys.revoke_api_key, me, key.id)
            st.rerun()
