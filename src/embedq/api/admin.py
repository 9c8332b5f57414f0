"""Routes of the caller's identity, settings (read with sources, write, secrets masked) and
API tokens."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from embedq import status, stored_settings
from embedq.api.auth import require
from embedq.api.errors import ApiError
from embedq.errors import TokenError
from embedq.settings import Settings, env_names
from embedq.tokens import TokenInfo, Tokens

if TYPE_CHECKING:
    from embedq.api.app import Service

router = APIRouter(prefix="/v1", tags=["admin"])


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


class SettingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Any = Field(description="The new value: a JSON value of the setting's type.")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
    scopes: list[str] = Field(min_length=1, max_length=3, examples=[["read", "write"]])


@router.get("/whoami", summary="The token this request carries", dependencies=[require("any")])
async def whoami(request: Request) -> dict[str, Any]:
    token: TokenInfo = request.state.token
    return {"name": token.name, "scopes": list(token.scopes)}


def _row(service: Service, name: str) -> dict[str, Any]:
    [row] = [r for r in status.settings_rows(service.app.settings) if r["name"] == name]
    return row


def _known(name: str) -> None:
    if name not in Settings.model_fields:
        raise ApiError(404, f"no setting named {name!r}; GET /v1/settings lists them")


@router.get(
    "/settings",
    summary="Every setting with its value (secrets masked) and source",
    dependencies=[require("admin")],
)
async def list_settings(request: Request) -> dict[str, Any]:
    service = _service(request)
    await service.app.reload_settings()
    return {"settings": status.settings_rows(service.app.settings)}


@router.put(
    "/settings/{name}",
    summary="Store a setting in the database (a flag or environment variable still wins)",
    dependencies=[require("admin")],
)
async def set_setting(request: Request, name: str, body: SettingIn) -> dict[str, Any]:
    _known(name)
    service = _service(request)
    raw = body.value if isinstance(body.value, str) else json.dumps(body.value)
    await stored_settings.set_value(service.app.store, service.app.settings, name, raw)
    await service.app.reload_settings()
    row = _row(service, name)
    if row["source"] in ("env", "cli"):
        row["note"] = f"stored, but {env_names(name)[0]} (or a flag) is set and takes precedence"
    return row


@router.delete(
    "/settings/{name}",
    summary="Remove a stored setting (back to the environment or default)",
    dependencies=[require("admin")],
)
async def unset_setting(request: Request, name: str) -> dict[str, Any]:
    _known(name)
    service = _service(request)
    removed = await stored_settings.unset_value(service.app.store, name)
    await service.app.reload_settings()
    return {**_row(service, name), "removed": removed}


@router.get("/tokens", summary="API tokens (never their secrets)", dependencies=[require("admin")])
async def list_tokens(request: Request) -> dict[str, Any]:
    tokens = await Tokens(_service(request).app).list()
    return {"tokens": [t.to_json() for t in tokens]}


@router.post(
    "/tokens",
    status_code=201,
    summary="Create a token; its secret is in this answer only",
    dependencies=[require("admin")],
)
async def create_token(request: Request, body: TokenIn) -> dict[str, Any]:
    info, secret = await Tokens(_service(request).app).create(body.name, body.scopes)
    return {**info.to_json(), "token": secret}


@router.delete("/tokens/{name}", summary="Revoke a token", dependencies=[require("admin")])
async def revoke_token(request: Request, name: str) -> dict[str, Any]:
    service = _service(request)
    try:
        revoked = await Tokens(service.app).revoke(name)
    except TokenError as exc:
        raise ApiError(404, str(exc)) from None
    service.auth.forget()
    return {"revoked": revoked.name}
