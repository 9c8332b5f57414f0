"""Helpers of the in-process API tests: an httpx client on the ASGI app (no server, no
lifespan: the database gate stays up), tokens, and checks of the error envelope."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

import embedq
from embedq.api.app import create_app
from embedq.tokens import Tokens

BASE = "http://embedq.test"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@contextlib.asynccontextmanager
async def opened(db_url: str, **overrides: Any) -> AsyncIterator[embedq.App]:
    """An App on the test database with settings overrides (as flags would give them)."""
    app = embedq.App(
        database_url=db_url, poll_interval_s=0.2, heartbeat_s=0.5, lease_s=5, **overrides
    )
    await app.open()
    try:
        yield app
    finally:
        await app.close()


@contextlib.asynccontextmanager
async def client(
    target: embedq.App | FastAPI, token: str | None = None, **kw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API of `target` (an App, or an app made by create_app), sending
    `token` as its bearer token by default; `kw` goes to httpx.AsyncClient."""
    api = target if isinstance(target, FastAPI) else create_app(target, manage=False)
    headers = bearer(token) if token else {}
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers, **kw) as c:
        yield c


@contextlib.asynccontextmanager
async def worker_running(app: embedq.App) -> AsyncIterator[embedq.Worker]:
    """A worker of `app` running in the background for the duration of the block."""
    worker = embedq.Worker(app, install_signals=False)
    run = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(run, 30)


async def token(app: embedq.App, name: str, *scopes: str) -> str:
    _, secret = await Tokens(app).create(name, list(scopes) or ["admin"])
    return secret


def pick(row: dict[str, Any], *names: str) -> tuple[Any, ...]:
    return tuple(row[n] for n in names)


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The envelope of an error response, checked: its status, its code, and a request id
    equal to the X-Request-ID header."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"status", "code", "message", "request_id"} <= set(error), error
    assert error["status"] == status
    if code is not None:
        assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] and response.headers["x-request-id"] == error["request_id"]
    return dict(error)
