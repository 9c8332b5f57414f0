"""The pgai vectorizer worker as the benchmark's peer: its embedding throughput on our server.

    from pgai_peer import run_pgai
    result = run_pgai(server_url, "http://127.0.0.1:8123/v1", texts)  # {"rows_per_s": ...}

    python bench/pgai_peer.py --rows 2000 --latency-ms 0          # fake endpoint + embedded server
    python bench/pgai_peer.py --rows 2000 --latency-ms 150 --concurrency 10

`run_pgai` creates a scratch database on the given server (`embedq_bench_pgai`, dropped again
at the end), loads the texts into `bench_pgai.articles(id serial primary key, body text)`, runs
`pgai install` there (pgai >= 0.10 installs its `ai` schema as plain SQL: no `ai` extension,
no plpython3u, so it works on the embedded PostgreSQL 18 + pgvector), creates one vectorizer
with `ai.create_vectorizer` (column loading, no parsing, a character splitter large enough that
a ~500-character row is one chunk, OpenAI embeddings at the given base URL, a destination
table, no indexing, no scheduling: that needs TimescaleDB) and runs
`pgai vectorizer worker --once` as a subprocess. The time runs from starting the worker process
until every source row has its embedding in the destination table (polled every 0.1 s), so it
includes the worker's start-up, about 2.5 s here (`first_row_s`: when the first embeddings
were seen; `steady_rows_per_s`: the rate from then on).

pgai runs from its own virtual environment, `.venv-pgai` beside `.venv`, never from embedq's:
its worker extra (`pgai[vectorizer-worker]`) pulls docling, torch 2.14 with CUDA, and older
numpy/click/typer, and even its slim dependencies bring ddtrace, which registers three pytest
plugins into any environment it is installed in. The worker needs only the packages in
PGAI_REQUIREMENTS for column loading + OpenAI embeddings (the PDF/S3/docling parts are imported
lazily and never reached):

    python3.11 -m venv .venv-pgai
    .venv-pgai/bin/pip install 'pgai==0.12.1' 'openai>=1.44,<2' 'tiktoken>=0.7,<1' \\
        'langchain-text-splitters>=0.2,<1' 'ijson>=3.3' 'filetype==1.2.0' 'pgvector>=0.3,<1' \\
        numpy tokenizers

The worker gets OPENAI_API_KEY=anything and TIKTOKEN_CACHE_DIR pointing at the tiktoken files
pgai ships (`pgai/vectorizer/tiktoken_cache`), so nothing is downloaded.

Worker settings are pgai's own defaults unless given: `concurrency` None means the vectorizer's
`ai.processing_default()` concurrency (1 executor, one connection); `batch_size` None means the
worker's default for column loading (50 rows per fetch and per embeddings request). The result's
`settings` records what was used.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0] and bench/queue.py would shadow the standard
# library's `queue` (psycopg and asyncio import it). An importer has dealt with that already.
if __name__ == "__main__":
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import atexit
import contextlib
import json
import os
import random
import resource
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
PGAI_VENV = ROOT / ".venv-pgai"
FAKE_SERVERS = ROOT / "tests" / "fake_servers.py"
PGAI_REQUIREMENTS = [
    "pgai==0.12.1",
    "openai>=1.44,<2",
    "tiktoken>=0.7,<1",
    "langchain-text-splitters>=0.2,<1",
    "ijson>=3.3",
    "filetype==1.2.0",
    "pgvector>=0.3,<1",
    "numpy",
    "tokenizers",
]
DATABASE = "embedq_bench_pgai"
SCHEMA = "bench_pgai"
# pgai's own defaults, written out so the result can say what ran (pgai 0.12.1:
# ai.processing_default() -> concurrency 1; Executor._batch_size -> 50 for column loading).
PGAI_DEFAULT_CONCURRENCY = 1
PGAI_DEFAULT_BATCH_SIZE = 50
# The character splitter only cuts at its separator; with no blank line in a ~500-character
# row and a size well above the row length, every row is exactly one chunk.
CHUNK_SIZE = 4000

# Run by the pgai interpreter: where pgai lives and which version it is, without importing
# the worker (ddtrace and friends take a second).
_PROBE = """
import importlib.metadata, importlib.util, json, os
spec = importlib.util.find_spec("pgai")
pkg = list(spec.submodule_search_locations)[0]
print(json.dumps({"version": importlib.metadata.version("pgai"),
                  "tiktoken_cache": os.path.join(pkg, "vectorizer", "tiktoken_cache")}))
