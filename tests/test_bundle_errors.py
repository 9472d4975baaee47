"""Bad input: every problem names file, row, column, value and what was expected; nothing is written."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.bundle import load_bundle
from core.errors import BundleError, Problem
from core.model import MAX_ID_LENGTH
from core.reconcile import reconcile
from db.models import Account, Anomaly
from db.session import org_session
from services import reconciliation
from services.context import Actor
from tests.bundles import JAN, Scenario, only, write_csv
from tests.run_cli import run_cli

LONG_ID = "x" * (MAX_ID_LENGTH + 1)
LONG_ID_SHOWN = "x" * 40 + "… (201 characters)"


def base() -> Scenario:
    s = Scenario().sub("acme", "api", "p_api").use("acme", "api", "2026-01-05T10:00:00Z", "100")
    return s.invoice("acme", "api", "100", "10.00")


def problems(folder: Path) -> list[Problem]:
    with pytest.raises(BundleError) as caught:
        reconcile(load_bundle(folder))
    return caught.value.problems


def one_problem(folder: Path) -> Problem:
    found = problems(folder)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_missing_file(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    (folder / "prices.csv").unlink()
    found = problems(folder)
    assert found[0].file == "prices.csv" and "exist" in found[0].expected


def test_missing_column(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    write_csv(folder / "accounts.csv", ["account_id", "name", "crm_id"], [["acme", "Acme", ""]])
    p = problems(folder)[0]
    assert (p.file, p.row, p.column) == ("accounts.csv", 1, "stripe_customer_id")


@pytest.mark.parametrize(("table", "index", "column", "value", "expected"), [
    ("invoice_lines", 6, "amount", "12,50", "decimal"),
    ("subscriptions", 5, "period_start", "2026-01-01T00:00:00", "offset"),
    ("prices", 3, "model", "stairstep", "per_unit"),
    ("prices", 6, "tiers", "[{up_to: 5}]", "JSON"),
    ("subscriptions", 1, "account_id", "ghost", "account_id"),
    ("subscriptions", 2, "product_key", "ghost", "product_key"),
    ("subscriptions", 3, "price_id", "p_seats", "price of product 'api'"),
    ("invoice_lines", 1, "account_id", "ghost", "account_id"),
])
def test_bad_values_in_small_tables(tmp_path: Path, table: str, index: int, column: str, value: str,
                                    expected: str) -> None:
    s = base()
    if table == "prices":
        s.prices[0][3] = "graduated" if column == "tiers" else s.prices[0][3]
    getattr(s, table if table != "invoice_lines" else "invoice_lines")[0][index] = value
    p = problems(s.write(tmp_path))[0]
    assert (p.file, p.row, p.column, p.value) == (f"{table}.csv", 2, column, value)
    assert expected in p.expected
    assert f"{table}.csv, row 2, column {column!r}: got {value!r}" in str(p)


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("ts", "2026-01-05T10:00:00", "offset"),
    ("ts", "yesterday", "offset"),
    ("ts", "10000-01-01T00:00:00Z", "year 1 to November 9999"),
    ("ts", "9999-12-31T23:59:59Z", "year 1 to November 9999"),  # its month would end in year 10000
    ("ts", "0000-12-31T23:59:59Z", "year 1 to November 9999"),
    ("units", "-3", ">= 0"),
    ("units", "ten", "decimal"),
    ("account_id", "ghost", "accounts.csv"),
    ("product_key", "ghost", "products.csv"),
])
def test_bad_usage_rows_are_named(tmp_path: Path, column: str, value: str, expected: str) -> None:
    s = base().use("acme", "api", "2026-01-06T10:00:00Z", "5")
    s.actual[1][["account_id", "product_key", "ts", "units"].index(column)] = value
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column, p.value) == ("actual_usage.csv", 3, column, value)
    assert expected in p.expected


def with_unused_rows() -> Scenario:
    """base() with a product, a price and a contract nothing else refers to: a long id in them is their only problem."""
    s = base().price("p_other", "api", "per_unit", "0.20")
    s.products.append(["unused", "Unused", "sum", "unit", ""])
    s.contracts.append(["acme", "api", JAN, "p_api"])
    return s


@pytest.mark.parametrize(("table", "index", "position", "column"), [
    ("accounts", 1, 0, "account_id"),  # beta: not referred to
    ("accounts", 0, 2, "stripe_customer_id"),
    ("accounts", 0, 3, "crm_id"),
    ("products", 2, 0, "product_key"),
    ("products", 0, 4, "default_price_id"),
    ("prices", 2, 0, "price_id"),
    ("prices", 1, 1, "product_key"),
    ("subscriptions", 0, 0, "subscription_id"),
    ("subscriptions", 0, 1, "account_id"),
    ("subscriptions", 0, 2, "product_key"),
    ("subscriptions", 0, 3, "price_id"),
    ("contracts", 0, 0, "account_id"),
    ("contracts", 0, 1, "product_key"),
    ("contracts", 0, 3, "price_id"),
    ("invoice_lines", 0, 1, "account_id"),
    ("invoice_lines", 0, 2, "product_key"),
])
def test_an_identifier_longer_than_the_database_holds_is_named_shortened(tmp_path: Path, table: str, index: int,
                                                                        position: int, column: str) -> None:
    s = with_unused_rows()
    getattr(s, table)[index][position] = LONG_ID
    p = one_problem(s.write(tmp_path))
    assert p == Problem(f"{table}.csv", "an identifier of at most 200 characters", index + 2, column, LONG_ID_SHOWN)
    assert str(p) == (f"{table}.csv, row {index + 2}, column {column!r}: got {LONG_ID_SHOWN!r}; "
                      "expected an identifier of at most 200 characters")


def test_an_identifier_of_200_characters_is_accepted(tmp_path: Path) -> None:
    longest = "x" * MAX_ID_LENGTH
    s = Scenario(accounts=[[longest, "Longest", longest, longest]])
    s.prices[0][0] = longest
    s.sub(longest, "api", longest).use(longest, "api", "2026-01-05T10:00:00Z", "100", reported="40")
    s.subscriptions[0][0] = longest
    found = only(s.run(tmp_path))
    assert (found.account_id, found.price_id, found.subscription_id) == (longest, longest, longest)


@pytest.mark.parametrize("usage_format", ["csv", "parquet"])
@pytest.mark.parametrize("column", ["account_id", "product_key"])
def test_a_too_long_identifier_in_a_usage_table_is_named_with_its_row(tmp_path: Path, usage_format: str,
                                                                     column: str) -> None:
    s = base().use("acme", "api", "2026-01-06T10:00:00Z", "5")
    s.actual[1][["account_id", "product_key"].index(column)] = LONG_ID
    p = one_problem(s.write(tmp_path, usage_format))
    name, row = ("actual_usage.csv", 3) if usage_format == "csv" else ("actual_usage.parquet", 2)
    assert p == Problem(name, "an identifier of at most 200 characters", row, column, LONG_ID_SHOWN)


@pytest.mark.parametrize("where", ["accounts.csv", "actual_usage.csv"])
def test_a_run_on_a_too_long_identifier_fails_naming_it_and_stores_nothing(org: tuple[Actor, Actor], tmp_path: Path,
                                                                          where: str) -> None:
    """Refused while loading (accounts.csv) or while aggregating usage: either way before anything is written,
    on PostgreSQL (which would refuse the value) as on SQLite (which would keep it)."""
    s = base()
    if where == "accounts.csv":
        s.accounts.append([LONG_ID, "Long", "", ""])
    else:
        s.actual[0][0] = LONG_ID
    run = reconciliation.run_reconciliation(org[1], bundle_dir=s.write(tmp_path / "bundle"))
    row = 4 if where == "accounts.csv" else 2
    assert run.status == "failed"
    assert f"{where}, row {row}, column 'account_id': got {LONG_ID_SHOWN!r}; expected an identifier of at most " \
           "200 characters" in (run.error or "")
    with org_session(org[1].org_id) as session:
        assert session.query(Account).count() == 0 and session.query(Anomaly).count() == 0


def test_overlapping_subscription_periods(tmp_path: Path) -> None:
    s = base().sub("acme", "api", "p_api", "2026-01-20T00:00:00Z", "2026-02-20T00:00:00Z")
    s.subscriptions[1][0] = "sub_overlap"
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column) == ("subscriptions.csv", 3, "period_start")
    assert "no overlap with row 2" in p.expected


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    s = base()
    s.invoice_lines[0][6] = "x"
    s.subscriptions[0][5] = "soon"
    found = problems(s.write(tmp_path))
    assert {(p.file, p.column) for p in found} >= {("invoice_lines.csv", "amount"), ("subscriptions.csv",
                                                                                     "period_start")}


def test_duplicate_event_ids_count_once_with_a_warning(tmp_path: Path) -> None:
    s = base().use("acme", "api", "2026-01-06T10:00:00Z", "50", reported="")
    s.actual.append(list(s.actual[1]))  # the same event delivered twice
    result = s.run(tmp_path)
    assert only(result).actual_units == 150 and result.events["actual"] == 2
    assert [(d["day"], d["actual"]) for d in only(result).evidence["daily"]] == [("2026-01-05", "100"),
                                                                               ("2026-01-06", "50")]
    assert any("1 duplicate event_id" in w and "e1" in w for w in result.warnings)



def test_which_delivery_of_a_duplicate_counts_does_not_depend_on_file_order(tmp_path: Path) -> None:
    """Two deliveries of e1 at the same instant that disagree: the earliest wins, and between equal
    timestamps the row's content decides, so reordering the file changes nothing."""
    totals = []
    for i, order in enumerate((slice(None), slice(None, None, -1))):
        s = base()
        deliveries = [["acme", "api", "2026-01-06T10:00:00Z", units, "e1"] for units in ("70", "50")]
        s.actual += deliveries[order]
        s.actual += [["acme", "api", "2026-01-07T10:00:00Z", "5", "e1"]]  # a later redelivery never wins
        totals.append(only(s.run(tmp_path / str(i))).actual_units)
    assert totals == [150, 150]  # 100 from base() + the 50 delivery


