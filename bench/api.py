"""The HTTP API's cost, measured against the same work done in-process in the same run.

    .venv/bin/python bench/api.py --json bench/results/api.json
    .venv/bin/python bench/api.py --quick

One PostgreSQL (embedded, in a temporary directory, or --database-url), one collection on the
`fake` provider (so the numbers are the API's and the database's, not a model's). The service
is a real `embedq serve` subprocess with its rate limit off; the client is httpx with
`--concurrency` requests in flight. Baseline: the same calls on an in-process App (Python API).

| scenario | API | baseline |
| --- | --- | --- |
| write one document per call | PUT /v1/collections/c/documents/{key} | Collection.upsert |
| bulk write, 100 per call | POST /v1/collections/c/documents | Collection.upsert_many |
| keyword / semantic search | POST /v1/collections/c/search | Collection.search |
| read-your-writes | PUT ...?wait=true (serve's worker embeds) | upsert, poll until embedded |
"""

# ruff: noqa: E402  (imports follow the sys.path fix below)
from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the standard library's `queue`: keep this folder off sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx

import embedq

ROOT = Path(__file__).resolve().parent.parent
EMBEDQ = str(Path(sys.executable).with_name("embedq"))
WORDS = "bee flower honey hive postgres vacuum index query row page cache chunk vector".split()


def text(i: int) -> str:
    rng = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)]
    return f"document {i}: " + " ".join(rng)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(env: dict[str, str], data_dir: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [EMBEDQ, "--data-dir", data_dir, "--log-level", "WARNING", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"embedq serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def timed(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> dict[str, Any]:
    """Run call(0..n-1) with `concurrency` in flight; rate and latency percentiles."""
    latencies: list[float] = []
    next_i = 0

    async def lane() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            t = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "n": n,
        "per_s": n / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(len(latencies) * 0.95) - 1],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="embedq-bench-api-")
    token = "eq_" + secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "EMBEDQ_ADMIN_TOKEN": token,
        "EMBEDQ_API_RATE_LIMIT_PER_S": "0",
        "EMBEDQ_EMBEDDING_PROVIDER": "fake",
    }
    if args.database_url:
        env["EMBEDQ_DATABASE_URL"] = args.database_url
    n, bulk_n, search_n, ryw_n = args.writes, args.bulk, args.searches, args.ryw
    results: dict[str, Any] = {}
    try:
        with served(env, data_dir) as url:
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
                for name in ("api", "direct"):
                    r = await http.post("/v1/collections", json={"name": name, "provider": "fake"})
                    r.raise_for_status()
                app = embedq.App(
                    data_dir=data_dir,
                    **({"database_url": args.database_url} if args.database_url else {}),
                )
                await app.open()
                try:
                    api_col = "api"
                    direct = await app.collections.get("direct")
                    c = args.concurrency

                    async def put(i: int) -> None:
                        body = {"text": text(i), "metadata": {"i": i}}
                        r = await http.put(f"/v1/collections/{api_col}/documents/d{i}", json=body)
                        assert r.status_code == 202, r.text

                    async def upsert(i: int) -> None:
                        await direct.upsert(f"d{i}", text(i), metadata={"i": i})

                    results["write_one"] = (await timed(n, c, put), await timed(n, c, upsert))

                    async def bulk(i: int) -> None:
                        docs = [{"key": f"b{i}-{j}", "text": text(i * 100 + j)} for j in range(100)]
                        r = await http.post(
                            f"/v1/collections/{api_col}/documents", json={"documents": docs}
                        )
                        assert r.status_code == 202, r.text

                    async def bulk_direct(i: int) -> None:
                        docs = [{"key": f"b{i}-{j}", "text": text(i * 100 + j)} for j in range(100)]
                        await direct.upsert_many(docs)

                    api_b, dir_b = await timed(bulk_n, c, bulk), await timed(bulk_n, c, bulk_direct)
                    for row in (api_b, dir_b):
                        row["docs_per_s"] = row["per_s"] * 100
                    results["write_bulk_100"] = (api_b, dir_b)

                    # let the in-process worker of `serve` embed everything before searching
                    deadline = time.monotonic() + 600
                    while time.monotonic() < deadline:
                        q = (await http.get("/v1/queues")).json()["overview"]
                        if q["pending"] == 0 and q["running"] == 0:
                            break
                        await asyncio.sleep(0.5)
                    for mode in ("keyword", "semantic"):

                        async def search_api(i: int, mode: str = mode) -> None:
                            body = {
                                "query": WORDS[i % len(WORDS)] + " honey",
                                "mode": mode,
                                "k": 10,
                            }
                            r = await http.post(f"/v1/collections/{api_col}/search", json=body)
                            assert r.status_code == 200, r.text

                        async def search_direct(i: int, mode: str = mode) -> None:
                            await direct.search(WORDS[i % len(WORDS)] + " honey", mode=mode, k=10)

                        results[f"search_{mode}"] = (
                            await timed(search_n, c, search_api),
                            await timed(search_n, c, search_direct),
                        )

                    async def put_wait(i: int) -> None:
                        r = await http.put(
                            f"/v1/collections/{api_col}/documents/w{i}?wait=true&timeout=30",
                            json={"text": text(10**6 + i)},
                        )
                        assert r.status_code == 200 and r.json()["status"] == "embedded", r.text

                    async def upsert_poll(i: int) -> None:
                        res = await direct.upsert(f"w{i}", text(10**6 + i))
                        while True:
                            doc = await direct.get(f"w{i}")
                            if doc.version >= res.version and doc.status == "embedded":
                                return
                            await asyncio.sleep(0.02)

                    results["read_your_writes"] = (
                        await timed(ryw_n, 1, put_wait),
                        await timed(ryw_n, 1, upsert_poll),
                    )
                finally:
                    await app.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


def print_table(results: dict[str, Any]) -> None:
    head = (
        f"{'scenario':<22} | {'API /s':>9} | {'direct /s':>9} | {'API/direct':>10} | "
        f"{'API p50 ms':>10} | {'API p95 ms':>10} | {'direct p50 ms':>13}"
    )
    print(head)
    print("-" * len(head))
    for name, (api, direct) in results.items():
        key = "docs_per_s" if "docs_per_s" in api else "per_s"
        print(
            f"{name:<22} | {api[key]:>9.0f} | {direct[key]:>9.0f} | {api[key] / direct[key]:>9.2f}x"
            f" | {api['p50_ms']:>10.1f} | {api['p95_ms']:>10.1f} | {direct['p50_ms']:>13.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", default=os.environ.get("EMBEDQ_DATABASE_URL"))
    p.add_argument("--writes", type=int, default=2000, help="single-document writes per side")
    p.add_argument("--bulk", type=int, default=50, help="bulk calls of 100 documents per side")
    p.add_argument("--searches", type=int, default=1000, help="searches per mode and side")
    p.add_argument("--ryw", type=int, default=50, help="read-your-writes writes per side")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--quick", action="store_true", help="a smoke run (a tenth of the work)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.writes, args.bulk, args.searches, args.ryw = 200, 5, 100, 10
    results = asyncio.run(run(args))
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {
            "scenarios": {k: {"api": a, "direct": d} for k, (a, d) in results.items()},
            "concurrency": args.concurrency,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
