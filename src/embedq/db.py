"""Connections to PostgreSQL: URL resolution, connection options, pools, and error mapping.

Driver errors become embedq's own here, at the boundary, so nothing above imports psycopg's
error classes:

    async with connect(settings) as conn:  # raises DatabaseUnavailable, DatabaseAuthFailed...
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from embedq import embedded
from embedq.errors import (
    DatabaseAuthFailed,
    DatabaseConflict,
    DatabaseError,
    DatabaseUnavailable,
    EmbedqError,
    InvalidInput,
    SchemaError,
)
from embedq.settings import Settings

_url_cache: dict[tuple[str | None, str], str] = {}


def database_url(settings: Settings) -> str:
    """The URL to connect to: the configured one, or the embedded server's (started on demand)."""
    configured = settings.database_url.get_secret_value() if settings.database_url else None
    key = (configured, str(settings.data_dir))
    if key not in _url_cache:
        _url_cache[key] = configured or embedded.start(settings.data_dir)
    return _url_cache[key]


def describe_target(url: str) -> str:
    """Where a URL points, without its password: 'postgres@db.internal:5432/app'."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or re.sub(r".*host=([^&]+).*", r"\1", parts.query) or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{user}{host}{port}{parts.path or ''}"
    except ValueError:
        return "the configured database"


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Options for every connection: fail fast on dead peers, bound every statement."""
    return {
        "connect_timeout": max(1, round(settings.connect_timeout_s)),
        # TCP keepalives and user timeout notice a half-open connection within seconds.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
        # A client cut off in the middle of a transaction leaves it open on the server,
        # holding its row locks (jobs, documents) until the server notices: end it.
        "options": f"-c statement_timeout={int(settings.statement_timeout_s * 1000)} "
        "-c idle_in_transaction_session_timeout=10000",
        "application_name": "embedq",
    }


def map_error(exc: BaseException, url: str | None = None) -> EmbedqError:
    """Turn a driver error into embedq's own, with a message that names the fix."""
    where = describe_target(url) if url else "the database"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, EmbedqError):
        return exc
    if isinstance(exc, pgerrors.InvalidPassword | pgerrors.InvalidAuthorizationSpecification) or (
        "password authentication failed" in text or "no password supplied" in text
    ):
        return DatabaseAuthFailed(
            f"PostgreSQL at {where} rejected the credentials ({text}). "
            "Fix the user and password in EMBEDQ_DATABASE_URL."
        )
    if isinstance(exc, pgerrors.UndefinedTable | pgerrors.InvalidSchemaName):
        return SchemaError(
            f"embedq's tables are missing at {where} ({text}). Run `embedq db upgrade` "
            "(workers do it at start) and check EMBEDQ_SCHEMA."
        )
    if isinstance(exc, pgerrors.InvalidCatalogName) or (
        "does not exist" in text and "database" in text
    ):
        return DatabaseError(
            f"{text} at {where}. Create it (createdb) or fix the database name in "
            "EMBEDQ_DATABASE_URL."
        )
    if isinstance(exc, psycopg.DataError):
        # Class 22 (and psycopg's own NUL check): the value is at fault, not the database.
        return InvalidInput(
            f"a value was refused by PostgreSQL ({text}); text cannot contain NUL (\\u0000) "
            "characters and numbers must fit their columns"
        )
    # Class 40 (deadlock, serialization failure): psycopg makes these OperationalErrors, so
    # the SQLSTATE decides, before the "unreachable" branch below.
    if isinstance(exc, pgerrors.TransactionRollback) or str(
        getattr(exc, "sqlstate", None) or ""
    ).startswith("40"):
        return DatabaseConflict(
            f"a concurrent transaction conflicted at {where} ({text}); nothing was written. "
            "Retry the operation."
        )
    if isinstance(exc, psycopg.OperationalError | PoolTimeout | OSError | TimeoutError):
        return DatabaseUnavailable(
            f"cannot reach PostgreSQL at {where} ({text}). Check that the server is running "
            "and EMBEDQ_DATABASE_URL is right; embedq retries on its own once it is back."
        )
    if isinstance(exc, psycopg.Error):
        return DatabaseError(f"database error at {where}: {text}")
    return DatabaseError(f"{type(exc).__name__}: {text}")


@contextlib.contextmanager
def translated(url: str | None = None) -> Iterator[None]:
    """Re-raise driver errors inside the block as embedq errors."""
    try:
        yield
    except EmbedqError:
        raise
    except (psycopg.Error, PoolTimeout, OSError, TimeoutError) as exc:
        if _being_cancelled():
            # psycopg turns a cancelled coroutine into QueryCanceled; hand the cancellation
            # back, or a loop that retries database errors would swallow its own shutdown.
            raise asyncio.CancelledError from exc
        raise map_error(exc, url) from exc


def _being_cancelled() -> bool:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop: synchronous code
        return False
    return task is not None and task.cancelling() > 0


@contextlib.asynccontextmanager
async def connect(
    settings: Settings, *, autocommit: bool = True
) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    """One connection, outside any pool (CLI commands, the LISTEN connection)."""
    url = database_url(settings)
    with translated(url):
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=autocommit, row_factory=dict_row, **connection_kwargs(settings)
        )
    try:
        with translated(url):
            yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


def make_pool(
    settings: Settings, *, max_size: int = 10, name: str = "embedq", timeout: float | None = None
) -> AsyncConnectionPool:
    """A connection pool (not yet opened) that reconnects on its own after an outage."""
    url = database_url(settings)
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "row_factory": dict_row, **connection_kwargs(settings)},
        open=False,
        name=name,
        timeout=timeout or settings.connect_timeout_s,
        reconnect_timeout=0,  # never give up: an outage ends, the pool reconnects
        check=AsyncConnectionPool.check_connection,
        configure=register_vector,
    )


async def register_vector(conn: psycopg.AsyncConnection[Any]) -> None:
    """Teach a connection pgvector's types (vector, halfvec, sparsevec) when the database has
    the extension; before the first migration it may not, and that is fine."""
    from pgvector.psycopg import register_vector_async

    try:
        await register_vector_async(conn)
    except psycopg.ProgrammingError:
        pass
