"""The anomaly queue: filter, sort and page in SQL; open one with its evidence; change its status.

Pages and the API read anomalies only through here, so the same filters mean the same rows
everywhere (the Overview's filters carry over to the queue and to the CSV / Parquet export).
Status changes an analyst may make: dismiss (a reason is required: it is the audit trail of why
money was left on the table), mark recovered, reopen. `actioned` is set by the recovery actions
and `resolved` by reconciliation runs, never by hand.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from core.money import currency_exponent, plain_decimal
from core.reconcile import ANOMALY_TYPES, LEAK_TYPES
from core.scoring import SEVERITIES
from core.spreadsheet import safe_cell
from db.models import ANOMALY_STATUSES, Account, Action, Anomaly, AuditEntry
from db.session import org_session
from services import audit
from services.activity import people
from services.context import Actor, require_role
from services.errors import InvalidInput, NotFound

TYPES = ANOMALY_TYPES  # the engine's vocabulary, which the queue filters and labels
TYPE_LABELS = {
    "unbilled_usage": "Unbilled usage",
    "under_reported_usage": "Under-reported usage",
    "renewal_drift": "Renewal price not applied",
    "missed_overage": "Missed overage",
    "over_billing": "Over-billing (credit risk)",
}
STATUSES = ANOMALY_STATUSES  # the database's vocabulary for anomalies.status
MANUAL_TRANSITIONS = {  # target status -> statuses it may come from
    "dismissed": ("open", "actioned"),
    "recovered": ("open", "actioned"),
    "open": ("dismissed", "recovered"),
}
MAX_PAGE_SIZE = 500
MAX_EXPORT_ROWS = 200_000


@dataclass(frozen=True)
class AnomalyFilters:
    """What the Overview and the queue filter on; empty tuples and None mean "any"."""

    period_from: date | None = None  # periods starting on or after
    period_to: date | None = None  # periods starting before (half-open)
    currency: str | None = None
    types: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    severities: tuple[str, ...] = ()
    min_confidence: Decimal | None = None
    account: str | None = None  # substring of the account id or name
    product_key: str | None = None
    account_id: str | None = None  # exact account (the drill-down)

    def validate(self) -> None:
        for name, values, allowed in (("types", self.types, TYPES), ("statuses", self.statuses, STATUSES),
                                      ("severities", self.severities, SEVERITIES)):
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise InvalidInput(f"{name}: unknown {', '.join(unknown)}; expected {', '.join(allowed)}")
        if self.period_from and self.period_to and self.period_from >= self.period_to:
            raise InvalidInput("period_to: must be after period_from")
        if self.min_confidence is not None and not Decimal(0) <= self.min_confidence <= Decimal(1):
            raise InvalidInput("min_confidence: expected a number between 0 and 1")


@dataclass(frozen=True)
class AnomalyRow:
    id: int
    account_id: str
    account_name: str | None
    product_key: str
    period_start: datetime
    period_end: datetime
    type: str
    severity: str
    status: str
    amount: Decimal  # leak amount, or the over-billed amount for over_billing
    currency: str
    confidence: Decimal
    actual_units: Decimal
    reported_units: Decimal
    leak_units: Decimal
    expected_amount: Decimal
    billed_amount: Decimal


@dataclass(frozen=True)
class Page:
    rows: list[AnomalyRow]
    total: int
    page: int
    page_size: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


@dataclass(frozen=True)
class AnomalyDetail:
    row: AnomalyRow
    fingerprint: str
    price_id: str
    price_source: str
    subscription_id: str | None
    explanation: str
    confidence_factors: dict[str, Any]
    evidence: dict[str, Any]
    status_reason: str | None
    notes: list[dict[str, Any]]
    stripe_customer_id: str | None
    crm_id: str | None
    history: list[dict[str, Any]] = field(default_factory=list)  # audit entries: ts, actor, who, action, details
    actions: list[dict[str, Any]] = field(default_factory=list)
    overbilled_amount: Decimal = Decimal(0)
    found_at: datetime | None = None  # when a run first raised it
    found_by_run: int | None = None


def amount_column() -> Any:
    """The money an anomaly is about: the leak, or the over-billed amount for over_billing."""
    return Anomaly.leak_amount + Anomaly.overbilled_amount


SORTS: dict[str, Any] = {  # key -> column, or (columns kept in ascending order..., the sorted column)
    "amount": amount_column(), "confidence": Anomaly.confidence, "period": Anomaly.period_start,
    "account": Anomaly.account_id, "severity": Anomaly.severity, "type": Anomaly.type, "status": Anomaly.status,
    "updated": Anomaly.updated_at,
    # amounts of different currencies are not comparable: currency first (A-Z), then the amount
    "amount_in_currency": (Anomaly.currency, amount_column()),
}


def _order(sort: str, descending: bool) -> list[Any]:
    *groups, column = SORTS[sort] if isinstance(SORTS[sort], tuple) else (SORTS[sort],)
    return [*(group.asc() for group in groups), column.desc() if descending else column.asc()]


def _at_midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def apply_filters(query: Select[Any], org_id: int, filters: AnomalyFilters) -> Select[Any]:
    """The WHERE clause shared by the queue, the export and the dashboard aggregates."""
    filters.validate()
    query = query.where(Anomaly.org_id == org_id)
    if filters.period_from:
        query = query.where(Anomaly.period_start >= _at_midnight(filters.period_from))
    if filters.period_to:
        query = query.where(Anomaly.period_start < _at_midnight(filters.period_to))
    if filters.currency:
        query = query.where(Anomaly.currency == filters.currency.lower())
    if filters.types:
        query = query.where(Anomaly.type.in_(filters.types))
    if filters.statuses:
        query = query.where(Anomaly.status.in_(filters.statuses))
    if filters.severities:
        query = query.where(Anomaly.severity.in_(filters.severities))
    if filters.min_confidence is not None:
        query = query.where(Anomaly.confidence >= filters.min_confidence)
    if filters.product_key:
        query = query.where(Anomaly.product_key == filters.product_key)
    if filters.account_id:
        query = query.where(Anomaly.account_id == filters.account_id)
    if filters.account:
        needle = f"%{filters.account.strip().lower()}%"
        names = select(Account.account_id).where(Account.org_id == org_id, func.lower(Account.name).like(needle))
        query = query.where(or_(func.lower(Anomaly.account_id).like(needle), Anomaly.account_id.in_(names)))
    return query


def _row_query(org_id: int) -> Select[Any]:
    name = (select(Account.name).where(Account.org_id == org_id, Account.account_id == Anomaly.account_id)
            .scalar_subquery())
    return select(Anomaly, name.label("account_name"))


def _to_row(anomaly: Anomaly, account_name: str | None) -> AnomalyRow:
    return AnomalyRow(
        anomaly.id, anomaly.account_id, account_name, anomaly.product_key, anomaly.period_start,
        anomaly.period_end, anomaly.type, anomaly.severity, anomaly.status,
        Decimal(anomaly.leak_amount) + Decimal(anomaly.overbilled_amount), anomaly.currency,
        Decimal(anomaly.confidence), Decimal(anomaly.actual_units), Decimal(anomaly.reported_units),
        Decimal(anomaly.leak_units), Decimal(anomaly.expected_amount), Decimal(anomaly.billed_amount),
    )


def _rows(session: Session, org_id: int, filters: AnomalyFilters, sort: str, descending: bool, limit: int,
          offset: int = 0) -> list[AnomalyRow]:
    if sort not in SORTS:
        raise InvalidInput(f"sort: expected one of {', '.join(SORTS)}, got {sort!r}")
    query = (apply_filters(_row_query(org_id), org_id, filters)
             .order_by(*_order(sort, descending), Anomaly.id).limit(limit).offset(offset))
    return [_to_row(anomaly, name) for anomaly, name in session.execute(query)]


def list_anomalies(actor: Actor, filters: AnomalyFilters = AnomalyFilters(), *, page: int = 1,
                   page_size: int = 50, sort: str = "amount", descending: bool = True) -> Page:
    require_role(actor, "admin", "analyst")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size: expected 1 to {MAX_PAGE_SIZE}")
    page = max(page, 1)
    with org_session(actor.org_id) as session:
        total = session.execute(apply_filters(select(func.count(Anomaly.id)), actor.org_id, filters)).scalar_one()
        rows = _rows(session, actor.org_id, filters, sort, descending, page_size, (page - 1) * page_size)
    return Page(rows, total, page, page_size)


def _load(session: Session, org_id: int, anomaly_id: int) -> Anomaly:
    anomaly = session.scalars(select(Anomaly).where(Anomaly.org_id == org_id, Anomaly.id == anomaly_id)).one_or_none()
    if anomaly is None:
        raise NotFound(f"anomaly {anomaly_id} not found")
    return anomaly


def _detail(session: Session, org_id: int, anomaly: Anomaly) -> AnomalyDetail:
    account = session.scalars(select(Account).where(Account.org_id == org_id,
                                                    Account.account_id == anomaly.account_id)).one_or_none()
    history = session.scalars(
        select(AuditEntry).where(AuditEntry.org_id == org_id, AuditEntry.target_type == "anomaly",
                                 AuditEntry.target_id == str(anomaly.id)).order_by(AuditEntry.seq)).all()
    actions = session.scalars(select(Action).where(Action.org_id == org_id, Action.anomaly_id == anomaly.id)
                              .order_by(Action.created_at)).all()
    notes = list(anomaly.notes or [])
    # people by name and email, as the audit log names them (the stored labels, user:3, stay as they are)
    names = people(session, org_id, {h.actor for h in history} | {str(n.get("by")) for n in notes})
    return AnomalyDetail(
        row=_to_row(anomaly, account.name if account else None), fingerprint=anomaly.fingerprint,
        price_id=anomaly.price_id, price_source=anomaly.price_source, subscription_id=anomaly.subscription_id,
        explanation=anomaly.explanation, confidence_factors=dict(anomaly.confidence_factors),
        evidence=dict(anomaly.evidence), status_reason=anomaly.status_reason,
        notes=[{**note, "who": _person(names, str(note.get("by")))} for note in notes],
        stripe_customer_id=account.stripe_customer_id if account else None,
        crm_id=account.crm_id if account else None,
        history=[{"ts": h.ts, "actor": h.actor, "who": _person(names, h.actor), "action": h.action,
                  "details": h.details} for h in history],
        actions=[{"id": a.id, "kind": a.kind, "status": a.status, "external_id": a.external_id,
                  "amount": a.amount, "currency": a.currency, "error": a.error, "created_at": a.created_at}
                 for a in actions],
        overbilled_amount=Decimal(anomaly.overbilled_amount), found_at=anomaly.created_at,
        found_by_run=anomaly.first_run_id,
    )


def _person(names: dict[str, tuple[str, str]], label: str) -> str:
    """`Alex Analyst (analyst@demo.example)` for a user of the org; another label (system:scheduler) as stored."""
    if label not in names:
        return label
    name, email = names[label]
    return f"{name} ({email})" if name and name != email else email


def get_anomaly(actor: Actor, anomaly_id: int) -> AnomalyDetail:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return _detail(session, actor.org_id, _load(session, actor.org_id, anomaly_id))


def _change_status(session: Session, actor: Actor, anomaly: Anomaly, status: str, reason: str | None) -> None:
    allowed_from = MANUAL_TRANSITIONS.get(status)
    if allowed_from is None:
        raise InvalidInput(f"status: expected one of {', '.join(MANUAL_TRANSITIONS)} "
                           f"(actioned and resolved are set by actions and runs)")
    if anomaly.status not in allowed_from:
        raise InvalidInput(f"anomaly {anomaly.id} is {anomaly.status}; it cannot become {status}")
    if status == "recovered" and anomaly.type not in LEAK_TYPES:
        raise InvalidInput(f"anomaly {anomaly.id} is {anomaly.type}, a credit risk: there is nothing to recover; "
                           "dismiss it with the reason (for example the credit note issued)")
    reason = (reason or "").strip() or None
    if status == "dismissed" and not reason:
        raise InvalidInput("reason: say why this anomaly is dismissed")
    previous = anomaly.status
    anomaly.status, anomaly.status_reason = status, reason
    anomaly.status_changed_at, anomaly.status_changed_by = datetime.now(UTC), actor.user_id
    audit.append(session, actor, f"anomaly.{status}", "anomaly", anomaly.id,
                 {"from": previous, "reason": reason, "amount": str(Decimal(anomaly.leak_amount)
                                                                  + Decimal(anomaly.overbilled_amount)),
                  "currency": anomaly.currency})


def set_status(actor: Actor, anomaly_id: int, status: str, reason: str | None = None) -> AnomalyDetail:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        anomaly = _load(session, actor.org_id, anomaly_id)
        _change_status(session, actor, anomaly, status, reason)
        session.flush()
        return _detail(session, actor.org_id, anomaly)


def bulk_set_status(actor: Actor, anomaly_ids: list[int], status: str, reason: str | None = None) -> int:
    """All or nothing: one anomaly that cannot make the move refuses the whole batch."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        for anomaly_id in dict.fromkeys(anomaly_ids):
            _change_status(session, actor, _load(session, actor.org_id, anomaly_id), status, reason)
    return len(set(anomaly_ids))


