"""The embed task: many documents' chunks embedded together, swapped in atomically.

A worker claims up to `embed_batch_size` embed jobs from the `embed` queue at once and runs
`embed_batch` on them:

1. load the documents; a job for an older version (or a deleted document) is *superseded*;
2. chunk each document for every live space of its collection (the active model, and the
   new one during a model switch) that does not hold this version yet;
3. look every chunk's text hash up in the content-addressed cache; send only the misses to
   the provider, in requests sized for it (texts and tokens), several in flight;
4. a request refused as bad input (400) is split in halves until the bad text is alone:
   only its document is dead-lettered, with the provider's message; the rest go on;
5. one transaction: lock the jobs this worker still holds and their documents (in id order),
   compare versions, replace the chunks (binary COPY), record which version each space
   holds, mark the documents embedded, store new vectors in the cache, finish the jobs
   (`superseded` where the version moved on). Nothing is written for a job this worker
   lost, and no foreign-key error can occur: a deleted document is simply not there.

When a collection's building space then holds every document, the model switch completes
(`finish_switch`): one transaction makes it the active space, and the old space's chunks
are removed by a follow-up job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg.rows import dict_row

from embedq import db, metrics, queries, tracing, webhooks
from embedq.chunking import Chunk, chunk_text, tokenizer_for
from embedq.documents import EMBED_QUEUE, EMBED_TASK, Space, drop_index
from embedq.errors import (
    BadInput,
    CircuitOpen,
    PermanentError,
    PermanentProviderError,
    ProviderError,
)
from embedq.jobs import Job, JobSpec
from embedq.retry import RetryPolicy
from embedq.tasks import BatchOutcome, JobContext

if TYPE_CHECKING:
    from embedq.app import App
    from embedq.providers.guard import GuardedProvider

log = logging.getLogger("embedq.pipeline")
RETIRE_TASK = "embedq.retire_space"


@dataclass
class PipelineStats:
    """Counters of this process's embedding work, per App (read by benchmarks and tests;
    the same work is also counted in `metrics`, per process)."""

    batches: int = 0
    documents: int = 0
    superseded: int = 0
    chunks: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    provider_requests: int = 0
    failed_documents: int = 0
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Item:
    """One document of the batch in one space that lacks its current version."""

    job: Job
    document_id: int
    version: int
    space: Space
    chunking: tuple[int, int, bool]  # chunk size, overlap, title prefix
    chunks: list[Chunk] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)


def register(app: App) -> None:
    """Add the pipeline's tasks to an app (every app has them)."""
    s = app.settings

    @app.task(
        name=EMBED_TASK,
        queue=EMBED_QUEUE,
        batch=True,
        retry=RetryPolicy(
            max_attempts=s.embed_max_attempts,
            base_s=s.retry_base_s,
            cap_s=max(s.retry_cap_s, s.retry_base_s),
        ),
    )
    async def embed(contexts: list[JobContext]) -> BatchOutcome:
        return await embed_batch(app, contexts)

    @app.task(name=RETIRE_TASK, queue=EMBED_QUEUE)
    async def retire_space(space: int) -> int:
        return await retire(app, space)


async def embed_batch(app: App, contexts: Sequence[JobContext]) -> BatchOutcome:
    """Run a batch of embed jobs (see the module docstring)."""
    with tracing.span("embedq.embed_batch", jobs=len(contexts)) as span:
        return await _embed_batch(app, contexts, span)


