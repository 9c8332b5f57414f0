"""The MCP server through the SDK's own client: `embedq mcp` spawned over stdio, and /mcp of
the HTTP API (in-process, lifespan running) behind its bearer auth and the read scope."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from tests.api_helpers import BASE, error_of, token
from tests.conftest import cli_env, drain
from tests.served import Servers

import embedq
from embedq.api.app import create_app
from embedq.tokens import Tokens

TOOLS = {"search", "get_document", "list_collections", "queue_status"}
NOTES = [
    {"key": "pg", "title": "PostgreSQL", "text": "PostgreSQL is a relational database server.",
     "metadata": {"lang": "en", "year": 2024}},
    {"key": "vec", "title": "pgvector", "text": "pgvector adds vector similarity search to PostgreSQL.",
     "metadata": {"lang": "en", "year": 2023}},
    {"key": "bread", "title": "Bread", "text": "Knead the dough and bake the bread for an hour.",
     "metadata": {"lang": "en", "year": 2020}},
]  # fmt: skip


@pytest.fixture
async def filled(app: embedq.App) -> embedq.App:
    """A collection `notes` on the fake provider with its three documents embedded."""
    col = await app.collections.create("notes", provider="fake")
    await col.upsert_many(NOTES)
    await drain(app)
    return app


def text_of(result: CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


async def check_tools(client: Client) -> None:
    """Every tool through `client`: listed with its schema, called, and refused clearly."""
    listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == TOOLS
    search = listed["search"].input_schema
    assert search["required"] == ["collection", "query"]
    assert search["properties"]["mode"]["enum"] == ["semantic", "keyword", "hybrid"]
    assert search["properties"]["k"]["maximum"] == 1000
    assert listed["get_document"].input_schema["required"] == ["collection", "key"]
    assert all(t.annotations and t.annotations.read_only_hint for t in listed.values())
    assert all(t.description for t in listed.values())

    # search: hybrid by default; the passage that matched comes with each hit
    result = await client.call_tool("search", {"collection": "notes", "query": "vector search"})
    assert not result.is_error, result
    found = result.structured_content
    assert found is not None and found["mode"] == "hybrid"
    assert found["hits"][0]["key"] == "vec"
    assert found["hits"][0]["matched_by"] == ["semantic", "keyword"]
    assert "vector similarity" in found["hits"][0]["text"]
    assert found["hits"][0]["metadata"] == {"lang": "en", "year": 2023}
    assert json.loads(text_of(result)) == found  # clients that read only text get the same
    result = await client.call_tool(
        "search",
        {"collection": "notes", "query": "bread", "mode": "keyword", "k": 1,
         "filters": {"year": {"$lt": 2021}}},
    )  # fmt: skip
    hits = result.structured_content["hits"]  # type: ignore[index]
    assert [h["key"] for h in hits] == ["bread"] and hits[0]["matched_by"] == ["keyword"]
    assert "<b>" not in hits[0]["text"] and "bread" in hits[0]["text"].lower()
    result = await client.call_tool(
        "search",
        {"collection": "notes", "query": "database", "mode": "keyword", "filters": {"year": 2020}},
    )
    assert result.structured_content["hits"] == []  # type: ignore[index]
    result = await client.call_tool(
        "search", {"collection": "notes", "query": "database", "filters": {"year": 2020}}
    )  # semantic search always finds the nearest, here the one document the filter leaves
    assert [h["key"] for h in result.structured_content["hits"]] == ["bread"]  # type: ignore[index]

    # get_document, list_collections, queue_status
    result = await client.call_tool("get_document", {"collection": "notes", "key": "pg"})
    doc = result.structured_content
    assert doc is not None and not result.is_error
    assert (doc["key"], doc["title"], doc["text"]) == ("pg", NOTES[0]["title"], NOTES[0]["text"])
    assert (doc["status"], doc["version"], doc["metadata"]) == ("embedded", 1, NOTES[0]["metadata"])
    assert doc["chunks"] >= 1 and doc["embedded_at"]
    result = await client.call_tool("list_collections", {})
    [col] = result.structured_content["collections"]  # type: ignore[index]
    assert (col["name"], col["provider"], col["documents"]) == (
        "notes",
        "fake",
        {"documents": 3, "embedded": 3, "pending": 0, "failed": 0},
    )
    assert col["switching_to"] is None
    result = await client.call_tool("queue_status", {})
    queue = result.structured_content
    assert queue is not None and queue["queues"]["embed"]["pending"] == 0
    assert queue["queues"]["embed"]["succeeded_1h"] == 3
    assert {"due", "stuck", "workers_alive"} <= set(queue["overview"])

    # mistakes: a tool error whose message names the problem, never a traceback
    refused = [
        ("search", {"collection": "nope", "query": "x"},
         "no collection named 'nope' (known: notes); create it with `embedq collection create"),
        ("get_document", {"collection": "notes", "key": "missing"},
         "no document 'missing' in collection 'notes'"),
        ("search", {"collection": "notes", "query": "x", "mode": "fuzzy"},
         "search mode 'fuzzy' is invalid: use semantic, keyword, hybrid"),
        ("search", {"collection": "notes", "query": "x", "k": 5000},
         "k must be an integer from 1 to 1000, not 5000"),
        ("search", {"collection": "notes", "query": "x", "k": 0}, "from 1 to 1000, not 0"),
        ("search", {"collection": "notes", "query": "x", "filters": {"year": {"$near": 1}}},
         "unknown filter operator '$near'"),
        ("search", {"collection": "notes", "query": "  "}, "the search query is empty"),
        ("search", {"collection": "notes"}, "query\n  Field required"),  # the SDK's check
    ]  # fmt: skip
    for tool, arguments, expected in refused:
        result = await client.call_tool(tool, arguments)
        assert result.is_error, (tool, arguments, result)
        message = text_of(result)
        assert message.startswith(f"Error executing tool {tool}: "), message
        assert expected in message, (arguments, message)
        assert "Traceback" not in message and 'File "' not in message
    result = await client.call_tool("no_such_tool", {})
    assert result.is_error and "Unknown tool: no_such_tool" in text_of(result)


async def test_stdio_server_with_the_sdk_client(
    filled: embedq.App, db_url: str, tmp_path: Path
) -> None:
    # At DEBUG the server logs plenty: all of it must go to stderr, none onto the protocol's
    # stdout, where a stray line would reach the client as a transport fault.
    env = cli_env(db_url, EMBEDQ_LOG_LEVEL="DEBUG")
    params = StdioServerParameters(command=sys.executable, args=["-m", "embedq", "mcp"], env=env)
    faults: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):
            faults.append(message)

    with (tmp_path / "stderr").open("w") as errlog:
        transport = stdio_client(params, errlog=errlog)
        async with Client(transport, mode="legacy", message_handler=on_message) as client:
            assert client.server_info is not None and client.server_info.name == "embedq"
            assert client.server_info.version == embedq.__version__
            assert client.server_capabilities.tools is not None
            await check_tools(client)
    assert faults == []
    log = (tmp_path / "stderr").read_text()
    assert "DEBUG" in log and "Tool 'get_document' failed" in log, log
    assert "Traceback" not in log, log


# --- HTTP ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(app: embedq.App) -> AsyncIterator[FastAPI]:
    """The API of `app` in-process with its lifespan running: the MCP endpoint's session
    manager is started there, as under `embedq serve`."""
    api = create_app(app, manage=False)
    async with api.router.lifespan_context(api):
        yield api


def http(api: FastAPI, secret: str | None = None, **kw: Any) -> httpx2.AsyncClient:
    """An httpx2 client (the SDK's HTTP library) on `api`, with `secret` as bearer token."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=api), base_url=BASE, headers=headers, **kw
    )


