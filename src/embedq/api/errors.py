"""One error envelope for every error the API returns, with the request id:

    {"error": {"status": 404, "code": "not_found", "message": "no collection 'x'...",
               "request_id": "6f1c…", "details": [...]}}

embedq's own exceptions map to a status by class (the table below), so a route raises what the
core raises and never builds a response by hand. Anything unexpected is a 500 whose message
says only that, with the request id to find it in the logs: no traceback, no internals.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedq import errors as e

log = logging.getLogger("embedq.api")

# Most specific first: the first class an exception is an instance of decides.
STATUS: list[tuple[type[e.EmbedqError], int, str]] = [
    (e.CollectionNotFound, 404, "not_found"),
    (e.DocumentNotFound, 404, "not_found"),
    (e.JobNotFound, 404, "not_found"),
    (e.UnknownQueue, 404, "not_found"),
    (e.CollectionExists, 409, "conflict"),
    (e.ModelMismatch, 409, "conflict"),
    (e.DatabaseConflict, 409, "conflict"),
    (e.TokenError, 422, "invalid"),
    (e.InvalidInput, 422, "invalid"),
    (e.InvalidDocument, 422, "invalid"),
    (e.InvalidJob, 422, "invalid"),
    (e.UnknownTask, 422, "invalid"),
    (e.ConfigurationError, 422, "invalid"),
    (e.CircuitOpen, 503, "provider_unavailable"),
    (e.TransientProviderError, 503, "provider_unavailable"),
    (e.PermanentProviderError, 502, "provider_error"),
    (e.DatabaseUnavailable, 503, "database_unavailable"),
    (e.SchemaError, 503, "schema_not_current"),
    (e.DatabaseError, 503, "database_error"),
]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


class ApiError(Exception):
    """An error a route raises on purpose, with its status and message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.headers = headers or {}
        self.details = details


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def envelope(
    request: Request,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[Any] | None = None,
) -> JSONResponse:
    rid = request_id(request)
    body: dict[str, Any] = {
        "status": status,
        "code": code,
        "message": message,
        "request_id": rid,
    }
    if details:
        body["details"] = details
    return JSONResponse(
        {"error": body}, status_code=status, headers={**(headers or {}), "X-Request-ID": rid}
    )


def status_of(exc: e.EmbedqError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 400, "bad_request"


def _retry_after(exc: BaseException) -> dict[str, str]:
    after = getattr(exc, "retry_after", None)
    if isinstance(after, int | float) and math.isfinite(after) and after > 0:
        return {"Retry-After": str(max(1, math.ceil(after)))}
    if isinstance(exc, e.DatabaseUnavailable | e.TransientProviderError):
        return {"Retry-After": "1"}
    return {}


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # The offending input is left out on purpose: it may be a secret (a settings value).
    return [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]


def _summary(details: list[dict[str, Any]]) -> str:
    parts = []
    for d in details[:3]:
        where = ".".join(p for p in d["loc"] if p not in ("body",)) or "body"
        parts.append(f"{where}: {d['msg']}")
    more = f" (and {len(details) - 3} more)" if len(details) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more


def install(api: FastAPI, on_database_down: Any = None) -> None:
    """Register the handlers that turn every exception into the envelope."""

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return envelope(
            request, exc.status, exc.code, exc.message, headers=exc.headers, details=exc.details
        )

    @api.exception_handler(e.EmbedqError)
    async def _embedq_error(request: Request, exc: e.EmbedqError) -> JSONResponse:
        status, code = status_of(exc)
        if isinstance(exc, e.DatabaseUnavailable) and on_database_down is not None:
            on_database_down()
        if status >= 500 and not isinstance(exc, e.DatabaseUnavailable):  # the gate logs those
            log.warning("%s %s: %s", request.method, request.url.path, exc,
                        extra={"request_id": request_id(request)})  # fmt: skip
        return envelope(request, status, code, str(exc), headers=_retry_after(exc))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        return envelope(request, 422, "invalid", _summary(details), details=details)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; /openapi.json lists them"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return envelope(
            request,
            exc.status_code,
            _CODES.get(exc.status_code, "error"),
            message,
            headers=dict(exc.headers or {}),
        )

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unexpected error on %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"request_id": request_id(request)},
        )
        return envelope(
            request,
            500,
            "internal",
            "internal error; the server log has the details under this request id",
        )
