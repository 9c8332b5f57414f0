"""The App that the dashboard's end-to-end test (tests/test_ui.py) serves:

    EMBEDQ_APP=ui_app:app embedq serve

`ui.flaky` fails permanently while its marker file exists and succeeds once the file is gone:
the test watches the job die, removes the file, and retries the job from the dashboard.

Run as a script, it seeds the data directory that EMBEDQ_DATA_DIR names (the server's), and
prints the ids it made as JSON:

    python -m ui_app /tmp/marker     # {"job_id": 4, "later_id": 5, "collection": "ui-docs"}
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import embedq

app = embedq.App()

COLLECTION = "ui-docs"
DOCUMENTS = [
    {"key": "kettle", "title": "Descaling a kettle", "text": "Boil vinegar in the kettle."},
    {"key": "bread", "title": "Sourdough", "text": "Feed the starter the night before."},
    {"key": "bike", "title": "Bicycle chains", "text": "Clean and oil the chain monthly."},
]


@app.task(name="ui.flaky", queue="ui")
def flaky(marker: str) -> str:
    if Path(marker).exists():
        raise embedq.PermanentError(
            f"marker file {marker} exists; remove it and retry this job <b>not bold</b>"
        )
    return "marker gone"


async def seed(marker: str) -> dict[str, object]:
    """A collection on the fake provider with a few documents, a `ui.flaky` job to run now,
    and one due in an hour (it stays pending)."""
    async with app:
        collection = await app.collections.create(
            COLLECTION, provider="fake", dimensions=32, exist_ok=True
        )
        await collection.upsert_many(DOCUMENTS)
        job = await flaky.defer_async(marker=marker)
        later = await flaky.configure(delay_s=3600).defer_async(marker=marker)
    return {"job_id": job.id, "later_id": later.id, "collection": COLLECTION}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(seed(sys.argv[1]))))
