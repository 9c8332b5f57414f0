"""Search a collection: semantic, keyword or hybrid, with metadata filters.

    hits = await collection.search("reset a password", mode="hybrid", k=5,
                                   filters={"lang": "en", "year": {"$gte": 2023}})

- **semantic**: the query is embedded with the collection's *active* model and matched
  against its chunks through that space's HNSW index (cosine by default); each document
  counts once, with its best chunks. With filters, pgvector 0.8's iterative index scans keep
  returning candidates until enough pass the filter.
- **keyword**: BM25 over the collection's text-search configuration (`bm25.py`): a document
  holding *any* of the query's terms matches and ranking does the rest; `"quoted phrases"`
  must appear and `-word` excludes. Documents not embedded yet are found too.
- **hybrid** (default): both legs, each to its top max(100, k), fused (`fusion.py`) by the
  collection's default (a convex combination of normalised scores, alpha = 0.5) or by what
  the query asks (`fusion="rrf"`, `alpha=0.7`, `rrf_k=60`).

Filters: `{"field": value}` (equality), or `{"field": {"$op": value}}` with `$eq`, `$ne`,
`$in`, `$nin`, `$gt`, `$gte`, `$lt`, `$lte`, `$exists`. Numbers compare as numbers, strings
as text (ISO dates sort correctly).

A search runs in one repeatable-read transaction, so a model switch that completes meanwhile
is seen entirely or not at all (results never mix models, never come back empty because the
old chunks were just removed), and keyword statistics and postings are those of one moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import sql
from psycopg.rows import dict_row

from embedq import bm25, db, metrics, queries
from embedq.documents import Space, vector_cast
from embedq.errors import InvalidDocument
from embedq.fusion import FusionOptions, fuse, ranked

if TYPE_CHECKING:
    from embedq.documents import Collection

MODES = ("semantic", "keyword", "hybrid")
MAX_K = 1000
DEEP_K = 100  # each leg of a hybrid search brings its top max(DEEP_K, k)
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


@dataclass(frozen=True)
class Legs:
    """What each leg of a search found, best first, before fusion: (document id, score)."""

    semantic: list[tuple[int, float]]
    keyword: list[tuple[int, float]]
    chunks: dict[int, list[ChunkHit]]
    space: Space
    terms: list[str]  # the query's terms, for snippets

    def scores(self, mode: str, options: FusionOptions) -> dict[int, float]:
        """Each document's score in `mode`: one leg's, or both fused."""
        if mode == "semantic":
            return dict(self.semantic)
        if mode == "keyword":
            return dict(self.keyword)
        return fuse(self.semantic, self.keyword, options)


async def search(
    collection: Collection,
    query: str,
    *,
    mode: str = "hybrid",
    k: int = 10,
    filters: Mapping[str, Any] | None = None,
    fusion: str | None = None,
    alpha: float | None = None,
    rrf_k: int | None = None,
    literal: bool = False,
) -> list[SearchHit]:
    """See the module docstring. `literal=True` takes the query as plain text: quotes and
    leading minus signs are not query syntax (for queries no person typed, e.g. judged
    queries that quote passages)."""
    started = time.perf_counter()
    check_request(query, mode, k)
    options = collection.fusion.replace(fusion, alpha, rrf_k)
    depth = k if mode != "hybrid" else max(DEEP_K, k)
    async with snapshot(collection) as conn:
        legs = await run_legs(conn, collection, query, mode, depth, filters, literal=literal)
        if legs is None:
            return []  # dropped meanwhile
        scores = legs.scores(mode, options)
        top = ranked(scores, k)
        hits = await _hits(conn, collection, mode, top, scores, legs)
    metrics.SEARCH_SECONDS.labels(mode=mode).observe(time.perf_counter() - started)
    return hits


def check_request(query: Any, mode: Any, k: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise InvalidDocument("the search query is empty")
    if mode not in MODES:
        raise InvalidDocument(f"search mode {mode!r} is invalid: use {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidDocument(f"k must be an integer from 1 to {MAX_K}, not {k!r}")


@contextlib.asynccontextmanager
async def snapshot(collection: Collection) -> AsyncIterator[Any]:
    """A pooled connection in a read-only repeatable-read transaction, errors mapped."""
    pool = collection.app.store.pool
    assert pool is not None
    with db.translated():
        async with pool.connection() as conn:
            # BEGIN by hand on the pool's autocommit connection: one round trip less.
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield conn
            finally:
                await conn.execute("ROLLBACK")  # read only: nothing to commit


class QueryVectors:
    """The vectors of recent queries, by model and endpoint (one per App: `app.query_vectors`),
    so a query asked again, or by both legs of an evaluation, is embedded once."""

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str | None, str], np.ndarray] = OrderedDict()

    def get(self, space: Space, query: str) -> np.ndarray | None:
        key = (space.model_key, space.config.base_url, query)
        vector = self._items.get(key)
        if vector is not None:
            self._items.move_to_end(key)
        return vector

    def put(self, space: Space, query: str, vector: np.ndarray) -> None:
        self._items[(space.model_key, space.config.base_url, query)] = vector
        while len(self._items) > self.size:
            self._items.popitem(last=False)


async def run_legs(
    conn: Any,
    collection: Collection,
    query: str,
    mode: str,
    depth: int,
    filters: Mapping[str, Any] | None,
    *,
    literal: bool = False,
) -> Legs | None:
    """Both legs (or the one `mode` needs) of a search, each to its top `depth`, in the
    caller's snapshot. None: the collection was dropped meanwhile."""
    where, params = compile_filters(filters or {})
    s = collection.app.settings
    cur = conn.cursor(row_factory=dict_row)
    space = collection.active
    vector = await _embed_query(collection, space, query) if mode != "keyword" else None
    for _ in range(3):
        await cur.execute(
            sql.SQL(
                "SELECT s.*, set_config('hnsw.ef_search', %s, true) AS ef, "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true) AS scan "
                "FROM {}.spaces s WHERE collection_id = %s AND state = 'active'"
            ).format(sql.Identifier(s.db_schema)),
            (str(min(MAX_EF, max(s.search_ef, depth * 4))), collection.id),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        current = Space.from_row(row)
        if vector is None or current.id == space.id:
            break
        space = current  # a model switch completed: embed with the new model
        vector = await _embed_query(collection, space, query)
    else:
        raise InvalidDocument("the collection's model changed three times during one search")
    semantic: list[tuple[int, float]] = []
    chunks: dict[int, list[ChunkHit]] = {}
    if vector is not None:
        found = await _semantic(cur, collection, space, vector, depth, where, params)
        semantic = [(r["id"], r["score"]) for r in found]
        chunks = {r["id"]: [ChunkHit(c["seq"], c["text"], c["score"]) for c in r["chunks"]]
                  for r in found}  # fmt: skip
    keyword: list[tuple[int, float]] = []
    terms: list[str] = []
    if mode != "semantic":
        parsed = bm25.KeywordQuery(query) if literal else bm25.parse_query(query)
        keyword, terms = await _keyword(conn, cur, collection, parsed, depth, where, params)
    return Legs(semantic, keyword, chunks, space, terms)


