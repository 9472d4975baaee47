"""Sign-in lockout that does not tell which emails have an account; `_flush_unique` and its integrity errors.

On SQLite and PostgreSQL. The services read the time through `services.users.datetime`, which the
`clock` fixture replaces, so a lock's end (shown as HH:MM) and its expiry are exact.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import bcrypt
import pytest
import sqlalchemy as sa

from db import crypto
from db.models import Organization, SignInThrottle, User
from db.session import downgrade, get_engine, org_session, system_session, upgrade
from services import api_keys, users
from services.context import Actor
from services.errors import Conflict, InvalidInput, PermissionDenied, TooManySignIns

REAL, UNKNOWN, INACTIVE = "analyst@acme.example", "nobody@acme.example", "gone@acme.example"
START = datetime(2026, 3, 2, 9, 41, 7, tzinfo=UTC)
LOCKED = "too many failed sign-ins; try again after 09:56 UTC"  # START + LOCKOUT
WRONG = "wrong email or password"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def advance(self, by: timedelta) -> None:
        self.now += by


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return clock.now.astimezone(tz)

    monkeypatch.setattr(users, "datetime", Frozen)
    return clock


@pytest.fixture
def emails(org: tuple[Actor, Actor]) -> tuple[str, str, str]:
    """A real account, an email nobody registered and a deactivated account, all in the same state."""
    admin, _ = org
    gone = users.create_user(admin, INACTIVE, "Gus", "analyst", "password-3")
    users.set_active(admin, gone.id, False)
    return REAL, UNKNOWN, INACTIVE


def authenticate_message(email: str, password: str = "not-the-password") -> str:
    with pytest.raises(PermissionDenied) as refused:
        users.authenticate(email, password)
    return str(refused.value)


def fail(email: str) -> str | None:
    """A wrong password, as the app's form and the API send it: the lock message when refused as locked."""
    with pytest.raises(PermissionDenied) as refused:
        users.authenticate(email, "not-the-password")
    return str(refused.value) if isinstance(refused.value, TooManySignIns) else None


def throttle_rows() -> dict[str, tuple[int, datetime | None, datetime]]:
    with system_session() as session:
        rows = session.execute(sa.select(SignInThrottle)).scalars()
        return {r.email_sha256: (r.failed_logins, r.locked_until, r.last_failed_at) for r in rows}


def key(email: str) -> str:
    """The throttle's key: an HMAC under the installation's key, which the email alone does not give."""
    return hmac.new(crypto.mac_keys(users.THROTTLE_MAC_PURPOSE)[0], email.encode(), hashlib.sha256).hexdigest()


def test_every_email_is_locked_alike(emails: tuple[str, str, str], clock: Clock) -> None:
    """authenticate (the app's sign-in form and the API's /api/auth/token): the failure that locks says so, and
    so does every attempt until the lock ends, for a real, an unknown and a deactivated email alike."""
    expected = [WRONG] * (users.MAX_FAILED_LOGINS - 1) + [LOCKED, LOCKED]
    for email in emails:
        assert [authenticate_message(email) for _ in range(users.MAX_FAILED_LOGINS + 1)] == expected, email
        with pytest.raises(api_keys.InvalidCredentials, match=f"^{LOCKED}$"):
            api_keys.issue_user_token(email, "not-the-password")
    assert authenticate_message(REAL, "password-2") == LOCKED  # the right password too, until the lock ends


def test_passwords_are_judged_by_what_bcrypt_reads(org: tuple[Actor, Actor]) -> None:
    """bcrypt reads 72 bytes: a new password may not be longer (bcrypt 5 would raise), and a longer one at sign-in
    is judged by its first 72 bytes, as a hash made by an older bcrypt was, instead of crashing the sign-in."""
    admin, _ = org
    with pytest.raises(InvalidInput, match=r"^password: at most 72 bytes"):
        users.create_user(admin, "long@acme.example", "Lou", "analyst", "é" * 37)  # 37 letters, 74 bytes
    made = users.create_user(admin, "long@acme.example", "Lou", "analyst", "x" * 72)
    assert users.authenticate("long@acme.example", "x" * 72).id == made.id
    assert users.authenticate("long@acme.example", "x" * 72 + "and more").id == made.id
    for email in ("long@acme.example", UNKNOWN):
        assert authenticate_message(email, "y" * 80) == WRONG


