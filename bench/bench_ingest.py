"""Benchmark: usage ingestion over HTTP into PostgreSQL, against naive one-row-per-INSERT ORM writes.

What it does, all in one run against a brand-new PostgreSQL database (dropped at the end):
1. migrates it, creates an organization and an ingest API key;
2. baseline: stores `--baseline-events` events the naive way (one ORM object and one INSERT per
   event, in an org session) and times it;
3. starts the API (`uvicorn api:app`, `--workers` processes) as a separate process;
4. a second process sends `--events` events in batches of `--batch` over `--concurrency`
   keep-alive connections (bodies are encoded before the clock starts: the server is measured,
   not the client's JSON encoder) and reports the wall-clock rate;
5. checks every event was stored exactly once, and that replaying a batch stores nothing.

Prints events/s for both and the ratio; exits 1 when the rate is under `--target` (20,000/s).

    python bench/bench_ingest.py [--events 200000] [--batch 5000] [--concurrency 4] [--workers 2]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = datetime(2026, 10, 1, tzinfo=UTC)


def make_events(start: int, count: int, prefix: str) -> list[dict[str, str]]:
    return [{"event_id": f"{prefix}{i}", "account_id": f"acc_{i % 997}", "product_key": f"prod_{i % 7}",
             "ts": (T0 + timedelta(seconds=i)).isoformat(), "units": f"{(i % 50) / 4}"}
            for i in range(start, start + count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def send(base_url: str, key: str, events: int, batch: int, concurrency: int) -> None:
    """The sender process: POST pre-encoded batches, print one JSON line with the results."""
    import httpx

    bodies = [json.dumps({"events": make_events(start, min(batch, events - start), "evt_")}).encode()
              for start in range(0, events, batch)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    clients = [httpx.Client(base_url=base_url, headers=headers, timeout=120) for _ in range(concurrency)]

    def post(index: int) -> int:
        response = clients[index % concurrency].post("/api/usage/ingest", content=bodies[index])
        if response.status_code != 200:
            raise SystemExit(f"batch {index}: HTTP {response.status_code} {response.text[:300]}")
        return int(response.json()["accepted"])

    post(0)  # warm-up: connections, first-request imports, the temp table; its events count below
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        accepted = sum(pool.map(post, range(1, len(bodies))))
    elapsed = time.perf_counter() - started
    replay = clients[0].post("/api/usage/ingest", content=bodies[-1]).json()
    measured = events - min(batch, events)
    print(json.dumps({"accepted": accepted, "measured_events": measured, "seconds": elapsed,
                      "replay_accepted": replay["accepted"], "replay_duplicates": replay["duplicates"]}))


def baseline(org_id: int, count: int) -> float:
    """Events/s of the naive way: one ORM object, one INSERT each (flushed one by one), one transaction."""
    from db.models import UsageEvent
    from db.session import org_session

    events = make_events(0, count, "naive_")
    started = time.perf_counter()
    with org_session(org_id) as session:
        for e in events:
            session.add(UsageEvent(org_id=org_id, event_id=e["event_id"], account_id=e["account_id"],
                                   product_key=e["product_key"], ts=datetime.fromisoformat(e["ts"]),
                                   units=Decimal(e["units"]), received_at=datetime.now(UTC)))
            session.flush()
    return count / (time.perf_counter() - started)


def wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the API exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the API did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-events", type=int, default=5_000)
    parser.add_argument("--target", type=float, default=20_000)
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL",
                                                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--send", nargs=2, metavar=("BASE_URL", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        send(args.send[0], args.send[1], args.events, args.batch, args.concurrency)
        return

    import sqlalchemy as sa
    from cryptography.fernet import Fernet

    name = f"rrc_bench_{uuid.uuid4().hex[:10]}"
    admin_engine = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(args.pg_url).set(database=name).render_as_string(hide_password=False)
    env = {**os.environ, "DATABASE_URL": url, "RRC_SECRET_KEYS": Fernet.generate_key().decode(),
           "RRC_API_KEY_RATE": "0", "RRC_API_IP_RATE": "0", "RRC_API_LOG_LEVEL": "WARNING",
           "RRC_API_MAX_BODY_BYTES": str(64 * 1024 * 1024)}
    os.environ.update(env)
    server: subprocess.Popen[bytes] | None = None
    try:
        from db.session import get_engine, upgrade
        from services import api_keys, users
        from services.context import Actor

        upgrade(url)
        org, user = users.create_organization("Bench", "bench", "bench@bench.example", "Bench", "bench-password")
        key = api_keys.create_api_key(Actor.user(org.id, user.id, "admin"), "bench").plaintext

        naive = baseline(org.id, args.baseline_events)
        print(f"baseline (one ORM INSERT per event): {naive:,.0f} events/s over {args.baseline_events:,} events",
              flush=True)

        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port",
                                   str(port), "--workers", str(args.workers), "--no-access-log",
                                   "--log-level", "warning"], cwd=ROOT, env=env)
        wait_ready(base_url, server)
        sender = subprocess.run([sys.executable, __file__, "--events", str(args.events), "--batch", str(args.batch),
                                 "--concurrency", str(args.concurrency), "--send", base_url, key],
                                cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if sender.returncode != 0:
            raise SystemExit(f"sender failed: {sender.stderr[-2000:]}")
        result = json.loads(sender.stdout.strip().splitlines()[-1])
        rate = result["measured_events"] / result["seconds"]
        with get_engine(url).connect() as conn:
            stored = conn.execute(sa.text("SELECT count(*) FROM usage_events WHERE event_id LIKE 'evt_%'")).scalar()
        print(f"API ingest ({args.workers} workers, batches of {args.batch:,}, {args.concurrency} connections): "
              f"{rate:,.0f} events/s ({result['measured_events']:,} events in {result['seconds']:.2f} s)")
        print(f"speed-up over the baseline: {rate / naive:,.1f}x; target {args.target:,.0f} events/s: "
              f"{'met' if rate >= args.target else 'MISSED'}")
        print(f"stored exactly once: {stored == args.events} ({stored:,} rows); replayed batch stored "
              f"{result['replay_accepted']} new, {result['replay_duplicates']:,} duplicates")
        ok = rate >= args.target and stored == args.events and result["replay_accepted"] == 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        from db.session import get_engine

        get_engine(url).dispose()
        with admin_engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
