"""Time for the node: wall-clock in production, a faster simulated clock for demos and tests.

Two kinds of time: `now()` / `now_ms()` stamp readings (wall-clock, may step when NTP or an
operator sets the clock), `monotonic()` schedules (never steps). Scheduling on the wall clock would
make a one-hour backward step stop every sampler for an hour.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime


class Clock:
    """Wall-clock time. Every part of the node takes its time from one Clock."""

    speed: float = 1.0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        """Seconds of this clock's time on a steady clock: for scheduling, never for stamps."""
        return time.monotonic()

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

    def monotonic(self) -> float:
        return (time.monotonic() - self._origin) * self.speed

    def now_ms(self) -> int:
        return int(self.now() * 1000)


def make_clock(speed: float = 1.0, start: datetime | None = None) -> Clock:
    """The node's clock from `[node] time_speed` and `time_start`: wall-clock unless either is set
    (a naive `start` is UTC)."""
    if speed == 1.0 and start is None:
        return Clock()
    origin = None
    if start is not None:
        origin = (start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()
    return ScaledClock(start=origin, speed=speed)


def zoned_ms(
    text: str, said: str, hint: str, error: type[Exception], *, dates: bool = False
) -> int:
    """ms since the epoch of an ISO 8601 time with its zone (`dates`: or a date, its midnight
    UTC), as an operator types it. Otherwise `error("<said>: <hint>")`, or, for a time without a
    zone (which would be read in whatever zone the machine is set to), one that asks for it."""
    from datetime import date

    try:
        if dates and len(text) == 10:
            day = date.fromisoformat(text)
            when = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise error(f"{said}: {hint}") from None
    if when.tzinfo is None:
        raise error(f"{said}: give a time zone (e.g. 'Z' or '+01:00')")
    return int(when.timestamp() * 1000)
