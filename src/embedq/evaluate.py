"""Measure a collection's search quality on judged queries, in BEIR's formats.

    judged = load_judged(Path("queries.jsonl"), Path("qrels/test.tsv"))
    report = await collection.evaluate(judged, modes=("keyword", "hybrid"), alpha_sweep=True)
    report.modes["hybrid"].ndcg_10

Queries are JSON lines `{"_id": ..., "text": ...}`; relevance judgements (qrels) a TSV with a
header and rows `query-id  corpus-id  score` (score > 0: relevant, its value the gain). Per
mode: nDCG@10 (trec_eval's: gain = score, discount log2(rank + 1), ideal from the judged
documents), recall@k, MRR@10, the queries that found nothing, and latency. As BEIR does, a hit
whose key equals the query's id is skipped (in corpora such as ArguAna the queries are
documents too), a judged document missing from the collection still counts as relevant, and
queries are plain text (`literal=True`: their quotes are citations, not phrase syntax).

With an alpha sweep, both legs are run once per query and fused at alpha 0, 0.05, ..., 1
(convex fusion): the best alpha, its nDCG@10, and the gain over the collection's default.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedq import queries as sql_queries
from embedq.errors import InvalidDocument
from embedq.fusion import FusionOptions, fuse, ranked
from embedq.search import MODES, run_legs, snapshot

if TYPE_CHECKING:
    from embedq.documents import Collection

ALPHAS = tuple(round(i * 0.05, 2) for i in range(21))


@dataclass(frozen=True)
class Judged:
    """Judged queries: their texts, and per query the relevant documents with their gain."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    unknown_queries: int = 0  # judged query ids with no text in the queries file

    @property
    def evaluated(self) -> list[str]:
        """The queries that are both judged and known, in the qrels' order."""
        return [q for q in self.qrels if q in self.queries]


def load_judged(queries_path: Path, qrels_path: Path) -> Judged:
    """Read a BEIR queries file and qrels file; InvalidDocument names the file, the line and
    the problem."""
    texts = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    unknown = sum(1 for q in qrels if q not in texts)
    return Judged(texts, qrels, unknown)