async def _embed_batch(
    app: App, contexts: Sequence[JobContext], span: tracing.Span
) -> BatchOutcome:
    stats = app.pipeline_stats
    stats.batches += 1
    stats.batch_sizes.append(len(contexts))
    del stats.batch_sizes[:-1000]
    metrics.EMBED_BATCH_JOBS.observe(len(contexts))
    outcome = BatchOutcome()
    worker_id = contexts[0].worker_id
    q = queries.load("documents.sql", app.settings.db_schema)
    wanted: dict[int, tuple[int, int]] = {}
    for ctx in contexts:
        job = ctx.job
        try:
            wanted[job.id] = (int(job.args["document"]), int(job.args["version"]))
        except (KeyError, TypeError, ValueError):
            outcome.failed[job.id] = PermanentError(
                f"embed job {job.id} has invalid arguments {job.args!r}: it needs integer "
                "'document' and 'version'"
            )
    jobs = {c.job.id: c.job for c in contexts if c.job.id in wanted}
    rows = await app.store.fetch_sql(
        q["load_for_embed"], {"ids": sorted({d for d, _ in wanted.values()})}
    )
    docs = {int(r["id"]): r for r in rows}
    spaces = await _live_spaces(app, {int(r["collection_id"]) for r in rows})

    # The newest job per document does the work; anything older is superseded.
    superseded: set[int] = set()
    owner: dict[int, int] = {}
    for job_id, (doc_id, version) in sorted(wanted.items(), key=lambda kv: kv[1][1]):
        doc = docs.get(doc_id)
        if doc is None or int(doc["version"]) != version:
            superseded.add(job_id)
            continue
        if doc_id in owner:
            superseded.add(owner[doc_id])
        owner[doc_id] = job_id

    items: list[_Item] = []
    for doc_id, job_id in owner.items():
        doc = docs[doc_id]
        held = doc["held"] or {}
        for space, chunking in spaces.get(int(doc["collection_id"]), []):
            if held.get(str(space.id)) != int(doc["version"]):
                items.append(_Item(jobs[job_id], doc_id, int(doc["version"]), space, chunking))
    if len(items) > 8:
        await asyncio.to_thread(_chunk_all, items, docs)
    else:
        _chunk_all(items, docs)  # a few documents: quicker than the hop to a thread

    failures, vectors, fresh = await _embed_items(app, items)
    span.set_attribute("embedq.chunks", sum(len(i.chunks) for i in items))
    span.set_attribute("embedq.texts_embedded", sum(len(f) for f in fresh.values()))
    for job_id, exc in failures.items():
        if isinstance(exc, CircuitOpen):
            outcome.released[job_id] = exc.retry_after
        else:
            outcome.failed[job_id] = exc
    await _mark_failed(app, [jobs[j] for j in outcome.failed if j in jobs], wanted, outcome)

    done_items = [i for i in items if i.job.id not in failures]
    finish = [j for j in list(owner.values()) + list(superseded) if j not in failures]
    completed, stale, building = await _swap(
        app, worker_id, finish, superseded, done_items, owner, vectors, fresh
    )
    outcome.completed |= completed
    stats.documents += len(completed - stale)
    stats.superseded += len(stale)
    metrics.EMBEDDED_DOCUMENTS.inc(len(completed - stale))
    metrics.SUPERSEDED_JOBS.inc(len(stale))
    span.set_attribute("embedq.documents", len(completed - stale))
    span.set_attribute("embedq.superseded", len(stale))
    span.set_attribute("embedq.failed", len(outcome.failed))
    span.set_attribute("embedq.released", len(outcome.released))
    # Also when nothing was written there: the last documents a switch waited for may have
    # just failed for good.
    building |= {
        (cid, space.id) for cid, live in spaces.items() for space, _ in live
        if space.state == "building"
    }  # fmt: skip
    for collection_id, space_id in building:
        await maybe_finish_switch(app, collection_id, space_id)
    return outcome


async def _live_spaces(
    app: App, collection_ids: set[int]
) -> dict[int, list[tuple[Space, tuple[int, int, bool]]]]:
    """The active and building spaces of collections, with their collection's chunking."""
    if not collection_ids:
        return {}
    q = queries.load("documents.sql", app.settings.db_schema)
    rows = await app.store.fetch_sql(q["live_spaces"], {"collections": sorted(collection_ids)})
    out: dict[int, list[tuple[Space, tuple[int, int, bool]]]] = defaultdict(list)
    for r in rows:
        space = Space.from_row(r)
        chunking = (int(r["chunk_size"]), int(r["chunk_overlap"]), bool(r["title_prefix"]))
        out[space.collection_id].append((space, chunking))
    return out


def _chunk_all(items: list[_Item], docs: dict[int, Any]) -> None:
    """CPU work, run in a thread: chunk and hash every item's text."""
    for item in items:
        doc = docs[item.document_id]
        size, overlap, title_prefix = item.chunking
        item.chunks = chunk_text(
            doc["body"],
            tokenizer=tokenizer_for(item.space.config),
            size=size,
            overlap=overlap,
            title=doc["title"],
            title_prefix=title_prefix,
        )
        item.hashes = [hashlib.sha256(c.text.encode()).digest() for c in item.chunks]


