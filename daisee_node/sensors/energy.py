"""Energy counters integrated from power readings: import and export of a transducer, and the
counters a config asks for on any power channel (`energy` of a sensor)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from daisee_node.readings import Channel, Quality, Reading
from daisee_node.sensors.base import EnergySpec, Sensor


class EnergyCounter:
    """Integrates signed power (W, > 0 import) into two Wh counters that only ever grow.

    Start it from the last stored values so the counters continue across restarts. A gap longer
    than `max_gap_s` (the source was down) is not integrated: energy that was not measured is not
    invented.
    """

    def __init__(
        self, import_wh: float = 0.0, export_wh: float = 0.0, max_gap_s: float = 60.0
    ) -> None:
        self.import_wh = import_wh
        self.export_wh = export_wh
        self.max_gap_s = max_gap_s
        self._last_t: float | None = None
        self._last_w = 0.0

    def add(self, power_w: float, t: float) -> None:
        """Account for power `power_w` measured at time `t` (seconds)."""
        if self._last_t is not None:
            dt = t - self._last_t
            if 0 < dt <= self.max_gap_s:
                # Trapezoid between the two readings.
                wh = (self._last_w + power_w) / 2 * dt / 3600.0
                if wh >= 0:
                    self.import_wh += wh
                else:
                    self.export_wh -= wh
        self._last_t = t
        self._last_w = power_w

    def interrupt(self) -> None:
        """The next reading starts a new stretch (after a failed read)."""
        self._last_t = None


class EnergyIntegrator:
    """Wh counters of one sensor's power channels (its `energy` entries), fed by its readings.

    Only good, finite readings within the power channel's range are integrated; anything else,
    a failed read, or a gap longer than `max_gap_s` starts a new stretch, so energy that was not
    measured is never invented. The counters continue from their last stored values (restored
    from the node's newest readings) and are published with each batch, as ordinary channels.
    """

    def __init__(
        self,
        source: str,
        specs: Sequence[EnergySpec],
        power_channels: Mapping[str, Channel],
        latest: Mapping[str, Reading],
        max_gap_s: float,
    ) -> None:
        #: power channel → (its counter, [(counter channel, sign)])
        self._by_power: dict[str, tuple[EnergyCounter, list[tuple[str, int]]]] = {}
        self._bounds: dict[str, tuple[float, float]] = {}
        self.channels: list[Channel] = []
        for spec in specs:
            power = f"{source}.{spec.power}"
            channel = power_channels.get(power)
            if channel is None or channel.unit != "W" or power in self._by_power:
                continue  # the config check says why; a built sensor never fails on it
            low = -math.inf if channel.min is None else channel.min
            high = math.inf if channel.max is None else channel.max
            self._bounds[power] = (low, high)
            most = max(abs(low), abs(high))
            # A counter cannot advance faster than the most power its channel can show.
            rate = most / 3600.0 if math.isfinite(most) else None
            counter = EnergyCounter(max_gap_s=max_gap_s)
            outs: list[tuple[str, int]] = []
            for quantity, sign in spec.counters():
                name = f"{source}.{quantity}"
                self.channels.append(Channel(name, "Wh", "total_increasing", max_rate_per_s=rate))
                outs.append((name, sign))
                stored = _stored_total(latest.get(name))
                if sign > 0:
                    counter.import_wh = stored
                else:
                    counter.export_wh = stored
            self._by_power[power] = (counter, outs)

    @property
    def names(self) -> frozenset[str]:
        """The counter channels."""
        return frozenset(c.name for c in self.channels)

    def add(self, readings: Sequence[Reading]) -> list[Reading]:
        """Integrate a batch; the counters' readings (one per counter whose power was in it)."""
        out: list[Reading] = []
        for r in readings:
            entry = self._by_power.get(r.channel)
            if entry is None:
                continue
            counter, outs = entry
            low, high = self._bounds[r.channel]
            value = r.value
            if r.good and math.isfinite(value) and low <= value <= high:
                counter.add(value, r.t_ms / 1000.0)
            else:
                counter.interrupt()
            for name, sign in outs:
                total = counter.import_wh if sign > 0 else counter.export_wh
                out.append(Reading(name, r.t_ms, total))
        return out

    def interrupt(self) -> None:
        """A read failed: the next reading starts a new stretch."""
        for counter, _ in self._by_power.values():
            counter.interrupt()


class EnergySensor(Sensor):
    """A sensor with Wh counters integrated from some of its power channels (`energy`).

    Everything else is the wrapped sensor's: its lifecycle, its readings, its channels (the
    counters are added to them, so the store, the checks, MQTT and rules see them as any other).
    """

    def __init__(self, inner: Sensor) -> None:
        super().__init__(inner.config, inner.ctx)
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.config_model = inner.config_model  # type: ignore[misc]
        inner_channels = list(inner.channels)
        self.energy = EnergyIntegrator(
            inner.name,
            inner.config.energy,
            {c.name: c for c in inner_channels},
            inner.ctx.latest,
            max_gap_s=max(60.0, 10 * float(inner.config.interval_s)),
        )
        self._channels = inner_channels + self.energy.channels

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    async def setup(self) -> None:
        await self.inner.setup()

    async def read(self) -> Sequence[Reading]:
        try:
            readings = await self.inner.read()
        except BaseException:
            self.energy.interrupt()
            raise
        if not readings:
            return readings
        return [*readings, *self.energy.add(readings)]

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # What a driver offers beyond the contract (a meter's poll counts, …) stays reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _stored_total(r: Reading | None) -> float:
    """Where a counter continues from: its newest stored value, if one can be trusted."""
    if r is None or not math.isfinite(r.value) or r.quality not in (Quality.GOOD, Quality.LATE):
        return 0.0
    return float(r.value)
