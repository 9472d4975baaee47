"""How long each page script takes on a big organization: 10k accounts, 50k anomalies.

Seeds the app database (embedded SQLite by default, or --database-url) with a synthetic org,
signs in once under streamlit.testing's AppTest, then runs every page several times and prints
the median and worst time per page against the 1 s target. The baseline printed next to it is
the same page on the 60-account demo organization, measured in the same run.

    python bench/bench_pages.py [--accounts 10000] [--anomalies 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = ["pages/overview.py", "pages/anomalies.py", "pages/account.py", "pages/runs.py", "pages/actions.py",
         "pages/audit.py", "pages/settings.py"]
TYPES = ["unbilled_usage", "under_reported_usage", "renewal_drift", "missed_overage", "over_billing"]
TARGET_SECONDS = 1.0


def seed_big_org(accounts: int, anomalies: int, seed: int = 1) -> tuple[str, str]:
    """A synthetic org written straight through the models (a benchmark fixture, not app code)."""
    from sqlalchemy import insert

    from db.models import Account, Anomaly
    from db.session import system_session
    from services import reconciliation, users
    from services.context import Actor

    rng = random.Random(seed)
    org, admin = users.create_organization("Big Co", "big-co", "admin@big.example", "Bea Admin", "big-admin-2026")
    actor = Actor.user(org.id, admin.id, "admin")
    reconciliation.queue_run(actor)  # the Runs page has something to list
    months = [datetime(2025, 12, 1, tzinfo=UTC) + timedelta(days=31 * i) for i in range(12)]
    months = [m.replace(day=1) for m in months]
    with system_session() as session:
        session.execute(insert(Account), [
            {"org_id": org.id, "account_id": f"acct_{i:05d}", "name": f"Customer {i:05d}",
             "stripe_customer_id": f"cus_{i:05d}", "crm_id": f"001{i:012d}"} for i in range(accounts)])
        rows = []
        for n in range(anomalies):
            start = months[n % len(months)]
            end = (start + timedelta(days=32)).replace(day=1)
            kind = TYPES[rng.randrange(len(TYPES))]
            amount = Decimal(rng.randrange(100, 500_000)) / 100
            daily = [{"day": (start + timedelta(days=d)).date().isoformat(), "actual": str(100 + d),
                      "reported": str(90 + d)} for d in range((end - start).days)]
            rows.append({
                "org_id": org.id, "fingerprint": f"{n:064x}", "account_id": f"acct_{rng.randrange(accounts):05d}",
                "product_key": f"product_{n % 3}", "period_start": start, "period_end": end, "type": kind,
                "severity": rng.choice(["low", "medium", "high", "critical"]), "actual_units": Decimal(1000),
                "reported_units": Decimal(900), "leak_units": Decimal(100), "expected_amount": amount * 2,
                "billed_amount": amount, "leak_amount": amount if kind != "over_billing" else Decimal(0),
                "overbilled_amount": amount if kind == "over_billing" else Decimal(0),
                "currency": rng.choice(["usd", "usd", "usd", "eur"]),
                "confidence": Decimal(rng.randrange(300, 1000)) / 1000,
                "confidence_factors": {"mapping": 1.0, "completeness": 1.0, "persistence": 0.9,
                                       "period_closed": 1.0, "signal_to_noise": 0.8},
                "evidence": {"daily": daily, "invoice_lines": [], "pricing": {}}, "price_id": "price_x",
                "price_source": "subscription", "explanation": "synthetic", "status": "open", "notes": [],
            })
            if len(rows) == 5000:
                session.execute(insert(Anomaly), rows)
                rows = []
        if rows:
            session.execute(insert(Anomaly), rows)
    return "admin@big.example", "big-admin-2026"


def time_pages(email: str, password: str, repeat: int) -> dict[str, list[float]]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.text_input[0].input(email)
    at.text_input[1].input(password)
    at.button[0].click().run()
    if at.exception or not at.metric:
        raise SystemExit(f"sign-in failed: {[e.value for e in at.exception]}")
    timings: dict[str, list[float]] = {}
    for page in PAGES:
        for _ in range(repeat):
            started = time.perf_counter()
            at.switch_page(page).run()
            timings.setdefault(page, []).append(time.perf_counter() - started)
            if at.exception:
                raise SystemExit(f"{page} raised: {[e.value for e in at.exception]}")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--anomalies", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file in a temp folder")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="rrc-bench-pages-"))
    os.environ["RRC_DATA_DIR"] = str(folder)
    os.environ["DATABASE_URL"] = args.database_url or f"sqlite:///{folder / 'rrc.db'}"
    os.environ.setdefault("RRC_COOKIE_KEY", "bench-cookie-key-0123456789abcdefghijkl")
    from db.session import upgrade
    from services import demo

    upgrade()
    started = time.perf_counter()
    demo.seed_demo(folder / "demo-bundle")
    email, password = seed_big_org(args.accounts, args.anomalies)
    print(f"seeded demo org and {args.accounts:,} accounts / {args.anomalies:,} anomalies "
          f"in {time.perf_counter() - started:.1f} s ({os.environ['DATABASE_URL'].split(':')[0]})")

    big = time_pages(email, password, args.repeat)
    small = time_pages(demo.DEMO_ADMIN[0], demo.DEMO_ADMIN[2], args.repeat)
    print(f"\n{'page':<22}{'median':>9}{'worst':>9}{'demo median':>13}   target < {TARGET_SECONDS:.1f} s")
    failed = False
    for page in PAGES:
        median, worst = statistics.median(big[page]), max(big[page])
        ok = median < TARGET_SECONDS
        failed |= not ok
        print(f"{page:<22}{median:>8.3f}s{worst:>8.3f}s{statistics.median(small[page]):>12.3f}s   "
              f"{'ok' if ok else 'SLOW'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
