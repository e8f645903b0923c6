"""In-line current sensing with an ADS1115 ADC over I2C (Adafruit's driver).

Each reading samples one input for a short window at the configured data rate (up to 860 SPS, in
continuous-conversion mode), on a worker thread so the event loop never waits on I2C:

- `mode = "dc"`: the mean current over `window_s`, signed (a battery's charge and discharge);
- `mode = "ac"`: the true RMS over `window_cycles` whole mains cycles, around the window's own mean
  (so a drifting bias does not count as current). Each sample is weighted by the part of the mains
  cycle it stands for, from the instant it was read: conversions missed while the thread was
  descheduled (a loaded Pi) leave no bias as long as other cycles of the window saw those phases.

Power is current times a configured voltage (`voltage_v`) or the latest value of a measured one
(`voltage_channel`); import and export energy are integrated into Wh counters that continue from the
stored values after a restart. A window that touches the ADC's full scale is SATURATED; a current
beyond 110 % of the transducer's rating is OUT_OF_RANGE; an I2C error fails the read (the node marks
the channels SOURCE_ERROR and goes on).

`daisee-node calibrate` measures each DC input's zero-current output with no load and stores it in
`<data_dir>/calibration.json`; the driver uses it instead of the datasheet value.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from daisee_node import durable
from daisee_node.errors import DaiseeError
from daisee_node.models import StrictModel
from daisee_node.readings import CHANNEL_RE, Channel, Quality, Reading
from daisee_node.sensors.base import Sensor, SensorConfig, SensorContext
from daisee_node.sensors.energy import EnergyCounter
from daisee_node.sensors.transducers import CUSTOM, MODELS, Transfer

GAINS: dict[float, float] = {2 / 3: 6.144, 1: 4.096, 2: 2.048, 4: 1.024, 8: 0.512, 16: 0.256}
DIFFERENTIAL_PAIRS = ((0, 1), (0, 3), (1, 3), (2, 3))
CALIBRATION_FILE = "calibration.json"
_REG_CONFIG = 0x01
#: sensors set up at once (each on a worker thread) must find the bus and chip the first made
_OPEN_LOCK = threading.Lock()


class FakeSignal(StrictModel):
    """What the fake bus feeds the input, as a current in the conductor (demo and tests)."""

    dc_a: float = 0.0
    ac_rms_a: float = Field(0.0, ge=0)
    frequency_hz: float = Field(50.0, gt=0)
    harmonic3_pct: float = Field(0.0, ge=0, le=100)
    noise_a: float = Field(0.0, ge=0)
    zero_error_v: float = Field(0.0, description="offset of this transducer from its datasheet")
    follow_channel: str | None = Field(
        None, description="scale the AC current by this channel's latest value / voltage_v"
    )
    i2c_fail_rate: float = Field(0.0, ge=0, le=1)
    seed: int = 0


class Ads1115Config(SensorConfig):
    """An in-line current sensor on one ADS1115 input."""

    kind: Literal["ads1115"]
    bus: int | Literal["fake"] = Field(1, description="I2C bus number (/dev/i2c-N) or 'fake'")
    address: int = Field(0x48, ge=0x48, le=0x4B)
    channel: int | None = Field(None, ge=0, le=3, description="single-ended input A0–A3")
    differential: tuple[int, int] | None = Field(None, description="input pair, e.g. [0, 1]")
    gain: Literal["auto", "2/3", 1, 2, 4, 8, 16] = "auto"
    data_rate: Literal[8, 16, 32, 64, 128, 250, 475, 860] = 860
    current_sensor: str = Field(description="transducer model, or 'shunt' / 'linear'")
    supply_v: float = Field(5.0, gt=0, description="supply of a ratiometric Hall sensor")
    divider: float = Field(1.0, gt=0, le=1, description="pin voltage / sensor output voltage")
    sensitivity_v_per_a: float | None = Field(None, gt=0)
    zero_v: float | None = None
    rated_a: float | None = Field(None, gt=0)
    shunt_ohm: float | None = Field(None, gt=0)
    amplifier_gain: float = Field(1.0, gt=0)
    mode: Literal["dc", "ac"] = "dc"
    mains_hz: float = Field(50.0, gt=0)
    window_cycles: int = Field(10, ge=1, le=100)
    window_s: float = Field(0.1, gt=0, le=5)
    voltage_v: float | None = Field(None, description="voltage for power, if not measured")
    voltage_channel: str | None = Field(None, description="a channel giving the voltage")
    voltage_max_age_s: float = Field(10.0, gt=0)
    power_factor: float = Field(1.0, gt=0, le=1)
    invert: bool = Field(False, description="DC only: the sensor is mounted the other way round")
    direction: Literal["import", "export"] = Field(
        "import", description="AC only: which way the current flows (RMS has no sign)"
    )
    fake: FakeSignal | None = None

    @field_validator("current_sensor")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODELS and value not in CUSTOM:
            known = ", ".join([*MODELS, *CUSTOM])
            raise ValueError(f"unknown current sensor {value!r}; known: {known}")
        return value

    @field_validator("differential")
    @classmethod
    def _valid_pair(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and tuple(value) not in DIFFERENTIAL_PAIRS:
            raise ValueError(f"the ADS1115 measures only the pairs {list(DIFFERENTIAL_PAIRS)}")
        return value

    @field_validator("voltage_channel")
    @classmethod
    def _channel_name(cls, value: str | None) -> str | None:
        if value is not None and not CHANNEL_RE.match(value):
            raise ValueError("must be a channel name such as 'battery.voltage_v'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Ads1115Config:
        problems = []
        if (self.channel is None) == (self.differential is None):
            problems.append("set exactly one of 'channel' (A0–A3) or 'differential' (a pair)")
        model = MODELS.get(self.current_sensor)
        if model is not None and model.ac_only and self.mode == "dc":
            problems.append(f"{self.current_sensor} is a CT clamp: it only measures mode = 'ac'")
        if self.current_sensor == "shunt" and (self.shunt_ohm is None or self.rated_a is None):
            problems.append("a 'shunt' needs 'shunt_ohm' and 'rated_a'")
        if self.current_sensor == "linear" and (
            self.sensitivity_v_per_a is None or self.rated_a is None
        ):
            problems.append("a 'linear' sensor needs 'sensitivity_v_per_a' and 'rated_a'")
        if self.bus == "fake" and self.fake is None:
            problems.append("bus = 'fake' needs a [sensors.fake] table describing the signal")
        if self.fake is not None and self.fake.follow_channel and self.voltage_v is None:
            problems.append("fake.follow_channel needs 'voltage_v' to turn power into current")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def transfer(self) -> Transfer:
        """The transducer as seen at the ADC pin."""
        model = MODELS.get(self.current_sensor)
        differential = self.differential is not None
        if self.current_sensor == "shunt":
            sensitivity = float(self.shunt_ohm or 0) * self.amplifier_gain
            zero, rated, ac_only = 0.0, float(self.rated_a or 0), False
        elif self.current_sensor == "linear":
            sensitivity = float(self.sensitivity_v_per_a or 0)
            zero, rated, ac_only = 0.0, float(self.rated_a or 0), False
        else:
            assert model is not None
            sensitivity = self.sensitivity_v_per_a or model.sensitivity_v_per_a
            # Differential inputs are wired against the sensor's own reference: no offset.
            zero = 0.0 if differential else model.zero_fraction * self.supply_v
            rated = self.rated_a or model.rated_a
            ac_only = model.ac_only
        if self.zero_v is not None:
            zero = self.zero_v
        return Transfer(sensitivity * self.divider, zero * self.divider, rated, ac_only)

    def full_scale_v(self) -> float:
        """The ADC range: the configured gain, or the smallest that holds the sensor's swing."""
        if self.gain != "auto":
            return GAINS[2 / 3 if self.gain == "2/3" else float(self.gain)]
        t = self.transfer()
        swing = t.sensitivity_v_per_a * t.rated_a * (math.sqrt(2) if self.mode == "ac" else 1)
        need = 1.05 * max(abs(t.zero_v + swing), abs(t.zero_v - swing))
        fitting = [fsr for fsr in sorted(GAINS.values()) if fsr >= need]
        return fitting[0] if fitting else max(GAINS.values())

    def adafruit_gain(self) -> float:
        fsr = self.full_scale_v()
        return next(g for g, v in GAINS.items() if v == fsr)


