"""HTTP plumbing shared by the Ollama and OpenAI adapters: one keep-alive client per provider
instance, the one place where HTTP failures become embedq's errors, and the checks every
HTTP reply gets (batching, a steady vector width).

    service = Service("Ollama", "http://localhost:11434", "nomic-embed-text",
                      model_fix="Pull it with 'ollama pull nomic-embed-text'.",
                      auth_fix="...", url_setting="EMBEDQ_OLLAMA_URL")
    client = JsonClient(service, settings)
    body = await client.post("/api/embed", {"model": ..., "input": [...]})  # or ProviderError

Mapping (`provider_error`): 401/403 -> AuthenticationFailed; 404 (or OpenAI's
`model_not_found`) -> ModelNotFound, worded for a missing model or for a wrong URL; 408 ->
ProviderTimeout; 429 -> RateLimited with the server's Retry-After; other 4xx -> BadInput; 5xx
and 3xx -> ProviderUnavailable; time-outs -> ProviderTimeout; refused connections and broken
transfers -> ProviderUnavailable. No httpx exception gets past `JsonClient.post`. API keys
travel only in request headers: no message built here quotes a key, nor the server's reply to
a bad key (OpenAI echoes part of it).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from embedq.errors import (
    AuthenticationFailed,
    BadInput,
    ConfigurationError,
    ModelNotFound,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from embedq.settings import Settings

# A provider's own error text is worth quoting, but a proxy's HTML error page is not.
_DETAIL_CHARS = 300
# An unreachable host should fail fast even when requests may take minutes (a cold model).
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Service:
    """Who an HTTP adapter talks to, worded for error messages that name the fix."""

    label: str  # "Ollama", "OpenAI-compatible server"
    base_url: str
    model: str
    model_fix: str  # what to do when the model is missing
    auth_fix: str  # what to do when credentials are refused; never contains a key
    url_setting: str  # the setting holding base_url, e.g. EMBEDQ_OLLAMA_URL
    url_hint: str = ""  # what a right base_url looks like, e.g. " (it ends with /v1)"

    @property
    def where(self) -> str:
        return f"{self.label} at {self.base_url}"


def normalize_url(url: str, setting: str) -> str:
    """`url` without its trailing slash, or ConfigurationError when it is not http(s)."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(
            f"{setting} {url!r} is not an http(s) URL; set it like http://localhost:11434 "
            "(scheme, host and port)"
        )
    return str(parsed).rstrip("/")


