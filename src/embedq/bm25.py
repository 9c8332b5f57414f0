"""BM25 keyword search over postings that PostgreSQL keeps exact in the writing transaction.

    parsed = parse_query('bees "waggle dance" -wasp')      # terms, phrases, exclusions
    ids, scores = await top_k(cur, collection_id, terms, counts, k=10)

Scoring is Okapi BM25 as Lucene computes it, over a document's title and body:

    score(d, q) = sum over terms t of q:  qtf(t) idf(t) tf / (tf + k1 (1 - b + b dl / avgdl))
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))

with tf the term's count in the document, dl the document's length in tokens and N, avgdl, df
the collection's document count, average length and the term's document frequency, all as
of the searching transaction's snapshot: migration 0006's triggers keep them in step with
every write, in the writer's own transaction (see docs/search.md).

The postings of a term live in segments: the unsorted ones that writing statements append, and
sorted ones that compaction (`compact`) merges them into, best weight first, in blocks whose
first weight bounds the rest. A search reads each sorted segment only as deep as it takes to
prove that a document not seen cannot make the top k, then completes the few candidates left
term by term (and the last ones from their tsvector), so the top k is exact without scoring
every document that holds a term. The blocks are fetched in binary and scored here with numpy:
PostgreSQL's executor spends about half a microsecond per posting aggregated, numpy a few
nanoseconds, and the fetch is the cost that remains.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import pq
from psycopg.adapt import Loader
from psycopg.rows import dict_row

from embedq import db, queries
from embedq.migrations import LOCK_NAMESPACE

if TYPE_CHECKING:
    from embedq.app import App

log = logging.getLogger("embedq.bm25")

COMPACTION_LOCK = 3  # advisory lock duty (second key): one compactor at a time
BLOCK = 1024  # postings per sorted block (bm25_merge cuts blocks of this size)
DEFAULT_K1 = 0.9
DEFAULT_B = 0.4
_LOOKUP_LIMIT = 64  # candidates completed from their tsvector rather than from postings
_MERGE_RATIO = 4  # a sorted segment is merged with smaller ones once they weigh a quarter
_MERGE_BATCH = 200_000  # postings per compaction transaction


# --- the query -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeywordQuery:
    """A keyword query: free text (any of its terms may match), quoted phrases (which a
    document must contain) and excluded words or phrases (`-word`, `-"a phrase"`)."""

    text: str
    phrases: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    @property
    def scored_text(self) -> str:
        """The text whose terms rank documents: the free text and the phrases."""
        return " ".join((self.text, *self.phrases)).strip()


_TOKEN = re.compile(r'(-?)"([^"]*)"?|(-?)(\S+)')


def parse_query(raw: str) -> KeywordQuery:
    """Split a query the way web search engines do: `"..."` is a phrase, a leading `-`
    excludes a word or phrase, `or` is accepted and ignored (any term matches anyway)."""
    words: list[str] = []
    phrases: list[str] = []
    excluded: list[str] = []
    for m in _TOKEN.finditer(raw):
        if m.group(2) is not None:
            target = excluded if m.group(1) else phrases
            if m.group(2).strip():
                target.append(m.group(2).strip())
        else:
            word = m.group(4)
            if m.group(3) and word:
                excluded.append(word)
            elif word.lower() != "or":
                words.append(("-" if m.group(3) else "") + word)
    return KeywordQuery(" ".join(words), tuple(phrases), tuple(excluded))


async def analyze(cur: Any, schema: str, language: str, text: str) -> tuple[list[str], list[int]]:
    """The terms of `text` under a text-search configuration, and how often each occurs."""
    await cur.execute(
        queries.load("bm25.sql", schema)["analyze_query"], {"language": language, "text": text}
    )
    row = await cur.fetchone()
    return list(row["lexemes"]), [int(c) for c in row["counts"]]


def or_query(terms: Sequence[str]) -> str:
    """A tsquery (text) that matches any of `terms` (already normalised lexemes)."""
    quoted = ("'" + t.replace("\\", "\\\\").replace("'", "''") + "'" for t in terms)
    return " | ".join(quoted)


async def matching(
    conn: Any, schema: str, collection_id: int, language: str, text: str
) -> np.ndarray | None:
    """The ids (sorted) of the documents that contain `text`: a word, or a phrase with its
    words in order. None when `text` has no terms (only stop words): it constrains nothing."""
    q = queries.load("bm25.sql", schema)
    cur = _binary_cursor(conn)
    await cur.execute(q["phrase_query"], {"language": language, "text": text})
    row = await cur.fetchone()
    lexemes = list(row["lexemes"])
    if not lexemes:
        return None
    docs: np.ndarray | None = None
    for lexeme in lexemes:
        await cur.execute(q["term_documents"], {"collection": collection_id, "lexeme": lexeme})
        have = _live(await cur.fetchall())
        docs = have if docs is None else np.intersect1d(docs, have, assume_unique=True)
    assert docs is not None
    if len(lexemes) == 1 or not len(docs):
        return docs
    # documents with every word of the phrase: which have them in order
    await cur.execute(q["matching"], {"ids": docs.tolist(), "query": row["query"]})
    return np.sort(np.asarray([r["id"] for r in await cur.fetchall()], dtype=np.int64))


def _live(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The documents of a term's stored rows, less the postings removed."""
    removed: set[tuple[int, int]] = set()
    for r in rows:
        if r["postings"] < 0:
            removed.update(zip(r["documents"].tolist(), r["versions"].tolist(), strict=True))
    added = [r for r in rows if r["postings"] > 0]
    if not added:
        return np.empty(0, dtype=np.int64)
    doc = np.concatenate([r["documents"] for r in added])
    if removed:
        ver = np.concatenate([r["versions"] for r in added]).tolist()
        pairs = zip(doc.tolist(), ver, strict=True)
        doc = doc[np.fromiter((p not in removed for p in pairs), dtype=bool, count=len(doc))]
    return np.unique(doc)


