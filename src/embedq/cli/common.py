"""What the CLI commands share: global options, output (table or --json), confirmation."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from embedq import logs
from embedq.app import App, load_app
from embedq.settings import Settings
from embedq.status import plain as to_jsonable

console = Console(highlight=False, soft_wrap=True)
console_err = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")
YES_OPTION = typer.Option(False, "--yes", "-y", "--confirm", help="Do not ask for confirmation.")


@dataclass
class State:
    """Global CLI options, passed to every command through the Typer context."""

    cli: dict[str, Any] = field(default_factory=dict)

    def settings(self, **extra: Any) -> Settings:
        return Settings.load(cli={**self.cli, **extra})

    def app(self, **extra: Any) -> App:
        settings = self.settings(**extra)
        app = load_app(settings.app)
        app.overrides = {**app.overrides, **self.cli, **extra}
        app.settings = Settings.load(cli=app.overrides)
        return app


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, State) else State()


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def with_app(st: State, work: Callable[[App], Awaitable[T]], **extra: Any) -> T:
    app = st.app(**extra)
    await app.open()
    try:
        return await work(app)
    finally:
        await app.close()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, default=str) + "\n")


def table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    if not rows:
        console.print(f"{title}: none")
        return
    columns = columns or list(rows[0])
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_cell(r.get(c)) for c in columns))
    console.print(t)


def _cell(v: Any) -> str:
    return escape(_text(v))  # a key like "[draft]" is text, not Rich markup


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, float | Decimal):
        return f"{float(v):.3f}".rstrip("0").rstrip(".")
    if isinstance(v, dict | list):
        text = json.dumps(v, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(v)


def confirm(question: str, yes: bool) -> None:
    """Ask before a destructive change; without a terminal, demand --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        console_err.print(f"[red]refused:[/] {question} Pass --yes to confirm.")
        raise typer.Exit(1)
    if not typer.confirm(question):
        raise typer.Exit(1)


def setup_logging(settings: Settings) -> None:
    logs.setup(settings)
