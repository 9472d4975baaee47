"""Backups of one organization: export to a zip archive, import into another (or an empty) database.

The archive is one JSON-lines file per table plus `manifest.json` (format, schema revision, row
counts and a SHA-256 per file), so it can be read without this code and a damaged or edited
archive is refused before anything is written. What it holds: the organization, its settings,
users (with password hashes: they keep signing in), integrations (still encrypted: the target
must run with the same RRC_SECRET_KEYS to use them), accounts, runs, anomalies, actions, the
audit log, API keys (hashes only: the keys keep working, nobody learns them) and ingested usage
events. Files on disk (synced bundles under the data dir) are not in it: the next sync rebuilds them.

Export reads every table in one snapshot of the database (REPEATABLE READ on PostgreSQL, one read
transaction on SQLite), so a run that starts and stores findings meanwhile is wholly in the archive
or wholly out of it. The entry `organization.exported` is committed just before, in its own
transaction, so the snapshot holds it (an export that fails after that leaves the entry: the log
records the attempt); a REPEATABLE READ transaction cannot append to the audit log itself, since the
appender it waits for commits entries its snapshot does not see.

Import is one transaction: all or nothing. Row ids are kept when they are free in the target
(always the case in an empty database); otherwise every id of a table is shifted past the target's
ids and the references follow (an id shifted beyond what its column holds is refused). The audit
log's hash chain is verified from the archive first, and it must end at the archive's audit head
(`audit_heads.jsonl`), so an archive whose newest audit entries were cut off is refused too. With
unchanged ids the chain is inserted byte for byte (same hashes, `verify` passes). When the org id
or referenced ids had to change, the hashes (which cover the org id, target id and actor) no longer
match, so the chain is re-sealed over the new ids, and the entry `organization.imported` records
the original chain's head hash and the archive's checksum, which ties the new chain to the verified
old one. Either way the head is sealed anew with this installation's key (`audit.set_head`); the
archive's own seal is checked with this installation's keys, and a note says so when none of them
made it.

The manifest's checksums only show damage: whoever edits an archive can rewrite them. So every
value is also checked as it is read, against what the database would refuse or silently change,
derived from the models (`CHECKS`, `UNIQUE_KEYS`): its column's type (null only where the column
allows it, text within its length, whole numbers that are not booleans or 1.5, booleans, decimals
that fit their precision and scale without rounding, timestamps with a UTC offset, JSON without
NaN), the rules of the database's CHECK constraints (`db.models.column_rules`: roles, statuses,
kinds, amounts never negative, confidence in [0, 1]), the organization's id (every row's, and the
manifest's), the unique constraints and indexes among the file's rows (ids, emails, one running and
one queued run per organization...) and the references between files; a refusal names file, line
(both lines for a duplicate), column, value and what was expected. All of it is checked before the
import's transaction opens, in one pass over each file (`_check_file`), which also gathers what the
import needs later (id spans, referenced ids, globally unique values), so a file is read three
times at most: its checksum, this pass, its insert. Unique keys are held as one 64-bit number per
row and key (the id itself, or a digest of the values) and compared once sorted: a repeated number
has the file read again to name both lines, and a mere digest collision passes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import numpy as np
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

    def value(self, value: Any) -> Any:
        """The value to insert; TypeError, ValueError or ArithmeticError when the database would refuse or change
        it (`_checked` turns them into a refusal that says where)."""
        if value is None:
            if self.nullable:
                return None
            raise TypeError(value)
        return self.convert(value)


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


def _bits(kind: Any) -> int:
    """The size of an integer column's values: PostgreSQL's (SQLite takes 64 bits either way)."""
    return 64 if isinstance(kind, BigInteger) else 32


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
        bits = _bits(kind)
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
    exact: bool  # one integer column: its values are their own 64-bit key (`_compact`), no digest


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
    unique: list[_UniqueKey] = []
    for name, columns, where in keys:
        own = tuple(c for c in columns if c != org_column)
        exact = len(own) == 1 and isinstance(model_table.c[own[0]].type, Integer)  # at most 64 bits: `_whole`
        unique.append(_UniqueKey(name if isinstance(name, str) else None, own, where, org_column in columns, exact))
    return tuple(unique)


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
    check = CHECKS[table][column]
    try:
        return check.value(value)
    except (TypeError, ValueError, ArithmeticError):  # the place is spelled out only for a refusal: not per value
        return _checked(f"{table}.jsonl line {line}: column {column}", check, value)


def _checked(where: str, check: _ColumnCheck, value: Any) -> Any:
    """The value to insert; InvalidInput naming `where` when the database would refuse or change it."""
    try:
        return check.value(value)
    except (TypeError, ValueError, ArithmeticError) as exc:
        why = f" ({exc})" if isinstance(exc, _Unfit) else ""
        raise InvalidInput(f"{where}: {_shown(value)} is not {check.expected}{why}") from None


# --- export --------------------------------------------------------------------------------------

def _rows_of(session: Session, table: str, org_id: int) -> Iterator[dict[str, Any]]:
    model_table = MODELS[table].__table__
    key = model_table.c.id if table == "organizations" else model_table.c.org_id
    order = model_table.c.org_id if table in ORG_KEYED else model_table.c.id
    result = session.execute(select(model_table).where(key == org_id).order_by(order).execution_options(
        yield_per=CHUNK))
    for row in result:
        yield {name: _to_json(value) for name, value in row._mapping.items()}


def _one_snapshot(session: Session) -> None:
    """Make every read of the session's transaction see the database as it was at the first one (call before it).

    PostgreSQL's default, READ COMMITTED, gives each statement a snapshot of its own: a run stored between two
    of them would leave anomalies pointing at a run the archive lacks. SQLite in WAL mode keeps one snapshot per
    transaction, but the sqlite3 driver opens a transaction only before a write: without BEGIN each read is one."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    else:
        session.connection().exec_driver_sql("BEGIN")


