"""Tasks: functions registered with an App, and the ways to enqueue them.

@app.task(queue="high", lock="business:{business_id}", max_attempts=3)
def sync_receipts(business_id: int) -> None: ...

sync_receipts.defer(business_id=42)                      # its own transaction
sync_receipts.configure(connection=conn).defer(business_id=42)   # the caller's
await sync_receipts.defer_async(business_id=42)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from croniter import croniter

from embedq.errors import InvalidJob
from embedq.jobs import Enqueued, JobSpec, in_seconds
from embedq.retry import RetryPolicy

if TYPE_CHECKING:
    from embedq.app import App
    from embedq.jobs import Job

KeyTemplate = str | Callable[..., str] | None


@dataclass(frozen=True)
class JobContext:
    """What a task with `pass_context=True` receives first: the job and the app."""

    job: Job
    app: App
    worker_id: int


def _render_key(template: KeyTemplate, task: str, what: str, args: Mapping[str, Any]) -> str | None:
    if template is None:
        return None
    try:
        return template(**args) if callable(template) else template.format(**args)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InvalidJob(
            f"cannot build the {what} of task {task!r} from its arguments ({exc!r}); "
            f"the template names arguments the call did not pass"
        ) from None


@dataclass
class BatchOutcome:
    """What a batch task reports about its jobs. A job in none of the fields succeeded and is
    recorded by the worker; `completed` jobs were finished by the task itself, inside its own
    transaction; `failed` ones go through the retry policy; `released` ones go back to the
    queue after the given delay without spending an attempt (a provider's circuit is open)."""

    completed: set[int] = field(default_factory=set)
    failed: dict[int, BaseException] = field(default_factory=dict)
    released: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Deferrer:
    """A task with per-call options (`Task.configure`), ready to `defer`."""

    task: Task
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    delay_s: float | None = None
    lock_key: str | None = None
    dedup_key: str | None = None
    connection: Any = None

    def spec(self, args: Mapping[str, Any]) -> JobSpec:
        t = self.task
        run_at = self.run_at
        if self.delay_s is not None:
            if self.delay_s < 0:
                raise InvalidJob(f"delay_s of task {t.name!r} must not be negative")
            run_at = in_seconds(self.delay_s)
        return JobSpec(
            task=t.name,
            args=dict(args),
            queue=self.queue or t.queue,
            priority=t.priority if self.priority is None else self.priority,
            run_at=run_at,
            max_attempts=t.retry.max_attempts,
            lock_key=self.lock_key or _render_key(t.lock, t.name, "lock key", args),
            dedup_key=self.dedup_key or _render_key(t.dedup, t.name, "dedup key", args),
            timeout_s=t.timeout_s,
        )

    def defer(self, **args: Any) -> Enqueued:
        """Enqueue one job now (blocking). With `connection=`, inside the caller's transaction."""
        [ticket] = self.task.app.enqueue_sync([self.spec(args)], connection=self.connection)
        return ticket

    async def defer_async(self, **args: Any) -> Enqueued:
        [ticket] = await self.task.app.enqueue([self.spec(args)], connection=self.connection)
        return ticket

    def defer_many(self, calls: Iterable[Mapping[str, Any]]) -> list[Enqueued]:
        """Enqueue many jobs in one round trip (blocking)."""
        return self.task.app.enqueue_sync([self.spec(a) for a in calls], connection=self.connection)

    async def defer_many_async(self, calls: Iterable[Mapping[str, Any]]) -> list[Enqueued]:
        return await self.task.app.enqueue(
            [self.spec(a) for a in calls], connection=self.connection
        )


@dataclass(frozen=True)
class Task:
    """A registered task. Call it like the function; `defer` it to run on a worker."""

    app: App
    func: Callable[..., Any]
    name: str
    queue: str = "default"
    priority: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lock: KeyTemplate = None
    dedup: KeyTemplate = None
    timeout_s: float | None = None
    pass_context: bool = False
    cron: str | None = None
    # A batch task receives a list of JobContext at once (its jobs are claimed together from
    # its queue, up to `batch_size` per call, `batch_concurrency` calls at a time per worker)
    # and returns a BatchOutcome. None: the embed_batch_size / embed_concurrency settings.
    batch: bool = False
    batch_size: int | None = None
    batch_concurrency: int | None = None

    def __post_init__(self) -> None:
        JobSpec(self.name, queue=self.queue, priority=self.priority, timeout_s=self.timeout_s)
        if self.batch and not inspect.iscoroutinefunction(self.func):
            raise InvalidJob(
                f"batch task {self.name!r} must be an async function taking a list of "
                "JobContext and returning a BatchOutcome"
            )
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise InvalidJob(
                f"cron expression {self.cron!r} of task {self.name!r} is invalid: use five "
                "fields 'minute hour day-of-month month day-of-week', e.g. '*/5 * * * *'"
            )

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def configure(self, **options: Any) -> Deferrer:
        """Per-call options: queue, priority, run_at, delay_s, lock_key, dedup_key, connection."""
        try:
            return replace(Deferrer(self), **options)
        except TypeError as exc:
            raise InvalidJob(f"unknown option for task {self.name!r}: {exc}") from None

    def defer(self, **args: Any) -> Enqueued:
        return Deferrer(self).defer(**args)

    async def defer_async(self, **args: Any) -> Enqueued:
        return await Deferrer(self).defer_async(**args)

    def defer_many(self, calls: Iterable[Mapping[str, Any]]) -> list[Enqueued]:
        return Deferrer(self).defer_many(calls)

    async def defer_many_async(self, calls: Iterable[Mapping[str, Any]]) -> list[Enqueued]:
        return await Deferrer(self).defer_many_async(calls)

    def check_args(self, args: Mapping[str, Any]) -> str | None:
        """Why `args` cannot be passed to the function, or None when they can."""
        if self.batch:
            return None  # a batch task takes contexts, and checks each job's arguments itself
        if self._takes_any_kwargs and not self.pass_context:
            return None  # fast path: a `**kwargs` function accepts any arguments
        try:
            params = [None] if self.pass_context else []
            self._signature.bind(*params, **args)
        except TypeError as exc:
            return str(exc)
        return None

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        return inspect.signature(self.func)

    @functools.cached_property
    def _takes_any_kwargs(self) -> bool:
        params = list(self._signature.parameters.values())
        return all(
            p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty for p in params
        ) and any(p.kind is p.VAR_KEYWORD for p in params)

    async def run(self, context: JobContext, executor: Any) -> Any:
        """Run the function with the job's arguments: coroutines on the loop, plain
        functions in the worker's thread pool so they never block it."""
        args = context.job.args
        call_args: tuple[Any, ...] = (context,) if self.pass_context else ()
        if self.is_async:
            return await self.func(*call_args, **args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, lambda: self.func(*call_args, **args))
