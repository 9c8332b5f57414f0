"""Watches and backfills: keeping a collection in step with an application's own table, and
queueing the documents that have no embedding.

A *watch* installs triggers on a table (`public.articles`) so that whatever writes it — a
Node, Bun or Go application, psql, a migration — writes the collection's documents in the same
transaction: an insert or an update of a watched column upserts the document and enqueues its
embedding exactly as `Collection.upsert` does; an update of other columns does nothing; a
delete removes the document; a truncate empties the collection. The triggers' work is SQL
(`watch_apply` and friends in migration 0004); this module validates, installs, backfills
the rows already there through the same SQL function, lists and drops.

    watches = Watches(app)
    watch, loaded = await watches.create(
        "public.articles", collection="articles", key="id", text=["title", "body"],
        metadata=["author", "lang"],
    )

A *backfill* enqueues an embed job for every document of a collection that some live model
lacks at its current version and that no job is pending or running for (jobs cleared by an
administrator, a dead-lettered document after its cause was fixed). Its jobs carry
`"backfill": true`, so that `cancel_backfill` withdraws them and nothing else.

    found = await missing(col)                      # count and first keys, nothing queued
    queued = await backfill(col, priority="low")
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg.rows import dict_row

from embedq import db, queries
from embedq.documents import BACKFILL_PRIORITY, EMBED_QUEUE, EMBED_TASK, WRITE_PRIORITY
from embedq.errors import DatabaseConflict, EmbedqError, InvalidWatch
from embedq.jobs import MAX_PRIORITY
from embedq.migrations import LOCK_NAMESPACE

if TYPE_CHECKING:
    from embedq.app import App
    from embedq.documents import Collection

# The advisory lock (namespace, watch id) that orders trigger firings (shared) against a
# backfill batch (exclusive). The number is written out in migration 0004; a test pins it.
WATCH_LOCK_NAMESPACE = LOCK_NAMESPACE + 2
PRIORITIES = {"high": WRITE_PRIORITY, "normal": (WRITE_PRIORITY + BACKFILL_PRIORITY) // 2,
              "low": BACKFILL_PRIORITY}  # fmt: skip
DEFAULT_BATCH = 1000
MAX_BATCH = 50_000
DDL_LOCK_TIMEOUT = "5s"  # installing triggers must not hold the application's writes for long
BATCH_LOCK_WAIT_MS = 200  # how long a backfill batch may queue writers behind its lock
LOCK_PATIENCE_S = 120.0


class Progress(Protocol):
    """Where a long operation reports: the total once known, then each step."""

    def start(self, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


@dataclass(frozen=True)
class Watch:
    """A watched table feeding a collection."""

    id: int
    collection: str
    table: str
    table_exists: bool
    key: str
    text: tuple[str, ...]
    title: str | None
    metadata: tuple[str, ...]
    triggers: tuple[str, ...]
    installed: int
    created_at: datetime

    @property
    def state(self) -> str:
        """`active`, or what is broken: its table is gone, or triggers are missing."""
        if not self.table_exists:
            return "table gone"
        if self.installed < len(self.triggers):
            return f"{len(self.triggers) - self.installed} trigger(s) missing"
        return "active"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Watch:
        return cls(
            id=int(row["id"]),
            collection=row["collection"],
            table=row["table_name"],
            table_exists=bool(row["table_exists"]),
            key=row["key_column"],
            text=tuple(row["text_columns"]),
            title=row["title_column"],
            metadata=tuple(row["metadata_columns"]),
            triggers=tuple(row["triggers"]),
            installed=int(row["installed"]),
            created_at=row["created_at"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "collection": self.collection,
            "table": self.table,
            "key": self.key,
            "text": list(self.text),
            "title": self.title,
            "metadata": list(self.metadata),
            "triggers": list(self.triggers),
            "state": self.state,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Loaded:
    """What loading a table's rows did: rows read, documents created or changed."""

    rows: int
    written: int
    pruned: int = 0

    def to_json(self) -> dict[str, int]:
        return {"rows": self.rows, "written": self.written, "pruned": self.pruned}


def priority_of(name: str) -> int:
    """A backfill priority by name: high (as fresh writes), normal, low (the default)."""
    if name not in PRIORITIES:
        raise InvalidWatch(f"priority {name!r} is invalid: use {', '.join(PRIORITIES)}")
    return PRIORITIES[name]


