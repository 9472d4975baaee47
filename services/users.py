"""Organizations, users and sign-in. Admin-only operations are refused here, not just hidden."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import bcrypt
from sqlalchemy import Column, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import load_settings
from db import crypto
from db.models import Organization, OrgSettings, SignInThrottle, User
from db.session import org_session, system_session
from services import audit
from services.context import ROLES, Actor, require_role
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied, TooManySignIns

MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)
FAILURE_MEMORY = timedelta(days=1)  # failures with no other one after them for this long are forgotten
THROTTLE_PRUNE_BATCH = 100  # forgotten sign_in_throttle rows deleted per failed sign-in, at most
MIN_PASSWORD = 8
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; bcrypt 5 refuses longer input instead of cutting it
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
THROTTLE_MAC_PURPOSE = "sign-in-throttle"
UNIQUE_VIOLATIONS = frozenset({"23505", "SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"})


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(load_settings().bcrypt_rounds)).decode()


def _fitting(field: str, value: str, column: Column[str]) -> str:
    """`value` when its column holds it: PostgreSQL refuses longer text with a raw error, SQLite would keep it
    and the org's backup would then not import (services/orgs_backup.py checks lengths)."""
    if len(value) > column.type.length:
        raise InvalidInput(f"{field}: at most {column.type.length} characters")
    return value


def _display_name(field: str, name: str, email: str) -> str:
    """The name typed (refused when longer than its column), else the email cut to the column: only a default
    to show, the email itself is stored whole."""
    typed = name.strip()
    return _fitting(field, typed, User.__table__.c.name) if typed else email[:User.__table__.c.name.type.length]


def _check_password(field: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"{field}: at least {MIN_PASSWORD} characters")
    if len(password.encode()) > BCRYPT_MAX_BYTES:
        raise InvalidInput(f"{field}: at most {BCRYPT_MAX_BYTES} bytes (72 plain letters; accented letters and "
                           "symbols take 2 to 4 bytes each)")


def _check_new_user(email: str, role: str, password: str) -> str:
    email = _fitting("email", _normalised(email), User.__table__.c.email)
    if not EMAIL.match(email):
        raise InvalidInput(f"email: {email!r} is not an email address")
    if role not in ROLES:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    _check_password("password", password)
    with system_session() as session:
        if session.execute(select(User.id).where(User.email == email)).first():
            raise Conflict(f"email: {email} already has an account")
    return email


def create_organization(name: str, slug: str, admin_email: str, admin_name: str, admin_password: str,
                        *, is_demo: bool = False) -> tuple[Organization, User]:
    """The "Create your organization" flow: a new org, its settings and its first admin."""
    if not SLUG.match(slug):
        raise InvalidInput("slug: lower-case letters, digits and dashes, 2 to 63 characters")
    if not name.strip():
        raise InvalidInput("name: required")
    name = _fitting("name", name.strip(), Organization.__table__.c.name)
    email = _check_new_user(admin_email, "admin", admin_password)
    admin_name = _display_name("your name", admin_name, email)
    with system_session() as session:
        if session.execute(select(Organization.id).where(Organization.slug == slug)).first():
            raise Conflict(f"slug: an organization {slug!r} already exists")
        org = Organization(name=name, slug=slug, is_demo=is_demo)
        session.add(org)
        _flush_unique(session, f"slug: an organization {slug!r} already exists")
        session.add(OrgSettings(org_id=org.id))
        user = User(org_id=org.id, email=email, name=admin_name, role="admin",
                    password_hash=hash_password(admin_password))
        session.add(user)
        _flush_unique(session, f"email: {email} already has an account")
        actor = Actor.user(org.id, user.id, "admin")
        audit.append(session, actor, "organization.created", "organization", org.id, {"name": org.name, "slug": slug})
        audit.append(session, actor, "user.created", "user", user.id, {"email": email, "role": "admin"})
    return org, user


def _flush_unique(session: Session, taken: str) -> None:
    """Flush; a unique index refusing the row means someone took the slug or email since we looked (two sign-ups
    or two processes seeding the demo at once): the same Conflict as the look itself, not a database error.
    Any other integrity error (a missing organization, a NULL) is a bug, not a taken name: it propagates."""
    try:
        session.flush()
    except IntegrityError as exc:
        if not _is_unique_violation(exc):
            raise
        raise Conflict(taken) from None


