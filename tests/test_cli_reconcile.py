"""`cli.py reconcile` and `cli.py demo` as a user runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.bundles import Scenario
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


def test_output_is_checked_before_the_run(tmp_path: Path) -> None:
    """A missing folder, a folder, or a file in the bundle folder (an input, or a file the next run would read
    as part of the bundle) is refused before anything is read: the bundle's own bad row is never reached."""
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "100")
    s.actual[0][2] = "not a time"
    bundle = s.write(tmp_path / "bundle")
    inputs = {path.name: path.read_bytes() for path in bundle.iterdir()}
    (tmp_path / "folder.csv").mkdir()
    for output, expected in [
        (tmp_path / "missing" / "out.csv", "expected a file in an existing folder"),
        (bundle / "accounts.csv" / "out.csv", "expected a file in an existing folder"),
        (tmp_path / "folder.csv", "expected a file name (this is a folder)"),
        (bundle / "accounts.csv", "expected a file outside the bundle folder"),
        (bundle / "anomalies.json", "expected a file outside the bundle folder"),
        (bundle / ".." / "bundle" / "ACTUAL_USAGE.CSV", "expected a file outside the bundle folder"),
    ]:
        done = cli("reconcile", str(bundle), "--output", str(output))
        err = "".join(done.stderr.split())
        assert done.returncode == 2, done.stderr
        assert f"--output{output}:".replace(" ", "") in err and expected.replace(" ", "") in err, done.stderr
        assert "problem(s)" not in done.stderr
    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == inputs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle", "folder.csv"]


def test_output_beside_the_bundle_folder_is_written(tmp_path: Path) -> None:
    bundle = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "100").write(
        tmp_path / "bundle")
    done = cli("reconcile", str(bundle), "--output", str(tmp_path / "bundle.csv"))  # a name that starts alike
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bundle.csv").read_text().startswith("account_id,")


def test_a_file_only_command_needs_no_server_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`reconcile` and `demo` read and write files: an analyst's bad RRC_* variable for the server does not stop
    them, while a command on the app database still names it (exit 2)."""
    monkeypatch.setenv("RRC_SCHEDULER_POLL_SECONDS", "soon")
    assert cli("demo", str(tmp_path / "bundle"), "--accounts", "12").returncode == 0
    assert cli("reconcile", str(tmp_path / "bundle"), "--output", str(tmp_path / "out.csv")).returncode == 0
    refused = cli("db", "upgrade")
    assert refused.returncode == 2 and "RRC_SCHEDULER_POLL_SECONDS" in refused.stderr + refused.stdout
