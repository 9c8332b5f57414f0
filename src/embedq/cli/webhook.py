"""`embedq webhook set|list|remove`: a collection's webhook (docs/webhooks.md)."""

from __future__ import annotations

import sys
from typing import Any

import typer

from embedq.app import App
from embedq.cli.common import JSON_OPTION, console, print_json, run, state, table, with_app
from embedq.webhooks import Webhooks

webhook_app = typer.Typer(
    help="Webhooks: a URL called when a collection's document is embedded or fails.",
    no_args_is_help=True,
)

COLLECTION_OPTION = typer.Option(..., "--collection", "-c", help="The collection.")


@webhook_app.command("set")
def webhook_set(
    ctx: typer.Context,
    collection: str = COLLECTION_OPTION,
    url: str = typer.Option(..., "--url", help="Where events are POSTed (http:// or https://)."),
    events: str = typer.Option(
        "embedded,failed",
        "--events",
        help="Comma-separated: embedded, failed ('dead' means failed).",
    ),
    disable: bool = typer.Option(
        False, "--disable", help="Keep the webhook but record no events until set again."
    ),
    rotate_secret: bool = typer.Option(
        False, "--rotate-secret", help="Give an existing webhook a new secret (printed once)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Create or change a collection's webhook. A new secret is printed once: keep it now."""

    async def go(app: App) -> dict[str, Any]:
        saved = await Webhooks(app).set(
            collection, url, events=events, enabled=not disable, rotate_secret=rotate_secret
        )
        out = {**saved.webhook.to_json(), "created": saved.created}
        if saved.secret is not None:
            out["secret"] = saved.secret
        return out

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
        return
    what = "created" if out["created"] else "changed"
    state_note = "" if out["enabled"] else " (disabled)"
    console.print(
        f"webhook of collection {out['collection']!r} {what}: POST {out['url']} on "
        f"{','.join(out['events'])}{state_note}"
    )
    if "secret" in out:
        console.print("signing secret (shown once; receivers verify X-Embedq-Signature with it):")
        sys.stdout.write(out["secret"] + "\n")
    else:
        console.print("its signing secret is unchanged (--rotate-secret makes a new one)")


@webhook_app.command("list")
def webhook_list(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Every collection's webhook (never its secret)."""

    async def go(app: App) -> list[dict[str, Any]]:
        return [h.to_json() for h in await Webhooks(app).list()]

    rows = run(with_app(state(ctx), go))
    if json_out:
        print_json(rows)
        return
    for r in rows:
        r["events"] = ",".join(r["events"])
    table("webhooks", rows, ["collection", "url", "events", "enabled", "created_at"])


@webhook_app.command("remove")
def webhook_remove(
    ctx: typer.Context, collection: str = COLLECTION_OPTION, json_out: bool = JSON_OPTION
) -> None:
    """Remove a collection's webhook; deliveries still queued for it are skipped."""

    async def go(app: App) -> bool:
        return await Webhooks(app).remove(collection)

    removed = run(with_app(state(ctx), go))
    if json_out:
        print_json({"collection": collection, "removed": removed})
    elif removed:
        console.print(f"removed the webhook of collection {collection!r}")
    else:
        console.print(f"collection {collection!r} has no webhook")
    if not removed:
        raise typer.Exit(1)
