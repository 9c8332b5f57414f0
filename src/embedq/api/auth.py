"""Bearer-token auth with scopes, and a rate limit per token.

Every route but the health checks depends on `require("read" | "write" | "admin")`:

    @router.get("/v1/jobs", dependencies=[require("read")])

A verified token is remembered for a few seconds, so a burst of requests costs one lookup; a
revoked token stops working within that time. The `admin` scope allows everything.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from embedq.api.errors import ApiError
from embedq.tokens import TokenInfo, Tokens, hash_token

if TYPE_CHECKING:
    from embedq.api.app import Service

CACHE_S = 5.0
NO_TOKEN = (
    "this route needs a token: send 'Authorization: Bearer <token>' (create one with "
    "`embedq token create`)"
)
ANONYMOUS = TokenInfo(id=0, name="anonymous", scopes=("admin",))
bearer = HTTPBearer(auto_error=False, description="An API token: `embedq token create`.")


@dataclass
class _Bucket:
    tokens: float
    at: float = field(default_factory=time.monotonic)


class Auth:
    """Checks tokens against the database (with a short cache) and meters them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._cache: dict[bytes, tuple[TokenInfo | None, float]] = {}
        self._buckets: dict[int, _Bucket] = {}

    async def identify(self, secret: str) -> TokenInfo | None:
        key = hash_token(secret)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        info = await Tokens(self.service.app).verify(secret)
        if len(self._cache) > 10_000:
            self._cache.clear()  # a flood of made-up tokens must not grow memory forever
        self._cache[key] = (info, now + CACHE_S)
        return info

    def forget(self) -> None:
        """Drop remembered tokens (after a revoke in this process)."""
        self._cache.clear()

    def meter(self, token: TokenInfo) -> None:
        """Take one request from the token's bucket, or answer 429 with Retry-After."""
        s = self.service.app.settings
        rate = s.api_rate_limit_per_s
        if rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.setdefault(token.id, _Bucket(float(s.api_rate_burst), now))
        bucket.tokens = min(float(s.api_rate_burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / rate)
            raise ApiError(
                429,
                f"token {token.name!r} is over its rate limit of {rate:g} requests/s "
                f"(burst {s.api_rate_burst}); retry after {wait} s or raise "
                "api_rate_limit_per_s",
                headers={"Retry-After": str(max(1, wait))},
            )
        bucket.tokens -= 1


def require(scope: str) -> Any:
    """A route dependency: a valid token that allows `scope` ('any': any valid token), or
    401/403; 503 at once while the database is down."""

    async def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> TokenInfo:
        service: Service = request.app.state.service
        service.gate.check()
        if not service.app.settings.api_auth:
            request.state.token = ANONYMOUS
            return ANONYMOUS
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(401, NO_TOKEN, headers={"WWW-Authenticate": "Bearer"})
        token = await service.auth.identify(credentials.credentials)
        if token is None:
            raise ApiError(
                401,
                "the token is not valid (unknown or revoked); `embedq token list` shows the "
                "live ones",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if scope != "any" and not token.allows(scope):
            raise ApiError(
                403,
                f"token {token.name!r} has scopes {', '.join(token.scopes)}; this route needs "
                f"'{scope}'" + (" (or 'admin')" if scope != "admin" else ""),
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope" scope="{scope}"'},
            )
        service.auth.meter(token)
        request.state.token = token
        return token

    return Depends(check)