def _is_unique_violation(exc: IntegrityError) -> bool:
    """psycopg gives the SQLSTATE (23505 is unique_violation), Python's sqlite3 the extended result code."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "sqlite_errorname", None)
    return code in UNIQUE_VIOLATIONS


def create_user(actor: Actor, email: str, name: str, role: str, password: str) -> User:
    require_role(actor, "admin")
    email = _check_new_user(email, role, password)
    name = _display_name("name", name, email)
    with org_session(actor.org_id) as session:
        user = User(org_id=actor.org_id, email=email, name=name, role=role,
                    password_hash=hash_password(password))
        session.add(user)
        _flush_unique(session, f"email: {email} already has an account")
        audit.append(session, actor, "user.created", "user", user.id, {"email": email, "role": role})
    return user


def list_users(actor: Actor) -> list[User]:
    require_role(actor, "admin")
    with org_session(actor.org_id) as session:
        return list(session.execute(select(User).where(User.org_id == actor.org_id).order_by(User.email)).scalars())


def _admins_left(session, org_id: int, excluding: int) -> int:  # type: ignore[no-untyped-def]
    return session.execute(select(func.count()).where(
        User.org_id == org_id, User.role == "admin", User.active.is_(True), User.id != excluding)).scalar_one()


def _get_user(session, org_id: int, user_id: int) -> User:  # type: ignore[no-untyped-def]
    user = session.execute(select(User).where(User.org_id == org_id, User.id == user_id)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def set_role(actor: Actor, user_id: int, role: str) -> User:
    require_role(actor, "admin")
    if role not in ROLES:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    with org_session(actor.org_id) as session:
        user = _get_user(session, actor.org_id, user_id)
        if user.role == "admin" and role != "admin" and not _admins_left(session, actor.org_id, user.id):
            raise Conflict("the organization needs at least one active admin")
        old, user.role = user.role, role
        audit.append(session, actor, "user.role_changed", "user", user.id, {"from": old, "to": role})
    return user


def set_active(actor: Actor, user_id: int, active: bool) -> User:
    require_role(actor, "admin")
    if actor.user_id == user_id and not active:
        raise Conflict("you cannot deactivate yourself")
    with org_session(actor.org_id) as session:
        user = _get_user(session, actor.org_id, user_id)
        if not active and user.role == "admin" and not _admins_left(session, actor.org_id, user.id):
            raise Conflict("the organization needs at least one active admin")
        user.active = active
        if active:
            user.failed_logins, user.locked_until = 0, None
        else:  # for good: a reactivation does not bring back the tokens and cookies issued before now
            user.sessions_valid_after = datetime.now(UTC)
        audit.append(session, actor, "user.activated" if active else "user.deactivated", "user", user.id,
                     {"email": user.email})
    return user


def change_password(actor: Actor, user_id: int, new_password: str, current_password: str | None = None) -> User:
    """A new password: the actor's own (`current_password` is checked as a sign-in is, failures and lockout
    included) or, for an admin or a system actor, any user's of the organization (a reset). Every API token and
    remember-me cookie of the user issued before now is refused from now on (`sessions_valid_after`): whoever
    signed in with the old password is signed out for good; the user signs in again with the new one."""
    own = actor.user_id is not None and actor.user_id == user_id
    if not own:
        require_role(actor, "admin")
    _check_password("new password", new_password)
    if own:
        with org_session(actor.org_id) as session:
            email = _get_user(session, actor.org_id, user_id).email
        authenticate(email, current_password or "")  # PermissionDenied / TooManySignIns, counted as a failure
    with org_session(actor.org_id) as session:
        user = _get_user(session, actor.org_id, user_id)
        user.password_hash = hash_password(new_password)
        user.sessions_valid_after = datetime.now(UTC)
        user.failed_logins, user.locked_until = 0, None
        audit.append(session, actor, "user.password_changed", "user", user.id,
                     {"email": user.email, "by": "self" if own else "reset"})
    return user


def issued_before_revocation(user: User, issued_at: datetime | None) -> bool:
    """Whether a token or cookie of `user` issued at `issued_at` predates their `sessions_valid_after` (set on
    deactivation and password change), so must be refused. None: issued before tokens carried their time,
    which is before any cut-off (the column came later), so refused once there is one."""
    cutoff = user.sessions_valid_after
    return cutoff is not None and (issued_at is None or issued_at < cutoff)


def session_still_valid(email: str, issued_at: datetime) -> bool:
    """Whether a remember-me cookie of `email` issued at `issued_at` may still sign in: the user exists, is
    active, and neither was deactivated nor changed password since the cookie was issued."""
    with system_session() as session:
        user = _find_user(session, email)
        return user is not None and user.active and not issued_before_revocation(user, issued_at)


def _normalised(email: str) -> str:
    return email.strip().lower()


def _find_user(session: Session, email: str) -> User | None:
    return session.execute(select(User).where(User.email == _normalised(email))).scalar_one_or_none()


def _email_key(email: str) -> str:
    """What sign_in_throttle stores instead of the email: an HMAC-SHA256 of its normalised form, under a key
    derived from the installation's secret keys (RRC_SECRET_KEYS, else the data folder's key file), so a copy
    of the database alone cannot test which addresses someone tried to sign in with. After a key rotation
    the counts of emails without an account start over: they are forgotten within a day anyway."""
    key = crypto.mac_keys(THROTTLE_MAC_PURPOSE)[0]
    return hmac.new(key, _normalised(email).encode(), hashlib.sha256).hexdigest()


def _lockout_message(counter: User | SignInThrottle | None, now: datetime) -> str | None:
    """The refusal while `counter` (an account, or the throttle row of an email without one) is locked."""
    if counter is None or counter.locked_until is None or counter.locked_until <= now:
        return None
    return f"too many failed sign-ins; try again after {counter.locked_until:%H:%M} UTC"


def _register_failure(session: Session, email: str, user: User | None, now: datetime) -> User | SignInThrottle:
    """Count a failed sign-in for `email`: on its account when there is one (active or not), else on its
    sign_in_throttle row. One rule for both, so the answers never tell which emails have an account:
    MAX_FAILED_LOGINS failures lock for LOCKOUT, failures are forgotten after FAILURE_MEMORY without
    another, and failing while locked neither counts nor moves the lock's end."""
    counter = _counter_for_update(session, email, user, now)
    if _lockout_message(counter, now) is not None:
        return counter
    if counter.last_failed_at is None or counter.last_failed_at <= now - FAILURE_MEMORY:
        counter.failed_logins = 0
    counter.failed_logins += 1
    counter.last_failed_at = now
    if counter.failed_logins >= MAX_FAILED_LOGINS:
        counter.locked_until, counter.failed_logins = now + LOCKOUT, 0
        if user is not None:
            audit.append(session, Actor.system(user.org_id, "auth"), "user.locked", "user", user.id,
                         {"email": user.email})
    session.flush()  # this email's row is fresh now, so the pruning below never takes it
    _prune_throttle(session, now)  # on every failure, an account's too: the same work, the same time
    return counter


