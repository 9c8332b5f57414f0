"""A deterministic in-process provider for tests, demos and benchmarks.

Each word gets a fixed pseudo-random dense unit vector (seeded by a hash of the word); a
text's vector is the normalised sum of its words' vectors (a random-projection bag of
words). Texts sharing words are close, identical texts are identical, vectors are dense
like real embeddings, and no model or network is involved. Options (collection `provider_options`):

- `fail_on`: a substring; a batch containing a text with it is refused with BadInput (400),
  the way a real provider refuses a whole request for one bad input;
- `latency_ms`: a delay per call.

`FakeProvider.calls` / `.texts` count what was sent, process-wide, for cache tests.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from embedq.errors import BadInput

if TYPE_CHECKING:
    from embedq.providers import ProviderConfig
    from embedq.settings import Settings

_WORD = re.compile(r"\w+")


class FakeProvider:
    """See the module docstring."""

    name = "fake"
    calls: ClassVar[int] = 0
    texts: ClassVar[int] = 0

    def __init__(self, config: ProviderConfig, settings: Settings | None = None) -> None:
        self.model = config.model
        self.endpoint = "fake"
        self.max_batch = config.max_batch or 256
        self.max_batch_tokens = config.max_batch_tokens or 100_000
        match = re.search(r"(\d+)$", config.model)
        self.dims = config.dimensions or (int(match.group(1)) if match else 384)
        self.fail_on = config.options.get("fail_on")
        self.latency_s = float(config.options.get("latency_ms", 0)) / 1000

    async def embed(self, texts: list[str]) -> np.ndarray:
        FakeProvider.calls += 1
        FakeProvider.texts += len(texts)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.fail_on:
            for i, text in enumerate(texts):
                if self.fail_on in text:
                    raise BadInput(f"fake provider refused input {i}: it contains {self.fail_on!r}")
        return (
            np.stack([self.vector(t) for t in texts])
            if texts
            else np.zeros((0, self.dims), dtype=np.float32)
        )

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dims, dtype=np.float32)
        for word in _WORD.findall(text.lower()) or [""]:
            v += _word_vector(word, self.dims)
        norm = float(np.linalg.norm(v))
        return v / norm if norm else v

    async def dimensions(self) -> int:
        return self.dims

    async def close(self) -> None:
        return None

    @classmethod
    def reset_counts(cls) -> None:
        cls.calls = 0
        cls.texts = 0


@functools.lru_cache(maxsize=100_000)
def _word_vector(word: str, dims: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)
