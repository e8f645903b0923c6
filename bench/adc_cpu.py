"""Process CPU per ADC conversion, through the whole node, on the fake I2C bus.

    .venv/bin/python bench/adc_cpu.py [--samples 12000] [--reference-samples 1500]

Runs a node in this process (`daisee_node.daemon.Node`: samplers, checks, store writer, rule
tick) with four ADS1115 inputs on one chip (AC, 860 SPS, 10 mains cycles a window, every second),
the real Adafruit driver over the fake I2C bus, whose chip emulates the registers and the
conversion timing. Counted: the conversions the chip produced and the driver read (each result
once, `FakeADS1115.conversions`), from the moment every input has finished a first window (a
condition, not a sleep) until `--samples` more are counted. Reported: the process CPU clock over
that span (`time.process_time`, every thread) per counted conversion.

The reference, in the same run: Adafruit's driver alone on a fresh fake chip, in its default
single-shot mode, reading the same input until `--reference-samples` conversions are counted.
The chip answers as a real one does: after each start the status bit stays "busy" for one
conversion time (1/860 s = 1.16 ms), and the driver polls it. Its rate shows the emulated chip
really makes the driver wait (at most 860 conversions a second). The floor: the CPU of one
paced wake-up of a thread that reads nothing (one per conversion is the least a sampler can do:
the chip keeps only its last result). One JSON line.
Target: ≤ 30 µs CPU per counted conversion (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daisee_node import logs
from daisee_node.config import config_from_dict
from daisee_node.daemon import Node
from daisee_node.sensors.ads1115 import Ads1115Sensor
from daisee_node.sensors.fake_i2c import FakeADS1115, FakeI2C

TARGET_US = 30.0
DATA_RATE = 860
ADDRESS = 0x48
INPUTS = 4
POLL_S = 0.1
TIMEOUT_S = 300.0


def node_config(data_dir: Path) -> dict[str, Any]:
    sensors = [
        {
            "name": f"line{i}",
            "kind": "ads1115",
            "bus": "fake",
            "address": ADDRESS,
            "channel": i,
            "current_sensor": "sct013-030",
            "mode": "ac",
            "data_rate": DATA_RATE,
            "voltage_v": 230,
            "interval_s": 1.0,
            "fake": {"ac_rms_a": 5 + i, "noise_a": 0.02, "seed": i},
        }
        for i in range(INPUTS)
    ]
    return {
        "node": {"id": "bench", "data_dir": str(data_dir)},
        "log": {"level": "warning"},
        "sensors": sensors,
    }


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a condition (checked every POLL_S), or fail after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


async def node_run(samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(config_from_dict(node_config(Path(tmp))))
        task = asyncio.create_task(node.run())
        try:
            await node.started.wait()
            sensors = [node.sensors[f"line{i}"] for i in range(INPUTS)]
            assert all(isinstance(s, Ads1115Sensor) for s in sensors)
            adcs: list[Ads1115Sensor] = sensors  # type: ignore[assignment]
            # Start-up (imports, the chip's set-up, first windows) is not what is measured.
            await until(lambda: all(s.samples_taken > 0 for s in adcs), "a first window")
            bus = node.ctx.resources[("i2c", "fake")]
            assert isinstance(bus, FakeI2C)
            chip = bus.devices[ADDRESS]
            conv0, read0 = chip.conversions, sum(s.samples_taken for s in adcs)
            win0 = sum(node.sensor_stats[s.name].reads for s in adcs)
            thread0 = sum(s.sample_cpu_s for s in adcs)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await until(lambda: chip.conversions - conv0 >= samples, f"{samples} conversions")
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            counted = chip.conversions - conv0
            read = sum(s.samples_taken for s in adcs) - read0
            windows = sum(node.sensor_stats[s.name].reads for s in adcs) - win0
            in_windows = sum(s.sample_cpu_s for s in adcs) - thread0
            errors = sum(node.sensor_stats[s.name].errors for s in adcs)
        finally:
            node.request_stop()
            await task
    return {
        "conversions": counted,
        "codes_read": read,
        "windows": windows,
        "read_errors": errors,
        "seconds": wall,
        "cpu_s": cpu,
        "us_per_sample": cpu / counted * 1e6,
        "sampling_thread_us_per_sample": in_windows / counted * 1e6,
    }


def driver_alone(samples: int) -> dict[str, float]:
    """Adafruit's driver in its default single-shot mode, polling the chip's status bit."""
    from adafruit_ads1x15.ads1115 import ADS1115
    from adafruit_ads1x15.analog_in import AnalogIn

    bus = FakeI2C()
    chip: FakeADS1115 = bus.attach(ADDRESS)
    chip.set_input(0, 1.0)
    channel = AnalogIn(ADS1115(bus, data_rate=DATA_RATE, address=ADDRESS), 0)
    _ = channel.value  # the first conversion sets the input up
    conv0, cpu0, t0 = chip.conversions, time.process_time(), time.perf_counter()
    while chip.conversions - conv0 < samples:
        _ = channel.value
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    counted = chip.conversions - conv0
    return {
        "conversions": counted,
        "samples_per_s": counted / wall,
        "us_per_sample": cpu / counted * 1e6,
    }


def wake_floor(samples: int) -> float:
    """CPU per wake of a thread paced at the data rate that does nothing else: the least a
    sampler that reads each conversion as it comes can cost on this machine."""
    period = 1.0 / DATA_RATE
    perf, sleep = time.perf_counter, time.sleep
    cpu0, start = time.thread_time(), perf()
    for i in range(samples):
        late = perf() - (start + i * period)
        if late < 0:
            sleep(-late)
    return (time.thread_time() - cpu0) / samples * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=12_000)
    p.add_argument("--reference-samples", type=int, default=1_500)
    args = p.parse_args()
    logs.configure("warning")
    ours = asyncio.run(node_run(args.samples))
    reference = driver_alone(args.reference_samples)
    floor = wake_floor(args.reference_samples)
    print(
        json.dumps(
            {
                "bench": "adc_cpu_per_sample",
                "machine": f"{platform.machine()} x{os.cpu_count()}",
                "inputs": INPUTS,
                "data_rate_sps": DATA_RATE,
                "conversions": ours["conversions"],
                "codes_read": ours["codes_read"],
                "windows": ours["windows"],
                "read_errors": ours["read_errors"],
                "seconds": round(ours["seconds"], 2),
                "conversions_per_s": round(ours["conversions"] / ours["seconds"]),
                "us_per_sample": round(ours["us_per_sample"], 1),
                "of_which_sampling_thread_us": round(ours["sampling_thread_us_per_sample"], 1),
                "target_us": TARGET_US,
                "meets_target": ours["us_per_sample"] <= TARGET_US,
                "reference": {
                    "name": "Adafruit driver alone, single-shot, polling the status bit",
                    "conversions": reference["conversions"],
                    "samples_per_s": round(reference["samples_per_s"]),
                    "us_per_sample": round(reference["us_per_sample"], 1),
                },
                "ratio_to_reference": round(ours["us_per_sample"] / reference["us_per_sample"], 3),
                "floor": {
                    "name": "a thread paced at 860 wakes a second doing nothing else",
                    "us_per_wake": round(floor, 1),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
