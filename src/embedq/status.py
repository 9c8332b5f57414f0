"""What the queue, the workers and the settings look like now: the read models that the CLI
(`embedq queue status`, `settings list`), the HTTP API and the dashboard all show.

    overview = await queue_status(app)     # counts now, per queue
    checks = health_checks(overview["overview"], max_age_s=300)
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from embedq import stored_settings
from embedq.settings import Settings, env_names, is_bootstrap, is_secret

if TYPE_CHECKING:
    from embedq.app import App


def plain(value: Any) -> Any:
    """Rows as plain JSON values: datetimes as ISO text, numerics (Decimal) as floats."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def dead_after(settings: Settings) -> float:
    """Seconds without a heartbeat after which a worker counts as dead."""
    return max(3 * settings.heartbeat_s, settings.lease_s)


async def overview(app: App) -> dict[str, Any]:
    [row] = await app.store.fetch("queue_overview", {"dead_after_s": dead_after(app.settings)})
    return row


async def queue_status(app: App) -> dict[str, Any]:
    """Counts now (pending, running, stuck, dead...) and per queue, with paused flags."""
    counts = await app.store.fetch("counts", {"window_s": 3600})

    def empty(paused: bool) -> dict[str, Any]:
        return {"paused": paused, "pending": 0, "running": 0, "succeeded_1h": 0,
                "dead_1h": 0, "cancelled_1h": 0}  # fmt: skip

    queues = {q["name"]: empty(q["paused"]) for q in await app.store.queues()}
    for row in counts:
        q = queues.setdefault(row["queue"], empty(False))
        key = row["state"] if row["state"] in ("pending", "running") else f"{row['state']}_1h"
        q[key] = int(row["n"])
    return {"overview": await overview(app), "queues": queues}


async def workers(app: App) -> list[dict[str, Any]]:
    """Workers with their heartbeats; one whose heartbeat stopped shows as dead."""
    return await app.store.fetch("workers", {"dead_after_s": dead_after(app.settings)})


def health_checks(overview: dict[str, Any], max_age_s: float) -> list[dict[str, Any]]:
    """The queue's health, check by check, from `overview()` (the database answered)."""
    due = int(overview["due"])
    age = float(overview["oldest_due_age_s"] or 0)
    alive = int(overview["workers_alive"])
    return [
        {"check": "database", "ok": True, "detail": "reachable, schema current"},
        {
            "check": "workers",
            "ok": alive > 0 or due == 0,
            "detail": f"{alive} alive"
            + (
                ""
                if alive or not due
                else f", {due} jobs due and none to run them: start `embedq worker`"
            ),
        },
        {
            "check": "stuck",
            "ok": int(overview["stuck"]) == 0,
            "detail": f"{overview['stuck']} running jobs past their lease"
            + (
                " (a worker will reclaim them; `embedq queue reset-stuck` now)"
                if int(overview["stuck"])
                else ""
            ),
        },
        {
            "check": "backlog",
            "ok": age <= max_age_s,
            "detail": f"oldest due job waits {age:.1f} s (limit {max_age_s:g} s)",
        },
        {
            "check": "dead_last_hour",
            "ok": True,
            "detail": f"{overview['dead_last_hour']} jobs dead-lettered in the last hour",
        },
    ]


def settings_rows(settings: Settings) -> list[dict[str, Any]]:
    """Every setting with its value (secrets masked), its source and whether it may be
    changed at run time (stored in the database, and not pinned by a flag or variable)."""
    return [
        {
            "name": name,
            "value": stored_settings.shown(settings, name),
            "source": settings.source(name),
            "env": env_names(name)[0],
            "stored_in_db": not is_bootstrap(name),
            "secret": is_secret(name),
            "editable": not is_bootstrap(name) and settings.source(name) not in ("cli", "env"),
            "description": field.description,
        }
        for name, field in Settings.model_fields.items()
    ]
