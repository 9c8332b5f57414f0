"""Watches and backfills against the real database. The application's table is written with
plain SQL through psycopg (no embedq API), as a Node or Go program would write it: the
triggers must do everything inside that program's transaction."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import tuple_row
from tests.conftest import cli_env, drain, run_cli

import embedq
from embedq.documents import (
    BACKFILL_PRIORITY,
    EMBED_QUEUE,
    EMBED_TASK,
    WRITE_PRIORITY,
    content_hash,
)
from embedq.errors import (
    CollectionNotFound,
    DatabaseError,
    InvalidWatch,
)
from embedq.watch import (
    WATCH_LOCK_NAMESPACE,
    Watches,
    backfill,
    cancel_backfill,
    missing,
    priority_of,
)

ARTICLES = """
CREATE TABLE public.articles (
    id      integer PRIMARY KEY,
    title   text,
    body    text,
    author  text,
    lang    varchar(8),
    views   integer NOT NULL DEFAULT 0,
    extra   jsonb
)"""


async def app_sql(db_url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """One statement as the application runs it: its own connection and transaction."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def docs(db_url: str) -> dict[str, tuple[Any, ...]]:
    """key -> (title, body, metadata, version, last_change, status) of every document."""
    rows = await app_sql(
        db_url,
        "SELECT key, title, body, metadata, version, last_change, status "
        "FROM embedq.documents ORDER BY key",
    )
    return {r[0]: r[1:] for r in rows}


async def jobs(db_url: str) -> list[tuple[Any, ...]]:
    """(task, args, queue, priority, max_attempts, dedup_key, state) of every queued job."""
    return await app_sql(
        db_url,
        "SELECT task, args, queue, priority, max_attempts, dedup_key, state::text "
        "FROM embedq.jobs ORDER BY id",
    )


async def triggers(db_url: str, table: str = "public.articles") -> list[str]:
    rows = await app_sql(
        db_url,
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
        "ORDER BY tgname",
        (table,),
    )
    return [r[0] for r in rows]


async def watched(app: embedq.App, db_url: str, *, rows: int = 0, **kw: Any) -> Any:
    """The articles table (with `rows` rows already in it), a fake-provider collection, and
    a watch of one on the other."""
    await app_sql(db_url, ARTICLES)
    if rows:
        await app_sql(
            db_url,
            "INSERT INTO public.articles (id, title, body, author, lang) "
            "SELECT i, 'Title ' || i, 'Body of article ' || i, 'ann', 'en' "
            "FROM generate_series(1, %s) i",
            (rows,),
        )
    col = await app.collections.create("articles", provider="fake")
    options: dict[str, Any] = {
        "collection": "articles",
        "key": "id",
        "text": ["body"],
        "title": "title",
        "metadata": ["author", "lang"],
        **kw,
    }
    watch, loaded = await Watches(app).create("public.articles", **options)
    return col, watch, loaded


# --- the triggers ----------------------------------------------------------------------------


async def test_an_insert_writes_the_document_and_its_job_in_the_same_transaction(
    app: embedq.App, db_url: str
) -> None:
    col, watch, _ = await watched(app, db_url)
    assert watch.table == "public.articles" and watch.state == "active"
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute(
            "INSERT INTO public.articles (id, title, body, author, lang) "
            "VALUES (1, 'Postgres', 'Postgres is a database.', 'ann', 'en')"
        )
        # inside the application's transaction: document and job are there ...
        cur = await conn.execute("SELECT count(*) FROM embedq.documents")
        assert await cur.fetchone() == (1,)
        # ... and invisible to everyone else until it commits
        assert await docs(db_url) == {} and await jobs(db_url) == []
        await conn.rollback()
    assert await docs(db_url) == {} and await jobs(db_url) == []

    await app_sql(
        db_url,
        "INSERT INTO public.articles (id, title, body, author, lang) "
        "VALUES (1, 'Postgres', 'Postgres is a database.', 'ann', 'en')",
    )
    assert await docs(db_url) == {
        "1": ("Postgres", "Postgres is a database.", {"author": "ann", "lang": "en"}, 1,
              "created", "pending"),
    }  # fmt: skip
    doc = await col.get("1")
    spec = col.embed_spec(doc.id, 1, WRITE_PRIORITY)  # what the Python write path enqueues
    assert await jobs(db_url) == [
        (spec.task, spec.args, spec.queue, spec.priority, spec.max_attempts, spec.dedup_key,
         "pending"),
    ]  # fmt: skip
    assert (spec.task, spec.queue, spec.priority) == (EMBED_TASK, EMBED_QUEUE, WRITE_PRIORITY)
    # the same content written by Python afterwards is a no-op: same hash, same version
    again = await col.upsert(
        "1", "Postgres is a database.", title="Postgres", metadata={"author": "ann", "lang": "en"}
    )
    assert (again.change, again.version) == ("unchanged", 1)
    [(stored,)] = await app_sql(db_url, "SELECT content_hash FROM embedq.documents")
    assert stored == content_hash("Postgres", "Postgres is a database.")

    await drain(app)
    doc = await col.get("1")
    assert (doc.status, doc.chunks) == ("embedded", 1)
    hits = await col.search("database", mode="semantic", k=3)
    assert [h.key for h in hits] == ["1"]