Vectors = dict[bytes, np.ndarray]


async def _embed_items(
    app: App, items: list[_Item]
) -> tuple[dict[int, BaseException], dict[int, Vectors], dict[int, Vectors]]:
    """Vectors for every chunk of `items`, per space: (failures by job id, all vectors,
    the vectors fresh from the provider, which the cache does not hold yet)."""
    failures: dict[int, BaseException] = {}
    by_space: dict[int, list[_Item]] = defaultdict(list)
    for item in items:
        by_space[item.space.id].append(item)
    results = await asyncio.gather(
        *(_embed_space(app, group[0].space, group) for group in by_space.values())
    )
    vectors: dict[int, Vectors] = {}
    fresh: dict[int, Vectors] = {}
    for space_id, (errors, all_vectors, new_vectors) in zip(by_space, results, strict=True):
        vectors[space_id], fresh[space_id] = all_vectors, new_vectors
        for job_id, exc in errors.items():
            if job_id not in failures or _worse(exc, failures[job_id]):
                failures[job_id] = exc
    return failures, vectors, fresh


def _worse(new: BaseException, old: BaseException) -> bool:
    """Permanent failures win over transient ones (the job must be dead-lettered)."""
    return isinstance(new, PermanentError) and not isinstance(old, PermanentError)


async def _embed_space(
    app: App, space: Space, items: list[_Item]
) -> tuple[dict[int, BaseException], Vectors, Vectors]:
    stats = app.pipeline_stats
    texts: dict[bytes, tuple[str, int]] = {}
    for item in items:
        for h, c in zip(item.hashes, item.chunks, strict=True):
            texts[h] = (c.text, c.tokens)
    vectors = await _cache_lookup(app, space, list(texts))
    stats.cache_hits += len(vectors)
    misses = [h for h in texts if h not in vectors]
    stats.cache_misses += len(misses)
    metrics.observe_cache(len(vectors), len(misses))
    stats.chunks += sum(len(i.chunks) for i in items)
    errors: dict[bytes, BaseException] = {}
    guarded = app.endpoints.get(space.config)
    await asyncio.gather(
        *(
            _embed_request(app, guarded, space, group, texts, vectors, errors)
            for group in _requests(misses, texts, guarded)
        )
    )
    failed: dict[int, BaseException] = {}
    for item in items:
        for h in item.hashes:
            if h in errors:
                failed[item.job.id] = errors[h]
                break
    return failed, vectors, {h: vectors[h] for h in misses if h in vectors}


def _requests(
    hashes: list[bytes], texts: dict[bytes, tuple[str, int]], guarded: GuardedProvider
) -> list[list[bytes]]:
    """Split texts into requests within the provider's count and token limits."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    tokens = 0
    for h in hashes:
        n = texts[h][1]
        if current and (len(current) >= guarded.max_batch or tokens + n > guarded.max_batch_tokens):
            out.append(current)
            current, tokens = [], 0
        current.append(h)
        tokens += n
    if current:
        out.append(current)
    return out


async def _embed_request(
    app: App,
    guarded: GuardedProvider,
    space: Space,
    group: list[bytes],
    texts: dict[bytes, tuple[str, int]],
    vectors: dict[bytes, np.ndarray],
    errors: dict[bytes, BaseException],
) -> None:
    app.pipeline_stats.provider_requests += 1
    try:
        matrix = await guarded.embed(
            [texts[h][0] for h in group], tokens=sum(texts[h][1] for h in group)
        )
    except BadInput as exc:
        if len(group) == 1:
            errors[group[0]] = exc
            return
        # One bad text fails the whole request: halve until it is alone.
        mid = len(group) // 2
        await asyncio.gather(
            _embed_request(app, guarded, space, group[:mid], texts, vectors, errors),
            _embed_request(app, guarded, space, group[mid:], texts, vectors, errors),
        )
        return
    except ProviderError as exc:
        for h in group:
            errors[h] = exc
        return
    if matrix.shape[1] != space.dimensions:
        exc_dims = PermanentProviderError(
            f"{space.config.provider}/{space.config.model} at {guarded.endpoint} returned "
            f"{matrix.shape[1]}-dimensional vectors; the collection expects "
            f"{space.dimensions}. The endpoint serves another model: fix its base URL, or "
            "switch models with `embedq collection set-model`"
        )
        for h in group:
            errors[h] = exc_dims
        return
    for h, row in zip(group, matrix, strict=True):
        vectors[h] = row


async def _cache_lookup(app: App, space: Space, hashes: list[bytes]) -> dict[bytes, np.ndarray]:
    if not hashes:
        return {}
    q = queries.load("documents.sql", app.settings.db_schema)
    rows = await app.store.fetch_sql(
        q["cache_lookup"], {"model_key": space.model_key, "hashes": hashes}
    )
    return {bytes(r["hash"]): _array(r["embedding"]) for r in rows}


def _array(value: Any) -> np.ndarray:
    """pgvector's loader gives a Vector (newer releases) or an ndarray (older ones)."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


