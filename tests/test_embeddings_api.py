"""The OpenAI-compatible embeddings API, through the official `openai` client.

One module-scoped service (in process, on httpx's ASGI transport) holds three collections,
one per kind of model: `notes` on the bundled local model, `tickets` on the fake provider,
`papers` on text-embedding-3-small behind a fake OpenAI server. The vectors the API returns
are checked against those the collections' chunks got and those the provider makes. One more
test runs `embedq serve` and talks to it with the synchronous client, as an application would.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import psycopg
import pytest
from tests.api_helpers import BASE, token
from tests.conftest import cli_env, create_db, drain, drop_db
from tests.fake_servers import FakeOpenAI, fake_vector
from tests.served import Servers

import embedq
from embedq.api.app import create_app
from embedq.api.embeddings import max_input_tokens, tiktoken_encoding
from embedq.chunking import tokenizer_for
from embedq.providers import ProviderConfig
from embedq.providers.fake import FakeProvider

LOCAL = "all-MiniLM-L6-v2"
NOTES = {
    "otters": "Sea otters hold hands while they sleep so they do not drift apart.",
    "vacuum": "VACUUM reclaims the space taken by dead rows in PostgreSQL tables.",
}
TICKETS = {"t-1": "The printer on floor three is jammed again."}
PAPERS = {"p-1": "Attention is all you need: a sequence model built on attention alone."}


@dataclass
class Env:
    app: embedq.App
    client: openai.AsyncOpenAI
    api: object
    reader: str
    writer: str
    server: FakeOpenAI
    db_url: str

    def as_(self, secret: str) -> openai.AsyncOpenAI:
        """A client of the same service with another API key."""
        return openai.AsyncOpenAI(
            base_url=BASE + "/v1",
            api_key=secret,
            max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=self.api)),  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dims=1536) as srv:
        yield srv


@pytest.fixture(scope="module")
def module_db(pg_url: str, template_url: str) -> Iterator[str]:
    url = create_db(pg_url)
    yield url
    drop_db(pg_url, url)


@pytest.fixture(scope="module")
async def env(module_db: str, fake_openai: FakeOpenAI) -> AsyncIterator[Env]:
    app = embedq.App(database_url=module_db, poll_interval_s=0.2, heartbeat_s=0.5, lease_s=5)
    await app.open()
    try:
        notes = await app.collections.create("notes", provider="local")
        tickets = await app.collections.create("tickets", provider="fake", model="fake-128")
        papers = await app.collections.create(
            "papers",
            provider="openai",
            model="text-embedding-3-small",
            base_url=fake_openai.base_url,
        )
        for col, docs in ((notes, NOTES), (tickets, TICKETS), (papers, PAPERS)):
            await col.upsert_many([{"key": k, "text": t} for k, t in docs.items()])
        await drain(app, timeout=120)
        api = create_app(app, manage=False)
        reader = await token(app, "reader", "read")
        writer = await token(app, "writer", "write")
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api))
        client = openai.AsyncOpenAI(
            base_url=BASE + "/v1",
            api_key=reader,
            max_retries=0,
            http_client=http,  # type: ignore[arg-type]
        )
        yield Env(app, client, api, reader, writer, fake_openai, module_db)
        await http.aclose()
    finally:
        await app.close()


async def chunk_vectors(db_url: str, collection: str) -> dict[str, np.ndarray]:
    """The stored vector of each chunk of `collection`, by the chunk's text."""
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT c.content, c.embedding::text FROM embedq.chunks c "
            "JOIN embedq.spaces s ON s.id = c.space_id "
            "JOIN embedq.collections col ON col.id = s.collection_id WHERE col.name = %s",
            (collection,),
        )
        rows = await cur.fetchall()
    return {text: np.array(json.loads(vector), dtype=np.float32) for text, vector in rows}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- models --------------------------------------------------------------------------------