"""

# --- SQL ---------------------------------------------------------------------------------

DROP_DATABASE = "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
CREATE_DATABASE = "CREATE DATABASE {db}"
CREATE_SOURCE = """
CREATE SCHEMA {schema};
CREATE TABLE {schema}.articles (id serial PRIMARY KEY, body text NOT NULL);
"""
COPY_SOURCE = "COPY {schema}.articles (body) FROM STDIN"
CREATE_VECTORIZER = """
SELECT ai.create_vectorizer(
    %(source)s::regclass,
    name        => 'embedq_bench',
    loading     => ai.loading_column('body'),
    parsing     => ai.parsing_none(),
    embedding   => ai.embedding_openai(%(model)s, %(dims)s, base_url => %(base_url)s),
    chunking    => ai.chunking_character_text_splitter(%(chunk_size)s, 0),
    formatting  => ai.formatting_python_template(),
    destination => ai.destination_table(target_schema => %(schema)s,
                                        target_table  => 'articles_embedding_store',
                                        view_schema   => %(schema)s,
                                        view_name     => 'articles_embedding'),
    indexing    => ai.indexing_none(),
    scheduling  => ai.scheduling_none(),
    processing  => ai.processing_default(batch_size => %(batch_size)s)
)
"""
QUEUE_TABLE = "SELECT queue_schema, queue_table FROM ai.vectorizer WHERE id = %s"
QUEUE_DEPTH = "SELECT count(*) FROM {queue}"
EMBEDDED_ROWS = "SELECT count(DISTINCT id) FROM {schema}.articles_embedding_store"
EMBEDDED_SUMMARY = """
SELECT count(DISTINCT id), count(*), min(vector_dims(embedding)), max(vector_dims(embedding))
FROM {schema}.articles_embedding_store
"""
LIB_VERSION = "SELECT version FROM ai.pgai_lib_version WHERE name = 'ai'"
VECTORIZER_ERRORS = "SELECT message, details::text FROM ai.vectorizer_errors ORDER BY recorded"


# --- pgai's interpreter --------------------------------------------------------------------


class PgaiUnavailable(RuntimeError):
    """pgai is not installed where the benchmark looks for it."""


@dataclass(frozen=True)
class PgaiRuntime:
    """The Python that runs pgai, its version, and the tiktoken cache it ships."""

    python: Path
    version: str
    tiktoken_cache: Path

    @classmethod
    def find(cls, python: str | Path | None = None) -> PgaiRuntime:
        """The given interpreter, else this one if it has pgai, else .venv-pgai's."""
        candidates = (
            [Path(python)] if python else [Path(sys.executable), PGAI_VENV / "bin" / "python"]
        )
        for candidate in candidates:
            probe = subprocess.run(
                [str(candidate), "-P", "-c", _PROBE], capture_output=True, text=True, check=False
            )
            if probe.returncode == 0:
                found = json.loads(probe.stdout)
                cache = Path(found["tiktoken_cache"])
                if not cache.is_dir():
                    raise PgaiUnavailable(f"pgai {found['version']} ships no tiktoken cache")
                return cls(candidate, found["version"], cache)
        reqs = " ".join(f"'{r}'" for r in PGAI_REQUIREMENTS)
        raise PgaiUnavailable(
            f"pgai not found (looked in {', '.join(map(str, candidates))}). Install it with: "
            f"python3.11 -m venv {PGAI_VENV} && {PGAI_VENV}/bin/pip install {reqs}"
        )

    def env(self) -> dict[str, str]:
        # Our PYTHONPATH (bench/ with its queue.py, src/) is not for pgai's interpreter.
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return {
            **inherited,
            "OPENAI_API_KEY": "anything",
            "TIKTOKEN_CACHE_DIR": str(self.tiktoken_cache),
        }

    def command(self, *args: str) -> list[str]:
        # -P: the working directory (bench/, with its queue.py) must not shadow the stdlib.
        return [str(self.python), "-P", "-m", "pgai", *args]


