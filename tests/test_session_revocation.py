"""Deactivation and password change end a user's API tokens and remember-me cookies for good, on SQLite and
PostgreSQL (`users.sessions_valid_after`, migration 0012). The app's cookie itself is driven in a real browser
(tests/test_browser.py); here is the rule it goes through, `users.session_still_valid`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api import create_app
from config import Settings
from db.models import AuditEntry, User
from db.session import org_session, system_session
from services import api_keys, users
from services.context import Actor
from services.errors import InvalidInput, NotFound, PermissionDenied

ANALYST, ANALYST_PASSWORD = "analyst@acme.example", "password-2"


def refused(token: str) -> None:
    with pytest.raises(api_keys.InvalidCredentials, match=r"^invalid token$"):
        api_keys.authenticate_user_token(token)


def cutoff(user_id: int) -> datetime | None:
    with system_session() as session:
        return session.get(User, user_id).sessions_valid_after  # type: ignore[union-attr]


def legacy_token(user_id: int, org_id: int) -> str:
    """A token as issued before tokens carried their issue time (no "i" claim), signed with this installation's key."""
    claims = {"u": user_id, "o": org_id, "e": int(time.time()) + 600}
    payload = api_keys._b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{payload}.{api_keys._sign(payload)}"


@pytest.fixture
def client(app_db: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(api_key_rate=0, api_ip_rate=0)), raise_server_exceptions=False) as c:
        yield c


def test_a_token_issued_before_a_deactivation_stays_refused_after_reactivation(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    old = api_keys.issue_user_token(ANALYST, ANALYST_PASSWORD).access_token
    assert api_keys.authenticate_user_token(old).user_id == analyst.user_id
    assert cutoff(analyst.user_id) is None  # type: ignore[arg-type]
    before = datetime.now(UTC)
    users.set_active(admin, analyst.user_id, False)  # type: ignore[arg-type]
    revoked_at = cutoff(analyst.user_id)  # type: ignore[arg-type]
    assert revoked_at is not None and before <= revoked_at <= datetime.now(UTC)
    refused(old)
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    assert cutoff(analyst.user_id) == revoked_at, "reactivation keeps the cut-off"  # type: ignore[arg-type]
    refused(old)
    new = api_keys.issue_user_token(ANALYST, ANALYST_PASSWORD)  # signing in again gives a token that works
    assert api_keys.authenticate_user_token(new.access_token).user_id == analyst.user_id
    refused(old)


def test_over_http_the_old_token_is_a_401_like_any_invalid_one(org: tuple[Actor, Actor], client: TestClient) -> None:
    admin, analyst = org
    old = client.post("/api/auth/token", json={"email": ANALYST, "password": ANALYST_PASSWORD}).json()["access_token"]
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    users.set_active(admin, analyst.user_id, False)  # type: ignore[arg-type]
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    response = client.get("/api/runs", headers={"Authorization": f"Bearer {old}"})
    assert response.status_code == 401 and response.json()["detail"] == "invalid token"
    assert response.headers["www-authenticate"] == "Bearer"
    new = client.post("/api/auth/token", json={"email": ANALYST, "password": ANALYST_PASSWORD}).json()["access_token"]
    assert client.get("/api/runs", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_a_password_change_refuses_older_tokens_and_the_old_password(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    old = api_keys.issue_user_token(ANALYST, ANALYST_PASSWORD).access_token
    admins = api_keys.issue_user_token("admin@acme.example", "password-1").access_token
    users.change_password(analyst, analyst.user_id, "new-password-2", current_password=ANALYST_PASSWORD)  # type: ignore[arg-type]
    refused(old)
    with pytest.raises(PermissionDenied, match="wrong email or password"):
        users.authenticate(ANALYST, ANALYST_PASSWORD)
    new = api_keys.issue_user_token(ANALYST, "new-password-2").access_token  # at once: not refused as "too early"
    assert api_keys.authenticate_user_token(new).user_id == analyst.user_id
    assert api_keys.authenticate_user_token(admins).user_id == admin.user_id, "other users' tokens are untouched"

    users.change_password(admin, analyst.user_id, "reset-by-admin")  # type: ignore[arg-type]
    refused(new)  # an admin's reset ends the user's sessions too
    assert users.authenticate(ANALYST, "reset-by-admin").id == analyst.user_id
    with org_session(admin.org_id) as session:
        entries = session.scalars(sa.select(AuditEntry).where(AuditEntry.action == "user.password_changed")
                                  .order_by(AuditEntry.seq)).all()
    assert [(e.actor, e.details) for e in entries] == [(analyst.label, {"email": ANALYST, "by": "self"}),
                                                      (admin.label, {"email": ANALYST, "by": "reset"})]


def test_who_may_change_a_password_and_to_what(org: tuple[Actor, Actor]) -> None:
    admin, analyst = org
    token = api_keys.issue_user_token(ANALYST, ANALYST_PASSWORD).access_token
    with pytest.raises(PermissionDenied, match="wrong email or password"):  # one's own: the current one is checked
        users.change_password(analyst, analyst.user_id, "new-password-2", current_password="not-it")  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="wrong email or password"):
        users.change_password(analyst, analyst.user_id, "new-password-2")  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="admin"):  # an analyst cannot reset someone else's
        users.change_password(analyst, admin.user_id, "new-password-1")  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="wrong email or password"):  # an admin changing their own: checked too
        users.change_password(admin, admin.user_id, "new-password-1")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"^new password: at least 8 characters$"):
        users.change_password(admin, analyst.user_id, "short")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"^new password: at most 72 bytes"):
        users.change_password(admin, analyst.user_id, "é" * 37)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        users.change_password(admin, 999_999, "new-password-9")
    assert api_keys.authenticate_user_token(token).user_id == analyst.user_id, "nothing refused changed anything"
    assert users.authenticate(ANALYST, ANALYST_PASSWORD).id == analyst.user_id
    assert cutoff(analyst.user_id) is None  # type: ignore[arg-type]


