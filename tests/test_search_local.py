"""Search on a small real corpus with the real local model (all-MiniLM-L6-v2): a paraphrased
question must find the right document first, semantically and in hybrid mode."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from tests.conftest import drain

import embedq
from embedq import ingest

QUESTIONS = {
    "how do bees tell each other where the flowers are": "honeybees.md",
    "reclaim the disk space taken by dead rows": "postgres-vacuum.md",
    "how far should my long run be before the race": "marathon-training.txt",
    "keeping a wild yeast culture alive to bake with": "sourdough-bread.md",
    "containers that are scheduled together on one machine": "kubernetes-pods.html",
    "turning sunlight into power for the house": "solar-panels.txt",
    "paying income tax every quarter when self-employed": "tax-deadlines.txt",
    "which first moves to learn in chess": "chess-openings.md",
}


@pytest.fixture
async def corpus(app: embedq.App) -> embedq.Collection:
    col = await app.collections.create("corpus", provider="local")
    root = Path(str(resources.files("embedq") / "data" / "demo"))
    docs = [d for p in ingest.discover([root]) for d in ingest.read_file(p, root)]
    assert all(isinstance(d, ingest.SourceDoc) for d in docs) and len(docs) == 8
    await col.upsert_many(
        [{"key": d.key, "text": d.text, "title": d.title, "metadata": d.metadata} for d in docs]
    )
    await drain(app, timeout=240)
    return await col.with_fresh_state()


async def test_the_right_document_comes_first(corpus: embedq.Collection) -> None:
    assert corpus.counts["embedded"] == 8 and corpus.active.dimensions == 384
    for mode in ("semantic", "hybrid"):
        for question, expected in QUESTIONS.items():
            hits = await corpus.search(question, mode=mode, k=3)
            assert hits[0].key == expected, (mode, question, [h.key for h in hits])
    html = await corpus.get("kubernetes-pods.html")
    assert html.title == "Kubernetes pods" and "console.log" not in html.text
    # a metadata filter narrows the candidates
    hits = await corpus.search("bees flowers", filters={"type": ".txt"}, k=8)
    assert hits and all(h.key.endswith(".txt") for h in hits)
