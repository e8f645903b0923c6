"""A simulated home: PV roof, household load, a battery and the grid connection.

No hardware needed. Every value is a pure function of (seed, time): the weather and the appliances
come from a counter-based hash rather than a sequential random generator, and the battery is
integrated on a fixed one-second grid. So two runs with the same seed and start give the same
readings whatever the sampling rate, and the site can be stepped faster than real time.

Sign conventions: `pv.power_w` ≥ 0 produced; `load.power_w` ≥ 0 consumed; `battery.power_w` > 0
charging; `grid.power_w` > 0 importing, < 0 exporting.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field

from daisee_node.models import StrictModel
from daisee_node.readings import Channel, Reading
from daisee_node.sensors.base import Sensor, SensorConfig, SensorContext

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a good 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform(seed: int, stream: int, k: int) -> float:
    """A reproducible number in [0, 1) for (seed, stream, k)."""
    return _mix(_mix(_mix(seed & _MASK) ^ (stream & _MASK)) ^ (k & _MASK)) / 2.0**64


def _smooth_noise(seed: int, stream: int, t: float, period: float) -> float:
    """Value noise in [0, 1): random knots every `period` seconds, eased in between."""
    x = t / period
    k = math.floor(x)
    f = x - k
    f = f * f * (3 - 2 * f)
    a = uniform(seed, stream, k)
    b = uniform(seed, stream, k + 1)
    return a + (b - a) * f


def sunny_longitude(now_s: float | None = None) -> float:
    """The longitude where the sun stands highest at `now_s` (default: now), so that a simulated
    roof placed there produces whatever the hour of a run or a test."""
    hours = ((time.time() if now_s is None else now_s) / 3600) % 24
    return ((12 - hours) * 15 + 180) % 360 - 180


class SimulationConfig(StrictModel):
    """The simulated site (`[simulation]` in the config)."""

    seed: int = 1
    latitude_deg: float = Field(45.76, ge=-66, le=66)
    longitude_deg: float = Field(4.84, ge=-180, le=180)
    pv_peak_w: float = Field(3000.0, ge=0)
    cloudiness: float = Field(0.3, ge=0, le=1, description="0 clear sky … 1 overcast")
    load_base_w: float = Field(180.0, ge=0)
    load_peak_w: float = Field(1500.0, ge=0, description="height of the morning/evening peaks")
    battery_capacity_wh: float = Field(5000.0, gt=0)
    battery_max_charge_w: float = Field(2500.0, ge=0)
    battery_max_discharge_w: float = Field(2500.0, ge=0)
    battery_initial_soc_pct: float = Field(50.0, ge=0, le=100)
    battery_min_soc_pct: float = Field(10.0, ge=0, le=100)
    battery_efficiency: float = Field(0.95, gt=0, le=1)
    noise_pct: float = Field(1.0, ge=0, le=50, description="measurement noise on power values")
    external_supply_relay: str | None = Field(
        None,
        description="a relay that, when on, feeds the house from another line: the "
        "battery then only charges (the DAISEE scenario)",
    )

    def max_power_w(self) -> float:
        """More power than any flow of the site reaches: every source and sink at full at once."""
        load = self.load_base_w + _FRIDGE_W + 1.5 * self.load_peak_w + _APPLIANCE_MAX_W
        battery = self.battery_max_charge_w + self.battery_max_discharge_w
        return self.pv_peak_w + load + battery


# Noise streams.
_CLOUD_SLOW, _CLOUD_FAST, _APPLIANCE, _APPLIANCE_W = 11, 12, 21, 22
_FAULT, _GARBAGE = 31, 32
_FRIDGE_W = 90.0
_APPLIANCE_MIN_W, _APPLIANCE_SPAN_W = 800.0, 1400.0
_APPLIANCE_MAX_W = _APPLIANCE_MIN_W + _APPLIANCE_SPAN_W


#: the site's cumulative counters, by the channel key sensors read them under
_SITE_COUNTERS = {
    "pv.energy_wh": "pv_wh",
    "grid.import_wh": "import_wh",
    "grid.export_wh": "export_wh",
}


class SimulatedSite:
    """The physics shared by all simulated sensors of one node."""

    def __init__(
        self,
        config: SimulationConfig,
        start: float,
        external_supply: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.external_supply = external_supply or (lambda: False)
        self.start = float(math.floor(start))
        self._t = self.start  # the last integrated second
        self.soc_wh = config.battery_capacity_wh * config.battery_initial_soc_pct / 100
        self.import_wh = 0.0
        self.export_wh = 0.0
        self.pv_wh = 0.0
        self.load_wh = 0.0

    def resume_counter(self, key: str, last_wh: float) -> None:
        """Carry a cumulative counter on from a value stored before a restart (never back)."""
        attr = _SITE_COUNTERS.get(key)
        if attr is not None:
            setattr(self, attr, max(getattr(self, attr), last_wh))

    # -- instantaneous physics ---------------------------------------------------------------

    def pv_w(self, t: float) -> float:
        """PV output: clear-sky sun elevation times a cloud factor."""
        c = self.config
        day = (t / 86_400.0) % 365.25
        decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + day) / 365.25)
        solar_hours = (t / 3600.0 + c.longitude_deg / 15.0) % 24.0
        hour_angle = math.radians(15.0 * (solar_hours - 12.0))
        lat = math.radians(c.latitude_deg)
        sin_elev = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(
            hour_angle
        )
        if sin_elev <= 0:
            return 0.0
        slow = _smooth_noise(c.seed, _CLOUD_SLOW, t, 1800.0)
        fast = _smooth_noise(c.seed, _CLOUD_FAST, t, 90.0)
        cover = c.cloudiness * (0.6 * slow + 0.4 * fast)
        return c.pv_peak_w * sin_elev**1.2 * (1.0 - 0.85 * cover)

    def load_w(self, t: float) -> float:
        """Household load: base, fridge cycle, morning and evening peaks, random appliances."""
        c = self.config
        hours = (t / 3600.0 + c.longitude_deg / 15.0) % 24.0
        fridge = _FRIDGE_W if (t % 1800.0) < 600.0 else 0.0
        peaks = math.exp(-(((hours - 7.5) / 0.8) ** 2)) * 0.5 + math.exp(
            -(((hours - 19.5) / 1.5) ** 2)
        )
        slot = math.floor(t / 300.0)  # an appliance runs for a five-minute slot, or not
        appliance = 0.0
        if 7 <= hours < 23 and uniform(c.seed, _APPLIANCE, slot) < 0.12:
            appliance = _APPLIANCE_MIN_W + _APPLIANCE_SPAN_W * uniform(c.seed, _APPLIANCE_W, slot)
        return c.load_base_w + fridge + c.load_peak_w * peaks + appliance

    def _flows(self, t: float) -> tuple[float, float, float, float]:
        """(pv, load, battery, grid) in W at time t for the current state of charge."""
        c = self.config
        pv = self.pv_w(t)
        load = self.load_w(t)
        surplus = pv - load
        cap = c.battery_capacity_wh
        if self.external_supply():
            # The house runs on the other line; the battery takes what PV gives it.
            room_w = max(0.0, (cap - self.soc_wh) * 3600.0 / c.battery_efficiency)
            battery = min(pv, c.battery_max_charge_w, room_w)
            return pv, load, battery, load - pv + battery
        if surplus >= 0:
            room_w = max(0.0, (cap - self.soc_wh) * 3600.0 / c.battery_efficiency)
            battery = min(surplus, c.battery_max_charge_w, room_w)
        else:
            floor_wh = cap * c.battery_min_soc_pct / 100
            avail_w = max(0.0, (self.soc_wh - floor_wh) * 3600.0 * c.battery_efficiency)
            battery = -min(-surplus, c.battery_max_discharge_w, avail_w)
        grid = load - pv + battery
        return pv, load, battery, grid

    # -- integration -------------------------------------------------------------------------

    def advance_to(self, t: float) -> None:
        """Integrate the battery and the energy counters up to whole second floor(t)."""
        c = self.config
        target = math.floor(t)
        while self._t < target:
            pv, load, battery, grid = self._flows(self._t)
            if battery >= 0:
                self.soc_wh += battery * c.battery_efficiency / 3600.0
            else:
                self.soc_wh += battery / c.battery_efficiency / 3600.0
            self.soc_wh = min(max(self.soc_wh, 0.0), c.battery_capacity_wh)
            self.pv_wh += pv / 3600.0
            self.load_wh += load / 3600.0
            if grid >= 0:
                self.import_wh += grid / 3600.0
            else:
                self.export_wh -= grid / 3600.0
            self._t += 1.0

    def snapshot(self, t: float) -> dict[str, float]:
        """Every quantity of the site at time t (advancing the integration first)."""
        self.advance_to(t)
        pv, load, battery, grid = self._flows(t)
        soc_pct = 100.0 * self.soc_wh / self.config.battery_capacity_wh
        voltage = 46.0 + 8.0 * soc_pct / 100.0
        return {
            "pv.power_w": pv,
            "pv.energy_wh": self.pv_wh,
            "load.power_w": load,
            "battery.soc_pct": soc_pct,
            "battery.power_w": battery,
            "battery.voltage_v": voltage,
            "battery.current_a": battery / voltage,
            "grid.power_w": grid,
            "grid.import_wh": self.import_wh,
            "grid.export_wh": self.export_wh,
        }


_MODEL_CHANNELS: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    # quantity, unit, state class, noisy
    "pv": (("power_w", "W", "measurement", True), ("energy_wh", "Wh", "total_increasing", False)),
    "load": (("power_w", "W", "measurement", True),),
    "battery": (
        ("soc_pct", "%", "measurement", False),
        ("power_w", "W", "measurement", True),
        ("voltage_v", "V", "measurement", True),
        ("current_a", "A", "measurement", True),
    ),
    "grid": (
        ("power_w", "W", "measurement", True),
        ("import_wh", "Wh", "total_increasing", False),
        ("export_wh", "Wh", "total_increasing", False),
    ),
}


class SimulatedConfig(SensorConfig):
    """A part of the simulated site, published under this sensor's name."""

    kind: Literal["simulated"]
    model: Literal["pv", "load", "battery", "grid"]
    error_rate: float = Field(
        0.0, ge=0, le=1, description="fraction of reads that fail as a broken cable would"
    )
    garbage_rate: float = Field(
        0.0, ge=0, le=1, description="fraction of readings whose value is garbage (NaN, inf)"
    )


