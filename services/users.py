"""Organizations, users and sign-in. Admin-only operations are refused here, not just hidden."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta

import bcrypt
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import load_settings
from db.models import Organization, OrgSettings, User
from db.session import org_session, system_session
from services import audit
from services.context import ROLES, Actor, require_role
from services.errors import Conflict, InvalidInput, NotFound, PermissionDenied

MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)
MIN_PASSWORD = 8
LOCKED_HASH = "$2b$04$" + "." * 53  # a well-formed bcrypt hash that no password matches
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(load_settings().bcrypt_rounds)).decode()


def _check_new_user(email: str, role: str, password: str) -> str:
    email = email.strip().lower()
    if not EMAIL.match(email):
        raise InvalidInput(f"email: {email!r} is not an email address")
    if role not in ROLES:
        raise InvalidInput(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"password: at least {MIN_PASSWORD} characters")
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
    email = _check_new_user(admin_email, "admin", admin_password)
    with system_session() as session:
        if session.execute(select(Organization.id).where(Organization.slug == slug)).first():
            raise Conflict(f"slug: an organization {slug!r} already exists")
        org = Organization(name=name.strip(), slug=slug, is_demo=is_demo)
        session.add(org)
        _flush_unique(session, f"slug: an organization {slug!r} already exists")
        session.add(OrgSettings(org_id=org.id))
        user = User(org_id=org.id, email=email, name=admin_name.strip() or email, role="admin",
                    password_hash=hash_password(admin_password))
        session.add(user)
        _flush_unique(session, f"email: {email} already has an account")
        actor = Actor.user(org.id, user.id, "admin")
        audit.append(session, actor, "organization.created", "organization", org.id, {"name": org.name, "slug": slug})
        audit.append(session, actor, "user.created", "user", user.id, {"email": email, "role": "admin"})
    return org, user


def _flush_unique(session: Session, taken: str) -> None:
    """Flush; a unique index refusing the row means someone took the slug or email since we looked (two sign-ups
    or two processes seeding the demo at once): the same Conflict as the look itself, not a database error."""
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(taken) from None


def create_user(actor: Actor, email: str, name: str, role: str, password: str) -> User:
    require_role(actor, "admin")
    email = _check_new_user(email, role, password)
    with org_session(actor.org_id) as session:
        user = User(org_id=actor.org_id, email=email, name=name.strip() or email, role=role,
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
        audit.append(session, actor, "user.activated" if active else "user.deactivated", "user", user.id,
                     {"email": user.email})
    return user


def _register_failure(session, user: User, now: datetime) -> None:  # type: ignore[no-untyped-def]
    user.failed_logins += 1
    if user.failed_logins >= MAX_FAILED_LOGINS:
        user.locked_until, user.failed_logins = now + LOCKOUT, 0
        audit.append(session, Actor.system(user.org_id, "auth"), "user.locked", "user", user.id, {"email": user.email})


@functools.cache
def _decoy_hash(rounds: int) -> bytes:
    """A hash checked for unknown emails, so a wrong email takes as long as a wrong password."""
    return bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds))


def _locked_message(user: User) -> str:
    return f"too many failed sign-ins; try again after {user.locked_until:%H:%M} UTC"


def authenticate(email: str, password: str) -> User:
    """Check a password; 5 failures lock the account for 15 minutes (kept in the database)."""
    now = datetime.now(UTC)
    with system_session() as session:
        user = session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()
        if user is None or not user.active:
            bcrypt.checkpw(password.encode(), _decoy_hash(load_settings().bcrypt_rounds))
            raise PermissionDenied("wrong email or password")
        if user.locked_until and user.locked_until > now:
            raise PermissionDenied(_locked_message(user))
        if not bcrypt.checkpw(password.encode(), user.password_hash.encode()):
            _register_failure(session, user, now)
            session.commit()
            raise PermissionDenied("wrong email or password")
        user.failed_logins, user.locked_until = 0, None
        return user


def record_failed_login(email: str) -> str | None:
    """A failed sign-in seen by the app's login form: counts toward the lockout.

    Returns the message to show when the account is (now) locked, else None.
    """
    now = datetime.now(UTC)
    with system_session() as session:
        user = session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()
        if user is None:
            return None
        if not (user.locked_until and user.locked_until > now):
            _register_failure(session, user, now)
        return _locked_message(user) if user.locked_until and user.locked_until > now else None


def record_login(email: str) -> User | None:
    """A successful sign-in: clears the failure count. None when the user may not sign in (any more)."""
    now = datetime.now(UTC)
    with system_session() as session:
        user = session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()
        if user is None or not user.active or (user.locked_until and user.locked_until > now):
            return None
        user.failed_logins, user.locked_until = 0, None
        return user


def get_user_by_email(email: str) -> User | None:
    with system_session() as session:
        return session.execute(select(User).where(User.email == email.strip().lower())).scalar_one_or_none()


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
    """The credentials dict streamlit-authenticator 0.4 expects, built from active users.

    A locked-out user is listed with an unusable hash, so the form refuses even the right password
    until the lock expires (the lock itself lives in the database, not in the authenticator).
    """
    now = datetime.now(UTC)
    with system_session() as session:
        users = session.execute(select(User).where(User.active.is_(True))).scalars()
        return {"usernames": {u.email: {"email": u.email, "name": u.name, "roles": [u.role],
                                        "password": LOCKED_HASH if u.locked_until and u.locked_until > now
                                        else u.password_hash} for u in users}}
