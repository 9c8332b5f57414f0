"""Fake Ollama and OpenAI embedding servers that speak the real HTTP protocols.

For tests, the pipeline benchmark and the pgai comparison: the official clients (httpx, the
`openai` package) talk to them as to the real thing, and a fault script makes them fail the
way real servers do.

In process (a thread with its own event loop, on a free port):

    with FakeOpenAI(dims=384, api_key="sk-test") as srv:
        srv.base_url                     # http://127.0.0.1:PORT/v1, what a client is given
        srv.fail_next(status=429, retry_after=2)
        srv.requests, srv.texts          # counters

As a separate process (so a benchmark does not share the GIL with it):

    python tests/fake_servers.py openai|ollama --port P [--latency-ms L] [--dims D]
                                 [--model M]... [--api-key K] [--bad-marker POISON]

prints `ready http://127.0.0.1:P` (the server's origin; an OpenAI client's base URL is that
plus `/v1`) once it listens, and runs until SIGTERM or SIGINT.

Endpoints: Ollama `POST /api/embed`, `POST /api/embeddings` (legacy), `GET /api/tags`,
`GET /api/version`, `GET /`; OpenAI `POST /v1/embeddings` (`encoding_format` float or base64,
`dimensions`), `GET /v1/models`, `GET /v1/models/{id}`. Errors use each server's own body
format: Ollama `{"error": "..."}`, OpenAI `{"error": {"message", "type", "param", "code"}}`.

Vectors are deterministic: a text's hash picks one of `BANK_SIZE` unit vectors, each
pre-encoded per width, so serving 20,000 texts costs string joins rather than float
formatting (`fake_vector` gives the vector a text gets). A shortened vector (`dimensions`)
is the prefix of the full one, renormalised, as with OpenAI's text-embedding-3 models.
Stdlib and numpy only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import numpy as np

BANK_SIZE = 1024
_SEED_DIMS = 4096  # every bank vector is a prefix of one 4096-long draw: widths nest
_MAX_HEADER = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

Corruption = Literal["not_json", "missing", "short"]


# --- vectors -------------------------------------------------------------------------------


def slot(text: str) -> int:
    """Which bank vector `text` gets: stable across processes (not Python's salted hash)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % BANK_SIZE


@functools.cache
def _bank(dims: int) -> np.ndarray:
    full = np.random.default_rng(20240601).standard_normal((BANK_SIZE, _SEED_DIMS))
    rows = full[:, :dims]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fake_vector(text: str, dims: int = 384) -> np.ndarray:
    """The float32 unit vector a fake server returns for `text` at width `dims`."""
    return _bank(dims)[slot(text)].copy()


_encodings: dict[tuple[int, str, int], str] = {}


def _encoded(dims: int, encoding: str, index: int) -> str:
    """Bank vector `index` as a ready JSON value: a number list, or a quoted base64 string.

    Filled as slots are first asked for (a few for a test, all for a benchmark), so no
    request pays for more than its own texts' encodings.
    """
    key = (dims, encoding, index)
    value = _encodings.get(key)
    if value is None:
        row = _bank(dims)[index]
        if encoding == "base64":
            value = '"' + base64.b64encode(row.astype("<f4").tobytes()).decode() + '"'
        else:
            value = json.dumps(row.tolist())
        _encodings[key] = value
    return value


def _tokens(texts: Iterable[str]) -> int:
    return sum(max(1, len(t) // 4) for t in texts)  # about 4 characters per token


# --- HTTP/1.1 -------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(value).encode(), headers=dict(headers or {}))

    def render(self, keep_alive: bool) -> bytes:
        head = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Status')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on a connection, or None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large") from None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        raise _BadRequest(f"bad request line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length") or 0))
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return Request(method, target.split("?", 1)[0], headers, body, keep_alive)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()).strip():  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()


# --- the fault script ---------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What the next embedding request suffers: an error status, a hang, or a corrupt 200."""

    status: int | None = None
    message: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    hang_s: float = 0.0
    corrupt: Corruption | None = None


# --- the servers ----------------------------------------------------------------------------


class FakeServer:
    """Shared machinery: HTTP serving, counters, auth, the fault script. See the module doc."""

    kind: ClassVar[str]
    default_models: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        dims: int = 384,
        models: Iterable[str] | None = None,
        api_key: str | None = None,
        latency_ms: float = 0.0,
        bad_marker: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.dims = dims
        self.models = list(models) if models else list(self.default_models)
        self.api_key = api_key
        self.latency_ms = latency_ms
        self.bad_marker = bad_marker
        self.host = host
        self.port = port
        self.requests = 0  # embedding requests received, failed ones included
        self.texts = 0  # texts in the embedding requests that were answered
        self.last_body: Any = None  # the last embedding request's decoded JSON
        self.last_headers: dict[str, str] = {}
        self._faults: collections.deque[Fault] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    # -- addresses

    @property
    def url(self) -> str:
        """The server's origin, e.g. http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What a client is configured with (OpenAI: the origin plus /v1)."""
        return self.url

    # -- the fault script (thread-safe: a deque, appended here, popped by the server)

    def fail_next(
        self,
        status: int = 500,
        *,
        retry_after: float | str | None = None,
        times: int = 1,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` embedding requests with `status` in the server's format."""
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = (
                f"{retry_after:g}" if isinstance(retry_after, float | int) else retry_after
            )
        self._faults.extend([Fault(status, message, tuple(extra.items()))] * times)

    def hang_next(self, seconds: float, *, times: int = 1) -> None:
        """Hold the next `times` embedding requests for `seconds`, then answer normally."""
        self._faults.extend([Fault(hang_s=seconds)] * times)

    def corrupt_next(self, kind: Corruption = "not_json", *, times: int = 1) -> None:
        """Answer 200 with a broken body: HTML (`not_json`), no vectors (`missing`), or one
        vector fewer than texts (`short`)."""
        self._faults.extend([Fault(corrupt=kind)] * times)

    def reset(self) -> None:
        """Forget pending faults and zero the counters."""
        self._faults.clear()
        self.requests = self.texts = 0
        self.last_body, self.last_headers = None, {}

    # -- life cycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Serve on a thread of its own; return once listening."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve()), name=f"fake-{self.kind}", daemon=True
        )
        self._thread.start()
        self._started.wait(30)
        if self._startup_error is not None:
            raise self._startup_error
        if not self._started.is_set():
            raise RuntimeError(f"fake {self.kind} server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
            self._thread = None

    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until `stop()` (or SIGTERM for the command line); the caller's event loop."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(
                self._connection, self.host, self.port, limit=_MAX_HEADER
            )
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            raise
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        if on_ready is not None:
            on_ready(self.url)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    writer.write(Reply(400, str(exc).encode(), "text/plain").render(False))
                    await writer.drain()
                    return
                if request is None:
                    return
                reply = await self._handle(request)
                writer.write(reply.render(request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return  # the client went away (a time-out on its side) or spoke nonsense
        except asyncio.CancelledError:
            # stop() cancels open connections; ending normally keeps asyncio's stream
            # callback from logging the cancellation as an unhandled error.
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, request: Request) -> Reply:
        if not self._is_embedding(request):
            return self.route(request)
        self.requests += 1
        self.last_headers = dict(request.headers)
        fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.hang_s:
            await asyncio.sleep(fault.hang_s)
            fault = None
        if fault is not None and fault.status is not None:
            return self.error(fault.status, fault.message, dict(fault.headers))
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        refused = self.check_auth(request)
        if refused is not None:
            return refused
        try:
            payload = request.json()
        except ValueError:
            return self.error(400, "invalid JSON in the request body")
        self.last_body = payload
        if not isinstance(payload, dict):
            return self.error(400, "the request body must be a JSON object")
        return self.embed(request, payload, fault.corrupt if fault else None)

    # -- per protocol

    def _is_embedding(self, request: Request) -> bool:
        raise NotImplementedError

    def route(self, request: Request) -> Reply:
        raise NotImplementedError

    def check_auth(self, request: Request) -> Reply | None:
        if self.api_key is None:
            return None
        if request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return self.error(401, "unauthorized")

    def embed(self, request: Request, payload: dict[str, Any], corrupt: Corruption | None) -> Reply:
        raise NotImplementedError

    def error(
        self, status: int, message: str | None, headers: dict[str, str] | None = None
    ) -> Reply:
        raise NotImplementedError

    def _marked(self, texts: list[str]) -> int | None:
        if self.bad_marker:
            for i, text in enumerate(texts):
                if self.bad_marker in text:
                    return i
        return None

    def _vectors(self, texts: list[str], dims: int, encoding: str) -> list[str]:
        return [_encoded(dims, encoding, slot(t)) for t in texts]


class FakeOllama(FakeServer):
    """Ollama's embedding API. Model names match with or without the `:latest` tag."""

    kind = "ollama"
    default_models = ("nomic-embed-text", "all-minilm")

    def _is_embedding(self, request: Request) -> bool:
        return request.method == "POST" and request.path in ("/api/embed", "/api/embeddings")

    def _serves(self, model: str) -> bool:
        return _tagged(model) in {_tagged(m) for m in self.models}

    def route(self, request: Request) -> Reply:
        if request.method == "GET" and request.path == "/":
            return Reply(200, b"Ollama is running", "text/plain; charset=utf-8")
        if request.method == "GET" and request.path == "/api/version":
            return Reply.of(200, {"version": "0.9.0"})
        if request.method == "GET" and request.path == "/api/tags":
            return Reply.of(200, {"models": [_ollama_tag(m, self.dims) for m in self.models]})
        return Reply(404, b"404 page not found", "text/plain")

    def error(
        self, status: int, message: str | None, headers: dict[str, str] | None = None
    ) -> Reply:
        default = {
            401: "unauthorized",
            429: "too many requests",
            500: "llama runner process has terminated: exit status 2",
            503: "server busy, please try again. maximum pending requests exceeded",
        }.get(status, f"error {status}")
        return Reply.of(status, {"error": message or default}, headers)

    def embed(self, request: Request, payload: dict[str, Any], corrupt: Corruption | None) -> Reply:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "model is required")
        if not self._serves(model):
            return self.error(404, f'model "{model}" not found, try pulling it first')
        legacy = request.path == "/api/embeddings"
        raw = payload.get("prompt", "") if legacy else payload.get("input", [])
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self.error(400, "invalid input type")
        bad = self._marked(texts)
        if bad is not None:
            return self.error(
                400, f"input {bad} cannot be embedded: it contains {self.bad_marker!r}"
            )
        dims = payload.get("dimensions") or self.dims
        if not isinstance(dims, int) or not 0 < dims <= self.dims:
            return self.error(400, f"dimensions must be between 1 and {self.dims}")
        self.texts += len(texts)
        if corrupt == "not_json":
            return Reply(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        if corrupt == "missing":
            return Reply.of(200, {"model": model})
        vectors = self._vectors(texts[:-1] if corrupt == "short" else texts, dims, "float")
        name = json.dumps(_tagged(model))
        if legacy:
            return Reply(200, f'{{"embedding":{vectors[0] if vectors else "[]"}}}'.encode())
        body = (
            f'{{"model":{name},"embeddings":[{",".join(vectors)}],'
            f'"total_duration":1000000,"load_duration":1000,"prompt_eval_count":{_tokens(texts)}}}'
        )
        return Reply(200, body.encode())


class FakeOpenAI(FakeServer):
    """OpenAI's embedding API under /v1 (what vLLM, TEI and LM Studio also serve)."""

    kind = "openai"
    default_models = ("text-embedding-3-small", "text-embedding-3-large")
    max_inputs = 2048
    # Some compatible servers send number lists whatever `encoding_format` asks for.
    ignore_encoding_format = False
    # The protocol orders rows by `index`, not by position: clients must not rely on order.
    reverse_data = False

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _is_embedding(self, request: Request) -> bool:
        return request.method == "POST" and request.path == "/v1/embeddings"

    def route(self, request: Request) -> Reply:
        refused = self.check_auth(request)
        if refused is not None:
            return refused
        if request.method == "GET" and request.path == "/v1/models":
            return Reply.of(
                200, {"object": "list", "data": [_openai_model(m) for m in self.models]}
            )
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            model = request.path.removeprefix("/v1/models/")
            if model in self.models:
                return Reply.of(200, _openai_model(model))
            return self._model_not_found(model)
        return self.error(404, f"Invalid URL ({request.method} {request.path})")

    def check_auth(self, request: Request) -> Reply | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return None
        if not given.startswith("Bearer ") or not given.removeprefix("Bearer ").strip():
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return self.error(401, message)
        key = given.removeprefix("Bearer ")
        # Like OpenAI: the rejected key is quoted, partly masked.
        masked = f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}"
        message = (
            f"Incorrect API key provided: {masked}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return self.error(401, message, code="invalid_api_key")

    def error(
        self,
        status: int,
        message: str | None,
        headers: dict[str, str] | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
    ) -> Reply:
        kind, default = {
            401: ("invalid_request_error", "Incorrect API key provided."),
            429: ("requests", "Rate limit reached for requests. Please try again later."),
            500: (
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            ),
            503: ("server_error", "The engine is currently overloaded, please try again later"),
        }.get(status, ("invalid_request_error", f"error {status}"))
        if status == 429 and code is None:
            code = "rate_limit_exceeded"
        body = {
            "error": {"message": message or default, "type": kind, "param": param, "code": code}
        }
        return Reply.of(status, body, headers)

    def _model_not_found(self, model: str) -> Reply:
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    def embed(self, request: Request, payload: dict[str, Any], corrupt: Corruption | None) -> Reply:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "you must provide a model parameter")
        if model not in self.models:
            return self._model_not_found(model)
        texts = _openai_inputs(payload.get("input"))
        if texts is None or not texts or len(texts) > self.max_inputs:
            return self.error(
                400,
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference.",
                param="input",
            )
        bad = self._marked(texts)
        if bad is not None:
            return self.error(
                400, f"Invalid 'input[{bad}]': it contains {self.bad_marker!r}.", param="input"
            )
        dims = payload.get("dimensions", self.dims)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 0 < dims <= self.dims:
            return self.error(
                400,
                f"Invalid value for 'dimensions' = {dims}. Must be between 1 and {self.dims}.",
                param="dimensions",
            )
        encoding = payload.get("encoding_format", "float")
        if self.ignore_encoding_format:
            encoding = "float"
        if encoding not in ("float", "base64"):
            return self.error(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. Supported values are: "
                "'float' and 'base64'.",
                param="encoding_format",
            )
        self.texts += len(texts)
        if corrupt == "not_json":
            return Reply(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
        if corrupt == "missing":
            return Reply.of(200, {"object": "list", "model": model})
        vectors = self._vectors(texts[:-1] if corrupt == "short" else texts, dims, encoding)
        tokens = _tokens(texts)
        items = [
            f'{{"object":"embedding","index":{i},"embedding":{v}}}' for i, v in enumerate(vectors)
        ]
        data = ",".join(reversed(items) if self.reverse_data else items)
        body = (
            f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},'
            f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}'
        )
        return Reply(200, body.encode())


def _openai_inputs(raw: Any) -> list[str] | None:
    """`input` as texts: a string, strings, token ids or lists of token ids."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        return None
    if all(isinstance(t, int) for t in raw) and raw:
        return [" ".join(map(str, raw))]
    texts = []
    for item in raw:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            texts.append(" ".join(map(str, item)))
        else:
            return None
    return texts


def _tagged(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def _ollama_tag(model: str, dims: int) -> dict[str, Any]:
    digest = hashlib.sha256(model.encode()).hexdigest()
    return {
        "name": _tagged(model),
        "model": _tagged(model),
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 274_302_450,
        "digest": digest,
        "details": {
            "format": "gguf",
            "family": "nomic-bert",
            "families": ["nomic-bert"],
            "parameter_size": "137M",
            "quantization_level": "F16",
            "embedding_length": dims,
        },
    }


def _openai_model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1_705_953_180, "owned_by": "system"}


SERVERS: dict[str, type[FakeServer]] = {"ollama": FakeOllama, "openai": FakeOpenAI}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay per request")
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--model", action="append", help="a model served (repeatable)")
    parser.add_argument("--api-key", help="require this Bearer key")
    parser.add_argument("--bad-marker", help="refuse (400) any request with a text holding it")
    args = parser.parse_args(argv)
    server = SERVERS[args.kind](
        dims=args.dims,
        models=args.model,
        api_key=args.api_key,
        latency_ms=args.latency_ms,
        bad_marker=args.bad_marker,
        host=args.host,
        port=args.port,
    )
    for index in range(BANK_SIZE):  # encode every vector before "ready", not while timed
        _encoded(args.dims, "float", index), _encoded(args.dims, "base64", index)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        await server.serve(on_ready=lambda url: print(f"ready {url}", flush=True))

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
