"""The signed-in user as the services see them, and one way to show what a service refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from services import users
from services.context import Actor
from services.errors import ServiceError

T = TypeVar("T")


def refreshed(current: Actor) -> Actor | None:
    """`current` with the role its user has now, None when deactivated since: a session outlives a
    demotion or a deactivation, the database does not, and the services trust the Actor's role."""
    role = users.current_role(current.user_id)
    if role is None:
        st.session_state.pop("actor", None)
        return None
    if role != current.role:
        current = st.session_state["actor"] = Actor.user(current.org_id, current.user_id, role)  # type: ignore[arg-type]
    return current


def actor() -> Actor:
    """The signed-in user as app.py put them in the session, re-read once more: app.py re-reads the
    role to build the menu, but a page can run without it (AppTest's switch_page), and the services
    trust this Actor — one primary-key lookup per page run, called once at the top of each page."""
    current = st.session_state.get("actor")
    if current is not None:
        current = refreshed(current)
    if current is None:
        st.error("Your session ended — sign in again.")
        st.stop()
    return current


def attempt(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call a service; show its refusal (permission, bad input, not found) instead of a traceback."""
    try:
        return call(*args, **kwargs)
    except ServiceError as exc:
        st.error(str(exc))
        return None


FLASH = "flash_messages"


def flash(message: str) -> None:
    """A confirmation to show on the next run: `st.success` followed by `st.rerun()` is never seen."""
    st.session_state.setdefault(FLASH, []).append(message)


def show_flash() -> None:
    """Show (once) the confirmations queued by `flash` before the last rerun."""
    for message in st.session_state.pop(FLASH, []):
        st.success(message, icon=":material/check_circle:")
