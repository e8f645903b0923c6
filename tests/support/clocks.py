"""Clocks tests set by hand."""

from __future__ import annotations

from daisee_node.clock import Clock


class FixedClock(Clock):
    """A wall clock that stands still until the test moves `t_ms` (scheduling stays real)."""

    def __init__(self, now_ms: int) -> None:
        self.t_ms = now_ms

    def now_ms(self) -> int:
        return self.t_ms

    def now(self) -> float:
        return self.t_ms / 1000
