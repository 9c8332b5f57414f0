"""Prometheus metrics and OpenTelemetry spans, read the way a scraper and a tracing backend
would: jobs run by a real worker on the real database, embed batches with the fake provider,
provider failures from the fake OpenAI server. The registry is per process and other tests
add to it, so counts are compared before and after."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import ROOT, drain

import embedq
from embedq import metrics, tracing
from embedq.errors import ConfigurationError, PermanentError, ProviderUnavailable
from embedq.providers import ProviderConfig

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def families(body: bytes) -> set[str]:
    return {f.name for f in text_string_to_metric_families(body.decode())}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Scrape:
    """Two renders of the metrics: what changed between them."""

    def __init__(self, app: embedq.App) -> None:
        self.app = app
        self.before: Samples = {}
        self.after: Samples = {}

    async def start(self) -> Scrape:
        self.before = parse(await metrics.render(self.app))
        return self

    async def again(self) -> Samples:
        self.after = parse(await metrics.render(self.app))
        return self.after

    def delta(self, name: str, **labels: str) -> float:
        return get(self.after, name, **labels) - get(self.before, name, **labels)


# --- jobs and the queue ----------------------------------------------------------------------


async def test_job_durations_by_task_and_outcome_and_the_queue_depth(app: embedq.App) -> None:
    @app.task(name="mtest.ok", queue="mq")
    def ok(n: int) -> int:
        return n

    @app.task(name="mtest.flaky", queue="mq", retry=embedq.RetryPolicy(2, 0.01, 0.01))
    def flaky() -> None:
        raise RuntimeError("fails every time")

    @app.task(name="mtest.doomed", queue="mq")
    def doomed() -> None:
        raise PermanentError("never works")

    scrape = await Scrape(app).start()
    await ok.defer_async(n=1)
    await ok.defer_async(n=2)
    await flaky.defer_async()
    await doomed.defer_async()
    await app.enqueue([embedq.JobSpec("mtest.nobody", {}, queue="mq")])
    await drain(app)
    await scrape.again()
    hist = "embedq_job_duration_seconds_count"
    assert scrape.delta(hist, task="mtest.ok", outcome="succeeded") == 2
    assert scrape.delta(hist, task="mtest.flaky", outcome="retried") == 1
    assert scrape.delta(hist, task="mtest.flaky", outcome="dead") == 1
    assert scrape.delta(hist, task="mtest.doomed", outcome="dead") == 1
    # a task this worker does not register is not a label of its own
    assert scrape.delta(hist, task="unknown", outcome="dead") == 1
    assert not any(dict(labels).get("task") == "mtest.nobody" for _, labels in scrape.after)
    assert scrape.delta("embedq_job_duration_seconds_bucket", task="mtest.ok",
                        outcome="succeeded", le="+Inf") == 2  # fmt: skip

    # the queue, read from the database at scrape time
    past = datetime.now(UTC) - timedelta(seconds=30)
    later = datetime.now(UTC) + timedelta(hours=1)
    await app.enqueue(
        [
            embedq.JobSpec("mtest.ok", {"n": 3}, queue="mq", run_at=past),
            embedq.JobSpec("mtest.ok", {"n": 4}, queue="mq"),
            embedq.JobSpec("mtest.ok", {"n": 5}, queue="mq", run_at=later),
        ]
    )
    now = await scrape.again()
    assert get(now, "embedq_queue_jobs", queue="mq", state="pending") == 3
    assert get(now, "embedq_queue_jobs", queue="mq", state="running") == 0
    assert get(now, "embedq_queue_jobs", queue="mq", state="dead") == 3
    assert 29 <= get(now, "embedq_queue_oldest_due_age_seconds", queue="mq") < 120
    assert get(now, "embedq_workers_alive") == 0

    idle = embedq.Worker(app, queues=["nothing-here"], install_signals=False)
    run = asyncio.create_task(idle.run())
    try:
        for _ in range(100):
            if idle.id:
                break
            await asyncio.sleep(0.02)
        now = await scrape.again()
        assert get(now, "embedq_workers_alive") == 1
        # a registered queue without jobs shows zeros rather than nothing
        idle_queue = frozenset({("queue", "nothing-here"), ("state", "pending")})
        assert now[("embedq_queue_jobs", idle_queue)] == 0
    finally:
        idle.stop()
        await run


# --- the pipeline, providers and search ------------------------------------------------------


async def test_embed_batches_cache_provider_calls_and_search(app: embedq.App) -> None:
    col = await app.collections.create("mcol", provider="fake", options={"fail_on": "POISON"})
    scrape = await Scrape(app).start()
    await col.upsert_many(
        [{"key": f"d{i}", "text": f"metrics document number {i}"} for i in range(4)]
        + [{"key": "bad", "text": "this one holds POISON"}]
    )
    await col.delete("d3")  # its pending job ends superseded
    await drain(app)
    await scrape.again()

    assert scrape.delta("embedq_embed_batch_jobs_sum") == 5  # every embed job, in batches
    assert scrape.delta("embedq_embed_batch_jobs_count") >= 1
    hist = "embedq_job_duration_seconds_count"
    assert scrape.delta(hist, task="embedq.embed", outcome="succeeded") == 4
    assert scrape.delta(hist, task="embedq.embed", outcome="dead") == 1
    assert scrape.delta("embedq_superseded_jobs_total") == 1
    assert scrape.delta("embedq_embedded_documents_total") == 3
    assert scrape.delta("embedq_failed_documents_total") == 1
    assert scrape.delta("embedq_embed_cache_misses_total") == 4  # one chunk per document
    assert scrape.delta("embedq_embed_cache_hits_total") == 0

    fake = {"provider": "fake", "model": "fake-384"}
    # a request with the poison is refused, then halved until the poison is alone
    assert scrape.delta("embedq_provider_request_duration_seconds_count", **fake) >= 2
    assert scrape.delta("embedq_provider_request_texts_sum", **fake) >= 4
    assert scrape.delta("embedq_provider_errors_total", provider="fake", error="BadInput") >= 1
    assert get(scrape.after, "embedq_circuit_state", endpoint="fake", model="fake-384") == 0

    # the same texts in another collection of the same model: all from the cache
    other = await app.collections.create("mcol2", provider="fake")
    await other.upsert_many([{"key": f"d{i}", "text": f"metrics document number {i}"}
                             for i in range(3)])  # fmt: skip
    await drain(app)
    await scrape.again()
    assert scrape.delta("embedq_embed_cache_hits_total") == 3
    assert 0 < get(scrape.after, "embedq_embed_cache_hit_ratio") <= 1

    for mode in ("semantic", "keyword", "hybrid", "hybrid"):
        await col.search("metrics document", mode=mode)
    await scrape.again()
    seconds = "embedq_search_duration_seconds_count"
    assert scrape.delta(seconds, mode="semantic") == 1
    assert scrape.delta(seconds, mode="keyword") == 1
    assert scrape.delta(seconds, mode="hybrid") == 2


async def test_a_failing_endpoint_counts_its_errors_and_shows_its_circuit(db_url: str) -> None:
    from tests.fake_servers import FakeOpenAI

    app = embedq.App(database_url=db_url, breaker_failures=1, breaker_cooldown_s=0.3)
    with FakeOpenAI() as srv:
        async with app:
            model = "text-embedding-3-small"
            guarded = app.endpoints.get(
                ProviderConfig(provider="openai", model=model, base_url=srv.base_url)
            )
            circuit = {"endpoint": srv.base_url, "model": model}
            scrape = await Scrape(app).start()
            assert get(scrape.before, "embedq_circuit_state", **circuit) == 0
            srv.fail_next(503, times=3)
            with pytest.raises(ProviderUnavailable):
                await guarded.embed(["hello"])
            await scrape.again()
            assert get(scrape.after, "embedq_circuit_state", **circuit) == 2  # open
            errors = {"provider": "openai", "error": "ProviderUnavailable"}
            assert scrape.delta("embedq_provider_errors_total", **errors) == 1
            latency = {"provider": "openai", "model": model}
            assert scrape.delta("embedq_provider_request_duration_seconds_count", **latency) == 1
            await asyncio.sleep(0.35)  # the cool-down ends: half-open, seen at scrape time
            assert get(await scrape.again(), "embedq_circuit_state", **circuit) == 1
            srv.reset()
            await guarded.embed(["hello"])  # the probe succeeds
            assert get(await scrape.again(), "embedq_circuit_state", **circuit) == 0


def test_labels_stay_bounded() -> None:
    assert metrics.endpoint_label("https://user:secret@api.example.com:8443/v1?key=k") == (
        "https://api.example.com:8443/v1"
    )
    assert metrics.endpoint_label("fake") == "fake"
    before = parse(metrics.generate_latest(metrics.REGISTRY))
    metrics.observe_request("get", "/collections/{name}/search", 200, 0.02)
    metrics.observe_request("BREW", "unmatched", 405, 0.001)
    after = parse(metrics.generate_latest(metrics.REGISTRY))
    count = "embedq_http_request_duration_seconds_count"
    ok = {"method": "GET", "route": "/collections/{name}/search", "status": "200"}
    odd = {"method": "other", "route": "unmatched", "status": "405"}
    assert get(after, count, **ok) - get(before, count, **ok) == 1
    assert get(after, count, **odd) - get(before, count, **odd) == 1


# --- without the database ------------------------------------------------------------------


async def test_render_goes_on_when_the_database_is_unreachable(db_url: str, pg_url: str) -> None:
    closed = embedq.App(database_url="postgresql://u:p@127.0.0.1:1/x", connect_timeout_s=1)
    metrics.observe_request("GET", "/health", 200, 0.001)
    names = families(await metrics.render(closed))  # never opened: nothing to read
    assert "embedq_http_request_duration_seconds" in names
    assert "embedq_queue_jobs" not in names

    app = embedq.App(database_url=db_url, connect_timeout_s=1)
    await app.open()
    name = urlsplit(db_url).path.strip("/")
    try:
        assert "embedq_queue_jobs" in families(await metrics.render(app))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        started = time.monotonic()
        body = await metrics.render(app)
        assert time.monotonic() - started < metrics.DB_TIMEOUT_S + 1
        names = families(body)
        # the process's own metrics are all there; the queue's are left out, not stale
        assert {"embedq_job_duration_seconds", "embedq_http_request_duration_seconds",
                "embedq_circuit_state"} <= names  # fmt: skip
        assert "embedq_queue_jobs" not in names and "embedq_workers_alive" not in names
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await app.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_worker_serves_its_own_metrics() -> None:
    port = free_port()
    metrics.serve_worker_metrics(port, host="127.0.0.1")  # a daemon thread, for the session
    reply = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert reply.status_code == 200
    names = families(reply.content)
    assert "embedq_job_duration_seconds" in names
    assert "embedq_queue_jobs" not in names  # the service's to serve, from the database
    with pytest.raises(ConfigurationError, match="--metrics-port"):
        metrics.serve_worker_metrics(port, host="127.0.0.1")


# --- tracing -------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def everything_said(span: ReadableSpan) -> str:
    """All a backend would receive of a span's content."""
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    return repr((dict(span.attributes or {}), events, span.status.description))


