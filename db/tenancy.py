"""The org boundary inside Python: what makes an `org_session` see and write only its org.

Three session events, installed on the tenant session factory in db/session.py:

- `after_begin` (PostgreSQL): sets `app.current_org` and `SET LOCAL ROLE rrc_app` at the start of
  every transaction, so the row-level security policies apply even to raw SQL. Both are
  transaction-local, so a pooled connection never carries one org's scope into another's work.
- `do_orm_execute`: adds `org_id = :org` to every ORM SELECT/UPDATE/DELETE of a tenant model.
  This is the only boundary on SQLite (no RLS there), and a second one on PostgreSQL.
- `before_flush`: fills a missing `org_id` and refuses to write or delete another org's row.

Repositories still filter by org explicitly: three independent layers, so one bug is not a leak.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Delete, Select, Update, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, sessionmaker, with_loader_criteria

from db.models import Organization, OrgScoped, OrgSettings

APP_ROLE = "rrc_app"
ORG_KEY = "org_id"


class TenantViolation(RuntimeError):
    """A tenant session tried to touch another org's row: always a bug, never a user error."""


def session_org(session: Session) -> int | None:
    """The org a session is scoped to (None for a system session)."""
    org_id = session.info.get(ORG_KEY)
    return int(org_id) if org_id is not None else None


def require_org(session: Session, org_id: int) -> None:
    """Refuse to work for `org_id` in a session scoped to a different org."""
    scoped = session_org(session)
    if scoped is not None and scoped != org_id:
        raise TenantViolation(f"a session scoped to org {scoped} was asked to work on org {org_id}")


def _set_database_scope(session: Session, _transaction: SessionTransaction, connection: Connection) -> None:
    org_id = session_org(session)
    if org_id is not None and connection.dialect.name == "postgresql":
        connection.execute(text("SELECT set_config('app.current_org', :org, true)"), {"org": str(org_id)})
        connection.execute(text(f"SET LOCAL ROLE {APP_ROLE}"))


def _filter_statements(state: ORMExecuteState) -> None:
    org_id = session_org(state.session)
    if org_id is None or state.is_column_load or state.is_relationship_load:
        return
    if not isinstance(state.statement, Select | Update | Delete):
        return
    state.statement = state.statement.options(
        with_loader_criteria(OrgScoped, lambda cls: cls.org_id == org_id, include_aliases=True),
        with_loader_criteria(OrgSettings, lambda cls: cls.org_id == org_id, include_aliases=True),
        with_loader_criteria(Organization, lambda cls: cls.id == org_id, include_aliases=True),
    )


def _owner(obj: Any) -> int | None:
    if isinstance(obj, Organization):
        return obj.id
    return getattr(obj, "org_id", None)


def _check_writes(session: Session, _context: Any, _instances: Any) -> None:
    org_id = session_org(session)
    if org_id is None:
        return
    for obj in session.new:
        if isinstance(obj, Organization):
            raise TenantViolation("organizations are created in a system session, not a tenant one")
        if hasattr(obj, "org_id") and obj.org_id is None:
            obj.org_id = org_id
    for obj in (*session.new, *session.dirty, *session.deleted):
        owner = _owner(obj)
        if owner is not None and owner != org_id:
            raise TenantViolation(f"{type(obj).__name__} of org {owner} written in a session scoped to org {org_id}")


def install(factory: sessionmaker[Session]) -> None:
    """Attach the three scoping events to a session factory (db.session does this for tenant sessions)."""
    event.listen(factory, "after_begin", _set_database_scope)
    event.listen(factory, "do_orm_execute", _filter_statements)
    event.listen(factory, "before_flush", _check_writes)
