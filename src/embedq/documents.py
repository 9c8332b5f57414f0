"""Collections and their documents: create, write, delete, read, switch model.

    async with embedq.App() as app:
        articles = await app.collections.create("articles")          # local model, 384 dims
        await articles.upsert("a-1", "Postgres is a database.", title="PG", metadata={"lang": "en"})
        hits = await articles.search("what is postgres", k=5)

A write hashes the content; the same content again changes nothing; new content bumps the
document's version and enqueues one `embedq.embed` job for it *in the same transaction*
(pass `connection=` to use the caller's). The job's dedup key is the document, so a burst of
rewrites leaves one pending job, which embeds the newest version (`pipeline.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from embedq import bm25, db, queries
from embedq.errors import (
    CollectionExists,
    CollectionNotFound,
    ConfigurationError,
    DocumentNotFound,
    EmbedqError,
    InvalidDocument,
    ModelMismatch,
)
from embedq.fusion import FusionOptions
from embedq.jobs import JobSpec
from embedq.providers import DEFAULT_MODELS, ProviderConfig

if TYPE_CHECKING:
    from embedq.app import App
    from embedq.evaluate import EvalReport, Judged
    from embedq.search import SearchHit

EMBED_TASK = "embedq.embed"
EMBED_QUEUE = "embed"
WRITE_PRIORITY = 10  # fresh writes go before backfills and model switches
BACKFILL_PRIORITY = 0
MAX_KEY_CHARS = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_WRITE_BATCH = 1000

# Vector lengths of well-known models, so creating a collection need not call the provider.
KNOWN_DIMENSIONS = {
    ("local", "all-MiniLM-L6-v2"): 384,
    ("local", "sentence-transformers/all-MiniLM-L6-v2"): 384,
    ("openai", "text-embedding-3-small"): 1536,
    ("openai", "text-embedding-3-large"): 3072,
    ("openai", "text-embedding-ada-002"): 1536,
    ("ollama", "nomic-embed-text"): 768,
    ("ollama", "mxbai-embed-large"): 1024,
    ("ollama", "all-minilm"): 384,
}
DISTANCES = ("cosine", "l2", "ip")
Change = Literal["created", "updated", "metadata", "unchanged"]


@dataclass(frozen=True)
class Space:
    """One embedding model of a collection (its vector space)."""

    id: int
    collection_id: int
    state: str
    config: ProviderConfig
    dimensions: int

    @property
    def model_key(self) -> str:
        return model_key(self.config, self.dimensions)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Space:
        return cls(
            id=int(row["id"]),
            collection_id=int(row["collection_id"]),
            state=str(row["state"]),
            config=ProviderConfig.from_json(row["config"]),
            dimensions=int(row["dimensions"]),
        )


@dataclass(frozen=True)
class DocumentInput:
    """A document to write: `key` is its identity within the collection."""

    key: str
    text: str
    title: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    """What one write did: `created`, `updated` (new version, job enqueued), `metadata`
    (metadata only, no new version) or `unchanged`."""

    key: str
    change: Change
    document_id: int
    version: int
    job_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "change": self.change,
            "document_id": self.document_id,
            "version": self.version,
            "job_id": self.job_id,
        }


@dataclass(frozen=True)
class Document:
    """A stored document and where its embedding stands."""

    id: int
    key: str
    title: str | None
    text: str
    metadata: dict[str, Any]
    version: int
    status: str
    error: str | None
    chunks: int
    created_at: datetime
    updated_at: datetime
    embedded_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("created_at", "updated_at", "embedded_at"):
            out[k] = out[k].isoformat() if out[k] else None
        return out


def model_key(config: ProviderConfig, dimensions: int) -> str:
    """The identity of a vector space for the cache: provider, model and vector length."""
    return f"{config.provider}:{config.model}:{dimensions}"


def content_hash(title: str | None, text: str) -> bytes:
    return hashlib.sha256(f"{title or ''}\x00{text}".encode()).digest()


def index_name(space_id: int) -> str:
    return f"chunks_space_{space_id}_hnsw"


def vector_cast(dimensions: int) -> sql.Composable:
    """The cast a space's chunks are indexed and searched under. HNSW indexes `vector` up to
    2,000 dimensions and `halfvec` up to 4,000, so longer models index half precision."""
    kind = "vector" if dimensions <= 2000 else "halfvec"
    return sql.SQL("{}({})").format(sql.SQL(kind), sql.Literal(dimensions))


def drop_index(schema: str, space_id: int) -> sql.Composed:
    """The statement that removes a space's HNSW index (with the space, or after a switch)."""
    return sql.SQL("DROP INDEX IF EXISTS {}.{}").format(
        sql.Identifier(schema), sql.Identifier(index_name(space_id))
    )


