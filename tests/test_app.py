"""The Streamlit app under streamlit.testing's AppTest: sign-in, every page for both roles, filters,
empty states, and the draft-invoice dialog end to end against the fake Stripe."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.bundle import load_bundle
from core.money import format_money
from db.session import get_engine, upgrade
from services import anomalies, crm_tasks, dashboard, demo, integrations, settings, users
from services.context import Actor
from services.errors import PermissionDenied
from tests.fakes.salesforce_server import running
from tests.fakes.stripe_server import FakeStripe, serve
from ui.format import money_by_currency, plural

ADMIN, ANALYST = demo.DEMO_ADMIN, demo.DEMO_ANALYST
APP = str(Path(__file__).resolve().parent.parent / "app.py")
PAGES = ["pages/overview.py", "pages/anomalies.py", "pages/account.py", "pages/runs.py", "pages/actions.py",
         "pages/audit.py"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo database for the module; each test gets a copy (seeding runs a reconciliation)."""
    folder = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as patch:
        url = f"sqlite:///{folder / 'rrc.db'}"
        patch.setenv("RRC_DATA_DIR", str(folder))
        patch.setenv("DATABASE_URL", url)
        upgrade(url)
        demo.seed_demo(folder / "demo-bundle", accounts=30, seed=5)
        get_engine(url).dispose()
    return folder


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded_template: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    shutil.copytree(seeded_template, data, ignore=shutil.ignore_patterns("demo-bundle"))
    monkeypatch.setenv("RRC_DATA_DIR", str(data))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{data / 'rrc.db'}")
    monkeypatch.setenv("RRC_COOKIE_KEY", "test-cookie-key-0123456789abcdefghijklmnop")
    st.cache_resource.clear()
    yield data
    st.cache_resource.clear()


@pytest.fixture
def empty_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("RRC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'rrc.db'}")
    monkeypatch.setenv("RRC_COOKIE_KEY", "test-cookie-key-0123456789abcdefghijklmnop")
    monkeypatch.setenv("RRC_DEMO", "0")
    st.cache_resource.clear()
    yield tmp_path
    st.cache_resource.clear()


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60).run()


def sign_in(email: str, password: str) -> AppTest:
    at = new_app()
    at.text_input[0].input(email)
    at.text_input[1].input(password)
    return at.button[0].click().run()


def open_invoice_dialog(anomaly_id: int) -> AppTest:
    """The analyst's "Draft invoice" dialog for one anomaly, opened from its detail panel."""
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    at.session_state["anomaly_focus"] = anomaly_id
    at.run()
    at.button(key="act_invoice").click().run()
    no_exceptions(at)
    return at


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:  # type: ignore[no-untyped-def]
    return " ".join(str(e.value) for e in elements)


def test_sign_in_shows_the_overview_with_demo_figures(app_env: Path) -> None:
    at = sign_in(*ADMIN[::2])
    no_exceptions(at)
    assert [t.value for t in at.title] == ["Overview"]
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Last run"] == "Succeeded"
    last_run = next(m for m in at.metric if m.label == "Last run")
    assert re.fullmatch(r"finished \d{4}-\d\d-\d\d \d\d:\d\d UTC", last_run.delta), last_run.delta  # when it ran
    assert tiles["Open leak · USD"].endswith("USD") and "." in tiles["Open leak · USD"]
    assert int(tiles["Accounts affected"]) > 0
    assert len(at.get("plotly_chart")) == 4


def test_wrong_password_then_lockout(app_env: Path) -> None:
    at = sign_in(ANALYST[0], "not-the-password")
    assert "Wrong email or password" in texts(at.error)
    for _ in range(4):
        at = sign_in(ANALYST[0], "still-wrong")
    assert "locked" in texts(at.error)
    at = sign_in(ANALYST[0], ANALYST[2])  # the right password no longer works while locked
    assert "locked" in texts(at.error) and not at.metric


