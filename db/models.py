"""The app database: SQLAlchemy 2 typed models. Every tenant table carries `org_id`.

Schema changes go through Alembic (db/migrations); these classes are the single description the
migrations were written from. Money is Numeric (never float); timestamps are timezone-aware UTC.

Enumerated and bounded columns carry a CHECK constraint `ck_<table>_<column>` (migration 0010)
built from a `OneOf` or `AtLeastZero` rule, so a row the app would mis-render or mis-count (a
role "owner", a negative leak) is refused by the database whoever writes it; `column_rules`
hands the same rules to code that checks rows before writing them (`import-org`). The
vocabularies live here, or in core when the engine produces them, because db may not import
services: the services take theirs from this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from core.model import MAX_ID_LENGTH
from core.reconcile import ANOMALY_TYPES
from core.scoring import SEVERITIES

MONEY = Numeric(20, 6)
UNITS = Numeric(38, 9)
# An identifier from the org's data (account_id, product_key, price_id, ...). Longer ones are refused where they enter
# (core/model.py MAX_ID_LENGTH): SQLite would store them, PostgreSQL refuse them. Display names are Text, unbounded.
IDENTIFIER = String(MAX_ID_LENGTH)
TENANT_TABLES = (
    "users", "integrations", "org_settings", "accounts", "recon_runs", "anomalies", "actions",
    "audit_log", "api_keys", "usage_events", "audit_heads",
)

# The vocabularies of the enumerated columns (anomaly types and severities come from core's engine).
ROLES = ("admin", "analyst")  # users.role; "system" is an Actor of the scheduler/CLI, never a stored user
INTEGRATION_KINDS = ("stripe", "salesforce", "hubspot", "sql_source", "s3_parquet")
INTEGRATION_STATUSES = ("unchecked", "ok", "error")  # never checked since saved | last check passed | failed
SCHEDULE_KINDS = ("off", "cron", "interval")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "interrupted")
RUN_TRIGGERS = ("manual", "schedule", "api", "cli")
ANOMALY_STATUSES = ("open", "dismissed", "actioned", "recovered", "resolved")
ACTION_KINDS = ("draft_invoice", "salesforce_task", "hubspot_task")
ACTION_STATUSES = ("pending", "succeeded", "failed")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class OneOf:
    """An enumerated column: only these values (NULL passes, as in SQL; NOT NULL is the column's business)."""

    column: str
    values: tuple[str, ...]

    @property
    def sql(self) -> str:
        listed = ", ".join("'" + value.replace("'", "''") + "'" for value in self.values)
        return f"{_quoted(self.column)} IN ({listed})"

    def problem(self, value: Any) -> str | None:
        """None when the database accepts `value`, else what was expected instead."""
        if value is None or (isinstance(value, str) and value in self.values):
            return None
        return f"is not one of {', '.join(self.values)}"


@dataclass(frozen=True)
class AtLeastZero:
    """A number that is never negative (an amount, a count), and at most `upper` when given."""

    column: str
    upper: Decimal | None = None

    @property
    def _bounds(self) -> tuple[str, ...]:
        return (">= 0",) if self.upper is None else (">= 0", f"<= {self.upper}")

    @property
    def sql(self) -> str:
        return " AND ".join(f"{_quoted(self.column)} {bound}" for bound in self._bounds)

    def problem(self, value: int | float | Decimal | None) -> str | None:
        """None when `value` is in bounds (or NULL), else what was expected instead.

        `value` is what the column's type holds, a finite number: whether a value is one (not text, a
        boolean or NaN) is the type's business, as NOT NULL is the column's (import-org checks both first).
        """
        if value is None or (value >= 0 and (self.upper is None or value <= self.upper)):
            return None
        return f"is not a number {' and '.join(self._bounds)}"


ColumnRule = OneOf | AtLeastZero


def checks(*rules: ColumnRule) -> tuple[CheckConstraint, ...]:
    """One CHECK constraint per rule, named ck_<table>_<column> by the metadata's convention."""
    return tuple(CheckConstraint(rule.sql, name=rule.column, info={"rule": rule}) for rule in rules)


def column_rules(table: Table) -> dict[str, ColumnRule]:
    """The rules of `table`'s CHECK constraints by column, in column order: what the database will
    refuse, for code that checks rows before it writes them."""
    rules = {constraint.info["rule"].column: constraint.info["rule"] for constraint in table.constraints
             if isinstance(constraint, CheckConstraint) and "rule" in constraint.info}
    return {column.name: rules[column.name] for column in table.columns if column.name in rules}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores no offset; we add UTC back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # SQLAlchemy's default index names, and ck_<table>_<name> for CHECK constraints (see `checks`)
    metadata = MetaData(naming_convention={"ix": "ix_%(column_0_label)s",
                                           "ck": "ck_%(table_name)s_%(constraint_name)s"})
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class OrgScoped:
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(OrgScoped, Base):
    __tablename__ = "users"
    __table_args__ = checks(OneOf("role", ROLES), AtLeastZero("failed_logins"))
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)  # also the login name
    name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    last_failed_at: Mapped[datetime | None]  # failures with none after them for a day are forgotten
    # API tokens and remember-me cookies issued before this are refused (migration 0012): set on deactivation
    # and on a password change, so neither a reactivation nor the old password brings an old session back
    sessions_valid_after: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SignInThrottle(Base):
    """Failed sign-ins for an email without an account (migration 0009; services/users.py).

    Counted and locked by the same rule as a user's `failed_logins`/`locked_until`, so the answers
    to a sign-in do not tell which emails have an account. Keyed by an HMAC-SHA256 of the normalised
    email (`users._email_key`; the column's name is from 0009, when it was a plain SHA-256): the table
    never holds an address nobody registered, nor one that can be tested without the secret key. Not a
    tenant table (emails are unique across organizations); only system sessions use it.
    """

    __tablename__ = "sign_in_throttle"
    __table_args__ = checks(AtLeastZero("failed_logins"))
    email_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None]
    last_failed_at: Mapped[datetime] = mapped_column(index=True)