class JsonClient:
    """A keep-alive httpx client for one provider instance whose failures are ProviderErrors.

    The whole request (connect, send, wait, read) is bounded by `provider_timeout_s`; httpx's
    own time-outs only bound each socket operation, so a server trickling bytes could
    otherwise hold a request for ever.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.service = service
        self.timeout_s = settings.provider_timeout_s
        self._client = httpx.AsyncClient(
            base_url=service.base_url,
            headers={"User-Agent": "embedq", **(headers or {})},
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, _CONNECT_TIMEOUT_S)),
        )

    async def post(self, path: str, payload: Mapping[str, Any]) -> Any:
        """POST `payload` as JSON to `path`; the decoded JSON reply of a 2xx answer."""
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.post(path, json=payload)
        except (httpx.HTTPError, httpx.InvalidURL, TimeoutError) as exc:
            raise provider_error(self.service, exc, timeout_s=self.timeout_s) from exc
        if not response.is_success:
            raise provider_error(self.service, response, timeout_s=self.timeout_s)
        try:
            return response.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            what = f"a body that is not JSON: {_snippet(response.text)}"
            raise malformed(self.service, what) from None

    async def aclose(self) -> None:
        await self._client.aclose()


async def in_batches(
    texts: list[str], size: int, embed_batch: Callable[[list[str]], Awaitable[np.ndarray]]
) -> np.ndarray:
    """`embed_batch` over `texts` in slices of at most `size`, rows concatenated in order."""
    parts = [await embed_batch(texts[i : i + size]) for i in range(0, len(texts), size)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class VectorWidth:
    """The length of an endpoint's vectors: learnt from its first reply, then enforced.

    A reply of another length means a mixed fleet behind one URL or a server that ignored
    the `dimensions` asked for; either would corrupt an index, so it is refused.
    """

    def __init__(self, service: Service, requested: int | None) -> None:
        self.service = service
        self.requested = requested
        self.known = requested

    def check(self, matrix: np.ndarray) -> np.ndarray:
        width = int(matrix.shape[1])
        if self.requested and width != self.requested:
            raise ModelNotFound(
                f"{self.service.where} returned {width}-dimensional vectors for model "
                f"{self.service.model!r} although dimensions={self.requested} was asked "
                "for; it cannot shorten this model's vectors: unset the collection's dimensions"
            )
        if self.known is None:
            self.known = width
        elif width != self.known:
            raise malformed(
                self.service, f"{width}-dimensional vectors after {self.known}-dimensional ones"
            )
        return matrix


def provider_error(
    service: Service,
    failure: httpx.Response | BaseException,
    *,
    timeout_s: float | None = None,
) -> ProviderError:
    """The embedq error for a non-2xx `failure` response or an exception raised by httpx."""
    where = service.where
    if isinstance(failure, BaseException):
        if isinstance(failure, TimeoutError | httpx.TimeoutException):
            limit = f" within {timeout_s:g}s" if timeout_s else ""
            return ProviderTimeout(
                f"{where} did not answer{limit}; it will be retried. If it is merely slow "
                "(a model loading, large batches), raise EMBEDQ_PROVIDER_TIMEOUT_S or lower "
                "the batch size"
            )
        if isinstance(failure, httpx.ConnectError):
            return ProviderUnavailable(
                f"cannot reach {where} ({failure or type(failure).__name__}); is it running, "
                f"and is {service.url_setting} right?"
            )
        return ProviderUnavailable(
            f"request to {where} failed ({type(failure).__name__}: {failure}); it will be retried"
        )

    status = failure.status_code
    code, detail = _error_detail(failure)
    said = f": {detail}" if detail else ""
    if status in (401, 403):
        # The server's text is left out on purpose: OpenAI quotes part of the rejected key.
        return AuthenticationFailed(
            f"{where} refused the credentials ({status}). {service.auth_fix}"
        )
    if code == "model_not_found" or (status == 404 and service.model in detail):
        return ModelNotFound(
            f"model {service.model!r} not found on {where} ({status}{said}). {service.model_fix}"
        )
    if status == 404:
        # No word of the model: the path itself is unknown, so the URL is what is wrong.
        return ModelNotFound(
            f"{where} has no {failure.request.url.path} ({status}{said}): it is not the URL "
            f"of this API or does not serve model {service.model!r}. Check "
            f"{service.url_setting}{service.url_hint}"
        )
    if status == 408:
        return ProviderTimeout(f"{where} timed out the request (408{said}); it will be retried")
    if status == 429:
        wait = retry_after(failure.headers)
        when = f"after {wait:g}s" if wait is not None else "with backoff"
        return RateLimited(
            f"{where} is rate limiting (429{said}); retrying {when}. Lower the collection's "
            "requests_per_minute/tokens_per_minute or raise the account's limits",
            retry_after=wait,
        )
    if 400 <= status < 500:
        return BadInput(f"{where} refused the input ({status}{said})")
    if 300 <= status < 400:
        location = failure.headers.get("location", "elsewhere")
        return ProviderUnavailable(
            f"{where} redirected the request ({status}) to {location}; set "
            f"{service.url_setting} to the final URL"
        )
    return ProviderUnavailable(f"{where} failed ({status}{said}); it will be retried")


def malformed(service: Service, what: str) -> ProviderUnavailable:
    """The error for a 2xx reply that is not what the protocol promises (a proxy, a bug)."""
    return ProviderUnavailable(
        f"{service.where} answered with {what}; is {service.url_setting} pointing at a real "
        f"{service.label}?"
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait before retrying, from `retry-after-ms` (OpenAI) or `Retry-After`
    (delta-seconds or an HTTP date); None when neither is present and valid.

    >>> retry_after({"retry-after": "2"})
    2.0
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        seconds = _non_negative(millis)
        if seconds is not None:
            return seconds / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _non_negative(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one would misread local time
        return None
    return max(0.0, when.timestamp() - time.time())


def _non_negative(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds != float("inf") else None


def _error_detail(response: httpx.Response) -> tuple[str | None, str]:
    """(error code, error message) from the body, in Ollama's `{"error": "..."}`, OpenAI's
    `{"error": {"message", "type", "code"}}` or a plain-text shape."""
    try:
        text = response.text
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return None, ""
    try:
        body = json.loads(text)
    except ValueError:
        return None, _snippet(text)
    code: str | None = None
    message: Any = body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            raw_code = error.get("code")
            code = raw_code if isinstance(raw_code, str) else None
            message = error.get("message") or error.get("detail") or error
        else:
            message = error
    return code, _snippet(message if isinstance(message, str) else json.dumps(message))


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


class HttpProvider:
    """What the HTTP adapters share: batching, the probe for the vector length, closing.
    A subclass sets `max_batch`, `_width`, `_http` and implements `_embed_batch`."""

    max_batch: int
    _width: VectorWidth
    _http: JsonClient

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, await self.dimensions()), dtype=np.float32)
        return await in_batches(texts, self.max_batch, self._embed_batch)

    async def dimensions(self) -> int:
        if self._width.known is None:
            await self._embed_batch(["dimensions probe"])
        assert self._width.known is not None  # learnt from the probe
        return self._width.known

    async def close(self) -> None:
        await self._http.aclose()