async def test_a_new_job_wakes_a_listening_worker(app: embedq.App, db_url: str) -> None:
    await watched(app, db_url)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN embedq_jobs")
        await app_sql(db_url, "INSERT INTO public.articles (id, body) VALUES (7, 'wake up')")
        note = await anext(listener.notifies(timeout=5))
    assert (note.channel, note.payload) == ("embedq_jobs", EMBED_QUEUE)


async def test_updates_of_watched_and_unwatched_columns(app: embedq.App, db_url: str) -> None:
    col, *_ = await watched(app, db_url)
    await app_sql(db_url, "INSERT INTO public.articles (id, title, body) VALUES (1, 'T', 'one')")
    await drain(app)
    before = await col.get("1")
    assert (before.version, before.status) == (1, "embedded")

    # other columns, or watched columns set to the same values: nothing at all
    await app_sql(db_url, "UPDATE public.articles SET views = views + 1, extra = '{}'")
    await app_sql(db_url, "UPDATE public.articles SET title = 'T', body = 'one'")
    after = await col.get("1")
    assert (after.version, after.status, after.updated_at) == (1, "embedded", before.updated_at)
    assert await jobs(db_url) == []

    # a metadata column: the metadata changes, no new version, no job
    await app_sql(db_url, "UPDATE public.articles SET lang = 'fr'")
    assert (await docs(db_url))["1"][2:5] == ({"lang": "fr"}, 1, "metadata")
    assert await jobs(db_url) == []

    # a text column: a new version and its job
    await app_sql(db_url, "UPDATE public.articles SET body = 'two' WHERE id = 1")
    assert (await docs(db_url))["1"][1:5] == ("two", {"lang": "fr"}, 2, "updated")
    [job] = await jobs(db_url)
    assert job[1]["version"] == 2 and job[3] == WRITE_PRIORITY
    await drain(app)
    assert [h.key for h in await col.search("two", mode="keyword")] == ["1"]
    assert (await col.get("1")).status == "embedded"


async def test_a_burst_of_updates_leaves_one_job_for_the_newest_version(
    app: embedq.App, db_url: str
) -> None:
    await watched(app, db_url)
    await app_sql(db_url, "INSERT INTO public.articles (id, body) VALUES (1, 'v0')")
    for i in range(1, 30):
        await app_sql(db_url, "UPDATE public.articles SET body = %s WHERE id = 1", (f"v{i}",))
    [job] = await jobs(db_url)
    assert job[1]["version"] == 30 and job[6] == "pending"
    await drain(app)
    assert (await docs(db_url))["1"][1:6] == ("v29", {}, 30, "updated", "embedded")


