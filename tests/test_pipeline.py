"""The embedding pipeline against the real database: writes and their jobs, the atomic
version-checked swap (invariant 2), poison isolation, the cache (invariant 6), search,
filters and the model switch. The `fake` provider keeps these fast; the local model is
tested for real in test_providers.py and in the relevance test below."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import psycopg
import pytest
from psycopg.rows import tuple_row
from tests.conftest import drain

import embedq
from embedq.chunking import chunk_text, tokenizer_for
from embedq.documents import DocumentInput
from embedq.errors import CollectionExists, ConfigurationError, InvalidDocument, ModelMismatch
from embedq.pipeline import finish_switch
from embedq.providers.fake import FakeProvider


async def rows(app: embedq.App, query: str, *params: Any) -> list[tuple[Any, ...]]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(query, params)
        return await cur.fetchall()


async def chunks_of(app: embedq.App, key: str, space: int | None = None) -> list[tuple[Any, ...]]:
    return await rows(
        app,
        "SELECT c.version, c.seq, c.content, c.space_id FROM embedq.chunks c "
        "JOIN embedq.documents d ON d.id = c.document_id WHERE d.key = %s "
        "AND (%s::int IS NULL OR c.space_id = %s) ORDER BY c.space_id, c.seq",
        key,
        space,
        space,
    )


async def test_write_enqueues_one_job_and_same_content_is_a_no_op(app: embedq.App) -> None:
    col = await app.collections.create("notes", provider="fake")
    first = await col.upsert("a", "hello world", metadata={"lang": "en"})
    assert (first.change, first.version) == ("created", 1) and first.job_id is not None
    again = await col.upsert("a", "hello world", metadata={"lang": "en"})
    assert (again.change, again.version, again.job_id) == ("unchanged", 1, None)
    meta = await col.upsert("a", "hello world", metadata={"lang": "fr"})
    assert (meta.change, meta.version, meta.job_id) == ("metadata", 1, None)
    assert await rows(app, "SELECT count(*) FROM embedq.jobs") == [(1,)]
    await drain(app)
    doc = await col.get("a")
    assert (doc.status, doc.version, doc.chunks, doc.metadata) == ("embedded", 1, 1, {"lang": "fr"})


async def test_a_burst_of_rewrites_leaves_one_job_for_the_newest_version(app: embedq.App) -> None:
    col = await app.collections.create("burst", provider="fake")
    for i in range(100):
        await col.upsert("doc", f"version {i} of the text")
    assert await rows(app, "SELECT count(*), max((args->>'version')::int) FROM embedq.jobs") == [
        (1, 100)
    ]
    await drain(app)
    assert [c[:3] for c in await chunks_of(app, "doc")] == [(100, 0, "version 99 of the text")]


async def test_write_inside_the_callers_transaction_rolls_back_with_it(
    app: embedq.App, db_url: str
) -> None:
    col = await app.collections.create("tx", provider="fake")
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await col.upsert("kept", "committed text", connection=conn)
        await conn.commit()
        await col.upsert("gone", "rolled back text", connection=conn)
        await conn.rollback()
    assert await rows(app, "SELECT key FROM embedq.documents ORDER BY key") == [("kept",)]
    assert await rows(app, "SELECT count(*) FROM embedq.jobs") == [(1,)]


async def test_bad_documents_are_refused_before_anything_is_written(app: embedq.App) -> None:
    col = await app.collections.create("bad", provider="fake")
    for doc, needle in [
        ({"key": "", "text": "x"}, "non-empty"),
        ({"key": "k", "text": 5}, "text must be a string"),
        ({"key": "k", "text": "a\x00b"}, "NUL"),
        ({"key": "k", "text": "x", "metadata": [1]}, "JSON object"),
        ({"key": "k", "text": "x", "metadata": {"v": float("nan")}}, "JSON"),
        ({"key": "k"}, "needs both"),
        ({"key": "k", "text": "x", "colour": "red"}, "unknown fields"),
    ]:
        with pytest.raises(InvalidDocument, match=needle):
            await col.upsert_many([{"key": "ok", "text": "fine"}, doc])
    assert await rows(app, "SELECT count(*) FROM embedq.documents") == [(0,)]
    with pytest.raises(CollectionExists):
        await app.collections.create("bad", provider="fake")
    same = await app.collections.create("bad", provider="fake", exist_ok=True)
    assert same.name == "bad"
    with pytest.raises(CollectionExists, match="chunk_size 200"):
        await app.collections.create("bad", provider="fake", chunk_size=100, exist_ok=True)
    with pytest.raises(InvalidDocument, match="chunk"):
        await app.collections.create("c2", provider="fake", chunk_size=50, chunk_overlap=50)
    with pytest.raises(InvalidDocument, match="collection name"):
        await app.collections.create("no spaces allowed", provider="fake")
    with pytest.raises(ConfigurationError, match="cannot change that"):
        await app.collections.create("c3", provider="local", dimensions=512)
    with pytest.raises(ConfigurationError, match="unknown provider"):
        await app.collections.create("c4", provider="cohere")


async def test_a_stale_job_ends_superseded_never_an_error(app: embedq.App) -> None:
    """The seed system's re-upload race: a new version lands while the old one is being
    embedded. The old job must end `superseded`, and only the new chunks remain."""
    col = await app.collections.create("race", provider="fake", options={"latency_ms": 400})
    await col.upsert("file", "first upload of the file")
    worker = embedq.Worker(app, install_signals=False, exit_when_idle=True)
    run = asyncio.create_task(worker.run())
    for _ in range(100):  # wait until the v1 job is running (its provider call takes 400 ms)
        if await rows(app, "SELECT 1 FROM embedq.jobs WHERE state = 'running'"):
            break
        await asyncio.sleep(0.02)
    await col.upsert("file", "second upload of the file")  # a new pending job: v1 is running
    await col.delete("other-key-that-does-not-exist")
    await asyncio.wait_for(run, 30)
    outcomes = await rows(
        app, "SELECT args->>'version', state::text, outcome FROM embedq.jobs_archive ORDER BY id"
    )
    assert outcomes == [("1", "succeeded", "superseded"), ("2", "succeeded", None)]
    assert (app.pipeline_stats.superseded, app.pipeline_stats.documents) == (1, 1)
    assert [c[:3] for c in await chunks_of(app, "file")] == [(2, 0, "second upload of the file")]


async def test_deleting_a_document_with_a_pending_job_is_not_an_error(app: embedq.App) -> None:
    col = await app.collections.create("del", provider="fake")
    await col.upsert_many([{"key": f"k{i}", "text": f"text {i}"} for i in range(5)])
    assert await col.delete("k1", "k3", "missing") == ["k1", "k3"]
    await drain(app)
    archive = await rows(
        app, "SELECT outcome, count(*) FROM embedq.jobs_archive GROUP BY 1 ORDER BY 1"
    )
    assert archive == [("superseded", 2), (None, 3)]
    assert await rows(app, "SELECT count(*) FROM embedq.chunks") == [(3,)]


async def test_one_poison_document_is_dead_lettered_alone(app: embedq.App) -> None:
    col = await app.collections.create("poison", provider="fake", options={"fail_on": "POISON"})
    docs = [{"key": f"d{i}", "text": f"ordinary text number {i}"} for i in range(30)]
    docs[17]["text"] = "this one carries POISON inside"
    await col.upsert_many(docs)
    FakeProvider.reset_counts()
    await drain(app)
    dead = await rows(
        app, "SELECT args->>'document', last_error FROM embedq.jobs_archive WHERE state = 'dead'"
    )
    assert len(dead) == 1 and "BadInput" in dead[0][1] and "POISON" in dead[0][1]
    bad = await col.get("d17")
    assert bad.status == "failed" and bad.error and "POISON" in bad.error
    assert {d.status for d in [await col.get(f"d{i}") for i in range(30) if i != 17]} == {
        "embedded"
    }
    # one request for the batch, then halving: about 2*log2(30) more, never one per text
    assert 1 < FakeProvider.calls <= 12


async def test_cache_means_an_unchanged_corpus_costs_no_provider_calls(app: embedq.App) -> None:
    texts = [f"paragraph {i} about the cache. " * 30 for i in range(20)]
    col = await app.collections.create("cache1", provider="fake", chunk_size=64, chunk_overlap=8)
    await col.upsert_many([{"key": f"k{i}", "text": t} for i, t in enumerate(texts)])
    await drain(app)
    # the same corpus in another collection with the same model: all hits
    other = await app.collections.create("cache2", provider="fake", chunk_size=64, chunk_overlap=8)
    FakeProvider.reset_counts()
    app.pipeline_stats.cache_misses = app.pipeline_stats.cache_hits = 0
    await other.upsert_many([{"key": f"k{i}", "text": t} for i, t in enumerate(texts)])
    await drain(app)
    assert FakeProvider.calls == 0 and FakeProvider.texts == 0
    assert app.pipeline_stats.cache_misses == 0 and app.pipeline_stats.cache_hits > 20
    assert (await other.get("k3")).status == "embedded"
    # an edit to the end of one document sends only the chunks that changed
    await other.upsert("k3", texts[3] + " A new closing sentence.")
    await drain(app)
    assert FakeProvider.calls == 1 and 1 <= FakeProvider.texts <= 2


async def test_invariant_2_under_fire_writers_and_four_workers(app: embedq.App) -> None:
    """Several writers rewrite the same documents while 4 workers embed: no constraint error,
    no dead job, and at the end every document's chunks are exactly those of its text."""
    col = await app.collections.create(
        "fire", provider="fake", chunk_size=32, chunk_overlap=4, options={"latency_ms": 5}
    )
    keys = [f"doc{i}" for i in range(40)]
    latest: dict[str, str] = {}
    stop = asyncio.Event()

    async def writer(seed: int) -> int:
        rnd = random.Random(seed)
        n = 0
        while not stop.is_set():
            batch = rnd.sample(keys, 5)
            docs = [
                DocumentInput(
                    k, " ".join(f"w{rnd.randrange(500)}" for _ in range(rnd.randrange(5, 120)))
                )
                for k in batch
            ]
            await col.upsert_many(docs)
            n += 1
            await asyncio.sleep(rnd.random() * 0.01)
        return n

    workers = [
        embedq.Worker(app, install_signals=False, concurrency=4, batch_size=8) for _ in range(4)
    ]
    runs = [asyncio.create_task(w.run()) for w in workers]
    writers = [asyncio.create_task(writer(s)) for s in range(3)]
    await asyncio.sleep(4)
    stop.set()
    assert sum(await asyncio.gather(*writers)) > 30
    for _ in range(300):
        if not await rows(app, "SELECT 1 FROM embedq.jobs"):
            break
        await asyncio.sleep(0.1)
    for w in workers:
        w.stop()
    await asyncio.gather(*runs)
    assert await rows(app, "SELECT count(*) FROM embedq.jobs") == [(0,)]
    assert await rows(
        app, "SELECT count(*) FROM embedq.jobs_archive WHERE state <> 'succeeded'"
    ) == [(0,)]
    tokenizer = tokenizer_for(col.active.config)
    for doc_row in await rows(app, "SELECT key, body, version, status FROM embedq.documents"):
        key, body, version, status = doc_row
        latest[key] = body
        assert status == "embedded", key
        stored = await chunks_of(app, key)
        expected = chunk_text(body, tokenizer=tokenizer, size=32, overlap=4)
        assert [c[2] for c in stored] == [c.text for c in expected], key
        assert {c[0] for c in stored} == {version}, key
    assert len(latest) == 40


