"""Bad input: every problem names file, row, column, value and what was expected; nothing is written."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
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
from tests.bundles import APR, FEB, JAN, MAR, Scenario, only, write_csv
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


@pytest.mark.parametrize(("table", "index", "value", "expected"), [
    ("invoice_lines", 6, "1_000.00", "a decimal number"),  # Decimal() alone takes it
    ("invoice_lines", 6, "١٠٠", "a decimal number"),  # Arabic-Indic digits: Decimal() takes them too
    ("invoice_lines", 6, "NaN", "a decimal number"),
    ("invoice_lines", 6, "1e26", "a number below 1,000,000,000,000 with at most 6 decimals"),
    ("invoice_lines", 6, "12.1234567", "at most 6 decimals"),
    ("invoice_lines", 5, "1e16", "a number below 1,000,000,000,000,000 with at most 9 decimals"),
    ("invoice_lines", 7, "üsd", "a 3-letter ISO currency code"),
    ("invoice_lines", 4, "9999-12-31T00:00:00Z", "a time from year 1 to November 9999"),
    ("subscriptions", 5, "0001-01-01T00:00:00+05:00", "a time from year 1 to November 9999"),
    ("prices", 4, "1e30", "a number below 1,000,000,000,000 with at most 15 decimals"),
    ("prices", 4, "0.0000000000000001", "at most 15 decimals"),
    ("prices", 2, "ＵＳＤ", "a 3-letter ISO currency code"),
])
def test_values_beyond_what_the_app_holds_exactly_are_named(tmp_path: Path, table: str, index: int, value: str,
                                                            expected: str) -> None:
    """Before, these crashed (InvalidOperation, year 10000) or were read as something else."""
    s = base()
    getattr(s, table)[0][index] = value
    p = problems(s.write(tmp_path))[0]
    assert (p.file, p.row, p.value) == (f"{table}.csv", 2, value) and expected in p.expected, str(p)


@pytest.mark.parametrize(("tiers", "why"), [
    ([{"up_to": -5, "unit_amount": "0.1"}, {"up_to": None, "unit_amount": "0.05"}], "negative bound"),
    ([{"up_to": "500.5", "unit_amount": "0.1"}, {"up_to": None, "unit_amount": "0.05"}], "fractional bound"),
    ([{"up_to": 100, "unit_amount": "-0.1"}, {"up_to": None, "unit_amount": "0.05"}], "negative unit amount"),
    ([{"up_to": 100, "flat_amount": "-5"}, {"up_to": None, "unit_amount": "0.05"}], "negative flat amount"),
    ([{"up_to": 100, "unit_amount": "1e400"}, {"up_to": None, "unit_amount": "0.05"}], "huge amount"),
    ([{"up_to": 100, "unit_amount": "NaN"}, {"up_to": None, "unit_amount": "0.05"}], "not a number"),
])
def test_tiers_stripe_would_refuse_are_named(tmp_path: Path, tiers: list[dict], why: str) -> None:
    s = base().price("p_tiered", "api", "graduated", tiers=tiers)
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column) == ("prices.csv", 4, "tiers") and "whole number >= 1" in p.expected, why


def test_tier_amounts_written_as_json_numbers_are_read_exactly(tmp_path: Path) -> None:
    s = base()
    s.prices.append(["p_tiered", "api", "usd", "volume", "", "", '[{"up_to": 1000, "unit_amount": 0.001}, '
                                                               '{"up_to": null, "unit_amount": 0.0005}]'])
    assert load_bundle(s.write(tmp_path)).prices["p_tiered"].tiers[0].unit_amount == Decimal("0.001")


def test_a_package_price_without_its_size_names_the_size(tmp_path: Path) -> None:
    p = one_problem(base().price("p_pack", "api", "package", "5.00").write(tmp_path))
    assert (p.row, p.column, p.value) == (4, "package_size", "") and "package size" in p.expected


@pytest.mark.parametrize("size", ["²", "0", "1.5", "1e16"])
def test_a_package_size_is_a_plain_whole_number(tmp_path: Path, size: str) -> None:
    p = one_problem(base().price("p_pack", "api", "package", "5.00", size).write(tmp_path))
    assert (p.row, p.column, p.value) == (4, "package_size", size) and "whole number" in p.expected


def test_a_price_id_twice_is_refused_not_replaced(tmp_path: Path) -> None:
    s = base().price("p_api", "api", "per_unit", "0.50")
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column, p.value) == ("prices.csv", 4, "price_id", "p_api") and "unique" in p.expected


def test_a_default_price_of_another_product_is_refused(tmp_path: Path) -> None:
    s = base()
    s.products[0][4] = "p_seats"
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column, p.value) == ("products.csv", 2, "default_price_id", "p_seats")
    assert "a price of product 'api' (price p_seats belongs to 'seats')" in p.expected


def test_two_contract_prices_from_one_instant_are_refused(tmp_path: Path) -> None:
    """Which one is in force would depend on the row order."""
    s = base().price("p_api_2027", "api", "per_unit", "0.20")
    s.contracts += [["acme", "api", JAN, "p_api"], ["acme", "api", "2026-01-01", "p_api_2027"]]
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column) == ("contracts.csv", 3, "effective_from") and "row 2" in p.expected


def test_an_invoice_line_ending_before_it_starts_is_refused(tmp_path: Path) -> None:
    s = base()
    s.invoice_lines[0][3:5] = [FEB, JAN]
    p = one_problem(s.write(tmp_path))
    assert (p.file, p.row, p.column, p.value) == ("invoice_lines.csv", 2, "period_end", JAN)


def test_a_period_overlapping_a_long_earlier_one_is_found_past_its_neighbour(tmp_path: Path) -> None:
    s = base()
    s.subscriptions[0][5:7] = [JAN, "2026-04-01T00:00:00Z"]  # January to March
    s.sub("acme", "api", "p_api", FEB, "2026-02-10T00:00:00Z").sub("acme", "api", "p_api", MAR, APR)
    found = problems(s.write(tmp_path))
    assert [(p.row, "no overlap with row 2" in p.expected) for p in found] == [(3, True), (4, True)]


def test_line_numbers_count_blank_lines_and_quoted_line_breaks(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    text = (folder / "accounts.csv").read_text()
    header, row = text.splitlines()[:2]
    (folder / "accounts.csv").write_text(f'{header}\n\n"beta","Beta\nInc.",,\n{row}\n\nghost,Ghost,,\n'
                                         f'{"x" * 201},Long,,\n')
    p = one_problem(folder)
    assert (p.file, p.row, p.column) == ("accounts.csv", 8, "account_id")


@pytest.mark.parametrize(("content", "row", "expected"), [
    (b"\xef\xbb\xbfaccount_id,name,stripe_customer_id,crm_id\nacme,Acme,,\n", None, None),  # Excel's CSV UTF-8
    (b"account_id,name,stripe_customer_id,crm_id\racme,Acme,,\r", None, None),  # old Mac line ends
    (b"account_id,name,stripe_customer_id,crm_id\nacme,Acme,,\nbeta,B\xe9ta,,\n", 3, "UTF-8 text"),
    (b"account_id,name,stripe_customer_id,crm_id\nacme,Acme,,\nbeta,Beta,,,,\n", 3, "4 fields, as in the header"),
    (b"account_id,name,stripe_customer_id,crm_id\nacme,Ac\0me,,\n", 2, "without NUL"),
    (b"account_id,name,name,stripe_customer_id,crm_id\nacme,Acme,Acme,,\n", 1, "each column once"),
])
def test_how_a_small_table_is_written(tmp_path: Path, content: bytes, row: int | None, expected: str | None) -> None:
    folder = base().write(tmp_path)
    (folder / "accounts.csv").write_bytes(content)
    if expected is None:
        assert list(load_bundle(folder).accounts) == ["acme"]
        return
    p = problems(folder)[0]  # then the references to the accounts of an unread file
    assert (p.file, p.row) == ("accounts.csv", row) and expected in p.expected, str(p)


def test_a_header_only_file_without_a_final_line_break_is_an_empty_table(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    (folder / "contracts.csv").write_text("account_id,product_key,effective_from,price_id")
    assert load_bundle(folder).contracts == []


def test_a_usage_table_as_csv_and_as_parquet_is_ambiguous(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    base().write(tmp_path / "pq", "parquet")
    (tmp_path / "pq" / "actual_usage.parquet").rename(folder / "actual_usage.parquet")
    p = one_problem(folder)
    assert p.file == "actual_usage.parquet" and "not both" in p.expected


def test_a_folder_where_a_table_should_be_is_named(tmp_path: Path) -> None:
    folder = base().write(tmp_path)
    (folder / "accounts.csv").unlink()
    (folder / "accounts.csv").mkdir()
    assert problems(folder)[0] == Problem("accounts.csv", "a file (this is a folder)")


def test_a_run_whose_amount_the_database_cannot_hold_fails_naming_it(org: tuple[Actor, Actor], tmp_path: Path) -> None:
    """Bytes metered under a price per GB: 10^14 units at 10.00 is 10^15 USD, beyond Numeric(20, 6)."""
    s = Scenario().sub("acme", "seats", "p_seats").use("acme", "seats", "2026-01-05T10:00:00Z", "100000000000000")
    run = reconciliation.run_reconciliation(org[1], bundle_dir=s.write(tmp_path / "bundle"))
    assert run.status == "failed"
    assert run.error == ("account acme, product seats, period from 2026-01-01 00:00 UTC: expected amount "
                         "1,000,000,000,000,000.00 USD is beyond what the app stores (below 100,000,000,000,000): "
                         "check the units of the usage (100,000,000,000,000 units) and the price p_seats")
    with org_session(org[1].org_id) as session:
        assert session.query(Anomaly).count() == 0


def test_what_database_and_stripe_exports_write_is_read(tmp_path: Path) -> None:
    """Trailing zeros do not count as decimals (numeric(20, 10) columns write them), a price of 0.000000000125 cents
    per byte is one Stripe takes (12 decimals of the minor unit), and a tier bound may come as 1000.0."""
    s = base().price("p_bytes", "api", "per_unit", "0.00000000000125")
    s.prices.append(["p_tiered", "api", "usd", "graduated", "", "", '[{"up_to": 1000.0, "unit_amount": "0.10"}, '
                                                                 '{"up_to": null, "unit_amount": "0.05"}]'])
    s.invoice_lines[0][5:7] = ["100.0000000000", "10.0000000000"]
    bundle = load_bundle(s.write(tmp_path))
    assert bundle.prices["p_bytes"].unit_amount == Decimal("0.00000000000125")
    assert bundle.prices["p_tiered"].tiers[0].up_to == 1000
    assert bundle.invoice_lines[0].amount == Decimal(10)
