"""Readings: the types every source, the store, the rules and the ledger share, and the bus that
carries each batch from a source to every consumer."""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

#: `<source>.<quantity>` with the unit as the last part of the quantity, e.g. `grid.power_w`.
CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class Quality(enum.IntEnum):
    """Why a reading can or cannot be trusted. Anything but GOOD is kept, marked and counted."""

    GOOD = 0
    OUT_OF_RANGE = 1  # the value is outside what the source can physically report
    SATURATED = 2  # the ADC or sensor hit its limit; the true value is larger
    SOURCE_ERROR = 3  # the source did not answer (I2C/Modbus/HTTP error); value is NaN
    COUNTER_BACKWARDS = 4  # a cumulative counter decreased
    UNAVAILABLE = 5  # the source is known to be down
    IMPLAUSIBLE_STEP = 6  # a cumulative counter moved more than the channel can physically make
    LATE = 7  # stamped inside a period already sealed (e.g. after a backward wall-clock step)


class Reading(NamedTuple):
    """One value of one channel at one instant (milliseconds since the Unix epoch, UTC).

    A NamedTuple rather than a dataclass: sources create thousands per second and the store
    hands them to SQLite as they are.
    """

    channel: str
    t_ms: int
    value: float
    quality: Quality = Quality.GOOD

    @property
    def good(self) -> bool:
        return self.quality == Quality.GOOD


@dataclass(frozen=True, slots=True)
class Channel:
    """What a source publishes: the channel name, its unit and what kind of quantity it is."""

    name: str
    unit: str
    #: "measurement" (instantaneous), "total_increasing" (a cumulative counter) — the Home
    #: Assistant state classes, so discovery can be derived from it.
    state_class: str = "measurement"
    #: values outside [min, max] cannot be real: they are kept but marked OUT_OF_RANGE
    min: float | None = None
    max: float | None = None
    #: the most a cumulative counter can advance per second, in its unit (for a Wh counter, the
    #: most power the source can measure, in W, / 3600); None: steps are not bounded
    max_rate_per_s: float | None = None
    #: the largest jump a counter may show at once on top of that rate: its display resolution,
    #: or the source's integration step (a counter updated once a second moves a second at once)
    resolution: float = 0.0

    def __post_init__(self) -> None:
        if not CHANNEL_RE.match(self.name):
            raise ValueError(f"channel name {self.name!r} is not of the form <source>.<quantity>")
        if self.max_rate_per_s is not None and not self.max_rate_per_s > 0:
            raise ValueError(f"{self.name}: max_rate_per_s must be > 0")
        if not self.resolution >= 0:
            raise ValueError(f"{self.name}: resolution must be ≥ 0")


ReadingSink = Callable[[Sequence["Reading"]], None]
ReadingFilter = Callable[[Sequence["Reading"]], Sequence["Reading"]]


class ReadingBus:
    """Hands each batch of readings to every sink, in order of subscription.

    Filters run first and may mark readings (never drop them). A failing sink is logged and
    counted; the other sinks, and the source that published, carry on.
    """

    def __init__(self, log: Any, count: Callable[[str, int], None]) -> None:
        self.log = log
        self.count = count
        self.sinks: list[ReadingSink] = []
        self.filters: list[ReadingFilter] = []
        #: sink name → failures so far
        self.failures: dict[str, int] = {}

    def subscribe(self, sink: ReadingSink) -> None:
        self.sinks.append(sink)

    def unsubscribe(self, sink: ReadingSink) -> None:
        self.sinks.remove(sink)

    def publish(self, readings: Sequence[Reading]) -> None:
        for screen in self.filters:
            readings = screen(readings)
        for sink in self.sinks:
            try:
                sink(readings)
            except Exception as exc:
                self._sink_failed(sink, exc)

    def _sink_failed(self, sink: ReadingSink, exc: Exception) -> None:
        name = getattr(sink, "__qualname__", repr(sink))
        count = self.failures.get(name, 0) + 1
        self.failures[name] = count
        with contextlib.suppress(Exception):
            self.count("bus.sink_errors", 1)
        # A bug: loud the first time, then once per hundred so the log stays readable.
        if count == 1 or count % 100 == 0:
            self.log.error("a reading consumer failed", consumer=name, failures=count, exc_info=exc)


def mark_late(readings: Sequence[Reading], horizon_ms: int | None) -> tuple[Sequence[Reading], int]:
    """Readings stamped before `horizon_ms` marked LATE (kept, never dropped), and how many were
    newly marked."""
    if not horizon_ms:
        return readings, 0
    out: list[Reading] | None = None
    marked = 0
    for i, r in enumerate(readings):
        if r.t_ms < horizon_ms and r.quality != Quality.LATE:
            if out is None:
                out = list(readings)
            out[i] = r._replace(quality=Quality.LATE)
            marked += 1
    return (readings, 0) if out is None else (out, marked)
