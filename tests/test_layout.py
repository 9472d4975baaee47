"""The four front doors keep the layout's one-way flow.

import-linter (`make lint`) checks the packages, but it cannot take single-file modules as roots,
so the entry points are read here: they call services, and never reach a model, a repository or a
connector themselves (db.session, for the engine and migrations, is theirs to use).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("db.models", "db.repositories", "connectors", "stripe", "boto3", "simple_salesforce", "hubspot",
             "requests")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("entry_point", ["app.py", "api.py", "cli.py", "scheduler.py"])
def test_entry_points_go_through_services(entry_point: str) -> None:
    reached = sorted(name for name in imported_modules(ROOT / entry_point)
                     if any(name == bad or name.startswith(f"{bad}.") for bad in FORBIDDEN))
    assert reached == [], f"{entry_point} imports {reached}: call a service instead"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from db import models\n    import connectors.stripe_billing\n")
    assert {"db.models", "connectors.stripe_billing"} <= imported_modules(sample)
