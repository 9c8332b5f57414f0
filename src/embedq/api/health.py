"""Health of the service: the database gate that makes requests fail fast, and the open
`/health/live` and `/health/ready` routes.

While the database is down every request that needs it answers 503 at once (nothing is
accepted that cannot be stored); the gate probes in the background and opens again by itself
when the database returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from embedq import db, migrations, status
from embedq.errors import DatabaseUnavailable, EmbedqError

if TYPE_CHECKING:
    from embedq.api.app import Service
    from embedq.app import App

log = logging.getLogger("embedq.api")
router = APIRouter(tags=["health"])

PROBE_EVERY_S = 2.0  # while the database is up
RETRY_EVERY_S = 0.25  # while it is down
PROBE_TIMEOUT_S = 1.0


class DatabaseGate:
    """Knows whether the database answers; `check()` raises DatabaseUnavailable when not."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.up = True
        self.reason = ""
        self.since = time.monotonic()
        self._wake = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def check(self) -> None:
        if not self.up:
            down_for = time.monotonic() - self.since
            raise DatabaseUnavailable(
                f"the database is unreachable (for {down_for:.0f} s: {self.reason}); nothing "
                "was read or written. Retry shortly: the service reconnects by itself."
            )

    def suspect(self) -> None:
        """A request saw the database fail: probe now (a busy pool is not an outage, so the
        gate closes only when the probe fails too)."""
        self._wake.set()

    def down(self, reason: str) -> None:
        if self.up:
            self.up, self.reason, self.since = False, reason, time.monotonic()
            log.warning("database unreachable (%s): answering 503 until it is back", reason)

    async def probe(self) -> bool:
        """One `SELECT 1` on a connection of the gate's own, within PROBE_TIMEOUT_S."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        db.database_url(self.app.settings),
                        autocommit=True,
                        **{**db.connection_kwargs(self.app.settings), "connect_timeout": 1},
                    )
                await _select_1(self._conn)
            return True
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self._drop_conn()
            if self.up:
                self.down(_reason(exc))
            return False

    async def run(self) -> None:
        """Probe forever: slowly while up, quickly while down."""
        while True:
            self._wake.clear()
            ok = await self.probe()
            if ok and not self.up:
                log.warning("database reachable again after %.1f s", time.monotonic() - self.since)
                self.up, self.reason = True, ""
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_EVERY_S if not self.up else PROBE_EVERY_S):
                    await self._wake.wait()

    async def _drop_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    async def close(self) -> None:
        await self._drop_conn()


async def _select_1(conn: psycopg.AsyncConnection[Any]) -> None:
    """`SELECT 1` that stops when it is cancelled. psycopg answers a cancelled query by asking
    the server to stop it and waiting up to 10 s more, so a hung server would hold the gate
    open that long; closing the connection first makes the cancellation immediate."""
    query = asyncio.ensure_future(conn.execute("SELECT 1"))
    try:
        await asyncio.shield(query)
    except asyncio.CancelledError:
        await conn.close()
        query.cancel()
        await asyncio.wait({query}, timeout=1)
        if query.done() and not query.cancelled():
            query.exception()  # retrieved: it lost the race with the time-out
        raise


def _reason(exc: BaseException) -> str:
    """The driver's own words, short: the 503 message adds what to do."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


@router.get(
    "/health/live",
    summary="Liveness: the process is up (no database needed)",
    responses={200: {"description": "The process answers."}},
)
async def live() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    summary="Readiness: database reachable, schema current, workers heartbeating, circuits",
    responses={
        200: {"description": "Ready (status ok or degraded)."},
        503: {"description": "Not ready: a check that must pass failed."},
    },
)
async def ready(request: Request) -> JSONResponse:
    """`status` is `ok`, `degraded` (serving, but something needs a look: an open provider
    circuit, stuck jobs) or `fail` (503: do not route traffic here)."""
    report = await readiness(_service(request))
    return JSONResponse(report, status_code=200 if report["status"] != "fail" else 503)


async def readiness(service: Service) -> dict[str, Any]:
    app = service.app
    checks: list[dict[str, Any]] = []

    def add(check: str, ok: bool, detail: str, critical: bool = True) -> None:
        checks.append({"check": check, "ok": ok, "critical": critical, "detail": detail})

    if not service.gate.up or not await service.gate.probe():
        add("database", False, f"unreachable: {service.gate.reason}")
    else:
        try:
            pool = app.store.pool
            assert pool is not None
            with db.translated():  # a pooled connection: a probe every few seconds forks none
                async with pool.connection() as conn:
                    await migrations.check_current(conn, app.settings.db_schema)
            overview = await status.overview(app)
        except EmbedqError as exc:
            add("database", False, str(exc))
        else:
            add("database", True, "reachable, schema current")
            alive, due = int(overview["workers_alive"]), int(overview["due"])
            add(
                "workers",
                alive > 0 or due == 0,
                f"{alive} heartbeating"
                + ("" if alive or not due else f"; {due} jobs due and no worker to run them"),
            )
            stuck = int(overview["stuck"])
            add("stuck_jobs", stuck == 0, f"{stuck} running jobs past their lease", False)
    circuits = app.endpoints.circuits()
    opened = sorted(e for e, s in circuits.items() if s != "closed")
    add(
        "provider_circuits",
        not opened,
        f"open: {', '.join(opened)}" if opened else f"{len(circuits)} endpoints, all closed",
        critical=False,
    )
    failed = [c for c in checks if not c["ok"]]
    state = "fail" if any(c["critical"] for c in failed) else ("degraded" if failed else "ok")
    return {"status": state, "checks": checks, "circuits": circuits}