# --- numpy arrays from PostgreSQL's binary array format -----------------------------------


class _ArrayLoader(Loader):
    """A one-dimensional array without NULLs, loaded straight into numpy."""

    format = pq.Format.BINARY
    dtype: np.dtype[Any] = np.dtype(">i8")

    def load(self, data: Any) -> np.ndarray:
        buf = bytes(data) if not isinstance(data, bytes | memoryview) else data
        ndim = int.from_bytes(buf[0:4], "big")
        if ndim == 0:
            return np.empty(0, self.dtype.newbyteorder("="))
        if ndim != 1 or int.from_bytes(buf[4:8], "big"):
            raise ValueError("bm25 arrays are one-dimensional and have no NULLs")
        pairs = np.frombuffer(buf, dtype=[("n", ">i4"), ("v", self.dtype)], offset=20)
        values: np.ndarray = pairs["v"].astype(self.dtype.newbyteorder("="))
        return values


class _Int8Array(_ArrayLoader):
    dtype = np.dtype(">i8")


class _Int4Array(_ArrayLoader):
    dtype = np.dtype(">i4")


class _Float8Array(_ArrayLoader):
    dtype = np.dtype(">f8")


_ARRAY_OIDS = {1016: _Int8Array, 1007: _Int4Array, 1022: _Float8Array}


def _binary_cursor(conn: Any) -> Any:
    cur = conn.cursor(binary=True, row_factory=dict_row)
    for oid, loader in _ARRAY_OIDS.items():
        cur.adapters.register_loader(oid, loader)
    return cur


# --- top k ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What is known of a query's terms before any posting is read."""

    terms: list[str]
    weights: np.ndarray  # qtf * idf per term
    kc: float  # a posting weighs tf / (tf + kc + kl * length)
    kl: float
    # stored rows: term index, lexeme, segment, block, postings, bound (NaN: not sorted)
    term: np.ndarray
    lexeme: list[str]
    segment: np.ndarray
    block: np.ndarray
    postings: np.ndarray
    bound: np.ndarray
    removals: set[int]  # terms with removed postings not merged yet

    @property
    def sorted_rows(self) -> np.ndarray:
        rows: np.ndarray = ~np.isnan(self.bound) & (self.postings > 0)
        return rows


