"""Usage events pushed to us over the API: validated, stored all-or-nothing, idempotent on event_id.

A batch is one transaction: either every new event of it is stored or none is. Replaying a batch
(a client retrying after a timeout) stores nothing twice: `(org_id, event_id)` is unique and
conflicts are skipped, and the answer says how many were new and how many were already known.
The first version of an event wins; an event id seen twice in one batch with different content
is refused, because the client cannot mean both.

Speed (PostgreSQL): the batch is COPYed into a per-connection temporary table and moved with one
`INSERT ... SELECT ... ON CONFLICT DO NOTHING` (COPY straight into `usage_events` is not possible:
PostgreSQL refuses COPY FROM into a table with row-level security). SQLite uses one
`INSERT OR IGNORE` executemany.

`export_usage_table` turns stored events into the daily usage buckets the reconciliation reads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import pyarrow as pa
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from core.logging import get_logger
from core.model import MAX_ID_LENGTH, MAX_QUANTITY
from db.models import UsageEvent
from db.session import org_session
from services import audit
from services.api_keys import INGEST_ROLE
from services.context import Actor, require_role
from services.errors import InvalidInput

MAX_BATCH = 10_000
MAX_ERRORS_REPORTED = 100
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
BUCKET_SCHEMA = pa.schema([
    ("account_id", pa.string()),
    ("product_key", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")),
    ("units", pa.decimal128(38, 12)),
])
TEMP_TABLE = "rrc_ingest_batch"
log = get_logger(__name__)

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")]


class UsageEventIn(BaseModel):
    """One usage event as a client sends it: units are exact decimals, ts must carry an offset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Identifier = Field(description="Client-chosen unique id; a replayed event id is skipped")
    account_id: Identifier = Field(description="The customer, as in accounts.account_id")
    product_key: Identifier = Field(description="The metered product, as in products.product_key")
    ts: AwareDatetime = Field(description="When the usage happened, ISO 8601 with an offset or Z")
    units: Decimal = Field(ge=0, lt=MAX_QUANTITY, max_digits=38, decimal_places=9, allow_inf_nan=False,
                           description="Units used (>= 0, at most 9 decimals); send as a string to keep it exact")

    @field_validator("ts")
    @classmethod
    def _utc_in_range(cls, value: datetime) -> datetime:
        """Store UTC; refuse instants no usage can have (they also overflow some databases' timestamps)."""
        try:
            utc = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("outside the supported range") from None
        if not EARLIEST <= utc < LATEST:
            raise ValueError(f"must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)")
        return utc


@dataclass(frozen=True)
class EventError:
    index: int | None
    field: str
    reason: str


class InvalidBatch(InvalidInput):
    """A batch with at least one bad event; nothing of it was stored."""

    def __init__(self, errors: list[EventError], total: int | None = None) -> None:
        self.errors = errors[:MAX_ERRORS_REPORTED]
        count = total if total is not None else len(errors)
        first = errors[0]
        where = f"event {first.index}" if first.index is not None else "batch"
        super().__init__(f"{count} problem(s) in the batch, nothing was stored; first: {where} "
                         f"{first.field}: {first.reason}")


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int


_EVENT = TypeAdapter(UsageEventIn)


def errors_from_validation(exc: ValidationError, index: int | None = None) -> list[EventError]:
    """pydantic errors -> (index, field, reason); without `index`, `loc` starts with the event's index."""
    found = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        at = index
        if at is None and loc and isinstance(loc[0], int):
            at = loc.pop(0)
        found.append(EventError(at, ".".join(str(p) for p in loc) or "event", err["msg"]))
    return found


def parse_events(raw: Any) -> list[UsageEventIn]:
    """Validate client JSON (a list of event objects); InvalidBatch names every bad event and field."""
    if not isinstance(raw, list):
        raise InvalidBatch([EventError(None, "events", "expected a list of events")])
    _check_size(len(raw))
    events, errors = [], []
    for index, item in enumerate(raw):
        try:
            events.append(_EVENT.validate_python(item))
        except ValidationError as exc:
            errors.extend(errors_from_validation(exc, index))
    if errors:
        raise InvalidBatch(errors)
    return events


def _check_size(count: int) -> None:
    if count == 0:
        raise InvalidBatch([EventError(None, "events", "the batch is empty")])
    if count > MAX_BATCH:
        raise InvalidBatch([EventError(None, "events", f"at most {MAX_BATCH} events per batch, got {count}")])


def _dedupe(events: list[UsageEventIn]) -> tuple[list[UsageEventIn], int]:
    """Drop exact repeats inside the batch; refuse an id that comes twice with different content."""
    seen: dict[str, tuple[int, UsageEventIn]] = {}
    unique, repeats, errors = [], 0, []
    for index, event in enumerate(events):
        if not isinstance(event, UsageEventIn):
            raise InvalidInput(f"event {index}: expected a UsageEventIn, got {type(event).__name__}")
        earlier = seen.get(event.event_id)
        if earlier is None:
            seen[event.event_id] = (index, event)
            unique.append(event)
        elif earlier[1] == event:
            repeats += 1
        else:
            errors.append(EventError(index, "event_id", f"also used by event {earlier[0]} with different content"))
    if errors:
        raise InvalidBatch(errors)
    return unique, repeats


