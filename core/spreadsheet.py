"""CSV cells that a spreadsheet will not run: finance opens every export in Excel or Sheets.

A text cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is read as a formula
(CSV injection: a dismiss reason or a customer name like `=HYPERLINK(...)` would run on the
reader's machine), so such text gets a leading apostrophe, which spreadsheets show as text and do
not display. Numbers are left alone, so a negative amount stays a number. Only for files people
open: bundle CSVs the engine reads back are written unchanged.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """`value`, with text that a spreadsheet would evaluate made inert."""
    if not isinstance(value, str) or not value.startswith(FORMULA_STARTS):
        return value
    try:
        if Decimal(value).is_finite():
            return value
    except InvalidOperation:
        pass
    return "'" + value