class SimulatedFault(OSError):
    """A read that failed on purpose (`error_rate`)."""


#: the key of the one site all simulated sensors of a node share, in `SensorContext.resources`
SITE = "simulated-site"


def shared_site(ctx: SensorContext) -> SimulatedSite:
    """The one simulated site of this node, made on first use (dropped when the config changes)."""
    site = ctx.resources.get(SITE)
    if site is None:
        config = ctx.simulation if isinstance(ctx.simulation, SimulationConfig) else None
        config = config or SimulationConfig()
        relay, relay_on = config.external_supply_relay, ctx.relay_on
        external = None
        if relay is not None and relay_on is not None:

            def external() -> bool:
                return relay_on(relay)

        site = SimulatedSite(config, start=ctx.clock.now(), external_supply=external)
        ctx.resources[SITE] = site
    assert isinstance(site, SimulatedSite)
    return site


class SimulatedSensor(Sensor):
    """Reads one part (pv, load, battery or grid) of the node's simulated site."""

    kind = "simulated"
    config_model = SimulatedConfig

    def __init__(self, config: SimulatedConfig, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        spec = _MODEL_CHANNELS[config.model]
        self._keys = [f"{config.model}.{q}" for q, _, _, _ in spec]
        self._names = [f"{config.name}.{q}" for q, _, _, _ in spec]
        self._noisy = [noisy for _, _, _, noisy in spec]
        self._streams = [zlib.crc32(n.encode()) for n in self._names]
        simulation = ctx.simulation if isinstance(ctx.simulation, SimulationConfig) else None
        simulation = simulation or SimulationConfig()
        # Counters are integrated on whole seconds: one second of full power may show at once.
        rate = simulation.max_power_w() / 3600.0
        self._channels = [
            Channel(f"{config.name}.{q}", unit, sc)
            if sc != "total_increasing"
            else Channel(f"{config.name}.{q}", unit, sc, max_rate_per_s=rate, resolution=rate)
            for q, unit, sc, _ in spec
        ]

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    async def setup(self) -> None:
        """Counters go on from their last stored values, as a real meter's do across restarts."""
        site = shared_site(self.ctx)
        for key, channel in zip(self._keys, self._channels, strict=True):
            last = self.ctx.restore(channel.name)
            if channel.state_class == "total_increasing" and last is not None:
                site.resume_counter(key, last)

    async def read(self) -> Sequence[Reading]:
        t_ms = self.ctx.clock.now_ms()
        site = shared_site(self.ctx)
        seed = site.config.seed
        cfg = self.config
        if cfg.error_rate and uniform(seed, _FAULT + self._streams[0], t_ms) < cfg.error_rate:
            raise SimulatedFault(5, f"simulated I/O error on {self.name}")
        snap = site.snapshot(t_ms / 1000.0)
        noise = site.config.noise_pct / 100.0
        out = []
        for key, name, noisy, stream in zip(
            self._keys, self._names, self._noisy, self._streams, strict=True
        ):
            value = snap[key]
            if noisy and noise:
                value *= 1.0 + noise * (2.0 * uniform(seed, stream, t_ms) - 1.0)
            if cfg.garbage_rate and uniform(seed, _GARBAGE + stream, t_ms) < cfg.garbage_rate:
                value = math.inf if t_ms % 2 else math.nan
            out.append(Reading(name, t_ms, value))
        return out