async def test_models_lists_the_local_model_first_then_each_collections(env: Env) -> None:
    models = await env.client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [LOCAL, "fake-128", "text-embedding-3-small"]
    by_id = {m.id: m for m in models.data}
    assert all(m.object == "model" and m.owned_by == "embedq" for m in models.data)
    assert all(isinstance(m.created, int) and m.created > 1_500_000_000 for m in models.data)
    extra = by_id["text-embedding-3-small"].model_extra or {}
    assert extra["collections"] == ["papers"] and extra["dimensions"] == 1536
    assert (by_id[LOCAL].model_extra or {})["collections"] == ["notes"]

    # the hub name of the bundled model and provider/model name the same model
    for alias in (f"sentence-transformers/{LOCAL}", f"local/{LOCAL}"):
        assert (await env.client.models.retrieve(alias)).id == LOCAL
    with pytest.raises(openai.NotFoundError) as caught:
        await env.client.models.retrieve("gpt-4o")
    assert "model 'gpt-4o' is not served here" in caught.value.message
    assert caught.value.status_code == 404


async def test_the_local_model_is_served_without_a_collection(
    pg_url: str, template_url: str
) -> None:
    url = create_db(pg_url)
    try:
        async with embedq.App(database_url=url) as app:
            api = create_app(app, manage=False)
            secret = await token(app, "reader", "read")
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=api), base_url=BASE
            ) as http:
                r = await http.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        [model] = r.json()["data"]
        assert model["id"] == LOCAL and model["collections"] == []
        assert model["owned_by"] == "embedq" and model["object"] == "model"
    finally:
        drop_db(pg_url, url)


# --- embeddings: the same vectors as the collections' --------------------------------------


async def test_one_input_gets_the_vector_its_collection_chunk_got(env: Env) -> None:
    text = NOTES["otters"]
    answer = await env.client.embeddings.create(model=LOCAL, input=text, encoding_format="float")
    assert answer.object == "list" and answer.model == LOCAL
    [row] = answer.data
    assert row.object == "embedding" and row.index == 0
    vector = np.array(row.embedding, dtype=np.float32)
    assert vector.shape == (384,)

    stored = (await chunk_vectors(env.db_url, "notes"))[text]
    assert cosine(vector, stored) > 0.99999
    # and what the provider makes for it, as a search query would be embedded
    config = ProviderConfig(provider="local", model=LOCAL)
    [direct] = await env.app.endpoints.get(config).embed([text])
    np.testing.assert_allclose(vector, direct, atol=1e-6)

    tokens = tokenizer_for(config).count(text)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens > 5


async def test_many_inputs_come_back_in_order_and_base64_decodes_to_the_same_floats(
    env: Env,
) -> None:
    texts = [*NOTES.values(), "a third text", "a third text"]
    floats = await env.client.embeddings.create(model=LOCAL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2, 3]
    matrix = np.array([d.embedding for d in floats.data], dtype=np.float32)
    stored = await chunk_vectors(env.db_url, "notes")
    for i, text in enumerate(NOTES.values()):
        assert cosine(matrix[i], stored[text]) > 0.99999
    assert cosine(matrix[0], matrix[1]) < 0.5  # unrelated texts are not the same vector
    np.testing.assert_array_equal(matrix[2], matrix[3])

    # the client asks for base64 unless told otherwise, and decodes it itself
    default = await env.client.embeddings.create(model=LOCAL, input=texts)
    np.testing.assert_allclose(
        np.array([d.embedding for d in default.data], dtype=np.float32), matrix, atol=1e-6
    )
    raw = await env.client.embeddings.create(model=LOCAL, input=texts, encoding_format="base64")
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in raw.data]
    )
    # base64 carries the float32 bits; the JSON floats are float32's shortest exact form
    np.testing.assert_array_equal(decoded, matrix)
    assert raw.usage.prompt_tokens == floats.usage.prompt_tokens


async def test_each_collection_model_is_served_with_its_own_provider(env: Env) -> None:
    text = TICKETS["t-1"]
    answer = await env.client.embeddings.create(model="fake-128", input=[text])
    vector = np.array(answer.data[0].embedding, dtype=np.float32)
    expected = FakeProvider(ProviderConfig(provider="fake", model="fake-128")).vector(text)
    np.testing.assert_allclose(vector, expected, atol=1e-6)
    assert cosine(vector, (await chunk_vectors(env.db_url, "tickets"))[text]) > 0.99999

    # the whole 2048 at once: split into the provider's batches, returned in order
    texts = [f"ticket number {i} about the printer" for i in range(2048)]
    many = await env.client.embeddings.create(model="fake-128", input=texts)
    assert [d.index for d in many.data] == list(range(2048))
    for i in (0, 1, 777, 2047):
        fake = FakeProvider(ProviderConfig(provider="fake", model="fake-128")).vector(texts[i])
        np.testing.assert_allclose(np.array(many.data[i].embedding), fake, atol=1e-6)


