"""Property-based fuzzing of the HTTP API with Schemathesis: requests generated from the
service's own OpenAPI document (valid and invalid ones, boundary values included) against a
real `embedq serve`, with an admin token. Whatever a client sends, the answer is never a 5xx.

The served database holds a collection and a document under the names the generator tries
first ("0" and "A"), so collection, document and search routes are reached with a real
collection and not only as 404s.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from tests.conftest import cli_env, create_db, drop_db
from tests.served import ServeProc, Servers

import embedq
from embedq.api.app import create_app

SEEDED = ("0", "A")


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, template_url: str
) -> Iterator[tuple[ServeProc, str]]:
    db_url = create_db(pg_url)
    token = "eq_" + secrets.token_urlsafe(32)
    env = cli_env(
        db_url,
        EMBEDQ_ADMIN_TOKEN=token,
        EMBEDQ_EMBEDDING_PROVIDER="fake",
        EMBEDQ_API_RATE_LIMIT_PER_S="0",  # the fuzzer is one token sending as fast as it can
        EMBEDQ_API_WAIT_MAX_S="2",  # `?wait=true&timeout=3600` must not stall the run
        # A generated collection may name the local provider and any model: fail fast
        # instead of reaching for a model hub that is not there.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    servers = Servers(Path(tmp_path_factory.mktemp("schemathesis")))
    try:
        server = servers.start(env)
        server.wait_ready()
        seed(server, token)
        yield server, token
        assert server.stop() == 0, server.logs()
        assert "Traceback" not in server.stderr(), server.logs()
    finally:
        servers.cleanup()
        drop_db(pg_url, db_url)


def seed(server: ServeProc, token: str) -> None:
    with httpx.Client(base_url=server.url, headers=server.auth(token), timeout=30) as http:
        for name in SEEDED:
            r = http.post(
                "/v1/collections", json={"name": name, "provider": "fake", "exist_ok": True}
            )
            assert r.status_code in (200, 201), r.text
            r = http.put(
                f"/v1/collections/{name}/documents/{name}",
                params={"wait": "true"},
                json={"text": "Sea otters hold hands.", "metadata": {"n": 1}},
            )
            assert r.status_code == 200, r.text


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document `embedq serve` answers at /openapi.json (a test below checks).
    Built in process so the operations are known when pytest collects the tests."""
    return create_app(embedq.App(database_url="postgresql://unused@127.0.0.1:1/unused")).openapi()


schema = (
    schemathesis.openapi.from_dict(openapi_document())
    # Settings change the service for every later request (a provider URL set to garbage,
    # rate limits lowered to one request a minute): they have their own tests.
    .exclude(method=["PUT", "DELETE"], path="/v1/settings/{name}")
    # Revoking a token could revoke the one this test sends.
    .exclude(method="DELETE", path="/v1/tokens/{name}")
)


def test_the_served_document_is_the_fuzzed_one(served: tuple[ServeProc, str]) -> None:
    server, _ = served
    r = httpx.get(server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    assert r.json() == openapi_document()


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_request_gets_a_server_error(
    case: schemathesis.Case, served: tuple[ServeProc, str]
) -> None:
    server, token = served
    response = case.call(base_url=server.url, headers=server.auth(token), timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if case.method == "DELETE" and case.operation.path == "/v1/collections/{name}":
        seed(server, token)  # a dropped seed would leave the later operations only 404s


# What the fuzzer found, pinned: each must be a client error (404 or 422), never a 5xx.
NUL = "\u0000"
FOUND = [
    pytest.param("POST", "/v1/collections",
                 {"json": {"name": "n", "provider": "fake", "options": {"a": NUL}}},
                 id="collection-options-nul"),
    pytest.param("POST", "/v1/jobs/99999999999999999999/retry", {}, id="retry-id-past-bigint"),
    pytest.param("GET", "/v1/jobs", {"params": {"task": NUL}}, id="jobs-task-nul"),
    pytest.param("GET", "/v1/jobs", {"params": {"queue": NUL}}, id="jobs-queue-nul"),
    pytest.param("POST", "/v1/jobs", {"json": {"task": "x", "any_task": True, "args": {"a": NUL}}},
                 id="enqueue-args-nul"),
    pytest.param("POST", "/v1/jobs", {"json": {"task": "x", "any_task": True, "lock_key": NUL}},
                 id="enqueue-lock-key-nul"),
    pytest.param("POST", "/v1/jobs", {"json": {"task": "x", "any_task": True, "dedup_key": NUL}},
                 id="enqueue-dedup-key-nul"),
    pytest.param("POST", "/v1/collections/0/search", {"json": {"query": "a" + NUL}},
                 id="search-query-nul"),
    pytest.param("POST", "/v1/collections/0/search",
                 {"json": {"query": "a", "filters": {"a": NUL}}}, id="search-filter-nul"),
    # ef_search = 4 k passes pgvector's limit of 1000 from k = 251 on (MAX_K is 1000)
    pytest.param("POST", "/v1/collections/0/search", {"json": {"query": "a", "k": 251}},
                 id="search-k-251"),
    pytest.param("POST", "/v1/collections/0/search",
                 {"json": {"query": "a", "k": 1000, "mode": "keyword"}}, id="search-k-1000"),
    pytest.param("GET", "/v1/collections/%00", {}, id="collection-name-nul"),
    pytest.param("GET", "/v1/collections/0/documents/%00", {}, id="document-key-nul"),
    pytest.param("DELETE", "/v1/collections/0/documents/%00", {}, id="delete-key-nul"),
    pytest.param("POST", "/v1/queues/%00/pause", {}, id="pause-queue-nul"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kw"), FOUND)
def test_found_inputs_are_client_errors(
    served: tuple[ServeProc, str], method: str, path: str, kw: dict[str, Any]
) -> None:
    server, token = served
    r = httpx.request(method, server.url + path, headers=server.auth(token), timeout=30, **kw)
    assert r.status_code < 500, r.text
