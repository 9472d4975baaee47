"""The demo organization: generated bundle, two users, one finished reconciliation.

Seeding only ever creates the org with slug `demo` (flagged `is_demo`); it never touches an
existing organization, and does nothing when that org already exists.
"""

from __future__ import annotations

from pathlib import Path

from config import load_settings
from core.demo import generate_demo_bundle
from db.models import Organization
from db.session import data_dir, upgrade
from services import reconciliation, settings, users
from services.context import Actor
from services.errors import Conflict

DEMO_SLUG = "demo"
DEMO_ADMIN = ("admin@demo.example", "Dana Admin", "demo-admin-2026")
DEMO_ANALYST = ("analyst@demo.example", "Alex Analyst", "demo-analyst-2026")


def seed_demo(bundle_dir: Path | None = None, accounts: int = 60, seed: int = 7) -> Organization:
    """Processes starting together (the app and `cli.py db prepare`) may both seed: the one whose organization
    lands second returns the first one's instead of failing its start."""
    existing = users.find_organization(DEMO_SLUG)
    if existing is not None:
        return existing
    bundle_dir = bundle_dir or data_dir() / "demo-bundle"
    generate_demo_bundle(bundle_dir, accounts=accounts, seed=seed)
    try:
        org, admin = users.create_organization("Demo Co", DEMO_SLUG, DEMO_ADMIN[0], DEMO_ADMIN[1], DEMO_ADMIN[2],
                                               is_demo=True)
    except Conflict:  # another process created it between our look and now
        raced = users.find_organization(DEMO_SLUG)
        if raced is None:
            raise
        return raced
    actor = Actor.user(org.id, admin.id, "admin")
    users.create_user(actor, DEMO_ANALYST[0], DEMO_ANALYST[1], "analyst", DEMO_ANALYST[2])
    settings.set_data_source(actor, {"kind": "bundle", "path": str(bundle_dir.resolve())})
    reconciliation.run_reconciliation(actor, trigger="manual")
    return org


def prepare_first_start(url: str | None = None) -> bool:
    """Migrate; on a database with no organization at all, seed the demo unless RRC_DEMO=0.

    What the app does on its first start, also offered as `cli.py db prepare` so `make run` has
    the demo ready before the first browser session opens. True when the demo was seeded now.
    """
    upgrade(url)
    if not load_settings().demo or users.any_organization():
        return False
    seed_demo()
    return True