def load_queries(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidDocument(
                f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise InvalidDocument(f"{path} line {number}: expected a JSON object")
        qid, text = record.get("_id"), record.get("text")
        if not isinstance(qid, str | int) or isinstance(qid, bool) or str(qid) == "":
            raise InvalidDocument(f'{path} line {number}: "_id" is missing or not a string')
        if not isinstance(text, str) or not text.strip():
            raise InvalidDocument(f'{path} line {number}: "text" is missing or empty')
        out[str(qid)] = text
    if not out:
        raise InvalidDocument(f"{path} holds no queries (JSON lines with _id and text)")
    return out


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    lines = _lines(path)
    for number, line in enumerate(lines, start=1):
        cells = line.rstrip("\r\n").split("\t")
        if not line.strip():
            continue
        if number == 1 and cells[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # the header
        if len(cells) != 3:
            raise InvalidDocument(
                f"{path} line {number}: expected 3 tab-separated columns (query-id, "
                f"corpus-id, score), found {len(cells)}"
            )
        qid, doc, grade = (c.strip() for c in cells)
        try:
            score = int(grade)
        except ValueError:
            raise InvalidDocument(
                f"{path} line {number}: score {grade!r} is not an integer"
            ) from None
        if not qid or not doc:
            raise InvalidDocument(f"{path} line {number}: empty query-id or corpus-id")
        if score > 0:
            out.setdefault(qid, {})[doc] = score
    if not out:
        raise InvalidDocument(f"{path} holds no relevance judgements with a score above 0")
    return out


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidDocument(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InvalidDocument(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise InvalidDocument(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InvalidDocument(f"cannot read {path}: {exc.strerror}") from None


# --- metrics -------------------------------------------------------------------------------


def ndcg(ranking: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranking: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    return len(set(ranking[:k]) & set(relevant)) / len(relevant) if relevant else 0.0


def mrr(ranking: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranking[:k]):
        if d in relevant:
            return 1.0 / (i + 1)
    return 0.0


@dataclass
class ModeReport:
    """The quality and speed of one search mode over the judged queries."""

    k: int
    ndcg_10: float = 0.0
    recall_k: float = 0.0
    mrr_10: float = 0.0
    no_hit: int = 0
    latencies: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "ndcg@10": round(self.ndcg_10, 4),
            f"recall@{self.k}": round(self.recall_k, 4),
            "mrr@10": round(self.mrr_10, 4),
            "no_hit": self.no_hit,
            "p50_ms": round(_percentile(self.latencies, 0.5) * 1000, 2),
            "p95_ms": round(_percentile(self.latencies, 0.95) * 1000, 2),
        }


@dataclass
class Sweep:
    """nDCG@10 of hybrid search fused by a convex combination at each alpha."""

    ndcg_10: dict[float, float]
    default: float  # the collection's default fusion's nDCG@10

    @property
    def best(self) -> float:
        return max(self.ndcg_10, key=lambda a: (self.ndcg_10[a], -abs(a - 0.5)))

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "best_alpha": best,
            "ndcg@10": round(self.ndcg_10[best], 4),
            "default_ndcg@10": round(self.default, 4),
            "gain": round(self.ndcg_10[best] - self.default, 4),
            "by_alpha": {str(a): round(v, 4) for a, v in self.ndcg_10.items()},
        }


@dataclass
class EvalReport:
    queries: int
    unknown_queries: int
    unknown_documents: int
    modes: dict[str, ModeReport]
    sweep: Sweep | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {mode: r.to_json() for mode, r in self.modes.items()}
        if self.sweep is not None:
            out["alpha_sweep"] = self.sweep.to_json()
        return out


def _percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


# --- evaluation ----------------------------------------------------------------------------


async def evaluate(
    collection: Collection,
    judged: Judged,
    *,
    modes: Sequence[str] = MODES,
    k: int = 100,
    alpha_sweep: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Run every judged query in each mode (see the module docstring); `progress` is called
    with the number of searches done as they finish."""
    for mode in modes:
        if mode not in MODES:
            raise InvalidDocument(f"mode {mode!r} is invalid: use {', '.join(MODES)}")
    if not 10 <= k <= 1000:
        raise InvalidDocument(f"k must be from 10 to 1000 (it bounds recall@k), not {k}")
    fresh = await collection.with_fresh_state()
    if not fresh.counts.get("documents"):
        raise InvalidDocument(
            f"collection {collection.name!r} has no documents: ingest the corpus first "
            f"(embedq ingest corpus.jsonl --collection {collection.name})"
        )
    evaluated = judged.evaluated
    if not evaluated:
        raise InvalidDocument(
            "none of the judged queries is in the queries file: check that both come from "
            "the same dataset"
        )
    unknown_docs = await _unknown_documents(collection, judged, evaluated)
    reports = {m: ModeReport(k) for m in modes}
    sweep_scores: dict[float, list[float]] = {a: [] for a in ALPHAS}
    default_scores: list[float] = []
    done = 0
    for qid in evaluated:
        text, relevant = judged.queries[qid], judged.qrels[qid]
        for mode in modes:
            started = time.perf_counter()
            hits = await collection.search(text, mode=mode, k=min(k + 1, 1000), literal=True)
            reports[mode].latencies.append(time.perf_counter() - started)
            keys = [h.key for h in hits if h.key != qid][:k]
            _score(reports[mode], keys, relevant)
            done += 1
            if progress is not None:
                progress(done)
        if alpha_sweep:
            legs = await _legs(collection, text, k + 1)
            for alpha in ALPHAS:
                keys = legs(FusionOptions("convex", alpha), qid, k)
                sweep_scores[alpha].append(ndcg(keys, relevant))
            default_scores.append(ndcg(legs(collection.fusion, qid, k), relevant))
    n = len(evaluated)
    for r in reports.values():
        r.ndcg_10 /= n
        r.recall_k /= n
        r.mrr_10 /= n
    sweep = None
    if alpha_sweep:
        sweep = Sweep({a: sum(v) / n for a, v in sweep_scores.items()}, sum(default_scores) / n)
    return EvalReport(n, judged.unknown_queries, unknown_docs, reports, sweep)


def _score(report: ModeReport, keys: Sequence[str], relevant: Mapping[str, int]) -> None:
    report.ndcg_10 += ndcg(keys, relevant)
    report.recall_k += recall(keys, relevant, report.k)
    report.mrr_10 += mrr(keys, relevant)
    report.no_hit += 0 if keys else 1


async def _legs(
    collection: Collection, text: str, depth: int
) -> Callable[[FusionOptions, str, int], list[str]]:
    """Both legs of a hybrid search, once; a function that fuses them any way, as keys."""
    async with snapshot(collection) as conn:
        legs = await run_legs(conn, collection, text, "hybrid", max(100, depth), None, literal=True)
        ids = {d for d, _ in (legs.semantic if legs else [])} | {
            d for d, _ in (legs.keyword if legs else [])
        }
        q = sql_queries.load("search.sql", collection.app.settings.db_schema)
        cur = conn.cursor()
        await cur.execute(q["keys"], {"ids": list(ids)})
        key_of = dict(await cur.fetchall())

    def fused(options: FusionOptions, qid: str, k: int) -> list[str]:
        if legs is None:
            return []
        top = ranked(fuse(legs.semantic, legs.keyword, options), k + 1)
        return [key_of[d] for d in top if key_of[d] != qid][:k]

    return fused


async def _unknown_documents(collection: Collection, judged: Judged, evaluated: list[str]) -> int:
    """How many judged documents the collection does not hold."""
    wanted = sorted({d for q in evaluated for d in judged.qrels[q]})
    q = sql_queries.load("search.sql", collection.app.settings.db_schema)
    rows = await collection.app.store.fetch_sql(
        q["existing_keys"], {"collection": collection.id, "keys": wanted}
    )
    return len(wanted) - int(rows[0]["n"])
