"""Salesforce through `simple-salesforce`: a health check and one writer, "create a follow-up Task".

Config: `username`, `password`*, `security_token`* (empty when the org trusts the caller's IP),
`domain` ("login" for production, "test" for a sandbox) and optional `instance_url`; or, instead of
username and password, an External Client App / Connected App's `consumer_key` and `client_secret`*
(OAuth 2.0 client credentials flow, token requested from `instance_url`). With
`instance_url` (a My Domain URL such as https://acme.my.salesforce.com, or a local fake) the SOAP
login is sent there instead of {domain}.salesforce.com, and the REST calls go to the serverUrl that
login returns. `instance_url` may be any http:// or https:// URL here: which hosts and schemes it may
name (https to public hosts, plain http only to a private host the operator allows, so a password
never crosses the internet in clear) is services/source_policy.py's rule, applied before any call
reaches this module. simple-salesforce always builds https:// URLs, so for a plain http://
`instance_url` those to its own host are sent as http:// (`_Session`); a Salesforce domain a login
names is always reached over https.

Exactly-once creation without any setup in the customer's org: Task custom fields cannot be
External IDs, so upsert is not available. Instead every Task subject ends with a stable marker
`[RRC-<12 hex>]` derived from the caller's idempotency key, and `create_task` first queries
`Task WHERE WhatId = <record> AND Subject LIKE '%[RRC-…]'`; only when nothing matches does it create.
A create that timed out after Salesforce stored it is therefore found, not repeated, on retry.
Concurrent callers are kept apart by the caller (the `actions` row in services/crm_tasks.py).

Retries (tenacity): 429, 5xx, connection errors and timeouts, honouring Retry-After, a bounded
number of times. A redirect is never followed: it fails, unretried (`_Session`). Error messages
never contain the password, token or session id.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from simple_salesforce import Salesforce, SalesforceLogin
from simple_salesforce.exceptions import SalesforceAuthenticationFailed
from simple_salesforce.exceptions import SalesforceError as SdkError
from simple_salesforce.format import format_soql
from simple_salesforce.login import token_login
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from connectors.base import CheckResult, redirect_refused, request_limits

API_VERSION = "59.0"
MAX_RETRY_AFTER = 30.0
SUBJECT_MAX = 255
# Where Salesforce's logins send the REST calls (My Domain, Hyperforce, sandboxes, Government Cloud, China)
SALESFORCE_DOMAINS = (".salesforce.com", ".force.com", ".cloudforce.com", ".salesforce.mil", ".sfcrmproducts.cn")
HOST_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")  # a DNS name: no port, user or path
RECORD_ID = re.compile(r"^[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?$")
T = TypeVar("T")


class SalesforceFailure(Exception):
    """A Salesforce call that did not succeed, with a message fit to show a user (never a secret).

    `retryable` says whether trying again later may work (rate limit, outage, timeout) as opposed to
    a problem someone must fix first (credentials, permissions, a bad record id).
    """

    def __init__(self, message: str, *, retryable: bool = False, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code


@dataclass(frozen=True)
class _Settings:
    """The validated config; secrets are kept out of its repr so a traceback or log line cannot show them."""

    username: str
    password: str = field(repr=False)
    security_token: str = field(repr=False)
    consumer_key: str | None  # with client_secret: OAuth 2.0 client credentials flow (needs instance_url)
    client_secret: str | None = field(repr=False)
    domain: str
    instance_url: str | None
    timeout: float
    attempts: int


def _settings(config: dict[str, Any]) -> _Settings:
    """Validate the config up front so a typo is named, not discovered as a confusing SDK error."""
    username, password = config.get("username") or "", config.get("password") or ""
    consumer_key, client_secret = config.get("consumer_key") or None, config.get("client_secret") or None
    if bool(consumer_key) != bool(client_secret):
        raise SalesforceFailure("Salesforce consumer_key and client_secret: give both (OAuth client credentials) "
                                "or neither (username, password and security token)")
    if consumer_key and not config.get("instance_url"):
        raise SalesforceFailure("Salesforce instance_url: required with OAuth client credentials "
                                "(https://<your domain>.my.salesforce.com)")
    if not consumer_key and (not isinstance(username, str) or not username.strip()):
        raise SalesforceFailure("Salesforce username: required")
    if not consumer_key and (not isinstance(password, str) or not password):
        raise SalesforceFailure("Salesforce password: required")
    token = config.get("security_token") or ""
    if not isinstance(token, str):
        raise SalesforceFailure("Salesforce security_token: expected text")
    domain = config.get("domain") or "login"
    if domain not in ("login", "test"):
        raise SalesforceFailure(f"Salesforce domain: expected 'login' (production) or 'test' (sandbox), got {domain!r}")
    instance_url = config.get("instance_url") or None
    if instance_url is not None:
        parts = urlsplit(str(instance_url))
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SalesforceFailure(f"Salesforce instance_url: expected https://<your domain>, got {instance_url!r}")
        instance_url = f"{parts.scheme}://{parts.netloc}"
    timeout, attempts = request_limits(config, SalesforceFailure, "Salesforce")
    return _Settings(str(username).strip(), str(password), token, consumer_key, client_secret, domain, instance_url,
                     timeout, attempts)


class _Session(requests.Session):
    """Every call gets a timeout; Retry-After is remembered for the retry policy.

    `plain_http_netloc` is the netloc of an http:// instance_url (None for https://): exactly the
    https:// URLs simple-salesforce builds for that netloc are sent as http://, i.e. the REST calls
    when the login names instance_url itself as the instance (the login is sent to instance_url as
    given). An instance the login names elsewhere (a Salesforce domain, see `_check_instance`) keeps https.

    A redirect is never followed, and a 3xx answer fails here, by name (simple-salesforce would
    report it as a failed login or a rejected request): services/source_policy.py judges
    `instance_url`, not where it redirects to, and what answered there could come back inside an
    error message.
    """

    def __init__(self, timeout: float, plain_http_netloc: str | None) -> None:
        super().__init__()
        self.timeout = timeout
        self.plain_http_netloc = plain_http_netloc.lower() if plain_http_netloc else None
        self.retry_after: float | None = None

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        url = url.decode() if isinstance(url, bytes) else url
        parts = urlsplit(url)
        if self.plain_http_netloc and parts.scheme == "https" and parts.netloc.lower() == self.plain_http_netloc:
            url = "http://" + url[len("https://"):]
        response = super().request(method, url, *args, **{**kwargs, "allow_redirects": False})
        if 300 <= response.status_code < 400:
            raise SalesforceFailure(redirect_refused("Salesforce", response.status_code, "instance_url"))
        header = response.headers.get("Retry-After")
        self.retry_after = None
        if response.status_code in (429, 503) and header:
            try:
                self.retry_after = min(max(float(header), 0.0), MAX_RETRY_AFTER)
            except ValueError:
                self.retry_after = None
        return response


def _check_instance(settings: _Settings, instance: str) -> None:
    """The host a login sends every later call to must be Salesforce's own or the `instance_url` itself.

    `instance_url` is judged before anyone connects (services/source_policy.py); the instance a login
    answers with is not, so a login server of the tenant's choosing could otherwise steer the REST
    calls, with the session id, to an address the policy refuses. The instance is compared as the text
    simple-salesforce puts after https://, not as urlsplit reads it: `127.0.0.2\\@na1.salesforce.com` is
    na1.salesforce.com to urlsplit but 127.0.0.2 to requests. So it must be instance_url's own netloc
    exactly, or a bare host name (letters, digits, dashes, dots; https on its usual port) in Salesforce's
    domains."""
    named = instance.lower()
    own = settings.instance_url is not None and named == urlsplit(settings.instance_url).netloc.lower()
    host = named.rstrip(".")
    # isascii on the text as given: lower() would turn a Kelvin sign into an ASCII k
    salesforce_host = instance.isascii() and HOST_NAME.fullmatch(host) is not None and host.endswith(SALESFORCE_DOMAINS)
    if not (own or salesforce_host):
        raise SalesforceFailure(f"Salesforce login named an instance outside Salesforce's domains "
                                f"({instance!r}); refused: set instance_url to your Salesforce My Domain")


def _login(settings: _Settings, session: _Session) -> Salesforce:
    if settings.consumer_key and settings.client_secret and settings.instance_url:
        basic = base64.b64encode(f"{settings.consumer_key}:{settings.client_secret}".encode()).decode()
        access_token, instance = token_login(f"{settings.instance_url}/services/oauth2/token",
                                             {"grant_type": "client_credentials"}, settings.domain,
                                             settings.consumer_key, {"Authorization": f"Basic {basic}"}, None,
                                             session)
        return _signed_in(settings, session, access_token, instance)
    if settings.instance_url is None:
        return Salesforce(username=settings.username, password=settings.password,
                          security_token=settings.security_token, domain=settings.domain, version=API_VERSION,
                          session=session, client_id="revenue-recovery-copilot")
    session_id, instance = SalesforceLogin(username=settings.username, password=settings.password,
                                           security_token=settings.security_token, sf_version=API_VERSION,
                                           session=session, domain=settings.domain,
                                           scratch_url=settings.instance_url, client_id="revenue-recovery-copilot")
    return _signed_in(settings, session, session_id, instance)


def _signed_in(settings: _Settings, session: _Session, session_id: str, instance: str) -> Salesforce:
    """The client for the instance a login named, once that instance is one we may send the session to."""
    _check_instance(settings, instance)
    return Salesforce(session_id=session_id, instance=instance, version=API_VERSION, session=session)


def _first_error(content: Any) -> tuple[str | None, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return content[0].get("errorCode"), str(content[0].get("message", ""))
    if isinstance(content, dict):
        return content.get("errorCode"), str(content.get("message", ""))
    return None, str(content)[:200]


def _translate(exc: Exception) -> SalesforceFailure:
    """SDK and transport errors -> one clear message (codes and Salesforce's own text, no secrets)."""
    if isinstance(exc, SalesforceFailure):
        return exc
    if isinstance(exc, SalesforceAuthenticationFailed):
        code = exc.code
        if isinstance(code, int):
            return SalesforceFailure(f"Salesforce login failed with HTTP {code}", retryable=code == 429 or code >= 500)
        return SalesforceFailure(f"Salesforce rejected the login ({code}): check username, password and security "
                                 "token", code=str(code))
    if isinstance(exc, SdkError):
        code, message = _first_error(exc.content)
        status = exc.status
        if status == 401:
            return SalesforceFailure(f"Salesforce refused the session ({code or 401}): reconnect Salesforce in "
                                     "Settings", code=code)
        if status == 403:
            return SalesforceFailure(f"Salesforce denied the request ({code}): {message}", code=code)
        if status == 429 or status >= 500:
            return SalesforceFailure(f"Salesforce is unavailable right now (HTTP {status}); try again later",
                                     retryable=True, code=code)
        return SalesforceFailure(f"Salesforce rejected the request ({code}): {message}", code=code)
    if isinstance(exc, requests.Timeout):
        return SalesforceFailure("Salesforce did not answer in time; try again", retryable=True)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return SalesforceFailure("The connection to Salesforce broke before its answer arrived; try again",
                                 retryable=True)
    if isinstance(exc, requests.ConnectionError):
        return SalesforceFailure("Salesforce could not be reached; check the network or instance URL", retryable=True)
    return SalesforceFailure(f"Salesforce call failed: {type(exc).__name__}")


def _call(settings: _Settings, operation: Callable[[Salesforce], T]) -> T:
    """Log in and run `operation`, retrying the whole unit on 429/5xx/timeouts with backoff."""
    instance = urlsplit(settings.instance_url or "")
    session = _Session(settings.timeout, instance.netloc if instance.scheme == "http" else None)

    def attempt() -> T:
        try:
            return operation(_login(settings, session))
        except Exception as exc:
            raise _translate(exc) from None

    def wait(state: RetryCallState) -> float:
        if session.retry_after is not None:
            return session.retry_after
        return min(0.25 * 2 ** (state.attempt_number - 1), 8.0)

    retrying = Retrying(stop=stop_after_attempt(settings.attempts), wait=wait, reraise=True,
                        retry=retry_if_exception(lambda e: isinstance(e, SalesforceFailure) and e.retryable))
    try:
        return retrying(attempt)
    finally:
        session.close()


def check(config: dict[str, Any]) -> CheckResult:
    """Reachable, logged in, API quota left, and allowed to create Tasks."""
    try:
        settings = _settings(config)

        def probe(sf: Salesforce) -> CheckResult:
            limits = sf.limits()
            describe = sf.Task.describe()
            remaining = limits.get("DailyApiRequests", {}).get("Remaining")
            details = {"instance": sf.sf_instance, "api_requests_remaining": str(remaining),
                       "task_createable": "yes" if describe.get("createable") else "no"}
            if not describe.get("createable"):
                return CheckResult(False, "Connected to Salesforce, but this user cannot create Tasks", details)
            if remaining is not None and int(remaining) <= 0:
                return CheckResult(False, "Connected to Salesforce, but the daily API request limit is used up",
                                   details)
            who = settings.username or "the connected app"
            return CheckResult(True, f"Connected to Salesforce as {who}", details)

        return _call(settings, probe)
    except SalesforceFailure as exc:
        return CheckResult(False, exc.message)
    except Exception as exc:  # check() must never raise: the settings page shows the verdict
        return CheckResult(False, f"Salesforce check failed: {type(exc).__name__}")


def task_marker(idempotency_key: str) -> str:
    """The stable tag a task subject ends with, so a retry can find the task it already created."""
    return f"[RRC-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]}]"


def create_task(config: dict[str, Any], *, record_id: str, subject: str, description: str, due_date: date,
                idempotency_key: str, priority: str = "High") -> str:
    """Create (or find the one already created for `idempotency_key`) a Task related to `record_id`.

    `record_id` is the account's crm_id (the Task's WhatId). Returns the Task Id.
    """
    settings = _settings(config)
    if not RECORD_ID.match(record_id or ""):
        raise SalesforceFailure(f"Salesforce record id {record_id!r} is not a 15 or 18 character Salesforce Id")
    if priority not in ("High", "Normal", "Low"):
        raise SalesforceFailure(f"Salesforce priority: expected High, Normal or Low, got {priority!r}")
    marker = task_marker(idempotency_key)
    full_subject = f"{subject[: SUBJECT_MAX - len(marker) - 1].rstrip()} {marker}"
    fields = {"Subject": full_subject, "Description": description[:32000], "ActivityDate": due_date.isoformat(),
              "Status": "Not Started", "Priority": priority, "WhatId": record_id}

    def find_or_create(sf: Salesforce) -> str:
        found = sf.query(format_soql("SELECT Id FROM Task WHERE WhatId = {} AND Subject LIKE '%{:like}' LIMIT 1",
                                     record_id, marker))
        if found.get("records"):
            return str(found["records"][0]["Id"])
        try:
            created = sf.Task.create(fields)
        except SdkError as exc:
            code, _ = _first_error(exc.content)
            if code in ("INVALID_CROSS_REFERENCE_KEY", "MALFORMED_ID", "FIELD_INTEGRITY_EXCEPTION"):
                raise SalesforceFailure(f"Salesforce has no record {record_id} to attach the task to ({code}): "
                                        "check the account's CRM id", code=code) from None
            raise
        if not created.get("success") or not created.get("id"):
            raise SalesforceFailure(f"Salesforce did not create the task: {created.get('errors')}")
        return str(created["id"])

    return _call(settings, find_or_create)


def task_url(config: dict[str, Any], task_id: str) -> str | None:
    """Where a user opens the Task (Lightning); known only when the org's My Domain URL is configured."""
    instance_url = config.get("instance_url")
    return f"{str(instance_url).rstrip('/')}/lightning/r/Task/{task_id}/view" if instance_url else None
