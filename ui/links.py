"""Moving between pages with something in focus: an account on the Account page, an anomaly in the queue.

The focus lives in session state (pages read it when they open), so a link works from any page and
the Account page keeps showing the same account when it is opened again from the menu.
"""

from __future__ import annotations

import streamlit as st

ACCOUNT_FOCUS = "account_focus"
ANOMALY_FOCUS = "anomaly_focus"
ACCOUNT_PAGE = "pages/account.py"
ANOMALY_PAGE = "pages/anomalies.py"


def open_account(account_id: str) -> None:
    """Show `account_id` on the Account page (switches page: nothing after this call runs)."""
    st.session_state[ACCOUNT_FOCUS] = account_id
    st.switch_page(ACCOUNT_PAGE)


def open_anomaly(anomaly_id: int) -> None:
    """Open the queue with the detail panel of `anomaly_id` (switches page)."""
    st.session_state[ANOMALY_FOCUS] = anomaly_id
    st.switch_page(ANOMALY_PAGE)