def export_org(actor: Actor, out: Path | str) -> ExportResult:
    """Write the organization's archive to `out` (.zip), atomically; admins only; audited."""
    require_role(actor, "admin")
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InvalidInput(f"output {out}: expected a .zip file name")
    if not out.parent.is_dir():
        raise InvalidInput(f"output {out}: folder {out.parent} does not exist")
    with org_session(actor.org_id) as session:  # committed first: the snapshot below holds the entry
        if session.get(Organization, actor.org_id) is None:
            raise InvalidInput(f"organization {actor.org_id} not found")
        audit.append(session, actor, "organization.exported", "organization", actor.org_id, {"file": out.name})
    counts: dict[str, int] = {}
    files: dict[str, dict[str, Any]] = {}
    with replacing(out) as tmp, org_session(actor.org_id) as session:
        _one_snapshot(session)
        org = session.get(Organization, actor.org_id)
        if org is None:  # deleted since the entry was written
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
    return ExportResult(out, org.id, org.slug, counts, _sha256(out))


def _sha256(path: Path) -> str:
    """The file's SHA-256, read in blocks: an archive of millions of events need not fit in memory."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
        self.sha256 = _sha256(path)
        try:
            self.manifest = json.loads(self.zip.read(MANIFEST))
        except KeyError:
            raise InvalidInput(f"archive {path}: {MANIFEST} is missing (not an organization export)") from None
        except ValueError as exc:
            raise InvalidInput(f"archive {path}: {MANIFEST} is not valid JSON ({exc})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT \
                or self.manifest.get("version") != VERSION:
            found = self.manifest if isinstance(self.manifest, dict) else {}
            raise InvalidInput(f"archive {path}: {MANIFEST}: expected format {FORMAT!r} version {VERSION}, got "
                               f"{found.get('format')!r} version {found.get('version')!r}")
        revision, head = self.manifest.get("schema_revision"), head_revision()
        if revision != head:
            raise InvalidInput(f"archive {path}: exported at schema revision {revision}, this installation is at "
                               f"{head}; import it with the version of the app that exported it")
        files = self.manifest.get("files")
        expected = {f"{table}.jsonl" for table, _ in TABLES}
        if not isinstance(files, dict) or set(files) != expected:
            raise InvalidInput(f"archive {path}: {MANIFEST}: files {_shown(files)} do not match {sorted(expected)}")
        for name, meta in files.items():
            digest, count = hashlib.sha256(), 0
            try:
                with self.zip.open(name) as handle:
                    for line in handle:
                        digest.update(line)
                        count += 1
            except KeyError:
                raise InvalidInput(f"archive {path}: {name} is listed in the manifest but missing") from None
            if not isinstance(meta, dict) or digest.hexdigest() != meta.get("sha256") or count != meta.get("rows"):
                raise InvalidInput(f"archive {path}: {name} does not match its checksum in {MANIFEST} "
                                   "(damaged or edited)")
        source = self.manifest.get("source")
        org_id, slug = (source.get("org_id"), source.get("slug")) if isinstance(source, dict) else (None, None)
        # the id a row of organizations.jsonl holds, and one an org_session takes
        if isinstance(org_id, bool) or not isinstance(org_id, int) or not 0 < org_id < 2 ** 31:
            raise InvalidInput(f"archive {path}: {MANIFEST}: source.org_id: {_shown(org_id)} is not an organization "
                               f"id (a whole number from 1 to {2 ** 31 - 1})")
        if not isinstance(slug, str):
            raise InvalidInput(f"archive {path}: {MANIFEST}: source.slug: {_shown(slug)} is not text")
        self.source_org_id, self.source_slug = org_id, slug

    def lines(self, table: str) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        """(line number, the row as the archive spells it, its values) for each row, the values checked as the
        database would check them (the column's type and CHECK rule) and the row's organization checked to be the
        manifest's. What holds among rows (unique keys, references) is `_check_file`'s business."""
        columns = CHECKS[table].keys()
        rules = column_rules(MODELS[table].__table__)
        org_column = "id" if table == "organizations" else "org_id"
        with self.zip.open(f"{table}.jsonl") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    raw = json.loads(line)
                except ValueError as exc:
                    raise InvalidInput(f"{table}.jsonl line {number}: not JSON ({exc})") from None
                if not isinstance(raw, dict) or raw.keys() != columns:
                    raise InvalidInput(f"{table}.jsonl line {number}: expected the columns {sorted(columns)}")
                row = {name: _from_json(table, number, name, value) for name, value in raw.items()}
                for name, rule in rules.items():
                    problem = rule.problem(row[name])
                    if problem:
                        raise InvalidInput(f"{table}.jsonl line {number}: column {name}: {_shown(raw[name])} {problem}")
                if row[org_column] != self.source_org_id:
                    raise InvalidInput(f"{table}.jsonl line {number}: column {org_column}: {_shown(raw[org_column])} "
                                       f"is not {self.source_org_id}, the exported organization's id ({MANIFEST} "
                                       "source.org_id)")
                yield number, raw, row

    def rows(self, table: str) -> Iterator[dict[str, Any]]:
        """The table's rows as column values, checked as `lines` checks them."""
        return (row for _number, _raw, row in self.lines(table))


# --- checking the rows together ------------------------------------------------------------------

KEPT = ("organizations", "audit_log", "audit_heads")  # held whole: one row each, or the chain to verify and re-seal
REFERENCED = {target for columns in REFERENCES.values() for target in columns.values()}


@dataclass
class _Facts:
    """What the checking pass over one file gathered for the import, so that nothing reads the file again
    before its insert."""

    span: tuple[int, int] | None = None  # the lowest and the highest id
    ids: np.ndarray | None = None  # sorted; kept for the files that refer to this one
    taken: list[str] = field(default_factory=list)  # the column of GLOBAL_UNIQUE: to look up in this database
    rows: list[dict[str, Any]] = field(default_factory=list)  # the values of the rows, for the tables in KEPT


def _compact(key: _UniqueKey, row: dict[str, Any]) -> int | None:
    """The row's values of `key` as one signed 64-bit number: the id itself for an integer column, else the first
    8 bytes of their BLAKE2b digest (a collision costs a second reading, never a wrong refusal); None when the key
    does not count the row: a NULL among them (NULLs never collide) or, for a partial index, not one of its rows."""
    values = tuple(row[name] for name in key.columns)
    if None in values or any(row[name] != value for name, value in key.where):
        return None
    if key.exact:
        return values[0]
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), signed=True)