# --- the run -------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def run_pgai(
    db_url: str,
    openai_base_url: str,
    texts: list[str],
    *,
    model: str = "text-embedding-3-small",
    dims: int = 384,
    timeout_s: float = 1800,
    concurrency: int | None = None,
    batch_size: int | None = None,
    pgai_python: str | Path | None = None,
    poll_interval_s: float = 0.1,
) -> dict[str, Any]:
    """Embed `texts` with the pgai vectorizer worker on `db_url`'s server; time it.

    `concurrency` / `batch_size` None leave pgai's defaults (1 executor, 50 rows a batch).
    Raises PgaiUnavailable without pgai, TimeoutError past `timeout_s`, RuntimeError when
    the worker exits before every row has its embedding (its log tail in the message).
    """
    runtime = PgaiRuntime.find(pgai_python)
    url = with_database(db_url, DATABASE)
    schema = sql.Identifier(SCHEMA)
    drop = sql.SQL(DROP_DATABASE).format(db=sql.Identifier(DATABASE))
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(drop)
        admin.execute(sql.SQL(CREATE_DATABASE).format(db=sql.Identifier(DATABASE)))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL(CREATE_SOURCE).format(schema=schema))
            with conn.cursor().copy(sql.SQL(COPY_SOURCE).format(schema=schema)) as copy:
                for text in texts:
                    copy.write_row((text,))
            conn.execute("ANALYZE")
        install = subprocess.run(
            runtime.command("install", "-d", url), env=runtime.env(), capture_output=True, text=True
        )
        if install.returncode != 0:
            raise RuntimeError(f"pgai install failed:\n{install.stdout}{install.stderr}")
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                CREATE_VECTORIZER,
                {
                    "source": sql.Identifier(SCHEMA, "articles").as_string(conn),
                    "model": model,
                    "dims": dims,
                    "base_url": openai_base_url,
                    "chunk_size": CHUNK_SIZE,
                    "schema": SCHEMA,
                    "batch_size": batch_size,
                },
            ).fetchone()
            assert row is not None
            queue = conn.execute(QUEUE_TABLE, (row[0],)).fetchone()
            assert queue is not None
            queued = conn.execute(
                sql.SQL(QUEUE_DEPTH).format(queue=sql.Identifier(*queue))
            ).fetchone()
            lib = conn.execute(LIB_VERSION).fetchone()
        worker_args = ["vectorizer", "worker", "-d", url, "--once"]
        if concurrency is not None:
            worker_args += ["--concurrency", str(concurrency)]
        timing = _time_worker(
            runtime, worker_args, url, len(texts), timeout_s=timeout_s, poll_s=poll_interval_s
        )
        with psycopg.connect(url) as conn:
            summary = conn.execute(sql.SQL(EMBEDDED_SUMMARY).format(schema=schema)).fetchone()
        assert summary is not None
        rows, chunks, min_dims, max_dims = summary
        if rows != len(texts) or min_dims != dims or max_dims != dims:
            raise RuntimeError(
                f"pgai embedded {rows}/{len(texts)} rows, {chunks} chunks, dims {min_dims}-"
                f"{max_dims} (wanted {dims})"
            )
        seconds = timing["seconds"]
        return {
            "rows": rows,
            "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1),
            "first_row_s": timing["first_row_s"],
            "steady_rows_per_s": timing["steady_rows_per_s"],
            "worker_exit_s": timing["worker_exit_s"],
            "worker_cpu_us_per_row": round(timing["worker_cpu_s"] / rows * 1e6),
            "pgai_version": runtime.version,
            "settings": {
                "worker": "pgai vectorizer worker --once"
                + (f" --concurrency {concurrency}" if concurrency is not None else ""),
                "concurrency": concurrency or PGAI_DEFAULT_CONCURRENCY,
                "concurrency_is_pgai_default": concurrency is None,
                "batch_size": batch_size or PGAI_DEFAULT_BATCH_SIZE,
                "batch_size_is_pgai_default": batch_size is None,
                "chunking": f"character_text_splitter(chunk_size={CHUNK_SIZE}, overlap=0)",
                "chunks": chunks,
                "queued_at_start": queued[0] if queued else None,
                "destination": f"table {SCHEMA}.articles_embedding_store",
                "embedding": f"openai {model} dims={dims} at {openai_base_url}",
                "pgai_lib_version_in_db": lib[0] if lib else None,
                "python": str(runtime.python),
                "poll_interval_s": poll_interval_s,
            },
        }
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(drop)


