"""`embedq mcp`: the MCP server on stdin/stdout, for an assistant that spawns it (docs/mcp.md).

stdout is the protocol's channel: the log goes to stderr (logs.py), and while serving the SDK
points file descriptor 1 at stderr too, so a stray print cannot corrupt a message.
"""

from __future__ import annotations

import typer

from embedq.app import App
from embedq.cli.common import run, state, with_app


def mcp(ctx: typer.Context) -> None:
    """Serve search, documents and the queue to an AI assistant over MCP (stdio).

    An MCP client (Claude Desktop, an IDE) runs this command and talks to it on stdin/stdout.

    It stops when the client closes stdin. `embedq serve` offers the same tools at /mcp."""
    # Imported here: the SDK takes a second to import, which other commands need not pay.
    from embedq.mcp_server import build_server

    async def go(app: App) -> None:
        await build_server(app).run_stdio_async()

    run(with_app(state(ctx), go))