def _repeated(values: array[int]) -> tuple[np.ndarray, set[int]]:
    """`values` sorted (in place: no copy), and those that occur more than once."""
    ordered = np.frombuffer(values, dtype=np.int64)
    ordered.sort()
    return ordered, set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())


def _contains(ordered: np.ndarray, value: int) -> bool:
    at = int(np.searchsorted(ordered, value))
    return at < len(ordered) and ordered[at] == value


def _check_file(archive: _Archive, table: str, facts: dict[str, _Facts]) -> _Facts:
    """Read one file, checking each row (`lines`), its references to the files read before it (TABLES lists
    parents first) and the file's unique keys; returns what the import needs of it later."""
    keys = UNIQUE_KEYS[table]
    compact: list[array[int]] = [array("q") for _ in keys]
    references = REFERENCES.get(table, {})
    global_column = GLOBAL_UNIQUE[table][0] if table in GLOBAL_UNIQUE else None
    found = _Facts()
    for number, _raw, row in archive.lines(table):
        for key, values in zip(keys, compact, strict=True):
            value = _compact(key, row)
            if value is not None:
                values.append(value)
        for column, target in references.items():
            ids = facts[target].ids
            if row[column] is not None and (ids is None or not _contains(ids, row[column])):
                raise InvalidInput(f"{table}.jsonl line {number}: column {column}: {row[column]} is not the id "
                                   f"of a row in {target}.jsonl")
        if global_column is not None:
            found.taken.append(row[global_column])
        if table in KEPT:
            found.rows.append(row)
    repeated: list[set[int]] = []
    for key, values in zip(keys, compact, strict=True):
        ordered, twice = _repeated(values)
        repeated.append(twice)
        if key.columns == ("id",) and len(ordered):
            found.span = (int(ordered[0]), int(ordered[-1]))
            found.ids = ordered if table in REFERENCED else None
    if any(repeated):
        _refuse_duplicate(archive, table, repeated)
    return found