def test_a_token_from_before_issue_times_is_refused_once_there_is_a_cut_off(org: tuple[Actor, Actor]) -> None:
    """Tokens issued by the previous version carry no issue time: they keep working until the user's first
    deactivation or password change, and are refused from then on, as they were all issued before it."""
    admin, analyst = org
    legacy = legacy_token(analyst.user_id, analyst.org_id)  # type: ignore[arg-type]
    assert api_keys.authenticate_user_token(legacy).user_id == analyst.user_id
    users.set_active(admin, analyst.user_id, False)  # type: ignore[arg-type]
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    refused(legacy)


def test_a_token_is_refused_by_the_millisecond_it_was_issued(org: tuple[Actor, Actor]) -> None:
    """Issued a millisecond before the cut-off: refused; at or after it: accepted. The issue time is signed."""
    admin, analyst = org
    users.set_active(admin, analyst.user_id, False)  # type: ignore[arg-type]
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    revoked_ms = -(-(cutoff(analyst.user_id) - api_keys.EPOCH) // timedelta(milliseconds=1))  # type: ignore[arg-type, operator]
    token = api_keys.issue_user_token(ANALYST, ANALYST_PASSWORD).access_token
    payload, _, _ = token.partition(".")
    claims = json.loads(api_keys._unb64(payload))
    assert isinstance(claims["i"], int) and revoked_ms <= claims["i"] <= time.time_ns() // 1_000_000

    def signed(issued: object) -> str:
        body = api_keys._b64(json.dumps({**claims, "i": issued}, separators=(",", ":")).encode())
        return f"{body}.{api_keys._sign(body)}"

    refused(signed(revoked_ms - 1))
    assert api_keys.authenticate_user_token(signed(revoked_ms)).user_id == analyst.user_id
    for malformed in ("1", 1.5, True, None, 10 ** 20):
        refused(signed(malformed))
    later = api_keys._b64(json.dumps({**claims, "i": revoked_ms + 60_000}, separators=(",", ":")).encode())
    refused(f"{later}.{token.partition('.')[2]}")  # a moved issue time breaks the signature


def test_the_cookie_rule_refuses_what_was_issued_before_the_cut_off(org: tuple[Actor, Actor]) -> None:
    """`session_still_valid`, which app.restore_sign_in asks about a remember-me cookie's issue time."""
    admin, analyst = org
    issued = datetime.now(UTC)
    assert users.session_still_valid(ANALYST, issued) and users.session_still_valid(ANALYST.upper(), issued)
    users.set_active(admin, analyst.user_id, False)  # type: ignore[arg-type]
    assert not users.session_still_valid(ANALYST, datetime.now(UTC)), "an inactive user's cookie is refused"
    users.set_active(admin, analyst.user_id, True)  # type: ignore[arg-type]
    revoked_at = cutoff(analyst.user_id)
    assert revoked_at is not None
    assert not users.session_still_valid(ANALYST, issued)
    assert not users.session_still_valid(ANALYST, revoked_at - timedelta(microseconds=1))
    assert users.session_still_valid(ANALYST, revoked_at)
    assert users.session_still_valid(ANALYST, datetime.now(UTC))
    assert users.session_still_valid("admin@acme.example", issued), "other users keep theirs"
    assert not users.session_still_valid("nobody@acme.example", datetime.now(UTC))
    users.change_password(admin, analyst.user_id, "reset-by-admin")  # type: ignore[arg-type]
    assert not users.session_still_valid(ANALYST, revoked_at + timedelta(milliseconds=1))
