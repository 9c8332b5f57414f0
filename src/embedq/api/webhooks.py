"""Routes of a collection's webhook: set (the secret in that answer only), read, remove."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from embedq.api.auth import require
from embedq.api.errors import ApiError
from embedq.webhooks import MAX_URL_CHARS, Webhooks

if TYPE_CHECKING:
    from embedq.api.app import Service

router = APIRouter(prefix="/v1", tags=["webhooks"])


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="Where events are POSTed: an absolute http:// or https:// URL.",
        examples=["https://example.com/hooks/embedq"],
    )
    events: list[Annotated[str, Field(max_length=20)]] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Which events to send: 'embedded', 'failed' ('dead' means 'failed'). "
        "Unset: both.",
        examples=[["embedded", "failed"]],
    )
    enabled: bool = Field(True, description="False keeps the webhook but records no events.")
    rotate_secret: bool = Field(
        False, description="Give an existing webhook a new secret (returned in this answer)."
    )


def _hooks(request: Request) -> Webhooks:
    service: Service = request.app.state.service
    return Webhooks(service.app)


def _none(name: str) -> ApiError:
    return ApiError(
        404,
        f"collection {name!r} has no webhook; set one with PUT /v1/collections/{name}/webhook",
    )


@router.put(
    "/collections/{name}/webhook",
    summary="Create or change the collection's webhook; a new secret is in this answer only",
    dependencies=[require("admin")],
    responses={
        201: {"description": "Created; `secret` holds its signing secret, shown this once."},
        200: {"description": "Changed; `secret` only when rotate_secret was asked."},
    },
)
async def set_webhook(
    request: Request, response: Response, name: str, body: WebhookIn
) -> dict[str, Any]:
    saved = await _hooks(request).set(
        name,
        body.url,
        events=body.events,
        enabled=body.enabled,
        rotate_secret=body.rotate_secret,
    )
    out = saved.webhook.to_json()
    if saved.secret is not None:
        out["secret"] = saved.secret
    response.status_code = 201 if saved.created else 200
    return out


@router.get(
    "/collections/{name}/webhook",
    summary="The collection's webhook (never its secret)",
    dependencies=[require("admin")],
)
async def get_webhook(request: Request, name: str) -> dict[str, Any]:
    hook = await _hooks(request).get(name)
    if hook is None:
        raise _none(name)
    return hook.to_json()


@router.delete(
    "/collections/{name}/webhook",
    summary="Remove the collection's webhook",
    dependencies=[require("admin")],
)
async def remove_webhook(request: Request, name: str) -> dict[str, Any]:
    if not await _hooks(request).remove(name):
        raise _none(name)
    return {"collection": name, "removed": True}
