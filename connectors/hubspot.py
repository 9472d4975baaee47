"""HubSpot through `hubspot-api-client`: a health check and one writer, "create a follow-up task".

Config: `access_token`* (a private app token) and optional `host` (default https://api.hubapi.com;
any http:// or https:// URL), optional `timeout` (seconds) and `max_attempts`. Which hosts and schemes
`host` may name (https to public hosts, plain http only to a private host the operator allows, so the
token never crosses the internet in clear) is services/source_policy.py's rule, applied before any
call reaches this module; here a `host` is only checked to be an http(s) URL with a host.

Exactly-once creation: HubSpot has no idempotency keys for CRM objects, so each task carries a custom
text property `rrc_idempotency_key` (created on first use when missing; the private app then needs
the schema-write scope, or an admin creates the property by hand). `create_task` searches tasks by
that property before creating, so a create that timed out after HubSpot stored it is found, not
repeated, on retry. HubSpot's search index lags writes by a few seconds, so this guards retries,
not simultaneous calls: those are kept apart by the caller (the `actions` row in services/crm_tasks.py).

Retries (tenacity): 429, 5xx, connection errors and timeouts, honouring Retry-After, a bounded
number of times; the SDK's own urllib3 retries are switched off so there is one policy. A redirect
is never followed: it fails, unretried (`_client`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar
from urllib.parse import urlsplit

import urllib3
from hubspot import HubSpot
from hubspot.crm.objects.tasks import (
    AssociationSpec,
    Filter,
    FilterGroup,
    PublicAssociationsForObject,
    PublicObjectId,
    PublicObjectSearchRequest,
    SimplePublicObjectInputForCreate,
)
from hubspot.crm.properties import PropertyCreate
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from urllib3.util.retry import Retry

from connectors.base import CheckResult, redirect_refused, request_limits

DEFAULT_HOST = "https://api.hubapi.com"
MAX_RETRY_AFTER = 30.0
IDEMPOTENCY_PROPERTY = "rrc_idempotency_key"
TASK_TO_COMPANY = 192  # HUBSPOT_DEFINED association type: task -> company
PRIORITIES = ("LOW", "MEDIUM", "HIGH")
T = TypeVar("T")


class HubSpotFailure(Exception):
    """A HubSpot call that did not succeed, with a message fit to show a user (never the token).

    `retryable` says whether trying again later may work (rate limit, outage, timeout).
    """

    def __init__(self, message: str, *, retryable: bool = False, category: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.category = category
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Settings:
    """The validated config; the token is kept out of its repr so a traceback or log line cannot show it."""

    token: str = field(repr=False)
    host: str
    timeout: float
    attempts: int


def _settings(config: dict[str, Any]) -> _Settings:
    token = config.get("access_token")
    if not isinstance(token, str) or not token.strip():
        raise HubSpotFailure("HubSpot access_token: required (a private app token)")
    host = str(config.get("host") or DEFAULT_HOST).rstrip("/")
    parts = urlsplit(host)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise HubSpotFailure(f"HubSpot host: expected https://api.hubapi.com or another https URL, got {host!r}")
    timeout, attempts = request_limits(config, HubSpotFailure, "HubSpot")
    return _Settings(token.strip(), host, timeout, attempts)


def _client(settings: _Settings) -> HubSpot:
    """No urllib3 retries (tenacity is the one policy) and no redirects: `redirect=False` hands the 3xx
    answer back unfollowed, the SDK raises it as an ApiException, and `_translate` names it.
    services/source_policy.py judges `host`, not where it redirects to, and what answered there
    could come back inside an error message."""
    return HubSpot(access_token=settings.token, host=settings.host, retry=Retry(total=0, redirect=False))


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None


def _translate(exc: Exception, what: str) -> HubSpotFailure:
    """SDK and transport errors -> one clear message (HubSpot's category and text, never the token)."""
    if isinstance(exc, HubSpotFailure):
        return exc
    status = getattr(exc, "status", None)
    if type(exc).__module__.startswith("hubspot.") and isinstance(status, int):
        try:
            body = json.loads(getattr(exc, "body", None) or "{}")
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        category, message = body.get("category"), str(body.get("message") or getattr(exc, "reason", ""))[:300]
        if 300 <= status < 400:
            return HubSpotFailure(redirect_refused("HubSpot", status, "host", what))
        if status == 401:
            return HubSpotFailure("HubSpot rejected the access token (401): reconnect HubSpot in Settings with a "
                                  "valid private app token", category=category)
        if status == 403:
            return HubSpotFailure(f"HubSpot denied {what} (403 {category or ''}): the private app is missing a "
                                  "scope", category=category)
        if status == 429 or status >= 500:
            return HubSpotFailure(f"HubSpot is unavailable or rate-limited right now (HTTP {status}); try again "
                                  "later", retryable=True, category=category,
                                  retry_after=_retry_after(getattr(exc, "headers", None)))
        if status == 0:  # the SDK's wrapper for TLS errors
            return HubSpotFailure(f"HubSpot could not be reached securely while {what}", retryable=True)
        return HubSpotFailure(f"HubSpot rejected {what} ({status} {category or ''}): {message}", category=category)
    if isinstance(exc, urllib3.exceptions.HTTPError):
        reason = getattr(exc, "reason", None)
        if isinstance(exc, urllib3.exceptions.ProtocolError) or isinstance(reason, urllib3.exceptions.ProtocolError):
            return HubSpotFailure(f"The connection to HubSpot broke before its answer arrived while {what}; try "
                                  "again", retryable=True)
        refused = urllib3.exceptions.NewConnectionError  # a subclass of TimeoutError, for history's sake
        if isinstance(exc, refused) or isinstance(reason, refused):
            return HubSpotFailure(f"HubSpot could not be reached while {what}; check the network or host",
                                  retryable=True)
        if isinstance(exc, urllib3.exceptions.TimeoutError) or isinstance(reason, urllib3.exceptions.TimeoutError):
            return HubSpotFailure(f"HubSpot did not answer in time while {what}; try again", retryable=True)
        return HubSpotFailure(f"HubSpot could not be reached while {what}; check the network or host",
                              retryable=True)
    return HubSpotFailure(f"HubSpot call failed while {what}: {type(exc).__name__}")


def _call(settings: _Settings, what: str, operation: Callable[[HubSpot], T]) -> T:
    """Run `operation` with a fresh client, retrying the whole unit on 429/5xx/timeouts with backoff."""

    def attempt() -> T:
        try:
            return operation(_client(settings))
        except Exception as exc:
            raise _translate(exc, what) from None

    def wait(state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, HubSpotFailure) and failure.retry_after is not None:
            return failure.retry_after
        return min(0.25 * 2 ** (state.attempt_number - 1), 8.0)

    retrying = Retrying(stop=stop_after_attempt(settings.attempts), wait=wait, reraise=True,
                        retry=retry_if_exception(lambda e: isinstance(e, HubSpotFailure) and e.retryable))
    return retrying(attempt)


def _has_property(client: HubSpot, timeout: float) -> bool:
    try:
        client.crm.properties.core_api.get_by_name("tasks", IDEMPOTENCY_PROPERTY, _request_timeout=timeout)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return False
        raise
    return True


def _ensure_property(client: HubSpot, timeout: float) -> None:
    if _has_property(client, timeout):
        return
    spec = PropertyCreate(name=IDEMPOTENCY_PROPERTY, label="Revenue Recovery Copilot key", type="string",
                          field_type="text", group_name="taskinformation",
                          description="Set by Revenue Recovery Copilot so a retried request never creates a "
                                      "second task. Do not edit.")
    try:
        client.crm.properties.core_api.create("tasks", spec, _request_timeout=timeout)
    except Exception as exc:
        if getattr(exc, "status", None) == 409:  # created meanwhile by another call
            return
        if getattr(exc, "status", None) == 403:
            raise HubSpotFailure(f"HubSpot task property '{IDEMPOTENCY_PROPERTY}' is missing and this private app "
                                 "may not create it: add it (single-line text) in HubSpot or grant the "
                                 "schema-write scope") from None
        raise


def check(config: dict[str, Any]) -> CheckResult:
    """Reachable, token accepted, companies readable; says whether the idempotency property exists."""
    try:
        settings = _settings(config)

        def probe(client: HubSpot) -> CheckResult:
            client.crm.companies.basic_api.get_page(limit=1, _request_timeout=settings.timeout)
            has_property = _has_property(client, settings.timeout)
            details = {"host": settings.host, "idempotency_property": "present" if has_property
                       else "missing (created on the first task)"}
            return CheckResult(True, "Connected to HubSpot", details)

        return _call(settings, "checking the connection", probe)
    except HubSpotFailure as exc:
        return CheckResult(False, exc.message)
    except Exception as exc:  # check() must never raise: the settings page shows the verdict
        return CheckResult(False, f"HubSpot check failed: {type(exc).__name__}")


def _body_html(text: str) -> str:
    """HubSpot renders hs_task_body as HTML: escape, and keep the line breaks."""
    return "<br>".join(html.escape(line) for line in text.splitlines())


def create_task(config: dict[str, Any], *, company_id: str, subject: str, body: str, due_date: date,
                idempotency_key: str, priority: str = "HIGH") -> str:
    """Create (or find the one already created for `idempotency_key`) a task associated with the company.

    `company_id` is the account's crm_id (a HubSpot company id). The due date is stored as noon UTC,
    so it shows on the same calendar day in every time zone from UTC-11 to UTC+11. Returns the task id.
    """
    settings = _settings(config)
    company_id = str(company_id or "").strip()
    if not company_id.isdigit():
        raise HubSpotFailure(f"HubSpot company id {company_id!r} is not a HubSpot company id (digits only)")
    if priority not in PRIORITIES:
        raise HubSpotFailure(f"HubSpot priority: expected one of {', '.join(PRIORITIES)}, got {priority!r}")
    if not idempotency_key:
        raise HubSpotFailure("HubSpot idempotency_key: required")
    properties = {"hs_task_subject": subject[:250], "hs_task_body": _body_html(body),
                  "hs_timestamp": f"{due_date.isoformat()}T12:00:00.000Z", "hs_task_status": "NOT_STARTED",
                  "hs_task_priority": priority, "hs_task_type": "TODO", IDEMPOTENCY_PROPERTY: idempotency_key}

    def find_or_create(client: HubSpot) -> str:
        _ensure_property(client, settings.timeout)
        search = PublicObjectSearchRequest(
            filter_groups=[FilterGroup(filters=[Filter(property_name=IDEMPOTENCY_PROPERTY, operator="EQ",
                                                       value=idempotency_key)])],
            properties=["hs_task_subject", IDEMPOTENCY_PROPERTY], limit=1)
        found = client.crm.objects.tasks.search_api.do_search(search, _request_timeout=settings.timeout)
        if found.results:
            return str(found.results[0].id)
        try:
            client.crm.companies.basic_api.get_by_id(company_id, properties=["name"],
                                                     _request_timeout=settings.timeout)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                raise HubSpotFailure(f"HubSpot has no company {company_id} to attach the task to: check the "
                                     "account's CRM id") from None
            raise
        task = SimplePublicObjectInputForCreate(properties=properties, associations=[PublicAssociationsForObject(
            to=PublicObjectId(id=company_id),
            types=[AssociationSpec(association_category="HUBSPOT_DEFINED", association_type_id=TASK_TO_COMPANY)])])
        created = client.crm.objects.tasks.basic_api.create(task, _request_timeout=settings.timeout)
        return str(created.id)

    return _call(settings, "creating the task", find_or_create)


def task_url(config: dict[str, Any], task_id: str) -> str | None:
    """Where a user opens the task in HubSpot; needs the account's `portal_id` (Hub ID) in the config."""
    portal = str(config.get("portal_id") or "").strip()
    return f"https://app.hubspot.com/contacts/{portal}/record/0-27/{task_id}" if portal.isdigit() else None