_OPCLASS = {
    ("vector", "cosine"): "vector_cosine_ops",
    ("vector", "l2"): "vector_l2_ops",
    ("vector", "ip"): "vector_ip_ops",
    ("halfvec", "cosine"): "halfvec_cosine_ops",
    ("halfvec", "l2"): "halfvec_l2_ops",
    ("halfvec", "ip"): "halfvec_ip_ops",
}


def validate_document(doc: DocumentInput, max_chars: int) -> DocumentInput:
    """The document, checked; InvalidDocument naming the field and the fix otherwise."""
    if not isinstance(doc.key, str) or not doc.key.strip():
        raise InvalidDocument("a document key must be a non-empty string")
    if len(doc.key) > MAX_KEY_CHARS or "\x00" in doc.key:
        raise InvalidDocument(
            f"document key {doc.key[:40]!r}... is invalid: at most {MAX_KEY_CHARS} characters, "
            "no NUL bytes"
        )
    if not isinstance(doc.text, str):
        raise InvalidDocument(f"document {doc.key!r}: text must be a string")
    if doc.title is not None and not isinstance(doc.title, str):
        raise InvalidDocument(f"document {doc.key!r}: title must be a string or null")
    if "\x00" in doc.text or (doc.title and "\x00" in doc.title):
        raise InvalidDocument(f"document {doc.key!r}: text contains NUL bytes (binary data?)")
    if len(doc.text) > max_chars:
        raise InvalidDocument(
            f"document {doc.key!r} has {len(doc.text):,} characters, more than "
            f"max_document_chars ({max_chars:,}); split it or raise the setting"
        )
    if not isinstance(doc.metadata, Mapping):
        raise InvalidDocument(f"document {doc.key!r}: metadata must be a JSON object")
    try:
        json.dumps(dict(doc.metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidDocument(
            f"document {doc.key!r}: metadata is not JSON-serialisable ({exc})"
        ) from None
    if "\\u0000" in json.dumps(dict(doc.metadata)):
        raise InvalidDocument(f"document {doc.key!r}: metadata contains NUL characters")
    return doc


class Collections:
    """The collections of an app (`app.collections`)."""

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def q(self) -> dict[str, str]:
        return queries.load("documents.sql", self.app.settings.db_schema)

    async def create(
        self,
        name: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        dimensions: int | None = None,
        distance: str | None = None,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
        title_prefix: bool = False,
        language: str = "english",
        base_url: str | None = None,
        fallback_urls: Sequence[str] = (),
        options: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        bm25_k1: float | None = None,
        bm25_b: float | None = None,
        fusion: str | None = None,
        alpha: float | None = None,
        rrf_k: int | None = None,
    ) -> Collection:
        """Create a collection; its vector length is probed from the provider if not given.
        `bm25_k1`/`bm25_b` tune keyword search, `fusion`/`alpha`/`rrf_k` hybrid search's
        default (docs/search.md)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidDocument(
                f"collection name {name!r} is invalid: 1-63 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if distance is not None and distance not in DISTANCES:
            raise InvalidDocument(f"distance {distance!r} is invalid: use {', '.join(DISTANCES)}")
        s = self.app.settings
        config = provider_config(
            s, provider, model, dimensions, base_url, fallback_urls, options or {}
        )
        k1, b = check_bm25(bm25_k1, bm25_b)
        fused = FusionOptions().replace(fusion, alpha, rrf_k)
        size = chunk_size or default_chunk_size(config)
        overlap = chunk_overlap if chunk_overlap is not None else max(0, size // 8)
        if not (16 <= size <= 8192) or not (0 <= overlap < size):
            raise InvalidDocument(
                f"chunking {size}/{overlap} is invalid: chunk_size from 16 to 8192 tokens and "
                "0 <= chunk_overlap < chunk_size"
            )
        if exist_ok:
            with contextlib.suppress(CollectionNotFound):
                existing = await self.get(name)
                existing.check_same_model(config)
                asked = {
                    "distance": distance,
                    "chunk_size": chunk_size,
                    "chunk_overlap": chunk_overlap,
                    "title_prefix": title_prefix or None,
                }
                differ = [
                    f"{k} {getattr(existing, k)!r} (asked {v!r})"
                    for k, v in asked.items()
                    if v is not None and v != getattr(existing, k)
                ]  # fmt: skip
                if differ:
                    raise CollectionExists(
                        f"collection {name!r} exists with other settings: {', '.join(differ)}; "
                        "drop it first, or create it under another name"
                    )
                return existing
        distance = distance or "cosine"
        dims = await probe_dimensions(config, s)
        _check_requested(config, dimensions, dims)
        pool = self.app.store.pool
        assert pool is not None
        async with pool.connection() as conn:
            try:
                with db.translated():
                    async with conn.transaction():
                        cur = conn.cursor(row_factory=dict_row)
                        await cur.execute(
                            self.q["create_collection"],
                            {
                                "name": name,
                                "distance": distance,
                                "chunk_size": size,
                                "chunk_overlap": overlap,
                                "title_prefix": title_prefix,
                                "language": language,
                                "bm25_k1": k1,
                                "bm25_b": b,
                                "fusion": fused.fusion,
                                "fusion_alpha": fused.alpha,
                                "rrf_k": fused.rrf_k,
                            },
                        )
                        row = await cur.fetchone()
                        assert row is not None
                        await self._create_space(
                            conn, int(row["id"]), config, dims, "active", distance
                        )
            except EmbedqError as exc:
                if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                    raise CollectionExists(f"collection {name!r} already exists") from None
                if isinstance(exc.__cause__, psycopg.errors.UndefinedObject):
                    raise InvalidDocument(
                        f"language {language!r} is not a PostgreSQL text search configuration "
                        "(try 'english', 'simple', 'german', ...)"
                    ) from None
                raise
        return await self.get(name)

    async def _create_space(
        self,
        conn: Any,
        collection_id: int,
        config: ProviderConfig,
        dims: int,
        state: str,
        distance: str,
    ) -> int:
        """Record a space and build its HNSW index (empty, so instant)."""
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            self.q["create_space"],
            {
                "collection": collection_id,
                "state": state,
                "provider": config.provider,
                "model": config.model,
                "model_key": model_key(config, dims),
                "dimensions": dims,
                "config": json.dumps(config.to_json()),
            },
        )
        row = await cur.fetchone()
        space_id = int(row["id"])
        if dims <= 4000:
            kind = "vector" if dims <= 2000 else "halfvec"
            await conn.execute(
                sql.SQL(
                    "CREATE INDEX {} ON {}.chunks USING hnsw (({}::{}) {}) "
                    "WITH (m = {}, ef_construction = {}) WHERE space_id = {}"
                ).format(
                    sql.Identifier(index_name(space_id)),
                    sql.Identifier(self.app.settings.db_schema),
                    sql.Identifier("embedding"),
                    vector_cast(dims),
                    sql.SQL(_OPCLASS[kind, distance]),
                    sql.Literal(self.app.settings.hnsw_m),
                    sql.Literal(self.app.settings.hnsw_ef_construction),
                    sql.Literal(space_id),
                )
            )
        return space_id

    async def list(self) -> list[Collection]:
        rows = await self.app.store.fetch_sql(self.q["collections"], {"name": None, "counts": True})
        return [Collection.from_row(self.app, r) for r in rows]

    async def get(self, name: str, *, counts: bool = True) -> Collection:
        """The collection `name`; `counts=False` skips counting its documents by status
        (a scan of them all), for callers that only write or search."""
        rows = await self.app.store.fetch_sql(
            self.q["collections"], {"name": name, "counts": counts}
        )
        if not rows:
            known = ", ".join(c.name for c in await self.list()) or "none yet"
            raise CollectionNotFound(
                f"no collection named {name!r} (known: {known}); create it with "
                f"`embedq collection create {name}`"
            )
        return Collection.from_row(self.app, rows[0])

    async def drop(self, name: str) -> bool:
        """Remove a collection, its documents, chunks, indexes and pending embed jobs."""
        try:
            col = await self.get(name)
        except CollectionNotFound:
            return False
        spaces = [s for s in (col.active, col.building) if s is not None]
        spaces += await col.retired_spaces()
        pool = self.app.store.pool
        assert pool is not None
        async with pool.connection() as conn:
            with db.translated():
                async with conn.transaction():
                    await conn.execute(self.q["cancel_collection_jobs"], {"collection": col.id})
                    await conn.execute(self.q["drop_collection"], {"name": name})
                    for space in spaces:
                        await conn.execute(drop_index(self.app.settings.db_schema, space.id))
        return True


@dataclass(frozen=True)
class Collection:
    """A collection: documents sharing one chunking and one embedding model."""

    app: App = field(repr=False, compare=False)
    id: int
    name: str
    distance: str
    chunk_size: int
    chunk_overlap: int
    title_prefix: bool
    language: str
    active: Space
    building: Space | None
    counts: dict[str, int]
    created_at: datetime
    bm25_k1: float
    bm25_b: float
    fusion: FusionOptions

    @classmethod
    def from_row(cls, app: App, row: Mapping[str, Any]) -> Collection:
        return cls(
            app=app,
            id=int(row["id"]),
            name=row["name"],
            distance=row["distance"],
            chunk_size=int(row["chunk_size"]),
            chunk_overlap=int(row["chunk_overlap"]),
            title_prefix=bool(row["title_prefix"]),
            language=row["language"],
            active=Space.from_row(row["active"]),
            building=Space.from_row(row["building"]) if row["building"] else None,
            counts={k: int(v) for k, v in (row["counts"] or {}).items()},
            created_at=row["created_at"],
            bm25_k1=float(row["bm25_k1"]),
            bm25_b=float(row["bm25_b"]),
            fusion=FusionOptions(row["fusion"], float(row["fusion_alpha"]), int(row["rrf_k"])),
        )

    @property
    def q(self) -> dict[str, str]:
        return queries.load("documents.sql", self.app.settings.db_schema)

    def to_json(self) -> dict[str, Any]:
        def space(s: Space | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {
                "id": s.id,
                "provider": s.config.provider,
                "model": s.config.model,
                "dimensions": s.dimensions,
                "base_url": s.config.base_url,
                "fallback_urls": list(s.config.fallback_urls),
            }

        return {
            "name": self.name,
            "provider": self.active.config.provider,
            "model": self.active.config.model,
            "dimensions": self.active.dimensions,
            "distance": self.distance,
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "title_prefix": self.title_prefix,
            "language": self.language,
            "active": space(self.active),
            "building": space(self.building),
            "documents": self.counts,
            "created_at": self.created_at.isoformat(),
            "search": {"bm25_k1": self.bm25_k1, "bm25_b": self.bm25_b, **self.fusion.to_json()},
        }

    def check_same_model(self, config: ProviderConfig) -> None:
        """Refuse a different model outside a model switch: vectors of two models must never
        share an index."""
        cur = self.active.config
        if (config.provider, config.model) != (cur.provider, cur.model) or (
            config.dimensions is not None and config.dimensions != self.active.dimensions
        ):
            raise ModelMismatch(
                f"collection {self.name!r} embeds with {cur.provider}/{cur.model} "
                f"({self.active.dimensions} dims), not {config.provider}/{config.model}; "
                f"change it with `embedq collection set-model {self.name} --provider "
                f"{config.provider} --model {config.model}` (a model switch)"
            )

    # --- writing -------------------------------------------------------------------------

    async def upsert(
        self,
        key: str,
        text: str,
        *,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        connection: Any = None,
    ) -> WriteResult:
        """Write one document (see the module docstring)."""
        [result] = await self.upsert_many(
            [DocumentInput(key, text, title, metadata or {})], connection=connection
        )
        return result

    async def upsert_many(
        self,
        docs: Iterable[DocumentInput | Mapping[str, Any]],
        *,
        connection: Any = None,
        priority: int = WRITE_PRIORITY,
    ) -> list[WriteResult]:
        """Write many documents in one transaction (the caller's with `connection=`); one
        result per input, in order. A key given twice: the last one wins."""
        limit = self.app.settings.max_document_chars
        items = [validate_document(_as_input(d), limit) for d in docs]
        if not items:
            return []
        async with self._transaction(connection) as conn:
            results: dict[str, WriteResult] = {}
            latest = {d.key: d for d in items}
            unique = sorted(latest.values(), key=lambda d: d.key.encode())  # lock order
            for i in range(0, len(unique), _WRITE_BATCH):
                part = unique[i : i + _WRITE_BATCH]
                for r in await self._write(conn, part, priority):
                    results[r.key] = r
        return [results[d.key] for d in items]

    async def _write(
        self, conn: Any, docs: list[DocumentInput], priority: int
    ) -> list[WriteResult]:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            self.q["upsert_documents"],
            {
                "collection": self.id,
                "language": self.language,
                "keys": [d.key for d in docs],
                "titles": [d.title for d in docs],
                "bodies": [d.text for d in docs],
                "metadata": [json.dumps(dict(d.metadata)) for d in docs],
                "hashes": [content_hash(d.title, d.text) for d in docs],
            },
        )
        changed = {r["key"]: r for r in await cur.fetchall()}
        embed = [r for r in changed.values() if r["last_change"] != "metadata"]
        tickets = await self.app.store.enqueue(
            [self.embed_spec(int(r["id"]), int(r["version"]), priority) for r in embed],
            conn=conn,
        )
        job_ids = {int(r["id"]): t.id for r, t in zip(embed, tickets, strict=True)}
        out = [
            WriteResult(
                key=r["key"],
                change=r["last_change"],
                document_id=int(r["id"]),
                version=int(r["version"]),
                job_id=job_ids.get(int(r["id"])),
            )
            for r in changed.values()
        ]
        same = [d.key for d in docs if d.key not in changed]
        if same:
            await cur.execute(self.q["existing_versions"], {"collection": self.id, "keys": same})
            out += [
                WriteResult(r["key"], "unchanged", int(r["id"]), int(r["version"]))
                for r in await cur.fetchall()
            ]
        return out

    def embed_spec(self, document_id: int, version: int, priority: int) -> JobSpec:
        return JobSpec(
            EMBED_TASK,
            {"collection": self.id, "document": document_id, "version": version},
            queue=EMBED_QUEUE,
            priority=priority,
            max_attempts=self.app.settings.embed_max_attempts,
            dedup_key=f"embed:{document_id}",
        )

    async def delete(self, *keys: str, connection: Any = None) -> list[str]:
        """Delete documents (their chunks go with them); returns the keys that existed."""
        async with self._transaction(connection) as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                self.q["delete_documents"], {"collection": self.id, "keys": list(keys)}
            )
            return [r["key"] for r in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def _transaction(self, connection: Any) -> AsyncIterator[Any]:
        if connection is not None:
            if not isinstance(connection, psycopg.AsyncConnection):
                raise InvalidDocument("connection= must be a psycopg.AsyncConnection")
            with db.translated():
                if connection.autocommit:
                    async with connection.transaction():
                        yield connection
                else:
                    yield connection  # the caller's transaction: it commits or rolls back
            return
        pool = self.app.store.pool
        assert pool is not None
        with db.translated():
            async with pool.connection() as conn, conn.transaction():
                yield conn

    # --- reading -------------------------------------------------------------------------

    async def get(self, key: str) -> Document:
        rows = await self.app.store.fetch_sql(
            self.q["get_document"], {"collection": self.id, "key": key}
        )
        if not rows:
            raise DocumentNotFound(f"no document {key!r} in collection {self.name!r}")
        r = rows[0]
        return Document(
            id=int(r["id"]),
            key=r["key"],
            title=r["title"],
            text=r["body"],
            metadata=r["metadata"],
            version=int(r["version"]),
            status=r["status"],
            error=r["error"],
            chunks=int(r["chunks"]),
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            embedded_at=r["embedded_at"],
        )

    async def documents(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await self.app.store.fetch_sql(
            self.q["list_documents"], {"collection": self.id, "status": status, "limit": limit}
        )

    async def search(
        self,
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
        """Search the collection; see `search.py` for modes, fusion, query and filter
        syntax."""
        from embedq.search import search

        return await search(
            self,
            query,
            mode=mode,
            k=k,
            filters=filters,
            fusion=fusion,
            alpha=alpha,
            rrf_k=rrf_k,
            literal=literal,
        )

    async def evaluate(
        self,
        judged: Judged,
        *,
        modes: Sequence[str] = ("semantic", "keyword", "hybrid"),
        k: int = 100,
        alpha_sweep: bool = False,
    ) -> EvalReport:
        """Search quality on judged queries: nDCG@10, recall@k, MRR@10 per mode
        (`evaluate.py`; load BEIR files with `embedq.evaluate.load_judged`)."""
        from embedq.evaluate import evaluate

        return await evaluate(self, judged, modes=modes, k=k, alpha_sweep=alpha_sweep)

    async def set_search_options(
        self,
        *,
        bm25_k1: float | None = None,
        bm25_b: float | None = None,
        fusion: str | None = None,
        alpha: float | None = None,
        rrf_k: int | None = None,
    ) -> Collection:
        """Change the collection's keyword parameters or hybrid search's default fusion
        (None keeps a value). New k1 or b re-sort its postings at the next compaction."""
        check_bm25(bm25_k1, bm25_b, required=False)
        self.fusion.replace(fusion, alpha, rrf_k)  # checks them
        await self.app.store.fetch_sql(
            self.q["set_search_options"],
            {
                "collection": self.id,
                "bm25_k1": bm25_k1,
                "bm25_b": bm25_b,
                "fusion": fusion,
                "fusion_alpha": alpha,
                "rrf_k": rrf_k,
            },
        )
        return await self.with_fresh_state()

    # --- model switch --------------------------------------------------------------------

    async def retired_spaces(self) -> list[Space]:
        rows = await self.app.store.fetch_sql(self.q["retired_spaces"], {"collection": self.id})
        return [Space.from_row(r) for r in rows]

    async def progress(self, space: Space | None = None) -> tuple[int, int]:
        """(documents held at their current version, documents) for a space (default: the
        one building, else the active one)."""
        space = space or self.building or self.active
        [row] = await self.app.store.fetch_sql(
            self.q["space_progress"], {"collection": self.id, "space": space.id}
        )
        return int(row["done"]), int(row["documents"])

    async def set_model(
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        dimensions: int | None = None,
        base_url: str | None = None,
        fallback_urls: Sequence[str] = (),
        options: Mapping[str, Any] | None = None,
    ) -> Space:
        """Start a model switch: a new space is built beside the active one (every document
        re-embedded at low priority); search keeps using the old model until the new one
        holds every document, then switches atomically (`pipeline.py`)."""
        s = self.app.settings
        config = provider_config(
            s,
            provider or self.active.config.provider,
            model,
            dimensions,
            base_url,
            fallback_urls,
            options or {},
        )
        if self.building is not None:
            raise ModelMismatch(
                f"collection {self.name!r} is already switching to "
                f"{self.building.config.provider}/{self.building.config.model}; wait for it "
                "to finish (`embedq collection show`)"
            )
        dims = await probe_dimensions(config, s)
        _check_requested(config, dimensions, dims)
        if model_key(config, dims) == self.active.model_key:
            raise ModelMismatch(
                f"collection {self.name!r} already embeds with {config.provider}/"
                f"{config.model}; to change only its endpoint, use --base-url/--fallback-url "
                "with the same model"
            )
        pool = self.app.store.pool
        assert pool is not None
        async with pool.connection() as conn:
            with db.translated():
                async with conn.transaction():
                    space_id = await Collections(self.app)._create_space(
                        conn, self.id, config, dims, "building", self.distance
                    )
        space = Space(space_id, self.id, "building", config, dims)
        await self.enqueue_stale(space)
        return space

    async def enqueue_stale(self, space: Space, priority: int = BACKFILL_PRIORITY) -> int:
        """Enqueue embed jobs for every document `space` lacks at its current version."""
        after, total = 0, 0
        while True:
            rows = await self.app.store.fetch_sql(
                self.q["stale_documents"],
                {"collection": self.id, "space": space.id, "after": after, "limit": 5000},
            )
            if not rows:
                break
            specs = [self.embed_spec(int(r["id"]), int(r["version"]), priority) for r in rows]
            await self.app.store.enqueue(specs)
            total += len(rows)
            after = int(rows[-1]["id"])
        if total == 0 and space.state == "building":
            from embedq.pipeline import finish_switch

            await finish_switch(self.app, self.id, space.id)
        return total

    async def with_fresh_state(self) -> Collection:
        return await Collections(self.app).get(self.name)


def _as_input(d: DocumentInput | Mapping[str, Any]) -> DocumentInput:
    if isinstance(d, DocumentInput):
        return d
    if not isinstance(d, Mapping):
        raise InvalidDocument(f"a document must be an object with key and text, not {d!r:.60}")
    unknown = set(d) - {"key", "text", "title", "metadata"}
    if unknown:
        raise InvalidDocument(
            f"document {d.get('key')!r}: unknown fields {sorted(unknown)}; use key, text, "
            "title, metadata"
        )
    if "key" not in d or "text" not in d:
        raise InvalidDocument(f"document {d.get('key')!r}: needs both 'key' and 'text'")
    return DocumentInput(
        key=d["key"], text=d["text"], title=d.get("title"), metadata=d.get("metadata") or {}
    )


def provider_config(
    settings: Any,
    provider: str | None,
    model: str | None,
    dimensions: int | None,
    base_url: str | None,
    fallback_urls: Sequence[str],
    options: Mapping[str, Any],
) -> ProviderConfig:
    """A ProviderConfig from explicit choices, falling back on settings then defaults."""
    name = provider or settings.embedding_provider
    if name not in DEFAULT_MODELS:
        raise ConfigurationError(
            f"unknown provider {name!r}; choose one of {', '.join(DEFAULT_MODELS)}"
        )
    chosen = model or (settings.embedding_model if name == settings.embedding_provider else None)
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidDocument(f"dimensions must be a positive integer, not {dimensions!r}")
    known = {"rpm", "tpm", "max_batch", "max_batch_tokens"}
    extra = dict(options)
    config = ProviderConfig(
        provider=name,
        model=chosen or DEFAULT_MODELS[name],
        base_url=base_url,
        fallback_urls=tuple(fallback_urls),
        dimensions=dimensions if name in ("openai", "fake") else None,
        max_batch=_int_option(extra, "max_batch"),
        max_batch_tokens=_int_option(extra, "max_batch_tokens"),
        requests_per_minute=_int_option(extra, "rpm"),
        tokens_per_minute=_int_option(extra, "tpm"),
        options={k: v for k, v in extra.items() if k not in known},
    )
    return config


def check_bm25(k1: Any, b: Any, *, required: bool = True) -> tuple[float, float]:
    """BM25's k1 (0 to 10) and b (0 to 1), checked; the defaults for None when `required`."""
    for name, value, high in (("bm25_k1", k1, 10), ("bm25_b", b, 1)):
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (0 <= value <= high)
        ):
            raise InvalidDocument(f"{name} must be a number from 0 to {high}, not {value!r}")
    if not required:
        return (k1, b)
    return (
        float(bm25.DEFAULT_K1 if k1 is None else k1),
        float(bm25.DEFAULT_B if b is None else b),
    )


def _check_requested(config: ProviderConfig, requested: int | None, dims: int) -> None:
    """Only some providers can shorten vectors; elsewhere --dimensions must be the model's."""
    if requested is not None and requested != dims:
        raise ConfigurationError(
            f"{config.provider}/{config.model} makes {dims}-dimensional vectors; "
            f"--dimensions {requested} cannot change that (only OpenAI text-embedding-3 models "
            "shorten vectors). Leave --dimensions out."
        )


def _int_option(options: Mapping[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidDocument(f"provider option {name}={value!r} must be an integer") from None
    if number < 1:
        raise InvalidDocument(f"provider option {name}={value!r} must be positive")
    return number


def default_chunk_size(config: ProviderConfig) -> int:
    """all-MiniLM-L6-v2 reads at most 256 tokens; API models take far more, but retrieval
    works best with passages of a few hundred tokens."""
    return 200 if config.provider in ("local", "fake") else 400


async def probe_dimensions(config: ProviderConfig, settings: Any) -> int:
    """The vector length of a model: given, well known, or asked of the provider."""
    if config.dimensions:
        return config.dimensions
    known = KNOWN_DIMENSIONS.get((config.provider, config.model))
    if known:
        return known
    from embedq.providers import make_provider

    provider = make_provider(config, settings)
    try:
        dims = await provider.dimensions()
    except EmbedqError as exc:
        raise ConfigurationError(
            f"cannot learn the vector length of {config.provider}/{config.model}: {exc}. "
            "Fix the provider, or give --dimensions"
        ) from None
    finally:
        await provider.close()
    if not isinstance(dims, int) or dims < 1:
        raise ConfigurationError(f"{config.provider}/{config.model} reported {dims!r} dimensions")
    return dims


__all__ = [
    "Collection",
    "Collections",
    "Document",
    "DocumentInput",
    "Space",
    "WriteResult",
]