async def test_spans_of_jobs_embed_batches_and_provider_calls(
    app: embedq.App, spans: InMemorySpanExporter
) -> None:
    @app.task(name="ttest.ok")
    def ok() -> None:
        return None

    @app.task(name="ttest.doomed")
    def doomed() -> None:
        raise PermanentError("the secret message of this failure")

    good = await ok.defer_async()
    bad = await doomed.defer_async()
    col = await app.collections.create("traced", provider="fake")
    await col.upsert_many([{"key": f"k{i}", "text": f"private words {i}"} for i in range(3)])
    await drain(app)

    jobs = {dict(s.attributes or {})["embedq.job_id"]: s for s in named(spans, "embedq.job")}
    ok_span, bad_span = jobs[good.id], jobs[bad.id]
    assert dict(ok_span.attributes or {}) == {
        "embedq.job_id": good.id,
        "embedq.task": "ttest.ok",
        "embedq.queue": "default",
        "embedq.attempt": 1,
        "embedq.outcome": "succeeded",
    }
    assert ok_span.status.status_code == StatusCode.UNSET
    assert dict(bad_span.attributes or {})["embedq.outcome"] == "dead"
    assert dict(bad_span.attributes or {})["error.type"] == "PermanentError"
    assert bad_span.status.status_code == StatusCode.ERROR
    assert "secret message" not in everything_said(bad_span)

    [batch] = named(spans, "embedq.job_batch")
    assert dict(batch.attributes or {}) == {
        "embedq.task": "embedq.embed",
        "embedq.queue": "embed",
        "embedq.jobs": 3,
        "embedq.succeeded": 3,
    }
    [embed] = named(spans, "embedq.embed_batch")
    assert embed.parent is not None and embed.parent.span_id == batch.context.span_id
    attrs = dict(embed.attributes or {})
    assert attrs["embedq.jobs"] == 3 and attrs["embedq.documents"] == 3
    assert attrs["embedq.chunks"] == 3 and attrs["embedq.superseded"] == 0
    [call] = named(spans, "embedq.provider.embed")
    assert call.parent is not None and call.parent.span_id == embed.context.span_id
    attrs = dict(call.attributes or {})
    assert (attrs["embedq.provider"], attrs["embedq.model"], attrs["embedq.texts"]) == (
        "fake",
        "fake-384",
        3,
    )
    assert all("private words" not in everything_said(s) for s in spans.get_finished_spans())


