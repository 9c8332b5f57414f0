"""Embedding providers: things that turn texts into vectors, behind one small interface.

    provider = make_provider(ProviderConfig(provider="ollama", model="nomic-embed-text"), settings)
    vectors = await provider.embed(["first text", "second text"])   # float32 array (2, dims)

Adapters live one per file (`local`, `ollama`, `openai`, `fake`); each maps its failures into
embedq's error tree at the edge (`errors.py`): 404 -> ModelNotFound, 401/403 ->
AuthenticationFailed, 400 -> BadInput (permanent); 429 -> RateLimited (with Retry-After),
5xx/connection errors -> ProviderUnavailable, time-outs -> ProviderTimeout (transient).
Circuit breaking, rate limiting and same-model fallback endpoints wrap any adapter
(`guard.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from embedq.errors import ConfigurationError

if TYPE_CHECKING:
    from embedq.settings import Settings

ProviderName = Literal["local", "ollama", "openai", "fake"]
PROVIDERS: tuple[str, ...] = ("local", "ollama", "openai", "fake")
DEFAULT_MODELS: dict[str, str] = {
    "local": "all-MiniLM-L6-v2",
    "ollama": "nomic-embed-text",
    "openai": "text-embedding-3-small",
    "fake": "fake-384",
}


@dataclass(frozen=True)
class ProviderConfig:
    """Which provider and model a collection embeds with, and how to reach it.

    `base_url` overrides the provider's default endpoint (an OpenAI-compatible server such as
    vLLM, TEI, LM Studio or DeepSeek; another Ollama host); `fallback_urls` are further
    endpoints serving the *same* model, tried in order when one is down. `dimensions` is sent
    to providers that can shorten vectors (OpenAI text-embedding-3). API keys are never part
    of a config: they come from settings (secrets).
    """

    provider: str = "local"
    model: str = "all-MiniLM-L6-v2"
    base_url: str | None = None
    fallback_urls: tuple[str, ...] = ()
    dimensions: int | None = None
    max_batch: int | None = None  # texts per request; None: the adapter's default
    max_batch_tokens: int | None = None  # tokens per request; None: the adapter's default
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigurationError(
                f"unknown embedding provider {self.provider!r}; choose one of "
                f"{', '.join(PROVIDERS)} (setting embedding_provider or --provider)"
            )
        if not self.model or not self.model.strip():
            raise ConfigurationError("the embedding model name is empty; set --model")

    @property
    def model_key(self) -> str:
        """What identifies the vector space: the cache and indexes are keyed by it. Fallback
        endpoints and base URLs are not part of it: they must serve the same model."""
        dims = f":{self.dimensions}" if self.dimensions else ""
        return f"{self.provider}:{self.model}{dims}"

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "base_url": self.base_url,
            "fallback_urls": list(self.fallback_urls),
            "dimensions": self.dimensions,
            "max_batch": self.max_batch,
            "max_batch_tokens": self.max_batch_tokens,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "options": self.options,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProviderConfig:
        data = dict(data)
        data["fallback_urls"] = tuple(data.get("fallback_urls") or ())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@runtime_checkable
class Provider(Protocol):
    """An embedding endpoint for one model.

    `embed` returns one row per text, float32, in input order, and raises only
    `ProviderError` subclasses. `max_batch` / `max_batch_tokens` tell callers how to size
    requests. `endpoint` names where calls go (for logs, the breaker and error messages).
    """

    name: str
    model: str
    endpoint: str
    max_batch: int
    max_batch_tokens: int

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    async def dimensions(self) -> int:
        """The length of this model's vectors (probed with one short call if unknown)."""
        ...

    async def close(self) -> None: ...


def make_provider(
    config: ProviderConfig, settings: Settings, *, base_url: str | None = None
) -> Provider:
    """The adapter for `config`, reaching `base_url` (default: the config's, then settings').

    Optional dependencies are imported here, so a missing one is a clear error naming the
    extra to install rather than an ImportError at start-up.
    """
    if config.provider == "local":
        from embedq.providers.local import LocalProvider

        return LocalProvider(config, settings)
    if config.provider == "ollama":
        from embedq.providers.ollama import OllamaProvider

        return OllamaProvider(config, settings, base_url=base_url)
    if config.provider == "openai":
        from embedq.providers.openai import OpenAIProvider

        return OpenAIProvider(config, settings, base_url=base_url)
    from embedq.providers.fake import FakeProvider

    return FakeProvider(config, settings)


def as_matrix(rows: Any, expected: int, where: str) -> np.ndarray:
    """Validate a provider's vectors: `expected` rows of one finite length, as float32."""
    from embedq.errors import ProviderUnavailable

    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise ProviderUnavailable(
            f"{where} returned embeddings that are not lists of numbers"
        ) from None
    if matrix.ndim != 2 or matrix.shape[0] != expected or matrix.shape[1] == 0:
        raise ProviderUnavailable(
            f"{where} returned {matrix.shape[0] if matrix.ndim else 0} embeddings of shape "
            f"{matrix.shape} for {expected} texts"
        )
    if not np.isfinite(matrix).all():
        raise ProviderUnavailable(f"{where} returned embeddings containing NaN or infinity")
    return matrix
