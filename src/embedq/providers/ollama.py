"""The Ollama adapter: `POST {base}/api/embed` on a local or remote Ollama server.

    provider = OllamaProvider(ProviderConfig(provider="ollama", model="nomic-embed-text"), s)
    vectors = await provider.embed(["a text"])   # float32 (1, 768)

Ollama truncates each input to the model's context (`"truncate": true`) rather than refusing
it, so a long chunk costs its tail, never the batch. Ollama normalises the vectors it
returns from `/api/embed`. `config.options` may carry Ollama's own `keep_alive` (how long
the model stays loaded) and `options` (model parameters such as `num_ctx`); they are sent
as given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from embedq.providers import as_matrix
from embedq.providers._http import (
    HttpProvider,
    JsonClient,
    Service,
    VectorWidth,
    malformed,
    normalize_url,
)

if TYPE_CHECKING:
    from embedq.providers import ProviderConfig
    from embedq.settings import Settings

_PASSED_OPTIONS = ("keep_alive", "options")


class OllamaProvider(HttpProvider):
    """See the module docstring."""

    name = "ollama"

    def __init__(
        self, config: ProviderConfig, settings: Settings, base_url: str | None = None
    ) -> None:
        base = normalize_url(
            base_url or config.base_url or settings.ollama_url, "EMBEDQ_OLLAMA_URL"
        )
        self.model = config.model
        self.endpoint = base
        self.max_batch = config.max_batch or 64
        # Ollama truncates each input itself; requests are bounded by count, not tokens.
        self.max_batch_tokens = config.max_batch_tokens or 1_000_000
        self._requested_dims = config.dimensions
        self._extra = {k: config.options[k] for k in _PASSED_OPTIONS if k in config.options}
        self._service = Service(
            label="Ollama",
            base_url=base,
            model=config.model,
            model_fix=f"Pull it with 'ollama pull {config.model}' or choose another --model.",
            auth_fix="Ollama itself takes no API key: point EMBEDQ_OLLAMA_URL at the Ollama "
            "server rather than at a proxy that demands credentials.",
            url_setting="EMBEDQ_OLLAMA_URL",
            url_hint=" (like http://localhost:11434; /api/embed needs Ollama 0.3.0 or newer)",
        )
        self._width = VectorWidth(self._service, config.dimensions)
        self._http = JsonClient(self._service, settings)

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        payload: dict[str, Any] = {"model": self.model, "input": texts, "truncate": True}
        if self._requested_dims:
            payload["dimensions"] = self._requested_dims
        payload.update(self._extra)
        body = await self._http.post("/api/embed", payload)
        rows = body.get("embeddings") if isinstance(body, dict) else None
        if not isinstance(rows, list):
            raise malformed(self._service, "a reply without an 'embeddings' list")
        matrix = as_matrix(rows, len(texts), self._service.where)
        return self._width.check(matrix)
