"""Job-queue benchmark: embedq against Procrastinate and a raw-SQL batch queue (the limit).

    python bench/queue.py --jobs 20000 --json out.json            # full run
    python bench/queue.py --quick                                   # smoke run, smaller backlogs

Everything runs against one PostgreSQL server, in one run: an embedded server in a temporary
directory, or --database-url / EMBEDQ_DATABASE_URL (three scratch databases are created there
and dropped afterwards). Each system gets its own database, so none sees another's tables.

Measured, with no-op jobs:
  * enqueue one by one (one round trip and commit per job) and in bulk (chunks of --chunk),
  * processing with 1 and with 4 worker processes, pre-enqueued backlog of --jobs jobs. Worker
    processes start, connect and then wait at a barrier, so interpreter start-up is not timed.
    "active" time runs from the first claim to the last completion, as the database recorded
    them; "wall" time from the barrier until every worker process has exited,
  * embedq's claim latency (store.claim, 100 jobs) with a small and a large pending backlog,
    raw SQL's the same way as the reference.

See bench/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py: drop its folder from sys.path so that `import queue` (asyncio,
# logging, concurrent.futures) finds the standard library module, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

import psycopg  # noqa: E402

NOOP = "embedq.noop"
PROC_NOOP = "bench.noop"
DB_NAMES = {
    "embedq": "embedq_bench_embedq",
    "procrastinate": "embedq_bench_procrastinate",
    "raw_sql": "embedq_bench_raw",
}
TARGETS = {"processed_per_s": 12_000, "bulk_enqueue_per_s": 50_000, "claim_p99_ratio": 1.5}

RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_jobs (
    id         bigserial PRIMARY KEY,
    payload    jsonb NOT NULL,
    state      text NOT NULL DEFAULT 'pending',
    claimed_at timestamptz
);
CREATE INDEX IF NOT EXISTS raw_jobs_pending_idx ON raw_jobs (id) WHERE state = 'pending';
"""
RAW_CLAIM = """
UPDATE raw_jobs SET state = 'running', claimed_at = now()
WHERE id IN (SELECT id FROM raw_jobs WHERE state = 'pending' ORDER BY id
             LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
RAW_COMPLETE = "DELETE FROM raw_jobs WHERE id = ANY(%(ids)s::bigint[])"
RAW_INSERT_ONE = "INSERT INTO raw_jobs (payload) VALUES (%s::jsonb)"
RAW_INSERT_MANY = "INSERT INTO raw_jobs (payload) SELECT unnest(%s::jsonb[])"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


# --- Procrastinate app (shared by the parent and its worker processes) -------------------


def make_procrastinate_app(url: str, pool_size: int) -> Any:
    import procrastinate

    connector = procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=pool_size, kwargs={"autocommit": True}
    )
    app = procrastinate.App(connector=connector)

    @app.task(name=PROC_NOOP)
    async def noop(**_: Any) -> None:
        return None

    return app


# --- worker processes ---------------------------------------------------------------------
#
# `queue.py --child KIND CONFIG_JSON` runs one worker process: it connects, prints READY,
# waits for a line on stdin, works until its queue is empty, then prints RESULT {json}.


async def _barrier() -> float:
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return time.time()


async def child_embedq(cfg: dict[str, Any]) -> dict[str, Any]:
    import embedq

    overrides = {"database_url": cfg["url"], "poll_interval_s": cfg["poll_interval_s"]}
    if cfg.get("job_events"):
        overrides["job_events"] = cfg["job_events"]
    app = embedq.App(**overrides)
    await app.open(pool_size=8)
    worker = embedq.Worker(
        app,
        concurrency=cfg["concurrency"],
        batch_size=cfg["batch_size"],
        exit_when_idle=True,
        install_signals=False,
    )
    start = await _barrier()
    if cfg.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        await worker.run()
        prof.disable()
        prof.dump_stats(cfg["profile"])
    else:
        await worker.run()
    end = time.time()
    await app.close()
    return {"processed": worker.processed, "failed": worker.failed, "start": start, "end": end}


async def child_procrastinate(cfg: dict[str, Any]) -> dict[str, Any]:
    app = make_procrastinate_app(cfg["url"], cfg["concurrency"] + 4)
    async with app.open_async():
        start = await _barrier()
        await app.run_worker_async(
            concurrency=cfg["concurrency"], wait=False, install_signal_handlers=False
        )
        end = time.time()
    return {"start": start, "end": end}


async def child_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(cfg["url"], autocommit=True)
    processed, first, last = 0, 0.0, 0.0
    async with conn:
        start = await _barrier()
        while True:
            cur = await conn.execute(RAW_CLAIM, {"limit": cfg["batch_size"]})
            rows = await cur.fetchall()
            if not rows:
                break
            first = first or time.time()
            ids = [r[0] for r in rows]
            await conn.execute(RAW_COMPLETE, {"ids": ids})
            processed += len(ids)
            last = time.time()
        end = time.time()
    return {"processed": processed, "start": start, "end": end, "first": first, "last": last}


def child_main(kind: str, cfg_json: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = json.loads(cfg_json)
    runner = {"embedq": child_embedq, "procrastinate": child_procrastinate, "raw": child_raw}
    result = asyncio.run(runner[kind](cfg))
    print("RESULT " + json.dumps(result), flush=True)


async def run_workers(
    kind: str, cfg: dict[str, Any], processes: int, timeout_s: float
) -> dict[str, Any]:
    """Start worker processes, release them together, wait until all exit."""
    procs = []
    logs = []
    for i in range(processes):
        log = tempfile.TemporaryFile()
        logs.append(log)
        child_cfg = dict(cfg)
        if cfg.get("profile"):
            child_cfg["profile"] = f"{cfg['profile']}.{processes}w.{i}"
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-P", str(Path(__file__).resolve()),
                "--child", kind, json.dumps(child_cfg),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        )  # fmt: skip

    def fail(what: str) -> RuntimeError:
        for p in procs:
            if p.returncode is None:
                p.kill()
        errs = []
        for log in logs:
            log.seek(0)
            errs.append(log.read().decode(errors="replace")[-3000:])
        return RuntimeError(f"{kind} workers {what}:\n" + "\n---\n".join(errs))

    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 120)
            if line.strip() != b"READY":
                raise fail(f"did not start (got {line!r})")
        t0 = time.time()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"GO\n")
            await p.stdin.drain()
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout_s)
        t1 = time.time()
    except TimeoutError:
        raise fail(f"did not finish within {timeout_s:.0f} s") from None
    results = []
    for p, (out, _) in zip(procs, outs, strict=True):
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise fail(f"failed (exit {p.returncode})")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    for log in logs:
        log.close()
    return {"wall_s": t1 - t0, "go": t0, "workers": results}


# --- the benchmark ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, server_url: str) -> None:
        self.args = args
        self.server_url = server_url
        self.urls = {k: with_database(server_url, v) for k, v in DB_NAMES.items()}
        self.results: dict[str, dict[str, Any]] = {}
        self.rows: list[tuple[str, str, int, float, float, float | None]] = []
        self.latency_rows: list[tuple[str, int, float, float, float]] = []

    def say(self, msg: str) -> None:
        if not self.args.no_progress:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def record(
        self,
        system: str,
        scenario: str,
        n: int,
        seconds: float,
        per_s: float,
        wall_per_s: float | None = None,
    ) -> None:
        self.rows.append((system, scenario, n, seconds, per_s, wall_per_s))

    async def timed(self, fn: Callable[[], Awaitable[Any]]) -> float:
        t = time.perf_counter()
        await fn()
        return time.perf_counter() - t

    # --- databases ---

    def create_databases(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for name in DB_NAMES.values():
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {name}")

    def drop_databases(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for name in DB_NAMES.values():
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def sql(self, system: str, *statements: str) -> list[Any]:
        """Run statements on a system's database; the last one's rows come back."""
        async with await psycopg.AsyncConnection.connect(
            self.urls[system], autocommit=True
        ) as conn:
            rows: list[Any] = []
            for s in statements:
                cur = await conn.execute(s)  # type: ignore[arg-type]
                rows = await cur.fetchall() if cur.description else []
            return rows

    def server_version(self) -> str:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"

    # --- processing runs ---

    def process_counts(self) -> list[int]:
        return [int(x) for x in self.args.workers.split(",")]

    def timeout_for(self, n: int, floor_rate: float) -> float:
        return max(self.args.timeout, 60 + n / floor_rate)

    # --- embedq ---

    async def embedq(self) -> None:
        import embedq
        from embedq import JobSpec

        a = self.args
        url = self.urls["embedq"]
        out: dict[str, Any] = {}
        overrides: dict[str, Any] = {"database_url": url}
        if a.job_events:
            overrides["job_events"] = a.job_events
        app = embedq.App(**overrides)
        await app.open(migrate=True)
        out["settings"] = {
            "job_events": app.settings.job_events,
            "finished_jobs": app.settings.finished_jobs,
            "concurrency": a.concurrency,
            "batch_size": a.batch_size,
        }
        reset = "TRUNCATE embedq.jobs, embedq.jobs_archive, embedq.job_events"
        try:
            # one by one
            n1 = min(a.jobs, a.one_by_one)
            self.say(f"embedq: enqueue {n1} jobs one by one")

            async def one_by_one() -> None:
                for i in range(n1):
                    await app.enqueue([JobSpec(NOOP, {"i": i})])

            s = await self.timed(one_by_one)
            out["enqueue_one_per_s"] = rate(n1, s)
            self.record("embedq", "enqueue one by one", n1, s, out["enqueue_one_per_s"])
            await self.sql("embedq", reset)

            bulk_rates = []
            for processes in self.process_counts():
                self.say(f"embedq: bulk enqueue {a.jobs} jobs")

                async def bulk() -> None:
                    for lo in range(0, a.jobs, a.chunk):
                        hi = min(a.jobs, lo + a.chunk)
                        await app.enqueue([JobSpec(NOOP, {"i": i}) for i in range(lo, hi)])

                s = await self.timed(bulk)
                bulk_rates.append(rate(a.jobs, s))
                self.record("embedq", f"bulk enqueue ({a.chunk}/call)", a.jobs, s, bulk_rates[-1])
                await self.sql("embedq", "ANALYZE embedq.jobs")

                self.say(f"embedq: process {a.jobs} jobs with {processes} worker process(es)")
                cfg = {
                    "url": url,
                    "concurrency": a.concurrency,
                    "batch_size": a.batch_size,
                    "poll_interval_s": 0.2,
                    "job_events": a.job_events,
                    "profile": a.profile,
                }
                run = await run_workers("embedq", cfg, processes, self.timeout_for(a.jobs, 200))
                [(done, left, active_s)] = await self.sql(
                    "embedq",
                    "SELECT (SELECT count(*) FROM embedq.jobs_archive WHERE state = 'succeeded'),"
                    " (SELECT count(*) FROM embedq.jobs),"
                    " extract(epoch FROM max(finished_at) - min(started_at))::float8"
                    " FROM embedq.jobs_archive",
                )
                if done != a.jobs or left != 0:
                    raise RuntimeError(
                        f"embedq: {done} of {a.jobs} jobs succeeded, {left} left in the queue"
                    )
                per_s, wall = rate(done, active_s), rate(done, run["wall_s"])
                out[f"processed_{processes}w_per_s"] = per_s
                out[f"processed_{processes}w_wall_per_s"] = wall
                out[f"processed_{processes}w_active_s"] = round(active_s, 3)
                out[f"processed_{processes}w_wall_s"] = round(run["wall_s"], 3)
                self.record(
                    "embedq", f"process, {processes} worker(s)", done, active_s, per_s, wall
                )
                await self.sql("embedq", reset)
            out["bulk_enqueue_per_s"] = max(bulk_rates)
            out["bulk_enqueue_runs_per_s"] = bulk_rates
            out["processed_per_s"] = max(
                out[f"processed_{p}w_per_s"] for p in self.process_counts()
            )
            out["processed_wall_per_s"] = max(
                out[f"processed_{p}w_wall_per_s"] for p in self.process_counts()
            )

            await self.embedq_claim_latency(app, out)
        finally:
            await app.close()
        self.results["embedq"] = out

    async def embedq_claim_latency(self, app: Any, out: dict[str, Any]) -> None:
        from embedq import JobSpec, __version__

        a = self.args
        store = app.store
        [row] = await store.fetch(
            "register_worker",
            {"name": "bench-claim", "host": socket.gethostname(), "pid": os.getpid(),
             "queues": None, "concurrency": a.claim_limit, "version": __version__},
        )  # fmt: skip
        wid = int(row["id"])
        for label, size in (("small", a.claim_small), ("large", a.claim_large)):
            self.say(f"embedq: claim latency with {size:,} pending jobs")
            await self.sql("embedq", "TRUNCATE embedq.jobs, embedq.jobs_archive, embedq.job_events")
            t = time.perf_counter()
            await self.sql(
                "embedq",
                "INSERT INTO embedq.jobs (task, args) SELECT 'embedq.noop', "
                f"jsonb_build_object('i', g) FROM generate_series(1, {int(size)}) g",
                "ANALYZE embedq.jobs",
            )
            self.say(f"embedq: backlog of {size:,} built in {time.perf_counter() - t:.1f} s")
            lat: list[float] = []
            for k in range(a.claims + a.claim_warmup):
                t = time.perf_counter()
                jobs = await store.claim(wid, a.claim_limit)
                elapsed = time.perf_counter() - t
                if k >= a.claim_warmup:
                    lat.append(elapsed * 1000)
                ids = [j.id for j in jobs]
                await store.complete(wid, ids, [None] * len(ids), [None] * len(ids))
                # keep the backlog at its size: replace what was taken
                await app.enqueue([JobSpec(NOOP, {"i": i}) for i in range(len(ids))])
            p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
            out[f"claim_p50_ms_{label}"] = round(p50, 3)
            out[f"claim_p99_ms_{label}"] = round(p99, 3)
            out[f"claim_mean_ms_{label}"] = round(statistics.fmean(lat), 3)
            self.latency_rows.append(("embedq", size, p50, p99, statistics.fmean(lat)))
        await self.sql("embedq", "TRUNCATE embedq.jobs, embedq.jobs_archive, embedq.job_events")
        out["claim_p99_ratio"] = round(out["claim_p99_ms_large"] / out["claim_p99_ms_small"], 3)

    # --- raw SQL ---

    async def raw_sql(self) -> None:
        a = self.args
        url = self.urls["raw_sql"]
        out: dict[str, Any] = {"settings": {"batch_size": a.raw_batch}}
        await self.sql("raw_sql", RAW_SCHEMA)
        reset = "TRUNCATE raw_jobs"
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            n1 = min(a.jobs, a.one_by_one)
            self.say(f"raw_sql: insert {n1} jobs one by one")

            async def one_by_one() -> None:
                for i in range(n1):
                    await conn.execute(RAW_INSERT_ONE, (json.dumps({"i": i}),))

            s = await self.timed(one_by_one)
            out["enqueue_one_per_s"] = rate(n1, s)
            self.record("raw_sql", "enqueue one by one", n1, s, out["enqueue_one_per_s"])
            await conn.execute(reset)

            bulk_rates = []
            for processes in self.process_counts():
                self.say(f"raw_sql: bulk insert {a.jobs} jobs")

                async def bulk() -> None:
                    for lo in range(0, a.jobs, a.chunk):
                        hi = min(a.jobs, lo + a.chunk)
                        payloads = [json.dumps({"i": i}) for i in range(lo, hi)]
                        await conn.execute(RAW_INSERT_MANY, (payloads,))

                s = await self.timed(bulk)
                bulk_rates.append(rate(a.jobs, s))
                self.record("raw_sql", f"bulk enqueue ({a.chunk}/call)", a.jobs, s, bulk_rates[-1])
                await conn.execute("ANALYZE raw_jobs")

                self.say(f"raw_sql: process {a.jobs} jobs with {processes} process(es)")
                run = await run_workers(
                    "raw",
                    {"url": url, "batch_size": a.raw_batch},
                    processes,
                    self.timeout_for(a.jobs, 1000),
                )
                done = sum(w["processed"] for w in run["workers"])
                cur = await conn.execute("SELECT count(*) FROM raw_jobs")
                left = (await cur.fetchone() or [0])[0]
                if done != a.jobs or left != 0:
                    raise RuntimeError(f"raw_sql: {done} of {a.jobs} processed, {left} left")
                firsts = [w["first"] for w in run["workers"] if w["first"]]
                active_s = max(w["last"] for w in run["workers"]) - min(firsts)
                per_s, wall = rate(done, active_s), rate(done, run["wall_s"])
                out[f"processed_{processes}w_per_s"] = per_s
                out[f"processed_{processes}w_wall_per_s"] = wall
                out[f"processed_{processes}w_active_s"] = round(active_s, 3)
                out[f"processed_{processes}w_wall_s"] = round(run["wall_s"], 3)
                self.record(
                    "raw_sql", f"process, {processes} worker(s)", done, active_s, per_s, wall
                )
                await conn.execute(reset)
            out["bulk_enqueue_per_s"] = max(bulk_rates)
            out["bulk_enqueue_runs_per_s"] = bulk_rates
            out["processed_per_s"] = max(
                out[f"processed_{p}w_per_s"] for p in self.process_counts()
            )
            out["processed_wall_per_s"] = max(
                out[f"processed_{p}w_wall_per_s"] for p in self.process_counts()
            )
            await self.raw_claim_latency(conn, out)
        self.results["raw_sql"] = out

    async def raw_claim_latency(self, conn: Any, out: dict[str, Any]) -> None:
        a = self.args
        for label, size in (("small", a.claim_small), ("large", a.claim_large)):
            self.say(f"raw_sql: claim latency with {size:,} pending jobs")
            await conn.execute("TRUNCATE raw_jobs")
            await conn.execute(
                "INSERT INTO raw_jobs (payload) SELECT jsonb_build_object('i', g) "
                f"FROM generate_series(1, {int(size)}) g"
            )
            await conn.execute("ANALYZE raw_jobs")
            lat: list[float] = []
            for k in range(a.claims + a.claim_warmup):
                t = time.perf_counter()
                cur = await conn.execute(RAW_CLAIM, {"limit": a.claim_limit})
                ids = [r[0] for r in await cur.fetchall()]
                elapsed = time.perf_counter() - t
                if k >= a.claim_warmup:
                    lat.append(elapsed * 1000)
                await conn.execute(RAW_COMPLETE, {"ids": ids})
                await conn.execute(
                    RAW_INSERT_MANY, ([json.dumps({"i": i}) for i in range(len(ids))],)
                )
            p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
            out[f"claim_p50_ms_{label}"] = round(p50, 3)
            out[f"claim_p99_ms_{label}"] = round(p99, 3)
            out[f"claim_mean_ms_{label}"] = round(statistics.fmean(lat), 3)
            self.latency_rows.append(("raw_sql", size, p50, p99, statistics.fmean(lat)))
        await conn.execute("TRUNCATE raw_jobs")
        out["claim_p99_ratio"] = round(out["claim_p99_ms_large"] / out["claim_p99_ms_small"], 3)

    # --- Procrastinate ---

    async def procrastinate(self) -> None:
        import procrastinate

        a = self.args
        url = self.urls["procrastinate"]
        n = a.procrastinate_jobs
        out: dict[str, Any] = {
            "version": procrastinate.__version__,
            "jobs": n,
            "settings": {"concurrency": a.procrastinate_concurrency},
        }
        app = make_procrastinate_app(url, 4)
        reset = "TRUNCATE procrastinate_events, procrastinate_jobs CASCADE"
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            noop = app.tasks[PROC_NOOP]
            n1 = min(n, a.one_by_one)
            self.say(f"procrastinate: defer {n1} jobs one by one")

            async def one_by_one() -> None:
                for i in range(n1):
                    await noop.defer_async(i=i)

            s = await self.timed(one_by_one)
            out["enqueue_one_per_s"] = rate(n1, s)
            self.record("procrastinate", "enqueue one by one", n1, s, out["enqueue_one_per_s"])
            await self.sql("procrastinate", reset)

            bulk_rates = []
            for processes in self.process_counts():
                self.say(f"procrastinate: batch_defer {n} jobs")

                async def bulk() -> None:
                    for lo in range(0, n, a.chunk):
                        hi = min(n, lo + a.chunk)
                        await noop.batch_defer_async(*({"i": i} for i in range(lo, hi)))

                s = await self.timed(bulk)
                bulk_rates.append(rate(n, s))
                self.record("procrastinate", f"bulk enqueue ({a.chunk}/call)", n, s, bulk_rates[-1])
                await self.sql("procrastinate", "ANALYZE procrastinate_jobs")

                self.say(f"procrastinate: process {n} jobs with {processes} worker process(es)")
                run = await run_workers(
                    "procrastinate",
                    {"url": url, "concurrency": a.procrastinate_concurrency},
                    processes,
                    self.timeout_for(n, 20),
                )
                [(done, left, active_s)] = await self.sql(
                    "procrastinate",
                    "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'),"
                    " (SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'),"
                    " extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
                    "  - min(at) FILTER (WHERE type = 'started'))::float8"
                    " FROM procrastinate_events",
                )
                if done != n or left != 0:
                    raise RuntimeError(f"procrastinate: {done} of {n} succeeded, {left} left")
                per_s, wall = rate(done, active_s), rate(done, run["wall_s"])
                out[f"processed_{processes}w_per_s"] = per_s
                out[f"processed_{processes}w_wall_per_s"] = wall
                out[f"processed_{processes}w_active_s"] = round(active_s, 3)
                out[f"processed_{processes}w_wall_s"] = round(run["wall_s"], 3)
                self.record(
                    "procrastinate", f"process, {processes} worker(s)", done, active_s, per_s, wall
                )
                await self.sql("procrastinate", reset)
            out["bulk_enqueue_per_s"] = max(bulk_rates)
            out["bulk_enqueue_runs_per_s"] = bulk_rates
            out["processed_per_s"] = max(
                out[f"processed_{p}w_per_s"] for p in self.process_counts()
            )
            out["processed_wall_per_s"] = max(
                out[f"processed_{p}w_wall_per_s"] for p in self.process_counts()
            )
        self.results["procrastinate"] = out

    # --- output ---

    def print_tables(self, config: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(100, shutil.get_terminal_size((120, 20)).columns))
        t = Table(
            title=f"No-op jobs, one PostgreSQL {config['server_version']} server, "
            f"{config['cores']} cores",
            caption="processing: jobs / (last completion - first claim) as the database "
            "recorded them; wall: from the start barrier until all workers exited",
        )
        t.add_column("System")
        t.add_column("Scenario")
        t.add_column("Jobs", justify="right")
        t.add_column("Seconds", justify="right")
        t.add_column("Jobs/s", justify="right")
        t.add_column("Jobs/s (wall)", justify="right")
        last = None
        for system, scenario, n, s, per_s, wall in self.rows:
            if last is not None and system != last:
                t.add_section()
            last = system
            t.add_row(
                system, scenario, f"{n:,}", f"{s:.3f}", f"{per_s:,.0f}",
                f"{wall:,.0f}" if wall is not None else "",
            )  # fmt: skip
        console.print(t)

        lt = Table(title=f"Claim latency ({self.args.claim_limit} jobs per claim, "
                   f"{self.args.claims} claims per backlog)")  # fmt: skip
        lt.add_column("System")
        lt.add_column("Pending jobs", justify="right")
        lt.add_column("p50 ms", justify="right")
        lt.add_column("p99 ms", justify="right")
        lt.add_column("mean ms", justify="right")
        for system, size, p50, p99, mean in self.latency_rows:
            lt.add_row(system, f"{size:,}", f"{p50:.2f}", f"{p99:.2f}", f"{mean:.2f}")
        console.print(lt)

        e = self.results.get("embedq", {})
        if e:
            tt = Table(title="embedq against the targets")
            tt.add_column("Target")
            tt.add_column("Measured", justify="right")
            tt.add_column("Goal", justify="right")
            tt.add_column("Met")
            checks = [
                ("no-op jobs processed /s", e.get("processed_per_s"),
                 TARGETS["processed_per_s"], True),
                ("bulk enqueue jobs /s", e.get("bulk_enqueue_per_s"),
                 TARGETS["bulk_enqueue_per_s"], True),
                (f"claim p99 {self.args.claim_large:,} / {self.args.claim_small:,} pending",
                 e.get("claim_p99_ratio"), TARGETS["claim_p99_ratio"], False),
            ]  # fmt: skip
            for name, value, goal, higher in checks:
                if value is None:
                    continue
                ok = value >= goal if higher else value <= goal
                fmt = "{:,.0f}" if higher else "{:.2f}x"
                tt.add_row(
                    name,
                    fmt.format(value),
                    (">= " if higher else "<= ") + fmt.format(goal),
                    "[green]yes[/]" if ok else "[red]no[/]",
                )
            console.print(tt)


@contextlib.contextmanager
def database_server(url: str | None) -> Any:
    if url:
        yield url
        return
    from embedq import embedded

    tmp = tempfile.mkdtemp(prefix="embedq-bench-")
    # Registered before the server's own exit hook, so it runs after the server stopped.
    atexit.register(shutil.rmtree, tmp, True)
    yield embedded.start(Path(tmp))


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    bench = Bench(args, url)
    started = time.time()
    bench.say(f"server: {urlsplit(url).path or url}; creating scratch databases")
    bench.create_databases()
    try:
        await bench.raw_sql()
        await bench.embedq()
        if not args.skip_procrastinate:
            await bench.procrastinate()
    finally:
        bench.drop_databases()
    config = {
        "jobs": args.jobs,
        "procrastinate_jobs": None if args.skip_procrastinate else args.procrastinate_jobs,
        "one_by_one_jobs": min(args.jobs, args.one_by_one),
        "chunk": args.chunk,
        "worker_processes": bench.process_counts(),
        "embedq_concurrency": args.concurrency,
        "embedq_batch_size": args.batch_size,
        "procrastinate_concurrency": args.procrastinate_concurrency,
        "raw_batch_size": args.raw_batch,
        "claim_small": args.claim_small,
        "claim_large": args.claim_large,
        "claim_limit": args.claim_limit,
        "claims": args.claims,
        "quick": args.quick,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "server_version": bench.server_version(),
        "embedded_server": not args.database_url,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "duration_s": round(time.time() - started, 1),
        "targets": TARGETS,
    }
    return {"bench": bench, "config": config}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark embedq against Procrastinate and raw SQL on one PostgreSQL.",
    )
    p.add_argument("--jobs", type=int, default=20_000, help="backlog processed per run")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="smaller claim backlog (100k)")
    p.add_argument(
        "--database-url",
        default=os.environ.get("EMBEDQ_DATABASE_URL"),
        help="server to use (scratch databases are created and dropped); default: an "
        "embedded server in a temporary directory",
    )
    p.add_argument("--skip-procrastinate", action="store_true")
    p.add_argument("--concurrency", type=int, default=500, help="embedq jobs per worker")
    p.add_argument("--batch-size", type=int, default=500, help="embedq jobs per claim")
    p.add_argument(
        "--job-events",
        choices=["all", "failures"],
        default=None,
        help="embedq's job_events setting (default: embedq's own default)",
    )
    p.add_argument("--workers", default="1,4", help="worker process counts to run")
    p.add_argument("--chunk", type=int, default=5_000, help="jobs per bulk enqueue call")
    p.add_argument("--one-by-one", type=int, default=2_000, help="jobs enqueued one by one")
    p.add_argument("--procrastinate-jobs", type=int, default=2_000)
    p.add_argument("--procrastinate-concurrency", type=int, default=20)
    p.add_argument("--raw-batch", type=int, default=500, help="raw SQL jobs per claim")
    p.add_argument("--claim-small", type=int, default=10_000)
    p.add_argument("--claim-large", type=int, default=None, help="default 1,000,000 (100,000 "
                   "with --quick)")  # fmt: skip
    p.add_argument("--claim-limit", type=int, default=100, help="jobs per measured claim")
    p.add_argument("--claims", type=int, default=200, help="measured claims per backlog")
    p.add_argument("--claim-warmup", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600, help="seconds per processing run")
    p.add_argument("--profile", help="cProfile embedq workers into PROFILE.<n>w.<i>")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.claim_large is None:
        args.claim_large = 100_000 if args.quick else 1_000_000
    return args


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "--child":
        child_main(argv[1], argv[2])
        return 0
    args = parse_args(argv)
    t0 = time.perf_counter()
    with database_server(args.database_url) as url:
        done = asyncio.run(run(args, url))
        bench: Bench = done["bench"]
        config = done["config"]
    results: dict[str, Any] = {**bench.results, "config": config}
    bench.print_tables(config)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