async def top_k(
    conn: Any,
    schema: str,
    collection_id: int,
    terms: Sequence[str],
    counts: Sequence[int],
    k: int,
    *,
    allowed: np.ndarray | None = None,
    denied: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """The ids and BM25 scores of the k best documents for `terms` (each `counts[i]` times
    in the query), best first, ties to the lower id; `allowed` and `denied` restrict the
    documents by id. Runs in `conn`'s transaction (a snapshot: use REPEATABLE READ)."""
    if k < 1 or not terms:
        return [], []
    cur = _binary_cursor(conn)
    q = queries.load("bm25.sql", schema)
    plan = await _plan(cur, q, collection_id, list(terms), list(counts))
    if plan is None:
        return [], []
    search = _Search(cur, q, collection_id, plan, k, allowed, denied)
    return await search.run()


async def _plan(
    cur: Any, q: dict[str, str], collection_id: int, terms: list[str], counts: list[int]
) -> _Plan | None:
    await cur.execute(q["meta"], {"collection": collection_id, "lexemes": terms})
    row = await cur.fetchone()
    if row is None or int(row["documents"]) <= 0:
        return None
    n = float(row["documents"])
    avgdl = max(float(row["tokens"]) / n, 1e-9)
    k1, b = float(row["bm25_k1"]), float(row["bm25_b"])
    index = {t: i for i, t in enumerate(terms)}
    term = np.array([index[x] for x in row["lexemes"]], dtype=np.int32)
    postings = row["postings"].astype(np.int64)
    df = np.bincount(term, weights=postings, minlength=len(terms))
    qtf = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(df > 0, qtf * np.log(1 + (n - df + 0.5) / (df + 0.5)), 0.0)
    sort_avgdl, head = row["sort_avgdl"], row["head_weight"]
    sorted_now = (sort_avgdl > 0) & (row["sort_k1"] == k1) & (row["sort_b"] == b)
    # A block's first weight h bounds its postings' weights under the avgdl it was sorted
    # by; under today's, a weight is at most h / (h + r (1 - h)), r = min(1, sorted / now).
    r = np.minimum(1.0, np.where(sort_avgdl > 0, sort_avgdl, avgdl) / avgdl)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = weights[term] * head / (head + r * (1 - head))
    bound = np.where(sorted_now & (postings > 0), bound, np.nan)
    return _Plan(
        terms=terms,
        weights=weights,
        kc=k1 * (1 - b),
        kl=k1 * b / avgdl,
        term=term,
        lexeme=list(row["lexemes"]),
        segment=row["segments"],
        block=row["blocks"],
        postings=postings,
        bound=bound,
        removals={int(t) for t in term[postings < 0]},
    )


@dataclass
class _Batch:
    """Postings read: term, document, weight in the score, and document length."""

    term: np.ndarray
    doc: np.ndarray
    score: np.ndarray
    length: np.ndarray

    @classmethod
    def concat(cls, batches: Sequence[_Batch]) -> _Batch:
        if not batches:
            e = np.empty(0)
            return cls(e.astype(np.int32), e.astype(np.int64), e, e)
        return cls(*(np.concatenate([getattr(b, f) for b in batches])
                     for f in ("term", "doc", "score", "length")))  # fmt: skip


# Reading a posting costs about 0.2 µs (fetch and transfer), looking a document's terms up in
# its tsvector 10-25 µs (its toast may not be cached): which completes candidates cheaper.
_POSTING_COST, _LOOKUP_COST = 0.2, 20.0


class _Search:
    """One top-k search (see the module docstring for the algorithm)."""

    def __init__(
        self,
        cur: Any,
        q: dict[str, str],
        collection_id: int,
        plan: _Plan,
        k: int,
        allowed: np.ndarray | None,
        denied: np.ndarray | None,
    ) -> None:
        self.cur, self.q, self.collection_id, self.plan, self.k = cur, q, collection_id, plan, k
        self.allowed, self.denied = allowed, denied
        self.fetched = np.zeros(len(plan.term), dtype=bool)
        self.batches: list[_Batch] = []
        self.removed: dict[int, set[tuple[int, int]]] = {}
        # the sorted segments ("lists"): their rows in block order
        p = plan
        rows = np.flatnonzero(p.sorted_rows)
        rows = rows[np.lexsort((p.block[rows], p.segment[rows], p.term[rows]))]
        keys = np.stack([p.term[rows], p.segment[rows]]) if len(rows) else np.empty((2, 0))
        starts = np.flatnonzero(np.any(np.diff(keys, axis=1) != 0, axis=0)) + 1
        self.lists = [r for r in np.split(rows, starts) if len(r)]
        self.list_term = [int(p.term[r[0]]) for r in self.lists]
        self.depth = [1] * len(self.lists)

    # -- reading ------------------------------------------------------------------------

    def term_bounds(self) -> np.ndarray:
        """Per term, the most a posting not read can weigh (0: all read)."""
        ub = np.zeros(len(self.plan.weights))
        for i, rows in enumerate(self.lists):
            d = self.depth[i]
            if d < len(rows):
                t = self.list_term[i]
                ub[t] = max(ub[t], float(self.plan.bound[rows[d]]))
        return ub

    def unread(self) -> np.ndarray:
        """Per term, its postings not read."""
        rest = np.zeros(len(self.plan.weights))
        for i, rows in enumerate(self.lists):
            rest[self.list_term[i]] += float(self.plan.postings[rows[self.depth[i] :]].sum())
        return rest

    async def read_to_depth(self) -> _Batch:
        rows = [self.lists[i][: self.depth[i]] for i in range(len(self.lists))]
        unsorted = np.flatnonzero(np.isnan(self.plan.bound))  # recent writes, removals
        return await self.fetch(np.concatenate([unsorted, *rows]) if rows else unsorted)

    async def fetch(self, rows: np.ndarray) -> _Batch:
        """Read stored rows not read yet; their postings, removed ones and documents that
        are not allowed left out."""
        p = self.plan
        wanted = [int(r) for r in rows if not self.fetched[r]]
        if not wanted:
            return _Batch.concat([])
        self.fetched[wanted] = True
        # removals first: those of a term were all read with its first rows (unsorted)
        wanted.sort(key=lambda r: p.postings[r] >= 0)
        await self.cur.execute(
            self.q["blocks"],
            {
                "collection": self.collection_id,
                "lexemes": [p.lexeme[r] for r in wanted],
                "segments": [int(p.segment[r]) for r in wanted],
                "blocks": [int(p.block[r]) for r in wanted],
                "versions": [int(p.term[r]) in p.removals for r in wanted],
            },
        )
        batches = []
        for row in sorted(await self.cur.fetchall(), key=lambda r: int(r["i"])):
            t = int(p.term[wanted[int(row["i"]) - 1]])
            doc = row["documents"]
            if row["postings"] < 0:
                gone = self.removed.setdefault(t, set())
                gone.update(zip(doc.tolist(), row["versions"].tolist(), strict=True))
                continue
            keep = np.ones(len(doc), dtype=bool)
            cancelled = self.removed.get(t)
            if cancelled:
                ids = np.fromiter((d for d, _ in cancelled), dtype=np.int64, count=len(cancelled))
                for i in np.flatnonzero(np.isin(doc, ids)).tolist():
                    keep[i] = (int(doc[i]), int(row["versions"][i])) not in cancelled
            if self.allowed is not None:
                keep &= np.isin(doc, self.allowed)
            if self.denied is not None and len(self.denied):
                keep &= ~np.isin(doc, self.denied)
            tf = row["tfs"][keep].astype(np.float64)
            length = row["lengths"][keep].astype(np.float64)
            score = p.weights[t] * tf / (tf + p.kc + p.kl * length)
            batches.append(_Batch(np.full(len(score), t, dtype=np.int32), doc[keep], score,
                                  length))  # fmt: skip
        batch = _Batch.concat(batches)
        self.batches.append(batch)
        return batch

    # -- scoring ------------------------------------------------------------------------

    def evaluate(self) -> _Candidates:
        """Every document seen: its partial score, and the terms it was seen in."""
        b = _Batch.concat(self.batches)
        docs, inverse = _group(b.doc)
        seen = np.zeros((len(docs), len(self.plan.weights)), dtype=bool)
        seen[inverse, b.term] = True
        length = np.zeros(len(docs))
        length[inverse] = b.length
        return _Candidates(
            docs, np.bincount(inverse, weights=b.score, minlength=len(docs)), seen, length
        )

    def threshold(self, lower: np.ndarray) -> float:
        """The k-th best of the lower bounds: one of the true top k scores is at least it."""
        if len(lower) < self.k:
            return 0.0
        return float(np.partition(lower, len(lower) - self.k)[len(lower) - self.k])

    # -- the search -----------------------------------------------------------------------

    async def run(self) -> tuple[list[int], list[float]]:
        await self.read_to_depth()
        c = self.evaluate()
        theta = self.threshold(c.lower)
        if self.term_bounds().sum() >= theta:
            self.deepen(theta)
            await self.read_to_depth()
            c = self.evaluate()
            theta = max(theta, self.threshold(c.lower))
        # Now no document unseen can reach theta: complete the candidates.
        while True:
            ub = self.term_bounds()
            upper = c.lower + (~c.seen).astype(np.float64) @ ub
            c = c.take(upper >= theta * (1 - 1e-9))
            upper = upper[upper >= theta * (1 - 1e-9)]
            incomplete = upper > c.lower
            if not incomplete.any():
                break
            rest = self.unread()
            cheapest = min(float(rest[t]) for t in np.flatnonzero(ub > 0))
            if incomplete.sum() * _LOOKUP_COST <= cheapest * _POSTING_COST:
                await self.look_up(c, incomplete)
                continue
            t = self.next_term(ub, rest)
            for i, rows in enumerate(self.lists):
                if self.list_term[i] == t:
                    self.depth[i] = len(rows)
            c.absorb(t, await self.read_to_depth())
            theta = max(theta, self.threshold(c.lower))
        order = np.lexsort((c.docs, -c.lower))[: self.k]
        return c.docs[order].tolist(), c.lower[order].tolist()

    def deepen(self, theta: float) -> None:
        """Read deeper, one block at a time, the block that lowers the bound of what is not
        read most per posting first, until that bound is below `theta`: then a document not
        seen cannot reach it (and reading more only raises it)."""
        bound, postings = self.plan.bound, self.plan.postings
        while True:
            total, best, best_ratio = 0.0, None, -1.0
            for i, rows in enumerate(self.lists):
                d = self.depth[i]
                if d >= len(rows):
                    continue
                cur = float(bound[rows[d]])
                nxt = float(bound[rows[d + 1]]) if d + 1 < len(rows) else 0.0
                total += cur
                ratio = (cur - nxt) / max(int(postings[rows[d]]), 1)
                if ratio > best_ratio:
                    best, best_ratio = i, ratio
            if best is None or total < theta:
                return
            self.depth[best] += 1

    @staticmethod
    def next_term(ub: np.ndarray, rest: np.ndarray) -> int:
        """The open term whose unread postings weigh most per posting."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return int(np.argmax(np.where(ub > 0, ub / np.maximum(rest, 1), -1)))

    async def look_up(self, c: _Candidates, which: np.ndarray) -> None:
        """Complete some candidates from their tsvector (their current version's)."""
        p = self.plan
        ids = c.docs[which]
        await self.cur.execute(self.q["term_counts"], {"ids": ids.tolist(), "lexemes": p.terms})
        index = {x: i for i, x in enumerate(p.terms)}
        rows = await self.cur.fetchall()
        at = {d: i for i, d in zip(np.flatnonzero(which).tolist(), ids.tolist(), strict=True)}
        exact = np.zeros(len(c.docs))
        for r in rows:
            i, t, tf = at[int(r["id"])], index[r["lexeme"]], float(r["tf"])
            exact[i] += float(p.weights[t]) * tf / (tf + p.kc + p.kl * c.length[i])
        c.lower[which] = exact[which]
        c.seen[which] = True


@dataclass
class _Candidates:
    """Documents that may make the top k: lower bounds of their scores (their scores, once
    seen in every term that still has postings not read) and the terms they were seen in."""

    docs: np.ndarray
    lower: np.ndarray
    seen: np.ndarray
    length: np.ndarray

    def take(self, keep: np.ndarray) -> _Candidates:
        return _Candidates(self.docs[keep], self.lower[keep], self.seen[keep], self.length[keep])

    def absorb(self, t: int, batch: _Batch) -> None:
        """Add the postings of term `t` not read before; `t` is then read to its end."""
        where = np.searchsorted(self.docs, batch.doc)
        hit = where < len(self.docs)
        hit[hit] = self.docs[where[hit]] == batch.doc[hit]
        self.lower += np.bincount(where[hit], weights=batch.score[hit], minlength=len(self.docs))
        self.seen[:, t] = True


def _group(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of `doc`, sorted, and each element's index among them (what
    np.unique(return_inverse=True) gives), by counting when the ids are dense enough."""
    if len(doc) == 0:
        return doc, doc.astype(np.intp)
    lo, hi = int(doc.min()), int(doc.max())
    span = hi - lo + 1
    if span > 8 * len(doc) + 65536:
        docs, inverse = np.unique(doc, return_inverse=True)
        return docs, inverse
    present = np.zeros(span, dtype=bool)
    present[doc - lo] = True
    compact = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, compact[doc - lo]


# --- compaction ----------------------------------------------------------------------------


@dataclass
class Compaction:
    """What one compaction run did."""

    collections: int = 0
    terms: int = 0
    postings: int = 0
    seconds: float = 0.0
    busy: bool = False  # another process was compacting: this run did nothing

    def to_json(self) -> dict[str, Any]:
        return {
            "collections": self.collections,
            "terms": self.terms,
            "postings": self.postings,
            "seconds": round(self.seconds, 3),
            "busy": self.busy,
        }


def merges(segments: Sequence[tuple[int, bool, int]]) -> list[int]:
    """Which of a term's segments, given as (segment, sorted, size), to merge into one.

    Every unsorted segment (what writes appended since), with the sorted ones from the
    smallest up while each weighs at most _MERGE_RATIO times what is merged so far: segment
    sizes grow geometrically, so a posting is rewritten a logarithmic number of times and a
    term keeps a few sorted segments, not one per write."""
    chosen = [seg for seg, is_sorted, _ in segments if not is_sorted]
    if not chosen:
        return []
    weight = sum(size for _, is_sorted, size in segments if not is_sorted)
    for seg, _, size in sorted((s for s in segments if s[1]), key=lambda s: s[2]):
        if size > _MERGE_RATIO * weight:
            break
        chosen.append(seg)
        weight += size
    return chosen


async def compact(app: App, collection_id: int | None = None) -> Compaction:
    """Merge the segments that writes appended into sorted ones, for every collection whose
    statistics changed (or one), in transactions of about _MERGE_BATCH postings. One process
    compacts at a time (an advisory lock); searches stay exact meanwhile."""
    started = time.perf_counter()
    report = Compaction()
    store = app.store
    q = queries.load("bm25.sql", app.settings.db_schema)
    if collection_id is None:
        targets = [int(r["id"]) for r in await store.fetch_sql(q["dirty"], {})]
    else:
        targets = [collection_id]
    for target in targets:
        rows = await store.fetch_sql(q["segments"], {"collection": target})
        by_term: dict[str, list[tuple[int, bool, int]]] = {}
        for r in rows:
            by_term.setdefault(r["lexeme"], []).append(
                (int(r["segment"]), bool(r["sorted"]), int(r["size"]))
            )
        batch: list[tuple[str, int]] = []
        weight = 0
        for lexeme, segments in by_term.items():
            chosen = merges(segments)
            sizes = {seg: size for seg, _, size in segments}
            batch += [(lexeme, seg) for seg in chosen]
            weight += sum(sizes[s] for s in chosen)
            report.terms += 1 if chosen else 0
            if weight >= _MERGE_BATCH:
                if not await _merge(app, q, target, batch, report):
                    return report
                batch, weight = [], 0
        if not await _merge(app, q, target, batch, report, fold=True):
            return report
        report.collections += 1
    report.seconds = time.perf_counter() - started
    if report.postings:
        log.info("bm25 compaction: %s", report.to_json())
    return report


async def _merge(
    app: App,
    q: dict[str, str],
    collection_id: int,
    batch: list[tuple[str, int]],
    report: Compaction,
    *,
    fold: bool = False,
) -> bool:
    """One transaction of merges (and the totals folded); False if another compactor holds
    the lock."""
    pool = app.store.pool
    assert pool is not None
    with db.translated():
        async with pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                q["compaction_lock"], {"namespace": LOCK_NAMESPACE, "duty": COMPACTION_LOCK}
            )
            row = await cur.fetchone()
            if not (row and row["mine"]):
                report.busy = True
                return False
            if batch:
                await cur.execute(
                    q["merge"],
                    {
                        "collection": collection_id,
                        "lexemes": [lexeme for lexeme, _ in batch],
                        "segments": [seg for _, seg in batch],
                    },
                )
                row = await cur.fetchone()
                report.postings += int(row["written"]) if row else 0
            if fold:
                await cur.execute(q["fold_totals"], {"collection": collection_id})
    await asyncio.sleep(0)  # let searches and writes in between
    return True