def add_note(actor: Actor, anomaly_id: int, text: str) -> AnomalyDetail:
    require_role(actor, "admin", "analyst")
    text = text.strip()
    if not text:
        raise InvalidInput("note: write something")
    if len(text) > 4000:
        raise InvalidInput("note: at most 4000 characters")
    with org_session(actor.org_id) as session:
        anomaly = _load(session, actor.org_id, anomaly_id)
        note = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "by": actor.label, "text": text}
        anomaly.notes = [*(anomaly.notes or []), note]
        audit.append(session, actor, "anomaly.note_added", "anomaly", anomaly.id, {"text": text})
        session.flush()
        return _detail(session, actor.org_id, anomaly)


EXPORT_COLUMNS = [f.name for f in fields(AnomalyRow)]
# The queue's "Export view" is read by people, in a spreadsheet: periods as on screen, first and last day
PEOPLE_COLUMNS = ["period_last_day" if name == "period_end" else name for name in EXPORT_COLUMNS]
MONEY_COLUMNS = ("amount", "expected_amount", "billed_amount")


def export_anomalies(actor: Actor, filters: AnomalyFilters, fmt: str = "csv", *,
                     for_people: bool = False) -> tuple[bytes, str]:
    """The filtered view as CSV or Parquet (money and units as exact decimal strings).

    By default periods are half-open ISO timestamps (`period_end` is the first instant after the
    period) and amounts plain decimals (`361`), as the API and the database have them. `for_people`
    (the queue's "Export view") writes what the screen shows: `period_start` and `period_last_day`
    as dates (2026-10-01, 2026-10-31) and money with its currency's decimals (`361.00`, `44.80`;
    an amount with more decimals keeps them: nothing is rounded away).
    """
    require_role(actor, "admin", "analyst")
    if fmt not in ("csv", "parquet"):
        raise InvalidInput(f"format: expected csv or parquet, got {fmt!r}")
    with org_session(actor.org_id) as session:
        rows = _rows(session, actor.org_id, filters, "amount", True, MAX_EXPORT_ROWS)
        audit.append(session, actor, "anomalies.exported", "anomaly", None, {"format": fmt, "rows": len(rows)})
    columns = PEOPLE_COLUMNS if for_people else EXPORT_COLUMNS
    records = [_for_people(row) if for_people else {name: _cell(getattr(row, name)) for name in EXPORT_COLUMNS}
               for row in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows({name: safe_cell(value) for name, value in record.items()} for record in records)
        return buffer.getvalue().encode(), "anomalies.csv"
    table = pa.table({name: pa.array([r[name] for r in records], pa.string()) for name in columns})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue(), "anomalies.parquet"


def _for_people(row: AnomalyRow) -> dict[str, str]:
    record = {name: _cell(getattr(row, name)) for name in EXPORT_COLUMNS}
    record["period_start"] = f"{row.period_start:%Y-%m-%d}"
    record["period_last_day"] = f"{row.period_end - timedelta(microseconds=1):%Y-%m-%d}"
    for name in MONEY_COLUMNS:
        record[name] = money_text(getattr(row, name), row.currency)
    return {name: record[name] for name in PEOPLE_COLUMNS}


def money_text(amount: Decimal, currency: str) -> str:
    """An amount with its currency's decimals and no separators, for a spreadsheet: 361 -> `361.00`, 44.8 USD ->
    `44.80`, 5 JPY -> `5`; more decimals than the currency has are kept (`0.125`), never rounded away."""
    exponent = Decimal(amount).normalize().as_tuple().exponent
    places = max(currency_exponent(currency), -exponent if isinstance(exponent, int) else 0)
    return f"{Decimal(amount):.{places}f}"


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return plain_decimal(value)
    return "" if value is None else str(value)
