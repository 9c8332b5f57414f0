"""The App that the chaos tests (tests/test_chaos.py) run in real worker processes:

    python -m embedq worker --app chaos_app:app

Its tasks record each execution in a side table, `chaos_runs`, of the job's own database
(EMBEDQ_DATABASE_URL), so a test can prove from rows alone which process ran a job, on which
attempt, when, and whether that run got to its end. The test creates the table first
(`SIDE_TABLE_DDL`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psycopg

import embedq
from embedq.tasks import JobContext

app = embedq.App()

SIDE_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS chaos_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      bigint NOT NULL,
    attempt     integer NOT NULL,
    pid         integer NOT NULL,
    worker_id   bigint NOT NULL,
    lock_key    text,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
)
"""


def _url() -> str:
    return os.environ["EMBEDQ_DATABASE_URL"]


@app.task(name="chaos.record", pass_context=True, max_attempts=5)
async def record(
    ctx: JobContext, hold_s: float = 0.0, first_hold_s: float | None = None, **_: Any
) -> int:
    """Insert a 'started' row, hold for `hold_s` seconds (`first_hold_s` on the first attempt,
    when given), then stamp the row finished. Timestamps are the database's clock, so runs in
    different processes compare on one clock."""
    job = ctx.job
    hold = first_hold_s if first_hold_s is not None and job.attempts == 1 else hold_s
    async with await psycopg.AsyncConnection.connect(_url(), autocommit=True) as conn:
        cur = await conn.execute(
            "INSERT INTO chaos_runs (job_id, attempt, pid, worker_id, lock_key) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (job.id, job.attempts, os.getpid(), ctx.worker_id, job.lock_key),
        )
        row = await cur.fetchone()
        assert row is not None
        if hold > 0:
            await asyncio.sleep(hold)
        await conn.execute(
            "UPDATE chaos_runs SET finished_at = clock_timestamp() WHERE id = %s", (row[0],)
        )
    return os.getpid()


@app.task(name="chaos.record_sync", pass_context=True, max_attempts=5)
def record_sync(
    ctx: JobContext, hold_s: float = 0.0, first_hold_s: float | None = None, **_: Any
) -> int:
    """`chaos.record` as a plain function: it runs in the worker's thread pool."""
    job = ctx.job
    hold = first_hold_s if first_hold_s is not None and job.attempts == 1 else hold_s
    with psycopg.connect(_url(), autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO chaos_runs (job_id, attempt, pid, worker_id, lock_key) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (job.id, job.attempts, os.getpid(), ctx.worker_id, job.lock_key),
        ).fetchone()
        assert row is not None
        if hold > 0:
            time.sleep(hold)
        conn.execute(
            "UPDATE chaos_runs SET finished_at = clock_timestamp() WHERE id = %s", (row[0],)
        )
    return os.getpid()


@app.task(name="chaos.nothing")
async def nothing(**_: Any) -> None:
    """Records nothing: throughput runs count the queue's own rows instead."""
    return None
