"""Clocks tests set by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from daisee_node.clock import Clock
from daisee_node.sensors.simulated import sunny_longitude

T = TypeVar("T")

__all__ = ["FixedClock", "SteppedClock", "sunny_longitude"]


class FixedClock(Clock):
    """A wall clock that stands still until the test moves `t_ms` (scheduling stays real)."""

    def __init__(self, now_ms: int) -> None:
        self.t_ms = now_ms

    def now_ms(self) -> int:
        return self.t_ms

    def now(self) -> float:
        return self.t_ms / 1000


class SteppedClock(Clock):
    """The node's clock, standing still until the test moves it (no real time passes).

    Steady time `t` (what `monotonic` returns) and wall time move together: the wall clock reads
    `wall_start` plus the steady time elapsed since the start. `sleep` returns once the test
    has moved time past its end (`advance`, `drive`), each sleeper at its own time, in order.
    Between steps the event loop is given a bounded number of turns (no timer is involved), so
    the tasks woken finish what they do at that instant before the test looks.
    """

    #: turns of the event loop given to woken tasks at each instant
    TURNS = 20

    def __init__(self, start: float = 1000.0, wall_start: float = 1_780_000_000.0) -> None:
        self.t = start
        self._offset = wall_start - start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def now(self) -> float:
        return self.t + self._offset

    def now_ms(self) -> int:
        return round(self.now() * 1000)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + max(0.0, seconds), future))
        await future

    @classmethod
    async def settle(cls) -> None:
        """Let the tasks that can run at this instant run (turns of the loop, not time)."""
        for _ in range(cls.TURNS):
            await asyncio.sleep(0)

    def _wake_due(self) -> None:
        for due, future in self._sleepers:
            if due <= self.t and not future.done():
                future.set_result(None)
        self._sleepers = [(d, f) for d, f in self._sleepers if not f.done()]

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own time, in order."""
        end = self.t + seconds
        await self.settle()
        while True:
            due = [d for d, f in self._sleepers if not f.done() and d <= end]
            if not due:
                break
            self.t = max(self.t, min(due))
            self._wake_due()
            await self.settle()
        self.t = end
        await self.settle()

    async def drive(self, awaitable: Awaitable[T], limit_s: float = 60.0) -> T:
        """Run `awaitable` to its end, moving time on to each sleeper it leaves waiting."""
        task = asyncio.ensure_future(awaitable)
        start = self.t
        while True:
            await self.settle()
            if task.done():
                return task.result()
            pending = [d for d, f in self._sleepers if not f.done()]
            assert pending, "the task waits on something other than the clock"
            self.t = max(self.t, min(pending))
            assert self.t - start <= limit_s, "the task does not finish"
            self._wake_due()
