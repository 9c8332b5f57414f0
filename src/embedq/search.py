"""Search a collection: semantic, keyword or hybrid, with metadata filters.

    hits = await collection.search("reset a password", mode="hybrid", k=5,
                                   filters={"lang": "en", "year": {"$gte": 2023}})

- **semantic**: the query is embedded with the collection's *active* model and matched
  against its chunks through that space's HNSW index (cosine by default); each document
  counts once, with its best chunks. With filters, pgvector 0.8's iterative index scans keep
  returning candidates until enough pass the filter.
- **keyword**: PostgreSQL full-text search over documents (`websearch_to_tsquery`: quotes,
  `or`, `-word`), so documents not embedded yet are found too.
- **hybrid** (default): both lists fused by reciprocal rank (score = sum of 1/(60 + rank)).

Filters: `{"field": value}` (equality), or `{"field": {"$op": value}}` with `$eq`, `$ne`,
`$in`, `$nin`, `$gt`, `$gte`, `$lt`, `$lte`, `$exists`. Numbers compare as numbers, strings
as text (ISO dates sort correctly).

A search runs in one repeatable-read transaction, so a model switch that completes meanwhile
is seen entirely or not at all: results never mix models and never come back empty
because the old chunks were just removed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import sql
from psycopg.rows import dict_row

from embedq import db, metrics
from embedq.documents import Space, vector_cast
from embedq.errors import InvalidDocument

if TYPE_CHECKING:
    from embedq.documents import Collection

MODES = ("semantic", "keyword", "hybrid")
RRF_K = 60
MAX_K = 1000
MAX_EF = 1000  # pgvector's upper bound of hnsw.ef_search
_OPERATORS = {"cosine": "<=>", "l2": "<->", "ip": "<#>"}
_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@dataclass(frozen=True)
class ChunkHit:
    seq: int
    text: str
    score: float


@dataclass(frozen=True)
class SearchHit:
    """A document found by a search, with its best chunks (semantic) or a snippet."""

    key: str
    title: str | None
    score: float
    metadata: dict[str, Any]
    status: str
    chunks: list[ChunkHit] = field(default_factory=list)
    snippet: str | None = None
    semantic_rank: int | None = None
    keyword_rank: int | None = None
    model: str | None = None  # the model whose vectors ranked it (None: keyword only)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "score": round(self.score, 6),
            "metadata": self.metadata,
            "status": self.status,
            "chunks": [
                {"seq": c.seq, "text": c.text, "score": round(c.score, 6)} for c in self.chunks
            ],
            "snippet": self.snippet,
            "semantic_rank": self.semantic_rank,
            "keyword_rank": self.keyword_rank,
            "model": self.model,
        }


@dataclass
class SearchStats:
    searches: int = 0
    seconds: list[float] = field(default_factory=list)


stats = SearchStats()
_query_vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()


async def search(
    collection: Collection,
    query: str,
    *,
    mode: str = "hybrid",
    k: int = 10,
    filters: Mapping[str, Any] | None = None,
) -> list[SearchHit]:
    """See the module docstring."""
    started = time.perf_counter()
    if not isinstance(query, str) or not query.strip():
        raise InvalidDocument("the search query is empty")
    if mode not in MODES:
        raise InvalidDocument(f"search mode {mode!r} is invalid: use {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidDocument(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
    where, params = compile_filters(filters or {})
    app = collection.app
    space = collection.active
    vector = await _embed_query(collection, space, query) if mode != "keyword" else None
    pool = app.store.pool
    assert pool is not None
    for _ in range(3):
        with db.translated():
            async with pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                # BEGIN by hand on the pool's autocommit connection: one round trip less.
                await cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    await cur.execute(
                        sql.SQL(
                            "SELECT s.*, set_config('hnsw.ef_search', %s, true) AS ef, "
                            "set_config('hnsw.iterative_scan', 'relaxed_order', true) AS scan "
                            "FROM {}.spaces s WHERE collection_id = %s AND state = 'active'"
                        ).format(sql.Identifier(app.settings.db_schema)),
                        (str(min(MAX_EF, max(app.settings.search_ef, k * 4))), collection.id),
                    )
                    row = await cur.fetchone()
                    if row is None:
                        return []  # dropped meanwhile
                    current = Space.from_row(row)
                    if vector is not None and current.id != space.id:
                        space = current  # a model switch completed: embed with the new model
                        vector = await _embed_query(collection, space, query)
                        continue
                    hits = await _run(
                        cur, collection, current, query, vector, mode, k, where, params
                    )
                finally:
                    await conn.execute("ROLLBACK")  # read only: nothing to commit
        seconds = time.perf_counter() - started
        stats.searches += 1
        stats.seconds.append(seconds)
        del stats.seconds[:-1000]
        metrics.SEARCH_SECONDS.labels(mode=mode).observe(seconds)
        return hits
    raise InvalidDocument("the collection's model changed three times during one search")


async def _embed_query(collection: Collection, space: Space, query: str) -> np.ndarray:
    key = (space.model_key, query)
    vector = _query_vectors.get(key)
    if vector is None:
        guarded = collection.app.endpoints.get(space.config)
        tokens = 0
        if guarded.tpm is not None:  # only a tokens-per-minute limit needs the count
            from embedq.chunking import tokenizer_for

            # The first use loads the tokenizer (a fraction of a second): not on the loop.
            tokenizer = await asyncio.to_thread(tokenizer_for, space.config)
            tokens = tokenizer.count(query)
        [vector] = await guarded.embed([query], tokens=tokens)
        _query_vectors[key] = vector
        if len(_query_vectors) > 2048:
            _query_vectors.popitem(last=False)
    else:
        _query_vectors.move_to_end(key)
    return vector


async def _run(
    cur: Any,
    collection: Collection,
    space: Space,
    query: str,
    vector: np.ndarray | None,
    mode: str,
    k: int,
    where: sql.Composable,
    params: dict[str, Any],
) -> list[SearchHit]:
    schema = sql.Identifier(collection.app.settings.db_schema)
    semantic: list[dict[str, Any]] = []
    keyword: list[dict[str, Any]] = []
    pool_size = k if mode == "semantic" else max(k * 2, 20)
    if vector is not None:
        semantic = await _semantic(cur, collection, space, vector, pool_size, where, params)
    if mode != "semantic":
        await cur.execute(
            sql.SQL(
                "SELECT d.id, ts_rank_cd(d.tsv, tq) AS rank "
                "FROM {s}.documents d, websearch_to_tsquery(%(lang)s::regconfig, %(q)s) tq "
                "WHERE d.collection_id = %(c)s AND d.tsv @@ tq {where} "
                "ORDER BY rank DESC, d.id LIMIT %(n)s"
            ).format(s=schema, where=where),
            {**params, "lang": collection.language, "q": query, "c": collection.id, "n": pool_size},
        )
        keyword = await cur.fetchall()

    scores: dict[int, float] = {}
    sem_rank = {r["id"]: i + 1 for i, r in enumerate(semantic)}
    kw_rank = {r["id"]: i + 1 for i, r in enumerate(keyword)}
    if mode == "semantic":
        scores = {r["id"]: r["score"] for r in semantic}
    elif mode == "keyword":
        scores = {r["id"]: float(r["rank"]) for r in keyword}
    else:
        for ranks in (sem_rank, kw_rank):
            for doc_id, rank in ranks.items():
                scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (RRF_K + rank)
    top = sorted(scores, key=lambda d: (-scores[d], d))[:k]
    if not top:
        return []
    await cur.execute(
        sql.SQL(
            "SELECT d.id, d.key, d.title, d.metadata, d.status, "
            "CASE WHEN %(snip)s THEN ts_headline(d.language, left(d.body, 20000), "
            "websearch_to_tsquery(d.language, %(q)s), 'MaxFragments=1, MaxWords=30, "
            "MinWords=10') END AS snippet "
            "FROM {s}.documents d WHERE d.id = ANY(%(ids)s)"
        ).format(s=schema),
        {"ids": top, "q": query, "snip": mode != "semantic"},
    )
    docs = {r["id"]: r for r in await cur.fetchall()}
    chunks = {r["id"]: r["chunks"] for r in semantic}
    return [
        SearchHit(
            key=docs[d]["key"],
            title=docs[d]["title"],
            score=scores[d],
            metadata=docs[d]["metadata"],
            status=docs[d]["status"],
            chunks=[ChunkHit(c["seq"], c["text"], c["score"]) for c in chunks.get(d, [])],
            snippet=docs[d]["snippet"],
            semantic_rank=sem_rank.get(d),
            keyword_rank=kw_rank.get(d),
            model=f"{space.config.provider}/{space.config.model}" if d in sem_rank else None,
        )
        for d in top
        if d in docs
    ]


async def _semantic(
    cur: Any,
    collection: Collection,
    space: Space,
    vector: np.ndarray,
    k: int,
    where: sql.Composable,
    params: dict[str, Any],
) -> list[dict[str, Any]]:
    """The k documents nearest to `vector`, each with its best chunks (at most 3)."""
    s = collection.app.settings
    op = sql.SQL(_OPERATORS[collection.distance])
    cast = vector_cast(space.dimensions) if space.dimensions <= 4000 else sql.SQL("vector")
    distance = sql.SQL("c.embedding::{cast} {op} %(v)s::{cast}").format(cast=cast, op=op)
    join = sql.SQL("JOIN {s}.documents d ON d.id = c.document_id").format(
        s=sql.Identifier(s.db_schema)
    )
    # space_id is a literal, not a parameter: the planner must see it to use the partial
    # HNSW index of this space. It is an integer read from our own table.
    query = sql.SQL(
        "SELECT c.document_id, c.seq, c.content, {distance} AS distance "
        "FROM {s}.chunks c {join} WHERE c.space_id = {space} {where} "
        "ORDER BY {distance} LIMIT %(n)s"
    ).format(
        distance=distance,
        s=sql.Identifier(s.db_schema),
        join=join if params else sql.SQL(""),
        space=sql.Literal(space.id),
        where=where,
    )
    await cur.execute(query, {**params, "v": vector, "n": k * 4})
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for r in await cur.fetchall():
        score = _score(collection.distance, float(r["distance"]))
        hits = by_doc.setdefault(r["document_id"], [])
        if len(hits) < 3:
            hits.append({"seq": r["seq"], "text": r["content"], "score": score})
    ranked = sorted(by_doc.items(), key=lambda kv: -kv[1][0]["score"])[:k]
    return [{"id": d, "score": hits[0]["score"], "chunks": hits} for d, hits in ranked]


def _score(distance: str, value: float) -> float:
    """Higher is better: cosine similarity, negative L2 distance, inner product."""
    if distance == "cosine":
        return 1.0 - value
    return -value


def compile_filters(filters: Mapping[str, Any]) -> tuple[sql.Composable, dict[str, Any]]:
    """A metadata filter as an SQL fragment over `d.metadata` and its parameters."""
    if not isinstance(filters, Mapping):
        raise InvalidDocument('filters must be an object, e.g. {"lang": "en"}')
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    for i, (name, cond) in enumerate(filters.items()):
        if not isinstance(name, str) or not name:
            raise InvalidDocument(f"filter field {name!r} must be a non-empty string")
        ops = cond if isinstance(cond, Mapping) else {"$eq": cond}
        if not ops:
            raise InvalidDocument(f"filter on {name!r} is empty")
        for j, (op, value) in enumerate(ops.items()):
            p = f"f{i}_{j}"
            params[f"{p}_name"] = name
            name_ph = sql.Placeholder(f"{p}_name")
            field_ = sql.SQL("d.metadata -> {}").format(name_ph)
            ph = sql.Placeholder(p)
            if op == "$eq":
                _check_scalar(name, op, value)
                params[p] = json.dumps({name: value})
                parts.append(sql.SQL("d.metadata @> {}::jsonb").format(ph))
            elif op == "$ne":
                _check_scalar(name, op, value)
                params[p] = json.dumps({name: value})
                parts.append(sql.SQL("NOT d.metadata @> {}::jsonb").format(ph))
            elif op in ("$in", "$nin"):
                if not isinstance(value, list) or not value:
                    raise InvalidDocument(f"filter {name}.{op} needs a non-empty list of values")
                for v in value:
                    _check_scalar(name, op, v)
                params[p] = [json.dumps(v) for v in value]
                test = sql.SQL("{} = ANY({}::jsonb[])").format(field_, ph)
                parts.append(
                    test if op == "$in" else sql.SQL("NOT coalesce({}, false)").format(test)
                )
            elif op in _COMPARE:
                cmp = sql.SQL(_COMPARE[op])
                if isinstance(value, bool) or not isinstance(value, int | float | str):
                    raise InvalidDocument(
                        f"filter {name}.{op} needs a number or a string, not {value!r}"
                    )
                if isinstance(value, str):
                    params[p] = value
                    parts.append(
                        sql.SQL("(d.metadata ->> {n}) {cmp} {v}").format(n=name_ph, cmp=cmp, v=ph)
                    )
                else:
                    if not math.isfinite(value):
                        raise InvalidDocument(f"filter {name}.{op} must be a finite number")
                    params[p] = value
                    parts.append(
                        sql.SQL(
                            "(CASE WHEN jsonb_typeof({f}) = 'number' THEN ({f})::numeric END) "
                            "{cmp} {v}"
                        ).format(f=field_, cmp=cmp, v=ph)
                    )
            elif op == "$exists":
                if not isinstance(value, bool):
                    raise InvalidDocument(f"filter {name}.$exists needs true or false")
                test = sql.SQL("d.metadata ? {}").format(name_ph)
                parts.append(test if value else sql.SQL("NOT ({})").format(test))
            else:
                raise InvalidDocument(
                    f"unknown filter operator {op!r} on {name!r}: use $eq, $ne, $in, $nin, "
                    "$gt, $gte, $lt, $lte, $exists"
                )
    if not parts:
        return sql.SQL(""), {}
    return sql.SQL("AND ") + sql.SQL(" AND ").join(parts), params


def _check_scalar(name: str, op: str, value: Any) -> None:
    if value is not None and not isinstance(value, str | int | float | bool):
        raise InvalidDocument(f"filter {name}.{op} needs a scalar value, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidDocument(f"filter {name}.{op} must be a finite number")
