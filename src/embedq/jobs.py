"""Jobs: the values (`JobSpec` to enqueue, `Job` as claimed) and the store that runs the
queue's SQL (`JobStore`), the one place where the queue touches the database.

    store = JobStore(pool, settings)
    [ticket] = await store.enqueue([JobSpec("send_receipt", {"id": 7}, lock_key="biz:42")])
    jobs = await store.claim(worker_id, limit=100, queues=["high", "default"])
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from embedq import queries
from embedq.db import translated
from embedq.errors import InvalidJob, JobNotFound, UnknownQueue
from embedq.migrations import LOCK_NAMESPACE
from embedq.settings import Settings

COPY_THRESHOLD = 500  # below this, one INSERT round trip beats reserve + COPY
LOCK_KEY_NAMESPACE = LOCK_NAMESPACE + 1  # apart from the duty locks
MAX_PRIORITY = 1000
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")

AnyConn = psycopg.AsyncConnection[Any]
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _valid_name(pattern: re.Pattern[str], name: object) -> bool:
    return isinstance(name, str) and _matches(pattern, name)


@functools.lru_cache(maxsize=4096)
def _matches(pattern: re.Pattern[str], name: str) -> bool:
    return pattern.match(name) is not None


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


def dumps_args(task: str, args: Any) -> str:
    """Job arguments as JSON, or InvalidJob naming the value that cannot be stored."""
    if not isinstance(args, dict):
        raise InvalidJob(f"arguments of task {task!r} must be a dict of keyword arguments")
    try:
        return _ENCODER.encode(args)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(
            f"arguments of task {task!r} cannot be stored as JSON ({exc}). Pass strings, "
            "numbers, booleans, None, lists and dicts; convert dates to ISO strings and "
            "objects to their ids."
        ) from None


@dataclass(frozen=True)
class JobSpec:
    """A job to enqueue. Validated on creation, so bad input never reaches the database."""

    task: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 5
    lock_key: str | None = None
    dedup_key: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not _valid_name(_TASK_NAME, self.task):
            raise InvalidJob(
                f"task name {self.task!r} is invalid: use letters, digits, '_', '.', ':', '-'"
            )
        if not _valid_name(_QUEUE_NAME, self.queue):
            raise InvalidJob(
                f"queue name {self.queue!r} is invalid: 1-100 letters, digits, '_', '.', ':', '-'"
            )
        if (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or not (0 <= self.priority <= MAX_PRIORITY)
        ):
            raise InvalidJob(
                f"priority {self.priority!r} of task {self.task!r} is out of range: use an "
                f"integer from 0 (lowest, the default) to {MAX_PRIORITY} (highest)"
            )
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or (self.max_attempts < 1)
        ):
            raise InvalidJob(f"max_attempts of task {self.task!r} must be an integer >= 1")
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, int | float)
            and math.isfinite(self.timeout_s)
            and self.timeout_s > 0
        ):
            raise InvalidJob(f"timeout_s of task {self.task!r} must be a positive number")
        if self.run_at is not None and (
            not isinstance(self.run_at, datetime) or self.run_at.tzinfo is None
        ):
            raise InvalidJob(
                f"run_at of task {self.task!r} must be a timezone-aware datetime "
                "(datetime.now(timezone.utc) + timedelta(...))"
            )
        for name in ("lock_key", "dedup_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 500):
                raise InvalidJob(f"{name} of task {self.task!r} must be a non-empty string")
        object.__setattr__(self, "_args_json", dumps_args(self.task, self.args))

    @property
    def args_json(self) -> str:
        return str(self.__dict__["_args_json"])


@dataclass(frozen=True)
class Enqueued:
    """What an enqueue got: the job id, and whether it coalesced into a pending duplicate."""

    id: int
    coalesced: bool = False


@dataclass(frozen=True)
class Job:
    """A job as a worker holds it."""

    id: int
    task: str
    args: dict[str, Any]
    queue: str
    priority: int
    attempts: int
    max_attempts: int
    lock_key: str | None
    dedup_key: str | None
    timeout_s: float | None
    enqueued_at: datetime
    run_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


def enqueue_params(specs: Sequence[JobSpec], log_all: bool) -> dict[str, Any]:
    """Column arrays for the `enqueue` query: one round trip for any number of jobs."""
    return {
        "task": [s.task for s in specs],
        "args": [s.args_json for s in specs],
        "queue": [s.queue for s in specs],
        "priority": [s.priority for s in specs],
        "run_at": [s.run_at for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
        "lock_key": [s.lock_key for s in specs],
        "dedup_key": [s.dedup_key for s in specs],
        "timeout_s": [s.timeout_s for s in specs],
        "log_all": log_all,
    }


def coalesce_batch(specs: Sequence[JobSpec]) -> tuple[list[JobSpec], list[int]]:
    """Collapse jobs of one batch that share a dedup key (the last one wins), as the database
    would if they came one by one. Returns the specs to send and, for each input, its index
    in them."""
    unique: list[JobSpec] = []
    where: dict[str, int] = {}
    index: list[int] = []
    for spec in specs:
        if spec.dedup_key is None:
            index.append(len(unique))
            unique.append(spec)
        elif spec.dedup_key in where:
            unique[where[spec.dedup_key]] = spec
            index.append(where[spec.dedup_key])
        else:
            where[spec.dedup_key] = len(unique)
            index.append(len(unique))
            unique.append(spec)
    return unique, index


def _results(specs: Sequence[JobSpec], rows: list[dict[str, Any]]) -> list[Enqueued]:
    unique, index = coalesce_batch(specs)
    if len(rows) != len(unique):
        raise RuntimeError(f"enqueue returned {len(rows)} rows for {len(unique)} jobs")
    seen: set[int] = set()
    out = []
    for i in index:
        row = rows[i]
        out.append(Enqueued(int(row["id"]), bool(row["coalesced"]) or i in seen))
        seen.add(i)
    return out


class JobStore:
    """The queue's operations, each one SQL round trip, over a pool (or one connection)."""

    def __init__(self, pool: AsyncConnectionPool | None, settings: Settings) -> None:
        """`pool` may be None for a store used only with callers' own connections."""
        self.pool = pool
        self.settings = settings
        self.schema = settings.db_schema
        self.q = self.queries_for(settings)
        self.log_all = settings.job_events == "all"

    @staticmethod
    def queries_for(settings: Settings) -> dict[str, str]:
        return queries.load("queue.sql", settings.db_schema)

    async def fetch(
        self, name: str, params: dict[str, Any] | None = None, conn: AnyConn | None = None
    ) -> list[dict[str, Any]]:
        with translated():
            if conn is not None:
                return await self._fetch_on(conn, name, params)
            async with self._pool().connection() as c:
                return await self._fetch_on(c, name, params)

    async def fetch_sql(
        self, query: Any, params: dict[str, Any] | None = None, conn: AnyConn | None = None
    ) -> list[dict[str, Any]]:
        """Like `fetch`, for a query of another area's SQL file (documents, search)."""
        with translated():
            if conn is not None:
                return await _run(conn, query, params)
            async with self._pool().connection() as c:
                return await _run(c, query, params)

    def _pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            raise RuntimeError("this JobStore has no pool: pass a connection, or open the App")
        return self.pool

    async def _fetch_on(
        self, conn: AnyConn, name: str, params: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(self.q[name], params or {})
        return await cur.fetchall() if cur.description else []

    # --- producing ---------------------------------------------------------------------

    async def enqueue(
        self, specs: Sequence[JobSpec], conn: AnyConn | None = None
    ) -> list[Enqueued]:
        """Insert jobs (in `conn`'s transaction when given). Large batches without dedup keys
        take the COPY path, about twice as fast as an INSERT per job; others one INSERT."""
        if not specs:
            return []
        if len(specs) >= COPY_THRESHOLD and all(s.dedup_key is None for s in specs):
            with translated():
                if conn is not None:
                    return await self._copy(specs, conn)
                async with self._pool().connection() as c, c.transaction():
                    return await self._copy(specs, c)
        unique, _ = coalesce_batch(specs)
        rows = await self.fetch("enqueue", enqueue_params(unique, self.log_all), conn)
        return _results(specs, rows)

    async def _copy(self, specs: Sequence[JobSpec], conn: AnyConn) -> list[Enqueued]:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(self.q["reserve_ids"], {"n": len(specs)})
        row = await cur.fetchone()
        ids: list[int] = row[0] if row else []
        async with cur.copy(self.q["copy_jobs"]) as copy:
            for job_id, s in zip(ids, specs, strict=True):
                await copy.write_row(
                    (
                        job_id,
                        s.task,
                        s.args_json,
                        s.queue,
                        s.priority,
                        s.run_at or "now",
                        s.max_attempts,
                        s.lock_key,
                        s.timeout_s,
                    )
                )
        if self.log_all:
            await cur.execute(self.q["log_enqueued"], {"ids": ids})
        return [Enqueued(i) for i in ids]

    # --- consuming ---------------------------------------------------------------------

    async def claim(
        self,
        worker_id: int,
        limit: int,
        queues: Sequence[str] | None = None,
        *,
        skip: Sequence[str] = (),
    ) -> list[Job]:
        """Claim up to `limit` due jobs from `queues` (all when None), none from `skip`."""
        params = {
            "worker": worker_id,
            "limit": limit,
            "lease_s": self.settings.lease_s,
            "lock_ns": LOCK_KEY_NAMESPACE,
            "log_all": self.log_all,
            "queues": list(queues) if queues else None,
            "skip": list(skip),
        }
        name = "claim_in" if queues else "claim_not_in" if skip else "claim"
        for _ in range(5):
            try:
                rows = await self.fetch(name, params)
            except Exception as exc:
                # Two claimers raced for one lock key between snapshot and commit: the unique
                # index refused the second; nothing changed, claim again.
                if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    continue
                raise
            jobs = [Job.from_row(r) for r in rows]
            jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id))  # start the most urgent first
            return jobs
        return []

    async def complete(
        self,
        worker_id: int,
        ids: Sequence[int],
        results: Sequence[str | None],
        outcomes: Sequence[str | None],
        conn: AnyConn | None = None,
    ) -> list[int]:
        """Finish jobs this worker holds (others are ignored); in `conn`'s transaction when
        given, so a task can finish its job atomically with its own writes."""
        rows = await self.fetch(
            "complete",
            {
                "worker": worker_id,
                "ids": list(ids),
                "results": list(results),
                "outcomes": list(outcomes),
                "archive": self.settings.finished_jobs == "archive",
                "log_all": self.log_all,
            },
            conn,
        )
        return [int(r["id"]) for r in rows]

    async def retry_later(
        self, worker_id: int, job_id: int, delay_s: float, error: str, kind: str
    ) -> bool:
        rows = await self.fetch(
            "retry_later",
            {"worker": worker_id, "id": job_id, "delay_s": delay_s, "error": error, "kind": kind},
        )
        return bool(rows)

    async def bury(self, worker_id: int, job_id: int, error: str, kind: str) -> bool:
        rows = await self.fetch(
            "bury", {"worker": worker_id, "id": job_id, "error": error, "kind": kind}
        )
        return bool(rows)

    async def release(self, worker_id: int, ids: Sequence[int]) -> list[int]:
        rows = await self.fetch("release", {"worker": worker_id, "ids": list(ids)})
        return [int(r["id"]) for r in rows]

    async def release_later(self, worker_id: int, ids: Sequence[int], delay_s: float) -> list[int]:
        rows = await self.fetch(
            "release_later", {"worker": worker_id, "ids": list(ids), "delay_s": delay_s}
        )
        return [int(r["id"]) for r in rows]

    async def heartbeat(self, worker_id: int, ids: Sequence[int], state: str) -> set[int]:
        rows = await self.fetch(
            "heartbeat",
            {
                "worker": worker_id,
                "ids": list(ids),
                "lease_s": self.settings.lease_s,
                "state": state,
            },
        )
        return {int(r["id"]) for r in rows}

    async def reclaim_expired(self, ids: Sequence[int] | None = None) -> dict[str, int]:
        [row] = await self.fetch("reclaim_expired", {"ids": list(ids) if ids else None})
        return {"requeued": int(row["requeued"]), "dead": int(row["dead"])}

    # --- administration ------------------------------------------------------------------

    async def cancel(
        self, ids: Sequence[int], reason: str = "cancelled by an administrator"
    ) -> list[dict[str, Any]]:
        return await self.fetch("cancel", {"ids": list(ids), "reason": reason})

    async def clear(self, queue: str | None) -> int:
        if queue is not None:
            await self.require_queue(queue)
        [row] = await self.fetch("clear_pending", {"queue": queue})
        return int(row["cleared"])

    async def retry(
        self,
        ids: Sequence[int] | None = None,
        *,
        task: str | None = None,
        queue: str | None = None,
        error: str | None = None,
        state: str | None = None,
        limit: int = 100_000,
    ) -> list[int]:
        """Dead (or cancelled) jobs back to pending with fresh attempts."""
        rows = await self.fetch(
            "retry_archived",
            {
                "ids": list(ids) if ids else None,
                "task": task,
                "queue": queue,
                "error": error,
                "state": state,
                "limit": limit,
            },
        )
        return [int(r["id"]) for r in rows]

    async def queues(self) -> list[dict[str, Any]]:
        return await self.fetch("list_queues")

    async def require_queue(self, name: str) -> None:
        known = [q["name"] for q in await self.queues()]
        if name not in known:
            raise UnknownQueue(
                f"queue {name!r} is not known; known queues: {', '.join(known) or 'none yet'}. "
                "A queue becomes known when a job is enqueued to it or a worker serves it."
            )

    async def set_paused(self, name: str, paused: bool) -> None:
        rows = await self.fetch("pause", {"name": name, "paused": paused})
        if not rows:
            await self.require_queue(name)
        if not paused:
            await self.fetch("notify_queue", {"queue": name})

    async def register_queues(self, names: Sequence[str]) -> None:
        await self.fetch("register_queues", {"names": list(names)})

    async def get(self, job_id: int) -> dict[str, Any]:
        rows = await self.fetch("get_job", {"id": job_id})
        if not rows:
            raise JobNotFound(f"no job with id {job_id}")
        job = rows[0]
        job["events"] = _timeline(job, await self.fetch("job_events", {"id": job_id}))
        return job

    async def cleanup(self, archive_days: float | None = None) -> dict[str, int]:
        s = self.settings
        days = s.archive_retention_days if archive_days is None else archive_days
        [row] = await self.fetch(
            "cleanup",
            {
                "archive_s": days * 86400,
                "dead_s": s.dead_retention_days * 86400,
                "events_s": s.event_retention_days * 86400,
            },
        )
        return {k: int(v) for k, v in row.items()}


def _timeline(job: dict[str, Any], stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's events: the stored ones, plus the happy-path transitions read off its own
    timestamps where the event log (job_events=failures) did not store them."""
    kinds = {e["event"] for e in stored}
    derived = []
    if "enqueued" not in kinds:
        derived.append(("enqueued", job["enqueued_at"], 0))
    if "started" not in kinds and job.get("started_at"):
        derived.append(("started", job["started_at"], job["attempts"]))
    if "succeeded" not in kinds and job["state"] == "succeeded":
        derived.append(("succeeded", job["finished_at"], job["attempts"]))
    events = stored + [
        {
            "job_id": job["id"],
            "at": at,
            "event": kind,
            "attempt": attempt,
            "worker_id": None,
            "detail": "from the job's timestamps",
        }
        for kind, at, attempt in derived
    ]
    return sorted(events, key=lambda e: e["at"])


def utcnow() -> datetime:
    return datetime.now(UTC)


def in_seconds(seconds: float) -> datetime:
    """A run_at that many seconds from now."""
    return utcnow() + timedelta(seconds=seconds)


async def _run(conn: AnyConn, query: Any, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query, params or {})
    return await cur.fetchall() if cur.description else []
