"""The OpenAI adapter: `POST {base}/embeddings` on the OpenAI API or any server speaking its
protocol (vLLM, TEI, LM Studio, llama.cpp, DeepSeek...).

    config = ProviderConfig(provider="openai", model="text-embedding-3-small", dimensions=512)
    vectors = await OpenAIProvider(config, settings).embed(["a text"])   # float32 (1, 512)

Vectors are asked for as base64 (`"encoding_format": "base64"`): little-endian float32
bytes are about a quarter of the size of JSON numbers and decode without parsing. A server
that ignores the format and sends number lists is accepted too. Rows are put back in input
order by each item's `index`, which the protocol does not promise to follow. The API key
(setting `openai_api_key`) is sent as a Bearer token only when set: a local server may
need none.
"""

from __future__ import annotations

import base64
import binascii
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


class OpenAIProvider(HttpProvider):
    """See the module docstring."""

    name = "openai"

    def __init__(
        self, config: ProviderConfig, settings: Settings, base_url: str | None = None
    ) -> None:
        base = normalize_url(
            base_url or config.base_url or settings.openai_base_url, "EMBEDQ_OPENAI_BASE_URL"
        )
        self.model = config.model
        self.endpoint = base
        # OpenAI allows 2048 inputs and 300k tokens per request; stay clear of both.
        self.max_batch = config.max_batch or 512
        self.max_batch_tokens = config.max_batch_tokens or 250_000
        self._requested_dims = config.dimensions
        key = settings.openai_api_key
        has_key = key is not None and bool(key.get_secret_value())
        self._service = Service(
            label="OpenAI-compatible server",
            base_url=base,
            model=config.model,
            model_fix=f"Choose a model it serves (GET {base}/models lists them) with --model.",
            auth_fix=(
                "Set EMBEDQ_OPENAI_API_KEY (or `embedq settings set openai_api_key KEY`) to a "
                "valid key for this server."
                if has_key
                else "No API key is set: set EMBEDQ_OPENAI_API_KEY (or `embedq settings set "
                "openai_api_key KEY`)."
            ),
            url_setting="EMBEDQ_OPENAI_BASE_URL",
            url_hint=" (it usually ends with /v1, as in https://api.openai.com/v1)",
        )
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key and has_key else {}
        self._width = VectorWidth(self._service, config.dimensions)
        self._http = JsonClient(self._service, settings, headers=headers)

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        payload: dict[str, Any] = {
            "model": self.model,
            "input": texts,
            "encoding_format": "base64",
        }
        if self._requested_dims:
            payload["dimensions"] = self._requested_dims
        body = await self._http.post("/embeddings", payload)
        matrix = as_matrix(self._rows(body, len(texts)), len(texts), self._service.where)
        return self._width.check(matrix)

    def _rows(self, body: Any, expected: int) -> list[Any]:
        """The embeddings of `body` in input order, base64 decoded."""
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise malformed(self._service, "a reply without a 'data' list")
        if len(data) != expected:
            raise malformed(self._service, f"{len(data)} embeddings for {expected} texts")
        rows: list[Any] = [None] * expected
        for position, item in enumerate(data):
            if not isinstance(item, dict) or "embedding" not in item:
                raise malformed(self._service, f"data[{position}] without an 'embedding'")
            index = item.get("index", position)
            if not isinstance(index, int) or not 0 <= index < expected or rows[index] is not None:
                raise malformed(self._service, f"data[{position}] with a bad index {index!r}")
            rows[index] = self._decode(item["embedding"], position)
        return rows

    def _decode(self, embedding: Any, position: int) -> Any:
        if not isinstance(embedding, str):
            return embedding  # a number list, from a server that ignores encoding_format
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError):
            raise malformed(self._service, f"data[{position}] that is not valid base64") from None
        if len(raw) % 4:
            raise malformed(self._service, f"data[{position}] that is not float32 bytes")
        return np.frombuffer(raw, dtype="<f4")