class _Chip:
    """One ADS1115 shared by every sensor wired to it; the lock serialises their windows."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.lock = threading.Lock()
        self.selected: tuple[int, float, int] | None = None

    def select(
        self, mux: int, gain: float, data_rate: int, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        """Point the chip's continuous conversions at one input.

        Adafruit's driver (3.0.5) does not do this itself in continuous mode: its config write
        keeps whatever multiplexer the chip holds, and leaves the register pointer on the config
        register, so its fast reads would return the config word. We write the config word, let
        the conversion under way (still on the old input) finish, then point at the result.
        """
        from adafruit_ads1x15.ads1x15 import _ADS1X15_CONFIG_GAIN, Mode

        d = self.driver
        word = (
            (mux & 0x7) << 12
            | _ADS1X15_CONFIG_GAIN[gain]
            | Mode.CONTINUOUS
            | d.rate_config[data_rate]
            | 0x0003  # comparator off
        )
        self.selected = None
        d._write_register(_REG_CONFIG, word)
        sleep(2.0 / data_rate)
        d.get_last_result(False)  # moves the pointer to the conversion register
        self.selected = (mux, gain, data_rate)


def _open_bus(config: Ads1115Config, ctx: SensorContext) -> Any:
    key = ("i2c", config.bus)
    bus = ctx.resources.get(key)
    if bus is not None:
        return bus
    if config.bus == "fake":
        from daisee_node.sensors.fake_i2c import FakeI2C

        fail_rate = config.fake.i2c_fail_rate if config.fake else 0.0
        bus = FakeI2C(fail_rate=fail_rate)
    else:
        try:
            from adafruit_extended_bus import ExtendedI2C
        except ImportError as exc:  # pragma: no cover - only on a broken install
            raise DaiseeError(f"I2C support is not installed: {exc}") from None
        device = Path(f"/dev/i2c-{config.bus}")
        if not device.exists():
            raise DaiseeError(f"{device} does not exist: enable I2C (raspi-config) or check 'bus'")
        bus = ExtendedI2C(config.bus)
    ctx.resources[key] = bus
    return bus


def _fake_inputs(config: Ads1115Config, ctx: SensorContext, bus: Any) -> None:
    """Wire the configured signal to the fake chip's inputs through the transducer."""
    from daisee_node.sensors.fake_i2c import FakeADS1115, current_waveform

    fake = config.fake
    assert fake is not None
    chip = bus.devices.get(config.address)
    if chip is None:
        chip = bus.attach(config.address, FakeADS1115())
    transfer = config.transfer()
    amplitude = None
    if fake.follow_channel:
        channel, volts = fake.follow_channel, float(config.voltage_v or 1.0)

        def amplitude() -> float:
            value = ctx.restore(channel)
            return 0.0 if value is None else abs(value) / volts / max(fake.ac_rms_a, 1e-9)

    current = current_waveform(
        dc_a=fake.dc_a,
        ac_rms_a=fake.ac_rms_a,
        frequency_hz=fake.frequency_hz,
        harmonic3_pct=fake.harmonic3_pct,
        noise_a=fake.noise_a,
        seed=fake.seed,
        amplitude=amplitude,
    )
    offset = fake.zero_error_v * config.divider
    # transfer.volts, unrolled: the chip calls this at every conversion.
    gain = transfer.sensitivity_v_per_a
    if config.differential is not None:
        positive, negative = config.differential
        reference = transfer.zero_v
        chip.set_input(negative, reference)
        level = reference + offset + transfer.zero_v
        chip.set_input(positive, lambda t: level + gain * current(t))
    else:
        assert config.channel is not None
        level = offset + transfer.zero_v
        chip.set_input(config.channel, lambda t: level + gain * current(t))


