"""The simulated home: deterministic, physically consistent, and steppable faster than real time."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daisee_node.checks import ChannelChecks
from daisee_node.clock import Clock, ScaledClock
from daisee_node.readings import Reading
from daisee_node.sensors.base import SensorContext
from daisee_node.sensors.simulated import (
    SimulatedConfig,
    SimulatedFault,
    SimulatedSensor,
    SimulatedSite,
    SimulationConfig,
)

JUNE_21 = datetime(2026, 6, 21, tzinfo=UTC).timestamp()
DEC_21 = datetime(2026, 12, 21, tzinfo=UTC).timestamp()


def day_series(config: SimulationConfig, start: float, step: int = 60) -> list[dict[str, float]]:
    site = SimulatedSite(config, start=start)
    return [site.snapshot(start + k) for k in range(0, 86_400, step)]


def test_same_seed_same_day_different_seed_different_day() -> None:
    a = day_series(SimulationConfig(seed=7), JUNE_21)
    b = day_series(SimulationConfig(seed=7), JUNE_21)
    c = day_series(SimulationConfig(seed=8), JUNE_21)
    assert a == b
    assert a != c


def test_state_does_not_depend_on_how_often_it_is_sampled() -> None:
    fine = SimulatedSite(SimulationConfig(seed=3), start=JUNE_21)
    coarse = SimulatedSite(SimulationConfig(seed=3), start=JUNE_21)
    for k in range(0, 6 * 3600, 7):
        fine.snapshot(JUNE_21 + k)
    t_end = JUNE_21 + 6 * 3600
    assert fine.snapshot(t_end) == coarse.snapshot(t_end)


def test_power_balance_holds_at_every_instant() -> None:
    for snap in day_series(SimulationConfig(seed=2), JUNE_21, step=37):
        balance = snap["load.power_w"] - snap["pv.power_w"] + snap["battery.power_w"]
        assert snap["grid.power_w"] == pytest.approx(balance, abs=1e-6)


def test_battery_stays_between_its_limits_and_counters_only_grow() -> None:
    config = SimulationConfig(seed=4, battery_initial_soc_pct=15, battery_min_soc_pct=12)
    series = day_series(config, JUNE_21, step=30)
    socs = [s["battery.soc_pct"] for s in series]
    assert min(socs) >= config.battery_min_soc_pct - 0.1
    assert max(socs) <= 100.0
    assert max(socs) > 60, "a summer day should charge the battery well above its start"
    for key in ("grid.import_wh", "grid.export_wh", "pv.energy_wh"):
        values = [s[key] for s in series]
        assert values == sorted(values)


def test_pv_follows_the_sun() -> None:
    config = SimulationConfig(seed=1, cloudiness=0.0, pv_peak_w=4000)
    site = SimulatedSite(config, start=JUNE_21)
    solar_noon_utc = 12 - config.longitude_deg / 15
    assert site.pv_w(JUNE_21 + 1 * 3600) == 0.0  # 01:00 UTC: night
    june_noon = site.pv_w(JUNE_21 + solar_noon_utc * 3600)
    december_noon = site.pv_w(DEC_21 + solar_noon_utc * 3600)
    assert 0.8 * config.pv_peak_w < june_noon <= config.pv_peak_w
    assert 0 < december_noon < june_noon


def test_clouds_reduce_production_over_a_day() -> None:
    clear = day_series(SimulationConfig(seed=5, cloudiness=0.0), JUNE_21)
    cloudy = day_series(SimulationConfig(seed=5, cloudiness=1.0), JUNE_21)
    assert cloudy[-1]["pv.energy_wh"] < 0.9 * clear[-1]["pv.energy_wh"]


def test_battery_energy_is_conserved_over_a_day() -> None:
    config = SimulationConfig(seed=6, battery_efficiency=1.0, noise_pct=0)
    site = SimulatedSite(config, start=JUNE_21)
    start_wh = site.soc_wh
    site.advance_to(JUNE_21 + 86_400)
    net_into_battery = site.pv_wh - site.load_wh + site.import_wh - site.export_wh
    assert site.soc_wh - start_wh == pytest.approx(net_into_battery, rel=1e-9, abs=1e-6)


def sensor(model: str, tmp_path: Path, **extra: float) -> SimulatedSensor:
    clock = ScaledClock(start=JUNE_21 + 12 * 3600, speed=1000)
    ctx = SensorContext(clock, tmp_path, SimulationConfig(seed=9))
    cfg = SimulatedConfig(name=f"my{model}", kind="simulated", model=model, **extra)
    return SimulatedSensor(cfg, ctx)


async def test_sensor_names_channels_after_itself(tmp_path: Path) -> None:
    s = sensor("grid", tmp_path)
    readings = await s.read()
    assert [r.channel for r in readings] == [c.name for c in s.channels]
    assert {c.name for c in s.channels} == {
        "mygrid.power_w",
        "mygrid.import_wh",
        "mygrid.export_wh",
    }
    assert all(r.good and math.isfinite(r.value) for r in readings)


async def test_fault_injection_fails_some_reads_and_garbles_some_values(tmp_path: Path) -> None:
    s = sensor("battery", tmp_path, error_rate=0.3, garbage_rate=0.2)
    failures = garbage = total = 0
    for _ in range(300):
        try:
            readings = await s.read()
        except SimulatedFault:
            failures += 1
            continue
        total += len(readings)
        garbage += sum(1 for r in readings if not math.isfinite(r.value))
    assert 40 < failures < 150
    assert 0.08 * total < garbage < 0.35 * total


class SteppedClock(Clock):
    """Node time that moves only when the test says so."""

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t

    def now_ms(self) -> int:
        return int(self.t * 1000)


async def test_counters_never_trip_their_own_step_bound(tmp_path: Path) -> None:
    """The default bound (the site's largest flows, one second of them at once) holds for the
    simulated counters however often they are read, appliances and battery included."""
    config = SimulationConfig(seed=5, load_peak_w=4000, battery_max_charge_w=5000)
    clock = SteppedClock(JUNE_21 + 6 * 3600)
    ctx = SensorContext(clock, tmp_path, config)
    sensors = [
        SimulatedSensor(SimulatedConfig(name=m, kind="simulated", model=m), ctx)
        for m in ("grid", "pv")
    ]
    checks = [ChannelChecks(s.channels) for s in sensors]
    rates = {c.name: c.max_rate_per_s for s in sensors for c in s.channels}
    assert rates["grid.import_wh"] == pytest.approx(config.max_power_w() / 3600)
    assert rates["grid.power_w"] is None
    latest: dict[str, Reading] = {}
    steps = [0.05, 0.3, 1.0, 7.0, 60.0]
    flagged = []
    for k in range(2000):
        clock.t += steps[k % len(steps)]
        for s, c in zip(sensors, checks, strict=True):
            for r in c.apply(await s.read(), latest):
                latest[r.channel] = r
                if not r.good:
                    flagged.append(r)
    assert flagged == []
    assert latest["pv.energy_wh"].value > 1000, "a summer day's PV must have counted"


async def test_counters_go_on_from_their_stored_values_after_a_restart(tmp_path: Path) -> None:
    stored = {"mygrid.import_wh": 5_000.0, "mygrid.export_wh": 12_345.6}
    clock = ScaledClock(start=JUNE_21 + 12 * 3600, speed=1000)
    latest = {name: Reading(name, 0, value) for name, value in stored.items()}
    ctx = SensorContext(clock, tmp_path, SimulationConfig(seed=9), latest=latest)
    s = SimulatedSensor(SimulatedConfig(name="mygrid", kind="simulated", model="grid"), ctx)
    await s.setup()
    first = {r.channel: r.value for r in await s.read()}
    for name, value in stored.items():
        # on from where it was, within the few Wh one second of full power can add
        assert value <= first[name] < value + 10, (name, first[name])
    # a fresh node (nothing stored) still starts at zero
    fresh = sensor("grid", tmp_path)
    await fresh.setup()
    assert {r.channel: r.value for r in await fresh.read()}["mygrid.import_wh"] < 10