def test_a_wrong_current_password_counts_and_locks_like_a_sign_in(org: tuple[Actor, Actor], clock: Clock) -> None:
    """Changing one's own password checks the current one through `authenticate`: a session left open is no way
    around the lockout, and a locked account cannot change its password, even with the right current one."""
    _, analyst = org

    def change(current: str) -> str:
        with pytest.raises(PermissionDenied) as refused:
            users.change_password(analyst, analyst.user_id, "new-password-2", current_password=current)  # type: ignore[arg-type]
        return str(refused.value)

    expected = [WRONG] * (users.MAX_FAILED_LOGINS - 1) + [LOCKED, LOCKED]
    assert [change("not-the-password") for _ in range(users.MAX_FAILED_LOGINS + 1)] == expected
    assert change("password-2") == LOCKED and authenticate_message(REAL, "password-2") == LOCKED
    clock.advance(users.LOCKOUT)
    users.change_password(analyst, analyst.user_id, "new-password-2", current_password="password-2")  # type: ignore[arg-type]
    assert users.authenticate(REAL, "new-password-2").id == analyst.user_id


def test_the_lock_ends_after_lockout_and_counting_starts_again(emails: tuple[str, str, str], clock: Clock) -> None:
    for email in emails:
        for _ in range(users.MAX_FAILED_LOGINS):
            fail(email)
    clock.advance(users.LOCKOUT - timedelta(seconds=1))
    assert [authenticate_message(email) for email in emails] == [LOCKED] * 3
    clock.advance(timedelta(seconds=1))
    assert users.authenticate(REAL, "password-2").email == REAL
    assert [authenticate_message(email) for email in (UNKNOWN, INACTIVE)] == [WRONG] * 2
    for _ in range(users.MAX_FAILED_LOGINS - 2):  # one failure short of a new lock: the old count is gone
        assert fail(UNKNOWN) is None
    assert fail(UNKNOWN) == "too many failed sign-ins; try again after 10:11 UTC"


def test_failures_are_forgotten_after_a_day_for_every_email(emails: tuple[str, str, str], clock: Clock) -> None:
    """The rule the pruning of sign_in_throttle relies on holds for real accounts too, or a pruned row would
    answer differently from an account with the same history."""
    def four_failures_then_wait(wait: timedelta) -> list[str | None]:
        for email in emails:
            for _ in range(users.MAX_FAILED_LOGINS - 1):
                fail(email)
        clock.advance(wait)
        return [fail(email) for email in emails]

    assert four_failures_then_wait(users.FAILURE_MEMORY - timedelta(seconds=1)) == [LOCKED] * 3  # 09:56 next day
    clock.advance(users.LOCKOUT)
    assert four_failures_then_wait(users.FAILURE_MEMORY) == [None] * 3


def test_throttle_stores_no_email_only_unknown_ones(org: tuple[Actor, Actor], clock: Clock) -> None:
    fail(" Nobody@ACME.example ")
    for _ in range(users.MAX_FAILED_LOGINS):
        fail("locked@else.example")
    fail(REAL)  # a real account's failures stay on its user row
    assert throttle_rows() == {key("nobody@acme.example"): (1, None, START),
                               key("locked@else.example"): (0, START + users.LOCKOUT, START)}
    with get_engine().connect() as conn:
        dump = repr(conn.execute(sa.text("SELECT * FROM sign_in_throttle")).all()).lower()
    assert "nobody" not in dump and "example" not in dump
    unkeyed = {hashlib.sha256(email.encode()).hexdigest() for email in ("nobody@acme.example", "locked@else.example")}
    assert not unkeyed & set(throttle_rows())  # a plain hash of a guessed address finds nothing