def _counter_for_update(session: Session, email: str, user: User | None, now: datetime) -> User | SignInThrottle:
    """The row counting `email`'s failures (its user, else its sign_in_throttle row, created on the first
    failure), locked for this transaction and re-read, so concurrent failures never lose a count:
    otherwise parallel guesses would get more tries at a real account than at an unknown email.

    A user row is locked by a no-op UPDATE; a throttle row is inserted unless there (ON CONFLICT DO
    NOTHING: racing first failures do not trip over the primary key), then SELECTed FOR UPDATE. On
    SQLite, which has no row locks, that first write takes the database's write lock instead.
    """
    if user is not None:
        session.execute(update(User).where(User.id == user.id).values(failed_logins=User.failed_logins),
                        execution_options={"synchronize_session": False})
        session.refresh(user)
        return user
    key = _email_key(email)
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(insert(SignInThrottle).values(email_sha256=key, failed_logins=0, last_failed_at=now)
                    .on_conflict_do_nothing(index_elements=[SignInThrottle.email_sha256]))
    return session.execute(select(SignInThrottle).where(SignInThrottle.email_sha256 == key).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one()


def _prune_throttle(session: Session, now: datetime) -> None:
    """Delete throttle rows the rule has forgotten (last failure FAILURE_MEMORY ago, lock over): a
    pruned row and a kept one answer alike, and the table holds about a day of failing emails.

    At most THROTTLE_PRUNE_BATCH rows per failed sign-in, which outpaces the one row a failure can add.
    SKIP LOCKED (PostgreSQL) leaves rows another sign-in is counting to a later pass instead of waiting.
    """
    forgotten = (select(SignInThrottle.email_sha256)
                 .where(SignInThrottle.last_failed_at <= now - FAILURE_MEMORY,
                        or_(SignInThrottle.locked_until.is_(None), SignInThrottle.locked_until <= now))
                 .limit(THROTTLE_PRUNE_BATCH).with_for_update(skip_locked=True))
    session.execute(delete(SignInThrottle).where(SignInThrottle.email_sha256.in_(forgotten)),
                    execution_options={"synchronize_session": False})


@functools.cache
def _decoy_hash(rounds: int) -> bytes:
    """A hash checked for unknown emails, so a wrong email takes as long as a wrong password."""
    return bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds))


