"""Connections to outside systems: stored encrypted, shown masked, checked on demand.

One integration per kind and org (named "default"): an org bills through one Stripe account and
works in one CRM. The config is a JSON dict encrypted with db.crypto; only services read it in
clear (`get_config`), pages and the API only ever see `IntegrationView` with secrets masked.
Connecting, checking and disconnecting are admin-only and audited (the audit entry names the
kind and which fields changed, never a value).

A SQL source URL is shown through `connectors.sql_source.mask_url` (password and secret-like query
parameters hidden). Every config must pass `services.source_policy.check_integration` to be saved,
checked (`test_connection`) or used (`checked_config`, and the services that check it themselves):
the addresses it points at are public unless the operator allows more (RRC_PRIVATE_ENDPOINTS); a
SQL source is not the app's own database and reads database files only from operator-allowed
folders; an S3 Parquet source carries its own access key (never this server's AWS credentials,
unless the operator allows it with RRC_S3_ALLOW_SERVER_CREDENTIALS).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from connectors.base import CheckResult
from connectors.sql_source import mask_url
from db.crypto import decrypt_json, encrypt_json, mask_secret
from db.models import INTEGRATION_KINDS, Integration
from db.session import org_session
from services import audit, source_policy
from services.context import Actor, require_role
from services.errors import InvalidInput, NotFound

DEFAULT_NAME = "default"
KINDS = INTEGRATION_KINDS  # the database's vocabulary for integrations.kind; LABELS and the rest cover each
LABELS = {"stripe": "Stripe", "salesforce": "Salesforce", "hubspot": "HubSpot", "sql_source": "SQL usage source",
          "s3_parquet": "S3 Parquet usage source"}
REQUIRED: dict[str, tuple[str, ...]] = {
    "stripe": ("api_key",),
    "salesforce": (),  # username + password, or consumer_key + client_secret + instance_url: see _validate
    "hubspot": ("access_token",),
    "sql_source": ("url", "table", "columns"),
    "s3_parquet": ("bucket", "columns"),
}
SECRETS: dict[str, tuple[str, ...]] = {
    "stripe": ("api_key",),
    "salesforce": ("password", "security_token", "client_secret"),
    "hubspot": ("access_token",),
    "sql_source": ("url",),
    "s3_parquet": ("secret_access_key",),
}
# Secrets a person chose or may reuse elsewhere: not even their last characters are shown (an API key's are, to
# tell keys apart).
PASSWORDS = frozenset({"password", "security_token"})
USAGE_COLUMNS = ("account_id", "product_key", "ts", "units")


@dataclass(frozen=True)
class IntegrationView:
    """What a page or an API client may see of an integration: secrets masked."""

    id: int
    kind: str
    label: str
    status: str
    status_message: str | None
    config: dict[str, Any]
    last_checked_at: datetime | None
    last_synced_at: datetime | None


def masked(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    shown = dict(config)
    for field in SECRETS.get(kind, ()):
        if not shown.get(field):
            continue
        if field == "url":
            shown[field] = mask_url(str(shown[field]))
        else:
            shown[field] = "…" if field in PASSWORDS else mask_secret(str(shown[field]))
    return shown


def _validate(kind: str, config: dict[str, Any]) -> None:
    if kind not in LABELS:
        raise InvalidInput(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    missing = [field for field in REQUIRED[kind] if not config.get(field)]
    if kind == "salesforce":
        oauth = ("consumer_key", "client_secret", "instance_url")
        login = ("username", "password")
        if not (config.get("consumer_key") or config.get("client_secret")):
            missing = [field for field in login if not config.get(field)]
        else:
            missing = [field for field in oauth if not config.get(field)]
    if missing:
        raise InvalidInput(f"{LABELS[kind]}: missing {', '.join(missing)}")
    if kind in ("sql_source", "s3_parquet"):
        columns = config["columns"]
        if not isinstance(columns, dict):
            raise InvalidInput("columns: expected a mapping such as {'account_id': 'customer', ...}")
        absent = [name for name in USAGE_COLUMNS if not columns.get(name)]
        if absent:
            raise InvalidInput(f"columns: map {', '.join(absent)} to a column of the source")
        side = config.get("side", "actual")
        if side not in ("actual", "reported"):
            raise InvalidInput(f"side: expected 'actual' or 'reported', got {side!r}")
    source_policy.check_integration(kind, config)


def _view(row: Integration) -> IntegrationView:
    return IntegrationView(row.id, row.kind, LABELS[row.kind], row.status, row.status_message,
                           masked(row.kind, decrypt_json(row.config_encrypted)), row.last_checked_at,
                           row.last_synced_at)


def _find(session: Any, org_id: int, kind: str) -> Integration | None:
    return session.scalars(select(Integration).where(Integration.org_id == org_id, Integration.kind == kind,
                                                     Integration.name == DEFAULT_NAME)).one_or_none()


def connect(actor: Actor, kind: str, config: dict[str, Any]) -> IntegrationView:
    """Create or replace the org's integration of `kind`.

    A masked value sent back unchanged (the settings form shows `sk_test_…1234`) keeps the stored
    secret, so an admin can edit the other fields without retyping the key.
    """
    require_role(actor, "admin")
    with org_session(actor.org_id) as session:
        row = _find(session, actor.org_id, kind)
        stored = decrypt_json(row.config_encrypted) if row is not None else {}
        shown = masked(kind, stored)
        config = {key: stored[key] if key in SECRETS.get(kind, ()) and value == shown.get(key) and key in stored
                  else value for key, value in config.items()}
        _validate(kind, config)
        if row is None:
            row = Integration(org_id=actor.org_id, kind=kind, name=DEFAULT_NAME, config_encrypted="")
            session.add(row)
        changed = sorted(key for key in set(stored) | set(config) if stored.get(key) != config.get(key))
        row.config_encrypted = encrypt_json(config)
        row.status, row.status_message = "unchecked", None
        session.flush()
        audit.append(session, actor, "integration.connected", "integration", row.id,
                     {"kind": kind, "changed_fields": changed})
        return _view(row)


def list_integrations(actor: Actor) -> list[IntegrationView]:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        rows = session.scalars(select(Integration).where(Integration.org_id == actor.org_id)
                               .order_by(Integration.kind)).all()
        return [_view(row) for row in rows]


def get_config(actor: Actor, kind: str) -> dict[str, Any]:
    """The decrypted config, for services that call the connector. Never hand it to a page."""
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        row = _find(session, actor.org_id, kind)
        if row is None:
            raise NotFound(f"No {LABELS.get(kind, kind)} integration — connect {LABELS.get(kind, kind)} in Settings")
        return decrypt_json(row.config_encrypted)


def checked_config(actor: Actor, kind: str) -> dict[str, Any]:
    """`get_config` for a service about to hand it to a connector: refused (`policy_options`) when the source
    policy forbids it, which also catches a config saved before a rule existed."""
    config = get_config(actor, kind)
    policy_options(kind, config)
    return config


def policy_options(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The source policy's verdict on a config about to reach its connector: InvalidInput naming the integration
    and the field when refused, else the keyword options the connector is told (e.g. S3: may a keyless config
    use the server's keys?)."""
    try:
        source_policy.check_integration(kind, config)
        return source_policy.connector_options(kind)
    except InvalidInput as exc:
        raise InvalidInput(f"{LABELS[kind]}: {exc}") from None


