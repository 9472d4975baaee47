"""Credentials for the REST API: org API keys for usage ingestion, signed bearer tokens for users.

API keys (`rrc_<prefix>_<secret>`) are shown once at creation and stored only as a SHA-256 hash
(the secret is 256 random bits, so a fast hash is enough; no salt or bcrypt needed) next to the
public prefix that lets an admin recognise a key in the list. A key is revocable at once.

Decision: a key authenticates as the org with role `ingest`, which only `services.ingest.ingest`
accepts. It cannot read anomalies, amounts or settings: ingest keys live in customers' pipelines
and CI secrets, so a leaked one must not expose financial data. People and integrations that read
use a user token (`issue_user_token`), which carries that user's own role.

User tokens are HMAC-SHA256 signed (user, org, expiry, issue time in milliseconds); every request
re-reads the user so a deactivation or role change takes effect at once, not when the token expires,
and a token issued before the user's `sessions_valid_after` (set on deactivation and on a password
change) is refused for good: reactivating the user does not bring it back. The signing key is
`RRC_API_TOKEN_KEY`; without it, it is derived from `RRC_SECRET_KEYS` (shared by every instance of
a server deployment) or, on the embedded SQLite default, generated once into the data dir.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from config import load_settings
from db.models import ApiKey, User
from db.session import data_dir, is_embedded, org_session, system_session
from services import audit, users
from services.context import Actor, require_role
from services.errors import InvalidInput, NotFound, PermissionDenied

KEY_PREFIX = "rrc_"
INGEST_ROLE = "ingest"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't turn every ingest request into a write
TOKEN_KEY_FILE = "api_token.key"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidCredentials(PermissionDenied):
    """Missing, malformed, unknown, revoked or expired credentials (the API answers 401)."""


@dataclass(frozen=True)
class CreatedApiKey:
    id: int
    name: str
    prefix: str
    plaintext: str  # shown once; never stored, never logged
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyView:
    id: int
    name: str
    masked: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    token_type: str
    expires_at: datetime
    user_id: int
    org_id: int
    role: str


def _hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _view(key: ApiKey) -> ApiKeyView:
    return ApiKeyView(key.id, key.name, f"{KEY_PREFIX}{key.prefix}_…", key.created_at, key.last_used_at,
                      key.revoked_at)


def create_api_key(actor: Actor, name: str) -> CreatedApiKey:
    require_role(actor, "admin")
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise InvalidInput("name: required, at most 100 characters (e.g. 'warehouse export')")
    prefix = secrets.token_hex(4)
    plaintext = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    with org_session(actor.org_id) as session:
        key = ApiKey(org_id=actor.org_id, name=name, prefix=prefix, key_hash=_hash(plaintext),
                     created_by=actor.user_id)
        session.add(key)
        session.flush()
        audit.append(session, actor, "api_key.created", "api_key", key.id, {"name": name, "prefix": prefix})
        return CreatedApiKey(key.id, name, prefix, plaintext, key.created_at)


def list_api_keys(actor: Actor) -> list[ApiKeyView]:
    require_role(actor, "admin")
    with org_session(actor.org_id) as session:
        keys = session.execute(select(ApiKey).where(ApiKey.org_id == actor.org_id).order_by(ApiKey.id)).scalars()
        return [_view(k) for k in keys]


def revoke_api_key(actor: Actor, key_id: int) -> ApiKeyView:
    require_role(actor, "admin")
    with org_session(actor.org_id) as session:
        key = session.execute(select(ApiKey).where(ApiKey.org_id == actor.org_id, ApiKey.id == key_id)
                              ).scalar_one_or_none()
        if key is None:
            raise NotFound(f"API key {key_id} not found")
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)
            audit.append(session, actor, "api_key.revoked", "api_key", key.id, {"name": key.name, "prefix": key.prefix})
        return _view(key)


def key_prefix(plaintext: str) -> str | None:
    """The public part of a well-formed key (rate limiting buckets by it before any database work)."""
    if not plaintext.startswith(KEY_PREFIX):
        return None
    parts = plaintext[len(KEY_PREFIX):].split("_", 1)
    if len(parts) != 2 or len(parts[0]) != 8 or not parts[1]:
        return None
    return parts[0]


def authenticate_key(plaintext: str) -> Actor:
    """The org actor (`api_key:<id>`, role ingest) of a live key; InvalidCredentials otherwise.

    The lookup is by hash, so it is cross-tenant by nature (a system session); the message never
    says whether a key exists but was revoked, nor echoes the key.
    """
    if not plaintext or key_prefix(plaintext) is None or len(plaintext) > 200:
        raise InvalidCredentials("invalid API key")
    digest = _hash(plaintext)
    now = datetime.now(UTC)
    with system_session() as session:
        key = session.execute(select(ApiKey).where(ApiKey.key_hash == digest)).scalar_one_or_none()
        if key is None or key.revoked_at is not None or not hmac.compare_digest(key.key_hash, digest):
            raise InvalidCredentials("invalid API key")
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            key.last_used_at = now
        return Actor(key.org_id, INGEST_ROLE, None, f"api_key:{key.id}")


# --- user bearer tokens -------------------------------------------------------------------------


def _token_key_file(folder: Path) -> bytes:
    path = folder / TOKEN_KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".api-token-")  # 0600 from the first byte
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_hex(32).encode())
            with contextlib.suppress(FileExistsError):  # another process won the race: its key is used
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
    return path.read_bytes().strip()


def _token_key() -> bytes:
    configured = os.environ.get("RRC_API_TOKEN_KEY", "").strip()
    if configured:
        return configured.encode()
    shared = os.environ.get("RRC_SECRET_KEYS", "").strip()
    if shared:
        return hmac.new(shared.split(",")[0].strip().encode(), b"rrc-api-token-v1", hashlib.sha256).digest()
    if not is_embedded():
        raise RuntimeError("RRC_API_TOKEN_KEY (or RRC_SECRET_KEYS) must be set when DATABASE_URL is not SQLite")
    return _token_key_file(data_dir().resolve())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: str) -> str:
    return _b64(hmac.new(_token_key(), payload.encode(), hashlib.sha256).digest())


def _token_ttl() -> int:
    return load_settings().api_token_ttl


def issue_user_token(email: str, password: str) -> IssuedToken:
    """Sign in with email and password (same lockout rules as the app) and get a bearer token."""
    # The issue time is taken before the password check: a deactivation or password change committed while the
    # check runs (bcrypt takes a while) has a later cut-off, so this token is refused with the others. A cut-off
    # the check already saw (the new password was the one checked) is not held against it: the token counts as
    # issued at it, rounded up to the millisecond, so a token asked for right after a password change works.
    issued_ms = time.time_ns() // 1_000_000
    try:
        user = users.authenticate(email, password)
    except PermissionDenied as exc:
        raise InvalidCredentials(str(exc)) from None
    if user.sessions_valid_after is not None:
        issued_ms = max(issued_ms, -(-(user.sessions_valid_after - EPOCH) // timedelta(milliseconds=1)))
    expires = int(time.time()) + _token_ttl()
    claims = {"u": user.id, "o": user.org_id, "e": expires, "i": issued_ms}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    with org_session(user.org_id) as session:
        audit.append(session, Actor.user(user.org_id, user.id, user.role), "api_token.issued", "user", user.id,
                     {"expires_at": datetime.fromtimestamp(expires, UTC)})
    return IssuedToken(f"{payload}.{_sign(payload)}", "bearer", datetime.fromtimestamp(expires, UTC),
                       user.id, user.org_id, user.role)


def _issued_at(claims: dict[str, object]) -> datetime | None:
    """When the token was issued, to the millisecond; None for a token from before issue times were signed in."""
    if "i" not in claims:
        return None
    issued_ms = claims["i"]
    if not isinstance(issued_ms, int) or isinstance(issued_ms, bool):
        raise ValueError("issue time")
    return EPOCH + timedelta(milliseconds=issued_ms)


def authenticate_user_token(token: str) -> Actor:
    """The user's actor for a valid, unexpired token of a still-active user issued after their
    `sessions_valid_after` (last deactivation or password change); InvalidCredentials otherwise."""
    payload, _, signature = (token or "").partition(".")
    if not payload or not signature or len(token) > 500:
        raise InvalidCredentials("invalid token")
    if not hmac.compare_digest(_sign(payload), signature):
        raise InvalidCredentials("invalid token")
    try:
        claims = json.loads(_unb64(payload))
        user_id, org_id, expires = int(claims["u"]), int(claims["o"]), int(claims["e"])
        issued_at = _issued_at(claims)
    except (ValueError, KeyError, TypeError, OverflowError):
        raise InvalidCredentials("invalid token") from None
    if expires < time.time():
        raise InvalidCredentials("token expired: sign in again")
    with system_session() as session:
        user = session.execute(select(User).where(User.id == user_id, User.org_id == org_id)).scalar_one_or_none()
        if user is None or not user.active or users.issued_before_revocation(user, issued_at):
            raise InvalidCredentials("invalid token")
        return Actor.user(user.org_id, user.id, user.role)
