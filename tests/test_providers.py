"""Embedding providers: one contract every adapter keeps, then how each HTTP adapter maps the
failures of a real protocol (served by tests/fake_servers.py) into embedq's error tree.

No database is needed. The local model loads once for the module (about ten seconds).
"""

from __future__ import annotations

import email.utils
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedq.errors import (
    AuthenticationFailed,
    BadInput,
    ConfigurationError,
    ModelNotFound,
    ProviderMissing,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from embedq.providers import DEFAULT_MODELS, Provider, ProviderConfig, make_provider
from embedq.providers._http import Service, provider_error, retry_after
from embedq.providers.local import LocalProvider, load_model, model_dir
from embedq.settings import Settings
from fake_servers import FakeOllama, FakeOpenAI, FakeServer, fake_vector

FAKE_SERVERS = Path(__file__).with_name("fake_servers.py")
KINDS = ["local", "ollama", "openai", "fake"]
TEXTS = [
    "the first text",
    "a second, quite different text",
    "naïve café — 東京 🚀 ünïcödé",
    "x",
]

Build = Callable[..., Provider]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.load(cli={"provider_timeout_s": 10.0})


@pytest.fixture(scope="module")
def ollama_server() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture(scope="module")
def openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def local_provider(settings: Settings) -> LocalProvider:
    """The bundled all-MiniLM-L6-v2, loaded once here; later LocalProviders share it."""
    provider = LocalProvider(ProviderConfig(provider="local"), settings)
    load_model(provider.path, provider.device)
    return provider


def _base_url(kind: str, ollama: FakeOllama, openai: FakeOpenAI) -> str | None:
    return {"ollama": ollama.base_url, "openai": openai.base_url}.get(kind)


@pytest.fixture(params=KINDS)
async def make(
    request: pytest.FixtureRequest,
    settings: Settings,
    ollama_server: FakeOllama,
    openai_server: FakeOpenAI,
) -> AsyncIterator[Build]:
    """Build a provider of each kind (its default model; fakes for the HTTP servers)."""
    kind: str = request.param
    if kind == "local":
        request.getfixturevalue("local_provider")  # load the model once, not per test
    created: list[Provider] = []

    def build(**config: Any) -> Provider:
        provider = make_provider(
            ProviderConfig(provider=kind, model=DEFAULT_MODELS[kind], **config),
            settings,
            base_url=_base_url(kind, ollama_server, openai_server),
        )
        created.append(provider)
        return provider

    yield build
    for provider in created:
        await provider.close()


class TestProviderContract:
    """What every adapter promises the pipeline (see `Provider`)."""

    async def test_vectors_are_float32_rows_in_input_order(self, make: Build) -> None:
        provider = make()
        vectors = await provider.embed(TEXTS)
        assert vectors.dtype == np.float32
        assert vectors.shape == (len(TEXTS), await provider.dimensions())
        assert not np.allclose(vectors[0], vectors[1])
        one_by_one = np.concatenate([await provider.embed([text]) for text in TEXTS])
        np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
        reversed_rows = await provider.embed(TEXTS[::-1])
        np.testing.assert_allclose(reversed_rows[::-1], vectors, atol=1e-5)

    async def test_identical_texts_get_identical_vectors(self, make: Build) -> None:
        vectors = await make().embed(["same words", "other words", "same words"])
        np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
        assert not np.allclose(vectors[0], vectors[1])

    async def test_no_texts_give_zero_rows(self, make: Build) -> None:
        provider = make()
        vectors = await provider.embed([])
        assert vectors.shape == (0, await provider.dimensions())
        assert vectors.dtype == np.float32

    async def test_unicode_and_long_texts(self, make: Build) -> None:
        long_text = "a fairly long sentence about embeddings and queues. " * 2000
        vectors = await make().embed(["東京タワー 🚀", long_text, "\u0000 nul and \t tabs"])
        assert vectors.shape[0] == 3
        assert np.isfinite(vectors).all()
        assert (np.linalg.norm(vectors, axis=1) > 0.5).all()

    async def test_dimensions_match_the_vectors(self, make: Build) -> None:
        provider = make()
        assert await provider.dimensions() == 384  # every default here is 384 wide
        assert (await provider.embed(["probe"])).shape == (1, 384)

    async def test_more_texts_than_max_batch_are_split_in_order(self, make: Build) -> None:
        texts = [f"text number {i}" for i in range(7)]
        whole = await make().embed(texts)
        split = await make(max_batch=3).embed(texts)
        np.testing.assert_allclose(split, whole, atol=1e-5)

    async def test_describes_itself(self, make: Build, request: pytest.FixtureRequest) -> None:
        provider = make()
        assert isinstance(provider, Provider)
        assert provider.name == request.node.callspec.params["make"]
        assert provider.model == DEFAULT_MODELS[provider.name]
        assert provider.endpoint
        assert provider.max_batch > 0
        assert provider.max_batch_tokens > 0


# --- the local model ----------------------------------------------------------------------


class TestLocal:
    async def test_similar_meanings_are_close(self, local_provider: LocalProvider) -> None:
        cat, kitten, stocks = await local_provider.embed(
            ["a cat sits on the mat", "a kitten is on the rug", "stock market crashes"]
        )
        assert float(cat @ kitten) > float(cat @ stocks) + 0.2
        np.testing.assert_allclose(np.linalg.norm([cat, kitten, stocks], axis=1), 1, atol=1e-5)

    async def test_hub_name_and_directory_path_name_the_same_model(
        self, local_provider: LocalProvider, settings: Settings
    ) -> None:
        expected = await local_provider.embed(TEXTS)
        for name in ["sentence-transformers/all-MiniLM-L6-v2", str(local_provider.path)]:
            other = LocalProvider(ProviderConfig(provider="local", model=name), settings)
            np.testing.assert_allclose(await other.embed(TEXTS), expected, atol=1e-6)

    def test_the_model_is_loaded_once_per_process(self, local_provider: LocalProvider) -> None:
        path, device = local_provider.path, local_provider.device
        assert load_model(path, device) is load_model(path, device)

    def test_model_dir_holds_the_tokenizer(self) -> None:
        assert (model_dir("all-MiniLM-L6-v2") / "tokenizer.json").is_file()

    def test_unknown_model_names_the_choices(self, settings: Settings) -> None:
        with pytest.raises(ModelNotFound, match=r"'bert-huge'.*all-MiniLM-L6-v2.*--model"):
            LocalProvider(ProviderConfig(provider="local", model="bert-huge"), settings)

    def test_missing_library_names_the_extra(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "sentence_transformers", None)
        with pytest.raises(ProviderMissing, match=r"pip install 'embedq\[local\]'"):
            LocalProvider(ProviderConfig(provider="local"), settings)

    async def test_inference_runs_off_the_event_loop(
        self, local_provider: LocalProvider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        model = load_model(local_provider.path, local_provider.device)
        threads: list[str] = []
        encode = model.encode

        def spy(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return encode(*args, **kwargs)

        monkeypatch.setattr(model, "encode", spy)
        await local_provider.embed(["where does this run?"])
        assert threads and threads[0].startswith("embedq-local")
        assert threads[0] != threading.current_thread().name

    async def test_unusable_device_is_a_permanent_error(self, settings: Settings) -> None:
        tpu = Settings.load(cli={"local_device": "tpu"})
        provider = LocalProvider(ProviderConfig(provider="local"), tpu)
        with pytest.raises(ModelNotFound, match="EMBEDQ_LOCAL_DEVICE"):
            await provider.embed(["x"])


# --- HTTP adapters against the fake servers ------------------------------------------------


@dataclass
class Http:
    kind: str
    server: FakeServer
    build: Callable[..., Provider]


@pytest.fixture(params=["ollama", "openai"])
async def http(
    request: pytest.FixtureRequest,
    settings: Settings,
    ollama_server: FakeOllama,
    openai_server: FakeOpenAI,
) -> AsyncIterator[Http]:
    """An HTTP adapter of each kind and its (shared) fake server, reset after the test."""
    kind: str = request.param
    server: FakeServer = ollama_server if kind == "ollama" else openai_server
    server.reset()
    created: list[Provider] = []

    def build(
        *,
        server: FakeServer = server,
        settings: Settings = settings,
        base_url: str | None = None,
        **config: Any,
    ) -> Provider:
        config.setdefault("model", DEFAULT_MODELS[kind])
        provider = make_provider(
            ProviderConfig(provider=kind, **config),
            settings,
            base_url=base_url or server.base_url,
        )
        created.append(provider)
        return provider

    yield Http(kind, server, build)
    for provider in created:
        await provider.close()
    server.reset()
    server.bad_marker = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestHttpErrors:
    async def test_unknown_model_names_it_and_the_fix(self, http: Http) -> None:
        provider = http.build(model="no-such-model")
        with pytest.raises(ModelNotFound) as caught:
            await provider.embed(["x"])
        message = str(caught.value)
        assert "'no-such-model'" in message and "404" in message
        assert http.server.base_url in message
        if http.kind == "ollama":
            assert "ollama pull no-such-model" in message
        else:
            assert "/models" in message and "--model" in message

    async def test_wrong_url_path_names_the_url_setting(self, http: Http) -> None:
        provider = http.build(base_url=http.server.url + "/wrong")
        with pytest.raises(ModelNotFound) as caught:
            await provider.embed(["x"])
        message = str(caught.value)
        assert "/wrong/" in message and "404" in message
        assert ("EMBEDQ_OLLAMA_URL" if http.kind == "ollama" else "/v1") in message

    @pytest.mark.parametrize("sent", ["sk-wrong-qqqqwxyz", None])
    async def test_refused_credentials_never_show_the_key(
        self, http: Http, sent: str | None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("EMBEDQ_OPENAI_API_KEY", raising=False)
        keyed = Settings.load(cli={"openai_api_key": sent})
        with type(http.server)(api_key="sk-right-jjjjmnop") as locked:
            provider = http.build(server=locked, settings=keyed)
            with pytest.raises(AuthenticationFailed) as caught:
                await provider.embed(["x"])
        message = str(caught.value)
        assert "401" in message
        for secret in ("sk-right-jjjjmnop", "sk-wrong-qqqqwxyz", "qqqq", "wxyz", "jjjj", "mnop"):
            assert secret not in message
        setting = "EMBEDQ_OPENAI_API_KEY" if http.kind == "openai" else "EMBEDQ_OLLAMA_URL"
        assert setting in message

    async def test_bad_input_carries_the_providers_message(self, http: Http) -> None:
        http.server.bad_marker = "POISON"
        with pytest.raises(BadInput, match=r"400.*input.*1.*POISON"):
            await http.build().embed(["fine", "this one has POISON in it"])

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [({"Retry-After": "2"}, 2.0), ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5)],
    )
    async def test_rate_limit_carries_retry_after(
        self, http: Http, headers: dict[str, str], expected: float
    ) -> None:
        http.server.fail_next(429, headers=headers)
        with pytest.raises(RateLimited) as caught:
            await http.build().embed(["x"])
        assert caught.value.retry_after == expected
        assert "429" in str(caught.value)

    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_server_errors_are_transient_and_pass(self, http: Http, status: int) -> None:
        provider = http.build()
        http.server.fail_next(status)
        with pytest.raises(ProviderUnavailable, match=str(status)):
            await provider.embed(["x"])
        assert (await provider.embed(["x"])).shape == (1, 384)  # the same client recovers

    async def test_a_hung_server_times_out(self, http: Http) -> None:
        impatient = Settings.load(cli={"provider_timeout_s": 0.2})
        provider = http.build(settings=impatient)
        http.server.hang_next(3)
        started = time.monotonic()
        with pytest.raises(ProviderTimeout, match="EMBEDQ_PROVIDER_TIMEOUT_S"):
            await provider.embed(["x"])
        assert time.monotonic() - started < 2

    async def test_connection_refused_asks_whether_it_runs(self, http: Http) -> None:
        provider = http.build(base_url=f"http://127.0.0.1:{_free_port()}")
        with pytest.raises(ProviderUnavailable, match="is it running"):
            await provider.embed(["x"])

    @pytest.mark.parametrize("corruption", ["not_json", "missing", "short"])
    async def test_malformed_replies_are_transient_errors(
        self, http: Http, corruption: Any
    ) -> None:
        http.server.corrupt_next(corruption)
        with pytest.raises(ProviderUnavailable):
            await http.build().embed(["one", "two"])

    async def test_base_url_must_be_http(self, http: Http) -> None:
        with pytest.raises(ConfigurationError, match="not an http"):
            http.build(base_url="localhost:11434")


class TestOllama:
    async def test_request_is_ollamas_batch_embed(self, ollama_server: FakeOllama) -> None:
        ollama_server.reset()
        provider = make_provider(
            ProviderConfig(provider="ollama", model="nomic-embed-text"),
            Settings.load(cli={"ollama_url": ollama_server.url}),
        )
        try:
            vectors = await provider.embed(["a", "b"])
        finally:
            await provider.close()
        assert ollama_server.last_body == {
            "model": "nomic-embed-text",
            "input": ["a", "b"],
            "truncate": True,
        }
        np.testing.assert_array_equal(vectors, [fake_vector("a"), fake_vector("b")])
        assert provider.endpoint == ollama_server.url


class TestOpenAI:
    @pytest.fixture
    async def openai(
        self, openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
    ) -> AsyncIterator[Callable[..., Provider]]:
        """Build OpenAI providers configured through settings (base URL, key)."""
        monkeypatch.delenv("EMBEDQ_OPENAI_API_KEY", raising=False)
        openai_server.reset()
        created: list[Provider] = []

        def build(key: str | None = None, **config: Any) -> Provider:
            settings = Settings.load(
                cli={"openai_base_url": openai_server.base_url, "openai_api_key": key}
            )
            config.setdefault("model", "text-embedding-3-small")
            provider = make_provider(ProviderConfig(provider="openai", **config), settings)
            created.append(provider)
            return provider

        yield build
        for provider in created:
            await provider.close()
        openai_server.ignore_encoding_format = openai_server.reverse_data = False

    async def test_base64_vectors_decode_exactly(
        self, openai: Build, openai_server: FakeOpenAI
    ) -> None:
        provider = openai()
        vectors = await provider.embed(TEXTS)
        assert openai_server.last_body["encoding_format"] == "base64"
        np.testing.assert_array_equal(vectors, [fake_vector(t) for t in TEXTS])
        openai_server.ignore_encoding_format = True  # a server that sends number lists anyway
        np.testing.assert_array_equal(await provider.embed(TEXTS), vectors)

    async def test_dimensions_are_forwarded(self, openai: Build, openai_server: FakeOpenAI) -> None:
        provider = openai(dimensions=128)
        vectors = await provider.embed(TEXTS)
        assert openai_server.last_body["dimensions"] == 128
        assert vectors.shape == (len(TEXTS), 128) and await provider.dimensions() == 128
        np.testing.assert_array_equal(vectors, [fake_vector(t, 128) for t in TEXTS])

    async def test_rows_follow_index_not_position(
        self, openai: Build, openai_server: FakeOpenAI
    ) -> None:
        openai_server.reverse_data = True
        vectors = await openai().embed(TEXTS)
        np.testing.assert_array_equal(vectors, [fake_vector(t) for t in TEXTS])

    async def test_key_is_sent_as_bearer_only_when_set(
        self, openai: Build, openai_server: FakeOpenAI
    ) -> None:
        await openai(key="sk-test").embed(["x"])
        assert openai_server.last_headers["authorization"] == "Bearer sk-test"
        await openai().embed(["x"])
        assert "authorization" not in openai_server.last_headers


# --- pure pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers) == expected


SERVICE = Service(
    "OpenAI-compatible server",
    "http://127.0.0.1:9/v1",
    "m",
    model_fix="Choose another model.",
    auth_fix="Fix the key.",
    url_setting="EMBEDQ_OPENAI_BASE_URL",
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": {"message": "bad 'input'", "type": "invalid_request_error"}}, "bad 'input'"),
        ({"error": "input too long"}, "input too long"),  # Ollama, TEI
        ({"object": "error", "message": "too many tokens", "code": 400}, "too many tokens"),  # vLLM
        ({"detail": [{"msg": "field required"}]}, "field required"),  # FastAPI
        ("plain text reason", "plain text reason"),
    ],
)
def test_bad_input_quotes_the_servers_words(body: Any, expected: str) -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/embeddings")
    if isinstance(body, str):
        response = httpx.Response(400, text=body, request=request)
    else:
        response = httpx.Response(422, json=body, request=request)
    error = provider_error(SERVICE, response)
    assert isinstance(error, BadInput)
    assert expected in str(error)


def test_long_server_messages_are_cut() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/embeddings")
    response = httpx.Response(400, json={"error": "x" * 10_000}, request=request)
    assert len(str(provider_error(SERVICE, response))) < 500


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = retry_after({"Retry-After": when})
    assert wait is not None and 28 <= wait <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after({"Retry-After": past}) == 0.0


# --- the fake servers themselves (the benchmarks run them as processes) --------------------


def test_fake_servers_list_their_models(
    ollama_server: FakeOllama, openai_server: FakeOpenAI
) -> None:
    with httpx.Client() as client:
        tags = client.get(f"{ollama_server.url}/api/tags").json()
        assert [m["name"] for m in tags["models"]] == [
            "nomic-embed-text:latest",
            "all-minilm:latest",
        ]
        models = client.get(f"{openai_server.base_url}/models").json()
        assert [m["id"] for m in models["data"]] == [
            "text-embedding-3-small",
            "text-embedding-3-large",
        ]


def test_fake_server_runs_as_a_process() -> None:
    command = [sys.executable, str(FAKE_SERVERS), "openai", "--port", "0"]
    command += ["--latency-ms", "1.5", "--dims", "8", "--model", "m1", "--model", "m2"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("ready http://127.0.0.1:")
            base = line.split()[1] + "/v1"
            reply = httpx.post(
                f"{base}/embeddings", json={"model": "m2", "input": ["a", "b"], "dimensions": 4}
            )
            assert reply.status_code == 200
            data = reply.json()["data"]
            np.testing.assert_allclose(data[1]["embedding"], fake_vector("b", 4))
            unknown = httpx.post(f"{base}/embeddings", json={"model": "x", "input": "a"})
            assert unknown.status_code == 404
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
