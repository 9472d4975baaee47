"""Who is calling a service: every service takes an Actor and checks its role itself."""

from __future__ import annotations

from dataclasses import dataclass

from db.models import ROLES as ROLES  # the database checks users.role against it (db may not import services)
from services.errors import PermissionDenied


@dataclass(frozen=True)
class Actor:
    org_id: int
    role: str  # admin | analyst | system
    user_id: int | None = None
    label: str = ""  # how the audit log names the actor: user:3, system:scheduler, api_key:7

    @classmethod
    def user(cls, org_id: int, user_id: int, role: str) -> Actor:
        return cls(org_id, role, user_id, f"user:{user_id}")

    @classmethod
    def system(cls, org_id: int, name: str) -> Actor:
        """The scheduler, the CLI and the ingest API act with admin rights on one org."""
        return cls(org_id, "system", None, f"system:{name}")


def require_role(actor: Actor, *roles: str) -> None:
    """Refuse unless the actor has one of `roles` (system actors pass every check)."""
    if actor.role == "system" or actor.role in roles:
        return
    raise PermissionDenied(f"this needs the {' or '.join(roles)} role; you are {actor.role}")
