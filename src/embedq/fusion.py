"""Fusing the two legs of a hybrid search into one ranking.

    fused = fuse(semantic, keyword, FusionOptions("convex", alpha=0.5))   # {doc: score}

Each leg is a list of (document, score), best first, as deep as the search asked (its top
max(100, k)). Two ways to fuse them:

- **rrf**, reciprocal rank fusion: score = sum over legs of 1 / (rrf_k + rank), rank from 1.
  Scores are ignored; only ranks count, so it needs no normalisation.
- **convex**, a convex combination of normalised scores:
  score = alpha * norm(semantic) + (1 - alpha) * norm(keyword), where norm is min-max over
  the leg's list: (s - min) / (max - min), so a leg's best document gets 1 and its last 0; a
  document missing from a leg gets 0 there; a leg whose scores are all equal gets 1 for each.
  alpha is the weight of the semantic leg: 1 is semantic alone, 0 keyword alone.

A document found by one leg only keeps that leg's part of the score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embedq.errors import InvalidDocument

FUSIONS = ("rrf", "convex")
DEFAULT_FUSION = "convex"
DEFAULT_ALPHA = 0.5
DEFAULT_RRF_K = 60

Leg = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class FusionOptions:
    """How hybrid search fuses its legs (a collection's default, or one query's)."""

    fusion: str = DEFAULT_FUSION
    alpha: float = DEFAULT_ALPHA
    rrf_k: int = DEFAULT_RRF_K

    def __post_init__(self) -> None:
        check(self.fusion, self.alpha, self.rrf_k)

    def replace(
        self, fusion: str | None = None, alpha: float | None = None, rrf_k: int | None = None
    ) -> FusionOptions:
        """These options with the ones given overridden (None keeps the current value)."""
        return FusionOptions(
            self.fusion if fusion is None else fusion,
            self.alpha if alpha is None else alpha,
            self.rrf_k if rrf_k is None else rrf_k,
        )

    def to_json(self) -> dict[str, Any]:
        return {"fusion": self.fusion, "alpha": self.alpha, "rrf_k": self.rrf_k}


def check(fusion: Any, alpha: Any, rrf_k: Any) -> None:
    """InvalidDocument naming the parameter and its range, for a bad value."""
    if fusion not in FUSIONS:
        raise InvalidDocument(f"fusion {fusion!r} is invalid: use {' or '.join(FUSIONS)}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise InvalidDocument(
            f"alpha must be a number from 0 (keyword only) to 1 (semantic only), not {alpha!r}"
        )
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or not 1 <= rrf_k <= 10_000:
        raise InvalidDocument(f"rrf_k must be an integer from 1 to 10000, not {rrf_k!r}")


def fuse(semantic: Leg, keyword: Leg, options: FusionOptions) -> dict[int, float]:
    """The fused score of every document either leg found."""
    if options.fusion == "rrf":
        return _rrf((semantic, keyword), options.rrf_k)
    return _convex(semantic, keyword, options.alpha)


def _rrf(legs: Sequence[Leg], k: int) -> dict[int, float]:
    scores: dict[int, float] = {}
    for leg in legs:
        for rank, (doc, _) in enumerate(leg, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return scores


def _convex(semantic: Leg, keyword: Leg, alpha: float) -> dict[int, float]:
    scores: dict[int, float] = {}
    for weight, leg in ((alpha, semantic), (1.0 - alpha, keyword)):
        for doc, value in normalise(leg).items():
            scores[doc] = scores.get(doc, 0.0) + weight * value
    return scores


def normalise(leg: Leg) -> Mapping[int, float]:
    """Min-max normalisation of a leg's scores to [0, 1]."""
    if not leg:
        return {}
    values = [s for _, s in leg]
    low, high = min(values), max(values)
    if high <= low:
        return {doc: 1.0 for doc, _ in leg}
    return {doc: (s - low) / (high - low) for doc, s in leg}


def ranked(scores: Mapping[int, float], k: int) -> list[int]:
    """The k best documents, ties to the lower id."""
    return sorted(scores, key=lambda d: (-scores[d], d))[:k]
