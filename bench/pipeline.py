"""Embedding-pipeline benchmark: embedq against the raw model, the pgai vectorizer and exact
search, in one run on one PostgreSQL server.

    python bench/pipeline.py --json out.json        # full sizes (about 15 minutes here)
    python bench/pipeline.py --quick                # smoke sizes (a few minutes)
    python bench/pipeline.py --only local,search    # some parts

Parts (each in its own scratch database on the same server, dropped afterwards):

  local    the local model (all-MiniLM-L6-v2, CPU): documents/s of embedq end to end
           (queue -> chunk -> embed -> swap, an in-process worker, model already loaded)
           against documents/s of raw `model.encode` on the same texts with the same batch
           size (measured before and after embedq; the mean is the baseline).
  openai   a local fake OpenAI-compatible endpoint (tests/fake_servers.py, its own process)
           at 0 ms and 150 ms latency: rows/s of embedq (`embedq worker` subprocess, timed
           from its start until every row is embedded) against the pgai vectorizer worker
           (bench/pgai_peer.py, timed the same way) on the same rows.
  latency  write -> searchable: one document written at a time while a worker runs (local
           model); the time until its status reads `embedded`, and the model's own time for
           one text alone, for reference.
  search   a collection of --chunks one-chunk documents (fake 384-dim vectors from clustered
           vocabularies, so that neighbourhoods exist as in real embeddings): semantic search
           latency through `Collection.search` (k=10), and recall@10 of the HNSW index
           against exact search (a sequential scan) on the same query vectors.

Writes a JSON file with every figure and the sizes used (--json).
"""

# ruff: noqa: E402, E501  (imports follow the sys.path fix; the report table is wide)

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
# bench/queue.py would shadow the standard library's `queue`: keep this folder off sys.path,
# and import the pgai peer by path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(ROOT / "src"))

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

import embedq
from embedq.documents import Collection


def _load(name: str, filename: str) -> Any:
    """A sibling bench script as a module (by path: this folder is kept off sys.path)."""
    spec = importlib.util.spec_from_file_location(name, _HERE / filename)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


pgai_peer = _load("pgai_peer", "pgai_peer.py")
bench_queue = _load("bench_queue", "queue.py")  # for server_cpu_s

SIZES = {
    "full": {"local_docs": 800, "openai_rows": 20_000, "writes": 60, "chunks": 100_000, "queries": 200},
    "quick": {"local_docs": 150, "openai_rows": 2_000, "writes": 20, "chunks": 10_000, "queries": 50},
}  # fmt: skip
TARGETS = {
    "local.ratio_to_raw": (">=", 0.90),
    "openai_fake_0ms.ratio_to_pgai": (">=", 4.0),
    "openai_fake_150ms.ratio_to_pgai": (">=", 3.0),
    "write_to_searchable.p50_ms": ("<=", "50 + model p50"),
    "search.p95_ms": ("<=", 20.0),
    "search.recall_at_10": (">=", 0.95),
}
log = logging.getLogger("bench")


def scratch(server: str, name: str) -> str:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


def drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def drain(app: embedq.App, timeout: float = 3600) -> float:
    t = time.perf_counter()
    worker = embedq.Worker(app, install_signals=False, exit_when_idle=True)
    await asyncio.wait_for(worker.run(), timeout)
    return time.perf_counter() - t


# --- (a) local model ---------------------------------------------------------------------