async def test_an_openai_model_with_dimensions_and_token_ids(env: Env) -> None:
    model = "text-embedding-3-small"
    text = PAPERS["p-1"]
    full = await env.client.embeddings.create(model=model, input=text)
    vector = np.array(full.data[0].embedding, dtype=np.float32)
    np.testing.assert_allclose(vector, fake_vector(text, 1536), atol=1e-6)
    assert cosine(vector, (await chunk_vectors(env.db_url, "papers"))[text]) > 0.99999

    # `dimensions` shortens as OpenAI does: what the upstream server answers for it
    short = await env.client.embeddings.create(model=model, input=text, dimensions=256)
    upstream = openai.AsyncOpenAI(base_url=env.server.base_url, api_key="x", max_retries=0)
    theirs = await upstream.embeddings.create(model=model, input=text, dimensions=256)
    await upstream.close()
    assert len(short.data[0].embedding) == 256
    np.testing.assert_allclose(short.data[0].embedding, theirs.data[0].embedding, atol=1e-6)
    # its own length is fine too
    same = await env.client.embeddings.create(model=model, input=text, dimensions=1536)
    np.testing.assert_allclose(same.data[0].embedding, vector, atol=1e-6)

    # token ids, as LangChain sends them, are read with the model's tiktoken encoding
    encoding = tiktoken_encoding("openai", model)
    assert encoding is not None
    ids = encoding.encode_ordinary(text)
    by_ids = await env.client.embeddings.create(model=model, input=[ids, ids[:5]])
    np.testing.assert_allclose(by_ids.data[0].embedding, vector, atol=1e-6)
    head = encoding.decode(ids[:5])
    np.testing.assert_allclose(by_ids.data[1].embedding, fake_vector(head, 1536), atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids) + 5
    one = await env.client.embeddings.create(model=model, input=ids)
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids)


# --- errors ----------------------------------------------------------------------------------


async def test_an_unknown_model_is_not_found_with_the_served_ones_named(env: Env) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await env.client.embeddings.create(model="text-embedding-ada-002", input="hi")
    error = caught.value
    assert error.status_code == 404
    body = error.body
    assert isinstance(body, dict) and body["code"] == "not_found" and body["request_id"]
    message = body["message"]
    assert message in error.message  # what the client shows
    assert "'text-embedding-ada-002' is not served here" in message
    assert f"{LOCAL}, fake-128, text-embedding-3-small" in message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"input": ""}, "input is an empty string"),
        ({"input": []}, "input is an empty list; send 1 to 2048 inputs"),
        ({"input": ["x"] * 2049}, "input has 2,049 items; at most 2048 per request"),
        ({"input": ["ok", ""]}, "input[1] is an empty string"),
        ({"input": ["text", 3]}, "input[1] is a number; input must be a string, a list of"),
        ({"input": [[1, 2], []]}, "input[1] is an empty list of token ids"),
        ({"input": None}, "input must be a string, a list of strings"),
        ({"input": {"text": "hi"}}, "not an object"),
        ({"input": [True]}, "input[0] is a boolean"),
        ({"input": "hi", "encoding_format": "float16"}, "encoding_format"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "dimensions": True}, "dimensions: Input should be a valid integer"),
        ({"input": [-1]}, "input holds a token id below 0"),
        ({"input": "hi", "temperature": 1}, "temperature: Extra inputs are not permitted"),
        ({"input": "hi", "dimensions": 128}, "cannot shorten them"),
        ({"input": [101, 2054]}, "takes text, not token ids"),
        ({"input": "word " * 300}, "has 300 tokens; model 'all-MiniLM-L6-v2' reads at most 254"),
    ],
)
async def test_bad_input_is_a_422_that_says_what_to_fix(
    env: Env, payload: dict[str, object], expected: str
) -> None:
    rest = {k: v for k, v in payload.items() if k != "input"}  # sent as they are
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        await env.client.embeddings.create(
            model=LOCAL,
            input=payload["input"],  # type: ignore[arg-type]
            encoding_format="float",
            extra_body=rest,
        )
    assert caught.value.status_code == 422
    message = caught.value.body["message"]  # type: ignore[index]
    assert expected in message, message