async def test_search_modes_filters_and_keyword_before_embedding(app: embedq.App) -> None:
    col = await app.collections.create("s", provider="fake")
    await col.upsert_many(
        [
            {
                "key": "pg",
                "text": "postgres stores rows in tables and pages",
                "metadata": {"year": 2020, "lang": "en"},
            },
            {
                "key": "redis",
                "text": "redis keeps keys in memory",
                "metadata": {"year": 2022, "lang": "en"},
            },
            {
                "key": "pg-de",
                "text": "postgres speichert tabellen",
                "metadata": {"year": 2024, "lang": "de"},
            },
            {"key": "misc", "text": "gardening with tomatoes", "metadata": {"year": 2024}},
        ]
    )
    # not embedded yet: keyword search finds it, semantic finds nothing
    assert [h.key for h in await col.search("tomatoes", mode="keyword")] == ["misc"]
    assert await col.search("tomatoes", mode="semantic") == []
    await drain(app)
    assert (await col.search("postgres tables rows", mode="semantic", k=1))[0].key == "pg"
    hybrid = await col.search("postgres tables", k=4)
    assert hybrid[0].key == "pg" and hybrid[0].chunks and hybrid[0].model == "fake/fake-384"
    assert {h.key for h in await col.search("postgres", filters={"lang": "de"})} == {"pg-de"}
    assert {
        h.key for h in await col.search("postgres", filters={"year": {"$gte": 2022}}, k=10)
    } <= {
        "redis",
        "pg-de",
        "misc",
    }
    keys = {
        h.key
        for h in await col.search("keys memory postgres", filters={"lang": {"$in": ["en"]}}, k=10)
    }
    assert keys <= {"pg", "redis"} and "redis" in keys
    assert "misc" not in {
        h.key for h in await col.search("gardening", filters={"lang": {"$exists": True}}, k=10)
    }
    for bad, needle in [
        ({"year": {"$between": 1}}, "unknown filter operator"),
        ({"year": {"$gt": [1]}}, "number or a string"),
        ({"lang": {"$in": []}}, "non-empty list"),
        ({"lang": {"a": {"b": 1}}}, "unknown filter operator"),
    ]:
        with pytest.raises(InvalidDocument, match=needle):
            await col.search("postgres", filters=bad)
    with pytest.raises(InvalidDocument, match="mode"):
        await col.search("x", mode="fuzzy")
    with pytest.raises(InvalidDocument, match="k must be"):
        await col.search("x", k=0)
    with pytest.raises(InvalidDocument, match="empty"):
        await col.search("  ")