def _time_worker(
    runtime: PgaiRuntime,
    worker_args: list[str],
    url: str,
    n: int,
    *,
    timeout_s: float,
    poll_s: float,
) -> dict[str, Any]:
    """Start the worker; seconds until `n` source rows have embeddings, and until it exits."""
    count = sql.SQL(EMBEDDED_ROWS).format(schema=sql.Identifier(SCHEMA))
    with tempfile.TemporaryFile() as log, psycopg.connect(url, autocommit=True) as conn:
        cpu_before = _children_cpu_s()
        started = time.perf_counter()
        worker = subprocess.Popen(
            runtime.command(*worker_args), env=runtime.env(), stdout=log, stderr=log
        )
        try:
            first_row_s: float | None = None
            rows_at_first = 0
            while True:
                exited = worker.poll() is not None
                row = conn.execute(count).fetchone()
                done = row[0] if row else 0
                now = time.perf_counter() - started
                if done and first_row_s is None:
                    first_row_s, rows_at_first = now, done
                if done >= n:
                    seconds = now
                    break
                if exited or now > timeout_s:
                    raise (TimeoutError if not exited else RuntimeError)(
                        f"pgai worker {'exited' if exited else 'timed out'} with {done}/{n} "
                        f"rows embedded:\n{_tail(log, conn)}"
                    )
                time.sleep(poll_s)
            rc = worker.wait(timeout=max(1.0, timeout_s - seconds))
            if rc != 0:
                raise RuntimeError(f"pgai worker exited with {rc}:\n{_tail(log, conn)}")
            first = first_row_s or seconds
            return {
                "seconds": seconds,
                "first_row_s": round(first, 3),
                "steady_rows_per_s": (
                    round((n - rows_at_first) / (seconds - first), 1) if seconds > first else None
                ),
                "worker_exit_s": round(time.perf_counter() - started, 3),
                "worker_cpu_s": round(_children_cpu_s() - cpu_before, 3),
            }
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _children_cpu_s() -> float:
    """CPU time of the child processes waited for so far (here: the worker, once it exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(log: Any, conn: psycopg.Connection[Any]) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()[-30:]
    with contextlib.suppress(psycopg.Error):
        for message, details in conn.execute(VECTORIZER_ERRORS).fetchall()[-5:]:
            lines.append(f"ai.vectorizer_errors: {message} {details}")
    return "\n".join(lines)


# --- the command line ----------------------------------------------------------------------

WORDS = (
    "queue worker postgres vector embedding chunk batch latency throughput index table row "
    "commit transaction retry backoff provider model token request response server client "
    "durable search semantic document article paragraph sentence"
).split()


def sample_texts(n: int, length: int = 500, seed: int = 7) -> list[str]:
    """`n` distinct texts of about `length` characters, the same for a seed."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [f"row {i}:"]
        while sum(len(w) + 1 for w in words) < length:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words)[:length])
    return texts


@contextlib.contextmanager
def fake_openai(
    latency_ms: float, dims: int, model: str, script: Path = FAKE_SERVERS
) -> Iterator[str]:
    """Run tests/fake_servers.py's OpenAI endpoint as a subprocess; yield its /v1 base URL."""
    cmd = [sys.executable, str(script), "openai", "--port", "0"]
    cmd += ["--latency-ms", str(latency_ms), "--dims", str(dims), "--model", model]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(server.stdout, selectors.EVENT_READ)
            line = server.stdout.readline() if sel.select(timeout=30) else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"{script} did not become ready (printed {line!r})")
        yield line.split()[1].rstrip("/") + "/v1"
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def database_server(url: str | None) -> Iterator[str]:
    """The given server, or embedq's embedded one in a temporary directory."""
    if url:
        yield url
        return
    from embedq import embedded

    tmp = tempfile.mkdtemp(prefix="embedq-bench-pgai-")
    # Registered before the server's own exit hook, so it runs after the server stopped.
    atexit.register(shutil.rmtree, tmp, True)
    yield embedded.start(Path(tmp))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--dims", type=int, default=384)
    p.add_argument("--model", default="text-embedding-3-small")
    p.add_argument("--concurrency", type=int, help="worker --concurrency (default: pgai's, 1)")
    p.add_argument("--batch-size", type=int, help="processing batch size (default: pgai's, 50)")
    p.add_argument("--database-url", help="server to use (default: an embedded one)")
    p.add_argument("--pgai-python", help=f"interpreter with pgai (default: {PGAI_VENV})")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    texts = sample_texts(args.rows)
    with (
        database_server(args.database_url) as server_url,
        fake_openai(args.latency_ms, args.dims, args.model) as base_url,
    ):
        result = run_pgai(
            server_url,
            base_url,
            texts,
            model=args.model,
            dims=args.dims,
            timeout_s=args.timeout,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            pgai_python=args.pgai_python,
        )
    result["latency_ms"] = args.latency_ms
    out = json.dumps(result, indent=2)
    print(out)
    if args.json:
        args.json.write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
