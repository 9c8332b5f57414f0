"""`embedq db ...` (migrations) and `embedq settings ...` (typed settings with their sources)."""

from __future__ import annotations

import os
from typing import Any

import typer

from embedq import db, migrations, status, stored_settings
from embedq.app import App
from embedq.cli.common import (
    JSON_OPTION,
    console,
    print_json,
    run,
    state,
    table,
    with_app,
)
from embedq.errors import ConfigurationError
from embedq.settings import Settings, env_names, is_secret

db_app = typer.Typer(help="Database schema: migrations and checks.", no_args_is_help=True)
settings_app = typer.Typer(help="Settings and where each value comes from.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Apply pending migrations (safe to run from many processes at once)."""
    settings = state(ctx).settings()

    async def go() -> dict[str, Any]:
        async with db.connect(settings) as conn:
            where = db.describe_target(db.database_url(settings))
            applied = await migrations.upgrade(conn, settings.db_schema, where=where)
            st = await migrations.status(conn, settings.db_schema)
        return {
            "applied": [f"{m.version:04d}_{m.name}" for m in applied],
            "version": st.database_version,
            "schema": settings.db_schema,
        }

    out = run(go())
    if json_out:
        print_json(out)
    elif out["applied"]:
        console.print(
            f"applied {', '.join(out['applied'])}; schema {out['schema']!r} is at "
            f"version {out['version']}"
        )
    else:
        console.print(f"schema {out['schema']!r} is up to date (version {out['version']})")


@db_app.command("status")
def db_status(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Show the schema version, applied and pending migrations. Exit 1 when not current."""
    settings = state(ctx).settings()

    async def go() -> migrations.Status:
        async with db.connect(settings) as conn:
            return await migrations.status(conn, settings.db_schema)

    st = run(go())
    out = {
        "schema": settings.db_schema,
        "database": db.describe_target(db.database_url(settings)),
        "code_version": st.code_version,
        "database_version": st.database_version,
        "current": st.current,
        "applied": st.applied,
        "pending": st.pending,
    }
    if json_out:
        print_json(out)
    else:
        console.print(
            f"database {out['database']}, schema {settings.db_schema!r}: version "
            f"{st.database_version} (this embedq: {st.code_version})"
        )
        table("applied migrations", st.applied)
        if st.pending:
            console.print(f"[yellow]pending:[/] {st.pending}; run `embedq db upgrade`")
        if st.database_version > st.code_version:
            console.print("[red]the database is newer than this embedq: upgrade embedq[/]")
    if not st.current:
        raise typer.Exit(1)


@db_app.command("verify")
def db_verify(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Compare the live schema with the canonical one; exit 1 on any difference."""
    settings = state(ctx).settings()

    async def go() -> list[str]:
        async with db.connect(settings) as conn:
            return await migrations.verify(conn, settings.db_schema)

    problems = run(go())
    if json_out:
        print_json({"ok": not problems, "problems": problems})
    elif problems:
        for p in problems:
            console.print(f"[red]✗[/] {p}")
    else:
        console.print(f"[green]✓[/] schema {settings.db_schema!r} matches the canonical schema")
    if problems:
        raise typer.Exit(1)


async def _settings_rows(app: App) -> list[dict[str, Any]]:
    return status.settings_rows(app.settings)


@settings_app.command("list")
def settings_list(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Every setting with its value (secrets masked) and its source."""
    rows = run(with_app(state(ctx), _settings_rows))
    if json_out:
        print_json(rows)
    else:
        table(
            "settings (precedence: cli > env > database > default)",
            rows,
            ["name", "value", "source", "env"],
        )


@settings_app.command("get")
def settings_get(ctx: typer.Context, name: str, json_out: bool = JSON_OPTION) -> None:
    """One setting's value and source."""
    if name not in Settings.model_fields:
        raise ConfigurationError(f"unknown setting {name!r}; `embedq settings list` shows all")
    rows = run(with_app(state(ctx), _settings_rows))
    [row] = [r for r in rows if r["name"] == name]
    if json_out:
        print_json(row)
    else:
        console.print(f"{name} = {row['value']!r}  (from {row['source']})")


@settings_app.command("set")
def settings_set(ctx: typer.Context, name: str, value: str) -> None:
    """Store a setting in the database (an environment variable or flag still wins)."""

    async def go(app: App) -> None:
        await stored_settings.set_value(app.store, app.settings, name, value)

    run(with_app(state(ctx), go))
    shown = stored_settings.MASK if is_secret(name) else value
    console.print(f"stored {name} = {shown}")
    overriding = [e for e in env_names(name) if e in os.environ]
    if overriding:
        console.print(f"[yellow]note:[/] {overriding[0]} is set and takes precedence")


@settings_app.command("unset")
def settings_unset(ctx: typer.Context, name: str) -> None:
    """Remove a stored setting (back to the environment or default)."""

    async def go(app: App) -> bool:
        return await stored_settings.unset_value(app.store, name)

    removed = run(with_app(state(ctx), go))
    console.print(f"removed stored {name}" if removed else f"{name} was not stored")


@settings_app.command("gen-key")
def settings_gen_key() -> None:
    """Print a new key for EMBEDQ_SECRET_KEY."""
    print(stored_settings.generate_key())
