"""A fake I2C bus with ADS1115 chips on it, emulated at the register level.

The real Adafruit driver runs unchanged on it: `FakeI2C` has the busio.I2C methods the driver
uses (`try_lock`, `unlock`, `writeto`, `readfrom_into`, `writeto_then_readfrom`, `scan`), and
`FakeADS1115` answers like the chip: a pointer register, the config register with its OS bit,
the conversion register, the threshold registers, the input multiplexer, the programmable gain,
the data rate (a conversion takes 1/rate seconds) and single-shot or continuous conversion.
The analog inputs are functions of time (volts), so tests and the demo can feed DC levels, mains
sine waves with offset and noise, or anything else.
"""

from __future__ import annotations

import errno
import math
import random
import threading
import time
from collections.abc import Callable

Signal = Callable[[float], float]

FULL_SCALE_V = {0: 6.144, 1: 4.096, 2: 2.048, 3: 1.024, 4: 0.512, 5: 0.256, 6: 0.256, 7: 0.256}
DATA_RATES = (8, 16, 32, 64, 128, 250, 475, 860)
# Multiplexer settings: (positive input, negative input or None for GND).
MUX = {
    0: (0, 1),
    1: (0, 3),
    2: (1, 3),
    3: (2, 3),
    4: (0, None),
    5: (1, None),
    6: (2, None),
    7: (3, None),
}

REG_CONVERSION, REG_CONFIG, REG_LO_THRESH, REG_HI_THRESH = 0, 1, 2, 3
#: noise values drawn at once by `current_waveform`
NOISE_BLOCK = 256
CONFIG_DEFAULT = 0x8583  # from the datasheet: single-shot, AIN0-AIN1, ±2.048 V, 128 SPS


def _nack() -> OSError:
    return OSError(errno.EREMOTEIO, "Remote I/O error")


