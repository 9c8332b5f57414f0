"""The worker: claims jobs in batches, runs them with bounded concurrency, heartbeats its
leases, and shuts down gracefully.

    worker = Worker(app, queues=["high", "default", "low"], concurrency=20)
    await worker.run()          # until SIGTERM/SIGINT or worker.stop()

Its loops share one small connection pool: claim (woken at once by LISTEN/NOTIFY, polling only
as a fallback), complete (successes flushed in batches), heartbeat (renews leases, notices
jobs cancelled or reclaimed meanwhile), janitor (reclaims expired leases, schedules periodic
tasks, cleans history). A lost database is noticed within seconds, logged once per change,
and waited out with backoff; nothing is dropped: a job whose outcome cannot be recorded stays
leased and, if the outage outlasts the lease, is reclaimed and run again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from croniter import croniter
from psycopg import sql
from psycopg.rows import dict_row

from embedq import __version__, bm25, db, logs, metrics, queries, tracing
from embedq.app import App
from embedq.errors import DatabaseError, EmbedqError, TaskTimeout, is_permanent
from embedq.jobs import Job, JobSpec, JobStore
from embedq.migrations import LOCK_NAMESPACE
from embedq.tasks import BatchOutcome, JobContext, Task

log = logging.getLogger("embedq.worker")
CLEANUP_LOCK = 2
CLEANUP_EVERY_S = 3600.0


@dataclass
class _Done:
    job_id: int
    result: str | None
    outcome: str | None


class _Backoff:
    """Growing, jittered waits while the database is away."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self.n = first, cap, 0

    def next(self) -> float:
        self.n += 1
        step = min(self.cap, self.first * 2.0 ** (self.n - 1))
        return step / 2 + random.uniform(0, step / 2)

    def reset(self) -> None:
        self.n = 0