def authenticate(email: str, password: str) -> User:
    """Check a password; 5 failures lock the account for 15 minutes (kept in the database).

    An email without an account, or with a deactivated one, is answered like a wrong password: a
    decoy bcrypt check takes as long, and its failures count and lock alike (_register_failure),
    so neither the message nor the time tells which emails have an account. TooManySignIns (a
    PermissionDenied) from the failure that locks on, until the lock ends, even for the right password.
    The app's sign-in form and the API's token endpoint both come here.
    """
    now = datetime.now(UTC)
    with system_session() as session:
        user = _find_user(session, email)
        counter = user if user is not None else session.get(SignInThrottle, _email_key(email))
        if locked := _lockout_message(counter, now):
            raise TooManySignIns(locked)
        account = user if user is not None and user.active else None
        hashed = account.password_hash.encode() if account else _decoy_hash(load_settings().bcrypt_rounds)
        # what bcrypt reads of a password: a longer one is judged by its first 72 bytes, as every bcrypt before
        # version 5 did (and as any hash made by one was), not refused with an error
        if bcrypt.checkpw(password.encode()[:BCRYPT_MAX_BYTES], hashed) and account is not None:
            account.failed_logins, account.locked_until = 0, None
            return account
        counter = _register_failure(session, email, user, now)
        session.commit()  # the failure counts although the refusal below rolls the session back
        if locked := _lockout_message(counter, now):  # this failure was the last one allowed
            raise TooManySignIns(locked)
        raise PermissionDenied("wrong email or password")


def record_login(email: str) -> User | None:
    """A successful sign-in: clears the failure count. None when the user may not sign in (any more)."""
    now = datetime.now(UTC)
    with system_session() as session:
        user = _find_user(session, email)
        if user is None or not user.active or _lockout_message(user, now) is not None:
            return None
        user.failed_logins, user.locked_until = 0, None
        return user


def get_user_by_email(email: str) -> User | None:
    with system_session() as session:
        return _find_user(session, email)


def current_role(user_id: int | None) -> str | None:
    """The user's role now, None when deactivated or gone. Checked on every page run: a session
    outlives a deactivation or a demotion, the database does not."""
    if not user_id:
        return None
    with system_session() as session:
        row = session.execute(select(User.active, User.role).where(User.id == user_id)).first()
    return row.role if row is not None and row.active else None


def any_organization() -> bool:
    with system_session() as session:
        return session.execute(select(Organization.id).limit(1)).first() is not None


def get_organization(org_id: int) -> Organization:
    with system_session() as session:
        org = session.get(Organization, org_id)
        if org is None:
            raise NotFound(f"organization {org_id} not found")
        return org


def find_organization(slug: str) -> Organization | None:
    with system_session() as session:
        return session.execute(select(Organization).where(Organization.slug == slug)).scalar_one_or_none()


def credentials_for_authenticator() -> dict[str, dict[str, dict[str, object]]]:
    """The users streamlit-authenticator 0.4 may restore from a remember-me cookie: the active ones.

    No password hash: the app's sign-in form checks passwords through `authenticate` (one answer and one
    lockout for every email), so the authenticator only keeps the session cookie and needs none.
    """
    with system_session() as session:
        users = session.execute(select(User).where(User.active.is_(True))).scalars()
        return {"usernames": {u.email: {"email": u.email, "name": u.name, "roles": [u.role]} for u in users}}
