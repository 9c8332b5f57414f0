"""Job-queue benchmark: embedq against Procrastinate and a raw-SQL batch queue (the limit).

    python bench/queue.py --jobs 20000 --json out.json            # full run
    python bench/queue.py --quick                                   # smoke run, smaller backlogs

Everything runs against one PostgreSQL server, in one run: an embedded server in a temporary
directory, or --database-url / EMBEDQ_DATABASE_URL (scratch databases embedq_bench_* are
created there and dropped afterwards). Each system gets its own database, so none sees another's
tables.

Measured, with no-op jobs:
  * enqueue one by one (one round trip and commit per job) and in bulk (chunks of --chunk),
  * processing with 1 and with 4 worker processes, pre-enqueued backlog of --jobs jobs. Worker
    processes start, connect and then wait at a barrier, so interpreter start-up is not timed.
    "active" time runs from the first claim to the last completion, as the database recorded
    them; "wall" time from the barrier until every worker process has exited,
  * embedq's claim latency (store.claim, 100 jobs) with a small and a large pending backlog,
    raw SQL's the same way as the reference,
  * CPU time per job of the worker processes and (embedded server only) of PostgreSQL.

See bench/README.md.
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py: drop its folder from sys.path so that `import queue` (asyncio,
# logging, concurrent.futures) finds the standard library module, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

NOOP = "embedq.noop"
PROC_NOOP = "bench.noop"
DB_NAMES = {
    "embedq": "embedq_bench_embedq",
    "procrastinate": "embedq_bench_procrastinate",
    "raw_sql": "embedq_bench_raw",
    "embedq_large": "embedq_bench_embedq_large",
    "raw_sql_large": "embedq_bench_raw_large",
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


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


# --- Procrastinate app (shared by the parent and its worker processes) -------------------


def make_procrastinate_app(url: str, pool_size: int) -> Any:
    import procrastinate

    # It warns that the app lives in __main__; harmless here, the task has an explicit name.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    connector = procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=pool_size)
    app = procrastinate.App(connector=connector)

    @app.task(name=PROC_NOOP)
    async def noop(**_: Any) -> None:
        return None

    return app


# --- worker processes ---------------------------------------------------------------------
#
# `queue.py --child KIND CONFIG_JSON` runs one worker process: it connects, prints READY,
# waits for a line on stdin, works until its queue is empty, then prints RESULT {json}.


_cpu_at_go = 0.0


async def _barrier() -> float:
    global _cpu_at_go
    print("READY", flush=True)
    if not await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
        sys.exit(1)  # the benchmark went away before releasing us
    _cpu_at_go = time.process_time()
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
            t = time.time()
            cur = await conn.execute(RAW_CLAIM, {"limit": cfg["batch_size"]})
            rows = await cur.fetchall()
            if not rows:
                break
            first = first or t
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
    result["cpu_s"] = time.process_time() - _cpu_at_go
    print("RESULT " + json.dumps(result), flush=True)


def server_cpu_s(postmaster: Any) -> float | None:
    """CPU seconds used so far by a local PostgreSQL: the postmaster, its live children, and
    the children it has reaped (connections that ended)."""
    if postmaster is None:
        return None
    import psutil

    t = postmaster.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in postmaster.children():
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return float(total)


async def run_workers(
    kind: str, cfg: dict[str, Any], processes: int, timeout_s: float, postmaster: Any = None
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
        cpu0 = server_cpu_s(postmaster)
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
    await asyncio.sleep(0.2)  # let the server reap the workers' connections
    cpu1 = server_cpu_s(postmaster)
    server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return {
        "wall_s": t1 - t0,
        "go": t0,
        "workers": results,
        "worker_cpu_s": sum(w["cpu_s"] for w in results),
        "server_cpu_s": server_cpu,
    }


# --- the benchmark ------------------------------------------------------------------------


class Claimer:
    """One backlog of pending no-op jobs to measure claims against."""

    async def claim(self) -> list[int]:
        raise NotImplementedError

    async def finish(self, ids: list[int]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class EmbedqClaimer(Claimer):
    def __init__(self, app: Any, worker_id: int, limit: int) -> None:
        self.app, self.worker_id, self.limit = app, worker_id, limit

    @classmethod
    async def open(cls, url: str, size: int, limit: int, **opts: Any) -> EmbedqClaimer:
        import embedq

        app = embedq.App(database_url=url, job_events=opts.get("job_events"))
        await app.open(migrate=True)
        async with app.pool.connection() as conn:  # type: ignore[union-attr]
            await conn.execute("TRUNCATE embedq.jobs, embedq.jobs_archive, embedq.job_events")
            await conn.execute(
                "INSERT INTO embedq.jobs (task, args) SELECT %s, jsonb_build_object('i', g) "
                "FROM generate_series(1, %s) g",
                (NOOP, size),
            )
            await conn.execute("ANALYZE embedq.jobs")
        [row] = await app.store.fetch(
            "register_worker",
            {"name": "bench-claim", "host": socket.gethostname(), "pid": os.getpid(),
             "queues": None, "concurrency": limit, "version": embedq.__version__},
        )  # fmt: skip
        return cls(app, int(row["id"]), limit)

    async def claim(self) -> list[int]:
        return [j.id for j in await self.app.store.claim(self.worker_id, self.limit)]

    async def finish(self, ids: list[int]) -> None:
        from embedq import JobSpec

        none = [None] * len(ids)
        await self.app.store.complete(self.worker_id, ids, none, none)
        await self.app.enqueue([JobSpec(NOOP, {"i": i}) for i in range(len(ids))])

    async def close(self) -> None:
        await self.app.close()


class RawClaimer(Claimer):
    def __init__(self, conn: Any, limit: int) -> None:
        self.conn, self.limit = conn, limit

    @classmethod
    async def open(cls, url: str, size: int, limit: int, **opts: Any) -> RawClaimer:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await conn.execute(RAW_SCHEMA)  # type: ignore[arg-type]
        await conn.execute("TRUNCATE raw_jobs")
        await conn.execute(
            "INSERT INTO raw_jobs (payload) SELECT jsonb_build_object('i', g) "
            "FROM generate_series(1, %s) g",
            (size,),
        )
        await conn.execute("ANALYZE raw_jobs")
        return cls(conn, limit)

    async def claim(self) -> list[int]:
        cur = await self.conn.execute(RAW_CLAIM, {"limit": self.limit})
        return [r[0] for r in await cur.fetchall()]

    async def finish(self, ids: list[int]) -> None:
        await self.conn.execute(RAW_COMPLETE, {"ids": ids})
        await self.conn.execute(RAW_INSERT_MANY, ([json.dumps({"i": i}) for i in ids],))

    async def close(self) -> None:
        await self.conn.close()


# --- systems under test: enqueue one by one, enqueue in bulk, process with worker processes --


class Driver:
    """One system under test. `process` returns (jobs done, active seconds, run_workers())."""

    name = ""

    def __init__(self, bench: Bench, url: str) -> None:
        self.bench, self.url, self.args = bench, url, bench.args

    async def setup(self) -> None: ...

    async def enqueue_one(self, n: int) -> None: ...

    async def enqueue_bulk(self, n: int) -> None: ...

    async def reset(self) -> None: ...

    async def prepare(self) -> None:
        """Between enqueueing and processing: fresh planner statistics, as autovacuum would."""

    async def process(self, processes: int, n: int) -> tuple[int, float, dict[str, Any]]:
        raise NotImplementedError

    async def close(self) -> None: ...

    def settings(self) -> dict[str, Any]:
        return {}


class EmbedqDriver(Driver):
    name = "embedq"

    async def setup(self) -> None:
        import embedq

        overrides: dict[str, Any] = {"database_url": self.url}
        if self.args.job_events:
            overrides["job_events"] = self.args.job_events
        self.app = embedq.App(**overrides)
        await self.app.open(migrate=True)

    def settings(self) -> dict[str, Any]:
        s = self.app.settings
        return {
            "version": __import__("embedq").__version__,
            "job_events": s.job_events,
            "finished_jobs": s.finished_jobs,
            "worker_concurrency": self.args.concurrency,
            "claim_batch_size": self.args.batch_size,
        }

    async def enqueue_one(self, n: int) -> None:
        from embedq import JobSpec

        for i in range(n):
            await self.app.enqueue([JobSpec(NOOP, {"i": i})])

    async def enqueue_bulk(self, n: int) -> None:
        from embedq import JobSpec

        chunk = self.args.chunk
        for lo in range(0, n, chunk):
            await self.app.enqueue([JobSpec(NOOP, {"i": i}) for i in range(lo, min(n, lo + chunk))])

    async def reset(self) -> None:
        await self.bench.sql(
            "embedq", "TRUNCATE embedq.jobs, embedq.jobs_archive, embedq.job_events"
        )

    async def prepare(self) -> None:
        await self.bench.sql("embedq", "ANALYZE embedq.jobs")

    async def process(self, processes: int, n: int) -> tuple[int, float, dict[str, Any]]:
        a = self.args
        cfg = {
            "url": self.url,
            "concurrency": a.concurrency,
            "batch_size": a.batch_size,
            "poll_interval_s": 0.2,
            "job_events": a.job_events,
            "profile": a.profile,
        }
        run = await run_workers(
            "embedq", cfg, processes, self.bench.timeout_for(n, 200), self.bench.postmaster
        )
        [(done, left, active_s)] = await self.bench.sql(
            "embedq",
            "SELECT (SELECT count(*) FROM embedq.jobs_archive WHERE state = 'succeeded'),"
            " (SELECT count(*) FROM embedq.jobs),"
            " extract(epoch FROM max(finished_at) - min(started_at))::float8"
            " FROM embedq.jobs_archive",
        )
        if done != n or left != 0:
            raise RuntimeError(f"embedq: {done} of {n} jobs succeeded, {left} left in the queue")
        return done, active_s, run

    async def close(self) -> None:
        await self.app.close()


class RawDriver(Driver):
    name = "raw_sql"

    async def setup(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        await self.conn.execute(RAW_SCHEMA)  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        return {"batch_size": self.args.raw_batch}

    async def enqueue_one(self, n: int) -> None:
        for i in range(n):
            await self.conn.execute(RAW_INSERT_ONE, (json.dumps({"i": i}),))

    async def enqueue_bulk(self, n: int) -> None:
        chunk = self.args.chunk
        for lo in range(0, n, chunk):
            payloads = [json.dumps({"i": i}) for i in range(lo, min(n, lo + chunk))]
            await self.conn.execute(RAW_INSERT_MANY, (payloads,))

    async def reset(self) -> None:
        await self.conn.execute("TRUNCATE raw_jobs")

    async def prepare(self) -> None:
        await self.conn.execute("ANALYZE raw_jobs")

    async def process(self, processes: int, n: int) -> tuple[int, float, dict[str, Any]]:
        cfg = {"url": self.url, "batch_size": self.args.raw_batch}
        run = await run_workers(
            "raw", cfg, processes, self.bench.timeout_for(n, 1000), self.bench.postmaster
        )
        done = sum(w["processed"] for w in run["workers"])
        cur = await self.conn.execute("SELECT count(*) FROM raw_jobs")
        left = (await cur.fetchone() or [0])[0]
        if done != n or left != 0:
            raise RuntimeError(f"raw_sql: {done} of {n} jobs processed, {left} left")
        firsts = [w["first"] for w in run["workers"] if w["first"]]
        active_s = max(w["last"] for w in run["workers"]) - min(firsts)
        return done, active_s, run

    async def close(self) -> None:
        await self.conn.close()


class ProcrastinateDriver(Driver):
    name = "procrastinate"

    async def setup(self) -> None:
        self.app = make_procrastinate_app(self.url, 4)
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        self.noop = self.app.tasks[PROC_NOOP]

    def settings(self) -> dict[str, Any]:
        import procrastinate

        return {
            "version": procrastinate.__version__,
            "concurrency": self.args.procrastinate_concurrency,
        }

    async def enqueue_one(self, n: int) -> None:
        for i in range(n):
            await self.noop.defer_async(i=i)

    async def enqueue_bulk(self, n: int) -> None:
        chunk = self.args.chunk
        for lo in range(0, n, chunk):
            await self.noop.batch_defer_async(*({"i": i} for i in range(lo, min(n, lo + chunk))))

    async def reset(self) -> None:
        await self.bench.sql(
            "procrastinate", "TRUNCATE procrastinate_events, procrastinate_jobs CASCADE"
        )

    async def prepare(self) -> None:
        await self.bench.sql("procrastinate", "ANALYZE procrastinate_jobs")

    async def process(self, processes: int, n: int) -> tuple[int, float, dict[str, Any]]:
        cfg = {"url": self.url, "concurrency": self.args.procrastinate_concurrency}
        run = await run_workers(
            "procrastinate", cfg, processes, self.bench.timeout_for(n, 20), self.bench.postmaster
        )
        [(done, left, active_s)] = await self.bench.sql(
            "procrastinate",
            "SELECT (SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'),"
            " (SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'),"
            " extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')"
            "  - min(at) FILTER (WHERE type = 'started'))::float8"
            " FROM procrastinate_events",
        )
        if done != n or left != 0:
            raise RuntimeError(f"procrastinate: {done} of {n} jobs succeeded, {left} left")
        return done, active_s, run

    async def close(self) -> None:
        await self.app.close_async()


DRIVERS: dict[str, type[Driver]] = {
    "raw_sql": RawDriver,
    "embedq": EmbedqDriver,
    "procrastinate": ProcrastinateDriver,
}


class Bench:
    def __init__(self, args: argparse.Namespace, server_url: str) -> None:
        self.args = args
        self.server_url = server_url
        self.urls = {k: with_database(server_url, v) for k, v in DB_NAMES.items()}
        self.results: dict[str, dict[str, Any]] = {}
        # system, scenario, jobs, runs, median jobs/s, best jobs/s, median wall jobs/s,
        # worker CPU us/job, server CPU us/job
        self.rows: list[tuple[Any, ...]] = []
        self.postmaster: Any = None
        self.latency_rows: list[tuple[str, int, float, float, float]] = []

    def say(self, msg: str) -> None:
        if not self.args.no_progress:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # --- databases ---

    def find_postmaster(self) -> None:
        """The embedded server's main process, to measure the server's CPU time."""
        import psutil

        with psycopg.connect(self.server_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            # while the backend lives: it exits with the connection
            with contextlib.suppress(psutil.Error, TypeError):
                self.postmaster = psutil.Process(row[0]).parent() if row else None

    def create_databases(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for name in DB_NAMES.values():
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]
                conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]

    def drop_databases(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            for name in DB_NAMES.values():
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]

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

    def process_counts(self) -> list[int]:
        return [int(x) for x in self.args.workers.split(",")]

    def timeout_for(self, n: int, floor_rate: float) -> float:
        return max(self.args.timeout, 60 + n / floor_rate)

    # --- throughput ---

    async def throughput(self, system: str) -> None:
        a = self.args
        n = a.procrastinate_jobs if system == "procrastinate" else a.jobs
        driver = DRIVERS[system](self, self.urls[system])
        await driver.setup()
        out: dict[str, Any] = {"jobs": n}
        try:
            out["settings"] = driver.settings()
            n1 = min(n, a.one_by_one)
            self.say(f"{system}: enqueue {n1:,} jobs one by one")
            t = time.perf_counter()
            await driver.enqueue_one(n1)
            out["enqueue_one_per_s"] = rate(n1, time.perf_counter() - t)
            self.rows.append(
                (system, "enqueue one by one", n1, 1, out["enqueue_one_per_s"],
                 out["enqueue_one_per_s"], None, None, None)
            )  # fmt: skip
            bulk: list[float] = []
            for processes in self.process_counts():
                runs: list[float] = []
                walls: list[float] = []
                worker_cpu: list[float] = []
                server_cpu: list[float] = []
                for r in range(a.repeat):
                    await driver.reset()
                    self.say(f"{system}: bulk enqueue {n:,} jobs")
                    t = time.perf_counter()
                    await driver.enqueue_bulk(n)
                    bulk.append(rate(n, time.perf_counter() - t))
                    await driver.prepare()
                    self.say(
                        f"{system}: process {n:,} jobs with {processes} worker process(es), "
                        f"run {r + 1}/{a.repeat}"
                    )
                    done, active_s, run = await driver.process(processes, n)
                    runs.append(rate(done, active_s))
                    walls.append(rate(done, run["wall_s"]))
                    worker_cpu.append(round(run["worker_cpu_s"] / done * 1e6, 1))
                    if run["server_cpu_s"] is not None:
                        server_cpu.append(round(run["server_cpu_s"] / done * 1e6, 1))
                    self.say(
                        f"{system}: {runs[-1]:,.0f} jobs/s ({walls[-1]:,.0f} wall); CPU per "
                        f"job: workers {worker_cpu[-1]:.0f} us, server "
                        + (f"{server_cpu[-1]:.0f} us" if server_cpu else "?")
                    )
                key = f"processed_{processes}w"
                out[f"{key}_per_s"] = median(runs)
                out[f"{key}_best_per_s"] = max(runs)
                out[f"{key}_wall_per_s"] = median(walls)
                out[f"{key}_runs_per_s"] = runs
                out[f"{key}_wall_runs_per_s"] = walls
                out[f"{key}_worker_cpu_us_per_job"] = median(worker_cpu)
                out[f"{key}_server_cpu_us_per_job"] = median(server_cpu) if server_cpu else None
                out[f"{key}_worker_cpu_runs_us_per_job"] = worker_cpu
                out[f"{key}_server_cpu_runs_us_per_job"] = server_cpu
                label = f"process, {processes} worker{'s' if processes > 1 else ''}"
                self.rows.append(
                    (system, label, n, len(runs), median(runs), max(runs), median(walls),
                     median(worker_cpu), median(server_cpu) if server_cpu else None)
                )  # fmt: skip
            await driver.reset()
        finally:
            await driver.close()
        self.rows.insert(
            len(self.rows) - len(self.process_counts()),
            (system, f"bulk enqueue ({a.chunk:,}/call)", n, len(bulk),
             median(bulk), max(bulk), None, None, None),
        )  # fmt: skip
        counts = self.process_counts()
        out["bulk_enqueue_per_s"] = median(bulk)
        out["bulk_enqueue_best_per_s"] = max(bulk)
        out["bulk_enqueue_runs_per_s"] = bulk
        out["processed_per_s"] = max(out[f"processed_{p}w_per_s"] for p in counts)
        out["processed_best_per_s"] = max(out[f"processed_{p}w_best_per_s"] for p in counts)
        out["processed_wall_per_s"] = max(out[f"processed_{p}w_wall_per_s"] for p in counts)
        self.results.setdefault(system, {}).update(out)

    # --- claim latency ---

    async def claim_latency(self, system: str) -> None:
        """Claim latency with a small and a large backlog, each in its own database, claims
        alternating between the two so that noise from the machine hits both alike. After each
        claim the jobs are completed and as many new ones enqueued: the backlog keeps its size."""
        a = self.args
        make = {"embedq": EmbedqClaimer, "raw_sql": RawClaimer}[system]
        sizes = {"small": a.claim_small, "large": a.claim_large}
        claimers: dict[str, Claimer] = {}
        try:
            for label, size in sizes.items():
                key = system if label == "small" else f"{system}_large"
                self.say(f"{system}: building a backlog of {size:,} pending jobs")
                t = time.perf_counter()
                claimers[label] = await make.open(
                    self.urls[key], size, a.claim_limit, job_events=a.job_events
                )
                self.say(f"{system}: backlog of {size:,} built in {time.perf_counter() - t:.1f} s")
            self.say(f"{system}: {a.claims} claims of {a.claim_limit} on each backlog")
            lat: dict[str, list[float]] = {label: [] for label in sizes}
            for k in range(a.claims + a.claim_warmup):
                for label in ("small", "large") if k % 2 == 0 else ("large", "small"):
                    c = claimers[label]
                    t = time.perf_counter()
                    ids = await c.claim()
                    elapsed = time.perf_counter() - t
                    if len(ids) != a.claim_limit:
                        raise RuntimeError(f"{system}: a claim got {len(ids)} jobs")
                    if k >= a.claim_warmup:
                        lat[label].append(elapsed * 1000)
                    await c.finish(ids)
        finally:
            for c in claimers.values():
                await c.close()
        out = self.results.setdefault(system, {})
        for label, values in lat.items():
            p50, p99, mean = pct(values, 0.5), pct(values, 0.99), statistics.fmean(values)
            out[f"claim_p50_ms_{label}"] = round(p50, 3)
            out[f"claim_p99_ms_{label}"] = round(p99, 3)
            out[f"claim_mean_ms_{label}"] = round(mean, 3)
            self.latency_rows.append((system, sizes[label], p50, p99, mean))
        out["claim_p99_ratio"] = round(out["claim_p99_ms_large"] / out["claim_p99_ms_small"], 3)

    # --- output ---

    def print_tables(self, config: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console() if sys.stdout.isatty() else Console(width=140)
        t = Table(
            title=f"No-op jobs, one PostgreSQL {config['server_version']} server, "
            f"{config['cores']} cores",
            caption="Jobs/s: median of the runs. Processing: jobs / (last completion - first "
            "claim) as recorded in the database; wall: from the start barrier until every "
            "worker process exited. CPU: worker processes' and the PostgreSQL server's (its "
            "background processes included; embedded server only) CPU time per job.",
        )
        t.add_column("System")
        t.add_column("Scenario")
        t.add_column("Jobs", justify="right")
        t.add_column("Runs", justify="right")
        t.add_column("Jobs/s", justify="right")
        t.add_column("Best", justify="right")
        t.add_column("Jobs/s (wall)", justify="right")
        t.add_column("Worker CPU µs/job", justify="right")
        t.add_column("Server CPU µs/job", justify="right")
        last = None

        def num(v: float | None) -> str:
            return f"{v:,.0f}" if v is not None else ""

        for system, scenario, n, runs, mid, best, wall, wcpu, scpu in self.rows:
            if last is not None and system != last:
                t.add_section()
            last = system
            t.add_row(
                system, scenario, f"{n:,}", str(runs), num(mid), num(best), num(wall),
                num(wcpu), num(scpu),
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
    if not args.database_url:
        bench.find_postmaster()
    try:
        for system in args.systems:
            await bench.throughput(system)
        for system in ("raw_sql", "embedq"):
            if system in args.systems and args.claims > 0:
                await bench.claim_latency(system)
    finally:
        bench.drop_databases()
    config = {
        "jobs": args.jobs,
        "systems": args.systems,
        "procrastinate_jobs": args.procrastinate_jobs if "procrastinate" in args.systems else None,
        "one_by_one_jobs": min(args.jobs, args.one_by_one),
        "chunk": args.chunk,
        "repeat": args.repeat,
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
    p.add_argument("--repeat", type=int, default=3, help="runs per worker process count")
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
    p.add_argument(
        "--systems",
        default="raw_sql,embedq,procrastinate",
        help="comma-separated subset of raw_sql, embedq, procrastinate",
    )
    args = p.parse_args(argv)
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = set(args.systems) - {"raw_sql", "embedq", "procrastinate"}
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.skip_procrastinate and "procrastinate" in args.systems:
        args.systems.remove("procrastinate")
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
