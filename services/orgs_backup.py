"""Backups of one organization: export to a zip archive, import into another (or an empty) database.

The archive is one JSON-lines file per table plus `manifest.json` (format, schema revision, row
counts and a SHA-256 per file), so it can be read without this code and a damaged or edited
archive is refused before anything is written. What it holds: the organization, its settings,
users (with password hashes: they keep signing in), integrations (still encrypted: the target
must run with the same RRC_SECRET_KEYS to use them), accounts, runs, anomalies, actions, the
audit log, API keys (hashes only: the keys keep working, nobody learns them) and ingested usage
events. Files on disk (synced bundles under the data dir) are not in it: the next sync rebuilds them.

Import is one transaction: all or nothing. Row ids are kept when they are free in the target
(always the case in an empty database); otherwise every id of a table is shifted past the
target's ids and the references follow. The audit log's hash chain is verified from the archive
first, and it must end at the archive's audit head (`audit_heads.jsonl`), so an archive whose
newest audit entries were cut off is refused too. With unchanged ids the chain is inserted byte
for byte (same hashes, `verify` passes). When the org id or referenced ids had to change, the
hashes (which cover the org id, target id and actor) no longer match, so the chain is re-sealed
over the new ids, and the entry `organization.imported` records the original chain's head hash
and the archive's checksum, which ties the new chain to the verified old one. Either way the head
is sealed anew with this installation's key (`audit.set_head`); the archive's own seal is checked
with this installation's keys, and a note says so when none of them made it.

The manifest's checksums only show damage: whoever edits an archive can rewrite them. So every
value is also checked as it is read, against what the database would refuse or silently change,
derived from the models (`CHECKS`, `UNIQUE_KEYS`): its column's type (null only where the column
allows it, text within its length, whole numbers that are not booleans or 1.5, booleans, decimals
that fit their precision and scale without rounding, timestamps with a UTC offset, JSON without
NaN), the rules of the database's CHECK constraints (`db.models.column_rules`: roles, statuses,
kinds, amounts never negative, confidence in [0, 1]), the unique constraints and indexes among the
file's rows (ids, emails, one running and one queued run per organization...) and the references
between files; a refusal names file, line (both lines for a duplicate), column, value and what was
expected. Every table but org_settings is read (and so checked) before the import's transaction
opens; a bad org_settings row stops it inside, and the transaction writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    String,
    UniqueConstraint,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Session

from core.files import replacing
from db import crypto
from db.models import (
    Account,
    Action,
    Anomaly,
    ApiKey,
    AuditEntry,
    AuditHead,
    Base,
    Integration,
    Organization,
    OrgSettings,
    ReconRun,
    UsageEvent,
    User,
    UTCDateTime,
    column_rules,
)
from db.session import current_revision, head_revision, org_session, system_session
from services import audit
from services.context import Actor, require_role
from services.errors import Conflict, InvalidInput
from services.users import SLUG

FORMAT = "rrc-org-export"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK = 2_000
# insertion order (parents first); the file of each table is <name>.jsonl
TABLES: tuple[tuple[str, type[Base]], ...] = (
    ("organizations", Organization), ("org_settings", OrgSettings), ("users", User), ("integrations", Integration),
    ("accounts", Account), ("recon_runs", ReconRun), ("anomalies", Anomaly), ("actions", Action),
    ("audit_log", AuditEntry), ("audit_heads", AuditHead), ("api_keys", ApiKey), ("usage_events", UsageEvent),
)
ORG_KEYED = ("org_settings", "audit_heads")  # one row per org, keyed by org_id: no id of their own
MODELS = dict(TABLES)
# column -> the table whose id it holds
REFERENCES: dict[str, dict[str, str]] = {
    "recon_runs": {"created_by": "users"},
    "anomalies": {"first_run_id": "recon_runs", "last_run_id": "recon_runs", "status_changed_by": "users"},
    "actions": {"anomaly_id": "anomalies", "created_by": "users"},
    "api_keys": {"created_by": "users"},
}
# audit target_type -> the table whose id target_id holds; actor label prefix -> table
AUDIT_TARGETS = {"organization": "organizations", "org_settings": "organizations", "user": "users",
                 "recon_run": "recon_runs", "anomaly": "anomalies", "action": "actions", "api_key": "api_keys",
                 "integration": "integrations"}
ACTOR_PREFIXES = {"user": "users", "api_key": "api_keys"}
# unique across the whole database, not per org: an import must not collide on them
GLOBAL_UNIQUE = {"users": ("email", "email"), "api_keys": ("key_hash", "API key"),
                 "actions": ("idempotency_key", "action idempotency key")}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    org_id: int
    slug: str
    rows: dict[str, int]
    sha256: str


@dataclass(frozen=True)
class ImportResult:
    org_id: int
    slug: str
    rows: dict[str, int]
    ids_kept: bool  # False: ids were shifted and the audit chain re-sealed
    audit_entries: int
    undecryptable_integrations: int = 0
    notes: list[str] = field(default_factory=list)


# --- what the database stores unchanged ----------------------------------------------------------
# Derived from the models' columns, constraints and indexes once, when the module loads: a column type
# or a partial index without a check here stops the import of this module rather than going unchecked.

class _Unfit(ValueError):
    """A value its column's type cannot hold unchanged; the text says why, when the expectation alone does not."""