def test_a_failure_prunes_forgotten_throttle_rows_in_bounded_batches(org: tuple[Actor, Actor], clock: Clock,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for email in ("a@else.example", "b@else.example", "c@else.example"):
        fail(email)
    clock.advance(users.FAILURE_MEMORY - timedelta(seconds=1))
    fail("d@else.example")
    assert len(throttle_rows()) == 4  # a day is not over: nothing forgotten yet
    clock.advance(timedelta(seconds=1))
    monkeypatch.setattr(users, "THROTTLE_PRUNE_BATCH", 2)
    assert authenticate_message("e@else.example") == WRONG
    assert len(throttle_rows()) == 3  # two of a, b, c gone; d and e are recent
    fail(REAL)  # an account's failure prunes too: the same work whether or not the email has an account
    assert set(throttle_rows()) == {key("d@else.example"), key("e@else.example")}


def test_concurrent_failures_on_a_new_email_all_count(org: tuple[Actor, Actor], clock: Clock) -> None:
    """Five failures at once for an email never seen: no primary-key clash, no lost count, so it is locked."""
    barrier = threading.Barrier(users.MAX_FAILED_LOGINS)
    results: list[str | BaseException | None] = []

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(fail("racer@else.example"))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(users.MAX_FAILED_LOGINS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(results) == {None: users.MAX_FAILED_LOGINS - 1, LOCKED: 1}
    assert authenticate_message("racer@else.example") == LOCKED


def test_a_failure_counted_while_a_password_is_checked_is_not_lost(emails: tuple[str, str, str], clock: Clock,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """authenticate reads the counter, spends a bcrypt check, then counts: a failure another request counted
    meanwhile must survive (re-read under the write lock), for a real account as for an unknown email."""
    check = bcrypt.checkpw
    for email in emails:
        for _ in range(users.MAX_FAILED_LOGINS - 2):
            fail(email)

        def check_while_another_fails(password: bytes, hashed: bytes, email: str = email) -> bool:
            monkeypatch.setattr(bcrypt, "checkpw", check)
            assert fail(email) is None  # the 4th failure, from a parallel request
            return check(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", check_while_another_fails)
        assert authenticate_message(email) == LOCKED  # the 5th: it locks, so the 4th was counted
        assert authenticate_message(email) == LOCKED, email


def test_throttle_migration_up_and_down(org: tuple[Actor, Actor], app_db: str) -> None:
    fail(UNKNOWN)
    inspector = sa.inspect(get_engine(app_db))
    assert "last_failed_at" in {c["name"] for c in inspector.get_columns("users")}
    downgrade(app_db, "0008")
    get_engine(app_db).dispose()
    inspector = sa.inspect(get_engine(app_db))
    assert "sign_in_throttle" not in inspector.get_table_names()
    assert "last_failed_at" not in {c["name"] for c in inspector.get_columns("users")}
    with get_engine(app_db).connect() as conn:  # the users survive the column's removal
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 2
    upgrade(app_db)
    assert users.authenticate("admin@acme.example", "password-1").org_id == org[0].org_id
    assert authenticate_message(UNKNOWN) == WRONG and len(throttle_rows()) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("app_db", ["postgres"], indirect=True)
def test_tenant_sessions_cannot_read_the_throttle(org: tuple[Actor, Actor]) -> None:
    """Only system sessions use the table: like apscheduler_jobs (0004), no grant to rrc_app."""
    fail(UNKNOWN)
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), org_session(org[0].org_id) as session:
        session.execute(sa.text("SELECT count(*) FROM sign_in_throttle"))


def test_flush_unique_maps_only_unique_violations(org: tuple[Actor, Actor]) -> None:
    org_id = org[0].org_id

    def add(row: Organization | User) -> None:
        with system_session() as session:
            session.add(row)
            users._flush_unique(session, "taken")

    def user(**overrides: object) -> User:
        fields: dict[str, object] = {"org_id": org_id, "email": "new@acme.example", "name": "N", "role": "analyst",
                                     "password_hash": "x", **overrides}
        return User(**fields)

    with pytest.raises(Conflict, match=r"^taken$"):
        add(user(email=REAL))  # unique email
    with pytest.raises(Conflict, match=r"^taken$"):
        add(Organization(name="Again", slug="acme"))  # unique slug
    with pytest.raises(sa.exc.IntegrityError, match=r"(?i)foreign key"):
        add(user(org_id=org_id + 1000))
    with pytest.raises(sa.exc.IntegrityError, match=r"(?i)not[ -]null"):
        add(user(name=None))
    add(user())  # and a row that breaks nothing goes in
    assert users.get_user_by_email("new@acme.example") is not None
