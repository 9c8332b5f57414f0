"""Routes of collections, documents (one, bulk, file upload) and search.

A write answers 202 with the document's version and its embed job; `?wait=true&timeout=10`
holds the answer until that version is embedded (read-your-writes), failed, or superseded by
a newer write, and says `timed_out` when the time ran out first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from embedq import ingest
from embedq.api.auth import require
from embedq.api.errors import ApiError
from embedq.documents import Collection, DocumentInput, WriteResult, validate_document
from embedq.errors import InvalidDocument, PermanentProviderError
from embedq.search import MAX_K

if TYPE_CHECKING:
    from embedq.api.app import Service

router = APIRouter(prefix="/v1", tags=["collections"])

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NameParam = Annotated[str, Field(pattern=NAME, max_length=63)]
MAX_BULK = 10_000
_POLL_FIRST_S, _POLL_MAX_S = 0.02, 0.25
_CONTENT_TYPES = {
    "text/plain": ".txt",
    "text/markdown": ".md",
    "text/x-markdown": ".md",
    "text/html": ".html",
    "application/pdf": ".pdf",
    "application/jsonl": ".jsonl",
    "application/x-ndjson": ".jsonl",
}


# --- bodies ------------------------------------------------------------------------------


class CollectionIn(BaseModel):
    """A new collection. Unset fields take the provider's defaults (see docs/pipeline.md)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME, max_length=63, examples=["articles"])
    provider: Literal["local", "ollama", "openai", "fake"] | None = None
    model: str | None = Field(None, min_length=1, max_length=200)
    dimensions: int | None = Field(None, ge=1, le=16_000)
    distance: Literal["cosine", "l2", "ip"] | None = None
    chunk_size: int | None = Field(None, ge=16, le=8192)
    chunk_overlap: int | None = Field(None, ge=0, le=8191)
    title_prefix: bool = False
    language: str = Field("english", pattern=r"^[a-z_]{1,63}$")
    base_url: str | None = Field(None, pattern=r"^https?://\S+$", max_length=2000)
    fallback_urls: list[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=2000)]] = Field(
        default_factory=list, max_length=10
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Provider options such as rpm and tpm rate limits."
    )
    exist_ok: bool = Field(
        False, description="Answer 200 with the existing collection if its configuration matches."
    )
    bm25_k1: float | None = Field(None, ge=0, le=10, description="BM25 k1 (default 0.9).")
    bm25_b: float | None = Field(None, ge=0, le=1, description="BM25 b (default 0.4).")
    fusion: Literal["convex", "rrf"] | None = Field(
        None, description="Hybrid search's default fusion (default convex)."
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="Convex fusion: weight of the semantic leg (default 0.5)."
    )
    rrf_k: int | None = Field(None, ge=1, le=10_000, description="RRF's constant (default 60).")


class SearchOptionsIn(BaseModel):
    """A collection's search options to change; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")
    bm25_k1: float | None = Field(None, ge=0, le=10)
    bm25_b: float | None = Field(None, ge=0, le=1)
    fusion: Literal["convex", "rrf"] | None = None
    alpha: float | None = Field(None, ge=0, le=1)
    rrf_k: int | None = Field(None, ge=1, le=10_000)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="The document's text (at most max_document_chars).")
    title: str | None = Field(None, max_length=10_000)
    metadata: dict[str, Any] = Field(default_factory=dict)


class KeyedDocumentIn(DocumentIn):
    key: str = Field(min_length=1, max_length=1024)


class BulkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_BULK,
        description="Documents as {key, text, title?, metadata?}; each is checked on its own "
        "and answered with its own result or error.",
    )


class SearchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=10_000)
    mode: Literal["hybrid", "semantic", "keyword"] = "hybrid"
    k: int = Field(10, ge=1, le=MAX_K)
    filters: dict[str, Any] = Field(
        default_factory=dict, description="Metadata filters; see docs/pipeline.md."
    )
    fusion: Literal["convex", "rrf"] | None = Field(
        None,
        description="Hybrid: fuse by a convex combination or reciprocal rank (default: "
        "the collection's).",
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="Convex fusion: the weight of the semantic leg."
    )
    rrf_k: int | None = Field(None, ge=1, le=10_000, description="RRF's constant.")


Wait = Annotated[
    bool, Query(description="Answer only when the written version is embedded (or failed).")
]
Timeout = Annotated[
    float, Query(gt=0, le=3600, description="Longest wait in seconds (capped by api_wait_max_s).")
]

# --- helpers -----------------------------------------------------------------------------


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _collection(request: Request, name: str, *, counts: bool = False) -> Collection:
    return await _service(request).app.collections.get(name, counts=counts)


async def _await_embedded(
    collection: Collection, written: dict[str, int], timeout: float
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Poll until every written (key, version) is embedded, failed or superseded; returns the
    last states and whether time ran out."""
    deadline = time.monotonic() + timeout
    delay = _POLL_FIRST_S
    q = collection.q["document_states"]
    while True:
        rows = await collection.app.store.fetch_sql(
            q, {"collection": collection.id, "keys": list(written)}
        )
        states = {r["key"]: r for r in rows}
        if all(_settled(states.get(k), v) for k, v in written.items()):
            return states, False
        if time.monotonic() + delay > deadline:
            return states, True
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


