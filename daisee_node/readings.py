"""Reading and channel types shared by every source, the store, the rules and the ledger."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

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
