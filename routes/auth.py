"""User tokens for the REST mirror: email and password in, bearer token out."""

from __future__ import annotations

from fastapi import APIRouter

from routes.schemas import ERRORS, TokenRequest, TokenResponse
from services import api_keys

router = APIRouter(tags=["auth"], responses=ERRORS)


@router.post("/api/auth/token", response_model=TokenResponse)
def token(body: TokenRequest) -> TokenResponse:
    """Exchange a user's email and password for a bearer token (same lockout as the app)."""
    issued = api_keys.issue_user_token(body.email, body.password)
    return TokenResponse(access_token=issued.access_token, token_type=issued.token_type,
                         expires_at=issued.expires_at, role=issued.role)