async def _mark_failed(
    app: App, failed: list[Job], wanted: dict[int, tuple[int, int]], outcome: BatchOutcome
) -> None:
    """Documents whose job is dead-lettered now (permanent, or out of attempts) show it."""
    final = [
        j
        for j in failed
        if isinstance(outcome.failed[j.id], PermanentError) or j.attempts >= j.max_attempts
    ]
    if not final:
        return
    app.pipeline_stats.failed_documents += len(final)
    metrics.FAILED_DOCUMENTS.inc(len(final))
    q = queries.load("documents.sql", app.settings.db_schema)
    ids = [wanted[j.id][0] for j in final]
    versions = [wanted[j.id][1] for j in final]
    errors = [f"{type(e).__name__}: {e}" for e in (outcome.failed[j.id] for j in final)]
    pool = app.store.pool
    assert pool is not None
    with db.translated():
        async with pool.connection() as conn, conn.transaction():
            # webhook calls commit with the status they report; before it is set (see there)
            await webhooks.enqueue_events(app, conn, "failed", ids, versions, errors)
            await app.store.fetch_sql(
                q["mark_failed"], {"ids": ids, "versions": versions, "errors": errors}, conn=conn
            )


async def _swap(
    app: App,
    worker_id: int,
    finish: list[int],
    superseded: set[int],
    items: list[_Item],
    owner: dict[int, int],
    vectors: dict[int, Vectors],
    fresh: dict[int, Vectors],
) -> tuple[set[int], set[int], set[tuple[int, int]]]:
    """The one transaction of step 5; returns the jobs it finished, those of them that were
    superseded, and the building spaces it wrote to."""
    if not finish:
        return set(), set(), set()
    s = app.settings
    q = queries.load("documents.sql", s.db_schema)
    pool = app.store.pool
    assert pool is not None
    building: set[tuple[int, int]] = set()
    with db.translated():
        async with pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(q["lock_own_jobs"], {"ids": finish, "worker": worker_id})
            owned = {int(r["id"]) for r in await cur.fetchall()}
            if not owned:
                return set(), set(), set()
            doc_ids = sorted({i.document_id for i in items if i.job.id in owned})
            await cur.execute(q["lock_documents"], {"ids": doc_ids})
            current = {int(r["id"]): int(r["version"]) for r in await cur.fetchall()}
            late = {
                i.job.id for i in items if current.get(i.document_id) != i.version
            }  # a newer version (or a delete) landed while we embedded
            swap = [i for i in items if i.job.id in owned and i.job.id not in late]
            if swap:
                await cur.execute(
                    q["delete_chunks"],
                    {
                        "documents": [i.document_id for i in swap],
                        "spaces": [i.space.id for i in swap],
                    },
                )
                async with cur.copy(q["copy_chunks"]) as copy:
                    copy.set_types(["int8", "int4", "int4", "int4", "int4", "text", "vector"])
                    for i in swap:
                        space_vectors = vectors[i.space.id]
                        for c, h in zip(i.chunks, i.hashes, strict=True):
                            await copy.write_row(
                                (i.document_id, i.space.id, i.version, c.seq, c.tokens, c.text,
                                 space_vectors[h])
                            )  # fmt: skip
                building |= {
                    (i.space.collection_id, i.space.id) for i in swap if i.space.state == "building"
                }
                await _store_cache(cur, q, {i.space.id: i.space for i in swap}, fresh)
            done_docs = [d for d, j in owner.items() if j in owned and j not in late]
            if done_docs:
                # webhook calls commit with the status they report; before it is set (see there)
                await webhooks.enqueue_events(
                    app, conn, "embedded", done_docs, [current.get(d) for d in done_docs]
                )
                await cur.execute(
                    q["mark_done"],
                    {
                        "documents": [i.document_id for i in swap],
                        "spaces": [i.space.id for i in swap],
                        "versions": [i.version for i in swap],
                        "done": done_docs,
                    },
                )
            ids = sorted(owned)
            outcomes = ["superseded" if (j in superseded or j in late) else None for j in ids]
            completed = await app.store.complete(
                worker_id, ids, [None] * len(ids), outcomes, conn=conn
            )
    stale = {j for j, o in zip(ids, outcomes, strict=True) if o == "superseded"}
    return set(completed), stale & set(completed), building


