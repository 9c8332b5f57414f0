"""Prometheus metrics of one embedq process: its jobs, embedding batches, provider calls,
searches and API requests, plus the queue as the database sees it at scrape time.

    body = await metrics.render(app)          # the service's GET /metrics (CONTENT_TYPE)
    metrics.serve_worker_metrics(9101)        # `embedq worker --metrics-port 9101`

Everything lives in one registry of its own (`REGISTRY`), not prometheus_client's global one,
so an application that embeds embedq keeps its own metrics apart. Labels are bounded: task
names, queue names, providers, models, endpoints, error classes, route templates; never a
job id, a document key or an error message.

The queue's numbers (`embedq_queue_jobs`, `embedq_queue_oldest_due_age_seconds`,
`embedq_workers_alive`) are the same for every process, so they are read from the database
only by `render` (one query, per scrape) and are absent from a worker's own endpoint. When the
database cannot be read they are left out rather than shown stale; the rest still renders.
See docs/metrics.md for every metric.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedq import queries
from embedq.errors import ConfigurationError, DatabaseError

if TYPE_CHECKING:
    from embedq.app import App

log = logging.getLogger("embedq.metrics")

REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The database's share of one scrape: Prometheus gives up on a scrape after 10 s by default.
DB_TIMEOUT_S = 3.0

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FAST_SECONDS = (0.001, 0.0025, *_SECONDS[:-2])
_JOB_SECONDS = (*_SECONDS, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

# --- jobs (observed by the worker that ran them) -----------------------------------------

JOB_SECONDS = Histogram(
    "embedq_job_duration_seconds",
    "Run time of jobs executed by this process, by task and outcome (succeeded, retried, "
    "dead, cancelled, released); the jobs of one batch each count the batch's time.",
    ["task", "outcome"],
    buckets=_JOB_SECONDS,
    registry=REGISTRY,
)
JOB_OUTCOMES = ("succeeded", "retried", "dead", "cancelled", "released")
UNKNOWN_TASK = "unknown"  # a job whose task this process does not register

# --- the embedding pipeline ---------------------------------------------------------------

EMBED_BATCH_JOBS = Histogram(
    "embedq_embed_batch_jobs",
    "Embed jobs per batch executed by this process.",
    buckets=_SIZES,
    registry=REGISTRY,
)
EMBEDDED_DOCUMENTS = Counter(
    "embedq_embedded_documents",
    "Documents whose chunks this process embedded and swapped in.",
    registry=REGISTRY,
)
FAILED_DOCUMENTS = Counter(
    "embedq_failed_documents",
    "Documents marked failed for good (a permanent provider error, or out of attempts).",
    registry=REGISTRY,
)
SUPERSEDED_JOBS = Counter(
    "embedq_superseded_jobs",
    "Embed jobs finished without work: a newer version of their document (or its deletion) "
    "came first.",
    registry=REGISTRY,
)
CACHE_HITS = Counter(
    "embedq_embed_cache_hits",
    "Chunk texts whose vector came from the embedding cache.",
    registry=REGISTRY,
)
CACHE_MISSES = Counter(
    "embedq_embed_cache_misses",
    "Chunk texts the cache lacked, sent to the provider.",
    registry=REGISTRY,
)
CACHE_HIT_RATIO = Gauge(
    "embedq_embed_cache_hit_ratio",
    "Cache hits / lookups since this process started (for a window, use rate() of the hit "
    "and miss counters).",
    registry=REGISTRY,
)

# --- providers ----------------------------------------------------------------------------

PROVIDER_SECONDS = Histogram(
    "embedq_provider_request_duration_seconds",
    "Embedding requests sent to a provider endpoint, failed ones included.",
    ["provider", "model"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
PROVIDER_TEXTS = Histogram(
    "embedq_provider_request_texts",
    "Texts per embedding request sent to a provider endpoint.",
    ["provider", "model"],
    buckets=_SIZES,
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "embedq_provider_errors",
    "Failed embedding requests, by provider and error class (RateLimited, ProviderTimeout, "
    "ProviderUnavailable, BadInput, ModelNotFound, AuthenticationFailed...).",
    ["provider", "error"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "embedq_circuit_state",
    "Circuit breaker of a provider endpoint (one per model it serves): 0 closed, "
    "1 half-open, 2 open.",
    ["endpoint", "model"],
    registry=REGISTRY,
)
CIRCUIT_CODES = {"closed": 0, "half-open": 1, "open": 2}

# --- search and the API -------------------------------------------------------------------

SEARCH_SECONDS = Histogram(
    "embedq_search_duration_seconds",
    "Searches answered by this process, by mode (semantic, keyword, hybrid).",
    ["mode"],
    buckets=_FAST_SECONDS,
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "embedq_http_request_duration_seconds",
    "API requests, by method, route template and status code.",
    ["method", "route", "status"],
    buckets=_FAST_SECONDS,
    registry=REGISTRY,
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_job(task: str, outcome: str, seconds: float) -> None:
    """Record one finished job execution (`task` must be a registered task's name, or
    UNKNOWN_TASK: a label must not take whatever name a producer wrote)."""
    JOB_SECONDS.labels(task=task, outcome=outcome).observe(seconds)


_cache_totals = [0, 0]  # hits, misses since the process started


def observe_cache(hits: int, misses: int) -> None:
    """Record one cache lookup of a batch: `hits` texts found, `misses` not."""
    CACHE_HITS.inc(hits)
    CACHE_MISSES.inc(misses)
    _cache_totals[0] += hits
    _cache_totals[1] += misses
    if sum(_cache_totals):
        CACHE_HIT_RATIO.set(_cache_totals[0] / sum(_cache_totals))


def observe_circuit(endpoint: str, model: str, state: str) -> None:
    """Publish a breaker's state ("closed", "half-open", "open")."""
    CIRCUIT_STATE.labels(endpoint=endpoint_label(endpoint), model=model).set(CIRCUIT_CODES[state])


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Record one API request. `route` is the route's template (`/collections/{name}/search`),
    never the raw path, which would make a series per document key."""
    method = method.upper()
    HTTP_SECONDS.labels(
        method=method if method in _METHODS else "other", route=route, status=str(status)
    ).observe(seconds)


def endpoint_label(url: str) -> str:
    """An endpoint URL fit for a label or a span: no credentials, no query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "invalid-url"
    if not parts.scheme or not parts.hostname:
        return url  # "local", "fake"
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# --- read from the database at scrape time ------------------------------------------------


