"""The `embedq` command line: `serve`, `health`, `token`, `worker`, `db`, `settings`, `queue`,
`demo`, `collection`, `doc`, `search`, `ingest`, `eval`, `provider`, `mcp`, `webhook`,
`watch`, `backfill`.

Every command takes `--json` where it prints data, and every error is one line naming the
problem and the fix, with a non-zero exit; never a traceback.
"""

from __future__ import annotations

import sys

import typer

from embedq.cli import (
    admin,
    collection,
    evaluate,
    mcp,
    queue,
    run,
    search,
    service,
    watch,
    webhook,
)
from embedq.cli.common import State, console_err, setup_logging
from embedq.errors import EmbedqError

app = typer.Typer(
    name="embedq",
    help="Background embeddings and a durable job queue on PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(admin.db_app, name="db")
app.add_typer(admin.settings_app, name="settings")
app.add_typer(queue.queue_app, name="queue")
app.command("serve")(service.serve)
app.command("health")(service.health)
app.add_typer(service.token_app, name="token")
app.command("worker")(run.worker)
app.command("demo")(run.demo)
app.add_typer(collection.collection_app, name="collection")
app.add_typer(collection.doc_app, name="doc")
app.add_typer(search.provider_app, name="provider")
app.command("search")(search.search)
app.command("ingest")(search.ingest)
app.command("eval")(evaluate.eval_)
app.command("mcp")(mcp.mcp)
app.add_typer(webhook.webhook_app, name="webhook")
app.add_typer(watch.watch_app, name="watch")
app.add_typer(watch.backfill_app, name="backfill")


@app.callback()
def root(
    ctx: typer.Context,
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        envvar=None,
        help="PostgreSQL URL (default: EMBEDQ_DATABASE_URL, "
        "DATABASE_URL, else the embedded server).",
        show_default=False,
    ),
    data_dir: str | None = typer.Option(
        None, "--data-dir", help="Data directory of the embedded server (EMBEDQ_DATA_DIR)."
    ),
    schema: str | None = typer.Option(
        None, "--schema", help="PostgreSQL schema of embedq's tables (EMBEDQ_SCHEMA)."
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    log_format: str | None = typer.Option(None, "--log-format", help="text or json."),
) -> None:
    """Background embeddings and a durable job queue on PostgreSQL."""
    cli = {
        "database_url": database_url,
        "data_dir": data_dir,
        "db_schema": schema,
        "log_level": log_level.upper() if log_level else None,
        "log_format": log_format,
    }
    state = State({k: v for k, v in cli.items() if v is not None})
    ctx.obj = state
    setup_logging(state.settings())


def main() -> None:
    """Console-script entry point: run the CLI, turning embedq errors into clean exits."""
    try:
        app()
    except EmbedqError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console_err.print("interrupted")
        sys.exit(130)
