"""Dialect helpers shared by the repositories (SQLite and PostgreSQL only, like the app)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def insert_ignoring_conflicts(session: Session, model: type[Base], rows: Sequence[dict[str, Any]],
                              conflict_columns: Sequence[str]) -> list[int]:
    """INSERT … ON CONFLICT DO NOTHING RETURNING id: the ids of the rows that were new.

    Lets concurrent writers (two ingest requests, two clicks on "Draft invoice") race without an
    IntegrityError aborting the whole transaction; the loser simply inserts nothing.
    """
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(model)
    elif dialect == "sqlite":
        stmt = sqlite.insert(model)
    else:  # pragma: no cover - the app supports SQLite and PostgreSQL only
        raise NotImplementedError(f"unsupported database dialect {dialect!r}")
    stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict_columns)).returning(model.__table__.c.id)
    return list(session.scalars(stmt, list(rows)))