def mcp_client(web: httpx2.AsyncClient, url: str = f"{BASE}/mcp", **kw: Any) -> Client:
    return Client(streamable_http_client(url, http_client=web), **kw)


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # initialize handshake, or discover
async def test_http_endpoint_with_a_read_token(filled: embedq.App, mode: str) -> None:
    secret = await token(filled, "assistant", "read")
    async with served(filled) as api, http(api, secret) as web:
        async with mcp_client(web, mode=mode) as client:
            assert client.server_info is not None and client.server_info.name == "embedq"
            await check_tools(client)


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


async def test_http_endpoint_needs_a_token_with_the_read_scope(filled: embedq.App) -> None:
    secrets = {s: await token(filled, f"only-{s}", s) for s in ("read", "write", "admin")}
    revoked = await token(filled, "revoked", "read")
    await Tokens(filled).revoke("revoked")
    async with served(filled) as api:
        # The SDK's client is refused at its first request; the answer is the API's envelope.
        refusals = {
            "no token": (None, 401, "needs a token"),
            "unknown": ("eq_" + "x" * 40, 401, "not valid"),
            "revoked": (revoked, 401, "not valid"),
            "write only": (
                secrets["write"],
                403,
                "token 'only-write' has scopes write; this route needs 'read' (or 'admin')",
            ),
        }
        for what, (secret, status, message) in refusals.items():
            answers: list[httpx2.Response] = []

            async def keep(response: httpx2.Response, answers: list[Any] = answers) -> None:
                await response.aread()
                answers.append(response)

            async with http(api, secret, event_hooks={"response": [keep]}) as web:
                with pytest.raises(ExceptionGroup) as refused:
                    async with mcp_client(web, mode="legacy"):
                        pass
            assert refused.group_contains(MCPError), what
            [answer] = answers
            error = error_of(answer, status)  # type: ignore[arg-type]
            assert message in error["message"], (what, error)
            assert answer.headers["www-authenticate"].startswith("Bearer"), what
            if status == 403:
                assert "insufficient_scope" in answer.headers["www-authenticate"]

        # by hand: read and admin tokens get in; a GET (no stream when stateless) is a 405
        for held in ("read", "admin"):
            async with http(api, secrets[held]) as web:
                r = await web.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
                assert r.status_code == 200, (held, r.text)
                assert r.json()["result"]["serverInfo"]["name"] == "embedq"
                assert r.headers["x-request-id"]
                r = await web.get("/mcp", headers={"Accept": "text/event-stream"})
                assert (r.status_code, r.headers["allow"]) == (405, "POST"), r.text
                assert "stateless" in r.json()["error"]["message"]
        async with http(api) as web:  # without a token, even a GET is a 401 first
            error_of(await web.get("/mcp"), 401, "unauthorized")  # type: ignore[arg-type]


async def test_http_endpoint_of_embedq_serve(
    filled: embedq.App, db_url: str, tmp_path: Path
) -> None:
    """The real process: uvicorn runs the lifespan that starts the session manager, a client
    talks real HTTP, and SIGTERM still ends the process cleanly."""
    secret = await token(filled, "assistant", "read")
    servers = Servers(tmp_path)
    try:
        server = servers.start(cli_env(db_url, EMBEDQ_ADMIN_TOKEN="eq_" + "a" * 40))
        server.wait_ready()
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {secret}"}) as web:
            async with mcp_client(web, url=f"{server.url}/mcp", mode="legacy") as client:
                result = await client.call_tool("list_collections", {})
                assert [c["name"] for c in result.structured_content["collections"]] == ["notes"]  # type: ignore[index]
                result = await client.call_tool("search", {"collection": "notes", "query": "bread"})
                assert result.structured_content["hits"][0]["key"] == "bread"  # type: ignore[index]
        assert server.stop() == 0, server.logs()
        assert "Traceback" not in server.stderr(), server.logs()
        assert "POST /mcp 200" in server.stderr(), server.logs()
    finally:
        servers.cleanup()