async def bench_local(server: str, n: int) -> dict[str, Any]:
    from embedq.providers.local import LocalProvider

    texts = pgai_peer.sample_texts(n, length=500, seed=11)
    url = scratch(server, "embedq_bench_local")
    try:
        app = embedq.App(database_url=url, log_level="WARNING")
        async with app:
            col = await app.collections.create("local", provider="local")
            guarded = app.endpoints.get(col.active.config)
            await guarded.embed(["warm the model up"])  # load once, outside the timing
            provider = guarded.providers[0]
            assert isinstance(provider, LocalProvider)

            async def raw() -> float:
                t = time.perf_counter()
                for i in range(0, n, provider.max_batch):
                    await provider.embed(texts[i : i + provider.max_batch])
                return n / (time.perf_counter() - t)

            raw_before = await raw()
            await col.upsert_many([{"key": f"d{i}", "text": t} for i, t in enumerate(texts)])
            seconds = await drain(app)
            raw_after = await raw()
            col = await col.with_fresh_state()
            assert col.counts["embedded"] == n, col.counts
        raw_rate = (raw_before + raw_after) / 2
        rate = n / seconds
        return {
            "documents": n,
            "embedq_docs_per_s": rate,
            "raw_docs_per_s": raw_rate,
            "raw_before": raw_before,
            "raw_after": raw_after,
            "ratio_to_raw": rate / raw_rate,
            "batch_size": provider.max_batch,
        }
    finally:
        drop(server, "embedq_bench_local")


# --- (b) fake OpenAI endpoint vs pgai ------------------------------------------------------


def embedq_worker_rows_per_s(
    server: str, base_url: str, texts: list[str], *, vector_index: bool = True
) -> dict[str, Any]:
    """`vector_index=False` drops the collection's HNSW index first: pgai builds none in its
    run, so this shows what the pipeline itself does without that database work."""
    url = scratch(server, "embedq_bench_openai")
    try:

        async def load() -> None:
            app = embedq.App(database_url=url, log_level="WARNING")
            async with app:
                col = await app.collections.create(
                    "rows",
                    provider="openai",
                    model="text-embedding-3-small",
                    dimensions=384,
                    base_url=base_url,
                    chunk_size=400,
                    chunk_overlap=0,
                )
                if not vector_index:
                    assert app.pool is not None
                    async with app.pool.connection() as conn:
                        await conn.execute(
                            sql.SQL("DROP INDEX embedq.{}").format(
                                sql.Identifier(f"chunks_space_{col.active.id}_hnsw")
                            )
                        )
                for i in range(0, len(texts), 5000):
                    await col.upsert_many(
                        [{"key": f"r{i + j}", "text": t} for j, t in enumerate(texts[i : i + 5000])]
                    )

        asyncio.run(load())
        env = {**os.environ, "EMBEDQ_DATABASE_URL": url, "EMBEDQ_LOG_LEVEL": "WARNING"}
        env.pop("EMBEDQ_SCHEMA", None)
        postmaster = _postmaster(url)
        db_cpu_before = bench_queue.server_cpu_s(postmaster)
        worker_cpu_before = pgai_peer._children_cpu_s()
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedq", "worker", "--queues", "embed", "--exit-when-idle"],
            env=env,
        )
        first = None
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                [(done,)] = conn.execute(
                    "SELECT count(*) FROM embedq.documents WHERE status = 'embedded'"
                ).fetchall()
                if done and first is None:
                    first = (time.perf_counter() - started, done)
                if done >= len(texts):
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"embedq worker exited early with {proc.returncode}")
                time.sleep(0.05)
        seconds = time.perf_counter() - started
        proc.wait(timeout=60)
        db_cpu_after = bench_queue.server_cpu_s(postmaster)
        worker_cpu_s = pgai_peer._children_cpu_s() - worker_cpu_before
        steady = None
        if first and seconds > first[0]:
            steady = (len(texts) - first[1]) / (seconds - first[0])
        n = len(texts)
        return {
            "rows": n,
            "seconds": seconds,
            "rows_per_s": n / seconds,
            "first_row_s": first[0] if first else None,
            "steady_rows_per_s": steady,
            # the worker process from start to exit (its start-up included)
            "worker_cpu_ms_per_row": worker_cpu_s / n * 1000,
            # the whole server meanwhile (embedded server only: None for another server)
            "db_cpu_ms_per_row": (
                (db_cpu_after - db_cpu_before) / n * 1000
                if db_cpu_before is not None and db_cpu_after is not None
                else None
            ),
        }
    finally:
        drop(server, "embedq_bench_openai")


def _postmaster(url: str) -> Any:
    """The local server's main process (to read its CPU time), or None if not local."""
    import psutil

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:  # while the backend lives: it exits with the connection
            return psutil.Process(row[0]).parent() if row else None
        except psutil.Error:
            return None