def is_connected(actor: Actor, kind: str) -> bool:
    require_role(actor, "admin", "analyst")
    with org_session(actor.org_id) as session:
        return _find(session, actor.org_id, kind) is not None


def test_connection(actor: Actor, kind: str) -> CheckResult:
    """Run the connector's health check and keep its verdict for the settings page."""
    require_role(actor, "admin")
    result = _check(kind, get_config(actor, kind))
    with org_session(actor.org_id) as session:
        row = _find(session, actor.org_id, kind)
        if row is not None:
            row.status = "ok" if result.ok else "error"
            row.status_message = result.message
            row.last_checked_at = datetime.now(UTC)
            audit.append(session, actor, "integration.checked", "integration", row.id,
                         {"kind": kind, "ok": result.ok, "message": result.message})
    return result


def _check(kind: str, config: dict[str, Any]) -> CheckResult:
    """The connector's verdict, unless the source policy refuses the config first (a config saved before
    the policy existed must not be connected to either)."""
    try:
        options = policy_options(kind, config)
    except InvalidInput as exc:
        return CheckResult(False, str(exc))
    connector = importlib.import_module(f"connectors.{kind}")
    try:
        result: CheckResult = connector.check(config, **options)
    except Exception as exc:  # a connector bug must still give the admin a verdict, without the config
        result = CheckResult(False, f"{LABELS[kind]} check failed: {type(exc).__name__}")
    return result


def mark_synced(actor: Actor, kind: str, when: datetime) -> None:
    with org_session(actor.org_id) as session:
        row = _find(session, actor.org_id, kind)
        if row is not None:
            row.last_synced_at = when


def disconnect(actor: Actor, kind: str) -> None:
    require_role(actor, "admin")
    with org_session(actor.org_id) as session:
        row = _find(session, actor.org_id, kind)
        if row is None:
            raise NotFound(f"No {LABELS.get(kind, kind)} integration to disconnect")
        audit.append(session, actor, "integration.disconnected", "integration", row.id, {"kind": kind})
        session.delete(row)