def _insert_postgres(session: Session, org_id: int, events: list[UsageEventIn], received: datetime) -> int:
    session.execute(text(
        f"CREATE TEMP TABLE IF NOT EXISTS {TEMP_TABLE} (event_id text, account_id text, product_key text, "
        "ts timestamptz, units numeric) ON COMMIT DELETE ROWS"))
    driver = session.connection().connection.driver_connection  # psycopg 3, inside this transaction
    with driver.cursor() as cursor, cursor.copy(  # type: ignore[union-attr]
            f"COPY {TEMP_TABLE} (event_id, account_id, product_key, ts, units) FROM STDIN") as copy:
        for e in events:
            copy.write_row((e.event_id, e.account_id, e.product_key, e.ts, e.units))
    result = session.execute(text(
        f"INSERT INTO usage_events (org_id, event_id, account_id, product_key, ts, units, received_at) "
        f"SELECT :org, event_id, account_id, product_key, ts, units, :received FROM {TEMP_TABLE} "
        "ON CONFLICT (org_id, event_id) DO NOTHING"), {"org": org_id, "received": received})
    return int(result.rowcount)  # type: ignore[attr-defined]


def _insert_sqlite(session: Session, org_id: int, events: list[UsageEventIn], received: datetime) -> int:
    rows = [{"org_id": org_id, "event_id": e.event_id, "account_id": e.account_id, "product_key": e.product_key,
             "ts": e.ts, "units": e.units, "received_at": received} for e in events]
    result = session.execute(insert(UsageEvent.__table__).prefix_with("OR IGNORE"), rows)
    return int(result.rowcount)  # type: ignore[attr-defined]


def ingest(actor: Actor, events: list[UsageEventIn], *, audit_batch: bool = True) -> IngestResult:
    """Store a batch of validated events for the actor's org, all or nothing, skipping known event ids."""
    require_role(actor, "admin", INGEST_ROLE)
    _check_size(len(events))
    unique, repeats = _dedupe(events)
    received = datetime.now(UTC)
    with org_session(actor.org_id) as session:
        if session.get_bind().dialect.name == "postgresql":
            accepted = _insert_postgres(session, actor.org_id, unique, received)
        else:
            accepted = _insert_sqlite(session, actor.org_id, unique, received)
        duplicates = len(events) - accepted
        if audit_batch:
            audit.append(session, actor, "usage.ingested", "usage_events", None,
                         {"events": len(events), "accepted": accepted, "duplicates": duplicates})
    log.info("usage.ingested", org_id=actor.org_id, events=len(events), accepted=accepted,
             duplicates=duplicates, in_batch_repeats=repeats)
    return IngestResult(accepted, duplicates)


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"{name}: expected a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def _day(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def export_usage_table(actor: Actor, start: datetime, end: datetime) -> pa.Table:
    """Daily buckets (sum of units per account, product, UTC day) of events in [start, end).

    PostgreSQL sums in the database (exact numeric) and only buckets travel. SQLite stores units
    as binary floating point, so there each stored value is read back as a Decimal and summed in
    Python, exactly, instead of letting SQLite add floats.
    """
    require_role(actor, "admin", "analyst")
    start, end = _aware("start", start), _aware("end", end)
    if end <= start:
        raise InvalidInput("end: must be after start")
    sums: dict[tuple[str, str, datetime], Decimal] = defaultdict(Decimal)
    window = (UsageEvent.org_id == actor.org_id, UsageEvent.ts >= start, UsageEvent.ts < end)
    with org_session(actor.org_id) as session:
        if session.get_bind().dialect.name == "postgresql":
            day = func.date_trunc("day", func.timezone("UTC", UsageEvent.ts))
            rows = session.execute(
                select(UsageEvent.account_id, UsageEvent.product_key, day.label("day"), func.sum(UsageEvent.units))
                .where(*window).group_by(UsageEvent.account_id, UsageEvent.product_key, day))
            for account, product, bucket, units in rows:
                sums[(account, product, bucket.replace(tzinfo=UTC))] += Decimal(units)
        else:
            rows = session.execute(
                select(UsageEvent.account_id, UsageEvent.product_key, UsageEvent.ts, UsageEvent.units)
                .where(*window).execution_options(yield_per=10_000))
            for account, product, ts, units in rows:
                sums[(account, product, _day(ts))] += Decimal(units)
    keys = sorted(sums)
    return pa.table({
        "account_id": [k[0] for k in keys],
        "product_key": [k[1] for k in keys],
        "ts": [k[2] for k in keys],
        "units": [sums[k] for k in keys],
    }, schema=BUCKET_SCHEMA)


def count_events(actor: Actor) -> int:
    require_role(actor, "admin", "analyst", INGEST_ROLE)
    with org_session(actor.org_id) as session:
        return int(session.execute(select(func.count()).select_from(UsageEvent)
                                   .where(UsageEvent.org_id == actor.org_id)).scalar_one())

