"""Who may call what: every route of the API against every kind of credential, and secrets
(tokens, provider keys, the database password) kept out of logs, errors and answers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import BaseRoute, Mount
from tests.api_helpers import bearer, client, error_of, opened, token
from tests.conftest import drain
from tests.fake_servers import FakeOpenAI

import embedq
from embedq.api.app import bootstrap_admin, create_app
from embedq.stored_settings import MASK, generate_key
from embedq.tokens import Tokens, new_secret

# The scope each route needs; "any": any valid token. A new route fails the coverage test
# below until it has a line here.
SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/metrics"): "read",
    ("GET", "/v1/whoami"): "any",
    ("GET", "/v1/collections"): "read",
    ("POST", "/v1/collections"): "admin",
    ("GET", "/v1/collections/{name}"): "read",
    ("PATCH", "/v1/collections/{name}"): "admin",
    ("DELETE", "/v1/collections/{name}"): "admin",
    ("GET", "/v1/collections/{name}/documents"): "read",
    ("POST", "/v1/collections/{name}/documents"): "write",
    ("PUT", "/v1/collections/{name}/documents/{key:path}"): "write",
    ("GET", "/v1/collections/{name}/documents/{key:path}"): "read",
    ("DELETE", "/v1/collections/{name}/documents/{key:path}"): "write",
    ("POST", "/v1/collections/{name}/files"): "write",
    ("POST", "/v1/collections/{name}/search"): "read",
    ("GET", "/v1/jobs"): "read",
    ("POST", "/v1/jobs"): "write",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("POST", "/v1/jobs/{job_id}/retry"): "admin",
    ("POST", "/v1/jobs/{job_id}/cancel"): "admin",
    ("GET", "/v1/queues"): "read",
    ("GET", "/v1/queues/stats"): "read",
    ("POST", "/v1/queues/{name}/pause"): "admin",
    ("POST", "/v1/queues/{name}/resume"): "admin",
    ("GET", "/v1/workers"): "read",
    ("GET", "/v1/settings"): "admin",
    ("PUT", "/v1/settings/{name}"): "admin",
    ("DELETE", "/v1/settings/{name}"): "admin",
    ("GET", "/v1/tokens"): "admin",
    ("POST", "/v1/tokens"): "admin",
    ("DELETE", "/v1/tokens/{name}"): "admin",
    ("PUT", "/v1/collections/{name}/webhook"): "admin",
    ("GET", "/v1/collections/{name}/webhook"): "admin",
    ("DELETE", "/v1/collections/{name}/webhook"): "admin",
    ("POST", "/v1/embeddings"): "read",
    ("GET", "/v1/models"): "read",
    ("GET", "/v1/models/{model:path}"): "read",
}
OPEN = {"/health/live", "/health/ready"}
NOT_API = {"/openapi.json", "/", "/ui"}  # the schema, and redirects to the dashboard
PARAMS = {
    "{name}": "nope",
    "{key:path}": "some/made-up.md",
    "{job_id}": "999999",
    "{model:path}": "no/such-model",
}


def flatten(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, descending into included routers (FastAPI may keep
    them as one entry of `api.routes`)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from flatten(inner.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(route, Mount):
            assert route.path == "/ui", f"unexpected mount {route.path}: check its auth"
        else:
            path = prefix + str(getattr(route, "path", ""))
            for method in sorted(getattr(route, "methods", None) or ()):
                if method != "HEAD":
                    yield method, path


def api_routes(api: FastAPI) -> set[tuple[str, str]]:
    return {(m, p) for m, p in flatten(api.routes) if p not in NOT_API and p not in OPEN}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: PARAMS[m.group(0)], path)


def allows(held: str, needed: str) -> bool:
    return needed == "any" or held in (needed, "admin")


@pytest.fixture
def api(app: embedq.App) -> FastAPI:
    return create_app(app, manage=False)


def test_the_scope_table_covers_every_route(api: FastAPI) -> None:
    routes = api_routes(api)
    assert routes - set(SCOPES) == set(), "routes without an expected scope in SCOPES"
    assert set(SCOPES) - routes == set(), "SCOPES names routes the app does not have"
    assert {p for _, p in flatten(api.routes)} >= OPEN
    assert set(PARAMS) >= {m for _, p in SCOPES for m in re.findall(r"\{[^}]+\}", p)}


async def test_every_route_against_every_credential(app: embedq.App, api: FastAPI) -> None:
    tokens = {s: await token(app, f"only-{s}", s) for s in ("read", "write", "admin")}
    revoked = await token(app, "revoked", "admin")
    await Tokens(app).revoke("revoked")
    refused = {
        "no token": {},
        "malformed": bearer("not-a-token"),
        "empty": {"Authorization": "Bearer "},
        "unknown": bearer(new_secret()),
        "revoked": bearer(revoked),
        "other scheme": {"Authorization": f"Basic {tokens['admin']}"},
    }
    async with client(api) as c:
        for (method, path), needed in sorted(SCOPES.items()):
            url = concrete(path)
            for what, headers in refused.items():
                r = await c.request(method, url, headers=headers)
                error = error_of(r, 401, "unauthorized")
                assert r.headers["www-authenticate"].startswith("Bearer"), (method, path, what)
                assert "token" in error["message"]
            for held, secret in tokens.items():
                r = await c.request(method, url, headers=bearer(secret))
                if allows(held, needed):
                    assert r.status_code not in (401, 403), (method, path, held, r.text)
                    assert r.status_code < 500, (method, path, held, r.text)
                else:
                    error = error_of(r, 403, "forbidden")
                    assert f"'{needed}'" in error["message"], (method, path, held)
                    assert "insufficient_scope" in r.headers["www-authenticate"]


async def test_health_is_open_and_auth_can_be_turned_off(app: embedq.App, db_url: str) -> None:
    async with client(app) as c:
        for path in sorted(OPEN):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
        assert (await c.get("/health/ready")).json()["status"] == "ok"
        error_of(await c.get("/v1/whoami"), 401)

    async with opened(db_url, api_auth=False) as open_app, client(open_app) as c:
        r = await c.get("/v1/whoami")
        assert r.json() == {"name": "anonymous", "scopes": ["admin"]}
        assert (await c.get("/v1/settings")).status_code == 200
        r = await c.post("/v1/collections", json={"name": "free", "provider": "fake"})
        assert r.status_code == 201
        r = await c.get("/v1/collections", headers=bearer("whatever"))
        assert r.status_code == 200


# --- secrets ------------------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    """The URL with a password for its user. The test server trusts local connections, so
    the password is carried everywhere but never checked."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}{port}"))


