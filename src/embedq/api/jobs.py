"""Routes of the job queue: jobs (list, show with events, enqueue, retry, cancel), queues
(status, stats, pause, resume) and workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from embedq import status
from embedq.api.auth import require
from embedq.api.errors import ApiError
from embedq.jobs import JobSpec, in_seconds

if TYPE_CHECKING:
    from embedq.api.app import Service
    from embedq.app import App

router = APIRouter(prefix="/v1", tags=["queue"])
JobState = Literal["pending", "running", "succeeded", "dead", "cancelled", "failed"]
QUEUE = r"^[A-Za-z0-9_.:-]{1,100}$"
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The job's id.")]


def _app(request: Request) -> App:
    service: Service = request.app.state.service
    return service.app


class JobIn(BaseModel):
    """A job to enqueue by task name (your other background work: syncs, PDF builds...)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=200, examples=["billing.sync_receipts"])
    args: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = Field(None, pattern=QUEUE)
    priority: int | None = Field(None, ge=0, le=1000)
    delay_s: float | None = Field(None, ge=0, le=366 * 86_400)
    lock_key: str | None = Field(None, min_length=1, max_length=500)
    dedup_key: str | None = Field(None, min_length=1, max_length=500)
    any_task: bool = Field(
        False, description="Accept a task this service does not define (another app's)."
    )


@router.get("/jobs", summary="List jobs, newest first", dependencies=[require("read")])
async def list_jobs(
    request: Request,
    state: JobState | None = None,
    queue: Annotated[str | None, Query(max_length=100)] = None,
    task: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    rows = await _app(request).store.fetch(
        "list_jobs", {"state": state, "queue": queue, "task": task, "limit": limit}
    )
    return {"jobs": status.plain(rows)}


@router.post(
    "/jobs",
    status_code=202,
    summary="Enqueue a job",
    dependencies=[require("write")],
)
async def enqueue_job(request: Request, body: JobIn) -> dict[str, Any]:
    app = _app(request)
    known = app.tasks.get(body.task)
    if known is None and not body.any_task:
        app.get_task(body.task)  # UnknownTask (422) listing the known ones
    spec = JobSpec(
        body.task,
        body.args,
        queue=body.queue or (known.queue if known else "default"),
        priority=body.priority if body.priority is not None else (known.priority if known else 0),
        run_at=in_seconds(body.delay_s) if body.delay_s else None,
        max_attempts=known.retry.max_attempts if known else app.settings.retry_max_attempts,
        lock_key=body.lock_key,
        dedup_key=body.dedup_key,
    )
    [ticket] = await app.enqueue([spec])
    return {"id": ticket.id, "coalesced": ticket.coalesced}


@router.get("/jobs/{job_id}", summary="One job with its events", dependencies=[require("read")])
async def show_job(request: Request, job_id: JobId) -> dict[str, Any]:
    result: dict[str, Any] = status.plain(await _app(request).store.get(job_id))
    return result


@router.post(
    "/jobs/{job_id}/retry",
    summary="Retry a dead or cancelled job (fresh attempts, same id)",
    dependencies=[require("admin")],
    responses={409: {"description": "The job is not dead or cancelled."}},
)
async def retry_job(request: Request, job_id: JobId) -> dict[str, Any]:
    store = _app(request).store
    retried = await store.retry([job_id])
    if not retried:
        job = await store.get(job_id)  # 404 when there is none
        raise ApiError(
            409, f"job {job_id} is {job['state']}; only dead or cancelled jobs can be retried"
        )
    return {"retried": retried}


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a pending or running job",
    dependencies=[require("admin")],
    responses={409: {"description": "The job has finished already."}},
)
async def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
    store = _app(request).store
    rows = await store.cancel([job_id], reason="cancelled through the API")
    if not rows:
        job = await store.get(job_id)
        raise ApiError(
            409, f"job {job_id} is {job['state']}; only pending or running jobs can be cancelled"
        )
    return {"cancelled": [int(r["id"]) for r in rows]}


@router.get(
    "/queues", summary="Queue status: counts now, per queue", dependencies=[require("read")]
)
async def queues(request: Request) -> dict[str, Any]:
    result: dict[str, Any] = status.plain(await status.queue_status(_app(request)))
    return result


@router.get(
    "/queues/stats",
    summary="Per task over a window: outcomes, run times, throughput per minute",
    dependencies=[require("read")],
)
async def queue_stats(
    request: Request, hours: Annotated[float, Query(gt=0, le=24 * 90)] = 24.0
) -> dict[str, Any]:
    store = _app(request).store
    window = {"window_s": hours * 3600}
    return {
        "window_hours": hours,
        "tasks": status.plain(await store.fetch("task_stats", window)),
        "throughput_per_minute": status.plain(await store.fetch("throughput", window)),
    }


async def _pause(request: Request, name: str, paused: bool) -> dict[str, Any]:
    await _app(request).store.set_paused(name, paused)
    return {"queue": name, "paused": paused}


@router.post(
    "/queues/{name}/pause",
    summary="Pause a queue: workers stop claiming its jobs",
    dependencies=[require("admin")],
)
async def pause_queue(request: Request, name: str) -> dict[str, Any]:
    return await _pause(request, name, True)


@router.post("/queues/{name}/resume", summary="Resume a queue", dependencies=[require("admin")])
async def resume_queue(request: Request, name: str) -> dict[str, Any]:
    return await _pause(request, name, False)


@router.get("/workers", summary="Workers with their heartbeats", dependencies=[require("read")])
async def workers(request: Request) -> dict[str, Any]:
    return {"workers": status.plain(await status.workers(_app(request)))}
