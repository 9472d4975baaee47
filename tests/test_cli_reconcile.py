"""`cli.py reconcile` and `cli.py demo` as a user runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.run_cli import run_cli as cli

DESIGN_COLUMNS = {"account_id", "product_key", "period_start", "period_end", "type", "severity", "actual_units",
                  "reported_units", "leak_units", "expected_amount", "billed_amount", "leak_amount", "currency",
                  "confidence"}


def test_demo_then_reconcile_to_csv_and_json(tmp_path: Path) -> None:
    bundle = tmp_path / "demo"
    assert cli("demo", str(bundle), "--accounts", "30", "--seed", "5", in_process=False).returncode == 0
    planted = json.loads((bundle / "manifest.json").read_text())["planted"]
    done = cli("reconcile", str(bundle), "--output", str(tmp_path / "out.csv"), in_process=False)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert set(rows[0]) >= DESIGN_COLUMNS and len(rows) == len(planted)
    assert "under_reported_usage" in done.stdout and "USD" in done.stdout  # summary by type and currency
    assert cli("reconcile", str(bundle), "--output", str(tmp_path / "out.json")).returncode == 0
    records = json.loads((tmp_path / "out.json").read_text())
    assert len(records) == len(rows) and "evidence" in records[0] and "confidence_factors" in records[0]
    assert all(r["expected_amount"].count(".") <= 1 and "e" not in r["leak_amount"].lower() for r in records)


def test_demo_needs_one_account_per_planted_scenario(tmp_path: Path) -> None:
    too_few = cli("demo", str(tmp_path / "small"), "--accounts", "5")
    assert too_few.returncode == 2 and "greater than or equal to 6" in " ".join(too_few.stderr.split())
    assert not (tmp_path / "small").exists()
    assert cli("demo", str(tmp_path / "six"), "--accounts", "6").returncode == 0
    planted = json.loads((tmp_path / "six" / "manifest.json").read_text())["planted"]
    assert len({p["type"] for p in planted}) >= 5


def test_thresholds_change_the_outcome(tmp_path: Path) -> None:
    bundle = tmp_path / "demo"
    cli("demo", str(bundle), "--accounts", "30", "--seed", "5")
    cli("reconcile", str(bundle), "--output", str(tmp_path / "a.csv"))
    cli("reconcile", str(bundle), "--output", str(tmp_path / "b.csv"), "--min-amount", "100000")
    strict = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert len(strict) < len(list(csv.DictReader((tmp_path / "a.csv").open())))
    assert all(r["type"] == "over_billing" for r in strict)


def test_bad_options_exit_2(tmp_path: Path) -> None:
    bundle = tmp_path / "demo"
    cli("demo", str(bundle), "--accounts", "5")
    assert cli("reconcile", str(bundle), "--output", str(tmp_path / "out.xlsx")).returncode == 2
    assert cli("reconcile", str(bundle), "--output", str(tmp_path / "o.csv"), "--min-amount", "lots").returncode == 2
    assert cli("reconcile", str(tmp_path / "missing"), "--output", str(tmp_path / "o.csv")).returncode == 2