async def test_model_switch_with_searches_running(app: embedq.App) -> None:
    """Search keeps using the old model until every document is re-embedded, then switches
    atomically: no search returns empty or mixed-model results, and the old chunks go."""
    col = await app.collections.create("switch", provider="fake", model="fake-384")
    await col.upsert_many(
        [
            {"key": f"d{i}", "text": f"topic {i % 7} words shared by documents {i}"}
            for i in range(120)
        ]
    )
    await drain(app)
    with pytest.raises(ModelMismatch, match="set-model"):
        await app.collections.create("switch", provider="fake", model="fake-128", exist_ok=True)
    space = await col.set_model(model="fake-128", options={"latency_ms": 20})
    assert space.dimensions == 128
    seen_models: set[str] = set()
    stop = asyncio.Event()
    searches = 0

    async def searcher() -> None:
        nonlocal searches
        while not stop.is_set():
            hits = await col.search("topic 3 words", mode="semantic", k=5)
            assert hits, "a search during the switch came back empty"
            models = {h.model for h in hits}
            assert len(models) == 1, f"mixed models in one result: {models}"
            seen_models.update(m for m in models if m)
            searches += 1

    task = asyncio.create_task(searcher())
    await col.upsert("d5", "a write during the switch goes to both models")
    await drain(app, batch_size=10)
    await asyncio.sleep(0.2)
    stop.set()
    await task
    fresh = await col.with_fresh_state()
    assert fresh.active.config.model == "fake-128" and fresh.building is None
    # searches ran before the switch (old model) and after it (new model), never mixed
    assert seen_models == {"fake/fake-384", "fake/fake-128"}, (seen_models, searches)
    assert (await col.search("topic 3 words", mode="semantic", k=3))[0].model == "fake/fake-128"
    old = await rows(app, "SELECT count(*) FROM embedq.chunks WHERE space_id = %s", col.active.id)
    assert old == [(0,)]  # retired space's chunks removed by the follow-up job
    assert [c[:3] for c in await chunks_of(app, "d5")] == [
        (2, 0, "a write during the switch goes to both models")
    ]
    # a second completion (another batch that waited for the lock) changes nothing
    assert not await finish_switch(app, col.id, space.id)
    again = await col.with_fresh_state()
    assert again.active.id == space.id and again.building is None


