"""`embedq serve`, `embedq health` and `embedq token ...`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import httpx
import typer

from embedq.app import App
from embedq.cli.common import JSON_OPTION, console, print_json, run, state, table, with_app
from embedq.tokens import Tokens

token_app = typer.Typer(
    help="API tokens of the HTTP service (stored hashed).", no_args_is_help=True
)


def serve(
    ctx: typer.Context,
    host: str | None = typer.Option(
        None, "--host", help="Address to listen on (EMBEDQ_API_HOST, default 127.0.0.1)."
    ),
    port: int | None = typer.Option(
        None, "--port", "-p", min=1, max=65_535, help="Port (EMBEDQ_API_PORT, default 8000)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-w",
        min=0,
        max=64,
        help="Workers run in this process (serve_workers, default 1).",
    ),
    no_workers: bool = typer.Option(
        False, "--no-workers", help="Serve the API only; run `embedq worker` elsewhere."
    ),
    app_path: str | None = typer.Option(
        None, "--app", help="Your App as 'package.module:app' (EMBEDQ_APP)."
    ),
) -> None:
    """Run the HTTP API, the dashboard (/ui) and in-process workers until SIGTERM/SIGINT.

    On a fresh database it migrates and prints a first admin token, once."""
    from embedq.api.serve import serve as run_service

    extra = {"app": app_path, "api_host": host, "api_port": port}
    app = state(ctx).app(**{k: v for k, v in extra.items() if v is not None})
    s = app.settings
    count = 0 if no_workers else (workers if workers is not None else s.serve_workers)

    def announce(url: str, first_token: str | None) -> None:
        # To the terminal, not the log: a token must never reach a log line.
        lines = [f"embedq {url}  dashboard {url}/ui/  API {url}/v1  (OpenAPI {url}/openapi.json)"]
        lines.append(
            f"workers in this process: {count}" + ("" if count else " (run `embedq worker`)")
        )
        if first_token:
            lines += [
                "",
                "first admin token (shown once: store it now; `embedq token revoke admin` "
                "revokes it):",
                f"  {first_token}",
                "",
            ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    asyncio.run(
        run_service(app, host=s.api_host, port=s.api_port, workers=count, announce=announce)
    )


def health(
    live: bool = typer.Option(False, "--live", help="Only check that the process answers."),
    ready: bool = typer.Option(
        False, "--ready", help="Check database, schema, workers, circuits (the default)."
    ),
    url: str | None = typer.Option(
        None,
        "--url",
        help="Base URL of the service (EMBEDQ_HEALTH_URL; default http://127.0.0.1:PORT "
        "with EMBEDQ_API_PORT or 8000).",
    ),
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, max=300, help="Seconds to wait."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Exit 0 when the service is healthy, 1 when not: a container health check with no curl."""
    if live and ready:
        console.print("[red]error:[/] choose one of --live and --ready")
        raise typer.Exit(2)
    base = (url or os.environ.get("EMBEDQ_HEALTH_URL") or _default_url()).rstrip("/")
    path = "/health/live" if live else "/health/ready"
    try:
        response = httpx.get(base + path, timeout=timeout)
        body: Any = response.json()
        ok = response.status_code == 200
    except httpx.HTTPError as exc:
        body = {
            "status": "fail",
            "error": f"cannot reach {base}{path}: {exc or type(exc).__name__}",
        }
        ok = False
    except ValueError:
        body = {"status": "fail", "error": f"{base}{path} did not answer JSON: is it embedq?"}
        ok = False
    if json_out:
        print_json(body)
    else:
        console.print(f"{'ok' if ok else 'FAIL'}: {base}{path} {body.get('status', '')}".rstrip())
        for c in body.get("checks", []):
            mark = (
                "[green]✓[/]" if c["ok"] else ("[red]✗[/]" if c.get("critical") else "[yellow]![/]")
            )
            console.print(f"  {mark} {c['check']}: {c['detail']}")
        if "error" in body:
            console.print(f"  {body['error']}")
    if not ok:
        raise typer.Exit(1)


def _default_url() -> str:
    port = os.environ.get("EMBEDQ_API_PORT", "8000")
    return f"http://127.0.0.1:{port}"


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str = typer.Option(..., "--name", help="A name for the token (who or what uses it)."),
    scopes: str = typer.Option(
        "read", "--scopes", help="Comma-separated: read, write, admin (admin allows everything)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Create a token. Its secret is printed once and never stored: keep it now."""

    async def go(app: App) -> dict[str, Any]:
        info, secret = await Tokens(app).create(name, scopes)
        return {**info.to_json(), "token": secret}

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
        return
    console.print(f"token {out['name']!r} with scopes {','.join(out['scopes'])} (shown once):")
    sys.stdout.write(out["token"] + "\n")


@token_app.command("list")
def token_list(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", help="Include revoked tokens."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Tokens with their scopes and last use (never their secrets)."""

    async def go(app: App) -> list[dict[str, Any]]:
        return [t.to_json() for t in await Tokens(app).list(include_revoked=all_)]

    rows = run(with_app(state(ctx), go))
    if json_out:
        print_json(rows)
        return
    for r in rows:
        r["scopes"] = ",".join(r["scopes"])
        r["prefix"] = r["prefix"] + "…"
    table("tokens", rows, ["id", "name", "prefix", "scopes", "created_at", "last_used_at",
                            *(["revoked_at"] if all_ else [])])  # fmt: skip


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The token's name or id."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Revoke a token: it stops working within seconds."""

    async def go(app: App) -> dict[str, Any]:
        info = await Tokens(app).revoke(name)
        return {"revoked": info.name, "id": info.id}

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
    else:
        console.print(f"revoked token {out['revoked']!r} (id {out['id']})")
