"""The signed-in user as the services see them, and one way to show what a service refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from services.context import Actor
from services.errors import ServiceError

T = TypeVar("T")


def actor() -> Actor:
    """The Actor app.py put in the session after sign-in (pages only run once it is there)."""
    current = st.session_state.get("actor")
    if current is None:
        st.error("Your session ended — sign in again.")
        st.stop()
    return current


def is_admin() -> bool:
    return actor().role == "admin"


def attempt(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call a service; show its refusal (permission, bad input, not found) instead of a traceback."""
    try:
        return call(*args, **kwargs)
    except ServiceError as exc:
        st.error(str(exc))
        return None
