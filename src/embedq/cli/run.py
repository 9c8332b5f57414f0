"""`embedq worker` and `embedq demo`."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import typer

from embedq import metrics, tracing
from embedq.app import App
from embedq.cli.common import console, print_json, state, table
from embedq.jobs import JobSpec
from embedq.worker import Worker


def worker(
    ctx: typer.Context,
    queues: str | None = typer.Option(
        None,
        "--queues",
        "-q",
        help="Comma-separated queues to serve, in no particular order "
        "(priority orders jobs); default: all queues.",
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", min=1, max=10_000, help="Jobs run at once (default 10)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, max=10_000, help="Most jobs claimed per round trip."
    ),
    app_path: str | None = typer.Option(
        None, "--app", help="Your App as 'package.module:app' (EMBEDQ_APP)."
    ),
    name: str | None = typer.Option(None, "--name", help="Worker name (default host:pid)."),
    no_migrate: bool = typer.Option(
        False, "--no-migrate", help="Do not apply pending migrations at start; refuse instead."
    ),
    exit_when_idle: bool = typer.Option(
        False, "--exit-when-idle", help="Exit once no job is pending or running."
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        min=1,
        max=65_535,
        help="Serve this worker's Prometheus metrics at http://0.0.0.0:PORT/ (docs/metrics.md).",
    ),
) -> None:
    """Run a worker until SIGTERM/SIGINT (a second signal stops at once)."""
    extra = {"app": app_path, "worker_queues": queues}
    app = state(ctx).app(**{k: v for k, v in extra.items() if v is not None})
    tracing.setup()  # exports spans when OTEL_EXPORTER_OTLP_ENDPOINT is set
    if metrics_port is not None:
        metrics.serve_worker_metrics(metrics_port)
    w = Worker(
        app,
        concurrency=concurrency,
        batch_size=batch_size,
        name=name,
        migrate=False if no_migrate else None,
        exit_when_idle=exit_when_idle,
    )
    asyncio.run(w.run())
    if w.abandoned_threads:
        # Their jobs were released and may already run elsewhere: do not wait for the threads.
        logging.getLogger("embedq.worker").warning(
            "%d task threads still running after their jobs were released; exiting without "
            "waiting for them",
            w.abandoned_threads,
        )
        logging.shutdown()
        os._exit(0)


def demo(
    ctx: typer.Context,
    jobs: int = typer.Option(200, "--jobs", min=1, max=1_000_000, help="Demo jobs to run."),
    embed: bool = typer.Option(
        True, "--embed/--no-embed", help="Also embed and search the bundled demo documents."
    ),
    provider: str | None = typer.Option(
        None, "--provider", help="Provider of the demo collection (default: embedding_provider)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the final status as JSON."),
) -> None:
    """Quick start: migrate, run demo jobs through a worker, then embed the bundled documents
    with the local model and search them."""
    st = state(ctx)

    async def go() -> dict[str, object]:
        app = st.app()
        await app.open(migrate=True)
        try:
            specs = [JobSpec("embedq.echo", {"n": i}, priority=i % 3) for i in range(jobs - 1)]
            specs.append(JobSpec("embedq.sleep", {"seconds": 0.2}, queue="low"))
            await app.enqueue(specs)
            if not json_out:
                console.print(f"enqueued {jobs} demo jobs; running a worker until they are done...")
            out: dict[str, object] = {}
            if embed:
                await _demo_documents(app, provider, json_out)
            w = Worker(app, concurrency=20, exit_when_idle=True, install_signals=False)
            await w.run()
            [overview] = await app.store.fetch("queue_overview", {"dead_after_s": 60})
            counts = await app.store.fetch("counts", {"window_s": 3600})
            if embed:
                col = await app.collections.get(DEMO_COLLECTION)
                out["search"] = [
                    {"query": q, "hits": [h.to_json() for h in await col.search(q, k=3)]}
                    for q in DEMO_QUERIES
                ]
                out["collection"] = col.to_json()
            return {"processed": w.processed, "overview": overview, "by_queue": counts, **out}
        finally:
            await app.close()

    result = asyncio.run(go())
    if json_out:
        print_json(result)
        return
    console.print(f"[green]done:[/] {result['processed']} jobs succeeded")
    table("jobs by queue (last hour)", result["by_queue"])  # type: ignore[arg-type]
    for search in result.get("search", []):  # type: ignore[attr-defined]
        rows = [
            {"rank": i + 1, "key": h["key"], "score": h["score"]}
            for i, h in enumerate(search["hits"])
        ]
        table(f"search: {search['query']!r}", rows)
    console.print(
        "next: `embedq worker` runs a long-lived worker; `embedq ingest DIR --collection demo` "
        "adds your files; `embedq search 'question' --collection demo`; see docs/pipeline.md"
    )


DEMO_COLLECTION = "demo"
DEMO_QUERIES = (
    "how do bees tell each other where the flowers are",
    "reclaim the space of dead rows",
)


async def _demo_documents(app: App, provider: str | None, quiet: bool) -> None:
    """Create the demo collection and write the bundled documents into it."""
    from importlib import resources

    from embedq import ingest

    col = await app.collections.create(DEMO_COLLECTION, provider=provider, exist_ok=True)
    root = Path(str(resources.files("embedq") / "data" / "demo"))
    docs = [
        d
        for path in ingest.discover([root])
        for d in ingest.read_file(path, root)
        if isinstance(d, ingest.SourceDoc)
    ]
    await col.upsert_many(
        [{"key": d.key, "text": d.text, "title": d.title, "metadata": d.metadata} for d in docs]
    )
    if not quiet:
        console.print(
            f"wrote {len(docs)} documents to collection {DEMO_COLLECTION!r} "
            f"({col.active.config.provider}/{col.active.config.model}); the worker embeds them"
        )
