"""core/spreadsheet.py: CSV exports never hand a spreadsheet a formula to run."""

from __future__ import annotations

from decimal import Decimal

import pytest

from core.spreadsheet import safe_cell


@pytest.mark.parametrize("text", ['=HYPERLINK("http://evil.example","x")', "+1+cmd|' /C calc'!A0", "-2+3",
                                  "@SUM(A1)", "\t=1", "\r=1", "-", "=", "-Infinity", "-NaN"])
def test_formula_text_becomes_inert(text: str) -> None:
    assert safe_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["-5.00", "+3", "-1e3", "12.50", "acme", "", " =1", None, 7, Decimal("-1")])
def test_numbers_and_plain_text_stay_as_they_are(value: object) -> None:
    assert safe_cell(value) == value
