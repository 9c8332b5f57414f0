"""What stands between the pipeline and a provider: circuit breakers, rate limits, bounded
concurrency and same-model fallback endpoints.

    guarded = endpoints(settings).get(config)      # one per model and endpoint list, per process
    vectors = await guarded.embed(texts, tokens=sum_of_token_counts)

- **Circuit breaker, one per endpoint.** `breaker_failures` transient failures in a row
  (unreachable, 5xx, time-out) open it: calls fail at once with `CircuitOpen(retry_after)`,
  and the pipeline hands its jobs back to the queue to wait without spending attempts. After
  `breaker_cooldown_s` one call goes through as a half-open probe: success closes the
  circuit, failure opens it again. A 429 does not count (the endpoint is alive), nor does a
  400 (the input was bad, not the endpoint).
- **Rate limits** (`rpm`, `tpm` provider options): token buckets per model; a call waits for
  capacity rather than earning a 429.
- **Fallback endpoints** serve the same model (a collection's `fallback_urls`); the next one
  is tried when one fails transiently or is open. A different model is never a fallback:
  vectors of two models must not share an index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedq import metrics, tracing
from embedq.errors import (
    BadInput,
    CircuitOpen,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from embedq.providers import Provider, ProviderConfig, make_provider

if TYPE_CHECKING:
    from embedq.settings import Settings

log = logging.getLogger("embedq.providers")


@dataclass
class Breaker:
    """A circuit breaker for one endpoint (see the module docstring)."""

    endpoint: str
    threshold: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    model: str = ""  # for the metric: one endpoint can serve several models, each its breaker

    def _now(self) -> float:
        return self.clock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self._now() - self.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def retry_after(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown_s - (self._now() - self.opened_at))

    def publish(self) -> None:
        """Set the circuit-state metric (also refreshed at scrape time: open turns half-open
        by the clock alone)."""
        metrics.observe_circuit(self.endpoint, self.model, self.state)

    def before_call(self) -> None:
        """Raise CircuitOpen unless a call may go now (closed, or the one half-open probe)."""
        state = self.state
        if state == "closed":
            return
        if state == "half-open" and not self.probing:
            self.probing = True
            log.info("circuit of %s half-open: sending one probe", self.endpoint)
            self.publish()
            return
        raise CircuitOpen(
            f"circuit breaker for {self.endpoint} is open after {self.threshold} failures in "
            f"a row; next probe in {self.retry_after():.0f} s",
            retry_after=max(self.retry_after(), 1.0),
        )

    def succeeded(self) -> None:
        if self.opened_at is not None:
            log.info("circuit of %s closed: the endpoint answers again", self.endpoint)
            self.opened_at = None
            self.publish()
        self.failures, self.probing = 0, False

    def failed(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            if self.opened_at is None or self.probing:
                log.warning(
                    "circuit of %s open for %.0f s after %d failures in a row",
                    self.endpoint,
                    self.cooldown_s,
                    self.failures,
                )
            self.opened_at = self._now()
            self.probing = False
            self.publish()


class TokenBucket:
    """Capacity per minute, refilled continuously; `take` waits until there is enough."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.at = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)  # one oversized call still goes, alone
        async with self.lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
                self.at = now
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)


_TRANSIENT_FOR_BREAKER = (ProviderUnavailable, ProviderTimeout)


class GuardedProvider:
    """A model reachable through one or more endpoints, with the protections above."""

    def __init__(self, config: ProviderConfig, settings: Settings) -> None:
        self.config = config
        urls: Sequence[str | None] = [config.base_url, *config.fallback_urls]
        self.providers: list[Provider] = [make_provider(config, settings, base_url=u) for u in urls]
        first = self.providers[0]
        self.max_batch = first.max_batch
        self.max_batch_tokens = first.max_batch_tokens
        self.breakers = [
            Breaker(
                p.endpoint,
                settings.breaker_failures,
                settings.breaker_cooldown_s,
                model=config.model,
            )
            for p in self.providers
        ]
        for b in self.breakers:
            b.publish()
        self.slots = asyncio.Semaphore(settings.provider_concurrency)
        self.rpm = TokenBucket(config.requests_per_minute) if config.requests_per_minute else None
        self.tpm = TokenBucket(config.tokens_per_minute) if config.tokens_per_minute else None
        self.calls = 0
        self.errors: dict[str, int] = {}
        labels = {"provider": config.provider, "model": config.model}
        self._seconds = metrics.PROVIDER_SECONDS.labels(**labels)
        self._texts = metrics.PROVIDER_TEXTS.labels(**labels)

    @property
    def endpoint(self) -> str:
        return self.providers[0].endpoint

    def circuits(self) -> dict[str, str]:
        return {b.endpoint: b.state for b in self.breakers}

    async def embed(self, texts: list[str], tokens: int = 0) -> np.ndarray:
        """Embed through the first endpoint that can take the call."""
        with tracing.span(
            "embedq.provider.embed",
            provider=self.config.provider,
            model=self.config.model,
            texts=len(texts),
            tokens=tokens or None,
        ) as sp:
            if self.rpm:
                await self.rpm.take(1)
            if self.tpm and tokens:
                await self.tpm.take(tokens)
            last: ProviderError | None = None
            async with self.slots:
                for provider, breaker in zip(self.providers, self.breakers, strict=True):
                    try:
                        breaker.before_call()
                    except CircuitOpen as exc:
                        last = _sooner(last, exc)
                        continue
                    self.calls += 1
                    sp.set_attribute("embedq.endpoint", metrics.endpoint_label(provider.endpoint))
                    started = time.perf_counter()
                    try:
                        vectors = await provider.embed(texts)
                    except ProviderError as exc:
                        self._observe(started, len(texts))
                        self._count(exc)
                        if isinstance(exc, _TRANSIENT_FOR_BREAKER):
                            breaker.failed()
                            last = exc
                            continue  # the next endpoint serving this model, if any
                        if isinstance(exc, BadInput):
                            breaker.succeeded()  # the endpoint works; the input was bad
                        raise
                    self._observe(started, len(texts))
                    breaker.succeeded()
                    return vectors
            assert last is not None
            raise last

    def _observe(self, started: float, texts: int) -> None:
        self._seconds.observe(time.perf_counter() - started)
        self._texts.observe(texts)

    def _count(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        self.errors[kind] = self.errors.get(kind, 0) + 1
        metrics.PROVIDER_ERRORS.labels(provider=self.config.provider, error=kind).inc()

    async def close(self) -> None:
        for p in self.providers:
            await p.close()


def _sooner(last: ProviderError | None, exc: CircuitOpen) -> ProviderError:
    if isinstance(last, CircuitOpen) and last.retry_after <= exc.retry_after:
        return last
    return exc


class Endpoints:
    """The guarded providers of one process, shared by every batch and every search."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_config: dict[str, GuardedProvider] = {}

    def get(self, config: ProviderConfig) -> GuardedProvider:
        key = repr(sorted(config.to_json().items()))
        guarded = self._by_config.get(key)
        if guarded is None:
            guarded = self._by_config[key] = GuardedProvider(config, self.settings)
        return guarded

    def circuits(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for g in self._by_config.values():
            out.update(g.circuits())
        return out

    def breakers(self) -> list[Breaker]:
        """Every breaker of this process's providers (one per model and endpoint)."""
        return [b for g in self._by_config.values() for b in g.breakers]

    async def close(self) -> None:
        for g in self._by_config.values():
            await g.close()
        self._by_config.clear()