async def test_limits_of_the_openai_model(env: Env) -> None:
    model = "text-embedding-3-small"
    cases = {
        "dimensions 2000 is more than model 'text-embedding-3-small' makes (1536)": {
            "input": "hi",
            "dimensions": 2000,
        },
        "token id 200000 is outside": {"input": [[1, 200000]]},
        "input has 9,000 tokens; model 'text-embedding-3-small' reads at most 8,191": {
            "input": [[1000] * 9000]
        },
        "the request has 301,600 tokens; at most 300,000": {"input": [[1000] * 7540] * 40},
    }
    for expected, payload in cases.items():
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await env.client.post("/embeddings", body={"model": model, **payload}, cast_to=object)
        assert expected in caught.value.body["message"], caught.value.body  # type: ignore[index]


async def test_the_limits_are_the_models(env: Env) -> None:
    assert max_input_tokens("local", LOCAL) == 254  # a 256-token window less [CLS] and [SEP]
    assert max_input_tokens("openai", "text-embedding-3-large") == 8191
    assert max_input_tokens("fake", "fake-128") is None
    assert tiktoken_encoding("local", LOCAL) is None
    assert tiktoken_encoding("openai", "BAAI/bge-small-en") is None  # not an OpenAI model
    # 254 tokens are fine: the limit is exact, not a guess
    text = " ".join(["word"] * 254)
    answer = await env.client.embeddings.create(model=LOCAL, input=text)
    assert answer.usage.prompt_tokens == 254


async def test_a_token_is_needed_with_the_read_scope(env: Env) -> None:
    no_header = {"Authorization": openai.Omit()}
    with pytest.raises(openai.AuthenticationError) as caught:
        await env.client.embeddings.create(model=LOCAL, input="hi", extra_headers=no_header)
    assert "this route needs a token" in caught.value.message
    # what apps set for servers that need no key, and a made-up token
    nobody, stranger = env.as_("EMPTY"), env.as_("eq_" + secrets.token_urlsafe(32))
    for c in (nobody, stranger):
        with pytest.raises(openai.AuthenticationError) as caught:
            await c.models.list()
        assert "the token is not valid" in caught.value.message
    writer = env.as_(env.writer)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await writer.embeddings.create(model=LOCAL, input="hi")
    assert "this route needs 'read'" in denied.value.message
    for c in (nobody, stranger, writer):
        await c.close()


# --- a real server ---------------------------------------------------------------------------


def test_the_sync_client_against_embedq_serve(
    tmp_path: Path, pg_url: str, template_url: str
) -> None:
    url = create_db(pg_url)
    admin = "eq_" + secrets.token_urlsafe(32)
    servers = Servers(tmp_path)
    try:
        server = servers.start(cli_env(url, EMBEDQ_ADMIN_TOKEN=admin))
        server.wait_ready()
        r = httpx.post(
            server.url + "/v1/collections",
            json={"name": "tickets", "provider": "fake", "model": "fake-64"},
            headers=server.auth(admin),
            timeout=30,
        )
        assert r.status_code == 201, r.text
        r = httpx.post(
            server.url + "/v1/tokens",
            json={"name": "app", "scopes": ["read"]},
            headers=server.auth(admin),
            timeout=30,
        )
        assert r.status_code == 201, r.text
        reader = r.json()["token"]

        client = openai.OpenAI(base_url=server.url + "/v1", api_key=reader, max_retries=0)
        assert [m.id for m in client.models.list()] == [LOCAL, "fake-64"]
        texts = ["The printer is jammed.", "The coffee machine is empty."]
        answer = client.embeddings.create(model="fake-64", input=texts)
        fake = FakeProvider(ProviderConfig(provider="fake", model="fake-64"))
        for row, text in zip(answer.data, texts, strict=True):
            np.testing.assert_allclose(row.embedding, fake.vector(text), atol=1e-6)
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.embeddings.create(model="nomic-embed-text", input="hi")
        client.close()
        assert server.stop() == 0, server.logs()
        assert "Traceback" not in server.stderr(), server.logs()
    finally:
        servers.cleanup()
        drop_db(pg_url, url)