class Captured(logging.Handler):
    """Every record of every logger, formatted, with its extra fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> Iterator[str]:
        plain = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in self.records:
            yield plain.format(record)
            yield repr(record.__dict__)


async def test_secrets_stay_out_of_logs_errors_and_answers(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = "Pw-" + new_secret()[3:20]
    api_key = "sk-live-" + new_secret()[3:30]
    secret_key = generate_key()
    admin_env = new_secret()
    wrong = new_secret()
    answers: list[httpx.Response] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        answers.append(response)

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="embedq")
    # embedq's own records (the access log among them) even if a logging setup stopped them
    # from reaching the root logger
    ours = Captured()
    logging.getLogger("embedq").addHandler(ours)
    url = with_password(db_url, password)
    try:
        with FakeOpenAI(dims=64, api_key=api_key) as srv, FakeOpenAI(api_key="sk-other") as bad:
            async with opened(url, secret_key=secret_key, admin_token=admin_env) as app:
                assert app.settings.database_url is not None
                assert password in app.settings.database_url.get_secret_value()
                assert await bootstrap_admin(app) is None  # the configured one: nothing shown
                root = await token(app, "root", "admin")
                api = create_app(app, manage=False)
                async with client(api, root, event_hooks={"response": [keep]}) as c:
                    r = await c.post("/v1/tokens", json={"name": "ci", "scopes": ["write"]})
                    ci, creating = r.json()["token"], r
                    await c.get("/v1/tokens")
                    r = await c.put("/v1/settings/openai_api_key", json={"value": api_key})
                    assert r.json()["value"] == MASK
                    # a secret given as the value of another setting is not echoed either
                    for name in ("worker_concurrency", "log_format", "embedding_provider"):
                        r = await c.put(f"/v1/settings/{name}", json={"value": api_key})
                        error_of(r, 422, "invalid")
                    rows = (await c.get("/v1/settings")).json()["settings"]
                    shown = {r["name"]: r["value"] for r in rows}
                    assert shown["database_url"] and password not in str(shown["database_url"])
                    assert shown["admin_token"] == shown["secret_key"] == MASK

                    model = {"model": "text-embedding-3-small", "dimensions": 64}
                    for name, base in (("good", srv.base_url), ("refused", bad.base_url)):
                        r = await c.post(
                            "/v1/collections",
                            json={"name": name, "provider": "openai", "base_url": base, **model},
                        )
                        assert r.status_code == 201, r.text
                    writer = {"Authorization": f"Bearer {ci}"}
                    for name in ("good", "refused"):
                        r = await c.put(
                            f"/v1/collections/{name}/documents/a",
                            json={"text": "some text to embed"},
                            headers=writer,
                        )
                        assert r.status_code == 202
                    await drain(app, timeout=30)
                    assert srv.last_headers.get("authorization") == f"Bearer {api_key}"
                    good = (await c.get("/v1/collections/good/documents/a")).json()
                    assert good["status"] == "embedded"
                    failed = (await c.get("/v1/collections/refused/documents/a")).json()
                    assert failed["status"] == "failed" and failed["error"]

                    for headers in (bearer(wrong), bearer(ci + "x"), {"Authorization": ci}):
                        error_of(await c.get("/v1/whoami", headers=headers), 401)
                    error_of(await c.get("/v1/settings", headers=writer), 403)
                    r = await c.get("/v1/whoami", headers=bearer(admin_env))
                    assert r.json()["name"] == "admin-env"
                    await c.delete("/v1/tokens/ci")
                    error_of(await c.get("/v1/whoami", headers=writer), 401)
                    assert (await c.get("/metrics")).status_code == 200
                    assert (await c.get("/v1/jobs")).status_code == 200
                    error_of(await c.get("/v1/nope"), 404)
    finally:
        logging.getLogger("embedq").removeHandler(ours)

    secrets = {
        "root token": root,
        "created token": ci,
        "env admin token": admin_env,
        "wrong token": wrong,
        "api key": api_key,
        "secret key": secret_key,
        "database password": password,
    }
    access = [r for r in ours.records if r.name == "embedq.api.access"]
    assert any("GET /v1/whoami 401" in r.getMessage() for r in access), "no access log"
    assert any(r.name.startswith("embedq.worker") for r in ours.records)
    logged = [
        *ours.texts(),
        *(t for r in caplog.records for t in (r.getMessage(), repr(r.__dict__))),
    ]
    for what, value in secrets.items():
        for line in logged:
            assert value not in line, f"the {what} is in a log record: {line[:300]}"
    assert len(answers) > 20
    for r in answers:
        text = r.text + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        for what, value in secrets.items():
            if r is creating and what == "created token":
                assert r.json()["token"] == value and text.count(value) == 1
                continue
            assert value not in text, f"the {what} is in the answer to {r.request.url}"