async def test_bulk_statements_and_keys(app: embedq.App, db_url: str) -> None:
    col, *_ = await watched(app, db_url)
    # one INSERT of many rows (one trigger call), NULL and empty text columns skipped
    await app_sql(
        db_url,
        "INSERT INTO public.articles (id, title, body, author) "
        "SELECT i, CASE WHEN i % 2 = 0 THEN 'Even ' || i END, 'Row ' || i, NULL "
        "FROM generate_series(1, 200) i",
    )
    got = await docs(db_url)
    assert len(got) == 200 and len(await jobs(db_url)) == 200
    assert got["2"][:3] == ("Even 2", "Row 2", {}) and got["3"][:2] == (None, "Row 3")
    # an INSERT ... ON CONFLICT DO UPDATE by the application: the update path
    await app_sql(
        db_url,
        "INSERT INTO public.articles (id, body) VALUES (3, 'Upserted') "
        "ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
    )
    assert (await docs(db_url))["3"][1:4] == ("Upserted", {}, 2)
    # a key that changes: the old document goes, the new one comes
    await app_sql(db_url, "UPDATE public.articles SET id = 1000 WHERE id = 4")
    got = await docs(db_url)
    assert "4" not in got and got["1000"][:2] == ("Even 4", "Row 4")
    # a statement deleting many rows
    await app_sql(db_url, "DELETE FROM public.articles WHERE id <= 100")
    assert len(await docs(db_url)) == 101  # 101..200 and 1000
    await drain(app)
    assert (await col.with_fresh_state()).counts["embedded"] == 101


async def test_delete_and_truncate(app: embedq.App, db_url: str) -> None:
    await watched(app, db_url)
    await app_sql(
        db_url,
        "INSERT INTO public.articles (id, body) SELECT i, 'x' || i FROM generate_series(1, 5) i",
    )
    await drain(app)
    await app_sql(db_url, "DELETE FROM public.articles WHERE id = 1")
    assert sorted(await docs(db_url)) == ["2", "3", "4", "5"]
    [(chunks,)] = await app_sql(db_url, "SELECT count(*) FROM embedq.chunks")
    assert chunks == 4  # the deleted document's chunks went with it
    await app_sql(db_url, "UPDATE public.articles SET body = 'new' WHERE id = 2")
    assert len(await jobs(db_url)) == 1
    await app_sql(db_url, "TRUNCATE public.articles")
    assert await docs(db_url) == {} and await jobs(db_url) == []
    [(chunks,)] = await app_sql(db_url, "SELECT count(*) FROM embedq.chunks")
    assert chunks == 0
    await app_sql(db_url, "INSERT INTO public.articles (id, body) VALUES (9, 'after')")
    assert list(await docs(db_url)) == ["9"]


async def test_a_null_key_is_skipped(app: embedq.App, db_url: str) -> None:
    await app.collections.create("notes", provider="fake")
    await app_sql(db_url, "CREATE TABLE notes (id serial PRIMARY KEY, slug text UNIQUE, note text)")
    await Watches(app).create("notes", collection="notes", key="slug", text=["note"])
    await app_sql(
        db_url,
        "INSERT INTO notes (slug, note) VALUES ('a', 'has a key'), (NULL, 'no key'), ('', 'empty key')",
    )
    assert list(await docs(db_url)) == ["a"]
    await app_sql(db_url, "UPDATE notes SET slug = NULL WHERE slug = 'a'")
    assert await docs(db_url) == {}
    await app_sql(db_url, "UPDATE notes SET slug = 'b' WHERE note = 'no key'")
    assert list(await docs(db_url)) == ["b"]


async def test_drop_removes_the_triggers_and_nothing_else(app: embedq.App, db_url: str) -> None:
    col, watch, _ = await watched(app, db_url, rows=3)
    assert await triggers(db_url) == sorted(watch.triggers) and len(watch.triggers) == 4
    dropped, removed = await Watches(app).drop("articles")
    assert (dropped.id, removed) == (watch.id, 4)
    assert await triggers(db_url) == []
    assert sorted(await docs(db_url)) == ["1", "2", "3"]
    assert await Watches(app).list() == []
    await app_sql(db_url, "INSERT INTO public.articles (id, body) VALUES (4, 'unwatched')")
    await app_sql(db_url, "DELETE FROM public.articles WHERE id = 1")
    await app_sql(db_url, "TRUNCATE public.articles")
    assert sorted(await docs(db_url)) == ["1", "2", "3"]
    with pytest.raises(InvalidWatch, match="has no watch"):
        await Watches(app).drop("articles")
    # with the watch gone, the collection can be dropped again
    assert await app.collections.drop(col.name)


async def test_a_watched_collection_cannot_be_dropped_under_its_triggers(
    app: embedq.App, db_url: str
) -> None:
    await watched(app, db_url)
    with pytest.raises(
        DatabaseError, match=r"public.articles; drop the watch first \(CLI: watch drop articles\)"
    ):
        await app.collections.drop("articles")
    assert [c.name for c in await app.collections.list()] == ["articles"]


