"""The node's one retry delay: capped exponential backoff with jitter.

Every loop that retries something that failed (a crashed task, the MQTT broker, the chain) waits
by it, so a fleet of nodes that lost the same server does not come back in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of `base_s`·2ⁿ⁻¹ for the n-th failure in a row, capped at `cap_s`, each drawn
    between `jitter` and 1 times that (full jitter would allow zero: a hot retry loop)."""

    base_s: float
    cap_s: float
    jitter: float = 0.5
    failures: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next attempt."""
        self.failures += 1
        # the exponent is bounded so a long outage never overflows a float
        delay = min(self.cap_s, self.base_s * 2.0 ** min(self.failures - 1, 60))
        return delay * self._rng.uniform(self.jitter, 1.0)

    def reset(self) -> None:
        """It worked: the next failure starts from `base_s` again."""
        self.failures = 0
