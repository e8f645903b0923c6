"""The ADS1115 current sensor on the fake bus: DC mean, AC true RMS, power, energy, quality."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from daisee_node.clock import Clock
from daisee_node.readings import Quality, Reading
from daisee_node.sensors.ads1115 import Ads1115Config, Ads1115Sensor, load_calibration
from daisee_node.sensors.base import SensorContext
from daisee_node.sensors.fake_i2c import FakeADS1115, FakeI2C


def config(**kw: Any) -> Ads1115Config:
    base: dict[str, Any] = {
        "name": "line",
        "kind": "ads1115",
        "bus": "fake",
        "channel": 0,
        "current_sensor": "acs712-20a",
        "fake": {},
    }
    return Ads1115Config(**{**base, **kw})


async def sensor(
    cfg: Ads1115Config, tmp_path: Path, ctx: SensorContext | None = None
) -> Ads1115Sensor:
    s = Ads1115Sensor(cfg, ctx or SensorContext(Clock(), tmp_path))
    await s.setup()
    return s


def by_channel(readings) -> dict[str, Reading]:
    return {r.channel.split(".", 1)[1]: r for r in readings}


@pytest.mark.parametrize("amps", [-12.5, -1.0, 0.0, 3.3, 18.0])
async def test_dc_mean_current_is_signed(amps: float, tmp_path: Path) -> None:
    s = await sensor(config(fake={"dc_a": amps, "noise_a": 0.05}), tmp_path)
    current = by_channel(await s.read())["current_a"]
    assert current.good
    # ACS712-20A: 100 mV/A; the 16-bit ADC at ±6.144 V resolves 1.9 mA.
    assert current.value == pytest.approx(amps, abs=0.03)


@pytest.mark.parametrize(
    ("model", "rms", "h3"),
    [
        ("sct013-030", 10.0, 0.0),
        ("sct013-030", 25.0, 0.0),
        ("acs712-20a", 12.0, 30.0),
        ("acs758-100b", 60.0, 10.0),
    ],
)
async def test_ac_true_rms_over_whole_cycles(
    model: str, rms: float, h3: float, tmp_path: Path
) -> None:
    s = await sensor(
        config(
            current_sensor=model,
            mode="ac",
            fake={"ac_rms_a": rms, "harmonic3_pct": h3, "noise_a": 0.02, "dc_a": 0.0},
        ),
        tmp_path,
    )
    current = by_channel(await s.read())["current_a"]
    true_rms = rms * math.sqrt(1 + (h3 / 100) ** 2)  # orthogonal harmonics add in quadrature
    assert current.value == pytest.approx(true_rms, rel=0.02)
    assert s.window_samples == round(10 / 50 * 860)


class BusyMachine:
    """Steady time for the sampling thread and its chip that moves only when the thread sleeps.

    During the `away` spans the CPU is taken from the thread: a sleep due to end inside one ends
    at its end instead, as a thread woken on a loaded machine waits for a core.
    """

    def __init__(self, away: list[tuple[float, float]], start: float = 100.0) -> None:
        self.t = start
        self.away = away
        self.late_wakes = 0

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        for begin, end in self.away:
            if begin <= self.t < end:
                self.t = end
                self.late_wakes += 1


CYCLE = 1 / 50


def around(phase: float, cycles: tuple[int, ...] = (1, 3, 6, 8)) -> list[tuple[float, float]]:
    """6 ms around one phase of the current (0.25: its positive peak) in several cycles."""
    return [
        (100.0 + (k + phase) * CYCLE - 0.003, 100.0 + (k + phase) * CYCLE + 0.003) for k in cycles
    ]


@pytest.mark.parametrize(
    "away",
    [
        around(0.25),
        around(0.0),
        [(100.0 + k * 0.031, 100.0 + k * 0.031 + 0.005) for k in range(10)],
    ],
    ids=["peaks", "zero-crossings", "5-ms-of-every-31"],
)
async def test_ac_rms_holds_when_the_thread_misses_parts_of_the_window(
    away: list[tuple[float, float]], tmp_path: Path
) -> None:
    """A descheduled sampling thread loses spans of the window (the chip's clock and the
    thread's are the same fake one, which moves only when the thread sleeps). With a plain
    average the phases under-counted that way moved the RMS by 3–4 %: low when peaks are lost,
    high when zero crossings are."""
    machine = BusyMachine(away)
    bus = FakeI2C()
    bus.attach(0x48, FakeADS1115(clock=machine.clock))
    ctx = SensorContext(Clock(), tmp_path)
    ctx.resources[("i2c", "fake")] = bus
    s = Ads1115Sensor(
        config(current_sensor="sct013-030", mode="ac", fake={"ac_rms_a": 10.0, "noise_a": 0.02}),
        ctx,
    )
    s.thread_clock, s.thread_sleep = machine.clock, machine.sleep
    await s.setup()
    current = by_channel(await s.read())["current_a"]
    assert machine.late_wakes >= 4  # the window did lose spans …
    assert s.samples_taken <= s.window_samples - 10
    assert current.value == pytest.approx(10.0, rel=0.02)  # … and the RMS did not move


async def test_ac_rms_ignores_a_drifted_bias(tmp_path: Path) -> None:
    s = await sensor(
        config(
            current_sensor="sct013-030", mode="ac", fake={"ac_rms_a": 10.0, "zero_error_v": 0.2}
        ),
        tmp_path,
    )
    assert by_channel(await s.read())["current_a"].value == pytest.approx(10.0, rel=0.02)


async def test_power_and_energy_from_a_configured_voltage(tmp_path: Path) -> None:
    s = await sensor(
        config(fake={"dc_a": -5.0}, voltage_v=48.0, window_s=0.02, interval_s=0.05), tmp_path
    )
    first = by_channel(await s.read())
    assert first["power_w"].value == pytest.approx(-240.0, rel=0.01)
    assert first["import_wh"].value == first["export_wh"].value == 0.0
    t_first = first["power_w"].t_ms
    last = first
    for _ in range(5):
        last = by_channel(await s.read())
    hours = (last["power_w"].t_ms - t_first) / 3_600_000
    assert last["export_wh"].value == pytest.approx(240.0 * hours, rel=0.05)
    assert last["import_wh"].value == 0.0


async def test_energy_counters_continue_from_the_stored_values(tmp_path: Path) -> None:
    now = Clock().now_ms()
    latest = {
        "line.import_wh": Reading("line.import_wh", now, 1500.0),
        "line.export_wh": Reading("line.export_wh", now, 20.0),
    }
    ctx = SensorContext(Clock(), tmp_path, latest=latest)
    s = await sensor(config(fake={"dc_a": 2.0}, voltage_v=230.0, window_s=0.02), tmp_path, ctx)
    readings = by_channel(await s.read())
    assert readings["import_wh"].value >= 1500.0
    assert readings["export_wh"].value == 20.0


async def test_measured_voltage_is_used_while_fresh(tmp_path: Path) -> None:
    clock = Clock()
    latest: dict[str, Reading] = {}
    ctx = SensorContext(clock, tmp_path, latest=latest)
    s = await sensor(
        config(
            fake={"dc_a": 10.0}, voltage_channel="bat.voltage_v", voltage_max_age_s=5, window_s=0.02
        ),
        tmp_path,
        ctx,
    )
    assert by_channel(await s.read())["power_w"].quality == Quality.UNAVAILABLE
    latest["bat.voltage_v"] = Reading("bat.voltage_v", clock.now_ms(), 51.2)
    assert by_channel(await s.read())["power_w"].value == pytest.approx(512.0, rel=0.01)
    latest["bat.voltage_v"] = Reading("bat.voltage_v", clock.now_ms() - 10_000, 51.2)
    assert by_channel(await s.read())["power_w"].quality == Quality.UNAVAILABLE


async def test_saturation_and_out_of_range_are_flagged(tmp_path: Path) -> None:
    # Gain 16 (±0.256 V) cannot hold a 2.5 V Hall-sensor offset: the ADC sits at full scale.
    s = await sensor(config(gain=16, fake={"dc_a": 1.0}), tmp_path)
    assert by_channel(await s.read())["current_a"].quality == Quality.SATURATED
    s = await sensor(config(address=0x49, fake={"dc_a": 25.0}), tmp_path)  # a 20 A sensor
    current = by_channel(await s.read())["current_a"]
    assert current.quality == Quality.OUT_OF_RANGE and current.value == pytest.approx(25, 0.01)


async def test_i2c_errors_fail_the_read(tmp_path: Path) -> None:
    s = await sensor(config(fake={"dc_a": 1.0}), tmp_path)
    s.ctx.resources[("i2c", "fake")].fail_next(1)
    with pytest.raises(OSError):
        await s.read()
    assert by_channel(await s.read())["current_a"].good


async def test_sensors_set_up_together_share_one_bus_and_chip(tmp_path: Path) -> None:
    """The node sets its sensors up at once, each on a worker thread: they must still find
    the one chip they are wired to (its lock keeps their windows apart)."""
    ctx = SensorContext(Clock(), tmp_path)
    amps = [-3.0, -1.0, 1.0, 3.0]
    sensors = [
        Ads1115Sensor(
            config(name=f"in{i}", channel=i, window_s=0.02, fake={"dc_a": a}),
            ctx,
        )
        for i, a in enumerate(amps)
    ]
    await asyncio.gather(*(s.setup() for s in sensors))
    chip = ctx.resources[("i2c", "fake")].devices[0x48]
    before = chip.conversions
    readings = await asyncio.gather(*(s.read() for s in sensors))
    for got, a in zip(readings, amps, strict=True):
        assert got[0].value == pytest.approx(a, abs=0.05)
    # Every code read came from that one chip (each conversion is counted once, when read).
    assert chip.conversions - before >= sum(s.samples_taken for s in sensors) - len(sensors)


async def test_two_sensors_share_one_chip(tmp_path: Path) -> None:
    ctx = SensorContext(Clock(), tmp_path)
    a = await sensor(config(name="a", channel=0, fake={"dc_a": 3.0}), tmp_path, ctx)
    b = await sensor(
        config(
            name="b",
            channel=1,
            current_sensor="acs712-5a",
            gain=2,
            supply_v=3.3,
            divider=0.6,
            fake={"dc_a": -1.5},
        ),
        tmp_path,
        ctx,
    )
    chip = ctx.resources[("i2c", "fake")].devices[0x48]
    for _ in range(2):
        ra = await a.read()
        assert (chip.config >> 12) & 0x7 == 0b100  # AIN0 against GND, per the datasheet
        rb = await b.read()
        assert (chip.config >> 12) & 0x7 == 0b101  # AIN1 against GND
        assert ra[0].value == pytest.approx(3.0, abs=0.03)
        assert rb[0].value == pytest.approx(-1.5, abs=0.03)


async def test_calibration_removes_a_transducer_offset(tmp_path: Path) -> None:
    cfg = config(fake={"dc_a": 0.0, "zero_error_v": 0.05})
    s = await sensor(cfg, tmp_path)
    before = by_channel(await s.read())["current_a"].value
    assert before == pytest.approx(0.5, abs=0.03)  # 50 mV at 100 mV/A
    entry = await s.calibrate(seconds=0.2)
    assert entry["zero_v"] == pytest.approx(2.55, abs=0.002)
    assert load_calibration(tmp_path)["line"]["zero_v"] == entry["zero_v"]
    again = await sensor(cfg, tmp_path, SensorContext(Clock(), tmp_path))  # a new process
    assert by_channel(await again.read())["current_a"].value == pytest.approx(0.0, abs=0.02)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"channel": None}, "exactly one"),
        ({"differential": [0, 2]}, "pairs"),
        ({"current_sensor": "sct013-030", "mode": "dc"}, "only measures"),
        ({"current_sensor": "hall-9000"}, "unknown current sensor"),
        ({"current_sensor": "shunt"}, "shunt_ohm"),
        ({"fake": None}, "fake"),
        ({"address": 0x50}, "less than or equal"),
    ],
)
def test_config_mistakes_are_explained(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as info:
        config(**changes)
    assert words in str(info.value)


def test_auto_gain_picks_the_smallest_range_that_holds_the_swing() -> None:
    # Shunt 1 mΩ × 50 = 50 mV/A, ±10 A → ±0.5 V (+5 % margin) fits ±1.024 V, not ±0.512 V.
    cfg = config(
        current_sensor="shunt",
        shunt_ohm=0.001,
        amplifier_gain=50,
        rated_a=10,
        differential=[0, 1],
        channel=None,
    )
    assert cfg.full_scale_v() == 1.024


async def test_energy_counters_are_bounded_by_the_transducer_rating(tmp_path: Path) -> None:
    from daisee_node.checks import ChannelChecks

    # Near the rating of a 20 A sensor at 230 V: every counter step must pass its own bound.
    s = await sensor(
        config(fake={"dc_a": 19.5}, voltage_v=230.0, window_s=0.02, interval_s=0.05), tmp_path
    )
    rates = {c.name: c.max_rate_per_s for c in s.channels}
    assert rates["line.import_wh"] == pytest.approx(1.1 * 20 * 230 / 3600)
    checks = ChannelChecks(s.channels)
    latest: dict[str, Reading] = {}
    for _ in range(10):
        for r in checks.apply(await s.read(), latest):
            latest[r.channel] = r
            assert r.good, r
    assert latest["line.import_wh"].value > 0
    # With a measured voltage there is no fixed bound.
    measured = Ads1115Sensor(
        config(voltage_channel="battery.voltage_v"), SensorContext(Clock(), tmp_path)
    )
    assert {c.name: c.max_rate_per_s for c in measured.channels}["line.import_wh"] is None