def _refuse_duplicate(archive: _Archive, table: str, repeated: list[set[int]]) -> None:
    """Read the file again for the rows whose `_compact` number repeats, and refuse the first row that shares a
    key's values with an earlier one (the refusal a reading that kept every value would give); returns when the
    numbers were only digests that collided."""
    keys = UNIQUE_KEYS[table]
    first: list[dict[tuple[Any, ...], int]] = [{} for _ in keys]  # per key: its values -> the first line
    for number, raw, row in archive.lines(table):
        for key, twice, lines in zip(keys, repeated, first, strict=True):
            if _compact(key, row) in twice:
                earlier = lines.setdefault(tuple(row[name] for name in key.columns), number)
                if earlier != number:
                    raise InvalidInput(f"{table}.jsonl lines {earlier} and {number}: {_duplicate(key, raw)}")


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


def _check_head(org_id: int, entries: list[dict[str, Any]], head: dict[str, Any] | None) -> list[str]:
    """The archive's chain must end where its audit head says; returns notes (an unconfirmed seal). The file holds
    one head at most, of the exported organization: `_check_file` saw to both."""
    if head is None:
        if entries:
            raise InvalidInput("audit_heads.jsonl: the audit log has no head, so its completeness cannot be checked")
        return []
    last_seq, last_hash = (entries[-1]["seq"], entries[-1]["hash"]) if entries else (0, "")
    gap = audit.chain_gap(head["seq"], head["hash"], last_seq, last_hash, head="the archive's audit head")
    if gap is not None:
        raise InvalidInput(f"audit_log.jsonl: {gap[1]}")
    if audit.seal_ok(org_id, head["seq"], head["hash"], head["mac"]):
        return []
    return ["the archive's audit head is not sealed with a key of this installation (exported elsewhere, or "
            "edited): the audit log is complete as far as the archive itself tells"]