@dataclass
class _QueueSnapshot:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, state) -> n
    oldest_due_s: dict[str, float] = field(default_factory=dict)
    workers_alive: int = 0


class _QueueCollector(Collector):
    """The queue as the last scrape read it; nothing when it could not be read."""

    def __init__(self) -> None:
        self.snapshot: _QueueSnapshot | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        jobs = GaugeMetricFamily(
            "embedq_queue_jobs",
            "Jobs by queue and state: pending and running (the jobs table), dead (the archive).",
            labels=["queue", "state"],
        )
        for (queue, state), n in sorted(snap.jobs.items()):
            jobs.add_metric([queue, state], n)
        yield jobs
        age = GaugeMetricFamily(
            "embedq_queue_oldest_due_age_seconds",
            "How long the oldest due pending job of a queue has waited (0: none waiting).",
            labels=["queue"],
        )
        for queue in sorted({q for q, _ in snap.jobs}):
            age.add_metric([queue], snap.oldest_due_s.get(queue, 0.0))
        yield age
        yield GaugeMetricFamily(
            "embedq_workers_alive",
            "Workers that heartbeated recently (not stopped, not presumed dead).",
            value=snap.workers_alive,
        )


_QUEUE = _QueueCollector()
REGISTRY.register(_QUEUE)
_db_readable = True


async def refresh(app: App) -> None:
    """Re-read the queue from the database (one query) and the app's circuit states."""
    global _db_readable
    for breaker in app.endpoints.breakers():
        breaker.publish()
    try:
        _QUEUE.snapshot = await asyncio.wait_for(_read_queue(app), DB_TIMEOUT_S)
    except (DatabaseError, TimeoutError) as exc:
        _QUEUE.snapshot = None
        if _db_readable:
            log.warning("metrics: cannot read the queue from the database (%s)", exc)
        _db_readable = False
        return
    if not _db_readable:
        log.info("metrics: the database is readable again")
    _db_readable = True


async def _read_queue(app: App) -> _QueueSnapshot | None:
    if app.pool is None:
        return None  # not open: no database to read (and none to start for a scrape)
    s = app.settings
    rows = await app.store.fetch_sql(
        queries.load("queue.sql", s.db_schema)["depth"],
        {"dead_after_s": max(3 * s.heartbeat_s, s.lease_s)},
    )
    return _snapshot(rows)


def _snapshot(rows: list[dict[str, Any]]) -> _QueueSnapshot:
    snap = _QueueSnapshot()
    for r in rows:
        if r["kind"] == "workers":
            snap.workers_alive = int(r["n"])
            continue
        queue = str(r["queue"])
        for state in ("pending", "running", "dead"):
            snap.jobs.setdefault((queue, state), 0)  # every known queue shows every state
        if r["state"] is not None:
            snap.jobs[queue, str(r["state"])] += int(r["n"])
        if r["oldest_due_s"] is not None:
            snap.oldest_due_s[queue] = float(r["oldest_due_s"])
    return snap


async def render(app: App) -> bytes:
    """The metrics in Prometheus' text format (serve with `CONTENT_TYPE`), the database-backed
    ones refreshed first; a database that cannot be read leaves those out, nothing more."""
    await refresh(app)
    return generate_latest(REGISTRY)


def serve_worker_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve this process's metrics at http://host:port/ from a daemon thread (the queue's
    database-backed metrics are the service's to serve: see the module docstring)."""
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose another "
            "--metrics-port, or stop what listens there"
        ) from None