def _check(batch_size: int, priority: int) -> None:
    for name, value, low, high in (
        ("batch size", batch_size, 1, MAX_BATCH),
        ("priority", priority, 0, MAX_PRIORITY),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidWatch(f"{name} {value!r} is invalid: an integer from {low} to {high}")


class Watches:
    """The watches of an app's database."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.q = queries.load("watch.sql", app.settings.db_schema)

    async def _fetch(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.app.store.fetch_sql(self.q[name], params)

    # --- reading -------------------------------------------------------------------------

    async def list(self) -> list[Watch]:
        return [Watch.from_row(r) for r in await self._fetch("watches", {"collection": None})]

    async def get(self, collection: str) -> Watch:
        rows = await self._fetch("watches", {"collection": collection})
        if not rows:
            known = ", ".join(w.collection for w in await self.list()) or "none yet"
            raise InvalidWatch(
                f"collection {collection!r} has no watch (watched collections: {known}); "
                "see `embedq watch list`"
            )
        return Watch.from_row(rows[0])

    # --- creating ------------------------------------------------------------------------

    async def create(
        self,
        table: str,
        *,
        collection: str,
        key: str,
        text: Sequence[str],
        title: str | None = None,
        metadata: Sequence[str] = (),
        load: bool = True,
        priority: int = BACKFILL_PRIORITY,
        batch_size: int = DEFAULT_BATCH,
        progress: Progress | None = None,
    ) -> tuple[Watch, Loaded]:
        """Watch `table` for `collection`: validate, install the triggers (one transaction:
        all or nothing), then load the rows already there in batches (unless `load=False`;
        `sync` does it later). The table's `key` column must be unique (a primary key or a
        unique index on it alone); `text` columns are joined into the document's text;
        `title` and `text` columns must be of a string type, `metadata` columns any type."""
        _check(batch_size, priority)
        col = await self.app.collections.get(collection)
        oid, name = await self._validate(table, key, list(text), title, list(metadata))
        taken = await self._fetch("watches", {"collection": collection})
        if taken:
            raise InvalidWatch(
                f"collection {collection!r} is already fed by a watch on {taken[0]['table_name']}"
                f"; one watch per collection. Drop it first (`embedq watch drop {collection}`) "
                "or create another collection"
            )
        s = self.app.settings
        params = {
            "collection": col.id,
            "oid": oid,
            "key": key,
            "text": list(text),
            "title": title,
            "metadata": list(metadata),
            **self._captured(),
        }
        async with self._ddl(name) as conn:
            cur = conn.cursor(row_factory=dict_row)
            try:
                await cur.execute(self.q["insert_watch"], params)
            except psycopg.errors.UniqueViolation:
                raise InvalidWatch(
                    f"collection {collection!r} was given a watch at the same moment; see "
                    "`embedq watch list`"
                ) from None
            row = await cur.fetchone()
            assert row is not None
            watch_id = int(row["id"])
            await cur.execute(self.q["install"], {"watch": watch_id, "prefix": s.db_schema})
        watch = await self.get(collection)
        loaded = Loaded(0, 0)
        if load:
            loaded = await self._load(watch, priority, batch_size, progress)
        return watch, loaded

    def _captured(self) -> dict[str, Any]:
        s = self.app.settings
        return {
            "job_task": EMBED_TASK,
            "job_queue": EMBED_QUEUE,
            "job_priority": WRITE_PRIORITY,
            "max_attempts": s.embed_max_attempts,
            "max_chars": s.max_document_chars,
            "log_events": s.job_events == "all",
        }

    async def _validate(
        self,
        table: str,
        key: str,
        text: Sequence[str],
        title: str | None,
        metadata: Sequence[str],
    ) -> tuple[int, str]:
        """The table's oid and qualified name, or InvalidWatch naming what is wrong."""
        if not isinstance(table, str) or not table.strip():
            raise InvalidWatch("give the table to watch, like --table public.articles")
        if not text:
            raise InvalidWatch("give at least one text column, like --text title,body")
        for group, names in (("text", text), ("metadata", metadata)):
            dupes = sorted({n for n in names if list(names).count(n) > 1})
            if dupes:
                raise InvalidWatch(f"{group} column(s) {', '.join(dupes)} given twice")
        try:
            rows = await self._fetch("resolve_table", {"table": table})
        except EmbedqError as exc:
            if isinstance(exc.__cause__, psycopg.Error):
                raise InvalidWatch(
                    f"{table!r} is not a table name ({str(exc.__cause__).splitlines()[0]}); "
                    "write it as table or schema.table"
                ) from None
            raise
        if not rows:
            raise InvalidWatch(
                f"no table {table!r} in this database (searched: the connection's "
                "search_path); give it as schema.table, e.g. --table public.articles"
            )
        oid, kind, name = int(rows[0]["oid"]), rows[0]["kind"], rows[0]["name"]
        if kind == "p" or rows[0]["inherits"]:
            # A statement on a partition (or an inheritance child) does not fire the parent's
            # statement triggers, nor the other way round: rows would be missed.
            raise InvalidWatch(
                f"{name} is partitioned, a partition or part of an inheritance tree, which "
                "watches do not support: writes through one table would miss the other's "
                "triggers. Watch a plain table, or write the documents with embedq's API"
            )
        if kind != "r":
            what = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}
            raise InvalidWatch(
                f"{name} is {what.get(kind, 'not a table')}; watch the table it reads from"
            )
        columns = {r["name"]: r for r in await self._fetch("table_columns", {"oid": oid})}

        def column(role: str, col: str) -> dict[str, Any]:
            if col in columns:
                return columns[col]
            near = [c for c in columns if c.lower() == col.lower()]
            hint = f"did you mean {near[0]!r}?" if near else f"columns: {', '.join(columns)}"
            raise InvalidWatch(f"{name} has no column {col!r} (the {role}); {hint}")

        k = column("--key", key)
        if not k["is_unique"]:
            raise InvalidWatch(
                f"column {key!r} of {name} is not unique, so it cannot identify a document: "
                f"choose the primary key, or add a unique index on {key} alone "
                f"(CREATE UNIQUE INDEX ON {name} ({key}))"
            )
        for role, col in [("--title", title)] * (title is not None) + [("--text", c) for c in text]:
            assert col is not None
            info = column(role, col)
            if info["category"] != "S":
                raise InvalidWatch(
                    f"column {col!r} of {name} is {info['type']}, not a string type: {role} "
                    "takes text, varchar or char columns; pass it as --metadata instead"
                )
        for col in metadata:
            column("--metadata", col)
        return oid, name

    @staticmethod
    def _ddl_error(exc: EmbedqError, table: str) -> EmbedqError:
        cause = exc.__cause__
        if isinstance(cause, psycopg.errors.LockNotAvailable):
            return DatabaseConflict(
                f"{table} is busy: a transaction held it for over {DDL_LOCK_TIMEOUT}; "
                "nothing was changed. Try again (look for long transactions in "
                "pg_stat_activity)"
            )
        if isinstance(cause, psycopg.errors.InsufficientPrivilege):
            return InvalidWatch(
                f"embedq's database user may not create triggers on {table} ({cause}); "
                f"GRANT TRIGGER, SELECT ON {table} TO it, or run as the table's owner"
            )
        return exc

    @contextlib.asynccontextmanager
    async def _ddl(self, table: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction for DDL on `table`: its lock waits give up after DDL_LOCK_TIMEOUT
        (rather than hold the application's writes queued behind it), errors made clear."""
        pool = self.app.store.pool
        assert pool is not None
        try:
            with db.translated():
                async with pool.connection() as conn, conn.transaction():
                    await conn.execute(self.q["lock_timeout"], {"timeout": DDL_LOCK_TIMEOUT})
                    yield conn
        except EmbedqError as exc:
            raise self._ddl_error(exc, table) from exc.__cause__

    # --- loading and syncing -------------------------------------------------------------

    async def _load(
        self, watch: Watch, priority: int, batch_size: int, progress: Progress | None
    ) -> Loaded:
        """Every row of the table through watch_apply, in key order, a batch per transaction
        (each under the watch's lock: see watch_backfill)."""
        if progress is not None:
            [row] = await self._fetch("count_rows", {"watch": watch.id})
            progress.start(int(row["n"]))
        after: str | None = None
        rows = written = 0
        waited_since: float | None = None
        while True:
            [batch] = await self._fetch(
                "backfill_batch",
                {
                    "watch": watch.id,
                    "after": after,
                    "limit": batch_size,
                    "priority": priority,
                    "wait_ms": BATCH_LOCK_WAIT_MS,
                },
            )
            if not batch["locked"]:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > LOCK_PATIENCE_S:
                    raise DatabaseConflict(
                        f"loading {watch.table} waited {LOCK_PATIENCE_S:.0f} s for transactions "
                        "writing to it to end; a long or idle one holds it (see "
                        "pg_stat_activity). What was loaded stays; run `embedq watch sync "
                        f"{watch.collection}` to finish"
                    )
                await asyncio.sleep(0.05)
                continue
            waited_since = None
            rows += int(batch["rows_read"])
            written += int(batch["written"])
            if progress is not None:
                progress.advance(int(batch["rows_read"]))
            if int(batch["rows_read"]) < batch_size:
                return Loaded(rows, written)
            after = batch["last_key"]

    async def sync(
        self,
        collection: str,
        *,
        prune: bool = False,
        priority: int = BACKFILL_PRIORITY,
        batch_size: int = DEFAULT_BATCH,
        progress: Progress | None = None,
    ) -> tuple[Watch, Loaded]:
        """Bring a watch's collection in step with its table again: reinstall missing
        triggers, copy the current settings, load every row (unchanged ones are no-ops) and,
        with `prune`, delete documents whose row is gone. For a load that was interrupted,
        a watch created with `load=False`, or a watch re-created after a drop."""
        _check(batch_size, priority)
        watch = await self.get(collection)
        if not watch.table_exists:
            raise InvalidWatch(
                f"the table of the watch of {collection!r} is gone; drop the watch "
                f"(`embedq watch drop {collection}`)"
            )
        async with self._ddl(watch.table) as conn:
            await conn.execute(self.q["refresh_watch"], {"watch": watch.id, **self._captured()})
            if watch.installed < len(watch.triggers) or not watch.triggers:
                await conn.execute(self.q["uninstall"], {"watch": watch.id})
                await conn.execute(
                    self.q["install"], {"watch": watch.id, "prefix": self.app.settings.db_schema}
                )
        watch = await self.get(collection)
        loaded = await self._load(watch, priority, batch_size, progress)
        if prune:
            gone = await self._fetch("orphans", {"watch": watch.id, "delete": True})
            loaded = Loaded(loaded.rows, loaded.written, len(gone))
        return watch, loaded

    async def orphans(self, collection: str) -> Sequence[str]:
        """Keys of the collection's documents whose row is gone (what `sync(prune=True)`
        would delete)."""
        watch = await self.get(collection)
        return [
            r["key"] for r in await self._fetch("orphans", {"watch": watch.id, "delete": False})
        ]

    # --- dropping ------------------------------------------------------------------------

    async def drop(self, collection: str) -> tuple[Watch, int]:
        """Remove a watch's triggers and its record; the documents stay. Returns the watch
        and how many triggers were removed."""
        watch = await self.get(collection)
        async with self._ddl(watch.table) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(self.q["uninstall"], {"watch": watch.id})
            row = await cur.fetchone()
            await cur.execute(self.q["delete_watch"], {"watch": watch.id})
        return watch, int(row["removed"]) if row else 0


# --- backfill ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Missing:
    """Documents of a collection with no embedding and no job: how many, and the first."""

    collection: str
    count: int
    first: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"collection": self.collection, "missing": self.count, "first": self.first}


async def missing(col: Collection, limit: int = 20) -> Missing:
    """Count (and list the first `limit` by key of) the documents a backfill would queue."""
    q = queries.load("watch.sql", col.app.settings.db_schema)
    [row] = await col.app.store.fetch_sql(q["missing_count"], {"collection": col.id})
    first = await col.app.store.fetch_sql(q["missing_keys"], {"collection": col.id, "limit": limit})
    return Missing(col.name, int(row["n"]), [dict(r) for r in first])


async def backfill(
    col: Collection,
    *,
    priority: int = BACKFILL_PRIORITY,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> int:
    """Enqueue an embed job (marked `"backfill": true`) for each document of `col` with no
    embedding and no job, in batches by key; returns how many were queued."""
    _check(batch_size, priority)
    app = col.app
    q = queries.load("watch.sql", app.settings.db_schema)
    if progress is not None:
        progress.start((await missing(col, limit=0)).count)
    after, queued = "", 0
    while True:
        [row] = await app.store.fetch_sql(
            q["queue_missing"],
            {
                "collection": col.id,
                "after": after,
                "limit": batch_size,
                "task": EMBED_TASK,
                "queue": EMBED_QUEUE,
                "priority": priority,
                "max_attempts": app.settings.embed_max_attempts,
                "log_all": app.settings.job_events == "all",
            },
        )
        queued += int(row["queued"])
        if progress is not None:
            progress.advance(int(row["picked"]))
        if int(row["picked"]) < batch_size:
            return queued
        after = row["last_key"]


async def cancel_backfill(app: App, collection: Collection | None = None) -> int:
    """Withdraw the pending backfill jobs (of one collection, or all) to the archive as
    cancelled (`embedq queue retry` can bring them back); returns how many."""
    q = queries.load("watch.sql", app.settings.db_schema)
    cancelled = 0
    while True:
        rows = await app.store.fetch_sql(
            q["backfill_jobs"],
            {
                "task": EMBED_TASK,
                "collection": collection.id if collection else None,
                "limit": 5000,
            },
        )
        if not rows:
            return cancelled
        done = await app.store.cancel(
            [int(r["id"]) for r in rows], reason="backfill cancelled (`embedq backfill cancel`)"
        )
        cancelled += len(done)


__all__ = [
    "PRIORITIES",
    "Loaded",
    "Missing",
    "Watch",
    "Watches",
    "backfill",
    "cancel_backfill",
    "missing",
    "priority_of",
]