def test_an_account_closed_during_sign_in_leaves_no_half_signed_in_session(app_env: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Deactivated between the password check and the session's start (record_login refuses): the session must
    not keep the signed-in flag, or a later reactivation would let that browser in without a password."""
    monkeypatch.setattr(users, "record_login", lambda email: None)
    at = sign_in(*ANALYST[::2])
    assert "cannot sign in" in texts(at.error) and not at.metric
    assert not at.session_state["authentication_status"]
    monkeypatch.undo()  # reactivated: the next run still asks for the password
    assert at.run().button[0].label == "Sign in" and not at.metric


def test_the_form_answers_an_unknown_email_like_a_real_one(app_env: Path) -> None:
    """Same messages, attempt by attempt, whether the email has an account or not: the form does not tell."""
    def answers(email: str) -> list[str]:  # the lock's end (HH:MM) may fall in another minute for each
        return [re.sub(r"\d\d:\d\d", "HH:MM", texts(sign_in(email, "not-the-password").error))
                for _ in range(users.MAX_FAILED_LOGINS + 1)]

    real, unknown = answers(ANALYST[0]), answers("nobody@demo.example")
    assert real == unknown
    assert "Wrong email or password" in real[0] and "locked" in real[-2] and "locked" in real[-1]


@pytest.mark.parametrize(("who", "settings_visible"), [(ADMIN, True), (ANALYST, False)])
def test_every_page_renders_for_each_role(app_env: Path, who: tuple[str, str, str], settings_visible: bool) -> None:
    at = sign_in(who[0], who[2])
    for page in PAGES:
        at.switch_page(page).run()
        no_exceptions(at)
        assert not at.error, (page, texts(at.error))
    at.switch_page("pages/settings.py").run()
    no_exceptions(at)
    if settings_visible:
        assert [t.label for t in at.tabs] == ["Integrations", "Pricing", "Thresholds & schedule", "Users", "API keys"]
    else:
        assert not at.tabs  # not in the analyst's navigation: Streamlit shows the default page instead
        assert [t.value for t in at.title] != ["Settings"] or "for admins" in texts(at.error)


def test_a_demoted_admin_loses_admin_powers_on_the_next_run(app_env: Path) -> None:
    at = sign_in(ADMIN[0], ADMIN[2])
    actor = at.session_state["actor"]
    demoted = users.create_user(actor, "second.admin@demo.example", "Second", "admin", "password-9")
    at = sign_in("second.admin@demo.example", "password-9")
    at.switch_page("pages/settings.py").run()
    assert [t.label for t in at.tabs][:1] == ["Integrations"]
    users.set_role(actor, demoted.id, "analyst")  # the first admin demotes the second, who is still signed in
    at.switch_page("pages/settings.py").run()
    no_exceptions(at)
    assert at.session_state["actor"].role == "analyst" and not at.tabs
    assert "for admins" in texts(at.error)
    with pytest.raises(PermissionDenied):
        users.create_user(at.session_state["actor"], "mallory@demo.example", "Mallory", "admin", "password-3")


def test_a_page_run_reads_the_role_once(app_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """app.py reads the role for the menu and the page's actor() takes that read: one lookup per run.

    A fresh AppTest with a signed-in session (as the cookie restores it): AppTest runs app.py around
    the page only on its first run (later runs and switch_page execute the page file alone)."""
    me = analyst_actor()
    at = AppTest.from_file(APP, default_timeout=60)
    signed_in = {"authentication_status": True, "username": ANALYST[0], "actor": me, "actor_email": ANALYST[0]}
    for key, value in signed_in.items():
        at.session_state[key] = value
    reads: list[int | None] = []
    read_role = users.current_role

    def counted(user_id: int | None) -> str | None:
        reads.append(user_id)
        return read_role(user_id)

    monkeypatch.setattr(users, "current_role", counted)
    at.run()
    no_exceptions(at)
    assert [t.value for t in at.title] == ["Overview"] and "analyst" in texts(at.sidebar.caption)
    assert reads == [me.user_id]


def test_a_bad_operator_setting_stops_the_app_naming_it(empty_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "5 minutes")
    at = new_app()
    no_exceptions(at)
    assert "Server configuration error — RRC_SCHEDULER_MIN_INTERVAL_SECONDS: " in texts(at.error)
    assert not at.text_input and not at.button  # no sign-in form, no "create your organization"
    assert not (empty_env / "rrc.db").exists()  # the database was not prepared


def test_overview_filters_carry_over_to_the_queue(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    at.selectbox(key="overview_currency").select("EUR").run()
    no_exceptions(at)
    money_tiles = [m.label for m in at.metric if m.label.split(" · ")[0] in ("Open leak", "Over-billing risk")]
    assert money_tiles and all(label.endswith("EUR") or " · " not in label for label in money_tiles)
    at.switch_page("pages/anomalies.py").run()
    no_exceptions(at)
    assert at.selectbox(key="queue_currency").value == "EUR"
    caption = texts(at.caption)
    user = users.get_user_by_email(ANALYST[0])
    assert user is not None
    expected = anomalies.list_anomalies(Actor.user(user.org_id, user.id, "analyst"),
                                        anomalies.AnomalyFilters(currency="eur", statuses=("open", "actioned")))
    assert f"{expected.total:,} anomal{'y' if expected.total == 1 else 'ies'} · page" in caption


def test_the_queue_page_starts_again_at_one_when_the_filters_change(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    at.number_input[0].set_value(2).run()  # past the end: the demo has one page of open anomalies
    assert "page 1 of 1" in texts(at.caption) and at.dataframe
    at.number_input[0].set_value(2).run()
    at.selectbox(key="queue_currency").select("EUR").run()
    no_exceptions(at)
    assert at.number_input[0].value == 1 and "page 1 of 1" in texts(at.caption) and at.dataframe


def test_dismiss_requires_a_reason(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    user = users.get_user_by_email(ANALYST[0])
    assert user is not None
    me = Actor.user(user.org_id, user.id, "analyst")
    target = anomalies.list_anomalies(me, anomalies.AnomalyFilters(statuses=("open",))).rows[0]
    at.session_state["anomaly_dialog"] = ("dismiss", (target.id,))
    at.run()
    at.button(key="dismiss_confirm").click().run()
    assert "Reason: say why" in texts(at.error)  # the form's label, not the service's field name
    assert anomalies.get_anomaly(me, target.id).row.status == "open"
    at.text_area(key="dismiss_reason").input("duplicate of a credit note").run()
    at.button(key="dismiss_confirm").click().run()
    no_exceptions(at)
    assert anomalies.get_anomaly(me, target.id).row.status == "dismissed"


def test_draft_invoice_dialog_creates_one_invoice_after_two_clicks(app_env: Path, seeded_template: Path) -> None:
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    admin = Actor.user(admin_user.org_id, admin_user.id, "admin")
    fake = FakeStripe()
    fake.seed_from_bundle(load_bundle(seeded_template / "demo-bundle"))
    with serve(fake) as base:
        integrations.connect(admin, "stripe", {"api_key": next(iter(fake.api_keys)), "api_base": base})
        leak = anomalies.list_anomalies(admin, anomalies.AnomalyFilters(
            types=("under_reported_usage",), statuses=("open",))).rows[0]
        at = open_invoice_dialog(leak.id)
        dialog_text = texts(at.markdown)
        assert "Total:" in dialog_text and leak.currency.upper() in dialog_text
        assert fake.draft_invoices() == []  # the preview sends nothing
        at.button(key="invoice_confirm").click().run()
        no_exceptions(at)
        assert "Draft invoice in_" in texts(at.success), (texts(at.error), texts(at.markdown))
        at.session_state["anomaly_dialog"] = ("invoice", leak.id)
        at.session_state["invoice_result"] = None
        at.run()
        at.button(key="invoice_confirm").click().run()  # a second click: the same invoice, not another
        no_exceptions(at)
        assert len(fake.draft_invoices()) == 1
        assert anomalies.get_anomaly(admin, leak.id).row.status == "actioned"
        at.switch_page("pages/actions.py").run()
        no_exceptions(at)
        assert fake.draft_invoices()[0]["id"] in at.dataframe[0].value.to_string()


def test_empty_organization_says_what_to_do_next(empty_env: Path) -> None:
    at = new_app()
    no_exceptions(at)
    assert not users.any_organization()  # RRC_DEMO=0: no demo seeded
    form = {t.label: t for t in at.text_input}
    form["Organization name"].input("Globex")
    form["Short name (used in URLs)"].input("globex")
    form["Your name"].input("Gina")
    form["Your work email"].input("gina@globex.example")
    form["Password (at least 8 characters)"].input("globex-pass-1")
    at.button(key="FormSubmitter:create_org-Create organization").click().run()
    assert "Globex is ready" in texts(at.success)
    at = sign_in("gina@globex.example", "globex-pass-1")
    no_exceptions(at)
    assert "No anomalies match" in texts(at.info)
    at.switch_page("pages/runs.py").run()
    assert "No run yet" in texts(at.info)
    at.switch_page("pages/settings.py").run()
    assert "No integrations yet" in texts(at.info)


def test_crm_task_dialog_creates_a_salesforce_task(app_env: Path) -> None:
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    admin = Actor.user(admin_user.org_id, admin_user.id, "admin")
    target = anomalies.list_anomalies(admin, anomalies.AnomalyFilters(statuses=("open",))).rows[0]
    crm_id = anomalies.get_anomaly(admin, target.id).crm_id
    assert crm_id
    with running() as salesforce:
        salesforce.add_account(crm_id, target.account_name or target.account_id)
        integrations.connect(admin, "salesforce", {
            "username": salesforce.username, "password": salesforce.password,
            "security_token": salesforce.security_token, "domain": "login", "instance_url": salesforce.base_url})
        at = sign_in(*ANALYST[::2])
        at.switch_page("pages/anomalies.py").run()
        at.session_state["anomaly_focus"] = target.id
        at.run()
        at.button(key="act_crm").click().run()
        at.button(key="crm_confirm").click().run()
        no_exceptions(at)
        assert "created in Salesforce" in texts(at.success), (texts(at.error), texts(at.warning))
        (task,) = salesforce.tasks.values()
        assert task["WhatId"] == crm_id and f"/anomalies?id={target.id}" in task["Description"]
        assert anomalies.get_anomaly(admin, target.id).row.status == "actioned"


def test_admin_maps_a_product_to_a_price(app_env: Path) -> None:
    at = sign_in(*ADMIN[::2])
    at.switch_page("pages/settings.py").run()
    at.selectbox(key="price_api_calls").select("price_api_usd_2026")
    at.button(key="FormSubmitter:price_map-Save mapping").click().run()
    no_exceptions(at)
    assert "Mapping saved" in texts(at.success)
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    assert settings.get_settings(Actor.user(admin_user.org_id, admin_user.id, "admin")).price_map == {
        "api_calls": "price_api_usd_2026"}


def test_settings_page_shows_refused_thresholds_and_schedules_as_messages(app_env: Path) -> None:
    at = sign_in(*ADMIN[::2])
    at.switch_page("pages/settings.py").run()
    field = {t.label: t for t in at.text_input}
    field["Relative tolerance (share of actual usage)"].input("NaN")
    at.button(key="FormSubmitter:thresholds-Save thresholds").click().run()
    no_exceptions(at)
    assert "Relative tolerance (share of actual usage): expected a share" in texts(at.error) and not at.success
    assert "rel_tolerance" not in texts(at.error)
    field = {t.label: t for t in at.text_input}
    field["Relative tolerance (share of actual usage)"].input("0.005")
    field["Minimum leak amount (in each currency's major unit)"].input("Infinity")
    at.button(key="FormSubmitter:thresholds-Save thresholds").click().run()
    no_exceptions(at)
    assert "Minimum leak amount (in each currency's major unit): expected an amount" in texts(at.error)
    assert not at.success
    at.selectbox(key="schedule_kind").select("interval").run()
    at.text_input(key="schedule_expr_interval").input("99999999999999999999")
    at.button(key="schedule_save").click().run()
    no_exceptions(at)
    assert "Expression: 99999999999999999999 s is out of bounds" in texts(at.error) and not at.success
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    stored = settings.get_settings(Actor.user(admin_user.org_id, admin_user.id, "admin"))
    assert stored.rel_tolerance.is_finite() and stored.min_leak_amount.is_finite() and stored.schedule_kind == "off"


def test_overview_recovered_tile_shows_recoveries_under_the_default_filter(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    no_exceptions(at)
    tiles = {m.label: m.value for m in at.metric}
    empty = {label: value for label, value in tiles.items() if label.startswith("Recovered")}
    assert empty.get("Recovered · USD") == "0.00 USD", tiles  # no bare zero: one tile per currency, named
    user = users.get_user_by_email(ANALYST[0])
    assert user is not None
    me = Actor.user(user.org_id, user.id, "analyst")
    leak = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=anomalies.LEAK_TYPES, statuses=("open",),
                                                                 currency="usd")).rows[0]
    anomalies.set_status(me, leak.id, "recovered")
    at.switch_page("pages/overview.py").run()
    no_exceptions(at)
    assert at.session_state["filters"]["statuses"] == ["open", "actioned"]  # the default filter, untouched
    tiles = {m.label: m.value for m in at.metric}
    assert tiles.get("Recovered · USD") == format_money(leak.amount, "usd"), tiles


def test_settings_confirmations_survive_the_rerun(app_env: Path) -> None:
    at = sign_in(*ADMIN[::2])
    at.switch_page("pages/settings.py").run()
    form = {t.label: t for t in at.text_input}
    form["Email"].input("new.analyst@demo.example")
    form["Name"].input("New Analyst")
    form["First password"].input("password-77")
    at.button(key="FormSubmitter:invite-Add user").click().run()
    no_exceptions(at)
    assert "new.analyst@demo.example can sign in now" in texts(at.success), texts(at.error)
    with serve(FakeStripe()) as base:
        at.text_input(key="stripe_api_key").input("rk_test_confirm")
        at.text_input(key="stripe_api_base").input(base)
        at.button(key="FormSubmitter:integration_stripe-Connect").click().run()
        no_exceptions(at)
        assert "Stripe saved" in texts(at.success), texts(at.error)
    at.run()  # shown once, not on every later run
    assert "Stripe saved" not in texts(at.success)


def test_draft_invoice_dialog_says_up_front_that_stripe_is_not_connected(app_env: Path) -> None:
    user = users.get_user_by_email(ANALYST[0])
    assert user is not None
    me = Actor.user(user.org_id, user.id, "analyst")
    assert not integrations.is_connected(me, "stripe")
    leak = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=("under_reported_usage",),
                                                                 statuses=("open",))).rows[0]
    at = open_invoice_dialog(leak.id)
    warning = texts(at.warning)
    assert "Stripe is not connected" in warning and "admin" in warning, warning
    assert at.button(key="invoice_confirm").disabled
    assert "Total:" in texts(at.markdown)  # the preview still shows what the invoice would hold


def analyst_actor() -> Actor:
    user = users.get_user_by_email(ANALYST[0])
    assert user is not None
    return Actor.user(user.org_id, user.id, "analyst")


def test_a_top_account_on_the_overview_opens_the_account_page(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    top = at.dataframe(key="top_accounts").value
    first = top.iloc[0]["Id"]
    at.session_state["top_accounts"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    no_exceptions(at)
    assert [t.value for t in at.title] == ["Account"]
    assert at.session_state["account_focus"] == first
    assert at.selectbox[0].value == first
    assert not at.info


def test_open_account_from_an_anomaly_and_back(app_env: Path) -> None:
    me = analyst_actor()
    leak = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=("unbilled_usage",),
                                                                 statuses=("open",))).rows[-1]
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    at.session_state["anomaly_focus"] = leak.id
    at.run()
    explanation = next(m.value for m in at.markdown if "units" in str(m.value))
    assert explanation[0].isupper(), explanation
    at.button(key="act_account").click().run()
    no_exceptions(at)
    assert [t.value for t in at.title] == ["Account"] and at.selectbox[0].value == leak.account_id
    listed = next(df.value for df in at.dataframe if "Confidence" in df.value.columns)  # the account's anomalies
    assert leak.id in list(listed["Id"])


def test_account_search_prefers_accounts_with_anomalies_and_says_when_there_are_none(app_env: Path) -> None:
    from services import accounts

    me = analyst_actor()
    everyone = accounts.search_accounts(me, "")
    clean = next(a for a in everyone if not a.anomaly_count)
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/account.py").run()
    assert at.selectbox[0].value == everyone[0].account_id and everyone[0].anomaly_count > 0
    at.session_state["account_focus"] = clean.account_id
    at.switch_page("pages/account.py").run()
    no_exceptions(at)
    assert at.selectbox[0].value == clean.account_id
    assert "No anomalies for this account." in texts(at.caption)


def test_overview_without_leaks_in_a_currency_says_so_in_one_line(app_env: Path) -> None:
    me = analyst_actor()
    eur = anomalies.list_anomalies(me, anomalies.AnomalyFilters(currency="eur", types=anomalies.LEAK_TYPES,
                                                                statuses=("open", "actioned")), page_size=500)
    if eur.rows:  # whatever the demo planted in EUR, the view must have none open
        anomalies.bulk_set_status(me, [row.id for row in eur.rows], "dismissed", "credited in EUR")
    at = sign_in(*ANALYST[::2])
    at.selectbox(key="overview_currency").select("EUR").run()
    no_exceptions(at)
    assert "No leaks in EUR for these filters." in texts(at.info)
    # no empty "Leak by period" / "Top accounts"; the one chart says what it counts, and counts no leak here
    assert [s.value for s in at.subheader] == ["Confidence: leaks and over-billing"]
    (chart,) = at.get("plotly_chart")
    series = {trace["name"]: sum(trace["y"]) for trace in json.loads(chart.proto.spec)["data"]}
    over = anomalies.list_anomalies(me, anomalies.AnomalyFilters(currency="eur", types=("over_billing",),
                                                                 statuses=("open", "actioned")))
    assert series == {"Leaks": 0, "Over-billing": over.total} and not at.dataframe


def test_detail_tabs_show_money_with_currency(app_env: Path) -> None:
    me = analyst_actor()
    target = next(r for r in anomalies.list_anomalies(me, anomalies.AnomalyFilters(statuses=("open",)),
                                                      page_size=200).rows
                  if (anomalies.get_anomaly(me, r.id).evidence.get("pricing") or {}).get("billing")
                  and anomalies.get_anomaly(me, r.id).evidence.get("invoice_lines"))
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    at.session_state["anomaly_focus"] = target.id
    at.run()
    no_exceptions(at)
    cur = target.currency.upper()
    tables = [df.value for df in at.dataframe]
    invoice = next(t for t in tables if "Invoice" in t.columns)
    assert list(invoice.columns) == ["Invoice", "Quantity", "Amount"]
    assert all(str(v).endswith(cur) for v in invoice["Amount"])
    tiers = [t for t in tables if "Unit price" in t.columns]
    assert len(tiers) == 2
    for table in tiers:
        for column in ("Unit price", "Flat fee", "Subtotal"):
            assert all(str(v).endswith(f" {cur}") and "." in str(v) for v in table[column]), table


def test_settings_and_audit_show_values_for_people(app_env: Path) -> None:
    me = analyst_actor()
    leak = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=anomalies.LEAK_TYPES,
                                                                 statuses=("open",))).rows[0]
    anomalies.set_status(me, leak.id, "recovered")
    at = sign_in(*ADMIN[::2])
    at.switch_page("pages/settings.py").run()
    field = {t.label: t.value for t in at.text_input}
    assert field["Relative tolerance (share of actual usage)"] == "0.005"
    assert field["Minimum leak amount (in each currency's major unit)"].endswith(".00")
    at.switch_page("pages/audit.py").run()
    no_exceptions(at)
    who = list(at.dataframe[0].value["Who"])
    assert who[0] == ANALYST[0] and not any(str(w).startswith("user:") for w in who)


def test_overview_tiles_and_over_billing_caption_show_the_services_figures(app_env: Path) -> None:
    """Every money tile and the over-billing caption show the service's figures (services.dashboard.FIGURES)."""
    me = analyst_actor()
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    over = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=("over_billing",), statuses=("open",))).rows
    leak = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=anomalies.LEAK_TYPES, statuses=("open",))).rows
    with running() as salesforce:
        integrations.connect(Actor.user(admin_user.org_id, admin_user.id, "admin"), "salesforce", {
            "username": salesforce.username, "password": salesforce.password,
            "security_token": salesforce.security_token, "domain": "login", "instance_url": salesforce.base_url})
        for row in (over[0], leak[0]):  # one over-billing already being handled, one leak in recovery
            crm_id = anomalies.get_anomaly(me, row.id).crm_id
            assert crm_id
            salesforce.add_account(crm_id, row.account_name or row.account_id)
            crm_tasks.create_crm_task(me, row.id, "salesforce")
    at = sign_in(*ANALYST[::2])
    no_exceptions(at)
    assert at.session_state["filters"]["statuses"] == ["open", "actioned"]
    shown = dashboard.summary(me, anomalies.AnomalyFilters(statuses=("open", "actioned")))
    assert shown.over_billing_handled == {over[0].currency: over[0].amount}
    assert shown.in_recovery == {leak[0].currency: leak[0].amount}
    figures = {"Open leak": shown.open_leak, "Recovered": shown.recovered, "Over-billing risk": shown.over_billing}
    money_tiles = [(m.label.split(" · "), m) for m in at.metric if m.label.split(" · ")[0] in figures]
    rows = {currency for (_, currency), _ in money_tiles}
    assert len(money_tiles) == len(figures) * len(rows) and rows >= {c.upper() for c in shown.open_leak}
    for (label, currency), tile in money_tiles:
        assert tile.value == format_money(figures[label].get(currency.lower(), Decimal(0)), currency), label
        recovering = shown.in_recovery.get(currency.lower()) if label == "Open leak" else None
        assert tile.delta == (f"{format_money(recovering, currency)} in recovery" if recovering else ""), label
    assert leak[0].currency in shown.in_recovery  # so one Open leak tile did show its part in recovery
    assert (f"Over-billing risk: {plural(shown.counts['over_billing'], 'anomaly', 'anomalies')} not handled yet, "
            f"1 more ({money_by_currency(shown.over_billing_handled)}) already being handled.") in texts(at.caption)


