"""Retry policy: exponential backoff with full jitter, bounded per step."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    #: Attempts of one step before the rotation is halted for a human.
    max_attempts: int = 8
    base_seconds: float = 1.0
    max_seconds: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 1)."""
        cap = min(self.max_seconds, self.base_seconds * float(2 ** max(0, attempt - 1)))
        r: random.Random = rng or random.Random()
        # Full jitter, but never less than a tenth of the cap, so a retry is never immediate.
        jitter: float = r.random()
        return cap * (0.1 + 0.9 * jitter)

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def retryable_status(status: int) -> bool:
    """The classification of provider answers: 429 (rate limited) and 5xx (server trouble) are
    safe to retry; every other 4xx (validation, auth, permission, a rejected signature, a
    reused user action) fails the same way again and needs a human. Timeouts and connection
    errors, which have no status, are retryable too (the adapters say so)."""
    return status == 429 or status >= 500
