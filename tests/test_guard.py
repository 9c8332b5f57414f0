"""Circuit breakers, rate limits and same-model fallbacks (providers/guard.py), alone and in
the pipeline: while a provider is down its jobs wait without spending attempts, a half-open
probe closes the circuit when it is back, and a 429's Retry-After is honoured."""

from __future__ import annotations

import asyncio
import time

import pytest
from psycopg.rows import tuple_row
from tests.conftest import drain
from tests.fake_servers import FakeOpenAI

import embedq
from embedq.errors import CircuitOpen, ProviderUnavailable, RateLimited
from embedq.providers import ProviderConfig
from embedq.providers.guard import Breaker, GuardedProvider, TokenBucket
from embedq.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_the_threshold_then_half_opens_one_probe() -> None:
    clock = Clock()
    b = Breaker("http://x", threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        b.before_call()
        b.failed()
    assert b.state == "closed"
    b.before_call()
    b.failed()
    assert b.state == "open"
    with pytest.raises(CircuitOpen) as info:
        b.before_call()
    assert 9 <= info.value.retry_after <= 10
    clock.now += 10
    assert b.state == "half-open"
    b.before_call()  # the one probe
    with pytest.raises(CircuitOpen):
        b.before_call()  # no second call while the probe is out
    b.failed()  # the probe failed: open again for a full cool-down
    assert b.state == "open" and b.retry_after() == 10
    clock.now += 10
    b.before_call()
    b.succeeded()
    assert b.state == "closed" and b.failures == 0


def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    b = Breaker("http://x", threshold=2, cooldown_s=1, clock=Clock())
    b.failed()
    b.succeeded()
    b.failed()
    assert b.state == "closed"


async def test_token_bucket_makes_callers_wait_for_capacity() -> None:
    bucket = TokenBucket(per_minute=600)  # 10 per second
    await bucket.take(600)
    t = time.monotonic()
    await bucket.take(5)
    assert time.monotonic() - t >= 0.4


async def test_a_models_rate_limits_make_calls_wait_instead_of_earning_429s() -> None:
    """The collection options rpm / tpm reach the guard: past a minute's budget, calls wait
    (a lower bound on time: a slow machine only makes it longer)."""
    per_tokens = GuardedProvider(
        ProviderConfig(provider="fake", model="fake-8", tokens_per_minute=6000),
        Settings.load(),
    )
    await per_tokens.embed(["a"], tokens=6000)  # the whole minute's tokens
    t = time.monotonic()
    await per_tokens.embed(["b"], tokens=50)  # 100 tokens/s: half a second
    assert time.monotonic() - t >= 0.4
    per_request = GuardedProvider(
        ProviderConfig(provider="fake", model="fake-8", requests_per_minute=60), Settings.load()
    )
    for _ in range(60):
        await per_request.embed(["c"])
    t = time.monotonic()
    await per_request.embed(["d"])  # the 61st request of the minute: one second
    assert time.monotonic() - t >= 0.8


def settings(**kw: object) -> Settings:
    return Settings.load(cli={"breaker_failures": 2, "breaker_cooldown_s": 0.5, **kw})


async def test_fallback_endpoint_serving_the_same_model_takes_over() -> None:
    with FakeOpenAI() as down, FakeOpenAI() as up:
        down.fail_next(503, times=100)
        config = ProviderConfig(
            provider="openai",
            model="text-embedding-3-small",
            base_url=down.base_url,
            fallback_urls=(up.base_url,),
        )
        guarded = GuardedProvider(config, settings())
        try:
            for _ in range(4):
                vectors = await guarded.embed(["hello"], tokens=1)
                assert vectors.shape == (1, 384)
            # the first endpoint failed twice, then its circuit opened and it was skipped
            assert down.requests == 2 and up.requests == 4
            assert guarded.circuits() == {down.base_url: "open", up.base_url: "closed"}
        finally:
            await guarded.close()


async def test_rate_limited_is_not_an_outage() -> None:
    with FakeOpenAI() as srv:
        srv.fail_next(429, retry_after=3, times=5)
        guarded = GuardedProvider(
            ProviderConfig(
                provider="openai", model="text-embedding-3-small", base_url=srv.base_url
            ),
            settings(),
        )
        try:
            for _ in range(3):
                with pytest.raises(RateLimited) as info:
                    await guarded.embed(["x"])
                assert info.value.retry_after == 3
            assert guarded.circuits() == {srv.base_url: "closed"}
        finally:
            await guarded.close()


async def test_all_endpoints_down_raises_the_transient_error() -> None:
    guarded = GuardedProvider(
        ProviderConfig(provider="ollama", model="m", base_url="http://127.0.0.1:9"), settings()
    )
    try:
        with pytest.raises(ProviderUnavailable):
            await guarded.embed(["x"])
        with pytest.raises(ProviderUnavailable):
            await guarded.embed(["x"])
        with pytest.raises(CircuitOpen):
            await guarded.embed(["x"])
    finally:
        await guarded.close()


async def jobs(app: embedq.App, query: str) -> list[tuple[object, ...]]:
    assert app.pool is not None
    async with app.pool.connection() as conn:
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(query)
        return await cur.fetchall()


async def test_pipeline_waits_out_an_outage_without_spending_attempts(db_url: str) -> None:
    """Provider down: the circuit opens, the embed jobs go back to the queue with their
    attempt refunded, and once the provider answers again a probe closes the circuit and
    every document is embedded. No job is dead-lettered."""
    app = embedq.App(
        database_url=db_url,
        poll_interval_s=0.1,
        breaker_failures=2,
        breaker_cooldown_s=1.0,
        retry_base_s=0.05,
        embed_batch_size=5,
        embed_max_attempts=3,
    )
    with FakeOpenAI() as srv:
        async with app:
            col = await app.collections.create(
                "outage",
                provider="openai",
                model="text-embedding-3-small",
                dimensions=384,
                base_url=srv.base_url,
            )
            srv.fail_next(500, times=4)
            await col.upsert_many([{"key": f"d{i}", "text": f"text {i}"} for i in range(20)])
            worker = embedq.Worker(app, install_signals=False, exit_when_idle=False)
            run = asyncio.create_task(worker.run())
            opened = False
            for _ in range(200):
                if app.endpoints.circuits().get(srv.base_url) == "open":
                    opened = True
                    break
                await asyncio.sleep(0.02)
            assert opened, "the circuit never opened"
            # while open: jobs wait with attempts refunded (3 attempts would be long spent)
            pending = await jobs(
                app, "SELECT max(attempts) FROM embedq.jobs WHERE state = 'pending'"
            )
            assert pending[0][0] is None or pending[0][0] <= 2
            for _ in range(300):
                if not await jobs(app, "SELECT 1 FROM embedq.jobs"):
                    break
                await asyncio.sleep(0.05)
            worker.stop()
            await run
            assert await jobs(
                app, "SELECT state::text, count(*) FROM embedq.jobs_archive GROUP BY 1"
            ) == [("succeeded", 20)]
            assert app.endpoints.circuits() == {srv.base_url: "closed"}
            assert (await col.with_fresh_state()).counts["embedded"] == 20


async def test_permanent_provider_errors_dead_letter_at_once_with_the_fix(db_url: str) -> None:
    app = embedq.App(database_url=db_url, poll_interval_s=0.1)
    with FakeOpenAI(models=["other-model"]) as srv:
        async with app:
            col = await app.collections.create(
                "nomodel",
                provider="openai",
                model="text-embedding-3-small",
                dimensions=384,
                base_url=srv.base_url,
            )
            await col.upsert_many([{"key": f"d{i}", "text": f"text {i}"} for i in range(3)])
            await drain(app)
            dead = await jobs(
                app, "SELECT attempts, last_error FROM embedq.jobs_archive WHERE state = 'dead'"
            )
            assert len(dead) == 3 and all(a == 1 for a, _ in dead)
            assert "ModelNotFound" in str(dead[0][1]) and "text-embedding-3-small" in str(
                dead[0][1]
            )
            doc = await col.get("d0")
            assert doc.status == "failed" and doc.error and "not found" in doc.error
