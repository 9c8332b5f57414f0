"""`embedq watch ...` (create, list, sync, drop: triggers on an application's table that keep
a collection in step with it) and `embedq backfill` (queue the documents with no embedding;
`backfill cancel` withdraws those jobs). Each command has `--json`."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embedq.app import App
from embedq.cli.common import (
    JSON_OPTION,
    YES_OPTION,
    confirm,
    console,
    console_err,
    print_json,
    run,
    state,
    table,
    with_app,
)
from embedq.errors import InvalidWatch
from embedq.watch import (
    DEFAULT_BATCH,
    PRIORITIES,
    Loaded,
    Watch,
    Watches,
    backfill,
    cancel_backfill,
    missing,
    priority_of,
)

watch_app = typer.Typer(
    help="Watch an application's table: its writes, from any program, keep a collection's "
    "documents in step, in the same transaction.",
    no_args_is_help=True,
)
backfill_app = typer.Typer(invoke_without_command=True)  # help: the callback's docstring

CONFIRM_OVER = 1000  # a backfill of more documents than this asks first
PRIORITY_OPTION = typer.Option(
    "low",
    "--priority",
    help="Of the embed jobs: high (as fresh writes), normal or low (after fresh writes).",
)
BATCH_OPTION = typer.Option(DEFAULT_BATCH, "--batch-size", help="Rows or documents per batch.")


def split_columns(value: str | None, flag: str) -> list[str]:
    """`title,body` as ['title', 'body']; an empty name is refused.

    >>> split_columns("title, body", "--text")
    ['title', 'body']
    """
    if value is None:
        return []
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise InvalidWatch(f"{flag} {value!r} has an empty column name; example: {flag} a,b")
    return names


class _Bar:
    """A rich progress bar (on stderr) as a watch.Progress."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.task: Any = None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.label, total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console_err,
        disable=quiet,
        transient=False,
    )


def _describe(w: Watch) -> str:
    parts = [f"key {w.key}", f"text {', '.join(w.text)}"]
    if w.title:
        parts.append(f"title {w.title}")
    if w.metadata:
        parts.append(f"metadata {', '.join(w.metadata)}")
    return escape("; ".join(parts))


def _loaded_line(loaded: Loaded, priority: str) -> str:
    jobs = f"; their embed jobs are queued at {priority} priority" if loaded.written else ""
    pruned = f"; {loaded.pruned:,} documents without a row deleted" if loaded.pruned else ""
    return f"loaded {loaded.rows:,} rows: {loaded.written:,} documents written{jobs}{pruned}"


# --- watch ---------------------------------------------------------------------------------


