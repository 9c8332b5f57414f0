"""Bearer tokens of the HTTP service: created with scopes, shown once, stored as a hash.

    tokens = Tokens(app)
    info, secret = await tokens.create("ci-indexer", ["write"])  # secret: 'eq_…', shown once
    await tokens.verify(secret)                                   # TokenInfo, or None
    await tokens.revoke("ci-indexer")

A token is `eq_` and 32 random bytes (url-safe base64). Only its SHA-256 is kept: with that
much entropy a slow password hash buys nothing, and the hash doubles as the lookup key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from embedq import queries
from embedq.errors import ConfigurationError, TokenError

if TYPE_CHECKING:
    from embedq.app import App

SCOPES = ("read", "write", "admin")
PREFIX = "eq_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_TOKEN = re.compile(r"^eq_[A-Za-z0-9_-]{32,200}$")


@dataclass(frozen=True)
class TokenInfo:
    """A token as the service knows it: never the secret itself."""

    id: int
    name: str
    scopes: tuple[str, ...]
    prefix: str = ""
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def allows(self, scope: str) -> bool:
        """`admin` may do everything; `read` and `write` only what they name."""
        return scope in self.scopes or "admin" in self.scopes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": list(self.scopes),
            "created_at": _iso(self.created_at),
            "last_used_at": _iso(self.last_used_at),
            "revoked_at": _iso(self.revoked_at),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TokenInfo:
        return cls(
            id=int(row["id"]),
            name=row["name"],
            scopes=tuple(row["scopes"]),
            prefix=row.get("prefix") or "",
            created_at=row.get("created_at"),
            last_used_at=row.get("last_used_at"),
            revoked_at=row.get("revoked_at"),
        )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def parse_scopes(scopes: str | Iterable[str]) -> list[str]:
    """'read,write' or ['read', 'write'] → a checked, ordered list of scopes."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    wanted = {s.strip().lower() for s in items if s.strip()}
    unknown = sorted(wanted - set(SCOPES))
    if unknown or not wanted:
        problem = f"unknown scope(s) {', '.join(map(repr, unknown))}" if unknown else "no scope"
        raise TokenError(f"{problem}; choose from {', '.join(SCOPES)} (e.g. --scopes read,write)")
    return [s for s in SCOPES if s in wanted]


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def looks_like_token(token: str) -> bool:
    return bool(_TOKEN.match(token))


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


class Tokens:
    """The app's API tokens (in the `api_tokens` table)."""

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def q(self) -> dict[str, str]:
        return queries.load("tokens.sql", self.app.settings.db_schema)

    async def create(
        self, name: str, scopes: str | Iterable[str], *, secret: str | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token; returns it with its secret, which is never stored or shown again."""
        if not _NAME.match(name):
            raise TokenError(
                f"token name {name!r} must start with a letter or digit and use letters, "
                "digits, '_', '.', '@', '-' (at most 63 characters)"
            )
        checked = parse_scopes(scopes)
        secret = secret or new_secret()
        if not looks_like_token(secret):
            raise ConfigurationError(
                "a token must be 'eq_' followed by at least 32 url-safe characters; let embedq "
                "generate one with `embedq token create`"
            )
        live = {t.name for t in await self.list()}
        if name in live:
            raise TokenError(
                f"a live token named {name!r} exists; revoke it first (`embedq token revoke "
                f"{name}`) or pick another name"
            )
        [row] = await self.app.store.fetch_sql(
            self.q["create"],
            {"name": name, "prefix": secret[:11], "hash": hash_token(secret), "scopes": checked},
        )
        return TokenInfo.from_row(row), secret

    async def ensure(self, name: str, secret: str, scopes: Iterable[str]) -> bool:
        """Make sure a token of this exact value exists (EMBEDQ_ADMIN_TOKEN); True if created."""
        if not looks_like_token(secret):
            raise ConfigurationError(
                "EMBEDQ_ADMIN_TOKEN must be 'eq_' followed by at least 32 url-safe characters "
                "(letters, digits, '-', '_'); generate one with "
                "`python -c \"import secrets; print('eq_' + secrets.token_urlsafe(32))\"`"
            )
        rows = await self.app.store.fetch_sql(
            self.q["ensure"],
            {
                "name": name,
                "prefix": secret[:11],
                "hash": hash_token(secret),
                "scopes": parse_scopes(scopes),
            },
        )
        return bool(rows)

    async def verify(self, secret: str) -> TokenInfo | None:
        """The live token with this secret, or None."""
        if not looks_like_token(secret):
            return None
        rows = await self.app.store.fetch_sql(self.q["verify"], {"hash": hash_token(secret)})
        return TokenInfo.from_row(rows[0]) if rows else None

    async def list(self, *, include_revoked: bool = False) -> list[TokenInfo]:
        rows = await self.app.store.fetch_sql(self.q["list"], {"all": include_revoked})
        return [TokenInfo.from_row(r) for r in rows]

    async def revoke(self, name_or_id: str) -> TokenInfo:
        rows = await self.app.store.fetch_sql(self.q["revoke"], {"name": str(name_or_id)})
        if not rows:
            raise TokenError(f"no live token named {name_or_id!r}; `embedq token list` shows them")
        return TokenInfo(id=int(rows[0]["id"]), name=rows[0]["name"], scopes=())

    async def count_live(self) -> int:
        [row] = await self.app.store.fetch_sql(self.q["live_count"])
        return int(row["n"])