async def _store_cache(
    cur: Any, q: dict[str, str], spaces: dict[int, Space], fresh: dict[int, Vectors]
) -> None:
    staged = False
    for space_id, space in spaces.items():
        new = fresh.get(space_id)
        if not new:
            continue
        if len(new) <= 32:
            await cur.execute(
                q["cache_store_small"],
                {
                    "model_key": space.model_key,
                    "hashes": list(new),
                    "embeddings": list(new.values()),
                },
            )
            continue
        if staged:
            await cur.execute(q["cache_unstage"])
        else:
            await cur.execute(q["cache_stage"])
            staged = True
        async with cur.copy(q["copy_cache"]) as copy:
            copy.set_types(["bytea", "vector"])
            for h, v in new.items():
                await copy.write_row((h, v))
        await cur.execute(q["cache_store"], {"model_key": space.model_key})


# --- model switch --------------------------------------------------------------------------


async def maybe_finish_switch(app: App, collection_id: int, space_id: int) -> bool:
    q = queries.load("documents.sql", app.settings.db_schema)
    [row] = await app.store.fetch_sql(
        q["building_done"], {"collection": collection_id, "space": space_id}
    )
    if not row["done"]:
        return False
    return await finish_switch(app, collection_id, space_id)


async def finish_switch(app: App, collection_id: int, space_id: int) -> bool:
    """Make a fully built space the active one, atomically; the old one is retired and its
    chunks removed by a follow-up job. False when another process got there first or a
    document changed meanwhile."""
    q = queries.load("documents.sql", app.settings.db_schema)
    pool = app.store.pool
    assert pool is not None
    with db.translated():
        async with pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(q["lock_collection"], {"collection": collection_id})
            # Another batch may have completed this switch while we waited for the lock: then
            # the space is active already, and must not be retired by a second activation.
            await cur.execute(q["space_state"], {"space": space_id})
            row = await cur.fetchone()
            if not row or row["state"] != "building":
                return False
            await cur.execute(q["building_done"], {"collection": collection_id, "space": space_id})
            row = await cur.fetchone()
            if not row or not row["done"]:
                return False
            await cur.execute(q["retire_active"], {"collection": collection_id})
            retired = [int(r["id"]) for r in await cur.fetchall()]
            await cur.execute(q["promote_space"], {"space": space_id})
            if not await cur.fetchall():
                raise RuntimeError(f"space {space_id} could not be promoted")  # rolls back
            if retired:
                await app.store.enqueue(
                    [JobSpec(RETIRE_TASK, {"space": sid}, queue=EMBED_QUEUE) for sid in retired],
                    conn=conn,
                )
    log.info("collection %s now searches space %s (model switch complete)", collection_id, space_id)
    return True


async def retire(app: App, space_id: int) -> int:
    """Remove a retired space's chunks (in slices, so no long lock) and its index."""
    q = queries.load("documents.sql", app.settings.db_schema)
    removed = 0
    while True:
        [row] = await app.store.fetch_sql(q["delete_space_chunks"], {"space": space_id})
        removed += int(row["n"])
        if not row["n"]:
            break
    await app.store.fetch_sql(q["forget_space"], {"space": space_id})
    await app.store.fetch_sql(drop_index(app.settings.db_schema, space_id))
    return removed