def bench_openai(server: str, rows: int, latency_ms: float) -> dict[str, Any]:
    texts = pgai_peer.sample_texts(rows, length=500, seed=int(latency_ms) + 3)
    with pgai_peer.fake_openai(latency_ms, 384, "text-embedding-3-small") as base_url:
        mine = embedq_worker_rows_per_s(server, base_url, texts)
        unindexed = embedq_worker_rows_per_s(server, base_url, texts, vector_index=False)
        try:
            peer = pgai_peer.run_pgai(server, base_url, texts)
        except Exception as exc:  # the peer's failure is reported, not hidden
            peer = {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {
        "latency_ms": latency_ms,
        "rows": rows,
        "embedq": mine,
        "embedq_without_vector_index": unindexed,
        "pgai": peer,
    }
    if "rows_per_s" in peer:
        out["ratio_to_pgai"] = mine["rows_per_s"] / peer["rows_per_s"]
        out["ratio_to_pgai_without_vector_index"] = unindexed["rows_per_s"] / peer["rows_per_s"]
    return out


# --- (c) write -> searchable ---------------------------------------------------------------


async def bench_latency(server: str, writes: int) -> dict[str, Any]:
    url = scratch(server, "embedq_bench_latency")
    try:
        app = embedq.App(database_url=url, log_level="WARNING", poll_interval_s=5.0)
        async with app:
            col = await app.collections.create("live", provider="local")
            guarded = app.endpoints.get(col.active.config)
            await guarded.embed(["warm the model up"])
            worker = embedq.Worker(app, install_signals=False)
            run = asyncio.create_task(worker.run())
            await asyncio.sleep(1.0)
            texts = pgai_peer.sample_texts(writes, length=500, seed=99)
            latencies, model = [], []
            for i, text in enumerate(texts):
                t = time.perf_counter()
                await guarded.embed([text + " (model alone)"])
                model.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                result = await col.upsert(f"w{i}", text)
                # A light poll (5 ms): a busier one would steal CPU from the model.
                while (await col.get(f"w{i}")).status != "embedded":
                    await asyncio.sleep(0.005)
                latencies.append((time.perf_counter() - t) * 1000)
                hits = await col.search(text, mode="semantic", k=1)
                assert hits and hits[0].key == f"w{i}", (result, hits)
                await asyncio.sleep(0.05)
            worker.stop()
            await run
        return {
            "writes": writes,
            "p50_ms": statistics.median(latencies),
            "p95_ms": pct(latencies, 0.95),
            "model_p50_ms": statistics.median(model),
            "overhead_p50_ms": statistics.median(latencies) - statistics.median(model),
        }
    finally:
        drop(server, "embedq_bench_latency")


# --- (d) search latency and recall -----------------------------------------------------------


def clustered_texts(n: int, topics: int = 200, seed: int = 5) -> list[str]:
    """Documents drawn mostly from one topic's vocabulary each, some shared words."""
    rng = random.Random(seed)
    vocab = [[f"t{t}w{w}" for w in range(40)] for t in range(topics)]
    common = [f"c{w}" for w in range(300)]
    out = []
    for i in range(n):
        topic = vocab[rng.randrange(topics)]
        words = rng.choices(topic, k=rng.randrange(12, 25)) + rng.choices(common, k=6)
        out.append(f"doc{i} " + " ".join(words))
    return out


async def bench_search(server: str, chunks: int, queries: int) -> dict[str, Any]:
    url = scratch(server, "embedq_bench_search")
    try:
        app = embedq.App(database_url=url, log_level="WARNING", embed_batch_size=1000)
        async with app:
            col = await app.collections.create("big", provider="fake", model="fake-384")
            texts = clustered_texts(chunks)
            t = time.perf_counter()
            for i in range(0, chunks, 5000):
                await col.upsert_many(
                    [{"key": f"k{i + j}", "text": s} for j, s in enumerate(texts[i : i + 5000])]
                )
            load_s = time.perf_counter() - t
            build_s = await drain(app)
            col = await col.with_fresh_state()
            [(n,)] = await _fetch(app, "SELECT count(*) FROM embedq.chunks")
            rng = random.Random(17)
            qtexts = [
                " ".join(rng.choices(clustered_texts(1, seed=1000 + i)[0].split()[1:], k=8))
                for i in range(queries)
            ]
            for q in qtexts[:10]:
                await col.search(q, mode="semantic", k=10)  # warm caches and the query vectors
            exact = {q: await _exact(app, col, q) for q in qtexts}
            default_ef = app.settings.search_ef
            sweep = []
            for ef in sorted({40, 100, 200, 400, default_ef}):
                app.settings.search_ef = ef
                lat, recalls = [], []
                for q in qtexts:
                    t = time.perf_counter()
                    hits = await col.search(q, mode="semantic", k=10)
                    lat.append((time.perf_counter() - t) * 1000)
                    truth = exact[q]
                    recalls.append(len({h.key for h in hits} & truth) / max(1, min(10, len(truth))))
                sweep.append(
                    {"ef_search": ef, "p50_ms": statistics.median(lat), "p95_ms": pct(lat, 0.95),
                     "recall_at_10": statistics.mean(recalls)}
                )  # fmt: skip
            app.settings.search_ef = default_ef
            chosen = next(r for r in sweep if r["ef_search"] == default_ef)
            hyb = []
            for q in qtexts[: max(10, queries // 4)]:
                t = time.perf_counter()
                await col.search(q, mode="hybrid", k=10)
                hyb.append((time.perf_counter() - t) * 1000)
        return {
            "chunks": n,
            "queries": queries,
            "load_s": load_s,
            "embed_and_index_s": build_s,
            "p50_ms": chosen["p50_ms"],
            "p95_ms": chosen["p95_ms"],
            "recall_at_10": chosen["recall_at_10"],
            "hybrid_p50_ms": statistics.median(hyb),
            "hybrid_p95_ms": pct(hyb, 0.95),
            "ef_search": default_ef,
            "ef_sweep": sweep,
        }
    finally:
        drop(server, "embedq_bench_search")


async def _fetch(app: embedq.App, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(query, params)
        return list(await cur.fetchall())


async def _exact(app: embedq.App, col: Collection, query: str) -> set[str]:
    """Top-10 documents by a sequential scan: the ground truth."""
    from embedq.search import _embed_query

    vector = await _embed_query(col, col.active, query)
    assert app.pool is not None
    async with app.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_indexscan = off")
        cur = await conn.execute(
            "SELECT d.key FROM embedq.chunks c JOIN embedq.documents d ON d.id = c.document_id "
            "WHERE c.space_id = %s ORDER BY c.embedding::vector(384) <=> %s::vector(384) LIMIT 10",
            (col.active.id, vector),
        )
        return {r["key"] for r in await cur.fetchall()}


# --- report ---------------------------------------------------------------------------------


def verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value >= target if op == ">=" else value <= target) else "NO"


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, str]] = []
    if "local" in results:
        r = results["local"]
        rows.append(("local: docs/s", f"{r['embedq_docs_per_s']:.1f}", f"raw encode {r['raw_docs_per_s']:.1f}",
                     f"{r['ratio_to_raw']:.2f}x (>= 0.90)", verdict(r["ratio_to_raw"], ">=", 0.9)))  # fmt: skip
    for key in ("openai_fake_0ms", "openai_fake_150ms"):
        if key in results:
            r = results[key]
            target = 4.0 if key.endswith("0ms") and "150" not in key else 3.0
            peer = r["pgai"].get("rows_per_s")
            rows.append((f"fake OpenAI {r['latency_ms']:g} ms: rows/s", f"{r['embedq']['rows_per_s']:.0f}",
                         f"pgai {peer:.0f}" if peer else f"pgai failed: {r['pgai'].get('error', '')[:60]}",
                         f"{r['ratio_to_pgai']:.2f}x (>= {target:g})" if peer else "-",
                         verdict(r.get("ratio_to_pgai"), ">=", target)))  # fmt: skip
            m = r["embedq"]
            cpu = f"worker {m['worker_cpu_ms_per_row']:.2f}"
            if m["db_cpu_ms_per_row"] is not None:
                cpu += f" + db {m['db_cpu_ms_per_row']:.2f}"
            rows.append(("  steady rows/s; CPU ms per row", f"{m['steady_rows_per_s'] or 0:.0f}; {cpu}",
                         f"pgai {r['pgai'].get('steady_rows_per_s') or 0:.0f}; worker "
                         f"{(r['pgai'].get('worker_cpu_us_per_row') or 0) / 1000:.2f}", "", ""))  # fmt: skip
            u = r["embedq_without_vector_index"]
            rows.append(("  same, embedq without HNSW index (as pgai ran)", f"{u['rows_per_s']:.0f}",
                         f"pgai {peer:.0f}" if peer else "-",
                         f"{r['ratio_to_pgai_without_vector_index']:.2f}x" if peer else "-", ""))  # fmt: skip
            if u["db_cpu_ms_per_row"] is not None:
                rows.append(("  same, CPU ms per row", f"worker {u['worker_cpu_ms_per_row']:.2f} + db "
                             f"{u['db_cpu_ms_per_row']:.2f}", "", "", ""))  # fmt: skip
    if "write_to_searchable" in results:
        r = results["write_to_searchable"]
        limit = 50 + r["model_p50_ms"]
        rows.append(("write -> searchable p50 / p95 ms", f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}",
                     f"model alone p50 {r['model_p50_ms']:.1f}", f"p50 <= {limit:.1f}",
                     verdict(r["p50_ms"], "<=", limit)))  # fmt: skip
    if "search" in results:
        r = results["search"]
        rows.append((f"search p50 / p95 ms ({r['chunks']:,} chunks)", f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}",
                     f"hybrid {r['hybrid_p50_ms']:.1f} / {r['hybrid_p95_ms']:.1f}", "p95 <= 20",
                     verdict(r["p95_ms"], "<=", 20.0)))  # fmt: skip
        rows.append(("search recall@10 vs exact", f"{r['recall_at_10']:.3f}", f"ef_search {r['ef_search']}",
                     ">= 0.95", verdict(r["recall_at_10"], ">=", 0.95)))  # fmt: skip
    if "search" in results:
        for r in results["search"]["ef_sweep"]:
            rows.append((f"  ef_search {r['ef_search']}: p50 / p95 ms, recall", f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f}",
                         f"recall {r['recall_at_10']:.3f}", "", ""))  # fmt: skip
    headers = ("measure", "embedq", "baseline", "ratio / target", "met")
    widths = (
        [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)] if rows else []
    )
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--database-url", default=os.environ.get("EMBEDQ_DATABASE_URL"))
    p.add_argument("--only", default="local,openai,latency,search", help="parts, comma-separated")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    sizes = SIZES["quick" if args.quick else "full"]
    parts = set(args.only.split(","))
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "mode": "quick" if args.quick else "full",
        "sizes": sizes,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
    }
    with pgai_peer.database_server(args.database_url) as server:
        if "local" in parts:
            print(f"local model: {sizes['local_docs']} documents ...", flush=True)
            results["local"] = asyncio.run(bench_local(server, sizes["local_docs"]))
        if "openai" in parts:
            for ms in (0, 150):
                print(
                    f"fake OpenAI at {ms} ms: {sizes['openai_rows']} rows, embedq and pgai ...",
                    flush=True,
                )
                results[f"openai_fake_{ms}ms"] = bench_openai(server, sizes["openai_rows"], ms)
        if "latency" in parts:
            print(f"write -> searchable: {sizes['writes']} writes ...", flush=True)
            results["write_to_searchable"] = asyncio.run(bench_latency(server, sizes["writes"]))
        if "search" in parts:
            print(f"search: {sizes['chunks']} chunks, {sizes['queries']} queries ...", flush=True)
            results["search"] = asyncio.run(bench_search(server, sizes["chunks"], sizes["queries"]))
    print()
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
