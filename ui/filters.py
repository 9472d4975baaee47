"""The filter bar shared by the Overview and the anomaly queue.

Choices live in session state under `filters.*` (not in widget keys, which Streamlit forgets when
a page is left), so a filter set on the Overview is still in force on the Anomalies page.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import streamlit as st

from services.anomalies import SEVERITIES, STATUSES, TYPES, AnomalyFilters
from ui.format import STATUS_LABELS, type_label

STORE = "filters"
DEFAULT_STATUSES = ("open", "actioned")


def _stored() -> dict[str, Any]:
    return st.session_state.setdefault(STORE, {"statuses": list(DEFAULT_STATUSES)})


def current() -> AnomalyFilters:
    values = _stored()
    return AnomalyFilters(
        period_from=values.get("period_from"), period_to=_day_after(values.get("period_last")),
        currency=values.get("currency"),
        types=tuple(values.get("types", ())), statuses=tuple(values.get("statuses", ())),
        severities=tuple(values.get("severities", ())),
        min_confidence=Decimal(str(values["min_confidence"])) if values.get("min_confidence") else None,
        account=values.get("account") or None,
    )


def filter_bar(page: str, currencies: list[str], *, with_status: bool = True, with_account: bool = False) -> None:
    """Draw the filters; `page` keeps widget keys unique per page."""
    values = _stored()
    with st.container(border=True):
        cols = st.columns([2, 1, 2, 2, 1.3] if with_status else [2, 1, 2, 1.3])
        chosen_span = (values["period_from"], values["period_last"]) if values.get("period_from") else ()
        span = cols[0].date_input("Period start between", value=chosen_span,
                                  key=f"{page}_period", help="Periods whose start falls in this range (UTC)",
                                  format="YYYY-MM-DD")
        if isinstance(span, tuple) and len(span) == 2:
            values["period_from"], values["period_last"] = span
        elif not span:
            values["period_from"] = values["period_last"] = None
        options = ["All", *currencies]
        chosen = values.get("currency")
        currency = cols[1].selectbox("Currency", options, index=options.index(chosen.upper()) if chosen and
                                     chosen.upper() in options else 0, key=f"{page}_currency")
        values["currency"] = None if currency == "All" else currency.lower()
        values["types"] = cols[2].multiselect("Type", TYPES, default=values.get("types", []), format_func=type_label,
                                              key=f"{page}_types", placeholder="All types")
        if with_status:
            values["statuses"] = cols[3].multiselect("Status", STATUSES, default=values.get("statuses", []),
                                                     format_func=STATUS_LABELS.get, key=f"{page}_statuses",
                                                     placeholder="All statuses")
        values["min_confidence"] = cols[-1].slider("Min. confidence", 0.0, 1.0,
                                                   float(values.get("min_confidence") or 0.0), 0.05,
                                                   key=f"{page}_confidence")
        if with_account:
            more = st.columns([2, 2])
            values["severities"] = more[0].multiselect("Severity", SEVERITIES, default=values.get("severities", []),
                                                       key=f"{page}_severities", placeholder="All severities")
            values["account"] = more[1].text_input("Account", value=values.get("account") or "",
                                                   key=f"{page}_account", placeholder="id or name contains…")


def _day_after(day: date | None) -> date | None:
    return day + timedelta(days=1) if day else None
