"""The App: settings, the database, the registered tasks, and enqueueing.

app = embedq.App()

@app.task(queue="high", lock="business:{business_id}")
async def sync_receipts(business_id: int) -> None: ...

async with app:
    await sync_receipts.defer_async(business_id=42)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from embedq import db, migrations, pipeline, stored_settings, webhooks
from embedq.errors import ConfigurationError, InvalidJob, PermanentError, UnknownTask
from embedq.jobs import Enqueued, JobSpec, JobStore, _results, coalesce_batch, enqueue_params
from embedq.pipeline import PipelineStats
from embedq.providers.guard import Endpoints
from embedq.retry import RetryPolicy
from embedq.search import QueryVectors
from embedq.settings import Settings
from embedq.tasks import KeyTemplate, Task

if TYPE_CHECKING:
    from embedq.documents import Collections

log = logging.getLogger("embedq")
F = TypeVar("F", bound=Callable[..., Any])


class App:
    """One embedq application: where its database is and which tasks it runs.

    Keyword arguments override settings the way CLI flags do (`App(database_url=...,
    worker_concurrency=20)`); everything else comes from EMBEDQ_* variables, the database's
    settings table, then defaults.
    """

    def __init__(self, **overrides: Any) -> None:
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.settings = Settings.load(cli=self.overrides)
        self.tasks: dict[str, Task] = {}
        self.pool: AsyncConnectionPool | None = None
        self._store: JobStore | None = None
        self._sync_pool: ConnectionPool | None = None
        self._sync_lock = threading.Lock()
        self._endpoints: Endpoints | None = None
        self.pipeline_stats = PipelineStats()
        self.query_vectors = QueryVectors()  # recent queries' vectors, for this App's life
        _register_builtins(self)
        pipeline.register(self)
        webhooks.register(self)

    # --- tasks ---------------------------------------------------------------------------

    @overload
    def task(self, func: F) -> Task: ...

    @overload
    def task(
        self,
        func: None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        retry: RetryPolicy | int | None = None,
        lock: KeyTemplate = None,
        dedup: KeyTemplate = None,
        timeout: float | None = None,
        pass_context: bool = False,
        cron: str | None = None,
        batch: bool = False,
        batch_size: int | None = None,
        batch_concurrency: int | None = None,
    ) -> Callable[[F], Task]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int | None = None,
        retry: RetryPolicy | int | None = None,
        lock: KeyTemplate = None,
        dedup: KeyTemplate = None,
        timeout: float | None = None,
        pass_context: bool = False,
        cron: str | None = None,
        batch: bool = False,
        batch_size: int | None = None,
        batch_concurrency: int | None = None,
    ) -> Task | Callable[[F], Task]:
        """Register a function as a task.

        `lock` and `dedup` are templates over the job's arguments ("business:{business_id}")
        or callables taking them; `retry` is a RetryPolicy or a number of attempts; `cron`
        makes the task periodic (run once per tick across all workers). A `batch` task takes
        a list of JobContext and returns a BatchOutcome (see tasks.BatchOutcome).
        """

        def register(f: Callable[..., Any]) -> Task:
            s = self.settings
            policy = (
                retry
                if isinstance(retry, RetryPolicy)
                else RetryPolicy(
                    max_attempts=max_attempts
                    or (retry if isinstance(retry, int) else None)
                    or s.retry_max_attempts,
                    base_s=s.retry_base_s,
                    cap_s=max(s.retry_cap_s, s.retry_base_s),
                )
            )
            task_name = name or re.sub(r"[^A-Za-z0-9_.:-]", "", f"{f.__module__}.{f.__qualname__}")
            if task_name in self.tasks:
                raise InvalidJob(f"a task named {task_name!r} is already registered")
            t = Task(
                app=self,
                func=f,
                name=task_name,
                queue=queue,
                priority=priority,
                retry=policy,
                lock=lock,
                dedup=dedup,
                timeout_s=timeout,
                pass_context=pass_context,
                cron=cron,
                batch=batch,
                batch_size=batch_size,
                batch_concurrency=batch_concurrency,
            )
            self.tasks[task_name] = t
            return t

        return register(func) if func is not None else register

    def periodic(self, cron: str, **options: Any) -> Callable[[F], Task]:
        """Register a task that runs on a cron schedule, once per tick across all workers."""
        return self.task(cron=cron, **options)

    def get_task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTask(
                f"no task named {name!r} is registered; known tasks: "
                f"{', '.join(sorted(self.tasks))}"
            ) from None

    @property
    def collections(self) -> Collections:
        """The app's collections of documents (create, get, list, drop)."""
        from embedq.documents import Collections

        return Collections(self)

    @property
    def endpoints(self) -> Endpoints:
        """This process's guarded embedding providers (breakers, rate limits, fallbacks)."""
        if self._endpoints is None:
            self._endpoints = Endpoints(self.settings)
        return self._endpoints

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the app is not open: use `async with app:` or `await app.open()`")
        return self._store

    async def open(
        self,
        *,
        migrate: bool | None = None,
        pool_size: int = 10,
        acquire_timeout_s: float | None = None,
    ) -> App:
        """Connect, apply pending migrations (unless `migrate=False` or the auto_migrate
        setting is off: then only check the schema is current), load stored settings.

        `acquire_timeout_s` bounds the wait for a pooled connection (default: the connect
        timeout); the API keeps it short so a request fails fast while the database is down.
        """
        if migrate is None:
            migrate = self.settings.auto_migrate
        if self.pool is not None:
            return self
        async with db.connect(self.settings) as conn:
            where = db.describe_target(db.database_url(self.settings))
            if migrate:
                await migrations.upgrade(conn, self.settings.db_schema, where=where)
            await migrations.check_current(conn, self.settings.db_schema)
        pool = db.make_pool(self.settings, max_size=pool_size, timeout=acquire_timeout_s)
        with db.translated():
            await pool.open(wait=True, timeout=self.settings.connect_timeout_s)
        self.pool = pool
        self._store = JobStore(pool, self.settings)
        await self.reload_settings()
        return self

    async def reload_settings(self) -> None:
        """Re-read the settings table (a flag or environment variable still wins)."""
        stored = await stored_settings.load(self.store, self.settings)
        self.settings = Settings.load(cli=self.overrides, database=stored)
        self._store = JobStore(self.store.pool, self.settings)

    async def close(self) -> None:
        if self._endpoints is not None:
            await self._endpoints.close()
            self._endpoints = None
        if self.pool is not None:
            await self.pool.close()
        self.pool = None
        self._store = None
        with self._sync_lock:
            if self._sync_pool is not None:
                self._sync_pool.close()
                self._sync_pool = None

    async def __aenter__(self) -> App:
        return await self.open()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- enqueueing ----------------------------------------------------------------------

    async def enqueue(self, specs: Sequence[JobSpec], *, connection: Any = None) -> list[Enqueued]:
        """Enqueue jobs in one round trip; in the caller's transaction when `connection`
        (a psycopg AsyncConnection) is given: the jobs exist only if it commits."""
        if connection is not None and not isinstance(connection, psycopg.AsyncConnection):
            raise InvalidJob(
                "defer_async() needs a psycopg.AsyncConnection; use defer() with a "
                "psycopg.Connection"
            )
        if self._store is None and connection is None:
            await self.open()
        store = self._store or JobStore(None, self.settings)
        return await store.enqueue(specs, conn=connection)

    def enqueue_sync(self, specs: Sequence[JobSpec], *, connection: Any = None) -> list[Enqueued]:
        """Blocking enqueue for synchronous code (Flask, Django, scripts)."""
        if not specs:
            return []
        if isinstance(connection, psycopg.AsyncConnection):
            raise InvalidJob("defer() needs a psycopg.Connection; use defer_async() instead")
        unique, _ = coalesce_batch(specs)
        query = JobStore.queries_for(self.settings)["enqueue"]
        params = enqueue_params(unique, self.settings.job_events == "all")
        with db.translated():
            if connection is not None:
                cur = connection.cursor(row_factory=dict_row)
                cur.execute(query, params)
                return _results(specs, cur.fetchall())
            with self._sync_connection() as conn:
                rows = conn.execute(query, params).fetchall()
        return _results(specs, rows)

    @contextlib.contextmanager
    def _sync_connection(self) -> Any:
        with self._sync_lock:
            if self._sync_pool is None:
                self._sync_pool = ConnectionPool(
                    db.database_url(self.settings),
                    min_size=1,
                    max_size=4,
                    kwargs={
                        "autocommit": True,
                        "row_factory": dict_row,
                        **db.connection_kwargs(self.settings),
                    },
                    timeout=self.settings.connect_timeout_s,
                    open=True,
                    name="embedq-sync",
                )
        with self._sync_pool.connection() as conn:
            yield conn


def load_app(path: str | None) -> App:
    """The App at 'package.module:attribute' (or 'package.module', attribute 'app')."""
    if not path:
        return App()
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import the app module {module_name!r} ({exc}). Check --app / EMBEDQ_APP "
            "and that the module is on PYTHONPATH."
        ) from None
    app = getattr(module, attr or "app", None)
    if not isinstance(app, App):
        raise ConfigurationError(
            f"{path!r} is not an embedq.App; point --app / EMBEDQ_APP at 'module:app_variable'"
        )
    return app


def _register_builtins(app: App) -> None:
    """Small tasks every app has: for smoke tests, demos and benchmarks."""

    @app.task(name="embedq.noop")
    async def noop(**_: Any) -> None:
        return None

    @app.task(name="embedq.sleep")
    async def sleep(seconds: float = 1.0, **_: Any) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @app.task(name="embedq.echo")
    def echo(**args: Any) -> dict[str, Any]:
        return args

    @app.task(name="embedq.fail", retry=RetryPolicy(max_attempts=3, base_s=0.05, cap_s=0.2))
    def fail(message: str = "failed on purpose", permanent: bool = False, **_: Any) -> None:
        if permanent:
            raise PermanentError(message)
        raise RuntimeError(message)
