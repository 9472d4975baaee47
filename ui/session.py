"""The signed-in user as the services see them, and one way to show what a service refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import streamlit as st

from services import users
from services.context import Actor
from services.errors import ServiceError
from ui.format import labelled

T = TypeVar("T")
_READ_THIS_RUN: ContextVar[Actor | None] = ContextVar("actor_read_this_run", default=None)


def refreshed(current: Actor) -> Actor | None:
    """`current` with the role its user has now, None when deactivated since: a session outlives a
    demotion or a deactivation, the database does not, and the services trust the Actor's role.
    A deactivated user's tab is signed out the authenticator's way too, so a reactivation does not let
    it back in: it would need the remember-me cookie, which the deactivation revoked."""
    role = users.current_role(current.user_id)
    if role is None:
        st.session_state.pop("actor", None)
        st.session_state.update(authentication_status=None, username=None, name=None, email=None, roles=None)
        return None
    if role != current.role:
        current = st.session_state["actor"] = Actor.user(current.org_id, current.user_id, role)  # type: ignore[arg-type]
    return current


@contextmanager
def read_this_run(current: Actor) -> Iterator[None]:
    """While app.py runs the page: `current` was just refreshed (to build the menu), so the page's
    `actor()` takes it instead of a second lookup. Reset when the page ends, also through st.rerun or
    st.stop, so the next run, or a fragment rerun (which skips app.py), reads the role again."""
    token = _READ_THIS_RUN.set(current)
    try:
        yield
    finally:
        _READ_THIS_RUN.reset(token)


def actor() -> Actor:
    """The signed-in user with the role they have now, called once at the top of each page: the
    services trust this Actor. One primary-key lookup per run: the one app.py made for the menu
    (`read_this_run`), else, for a page run without app.py around it (AppTest's switch_page), one here."""
    current = _READ_THIS_RUN.get()
    if current is None and (stored := st.session_state.get("actor")) is not None:
        current = refreshed(stored)
    if current is None:
        st.error("Your session ended — sign in again.")
        st.stop()
    return current


def attempt(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call a service; show its refusal (permission, bad input, not found) instead of a traceback."""
    return attempt_labelled({}, call, *args, **kwargs)


def attempt_labelled(labels: dict[str, str], call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`attempt`, with a refusal naming a field by the label the form shows for it (`labels`: the service's
    field name -> the label), so `rel_tolerance: expected a share ...` reads `Relative tolerance: ...`."""
    try:
        return call(*args, **kwargs)
    except ServiceError as exc:
        st.error(labelled(str(exc), labels))
        return None


FLASH = "flash_messages"


def flash(message: str) -> None:
    """A confirmation to show on the next run: `st.success` followed by `st.rerun()` is never seen."""
    st.session_state.setdefault(FLASH, []).append(message)


def show_flash() -> None:
    """Show (once) the confirmations queued by `flash` before the last rerun."""
    for message in st.session_state.pop(FLASH, []):
        st.success(message, icon=":material/check_circle:")