async def test_dropping_a_collection_removes_everything(app: embedq.App) -> None:
    col = await app.collections.create("gone", provider="fake")
    await col.upsert_many([{"key": f"k{i}", "text": "t"} for i in range(5)])
    assert await app.collections.drop("gone")
    assert not await app.collections.drop("gone")
    assert await rows(app, "SELECT count(*) FROM embedq.documents") == [(0,)]
    assert await rows(app, "SELECT count(*) FROM embedq.jobs") == [(0,)]
    idx = await rows(
        app, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'chunks_space_%%_hnsw'"
    )
    assert idx == [(0,)]


async def test_a_document_that_fails_for_good_does_not_hold_up_a_model_switch(
    app: embedq.App,
) -> None:
    col = await app.collections.create("stuck", provider="fake", options={"fail_on": "POISON"})
    await col.upsert_many(
        [{"key": "bad", "text": "POISON text"}, {"key": "good", "text": "fine text"}]
    )
    await drain(app)
    assert (await col.get("bad")).status == "failed"
    await col.set_model(model="fake-64", options={"fail_on": "POISON"})
    await drain(app)
    fresh = await col.with_fresh_state()
    assert fresh.active.config.model == "fake-64" and fresh.building is None
    assert (await col.get("good")).chunks == 1 and (await col.get("bad")).status == "failed"