class Integration(OrgScoped, Base):
    __tablename__ = "integrations"
    __table_args__ = (UniqueConstraint("org_id", "kind", "name"),
                      *checks(OneOf("kind", INTEGRATION_KINDS), OneOf("status", INTEGRATION_STATUSES)))
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(100))
    config_encrypted: Mapped[str] = mapped_column(Text)  # Fernet token of a JSON dict
    status: Mapped[str] = mapped_column(String(16), default="unchecked")
    status_message: Mapped[str | None] = mapped_column(Text)
    last_checked_at: Mapped[datetime | None]
    last_synced_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OrgSettings(Base):
    __tablename__ = "org_settings"
    # The thresholds are checked where they are used (services.settings.reconcile_params fails a run with the
    # reason), which also covers rows stored before their bounds existed.
    __table_args__ = checks(OneOf("schedule_kind", SCHEDULE_KINDS))
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True)
    rel_tolerance: Mapped[Decimal] = mapped_column(Numeric(10, 6), default=Decimal("0.005"))
    min_leak_amount: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("1.00"))
    over_billing_min: Mapped[Decimal] = mapped_column(MONEY, default=Decimal("1.00"))
    schedule_kind: Mapped[str] = mapped_column(String(16), default="off")
    schedule_expr: Mapped[str | None] = mapped_column(String(100))
    schedule_timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    data_source: Mapped[dict[str, Any] | None]
    price_map: Mapped[dict[str, Any] | None]  # product_key -> price_id for unsubscribed usage (0006)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Account(OrgScoped, Base):
    __tablename__ = "accounts"
    __table_args__ = (UniqueConstraint("org_id", "account_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[str] = mapped_column(IDENTIFIER)
    name: Mapped[str] = mapped_column(Text)  # a display name, from Stripe or a bundle (migration 0011)
    stripe_customer_id: Mapped[str | None] = mapped_column(IDENTIFIER)
    crm_id: Mapped[str | None] = mapped_column(IDENTIFIER)


class ReconRun(OrgScoped, Base):
    __tablename__ = "recon_runs"
    __table_args__ = (
        Index("ix_recon_runs_org_status", "org_id", "status"),
        # at most one running run per org (migration 0004): two workers cannot both claim an org's runs
        Index("ux_recon_runs_one_running", "org_id", unique=True, sqlite_where=text("status = 'running'"),
              postgresql_where=text("status = 'running'")),
        # at most one queued run per org (migration 0008): queue_run's read-then-insert cannot race into two
        Index("ux_recon_runs_one_queued", "org_id", unique=True, sqlite_where=text("status = 'queued'"),
              postgresql_where=text("status = 'queued'")),
        *checks(OneOf("status", RUN_STATUSES), OneOf("trigger", RUN_TRIGGERS), AtLeastZero("progress", Decimal(1))),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    trigger: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any] | None]
    counts: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(default=0.0)
    progress_message: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(100))


