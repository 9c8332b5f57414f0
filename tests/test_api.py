"""The HTTP API in process (httpx on the ASGI app) against the real database: collections,
documents (one, bulk, files, ?wait), search, the queue, settings, tokens, limits, and the one
error envelope every failure answers with."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.api_helpers import client, error_of, opened, pick, token, worker_running
from tests.conftest import drain
from tests.test_ingest import make_pdf

import embedq
from embedq.api.app import create_app
from embedq.db import describe_target
from embedq.stored_settings import MASK, generate_key


@pytest.fixture
async def root(app: embedq.App) -> str:
    return await token(app, "root", "admin")


@pytest.fixture
def asgi(app: embedq.App) -> FastAPI:
    return create_app(app, manage=False)


@pytest.fixture
async def api(asgi: FastAPI, root: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client(asgi, root) as c:
        yield c


@pytest.fixture
async def notes(api: httpx.AsyncClient) -> str:
    r = await api.post("/v1/collections", json={"name": "notes", "provider": "fake"})
    assert r.status_code == 201, r.text
    return "/v1/collections/notes"


async def keys(api: httpx.AsyncClient, collection: str, **params: Any) -> list[str]:
    r = await api.get(f"{collection}/documents", params=params)
    assert r.status_code == 200, r.text
    return sorted(d["key"] for d in r.json()["documents"])


# --- collections -------------------------------------------------------------------------


async def test_collections_create_list_show_drop(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/collections", json={"name": "notes", "provider": "fake"})
    assert r.status_code == 201
    created = r.json()
    assert (created["name"], created["provider"], created["dimensions"]) == ("notes", "fake", 384)

    error = error_of(
        await api.post("/v1/collections", json={"name": "notes", "provider": "fake"}),
        409,
        "conflict",
    )
    assert "notes" in error["message"]

    again = await api.post(
        "/v1/collections", json={"name": "notes", "provider": "fake", "exist_ok": True}
    )
    assert again.status_code == 200, again.text  # it existed: nothing was created
    assert again.json()["created_at"] == created["created_at"]
    fresh = await api.post(
        "/v1/collections", json={"name": "other", "provider": "fake", "exist_ok": True}
    )
    assert fresh.status_code == 201
    error_of(
        await api.post(
            "/v1/collections",
            json={"name": "notes", "provider": "fake", "chunk_size": 100, "exist_ok": True},
        ),
        409,
    )

    r = await api.get("/v1/collections")
    assert sorted(c["name"] for c in r.json()["collections"]) == ["notes", "other"]

    await api.put("/v1/collections/notes/documents/a", json={"text": "some words"})
    shown = (await api.get("/v1/collections/notes")).json()
    assert shown["progress"] == {"current": 0, "documents": 1}
    assert shown["documents"]["pending"] == 1

    r = await api.delete("/v1/collections/notes")
    assert (r.status_code, r.json()) == (200, {"dropped": "notes"})
    assert "notes" in error_of(await api.get("/v1/collections/notes"), 404, "not_found")["message"]
    error_of(await api.delete("/v1/collections/notes"), 404)
    r = await api.get("/v1/collections")
    assert [c["name"] for c in r.json()["collections"]] == ["other"]


async def test_collection_bodies_that_are_refused(api: httpx.AsyncClient) -> None:
    for body in [
        {"name": "no spaces", "provider": "fake"},
        {"name": "-dash-first", "provider": "fake"},
        {"name": "x" * 64, "provider": "fake"},
        {"name": "ok", "provider": "cohere"},
        {"name": "ok", "provider": "fake", "chunk_size": "big"},
        {"name": "ok", "provider": "fake", "colour": "red"},
        {"name": 5, "provider": "fake"},
        ["ok"],
    ]:
        error = error_of(await api.post("/v1/collections", json=body), 422, "invalid")
        assert error["message"].startswith("invalid request") and error["details"], body
    body = {"name": "ok", "provider": "fake", "chunk_size": 50, "chunk_overlap": 50}
    assert "chunk" in error_of(await api.post("/v1/collections", json=body), 422)["message"]
    error_of(await api.post("/v1/collections", content=b"{not json"), 422)
    assert (await api.get("/v1/collections")).json() == {"collections": []}


async def test_request_ids_are_made_or_echoed(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/collections/missing")
    made = error_of(r, 404)["request_id"]
    assert len(made) == 32
    other = error_of(await api.get("/v1/collections/missing"), 404)["request_id"]
    assert other != made

    r = await api.get("/v1/collections/missing", headers={"X-Request-ID": "trace-42.a:b"})
    assert error_of(r, 404)["request_id"] == "trace-42.a:b"
    ok = await api.get("/v1/collections", headers={"X-Request-ID": "trace-43"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-43"
    # a header that could be used to forge log lines is replaced, not echoed
    r = await api.get("/v1/collections/missing", headers={"X-Request-ID": "a b\tc"})
    assert error_of(r, 404)["request_id"] != "a b\tc"


async def test_unknown_route_and_wrong_method(api: httpx.AsyncClient) -> None:
    error = error_of(await api.get("/v1/nothing-here"), 404, "not_found")
    assert "/v1/nothing-here" in error["message"] and "/openapi.json" in error["message"]
    r = await api.post("/v1/whoami")
    error = error_of(r, 405, "method_not_allowed")
    assert "POST" in error["message"] and r.headers["allow"] == "GET"


async def test_openapi_is_open_and_describes_the_bearer_scheme(app: embedq.App) -> None:
    async with client(app) as anonymous:
        r = await anonymous.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    schemes = spec["components"]["securitySchemes"]
    [(scheme_name, scheme)] = schemes.items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    v1 = {p: ops for p, ops in spec["paths"].items() if p.startswith("/v1/")}
    for path in (
        "/v1/collections",
        "/v1/collections/{name}/documents/{key}",
        "/v1/collections/{name}/files",
        "/v1/collections/{name}/search",
        "/v1/jobs/{job_id}/retry",
        "/v1/queues/{name}/pause",
        "/v1/settings/{name}",
        "/v1/tokens/{name}",
        "/v1/whoami",
    ):
        assert path in v1, path
    for path, ops in v1.items():
        for method, op in ops.items():
            assert op["security"] == [{scheme_name: []}], (method, path)
    assert "security" not in spec["paths"]["/health/live"]["get"]


# --- documents ---------------------------------------------------------------------------


async def test_document_write_read_list_delete(api: httpx.AsyncClient, notes: str) -> None:
    r = await api.put(
        f"{notes}/documents/docs/a.md",
        json={"text": "alpha words here", "title": "A", "metadata": {"lang": "en"}},
    )
    assert r.status_code == 202, r.text
    first = r.json()
    assert (first["key"], first["change"], first["version"]) == ("docs/a.md", "created", 1)
    assert first["job_id"] is not None and first["status"] == "pending"
    assert first["waited"] is False

    same = (
        await api.put(
            f"{notes}/documents/docs/a.md",
            json={"text": "alpha words here", "title": "A", "metadata": {"lang": "en"}},
        )
    ).json()
    assert (same["change"], same["version"], same["job_id"]) == ("unchanged", 1, None)
    jobs = (await api.get("/v1/jobs")).json()["jobs"]
    assert [j["id"] for j in jobs] == [first["job_id"]]

    updated = (await api.put(f"{notes}/documents/docs/a.md", json={"text": "beta"})).json()
    assert (updated["change"], updated["version"]) == ("updated", 2)
    await api.put(f"{notes}/documents/b", json={"text": "second document"})

    doc = (await api.get(f"{notes}/documents/docs/a.md")).json()
    assert pick(doc, "key", "text", "version", "status") == ("docs/a.md", "beta", 2, "pending")
    assert await keys(api, notes) == ["b", "docs/a.md"]
    assert await keys(api, notes, status="pending") == ["b", "docs/a.md"]
    assert await keys(api, notes, status="embedded") == []
    error_of(await api.get(f"{notes}/documents", params={"status": "lost"}), 422)
    error_of(await api.get(f"{notes}/documents", params={"limit": 0}), 422)

    r = await api.delete(f"{notes}/documents/docs/a.md")
    assert (r.status_code, r.json()) == (200, {"deleted": "docs/a.md"})
    error_of(await api.get(f"{notes}/documents/docs/a.md"), 404, "not_found")
    assert "docs/a.md" in error_of(await api.delete(f"{notes}/documents/docs/a.md"), 404)["message"]
    assert await keys(api, notes) == ["b"]


async def test_documents_are_listed_by_status_once_embedded(
    app: embedq.App, api: httpx.AsyncClient, notes: str
) -> None:
    await api.put(f"{notes}/documents/a", json={"text": "first"})
    await drain(app)
    await api.put(f"{notes}/documents/b", json={"text": "second"})
    assert await keys(api, notes, status="embedded") == ["a"]
    assert await keys(api, notes, status="pending") == ["b"]
    assert await keys(api, notes, status="failed") == []
    doc = (await api.get(f"{notes}/documents/a")).json()
    assert doc["status"] == "embedded" and doc["chunks"] == 1 and doc["embedded_at"]


async def test_bad_document_bodies_are_422_and_write_nothing(db_url: str) -> None:
    async with opened(db_url, max_document_chars=100) as app:
        async with client(app, await token(app, "root")) as api:
            await api.post("/v1/collections", json={"name": "notes", "provider": "fake"})
            for body, needle in [
                ({"text": 5}, "text"),
                ({"text": ["a"]}, "text"),
                ({}, "text"),
                ({"text": "a\x00b"}, "NUL"),
                ({"text": "x", "title": "t\x00"}, "NUL"),
                ({"text": "x", "metadata": [1]}, "metadata"),
                ({"text": "x", "metadata": "lang=en"}, "metadata"),
                ({"text": "x", "metadata": {"bad": "\x00"}}, "NUL"),
                ({"text": "x", "colour": "red"}, "colour"),
                ({"text": "y" * 101}, "max_document_chars"),
            ]:
                r = await api.put("/v1/collections/notes/documents/k", json=body)
                assert needle in error_of(r, 422, "invalid")["message"], body
            assert await keys(api, "/v1/collections/notes") == []
            r = await api.put("/v1/collections/notes/documents/k", json={"text": "y" * 100})
            assert r.status_code == 202


async def test_documents_of_an_unknown_collection_are_404(api: httpx.AsyncClient) -> None:
    for r in [
        await api.put("/v1/collections/nope/documents/a", json={"text": "x"}),
        await api.get("/v1/collections/nope/documents/a"),
        await api.delete("/v1/collections/nope/documents/a"),
        await api.get("/v1/collections/nope/documents"),
        await api.post("/v1/collections/nope/documents", json={"documents": [{"key": "a"}]}),
        await api.post("/v1/collections/nope/search", json={"query": "x"}),
        await api.post("/v1/collections/nope/files", files={"files": ("a.txt", b"x")}),
    ]:
        assert "'nope'" in error_of(r, 404, "not_found")["message"]


# --- ?wait=true --------------------------------------------------------------------------


async def test_wait_answers_once_embedded(
    app: embedq.App, api: httpx.AsyncClient, notes: str
) -> None:
    async with worker_running(app):
        r = await api.put(
            f"{notes}/documents/a", params={"wait": "true"}, json={"text": "read your writes"}
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["status"], out["version"], out["waited"], out["timed_out"]) == (
            "embedded",
            1,
            True,
            False,
        )
        assert (await api.get(f"{notes}/documents/a")).json()["status"] == "embedded"
        hits = (await api.post(f"{notes}/search", json={"query": "writes"})).json()["hits"]
        assert [h["key"] for h in hits] == ["a"]

        r = await api.post(
            f"{notes}/documents",
            params={"wait": "true"},
            json={"documents": [{"key": "b", "text": "bee"}, {"key": "c", "text": "sea"}]},
        )
        assert r.status_code == 200
        assert [x["status"] for x in r.json()["results"]] == ["embedded", "embedded"]


async def test_wait_without_a_worker_times_out_with_202(api: httpx.AsyncClient, notes: str) -> None:
    r = await api.put(
        f"{notes}/documents/a", params={"wait": "true", "timeout": 0.5}, json={"text": "x"}
    )
    assert r.status_code == 202
    out = r.json()
    assert (out["status"], out["waited"], out["timed_out"], out["version"]) == (
        "pending",
        True,
        True,
        1,
    )
    for bad in ("0", "-1", "3601", "soon"):
        r = await api.put(
            f"{notes}/documents/a", params={"wait": "true", "timeout": bad}, json={"text": "x"}
        )
        error_of(r, 422)


async def test_wait_reports_a_permanent_failure(app: embedq.App, api: httpx.AsyncClient) -> None:
    r = await api.post(
        "/v1/collections",
        json={"name": "picky", "provider": "fake", "options": {"fail_on": "poison"}},
    )
    assert r.status_code == 201
    async with worker_running(app):
        r = await api.put(
            "/v1/collections/picky/documents/bad",
            params={"wait": "true", "timeout": 20},
            json={"text": "a poison pill"},
        )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "failed" and out["timed_out"] is False
    assert "poison" in out["error"]
    assert (await api.get("/v1/collections/picky/documents/bad")).json()["status"] == "failed"


# --- bulk --------------------------------------------------------------------------------


async def test_bulk_answers_each_item_in_order(api: httpx.AsyncClient, notes: str) -> None:
    await api.put(f"{notes}/documents/same", json={"text": "kept as is"})
    items: list[Any] = [
        {"key": "a", "text": "first", "metadata": {"n": 1}},
        {"key": "b", "text": 5},
        {"key": "c"},
        {"text": "no key"},
        {"key": "d", "text": "x", "colour": "red"},
        {"key": "e", "text": "nul \x00 byte"},
        {"key": "f", "text": "fine", "metadata": [1]},
        {"key": "same", "text": "kept as is"},
        {"key": "g", "text": "last", "title": "G"},
    ]
    r = await api.post(f"{notes}/documents", json={"documents": items})
    assert r.status_code == 202, r.text
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results] == list(range(len(items)))
    assert [x.get("key") for x in results] == ["a", "b", "c", None, "d", "e", "f", "same", "g"]
    failed = [x["index"] for x in results if "error" in x]
    assert failed == [1, 2, 3, 4, 5, 6]
    assert all(results[i]["error"]["code"] == "invalid" for i in failed)
    assert "string" in results[1]["error"]["message"]
    assert "colour" in results[4]["error"]["message"]
    assert "NUL" in results[5]["error"]["message"]
    assert "metadata" in results[6]["error"]["message"]
    assert [results[i]["change"] for i in (0, 7, 8)] == ["created", "unchanged", "created"]
    assert body["counts"] == {"created": 2, "unchanged": 1, "error": 6}
    assert await keys(api, notes) == ["a", "g", "same"]
    doc = (await api.get(f"{notes}/documents/g")).json()
    assert (doc["title"], doc["text"]) == ("G", "last")

    error_of(await api.post(f"{notes}/documents", json={"documents": []}), 422)
    error_of(await api.post(f"{notes}/documents", json={"documents": ["a"]}), 422)
    error_of(await api.post(f"{notes}/documents", json=[{"key": "a", "text": "x"}]), 422)


# --- file upload -------------------------------------------------------------------------


async def test_upload_of_each_supported_type(api: httpx.AsyncClient, notes: str) -> None:
    html = b"<html><head><title>Page T</title></head><body><p>Hello html</p></body></html>"
    r = await api.post(
        f"{notes}/files",
        files=[
            ("files", ("a.txt", b"plain text file", "text/plain")),
            ("files", ("dir\\b.md", b"# The Heading\n\nmarkdown body", "text/markdown")),
            ("files", ("c.html", html, "text/html")),
            ("files", ("d.pdf", make_pdf(["pdf page text"], title="Pdf T"), "application/pdf")),
        ],
        data={"metadata": json.dumps({"source": "upload"})},
    )
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert [(x["key"], x["change"]) for x in results] == [
        ("a.txt", "created"),
        ("b.md", "created"),
        ("c.html", "created"),
        ("d.pdf", "created"),
    ]
    docs = {x["key"]: (await api.get(f"{notes}/documents/{x['key']}")).json() for x in results}
    assert docs["a.txt"]["text"] == "plain text file" and docs["a.txt"]["title"] is None
    assert docs["b.md"]["title"] == "The Heading"
    assert (docs["c.html"]["title"], docs["c.html"]["text"].strip()) == ("Page T", "Hello html")
    assert docs["d.pdf"]["title"] == "Pdf T" and "pdf page text" in docs["d.pdf"]["text"]
    assert all(d["metadata"]["source"] == "upload" for d in docs.values())
    assert docs["b.md"]["metadata"]["type"] == ".md"


async def test_upload_with_a_key_takes_its_type_from_the_content_type(
    api: httpx.AsyncClient, notes: str
) -> None:
    r = await api.post(
        f"{notes}/files",
        files={"files": ("whatever", b"# Named\n\ntext", "text/markdown")},
        data={"key": "guides/named"},
    )
    assert r.status_code == 202, r.text
    assert [x["key"] for x in r.json()["results"]] == ["guides/named"]
    assert (await api.get(f"{notes}/documents/guides/named")).json()["title"] == "Named"


async def test_upload_of_jsonl_keeps_each_lines_key(api: httpx.AsyncClient, notes: str) -> None:
    lines = b'{"key": "j1", "text": "one"}\n{"key": "j2", "text": "two"}\n'
    r = await api.post(f"{notes}/files", files={"files": ("batch.jsonl", lines)})
    assert r.status_code == 202, r.text
    assert await keys(api, notes) == ["j1", "j2"]


async def test_bad_uploads_are_422_and_write_nothing(api: httpx.AsyncClient, notes: str) -> None:
    cases: list[tuple[list[Any], dict[str, str], str]] = [
        ([("files", ("bin.txt", bytes(range(256)) * 4, "text/plain"))], {}, "binary"),
        ([("files", ("latin.txt", "caf\xe9".encode("latin-1"), "text/plain"))], {}, "UTF-8"),
        ([("files", ("bad.pdf", b"%PDF-1.4\nbroken", "application/pdf"))], {}, "bad.pdf"),
        ([("files", ("cut.pdf", make_pdf(["Cut short."])[:150], "application/pdf"))], {}, "cut"),
        ([("files", ("empty.txt", b"", "text/plain"))], {}, "empty"),
        ([("files", ("blank.md", b"  \n\n ", "text/markdown"))], {}, "empty"),
        ([("files", ("tool.exe", b"MZ\x90\x00", "application/octet-stream"))], {}, ".exe"),
        ([("files", ("noext", b"text", "application/octet-stream"))], {}, "unsupported"),
        ([("files", ("bad.jsonl", b'{"key": "a"}\nnot json\n', "text/plain"))], {}, "jsonl"),
        (
            [("files", ("a.txt", b"one", "text/plain")), ("files", ("b.txt", b"two"))],
            {"key": "both"},
            "one file",
        ),
        (
            [("files", ("good.txt", b"fine text", "text/plain")), ("files", ("e.txt", b""))],
            {},
            "nothing was written",
        ),
        ([("files", ("a.txt", b"x", "text/plain"))], {"metadata": "[1]"}, "metadata"),
        ([("files", ("a.txt", b"x", "text/plain"))], {"metadata": "{nope"}, "metadata"),
        ([], {"key": "k"}, "files"),
    ]
    for files, data, needle in cases:
        r = await api.post(f"{notes}/files", files=files or None, data=data)
        assert needle in error_of(r, 422, "invalid")["message"], (files, data)
        assert await keys(api, notes) == []
    assert (await api.get("/v1/jobs")).json()["jobs"] == []


async def test_oversized_uploads_are_413(db_url: str) -> None:
    async with opened(db_url, api_max_upload_bytes=2048) as app:
        async with client(app, await token(app, "root")) as api:
            await api.post("/v1/collections", json={"name": "notes", "provider": "fake"})
            url = "/v1/collections/notes/files"
            fits = await api.post(url, files={"files": ("fits.txt", b"a " * 1024)})
            assert fits.status_code == 202, fits.text
            for files in [
                {"files": ("big.txt", b"a" * 2049)},  # just over: the route sees it
                {"files": ("huge.txt", b"a" * 200_000)},  # far over: refused before reading
                [("files", ("x.txt", b"a" * 1500)), ("files", ("y.txt", b"b" * 1500))],
            ]:
                r = await api.post(url, files=files)
                assert "api_max_upload_bytes" in error_of(r, 413, "too_large")["message"]
            assert await keys(api, "/v1/collections/notes") == ["fits.txt"]


async def test_oversized_json_bodies_are_413_with_or_without_a_length(db_url: str) -> None:
    async with opened(db_url, api_max_body_bytes=1024) as app:
        async with client(app, await token(app, "root")) as api:
            await api.post("/v1/collections", json={"name": "notes", "provider": "fake"})
            url = "/v1/collections/notes/documents/big"
            body = json.dumps({"text": "x" * 2000}).encode()
            headers = {"Content-Type": "application/json", "X-Request-ID": "big-1"}
            r = await api.put(url, content=body, headers=headers)
            error = error_of(r, 413, "too_large")
            assert "api_max_body_bytes" in error["message"] and error["request_id"] == "big-1"

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 256):
                    yield body[i : i + 256]

            r = await api.put(url, content=chunks(), headers={"Content-Type": "application/json"})
            assert "content-length" not in r.request.headers
            assert "api_max_body_bytes" in error_of(r, 413, "too_large")["message"]

            small = json.dumps({"text": "x" * 500}).encode()

            async def small_chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(small), 100):
                    yield small[i : i + 100]

            r = await api.put(
                url, content=small_chunks(), headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 202, r.text
            assert await keys(api, "/v1/collections/notes") == ["big"]


# --- search ------------------------------------------------------------------------------


async def test_search_modes_and_bad_requests(
    app: embedq.App, api: httpx.AsyncClient, notes: str
) -> None:
    docs = [
        {"key": "cats", "text": "cats purr and sleep all day", "metadata": {"lang": "en"}},
        {"key": "dogs", "text": "dogs bark at the mail carrier", "metadata": {"lang": "en"}},
        {"key": "chats", "text": "les chats dorment", "metadata": {"lang": "fr"}},
    ]
    assert (await api.post(f"{notes}/documents", json={"documents": docs})).status_code == 202
    await drain(app)
    for mode in ("semantic", "keyword", "hybrid"):
        r = await api.post(f"{notes}/search", json={"query": "cats purr", "mode": mode, "k": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["mode"] == mode and out["hits"] and len(out["hits"]) <= 2
        assert out["hits"][0]["key"] == "cats", (mode, out)
        assert out["took_ms"] >= 0
    r = await api.post(f"{notes}/search", json={"query": "dogs", "filters": {"lang": "fr"}})
    assert [h["key"] for h in r.json()["hits"]] == ["chats"]

    for body in [
        {"query": "x", "k": 0},
        {"query": "x", "k": 1001},
        {"query": "x", "mode": "fuzzy"},
        {"query": ""},
        {"query": "x", "filters": {"lang": {"$regex": "e.*"}}},
        {"query": "x", "filters": {"lang": {"$in": "en"}}},
        {"query": "x", "filters": {"lang": {"$exists": "yes"}}},
        {"query": "x", "filters": "lang=en"},
    ]:
        error_of(await api.post(f"{notes}/search", json=body), 422, "invalid")
    r = await api.post(f"{notes}/search", json={"query": "x", "filters": {"lang": {"$like": 1}}})
    assert "$like" in error_of(r, 422)["message"]


# --- jobs and queues ---------------------------------------------------------------------


async def test_jobs_enqueue_list_show_retry_cancel(app: embedq.App, api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/jobs", json={"task": "embedq.fail", "args": {"permanent": True}})
    assert r.status_code == 202, r.text
    dead = r.json()["id"]
    await drain(app)
    ok = (await api.post("/v1/jobs", json={"task": "embedq.noop"})).json()["id"]
    await drain(app)
    pending = (await api.post("/v1/jobs", json={"task": "embedq.noop", "priority": 5})).json()
    assert pending["coalesced"] is False
    pending_id = pending["id"]

    async def listed(**params: Any) -> list[int]:
        r = await api.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert await listed(state="dead") == [dead]
    assert await listed(state="failed") == [dead]
    assert await listed(state="pending") == [pending_id]
    assert await listed(state="succeeded") == [ok]
    assert set(await listed()) == {dead, ok, pending_id}
    assert await listed(task="embedq.fail") == [dead]
    assert await listed(limit=1) == [pending_id]
    error_of(await api.get("/v1/jobs", params={"state": "lost"}), 422)

    job = (await api.get(f"/v1/jobs/{dead}")).json()
    assert job["state"] == "dead" and job["task"] == "embedq.fail"
    events = [e["event"] for e in job["events"]]
    assert events[0] == "enqueued" and events[-1] == "dead", events

    r = await api.post(f"/v1/jobs/{dead}/retry")
    assert (r.status_code, r.json()) == (200, {"retried": [dead]})
    assert (await api.get(f"/v1/jobs/{dead}")).json()["state"] == "pending"
    assert "pending" in error_of(await api.post(f"/v1/jobs/{dead}/retry"), 409)["message"]
    error_of(await api.post(f"/v1/jobs/{ok}/retry"), 409, "conflict")

    r = await api.post(f"/v1/jobs/{pending_id}/cancel")
    assert (r.status_code, r.json()) == (200, {"cancelled": [pending_id]})
    assert (await api.get(f"/v1/jobs/{pending_id}")).json()["state"] == "cancelled"
    error_of(await api.post(f"/v1/jobs/{pending_id}/cancel"), 409, "conflict")
    assert "succeeded" in error_of(await api.post(f"/v1/jobs/{ok}/cancel"), 409)["message"]
    r = await api.post(f"/v1/jobs/{pending_id}/retry")  # a cancelled job may run again
    assert r.json() == {"retried": [pending_id]}

    for r in [
        await api.get("/v1/jobs/999999"),
        await api.post("/v1/jobs/999999/retry"),
        await api.post("/v1/jobs/999999/cancel"),
    ]:
        assert "999999" in error_of(r, 404, "not_found")["message"]
    error_of(await api.get("/v1/jobs/abc"), 422)


async def test_enqueue_checks_the_task(api: httpx.AsyncClient) -> None:
    error = error_of(await api.post("/v1/jobs", json={"task": "billing.sync"}), 422, "invalid")
    assert "billing.sync" in error["message"] and "embedq.noop" in error["message"]
    r = await api.post(
        "/v1/jobs",
        json={"task": "billing.sync", "any_task": True, "queue": "billing", "delay_s": 60},
    )
    assert r.status_code == 202, r.text
    job = (await api.get(f"/v1/jobs/{r.json()['id']}")).json()
    assert (job["task"], job["queue"], job["state"]) == ("billing.sync", "billing", "pending")
    twice = [
        (await api.post("/v1/jobs", json={"task": "embedq.noop", "dedup_key": "once"})).json()
        for _ in range(2)
    ]
    assert twice[1] == {"id": twice[0]["id"], "coalesced": True}
    for body in [
        {"task": ""},
        {"task": "embedq.noop", "queue": "bad queue"},
        {"task": "embedq.noop", "priority": -1},
        {"task": "embedq.noop", "args": [1]},
        {"task": "embedq.noop", "when": "now"},
    ]:
        error_of(await api.post("/v1/jobs", json=body), 422)


async def test_queues_stats_pause_resume_and_workers(
    app: embedq.App, api: httpx.AsyncClient
) -> None:
    await api.post("/v1/jobs", json={"task": "embedq.noop"})
    await drain(app)
    await api.post("/v1/jobs", json={"task": "embedq.noop"})

    status = (await api.get("/v1/queues")).json()
    assert status["queues"]["default"]["pending"] == 1
    assert status["queues"]["default"]["succeeded_1h"] == 1
    assert status["queues"]["default"]["paused"] is False
    assert int(status["overview"]["due"]) == 1

    stats = (await api.get("/v1/queues/stats", params={"hours": 1})).json()
    assert stats["window_hours"] == 1
    assert "embedq.noop" in {t["task"] for t in stats["tasks"]}
    error_of(await api.get("/v1/queues/stats", params={"hours": 0}), 422)

    r = await api.post("/v1/queues/default/pause")
    assert (r.status_code, r.json()) == (200, {"queue": "default", "paused": True})
    assert (await api.get("/v1/queues")).json()["queues"]["default"]["paused"] is True
    r = await api.post("/v1/queues/default/resume")
    assert r.json() == {"queue": "default", "paused": False}
    assert (await api.get("/v1/queues")).json()["queues"]["default"]["paused"] is False
    for action in ("pause", "resume"):
        error = error_of(await api.post(f"/v1/queues/nowhere/{action}"), 404, "not_found")
        assert "nowhere" in error["message"]

    workers = (await api.get("/v1/workers")).json()["workers"]
    assert len(workers) == 1 and workers[0]["name"]


# --- settings ----------------------------------------------------------------------------


async def test_settings_list_set_unset_and_secrets_masked(db_url: str) -> None:
    key = "sk-test-" + "k3y" * 10
    async with opened(db_url, secret_key=generate_key()) as app:
        async with client(app, await token(app, "root")) as api:
            rows = {r["name"]: r for r in (await api.get("/v1/settings")).json()["settings"]}
            assert rows["worker_concurrency"]["source"] == "default"
            assert rows["secret_key"]["value"] == MASK
            assert rows["database_url"]["value"] == describe_target(db_url) != db_url

            r = await api.put("/v1/settings/openai_api_key", json={"value": key})
            assert r.status_code == 200, r.text
            assert pick(r.json(), "value", "source", "secret") == (MASK, "database", True)
            listed = await api.get("/v1/settings")
            assert key not in r.text and key not in listed.text
            rows = {r["name"]: r for r in listed.json()["settings"]}
            assert rows["openai_api_key"]["value"] == MASK
            assert app.settings.openai_api_key is not None
            assert app.settings.openai_api_key.get_secret_value() == key  # stored and read back

            r = await api.put("/v1/settings/worker_concurrency", json={"value": 7})
            assert pick(r.json(), "value", "source", "editable") == (7, "database", True)
            assert app.settings.worker_concurrency == 7
            r = await api.put("/v1/settings/worker_concurrency", json={"value": "8"})
            assert r.json()["value"] == 8
            r = await api.put("/v1/settings/worker_queues", json={"value": ["a", "b"]})
            assert r.json()["value"] == ["a", "b"]

            for name, value, needle in [
                ("worker_concurrency", 0, "worker_concurrency"),
                ("worker_concurrency", "lots", "worker_concurrency"),
                ("log_format", "xml", "log_format"),
                ("heartbeat_s", 100, "lease_s"),
                ("database_url", "postgresql://x/y", "environment"),
                ("secret_key", generate_key(), "environment"),
                ("api_auth", False, "environment"),
            ]:
                r = await api.put(f"/v1/settings/{name}", json={"value": value})
                assert needle in error_of(r, 422, "invalid")["message"], (name, value)
            error_of(await api.put("/v1/settings/worker_concurrency", json={}), 422)
            assert app.settings.worker_concurrency == 8

            for r in [
                await api.put("/v1/settings/no_such_thing", json={"value": 1}),
                await api.delete("/v1/settings/no_such_thing"),
            ]:
                assert "no_such_thing" in error_of(r, 404, "not_found")["message"]

            r = await api.delete("/v1/settings/worker_concurrency")
            assert pick(r.json(), "removed", "source", "value") == (True, "default", 10)
            r = await api.delete("/v1/settings/worker_concurrency")
            assert r.json()["removed"] is False
            r = await api.delete("/v1/settings/openai_api_key")
            assert pick(r.json(), "removed", "value") == (True, None)
            assert app.settings.openai_api_key is None


async def test_a_secret_setting_needs_the_secret_key(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/settings/openai_api_key", json={"value": "sk-nothing-stored"})
    error = error_of(r, 422, "invalid")
    assert "EMBEDQ_SECRET_KEY" in error["message"] and "sk-nothing" not in r.text


# --- tokens ------------------------------------------------------------------------------


async def test_tokens_create_list_revoke(asgi: FastAPI, api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/tokens", json={"name": "ci", "scopes": ["write", "read"]})
    assert r.status_code == 201, r.text
    made = r.json()
    secret = made["token"]
    assert secret.startswith("eq_") and len(secret) > 40
    assert (made["name"], made["scopes"]) == ("ci", ["read", "write"])
    assert secret.startswith(made["prefix"])

    listed = await api.get("/v1/tokens")
    assert secret not in listed.text
    names = {t["name"]: t for t in listed.json()["tokens"]}
    assert set(names) == {"root", "ci"}
    fields = {"id", "name", "prefix", "scopes", "created_at", "last_used_at", "revoked_at"}
    assert set(names["ci"]) == fields

    async with client(asgi, secret) as ci:
        me = await ci.get("/v1/whoami")
        assert me.json() == {"name": "ci", "scopes": ["read", "write"]}
        error_of(await ci.get("/v1/tokens"), 403, "forbidden")
        r = await api.delete("/v1/tokens/ci")
        assert (r.status_code, r.json()) == (200, {"revoked": "ci"})
        # the revoke went through this service: its token cache is dropped at once
        error_of(await ci.get("/v1/whoami"), 401, "unauthorized")
    listed = (await api.get("/v1/tokens")).json()["tokens"]
    assert [t["name"] for t in listed] == ["root"]

    error_of(await api.delete("/v1/tokens/ci"), 404, "not_found")
    r = await api.post("/v1/tokens", json={"name": "root", "scopes": ["read"]})
    assert "revoke it first" in error_of(r, 422)["message"]
    for body in [
        {"name": "x", "scopes": ["superuser"]},
        {"name": "x", "scopes": []},
        {"name": "bad name", "scopes": ["read"]},
        {"name": "x"},
    ]:
        r = await api.post("/v1/tokens", json=body)
        error_of(r, 422, "invalid")
    assert len((await api.get("/v1/tokens")).json()["tokens"]) == 1


# --- rate limit --------------------------------------------------------------------------


async def test_rate_limit_per_token(db_url: str) -> None:
    async with opened(db_url, api_rate_limit_per_s=1, api_rate_burst=3) as app:
        first, second = await token(app, "first", "read"), await token(app, "second", "read")
        api = create_app(app, manage=False)
        async with client(api, first) as one, client(api, second) as two:
            answers = [await one.get("/v1/collections") for _ in range(4)]
            assert [r.status_code for r in answers[:3]] == [200, 200, 200]
            error = error_of(answers[3], 429, "rate_limited")
            assert answers[3].headers["retry-after"] == "1"
            assert "'first'" in error["message"] and "api_rate_limit_per_s" in error["message"]
            assert (await two.get("/v1/collections")).status_code == 200  # a bucket per token