async def _embed_query(collection: Collection, space: Space, query: str) -> np.ndarray:
    cache = collection.app.query_vectors
    vector = cache.get(space, query)
    if vector is None:
        guarded = collection.app.endpoints.get(space.config)
        tokens = 0
        if guarded.tpm is not None:  # only a tokens-per-minute limit needs the count
            from embedq.chunking import tokenizer_for

            # The first use loads the tokenizer (a fraction of a second): not on the loop.
            tokenizer = await asyncio.to_thread(tokenizer_for, space.config)
            tokens = tokenizer.count(query)
        [vector] = await guarded.embed([query], tokens=tokens)
        cache.put(space, query, vector)
    return vector


async def _keyword(
    conn: Any,
    cur: Any,
    collection: Collection,
    parsed: bm25.KeywordQuery,
    depth: int,
    where: sql.Composable,
    params: dict[str, Any],
) -> tuple[list[tuple[int, float]], list[str]]:
    """The BM25 leg, and the query's terms: its phrases must match, its exclusions not."""
    schema = collection.app.settings.db_schema
    terms, counts = await bm25.analyze(cur, schema, collection.language, parsed.scored_text)
    if not terms:
        return [], []  # only stop words (or nothing) to look for
    allowed: np.ndarray | None = None
    if params:
        allowed = await _filtered(cur, collection, where, params)
    denied: np.ndarray | None = None
    for phrase in parsed.phrases:
        docs = await bm25.matching(conn, schema, collection.id, collection.language, phrase)
        if docs is not None:
            allowed = docs if allowed is None else np.intersect1d(allowed, docs)
    for excluded in parsed.excluded:
        docs = await bm25.matching(conn, schema, collection.id, collection.language, excluded)
        if docs is not None:
            denied = docs if denied is None else np.union1d(denied, docs)
    if allowed is not None and not len(allowed):
        return [], terms
    ids, scores = await bm25.top_k(
        conn, schema, collection.id, terms, counts, depth, allowed=allowed, denied=denied
    )
    return list(zip(ids, scores, strict=True)), terms


async def _filtered(
    cur: Any, collection: Collection, where: sql.Composable, params: dict[str, Any]
) -> np.ndarray:
    """The ids of the collection's documents that pass a metadata filter."""
    await cur.execute(
        sql.SQL(
            "SELECT coalesce(array_agg(d.id), '{{}}') AS ids FROM {s}.documents d "
            "WHERE d.collection_id = %(c)s {where}"
        ).format(s=sql.Identifier(collection.app.settings.db_schema), where=where),
        {**params, "c": collection.id},
    )
    row = await cur.fetchone()
    return np.sort(np.asarray(row["ids"], dtype=np.int64))


async def _hits(
    conn: Any,
    collection: Collection,
    mode: str,
    top: list[int],
    scores: Mapping[int, float],
    legs: Legs,
) -> list[SearchHit]:
    if not top:
        return []
    cur = conn.cursor(row_factory=dict_row)
    q = queries.load("search.sql", collection.app.settings.db_schema)
    await cur.execute(
        q["hits"],
        {"ids": top, "snip": bool(legs.terms), "query": bm25.or_query(legs.terms)},
    )
    docs = {r["id"]: r for r in await cur.fetchall()}
    sem_rank = {d: i + 1 for i, (d, _) in enumerate(legs.semantic)}
    kw_rank = {d: i + 1 for i, (d, _) in enumerate(legs.keyword)}
    model = f"{legs.space.config.provider}/{legs.space.config.model}"
    return [
        SearchHit(
            key=docs[d]["key"],
            title=docs[d]["title"],
            score=scores[d],
            metadata=docs[d]["metadata"],
            status=docs[d]["status"],
            chunks=legs.chunks.get(d, []),
            snippet=docs[d]["snippet"],
            semantic_rank=sem_rank.get(d),
            keyword_rank=kw_rank.get(d),
            model=model if d in sem_rank else None,
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
    ranked_docs = sorted(by_doc.items(), key=lambda kv: -kv[1][0]["score"])[:k]
    return [{"id": d, "score": hits[0]["score"], "chunks": hits} for d, hits in ranked_docs]


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
