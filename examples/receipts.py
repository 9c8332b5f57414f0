"""Receipt sync, serialised per business, on high/default/low queues.

Run it against the embedded database (or EMBEDQ_DATABASE_URL):

    python examples/receipts.py          # enqueue, drain with one in-process worker, report

or run the worker as its own process:

    embedq worker --app examples.receipts:app --queues high,default,low
"""

from __future__ import annotations

import asyncio
import random

import embedq

app = embedq.App()
synced: list[tuple[int, int]] = []


@app.task(
    name="receipts.sync",
    queue="default",
    lock="business:{business_id}",  # never two syncs of one business at once
    dedup="receipts:{business_id}:{period}",  # a second click while queued changes nothing
    max_attempts=5,  # transient errors retry with growing, jittered delays
    timeout=120,
)
async def sync_receipts(business_id: int, period: str) -> dict[str, int]:
    await asyncio.sleep(random.uniform(0.001, 0.01))  # stands for the provider's API
    synced.append((business_id, len(synced)))
    return {"business_id": business_id, "receipts": random.randint(0, 40)}


@app.task(name="receipts.estimate", queue="low", retry=embedq.RetryPolicy(max_attempts=3))
def estimate_taxes(business_id: int) -> None:
    """A plain function: workers run it in a thread, never on the event loop."""
    if business_id < 0:
        raise embedq.PermanentError(f"business {business_id} does not exist")


async def main() -> None:
    async with app:
        # A user clicked "sync now" for business 7: urgent, on the high queue.
        await sync_receipts.configure(queue="high", priority=10).defer_async(
            business_id=7, period="2026-11"
        )
        # The nightly batch: one round trip for all businesses.
        await sync_receipts.defer_many_async(
            [{"business_id": b, "period": "2026-11"} for b in range(1, 51)]
        )
        await estimate_taxes.defer_many_async([{"business_id": b} for b in (1, 2, -1)])
        worker = embedq.Worker(
            app, queues=["high", "default", "low"], concurrency=20, exit_when_idle=True
        )
        await worker.run()
        failed = await app.store.fetch("failed", {"limit": 10})
    # 51 requests, 50 jobs: business 7's click and its nightly sync coalesced (dedup key)
    print(f"synced {len(synced)} businesses")
    print(f"dead-lettered: {[(f['task'], f['last_error']) for f in failed]}")


if __name__ == "__main__":
    asyncio.run(main())
