"""Revenue Recovery Copilot — the Streamlit entry point.

Checks the configuration (a bad operator setting stops every run with a message naming it),
prepares the database (migrations, the demo organization on a first start), signs the user in
against the users in the app database (the app's own form over `users.authenticate`;
streamlit-authenticator keeps the remember-me cookie and signs out), then hands over to
`st.navigation` with the pages the user's role may see. The services check roles again: the
menu only keeps people from clicking into a refusal.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from datetime import UTC, datetime, timedelta

import streamlit as st
import streamlit_authenticator as stauth
from jwt import InvalidTokenError
from streamlit.navigation.page import StreamlitPage
from streamlit_authenticator.utilities import LoginError

from config import ConfigError, load_settings
from db.crypto import local_key
from db.session import database_url
from services import demo, users
from services.context import Actor
from services.errors import PermissionDenied, ServiceError, TooManySignIns
from ui import session

COOKIE_NAME = "rrc_session"
COOKIE_DAYS = 7
AFTER_SIGN_IN = "after_sign_in"  # (url path, query params) a signed-out visitor asked for, opened after sign-in
COOKIE_PENDING = "cookie_pending"  # signed in with a password: the remember-me cookie is still to be written
SIGNED_IN_WITH_PASSWORD = "signed_in_with_password"  # this session's sign-in was the form's, not the cookie's

st.set_page_config(page_title="Revenue Recovery Copilot", page_icon="💸", layout="wide")


@st.cache_resource(show_spinner=False)
def prepare_database(url: str) -> str:
    """Migrate once per process and database; seed the demo org on a first start unless RRC_DEMO=0."""
    demo.prepare_first_start(url)
    return url


# What the pages import beyond app.py: pandas, plotly, the connectors behind the invoice and CRM dialogs.
PAGE_MODULES = ("pandas", "pyarrow.parquet", "plotly.graph_objects", "ui.charts", "ui.filters",
                "ui.format", "ui.links", "services.accounts", "services.activity", "services.anomalies",
                "services.api_keys", "services.catalog", "services.crm_tasks", "services.dashboard", "services.exports",
                "services.integrations", "services.reconciliation", "services.recovery", "services.settings")


@st.cache_resource(show_spinner=False)
def warm_up() -> bool:
    """Once per process, in its first run (with the database's preparation): import what the pages need and take
    those long-lived objects out of the garbage collector's sight.

    The imports (about 1 s: pandas, plotly's subplots, the CRM and Stripe connectors) otherwise land on a user's
    first Overview after signing in and first Anomalies visit. And Streamlit runs a full garbage collection
    after every script run (`runner.postScriptGC`): with some 260,000 objects of loaded libraries that took
    0.2-0.7 s per run, three runs in a row after a sign-in (the cookie component reruns the page twice).
    `gc.freeze()` moves what exists now (modules, classes, functions: alive until the process ends anyway) to
    the permanent generation, so each collection only walks what the runs allocate (about 12,000 objects,
    a few milliseconds). Frozen objects are still freed by reference counting; only garbage cycles that exist
    at this moment are never collected (once). Figures: docs/app.md, Performance.

    Not in a background thread while the form is shown: two threads importing into the same packages can
    meet Python's import-deadlock detection, and a click on a form whose run is still going can lose its
    submit (docs/app.md, Known issues). The first run of a process, which migrates the database already,
    takes that second instead.
    """
    for module in PAGE_MODULES:
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    return True


def configuration_or_stop() -> None:
    """Streamlit cannot refuse to start, so every run refuses instead, before the database or a page is
    touched: a bad operator setting is shown naming its variable (config.py), never as a traceback."""
    try:
        load_settings()
    except ConfigError as exc:
        st.error(f"Server configuration error — {exc}. The operator must correct it and restart the app.")
        st.stop()


def cookie_key() -> str:
    return os.environ.get("RRC_COOKIE_KEY") or local_key("cookie.key")


def create_organization_form() -> None:
    with st.expander("New here? Create your organization"), st.form("create_org", clear_on_submit=False):
        name = st.text_input("Organization name")
        slug = st.text_input("Short name (used in URLs)", help="lower-case letters, digits and dashes")
        admin_name = st.text_input("Your name")
        email = st.text_input("Your work email")
        password = st.text_input("Password (at least 8 characters)", type="password")
        if st.form_submit_button("Create organization"):
            try:
                users.create_organization(name, slug, email, admin_name, password)
            except ServiceError as exc:
                st.error(str(exc))
            else:
                st.success(f"{name} is ready — sign in above as {email.strip().lower()}.")


def signed_in_actor() -> Actor | None:
    """The signed-in, still-active user as an Actor with the role they have now (None when signed
    out or deactivated since)."""
    if not st.session_state.get("authentication_status"):
        return None
    email = st.session_state["username"]
    current = st.session_state.get("actor")
    if current is None or st.session_state.get("actor_email") != email:
        user = users.record_login(email)
        if user is None:
            return None
        current = Actor.user(user.org_id, user.id, user.role)
        st.session_state["actor"], st.session_state["actor_email"] = current, email
        st.session_state["org_name"] = users.get_organization(user.org_id).name
    else:
        current = session.refreshed(current)
    return current


def sign_in_page() -> None:
    """The only page a signed-out visitor gets: the sign-in form and "Create your organization"."""
    st.title("Revenue Recovery Copilot")
    st.caption("Find revenue that was earned but never billed — and recover it.")
    sign_in_form()
    create_organization_form()


def sign_in_form() -> None:
    """The app's own form, not streamlit-authenticator's: that one answers an email it does not list at once
    and never counts the failure, which tells which emails have an account. `users.authenticate` answers
    every email alike (message, bcrypt time, lockout). The authenticator keeps the remember-me cookie."""
    with st.form("sign_in"):
        st.subheader("Sign in")
        email = st.text_input("Email", autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    try:
        user = users.authenticate(email, password)
    except TooManySignIns as exc:
        st.error(f"Sign-in is locked for this email: {exc}.")
        return
    except PermissionDenied:
        st.error("Wrong email or password.")
        return
    st.session_state.update(authentication_status=True, username=user.email, name=user.name, email=user.email,
                            roles=[user.role])
    st.session_state[SIGNED_IN_WITH_PASSWORD] = True
    if signed_in_actor() is not None:
        # Start over with the app's pages; the next full run writes the cookie (remember_sign_in).
        st.session_state[COOKIE_PENDING] = True
        st.rerun()
    # deactivated or locked between the password check and now: this session must not stay half signed in
    st.session_state.update(authentication_status=None, username=None)
    st.error("This account cannot sign in (deactivated or locked).")


def pages_for(role: str) -> dict[str, list]:
    menu = {
        "Recovery": [
            st.Page("pages/overview.py", title="Overview", icon=":material/monitoring:", default=True),
            st.Page("pages/anomalies.py", title="Anomalies", icon=":material/report:", url_path="anomalies"),
            st.Page("pages/account.py", title="Account", icon=":material/person_search:", url_path="account"),
        ],
        "Operations": [
            st.Page("pages/runs.py", title="Runs", icon=":material/sync:", url_path="runs"),
            st.Page("pages/actions.py", title="Actions", icon=":material/task_alt:", url_path="actions"),
            st.Page("pages/audit.py", title="Audit log", icon=":material/policy:", url_path="audit"),
        ],
    }
    if role == "admin":
        menu["Admin"] = [st.Page("pages/settings.py", title="Settings", icon=":material/settings:",
                                 url_path="settings")]
    else:  # the address answers (a bookmark, a shared link) without the page or a menu entry: not "Page not found"
        menu["Operations"].append(st.Page(admins_only, title="Settings", icon=":material/settings:",
                                          url_path="settings", visibility="hidden"))
    return menu


def admins_only() -> None:
    """What /settings shows to someone who is not an admin (pages/settings.py is never run for them)."""
    st.title("Settings")
    st.error("Settings are for admins. Ask an admin of your organization for changes.", icon=":material/lock:")


def sign_in_pages() -> list[StreamlitPage]:
    """The sign-in form under its own address and under every page address of the app, so that a link
    to /anomalies?id=16 opened signed out shows the form (not "Page not found") and is kept for later."""
    paths = [page.url_path for section in pages_for("admin").values() for page in section if page.url_path]
    return [st.Page(sign_in_page, title="Sign in", url_path="sign-in", default=True),
            *[st.Page(sign_in_page, title="Sign in", url_path=path) for path in paths]]


def open_requested_page(current: StreamlitPage, pages: list[StreamlitPage]) -> None:
    """After a sign-in, go where the visitor was heading (a deep link from an invoice or a CRM task).
    Usually the browser is still at that address and `current` is already the page."""
    path, params = st.session_state.pop(AFTER_SIGN_IN, (None, {}))
    target = next((page for page in pages if page.url_path == path), None)
    if target is not None and target.url_path != current.url_path:
        st.switch_page(target, query_params=params)
    elif target is not None and params and st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def remember_sign_in(authenticator: stauth.Authenticate) -> None:
    """Write the remember-me cookie on the first run after a password sign-in, in a run that is not
    cut short by a rerun (a rerun drops the component before the browser has set the cookie)."""
    if st.session_state.pop(COOKIE_PENDING, False):
        authenticator.cookie_controller.set_cookie()


def restore_sign_in(authenticator: stauth.Authenticate) -> None:
    """Sign in from the remember-me cookie (no form drawn). A cookie the authenticator refuses signs the
    visitor out instead of showing an exception page for the cookie's 7 days: its user was deactivated or
    deleted since (`LoginError`: the credentials list active users only), or the token is one the library
    does not catch itself (an algorithm other than HS256, "none" included, or a bad header:
    `InvalidTokenError`; a wrong signature, a malformed or an expired token already count as no cookie).
    A cookie the authenticator accepts is refused the same way when it was issued before its user's last
    deactivation or password change (`users.session_still_valid`): reactivating a user, or the old
    password, must not bring an old cookie back. The cookie carries only its expiry (`exp_date`, which
    streamlit-authenticator 0.4 sets COOKIE_DAYS days ahead of the server's local clock when it writes
    it), so its issue time is that expiry less COOKIE_DAYS, on the same local clock. Lowering COOKIE_DAYS
    would make older cookies look newer: raise it freely, lower it only with a new RRC_COOKIE_KEY.
    The refused cookie is deleted. A session keeps the cookies it connected with (`st.context.cookies`), so
    each of its signed-out runs is refused again and renders the deletion again: a rerun that drops the
    cookie component before the browser ran it (see remember_sign_in) only delays the deletion."""
    if not st.session_state.get("authentication_status"):
        st.session_state.pop(SIGNED_IN_WITH_PASSWORD, None)
    try:
        authenticator.login(location="unrendered")
    except (LoginError, InvalidTokenError):
        authenticator.cookie_controller.delete_cookie()
        return
    if not st.session_state.get("authentication_status") or st.session_state.get(SIGNED_IN_WITH_PASSWORD):
        return  # signed out, or signed in with a password in this session: no cookie to judge
    # signed in by the cookie, in this run or an earlier one of the session: judged on every run (one lookup),
    # so no order of runs and cookie reads lets a revoked cookie through
    cookie = authenticator.cookie_controller.get_cookie()
    if cookie is None:
        return  # none this run: the run that signed in from it had it, and judged it
    expires = cookie.get("exp_date")
    issued = None
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        with contextlib.suppress(ValueError, OverflowError, OSError):
            issued = (datetime.fromtimestamp(expires) - timedelta(days=COOKIE_DAYS)).astimezone(UTC)
    if issued is None or not users.session_still_valid(st.session_state["username"], issued):
        # signed out as the authenticator's logout does, but without its `logout` flag: later runs of this
        # session read the cookie again, refuse it again and render its deletion again
        st.session_state.update(authentication_status=None, username=None, name=None, email=None, roles=None)
        authenticator.cookie_controller.delete_cookie()


def main() -> None:
    configuration_or_stop()
    prepare_database(database_url())
    warm_up()  # before any form is drawn: a click on a form while its run goes on can lose its submit
    # No built-in 0.7 s sleep per signed-out run: the lockout in the database (5 failures, 15 minutes)
    # is the brute-force guard, and a long run let a click arriving meanwhile lose its submit.
    authenticator = stauth.Authenticate(users.credentials_for_authenticator(), COOKIE_NAME, cookie_key(),
                                        COOKIE_DAYS, auto_hash=False, login_sleep_time=0)
    restore_sign_in(authenticator)
    current = signed_in_actor()
    if current is None:
        st.session_state.pop("actor", None)
        page = st.navigation(sign_in_pages(), position="hidden")
        if page.url_path:  # a page of the app, not the sign-in page itself ("")
            st.session_state[AFTER_SIGN_IN] = (page.url_path, st.query_params.to_dict())
        else:
            st.session_state.pop(AFTER_SIGN_IN, None)
        page.run()
        return
    menu = pages_for(current.role)
    page = st.navigation(menu)
    if AFTER_SIGN_IN in st.session_state:
        open_requested_page(page, [p for section in menu.values() for p in section])
    with st.sidebar:
        st.markdown(f"**{st.session_state.get('org_name', '')}**")
        st.caption(f"{st.session_state['username']} · {current.role}")
        authenticator.logout("Sign out", location="sidebar", key="sign_out",
                             callback=lambda _: st.session_state.pop("actor", None))
        remember_sign_in(authenticator)
    with session.read_this_run(current):
        page.run()


main()
