"""Checks every source's readings get before anyone trusts them.

Plausible ranges, counters that never go backwards, and counter steps a channel cannot physically
make. A reading that fails is kept, marked with its quality and counted; it never stops a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from daisee_node.readings import Channel, Quality, Reading


class ChannelChecks:
    """Checks every source gets: plausible ranges, and counters that must never go backwards."""

    def __init__(self, channels: Sequence[Channel]) -> None:
        self.limits = {
            c.name: (-math.inf if c.min is None else c.min, math.inf if c.max is None else c.max)
            for c in channels
            if c.min is not None or c.max is not None
        }
        self.totals = {c.name for c in channels if c.state_class == "total_increasing"}

    def apply(self, readings: Sequence[Reading], latest: dict[str, Reading]) -> Sequence[Reading]:
        if not self.limits and not self.totals:
            return readings
        out = list(readings)
        for i, r in enumerate(out):
            if not r.good:
                continue
            bounds = self.limits.get(r.channel)
            if bounds is not None and not bounds[0] <= r.value <= bounds[1]:
                out[i] = r._replace(quality=Quality.OUT_OF_RANGE)
            elif r.channel in self.totals:
                prev = latest.get(r.channel)
                # A tiny tolerance: meters round their counters differently from read to read.
                slack = 1e-9 * max(1.0, abs(prev.value)) if prev is not None else 0.0
                if prev is not None and prev.good and r.value < prev.value - slack:
                    out[i] = r._replace(quality=Quality.COUNTER_BACKWARDS)
        return out