def _open_chip(config: Ads1115Config, ctx: SensorContext) -> _Chip:
    """The chip this input is wired to, shared with every other sensor on it."""
    with _OPEN_LOCK:
        return _open_chip_locked(config, ctx)


def _open_chip_locked(config: Ads1115Config, ctx: SensorContext) -> _Chip:
    bus = _open_bus(config, ctx)
    if config.bus == "fake":
        _fake_inputs(config, ctx, bus)
    key = ("ads1115", config.bus, config.address)
    chip = ctx.resources.get(key)
    if chip is None:
        from adafruit_ads1x15.ads1x15 import Mode
        from adafruit_ads1x15.ads1115 import ADS1115

        try:
            driver = ADS1115(
                bus,
                gain=config.adafruit_gain(),
                data_rate=config.data_rate,
                mode=Mode.CONTINUOUS,
                address=config.address,
            )
        except ValueError as exc:  # the driver's probe: nothing answers at that address
            raise OSError(f"no ADS1115 at 0x{config.address:02x} on bus {config.bus}") from exc
        chip = _Chip(driver)
        ctx.resources[key] = chip
    return chip


def load_calibration(data_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((data_dir / CALIBRATION_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def save_calibration(data_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    """Store one sensor's calibration, atomically (a power cut leaves the old or the new file)."""
    data = load_calibration(data_dir)
    data[name] = entry
    path = data_dir / CALIBRATION_FILE
    durable.replace(path, json.dumps(data, indent=2, sort_keys=True))
    return path


def cycle_stats(times: Sequence[float], values: Sequence[float], hz: float) -> tuple[float, float]:
    """Mean and RMS deviation over one cycle of a periodic signal, from samples at any instants.

    Each sample is placed at its phase in the cycle (its time modulo the period) and the cycle is
    integrated by the trapezoid rule over phase, around the circle. A plain average over a span
    of whole cycles is biased as soon as part of the span is missing (the phases it would have
    shown are under-counted), and interpolating over the gap in time is worse (a chord across a
    peak); folded onto one cycle, the other cycles of the window fill the phases it left out.
    """
    n = len(values)
    if n < 2:
        return (float(values[0]) if n else math.nan), 0.0
    t0 = times[0]
    points = sorted(zip([(t - t0) * hz % 1.0 for t in times], values, strict=True))
    centre = sum(values) / n  # squares of uncentred codes would lose the variance to rounding
    first = second = 0.0  # twice the integrals of (v - centre) and (v - centre)² over phase
    before, v = points[-1]
    before -= 1.0  # the last sample, one cycle back: the first gap closes the circle
    a = v - centre
    for phase, v in points:
        b = v - centre
        gap = phase - before
        first += gap * (a + b)
        second += gap * (a * a + b * b)
        before, a = phase, b
    mean = first / 2
    return centre + mean, math.sqrt(max(0.0, second / 2 - mean * mean))


def _mid_conversion(
    device: Any, perf: Callable[[], float], sleep: Callable[[float], None], period: float
) -> float:
    """When to start reading so that the reads fall half-way between the chip's conversions.

    A read close to the end of a conversion gets that result or the one before it depending on a
    few µs of wake-up delay, so its stamp is a period off the instant it stands for at random; a
    chip converting at the read rate stays that close for a whole window. Its conversions are
    found by polling until the result changes (for at most two periods); on a quiet input that
    never changes, or a thread too often away to bracket a change, reading starts at once.
    """
    buf = bytearray(2)

    def code() -> int:
        with device:
            device.readinto(buf, end=2)
        return buf[0] << 8 | buf[1]

    before, last = perf(), code()
    for _ in range(16):
        sleep(period / 8)
        t = perf()
        value = code()
        if value != last and t - before <= period / 2:
            completed = (before + t) / 2  # a conversion completed between the two reads
            lag = perf() - completed - period / 2
            return completed + period / 2 + max(0, math.ceil(lag / period)) * period
        before, last = t, value
    return perf()


class Window:
    """What one sampling window saw."""

    __slots__ = ("mean_v", "rms_v", "samples", "saturated", "seconds")

    def __init__(
        self, mean_v: float, rms_v: float, samples: int, saturated: bool, seconds: float
    ) -> None:
        self.mean_v = mean_v
        self.rms_v = rms_v
        self.samples = samples
        self.saturated = saturated
        self.seconds = seconds


class Ads1115Sensor(Sensor):
    """Current (and power, energy) from one transducer on an ADS1115 input."""

    kind = "ads1115"
    config_model = Ads1115Config

    def __init__(self, config: Ads1115Config, ctx: SensorContext) -> None:
        super().__init__(config, ctx)
        self.cfg = config
        self.transfer = config.transfer()
        self.fsr = config.full_scale_v()
        n = config.name
        has_power = config.voltage_v is not None or config.voltage_channel is not None
        self._channels = [Channel(f"{n}.current_a", "A")]
        if has_power:
            # Power beyond 110 % of the rating is OUT_OF_RANGE and never integrated, so with a
            # fixed voltage the counters cannot advance faster than this.
            rate = None
            if config.voltage_v is not None and config.voltage_channel is None:
                max_w = 1.1 * self.transfer.rated_a * abs(config.voltage_v) * config.power_factor
                rate = max_w / 3600.0 if max_w > 0 else None
            self._channels += [
                Channel(f"{n}.power_w", "W"),
                Channel(f"{n}.import_wh", "Wh", "total_increasing", max_rate_per_s=rate),
                Channel(f"{n}.export_wh", "Wh", "total_increasing", max_rate_per_s=rate),
            ]
        self._has_power = has_power
        self._chip: _Chip | None = None
        c = config
        #: the chip's multiplexer setting for this input
        self.mux = (
            DIFFERENTIAL_PAIRS.index(tuple(c.differential))
            if c.differential is not None
            else 4 + int(c.channel or 0)
        )
        self.energy = EnergyCounter(max_gap_s=max(60.0, 10 * config.interval_s))
        self.samples_taken = 0
        self.sample_cpu_s = 0.0
        #: the sampling thread's steady clock and blocking sleep: the chip converts on physical
        #: time, whatever the node's clock says (a test drives both by hand)
        self.thread_clock: Callable[[], float] = time.perf_counter
        self.thread_sleep: Callable[[float], None] = time.sleep

    @property
    def channels(self) -> Sequence[Channel]:
        return self._channels

    @property
    def window_samples(self) -> int:
        c = self.cfg
        seconds = c.window_cycles / c.mains_hz if c.mode == "ac" else c.window_s
        return max(2, round(seconds * c.data_rate))

    async def setup(self) -> None:
        calibration = load_calibration(self.ctx.data_dir).get(self.name)
        if calibration and self.cfg.zero_v is None and "zero_v" in calibration:
            t = self.transfer
            self.transfer = Transfer(
                t.sensitivity_v_per_a, float(calibration["zero_v"]), t.rated_a, t.ac_only
            )
        self._chip = await asyncio.to_thread(_open_chip, self.cfg, self.ctx)
        n = self.name
        self.energy.import_wh = self.ctx.restore(f"{n}.import_wh") or 0.0
        self.energy.export_wh = self.ctx.restore(f"{n}.export_wh") or 0.0

    def sample_window(self, n: int | None = None) -> Window:
        """Take one window of conversions (blocking: runs on a worker thread)."""
        assert self._chip is not None
        n = self.window_samples if n is None else n
        chip = self._chip
        driver = chip.driver
        rate = self.cfg.data_rate
        period = 1.0 / rate
        wanted = (self.mux, self.cfg.adafruit_gain(), rate)
        cpu0 = time.thread_time()
        with chip.lock:
            try:
                if chip.selected != wanted:
                    chip.select(*wanted, sleep=self.thread_sleep)
                # The transaction the driver's `get_last_result(fast=True)` makes (read the
                # conversion register, the pointer already on it), through the driver's own
                # I2C device and its bus lock, minus three Python calls per sample: each is
                # paid 860 times a second, cold, right after the thread wakes.
                device = driver.i2c_device
                readinto = device.readinto
                buf = bytearray(2)
                raw: list[int] = []
                stamps: list[float] = []
                append, stamp = raw.append, stamps.append
                perf, sleep = self.thread_clock, self.thread_sleep
                start = perf()
                if self.cfg.mode == "ac":
                    start = _mid_conversion(device, perf, sleep, period)
                # The window is a span of time (whole mains cycles), not a count: a thread
                # woken late skips the conversions it missed instead of bunching its reads
                # (several reads of one result). What it missed is a gap in time, which the AC
                # statistics fill from the other cycles (`cycle_stats`): each read is stamped.
                i = 0
                while i < n:
                    late = perf() - (start + i * period)
                    if late < 0:
                        sleep(-late)
                    elif late >= period:
                        i += int(late / period)
                        if i >= n:
                            break
                    # Stamped before the transaction: the chip answers with the last result it
                    # had when the transaction began, and a real bus may block during it.
                    stamp(perf())
                    with device:
                        readinto(buf, end=2)
                    append(buf[0] << 8 | buf[1])
                    i += 1
                seconds = perf() - start
            except BaseException:
                chip.selected = None  # the chip's state is unknown after a bus error
                raise
        self.sample_cpu_s += time.thread_time() - cpu0
        if not raw:
            raise OSError(f"{self.name}: the sampling thread was away for the whole window")
        codes = [r - 0x10000 if r & 0x8000 else r for r in raw]  # two's complement
        n = len(codes)
        self.samples_taken += n
        scale = self.fsr / 32768.0
        if self.cfg.mode == "ac":
            mean_code, rms_code = cycle_stats(stamps, codes, self.cfg.mains_hz)
        else:
            mean_code = sum(codes) / n
            rms_code = math.sqrt(sum((c - mean_code) ** 2 for c in codes) / n)
        saturated = max(codes) >= 32767 or min(codes) <= -32768
        return Window(mean_code * scale, rms_code * scale, n, saturated, seconds)

    def _voltage(self) -> float | None:
        c = self.cfg
        if c.voltage_channel is not None:
            r = self.ctx.latest.get(c.voltage_channel)
            max_age_ms = c.voltage_max_age_s * 1000
            if r is not None and r.good and self.ctx.clock.now_ms() - r.t_ms <= max_age_ms:
                return r.value
        return c.voltage_v

    async def read(self) -> Sequence[Reading]:
        try:
            window = await asyncio.to_thread(self.sample_window)
        except BaseException:
            self.energy.interrupt()
            raise
        return self.readings_from(window)

    def readings_from(self, window: Window) -> list[Reading]:
        """Turn a window into current, power and energy readings."""
        c, t = self.cfg, self.transfer
        t_ms = self.ctx.clock.now_ms()
        if c.mode == "ac":
            amps = window.rms_v / t.sensitivity_v_per_a  # RMS has no sign: `direction` gives it
            signed = amps if c.direction == "import" else -amps
        else:
            amps = signed = -t.amps(window.mean_v) if c.invert else t.amps(window.mean_v)
        quality = Quality.GOOD
        if window.saturated:
            quality = Quality.SATURATED
        elif abs(amps) > 1.1 * t.rated_a:
            quality = Quality.OUT_OF_RANGE
        n = self.name
        out = [Reading(f"{n}.current_a", t_ms, amps, quality)]
        if not self._has_power:
            return out
        volts = self._voltage()
        if volts is None:
            out.append(Reading(f"{n}.power_w", t_ms, math.nan, Quality.UNAVAILABLE))
            self.energy.interrupt()
        else:
            power = signed * volts * c.power_factor
            out.append(Reading(f"{n}.power_w", t_ms, power, quality))
            if quality == Quality.GOOD:
                self.energy.add(power, t_ms / 1000.0)
            else:
                self.energy.interrupt()
        out.append(Reading(f"{n}.import_wh", t_ms, self.energy.import_wh))
        out.append(Reading(f"{n}.export_wh", t_ms, self.energy.export_wh))
        return out

    async def calibrate(self, seconds: float = 2.0) -> dict[str, Any]:
        """Measure the zero-current output (no load on the conductor!) and store it."""
        n = max(2, round(seconds * self.cfg.data_rate))
        window = await asyncio.to_thread(self.sample_window, n)
        if window.saturated:
            raise DaiseeError(f"{self.name}: the input is at full scale; check the wiring")
        entry = {
            "zero_v": window.mean_v,
            "noise_v_rms": window.rms_v,
            "samples": window.samples,
            "datasheet_zero_v": self.cfg.transfer().zero_v,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_calibration(self.ctx.data_dir, self.name, entry)
        t = self.transfer
        self.transfer = Transfer(t.sensitivity_v_per_a, window.mean_v, t.rated_a, t.ac_only)
        return entry
