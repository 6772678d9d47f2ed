"""Retry schedule for deferred mail: exponential backoff, capped, with jitter and a lifetime.

This is Postfix's ``minimal_backoff_time`` / ``maximal_backoff_time`` /
``maximal_queue_lifetime`` trio as one value object. The delay doubles per failed attempt so a
destination that is down for a day costs a few dozen attempts, not thousands; the cap keeps a
long outage from pushing retries hours apart. Jitter (±10% by default) spreads retries of
messages that failed together (one MX outage defers thousands at once), so they do not all come
back in the same second. Tests pass ``jitter=0`` or a seeded ``rng`` for exact values.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# 2**60 * first overflows nothing in float, but a cap keeps the arithmetic obviously bounded.
_MAX_EXPONENT = 60


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry a deferred message, and when to give up on it.

    ``first`` is the delay after the first failed attempt (seconds), ``maximum`` the cap,
    ``lifetime`` how long after arrival a message may stay queued before it expires
    (``0`` means one attempt only, like Postfix ``maximal_queue_lifetime = 0``).
    """

    first: float = 300.0
    maximum: float = 4000.0
    lifetime: float = 5 * 86400.0
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.first < 0 or self.maximum < 0 or self.lifetime < 0:
            raise ValueError("retry times must not be negative")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")

    def base_delay(self, attempts: int) -> float:
        """The un-jittered delay after ``attempts`` failed attempts: first * 2**(n-1), capped."""
        exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
        return min(self.first * (2.0 ** exponent), self.maximum)

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the next attempt, after ``attempts`` failed ones."""
        base = self.base_delay(attempts)
        if self.jitter:
            base *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)

    def expired(self, received_at: float, now: float) -> bool:
        """True when a message that arrived at ``received_at`` has outlived ``lifetime``."""
        return now - received_at >= self.lifetime