class Worker:
    """One worker process's engine (see the module docstring)."""

    def __init__(
        self,
        app: App,
        *,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        batch_size: int | None = None,
        name: str | None = None,
        migrate: bool | None = None,
        install_signals: bool = True,
        exit_when_idle: bool = False,
    ) -> None:
        self.app = app
        s = app.settings
        self.queues = queues if queues is not None else s.worker_queues
        self.concurrency = concurrency or s.worker_concurrency
        self.batch_size = batch_size or s.claim_batch_size
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.migrate = s.auto_migrate if migrate is None else migrate
        self.install_signals = install_signals
        self.exit_when_idle = exit_when_idle
        self.id = 0
        self.processed = 0
        self.failed = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        self._done: list[_Done] = []
        self._flushing: list[_Done] = []
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._done_added = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped_claiming = False
        self._force = False
        self._db_ok = True
        self._executor = ThreadPoolExecutor(
            max_workers=min(self.concurrency, 256), thread_name_prefix="embedq-task"
        )
        self._owns_app = False
        self._closing = False
        self._jobs: dict[int, Job] = {}
        self._batch_jobs: set[int] = set()  # held jobs that belong to a running batch
        self._batches: dict[str, int] = {}  # batch executions in flight per queue
        # Batch queues worth a claim: announced by NOTIFY, or full last time, or polled.
        self._batch_dirty: set[str] = set()
        # Plain-function tasks still running in threads after their jobs were released at
        # shutdown; Python cannot stop a thread, so the process must exit without waiting.
        self.abandoned_threads = 0

    # --- state ---------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        return self.app.store

    @property
    def held(self) -> list[int]:
        """Jobs this worker holds a lease on: running, or finished but not yet recorded."""
        return [
            *self._running,
            *(d.job_id for d in self._done),
            *(d.job_id for d in self._flushing),
        ]

    def _held_count(self) -> int:
        return len(self._running) + len(self._done) + len(self._flushing)

    def _db_lost(self, exc: BaseException, doing: str) -> None:
        if self._db_ok:
            log.warning("database unavailable while %s: %s; retrying with backoff", doing, exc)
        self._db_ok = False

    def _db_back(self) -> None:
        if not self._db_ok:
            log.info("database reachable again; worker %s resumes", self.id)
        self._db_ok = True

    def stop(self, force: bool = False) -> None:
        """Stop claiming; running jobs get the grace period (none when `force`)."""
        if self._stopping.is_set() and not force:
            force = True  # a second signal means now
        self._force = self._force or force
        self._stopping.set()
        self._wake.set()
        self._slot_free.set()

    # --- run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped; returns after a clean shutdown."""
        loop = asyncio.get_running_loop()
        if self.install_signals:
            # Before connecting: a SIGTERM during start-up stops the worker cleanly too.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        self._owns_app = self.app.pool is None
        await self.app.open(migrate=self.migrate, pool_size=4)
        s = self.app.settings
        # Constructor values came from settings before the stored ones were loaded.
        self.queues = self.queues if self.queues is not None else s.worker_queues
        if self.queues:
            await self.store.register_queues(self.queues)
        [row] = await self.store.fetch(
            "register_worker",
            {
                "name": self.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues,
                "concurrency": self.concurrency,
                "version": __version__,
            },
        )
        self.id = int(row["id"])
        logs.set_id("worker_id", self.id)  # inherited by the tasks started from here on
        log.info(
            "worker %s (%s) started: queues=%s concurrency=%d batch=%d",
            self.id,
            self.name,
            ",".join(self.queues or ["*"]),
            self.concurrency,
            self.batch_size,
        )
        self._helpers = helpers = [
            asyncio.create_task(self._listen(), name="listen"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._flush_loop(), name="complete"),
            asyncio.create_task(self._janitor(), name="janitor"),
        ]
        try:
            await self._claim_loop()
            await self._drain()
        finally:
            await self._stop_helpers(helpers)
            await self._shutdown()
            if self.install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _stop_helpers(self, helpers: list[asyncio.Task[None]]) -> None:
        """Cancel the helper loops, again if need be: a cancellation that lands inside a
        database call can come back as a database error, which a retrying loop would absorb."""
        self._closing = True
        pending = set(helpers)
        for _ in range(20):
            for h in pending:
                h.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if not pending:
                return
        log.warning("helper loops did not stop: %s", sorted(h.get_name() for h in pending))

    def _batch_queues(self) -> dict[str, Task]:
        """Queues of batch tasks this worker serves: claimed apart, many jobs per call."""
        out: dict[str, Task] = {}
        for t in self.app.tasks.values():
            if t.batch and (not self.queues or t.queue in self.queues):
                out.setdefault(t.queue, t)
        return out

    async def _claim_loop(self) -> None:
        backoff = _Backoff()
        s = self.app.settings
        batch_queues = self._batch_queues()
        self._batch_dirty.update(batch_queues)
        regular = [q for q in self.queues or [] if q not in batch_queues] or None
        if self.queues and regular is None:
            regular = []  # this worker serves batch queues only
        polled = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() - polled >= s.poll_interval_s:
                # The poll: delayed or released jobs fall due without a NOTIFY.
                self._batch_dirty.update(batch_queues)
                polled = time.monotonic()
            free = self.concurrency - self._held_count() + len(self._batch_jobs)
            batch_free = {
                q: t
                for q, t in batch_queues.items()
                if self._batches.get(q, 0) < (t.batch_concurrency or s.embed_concurrency)
            }
            if (free <= 0 or regular == []) and not batch_free:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            self._wake.clear()
            self._slot_free.clear()
            saturated = False
            try:
                for queue, task in batch_free.items():
                    if queue not in self._batch_dirty:
                        continue  # nothing announced there since it last came back short
                    size = task.batch_size or s.embed_batch_size
                    self._batch_dirty.discard(queue)
                    jobs = await self.store.claim(self.id, size, [queue])
                    self._start(jobs, batch_queue=queue)
                    if len(jobs) == size:
                        saturated = True
                        self._batch_dirty.add(queue)
                if free > 0 and regular != []:
                    want = min(free, self.batch_size)
                    jobs = await self.store.claim(self.id, want, regular, skip=list(batch_queues))
                    self._start(jobs)
                    saturated = saturated or len(jobs) == want
            except DatabaseError as exc:
                self._db_lost(exc, "claiming jobs")
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            self._db_back()
            if not saturated:
                if self.exit_when_idle and not self._held_count():
                    if await self._queue_empty():
                        log.info("queue drained; worker %s exits (--exit-when-idle)", self.id)
                        return
                # Regular slots all taken (we only claimed batches): a finishing job is also
                # a reason to claim again, or that capacity idles until the next poll.
                await self._idle(s.poll_interval_s, slots=free <= 0 and regular != [])

    async def _idle(self, timeout: float, *, slots: bool) -> None:
        """Wait for a NOTIFY (or a freed slot, with `slots`), at most `timeout` seconds."""
        waits = [asyncio.ensure_future(self._wake.wait())]
        if slots:
            waits.append(asyncio.ensure_future(self._slot_free.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _start(self, jobs: list[Job], batch_queue: str | None = None) -> None:
        """Start claimed jobs: one asyncio task per job, one per group of a batch task."""
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            stale = self._running.get(job.id)
            if stale is not None:
                # Our lease on it expired (a stall longer than the lease) and we claimed it
                # again: the old copy no longer owns the job, so it must stop.
                stale.cancel()
            self._jobs[job.id] = job
            task = self.app.tasks.get(job.task)
            if task is not None and task.batch:
                groups.setdefault(job.task, []).append(job)
            else:
                self._running[job.id] = asyncio.create_task(self._execute(job))
        for name, group in groups.items():
            queue = batch_queue or group[0].queue
            self._batches[queue] = self._batches.get(queue, 0) + 1
            runner = asyncio.create_task(self._execute_batch(self.app.tasks[name], group, queue))
            for job in group:
                self._running[job.id] = runner
                self._batch_jobs.add(job.id)

    async def _queue_empty(self) -> bool:
        [row] = await self.store.fetch("work_left", {"queues": self.queues})
        return int(row["n"]) == 0

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- one job -------------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        logs.set_id("job_id", job.id)  # this task runs this one job: its log lines say so
        started = time.perf_counter()
        outcome = "released"  # unless it gets further: a shutdown cancelled it
        with tracing.span(
            "embedq.job", job_id=job.id, task=job.task, queue=job.queue, attempt=job.attempts
        ) as span:
            try:
                outcome = await self._execute_inner(job, span)
            finally:
                span.set_attribute("embedq.outcome", outcome)
                # A task name is a label only when registered: producers can write any name.
                task = job.task if job.task in self.app.tasks else metrics.UNKNOWN_TASK
                metrics.observe_job(task, outcome, time.perf_counter() - started)
                if self._running.get(job.id) is asyncio.current_task():
                    del self._running[job.id]
                    del self._jobs[job.id]
                self._slot_free.set()
                if job.lock_key is not None or (self.exit_when_idle and not self._running):
                    self._wake.set()  # the next job with this lock key may now run

    async def _execute_inner(self, job: Job, span: tracing.Span) -> str:
        """Run one job and record its failure; its outcome (see metrics.JOB_OUTCOMES)."""
        task = self.app.tasks.get(job.task)
        if task is None:
            known = ", ".join(sorted(self.app.tasks)) or "none"
            return await self._record_failure(
                job,
                f"task {job.task!r} is not registered in this worker (known: {known}). Fix the "
                "task name, or start a worker with the app that defines it (--app), then "
                f"`embedq queue retry {job.id}`",
                "unknown_task",
                permanent=True,
            )
        bad = task.check_args(job.args)
        if bad is not None:
            return await self._record_failure(
                job,
                f"arguments do not fit task {job.task!r}: {bad}",
                "bad_arguments",
                permanent=True,
            )
        timeout = job.timeout_s or task.timeout_s or self.app.settings.job_timeout_s
        context = JobContext(job=job, app=self.app, worker_id=self.id)
        try:
            if timeout:
                try:
                    result = await asyncio.wait_for(task.run(context, self._executor), timeout)
                except TimeoutError:
                    raise TaskTimeout(
                        f"task {job.task!r} ran past its timeout of {timeout:g} s"
                    ) from None
            else:
                result = await task.run(context, self._executor)
        except asyncio.CancelledError:
            if self._stopping.is_set():
                raise  # shutdown: released, not failed
            log.info("job %s stopped: cancelled or reclaimed elsewhere", job.id)
            return "cancelled"
        except Exception as exc:
            tracing.failed(span, exc)
            permanent = is_permanent(exc)
            message = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EmbedqError):
                frames = traceback.format_exception(exc)
                message = "".join(frames[-6:])[-4000:].strip()
            return await self._record_failure(
                job, message, type(exc).__name__, permanent=permanent, exc=exc
            )
        self._done.append(_Done(job.id, _result_json(result), None))
        self._done_added.set()
        return "succeeded"

    async def _record_failure(
        self, job: Job, error: str, kind: str, *, permanent: bool, exc: BaseException | None = None
    ) -> str:
        """Retry the job later or dead-letter it; which of the two ("retried", "dead")."""
        task = self.app.tasks.get(job.task)
        delay = None  # dead-letter, unless a registered task's policy allows another attempt
        if not permanent and task is not None:
            delay = task.retry.next_delay(job.attempts, exc or RuntimeError(error))
        outcome = "dead" if delay is None else "retried"
        self.failed += 1
        backoff = _Backoff()
        while True:
            try:
                if delay is None:
                    await self.store.bury(self.id, job.id, error, kind)
                    log.warning(
                        "job %s (%s) dead after attempt %d/%d: %s",
                        job.id,
                        job.task,
                        job.attempts,
                        job.max_attempts,
                        error.splitlines()[-1],
                    )
                else:
                    await self.store.retry_later(self.id, job.id, delay, error, kind)
                    log.info(
                        "job %s (%s) failed attempt %d/%d, retry in %.1f s: %s",
                        job.id,
                        job.task,
                        job.attempts,
                        job.max_attempts,
                        delay,
                        error.splitlines()[-1],
                    )
                self._db_back()
                return outcome
            except DatabaseError as exc_db:
                self._db_lost(exc_db, "recording a failure")
                if self._force:
                    return outcome  # the lease will expire and the job be reclaimed
                await asyncio.sleep(backoff.next())

    # --- a batch of jobs ------------------------------------------------------------------

    async def _execute_batch(self, task: Task, jobs: list[Job], queue: str) -> None:
        started = time.perf_counter()
        outcomes: dict[int, str] = {}  # by job id; none: a shutdown released them all
        with tracing.span("embedq.job_batch", task=task.name, queue=queue, jobs=len(jobs)) as span:
            try:
                outcomes = await self._execute_batch_inner(task, jobs, span)
            finally:
                seconds = time.perf_counter() - started
                ends = [outcomes.get(job.id, "released") for job in jobs]
                for end in ends:
                    metrics.observe_job(task.name, end, seconds)
                for end, n in collections.Counter(ends).items():
                    span.set_attribute(f"embedq.{end}", n)  # embedq.succeeded=98...
                self._let_go([job.id for job in jobs])
                self._batches[queue] -= 1
                self._slot_free.set()
                self._wake.set()  # a batch slot is free: claim the next batch now

    def _let_go(self, job_ids: list[int]) -> None:
        """This batch execution is done with these jobs (their outcome is recorded, or will
        be by the flush): they leave `_running`, so that one retried at once and claimed again
        meanwhile does not look like a stale copy of this execution, to be cancelled while it
        still records the others."""
        me = asyncio.current_task()
        for job_id in job_ids:
            if self._running.get(job_id) is me:
                del self._running[job_id]
                del self._jobs[job_id]
                self._batch_jobs.discard(job_id)

    async def _execute_batch_inner(
        self, task: Task, runnable: list[Job], span: tracing.Span
    ) -> dict[int, str]:
        """Run a batch execution and record what the task did not; each job's outcome."""
        # A batch task checks each job's arguments itself (reporting bad ones as failed).
        contexts = [JobContext(job=j, app=self.app, worker_id=self.id) for j in runnable]
        timeout = max((j.timeout_s or 0.0) for j in runnable) or task.timeout_s
        timeout = timeout or self.app.settings.job_timeout_s
        try:
            call = task.func(contexts)
            outcome: BatchOutcome = await (asyncio.wait_for(call, timeout) if timeout else call)
        except asyncio.CancelledError:
            if self._stopping.is_set():
                raise  # shutdown: released, not failed
            # One of its jobs was cancelled or reclaimed elsewhere: give the others back at
            # once (the worker-id guard leaves the lost ones alone).
            with contextlib.suppress(DatabaseError):
                await self.store.release(self.id, [j.id for j in runnable])
            log.info(
                "batch of %d %s jobs stopped: cancelled or reclaimed", len(runnable), task.name
            )
            return dict.fromkeys((j.id for j in runnable), "cancelled")
        except Exception as raised:
            exc: Exception = raised
            if isinstance(raised, TimeoutError):
                exc = TaskTimeout(f"batch task {task.name!r} ran past its timeout of {timeout:g} s")
            tracing.failed(span, exc)
            message = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EmbedqError):
                message = "".join(traceback.format_exception(exc)[-6:])[-4000:].strip()
            outcomes: dict[int, str] = {}
            for job in runnable:
                outcomes[job.id] = await self._record_failure(
                    job, message, type(exc).__name__, permanent=is_permanent(exc), exc=exc
                )
                self._let_go([job.id])
            return outcomes
        self.processed += len(outcome.completed)
        outcomes = dict.fromkeys(outcome.completed, "succeeded")
        self._let_go(list(outcome.completed))
        by_id = {j.id: j for j in runnable}
        for job_id, failure in outcome.failed.items():
            outcomes[job_id] = await self._record_failure(
                by_id[job_id],
                f"{type(failure).__name__}: {failure}",
                type(failure).__name__,
                permanent=is_permanent(failure),
                exc=failure,
            )
            self._let_go([job_id])
        delays: dict[float, list[int]] = {}
        for job_id, delay in outcome.released.items():
            delays.setdefault(delay, []).append(job_id)
        for delay, ids in delays.items():
            try:
                await self.store.release_later(self.id, ids, delay)
            except DatabaseError as exc_db:
                self._db_lost(exc_db, "releasing jobs")  # their leases will expire
            outcomes.update(dict.fromkeys(ids, "released"))
            self._let_go(ids)
        handled = outcome.completed | outcome.failed.keys() | outcome.released.keys()
        rest = [j.id for j in runnable if j.id not in handled]
        if rest:
            self._done.extend(_Done(job_id, None, None) for job_id in rest)
            self._done_added.set()
            outcomes.update(dict.fromkeys(rest, "succeeded"))
        return outcomes

    # --- completions ---------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        backoff = _Backoff()
        while True:
            await self._done_added.wait()
            self._done_added.clear()
            while self._done:
                if not await self._flush():
                    if self._closing:
                        return  # the final flush in _shutdown records the rest
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()

    async def _flush(self) -> bool:
        """Record a batch of successes in one round trip; False if the database is away."""
        batch, self._done = self._done, []
        self._flushing = batch
        try:
            recorded = await self.store.complete(
                self.id,
                [d.job_id for d in batch],
                [d.result for d in batch],
                [d.outcome for d in batch],
            )
        except DatabaseError as exc:
            self._db_lost(exc, "recording completions")
            self._done = batch + self._done
            return False
        except BaseException:
            # Cancelled mid-flight (shutdown): keep the batch so the final flush records it;
            # the worker-id guard makes a second attempt harmless if this one landed.
            self._done = batch + self._done
            raise
        finally:
            self._flushing = []
        self._db_back()
        self.processed += len(recorded)
        if self.exit_when_idle and not self._held_count():
            self._wake.set()
        if len(recorded) < len(batch):
            log.info(
                "%d finished jobs were reclaimed or cancelled meanwhile; their results dropped",
                len(batch) - len(recorded),
            )
        self._slot_free.set()
        return True

    # --- heartbeat -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.app.settings.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            held = self.held
            state = "stopping" if self._stopping.is_set() else "running"
            try:
                alive = await self.store.heartbeat(self.id, held, state)
            except DatabaseError as exc:
                if self._closing:
                    return
                self._db_lost(exc, "renewing leases")
                continue
            self._db_back()
            for job_id in held:
                task = self._running.get(job_id)
                if job_id not in alive and task is not None:
                    task.cancel()  # cancelled by an admin, or reclaimed after a long outage

    # --- listen --------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake the claim loop on NOTIFY; a dead connection is noticed by a ping and replaced."""
        chan = queries.channel(self.app.settings.db_schema)
        backoff = _Backoff(first=0.5, cap=10.0)
        wanted = set(self.queues or [])
        while True:
            try:
                async with db.connect(self.app.settings) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(chan)))
                    backoff.reset()
                    self._batch_dirty.update(self._batch_queues())
                    self._wake.set()  # catch up on anything sent while we were away
                    while True:
                        async for note in conn.notifies(timeout=5.0):
                            if not wanted or note.payload in wanted:
                                self._batch_dirty.add(note.payload)
                                self._wake.set()
                        await conn.execute("SELECT 1")  # liveness: raises on a dead link
            except asyncio.CancelledError:
                raise
            except (DatabaseError, psycopg.Error, OSError) as exc:
                if self._closing:
                    return
                self._db_lost(exc, "listening for new jobs")
                await asyncio.sleep(backoff.next())

    # --- janitor -------------------------------------------------------------------------

    async def _janitor(self) -> None:
        """Reclaim expired leases, enqueue due periodic tasks, compact keyword-search postings
        and clean old history."""
        s = self.app.settings
        every = min(max(s.lease_s / 3, 0.5), 5.0)
        last_cleanup = 0.0
        last_compaction = time.monotonic()
        periodic = [t for t in self.app.tasks.values() if t.cron]
        last_tick: dict[str, datetime] = {}
        while True:
            try:
                reclaimed = await self.store.reclaim_expired()
                if reclaimed["requeued"] or reclaimed["dead"]:
                    log.warning(
                        "reclaimed %d jobs whose worker stopped heartbeating (%d dead-lettered "
                        "on their last attempt)",
                        reclaimed["requeued"] + reclaimed["dead"],
                        reclaimed["dead"],
                    )
                for task in periodic:
                    await self._schedule(task, last_tick)
                if time.monotonic() - last_cleanup > CLEANUP_EVERY_S:
                    last_cleanup = time.monotonic()
                    await self._cleanup()
                if s.bm25_compaction_s and time.monotonic() - last_compaction > s.bm25_compaction_s:
                    last_compaction = time.monotonic()
                    await bm25.compact(self.app)
            except DatabaseError as exc:
                if self._closing:
                    return
                self._db_lost(exc, "reclaiming expired leases")
            await asyncio.sleep(every if not periodic else min(every, 1.0))

    async def _schedule(self, task: Any, last_tick: dict[str, datetime]) -> None:
        now = datetime.now(UTC)
        tick: datetime = croniter(task.cron, now).get_prev(datetime)
        if last_tick.get(task.name) == tick or (now - tick).total_seconds() > 60:
            return  # already handled, or a tick missed long ago (we do not replay history)
        try:
            await self._enqueue_tick(task, tick)
        except _AlreadyScheduled:
            pass  # another worker recorded this tick first
        else:
            log.info("periodic task %s enqueued for tick %s", task.name, tick.isoformat())
        last_tick[task.name] = tick

    async def _enqueue_tick(self, task: Any, tick: datetime) -> None:
        async with self.app.pool.connection() as conn:  # type: ignore[union-attr]
            with db.translated():
                async with conn.transaction():
                    spec = JobSpec(
                        task.name,
                        {},
                        queue=task.queue,
                        priority=task.priority,
                        max_attempts=task.retry.max_attempts,
                        timeout_s=task.timeout_s,
                    )
                    [ticket] = await self.store.enqueue([spec], conn=conn)
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(
                        self.store.q["periodic_tick"],
                        {"task": task.name, "tick": tick, "job_id": ticket.id},
                    )
                    if not await cur.fetchall():
                        raise _AlreadyScheduled

    async def _cleanup(self) -> None:
        async with self.app.pool.connection() as conn:  # type: ignore[union-attr]
            with db.translated():
                async with conn.transaction():
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(
                        "SELECT pg_try_advisory_xact_lock(%s, %s) AS mine",
                        (LOCK_NAMESPACE, CLEANUP_LOCK),
                    )
                    row = await cur.fetchone()
                    if row and row["mine"]:
                        removed = await self.store.cleanup()
                        if any(removed.values()):
                            log.info("cleanup removed %s", removed)

    # --- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        """After the claim loop: let running jobs finish within the grace period."""
        grace = 0.0 if self._force else self.app.settings.shutdown_grace_s
        if self._running:
            log.info(
                "worker %s stopping: waiting up to %.0f s for %d running jobs",
                self.id,
                grace,
                len(self._running),
            )
            deadline = time.monotonic() + grace
            while self._running and not self._force and time.monotonic() < deadline:
                self._slot_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), deadline - time.monotonic())

    async def _shutdown(self) -> None:
        unfinished = list(self._running)
        self.abandoned_threads = sum(
            1
            for job_id in unfinished
            if (t := self.app.tasks.get(self._jobs[job_id].task)) is not None and not t.is_async
        )
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        for _ in range(3):  # record what finished; a few tries if the database is flaky
            if not self._done or await self._flush():
                if not self._done:
                    break
            else:
                await asyncio.sleep(0.5)
        try:
            if unfinished:
                released = await self.store.release(self.id, unfinished)
                log.info("released %d unfinished jobs back to their queues", len(released))
            await self.store.fetch("stop_worker", {"worker": self.id})
        except DatabaseError as exc:
            log.warning("could not release jobs at shutdown (%s); their leases will expire", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %d succeeded, %d failed", self.id, self.processed, self.failed)
        if self._owns_app:
            await self.app.close()


class _AlreadyScheduled(Exception):
    """Another worker recorded this tick first; the transaction rolls back."""


def _result_json(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, default=str)
    except (TypeError, ValueError):
        return json.dumps(repr(value)[:10_000])