class FakeADS1115:
    """One ADS1115 on the fake bus."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.inputs: dict[int, Signal] = {}
        self.pointer = REG_CONVERSION
        self.config = CONFIG_DEFAULT
        self.lo_thresh = 0x8000
        self.hi_thresh = 0x7FFF
        self._conversion = 0
        self._started = clock()  # when the current (single) or first (continuous) conversion began
        self._converting = False
        self._done = 0  # conversions completed since continuous mode (re)started
        self.conversions = 0  # how many results the chip produced (for tests)

    # -- analog side ---------------------------------------------------------------------------

    def set_input(self, pin: int, signal: Signal | float) -> None:
        """Drive analog input AIN<pin> with a constant or a function of time (volts)."""
        if callable(signal):
            self.inputs[pin] = signal
        else:
            level = float(signal)
            self.inputs[pin] = lambda _t: level

    def _volts(self, pin: int, t: float) -> float:
        signal = self.inputs.get(pin)
        return 0.0 if signal is None else signal(t)

    @property
    def config(self) -> int:
        """The config register (without the OS bit, which reads as the conversion status)."""
        return self._config

    @config.setter
    def config(self, config: int) -> None:
        # Decoded once here, not at every read: the chip is read hundreds of times a second.
        self._config = config
        self._pins = MUX[(config >> 12) & 0x7]
        self._fsr = FULL_SCALE_V[(config >> 9) & 0x7]
        self._period = 1.0 / DATA_RATES[(config >> 5) & 0x7]
        self._continuous = not config & 0x0100

    def _convert(self, t: float) -> int:
        positive, negative = self._pins
        v = self._volts(positive, t) - (0.0 if negative is None else self._volts(negative, t))
        code = round(v / self._fsr * 32768)
        self.conversions += 1
        return max(-32768, min(32767, code))

    # -- timing --------------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        return DATA_RATES[(self.config >> 5) & 0x7]

    @property
    def continuous(self) -> bool:
        return self._continuous

    def _update(self) -> None:
        """Bring the conversion register up to date with the passage of time."""
        now = self.clock()
        period = self._period
        if self._continuous:
            done = math.floor((now - self._started) / period)
            if done >= 1 and done != self._done:
                # A new result only when a conversion has completed since the last look.
                self._done = done
                self._conversion = self._convert(self._started + done * period)
        elif self._converting and now - self._started >= period:
            self._conversion = self._convert(self._started + period)
            self._converting = False

    # -- register side -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return  # an address probe
        self.pointer = data[0] & 0x3
        if len(data) < 3:
            return
        value = (data[1] << 8) | data[2]
        if self.pointer == REG_CONFIG:
            self._update()
            self.config = value & 0x7FFF
            if self.continuous:
                self._started = self.clock()
                self._done = 0
            elif value & 0x8000:  # OS=1 in single-shot: start one conversion
                self._started = self.clock()
                self._converting = True
        elif self.pointer == REG_LO_THRESH:
            self.lo_thresh = value
        elif self.pointer == REG_HI_THRESH:
            self.hi_thresh = value

    def read(self, n: int) -> bytes:
        self._update()
        if self.pointer == REG_CONVERSION:
            value = self._conversion & 0xFFFF
            if n == 2:  # what every driver reads: one register
                return value.to_bytes(2, "big")
        elif self.pointer == REG_CONFIG:
            # OS bit reads 1 when no conversion is in progress.
            busy = self._converting or self.continuous
            value = self.config | (0 if busy else 0x8000)
        elif self.pointer == REG_LO_THRESH:
            value = self.lo_thresh
        else:
            value = self.hi_thresh
        return bytes([(value >> 8) & 0xFF, value & 0xFF] * (n // 2 + 1))[:n]


class FakeI2C:
    """A bus with the busio.I2C methods the Adafruit drivers use. Thread-safe like the real one."""

    def __init__(self, *, fail_rate: float = 0.0, seed: int = 0) -> None:
        self.devices: dict[int, FakeADS1115] = {}
        self.fail_rate = fail_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fail_next = 0
        self.transactions = 0

    def attach(self, address: int, device: FakeADS1115 | None = None) -> FakeADS1115:
        device = device or FakeADS1115()
        self.devices[address] = device
        return device

    def detach(self, address: int) -> None:
        self.devices.pop(address, None)

    def fail_next(self, n: int = 1) -> None:
        """Make the next n transactions fail as a loose wire would."""
        self._fail_next += n

    def _device(self, address: int) -> FakeADS1115:
        self.transactions += 1
        if self._fail_next > 0:
            self._fail_next -= 1
            raise _nack()
        if self.fail_rate and self._rng.random() < self.fail_rate:
            raise _nack()
        device = self.devices.get(address)
        if device is None:
            raise _nack()
        return device

    # busio.I2C interface
    def try_lock(self) -> bool:
        return self._lock.acquire(blocking=False)

    def unlock(self) -> None:
        self._lock.release()

    def scan(self) -> list[int]:
        return sorted(self.devices)

    def writeto(
        self, address: int, buffer: bytes, *, start: int = 0, end: int | None = None
    ) -> None:
        self._device(address).write(bytes(buffer[start:end]))

    def readfrom_into(
        self, address: int, buffer: bytearray, *, start: int = 0, end: int | None = None
    ) -> None:
        end = len(buffer) if end is None else end
        buffer[start:end] = self._device(address).read(end - start)

    def writeto_then_readfrom(
        self,
        address: int,
        buffer_out: bytes,
        buffer_in: bytearray,
        *,
        out_start: int = 0,
        out_end: int | None = None,
        in_start: int = 0,
        in_end: int | None = None,
    ) -> None:
        device = self._device(address)
        device.write(bytes(buffer_out[out_start:out_end]))
        in_end = len(buffer_in) if in_end is None else in_end
        buffer_in[in_start:in_end] = device.read(in_end - in_start)

    def deinit(self) -> None:
        self.devices.clear()


def current_waveform(
    *,
    dc_a: float = 0.0,
    ac_rms_a: float = 0.0,
    frequency_hz: float = 50.0,
    harmonic3_pct: float = 0.0,
    noise_a: float = 0.0,
    seed: int = 0,
    amplitude: Callable[[], float] | None = None,
) -> Callable[[float], float]:
    """Current in amps as a function of time: DC + mains sine (+ 3rd harmonic) + noise.

    `amplitude`, when given, scales the AC part at each conversion (the demo uses it to follow
    the simulated PV output).
    """
    gauss = random.Random(seed).gauss
    sin = math.sin
    w = 2 * math.pi * frequency_hz
    peak = ac_rms_a * math.sqrt(2)
    h3 = harmonic3_pct / 100.0
    # The same draws in the same order, taken a block at a time: one pass through the random
    # module per block instead of one per conversion (its code is most of a conversion's cost).
    noise: list[float] = []

    def current(t: float) -> float:
        scale = amplitude() if amplitude is not None else 1.0
        wave = sin(w * t) + h3 * sin(3 * w * t) if h3 else sin(w * t)
        value = dc_a + scale * peak * wave
        if noise_a:
            if not noise:
                noise.extend(gauss(0.0, noise_a) for _ in range(NOISE_BLOCK))
                noise.reverse()
            value += noise.pop()
        return value

    return current