@dataclass(frozen=True)
class _ColumnCheck:
    expected: str  # what the column holds, in words: a refusal reads "<value> is not <expected>"
    convert: Callable[[Any], Any]  # the value to insert; raises when the database would refuse or change it
    nullable: bool


def _text(length: int | None) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(value)
        if length is not None and len(value) > length:  # PostgreSQL refuses it, SQLite keeps it: refuse on both
            raise _Unfit(f"it has {len(value)}")
        if "\x00" in value:
            raise _Unfit("PostgreSQL stores no NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: valid as a JSON \u escape, but not UTF-8
            raise _Unfit("it holds an unpaired surrogate") from None
        return value
    return convert


def _whole(bits: int) -> Callable[[Any], int]:
    bound = 2 ** (bits - 1)

    def convert(value: Any) -> int:
        # JSON's 1.5 would be rounded and its true stored as 1: only an int (bool is one in Python) is a whole number
        if isinstance(value, bool) or not isinstance(value, int) or not -bound <= value < bound:
            raise TypeError(value)
        return value
    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(value)
    return float(value)


DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # no NaN, no Infinity, no "1_000"


def _decimal(precision: int | None, scale: int) -> Callable[[Any], Decimal]:
    def convert(value: Any) -> Decimal:
        if isinstance(value, str) and DECIMAL.fullmatch(value):
            number = Decimal(value)
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            number = Decimal(str(value))  # the number as JSON wrote it, not its binary float
        else:
            raise TypeError(value)
        if precision is not None:
            if number.adjusted() >= precision - scale:
                raise _Unfit("too large")
            # exact: the default context's 28 digits are fewer than UNITS' 38
            if number.quantize(Decimal(1).scaleb(-scale), context=Context(prec=precision)) != number:
                raise _Unfit("the database would round it")
        return number
    return convert


def _timestamp(value: Any) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(value)
    parsed.astimezone(UTC)  # OverflowError near year 1 or 9999
    return parsed


def _json(value: Any) -> Any:
    json.dumps(value, allow_nan=False)  # NaN and Infinity: Python reads them, JSON (and PostgreSQL) has none
    return value


def _column_check(column: Column[Any]) -> _ColumnCheck:
    """The check of one column's values, from its type; a type without one is a programming error."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        check: tuple[str, Callable[[Any], Any]] = ("an ISO 8601 timestamp with a UTC offset", _timestamp)
    elif isinstance(kind, JSON):
        check = ("a JSON value" + ("" if column.nullable else " other than null"), _json)
    elif isinstance(kind, Boolean):
        check = ("true or false", _boolean)
    elif isinstance(kind, Float):  # before Numeric: a Float is a Numeric
        check = ("a finite number", _float)
    elif isinstance(kind, Numeric):
        scale = kind.scale or 0
        whole = None if kind.precision is None else kind.precision - scale
        shape = "" if whole is None else \
            f" of at most {whole} digit{'s' * (whole != 1)} before the point and {scale} after"
        check = ("a decimal number" + shape, _decimal(kind.precision, scale))
    elif isinstance(kind, Integer):
        bits = 64 if isinstance(kind, BigInteger) else 32  # PostgreSQL's sizes; SQLite takes 64 bits either way
        check = (f"a whole number from {-2 ** (bits - 1)} to {2 ** (bits - 1) - 1}", _whole(bits))
    elif isinstance(kind, String):
        check = ("text" if kind.length is None else f"text of at most {kind.length} characters", _text(kind.length))
    else:
        raise TypeError(f"{column}: import-org has no check for the type {kind!r}")
    # Every row names every column, so a default never applies: null in a NOT NULL column (primary keys
    # included) is refused even where the model has a default.
    return _ColumnCheck(*check, nullable=bool(column.nullable))


@dataclass(frozen=True)
class _UniqueKey:
    """A unique constraint or index that the rows of one archive file could break among themselves."""

    name: str | None
    columns: tuple[str, ...]  # without the organization's id, which the import gives every row
    where: tuple[tuple[str, str], ...]  # a partial index: only rows with these values count
    per_org: bool


PARTIAL = re.compile(r"(\w+) = '([^']*)'")


def _partial(index: Index) -> tuple[tuple[str, str], ...]:
    clauses = {str(where) for where in (index.dialect_options["postgresql"]["where"],
                                        index.dialect_options["sqlite"]["where"]) if where is not None}
    matches = [PARTIAL.fullmatch(clause) for clause in clauses]
    if len(matches) > 1 or None in matches:
        raise TypeError(f"index {index.name}: import-org cannot check the condition {sorted(clauses)}")
    return tuple((match[1], match[2]) for match in matches if match)


def _unique_keys(table: str) -> tuple[_UniqueKey, ...]:
    model_table = MODELS[table].__table__
    org_column = "id" if table == "organizations" else "org_id"
    constraints = sorted((c for c in model_table.constraints if isinstance(c, PrimaryKeyConstraint | UniqueConstraint)),
                         key=lambda c: (not isinstance(c, PrimaryKeyConstraint), c.columns.keys()))  # a stable order
    keys = [(c.name, c.columns.keys(), ()) for c in constraints]
    keys += [(index.name, index.columns.keys(), _partial(index)) for index in model_table.indexes if index.unique]
    return tuple(_UniqueKey(name if isinstance(name, str) else None, tuple(c for c in columns if c != org_column),
                            where, org_column in columns) for name, columns, where in keys)


CHECKS = {table: {column.name: _column_check(column) for column in model.__table__.columns} for table, model in TABLES}
UNIQUE_KEYS = {table: _unique_keys(table) for table, _ in TABLES}


def _shown(value: Any) -> str:
    """`value` as the archive's JSON spells it, shortened when long."""
    text = json.dumps(value, ensure_ascii=False).encode(errors="backslashreplace").decode()
    return text if len(text) <= 60 else text[:50] + "…"


# --- values <-> JSON -----------------------------------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _from_json(table: str, line: int, column: str, value: Any) -> Any:
    return _checked(f"{table}.jsonl line {line}: column {column}", CHECKS[table][column], value)


def _checked(where: str, check: _ColumnCheck, value: Any) -> Any:
    """The value to insert; InvalidInput naming `where` when the database would refuse or change it."""
    try:
        if value is None:
            if check.nullable:
                return None
            raise TypeError(value)
        return check.convert(value)
    except (TypeError, ValueError, ArithmeticError) as exc:
        why = f" ({exc})" if isinstance(exc, _Unfit) else ""
        raise InvalidInput(f"{where}: {_shown(value)} is not {check.expected}{why}") from None


def _columns(table: str) -> list[str]:
    return [column.name for column in MODELS[table].__table__.columns]


# --- export --------------------------------------------------------------------------------------

def _rows_of(session: Session, table: str, org_id: int) -> Iterator[dict[str, Any]]:
    model_table = MODELS[table].__table__
    key = model_table.c.id if table == "organizations" else model_table.c.org_id
    order = model_table.c.org_id if table in ORG_KEYED else model_table.c.id
    result = session.execute(select(model_table).where(key == org_id).order_by(order).execution_options(
        yield_per=CHUNK))
    for row in result:
        yield {name: _to_json(value) for name, value in row._mapping.items()}


def export_org(actor: Actor, out: Path | str) -> ExportResult:
    """Write the organization's archive to `out` (.zip), atomically; admins only; audited."""
    require_role(actor, "admin")
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InvalidInput(f"output {out}: expected a .zip file name")
    if not out.parent.is_dir():
        raise InvalidInput(f"output {out}: folder {out.parent} does not exist")
    counts: dict[str, int] = {}
    files: dict[str, dict[str, Any]] = {}
    # The archive replaces `out` only once the audit entry is committed (replacing exits after the session).
    with replacing(out) as tmp, org_session(actor.org_id) as session:
        audit.append(session, actor, "organization.exported", "organization", actor.org_id, {"file": out.name})
        org = session.get(Organization, actor.org_id)
        if org is None:
            raise InvalidInput(f"organization {actor.org_id} not found")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for table, _model in TABLES:
                digest, count = hashlib.sha256(), 0
                with archive.open(f"{table}.jsonl", "w", force_zip64=True) as handle:
                    for row in _rows_of(session, table, actor.org_id):
                        line = (json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n").encode()
                        handle.write(line)
                        digest.update(line)
                        count += 1
                counts[table] = count
                files[f"{table}.jsonl"] = {"rows": count, "sha256": digest.hexdigest()}
            manifest = {
                "format": FORMAT, "version": VERSION, "exported_at": datetime.now(UTC).isoformat(),
                "schema_revision": current_revision(), "source": {"org_id": org.id, "slug": org.slug},
                "files": files,
            }
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    return ExportResult(out, org.id, org.slug, counts, sha)


# --- reading an archive --------------------------------------------------------------------------

class _Archive:
    """An opened archive whose manifest and checksums were verified."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise InvalidInput(f"archive {path}: no such file")
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise InvalidInput(f"archive {path}: not a zip file") from None
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            self.manifest = json.loads(self.zip.read(MANIFEST))
        except KeyError:
            raise InvalidInput(f"archive {path}: {MANIFEST} is missing (not an organization export)") from None
        except ValueError as exc:
            raise InvalidInput(f"archive {path}: {MANIFEST} is not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise InvalidInput(f"archive {path}: {MANIFEST}: expected format {FORMAT!r} version {VERSION}, got "
                               f"{self.manifest.get('format')!r} version {self.manifest.get('version')!r}")
        revision, head = self.manifest.get("schema_revision"), head_revision()
        if revision != head:
            raise InvalidInput(f"archive {path}: exported at schema revision {revision}, this installation is at "
                               f"{head}; import it with the version of the app that exported it")
        files = self.manifest.get("files") or {}
        expected = {f"{table}.jsonl" for table, _ in TABLES}
        if set(files) != expected:
            raise InvalidInput(f"archive {path}: {MANIFEST}: files {sorted(files)} do not match {sorted(expected)}")
        for name, meta in files.items():
            digest, count = hashlib.sha256(), 0
            try:
                with self.zip.open(name) as handle:
                    for line in handle:
                        digest.update(line)
                        count += 1
            except KeyError:
                raise InvalidInput(f"archive {path}: {name} is listed in the manifest but missing") from None
            if digest.hexdigest() != meta.get("sha256") or count != meta.get("rows"):
                raise InvalidInput(f"archive {path}: {name} does not match its checksum in {MANIFEST} "
                                   "(damaged or edited)")
        self.source_org_id = int(self.manifest["source"]["org_id"])

    def rows(self, table: str) -> Iterator[dict[str, Any]]:
        """The table's rows as column values, each checked as the database would check it: the column's type,
        its CHECK rule, and the unique constraints and indexes among the file's rows."""
        columns = set(_columns(table))
        rules = column_rules(MODELS[table].__table__)
        keys = UNIQUE_KEYS[table]
        seen: list[dict[tuple[Any, ...], int]] = [{} for _ in keys]  # per key: its values -> the first line
        with self.zip.open(f"{table}.jsonl") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    raw = json.loads(line)
                except ValueError as exc:
                    raise InvalidInput(f"{table}.jsonl line {number}: not JSON ({exc})") from None
                if not isinstance(raw, dict) or set(raw) != columns:
                    raise InvalidInput(f"{table}.jsonl line {number}: expected the columns {sorted(columns)}")
                row = {name: _from_json(table, number, name, value) for name, value in raw.items()}
                for name, rule in rules.items():
                    problem = rule.problem(row[name])
                    if problem:
                        raise InvalidInput(f"{table}.jsonl line {number}: column {name}: {_shown(raw[name])} {problem}")
                for key, lines in zip(keys, seen, strict=True):
                    values = tuple(row[name] for name in key.columns)
                    # NULLs never collide in a unique constraint; a partial index counts only its rows
                    if None in values or any(row[name] != value for name, value in key.where):
                        continue
                    first = lines.setdefault(values, number)
                    if first != number:
                        raise InvalidInput(f"{table}.jsonl lines {first} and {number}: {_duplicate(key, raw)}")
                yield row


def _duplicate(key: _UniqueKey, raw: dict[str, Any]) -> str:
    """What two rows share that `key` allows once, and what was expected."""
    shared = [f"{name} {_shown(raw[name])}" for name in (*key.columns, *(name for name, _ in key.where))]
    if key.where:
        expected = "at most one such row"
    elif key.columns:
        expected = f"each {' and '.join(key.columns)} once"
    else:
        expected = "at most one row"
    return ((f"both have {', '.join(shared)}: " if shared else "") + f"expected {expected}"
            + (" per organization" if key.per_org else "") + (f" ({key.name})" if key.name else ""))


def _verify_chain(org_id: int, entries: list[dict[str, Any]]) -> str:
    """The archive's audit chain must be intact; returns the hash of its newest entry."""
    previous, expected_seq = audit.GENESIS, 1
    for entry in entries:
        if entry["seq"] != expected_seq or entry["prev_hash"] != previous:
            raise InvalidInput(f"audit_log.jsonl: the audit chain is broken at entry {expected_seq}")
        digest = audit._digest(org_id, entry["seq"], entry["ts"], entry["actor"], entry["action"], entry["target_type"],
                               entry["target_id"], entry["details"], entry["prev_hash"])
        if digest != entry["hash"]:
            raise InvalidInput(f"audit_log.jsonl: entry {entry['seq']} was changed after it was written")
        previous, expected_seq = entry["hash"], expected_seq + 1
    return previous


def _check_head(org_id: int, entries: list[dict[str, Any]], heads: list[dict[str, Any]]) -> list[str]:
    """The archive's chain must end where its audit head says; returns notes (an unconfirmed seal)."""
    if len(heads) > 1 or any(head["org_id"] != org_id for head in heads):
        raise InvalidInput("audit_heads.jsonl: expected at most one audit head, of the exported organization")
    if not heads:
        if entries:
            raise InvalidInput("audit_heads.jsonl: the audit log has no head, so its completeness cannot be checked")
        return []
    head = heads[0]
    last_seq, last_hash = (entries[-1]["seq"], entries[-1]["hash"]) if entries else (0, "")
    gap = audit.chain_gap(head["seq"], head["hash"], last_seq, last_hash, head="the archive's audit head")
    if gap is not None:
        raise InvalidInput(f"audit_log.jsonl: {gap[1]}")
    if audit.seal_ok(org_id, head["seq"], head["hash"], head["mac"]):
        return []
    return ["the archive's audit head is not sealed with a key of this installation (exported elsewhere, or "
            "edited): the audit log is complete as far as the archive itself tells"]


# --- import --------------------------------------------------------------------------------------

def _id_span(archive: _Archive, table: str) -> tuple[int, int] | None:
    ids = [row["id"] for row in archive.rows(table)]
    return (min(ids), max(ids)) if ids else None


def _check_references(archive: _Archive) -> None:
    """A reference must be null or the id of a row in the archive: the database refuses one to a missing row, and
    once ids are shifted, one to an id outside the archive could land on another organization's row."""
    targets = {target for columns in REFERENCES.values() for target in columns.values()}
    ids = {target: {row["id"] for row in archive.rows(target)} for target in targets}
    for table, columns in REFERENCES.items():
        for number, row in enumerate(archive.rows(table), start=1):
            for column, target in columns.items():
                if row[column] is not None and row[column] not in ids[target]:
                    raise InvalidInput(f"{table}.jsonl line {number}: column {column}: {row[column]} is not the id "
                                       f"of a row in {target}.jsonl")


def _offset(session: Session, table: str, span: tuple[int, int] | None) -> int:
    """0 when the archive's ids are free here, else the shift that puts them after every existing id."""
    if span is None:
        return 0
    column = MODELS[table].__table__.c.id
    taken = session.execute(select(func.count()).where(column.between(*span))).scalar_one()
    if not taken:
        return 0
    highest = session.execute(select(func.max(column))).scalar_one() or 0
    return highest + 1 - span[0]


def _lock_tables(session: Session) -> None:
    """Keep concurrent writers out while ids are chosen and rows written (SQLite: its one write lock)."""
    if session.get_bind().dialect.name == "postgresql":
        names = ", ".join(table for table, _ in TABLES)
        session.execute(text(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE"))
    else:
        session.execute(text("UPDATE organizations SET id = id WHERE 0 = 1"))


def _check_conflicts(session: Session, archive: _Archive, slug: str) -> None:
    if session.execute(select(Organization.id).where(Organization.slug == slug)).first():
        raise Conflict(f"slug: an organization {slug!r} already exists here; import with a new slug")
    for table, (column, label) in GLOBAL_UNIQUE.items():
        values = [row[column] for row in archive.rows(table)]
        db_column = MODELS[table].__table__.c[column]
        clashes: list[str] = []
        for start in range(0, len(values), 500):
            clashes += session.scalars(select(db_column).where(db_column.in_(values[start:start + 500]))).all()
        if clashes:
            shown = ", ".join(sorted(clashes)[:3]) if table == "users" else f"{len(clashes)} of them"
            raise Conflict(f"{table}: {label} already in use in this database ({shown}); an organization can be "
                           "imported once per database (sign-in emails and keys are unique across organizations)")


def _remap(table: str, row: dict[str, Any], org_id: int, offsets: dict[str, int]) -> dict[str, Any]:
    row = dict(row)
    if table == "organizations":
        row["id"] = org_id
    else:
        row["org_id"] = org_id
        if "id" in row:
            row["id"] += offsets[table]
    for column, target in REFERENCES.get(table, {}).items():
        if row[column] is not None:
            row[column] += offsets[target]
    return row


def _remap_text_id(value: str | None, table: str | None, offsets: dict[str, int], org_id: int) -> str | None:
    if value is None or table is None or not value.isdigit():
        return value
    return str(org_id) if table == "organizations" else str(int(value) + offsets[table])


def _remap_actor(label: str, offsets: dict[str, int]) -> str:
    kind, _, ident = label.partition(":")
    table = ACTOR_PREFIXES.get(kind)
    return f"{kind}:{int(ident) + offsets[table]}" if table and ident.isdigit() else label


def _insert(session: Session, table: str, rows: Iterable[dict[str, Any]]) -> int:
    model_table = MODELS[table].__table__
    batch: list[dict[str, Any]] = []
    count = 0
    for row in rows:
        batch.append(row)
        if len(batch) >= CHUNK:
            session.execute(insert(model_table), batch)
            count, batch = count + len(batch), []
    if batch:
        session.execute(insert(model_table), batch)
        count += len(batch)
    return count


def _reseal(entries: list[dict[str, Any]], org_id: int, offsets: dict[str, int]) -> list[dict[str, Any]]:
    previous, sealed = audit.GENESIS, []
    for entry in entries:
        entry = dict(entry)
        entry["target_id"] = _remap_text_id(entry["target_id"], AUDIT_TARGETS.get(entry["target_type"] or ""),
                                            offsets, org_id)
        entry["actor"] = _remap_actor(entry["actor"], offsets)
        entry["prev_hash"] = previous
        entry["hash"] = audit._digest(org_id, entry["seq"], entry["ts"], entry["actor"], entry["action"],
                                      entry["target_type"], entry["target_id"], entry["details"], previous)
        previous = entry["hash"]
        sealed.append(entry)
    return sealed


def _bump_sequences(session: Session) -> None:
    """PostgreSQL: explicit ids do not advance a serial column's sequence; move each past the highest id."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for table, _model in TABLES:
        if table in ORG_KEYED:
            continue
        sequence = session.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
        if sequence:
            session.execute(text(f"SELECT setval(:s, GREATEST((SELECT coalesce(max(id), 0) FROM {table}), "
                                 f"(SELECT last_value FROM {sequence}), 1))"), {"s": sequence})


def import_org(path: Path | str, *, new_slug: str | None = None, new_name: str | None = None) -> ImportResult:
    """Create the archive's organization in this database (one transaction; nothing is written on error)."""
    archive = _Archive(Path(path))
    source = archive.manifest["source"]
    slug = (new_slug or source["slug"]).strip()
    if not SLUG.match(slug):
        raise InvalidInput("slug: lower-case letters, digits and dashes, 2 to 63 characters")
    if new_name:
        _checked("new name", CHECKS["organizations"]["name"], new_name.strip())
    entries = list(archive.rows("audit_log"))
    head = _verify_chain(archive.source_org_id, entries)
    notes = _check_head(archive.source_org_id, entries, list(archive.rows("audit_heads")))
    spans = {table: _id_span(archive, table) for table, _ in TABLES if table not in ORG_KEYED}
    if spans["organizations"] is None:  # more than one is refused as rows are read
        raise InvalidInput("organizations.jsonl: expected the organization's row, found none")
    _check_references(archive)
    rows: dict[str, int] = {}
    with system_session() as session:
        _lock_tables(session)
        _check_conflicts(session, archive, slug)
        offsets = {table: _offset(session, table, span) for table, span in spans.items()}
        org_id = archive.source_org_id + offsets.pop("organizations")
        offsets["organizations"] = org_id - archive.source_org_id
        ids_kept = not any(offsets.values())
        sealed: list[dict[str, Any]] = []
        for table, _model in TABLES:
            if table == "audit_log":
                sealed = entries if ids_kept else _reseal(entries, org_id, offsets)
                rows[table] = _insert(session, table, (_remap(table, e, org_id, offsets) for e in sealed))
                continue
            if table == "audit_heads":  # checked above; sealed anew here, over the chain as inserted
                if sealed:
                    audit.set_head(session, org_id, sealed[-1]["seq"], sealed[-1]["hash"])
                rows[table] = 1 if sealed else 0
                continue
            source_rows: Iterable[dict[str, Any]] = archive.rows(table)
            if table == "organizations":
                source_rows = ({**row, "slug": slug, "name": (new_name or row["name"]).strip()} for row in source_rows)
            rows[table] = _insert(session, table, (_remap(table, row, org_id, offsets) for row in source_rows))
        _bump_sequences(session)
        audit.append(session, Actor.system(org_id, "import"), "organization.imported", "organization", org_id, {
            "source_org_id": archive.source_org_id, "source_slug": source["slug"], "source_audit_head": head,
            "archive_sha256": archive.sha256, "exported_at": archive.manifest.get("exported_at"),
            "ids_kept": ids_kept, "id_offsets": {t: o for t, o in offsets.items() if o},
        })
        result = audit.verify(session, org_id)
        recorded = {e["seq"] for e in entries if e["action"] == audit.HEAD_MISMATCH}
        if not result.ok and result.first_broken_seq in recorded:  # history: the source's log already said so
            notes.append(f"the audit log records at entry {result.first_broken_seq} that its head did not match "
                         "in the source installation: verify keeps reporting it")
        elif not result.ok:  # cannot happen unless this code is wrong: refuse rather than store a broken chain
            raise InvalidInput(f"audit_log: the imported chain does not verify at entry {result.first_broken_seq}")
        undecryptable = _undecryptable(session, org_id)
    if undecryptable:
        notes.append(f"{undecryptable} integration secret(s) cannot be decrypted with this installation's "
                     "RRC_SECRET_KEYS: add the exporting installation's key, or reconnect them in Settings")
    if not ids_kept:
        notes.append("ids were shifted to fit this database; the audit chain was re-sealed over the new ids and "
                     "the entry organization.imported records the original chain's head hash")
    return ImportResult(org_id, slug, rows, ids_kept, result.checked, undecryptable, notes)


def _undecryptable(session: Session, org_id: int) -> int:
    failures = 0
    for token in session.scalars(select(Integration.config_encrypted).where(Integration.org_id == org_id)):
        try:
            crypto.decrypt_json(token)
        except crypto.SecretKeyMissing:
            failures += 1
    return failures


def archive_summary(path: Path | str) -> dict[str, Any]:
    """The verified manifest of an archive (what the CLI prints before importing)."""
    archive = _Archive(Path(path))
    return dict(archive.manifest)