@watch_app.command("create")
def create(
    ctx: typer.Context,
    table_name: str = typer.Option(..., "--table", help="The table: table or schema.table."),
    key: str = typer.Option(
        ..., "--key", help="Its unique column (primary key) that names each document."
    ),
    text: str = typer.Option(
        ..., "--text", help="Text columns, comma-separated, joined into the document's text."
    ),
    collection: str = typer.Option(..., "--collection", help="The collection to feed."),
    title: str | None = typer.Option(None, "--title", help="A column for the document title."),
    metadata: str | None = typer.Option(
        None, "--metadata", help="Columns, comma-separated, copied into the metadata."
    ),
    load: bool = typer.Option(
        True, "--load/--no-load", help="Load the rows already there (default), or not yet."
    ),
    priority: str = PRIORITY_OPTION,
    batch_size: int = BATCH_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Install triggers on a table so that every insert, update of a watched column, delete
    and truncate, by any program, writes the collection's documents and queues their
    embeddings in the same transaction; then load the rows already there."""
    level = priority_of(priority)
    texts = split_columns(text, "--text")
    metas = split_columns(metadata, "--metadata")

    async def go(app: App) -> tuple[Watch, Loaded]:
        with _progress(json_out) as bar:
            return await Watches(app).create(
                table_name,
                collection=collection,
                key=key,
                text=texts,
                title=title,
                metadata=metas,
                load=load,
                priority=level,
                batch_size=batch_size,
                progress=_Bar(bar, "loading rows"),
            )

    watch, loaded = run(with_app(state(ctx), go))
    if json_out:
        print_json({"watch": watch.to_json(), "loaded": loaded.to_json()})
        return
    console.print(
        f"watching {escape(watch.table)} for collection {escape(watch.collection)!r} "
        f"({_describe(watch)}); triggers {escape(', '.join(watch.triggers))}"
    )
    if load:
        console.print(_loaded_line(loaded, priority))
    else:
        console.print(
            f"rows already there are not loaded yet: `embedq watch sync {escape(collection)}`"
        )


@watch_app.command("list")
def list_(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Every watch: table, collection, columns and whether its triggers are all in place."""
    watches = run(with_app(state(ctx), lambda a: Watches(a).list()))
    if json_out:
        print_json([w.to_json() for w in watches])
        return
    rows = [
        {
            "collection": escape(w.collection),
            "table": escape(w.table),
            "key": escape(w.key),
            "text": escape(", ".join(w.text)),
            "title": escape(w.title) if w.title else None,
            "metadata": escape(", ".join(w.metadata)) or None,
            "state": w.state,
            "created_at": w.created_at,
        }
        for w in watches
    ]
    table("watches", rows)


@watch_app.command("sync")
def sync(
    ctx: typer.Context,
    collection: str = typer.Argument(..., help="The watched collection."),
    prune: bool = typer.Option(
        False, "--prune", help="Also delete documents whose row is gone (asks first)."
    ),
    priority: str = PRIORITY_OPTION,
    batch_size: int = BATCH_OPTION,
    yes: bool = YES_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Bring a watched collection in step with its table again: reinstall missing triggers,
    load every row (unchanged ones cost nothing), and with --prune delete the documents whose
    row is gone. For a load that was interrupted, `create --no-load`, or a watch re-created."""
    level = priority_of(priority)

    async def go(app: App) -> tuple[Watch, Loaded]:
        watches = Watches(app)
        if prune:
            gone = await watches.orphans(collection)
            if gone:
                confirm(
                    f"Delete {len(gone)} documents of {collection!r} whose row is gone "
                    f"(first: {', '.join(gone[:5])})?",
                    yes,
                )
        with _progress(json_out) as bar:
            return await watches.sync(
                collection,
                prune=prune,
                priority=level,
                batch_size=batch_size,
                progress=_Bar(bar, "loading rows"),
            )

    watch, loaded = run(with_app(state(ctx), go))
    if json_out:
        print_json({"watch": watch.to_json(), "loaded": loaded.to_json()})
    else:
        console.print(f"{escape(watch.table)} -> {escape(watch.collection)!r}: ", end="")
        console.print(_loaded_line(loaded, priority))


@watch_app.command("drop")
def drop(
    ctx: typer.Context,
    collection: str = typer.Argument(..., help="The watched collection."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Remove a watch's triggers and nothing else: the documents stay, and later writes to
    the table no longer reach the collection."""
    watch, removed = run(with_app(state(ctx), lambda a: Watches(a).drop(collection)))
    if json_out:
        print_json({"dropped": watch.to_json(), "triggers_removed": removed})
        return
    console.print(
        f"stopped watching {escape(watch.table)} for {escape(collection)!r}: {removed} "
        "triggers removed; the documents stay"
    )


# --- backfill ------------------------------------------------------------------------------


@backfill_app.callback()
def backfill_cmd(
    ctx: typer.Context,
    collection: str | None = typer.Option(None, "--collection", help="The collection."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Count and list the documents, queue nothing."
    ),
    priority: str = PRIORITY_OPTION,
    batch_size: int = BATCH_OPTION,
    limit: int = typer.Option(20, "--limit", "-n", help="Documents listed by --dry-run."),
    yes: bool = typer.Option(
        False, "--yes", "-y", help=f"Do not ask before queueing over {CONFIRM_OVER} jobs."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Queue an embed job for each document of a collection that has no embedding for its
    current model (the one building too, during a model switch) and no job pending or
    running. The jobs are marked as a backfill: `embedq backfill cancel` withdraws them."""
    if ctx.invoked_subcommand is not None:
        return
    if collection is None:
        raise InvalidWatch(
            "give the collection: `embedq backfill --collection NAME` (or `embedq backfill cancel`)"
        )
    level = priority_of(priority)
    if not 0 <= limit <= 100_000:
        raise InvalidWatch(f"--limit {limit} is invalid: from 0 to 100000")
    st = state(ctx)

    async def count(app: App) -> dict[str, Any]:
        col = await app.collections.get(collection)
        return (await missing(col, limit=limit)).to_json()

    found = run(with_app(st, count))
    n = found["missing"]
    if dry_run:
        if json_out:
            print_json({**found, "dry_run": True, "queued": 0})
            return
        console.print(
            f"{n:,} documents of {escape(collection)!r} have no embedding and no job "
            "(dry run: nothing queued)"
        )
        if found["first"]:
            table(f"first {len(found['first'])} by key", found["first"])
        return
    if n > CONFIRM_OVER:
        confirm(f"Queue {n:,} embed jobs for {collection!r} at {priority} priority?", yes)

    async def go(app: App) -> int:
        col = await app.collections.get(collection)
        with _progress(json_out) as bar:
            return await backfill(
                col, priority=level, batch_size=batch_size, progress=_Bar(bar, "queueing")
            )

    queued = run(with_app(st, go))
    if json_out:
        print_json({"collection": collection, "queued": queued, "priority": priority})
    elif queued:
        console.print(
            f"queued {queued:,} embed jobs for {escape(collection)!r} at {priority} priority "
            f"(withdraw them: `embedq backfill cancel --collection {escape(collection)}`)"
        )
    else:
        console.print(
            f"nothing to backfill: every document of {escape(collection)!r} is embedded or "
            "has a job"
        )


@backfill_app.command("cancel")
def cancel(
    ctx: typer.Context,
    collection: str | None = typer.Option(
        None, "--collection", help="Only this collection's (default: every collection's)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Withdraw the pending backfill jobs (to the archive as cancelled; `embedq queue retry
    --cancelled --task embedq.embed` brings them back). Jobs of fresh writes stay."""

    async def go(app: App) -> int:
        col = await app.collections.get(collection) if collection else None
        return await cancel_backfill(app, col)

    n = run(with_app(state(ctx), go))
    if json_out:
        print_json({"collection": collection, "cancelled": n})
    else:
        where = f" of {escape(collection)!r}" if collection else ""
        console.print(f"withdrew {n:,} pending backfill jobs{where}")


__all__ = ["PRIORITIES", "backfill_app", "watch_app"]
