"""Time for the node: wall-clock in production, a faster simulated clock for demos and tests."""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Wall-clock time. Every part of the node takes its time from one Clock."""

    speed: float = 1.0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` of this clock's time."""
        await asyncio.sleep(max(0.0, seconds) / self.speed)


class ScaledClock(Clock):
    """Simulated time that starts at `start` (Unix seconds) and runs `speed` times faster."""

    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start = time.time() if start is None else start
        self._origin = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._origin) * self.speed

    def now_ms(self) -> int:
        return int(self.now() * 1000)
