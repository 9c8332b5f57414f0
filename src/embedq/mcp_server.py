"""The MCP server: embedq's search, documents and queue as tools for AI assistants.

    server = build_server(app)              # an MCPServer over an App (opened by the caller)
    await server.run_stdio_async()          # `embedq mcp`: the assistant spawns it

    endpoint = HttpEndpoint(app)            # /mcp of the HTTP API (api/app.py mounts it)

Four read-only tools: `search`, `get_document`, `list_collections`, `queue_status`. A call
the caller can fix (an unknown collection or document, a bad mode, k or filter) answers a
tool error carrying embedq's own message, which names the fix; never a traceback.

Over HTTP the endpoint sits behind the API's bearer auth and wants the `read` scope. It is
stateless with JSON answers: every POST carries a whole exchange, so any replica of the
API can answer any request and nothing is kept between them.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

import embedq
from embedq import status
from embedq.api.auth import bearer, require
from embedq.errors import EmbedqError
from embedq.search import MAX_K, MODES, SearchHit

if TYPE_CHECKING:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from embedq.app import App
    from embedq.documents import Collection, Document

NAME = "embedq"
INSTRUCTIONS = (
    "embedq keeps vector embeddings of an application's documents in PostgreSQL. Call "
    "list_collections to see what can be searched, search to find documents (hybrid search "
    "by default: meaning and keywords), get_document to read one whole, queue_status to see "
    "whether embedding work is still pending."
)
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
_TAGS = re.compile(r"</?b>")
NO_STREAM = JSONResponse(
    {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Method Not Allowed: "
     "this endpoint is stateless and sends no server-initiated stream; POST JSON-RPC messages"}},
    status_code=405,
    headers={"Allow": "POST"},
)  # fmt: skip

# Argument types of the tools: their descriptions and bounds become the input schemas. Mode
# and k are checked by search() itself, so a bad value gets its message, not a schema dump.
CollectionName = Annotated[
    str, Field(description="The collection's name (list_collections shows them).")
]
Query = Annotated[str, Field(description="What to look for, in natural language or keywords.")]
Mode = Annotated[
    str,
    Field(
        description="hybrid (meaning and keywords fused), semantic (meaning only) or "
        'keyword (BM25: any word matches, "quoted phrases" must, -word excludes).',
        json_schema_extra={"enum": list(MODES)},
    ),
]
K = Annotated[
    int,
    Field(
        description=f"How many documents to return, 1 to {MAX_K}.",
        json_schema_extra={"minimum": 1, "maximum": MAX_K},
    ),
]
Filters = Annotated[
    dict[str, Any] | None,
    Field(
        description='Metadata filter: {"lang": "en"} for equality, or {"year": {"$gte": 2023}} '
        "with $eq $ne $in $nin $gt $gte $lt $lte $exists."
    ),
]
Fusion = Annotated[
    str | None,
    Field(
        description="Hybrid only: convex (a weighted sum of normalised scores) or rrf "
        "(reciprocal rank); default: the collection's.",
        json_schema_extra={"enum": ["convex", "rrf"]},
    ),
]
Alpha = Annotated[
    float | None,
    Field(
        description="Hybrid with convex fusion: the weight of meaning over keywords, 0 to 1.",
        json_schema_extra={"minimum": 0, "maximum": 1},
    ),
]
Key = Annotated[str, Field(description="The document's key (a search hit's `key`).")]


class Hit(BaseModel):
    """A document a search found."""

    key: str = Field(description="Pass it to get_document to read the whole document.")
    title: str | None
    score: float = Field(description="Higher is better; comparable within one search only.")
    text: str | None = Field(
        description="The passage that matched best (semantic) or a keyword snippet."
    )
    matched_by: list[str] = Field(description="semantic, keyword, or both.")
    status: str = Field(description="embedded, or pending while its embedding is queued.")
    metadata: dict[str, Any]


class SearchResult(BaseModel):
    collection: str
    query: str
    mode: str
    hits: list[Hit]


class DocumentView(BaseModel):
    """A whole document and where its embedding stands."""

    collection: str
    key: str
    title: str | None
    text: str
    metadata: dict[str, Any]
    version: int = Field(description="Bumped by every change of title or text.")
    status: str = Field(description="pending, embedded or failed (see error).")
    error: str | None
    chunks: int = Field(description="Chunks embedded for the current version.")
    updated_at: str
    embedded_at: str | None


class CollectionView(BaseModel):
    name: str
    provider: str
    model: str
    dimensions: int
    distance: str
    language: str = Field(description="Text-search configuration of keyword search.")
    documents: dict[str, int] = Field(description="Documents in all, and by embedding status.")
    switching_to: str | None = Field(
        description="provider/model being built during a model switch; search keeps the "
        "current model until it completes."
    )


class CollectionList(BaseModel):
    collections: list[CollectionView]


def build_server(app: App) -> MCPServer[Any]:
    """The MCP server over `app`. Its tools use `app.collections` and `app.store`, so the
    caller opens the App (and closes it) around serving."""
    with _logging_untouched():
        server: MCPServer[Any] = MCPServer(
            NAME,
            title="embedq",
            description="Search and read documents embedded by embedq.",
            instructions=INSTRUCTIONS,
            version=embedq.__version__,
        )

    @server.tool(annotations=READ_ONLY)
    async def search(
        collection: CollectionName,
        query: Query,
        mode: Mode = "hybrid",
        k: K = 10,
        filters: Filters = None,
        fusion: Fusion = None,
        alpha: Alpha = None,
    ) -> SearchResult:
        """Search a collection and return its best documents, each with the passage that
        matched. Documents whose embedding is still pending are found by keyword."""
        with _tool_errors():
            col = await app.collections.get(collection, counts=False)
            hits = await col.search(
                query, mode=mode, k=k, filters=filters, fusion=fusion, alpha=alpha
            )
        return SearchResult(
            collection=col.name, query=query, mode=mode, hits=[_hit(h) for h in hits]
        )

    @server.tool(annotations=READ_ONLY)
    async def get_document(collection: CollectionName, key: Key) -> DocumentView:
        """Read one document whole: its text, title, metadata and embedding status."""
        with _tool_errors():
            col = await app.collections.get(collection, counts=False)
            doc = await col.get(key)
        return _document(col, doc)

    @server.tool(annotations=READ_ONLY)
    async def list_collections() -> CollectionList:
        """The collections that can be searched, with their model and document counts."""
        with _tool_errors():
            cols = await app.collections.list()
        return CollectionList(collections=[_collection(c) for c in cols])

    @server.tool(annotations=READ_ONLY)
    async def queue_status() -> dict[str, Any]:
        """The job queue now: jobs pending, running, stuck and dead-lettered, per queue and
        overall, and the workers alive. Pending `embed` jobs are documents still to embed."""
        with _tool_errors():
            result: dict[str, Any] = status.plain(await status.queue_status(app))
        return result

    return server


class HttpEndpoint:
    """/mcp of the HTTP API: MCP over streamable HTTP for tokens with the `read` scope.

    An ASGI app for a route; `running()` belongs in the API's lifespan (the SDK's session
    manager needs its task group)."""

    def __init__(self, app: App) -> None:
        self.server = build_server(app)
        # Builds the session manager; the Starlette app it returns is not used: the route is
        # the API's own, behind its auth and request context. The SDK's Host/Origin checks
        # (on by default for 127.0.0.1) would refuse the API's own name behind a proxy; the
        # bearer token is what a page that rebinds a name to this host cannot send.
        self.server.streamable_http_app(
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.manager: StreamableHTTPSessionManager = self.server.session_manager
        # Stateless, every request ends its one-request "session" with an INFO line; the
        # access log already has one line per request.
        logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
        self._require = require("read").dependency

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # The API's exception handlers turn a refusal into its error envelope (401, 403,
            # 429, 503 while the database is down), as for any route under /v1.
            request = Request(scope, receive)
            await self._require(request, await bearer(request))
            if request.method == "GET":
                # A GET opens the stream of server-initiated messages, which a stateless
                # endpoint never sends: left open, it would hold the connection until
                # shutdown. The spec's answer is 405.
                await NO_STREAM(scope, receive, send)
                return
        await self.manager.handle_request(scope, receive, send)


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """embedq's errors as tool errors: the caller (a model) reads the message and fixes the
    call. Anything else is a crash the SDK logs and reports without details."""
    try:
        yield
    except EmbedqError as exc:
        raise ToolError(str(exc)) from None


@contextlib.contextmanager
def _logging_untouched() -> Iterator[None]:
    """MCPServer() calls logging.basicConfig(); the process's logging setup is embedq's
    (logs.py: stderr, text or JSON), or the embedding application's, not the SDK's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _hit(h: SearchHit) -> Hit:
    text = h.chunks[0].text if h.chunks else (_TAGS.sub("", h.snippet) if h.snippet else None)
    matched = [m for m, rank in (("semantic", h.semantic_rank), ("keyword", h.keyword_rank))
               if rank is not None]  # fmt: skip
    return Hit(
        key=h.key,
        title=h.title,
        score=round(h.score, 6),
        text=text,
        matched_by=matched,
        status=h.status,
        metadata=h.metadata,
    )


def _document(col: Collection, doc: Document) -> DocumentView:
    return DocumentView(
        collection=col.name,
        key=doc.key,
        title=doc.title,
        text=doc.text,
        metadata=doc.metadata,
        version=doc.version,
        status=doc.status,
        error=doc.error,
        chunks=doc.chunks,
        updated_at=doc.updated_at.isoformat(),
        embedded_at=doc.embedded_at.isoformat() if doc.embedded_at else None,
    )


def _collection(c: Collection) -> CollectionView:
    building = c.building
    return CollectionView(
        name=c.name,
        provider=c.active.config.provider,
        model=c.active.config.model,
        dimensions=c.active.dimensions,
        distance=c.distance,
        language=c.language,
        documents=c.counts,
        switching_to=f"{building.config.provider}/{building.config.model}" if building else None,
    )


__all__ = ["HttpEndpoint", "build_server"]
