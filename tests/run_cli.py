"""Run `cli.py` the way a user does, in this process (Typer's runner) or, where the entry point itself is
under test, as a child process. In-process saves a second or two of imports per call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, in_process: bool = True) -> subprocess.CompletedProcess[str]:
    """The exit code, stdout and stderr of `python cli.py ARGS`."""
    if not in_process:
        return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    import cli

    result = CliRunner().invoke(cli.app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # cli.main() would print it and exit 1; a test wants the traceback
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)