def _settled(state: dict[str, Any] | None, version: int) -> bool:
    if state is None:  # deleted meanwhile: nothing more will happen to it
        return True
    return int(state["version"]) > version or state["status"] in ("embedded", "failed")


def _outcome(result: WriteResult, state: dict[str, Any] | None) -> dict[str, Any]:
    out = result.to_json()
    if state is None:
        return {**out, "status": "deleted"}
    superseded = int(state["version"]) > result.version
    out["status"] = "superseded" if superseded else state["status"]
    if state["status"] == "failed" and not superseded:
        out["error"] = state["error"]
    return out


async def _written(
    request: Request,
    collection: Collection,
    results: Sequence[WriteResult],
    wait: bool,
    timeout: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Results as JSON with their embedding status, after waiting if asked."""
    versions = {r.key: r.version for r in results}
    info: dict[str, Any] = {"waited": wait}
    if wait and versions:
        limit = _service(request).app.settings.api_wait_max_s
        states, timed_out = await _await_embedded(collection, versions, min(timeout, limit))
        info["timed_out"] = timed_out
    else:
        # A new version is pending at write time; only an unchanged one needs a look.
        states = {
            r.key: {"version": r.version, "status": "pending", "error": None}
            for r in results
            if r.change in ("created", "updated")
        }
        others = [k for k in versions if k not in states]
        if others:
            rows = await collection.app.store.fetch_sql(
                collection.q["document_states"], {"collection": collection.id, "keys": others}
            )
            states.update({r["key"]: r for r in rows})
    return [_outcome(r, states.get(r.key)) for r in results], info


def _status(wait: bool, info: dict[str, Any]) -> int:
    return 200 if wait and not info.get("timed_out") else 202


# --- collections -------------------------------------------------------------------------


@router.get("/collections", summary="List collections", dependencies=[require("read")])
async def list_collections(request: Request) -> dict[str, Any]:
    cols = await _service(request).app.collections.list()
    return {"collections": [c.to_json() for c in cols]}


@router.post(
    "/collections",
    status_code=201,
    summary="Create a collection",
    dependencies=[require("admin")],
    responses={
        200: {"description": "With exist_ok: it exists already with this configuration."},
        409: {"description": "A collection of that name exists (and exist_ok is off)."},
    },
)
async def create_collection(
    request: Request, response: Response, body: CollectionIn
) -> dict[str, Any]:
    fields = body.model_dump(exclude={"name"})
    collections = _service(request).app.collections
    existed = body.exist_ok and body.name in {c.name for c in await collections.list()}
    try:
        col = await collections.create(body.name, **fields)
    except PermanentProviderError as exc:
        # The model asked for does not exist or cannot be used: the request is at fault.
        raise ApiError(422, f"cannot create collection {body.name!r}: {exc}") from None
    if existed:
        response.status_code = 200
    return col.to_json()


@router.get("/collections/{name}", summary="Show a collection", dependencies=[require("read")])
async def show_collection(request: Request, name: str) -> dict[str, Any]:
    col = await _collection(request, name, counts=True)
    out = col.to_json()
    done, total = await col.progress()
    out["progress"] = {"current": done, "documents": total}
    return out


@router.patch(
    "/collections/{name}",
    summary="Change a collection's search options (BM25 k1 and b, hybrid fusion)",
    dependencies=[require("admin")],
)
async def set_search_options(request: Request, name: str, body: SearchOptionsIn) -> dict[str, Any]:
    col = await _collection(request, name)
    col = await col.set_search_options(**body.model_dump())
    return col.to_json()


@router.delete(
    "/collections/{name}",
    summary="Drop a collection with its documents and chunks",
    dependencies=[require("admin")],
)
async def drop_collection(request: Request, name: str) -> dict[str, Any]:
    await _collection(request, name)  # 404 when absent
    await _service(request).app.collections.drop(name)
    return {"dropped": name}


# --- documents ---------------------------------------------------------------------------


@router.get(
    "/collections/{name}/documents",
    summary="List documents (key, version, status)",
    dependencies=[require("read")],
)
async def list_documents(
    request: Request,
    name: str,
    status: Literal["pending", "embedded", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    col = await _collection(request, name)
    return {"documents": await col.documents(status=status, limit=limit)}


@router.put(
    "/collections/{name}/documents/{key:path}",
    status_code=202,
    summary="Write one document (created, updated or unchanged)",
    dependencies=[require("write")],
    responses={
        200: {"description": "With wait=true: the written version is embedded (or failed)."},
        202: {"description": "Stored; the embed job is queued (or the wait timed out)."},
    },
)
async def put_document(
    request: Request,
    name: str,
    key: str,
    body: DocumentIn,
    wait: Wait = False,
    timeout: Timeout = 10.0,
) -> JSONResponse:
    col = await _collection(request, name)
    result = await col.upsert(key, body.text, title=body.title, metadata=body.metadata)
    [out], info = await _written(request, col, [result], wait, timeout)
    return JSONResponse({**out, **info}, status_code=_status(wait, info))


@router.post(
    "/collections/{name}/documents",
    status_code=202,
    summary="Write many documents; each gets its own result or error",
    dependencies=[require("write")],
)
async def bulk_documents(
    request: Request, name: str, body: BulkIn, wait: Wait = False, timeout: Timeout = 10.0
) -> JSONResponse:
    col = await _collection(request, name)
    limit = _service(request).app.settings.max_document_chars
    valid: list[tuple[int, DocumentInput]] = []
    results: list[dict[str, Any] | None] = [None] * len(body.documents)
    for i, raw in enumerate(body.documents):
        try:
            valid.append((i, _bulk_item(raw, limit)))
        except InvalidDocument as exc:
            key = raw.get("key") if isinstance(raw.get("key"), str) else None
            results[i] = {"index": i, "key": key, "error": {"code": "invalid", "message": str(exc)}}
    written = await col.upsert_many([d for _, d in valid]) if valid else []
    outs, info = await _written(request, col, written, wait, timeout)
    for (i, _), out in zip(valid, outs, strict=True):
        results[i] = {"index": i, **out}
    counts: dict[str, int] = {}
    for r in results:
        assert r is not None
        kind = "error" if "error" in r and "change" not in r else str(r["change"])
        counts[kind] = counts.get(kind, 0) + 1
    return JSONResponse(
        {"results": results, "counts": counts, **info}, status_code=_status(wait, info)
    )


def _bulk_item(raw: dict[str, Any], limit: int) -> DocumentInput:
    unknown = sorted(set(raw) - {"key", "text", "title", "metadata"})
    if unknown:
        raise InvalidDocument(
            f"unknown field(s) {', '.join(unknown)}: a document has key, text, title, metadata"
        )
    if not isinstance(raw.get("key"), str) or "text" not in raw:
        raise InvalidDocument("a document needs a string 'key' and a 'text'")
    metadata = raw.get("metadata")
    doc = DocumentInput(
        key=raw["key"],
        text=raw["text"],
        title=raw.get("title"),
        metadata={} if metadata is None else metadata,
    )
    return validate_document(doc, limit)


@router.get(
    "/collections/{name}/documents/{key:path}",
    summary="Read one document and where its embedding stands",
    dependencies=[require("read")],
)
async def get_document(request: Request, name: str, key: str) -> dict[str, Any]:
    col = await _collection(request, name)
    return (await col.get(key)).to_json()


@router.delete(
    "/collections/{name}/documents/{key:path}",
    summary="Delete one document and its chunks",
    dependencies=[require("write")],
)
async def delete_document(request: Request, name: str, key: str) -> dict[str, Any]:
    col = await _collection(request, name)
    if not await col.delete(key):
        raise ApiError(404, f"no document {key!r} in collection {name!r}")
    return {"deleted": key}


@router.post(
    "/collections/{name}/files",
    status_code=202,
    summary="Upload files (txt, md, html, pdf, jsonl) as documents",
    dependencies=[require("write")],
    responses={
        413: {"description": "A file is larger than api_max_upload_bytes."},
        422: {"description": "A file is empty, binary, corrupt or of an unsupported type."},
    },
)
async def upload_files(
    request: Request,
    name: str,
    files: Annotated[list[UploadFile], File(description="One or more files.")],
    key: Annotated[
        str | None, Form(max_length=1024, description="The document key (one file only).")
    ] = None,
    metadata: Annotated[
        str | None, Form(max_length=100_000, description="JSON object added to every document.")
    ] = None,
    wait: Wait = False,
    timeout: Timeout = 10.0,
) -> JSONResponse:
    col = await _collection(request, name)
    if key is not None and len(files) != 1:
        raise ApiError(422, "'key' names one document: send one file with it, or leave it out")
    extra = _metadata_field(metadata)
    _check_upload_size(_service(request).app.settings.api_max_upload_bytes, files)
    docs: list[DocumentInput] = []
    problems: list[dict[str, str]] = []
    for upload in files:
        data = await upload.read()
        filename = PurePosixPath((upload.filename or "").replace("\\", "/")).name
        doc_key = key or filename or "upload"
        typed = doc_key if PurePosixPath(doc_key).suffix else doc_key + _suffix_for(upload)
        for item in ingest.read_bytes(data, typed, where=filename or doc_key):
            if isinstance(item, ingest.Skipped):
                problems.append({"file": item.path, "reason": item.reason})
                continue
            item_key = doc_key if item.key == typed else item.key  # JSONL lines keep theirs
            docs.append(DocumentInput(item_key, item.text, item.title, {**item.metadata, **extra}))
    if problems:
        listed = "; ".join(f"{p['file']}: {p['reason']}" for p in problems[:5])
        raise ApiError(
            422,
            f"nothing was written: {len(problems)} file(s) could not be read ({listed})",
            details=problems,
        )
    written = await col.upsert_many(docs)
    outs, info = await _written(request, col, written, wait, timeout)
    return JSONResponse({"results": outs, **info}, status_code=_status(wait, info))


def _check_upload_size(limit: int, files: Sequence[UploadFile]) -> None:
    # The request-size guard allows room for the multipart framing; the files themselves
    # must fit the limit.
    total = sum(upload.size or 0 for upload in files)
    if total > limit:
        raise ApiError(
            413,
            f"the uploaded files are {total:,} bytes, more than the limit for file uploads "
            f"({limit:,} bytes); split them or raise the api_max_upload_bytes setting",
        )


def _suffix_for(upload: UploadFile) -> str:
    kind = (upload.content_type or "").split(";")[0].strip().lower()
    return _CONTENT_TYPES.get(kind, "")


def _metadata_field(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError(422, f"'metadata' is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ApiError(422, "'metadata' must be a JSON object")
    return value


# --- search ------------------------------------------------------------------------------


@router.post(
    "/collections/{name}/search",
    summary="Search: semantic, keyword or hybrid, with metadata filters",
    dependencies=[require("read")],
)
async def search(request: Request, name: str, body: SearchIn) -> dict[str, Any]:
    col = await _collection(request, name)
    started = time.perf_counter()
    hits = await col.search(
        body.query,
        mode=body.mode,
        k=body.k,
        filters=body.filters,
        fusion=body.fusion,
        alpha=body.alpha,
        rrf_k=body.rrf_k,
    )
    return {
        "hits": [h.to_json() for h in hits],
        "mode": body.mode,
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
    }
