"""Retry policy: exponential backoff with jitter, and the permanent/transient split.

>>> policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=60.0)
>>> 0.5 <= policy.delay(1) <= 1.0 and 4.0 <= policy.delay(4) <= 8.0
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from embedq.errors import InvalidJob, is_permanent


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed job runs again."""

    max_attempts: int = 5
    base_s: float = 1.0
    cap_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidJob(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise InvalidJob(
                f"retry delays need 0 < base_s <= cap_s (got base_s={self.base_s}, "
                f"cap_s={self.cap_s})"
            )

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based).

        "Equal jitter": half the exponential step is fixed, half random, so delays both
        grow and spread out (no thundering herd after an outage).
        """
        step = min(self.cap_s, self.base_s * 2.0 ** max(0, attempt - 1))
        return step / 2 + (rng or random).uniform(0, step / 2)

    def next_delay(self, attempt: int, exc: BaseException) -> float | None:
        """The delay before the next attempt, or None when the job must be dead-lettered."""
        if is_permanent(exc) or attempt >= self.max_attempts:
            return None
        delay = self.delay(attempt)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > 0:
            delay = max(delay, min(float(retry_after), self.cap_s))
        return delay