class Anomaly(OrgScoped, Base):
    __tablename__ = "anomalies"
    __table_args__ = (
        UniqueConstraint("org_id", "fingerprint"),
        Index("ix_anomalies_org_status", "org_id", "status"),
        Index("ix_anomalies_org_type", "org_id", "type"),
        Index("ix_anomalies_org_account", "org_id", "account_id"),
        Index("ix_anomalies_org_period", "org_id", "period_start"),
        Index("ix_anomalies_dashboard", "org_id", "status", "type", "currency", "period_start", "product_key",
              "account_id", "confidence", "leak_amount", "overbilled_amount"),  # migration 0005
        # expected_amount and billed_amount stay unbounded: invoice lines may be credits, and a price tier's amounts
        # are not refused when negative (core/bundle.py), so either can be below 0
        *checks(OneOf("type", ANOMALY_TYPES), OneOf("severity", SEVERITIES), OneOf("status", ANOMALY_STATUSES),
                AtLeastZero("confidence", Decimal(1)), AtLeastZero("actual_units"), AtLeastZero("reported_units"),
                AtLeastZero("leak_units"), AtLeastZero("leak_amount"), AtLeastZero("overbilled_amount")),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    first_run_id: Mapped[int | None] = mapped_column(ForeignKey("recon_runs.id", ondelete="SET NULL"))
    last_run_id: Mapped[int | None] = mapped_column(ForeignKey("recon_runs.id", ondelete="SET NULL"))
    account_id: Mapped[str] = mapped_column(IDENTIFIER)
    product_key: Mapped[str] = mapped_column(IDENTIFIER)
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    actual_units: Mapped[Decimal] = mapped_column(UNITS)
    reported_units: Mapped[Decimal] = mapped_column(UNITS)
    leak_units: Mapped[Decimal] = mapped_column(UNITS)
    expected_amount: Mapped[Decimal] = mapped_column(MONEY)
    billed_amount: Mapped[Decimal] = mapped_column(MONEY)
    leak_amount: Mapped[Decimal] = mapped_column(MONEY)
    overbilled_amount: Mapped[Decimal] = mapped_column(MONEY)
    currency: Mapped[str] = mapped_column(String(3))
    confidence: Mapped[Decimal] = mapped_column(Numeric(4, 3))
    confidence_factors: Mapped[dict[str, Any]]
    evidence: Mapped[dict[str, Any]]
    price_id: Mapped[str] = mapped_column(IDENTIFIER)
    price_source: Mapped[str] = mapped_column(String(64))
    subscription_id: Mapped[str | None] = mapped_column(IDENTIFIER)
    explanation: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open")
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_changed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    status_changed_at: Mapped[datetime | None]
    notes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Action(OrgScoped, Base):
    __tablename__ = "actions"
    __table_args__ = checks(OneOf("kind", ACTION_KINDS), OneOf("status", ACTION_STATUSES), AtLeastZero("amount"))
    id: Mapped[int] = mapped_column(primary_key=True)
    anomaly_id: Mapped[int | None] = mapped_column(ForeignKey("anomalies.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    amount: Mapped[Decimal | None] = mapped_column(MONEY)
    currency: Mapped[str | None] = mapped_column(String(3))
    request: Mapped[dict[str, Any] | None]
    response: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEntry(OrgScoped, Base):
    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("org_id", "seq"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(100))
    target_type: Mapped[str | None] = mapped_column(String(50))
    target_id: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(OrgScoped, Base):
    """The newest entry of an org's audit chain, sealed (migration 0007; services/audit.py).

    Written in the transaction of every append, so deleting the newest entries leaves a head that
    points past the end of the log. `mac` is an HMAC-SHA256 of (org_id, seq, hash) under a key
    derived from RRC_SECRET_KEYS, so someone who can write the database but lacks the key cannot
    move the head back.
    """

    __tablename__ = "audit_heads"
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True,
                                        autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class ApiKey(OrgScoped, Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class UsageEvent(OrgScoped, Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("org_id", "event_id"),
        Index("ix_usage_events_lookup", "org_id", "account_id", "product_key", "ts"),
        *checks(AtLeastZero("units")),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(IDENTIFIER)
    account_id: Mapped[str] = mapped_column(IDENTIFIER)
    product_key: Mapped[str] = mapped_column(IDENTIFIER)
    ts: Mapped[datetime]
    units: Mapped[Decimal] = mapped_column(UNITS)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