async def test_a_selective_filter_still_returns_k_documents(app: embedq.App) -> None:
    """1,000 near-identical documents, 10 of them tagged: a filtered semantic search must
    still find all 10 (the HNSW scan alone would stop at its candidate list, mostly
    untagged; iterative scans, or the planner's filter-first plan, must go on)."""
    col = await app.collections.create("sel", provider="fake")
    await col.upsert_many(
        [
            {
                "key": f"d{i}",
                "text": f"shared words about queues {i}",
                "metadata": {"rare": i % 100 == 0},
            }
            for i in range(1000)
        ]
    )
    await drain(app)
    hits = await col.search(
        "shared words about queues", mode="semantic", k=10, filters={"rare": True}
    )
    assert sorted(h.key for h in hits) == sorted(f"d{i}" for i in range(0, 1000, 100))


async def test_an_embed_job_with_bad_arguments_is_dead_lettered_alone(app: embedq.App) -> None:
    col = await app.collections.create("args", provider="fake")
    await col.upsert("ok", "a good document")
    await app.enqueue([embedq.JobSpec("embedq.embed", {"document": "x"}, queue="embed")])
    await drain(app)
    dead = await rows(app, "SELECT last_error FROM embedq.jobs_archive WHERE state = 'dead'")
    assert len(dead) == 1 and "needs integer 'document' and 'version'" in dead[0][0]
    assert (await col.get("ok")).status == "embedded"
