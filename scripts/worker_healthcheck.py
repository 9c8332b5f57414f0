#!/usr/bin/env python3
"""Health check of an `embedq worker` container: exit 0 while a worker of this host heartbeats.

`embedq worker` serves no HTTP route, so its health is what it records in the database: a
worker registered from this host (the container's hostname), not stopped, whose last
heartbeat is recent (within max(3 * heartbeat_s, lease_s): 30 s by default). The image
installs this file as `embedq-worker-health`; docker-compose.yml runs it as the worker's
health check (see docs/deployment.md):

    embedq-worker-health                   # exit 0: healthy, 1: not; one line on stdout says why
    embedq-worker-health --host worker-3   # the workers of another host

It reads the database with the worker's own settings (EMBEDQ_DATABASE_URL, EMBEDQ_SCHEMA...),
holds at most two connections for a moment, never migrates, and never starts the embedded
PostgreSQL: without EMBEDQ_DATABASE_URL it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any


async def _workers(host: str) -> tuple[list[dict[str, Any]], float]:
    from embedq import status
    from embedq.app import App
    from embedq.errors import ConfigurationError

    app = App()
    if app.settings.database_url is None:
        # Never start (or join) an embedded server from a health check.
        raise ConfigurationError(
            "EMBEDQ_DATABASE_URL is not set: the workers of the embedded database are "
            "checked by `embedq health` against `embedq serve`"
        )
    await app.open(migrate=False, pool_size=1)
    try:
        rows = await status.workers(app)
        return [r for r in rows if r["host"] == host], status.dead_after(app.settings)
    finally:
        await app.close()


def check(host: str) -> tuple[bool, str]:
    """(healthy, the line to print) for the workers registered from `host`."""
    from embedq.errors import EmbedqError

    try:
        mine, dead_after = asyncio.run(_workers(host))
    except EmbedqError as exc:
        return False, f"FAIL: cannot read the workers from the database: {exc}"
    alive = [w for w in mine if w["state"] == "running"]
    if alive:
        w = min(alive, key=lambda r: float(r["heartbeat_age_s"]))
        return True, (
            f"ok: worker {w['name']!r} (id {w['id']}) heartbeat "
            f"{float(w['heartbeat_age_s']):.1f} s ago, {w['running']} jobs running"
        )
    seen = ", ".join(f"{w['name']} {w['state']}" for w in mine) or "none registered"
    return False, (
        f"FAIL: no worker of host {host!r} is running with a heartbeat in the last "
        f"{dead_after:g} s ({seen}); see the worker's log"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedq-worker-health",
        description="Exit 0 while an `embedq worker` of this host heartbeats, 1 otherwise.",
    )
    parser.add_argument(
        "--host",
        default=socket.gethostname(),
        help="the workers' host name as they registered it (default: this host's)",
    )
    args = parser.parse_args(argv)
    ok, line = check(args.host)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