async def test_a_renamed_column_fails_the_write_with_the_fix(app: embedq.App, db_url: str) -> None:
    await watched(app, db_url)
    await app_sql(db_url, "ALTER TABLE public.articles RENAME COLUMN body TO content")
    with pytest.raises(psycopg.errors.UndefinedColumn, match="body") as err:
        await app_sql(db_url, "INSERT INTO public.articles (id, content) VALUES (1, 'x')")
    assert "watch drop <collection>" in (err.value.diag.message_hint or "")
    assert await app_sql(db_url, "SELECT count(*) FROM public.articles") == [(0,)]


async def test_the_application_user_needs_no_rights_on_embedq(app: embedq.App, db_url: str) -> None:
    await watched(app, db_url)
    role = f"app_{uuid.uuid4().hex[:8]}"
    await app_sql(db_url, f"CREATE ROLE {role} LOGIN")
    try:
        await app_sql(db_url, f"GRANT USAGE ON SCHEMA public TO {role}")
        await app_sql(db_url, f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.articles TO {role}")
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute(f"SET ROLE {role}")
            await conn.execute("INSERT INTO public.articles (id, body) VALUES (1, 'by the app')")
            await conn.execute("UPDATE public.articles SET body = 'changed' WHERE id = 1")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute("SELECT 1 FROM embedq.documents")
            # nor can it point embedq's trigger function at a table of its own
            await conn.execute("RESET ROLE")
            await conn.execute("CREATE TABLE mine (id int PRIMARY KEY, t text)")
            await conn.execute(f"ALTER TABLE mine OWNER TO {role}")
            await conn.execute(f"SET ROLE {role}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(
                    "CREATE TRIGGER evil AFTER INSERT ON mine FOR EACH ROW "
                    "EXECUTE FUNCTION embedq.watch_fire('1')"
                )
            await conn.execute("RESET ROLE")
            await conn.execute("DROP TABLE mine")
        assert (await docs(db_url))["1"][1:4] == ("changed", {}, 2)
    finally:
        await app_sql(db_url, f"DROP OWNED BY {role}")
        await app_sql(db_url, f"DROP ROLE {role}")


# --- creating: validation and the initial load -------------------------------------------------


async def test_existing_rows_are_loaded_on_create(app: embedq.App, db_url: str) -> None:
    col, _, loaded = await watched(app, db_url, rows=25, batch_size=7)
    assert (loaded.rows, loaded.written) == (25, 25)
    got = await docs(db_url)
    assert len(got) == 25
    assert got["12"] == ("Title 12", "Body of article 12", {"author": "ann", "lang": "en"}, 1,
                         "created", "pending")  # fmt: skip
    queued = await jobs(db_url)
    assert len(queued) == 25
    # a load is a backfill: low priority, marked, so `backfill cancel` may withdraw it
    assert {(j[3], j[1].get("backfill")) for j in queued} == {(BACKFILL_PRIORITY, True)}
    # a Python write of the same content afterwards is unchanged
    same = await col.upsert(
        "12", "Body of article 12", title="Title 12", metadata={"author": "ann", "lang": "en"}
    )
    assert same.change == "unchanged"
    # loading again (sync) writes nothing: every document is already current
    _, again = await Watches(app).sync("articles")
    assert (again.rows, again.written) == (25, 0)
    await drain(app)
    assert (await col.with_fresh_state()).counts["embedded"] == 25


async def test_load_pages_through_keys_of_any_type(app: embedq.App, db_url: str) -> None:
    await app.collections.create("kv", provider="fake")
    await app_sql(db_url, "CREATE TABLE kv (k uuid PRIMARY KEY, v text)")
    await app_sql(
        db_url,
        "INSERT INTO kv SELECT gen_random_uuid(), 'value ' || i FROM generate_series(1, 23) i",
    )
    _, loaded = await Watches(app).create("kv", collection="kv", key="k", text=["v"], batch_size=5)
    assert (loaded.rows, loaded.written) == (23, 23)
    keys = {r[0] for r in await app_sql(db_url, "SELECT k::text FROM kv")}
    assert set(await docs(db_url)) == keys


async def test_a_load_never_overwrites_a_newer_row(app: embedq.App, db_url: str) -> None:
    """A row updated while the load runs: the update's trigger holds the watch's lock (shared)
    until its transaction ends, so the load's batch waits and then reads the new row."""
    await app_sql(db_url, ARTICLES)
    await app_sql(db_url, "INSERT INTO public.articles (id, body) VALUES (1, 'old')")
    await app.collections.create("articles", provider="fake")
    watches = Watches(app)
    await watches.create(
        "public.articles", collection="articles", key="id", text=["body"], load=False
    )
    async with await psycopg.AsyncConnection.connect(db_url) as writer:
        await writer.execute("UPDATE public.articles SET body = 'new' WHERE id = 1")
        load = asyncio.create_task(watches.sync("articles"))
        await asyncio.sleep(1.0)
        assert not load.done()  # waiting for the writer
        await writer.commit()
    _, loaded = await asyncio.wait_for(load, 30)
    assert loaded.rows == 1
    assert (await docs(db_url))["1"][1] == "new"


@pytest.mark.parametrize(
    ("table", "options", "needle"),
    [
        ("public.nope", {}, "no table 'public.nope'"),
        ("a.b.c.d", {}, "is not a table name"),
        ("article_view", {}, "is a view"),
        ("parted", {}, "is partitioned, a partition or part of an inheritance tree"),
        ("parted_1", {}, "is partitioned, a partition or part of an inheritance tree"),
        ("public.articles", {"key": "idd"}, "no column 'idd' (the --key); columns: id, title"),
        ("public.articles", {"text": ["Body"]}, "did you mean 'body'?"),
        ("public.articles", {"key": "author"}, "is not unique"),
        ("public.articles", {"text": ["views"]}, "is integer, not a string type: --text takes"),
        ("public.articles", {"title": "extra"}, "is jsonb, not a string type: --title takes"),
        ("public.articles", {"metadata": ["nope"]}, "(the --metadata)"),
        ("public.articles", {"text": ["body", "body"]}, "given twice"),
        ("public.articles", {"text": []}, "at least one text column"),
    ],
)
async def test_bad_input_is_refused_and_leaves_no_trigger(
    app: embedq.App, db_url: str, table: str, options: dict[str, Any], needle: str
) -> None:
    await app_sql(db_url, ARTICLES)
    await app_sql(db_url, "CREATE VIEW article_view AS SELECT * FROM public.articles")
    await app_sql(
        db_url, "CREATE TABLE parted (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)"
    )
    await app_sql(db_url, "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)")
    await app.collections.create("articles", provider="fake")
    kw: dict[str, Any] = {"collection": "articles", "key": "id", "text": ["body"], **options}
    with pytest.raises(InvalidWatch) as err:
        await Watches(app).create(table, **kw)
    assert needle in str(err.value)
    assert await triggers(db_url) == [] and await Watches(app).list() == []


async def test_unknown_or_taken_collection(app: embedq.App, db_url: str) -> None:
    await app_sql(db_url, ARTICLES)
    with pytest.raises(CollectionNotFound, match="embedq collection create"):
        await Watches(app).create("public.articles", collection="nope", key="id", text=["body"])
    await app.collections.create("articles", provider="fake")
    await Watches(app).create("public.articles", collection="articles", key="id", text=["body"])
    with pytest.raises(InvalidWatch, match=r"already fed by a watch on public\.articles"):
        await Watches(app).create(
            "public.articles", collection="articles", key="id", text=["title"]
        )
    assert len(await triggers(db_url)) == 4


async def test_sync_reinstalls_missing_triggers_and_prunes(app: embedq.App, db_url: str) -> None:
    _, watch, _ = await watched(app, db_url, rows=4)
    await Watches(app).drop("articles")
    # while unwatched, the table moves on
    await app_sql(db_url, "DELETE FROM public.articles WHERE id IN (1, 2)")
    await app_sql(db_url, "UPDATE public.articles SET body = 'changed' WHERE id = 3")
    watches = Watches(app)
    watch, _ = await watches.create(
        "public.articles", collection="articles", key="id", text=["body"], title="title",
        metadata=["author", "lang"],
    )  # fmt: skip
    assert (await docs(db_url))["3"][1] == "changed"
    assert list(await watches.orphans("articles")) == ["1", "2"]
    await app_sql(db_url, f"DROP TRIGGER {watch.triggers[1]} ON public.articles")
    assert (await watches.get("articles")).state == "1 trigger(s) missing"
    _, loaded = await watches.sync("articles", prune=True)
    assert (loaded.rows, loaded.written, loaded.pruned) == (2, 0, 2)
    assert sorted(await docs(db_url)) == ["3", "4"]
    assert (await watches.get("articles")).state == "active"


async def test_a_dropped_table_shows_in_list_and_can_be_dropped(
    app: embedq.App, db_url: str
) -> None:
    await watched(app, db_url)
    await app_sql(db_url, "DROP TABLE public.articles")
    [w] = await Watches(app).list()
    assert w.state == "table gone"
    with pytest.raises(InvalidWatch, match="is gone"):
        await Watches(app).sync("articles")
    _, removed = await Watches(app).drop("articles")
    assert removed == 0 and await Watches(app).list() == []


async def test_the_lock_namespace_is_the_migrations() -> None:
    text = (Path(embedq.__file__).parent / "migrations" / "0004_watches.sql").read_text()
    assert text.count(str(WATCH_LOCK_NAMESPACE)) == text.count("pg_advisory_xact_lock") == 3


# --- backfill ---------------------------------------------------------------------------------


async def _half_embedded(app: embedq.App) -> Any:
    """Collection `c`: a..e embedded; f, g, h written but their jobs cleared (no embedding,
    no job); i written with its job pending."""
    col = await app.collections.create("c", provider="fake")
    await col.upsert_many([{"key": k, "text": f"text {k}"} for k in "abcde"])
    await drain(app)
    await col.upsert_many([{"key": k, "text": f"text {k}"} for k in "fgh"])
    assert await app.store.clear(EMBED_QUEUE) == 3
    await col.upsert("i", "text i")
    return col


async def test_backfill_queues_only_the_missing_and_cancel_withdraws_them(
    app: embedq.App, db_url: str
) -> None:
    col = await _half_embedded(app)
    found = await missing(col, limit=2)
    assert (found.count, [r["key"] for r in found.first]) == (3, ["f", "g"])
    assert len(await jobs(db_url)) == 1  # counting queues nothing

    assert await backfill(col, priority=priority_of("normal"), batch_size=2) == 3
    queued = await jobs(db_url)
    marked = sorted((j[1].get("backfill", False), j[3]) for j in queued)
    assert marked == [(False, WRITE_PRIORITY)] + [(True, priority_of("normal"))] * 3
    assert (await missing(col)).count == 0
    assert await backfill(col) == 0  # nothing twice

    assert await cancel_backfill(app, col) == 3
    assert [j[1].get("backfill") for j in await jobs(db_url)] == [None]  # the write's job stays
    [(cancelled,)] = await app_sql(
        db_url,
        "SELECT count(*) FROM embedq.jobs_archive "
        "WHERE state = 'cancelled' AND last_error LIKE 'backfill cancelled%'",
    )
    assert cancelled == 3
    assert (await missing(col)).count == 3

    await backfill(col, priority=priority_of("high"))
    await drain(app)
    assert (await missing(col)).count == 0
    assert (await col.with_fresh_state()).counts["embedded"] == 9


async def test_a_write_during_a_backfill_keeps_its_newer_version(
    app: embedq.App, db_url: str
) -> None:
    col = await _half_embedded(app)
    await backfill(col)
    # a write coalesces into the backfill job: the newest version, and no longer a backfill
    await col.upsert("f", "text f, rewritten")
    [args] = [j[1] for j in await jobs(db_url) if j[5] == f"embed:{(await col.get('f')).id}"]
    assert args["version"] == 2 and "backfill" not in args
    assert await cancel_backfill(app) == 2
    await drain(app)
    assert (await col.get("f")).status == "embedded"


async def test_backfill_during_a_model_switch_fills_the_new_model(app: embedq.App) -> None:
    col = await app.collections.create("sw", provider="fake", model="fake-384")
    await col.upsert_many([{"key": f"d{i}", "text": f"text {i}"} for i in range(6)])
    await drain(app)
    space = await col.set_model(model="fake-128")
    assert (await missing(col)).count == 0  # the switch queued its own jobs
    assert await app.store.clear(EMBED_QUEUE) == 6
    col = await col.with_fresh_state()
    assert (await missing(col)).count == 6  # embedded in the old model, not the new one
    assert await backfill(col) == 6
    await drain(app)
    col = await col.with_fresh_state()
    assert col.active.id == space.id and (await missing(col)).count == 0


def test_priorities() -> None:
    assert [priority_of(p) for p in ("high", "normal", "low")] == [
        WRITE_PRIORITY, (WRITE_PRIORITY + BACKFILL_PRIORITY) // 2, BACKFILL_PRIORITY
    ]  # fmt: skip
    with pytest.raises(InvalidWatch, match="use high, normal, low"):
        priority_of("urgent")


async def test_bad_batch_size_or_priority(app: embedq.App) -> None:
    col = await app.collections.create("c", provider="fake")
    with pytest.raises(InvalidWatch, match="batch size 0 is invalid: an integer from 1 to"):
        await backfill(col, batch_size=0)
    with pytest.raises(InvalidWatch, match="priority 1001 is invalid"):
        await backfill(col, priority=1001)
    with pytest.raises(InvalidWatch, match="priority -1 is invalid"):
        await Watches(app).create("t", collection="c", key="id", text=["b"], priority=-1)


# --- the command line ----------------------------------------------------------------------------


def test_cli_watch_and_backfill(db_url: str) -> None:
    env = cli_env(db_url, COLUMNS="200")

    def ok(*args: str) -> Any:
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr + done.stdout
        return json.loads(done.stdout) if "--json" in args else done.stdout

    asyncio.run(app_sql(db_url, ARTICLES))
    asyncio.run(
        app_sql(
            db_url,
            "INSERT INTO public.articles (id, title, body, author, lang) "
            "SELECT i, 'T' || i, 'B' || i, 'ann', 'en' FROM generate_series(1, 30) i",
        )
    )
    ok("collection", "create", "articles", "--provider", "fake")
    out = ok(
        "watch", "create", "--table", "public.articles", "--key", "id", "--text", "title,body",
        "--metadata", "author,lang", "--collection", "articles", "--json",
    )  # fmt: skip
    assert out["loaded"] == {"rows": 30, "written": 30, "pruned": 0}
    assert out["watch"]["text"] == ["title", "body"] and out["watch"]["state"] == "active"
    [listed] = ok("watch", "list", "--json")
    assert listed["table"] == "public.articles" and listed["metadata"] == ["author", "lang"]
    assert "public.articles" in ok("watch", "list")

    dry = ok("backfill", "--collection", "articles", "--dry-run", "--json")
    assert (dry["missing"], dry["queued"]) == (0, 0)  # the load queued every document
    cancelled = ok("backfill", "cancel", "--json")
    assert cancelled == {"collection": None, "cancelled": 30}
    dry = ok("backfill", "--collection", "articles", "--dry-run", "--limit", "3", "--json")
    assert dry["missing"] == 30 and [r["key"] for r in dry["first"]] == ["1", "10", "11"]
    assert "30 documents of 'articles' have no embedding" in ok(
        "backfill", "--collection", "articles", "--dry-run"
    )
    queued = ok("backfill", "--collection", "articles", "--priority", "high", "--json")
    assert queued == {"collection": "articles", "queued": 30, "priority": "high"}

    bad = run_cli("watch", "create", "--table", "nope", "--key", "id", "--text", "body",
                  "--collection", "articles", env=env)  # fmt: skip
    assert bad.returncode == 1 and "no table 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_cli("backfill", "--collection", "articles", "--priority", "urgent", env=env)
    assert bad.returncode == 1 and "use high, normal, low" in bad.stderr
    bad = run_cli("backfill", env=env)
    assert bad.returncode == 1 and "--collection" in bad.stderr

    dropped = ok("watch", "drop", "articles", "--json")
    assert dropped["triggers_removed"] == 4
    assert ok("watch", "list", "--json") == []


def test_cli_backfill_asks_before_a_large_one(db_url: str) -> None:
    env = cli_env(db_url)

    async def setup() -> None:
        async with embedq.App(database_url=db_url) as app:
            col = await app.collections.create("big", provider="fake")
            await col.upsert_many([{"key": str(i), "text": "t"} for i in range(1001)])
            await app.store.clear(EMBED_QUEUE)

    asyncio.run(setup())
    refused = run_cli("backfill", "--collection", "big", env=env)
    assert refused.returncode == 1 and "Pass --yes" in refused.stderr
    assert asyncio.run(app_sql(db_url, "SELECT count(*) FROM embedq.jobs")) == [(0,)]
    done = run_cli("backfill", "--collection", "big", "--yes", "--json", env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["queued"] == 1001
