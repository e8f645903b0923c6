"""Sampling: each sensor read on its interval, its readings screened and checked, then published.

A failed read never ends a sampler: the sensor's channels get a reading marked with why
(SOURCE_ERROR or UNAVAILABLE), the failure is counted, and the next read comes on time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daisee_node.checks import ChannelChecks
from daisee_node.clock import Clock
from daisee_node.logs import get_logger
from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors import Sensor, SensorContext, build_sensor
from daisee_node.sensors.base import SourceUnavailable
from daisee_node.sensors.energy import EnergySensor


@dataclass
class SensorStats:
    """Per-sensor counts, also persisted as store counters `sensor.<name>.*`."""

    reads: int = 0
    errors: int = 0
    bad: int = 0
    overruns: int = 0
    errors_in_row: int = 0


class Sampling:
    """The node's sensors, and the loop that samples each of them.

    `publish` receives every batch (the reading bus); `count` adds to a persisted counter;
    `declare` announces a sensor's channels (to the store) before its first reading.
    """

    def __init__(
        self,
        ctx: SensorContext,
        latest: Mapping[str, Reading],
        publish: Callable[[Sequence[Reading]], None],
        count: Callable[[str, int], None],
        declare: Callable[[Sequence[Channel]], None],
    ) -> None:
        self.ctx = ctx
        self.latest = latest
        self.publish = publish
        self.count = count
        self.declare = declare
        self.log = get_logger("daemon")
        self.sensors: dict[str, Sensor] = {}
        self.stats: dict[str, SensorStats] = {}
        self._checks: dict[str, ChannelChecks] = {}

    @property
    def clock(self) -> Clock:
        return self.ctx.clock

    def add(self, sensor_config: Any) -> Sensor:
        """Build the sensor of a `[[sensors]]` entry; the caller runs `sample(sensor)`."""
        sensor = build_sensor(sensor_config, self.ctx)
        self.sensors[sensor.name] = sensor
        self._checks[sensor.name] = ChannelChecks(sensor.channels)
        self.stats.setdefault(sensor.name, SensorStats())
        self.declare(sensor.channels)
        return sensor

    def remove(self, name: str) -> None:
        self.sensors.pop(name, None)

    async def sample(self, sensor: Sensor) -> None:
        """Read one sensor every `interval_s` until cancelled. A failed read never ends the loop."""
        stats = self.stats[sensor.name]
        checks = self._checks[sensor.name]
        prefix = f"sensor.{sensor.name}"
        try:
            await sensor.setup()
        except Exception:
            self._publish_failure(sensor, Quality.UNAVAILABLE)
            raise
        try:
            interval = float(sensor.config.interval_s)
            clock = self.clock
            # Scheduled on the steady clock: a wall-clock step changes stamps, never the pace.
            next_t = clock.monotonic()
            while True:
                try:
                    readings = await sensor.read()
                except Exception as exc:
                    stats.errors += 1
                    stats.errors_in_row += 1
                    self.count(f"{prefix}.errors", 1)
                    if stats.errors_in_row == 1:
                        self.log.warning("sensor read failed", sensor=sensor.name, error=repr(exc))
                    unavailable = isinstance(exc, SourceUnavailable)
                    quality = Quality.UNAVAILABLE if unavailable else Quality.SOURCE_ERROR
                    readings = self._publish_failure(sensor, quality)
                else:
                    # An empty read is a source with nothing to say yet (a meter that failed is
                    # polled less often, and skips its turns in between): not a recovery.
                    if readings and stats.errors_in_row:
                        self.log.info(
                            "sensor recovered", sensor=sensor.name, failed_reads=stats.errors_in_row
                        )
                        stats.errors_in_row = 0
                    readings = checks.apply(screen(readings), self.latest)
                    if readings:
                        self.publish(readings)
                stats.reads += 1
                bad = sum(1 for r in readings if r.quality != Quality.GOOD)
                if bad:
                    stats.bad += bad
                    self.count(f"{prefix}.bad", bad)
                self.count(f"{prefix}.reads", 1)
                next_t += interval
                now = clock.monotonic()
                if next_t < now:
                    # Too slow for the interval: skip the missed ticks instead of bursting.
                    stats.overruns += 1
                    next_t = now
                await clock.sleep(next_t - now)
        finally:
            with contextlib.suppress(Exception):
                await sensor.close()

    def _publish_failure(self, sensor: Sensor, quality: Quality) -> list[Reading]:
        t_ms = self.clock.now_ms()
        # Counters the node integrates itself are known through a failure (they stop where
        # they were); their newest stored value stays one a restart can continue from.
        kept = sensor.energy.names if isinstance(sensor, EnergySensor) else frozenset()
        readings = [
            Reading(ch.name, t_ms, math.nan, quality)
            for ch in sensor.channels
            if ch.name not in kept
        ]
        self.publish(readings)
        return readings


def screen(readings: Sequence[Reading]) -> Sequence[Reading]:
    """Mark a value no source could mean (NaN, ±inf, not a number) instead of trusting it."""
    out: list[Reading] | None = None
    for i, r in enumerate(readings):
        value = r.value
        if type(value) is float and math.isfinite(value):
            continue
        try:
            fixed = float(value)
        except (TypeError, ValueError):
            fixed = math.nan
        if not math.isfinite(fixed):
            fixed_reading = Reading(r.channel, r.t_ms, math.nan, r.quality or Quality.OUT_OF_RANGE)
        else:
            fixed_reading = Reading(r.channel, r.t_ms, fixed, r.quality)
        if out is None:
            out = list(readings)
        out[i] = fixed_reading
    return readings if out is None else out
