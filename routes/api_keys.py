"""Org API keys for ingestion pipelines: create (the plaintext is shown once), list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from routes.deps import UserActor
from routes.schemas import ERRORS, ApiKeyCreate, Id, json_response, to_jsonable
from services import api_keys

router = APIRouter(tags=["api keys"], responses=ERRORS)


@router.post("/api/api-keys", status_code=201)
def create_api_key(actor: UserActor, body: ApiKeyCreate) -> Any:
    """Create an ingest key (admin). `api_key` is shown in this response only; store it now."""
    created = api_keys.create_api_key(actor, body.name)
    return json_response({"id": created.id, "name": created.name, "prefix": created.prefix,
                          "api_key": created.plaintext, "created_at": created.created_at}, 201)


@router.get("/api/api-keys")
def list_api_keys(actor: UserActor) -> Any:
    return json_response({"api_keys": [{**to_jsonable(k), "active": k.active} for k in api_keys.list_api_keys(actor)]})


@router.post("/api/api-keys/{key_id}/revoke")
def revoke_api_key(actor: UserActor, key_id: Id) -> Any:
    key = api_keys.revoke_api_key(actor, key_id)
    return json_response({**to_jsonable(key), "active": key.active})
