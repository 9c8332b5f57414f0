"""`embedq queue ...`: look at the queue and act on it. Each command has `--json`."""

from __future__ import annotations

import json
from typing import Any

import typer

from embedq import status as status_
from embedq.app import App
from embedq.cli.common import (
    JSON_OPTION,
    YES_OPTION,
    confirm,
    console,
    print_json,
    run,
    state,
    table,
    with_app,
)
from embedq.errors import InvalidJob, SchemaError
from embedq.jobs import JobSpec, in_seconds

queue_app = typer.Typer(help="Inspect and administer the job queue.", no_args_is_help=True)
LIST_COLUMNS = [
    "id",
    "task",
    "queue",
    "state",
    "priority",
    "attempts",
    "max_attempts",
    "run_at",
    "last_error",
]


@queue_app.command("status")
def status(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Counts now: pending, running, stuck, dead; per queue, with paused flags."""
    out = run(with_app(state(ctx), status_.queue_status))
    if json_out:
        print_json(out)
        return
    o = out["overview"]
    console.print(
        f"pending {o['pending']} (due {o['due']}), running {o['running']}, stuck {o['stuck']}, "
        f"dead {o['dead']}, succeeded {o['succeeded_last_minute']}/min "
        f"{o['succeeded_last_hour']}/h, workers alive {o['workers_alive']}"
    )
    rows = [{"queue": k, **v} for k, v in out["queues"].items()]
    table("queues", rows)


@queue_app.command("stats")
def stats(
    ctx: typer.Context,
    hours: float = typer.Option(24.0, "--hours", min=0.01, help="Time window."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Per task over a window: succeeded, dead, run time (avg, p95), wait; throughput."""

    async def go(app: App) -> dict[str, Any]:
        window = {"window_s": hours * 3600}
        return {
            "window_hours": hours,
            "tasks": await app.store.fetch("task_stats", window),
            "throughput_per_minute": await app.store.fetch("throughput", window),
        }

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
        return
    table(f"tasks, last {hours:g} h", out["tasks"])
    table("finished per minute", out["throughput_per_minute"][:30])


@queue_app.command("health")
def health(
    ctx: typer.Context,
    max_age: float = typer.Option(300.0, "--max-age", help="Oldest due job allowed, seconds."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Health checks with an exit code (0 healthy, 1 not): database, schema, workers, backlog."""

    async def go(app: App) -> dict[str, Any]:
        return await status_.overview(app)

    try:
        overview = run(with_app(state(ctx), go))
        checks = status_.health_checks(overview, max_age)
    except SchemaError as exc:
        checks = [{"check": "database", "ok": False, "detail": str(exc)}]
    ok = all(c["ok"] for c in checks)
    if json_out:
        print_json({"ok": ok, "checks": checks})
    else:
        for c in checks:
            mark = "[green]✓[/]" if c["ok"] else "[red]✗[/]"
            console.print(f"{mark} {c['check']}: {c['detail']}")
    if not ok:
        raise typer.Exit(1)


@queue_app.command("metrics")
def metrics(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Queue metrics in Prometheus text format (or JSON)."""
    out = run(with_app(state(ctx), status_.queue_status))
    o = out["overview"]
    if json_out:
        print_json(out)
        return
    lines = [
        "# HELP embedq_jobs Jobs in the queue by queue and state (finished states: last hour).",
        "# TYPE embedq_jobs gauge",
    ]
    for name, q in sorted(out["queues"].items()):
        for key in ("pending", "running", "succeeded_1h", "dead_1h", "cancelled_1h"):
            lines.append(f'embedq_jobs{{queue="{name}",state="{key}"}} {q[key]}')
    scalars = {
        "embedq_jobs_stuck": ("gauge", "Running jobs past their lease.", o["stuck"]),
        "embedq_jobs_dead_total": ("gauge", "Jobs in the dead-letter archive.", o["dead"]),
        "embedq_oldest_due_job_age_seconds": (
            "gauge",
            "Wait of the oldest due pending job.",
            float(o["oldest_due_age_s"] or 0),
        ),
        "embedq_workers_alive": ("gauge", "Workers with a recent heartbeat.", o["workers_alive"]),
        "embedq_queue_paused": None,
    }
    for metric, spec in scalars.items():
        if spec is None:
            lines += [f"# HELP {metric} 1 when the queue is paused.", f"# TYPE {metric} gauge"]
            lines += [
                f'{metric}{{queue="{n}"}} {int(q["paused"])}'
                for n, q in sorted(out["queues"].items())
            ]
            continue
        kind, help_text, value = spec
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {value}"]
    print("\n".join(lines))


@queue_app.command("recent")
def recent(
    ctx: typer.Context,
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=10_000),
    active: bool = typer.Option(False, "--active", help="Pending and running jobs instead."),
    json_out: bool = JSON_OPTION,
) -> None:
    """The most recently finished jobs (or, with --active, the ones still queued)."""
    rows = run(
        with_app(
            state(ctx), lambda a: a.store.fetch("active" if active else "recent", {"limit": limit})
        )
    )
    if json_out:
        print_json(rows)
    else:
        table(
            "active jobs" if active else "recently finished",
            rows,
            [*LIST_COLUMNS[:-1], "finished_at", "outcome"],
        )


@queue_app.command("failed")
def failed(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=10_000),
    details: bool = typer.Option(False, "--details", help="Show the full error of each job."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Dead jobs and jobs waiting for a retry, with their last error."""
    rows = run(with_app(state(ctx), lambda a: a.store.fetch("failed", {"limit": limit})))
    if json_out:
        print_json(rows)
        return
    if not details:
        for r in rows:
            r["last_error"] = (r["last_error"] or "").strip().splitlines()[-1:] or [""]
            r["last_error"] = r["last_error"][0][:100]
        table("failed jobs", rows, [*LIST_COLUMNS, "error_kind"])
        return
    for r in rows:
        console.print(
            f"[bold]job {r['id']}[/] {r['task']} on {r['queue']}: {r['state']}, "
            f"attempt {r['attempts']}/{r['max_attempts']}, kind {r['error_kind']}"
        )
        console.print(f"  args: {json.dumps(r['args'])}")
        console.print("  " + (r["last_error"] or "").replace("\n", "\n  "))


@queue_app.command("stuck")
def stuck(
    ctx: typer.Context,
    grace: float = typer.Option(0.0, "--grace", min=0, help="Only leases overdue this long (s)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Running jobs whose lease expired: their worker crashed, was killed or froze."""
    rows = run(with_app(state(ctx), lambda a: a.store.fetch("stuck", {"grace_s": grace})))
    if json_out:
        print_json(rows)
    else:
        table(
            "stuck jobs (workers reclaim them automatically)",
            rows,
            ["id", "task", "queue", "worker_id", "attempts", "started_at", "overdue_s"],
        )


@queue_app.command("reset-stuck")
def reset_stuck(ctx: typer.Context, yes: bool = YES_OPTION, json_out: bool = JSON_OPTION) -> None:
    """Reclaim stuck jobs now (workers also do this on their own within seconds)."""

    async def go(app: App) -> dict[str, int]:
        rows = await app.store.fetch("stuck", {"grace_s": 0})
        if not rows:
            return {"requeued": 0, "dead": 0}
        confirm(f"Reclaim {len(rows)} stuck jobs (the attempt counts)?", yes)
        return await app.store.reclaim_expired([int(r["id"]) for r in rows])

    out = run(with_app(state(ctx), go))
    if json_out:
        print_json(out)
    else:
        console.print(f"requeued {out['requeued']}, dead-lettered {out['dead']} (last attempt)")


@queue_app.command("retry")
def retry(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(None, help="Job ids to retry."),
    all_dead: bool = typer.Option(False, "--all-dead", help="Every dead job (filters apply)."),
    task: str | None = typer.Option(None, "--task", help="Only jobs of this task."),
    queue_name: str | None = typer.Option(None, "--queue", help="Only jobs of this queue."),
    error: str | None = typer.Option(None, "--error", help="Only jobs whose error contains this."),
    cancelled: bool = typer.Option(
        False, "--cancelled", help="With filters: cancelled (or cleared) jobs instead of dead."
    ),
    yes: bool = YES_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Put dead (or cancelled) jobs back in their queue with fresh attempts."""
    if not ids and not (all_dead or task or queue_name or error or cancelled):
        raise InvalidJob("name job ids, or --all-dead (optionally with --task/--queue/--error)")
    kind = "cancelled" if cancelled else "dead"

    async def go(app: App) -> list[int]:
        if not ids:
            confirm(f"Retry every {kind} job matching the filters?", yes)
        return await app.store.retry(
            ids or None, task=task, queue=queue_name, error=error, state=None if ids else kind
        )

    retried = run(with_app(state(ctx), go))
    if json_out:
        print_json({"retried": retried})
        return
    console.print(f"retried {len(retried)} jobs" + (f": {retried[:20]}" if retried else ""))
    missing = sorted(set(ids or []) - set(retried))
    if missing:
        console.print(f"[yellow]not retried[/] (unknown, or not dead/cancelled): {missing}")
        raise typer.Exit(1)


@queue_app.command("cancel")
def cancel(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(..., help="Job ids to cancel."),
    yes: bool = YES_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Cancel pending or running jobs (they go to the archive; `retry` brings them back)."""

    async def go(app: App) -> list[dict[str, Any]]:
        confirm(f"Cancel {len(ids)} jobs?", yes)
        return await app.store.cancel(ids)

    done = run(with_app(state(ctx), go))
    if json_out:
        print_json({"cancelled": [d["id"] for d in done]})
        return
    console.print(f"cancelled {len(done)} jobs")
    missing = sorted(set(ids) - {d["id"] for d in done})
    if missing:
        console.print(f"[yellow]not cancelled[/] (unknown or already finished): {missing}")
        raise typer.Exit(1)


def _pause(ctx: typer.Context, name: str, paused: bool, json_out: bool) -> None:
    run(with_app(state(ctx), lambda a: a.store.set_paused(name, paused)))
    if json_out:
        print_json({"queue": name, "paused": paused})
    else:
        console.print(f"queue {name!r} {'paused' if paused else 'resumed'}")


@queue_app.command("pause")
def pause(ctx: typer.Context, name: str, json_out: bool = JSON_OPTION) -> None:
    """Stop workers claiming from a queue (persisted; running jobs finish)."""
    _pause(ctx, name, True, json_out)


@queue_app.command("resume")
def resume(ctx: typer.Context, name: str, json_out: bool = JSON_OPTION) -> None:
    """Let workers claim from a paused queue again."""
    _pause(ctx, name, False, json_out)


@queue_app.command("clear")
def clear(
    ctx: typer.Context,
    queue_name: str | None = typer.Option(None, "--queue", help="Only this queue."),
    yes: bool = YES_OPTION,
    json_out: bool = JSON_OPTION,
) -> None:
    """Cancel every pending job (of one queue, or all); `retry` can bring them back."""

    async def go(app: App) -> int:
        where = f"queue {queue_name!r}" if queue_name else "all queues"
        confirm(f"Cancel every pending job in {where}?", yes)
        return await app.store.clear(queue_name)

    n = run(with_app(state(ctx), go))
    if json_out:
        print_json({"cleared": n})
    else:
        console.print(f"cleared {n} pending jobs (archived as cancelled)")


@queue_app.command("cleanup")
def cleanup(
    ctx: typer.Context,
    days: float | None = typer.Option(
        None,
        "--days",
        min=0,
        help="Remove finished jobs older than this (default: setting archive_retention_days).",
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Remove old finished jobs, events and worker rows (workers do this hourly)."""
    out = run(with_app(state(ctx), lambda a: a.store.cleanup(days)))
    if json_out:
        print_json(out)
    else:
        console.print("removed " + ", ".join(f"{v} {k}" for k, v in out.items()))


@queue_app.command("show")
def show(ctx: typer.Context, job_id: int, json_out: bool = JSON_OPTION) -> None:
    """One job with its event history."""
    job = run(with_app(state(ctx), lambda a: a.store.get(job_id)))
    if json_out:
        print_json(job)
        return
    events = job.pop("events")
    for k, v in job.items():
        console.print(f"{k:>16}: {v}")
    table("events", events)


@queue_app.command("workers")
def workers(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """Workers with their heartbeats; one whose heartbeat stopped shows as dead."""

    async def go(app: App) -> list[dict[str, Any]]:
        return await status_.workers(app)

    rows = run(with_app(state(ctx), go))
    if json_out:
        print_json(rows)
    else:
        table(
            "workers",
            rows,
            [
                "id",
                "name",
                "state",
                "queues",
                "concurrency",
                "running",
                "processed",
                "failed",
                "heartbeat_age_s",
            ],
        )


@queue_app.command("enqueue")
def enqueue(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name."),
    args: str = typer.Option("{}", "--args", help="Arguments as a JSON object."),
    queue_name: str | None = typer.Option(None, "--queue", help="Queue (default: the task's)."),
    priority: int | None = typer.Option(None, "--priority", help="0 (lowest) to 1000."),
    delay: float | None = typer.Option(None, "--delay", min=0, help="Run after this many seconds."),
    lock_key: str | None = typer.Option(None, "--lock-key"),
    dedup_key: str | None = typer.Option(None, "--dedup-key"),
    count: int = typer.Option(1, "--count", min=1, max=1_000_000, help="Enqueue this many."),
    any_task: bool = typer.Option(
        False, "--any-task", help="Allow a task this app does not define (another service's)."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Enqueue a job by task name (for operations and scripts)."""
    try:
        parsed = json.loads(args)
    except ValueError as exc:
        raise InvalidJob(
            f"--args is not valid JSON ({exc}); example: --args '{{\"id\": 7}}'"
        ) from None

    async def go(app: App) -> list[int]:
        known = app.tasks.get(task)
        if known is None and not any_task:
            app.get_task(task)  # raises UnknownTask with the list
        spec = JobSpec(
            task,
            parsed,
            queue=queue_name or (known.queue if known else "default"),
            priority=priority if priority is not None else (known.priority if known else 0),
            run_at=in_seconds(delay) if delay else None,
            max_attempts=known.retry.max_attempts if known else app.settings.retry_max_attempts,
            lock_key=lock_key,
            dedup_key=dedup_key,
        )
        tickets = await app.enqueue([spec] * count)
        return sorted({t.id for t in tickets})

    ids = run(with_app(state(ctx), go))
    if json_out:
        print_json({"ids": ids})
    else:
        console.print(f"enqueued {len(ids)} job(s): {ids[:10]}")
