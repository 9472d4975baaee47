"""Command line over the same core and services as the app, scheduler and API."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.bundle import load_bundle
from core.demo import MIN_ACCOUNTS as MIN_DEMO_ACCOUNTS
from core.errors import BundleError
from core.money import format_money
from core.reconcile import ReconcileParams, reconcile
from core.report import summarize, write_anomalies

app = typer.Typer(help="Revenue Recovery Copilot: find revenue that was earned but never billed.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)
EXIT_BAD_INPUT = 2
FILE_ONLY_COMMANDS = ("reconcile", "demo")  # they read and write files only: no server setting applies to them


@app.callback()
def root(ctx: typer.Context) -> None:
    """Revenue Recovery Copilot command line."""
    if ctx.invoked_subcommand not in FILE_ONLY_COMMANDS:
        from config import settings_or_exit  # pydantic-settings: 0.15 s a file-only command need not pay

        settings_or_exit()  # a bad variable is named here (exit 2), before anything is read or written


def _decimal(value: str, option: str) -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        console.print(f"[red]{option}: expected a decimal number, got {value!r}[/red]")
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _output_problem(output: Path, bundle: Path) -> str | None:
    """Why the anomalies cannot be written to `output`, known before the run (which can take minutes): the
    folder is missing, the name is a folder, or the file is in the bundle folder being read (it could
    replace an input, and would be read as part of the bundle by the next run)."""
    if output.suffix.lower() not in (".csv", ".json"):
        return "expected a .csv or .json file name"
    if not output.parent.is_dir():
        missing = "is not a folder" if output.parent.exists() else "does not exist"
        return f"expected a file in an existing folder ({output.parent} {missing})"
    target = output.parent.resolve() / output.name  # what is replaced: a symbolic link itself, not its target
    if target.is_dir():
        return "expected a file name (this is a folder)"
    if not os.access(target.parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        return "expected a file this user may write"
    folder = bundle.resolve()
    if folder == target or folder in target.parents:
        return f"expected a file outside the bundle folder {bundle} (the run reads that folder)"
    return None


@app.command("reconcile")
def reconcile_command(
    bundle: Path = typer.Argument(..., help="Bundle folder (CSV, usage also Parquet)"),
    output: Path = typer.Option(..., "--output", "-o", help="Anomalies file: .csv or .json"),
    rel_tolerance: str = typer.Option("0.005", help="Under-reporting counts when A - R > this share of A"),
    min_amount: str = typer.Option("1.00", help="Gaps whose leak is below this (major units) are not raised"),
    as_of: datetime | None = typer.Option(None, help="Treat this UTC instant as now (period closed or open)"),
) -> None:
    """Reconcile a bundle folder and write its anomalies. Exit 0 ok, 2 bad input, 1 otherwise."""
    problem = _output_problem(output, bundle)
    if problem is not None:
        console.print(f"--output {output}: {problem}", style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    params = ReconcileParams(rel_tolerance=_decimal(rel_tolerance, "--rel-tolerance"),
                             min_leak_amount=_decimal(min_amount, "--min-amount"),
                             as_of=as_of.astimezone() if as_of and as_of.tzinfo else as_of)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("loading bundle", total=1.0)
            data = load_bundle(bundle)
            result = reconcile(data, params,
                               progress=lambda done, message: bar.update(task, completed=done, description=message))
    except BundleError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        write_anomalies(result.anomalies, output)
    except OSError as exc:  # checked before the run, so unexpected (a full disk, a folder removed meanwhile)
        console.print(f"--output {output}: not written ({exc.strerror or exc})", style="red", markup=False,
                      highlight=False)
        raise typer.Exit(1) from None
    for line in [*result.notes, *result.warnings]:
        console.print(f"note: {line}", markup=False, highlight=False)
    table = Table(title=f"{len(result.anomalies)} anomalies in {result.periods_checked} periods "
                        f"({result.events['actual']:,} actual / {result.events['reported']:,} reported events)")
    for column in ("type", "currency", "count", "amount"):
        table.add_column(column, justify="right" if column in ("count", "amount") else "left")
    for row in summarize(result.anomalies):
        table.add_row(row.type, row.currency.upper(), str(row.count), format_money(row.amount, row.currency))
    Console().print(table)
    typer.echo(f"wrote {output}")


@app.command("demo")
def demo_command(
    out_dir: Path = typer.Argument(..., help="Folder to write the demo bundle into"),
    accounts: int = typer.Option(60, min=MIN_DEMO_ACCOUNTS, help="Number of customer accounts"),
    seed: int = typer.Option(7, help="Random seed: the same seed writes the same files"),
    parquet: bool = typer.Option(False, help="Write the usage tables as Parquet instead of CSV"),
) -> None:
    """Write a realistic demo bundle (every anomaly type, clean accounts, harmless noise)."""
    from core.demo import generate_demo_bundle

    manifest = generate_demo_bundle(out_dir, accounts=accounts, seed=seed,
                                    usage_format="parquet" if parquet else "csv")
    typer.echo(f"wrote {out_dir} ({accounts} accounts, {len(manifest.planted)} planted gaps; see manifest.json)")


db_app = typer.Typer(help="The app database.", no_args_is_help=True)
users_app = typer.Typer(help="Users of an organization.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Run the migrations on DATABASE_URL (default: the SQLite file under ./data/)."""
    from db.session import database_url, upgrade

    upgrade()
    typer.echo(f"database at the newest migration: {database_url().split('@')[-1]}")


