"""The FastAPI application: routes under /v1, health, metrics, the dashboard at /ui, the MCP
endpoint at /mcp (mcp_server.py).

    api = create_app(embedq.App())      # an ASGI app; `embedq serve` runs it with uvicorn

The lifespan opens the App (a pool of its own with a short acquire time-out, so requests fail
fast while the database is down), makes sure the configured admin token exists, and runs the
database gate's probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import embedq
from embedq import logs, metrics, tokens, tracing
from embedq.api import admin, documents, embeddings, errors, health, jobs, webhooks
from embedq.api.auth import NO_TOKEN, Auth, require
from embedq.api.errors import ApiError
from embedq.api.health import DatabaseGate
from embedq.app import App
from embedq.mcp_server import HttpEndpoint

log = logging.getLogger("embedq.api")
access_log = logging.getLogger("embedq.api.access")

API_POOL_SIZE = 20
ACQUIRE_TIMEOUT_S = 0.8  # a request waits this long for a connection before it answers 503
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPLOAD_PATH = re.compile(r"^/v1/collections/[^/]+/files$")


class Service:
    """What the routes share: the App, the database gate, the token checker."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.gate = DatabaseGate(app)
        self.auth = Auth(self)
        self.apps: list[App] = [app]  # whose provider circuits /health/ready reports
        self.started = time.monotonic()


def create_app(app: App | None = None, *, manage: bool = True) -> FastAPI:
    """The ASGI application of `app`. With `manage` (the default) its lifespan opens and
    closes the App; without, the caller has opened it."""
    service = Service(app or App())
    mcp = HttpEndpoint(service.app)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tracing.setup()
        if manage:
            await service.app.open(pool_size=API_POOL_SIZE, acquire_timeout_s=ACQUIRE_TIMEOUT_S)
        probe = asyncio.create_task(service.gate.run(), name="embedq-db-gate")
        try:
            async with mcp.running():
                yield
        finally:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            await service.gate.close()
            if manage:
                await service.app.close()

    api = FastAPI(
        title="embedq",
        version=embedq.__version__,
        summary="Background embeddings and a durable job queue on PostgreSQL.",
        description="Every route under /v1 needs `Authorization: Bearer <token>` "
        "(`embedq token create`); /health/*, /openapi.json and the dashboard's static files "
        "(/ui, no data in them) are open. Errors share one envelope: "
        '`{"error": {"status", "code", "message", "request_id"}}`. See docs/api.md.',
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN; the service works offline
        redoc_url=None,
    )
    api.state.service = service
    errors.install(api, on_database_down=service.gate.suspect)
    api.include_router(health.router)
    api.include_router(documents.router)
    api.include_router(jobs.router)
    api.include_router(admin.router)
    api.include_router(webhooks.router)
    api.include_router(embeddings.router)
    # MCP over streamable HTTP, for tokens with the read scope (checked by the endpoint).
    api.router.routes.append(Route("/mcp", mcp, include_in_schema=False))

    @api.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (needs a token with the read scope)",
        response_class=Response,
        dependencies=[require("read")],
    )
    async def prometheus(request: Request) -> Response:
        body = await metrics.render(service.app)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    ui = resources.files("embedq") / "api" / "ui"
    api.mount("/ui", StaticFiles(directory=str(ui), html=True), name="ui")

    @api.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @api.get("/ui", include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    origins = service.app.settings.api_cors_origins
    if origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    api.add_middleware(RequestContext, service=service)
    return api


class RequestContext:
    """Per request: an id (the caller's X-Request-ID if sane), the body-size limit, one access
    log line, the latency metric and a trace span. Pure ASGI: no per-request task."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        method, path = scope["method"], scope["path"]
        settings = self.service.app.settings
        upload = bool(UPLOAD_PATH.match(path))
        limit = settings.api_max_upload_bytes + 64 * 1024 if upload else settings.api_max_body_bytes
        what = "file uploads" if upload else "request bodies"
        setting = "api_max_upload_bytes" if upload else "api_max_body_bytes"
        too_large = (
            f"the request body is larger than the limit for {what} ({limit:,} bytes); split "
            f"it or raise the {setting} setting"
        )
        status = 500
        started = time.perf_counter()

        if (
            settings.api_auth
            and (path.startswith("/v1/") or path in ("/metrics", "/mcp"))
            and not headers.get("authorization", "").lower().startswith("bearer ")
        ):
            # Before the body is read: a request without a token is a 401 whatever it sends.
            await _reply(send, 401, "unauthorized", NO_TOKEN, rid,
                         extra=[(b"www-authenticate", b"Bearer")])  # fmt: skip
            status = 401
            self._done(scope, method, path, status, started, rid)
            return

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, "too_large", too_large, rid)
            status = 413
            self._done(scope, method, path, status, started, rid)
            return

        seen = 0
        exceeded = started_reply = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise ApiError(413, too_large)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_reply
            if exceeded:
                # Whatever the route made of the cut-off body (FastAPI calls it a parse
                # error, 400), the answer is 413.
                if not started_reply:
                    started_reply = True
                    status = 413
                    await _reply(send, 413, "too_large", too_large, rid)
                return
            if message["type"] == "http.response.start":
                started_reply = True
                status = int(message["status"])
                message["headers"] = [
                    *[
                        (k, v)
                        for k, v in message.get("headers", [])
                        if k.lower() != b"x-request-id"
                    ],
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        with tracing.span("http.request", **{"http.method": method, "http.target": path,
                                             "request_id": rid}) as span:  # fmt: skip
            try:
                with logs.context(request_id=rid):
                    await self.app(scope, limited_receive, send_with_id)
            except ApiError:
                if not (exceeded and not started_reply):
                    raise
                status = 413
                await _reply(send, 413, "too_large", too_large, rid)
            finally:
                span.set_attribute("http.status_code", status)
                span.set_attribute("http.route", _route(scope, path))
                self._done(scope, method, path, status, started, rid)

    def _done(
        self, scope: Scope, method: str, path: str, status: int, started: float, rid: str
    ) -> None:
        seconds = time.perf_counter() - started
        route = _route(scope, path)
        metrics.observe_request(method, route, status, seconds)
        if not path.startswith("/health"):
            access_log.info(
                "%s %s %d %.1f ms", method, path, status, seconds * 1000,
                extra={"request_id": rid},
            )  # fmt: skip


def _route(scope: Scope, path: str) -> str:
    """The route template ('/v1/jobs/{job_id}'): a bounded label, unlike the path."""
    route = getattr(scope.get("route"), "path", None)
    return str(route) if route else ("/ui" if path.startswith("/ui") else "unmatched")


async def _reply(
    send: Send,
    status: int,
    code: str,
    message: str,
    rid: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(
        {"error": {"status": status, "code": code, "message": message, "request_id": rid}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
                (b"connection", b"close"),  # the body was not read
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def bootstrap_admin(app: App) -> str | None:
    """Make the first admin token: the configured one (EMBEDQ_ADMIN_TOKEN), or, when no live
    token exists, a new one whose secret is returned to be shown once. None: nothing new."""
    store = tokens.Tokens(app)
    configured = app.settings.admin_token
    if configured is not None:
        await store.ensure("admin-env", configured.get_secret_value(), ["admin"])
        return None
    if await store.count_live():
        return None
    _, secret = await store.create("admin", ["admin"])
    return secret


__all__ = ["Service", "bootstrap_admin", "create_app"]