def test_a_dropped_duplicate_is_not_checked_like_the_other_columns(tmp_path: Path) -> None:
    """The checks see the events that are counted: a redelivery of e1 with unreadable units is
    dropped as a duplicate (first delivery wins), as one with a bad timestamp would be."""
    s = base().use("acme", "api", "2026-01-06T10:00:00Z", "50", reported="")
    s.actual.append(["acme", "api", "2026-01-07T10:00:00Z", "-5", "e1"])
    result = s.run(tmp_path)
    assert only(result).actual_units == 150
    assert "2026-01-07" not in {d["day"] for d in only(result).evidence["daily"]}
    assert any("1 duplicate event_id" in w for w in result.warnings)


def test_header_names_with_spaces_around_them_are_read_as_text(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    lines = (folder / "invoice_lines.csv").read_text().splitlines()
    lines[0] = lines[0].replace("quantity", " quantity ")
    (folder / "invoice_lines.csv").write_text("\n".join(lines) + "\n")
    assert load_bundle(folder).invoice_lines[0].quantity == 100


def write_parquet_usage(folder: Path, tz: str | None) -> None:
    for stem in ("actual_usage", "reported_usage"):
        (folder / f"{stem}.csv").unlink()
        pq.write_table(pa.table({
            "account_id": ["acme"], "product_key": ["api"],
            "ts": pa.array([datetime(2026, 1, 31, 23, 30)], pa.timestamp("us", tz=tz)),
            "units": pa.array([100 if stem == "actual_usage" else 40], pa.int64()),
        }), folder / f"{stem}.parquet")


@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Tokyo"])
def test_parquet_timestamps(tmp_path: Path, tz: str | None) -> None:
    folder = Scenario().sub("acme", "api", "p_api").write(tmp_path)
    write_parquet_usage(folder, tz)
    result = reconcile(load_bundle(folder))
    a = only(result)
    assert (a.actual_units, a.reported_units) == (100, 40)
    assert a.evidence["daily"][0]["day"] == "2026-01-31"
    assert any("read as UTC" in n for n in result.notes) == (tz is None)


def test_parquet_negative_units_name_the_row(tmp_path: Path) -> None:
    folder = Scenario().sub("acme", "api", "p_api").write(tmp_path)
    (folder / "actual_usage.csv").unlink()
    pq.write_table(pa.table({"account_id": ["acme", "acme"], "product_key": ["api", "api"],
                             "ts": pa.array([datetime(2026, 1, 3), datetime(2026, 1, 4)], pa.timestamp("us", "UTC")),
                             "units": [5, -2]}), folder / "actual_usage.parquet")
    p = one_problem(folder)
    assert (p.file, p.row, p.column, p.value) == ("actual_usage.parquet", 2, "units", "-2")


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    s = base()
    s.actual[0][2] = "2026-01-05 10:00"
    folder = s.write(tmp_path / "bundle")
    fresh, kept = tmp_path / "fresh.csv", tmp_path / "kept.json"
    kept.write_text("previous results")
    for output in (fresh, kept):
        done = run_cli("reconcile", str(folder), "--output", str(output), in_process=False)
        assert done.returncode == 2
        assert "actual_usage.csv, row 2, column 'ts'" in done.stderr
    assert not fresh.exists() and kept.read_text() == "previous results"
    assert not list(tmp_path.glob("*.tmp"))