@db_app.command("prepare")
def db_prepare() -> None:
    """What the app does on its first start: migrate, and seed the demo on an empty database."""
    from services.demo import DEMO_ADMIN, DEMO_ANALYST, prepare_first_start

    if prepare_first_start():
        typer.echo(f"demo organization ready; sign in as {DEMO_ADMIN[0]} / {DEMO_ADMIN[2]} "
                   f"or {DEMO_ANALYST[0]} / {DEMO_ANALYST[2]}")
    else:
        typer.echo("database migrated")


@db_app.command("seed-demo")
def db_seed_demo() -> None:
    """Create the demo organization with its users and a finished reconciliation (once)."""
    from db.session import upgrade
    from services.demo import DEMO_ADMIN, DEMO_ANALYST, seed_demo

    upgrade()
    org = seed_demo()
    typer.echo(f"demo organization {org.slug!r} ready; sign in as {DEMO_ADMIN[0]} / {DEMO_ADMIN[2]} "
               f"or {DEMO_ANALYST[0]} / {DEMO_ANALYST[2]}")


@db_app.command("reseal-audit-heads")
def db_reseal_audit_heads() -> None:
    """After putting a new key first in RRC_SECRET_KEYS: re-seal every audit chain head with it, so
    the old key can be dropped. A head whose seal checks with no configured key is left as it is."""
    from db.session import system_session
    from services import audit

    with system_session() as session:
        resealed, refused = audit.reseal_heads(session)
    typer.echo(f"re-sealed {resealed} audit chain head(s) with the first key of RRC_SECRET_KEYS")
    if refused:
        typer.echo(f"left alone, their seal checks with no configured key (tampered, or sealed with a key no "
                   f"longer configured): organization id(s) {', '.join(map(str, refused))}", err=True)
        raise typer.Exit(1)


def _org_actor(slug: str, name: str):  # type: ignore[no-untyped-def]
    from services.context import Actor
    from services.users import find_organization

    org = find_organization(slug)
    if org is None:
        console.print(f"--org: no organization {slug!r}", style="red")
        raise typer.Exit(EXIT_BAD_INPUT)
    return Actor.system(org.id, name)


@users_app.command("create")
def users_create(
    org: str = typer.Option(..., help="Organization slug"),
    email: str = typer.Option(...),
    role: str = typer.Option("analyst", help="admin or analyst"),
    name: str = typer.Option("", help="Display name"),
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True),
) -> None:
    """Create a user in an organization."""
    from services.errors import ServiceError
    from services.users import create_user

    try:
        user = create_user(_org_actor(org, "cli"), email, name, role, password)
    except ServiceError as exc:
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(f"created {user.role} {user.email} (id {user.id})")


@app.command("run")
def run_command(org: str = typer.Option(..., help="Organization slug")) -> None:
    """Run a reconciliation of an organization through the services into the app database."""
    from services.reconciliation import run_reconciliation

    run = run_reconciliation(_org_actor(org, "cli"), trigger="cli")
    if run.status != "succeeded":
        console.print(f"run {run.id} failed: {run.error}", style="red", markup=False)
        raise typer.Exit(1)
    counts = run.counts or {}
    typer.echo(f"run {run.id} succeeded: {counts.get('anomalies', 0)} anomalies "
               f"({counts.get('new', 0)} new, {counts.get('resolved', 0)} resolved) in {counts.get('seconds')} s")


@app.command("export-org")
def export_org_command(
    out: Path = typer.Argument(..., help="Archive to write (.zip)"),
    org: str = typer.Option(..., help="Organization slug"),
) -> None:
    """Back up one organization (users, settings, encrypted integrations, runs, anomalies, actions, audit log)."""
    from services.errors import ServiceError
    from services.orgs_backup import export_org

    try:
        result = export_org(_org_actor(org, "cli"), out)
    except ServiceError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    rows = ", ".join(f"{table} {count}" for table, count in result.rows.items() if count)
    typer.echo(f"wrote {result.path} (organization {result.slug!r}: {rows}; sha256 {result.sha256})")


@app.command("import-org")
def import_org_command(
    archive: Path = typer.Argument(..., help="Archive written by export-org"),
    new_slug: str | None = typer.Option(None, help="Import under this slug instead of the archive's"),
    new_name: str | None = typer.Option(None, help="Import under this display name instead of the archive's"),
) -> None:
    """Restore an organization from an export-org archive (all or nothing; the audit chain is verified)."""
    from services.errors import ServiceError
    from services.orgs_backup import import_org

    try:
        result = import_org(archive, new_slug=new_slug, new_name=new_name)
    except ServiceError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    typer.echo(f"imported organization {result.slug!r} as id {result.org_id} "
               f"({sum(result.rows.values())} rows; audit chain of {result.audit_entries} entries verifies)")


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # the last line of defence: a clear message and exit code 1
        console.print(f"error: {exc}", style="red", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