async def test_a_span_is_a_silent_no_op_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch, spans: InMemorySpanExporter
) -> None:
    monkeypatch.setattr(tracing, "OTEL_AVAILABLE", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tracing.span("sync", job_id=1, nothing=None) as sp:
            sp.set_attribute("embedq.more", "x")
            tracing.failed(sp, RuntimeError("x"))

        async def work() -> int:
            with tracing.span("async", task="t"):
                await asyncio.sleep(0)
                return 1

        assert await work() == 1
        with pytest.raises(KeyError), tracing.span("raising"):
            raise KeyError("propagates untouched")
    assert spans.get_finished_spans() == ()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env={**clean, "PYTHONPATH": str(ROOT / "src"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_the_package_tracing_imports_nothing_and_says_nothing() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "from embedq import tracing\n"
        "assert not tracing.OTEL_AVAILABLE and tracing.setup() is False\n"
        "with tracing.span('x', a=1) as sp:\n"
        "    sp.set_attribute('b', 2)\n"
        "print('ok')\n",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_setup_configures_otlp_export_only_when_asked_and_only_once() -> None:
    done = run_python(
        "import os\n"
        "from opentelemetry import trace\n"
        "from embedq import tracing\n"
        "assert tracing.setup() is False  # no endpoint: nothing happens\n"
        "assert type(trace.get_tracer_provider()).__name__ == 'ProxyTracerProvider'\n"
        "os.environ['OTEL_EXPORTER_OTLP_ENDPOINT'] = 'http://127.0.0.1:9'\n"
        "assert tracing.setup() is True and tracing.setup() is True\n"
        "provider = trace.get_tracer_provider()\n"
        "print(type(provider).__name__, provider.resource.attributes['service.name'])\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "TracerProvider embedq\n", "")
    done = run_python(
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from embedq import tracing\n"
        "mine = TracerProvider()\n"
        "trace.set_tracer_provider(mine)\n"
        "assert tracing.setup() is False  # the application's own provider stays\n"
        "assert trace.get_tracer_provider() is mine\n"
        "print('ok')\n",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces",
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


async def test_api_requests_are_spans_and_latency_samples(
    app: embedq.App, spans: InMemorySpanExporter
) -> None:
    from tests.api_helpers import client, token

    secret = await token(app, "traced-reader", "read")
    before = parse(await metrics.render(app))
    async with client(app, secret) as c:
        assert (
            await c.get("/v1/jobs/12345", headers={"X-Request-ID": "span-1"})
        ).status_code == 404
    [span] = [
        s
        for s in named(spans, "http.request")
        if dict(s.attributes or {})["embedq.request_id"] == "span-1"
    ]
    attrs = dict(span.attributes or {})
    assert attrs["http.method"] == "GET"
    assert attrs["http.route"] == "/v1/jobs/{job_id}"
    assert attrs["http.status_code"] == 404
    assert secret not in everything_said(span)
    after = parse(await metrics.render(app))
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    count = "embedq_http_request_duration_seconds_count"
    assert get(after, count, **labels) == get(before, count, **labels) + 1
