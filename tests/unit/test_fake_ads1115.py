"""The fake bus emulates the chip closely enough for Adafruit's unmodified driver."""

from __future__ import annotations

import math
import time

import pytest
from adafruit_ads1x15.ads1x15 import Mode
from adafruit_ads1x15.ads1115 import ADS1115
from adafruit_ads1x15.analog_in import AnalogIn

from daisee_node.sensors.fake_i2c import FakeADS1115, FakeI2C


def chip_on_bus(address: int = 0x48) -> tuple[FakeI2C, FakeADS1115]:
    bus = FakeI2C()
    return bus, bus.attach(address)


@pytest.mark.parametrize("gain", [2 / 3, 1, 2, 4, 8, 16])
def test_single_ended_voltage_within_one_lsb_at_every_gain(gain: float) -> None:
    bus, chip = chip_on_bus()
    ads = ADS1115(bus, gain=gain)
    fsr = {2 / 3: 6.144, 1: 4.096, 2: 2.048, 4: 1.024, 8: 0.512, 16: 0.256}[gain]
    for fraction in (0.0, 0.1, 0.5, 0.9):
        chip.set_input(2, fraction * fsr)
        assert AnalogIn(ads, 2).voltage == pytest.approx(fraction * fsr, abs=fsr / 32768)


def test_differential_pairs_and_clamping_at_full_scale() -> None:
    bus, chip = chip_on_bus()
    ads = ADS1115(bus, gain=1)
    chip.set_input(0, 2.6)
    chip.set_input(1, 2.5)
    chip.set_input(3, 3.0)
    assert AnalogIn(ads, 0, 1).voltage == pytest.approx(0.1, abs=2e-4)
    assert AnalogIn(ads, 0, 3).voltage == pytest.approx(-0.4, abs=2e-4)
    chip.set_input(2, 9.0)  # beyond ±4.096 V
    assert AnalogIn(ads, 2).value == 32767


def test_single_shot_conversion_takes_one_period() -> None:
    bus, chip = chip_on_bus()
    ads = ADS1115(bus, data_rate=8, mode=Mode.SINGLE)  # 125 ms per conversion
    chip.set_input(0, 1.0)
    start = time.monotonic()
    _ = AnalogIn(ads, 0).value  # the driver polls the OS bit until the conversion is done
    assert time.monotonic() - start >= 1 / 8 * 0.9


def test_continuous_mode_produces_one_result_per_period() -> None:
    bus, chip = chip_on_bus(0x49)
    chip.set_input(0, lambda t: t)  # a ramp: each conversion sees a new value
    ads = ADS1115(bus, data_rate=860, mode=Mode.CONTINUOUS, address=0x49)
    a = AnalogIn(ads, 0)
    _ = a.value
    before = chip.conversions
    t0 = time.monotonic()
    values = {a.value for _ in range(2000)}
    elapsed = time.monotonic() - t0
    produced = chip.conversions - before
    assert produced <= elapsed * 860 + 2  # never faster than the data rate
    assert len(values) <= produced + 1


def test_missing_chip_and_bus_errors_raise_oserror() -> None:
    bus = FakeI2C()
    with pytest.raises(ValueError, match="No I2C device"):
        ADS1115(bus, address=0x4A)  # the driver's probe
    bus.attach(0x4A)
    ads = ADS1115(bus, address=0x4A)
    bus.fail_next(1)
    with pytest.raises(OSError):
        _ = AnalogIn(ads, 0).value
    assert isinstance(AnalogIn(ads, 0).value, int)  # and the bus works again after


def test_config_register_round_trips_through_the_driver() -> None:
    bus, chip = chip_on_bus()
    ads = ADS1115(bus, gain=4, data_rate=475, mode=Mode.CONTINUOUS)
    ads._read_config()
    assert (ads.gain, ads.data_rate, ads.mode) == (4, 475, Mode.CONTINUOUS)
    assert chip.rate == 475 and chip.continuous
    assert not math.isnan(chip.read(2)[0])


def test_the_status_bit_stays_busy_for_one_conversion_time() -> None:
    """As a real chip: after a single-shot start, 'ready' and the result come only once the
    conversion time at the data rate has passed (the clock here moves only when told)."""
    now = [100.0]
    bus = FakeI2C()
    chip = bus.attach(0x48, FakeADS1115(clock=lambda: now[0]))
    chip.set_input(0, 1.0)
    # OS=1 (start), AIN0 against GND, ±2.048 V, single-shot, 860 SPS, comparator off
    word = 0x8000 | 0b100 << 12 | 0b010 << 9 | 0x0100 | 0b111 << 5 | 0x0003
    bus.writeto(0x48, bytes([1, word >> 8, word & 0xFF]))

    def register(pointer: int) -> int:
        out = bytearray(2)
        bus.writeto_then_readfrom(0x48, bytes([pointer]), out)
        return out[0] << 8 | out[1]

    period = 1 / 860
    assert not register(1) & 0x8000  # converting
    now[0] += period * 0.99
    assert not register(1) & 0x8000
    assert register(0) == 0  # no result yet
    now[0] += period * 0.02
    assert register(1) & 0x8000  # ready
    assert register(0) == round(1.0 / 2.048 * 32768)
    assert chip.conversions == 1


def test_continuous_results_are_the_input_at_each_conversion_instant() -> None:
    """As a real chip: a conversion completes every 1/rate s (counted here from the config
    write) and the register holds the input as it was at the latest one, however late or
    irregular the reads (a late reader skips results; it never gets the missed ones bunched)."""
    now = [50.0]
    bus = FakeI2C()
    chip = bus.attach(0x48, FakeADS1115(clock=lambda: now[0]))
    chip.set_input(0, lambda t: t - 50.0)  # a ramp: each result tells when it was converted
    # AIN0 against GND, ±4.096 V, continuous, 860 SPS, comparator off
    word = 0b100 << 12 | 0b001 << 9 | 0b111 << 5 | 0x0003
    bus.writeto(0x48, bytes([1, word >> 8, word & 0xFF]))
    bus.writeto(0x48, bytes([0]))
    period = 1 / 860
    seen = []
    for wait in (1.3, 0.2, 0.1, 4.7, 1.0, 9.5, 0.6):  # in conversion periods
        now[0] += wait * period
        out = bytearray(2)
        bus.readfrom_into(0x48, out)
        done = math.floor((now[0] - 50.0) / period)
        assert out[0] << 8 | out[1] == round(((50.0 + done * period) - 50.0) / 4.096 * 32768)
        seen.append(done)
    assert seen == [1, 1, 1, 6, 7, 16, 17]
    assert chip.conversions == len(set(seen))  # one result per completed conversion looked at