# --- import --------------------------------------------------------------------------------------

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


def _check_id_range(spans: dict[str, tuple[int, int] | None], offsets: dict[str, int]) -> None:
    """Shifted ids must still fit their column: past 2**31 - 1 PostgreSQL refuses an integer (SQLite keeps it)."""
    for table, span in spans.items():
        limit = 2 ** (_bits(MODELS[table].__table__.c.id.type) - 1) - 1
        if span is not None and span[1] + offsets[table] > limit:
            raise InvalidInput(f"{table}.jsonl: ids up to {span[1]} would move by {offsets[table]} to come after this "
                               f"database's ids, past {limit}, the highest id the column holds (an empty database "
                               "keeps them)")


def _check_conflicts(session: Session, facts: dict[str, _Facts], slug: str) -> None:
    if session.execute(select(Organization.id).where(Organization.slug == slug)).first():
        raise Conflict(f"slug: an organization {slug!r} already exists here; import with a new slug")
    for table, (column, label) in GLOBAL_UNIQUE.items():
        values = facts[table].taken
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


def _org_name(name: str, where: str) -> str:
    """The name as `users.create_organization` takes one (stripped, and refused when blank), within its column."""
    name = name.strip()
    if not name:
        raise InvalidInput(f"{where}: required")
    return _checked(where, CHECKS["organizations"]["name"], name)


def import_org(path: Path | str, *, new_slug: str | None = None, new_name: str | None = None) -> ImportResult:
    """Create the archive's organization in this database (one transaction; nothing is written on error)."""
    archive = _Archive(Path(path))
    slug = (new_slug or archive.source_slug).strip()
    if not SLUG.match(slug):
        raise InvalidInput("slug: lower-case letters, digits and dashes, 2 to 63 characters")
    if new_name is not None:
        new_name = _org_name(new_name, "name")
    facts: dict[str, _Facts] = {}
    for table, _model in TABLES:
        facts[table] = _check_file(archive, table, facts)
    if not facts["organizations"].rows:  # a second one is refused as a duplicate
        raise InvalidInput("organizations.jsonl: expected the organization's row, found none")
    organization = {**facts["organizations"].rows[0], "slug": slug}
    organization["name"] = new_name if new_name is not None else \
        _org_name(organization["name"], "organizations.jsonl line 1: column name")
    entries = facts["audit_log"].rows
    head = _verify_chain(archive.source_org_id, entries)
    notes = _check_head(archive.source_org_id, entries, next(iter(facts["audit_heads"].rows), None))
    spans = {table: facts[table].span for table, _ in TABLES if table not in ORG_KEYED}
    spans["organizations"] = (archive.source_org_id, archive.source_org_id)  # its row's id: `lines` checked it
    rows: dict[str, int] = {}
    with system_session() as session:
        _lock_tables(session)
        _check_conflicts(session, facts, slug)
        offsets = {table: _offset(session, table, span) for table, span in spans.items()}
        _check_id_range(spans, offsets)
        org_id = archive.source_org_id + offsets["organizations"]
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
            source_rows = [organization] if table == "organizations" else archive.rows(table)
            rows[table] = _insert(session, table, (_remap(table, row, org_id, offsets) for row in source_rows))
        _bump_sequences(session)
        audit.append(session, Actor.system(org_id, "import"), "organization.imported", "organization", org_id, {
            "source_org_id": archive.source_org_id, "source_slug": archive.source_slug, "source_audit_head": head,
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