def plotly_specs(at: AppTest) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def axes(spec: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {name: axis for name, axis in spec["layout"].items() if name.startswith(("xaxis", "yaxis"))}


def focus_anomaly(at: AppTest, anomaly_id: int) -> AppTest:
    at.switch_page("pages/anomalies.py").run()
    at.session_state["anomaly_focus"] = anomaly_id
    at.run()
    no_exceptions(at)
    return at


def unescaped(at: AppTest) -> str:
    """The page's Markdown as people read it (typed text is shown through ui.format.plain)."""
    return re.sub(r"\\(.)", r"\1", texts(at.markdown))


def test_overview_charts_name_their_currency_and_tell_leaks_from_over_billing(app_env: Path) -> None:
    me = analyst_actor()
    at = sign_in(*ANALYST[::2])
    no_exceptions(at)
    specs = {spec["layout"].get("meta") or i: spec for i, spec in enumerate(plotly_specs(at))}
    *leak_charts, confidence_chart = specs.values()
    for spec in leak_charts:  # every money axis says its currency, and bars start at zero
        money_axes = [axis for axis in axes(spec).values() if axis.get("title", {}).get("text", "").startswith("Leak")]
        assert money_axes and all(re.fullmatch(r"Leak \((USD|EUR)\)", axis["title"]["text"]) for axis in money_axes)
        assert all(axis["rangemode"] == "tozero" for axis in money_axes)
    shown = dashboard.summary(me, anomalies.AnomalyFilters(statuses=("open", "actioned")))
    series = {trace["name"]: list(trace["y"]) for trace in confidence_chart["data"]}
    assert series == {"Leaks": [b["leak"] for b in shown.confidence],
                      "Over-billing": [b["over_billing"] for b in shown.confidence]}
    assert "Confidence: leaks and over-billing" in [s.value for s in at.subheader]
    assert axes(confidence_chart)["yaxis"]["rangemode"] == "tozero"


def test_a_gap_in_billing_shows_money_not_a_zero_unit_gap(app_env: Path) -> None:
    me = analyst_actor()
    unbilled = next(row for row in anomalies.list_anomalies(me, anomalies.AnomalyFilters(
        types=("unbilled_usage", "missed_overage"), statuses=("open",)), page_size=200).rows if row.leak_units == 0)
    at = focus_anomaly(sign_in(*ANALYST[::2]), unbilled.id)
    labels = [m.label for m in at.metric]
    assert "Units used" in labels and "Units not reported" not in labels, labels
    cur = unbilled.currency.upper()
    money_chart, daily_chart = plotly_specs(at)
    assert axes(money_chart)["yaxis"]["title"]["text"] == f"Amount ({cur})"
    assert [trace["name"] for trace in money_chart["data"]] == ["Expected", "Billed"]
    assert axes(daily_chart)["xaxis"]["title"]["text"] == "Day (UTC)"
    assert axes(daily_chart)["yaxis"]["title"]["text"] == "Units per day"
    assert axes(daily_chart)["yaxis"]["rangemode"] == "tozero"  # not from 37
    assert f"{format_money(unbilled.expected_amount, cur)} expected" in unescaped(at)
    # the Confidence tab explains its factors here, not in a file finance users cannot open
    assert "docs/" not in texts(at.markdown) + texts(at.caption)
    assert "Persistence" in unescaped(at) and "0% means" in unescaped(at)
    at.switch_page("pages/account.py").run()
    at.session_state["account_focus"] = unbilled.account_id
    at.switch_page("pages/account.py").run()
    no_exceptions(at)
    account_chart = plotly_specs(at)[0]
    assert [trace["name"] for trace in account_chart["data"]][:2] == ["Expected", "Billed"]
    assert any(axis.get("title", {}).get("text") == f"Amount ({cur})" for axis in axes(account_chart).values())
    periods = next(df.value for df in at.dataframe if "Not billed" in df.value.columns)
    assert all(str(value).endswith(cur) or str(value).endswith(("USD", "EUR")) for value in periods["Not billed"])


def test_history_names_people_says_what_they_did_and_why(app_env: Path) -> None:
    me = analyst_actor()
    first, untouched = anomalies.list_anomalies(me, anomalies.AnomalyFilters(types=anomalies.LEAK_TYPES,
                                                                             statuses=("open",))).rows[:2]
    reason = "Customer on a free pilot for data export until Dec; confirmed with AE"
    anomalies.set_status(me, first.id, "dismissed", reason)
    at = focus_anomaly(sign_in(*ANALYST[::2]), first.id)
    shown = unescaped(at)
    assert f"{ANALYST[1]} ({ANALYST[0]}) · Dismissed — “{reason}”" in shown, shown
    assert "user:" not in shown and "anomaly.dismissed" not in shown
    at = focus_anomaly(at, untouched.id)
    assert "No history yet: found" in texts(at.caption)


def test_the_queue_sorts_amounts_within_each_currency_and_right_aligns_them(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/anomalies.py").run()
    at.multiselect(key="queue_statuses").set_value([]).run()  # every status: both currencies
    no_exceptions(at)
    assert at.selectbox(key="queue_sort").value == "amount_in_currency"
    assert "sorted by currency (A–Z), then amount high to low" in texts(at.caption)
    table = at.dataframe[0]
    amounts = [(value.split()[1], Decimal(value.split()[0].replace(",", ""))) for value in table.value["Amount"]]
    assert len({currency for currency, _ in amounts}) > 1
    assert amounts == sorted(amounts, key=lambda pair: (pair[0], -pair[1]))
    columns = json.loads(table.proto.columns)
    assert columns["Amount"]["alignment"] == columns["Confidence"]["alignment"] == "right"


def test_the_audit_log_shows_an_entry_in_full(app_env: Path) -> None:
    from services import activity

    me = analyst_actor()
    target = anomalies.list_anomalies(me, anomalies.AnomalyFilters(statuses=("open",))).rows[0]
    reason = "A reason long enough to be cut off in the table: " + "the customer was credited in March " * 4
    anomalies.set_status(me, target.id, "dismissed", reason)
    rows, _ = activity.list_audit(me)
    run_entry = next(i for i, row in enumerate(rows) if row.action == "run.succeeded")
    at = sign_in(*ANALYST[::2])
    at.switch_page("pages/audit.py").run()
    assert "times in UTC" in texts(at.caption)
    key = f"audit_table_1_{rows[0].seq}"
    at.session_state[key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    no_exceptions(at)
    assert f"**reason**: {reason.strip()}" in unescaped(at)
    at.session_state[key] = {"selection": {"rows": [run_entry], "columns": [], "cells": []}}
    at.run()
    counts = r"\*\*counts\*\*: \d+ anomalies \(\d+ new, \d+ updated, \d+ reopened, \d+ resolved\)"
    assert re.search(counts, unescaped(at)), unescaped(at)
    assert not any('{"' in details for details in at.dataframe[0].value["Details"])  # no raw JSON in the table


def test_a_schedule_switched_off_ignores_its_expression(app_env: Path) -> None:
    at = sign_in(*ADMIN[::2])
    at.switch_page("pages/settings.py").run()
    assert at.text_input(key="schedule_expr_off").disabled  # Off: nothing to type
    minimum = next(t for t in at.text_input if t.label.startswith("Minimum leak amount"))
    assert "each currency's major unit" in minimum.label and "no conversion" in (minimum.help or "")
    at.selectbox(key="schedule_kind").select("cron").run()
    at.text_input(key="schedule_expr_cron").input("* * * * *").run()
    at.button(key="schedule_save").click().run()
    assert "Expression '* * * * *': fires 60 s apart" in texts(at.error)  # refused while on
    at.selectbox(key="schedule_kind").select("off").run()
    at.button(key="schedule_save").click().run()
    no_exceptions(at)
    assert not at.error and "Schedule saved: off" in texts(at.success)
    admin_user = users.get_user_by_email(ADMIN[0])
    assert admin_user is not None
    stored = settings.get_settings(Actor.user(admin_user.org_id, admin_user.id, "admin"))
    assert (stored.schedule_kind, stored.schedule_expr) == ("off", None)


def test_runs_and_overview_write_a_run_status_alike(app_env: Path) -> None:
    at = sign_in(*ANALYST[::2])
    tile = next(m.value for m in at.metric if m.label == "Last run")
    at.switch_page("pages/runs.py").run()
    statuses = list(at.dataframe[0].value["Status"])
    assert statuses[0] == tile == "Succeeded"


def test_the_invoice_preview_names_the_product_with_thousands_separators(app_env: Path) -> None:
    me = analyst_actor()
    leak = max((row for row in anomalies.list_anomalies(me, anomalies.AnomalyFilters(
        types=("unbilled_usage",), statuses=("open",)), page_size=200).rows), key=lambda row: row.actual_units)
    at = open_invoice_dialog(leak.id)
    line = at.dataframe[-1].value.iloc[0]
    assert line["Quantity"] == f"{leak.actual_units.normalize():,f}" and "," in line["Quantity"]
    # the demo's data_export is named "Data export": its name, not "data_export" nor "Data export (data_export)"
    assert line["Description"].startswith(f"{leak.product_key.replace('_', ' ').capitalize()}: "
                                          f"{line['Quantity']} units used ")
